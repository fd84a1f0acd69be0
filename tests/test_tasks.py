"""Fine-tuning tasks side by side: each named task has its schema and its recipe, and the task of
a run is chosen before its settings are validated (flag, resumed run, preset, config file)."""

from __future__ import annotations

import importlib
import json

import pytest

from localmim_cli.config.presets import load_preset
from localmim_cli.config.resolve import choose_task
from localmim_cli.config.tasks import DEFAULT_TASK, FINETUNE_TASKS, schema_for
from localmim_cli.errors import PresetError, RunDirError, UsageError
from localmim_cli.tasks.recipe import Recipe


@pytest.mark.parametrize("name", sorted(FINETUNE_TASKS))
def test_every_task_has_a_recipe_and_a_schema_of_its_own_name(name):
    info = FINETUNE_TASKS[name]
    module, _, attribute = info.recipe.partition(":")
    recipe = getattr(importlib.import_module(module), attribute)
    assert isinstance(recipe, Recipe) and recipe.name == name
    assert info.schema().task == name            # settings.json records the task
    assert schema_for("finetune", name) is info.schema


def test_the_task_comes_from_the_flag_the_run_the_preset_or_the_config_file(tmp_path):
    assert choose_task(None) == DEFAULT_TASK
    assert choose_task("classification", "ft-small") == "classification"
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "classification"\n[train]\nepochs = 1\n')
    assert choose_task(None, None, cfg) == "classification"
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"train": {}}))     # a run from before tasks had names
    assert choose_task(None, None, None, run) == "classification"


def test_unknown_or_clashing_tasks_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="--task 'depth'.*choose one of classification"):
        choose_task("depth")
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "depth"\n')
    with pytest.raises(UsageError, match=f"task in {cfg}"):
        choose_task(None, None, cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"task": "classification"}))
    if len(FINETUNE_TASKS) > 1:
        other = next(n for n in FINETUNE_TASKS if n != "classification")
        with pytest.raises(RunDirError, match="is a classification run; drop --task"):
            choose_task(other, None, None, run)
        with pytest.raises(UsageError, match="--preset ft-small is for 'classification'"):
            choose_task(other, "ft-small")
    with pytest.raises(UsageError, match="only finetune has tasks"):
        schema_for("pretrain", "classification")


def test_a_preset_names_its_task_only_for_finetune(tmp_path):
    assert load_preset("ft-small")[0].task == "classification"   # the default, unnamed
    assert load_preset("demo")[0].task is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[preset]\nname = "x"\nkind = "pretrain"\ntask = "classification"\nsummary = "s"\n'
                   'description = "d"\n[settings]\n')
    with pytest.raises(PresetError, match="preset.task: .*only finetune presets name a task"):
        load_preset(str(bad))
    bad.write_text('[preset]\nname = "x"\nkind = "finetune"\ntask = "depth"\nsummary = "s"\n'
                   'description = "d"\n[settings]\n')
    with pytest.raises(PresetError, match="not a fine-tuning task"):
        load_preset(str(bad))
