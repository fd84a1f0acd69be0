"""`train.compile`: torch.compile of the model being trained, falling back to eager in one line.

The model is compiled in place (`Module.compile`), before any DDP or FSDP wrap: its state-dict
keys stay as they were, so checkpoints, resume and export see the same module. Compilation
itself happens at the first step; should it fail there (or should the compiler be missing at
build), the run says so in one line, undoes what the failed step left behind and goes on
eagerly. A failure that is not compilation's (a real error in the model) fails again eagerly,
with its own traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot generate code for this device, or None when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
    elif device.type == "cpu":
        from torch._inductor import config   # its compilers: $CXX or g++ (clang++ on macOS)

        names = [c for c in config.cpp.cxx if c]
        if not any(shutil.which(c) for c in names):
            return f"no C++ compiler ({', '.join(names)}) found"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


class Compilation:
    """The model, compiled in place when `mode` is not "off" and the compiler is there."""

    def __init__(self, model: torch.nn.Module, mode: str, device: torch.device, say: Callable[[str], None]):
        self.model, self.mode, self.say = model, mode, say
        self.pending = False           # compiled, first step not yet taken
        self.active = False            # the model runs compiled
        if mode == "off":
            return
        missing = compiler_missing(device)
        if missing:
            self._fall_back(f"{missing}")
            return
        try:
            model.compile(mode=None if mode == "default" else mode)
        except Exception as error:     # an unknown mode, a platform dynamo does not support, ...
            self._fall_back(_first_line(error))
            return
        self.pending = self.active = True

    def _fall_back(self, why: str) -> None:
        self.active = False
        self.say(f"train.compile={self.mode}: cannot compile ({why}); running eagerly")

    def first_step(self, run: Callable[[], T], undo: Callable[[], None]) -> T:
        """run() the step that compiles; if compiling fails, undo() what the step left (its
        gradients), go back to eager and run it again."""
        if not self.pending:
            return run()
        self.pending = False
        try:
            return run()
        except Exception as error:
            self.model._compiled_call_impl = None   # what Module.compile set: eager calls again
            torch._dynamo.reset()
            undo()
            self._fall_back(_first_line(error))
            return run()
