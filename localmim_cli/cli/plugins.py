"""`localmim plugins list`."""

from __future__ import annotations

import typer
from rich.table import Table

from localmim_cli.cli.output import console

app = typer.Typer(help="Installed encoders and reconstruction targets.", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """Show every encoder and target plugin, its distribution and version, and whether it loaded."""
    from localmim_cli.plugins import registry

    table = Table()
    for col in ("kind", "name", "distribution", "version", "status"):
        table.add_column(col)
    for kind in registry.GROUPS:
        for r in registry.discover(kind):
            status = (f"[green]ok[/] {r.plugin.summary}" if r.ok else f"[red]broken[/]: {r.error}")
            table.add_row(kind[:-1], r.name, r.distribution, r.version, status)
    console.print(table)
