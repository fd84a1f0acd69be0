"""Weights into a model, every key placed: the one way this program loads a state dict.

`load_state_dict(strict=True)` stops at the first problem with a RuntimeError a user cannot act
on; here every key of the model and of the file is compared first (names, shapes, and whether a
float belongs where the file holds an integer: `load_state_dict` would cast it silently), and a
mismatch is a CheckpointError naming the source and the first keys of each kind.

Every weights file is checked for NaN and infinity as it is read (`check_finite`, called by
`read_safetensors` and published.read_published): weights that are not finite are refused
naming the file, for every command, instead of giving NaN losses, features or results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from localmim_cli.errors import CheckpointError, NonFiniteWeights

if TYPE_CHECKING:
    import torch

SHOWN = 10   # keys named per kind of mismatch


def read_safetensors(path: Path | str) -> "dict[str, torch.Tensor]":
    """A safetensors file's tensors; a CheckpointError naming it when it is missing or broken
    (truncated by a crash or a full disk, or not safetensors at all)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = load_file(str(path))
    except Exception as exc:   # safetensors raises its own error types on a broken file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged: {exc})") from None
    check_finite(state, path)
    return state


def check_finite(state: "dict[str, torch.Tensor]", path: Path | str) -> None:
    """NonFiniteWeights naming `path` when a floating-point tensor holds NaN or infinity."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeights(path, f"NaN or infinite values in {len(bad)} of {len(state)} tensors, "
                                     f"such as {_first(sorted(bad))}")


@dataclass
class KeyReport:
    """How a state dict fits a model: what neither side can place."""

    missing: list[str] = field(default_factory=list)      # the model's, not in the state
    unexpected: list[str] = field(default_factory=list)   # in the state, not in the model
    shapes: list[str] = field(default_factory=list)       # in both, shaped differently
    dtypes: list[str] = field(default_factory=list)       # an integer (or bool) where the model has a float

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes or self.dtypes)

    def raise_if_incomplete(self, source: Path | str) -> None:
        if self:
            raise CheckpointError(f"{source}: keys do not match the model: " + "; ".join(
                f"{what} {_first(keys)}" for what, keys in
                (("missing", self.missing), ("unexpected", self.unexpected), ("shapes differ", self.shapes),
                 ("not floating point", self.dtypes))
                if keys))


def _first(keys: list[str]) -> str:
    return f"{keys[:SHOWN]}{' ...' if len(keys) > SHOWN else ''}"


def compare(model: "torch.nn.Module", state: "dict[str, torch.Tensor]",
            allow_missing: tuple[str, ...] = ()) -> KeyReport:
    """The mismatches between the model's keys and the state's; model keys starting with one of
    `allow_missing` may be absent (a new head, say)."""
    expected = model.state_dict()
    return KeyReport(
        missing=sorted(k for k in expected if k not in state and not k.startswith(allow_missing)),
        unexpected=sorted(k for k in state if k not in expected),
        shapes=sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                      for k in state if k in expected and state[k].shape != expected[k].shape),
        dtypes=sorted(f"{k} {state[k].dtype} vs {expected[k].dtype}".replace("torch.", "")
                      for k in state if k in expected and expected[k].is_floating_point()
                      and not state[k].is_floating_point()))


def load_exactly(model: "torch.nn.Module", state: "dict[str, torch.Tensor]", source: Path | str,
                 allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`, or raise CheckpointError naming `source` when any key of
    either side has no place (model keys under `allow_missing` prefixes keep their values)."""
    compare(model, state, allow_missing).raise_if_incomplete(source)
    model.load_state_dict(state, strict=False)
