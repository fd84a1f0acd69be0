"""Learning-rate schedule: per-step linear warmup, then half-cycle cosine to min_lr (MAE's)."""

from __future__ import annotations

import math


def lr_at(step: int, steps_per_epoch: int, lr: float, min_lr: float, warmup_epochs: float,
          epochs: int) -> float:
    """lr of optimizer step `step` (0-based), measured in fractional epochs as MAE does."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
