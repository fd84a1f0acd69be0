"""The pretraining loop: one process, one GPU, or many under torchrun, resumable exactly.

settings -> images -> (per-sample crops, flips and masking noise from the run seed) -> LocalMIM
-> summed multi-scale loss -> AdamW with warmup + cosine -> checkpoints and metrics.jsonl.

No host synchronisation inside the step loop: losses, the non-finite flag and timings stay on
the device and are read once per logging interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from localmim_cli.engine import checkpoints
from localmim_cli.engine import distributed
from localmim_cli.engine import runs
from localmim_cli.model.build import build_model
from localmim_cli.data.images import fingerprint, pretrain_dataset
from localmim_cli.errors import DataError
from localmim_cli.config.layers import Resolved
from localmim_cli.model.localmim import LocalMIM
from localmim_cli.engine.progress import StepProgress
from localmim_cli.data.samplers import StepBatches
from localmim_cli.config.schema import PretrainSettings
from localmim_cli.engine.loop import Loop, Position, check_resume_compatible, resolve_precision, run_loop

# Settings a resume may change without breaking exact continuation.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                     "train.visualize_every", "train.device", "data.workers", "data.path"}


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
    world = distributed.from_environment()
    device = distributed.choose_device(settings.train.device, world)
    distributed.init(world, device)
    try:
        return _train(resolved, run_dir, resume, console, world, device)
    finally:
        distributed.shutdown(world)


def _train(resolved: Resolved, run_dir: Path, resume: bool, console: Console,
           world: distributed.World, device: torch.device) -> dict[str, Any]:
    settings: PretrainSettings = resolved.settings
    tr, opt_s = settings.train, settings.optim
    precision = resolve_precision(tr.precision, device)
    say = console.print if world.is_main else (lambda *a, **k: None)

    torch.manual_seed(tr.seed)
    model: LocalMIM = build_model(settings.model).to(device)
    dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units, tr.seed)
    paths = dataset.paths
    if unreadable:
        say(f"[yellow]leaving out {len(unreadable)} unreadable image(s)[/] (listed in manifest.json)")
    batches = StepBatches(len(dataset), tr.batch_size, world.rank, world.size, tr.seed)
    micro_per_epoch = batches.micro_steps_per_epoch()
    steps_per_epoch = micro_per_epoch // tr.accum_steps
    if steps_per_epoch < 1:
        raise DataError(f"{len(dataset)} images make no full optimizer step of "
                        f"{tr.batch_size} x {world.size} process(es) x {tr.accum_steps} accumulation; "
                        "lower train.batch_size or raise data.repeats")
    micro_per_epoch = steps_per_epoch * tr.accum_steps  # leftover micro-batches are dropped
    total_steps = steps_per_epoch * tr.epochs
    eff_batch = tr.batch_size * world.size * tr.accum_steps
    lr = opt_s.lr if opt_s.lr is not None else opt_s.base_lr * eff_batch / 256

    optimizer = torch.optim.AdamW(param_groups(model, opt_s.weight_decay), lr=lr, betas=opt_s.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metrics_log = runs.MetricsLog(run_dir / "metrics.jsonl")
    ckpt_dir = run_dir / "checkpoints"
    pos = Position()
    if resume:
        ckpt = checkpoints.load(ckpt_dir)
        check_resume_compatible(ckpt.meta["settings"], settings.model_dump(mode="json"), RESUMABLE_CHANGES)
        model.load_state_dict(ckpt.model_state())
        training = ckpt.training_state()
        optimizer.load_state_dict(training["optimizer"])
        scaler.load_state_dict(training["scaler"])
        pos = Position(**ckpt.meta["position"])
        if world.is_main:
            metrics_log.truncate_after(pos.step)
        say(f"resuming from {ckpt.path.name}: epoch {pos.epoch}, step {pos.step}")
    if world.is_main:
        resolved.write(run_dir)

    if world.is_main:
        runs.write_manifest(run_dir, runs.manifest(world, device, tr.seed, {
            "source": str(settings.data.path) if settings.data.path else "built-in sample photos",
            "images": len(paths), "fingerprint": fingerprint(paths),
            "unreadable": [f"{p}: {why}" for p, why in unreadable],
        }, {"precision": precision, "effective_batch": eff_batch, "lr": lr, "resumed": resume}))
    say(f"{len(paths)} images, {steps_per_epoch} steps/epoch x {tr.epochs} epochs on {device} "
        f"({world.size} process(es), {precision})")
    say(f"effective batch {eff_batch} = {tr.batch_size} per device x {world.size} x "
        f"{tr.accum_steps} accumulation; lr = {opt_s.base_lr:g} x {eff_batch}/256 = {lr:.3g}"
        if opt_s.lr is None else f"effective batch {eff_batch}; lr {lr:g} (absolute)")

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model
    # One loader for the whole run: workers persist across epochs, so each epoch does not pay
    # their start-up. The epoch travels with every index, since persistent workers never see
    # a later dataset.set_epoch().
    epoch_sampler = _EpochBatches(batches)
    loader = DataLoader(dataset, batch_sampler=epoch_sampler, num_workers=settings.data.workers,
                        pin_memory=device.type == "cuda", persistent_workers=settings.data.workers > 0,
                        prefetch_factor=4 if settings.data.workers > 0 else None)

    def save_checkpoint(position: Position) -> None:
        if not world.is_main:
            return
        meta = {"kind": "pretrain", "position": vars(position), "settings": settings.model_dump(mode="json"),
                "provenance": resolved.provenance, "run_dir": str(run_dir),
                "cells_px": model.cells_px, "tap_layers": model.encoder.tap_layers}
        checkpoints.save(ckpt_dir, f"step-{position.step:08d}", model.state_dict(), meta,
                         {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
                         keep_last=tr.keep_last)

    def epoch_batches(epoch: int, start: int):
        batches.set_position(epoch, start)
        epoch_sampler.limit = micro_per_epoch - start
        return loader

    def forward(batch: dict[str, torch.Tensor], epoch: int, micro: int):
        images = batch["image"].to(device, non_blocking=True)
        out = net(images, noise=batch["noise"].to(device, non_blocking=True))
        return out.loss, out.losses, images.shape[0]

    def loss_fields(losses: list[float]) -> dict[str, float]:
        return {"loss": sum(losses), **{f"loss_scale{k}": v for k, v in enumerate(losses)}}

    def on_epoch_end(position: Position) -> None:
        if tr.visualize_every and position.epoch % tr.visualize_every == 0 and world.is_main:
            _progress_figure(model, settings.model.target.name, paths, run_dir, position.epoch, tr.seed)

    loop = Loop(net=net, model=model, optimizer=optimizer, scaler=scaler, world=world, device=device,
                precision=precision, train=tr, optim=opt_s, lr=lr, steps_per_epoch=steps_per_epoch,
                n_losses=len(model.scales), ckpt_dir=ckpt_dir, epoch_batches=epoch_batches,
                forward=forward, loss_fields=loss_fields, on_epoch_end=on_epoch_end,
                save=save_checkpoint, metrics_write=metrics_log.write)
    with StepProgress(console, total_steps, pos.step, world.is_main) as progress:
        summary = run_loop(loop, pos, progress)
    return {**summary, "run_dir": str(run_dir), "epochs": tr.epochs}


class _EpochBatches:
    """Yields [(epoch, index), ...] batches of the current position, cut to `limit` micro-steps
    (whole optimizer steps only)."""

    def __init__(self, inner: StepBatches):
        self.inner, self.limit = inner, len(inner)

    def __len__(self) -> int:
        return min(len(self.inner), self.limit)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i >= self.limit:
                return
            yield [(self.inner.epoch, index) for index in batch]


def _progress_figure(model: LocalMIM, target_name: str, paths: list[Path], run_dir: Path, epoch: int,
                     seed: int) -> None:
    """The same few images under the same masks every time, so figures compare across epochs."""
    from localmim_cli.tasks.visualize import write_progress_figure
    write_progress_figure(model, paths[:4], run_dir / "figures" / f"epoch-{epoch:04d}.png", seed,
                          target_name=target_name, title=f"epoch {epoch}")
