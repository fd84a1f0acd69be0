"""`train.activation_checkpointing`: keep only each block's input through the forward pass and
recompute the block in the backward pass (torch.utils.checkpoint, non-reentrant).

The task says which blocks (TrainingTask.blocks); by default, by convention: every member of a
ModuleList named `blocks` (timm's ViT and Swin, our masked ViT, Swin stages and decoders). The
random state of each block (drop path) is saved and replayed, so the recomputed block is the
block that ran: losses and gradients are those of the plain path. Parameter names do not change
(the block's forward is replaced on the instance, not wrapped in another module), so
checkpoints are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():   # evaluation: nothing to save memory for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run.activation_checkpointed = True
    return run


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every member of every ModuleList named `blocks`, in module order."""
    return [block for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks"
            for block in module]


def checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """From now on each of `blocks` recomputes its activations in the backward pass."""
    for block in blocks:
        if not getattr(block.forward, "activation_checkpointed", False):
            block.forward = _checkpointed(block.forward)
