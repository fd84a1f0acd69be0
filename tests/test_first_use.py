"""What a new user meets first, through the real CLI: resuming with the command that started the
run, checks that fail before anything is written, the records a resume keeps, and flags."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import TINY_TOML, run_cli


def assert_user_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in: {result.stderr}"


def preset_file(folder: Path, name: str, base_lr: str = "5e-3") -> Path:
    """A user's own preset (a [preset] header over the tiny settings): one optimizer step per epoch."""
    settings = TINY_TOML.replace("repeats = 4", "repeats = 1").replace("epochs = 2", "epochs = 1")
    settings = settings.replace("base_lr = 5e-3", f"base_lr = {base_lr}")
    settings = re.sub(r"^\[", "[settings.", settings.strip(), flags=re.M) + "\n"
    path = folder / f"{name}.toml"
    path.write_text(f'[preset]\nname = "{name}"\nkind = "pretrain"\nsummary = "tiny"\n'
                    f'description = "a tiny test recipe"\n\n{settings}')
    return path


def test_resume_with_the_same_preset_records_resumes_and_says_when_finished(tmp_path):
    preset, out = preset_file(tmp_path, "tiny"), tmp_path / "run"
    first = run_cli("pretrain", "--preset", preset, "--out", out)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    last_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]

    # The same command again with --resume: a finished run says so, with its real last loss.
    again = run_cli("pretrain", "--preset", preset, "--out", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "already finished at epoch 1" in again.stdout and "nothing to do" in again.stdout
    assert f"last loss {last_loss:.4f}" in again.stdout and "nan" not in again.stdout

    # Extending: a note on the schedule, and the records of how the run started are kept.
    longer = run_cli("pretrain", "--preset", preset, "--out", out, "--resume", "--epochs", "2")
    assert longer.returncode == 0, longer.stderr
    assert "schedule now spans 2 epochs" in longer.stdout
    kept = json.loads((out / "manifest.json").read_text())
    assert (kept["started"], kept["command"]) == (manifest["started"], manifest["command"])
    provenance = json.loads((out / "settings.provenance.json").read_text())
    assert "preset:tiny" in provenance["layers"] and provenance["sources"]["train.batch_size"] == "preset:tiny"
    for record in (kept["resumes"], provenance["resumes"]):
        assert len(record) == 1
        assert record[0]["changed"] == {"train.epochs": {"old": 1, "new": 2, "from": "flag:--epochs"}}
        assert record[0]["position"]["step"] == 1 and "--resume" in record[0]["command"]
    assert json.loads((out / "settings.json").read_text())["train"]["epochs"] == 2

    # Another preset that changes the recipe is refused, naming the field.
    other = preset_file(tmp_path, "other", base_lr="0.1")
    refused = run_cli("pretrain", "--preset", other, "--out", out, "--resume")
    assert_user_error(refused, "optim.base_lr")


def test_a_recipe_without_one_optimizer_step_fails_in_dry_run_and_leaves_no_run_directory(tmp_path, tiny_config):
    # Bare `localmim pretrain`: batch 256 on the 7 built-in photos.
    dry = run_cli("pretrain", "--dry-run")
    assert_user_error(dry, "no full optimizer step", "256", "train.batch_size")
    # Accumulation counts too: 7 photos at batch 4 make one micro-batch, not 4.
    accum = run_cli("pretrain", "--config", tiny_config, "--set", "data.repeats=1", "--accum-steps", "4", "--dry-run")
    assert_user_error(accum, "no full optimizer step", "train.accum_steps")
    out = tmp_path / "never"
    real = run_cli("pretrain", "--config", tiny_config, "--batch-size", "64", "--out", out)
    assert_user_error(real, "no full optimizer step")
    assert not out.exists()


def test_bool_settings_are_flags(tmp_path):
    help_text = run_cli("pretrain", "--help").stdout
    line = next(l for l in help_text.splitlines() if "--skip-unreadable" in l)
    assert "--no-skip-unreadable" in line and "<bool>" not in line
    assert "<bool>" not in next(l for l in help_text.splitlines() if "--dry-run" in l)
    r = run_cli("pretrain", "--skip-unreadable", "true", "--dry-run")
    assert_user_error(r, "--no-skip-unreadable", "flags take no value")


def test_config_show_names_the_size_actually_built():
    """The demo ViT is 96 wide: `arch` must not say vit_base (nor vit_anything)."""
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.schema import PretrainSettings

    rows = {path: value for path, value, _ in
            resolve_settings(PretrainSettings, "demo", environ={}).as_rows(plugin_defaults=True)}
    assert rows["model.encoder.options.embed_dim"] == 96 and rows["model.encoder.options.arch"] is None
    rows = {path: value for path, value, _ in
            resolve_settings(PretrainSettings, environ={}).as_rows(plugin_defaults=True)}
    assert rows["model.encoder.options.arch"] == "vit_base"


def test_config_show_and_plugins_list_import_no_torch():
    """Both answer in a fraction of a second: settings validate with the built-in plugins' options
    modules and plugins are listed from package metadata, neither of which loads torch."""
    import sys

    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from localmim_cli.cli.app import app\n"
            "for args in (['config', 'show', '--preset', 'demo'], ['config', 'show', '--preset', 'swin-demo'],\n"
            "             ['plugins', 'list']):\n"
            "    result = CliRunner().invoke(app, args, catch_exceptions=False)\n"
            "    assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_feature_extraction_shows_progress_on_a_terminal():
    import io

    import torch
    from rich.console import Console

    from localmim_cli.data.sample_photos import sample_photo_paths
    from localmim_cli.tasks.features import extract

    screen = io.StringIO()
    samples = [(path, k) for k, path in enumerate(sample_photo_paths())]
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    features, labels = extract(model, samples, 32, 0.875, 3, 0, torch.device("cpu"),
                               console=Console(file=screen, force_terminal=True, width=100), label="features (val)")
    assert features.shape == (7, 3) and labels.tolist() == list(range(7))
    assert "features (val)" in screen.getvalue() and "7/7" in screen.getvalue()
