"""The `localmim` command line: Typer commands that parse flags, resolve settings, call a task
(`localmim_cli.tasks`) and print its result. Nothing here imports torch at module level, so
`localmim --help` answers at once."""

from localmim_cli.cli.app import app, main

__all__ = ["app", "main"]
