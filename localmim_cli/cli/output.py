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
