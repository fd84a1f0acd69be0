"""Pretraining: one process, one GPU, or many under torchrun, resumable exactly.

settings -> images -> (per-sample crops, flips and masking noise from the run seed) -> LocalMIM
-> summed multi-scale loss -> AdamW with warmup + cosine -> checkpoints and metrics.jsonl.

What is pretraining's own is here (`PretrainTask`); the run around it (steps, lr, resume,
torchrun, checkpoints, metrics) is `engine.training`'s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from localmim_cli.config.layers import Resolved
from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS, MonitorSettings, PretrainSettings
from localmim_cli.data.gpu_decode import place_views, uses_gpu_decode
from localmim_cli.data.images import PretrainImages, pretrain_dataset
from localmim_cli.data.skips import SkipLog
from localmim_cli.engine import distributed, runs, training
from localmim_cli.engine.activation_checkpointing import transformer_blocks
from localmim_cli.engine.loop import Placement
from localmim_cli.engine.plan import plan_steps
from localmim_cli.engine.task import Position, RunLog, TrainingTask
from localmim_cli.errors import DataError, TrainingDiverged
from localmim_cli.model.build import build_model
from localmim_cli.model.localmim import LocalMIM
from localmim_cli.tasks.monitor import KnnMonitor

# Settings a resume may change without breaking exact continuation. data.path may change only
# to name the same data moved elsewhere: the run's data index must still match it (data.index).
# data.decode, like train.device, changes numbers only by rounding: nvJPEG's IDCT vs libjpeg's
# (the views are cut alike; see augment.tensor_view). Loggers and the monitor only watch: the
# monitor reads no generator the training uses, so switching it on, off or to another folder
# leaves the weights exactly as they would have been.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                     "train.visualize_every", "train.device", "data.workers", "data.path", "data.check",
                     "data.decode", "train.loggers",
                     *(f"train.monitor.{name}" for name in MonitorSettings.model_fields),
                     *RESUMABLE_SPEED_SETTINGS}


def param_groups(model: LocalMIM, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; not biases or norm weights (1-D), as published (timm add_weight_decay),
    nor what an encoder plugin lists in its timm-style `no_weight_decay()` (encoder parameter
    names) or `no_weight_decay_keywords()` (name fragments, matched over the whole model, as the
    published Swin pretraining does)."""
    skip = getattr(model.encoder, "no_weight_decay", lambda: set())()
    skip = {f"encoder.{name}" for name in skip}
    keywords = getattr(model.encoder, "no_weight_decay_keywords", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords)
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def check(settings: PretrainSettings) -> str:
    """What `--dry-run` checks, which is everything a real start checks before it trains: the
    device, the model, the data and a step plan (at least one full optimizer step per epoch);
    a summary."""
    world = distributed.from_environment()
    device = distributed.choose_device(settings.train.device, world)
    model = build_model(settings.model)
    dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units,
                                           settings.train.seed)
    plan = plan_steps(len(dataset), settings, world.size)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tr = settings.train
    monitor = (f"; {KnnMonitor(tr.monitor, settings.model.img_size, tr.seed, torch.device('cpu')).describe()}"
               if tr.monitor.path is not None else "")
    return (f"{len(dataset.paths)} images ({len(unreadable)} unreadable left out); model "
            f"{n_params / 1e6:.2f} M trainable parameters; cells {model.cells_px} px at "
            f"{model.encoder.tap_unit}s {model.encoder.tap_layers}{monitor}\n"
            f"{plan.steps_per_epoch} steps/epoch x {plan.epochs} epochs on {device} ({world.size} process(es)); "
            f"{plan.scaling}")


def pretrain(resolved: Resolved, run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
             console: Console | None = None) -> dict[str, Any]:
    """Prepare the run directory (refusing a non-empty one unless resuming or overwriting) and
    train; returns a summary of the last logged step. Every process of a torchrun calls this."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    is_main = distributed.from_environment().is_main
    with runs.claimed(run_dir, resume, overwrite, is_main, console.print):
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
        gpu_decode = uses_gpu_decode(settings.data.decode, placement.device)
        dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units,
                                               settings.train.seed, run_dir=run_dir, world=placement.world,
                                               resume=resumed is not None, jpeg_bytes=gpu_decode)
        if unreadable and placement.world.is_main:
            console.print(f"[yellow]leaving out {len(unreadable)} unreadable image(s)[/] (listed in manifest.json)")
        task = PretrainTask(settings, model, dataset, unreadable, run_dir, placement)
        try:
            summary = training.train(task, resolved, run_dir, resumed, console, placement)
        except TrainingDiverged:
            if placement.world.is_main:
                write_curves(run_dir, console)   # where it went wrong
            raise
        task.skips.report(console, placement.world.is_main)
        if placement.world.is_main:
            write_curves(run_dir, console)
        return summary


def write_curves(run_dir: Path, console: Console) -> None:
    """figures/curves.png, as `localmim plot RUN` draws it. The run's results are already on
    disk, so a plot that fails is a warning, never a failed run."""
    try:
        from localmim_cli.tasks.plot import plot_runs

        plot_runs([run_dir], run_dir / "figures" / "curves.png")
    except Exception as exc:   # noqa: BLE001 - matplotlib missing, a full disk, a torn file...
        console.print(f"warning: no figures/curves.png ({type(exc).__name__}: {exc}); "
                      f"`localmim plot {run_dir}` draws it later", style="yellow", markup=False, highlight=False)


class PretrainTask(TrainingTask):
    """LocalMIM on unlabelled images: the masked multi-scale reconstruction loss, summed."""

    kind = "pretrain"

    def __init__(self, settings: PretrainSettings, model: LocalMIM, dataset: PretrainImages,
                 unreadable: list[tuple[Path, str]], run_dir: Path, placement: Placement):
        self.settings, self.model, self.dataset = settings, model, dataset
        self.unreadable, self.run_dir, self.placement = unreadable, run_dir, placement
        self.loss_count = len(model.scales)
        self.skips = SkipLog(run_dir, placement.world)
        monitor = settings.train.monitor
        # measured on the main process alone: the others go on to the next step's all-reduce and wait
        self.monitor = (KnnMonitor(monitor, settings.model.img_size, settings.train.seed, placement.device)
                        if monitor.path is not None and placement.world.is_main else None)
        self.floor_top1: float | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        return param_groups(self.model, self.settings.optim.weight_decay)

    def blocks(self) -> list[torch.nn.Module]:
        # the encoder's: the decoders are one light block each
        return transformer_blocks(self.model.encoder)

    def batch_transform(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A loaded batch on the device: a decode error raised here as one line, skipped files
        listed, JPEGs left for the GPU decoded there (the GPU data path; `gpu_decode`)."""
        if "error" in batch:
            check = self.dataset.index.check
            checked = ("was not checked before training (data.check = none)" if check == "none" else
                       f"passed the check before training (data.check = {check})")
            raise DataError(f"{batch['error']}. The file {checked}; pass --skip-unreadable to leave "
                            f"out such files, or set data.check = full to find them all first")
        self.skips.add(batch["skipped"])
        device = self.placement.device
        images = batch["image"].to(device, non_blocking=True)
        images = place_views(batch, images, self.dataset.img_size, self._cpu_view)
        return {"image": images, "noise": batch["noise"].to(device, non_blocking=True)}

    def _cpu_view(self, epoch: int, index: int) -> torch.Tensor:
        """One sample by the CPU path, for a batch the GPU decoder refused."""
        cpu = copy.copy(self.dataset)
        cpu.jpeg_bytes = False
        sample = cpu[(epoch, index)]
        self.skips.add(sample["skipped"])
        return sample["image"]

    def forward(self, net: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int, micro_step: int):
        images = batch["image"]
        # Training reads the losses only: the decoders skip the cells that weigh nothing.
        out = net(images, noise=batch["noise"], loss_only=True)
        return out.loss, out.losses, images.shape[0]

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        return {"loss": sum(losses), **{f"loss_scale{k}": v for k, v in enumerate(losses)}}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"cells_px": self.model.cells_px, "tap_layers": self.model.encoder.tap_layers}

    def _source(self) -> str:
        return str(self.settings.data.path) if self.settings.data.path else "built-in sample photos"

    def data_record(self) -> dict[str, Any]:
        index = self.dataset.index
        return {"source": self._source(), "kind": index.kind, "images": len(self.dataset.paths),
                "fingerprint": index.fingerprint, "index": "data-index.json", "check": index.check,
                "unreadable": [f"{p}: {why}" for p, why in self.unreadable],
                "decode": "gpu" if self.dataset.jpeg_bytes else "cpu"}

    def describe(self) -> list[str]:
        lines = [f"data: {len(self.dataset.paths)} images ({self._source()})"]
        return lines + [self.monitor.describe()] if self.monitor else lines

    def on_train_start(self, position: Position, log: RunLog) -> None:
        if self.monitor is None:
            return
        if position.step:   # resumed: the floor was measured when the run started, if the monitor was on
            from localmim_cli.tasks.plot import read_metrics
            metrics = self.run_dir / "metrics.jsonl"
            records = read_metrics(metrics) if metrics.is_file() else []
            self.floor_top1 = next((r["random_init_top1"] for r in records if "random_init_top1" in r), None)
            return
        record = self.monitor.floor(self.model.encoder)
        self.floor_top1 = record["random_init_top1"]
        log.record(record)
        log.note(f"k-NN monitor: random-init encoder {self.floor_top1:.1f}% top-1 (the floor)")

    def on_epoch_end(self, position: Position, log: RunLog) -> None:
        tr = self.settings.train
        if tr.visualize_every and position.epoch % tr.visualize_every == 0 and self.placement.world.is_main:
            figure = _progress_figure(self.model, self.settings.model.target.name, self.dataset.paths,
                                      self.run_dir, position.epoch, tr.seed)
            log.image("reconstruction", figure, position.step)
        if self.monitor is not None and (position.epoch % tr.monitor.every == 0 or position.epoch == tr.epochs):
            record = self.monitor.measure(self.model.encoder, position.epoch - 1, position.step)
            log.record(record)
            floor = f" (random init {self.floor_top1:.1f}%)" if self.floor_top1 is not None else ""
            log.note(f"epoch {position.epoch - 1}: k-NN top-1 {record['knn_top1']:.1f}%{floor}")


def _progress_figure(model: LocalMIM, target_name: str, paths: list[Path], run_dir: Path, epoch: int,
                     seed: int) -> Path:
    """The same few images under the same masks every time, so figures compare across epochs."""
    from localmim_cli.tasks.visualize import write_progress_figure
    out = run_dir / "figures" / f"epoch-{epoch:04d}.png"
    write_progress_figure(model, paths[:4], out, seed, target_name=target_name, title=f"epoch {epoch}")
    return out
