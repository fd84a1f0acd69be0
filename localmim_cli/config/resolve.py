"""Settings for a command from presets, a file, the environment and flags: the one entry point
the command line and the Python API share."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from localmim_cli.config.layers import Resolved, read_config_file, resolve
from localmim_cli.config.presets import load_preset
from localmim_cli.config.tasks import DEFAULT_TASK, all_schemas, command_of, finetune_task
from localmim_cli.errors import PresetError, RunDirError, UsageError


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
        command = command_of(schema)
        if command is not None and info.kind != command:
            where = info.name if info.builtin else info.path
            raise PresetError(f"preset {where}: kind = {info.kind!r}, a recipe for `localmim {info.kind}`, not "
                              f"`localmim {command}`; pick a {command} preset (`localmim presets list`)")
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return resolve(schema, preset=preset_dict, preset_name=preset_name, base=base,
                   config_file=Path(config) if config is not None else None,
                   environ=os.environ if environ is None else environ, flags=given, sets=list(sets or []),
                   flag_names={"data.path": "DATA", **(flag_names or {})},
                   other_schemas=tuple(s for s in all_schemas() if s is not schema))


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


def choose_task(flag: str | None, preset: str | None = None, config: Path | str | None = None,
                resumed_run: Path | None = None) -> str:
    """The fine-tuning task a run reads its settings for, chosen before they are validated:
    `--task` (flag), else a resumed run's own, else the preset's `task`, else the --config
    file's `task`, else classification. Sources that name different tasks are an error naming
    both; a resume keeps the task of the run."""
    named: list[tuple[str, str]] = []      # (where, task), most specific first
    if flag:
        named.append(("--task", finetune_task(flag).name))
    if resumed_run is not None:
        saved = Path(resumed_run) / "settings.json"
        try:
            run_task = json.loads(saved.read_text()).get("task") or DEFAULT_TASK
        except (OSError, ValueError, AttributeError):
            run_task = None   # resolve_resumed names the missing or broken file
        if run_task is not None:
            if flag and named[0][1] != run_task:
                raise RunDirError(f"--resume: {resumed_run} is a {run_task} run; drop --task {flag} "
                                  f"(a resume keeps the task the run started with)")
            named.append((f"the run {resumed_run}", run_task))
    if preset:
        info = load_preset(preset)[0]
        if info.kind == "finetune" and not (resumed_run is not None and info.name in run_presets(Path(resumed_run))):
            named.append((f"--preset {info.name}", info.task or DEFAULT_TASK))
    if config is not None:
        task = read_config_file(config).get("task")
        if isinstance(task, str):
            named.append((f"--config {config}", finetune_task(task, f"task in {config}").name))
    chosen = named[0][1] if named else DEFAULT_TASK
    clash = next(((where, task) for where, task in named if task != chosen), None)
    if clash:
        raise UsageError(f"{named[0][0]} says task {chosen!r} but {clash[0]} is for {clash[1]!r}; "
                         f"give one task (a {clash[1]} preset goes with --task {clash[1]})")
    return chosen
