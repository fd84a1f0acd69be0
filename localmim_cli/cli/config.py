"""`localmim config show`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import App, ConfigOpt, NO_VALUE, PresetOpt, SetOpt
from localmim_cli.cli.output import console, note_others_env, print_settings

app = App(help="Show the settings a command would run with, and where each came from.",
                  no_args_is_help=True)


@app.command("show")
def show(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    command: Annotated[Optional[str], typer.Option(
        help="Which command's settings: pretrain, finetune, evaluate (default: the preset's, else pretrain)")] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="finetune only: which task's settings (default: the preset's, else classification)")] = None,
    resolved_only: Annotated[bool, typer.Option(
        "--resolved", metavar=NO_VALUE, help="Print only the resolved values as JSON.")] = False,
) -> None:
    """Print every setting with its value and the layer that set it (default, preset, file, env, flag)."""
    from localmim_cli.config.presets import load_preset
    from localmim_cli.config.resolve import choose_task, resolve_settings
    from localmim_cli.config.tasks import schema_for

    command = command or (load_preset(preset)[0].kind if preset else "pretrain")
    if command == "finetune":
        task = choose_task(task, preset, config)
    resolved = resolve_settings(schema_for(command, task, "--command"), preset, config, set_)
    note_others_env(resolved)
    if resolved_only:
        console.print_json(json.dumps(resolved.settings.model_dump(mode="json")))
    else:
        print_settings(resolved)
