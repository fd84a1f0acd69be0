"""Learning-rate schedules, per optimizer step.

- `lr_at`: linear warmup, then half-cycle cosine to min_lr, in fractional epochs (MAE's; the
  pretraining and classification recipes).
- `PolySchedule`: polynomial decay over a number of iterations with a linear warmup that scales
  it, as mmcv's `PolyLrUpdaterHook` with `warmup="linear"` computes it (the published
  segmentation recipes, which count iterations, not epochs).
- `StepSchedule`: the lr multiplied by gamma at each milestone after a linear warmup, as
  detectron2's `WarmupParamScheduler` over fvcore's `MultiStepParamScheduler` computes it (the
  ViTDet detection recipes). Milestones are shares of the run, so a shorter run keeps the shape.

`iteration_schedule` picks the one a task's optim settings name (`optim.schedule`; poly when
they name none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class StepSchedule:
    lr: float                         # the lr before the first milestone
    total_steps: int                  # the run's optimizer steps; milestones are shares of it
    milestones: tuple[float, ...]     # shares of total_steps where the lr drops by gamma
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_factor: float = 1e-3       # the warmup's first lr, as a share of the lr there

    def milestone_steps(self) -> list[int]:
        """The optimizer steps (0-based) from which each drop applies: round(share x total)."""
        return [round(m * self.total_steps) for m in self.milestones]

    def at(self, step: int) -> float:
        """lr of optimizer step `step` (0-based): lr x gamma^(milestones at or below step)
        (fvcore's bisect_right); during the warmup linear from warmup_factor x the lr at step 0
        to the schedule's lr at the warmup's end (detectron2's "linear" warmup)."""
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            start, end = self.warmup_factor * self._multi_step(0), self._multi_step(self.warmup_steps)
            return start + alpha * (end - start)
        return self._multi_step(step)

    def _multi_step(self, step: int) -> float:
        drops = sum(1 for m in self.milestone_steps() if m <= step)
        return self.lr * self.gamma ** drops


def iteration_schedule(lr: float, optim: Any, total_steps: int) -> PolySchedule | StepSchedule:
    """The schedule of a run counted in optimizer steps, from its optim settings."""
    if getattr(optim, "schedule", "poly") == "step":
        return StepSchedule(lr, total_steps, tuple(optim.milestones), optim.gamma, optim.warmup_steps,
                            optim.warmup_factor)
    return PolySchedule(lr, optim.min_lr, total_steps, optim.power, optim.warmup_steps, optim.warmup_ratio)
