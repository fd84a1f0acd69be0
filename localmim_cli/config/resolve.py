"""Settings for a command from presets, a file, the environment and flags: the one entry point
the command line and the Python API share."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from localmim_cli.config.layers import Resolved, resolve
from localmim_cli.config.presets import load_preset
from localmim_cli.config.schema import SCHEMAS
from localmim_cli.errors import PresetError, RunDirError


def resolve_settings(schema: type[BaseModel], preset: str | None = None, config: Path | str | None = None,
                     sets: list[str] | None = None, flags: Mapping[str, Any] | None = None,
                     base: tuple[str, dict] | None = None,
                     environ: Mapping[str, str] | None = None,
                     flag_names: Mapping[str, str] | None = None) -> Resolved:
    """Layer defaults < a resumed run's own settings (`base`) < preset < file < env < flags.

    flags: {"train.epochs": 5, ...}; None values are flags the user did not give and are dropped.
    flag_names: how each flag is spelled, for provenance labels (default: --<leaf>).
    """
    preset_dict, preset_name = None, None
    if preset:
        info, preset_dict = load_preset(preset)
        preset_name = info.name
        command = next((name for name, s in SCHEMAS.items() if s is schema), None)
        if command is not None and info.kind != command:
            where = info.name if info.builtin else info.path
            raise PresetError(f"preset {where}: kind = {info.kind!r}, a recipe for `localmim {info.kind}`, not "
                              f"`localmim {command}`; pick a {command} preset (`localmim presets list`)")
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return resolve(schema, preset=preset_dict, preset_name=preset_name, base=base,
                   config_file=Path(config) if config is not None else None,
                   environ=os.environ if environ is None else environ, flags=given, sets=list(sets or []),
                   flag_names={"data.path": "DATA", **(flag_names or {})})


def resolve_resumed(schema: type[BaseModel], out: Path | None, preset: str | None = None,
                    config: Path | str | None = None, sets: list[str] | None = None,
                    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                    flag_names: Mapping[str, str] | None = None) -> Resolved:
    """Settings for `--resume --out OUT`: the run's own settings.json is the base layer, and the
    same command line that started the run may be given again.

    The preset the run started from adds nothing (the run's values already hold it, with
    whatever was set above it), so it is accepted and skipped; another preset is layered over
    the run's settings like any other change. Whether what changed may change is the resume
    check's business (`engine.training.checked_resume`), which names every field.
    """
    if out is None:
        raise RunDirError("--resume needs --out RUN_DIR, the run to continue")
    saved = Path(out) / "settings.json"
    if not saved.is_file():
        raise RunDirError(f"--resume: {saved} is missing; is {out} a localmim run directory?")
    if preset and load_preset(preset)[0].name in run_presets(Path(out)):
        preset = None
    # The run's own values, validated by the schema as any layer is (a problem names run:FILE).
    return resolve_settings(schema, preset, config, sets, flags, base=(f"run:{saved}", read_run_settings(saved)),
                            environ=environ, flag_names=flag_names)


def read_run_settings(saved: Path) -> dict[str, Any]:
    """A run's settings.json as a JSON object; a RunDirError naming it when it is not one."""
    try:
        values = json.loads(saved.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{saved}: not valid JSON ({exc}); the run's settings cannot be read back: "
                          "restore the file (the latest checkpoint's meta.json holds the same settings)") from None
    if not isinstance(values, dict):
        raise RunDirError(f"{saved}: not a JSON object of settings; restore the file (the latest checkpoint's "
                          "meta.json holds the same settings)")
    return values


def run_presets(run_dir: Path) -> set[str]:
    """The presets a run's settings came from, as its settings.provenance.json records them."""
    try:
        layers = json.loads((run_dir / "settings.provenance.json").read_text())["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {label.removeprefix("preset:") for label in layers if label.startswith("preset:")}
