"""Settings for a command from presets, a file, the environment and flags: the one entry point
the command line and the Python API share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from localmim_cli.config.layers import Resolved, resolve
from localmim_cli.config.presets import load_preset


def resolve_settings(schema: type[BaseModel], preset: str | None = None, config: Path | str | None = None,
                     sets: list[str] | None = None, flags: Mapping[str, Any] | None = None,
                     base: tuple[str, dict] | None = None,
                     environ: Mapping[str, str] | None = None,
                     flag_names: Mapping[str, str] | None = None) -> Resolved:
    """Layer defaults < preset (or a resumed run's own settings, `base`) < file < env < flags.

    flags: {"train.epochs": 5, ...}; None values are flags the user did not give and are dropped.
    flag_names: how each flag is spelled, for provenance labels (default: --<leaf>).
    """
    preset_dict, preset_name = None, None
    if base is not None:
        preset_name, preset_dict = base
    elif preset:
        info, preset_dict = load_preset(preset)
        preset_name = info.name
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return resolve(schema, preset=preset_dict, preset_name=preset_name,
                   config_file=Path(config) if config is not None else None,
                   environ=os.environ if environ is None else environ, flags=given, sets=list(sets or []),
                   flag_names={"data.path": "DATA", **(flag_names or {})})
