"""Layered settings: precedence, provenance, env and --set parsing, errors that name their layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from localmim_cli.plugins import registry
from localmim_cli.config.layers import default_flag_name, parse_value, resolve
from localmim_cli.errors import SettingsError
from localmim_cli.config.schema import PretrainSettings


def run(**kw):
    kw.setdefault("environ", {})
    return resolve(PretrainSettings, **kw)


def problems(**kw) -> str:
    with pytest.raises(SettingsError) as info:
        run(**kw)
    return "\n".join(info.value.problems)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def leaf_paths(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        return [p for k, v in tree.items() for p in leaf_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


# --- precedence -------------------------------------------------------------------------------


def test_defaults_alone_are_labelled_default():
    r = run()
    assert r.settings == PretrainSettings()
    assert set(r.provenance) == set(leaf_paths(r.to_dict()))
    assert set(r.provenance.values()) == {"default"}


@pytest.mark.parametrize("top", ["preset", "file", "env", "flag", "set"])
def test_each_layer_beats_the_ones_below(tmp_path, top):
    order = ["preset", "file", "env", "flag", "set"]
    given = order[:order.index(top) + 1]
    kw = {}
    if "preset" in given:
        kw.update(preset={"train": {"epochs": 1}}, preset_name="p")
    if "file" in given:
        kw["config_file"] = write(tmp_path, "c.toml", "[train]\nepochs = 2\n")
    if "env" in given:
        kw["environ"] = {"LOCALMIM_TRAIN__EPOCHS": "3"}
    if "flag" in given:
        kw["flags"] = {"train.epochs": 4}
    if "set" in given:
        kw["sets"] = ["train.epochs=5"]
    r = run(**kw)
    expected = {"preset": (1, "preset:p"), "file": (2, f"file:{tmp_path / 'c.toml'}"),
                "env": (3, "env:LOCALMIM_TRAIN__EPOCHS"), "flag": (4, "flag:--epochs"),
                "set": (5, "flag:--set")}[top]
    assert (r.settings.train.epochs, r.provenance["train.epochs"]) == expected


def test_every_layer_labels_its_leaves_and_plugin_options_merge_deeply(tmp_path):
    cfg = write(tmp_path, "c.json", json.dumps({"model": {"encoder": {"options": {"patch_size": 8}}},
                                                "data": {"workers": 0}}))
    r = run(preset={"model": {"encoder": {"options": {"arch": "vit_small"}}, "img_size": 64}},
            preset_name="mine", config_file=cfg,
            environ={"LOCALMIM_MODEL__ENCODER__OPTIONS__DROP_PATH": "0.1"},
            flags={"train.batch_size": 4}, sets=["model.target.options.nbins=18"])
    p = r.provenance
    assert p["model.encoder.options.arch"] == "preset:mine"
    assert p["model.img_size"] == "preset:mine"
    assert p["model.encoder.options.patch_size"] == f"file:{cfg}"
    assert p["data.workers"] == f"file:{cfg}"
    assert p["model.encoder.options.drop_path"] == "env:LOCALMIM_MODEL__ENCODER__OPTIONS__DROP_PATH"
    assert p["train.batch_size"] == "flag:--batch-size"
    assert p["model.target.options.nbins"] == "flag:--set"
    assert p["model.encoder.name"] == p["train.epochs"] == "default"
    assert r.settings.model.encoder.options == {"arch": "vit_small", "patch_size": 8, "drop_path": 0.1}
    assert set(p) == set(leaf_paths(r.to_dict()))
    assert r.layers == ["default", "preset:mine", f"file:{cfg}",
                        "env:LOCALMIM_MODEL__ENCODER__OPTIONS__DROP_PATH", "flag:--batch-size", "flag:--set"]
    # the validated plugin options are kept for callers
    assert r.plugin_options["model.encoder.options"].embed_dim == 384


def test_switching_plugin_drops_options_written_for_the_old_one():
    r = run(preset={"model": {"target": {"name": "hog", "options": {"nbins": 18, "bias": True}}}},
            preset_name="p", sets=["model.target.name=pixel"])
    assert r.settings.model.target.name == "pixel"
    assert r.settings.model.target.options == {}
    assert r.provenance["model.target.options"] == "default"
    # naming the same plugin again keeps them
    r = run(preset={"model": {"target": {"name": "hog", "options": {"nbins": 18}}}}, preset_name="p",
            sets=["model.target.name=hog"])
    assert r.settings.model.target.options == {"nbins": 18}


def test_layers_never_change_the_callers_dicts():
    preset = {"model": {"target": {"options": {}}}}
    run(preset=preset, preset_name="p", sets=["model.target.options.nbins=18"])
    assert preset == {"model": {"target": {"options": {}}}}


def test_flag_labels_default_and_explicit():
    assert default_flag_name(("train", "batch_size")) == "--batch-size"
    assert default_flag_name(("model", "encoder", "name")) == "--encoder"
    r = run(flags={"data.path": "imgs", "model.encoder.name": "vit"}, flag_names={"data.path": "DATA"})
    assert r.provenance["data.path"] == "flag:DATA"
    assert r.provenance["model.encoder.name"] == "flag:--encoder"


# --- env and --set parsing --------------------------------------------------------------------


def test_env_nested_json_values_and_case():
    r = run(environ={"LOCALMIM_OPTIM__BETAS": "[0.8, 0.9]", "localmim_data__hflip": "false",
                     "LOCALMIM_OPTIM__LR": "1e-3", "LOCALMIM_MODEL__TAPS": "[1, 2, 3, 4]",
                     "LOCALMIM_TRAIN__DEVICE": "cuda:1", "LOCALMIM_DATA__PATH": "2024",
                     "LOCALMIM_MODEL__ENCODER__OPTIONS__ARCH": "vit_small"})
    s = r.settings
    assert s.optim.betas == (0.8, 0.9) and s.data.hflip is False and s.optim.lr == 1e-3
    assert s.model.taps == [1, 2, 3, 4] and s.train.device == "cuda:1"
    assert s.data.path == Path("2024")  # text fields take the raw text, never a JSON number
    assert s.model.encoder.options["arch"] == "vit_small"
    assert r.provenance["data.hflip"] == "env:localmim_data__hflip"


def test_env_ignores_variables_that_are_not_settings():
    r = run(environ={"LOCALMIM_HOME": "/tmp/x", "LOCALMIM_CONFORMANCE_DIR": "/x",
                     "OTHER_TRAIN__EPOCHS": "3", "PATH": "/bin"})
    assert set(r.provenance.values()) == {"default"}


def test_env_null_and_custom_prefix():
    r = run(environ={"MIM_OPTIM__LR": "null", "LOCALMIM_TRAIN__EPOCHS": "7"},
            preset={"optim": {"lr": 0.1}}, preset_name="p", env_prefix="MIM_")
    assert r.settings.optim.lr is None and r.provenance["optim.lr"] == "env:MIM_OPTIM__LR"
    assert r.settings.train.epochs == 1600


def test_env_with_empty_part_is_an_error():
    assert "env:LOCALMIM_TRAIN____EPOCHS" in problems(environ={"LOCALMIM_TRAIN____EPOCHS": "3"})


def test_set_values_parse_as_json_or_text():
    s = run(sets=["optim.base_lr=3e-4", "data.crop_scale=[0.5, 1]", "train.precision=bf16",
                  "model.encoder.options.qkv_bias=false", "train.seed = 3"]).settings
    assert s.optim.base_lr == 3e-4 and s.data.crop_scale == (0.5, 1.0)
    assert s.train.precision == "bf16" and s.model.encoder.options["qkv_bias"] is False
    assert s.train.seed == 3
    assert parse_value("a=b") == "a=b" and parse_value("null") is None and parse_value("[1]") == [1]


@pytest.mark.parametrize("bad", ["train.epochs", "=5", "train..epochs=5"])
def test_malformed_set_is_named(bad):
    assert f"--set {bad!r}" in problems(sets=[bad])


def test_later_set_wins_and_replaces_a_table():
    r = run(sets=["train.epochs=3", "train.epochs=4"])
    assert r.settings.train.epochs == 4


# --- errors -----------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_name(tmp_path):
    cfg = write(tmp_path, "c.toml", "[train]\nepoch = 5\n")
    msg = problems(config_file=cfg)
    assert f"train.epoch = 5 (from file:{cfg}): unknown setting; did you mean 'train.epochs'?" in msg


def test_unknown_key_in_the_wrong_section_points_to_the_right_one():
    msg = problems(sets=["epochs=5"])
    assert "epochs = 5 (from flag:--set): unknown setting; did you mean 'train.epochs'?" in msg


def test_unknown_section_and_unknown_plugin_option():
    assert "did you mean 'train'?" in problems(environ={"LOCALMIM_TRAIN_X__EPOCHS": "1"})
    msg = problems(sets=["model.encoder.options.patchsize=8"])
    assert ("model.encoder.options.patchsize = 8 (from flag:--set): unknown setting; "
            "did you mean 'model.encoder.options.patch_size'?") in msg


@pytest.mark.parametrize("layer", ["preset", "file", "env", "flag", "set"])
def test_bad_value_names_field_value_and_layer(tmp_path, layer):
    kw, label = {}, ""
    if layer == "preset":
        kw, label = {"preset": {"train": {"epochs": "ten"}}, "preset_name": "p"}, "preset:p"
    elif layer == "file":
        cfg = write(tmp_path, "c.toml", '[train]\nepochs = "ten"\n')
        kw, label = {"config_file": cfg}, f"file:{cfg}"
    elif layer == "env":
        kw, label = {"environ": {"LOCALMIM_TRAIN__EPOCHS": "ten"}}, "env:LOCALMIM_TRAIN__EPOCHS"
    elif layer == "flag":
        kw, label = {"flags": {"train.epochs": "ten"}}, "flag:--epochs"
    else:
        kw, label = {"sets": ["train.epochs=ten"]}, "flag:--set"
    msg = problems(**kw)
    assert f"train.epochs = 'ten' (from {label}): Input should be a valid integer" in msg


def test_all_problems_are_reported_together(tmp_path):
    cfg = write(tmp_path, "c.toml", "[optim]\nbase_lr = -1\n")
    with pytest.raises(SettingsError) as info:
        run(config_file=cfg, environ={"LOCALMIM_TRAIN__EPOCHS": "0"},
            sets=["model.encoder.options.arch=vit_gigantic"])
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert f"optim.base_lr = -1 (from file:{cfg})" in text
    assert "train.epochs = 0 (from env:LOCALMIM_TRAIN__EPOCHS)" in text
    assert "model.encoder.options.arch = 'vit_gigantic' (from flag:--set)" in text


def test_model_level_error_is_blamed_on_the_value_a_layer_set():
    msg = problems(preset={"data": {"workers": 1}}, preset_name="p", sets=["data.crop_scale=[0.9, 0.5]"])
    assert "data.crop_scale = [0.9, 0.5] (from flag:--set): crop_scale must satisfy" in msg


def test_plugin_model_level_error_names_the_options_involved():
    msg = problems(preset={"model": {"encoder": {"options": {"num_heads": 7}}}}, preset_name="p",
                   sets=["model.encoder.options.embed_dim=96"])
    assert "model.encoder.options.embed_dim = 96 (from flag:--set): embed_dim 96 is not divisible" in msg
    assert "model.encoder.options.num_heads = 7 (from preset:p)" in msg


def test_plugin_option_error_names_its_layer(tmp_path):
    cfg = write(tmp_path, "c.toml", '[model.encoder.options]\narch = "vit_gigantic"\n')
    msg = problems(config_file=cfg)
    assert f"model.encoder.options.arch = 'vit_gigantic' (from file:{cfg}): Input should be" in msg


def test_missing_plugin_names_the_setting_value_and_layer():
    msg = problems(environ={"LOCALMIM_MODEL__ENCODER__NAME": "nosuch"})
    assert ("model.encoder.name = 'nosuch' (from env:LOCALMIM_MODEL__ENCODER__NAME): "
            "no encoder named 'nosuch'") in msg
    assert "model.target.name = 'nope' (from flag:--target)" in problems(flags={"model.target.name": "nope"})


def test_broken_plugin_is_reported_not_raised(monkeypatch):
    def broken(name):
        raise registry.PluginError(f"encoder {name!r} from x is broken: failed to import")
    monkeypatch.setattr(registry, "encoder", broken)
    assert "model.encoder.name = 'vit' (from default): encoder 'vit' from x is broken" in problems()


def test_config_file_errors_name_the_file(tmp_path):
    for name, text, expect in [("c.yaml", "a: 1", "unknown settings file type '.yaml'"),
                               ("c.toml", "[train\n", "not valid TOML"),
                               ("c.json", "[1, 2]", "the top level must be a table")]:
        path = write(tmp_path, name, text)
        assert f"{path}: {expect}" in problems(config_file=path)
    assert "no such settings file" in problems(config_file=tmp_path / "missing.toml")


def test_preset_file_given_as_config_gets_a_hint(tmp_path):
    cfg = write(tmp_path, "p.toml", '[preset]\nname = "x"\n[settings.train]\nepochs = 1\n')
    assert "pass it as --preset" in problems(config_file=cfg)


def test_schema_without_plugin_choices_skips_the_plugin_step():
    class Small(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: int = 3
        name: str = "x"

    r = resolve(Small, environ={}, sets=["epochs=4"])
    assert r.settings.epochs == 4 and r.provenance == {"epochs": "flag:--set", "name": "default"}
    with pytest.raises(SettingsError, match="did you mean 'epochs'"):
        resolve(Small, environ={}, sets=["epoch=4"])


# --- output -----------------------------------------------------------------------------------


def test_resolved_file_round_trips(tmp_path):
    r = run(preset={"model": {"encoder": {"options": {"arch": "vit_small", "patch_size": 8}}}, "optim": {"lr": 1e-3}},
            preset_name="p", environ={"LOCALMIM_DATA__PATH": "imgs"},
            sets=["optim.lr=null", "data.crop_scale=[0.3, 0.9]", "model.taps=[1, 2, 3, 4]"])
    values, sources = r.write(tmp_path / "run")
    assert values.name == "settings.json" and sources.name == "settings.provenance.json"
    again = run(config_file=values)
    assert again.settings == r.settings
    assert set(again.provenance.values()) == {f"file:{values}"}
    saved = json.loads(sources.read_text())
    assert saved["sources"] == r.provenance and saved["layers"][0] == "default"
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_rows_cover_every_leaf_and_are_json_ready():
    r = run(sets=["model.encoder.options.arch=vit_small"])
    rows = r.as_rows()
    assert [p for p, _, _ in rows] == leaf_paths(r.to_dict())
    json.dumps(rows)
    assert ("model.encoder.options.arch", "vit_small", "flag:--set") in rows
    with_defaults = dict((p, (v, s)) for p, v, s in r.as_rows(plugin_defaults=True))
    assert with_defaults["model.encoder.options.embed_dim"] == (384, "plugin default")
    assert with_defaults["model.target.options.nbins"] == (9, "plugin default")
    assert "model.target.options" not in with_defaults
