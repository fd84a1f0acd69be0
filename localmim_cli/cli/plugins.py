"""`localmim plugins list`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from localmim_cli.cli.options import App, NO_VALUE
from localmim_cli.cli.output import console

app = App(help="Installed encoders and reconstruction targets.", no_args_is_help=True)


@app.command("list")
def list_(check: Annotated[bool, typer.Option(
        "--check", metavar=NO_VALUE, help="Import every plugin and say whether it loads (imports torch "
                                          "and each plugin's dependencies: seconds, not milliseconds).")] = False,
          ) -> None:
    """Show every encoder and target plugin with its distribution and version, read from the
    installed packages' metadata; --check also imports each one and says whether it loads."""
    from localmim_cli.plugins import registry
    from localmim_cli.plugins.probe import probe_all

    table = Table()
    for col in ("kind", "name", "distribution", "version", "status"):
        table.add_column(col)
    # --check imports each plugin in a child process: one that hangs or exits is named, not fatal.
    probes = probe_all() if check else {}
    for kind in registry.GROUPS:
        for i, r in enumerate(registry.entries(kind)):
            probe = probes.get((kind, i))
            if r.error:   # a name clash is known without importing
                status = f"[red]broken[/]: {r.error}"
            elif probe is None:
                status = "installed (not imported)"
            else:
                status = f"[green]ok[/] {probe.text}" if probe.ok else f"[red]broken[/]: {probe.text}"
            table.add_row(kind[:-1], r.name, r.distribution, r.version, status)
    console.print(table)
    if not check:
        console.print("`localmim plugins list --check` imports each plugin and says whether it loads.")
