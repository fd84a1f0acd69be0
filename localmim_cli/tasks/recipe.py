"""What a fine-tuning task supplies to `tasks/finetune.py`, and the part of its training task
that every fine-tuning task has.

A task (classification, segmentation, ...) is a package `tasks/<name>/` with its data, model
head, metric and a `recipe.py` that holds a `Recipe`: it reads and checks the task's data,
makes the model from the `--init` weights and returns an engine `TrainingTask` built on
`ValidatedTask`, which keeps the validation records and `checkpoints/best/` by the task's own
metric. `config/tasks.py` names the task's settings schema and where its recipe is.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.engine.task import TrainingTask

if TYPE_CHECKING:
    import torch

    from localmim_cli.engine.checkpoints import Checkpoint
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.task import Position, RunLog
    from localmim_cli.tasks.task_benchmark import BenchStep
    from localmim_cli.weights.encoder_weights import EncoderWeights

BEST = "best"  # checkpoints/best: the best validation score of the run


class Recipe(ABC):
    """One fine-tuning task, as `tasks/finetune.py` drives it."""

    name: str                      # the task's name (config/tasks.py)
    resumable_changes: frozenset[str]   # settings a resume may change without breaking exact continuation

    @abstractmethod
    def read_data(self, settings: Any, resumed: Checkpoint | None = None) -> Any:
        """The task's data, checked before anything is written (one-line DataErrors naming the
        file); for a resumed run, read as the run started (its class list)."""

    @abstractmethod
    def describe_data(self, data: Any) -> str:
        """One line: what was found (classes, images, validation)."""

    @abstractmethod
    def epoch_images(self, settings: Any, data: Any) -> int:
        """Training samples per epoch, which the step plan divides into batches."""

    @abstractmethod
    def model_shape(self, settings: Any, weights: EncoderWeights | None, resumed: Checkpoint | None = None) -> Any:
        """The architecture to build: the --init weights' (None: from settings alone), checked
        against the settings; a resumed run's from its checkpoint."""

    @abstractmethod
    def build_model(self, settings: Any, data: Any, shape: Any, weights: EncoderWeights | None) -> torch.nn.Module:
        """The model with the encoder's weights loaded and the task's new parts initialised."""

    @abstractmethod
    def training_task(self, settings: Any, data: Any, shape: Any, model: torch.nn.Module,
                      init_record: dict[str, Any] | None, placement: Placement, run_dir: Path) -> ValidatedTask:
        """The engine task that trains `model` on `data`."""

    def describe_model(self, shape: Any, model: torch.nn.Module) -> str:
        """One line for --dry-run: the architecture and its size."""
        n_params = sum(p.numel() for p in model.parameters())
        return f"model: {shape.describe()}, {n_params / 1e6:.2f} M parameters"

    @abstractmethod
    def score_line(self, summary: dict[str, Any], run_dir: Path) -> str:
        """The validation part of the command line's last line ("" when there was none)."""

    def benchmark_step(self, settings: Any, device: torch.device) -> BenchStep:
        """The task's training step on a synthetic batch on `device`, the model built from
        settings alone (model.arch), for `localmim benchmark --preset` (tasks/task_benchmark.py)."""
        from localmim_cli.errors import UsageError
        raise UsageError(f"benchmark: the {self.name} task has no step to time")


def init_record(weights: EncoderWeights | None) -> dict[str, Any] | None:
    """What a run records about its --init weights."""
    if weights is None:
        return None
    return {"source": str(weights.source), "kind": weights.kind, "shape": dataclasses.asdict(weights.shape)}


class ValidatedTask(TrainingTask):
    """A fine-tuning task's validation passes and their records: every validation line in
    metrics.jsonl (kind "val"), the last and best in each checkpoint's meta, and the weights of
    the best score so far in `checkpoints/best/` (higher `best_metric` is better)."""

    command = "finetune"
    best_metric: str               # the validation record's key that picks checkpoints/best

    def __init__(self, settings: Any, model: torch.nn.Module, init_record: dict[str, Any] | None,
                 placement: Placement, run_dir: Path):
        self.settings, self.model, self.init_record = settings, model, init_record
        self.placement, self.run_dir = placement, run_dir
        self.best: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}

    @abstractmethod
    def has_validation(self) -> bool:
        """Whether there is anything to validate on."""

    @abstractmethod
    def validate(self) -> dict[str, Any]:
        """One validation pass on every process; the metrics (the same on every process)."""

    @abstractmethod
    def validation_note(self, record: dict[str, Any]) -> str:
        """One progress line for a validation record."""

    def run_validation(self, epoch: int, position: Position, log: RunLog) -> None:
        """Validate now (`epoch`: the 0-based epoch the record names); keep the record, and the
        weights in checkpoints/best/ when the score is the best so far."""
        if not self.has_validation():
            return
        self.last_val = {"epoch": epoch, "step": position.step, **self.validate()}
        improved = not self.best or self.last_val[self.best_metric] > self.best[self.best_metric]
        if improved:
            self.best = dict(self.last_val)
            if self.placement.world.is_main:
                self._save_best(position)
        log.record({"kind": "val", **self.last_val, "best": improved})
        log.note(self.validation_note(self.last_val))

    def _save_best(self, position: Position) -> None:
        """checkpoints/best/: the weights of the best validation score so far, beside the last
        train.keep_last (which keep only the newest); export and evaluate take it like any
        checkpoint folder. Recorded in manifest.json under "best"."""
        from localmim_cli.engine import checkpoints, runs

        meta = {"kind": self.kind, "position": dataclasses.asdict(position),
                "settings": self.settings.model_dump(mode="json"), "run_dir": str(self.run_dir),
                **self.checkpoint_meta()}
        checkpoints.save(self.run_dir / "checkpoints", BEST, self.model.state_dict(), meta, latest=False)
        runs.update_manifest(self.run_dir, best={"checkpoint": f"checkpoints/{BEST}", **self.best})

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"init": self.init_record, "val": self.last_val, "best": self.best}

    def restore(self, checkpoint: Checkpoint) -> None:
        from localmim_cli.weights.loading import load_exactly

        load_exactly(self.model, checkpoint.model_state(), checkpoint.path)
        self.best, self.last_val = checkpoint.meta.get("best") or {}, checkpoint.meta.get("val") or {}

    def summary(self) -> dict[str, Any]:
        """What the run's summary adds: the last and best validation."""
        return {"val": self.last_val, "best": self.best}
