"""Checkpoints: tensors in safetensors, metadata in JSON, optimizer state readable with
`torch.load(weights_only=True)`; nothing that needs pickle to load.

Layout inside a run directory:

    checkpoints/step-00000120/model.safetensors   model weights (our key layout)
                             /training.pt         optimizer and grad-scaler state
                             /meta.json           position (epoch, step), settings, versions
    checkpoints/latest.json                       {"name": "step-00000120"}
    checkpoints/best/                             fine-tuning: the weights of the best validation
                                                  top-1 so far (no training.pt; never pruned)

A checkpoint is written into a hidden temporary folder and renamed into place; `latest.json` is
replaced only after that, so a crash at any moment leaves the previous checkpoint loadable. A
failed write removes its temporary folder; one a crash left is removed by the next save.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from localmim_cli.engine import atomic
from localmim_cli.errors import CheckpointError
from localmim_cli.weights.loading import read_safetensors
from localmim_cli.weights.locate import LATEST, read_latest

FORMAT_VERSION = 1
PARTIAL_PREFIX = ".tmp-"   # a checkpoint being written; only a crash leaves one behind


@dataclass
class Checkpoint:
    path: Path          # the checkpoint's folder
    meta: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def training_file(self) -> Path:
        return self.path / "training.pt"

    def model_state(self) -> dict[str, torch.Tensor]:
        return read_safetensors(self.model_file)

    def training_state(self) -> dict[str, Any]:
        """The optimizer and grad-scaler state a resume needs; a CheckpointError naming the file
        when it is missing, cut short or not what this program writes."""
        path = self.training_file
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, so this checkpoint cannot be resumed (its weights in "
                                  f"{self.model_file.name} still serve finetune, evaluate and export)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:   # truncated zip, foreign pickle: torch raises many kinds
            raise CheckpointError(f"{path}: unreadable training state (truncated or damaged: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict)
                and isinstance(state.get("scaler"), dict)):
            raise CheckpointError(f"{path}: not a localmim training state (no optimizer and scaler state)")
        return state


def step_name(step: int) -> str:
    """The folder name of the checkpoint after optimizer step `step`."""
    return f"step-{step:08d}"


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage; clone keeps each tensor standalone.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_failure(exc: BaseException) -> str | None:
    """What went wrong, in words, when `exc` is a failed write; None for anything else (a bug)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in text:
        return "disk full (no space left on the device)"
    if isinstance(exc, OSError):
        return exc.strerror or text or type(exc).__name__
    # torch.save reports a failed write as RuntimeError "[enforce fail at inline_container.cc...]
    # PytorchStreamWriter failed writing file ... file write failed"; almost always a full disk.
    if isinstance(exc, RuntimeError) and ("enforce fail" in text or "write failed" in text
                                          or "failed writing" in text):
        return "disk full or write error (" + text.splitlines()[0][:160] + ")"
    if type(exc).__name__ == "SafetensorError" and ("No space" in text or "os error" in text.lower()):
        return "disk full or write error (" + text[:160] + ")"
    return None


def _write(tmp: Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
           training_state: dict[str, Any] | None) -> None:
    tmp.mkdir()
    atomic.write_tensors(tmp / "model.safetensors", _contiguous_cpu(model_state))
    if training_state is not None:
        torch.save(training_state, tmp / "training.pt")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save(folder: Path, name: str, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
         training_state: dict[str, Any] | None = None, keep_last: int | None = None,
         latest: bool = True) -> Path:
    """Write checkpoint `name` under `folder` atomically, point latest.json at it (unless
    `latest` is False: a side copy such as best/), prune old ones.

    A write that fails (a full disk, above all) leaves no partial folder behind to keep the disk
    full, and is a CheckpointError naming the checkpoint; the previous checkpoint stays intact.
    The caller holds the run directory's lock, so partial folders here are a crash's leftovers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    clear_partials(folder)
    final = folder / name
    tmp = folder / f"{PARTIAL_PREFIX}{name}-{os.getpid()}"
    try:
        _write(tmp, model_state, meta, training_state)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        if latest:
            atomic.write_json(folder / LATEST, {"name": name})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        last = read_latest_name(folder)
        kept = f"{last} is intact" if last else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}: {reason}; the partial checkpoint was "
                              f"removed and {kept}. Free space, then --resume") from exc
    if keep_last:
        prune(folder, keep_last)
    return final


def clear_partials(folder: Path) -> None:
    """Remove checkpoints a crash left half-written; they are never read, only take space."""
    for stale in folder.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "meta.json").is_file())


def prune(folder: Path, keep_last: int) -> None:
    latest = read_latest_name(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def read_latest_name(folder: Path) -> str | None:
    """The name latest.json points at (None when there is none yet); weights/locate.py reads it."""
    return read_latest(folder)


def load(path: Path) -> Checkpoint:
    """A checkpoint folder, its model.safetensors, a run directory, or a checkpoints/ folder (the
    latest checkpoint of the last two), as weights/locate.py tells them apart."""
    from localmim_cli.weights.locate import checkpoint_folder

    found = checkpoint_folder(path)
    if found.meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{found.folder}: checkpoint format {found.meta.get('format')} is not {FORMAT_VERSION}")
    return Checkpoint(found.folder, found.meta)
