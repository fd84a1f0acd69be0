"""Which images each process reads at each step.

An epoch is a seeded permutation of the dataset. A global micro-batch is `batch * world` images;
rank r takes its r-th slice. So the images of a global step do not depend on how many processes
share it, and a resumed run starts exactly at the micro-step it stopped at.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from localmim_cli.seeding import derive_seed


class StepBatches:
    def __init__(self, n_items: int, batch: int, rank: int, world: int, seed: int):
        self.n_items, self.batch, self.rank, self.world, self.seed = n_items, batch, rank, world, seed
        self.epoch = 0
        self.start = 0

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def micro_steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch  # incomplete last batch dropped, as published

    def set_position(self, epoch: int, start_micro_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_micro_step

    def __len__(self) -> int:
        return self.micro_steps_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.n_items, generator=gen).tolist()
        for step in range(self.start, self.micro_steps_per_epoch()):
            first = step * self.global_batch + self.rank * self.batch
            yield order[first : first + self.batch]
