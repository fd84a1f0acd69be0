"""Second look at first use, through the real CLI: a preset's kind picks the settings `config
show` prints, one settings vocabulary across commands, environment variables of other commands,
--help without types after flags, a fine-tune resumed on changed data, the finite-weights check
under FSDP, and modules that import each other."""

from __future__ import annotations

from conftest import run_cli
from test_first_use import assert_user_error


def test_config_show_reads_a_finetune_preset_as_finetune_settings():
    shown = run_cli("config", "show", "--preset", "ft-small")
    assert shown.returncode == 0, shown.stderr
    assert "model.drop_path" in shown.stdout and "preset:ft-small" in shown.stdout
    # --command still says otherwise, and a preset of another kind is refused in one line.
    assert_user_error(run_cli("config", "show", "--preset", "ft-small", "--command", "pretrain"),
                      "kind = 'finetune'", "not `localmim pretrain`")
