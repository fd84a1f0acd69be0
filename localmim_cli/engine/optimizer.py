"""The AdamW every training task steps: the fastest implementation the parameters allow.

Fused AdamW (one kernel for the whole update) needs every parameter on a CUDA device in a
floating dtype it supports; elsewhere the multi-tensor (foreach) implementation is used. Both
compute the same update as the per-parameter loop; the parameter groups are the task's, as given.
"""

from __future__ import annotations

from typing import Any

import torch

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def implementation(groups: list[dict[str, Any]]) -> str:
    """"fused" when every parameter allows it, else "foreach"."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type == "cuda" and p.dtype in FUSED_DTYPES for p in params)
    return "fused" if fused else "foreach"


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    kind = implementation(groups)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=kind == "fused" or None,
                             foreach=kind == "foreach" or None)


def load_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a saved state, keeping this run's implementation: a saved state carries the
    fused / foreach choice of the machine it was saved on, which need not suit this one."""
    chosen = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, chosen):
        group["fused"], group["foreach"] = fused, foreach
