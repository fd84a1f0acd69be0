"""The step loop every training task runs, and its parts: precision, the optimizer step, the
metrics of a logging interval and the divergence stop.

Metrics stay on the device and are read once per logging interval, so the step loop never
waits on the host.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from localmim_cli.engine import checkpoints
from localmim_cli.engine import distributed
from localmim_cli.engine.compiling import Compilation
from localmim_cli.engine.plan import StepPlan
from localmim_cli.engine.stopping import StopRequest
from localmim_cli.engine.task import Position, TrainingTask
from localmim_cli.errors import RunInterrupted, TrainingDiverged

if TYPE_CHECKING:
    from localmim_cli.engine.loggers import Loggers
    from localmim_cli.engine.progress import StepProgress
    from localmim_cli.engine.runs import MetricsLog


@dataclass(frozen=True)
class Placement:
    """Where a run computes: its processes, this process's device and the precision there."""
    world: distributed.World
    device: torch.device
    precision: str            # fp32, bf16 or fp16; "auto" already resolved


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that compute in it natively (Ampere and later), fp16 with loss scaling
    on older GPUs (where bf16 would only be emulated), fp32 on CPUs (bf16 autocast there is
    slow). An explicit choice stands as given."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
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
        norm = clipped if clipped is not None else \
            torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # sharded (FSDP): whole
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
        self.flag_nonfinite(total)
        self.images += images

    def flag_nonfinite(self, value: torch.Tensor) -> None:
        """Remember a non-finite loss or gradient norm; a device op, so nothing waits on it."""
        self.nonfinite |= ~torch.isfinite(value.detach())

    def diverged(self, world: distributed.World) -> bool:
        return bool(distributed.all_reduce_mean(self.nonfinite.float(), world).item() > 0)

    def read(self, world: distributed.World) -> dict[str, Any]:
        """Mean losses over the interval and all processes, throughput and data-wait share."""
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        losses = distributed.all_reduce_mean(self.loss_sum / self.count.clamp_min(1), world).tolist()
        return {"losses": losses, "images_per_s": self.images / elapsed, "data_wait": self.data_wait / elapsed}


def weights_finite(model: torch.nn.Module, world: distributed.World, device: torch.device) -> bool:
    """Whether every parameter is finite: one pass over the weights, so only before a save.
    The loss checks cannot see an update that itself overflowed (a huge lr), since the loss
    was computed before it. Under FSDP a process holds only its shard of each parameter, so the
    processes' verdicts are all-reduced: either all of them save or all of them stop."""
    with torch.no_grad():
        flags = [torch.isfinite(_local(p)).all() for p in model.parameters() if p.is_floating_point()]
        bad = (~torch.stack(flags).all()).float().to(device) if flags else torch.zeros((), device=device)
    return not bool(distributed.all_reduce_max(bad, world).item() > 0)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP (a DTensor), else all of it."""
    return p.to_local() if hasattr(p, "to_local") else p


def stop_if_diverged(bad: bool, pos: Position, ckpt_dir: Path) -> None:
    if not bad:
        return
    last = checkpoints.read_latest_name(ckpt_dir)
    kept = f"the last good checkpoint ({last}) is intact" if last else "no checkpoint had been written yet"
    raise TrainingDiverged(
        f"the loss, gradients or weights became NaN or infinite by step {pos.step}; {kept}. Try a lower "
        "learning rate (optim.base_lr), gradient clipping (optim.clip_grad=1.0), more warmup, or "
        "train.precision=bf16 / fp32 instead of fp16; then --resume or start over.")


class RunOutput:
    """metrics.jsonl, the configured loggers and the progress display of a run; only the main
    process writes. metrics.jsonl is always written; loggers get the same records after it."""

    def __init__(self, metrics: MetricsLog, progress: StepProgress, is_main: bool, loggers: Loggers | None = None):
        self.metrics, self.progress, self.is_main, self.loggers = metrics, progress, is_main, loggers

    def record(self, entry: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics.write(entry)
        if self.loggers is not None:
            self.loggers.log_metrics(entry)

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.is_main and self.loggers is not None:
            self.loggers.log_image(tag, png, step)

    def note(self, text: str) -> None:
        self.progress.note(text)


@dataclass(frozen=True)
class Trainer:
    """What the step loop drives: one task's model, stepped as the engine set it up."""

    task: TrainingTask
    net: torch.nn.Module                # task.model, under torchrun DDP-wrapped or FSDP-sharded: what forward calls
    no_sync: Callable[[], contextlib.AbstractContextManager]   # around micro-steps that only accumulate
    compilation: Compilation            # compiles at the first step, or falls back to eager
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    clip_grad: float | None
    placement: Placement
    plan: StepPlan
    log_every: int                      # optimizer steps between metrics records
    checkpoint_every: int               # optimizer steps between checkpoints; 0 = each epoch's end
    batches: Callable[[int, int], Iterable[Any]]   # (epoch, first micro-step) -> the rest of that epoch
    save: Callable[[Position], None]    # a checkpoint at the position (every process calls it)
    ckpt_dir: Path
    output: RunOutput


def interrupted(signum: int, pos: Position, ckpt_dir: Path, command: str) -> RunInterrupted:
    name = signal.Signals(signum).name
    run_dir = ckpt_dir.parent
    return RunInterrupted(signum, f"stopped by {name} after step {pos.step}; checkpoint saved in "
                                  f"{ckpt_dir / checkpoints.step_name(pos.step)}. Continue with: "
                                  f"localmim {command} --out {run_dir} --resume")


def run_loop(t: Trainer, pos: Position) -> dict[str, Any]:
    """Micro-steps with accumulation, the lr schedule, metrics every log_every steps, and
    checkpoints every checkpoint_every steps (or at each epoch's end) and at the last step.
    SIGINT or SIGTERM stops it at the next step boundary with a checkpoint (engine/stopping.py)."""
    with StopRequest() as stop:
        return _steps(t, pos, stop)


def _steps(t: Trainer, pos: Position, stop: StopRequest) -> dict[str, Any]:
    task, plan, world = t.task, t.plan, t.placement.world
    device, precision = t.placement.device, t.placement.precision
    meter = IntervalMeter(task.loss_count, device)
    summary: dict[str, Any] = {}
    for epoch in range(pos.epoch, plan.epochs):
        start = pos.micro_step if epoch == pos.epoch else 0
        meter.reset()
        for micro, batch in enumerate(t.batches(epoch, start), start=start):
            meter.fetched()
            batch = task.batch_transform(batch)
            last_micro = (micro + 1) % plan.accum_steps == 0

            def micro_step(batch=batch, epoch=epoch, micro=micro, last_micro=last_micro):
                with contextlib.nullcontext() if last_micro else t.no_sync():
                    with autocast(precision, device):
                        loss, losses, n_images = task.forward(t.net, batch, epoch, micro)
                    t.scaler.scale(loss / plan.accum_steps).backward()
                return loss, losses, n_images
            loss, losses, n_images = t.compilation.first_step(
                micro_step, undo=lambda: t.optimizer.zero_grad(set_to_none=True))
            meter.add(losses, loss, n_images * world.size)
            if not last_micro:
                meter.waiting()
                continue

            lr = plan.lr_at(pos.step)
            grad_norm = optimizer_step(task.model, t.optimizer, t.scaler, lr, t.clip_grad)
            if t.clip_grad is not None:  # clipping computed the norm already: checking it is free
                meter.flag_nonfinite(grad_norm())
            pos.step += 1
            t.output.progress.advance()
            at_epoch_end = micro + 1 == plan.micro_steps_in(epoch)
            pos.micro_step = micro + 1

            logged = pos.step % t.log_every == 0 or at_epoch_end
            if logged:
                stop_if_diverged(meter.diverged(world), pos, t.ckpt_dir)
                interval = meter.read(world)
                record = {"epoch": epoch, "step": pos.step, **task.loss_fields(interval.pop("losses")),
                          "lr": lr, "grad_norm": float(grad_norm()), **interval}
                t.output.record(record)
                t.output.progress.update(record)
                summary = record
                meter.reset()

            task.on_step_end(pos, t.output)
            if at_epoch_end:
                pos = Position(epoch + 1, 0, pos.step)
                task.on_epoch_end(pos, t.output)
            due = (pos.step % t.checkpoint_every == 0) if t.checkpoint_every else at_epoch_end
            # Under torchrun the processes agree on a stop where they synchronise anyway.
            signum = stop.agreed(world, device) if (not world.distributed or logged or due) else None
            if due or pos.step == plan.total_steps or signum:
                # Both verdicts are all-reduced: the processes save together or stop together.
                stop_if_diverged(meter.diverged(world) or not weights_finite(task.model, world, device), pos,
                                 t.ckpt_dir)
                t.save(pos)
            if signum:
                distributed.barrier(world)
                raise interrupted(signum, pos, t.ckpt_dir, task.command)
            meter.waiting()
        distributed.barrier(world)
    return {**summary, "steps": pos.step}
