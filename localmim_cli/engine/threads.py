"""How many threads torch's CPU operators get: the cores the loader workers leave free."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadChoice:
    intra_op: int
    cores: int
    reason: str


def usable_cores() -> int:
    """Cores this process may run on (a CPU set or container limit can be below cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def choose_intra_op_threads(device: torch.device, loader_workers: int, requested: int = 0) -> ThreadChoice:
    """`requested` (train.threads) when not 0. Otherwise, on a CPU the step and the loader
    workers share the cores: give the step what the workers leave (at least one);
    OMP_NUM_THREADS, when set, wins. On a GPU torch's setting stands."""
    cores = usable_cores()
    if requested:
        return ThreadChoice(requested, cores, "set by train.threads")
    if device.type != "cpu":
        return ThreadChoice(torch.get_num_threads(), cores, "torch default (the step runs on the GPU)")
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(torch.get_num_threads(), cores, "from OMP_NUM_THREADS")
    # Never more than torch has now: its default is the physical cores, and a caller that set
    # fewer (torch.set_num_threads in a notebook or test) keeps its choice.
    current = torch.get_num_threads()
    threads = max(1, min(current, cores - loader_workers))
    return ThreadChoice(threads, cores, f"{cores} cores less {loader_workers} loader worker(s), at least 1, "
                                        f"at most torch's {current}")


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to n for the duration, then as they were (an API caller's
    process keeps its own setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
