"""The objects a plugin's entry point names: one per encoder or reconstruction target.

An entry point in group `localmim.encoders` resolves to an `EncoderPlugin`, one in
`localmim.targets` to a `TargetPlugin`. Each carries the interface version it was written for,
a pydantic model of its options (validated with the run's settings) and a builder.

The plugin author's guide is docs/plugins.md; `localmim_cli.plugins.testing` has the checks to run
in a plugin's own tests. A plugin whose `api_version` differs from `expected_api_version` is
listed as broken and never built (registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

# The interface versions this localmim speaks (encoders.base and targets.base re-export them).
# Here, not there, so that reading the plugin API (listing plugins, validating their options)
# imports no torch.
ENCODER_API_VERSION = 1
TARGET_API_VERSION = 1


@dataclass(frozen=True)
class EncoderPlugin:
    """build(options, img_size, tap_layers or None for the encoder's default) -> MaskedEncoder"""

    name: str
    api_version: int
    options: type[BaseModel]
    build: Callable
    summary: str = ""

    expected_api_version = ENCODER_API_VERSION


@dataclass(frozen=True)
class TargetPlugin:
    """build(options, cells_px) -> ReconstructionTarget"""

    name: str
    api_version: int
    options: type[BaseModel]
    build: Callable
    summary: str = ""

    expected_api_version = TARGET_API_VERSION
