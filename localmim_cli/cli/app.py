"""The `localmim` Typer application: its commands, and how errors reach the user."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Annotated, Optional

import typer

from localmim_cli.version import __version__
from localmim_cli.cli import config as config_cmd
from localmim_cli.cli import benchmark, evaluate, export, finetune, plot, plugins, presets, pretrain, visualize
from localmim_cli.cli import runs as runs_cmd
from localmim_cli.cli.options import App, NO_VALUE
from localmim_cli.cli.output import console, err_console
from localmim_cli.errors import RunAborted, RunInterrupted, UserError

app = App(
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


def _stop_at_once(signum: int, frame) -> None:
    """SIGINT/SIGTERM outside the training steps (which save first: engine/stopping.py). Typer
    would turn a KeyboardInterrupt into a silent exit 130, so the signal raises our own error."""
    if os.getpid() != _MAIN_PID:   # a forked loader worker: die as Python does by default
        raise KeyboardInterrupt
    raise RunAborted(signum, f"stopped by {signal.Signals(signum).name}; the last checkpoint on disk, if any, "
                             "is intact")


_MAIN_PID = os.getpid()


def main() -> None:
    """Console entry point: a UserError is one line and exit 2; a bug keeps its traceback."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = {signum: signal.signal(signum, _stop_at_once) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        _run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run() -> None:
    try:
        app()
    except SystemExit:  # typer's own exits (--help, usage errors)
        raise
    except UserError as exc:
        if os.environ.get("LOCALMIM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except RunInterrupted as exc:   # a checkpoint was saved at the step boundary
        err_console.print(f"[bold yellow]interrupted:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(128 + exc.signum)
    except RunAborted as exc:
        err_console.print(f"[bold red]aborted:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        err_console.print("interrupted; the last checkpoint is intact (continue with --resume)")
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        err_console.print("[bold red]internal error[/]: this is a bug in localmim or a plugin, not in "
                          "your input; please report it with the traceback above", highlight=False)
        sys.exit(1)
