"""`localmim runs list | show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from localmim_cli.cli.options import App, NO_VALUE
from localmim_cli.cli.output import console

app = App(help="The runs on disk: status, steps, last loss, best accuracy.", no_args_is_help=True)


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@app.command("list")
def list_(root: Annotated[Optional[Path], typer.Argument(
        help="Folder holding run directories. Default: $LOCALMIM_HOME/runs.", show_default=False)] = None,
          as_json: Annotated[bool, typer.Option(
              "--json", metavar=NO_VALUE, help="One JSON list instead of a table.")] = False) -> None:
    """List the run directories under a folder, newest first."""
    from localmim_cli.engine.runs import home
    from localmim_cli.tasks.runs_overview import list_runs

    summaries = list_runs(root or home() / "runs")
    if as_json:
        console.print_json(json.dumps([s.as_dict() for s in summaries]))
        return
    table = Table()
    for col in ("run", "kind", "status", "epoch", "step", "last loss", "best top-1"):
        table.add_column(col)
    for s in summaries:
        table.add_row(Path(s.path).name, s.kind, s.status, f"{_fmt(s.epoch)}/{_fmt(s.epochs)}", _fmt(s.step),
                      _fmt(s.last_loss, ".4f"), _fmt(s.best_top1, ".1f")
                      + (f" (floor {s.floor_top1:.1f})" if s.floor_top1 is not None else ""))
    console.print(table)


@app.command("show")
def show(run: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]) -> None:
    """Show one run: status, position, last loss, best accuracy and where it came from."""
    from localmim_cli.tasks.runs_overview import summarize

    console.print_json(json.dumps(summarize(run).as_dict()))
