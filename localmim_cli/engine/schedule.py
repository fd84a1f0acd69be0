"""Learning-rate schedules, per optimizer step.

- `lr_at`: linear warmup, then half-cycle cosine to min_lr, in fractional epochs (MAE's; the
  pretraining and classification recipes).
- `PolySchedule`: polynomial decay over a number of iterations with a linear warmup that scales
  it, as mmcv's `PolyLrUpdaterHook` with `warmup="linear"` computes it (the published
  segmentation recipes, which count iterations, not epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, steps_per_epoch: int, lr: float, min_lr: float, warmup_epochs: float,
          epochs: int) -> float:
    """lr of optimizer step `step` (0-based), measured in fractional epochs as MAE does."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PolySchedule:
    lr: float                 # peak (the lr at step 0 without warmup)
    min_lr: float
    total_steps: int          # the decay reaches min_lr here
    power: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6   # the warmup's first lr, as a share of the poly lr there

    def at(self, step: int) -> float:
        """lr of optimizer step `step` (0-based): (lr - min_lr) (1 - step/total)^power + min_lr,
        times 1 - (1 - step/warmup)(1 - warmup_ratio) during the warmup (mmcv's "linear")."""
        lr = (self.lr - self.min_lr) * max(1 - step / self.total_steps, 0.0) ** self.power + self.min_lr
        if step < self.warmup_steps:
            lr *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return lr
