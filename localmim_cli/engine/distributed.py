"""Process-group set-up under torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID); nothing without either."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


DEFAULT_PORT = 29500


def slurm_variables(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a job that `srun` started, one process per task, from SLURM's own
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); {} when torchrun's are set or SLURM ran one task.
    The rendezvous address is MASTER_ADDR when given, else the node srun was launched from (the
    job's first node under sbatch); the port MASTER_PORT, else one derived from the job id, so
    two jobs sharing a node do not collide."""
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1") or 1) <= 1 or "SLURM_PROCID" not in env:
        return {}
    job = env.get("SLURM_JOB_ID", "")
    port = DEFAULT_PORT + int(job) % 10000 if job.isdigit() else DEFAULT_PORT
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(port)}


def from_environment() -> World:
    """This process's place: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else SLURM's (which are
    then exported under torchrun's names, for the process group's env:// rendezvous)."""
    os.environ.update(slurm_variables(os.environ))
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


def init(world: World, device: torch.device) -> bool:
    """Join torchrun's process group; True when this call created it (False: none is needed, or
    the caller's own group is already there and stays the caller's)."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        return True
    return False


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= world.size
    return t


def all_reduce_max(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
