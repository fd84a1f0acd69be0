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

from localmim_cli import checkpoints, distributed


class TrainingDiverged(RuntimeError):
    """The loss went NaN or infinite; the message says what to try."""


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


def stop_if_diverged(bad: bool, pos: Position, ckpt_dir: Path) -> None:
    if not bad:
        return
    last = checkpoints.read_latest_name(ckpt_dir)
    kept = f"the last good checkpoint ({last}) is intact" if last else "no checkpoint had been written yet"
    raise TrainingDiverged(
        f"the loss became NaN or infinite by step {pos.step}; {kept}. Try a lower learning rate "
        "(optim.base_lr), gradient clipping (optim.clip_grad=1.0), more warmup, or "
        "train.precision=bf16 / fp32 instead of fp16; then --resume or start over.")
