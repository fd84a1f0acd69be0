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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs
import torch

from localmim_cli.version import __version__
from localmim_cli.engine import atomic
from localmim_cli.plugins import registry
from localmim_cli.engine.distributed import World
from localmim_cli.errors import RunDirError




def home() -> Path:
    """Where runs go by default: $LOCALMIM_HOME, else the platform's user data folder."""
    return Path(os.environ.get("LOCALMIM_HOME") or platformdirs.user_data_path("localmim"))


def default_run_dir(label: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return home() / "runs" / f"{label}-{stamp}"


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty folder unless resuming or overwriting; --resume needs a checkpoint."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / "checkpoints").is_dir():
            raise RunDirError(f"--resume: {out} holds no checkpoints to resume from")
        return
    if non_empty:
        if not overwrite:
            raise RunDirError(f"--out {out} is not empty: pass --resume to continue that run or "
                              "--overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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
    plugins = {f"{r.kind}/{r.name}": {"distribution": r.distribution, "version": r.version,
                                        "ok": r.ok}
               for kind in registry.GROUPS for r in registry.discover(kind)}
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

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint, since those steps run again."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

