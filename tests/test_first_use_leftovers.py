"""Second look at first use, through the real CLI: a preset's kind picks the settings `config
show` prints, one settings vocabulary across commands, environment variables of other commands,
--help without types after flags, a fine-tune resumed on changed data, the finite-weights check
under FSDP, and modules that import each other."""

from __future__ import annotations

import json
import shutil

import click
import typer
from typer.testing import CliRunner

from conftest import cli_env, run_cli
from localmim_cli.config.layers import _leaves
from test_first_use import assert_user_error
from tiny_runs import photo_sets, tiny_pretrain_run


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


# ------------------------------------------------------------------------------ evaluate's settings


def test_evaluate_takes_the_other_commands_variables_and_names_only_its_own(tmp_path_factory, tmp_path):
    """Variables exported for a pretraining (train.epochs is not an evaluation's setting) leave an
    evaluation one dim note; the ones it shares (data.workers, train.device) apply to it."""
    run, (train, _) = tiny_pretrain_run(tmp_path_factory), photo_sets(tmp_path_factory)
    exported = {"LOCALMIM_TRAIN__EPOCHS": "1", "LOCALMIM_TRAIN__ACCUM_STEPS": "1",
                "LOCALMIM_DATA__WORKERS": "0", "LOCALMIM_TRAIN__DEVICE": "cpu"}
    scored = run_cli("evaluate", run, train, "--protocol", "knn", "--out", tmp_path / "knn.json",
                     env=cli_env(**exported))
    assert scored.returncode == 0, scored.stderr
    notes = [line for line in scored.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "LOCALMIM_TRAIN__ACCUM_STEPS, LOCALMIM_TRAIN__EPOCHS" in notes[0], scored.stderr
    settings = json.loads((tmp_path / "knn.json").read_text())["settings"]
    assert settings["data"]["workers"] == 0 and settings["train"]["device"] == "cpu"

    # A variable that is no command's setting is still refused, naming it.
    assert_user_error(run_cli("evaluate", run, train, env=cli_env(LOCALMIM_TRAIN__EPOCHZ="1")),
                      "train.epochz", "env:LOCALMIM_TRAIN__EPOCHZ", "unknown setting")
    # Nor is a pretraining stopped by an evaluation's own variable: a note, and the run's values.
    shown = run_cli("config", "show", "--resolved", env=cli_env(LOCALMIM_KNN__K="5", LOCALMIM_MIXUP__PROB="0"))
    assert shown.returncode == 0, shown.stderr
    assert "LOCALMIM_KNN__K, LOCALMIM_MIXUP__PROB" in shown.stderr and "knn" not in json.loads(shown.stdout)


def test_evaluate_speaks_the_vocabulary_of_pretrain_and_finetune(tmp_path_factory, tmp_path):
    from localmim_cli.config.tasks import COMMANDS

    shared = {"data.workers", "data.val_path", "model.img_size", "train.batch_size", "train.device",
              "train.precision", "train.seed"}
    names = {command: {".".join(k) for k, _ in _leaves(schema().model_dump())} for command, schema in COMMANDS.items()}
    assert shared <= names["evaluate"] and shared <= names["finetune"] and shared - {"data.val_path"} <= names["pretrain"]
    assert "data.eval_crop_fraction" in names["evaluate"] & names["finetune"]

    run, (train, heldout) = tiny_pretrain_run(tmp_path_factory), photo_sets(tmp_path_factory)
    config = tmp_path / "evaluate.toml"
    config.write_text('[data]\nworkers = 0\neval_crop_fraction = 1.0\n[train]\ndevice = "cpu"\nbatch_size = 8\n')
    scored = run_cli("evaluate", run, train, "--protocol", "knn", "--config", config, "--val", heldout,
                     "--set", "train.seed=3", "--out", tmp_path / "knn.json")
    assert scored.returncode == 0, scored.stderr
    settings = json.loads((tmp_path / "knn.json").read_text())["settings"]
    assert settings["data"] == {**settings["data"], "workers": 0, "eval_crop_fraction": 1.0, "val_path": str(heldout)}
    assert settings["train"] == {"batch_size": 8, "device": "cpu", "precision": "auto", "seed": 3}

    # The old flat names: refused, one line each naming the new one, from --set and from a file.
    old = run_cli("evaluate", run, train, "--set", "workers=0", "--set", "crop_fraction=1.0")
    assert_user_error(old, "workers (from flag:--set): renamed to data.workers",
                      "crop_fraction (from flag:--set): renamed to data.eval_crop_fraction")
    (tmp_path / "old.json").write_text(json.dumps({"seed": 1, "batch_size": 8, "knn": {"k": 5}}))
    assert_user_error(run_cli("evaluate", run, train, "--config", tmp_path / "old.json"),
                      f"seed (from file:{tmp_path / 'old.json'}): renamed to train.seed",
                      "batch_size (from file:", "renamed to train.batch_size")


# ------------------------------------------------------------------------------ fine-tuning resumed on other data


def test_finetune_resume_refuses_changed_data(tmp_path_factory, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(photo_sets(tmp_path_factory)[0], train)
    run = tmp_path / "run"
    common = ["finetune", train, "--init", tiny_pretrain_run(tmp_path_factory), "--out", run, "--batch-size", 16,
              "--workers", 0, "--device", "cpu", "--precision", "fp32", "--set", "train.eval_every=0",
              "--set", "optim.warmup_epochs=0"]
    first = run_cli(*common, "--epochs", 1)
    assert first.returncode == 0, first.stderr
    before = (run / "manifest.json").read_text()

    # One more image in a class folder: the split, and which image each step reads, would change.
    folder = next(p for p in sorted(train.iterdir()) if p.is_dir())
    image = next(p for p in sorted(folder.iterdir()) if p.is_file())
    shutil.copy(image, folder / f"zz-extra{image.suffix}")
    refused = run_cli(*common, "--epochs", 2, "--resume")
    assert_user_error(refused, f"{train}: the data changed since the run started", "manifest.json")
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (run / "manifest.json").read_text() == before     # nothing of the run was rewritten
