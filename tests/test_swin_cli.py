"""LocalMIM-Swin through the real CLI: `pretrain --preset swin-demo` (made tiny with --set), an
exact resume after SIGKILL, `visualize`, `finetune --preset swin-b-ft` and `export` of that run.

Everything runs on the built-in sample photos (pretraining, figures) or on crops of them, one
class per photo (fine-tuning). One pretraining run is shared by the module; each command is a
fresh interpreter, as a user runs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import cli_env, run_cli
from labelled_photos import make_labelled_sample_set
from localmim_cli.data.sample_photos import sample_photo_paths
from localmim_cli.engine import checkpoints
from localmim_cli.tasks.figure import HIDDEN_GREY

# The swin-demo preset at a tenth of its cost: same image size (128 px: 4x4 mask units of 32 px),
# window and stages, narrower (16 wide) and a short schedule on one thread.
TINY = ["--set", "model.encoder.options.embed_dim=16", "--set", "model.encoder.options.num_heads=[1,1,2,2]",
        "--set", "model.decoder.width=[16,16,16,16]", "--set", "model.decoder.num_heads=2",
        "--set", "train.batch_size=8", "--set", "data.repeats=8", "--set", "data.workers=0",
        "--set", "train.epochs=2", "--set", "optim.warmup_epochs=1", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=2", "--set", "train.visualize_every=0",
        "--device", "cpu", "--precision", "fp32"]
STEPS_PER_EPOCH = 7  # 7 photos x 8 repeats / 8 per batch
N_CLASSES = len(sample_photo_paths())


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The rows of one kind ("train": the optimizer steps' rows, which carry no kind)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == kind]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swin") / "run"
    ok(run_cli("pretrain", "--preset", "swin-demo", *TINY, "--out", out))
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Crops of the sample photos at the run's 128 px, one class per photo, 6 per class."""
    return make_labelled_sample_set(tmp_path_factory.mktemp("labelled") / "train", n_per_class=6, size=128)


def test_pretrain_from_the_swin_demo_preset(swin_run):
    settings = json.loads((swin_run / "settings.json").read_text())
    assert settings["model"]["encoder"]["name"] == "swin"
    assert settings["model"]["encoder"]["options"]["window_size"] == 4  # from the preset
    ckpt = checkpoints.load(swin_run)
    assert ckpt.meta["tap_layers"] == [1, 2, 3, 4] and ckpt.meta["cells_px"] == [8, 16, 32, 32]
    assert ckpt.meta["position"] == {"epoch": 2, "micro_step": 0, "step": 2 * STEPS_PER_EPOCH}
    state = ckpt.model_state()
    assert state["encoder.layers.0.blocks.1.attn.relative_position_bias_table"].shape == (49, 1)
    assert state["decoders.3.embed.weight"].shape == (16, 128)  # stage 4: 8C = 128 wide
    rows = metrics(swin_run)
    assert [r["step"] for r in rows] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(np.isfinite(r[f"loss_scale{k}"]) for r in rows for k in range(4))
    first, last = (np.mean([r["loss"] for r in rows if r["epoch"] == e]) for e in (0, 1))
    assert last < 0.8 * first, (first, last)  # it learns: the decoders find the targets' scale


def test_sigkill_then_resume_matches_the_uninterrupted_run(swin_run, tmp_path):
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "localmim_cli", "pretrain", "--preset", "swin-demo", *TINY,
                             "--out", str(crashed)], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # Kill as soon as the first checkpoint (step 2 of 7 in epoch 0) exists.
    while time.time() < deadline and checkpoints.read_latest_name(crashed / "checkpoints") is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    position = checkpoints.load(crashed).meta["position"]
    assert position["epoch"] == 0 and 0 < position["micro_step"] < STEPS_PER_EPOCH

    r = ok(run_cli("pretrain", "--out", crashed, "--resume"))
    assert "resuming from" in r.stdout
    a, b = checkpoints.load(swin_run).model_state(), checkpoints.load(crashed).model_state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(swin_run)]


def test_visualize_draws_the_swin_run_with_32px_mask_units(swin_run, tmp_path):
    png = tmp_path / "swin.png"
    ok(run_cli("visualize", swin_run, "--out", png))
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert (sidecar["unit_px"], sidecar["mask_grid"], sidecar["img_size"]) == (32, [4, 4], 128)
    assert sidecar["cells_px"] == [8, 16, 32, 32] and sidecar["tap_unit"] == "stage"
    images = sidecar["images"]
    assert len(images) == N_CLASSES
    assert len({tuple(i["mask"]) for i in images}) > 1  # one forward per image, each its own mask
    with Image.open(png) as im:
        figure = np.asarray(im.convert("RGB"))
    layout = sidecar["layout"]
    assert figure.shape[:2] == (layout["height"], layout["width"])

    def panel(row: int, name: str) -> np.ndarray:
        col = layout["panels"].index(name)
        x = layout["pad"] + col * (layout["panel_px"] + layout["pad"])
        y = layout["header_px"] + layout["pad"] + row * layout["row_px"] + layout["title_px"]
        return figure[y:y + layout["panel_px"], x:x + layout["panel_px"]].astype(int)

    assert layout["panel_px"] == 128  # one figure pixel per image pixel: units are 32 x 32 blocks
    for row, image in enumerate(images):
        assert len(image["mask"]) == 16 and sum(image["mask"]) == image["hidden"] == 12  # 4 stay visible
        assert len(image["losses"]) == 4 and all(np.isfinite(image["losses"]))
        shown, masked = panel(row, "input"), panel(row, "masked")
        for unit, hidden in enumerate(image["mask"]):
            r, c = divmod(unit, 4)
            block = np.s_[32 * r:32 * (r + 1), 32 * c:32 * (c + 1)]
            if hidden:
                assert (masked[block] == HIDDEN_GREY).all(), (row, unit)
            else:
                assert (masked[block] == shown[block]).all(), (row, unit)


def test_finetune_from_the_swin_run(swin_run, labelled, tmp_path):
    common = ["--preset", "swin-b-ft", "--init", swin_run, "--epochs", "1", "--batch-size", "8",
              "--workers", "0", "--device", "cpu", "--set", "train.precision=fp32",
              "--set", "data.val_fraction=0.34"]
    # swin-b-ft is for Swin-B checkpoints; the demo's narrow Swin is refused by name ...
    r = run_cli("finetune", labelled, *common, "--out", tmp_path / "refused")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "swin_base_patch4_window7_224" in r.stderr and "model.arch=null" in r.stderr
    # ... and taken once the size check is lifted.
    run = tmp_path / "ft"
    ok(run_cli("finetune", labelled, *common, "--set", "model.arch=null", "--out", run))
    ckpt = checkpoints.load(run)
    assert ckpt.meta["kind"] == "finetune" and ckpt.meta["init"]["kind"] == "pretrain"
    assert ckpt.meta["timm"]["plugin"]["encoder"]["name"] == "swin"
    assert len(ckpt.meta["classes"]) == N_CLASSES and ckpt.model_state()["head.fc.weight"].shape[0] == N_CLASSES
    val = metrics(run, "val")
    assert len(val) == 1 and val[0]["val_images"] == 2 * N_CLASSES

    # The fine-tuned classifier exports with its head and gives the same logits through timm.
    report = ok(run_cli("export", run, "--out", tmp_path / "classifier", "--with-head")).stdout
    assert "max abs feature difference" in report
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["num_classes"] == N_CLASSES and config["localmim"]["verified_max_abs_diff"] < 1e-4


def test_export_loads_in_timm_with_the_encoders_features(swin_run, labelled, tmp_path):
    from localmim_cli.config.schema import ModelSettings
    from localmim_cli.model.build import build_model
    from localmim_cli.tasks.features import EvalSamples, read_labelled

    out = tmp_path / "encoder"
    report = " ".join(ok(run_cli("export", swin_run, "--out", out)).stdout.split())
    diff = float(report.split("max abs feature difference ")[1].split()[0])
    assert diff < 1e-4 and "(< 0.0001)" in report
    config = json.loads((out / "config.json").read_text())
    # A narrow Swin has no timm name of its own: built from swin_tiny's with its sizes.
    assert config["architecture"] == "swin_tiny_patch4_window7_224" and config["num_classes"] == 0
    args = config["model_args"]
    assert (args["embed_dim"], args["depths"], args["num_heads"], args["window_size"], args["img_size"]) == \
        (16, [2, 2, 2, 2], [1, 1, 2, 2], 4, 128)
    assert config["localmim"]["verified_max_abs_diff"] == pytest.approx(diff, rel=0.05)

    # Real photo crops through timm alone, against our encoder's own unmasked forward.
    samples = read_labelled(labelled).samples[::6]
    crops = EvalSamples(samples, 128, 0.875)
    x = torch.stack([crops[i][0] for i in range(len(crops))])
    ckpt = checkpoints.load(swin_run)
    ours = build_model(ModelSettings.model_validate(ckpt.meta["settings"]["model"]))
    ours.load_state_dict(ckpt.model_state())
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        expected = ours.encoder.eval().forward_features(x)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
    assert got.shape == expected.shape == (N_CLASSES, 128)
    # timm rebuilds its LayerNorms with eps 1e-5 (ours: the published 1e-6): close, not equal
    assert (got - expected).abs().max().item() < 1e-4
