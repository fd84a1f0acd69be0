"""How the model being trained is spread over the processes of a run, and how its state is
read and restored whatever the spread.

- `Replicated`: one process (the model itself) or DDP under torchrun. Every parameter gets a
  gradient in every step (tasks guarantee it), so DDP runs without find_unused_parameters.
- `Sharded` (train.fsdp): FSDP2 (`fully_shard`) per block, then the rest of the model, so each
  process holds 1/world of the parameters, gradients and optimizer state. Checkpoints stay
  whole: the full state dict is gathered on the main process and saved in the same layout.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from localmim_cli.engine import distributed
from localmim_cli.engine import optimizer as adamw
from localmim_cli.errors import UsageError


class Replicated:
    """The whole model in every process; gradients all-reduced by DDP when there are several."""

    def __init__(self, model: torch.nn.Module, world: distributed.World, device: torch.device):
        self.model, self.world = model, world
        self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world.distributed else model

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Around a micro-step whose gradients are only accumulated, not yet exchanged."""
        return self.net.no_sync() if self.world.distributed else contextlib.nullcontext()

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state; call on every process (only the main one's is used)."""
        return self.model.state_dict() if self.world.is_main else {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict() if self.world.is_main else {}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        adamw.load_state(optimizer, state)


def check_fsdp(world: distributed.World, precision: str) -> None:
    if not world.distributed:
        raise UsageError("train.fsdp shards the model over the processes of a torchrun; with one process "
                         "there is nothing to shard over: set train.fsdp=false or launch with torchrun "
                         "--nproc_per_node 2 or more")
    if precision == "fp16":
        raise UsageError("train.fsdp with train.precision=fp16 is not supported (its loss scaling would "
                         "skip steps on some processes only): use bf16 or fp32")


class Sharded:
    """FSDP2: each block its own shard unit, the rest of the model one more (the root)."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], world: distributed.World,
                 device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model, self.world = model, world
        # The model's output holds views (its per-scale predictions); nothing edits them in
        # place, which is what FSDP2 warns about for every forward.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (world.size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.net = model      # fully_shard works in place

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @staticmethod
    def _options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Gathered whole on the main process (empty elsewhere); every process must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model, options=self._options())

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Whole on the main process, keyed by parameter name; every process must call it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, optimizer, options=self._options())

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """From a whole state every process has read; each keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def wrap(model: torch.nn.Module, blocks: list[torch.nn.Module], fsdp: bool, world: distributed.World,
         device: torch.device, precision: str) -> Replicated | Sharded:
    if fsdp:
        check_fsdp(world, precision)
        return Sharded(model, blocks, world, device)
    return Replicated(model, world, device)
