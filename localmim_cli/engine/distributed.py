"""Process-group set-up under torchrun (RANK / WORLD_SIZE / LOCAL_RANK); nothing without it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from localmim_cli.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", 0)))


def choose_device(requested: str, world: World) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{world.local_rank}"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"train.device = {requested!r} but no CUDA device is available")
        torch.cuda.set_device(device)
    return device


def init(world: World, device: torch.device) -> None:
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= world.size
    return t


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
