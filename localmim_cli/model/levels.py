"""What every multi-scale adapter shares (model/feature_pyramid.py, model/simple_pyramid.py): the
levels' strides, timm-style feature_info, and the report of which weights were loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STRIDES = (4, 8, 16, 32)


def feature_info(channels: list[int], modules: list[str]):
    """timm's FeatureInfo for levels at strides 4..32."""
    from timm.models._features import FeatureInfo

    return FeatureInfo([{"num_chs": c, "reduction": s, "module": m} for c, s, m in zip(channels, STRIDES, modules)],
                       out_indices=tuple(range(len(channels))))


@dataclass
class LoadReport:
    """Which weights of a pyramid came from the checkpoint and which are new."""

    source: str
    loaded: list[str]                 # pyramid parameter/buffer names filled from the checkpoint
    new: list[str]                    # parameter names that start fresh
    unused: list[str] = field(default_factory=list)   # checkpoint tensors the pyramid has no place for
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: how many tensors were loaded, the new parts by kind, what was left out."""
        kinds = sorted({_kind(name) for name in self.new})
        line = (f"init {self.source}: {len(self.loaded)} encoder tensors loaded; new: "
                + (", ".join(kinds) if kinds else "nothing"))
        if self.unused:
            line += f"; not used: {', '.join(sorted({_kind(n) for n in self.unused}))}"
        return line + "".join(f"; {note}" for note in self.notes)


def _kind(name: str) -> str:
    """A parameter name without its block/layer numbers: blocks.3.gamma_1 -> blocks.*.gamma_1;
    the pyramid's levels as one."""
    if name.startswith("levels."):
        return "levels.* (pyramid)"
    if name.startswith("norms."):
        return "norms.* (a LayerNorm per stage)"
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)
