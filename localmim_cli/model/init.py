"""MAE's initialisation of transformer parts, shared by the encoder and the local decoders."""

from __future__ import annotations

from torch import nn


def xavier_linears_unit_norms(module: nn.Module) -> None:
    """Xavier-uniform linear weights with zero biases, LayerNorms at 1 and 0 (as published)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
