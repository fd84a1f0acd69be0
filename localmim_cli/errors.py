"""Every error a user can fix, in one hierarchy.

The command line prints a `UserError` as one line (exit status 2) and nothing else; any other
exception is a bug in localmim or a plugin and keeps its traceback. So raise a `UserError`
subclass only where the message tells the user what to change, naming the file, flag or setting.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, settings, files or flags."""


class SettingsError(UserError):
    """Settings that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], header: str = "invalid settings"):
        self.problems = list(problems)
        super().__init__(f"{header}:\n" + "\n".join(f"  - {p}" for p in self.problems))


class PresetError(UserError):
    """A preset that cannot be found or read; the message says which and why."""


class ModelError(UserError, ValueError):
    """Model settings that do not fit together (taps, scales, sizes), as the encoder, target or
    model reported it. Also a ValueError: that is what encoders and targets raise for options
    they cannot build (the plugin interface's rule), and what Python callers may catch."""


class PluginError(UserError, LookupError):
    """A plugin asked for by name is missing or broken; the message says which and why."""


class DataError(UserError):
    """Data the run cannot use; the message names the offending path."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit; the message names the file and the reason."""


class NonFiniteWeights(CheckpointError):
    """A weights file holds NaN or infinite values; `file` is the file, `detail` which tensors."""

    def __init__(self, file: object, detail: str):
        self.file, self.detail = file, detail
        super().__init__(f"{file}: the weights are not finite ({detail}); these weights cannot be used: "
                         "pass a checkpoint saved before they went wrong")


class RunDirError(UserError):
    """The run directory cannot be used as asked (or a resume would change its recipe)."""


class OutputError(RunDirError):
    """An output path a command may not write as asked (engine/outputs.py); names the flag and the
    path. A RunDirError too, as a refused run directory always was."""


class TrainingDiverged(UserError):
    """The loss went NaN or infinite; the message says what to try."""


class ExportError(UserError):
    """The export could not be made or did not verify; the message says why."""


class UsageError(UserError):
    """Command arguments that contradict each other or are out of range (names the flag)."""


class RunInterrupted(BaseException):
    """A run stopped on SIGINT or SIGTERM after saving a checkpoint; the message says where and how
    to resume. Not a UserError: the command line exits 128 + the signal's number (130, 143), as a
    shell expects of a process a signal stopped. A BaseException, as KeyboardInterrupt is, so that
    no `except Exception` on the way out mistakes it for a failure of its own."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)


class RunAborted(BaseException):
    """SIGINT or SIGTERM outside the training steps, or a second Ctrl-C inside them: stop at once.
    The command line exits 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)
