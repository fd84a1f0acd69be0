"""`localmim runs list | show`: what each run directory holds, read from its files alone.

A run's status comes from its latest checkpoint (position against the epochs it was set to) and
its metrics.jsonl; no model is built, so listing many runs is quick.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localmim_cli.engine import checkpoints
from localmim_cli.errors import CheckpointError, DataError, RunDirError
from localmim_cli.tasks.plot import read_metrics


@dataclass
class RunSummary:
    path: str
    kind: str                    # pretrain, finetune, or "?" before the first checkpoint
    status: str                  # finished, stopped, no checkpoint yet
    epoch: int | None            # epochs completed
    epochs: int | None           # epochs the run was set to
    step: int | None             # optimizer steps completed (latest checkpoint)
    last_loss: float | None      # last logged training loss
    best_top1: float | None      # best online k-NN (pretrain) or validation (finetune) top-1, %
    best_at_step: int | None
    floor_top1: float | None     # the k-NN monitor on the encoder as initialised, %: what best_top1 has to beat
    checkpoints: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_run_dir(path: Path) -> bool:
    return (path / "settings.json").is_file()


def summarize(run: Path | str) -> RunSummary:
    run = Path(run)
    if not is_run_dir(run):
        raise RunDirError(f"{run}: not a localmim run directory (no settings.json)")
    settings = json.loads((run / "settings.json").read_text())
    epochs = (settings.get("train") or {}).get("epochs")
    iterations = (settings.get("train") or {}).get("iterations")   # a run counted in steps (segmentation)
    kind, status, epoch, step = "?", "no checkpoint yet", None, None
    ckpt_dir = run / "checkpoints"
    saved = checkpoints.list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    if saved:
        try:
            ckpt = checkpoints.load(ckpt_dir)
            kind = ckpt.meta.get("kind", "pretrain")
            position = ckpt.meta.get("position") or {}
            epoch, step = position.get("epoch"), position.get("step")
            done = (step is not None and step >= iterations) if iterations is not None else \
                (epochs is not None and epoch is not None and epoch >= epochs)
            status = "finished" if done else "stopped"
        except CheckpointError as exc:
            status = f"unreadable checkpoint ({exc})"
    last_loss = best = best_step = floor = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        try:
            records = read_metrics(metrics)
        except DataError:
            records = []
        train = [r for r in records if "kind" not in r and isinstance(r.get("loss"), (int, float))]
        if train:
            last_loss = train[-1]["loss"]
        scored = [(r.get("knn_top1", r.get("val_top1")), r.get("step")) for r in records
                  if r.get("kind") in ("monitor", "val")]
        scored = [s for s in scored if isinstance(s[0], (int, float))]
        if scored:
            best, best_step = max(scored, key=lambda s: s[0])
        floor = next((r["random_init_top1"] for r in records if "random_init_top1" in r), None)
    return RunSummary(str(run), kind, status, epoch, epochs, step, last_loss, best, best_step, floor, len(saved))


def list_runs(root: Path | str) -> list[RunSummary]:
    """Every run directory directly under `root` (or `root` itself), newest first."""
    root = Path(root)
    if not root.is_dir():
        raise RunDirError(f"{root}: no such folder")
    found = [root] if is_run_dir(root) else sorted(
        (p for p in root.iterdir() if p.is_dir() and is_run_dir(p)),
        key=lambda p: (p / "settings.json").stat().st_mtime, reverse=True)
    return [summarize(p) for p in found]
