"""The Python API as a notebook would use it: pretrain, visualize and export, then read back."""

from __future__ import annotations

import json

import pytest
import torch

import localmim_cli as lm
from localmim_cli.errors import RunDirError, SettingsError


def test_notebook_pretrain_visualize_export(tmp_path, tiny_config, photo_folder):
    run = lm.pretrain(photo_folder, config=tiny_config, out=tmp_path / "run", quiet=True,
                      train__epochs=1, settings={"train.log_every": 2})
    assert run == tmp_path / "run"
    settings = json.loads((run / "settings.json").read_text())
    assert settings["train"]["epochs"] == 1 and settings["train"]["log_every"] == 2
    assert settings["data"]["path"] == str(photo_folder)
    sources = json.loads((run / "settings.provenance.json").read_text())["sources"]
    assert sources["train.epochs"] == "flag:python:train__epochs"
    assert sources["train.batch_size"].startswith("file:")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)

    png = lm.visualize(run, [photo_folder], out=tmp_path / "fig.png", seed=3)
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert len(sidecar["images"]) == 4 and len(sidecar["images"][0]["losses"]) == 4

    report = lm.export(run, tmp_path / "exported")
    assert report["max_abs_diff"] < 1e-4
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_api_errors_are_the_command_lines(tmp_path, tiny_config):
    with pytest.raises(SettingsError, match="train.epochs"):
        lm.pretrain(config=tiny_config, out=tmp_path / "bad", quiet=True, train__epochs="ten")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        lm.pretrain(config=tiny_config, out=tmp_path / "full", quiet=True)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        lm.no_such_function  # noqa: B018
