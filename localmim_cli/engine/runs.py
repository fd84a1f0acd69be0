"""The run directory: created or refused up front, a manifest of what ran, and metrics.jsonl."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import platformdirs
import torch

from localmim_cli.version import __version__
from localmim_cli.engine import atomic, outputs
from localmim_cli.engine.outputs import LOCK
from localmim_cli.plugins import registry
from localmim_cli.engine.distributed import World
from localmim_cli.errors import RunDirError




def home() -> Path:
    """Where runs go by default: $LOCALMIM_HOME, else the platform's user data folder."""
    return Path(os.environ.get("LOCALMIM_HOME") or platformdirs.user_data_path("localmim"))


def default_run_dir(label: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return home() / "runs" / f"{label}-{stamp}"


# LOCK: held (flock) by the one process writing into a run directory (outputs.py leaves it alone)


class RunLock:
    """An exclusive flock on the run directory's lock file, held for the whole run, so two runs
    (or two --resume) writing into one directory is refused at once instead of corrupting it.
    The lock goes with the process: a killed run leaves nothing to clean up."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = run_dir, None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"--out {self.run_dir}: cannot be written ({exc.strerror or exc}); "
                              "pick another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"--out {self.run_dir} is in use by another localmim run (pid {holder}); wait "
                              "for it to finish or stop it, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check(out: Path, resume: bool, overwrite: bool, reads: Iterable[Path | str] = ()) -> bool:
    """Whether `out` may take this run, changing nothing (a dry run asks this too): a new, empty
    or writable folder; with --resume, a run that has checkpoints; with --overwrite, only a
    localmim run directory (engine/outputs.py, the rule every output follows). True when an
    earlier run is to be replaced."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume:
        outputs.refuse_protected(out)
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--out {out} is a file, not a folder")
        if not (out / "checkpoints").is_dir():
            raise RunDirError(f"--resume: {out} holds no checkpoints to resume from")
        return False
    return outputs.check_folder(out, outputs.RUN, overwrite, reads=reads)


def prepare(out: Path, resume: bool, overwrite: bool, reads: Iterable[Path | str] = ()) -> RunLock:
    """Claim `out` for a run as `check` allows, clearing an earlier run it replaces. Returns the
    run directory's lock, held: keep it for as long as the run writes."""
    replace = check(out, resume, overwrite, reads)
    lock = RunLock(out).acquire()   # before deleting: never clear a folder another run writes in
    if replace:
        outputs.clear_folder(out)
    return lock


@contextlib.contextmanager
def removed_if_start_fails(out: Path, is_main: bool) -> Iterator[None]:
    """Remove the run directory again when the run fails before its first step was logged and
    the directory did not exist before: a failed start leaves no empty run behind. A run that
    logged a step keeps everything it wrote, and a folder the user made is never removed."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if is_main and not existed and out.is_dir() and not _trained(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def claimed(out: Path, resume: bool, overwrite: bool, is_main: bool, say: Any,
            reads: Iterable[Path | str] = ()) -> Iterator[None]:
    """The run directory, for as long as the run writes: prepared and locked by the main process
    (the one process that writes; `prepare`), and removed again if the start fails
    (`removed_if_start_fails`). The lock is released before a failed start's folder is removed.
    reads: what the run reads (a fine-tune's --init), which it never writes over or inside."""
    with removed_if_start_fails(out, is_main):
        lock = prepare(out, resume, overwrite, reads) if is_main else contextlib.nullcontext()
        if is_main:
            say(f"run directory: {out}")
        with lock:
            yield


def _trained(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return (out / "checkpoints").exists() or (metrics.is_file() and metrics.stat().st_size > 0)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def manifest(world: World, device: torch.device, seed: int, data: dict[str, Any],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # Versions from package metadata; no plugin is imported here (a broken one the run does not
    # use must not stop it). "ok" is known for the plugins the run loaded, None for the others.
    plugins = {f"{r.kind}/{r.name}": {"distribution": r.distribution, "version": r.version,
                                        "ok": r.ok if r.loaded else None}
               for kind in registry.GROUPS for r in registry.entries(kind)}
    return {
        "localmim": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": _version("timm"),
        "platform": platform.platform(),
        "command": sys.argv,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "world_size": world.size,
        "seed": seed,
        "data": data,
        "plugins": plugins,
        **(extra or {}),
    }


def write_manifest(run_dir: Path, info: dict[str, Any]) -> None:
    atomic.write_json(run_dir / "manifest.json", info)


def update_manifest(run_dir: Path, **entries: Any) -> None:
    """Set top-level entries of manifest.json (written at the start) during the run."""
    path = run_dir / "manifest.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    atomic.write_json(path, {**info, **entries})


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; lines survive a crash."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> list[str]:
        """On resume, drop lines logged after the checkpoint, since those steps run again, and
        a final line a crash cut short; returns warnings to show (naming the file)."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept, warnings = [], []
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                if n == len(lines):   # the write a crash interrupted
                    warnings.append(f"{self.path}: dropped a half-written last line (line {n})")
                    break
                raise RunDirError(f"{self.path}: line {n} is not valid JSON; fix or delete that line, "
                                  "then --resume again") from None
            if not isinstance(record, dict):
                raise RunDirError(f"{self.path}: line {n} is not a JSON object")
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))
        return warnings

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

