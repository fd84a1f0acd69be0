"""`localmim pretrain` through the real CLI: errors, run directory, crash safety, resume, torchrun."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, run_cli
from localmim_cli.engine import checkpoints
from localmim_cli.errors import CheckpointError


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load(run_dir).model_state()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- bad input: each names what is wrong, exits 2, prints no traceback ---------------------------

def assert_user_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in: {result.stderr}"


def test_missing_data_folder(tmp_path, tiny_config):
    r = run_cli("pretrain", tmp_path / "nowhere", "--config", tiny_config, "--out", tmp_path / "run")
    assert_user_error(r, "nowhere", "no such")


def test_empty_data_folder(tmp_path, tiny_config):
    (tmp_path / "empty").mkdir()
    r = run_cli("pretrain", tmp_path / "empty", "--config", tiny_config, "--out", tmp_path / "run")
    assert_user_error(r, "empty")


def test_unreadable_image_is_named_and_can_be_skipped(tmp_path, tiny_config, photo_folder):
    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    r = run_cli("pretrain", data, "--config", tiny_config, "--out", tmp_path / "run")
    assert_user_error(r, "broken.jpg", "--skip-unreadable")
    r = run_cli("pretrain", data, "--config", tiny_config, "--out", tmp_path / "run2",
                "--skip-unreadable", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert manifest["data"]["images"] == 4
    assert any("broken.jpg" in line for line in manifest["data"]["unreadable"])


def test_bad_setting_names_field_value_and_layer(tmp_path, tiny_config):
    r = run_cli("pretrain", "--config", tiny_config, "--set", "train.epochs=ten", "--out", tmp_path / "r")
    assert_user_error(r, "train.epochs", "ten", "--set")
    r = run_cli("pretrain", "--config", tiny_config, "--out", tmp_path / "r",
                env=cli_env(LOCALMIM_OPTIM__BASE_LR="-1"))
    assert_user_error(r, "optim.base_lr", "LOCALMIM_OPTIM__BASE_LR")
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_config.read_text() + "\n[loss]\nweight = 2\n")
    r = run_cli("pretrain", "--config", bad, "--out", tmp_path / "r")
    assert_user_error(r, "loss", str(bad))


def test_invalid_model_combination_is_explained(tmp_path, tiny_config):
    r = run_cli("pretrain", "--config", tiny_config, "--set", "model.img_size=36", "--out", tmp_path / "r")
    assert_user_error(r, "36", "patch size")


def test_non_empty_out_is_refused_without_resume_or_overwrite(tmp_path, tiny_config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli("pretrain", "--config", tiny_config, "--out", out)
    assert_user_error(r, "not empty", "--resume", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_run_is_refused(tmp_path, tiny_config):
    r = run_cli("pretrain", "--config", tiny_config, "--out", tmp_path / "none", "--resume")
    assert_user_error(r, "--resume")


# --- a real run, its directory, and exact resumption ---------------------------------------------

def test_run_directory_contents(tmp_path, tiny_config):
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", tiny_config, "--out", out, "--set", "train.keep_last=1",
                "--set", "train.visualize_every=1")
    assert r.returncode == 0, r.stderr
    # A progress figure per epoch, on the same images under the same masks.
    figures = sorted((out / "figures").glob("epoch-*.png"))
    assert [f.name for f in figures] == ["epoch-0001.png", "epoch-0002.png"]
    sidecars = [json.loads(f.with_suffix(".json").read_text()) for f in figures]
    first, second = ([(i["path"], i["mask"]) for i in s["images"]] for s in sidecars)
    assert first == second and len(first) == 4
    assert "1 device = 4; lr = 0.005 x 4 / 256" in r.stdout
    settings = json.loads((out / "settings.json").read_text())
    provenance = json.loads((out / "settings.provenance.json").read_text())["sources"]
    assert settings["train"]["keep_last"] == 1
    assert provenance["train.keep_last"].startswith("flag") and provenance["train.epochs"].startswith("file")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["data"]["images"] == 7
    assert manifest["plugins"]["encoders/vit"]["ok"]
    rows = metrics(out)
    for key in ("epoch", "step", "loss", "loss_scale0", "loss_scale3", "lr", "grad_norm",
                "images_per_s", "data_wait"):
        assert key in rows[-1]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    kept = checkpoints.list_checkpoints(out / "checkpoints")
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()
    # Optimizer state loads without unpickling arbitrary objects.
    state = torch.load(kept[0] / "training.pt", weights_only=True)
    assert "optimizer" in state and "scaler" in state


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_config):
    common = ["--config", tiny_config, "--set", "train.checkpoint_every=2", "--set", "data.repeats=8",
              "--set", "train.epochs=3"]
    straight = tmp_path / "straight"
    r = run_cli("pretrain", *common, "--out", straight)
    assert r.returncode == 0, r.stderr

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "localmim_cli", "pretrain", *map(str, common),
                             "--out", str(crashed)], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # Kill as soon as a mid-epoch checkpoint exists (14 steps per epoch; step 4 is mid-epoch).
    while time.time() < deadline and checkpoints.read_latest_name(crashed / "checkpoints") is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    position = checkpoints.load(crashed).meta["position"]
    assert position["epoch"] == 0 and 0 < position["micro_step"] < 14

    r = run_cli("pretrain", "--out", crashed, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout
    a, b = final_weights(straight), final_weights(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl holds each step once, as if the run had never stopped; so do the TensorBoard
    # curves, though the killed process had written events past the checkpoint
    assert [m["step"] for m in metrics(crashed)] == [m["step"] for m in metrics(straight)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(crashed / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [m["step"] for m in metrics(straight)]


def test_resume_refuses_changed_recipe(tmp_path, tiny_config):
    out = tmp_path / "run"
    assert run_cli("pretrain", "--config", tiny_config, "--out", out, "--set", "train.epochs=1").returncode == 0
    r = run_cli("pretrain", "--out", out, "--resume", "--set", "optim.base_lr=0.1")
    assert_user_error(r, "optim.base_lr")
    # Refused before anything was written: the run's settings are still the ones it ran with.
    assert json.loads((out / "settings.json").read_text())["optim"]["base_lr"] == 5e-3
    r = run_cli("pretrain", "--out", out, "--resume", "--epochs", "2")  # extending is allowed
    assert r.returncode == 0, r.stderr
    assert checkpoints.load(out).meta["position"]["epoch"] == 2


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    good = {"w": torch.arange(6.0)}
    checkpoints.save(folder, "step-00000001", good, {"position": {"step": 1}}, {"optimizer": {}})

    def crash_midway(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match="step-00000002.*disk full"):
        checkpoints.save(folder, "step-00000002", {"w": torch.zeros(6)}, {"position": {"step": 2}},
                         {"optimizer": {}})
    monkeypatch.undo()
    ckpt = checkpoints.load(folder.parent / "checkpoints")
    assert ckpt.path.name == "step-00000001"
    assert torch.equal(ckpt.model_state()["w"], good["w"])
    assert not (folder / "step-00000002").exists()


def test_diverging_run_stops_with_advice_and_keeps_last_good_checkpoint(tmp_path, tiny_config):
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", tiny_config, "--out", out, "--set", "optim.lr=1e30",
                "--set", "optim.warmup_epochs=0", "--set", "train.checkpoint_every=1")
    assert_user_error(r, "NaN", "clip_grad")
    ckpt = checkpoints.load(out)
    assert all(torch.isfinite(t).all() for t in ckpt.model_state().values())


# --- many processes ------------------------------------------------------------------------------

def _outside_the_keys_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight but the key third of each qkv bias.

    Softmax ignores a constant added to every key, so the key bias gets a gradient that is pure
    rounding noise; AdamW divides that noise by its own tiny running scale and takes full-size
    steps of random sign. No two summation orders (one process vs two) can agree there, and the
    loss does not depend on it, so it is left out of the comparison.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key] = torch.cat([q, v])
        else:
            out[key] = value
    return out


def test_two_process_torchrun_matches_one_process(tmp_path, tiny_config):
    """Same effective batch: every step's loss and the final weights agree with one process."""
    one = tmp_path / "one"
    r = run_cli("pretrain", "--config", tiny_config, "--out", one, "--set", "train.batch_size=4",
                "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "localmim_cli",
                        "pretrain", "--config", str(tiny_config), "--out", str(two),
                        "--set", "train.batch_size=2", "--set", "train.epochs=1"],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["effective_batch"] == 4
    la, lb = metrics(one), metrics(two)
    assert [m["step"] for m in la] == [m["step"] for m in lb] and len(la) > 1
    for ma, mb in zip(la, lb):   # log_every = 1: the loss of every step, each scale too
        for key in [k for k in ma if k.startswith("loss")]:
            assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), (ma["step"], key)
    a, b = _outside_the_keys_bias(final_weights(one)), _outside_the_keys_bias(final_weights(two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
