"""What the pretraining and fine-tuning loops share: precision, the optimizer step, the metrics
of a logging interval, the divergence stop and the position of a run.

Both loops keep their metrics on the device and read them once per logging interval, so the
step loop never waits on the host.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from localmim_cli.engine import checkpoints
from localmim_cli.engine import distributed
from localmim_cli.engine.schedule import lr_at
from localmim_cli.errors import RunDirError, TrainingDiverged




@dataclass
class Position:
    epoch: int = 0
    micro_step: int = 0   # next micro-step to run within the epoch
    step: int = 0         # optimizer steps done in the whole run


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it, fp32 elsewhere (bf16 autocast on CPUs is slow)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, lr: float, clip_grad: float | None):
    """Set the lr (times each group's `lr_scale`, for layer decay), unscale, clip, step.

    Returns a function giving the gradient norm of this step as a device tensor; computing it
    costs a pass over the gradients, so the loops ask for it only on logging steps.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad) if clip_grad is not None else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    def grad_norm() -> torch.Tensor:
        if clipped is not None:
            return clipped
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return grad_norm


class IntervalMeter:
    """Losses, the non-finite flag, images and data-wait of one logging interval."""

    def __init__(self, n_losses: int, device: torch.device):
        self.loss_sum = torch.zeros(n_losses, device=device)
        self.count = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.reset()

    def reset(self) -> None:
        """Start a new interval; the non-finite flag stays set until the run stops."""
        self.loss_sum.zero_()
        self.count.zero_()
        self.images, self.data_wait = 0, 0.0
        self.t_start = self.t_fetch = time.perf_counter()

    def fetched(self) -> None:
        """Call when the next batch arrives: the time since `waiting()` was data-wait."""
        self.data_wait += time.perf_counter() - self.t_fetch

    def waiting(self) -> None:
        self.t_fetch = time.perf_counter()

    def add(self, losses: torch.Tensor, total: torch.Tensor, images: int) -> None:
        self.loss_sum += losses.detach().float()
        self.count += 1
        self.nonfinite |= ~torch.isfinite(total.detach())
        self.images += images

    def diverged(self, world: distributed.World) -> bool:
        return bool(distributed.all_reduce_mean(self.nonfinite.float(), world).item() > 0)

    def read(self, world: distributed.World) -> dict[str, Any]:
        """Mean losses over the interval and all processes, throughput and data-wait share."""
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        losses = distributed.all_reduce_mean(self.loss_sum / self.count.clamp_min(1), world).tolist()
        return {"losses": losses, "images_per_s": self.images / elapsed, "data_wait": self.data_wait / elapsed}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"a.b.c": value}; plugin `options` stay whole, as one value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a resume that would change the recipe: only the `allowed` settings may differ."""
    before, now = flatten(saved), flatten(current)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in allowed]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise RunDirError(f"--resume would change settings the run was started with ({diffs}); "
                         f"start a new run instead, or change only {', '.join(sorted(allowed))}")


def stop_if_diverged(bad: bool, pos: Position, ckpt_dir: Path) -> None:
    if not bad:
        return
    last = checkpoints.read_latest_name(ckpt_dir)
    kept = f"the last good checkpoint ({last}) is intact" if last else "no checkpoint had been written yet"
    raise TrainingDiverged(
        f"the loss became NaN or infinite by step {pos.step}; {kept}. Try a lower learning rate "
        "(optim.base_lr), gradient clipping (optim.clip_grad=1.0), more warmup, or "
        "train.precision=bf16 / fp32 instead of fp16; then --resume or start over.")


@dataclass
class Loop:
    """The parts of a run the step loop drives; the two commands fill it differently.

    epoch_batches(epoch, start_micro) -> the epoch's batches from micro-step `start_micro` on
    forward(batch, epoch, micro) -> (loss, per-part losses (K,), images in this micro-batch);
        runs under autocast; `loss` is what is minimised
    loss_fields(losses: list of K floats) -> the loss entries of a metrics record
    on_epoch_end(position) and save(position): hooks, called on every process
    """

    net: torch.nn.Module          # what forward calls (DDP-wrapped under torchrun)
    model: torch.nn.Module        # the unwrapped module whose parameters are stepped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    world: distributed.World
    device: torch.device
    precision: str
    train: Any                    # settings with epochs, accum_steps, log_every, checkpoint_every
    optim: Any                    # settings with min_lr, warmup_epochs, clip_grad
    lr: float                     # peak lr of the schedule
    steps_per_epoch: int
    n_losses: int
    ckpt_dir: Path
    epoch_batches: Any
    forward: Any
    loss_fields: Any
    on_epoch_end: Any
    save: Any
    metrics_write: Any            # called with each record on the main process


def run_loop(loop: Loop, pos: Position, progress) -> dict[str, Any]:
    """Micro-steps with accumulation, the lr schedule, logging every log_every steps, and
    checkpoints every checkpoint_every steps (or at each epoch's end) and at the last step."""
    tr, world = loop.train, loop.world
    micro_per_epoch = loop.steps_per_epoch * tr.accum_steps
    total_steps = loop.steps_per_epoch * tr.epochs
    meter = IntervalMeter(loop.n_losses, loop.device)
    summary: dict[str, Any] = {}
    for epoch in range(pos.epoch, tr.epochs):
        start = pos.micro_step if epoch == pos.epoch else 0
        meter.reset()
        for micro, batch in enumerate(loop.epoch_batches(epoch, start), start=start):
            meter.fetched()
            last_micro = (micro + 1) % tr.accum_steps == 0
            sync = contextlib.nullcontext() if (last_micro or not world.distributed) else loop.net.no_sync()
            with sync:
                with autocast(loop.precision, loop.device):
                    loss, losses, n_images = loop.forward(batch, epoch, micro)
                loop.scaler.scale(loss / tr.accum_steps).backward()
            meter.add(losses, loss, n_images * world.size)
            if not last_micro:
                meter.waiting()
                continue

            opt = loop.optim
            lr = lr_at(pos.step, loop.steps_per_epoch, loop.lr, opt.min_lr, opt.warmup_epochs, tr.epochs)
            grad_norm = optimizer_step(loop.model, loop.optimizer, loop.scaler, lr, opt.clip_grad)
            pos.step += 1
            progress.advance()
            at_epoch_end = micro + 1 == micro_per_epoch
            pos.micro_step = micro + 1

            if pos.step % tr.log_every == 0 or at_epoch_end:
                stop_if_diverged(meter.diverged(world), pos, loop.ckpt_dir)
                interval = meter.read(world)
                record = {"epoch": epoch, "step": pos.step, **loop.loss_fields(interval.pop("losses")),
                          "lr": lr, "grad_norm": float(grad_norm()), **interval}
                if world.is_main:
                    loop.metrics_write(record)
                progress.update(record)
                summary = record
                meter.reset()

            if at_epoch_end:
                pos = Position(epoch + 1, 0, pos.step)
                loop.on_epoch_end(pos)
            due = (pos.step % tr.checkpoint_every == 0) if tr.checkpoint_every else at_epoch_end
            if due or pos.step == total_steps:
                stop_if_diverged(meter.diverged(world), pos, loop.ckpt_dir)
                loop.save(pos)
            meter.waiting()
        distributed.barrier(world)
    return {**summary, "steps": pos.step}
