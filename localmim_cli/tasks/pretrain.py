"""Pretraining: one process, one GPU, or many under torchrun, resumable exactly.

settings -> images -> (per-sample crops, flips and masking noise from the run seed) -> LocalMIM
-> summed multi-scale loss -> AdamW with warmup + cosine -> checkpoints and metrics.jsonl.

What is pretraining's own is here (`PretrainTask`); the run around it (steps, lr, resume,
torchrun, checkpoints, metrics) is `engine.training`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from localmim_cli.config.layers import Resolved
from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS, PretrainSettings
from localmim_cli.data.images import PretrainImages, fingerprint, pretrain_dataset
from localmim_cli.engine import distributed, runs, training
from localmim_cli.engine.activation_checkpointing import transformer_blocks
from localmim_cli.engine.loop import Placement
from localmim_cli.engine.task import Position, RunLog, TrainingTask
from localmim_cli.model.build import build_model
from localmim_cli.model.localmim import LocalMIM

# Settings a resume may change without breaking exact continuation.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                     "train.visualize_every", "train.device", "data.workers", "data.path",
                     *RESUMABLE_SPEED_SETTINGS}


def param_groups(model: LocalMIM, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; not biases or norm weights (1-D), as published (timm add_weight_decay),
    nor what an encoder plugin lists in its timm-style `no_weight_decay()`."""
    skip = getattr(model.encoder, "no_weight_decay", lambda: set())()
    skip = {f"encoder.{name}" for name in skip}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def check(settings: PretrainSettings) -> str:
    """What `--dry-run` checks: the model builds and the data is readable; a one-line summary."""
    model = build_model(settings.model)
    dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units,
                                           settings.train.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{len(dataset.paths)} images ({len(unreadable)} unreadable left out); model "
            f"{n_params / 1e6:.2f} M trainable parameters; cells {model.cells_px} px at "
            f"{model.encoder.tap_unit}s {model.encoder.tap_layers}")


def pretrain(resolved: Resolved, run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
             console: Console | None = None) -> dict[str, Any]:
    """Prepare the run directory (refusing a non-empty one unless resuming or overwriting) and
    train; returns a summary of the last logged step. Every process of a torchrun calls this."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    if distributed.from_environment().is_main:
        runs.prepare(run_dir, resume, overwrite)
        console.print(f"run directory: {run_dir}")
    return run(resolved, run_dir, resume, console)


def run(resolved: Resolved, run_dir: Path, resume: bool, console: Console) -> dict[str, Any]:
    """Train with resolved settings; returns a summary of the last logged step.

    The run directory must already be prepared (runs.prepare). The resolved settings and their
    provenance are written into it once a resume has been checked against the checkpoint.
    """
    settings: PretrainSettings = resolved.settings
    with training.process_group(settings.train) as placement:
        resumed = training.checked_resume(run_dir, resume, settings, RESUMABLE_CHANGES)
        torch.manual_seed(settings.train.seed)
        model = build_model(settings.model).to(placement.device)
        dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units,
                                               settings.train.seed)
        if unreadable and placement.world.is_main:
            console.print(f"[yellow]leaving out {len(unreadable)} unreadable image(s)[/] (listed in manifest.json)")
        task = PretrainTask(settings, model, dataset, unreadable, run_dir, placement)
        return training.train(task, resolved, run_dir, resumed, console, placement)


class PretrainTask(TrainingTask):
    """LocalMIM on unlabelled images: the masked multi-scale reconstruction loss, summed."""

    kind = "pretrain"

    def __init__(self, settings: PretrainSettings, model: LocalMIM, dataset: PretrainImages,
                 unreadable: list[tuple[Path, str]], run_dir: Path, placement: Placement):
        self.settings, self.model, self.dataset = settings, model, dataset
        self.unreadable, self.run_dir, self.placement = unreadable, run_dir, placement
        self.loss_count = len(model.scales)

    def param_groups(self) -> list[dict[str, Any]]:
        return param_groups(self.model, self.settings.optim.weight_decay)

    def blocks(self) -> list[torch.nn.Module]:
        # the encoder's: the decoders are one light block each
        return transformer_blocks(self.model.encoder)

    def forward(self, net: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int, micro_step: int):
        device = self.placement.device
        images = batch["image"].to(device, non_blocking=True)
        out = net(images, noise=batch["noise"].to(device, non_blocking=True))
        return out.loss, out.losses, images.shape[0]

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        return {"loss": sum(losses), **{f"loss_scale{k}": v for k, v in enumerate(losses)}}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"cells_px": self.model.cells_px, "tap_layers": self.model.encoder.tap_layers}

    def _source(self) -> str:
        return str(self.settings.data.path) if self.settings.data.path else "built-in sample photos"

    def data_record(self) -> dict[str, Any]:
        paths = self.dataset.paths
        return {"source": self._source(), "images": len(paths), "fingerprint": fingerprint(paths),
                "unreadable": [f"{p}: {why}" for p, why in self.unreadable]}

    def describe(self) -> list[str]:
        return [f"data: {len(self.dataset.paths)} images ({self._source()})"]

    def on_epoch_end(self, position: Position, log: RunLog) -> None:
        every = self.settings.train.visualize_every
        if every and position.epoch % every == 0 and self.placement.world.is_main:
            _progress_figure(self.model, self.settings.model.target.name, self.dataset.paths, self.run_dir,
                             position.epoch, self.settings.train.seed)


def _progress_figure(model: LocalMIM, target_name: str, paths: list[Path], run_dir: Path, epoch: int,
                     seed: int) -> None:
    """The same few images under the same masks every time, so figures compare across epochs."""
    from localmim_cli.tasks.visualize import write_progress_figure
    write_progress_figure(model, paths[:4], run_dir / "figures" / f"epoch-{epoch:04d}.png", seed,
                          target_name=target_name, title=f"epoch {epoch}")
