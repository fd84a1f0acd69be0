"""Which images each process reads at each step.

An epoch is a seeded permutation of the dataset. A global micro-batch is `batch * world` images;
rank r takes its r-th slice. So the images of a global step do not depend on how many processes
share it, and a resumed run starts exactly at the micro-step it stopped at.

`loader_kwargs` are the DataLoader options every loader of the package fetches with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from localmim_cli.seeding import derive_seed


class StepBatches:
    """A batch sampler over micro-steps [start, stop) of one epoch, yielding [(epoch, index), ...].

    The epoch travels with every index because one loader serves the whole run: its persistent
    workers keep the dataset copy they started with and never see a later change of epoch.
    Move it with `set_position` before each epoch's pass.
    """

    def __init__(self, n_items: int, batch: int, rank: int, world: int, seed: int):
        self.n_items, self.batch, self.rank, self.world, self.seed = n_items, batch, rank, world, seed
        self.epoch, self.start, self.stop = 0, 0, self.micro_steps_per_epoch()

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def micro_steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch  # incomplete last batch dropped, as published

    def set_position(self, epoch: int, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.micro_steps_per_epoch():
            raise ValueError(f"micro-steps [{start}, {stop}) outside the epoch's "
                             f"{self.micro_steps_per_epoch()}")
        self.epoch, self.start, self.stop = epoch, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.n_items, generator=gen).tolist()
        for step in range(self.start, self.stop):
            first = step * self.global_batch + self.rank * self.batch
            yield [(self.epoch, index) for index in order[first : first + self.batch]]


def loader_kwargs(workers: int, device: torch.device, persistent: bool = False) -> dict[str, Any]:
    """Worker processes, pinned memory for a GPU, and prefetching; `persistent` keeps the
    workers alive from one pass to the next (for a loader that serves a whole run)."""
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=persistent)
    return kwargs
