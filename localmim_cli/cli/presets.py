"""`localmim presets list | show`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import App
from rich.table import Table

from localmim_cli.cli.output import console

app = App(help="Named, validated recipes: the paper's, and small ones for CPUs and one GPU.",
                  no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List the shipped presets."""
    from localmim_cli.config.presets import list_presets

    table = Table()
    table.add_column("name", style="bold")
    table.add_column("for")
    table.add_column("summary")
    for info in list_presets():
        table.add_row(info.name, info.kind if info.kind != "finetune" else f"finetune ({info.task})", info.summary)
    console.print(table)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Preset name or .toml file")],
         world_size: Annotated[Optional[int], typer.Option(
             help="Processes to compute the effective batch and lr for (default: the "
                  "number the recipe assumes).")] = None) -> None:
    """Explain a preset: what it is for, its values, and the batch and lr it gives."""
    from localmim_cli.config.presets import load_preset, scaling_line
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.tasks import schema_for

    info, values = load_preset(name)
    world_size = world_size or info.world_size
    resolved = resolve_settings(schema_for(info.kind, info.task), name)
    kind = f"{info.kind}, task {info.task}" if info.task else info.kind
    console.print(f"[bold]{info.name}[/] ({kind}): {info.summary}\n")
    console.print(info.description.strip() + "\n", highlight=False)
    console.print(scaling_line(resolved.settings, world_size), highlight=False)
    console.print_json(json.dumps(values))
