"""What a training task supplies to the engine, and what the engine hands back to it.

The engine (`engine.training`) owns everything every training run does the same way: steps and
lr, optimizer and grad scaler, exact resume, the process group and DDP, the one data loader,
checkpoints, metrics.jsonl and progress. A task (pretraining, fine-tuning) owns its model, its
dataset, its loss and what it records. Torch is only named here, never imported, so a task
module can define its task class without loading torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch.utils.data import Dataset

    from localmim_cli.engine.checkpoints import Checkpoint


@dataclass
class Position:
    epoch: int = 0
    micro_step: int = 0   # next micro-step to run within the epoch
    step: int = 0         # optimizer steps done in the whole run


class RunLog(Protocol):
    """Where a task reports during a run; every call is a no-op outside the main process."""

    def record(self, entry: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and hand it to the loggers."""

    def note(self, text: str) -> None:
        """Print one line alongside the progress."""

    def image(self, tag: str, png: Path, step: int) -> None:
        """Show a PNG (a figure the task wrote into the run) in the loggers, at `step`."""


class TrainingTask(ABC):
    """The per-task parts of a training run.

    `dataset` items are keyed by (epoch, index): the engine keeps one loader with persistent
    workers for the whole run, and those workers never see anything but their keys, so the
    epoch must travel with every index for each sample's randomness to be a function of
    (run seed, epoch, index) alone.
    """

    kind: str                     # checkpoint meta "kind", the progress label
    model: torch.nn.Module        # unwrapped: the optimizer steps it, checkpoints hold it
    dataset: Dataset              # one epoch of training samples, keyed by (epoch, index)
    loss_count: int               # how many per-part losses forward returns

    @property
    def command(self) -> str:
        """The localmim command that resumes the run (a stopped run's message names it)."""
        return self.kind

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each with its weight decay (and `lr_scale`, if any)."""

    @abstractmethod
    def forward(self, net: torch.nn.Module, batch: Any, epoch: int, micro_step: int,
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss to minimise, per-part losses (loss_count,), images in the batch) of one
        micro-batch. `net` is `model`, DDP-wrapped under torchrun; called under autocast."""

    def batch_transform(self, batch: Any) -> Any:
        """A batch as `forward` takes it, from the batch as the loader gave it; called in the
        main process right after each batch arrives. The default changes nothing; pretraining
        moves the batch to the device here and finishes decoding there (the GPU data path)."""
        return batch

    @abstractmethod
    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        """The loss entries of a metrics record, from the interval's mean per-part losses."""

    def blocks(self) -> list[torch.nn.Module]:
        """The model's repeated blocks: what activation checkpointing recomputes and FSDP shards
        one by one. By default every member of a ModuleList named `blocks`."""
        from localmim_cli.engine.activation_checkpointing import transformer_blocks
        return transformer_blocks(self.model)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What checkpoints record besides kind, position, settings, provenance and run_dir."""
        return {}

    def restore(self, checkpoint: Checkpoint) -> None:
        """On resume: put the checkpoint's weights (and any state of the task's own) back."""
        from localmim_cli.weights.loading import load_exactly

        load_exactly(self.model, checkpoint.model_state(), checkpoint.model_file)

    def data_record(self) -> dict[str, Any]:
        """manifest.json's "data": where the training images came from and their fingerprint."""
        return {}

    def run_record(self) -> dict[str, Any]:
        """Further manifest.json entries of the task's own."""
        return {}

    def describe(self) -> list[str]:
        """Lines printed before training starts: the data and the model."""
        return []

    def write_files(self, run_dir: Path) -> None:
        """Files of the task's own in the run directory; main process, after the resume check."""

    def on_train_start(self, position: Position, log: RunLog) -> None:
        """Called on every process before the first step this process runs (`position.step` is
        0 for a fresh run, the checkpoint's step for a resumed one)."""

    def on_step_end(self, position: Position, log: RunLog) -> None:
        """Called on every process after each optimizer step (`position.step` steps done),
        before that step's checkpoint; a run counted in iterations validates here."""

    def on_epoch_end(self, position: Position, log: RunLog) -> None:
        """Called on every process once `position.epoch` epochs are done."""
