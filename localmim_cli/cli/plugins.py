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
    from localmim_cli.plugins.probe import probe_all

    table = Table()
    for col in ("kind", "name", "distribution", "version", "status"):
        table.add_column(col)
    probes = probe_all()   # each import in a child process: a plugin that hangs or exits is named, not fatal
    for kind in registry.GROUPS:
        for i, r in enumerate(registry.entries(kind)):
            probe = probes[(kind, i)]
            error = r.error or probe.text   # a name clash is known without importing
            status = f"[green]ok[/] {probe.text}" if probe.ok and not r.error else f"[red]broken[/]: {error}"
            table.add_row(kind[:-1], r.name, r.distribution, r.version, status)
    console.print(table)
