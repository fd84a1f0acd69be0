"""The `localmim` Typer application: its commands, and how errors reach the user."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from localmim_cli.version import __version__
from localmim_cli.cli import config as config_cmd
from localmim_cli.cli import benchmark, evaluate, export, finetune, plot, plugins, presets, pretrain, visualize
from localmim_cli.cli import runs as runs_cmd
from localmim_cli.cli.options import NO_VALUE
from localmim_cli.cli.output import console, err_console
from localmim_cli.errors import UserError

app = typer.Typer(
    name="localmim",
    help="LocalMIM (CVPR 2023): masked image modeling with local multi-scale reconstruction.\n\n"
         "Pretrain a vision backbone on a folder of images, look at what every scale "
         "reconstructs, fine-tune and evaluate it.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.command("pretrain")(pretrain.pretrain)
app.command("visualize")(visualize.visualize)
app.command("finetune")(finetune.finetune)
app.command("evaluate")(evaluate.evaluate)
app.command("export")(export.export)
app.command("benchmark")(benchmark.benchmark)
app.command("plot")(plot.plot)
app.add_typer(presets.app, name="presets")
app.add_typer(config_cmd.app, name="config")
app.add_typer(plugins.app, name="plugins")
app.add_typer(runs_cmd.app, name="runs")


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"localmim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", metavar=NO_VALUE,
        callback=_version_callback, is_eager=True, help="Print the version and exit.")] = None) -> None:
    pass


def main() -> None:
    """Console entry point: a UserError is one line and exit 2; a bug keeps its traceback."""
    try:
        app()
    except SystemExit:  # typer's own exits (--help, usage errors)
        raise
    except UserError as exc:
        if os.environ.get("LOCALMIM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; the last checkpoint is intact (continue with --resume)")
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        err_console.print("[bold red]internal error[/]: this is a bug in localmim or a plugin, not in "
                          "your input; please report it with the traceback above", highlight=False)
        sys.exit(1)
