"""`localmim benchmark`: the real command on a tiny model, the published HOG it times against,
and the measuring helpers it is built from."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from localmim_cli.data.images import load_rgb, to_tensor
from localmim_cli.data.sample_photos import sample_photo_paths
from localmim_cli.engine.peak_memory import PeakMemory
from localmim_cli.engine.step_timer import time_interleaved, time_steps
from localmim_cli.targets.hog import HOGOptions, HOGTarget
from localmim_cli.targets.hog_reference import PublishedHOG
from localmim_cli.tasks.benchmark import RATIO_KEYS
from conftest import cli_env, run_cli

TINY_SWIN_TOML = """
[model]
img_size = 64
taps = [1, 2, 3, 4]
scales = [1.0, 1.0, 1.0, 1.0]

[model.encoder]
name = "swin"
options = { patch_size = 4, embed_dim = 16, depths = [1, 1, 1, 1], num_heads = [1, 2, 2, 4], window_size = 2 }

[model.target]
name = "hog"
options = { nbins = 18, bias = true }

[model.decoder]
width = [16, 32, 32, 32]
num_heads = 4
"""

FIGURES = ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image", "tflops")


def run_json(*args, env: dict | None = None) -> dict:
    result = run_cli("benchmark", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)   # stdout is exactly one JSON object


def check_ratios(ratios: dict, top: dict, bottom: dict) -> None:
    assert set(ratios) == set(RATIO_KEYS)
    for key in RATIO_KEYS:
        assert ratios[key] == pytest.approx(top[key] / bottom[key], rel=1e-12), key


def check_entry(entry: dict, steps: int, batch: int) -> None:
    for key in FIGURES:
        assert entry[key] > 0, key
    assert len(entry["step_ms_all"]) == steps
    assert entry["img_per_s"] == pytest.approx(batch / (entry["step_ms"] / 1e3), rel=1e-9)
    assert entry["parameters"] > 0


def test_benchmark_json_on_a_tiny_config(tiny_config):
    out = run_json("--config", tiny_config, "--steps", "3", "--warmup", "1")
    assert out["device"] == "cpu" and out["batch_size"] == 4 and out["steps"] == 3 and out["warmup"] == 1
    assert out["threads"]["intra_op"] >= 1 and out["threads"]["reason"]
    assert out["memory_method"]
    for key in ("configured", "baseline"):
        check_entry(out[key], steps=3, batch=4)   # the tiny config's batch
    assert out["baseline"]["precision"] == "fp32" and out["configured"]["precision"] == "fp32"
    assert "published" in out["baseline"]["what"]
    check_ratios(out["vs_baseline"], out["configured"], out["baseline"])
    assert "against" not in out and "vs_against" not in out
    # the local decoders' cost: the same model with its top decoder only, timed in the same rounds
    check_entry(out["top_only"], steps=3, batch=4)
    assert out["top_only"]["label"] == "tiny.toml top-only"
    cost = out["local_decoders_cost"]
    assert math.isfinite(cost) and cost > 0
    assert cost == pytest.approx(out["configured"]["step_ms"] / out["top_only"]["step_ms"], rel=1e-12)
    assert out["local_decoders_flops"] > 1   # three more decoders do more work

    data = out["data"]
    assert data["source"] == "built-in sample photos" and data["images"] == len(sample_photo_paths())
    assert data["workers"] == 0
    assert data["loader_img_per_s"] > 0 and data["fed_img_per_s"] > 0
    assert 0 <= data["data_wait_share"] <= 1
    assert data["step_img_per_s"] == out["configured"]["img_per_s"]
    assert data["loader_over_step"] == pytest.approx(data["loader_img_per_s"] / data["step_img_per_s"], rel=1e-12)


def test_against_times_a_second_configuration_at_the_same_batch(tiny_config, tmp_path):
    swin = tmp_path / "swin.toml"
    swin.write_text(TINY_SWIN_TOML)
    out = run_json("--config", tiny_config, "--against", swin, "--steps", "2", "--warmup", "0",
                   "--batch-size", "2")
    assert out["batch_size"] == 2
    assert out["against"]["encoder"] == "swin" and out["against"]["label"] == str(swin)
    assert out["configured"]["encoder"] == "vit"
    for key in ("configured", "baseline", "against"):
        check_entry(out[key], steps=2, batch=2)
    check_ratios(out["vs_against"], out["configured"], out["against"])
    check_ratios(out["vs_baseline"], out["configured"], out["baseline"])


def test_the_human_report_names_the_baseline_and_the_ratio(tiny_config):
    result = run_cli("benchmark", "--config", tiny_config, "--steps", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "tiny.toml / baseline" in result.stdout
    line = re.search(r"local decoders: LocalMIM step / same model top-only = (\S+)x", result.stdout)
    assert line, result.stdout
    assert math.isfinite(float(line[1])) and float(line[1]) > 0
    assert "published" in result.stdout and "loader" in result.stdout and "intra-op" in result.stdout
    # progress goes to stderr, one line per phase when stderr is not a terminal
    assert "baseline: build" in result.stderr and "interleaved" in result.stderr
    assert "loader feeding the step" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--against", "no-such-preset"], "no preset named 'no-such-preset'"),
])
def test_a_bad_flag_is_a_one_line_error(tiny_config, args, message):
    result = run_cli("benchmark", "--config", tiny_config, *args, "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --------------------------------------------------------------------- the published HOG


def real_photos(size: int) -> torch.Tensor:
    """The sample photos, squashed to size x size, ImageNet-normalized: (N, 3, size, size)."""
    return torch.stack([to_tensor(load_rgb(p).resize((size, size))) for p in sample_photo_paths()])


@pytest.mark.parametrize("nbins, bias", [(9, False), (18, True)])
def test_published_hog_equals_ours_on_real_photos(nbins, bias):
    torch.manual_seed(0)
    images = real_photos(64)
    cells = [4, 8, 16, 32]
    ours = HOGTarget(HOGOptions(nbins=nbins, bias=bias), cells)
    published = PublishedHOG(nbins, cells, ours.sobel_bias)
    assert published.dims == ours.dims and published.cells_px == ours.cells_px
    for a, b in zip(ours(images), published(images)):
        assert a.shape == b.shape == (len(images), a.shape[1], 3 * nbins)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_published_hog_runs_the_pipeline_once_per_scale_and_channel():
    published = PublishedHOG(9, [4, 8])
    calls = []
    for layer in published.layers:
        layer.conv.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
    published(torch.randn(2, 3, 16, 16))
    assert calls == [1] * 6   # 2 scales x 3 colour channels, one channel each


# --------------------------------------------------------------------- measuring helpers


def test_time_steps_times_each_step():
    seen = []
    seconds = time_steps(lambda: seen.append(1), 4, torch.device("cpu"), after_each=lambda: seen.append(0))
    assert len(seconds) == 4 and all(s >= 0 for s in seconds)
    assert seen == [1, 0] * 4


def test_time_interleaved_alternates_the_steps_round_by_round():
    seen = []
    seconds = time_interleaved([lambda: seen.append("a"), lambda: seen.append("b")], 3, torch.device("cpu"))
    assert seen == ["a", "b"] * 3
    assert [len(s) for s in seconds] == [3, 3]


def test_peak_memory_sees_a_short_lived_allocation():
    size = 64 * 2**20
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(size // 4)   # float32, every page touched
        del block
    assert peak.method
    assert peak.bytes >= 0.9 * size


def test_compile_and_precision_time_the_step_also_uncompiled_in_the_same_run(tiny_config):
    """--compile adds the uncompiled step (ratio compiled / eager); --precision changes the
    benchmarked step only. Without a C++ compiler the step stays eager, and says so."""
    out = run_json("--config", tiny_config, "--compile", "default", "--precision", "bf16", "--steps", "1",
                   "--warmup", "0", env=cli_env(CXX="/nonexistent/c++"))
    assert out["configured"]["precision"] == out["eager"]["precision"] == "bf16"
    assert out["baseline"]["precision"] == "fp32"
    assert out["configured"]["compile"] == "off" and out["eager"]["compile"] == "off"
    assert out["configured"]["optimizer"] == "AdamW foreach"
    for key in ("configured", "eager", "baseline"):
        check_entry(out[key], steps=1, batch=4)
    check_ratios(out["vs_eager"], out["configured"], out["eager"])
    check_ratios(out["vs_baseline"], out["configured"], out["baseline"])


# The dense recipes at a CPU's scale: a ViT-Ti/16 at 64 px, batch 2, small heads.
SEG = ["--preset", "seg-vit-b-ade20k", "--set", "model.arch=vit_tiny_patch16_224", "--set", "model.img_size=64",
       "--set", "val.stride=43", "--set", "model.decoder_channels=32", "--set", "model.aux_channels=16"]
DET = ["--preset", "det-vit-b-coco", "--set", "model.arch=vit_tiny_patch16_224", "--set", "model.img_size=64",
       "--set", "model.neck_channels=16", "--set", "model.box_fc=32", "--set", "model.mask_convs=1"]


@pytest.mark.parametrize("task, args, what", [("segmentation", SEG, "UperNet (32 channels), 150 classes"),
                                              ("detection", DET, "Mask R-CNN, 80 categories")])
def test_a_dense_preset_times_its_step_against_the_classification_step(task, args, what):
    out = run_json(*args, "--batch-size", "2", "--device", "cpu", "--steps", "2", "--warmup", "1")
    assert out["task"] == task and out["batch_size"] == 2 and out["img_size"] == 64 and out["steps"] == 2
    assert out["arch"] == "vit_tiny_patch16_224" and out["precision"] == "fp32" and out["memory_method"]
    for key in ("classification", "configured"):
        entry = out[key]
        for figure in ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image"):
            assert entry[figure] > 0, (key, figure)
        assert len(entry["step_ms_all"]) == 2
        assert entry["img_per_s"] == pytest.approx(2 / (entry["step_ms"] / 1e3), rel=1e-9)
    assert "1000 classes, Mixup/CutMix" in out["classification"]["what"] and what in out["configured"]["what"]
    ratios = out["vs_classification"]
    assert set(ratios) == {"img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image"}
    for key, ratio in ratios.items():
        assert ratio == pytest.approx(out["configured"][key] / out["classification"][key], rel=1e-12), key
    # the dense heads cost more per image than a classifier's, whatever the machine's speed
    assert ratios["flops_per_image"] > 1


def test_the_dense_report_prints_the_ratios_and_refuses_what_does_not_apply():
    r = run_cli("benchmark", *SEG, "--batch-size", "2", "--device", "cpu", "--steps", "1", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "segmentation step vs the classification fine-tune step of vit_tiny_patch16_224 at batch 2, 64 px" in r.stdout
    assert "segmentation / classification" in r.stdout and "classification fine-tune" in r.stdout
    r = run_cli("benchmark", *DET, "--against", "demo", "--json")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--against: not for a detection preset" in lines[0]
