"""Second look at first use, through the real CLI: a preset's kind picks the settings `config
show` prints, one settings vocabulary across commands, environment variables of other commands,
--help without types after flags, a fine-tune resumed on changed data, the finite-weights check
under FSDP, and modules that import each other."""

from __future__ import annotations

import click
import typer
from typer.testing import CliRunner

from conftest import run_cli
from test_first_use import assert_user_error


def test_config_show_reads_a_finetune_preset_as_finetune_settings():
    shown = run_cli("config", "show", "--preset", "ft-small")
    assert shown.returncode == 0, shown.stderr
    assert "model.drop_path" in shown.stdout and "preset:ft-small" in shown.stdout
    # --command still says otherwise, and a preset of another kind is refused in one line.
    assert_user_error(run_cli("config", "show", "--preset", "ft-small", "--command", "pretrain"),
                      "kind = 'finetune'", "not `localmim pretrain`")


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, path + (name,))
    return paths


def test_no_help_shows_a_type_after_a_flag():
    from localmim_cli.cli.app import app

    paths = _command_paths(typer.main.get_command(app))
    assert ("evaluate",) in paths and ("config", "show") in paths
    runner = CliRunner()
    for path in paths:
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        assert "--help" in shown.output and "<bool>" not in shown.output, (path, shown.output)
    # And as a user runs it.
    for path in ((), ("evaluate",)):
        shown = run_cli(*path, "--help")
        assert shown.returncode == 0 and "--help" in shown.stdout and "<bool>" not in shown.stdout, shown.stdout
