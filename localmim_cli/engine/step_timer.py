"""Wall time of single steps, correct on a GPU: kernels run after the host call returns.

On CUDA each step is bracketed by CUDA events and read once, after one synchronize at the end,
so timing adds no host synchronisation between steps. On other devices each step is timed with
perf_counter around the call, which is where the work happens.

Steps to be compared are best timed interleaved (A, B, A, B, ...): on a shared machine the load
drifts, and interleaving spreads the drift over every contender instead of charging it to
whichever ran during the busy minute.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device,
               after_each: Callable[[], None] | None = None) -> list[float]:
    """Run `step` `steps` times; the seconds each took. `after_each` runs untimed between steps."""
    return time_interleaved([step], steps, device, after_each)[0]


def time_interleaved(step_fns: list[Callable[[], None]], rounds: int, device: torch.device,
                     after_each: Callable[[], None] | None = None) -> list[list[float]]:
    """Each round runs every step once, in order; per step, the seconds of each of its runs.
    `after_each` runs untimed after every single step."""
    synchronize(device)   # work queued before us must not land in the first step
    if device.type == "cuda":
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(rounds)] for _ in step_fns]
        for r in range(rounds):
            for step, pairs in zip(step_fns, events):
                start, end = pairs[r]
                start.record()
                step()
                end.record()
                if after_each is not None:
                    after_each()
        synchronize(device)
        return [[start.elapsed_time(end) / 1e3 for start, end in pairs] for pairs in events]
    seconds: list[list[float]] = [[] for _ in step_fns]
    for _ in range(rounds):
        for step, times in zip(step_fns, seconds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            if after_each is not None:
                after_each()
    return seconds


def median(seconds: list[float]) -> float:
    return statistics.median(seconds)
