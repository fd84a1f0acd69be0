"""Where the command line prints: one console for results, one for errors."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

# soft_wrap: lines in logs and pipes stay whole instead of breaking at 80 columns
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_settings(resolved) -> None:
    """Every resolved setting, its value and the layer that set it."""
    table = Table(title="resolved settings", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("from")
    for path, value, source in resolved.as_rows(plugin_defaults=True):
        table.add_row(path, json.dumps(value), source)
    console.print(table)


def note_others_env(resolved) -> None:
    """One dim line on stderr naming the LOCALMIM_* variables left to other commands, if any."""
    if resolved.others_env:
        names = ", ".join(resolved.others_env)
        err_console.print(f"[dim]note: {names} {'is a setting' if len(resolved.others_env) == 1 else 'are settings'} "
                          f"of another command, not this one: left out[/]", highlight=False)
