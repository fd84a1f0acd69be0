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
replaced only after that, so a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from localmim_cli.engine import atomic
from localmim_cli.errors import CheckpointError

FORMAT_VERSION = 1
LATEST = "latest.json"


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
        return load_file(str(self.model_file))

    def training_state(self) -> dict[str, Any]:
        return torch.load(self.training_file, map_location="cpu", weights_only=True)


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage; clone keeps each tensor standalone.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(folder: Path, name: str, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
         training_state: dict[str, Any] | None = None, keep_last: int | None = None,
         latest: bool = True) -> Path:
    """Write checkpoint `name` under `folder` atomically, point latest.json at it (unless
    `latest` is False: a side copy such as best/), prune old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic.write_tensors(tmp / "model.safetensors", _contiguous_cpu(model_state))
    if training_state is not None:
        torch.save(training_state, tmp / "training.pt")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    if latest:
        atomic.write_json(folder / LATEST, {"name": name})
    if keep_last:
        prune(folder, keep_last)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "meta.json").is_file())


def prune(folder: Path, keep_last: int) -> None:
    latest = read_latest_name(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def read_latest_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / LATEST).read_text())["name"]
    except (OSError, ValueError, KeyError):
        return None


def load(path: Path) -> Checkpoint:
    """A checkpoint folder, its model.safetensors, a run directory, or a checkpoints/ folder (the
    latest checkpoint of the last two), as weights/locate.py tells them apart."""
    from localmim_cli.weights.locate import checkpoint_folder

    found = checkpoint_folder(path)
    if found.meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{found.folder}: checkpoint format {found.meta.get('format')} is not {FORMAT_VERSION}")
    return Checkpoint(found.folder, found.meta)
