"""How long a training run is and at what learning rate: one arithmetic for every training task.

Steps per epoch follow from the images each process reads per micro-step; the effective batch
and the peak lr come from `config.presets`, the same arithmetic `presets show` prints, so a
run and its recipe can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from localmim_cli.config.presets import effective_batch, scaled_lr, scaling_line
from localmim_cli.engine.schedule import PolySchedule, StepSchedule, iteration_schedule, lr_at
from localmim_cli.errors import DataError, UsageError


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int      # optimizer steps; leftover micro-batches of an epoch are dropped
    accum_steps: int          # micro-steps per optimizer step
    epochs: int
    effective_batch: int      # images per optimizer step over all processes
    lr: float                 # peak of the schedule
    min_lr: float
    warmup_epochs: float
    scaling: str              # the effective batch and lr arithmetic, as one line
    iterations: int | None = None      # a run counted in optimizer steps: it stops there, mid-epoch
    schedule: PolySchedule | StepSchedule | None = None   # the lr schedule of such a run (else warmup + cosine)

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps

    @property
    def total_steps(self) -> int:
        return self.iterations or self.steps_per_epoch * self.epochs

    def micro_steps_in(self, epoch: int) -> int:
        """Micro-steps of epoch `epoch` (0-based): all of them, but in the last epoch of a run
        counted in iterations only those up to its last step."""
        left = self.total_steps - epoch * self.steps_per_epoch
        return min(self.steps_per_epoch, max(left, 0)) * self.accum_steps

    def describe(self) -> str:
        if self.iterations:
            return (f"{self.iterations} steps ({self.steps_per_epoch} steps/epoch, "
                    f"{self.iterations / self.steps_per_epoch:.3g} epochs)")
        return f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs"

    def lr_at(self, step: int) -> float:
        """lr of optimizer step `step` (0-based): linear warmup, then cosine to min_lr; or the
        schedule of a run counted in iterations (poly, or steps at milestones)."""
        if self.schedule is not None:
            return self.schedule.at(step)
        return lr_at(step, self.steps_per_epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)


def plan_steps(n_images: int, settings: Any, world_size: int) -> StepPlan:
    """The plan for `n_images` per epoch under `settings` (with `train` and `optim` tables).

    A global micro-batch is batch_size x world_size images and the incomplete last one is
    dropped; an epoch too small for one full optimizer step is a DataError that says what to
    change. Settings with `train.iterations` (segmentation, detection) run that many optimizer
    steps, over as many epochs as it takes, on the schedule `optim.schedule` names (poly: of
    `optim.warmup_steps`, `optim.warmup_ratio` and `optim.power`; step: of `optim.milestones`,
    `optim.gamma`, `optim.warmup_steps` and `optim.warmup_factor`).
    """
    tr, opt = settings.train, settings.optim
    micro_steps = n_images // (tr.batch_size * world_size)
    steps_per_epoch = micro_steps // tr.accum_steps
    if steps_per_epoch < 1:
        need = tr.batch_size * world_size * tr.accum_steps
        raise DataError(f"{n_images} training images per epoch make no full optimizer step, which takes "
                        f"{need} ({tr.batch_size} per device x {world_size} process(es) x {tr.accum_steps} accumulation) "
                        "because an incomplete last batch is dropped: lower train.batch_size (--batch-size) or "
                        "train.accum_steps (--accum-steps), or raise data.repeats (--set data.repeats=N), or add images")
    lr = scaled_lr(settings, world_size)
    if getattr(opt, "min_lr", 0.0) > lr:
        raise UsageError(f"optim.min_lr {opt.min_lr:g} is above the peak lr {lr:g} "
                         f"({scaling_line(settings, world_size)}); lower optim.min_lr or raise optim.base_lr")
    iterations = getattr(tr, "iterations", None)
    if iterations:
        schedule = iteration_schedule(lr, opt, iterations)
        return StepPlan(steps_per_epoch=steps_per_epoch, accum_steps=tr.accum_steps,
                        epochs=math.ceil(iterations / steps_per_epoch),
                        effective_batch=effective_batch(settings, world_size), lr=lr,
                        min_lr=getattr(opt, "min_lr", 0.0), warmup_epochs=opt.warmup_steps / steps_per_epoch,
                        scaling=scaling_line(settings, world_size), iterations=iterations, schedule=schedule)
    return StepPlan(steps_per_epoch=steps_per_epoch, accum_steps=tr.accum_steps, epochs=tr.epochs,
                    effective_batch=effective_batch(settings, world_size), lr=lr,
                    min_lr=opt.min_lr, warmup_epochs=opt.warmup_epochs,
                    scaling=scaling_line(settings, world_size))
