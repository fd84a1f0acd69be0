"""`localmim export`: the encoder as a timm model folder that reloads with timm alone and gives the
checkpoint's own features; from a pretrain run, a published checkpoint and a finetune run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from localmim_cli.engine import checkpoints
from localmim_cli.tasks.features import EvalSamples, read_labelled
from tiny_runs import CLASSES, invoke, photo_sets, published_pth, run_main, tiny_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")


def photo_batch(tmp_path_factory, n: int = 8) -> torch.Tensor:
    """Real photo crops, preprocessed as evaluate does: (n, 3, 32, 32)."""
    _, heldout = photo_sets(tmp_path_factory)
    samples = read_labelled(heldout).samples[::10][:n]
    crops = EvalSamples(samples, 32, 0.875)
    return torch.stack([crops[i][0] for i in range(len(crops))])


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def our_encoder_features(run: Path, x: torch.Tensor) -> torch.Tensor:
    """MaskedEncoder.forward_features of a pretrain run, built from its own settings."""
    from localmim_cli.model.build import build_model
    from localmim_cli.config.schema import ModelSettings

    ckpt = checkpoints.load(run)
    model = build_model(ModelSettings.model_validate(ckpt.meta["settings"]["model"]))
    model.load_state_dict(ckpt.model_state())
    with torch.no_grad():
        return model.encoder.eval().forward_features(x)


def test_pretrain_run_exports_to_timm_with_our_features(tmp_path_factory, tmp_path):
    run = tiny_pretrain_run(tmp_path_factory)
    out = tmp_path / "encoder"
    printed = invoke("export", run, "--out", out)
    assert "max abs feature difference" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"        # width 48 has no timm name
    assert config["num_classes"] == 0 and config["num_features"] == 48 and config["global_pool"] == "avg"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["model_args"]["fc_norm"] is False                # the tap norm sits before pooling
    assert config["localmim"]["source"] == str(run) and config["localmim"]["source_kind"] == "pretrain"
    assert config["localmim"]["encoder_options"]["name"] == "vit"
    assert config["localmim"]["verified_max_abs_diff"] < 1e-4

    x = photo_batch(tmp_path_factory)
    ours = our_encoder_features(run, x)
    sizes = {k: config["model_args"][k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    by_file = timm.create_model(config["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                num_classes=0, global_pool="avg", fc_norm=False, **sizes).eval()
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    for model in (by_file, by_dir):
        torch.testing.assert_close(timm_features(model, x), ours, atol=1e-5, rtol=0)
    # The norm really is the pretrained last tap norm (it moved off its 1/0 initialisation).
    tap = checkpoints.load(run).model_state()["encoder.tap_norms.1.weight"]
    assert torch.equal(by_dir.norm.weight, tap) and not torch.equal(tap, torch.ones_like(tap))

    # The export is a valid starting point itself: same features, so the same k-NN result.
    train, _ = photo_sets(tmp_path_factory)
    a, b = tmp_path / "run.json", tmp_path / "export.json"
    for ckpt, path in ((run, a), (out, b)):
        invoke("evaluate", ckpt, train, "--protocol", "knn", "--workers", 0, "--device", "cpu", "--no-cache",
               "--out", path)
    assert json.loads(a.read_text())["top1"] == json.loads(b.read_text())["top1"]


def test_published_checkpoint_exports_like_our_encoder(tmp_path_factory, tmp_path):
    from localmim_cli.model.build import build_model
    from localmim_cli.weights.published import load_published_into, read_published, settings_from_published

    pth = published_pth(tmp_path_factory)
    out = tmp_path / "encoder"
    invoke("export", pth, "--out", out)
    state, args = read_published(pth)
    ours = build_model(settings_from_published(state, args))
    load_published_into(ours, state).raise_if_incomplete(pth)
    x = photo_batch(tmp_path_factory)
    with torch.no_grad():
        expected = ours.encoder.eval().forward_features(x)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(timm_features(model, x), expected, atol=1e-5, rtol=0)
    assert json.loads((out / "config.json").read_text())["localmim"]["source_kind"] == "published"


def test_finetune_run_exports_with_and_without_head(tmp_path_factory, tmp_path):
    from localmim_cli.weights.encoder_weights import ViTShape
    from localmim_cli.weights.sources import create_vit

    train, _ = photo_sets(tmp_path_factory)
    run = tmp_path / "ft"
    invoke("finetune", train, "--init", tiny_pretrain_run(tmp_path_factory), "--preset", "ft-small",
           "--epochs", 1, "--workers", 0, "--device", "cpu", "--out", run)
    ckpt = checkpoints.load(run)
    ours = create_vit(ViTShape(**ckpt.meta["timm"]["shape"]), num_classes=len(CLASSES)).eval()
    ours.load_state_dict(ckpt.model_state())
    x = photo_batch(tmp_path_factory)

    invoke("export", run, "--out", tmp_path / "encoder")
    encoder = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True).eval()
    assert encoder.num_classes == 0
    torch.testing.assert_close(timm_features(encoder, x), timm_features(ours, x), atol=1e-5, rtol=0)

    # The best validation checkpoint exports like any other (after one epoch, it is the last one).
    invoke("export", run / "checkpoints" / "best", "--out", tmp_path / "classifier", "--with-head")
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["num_classes"] == 7 and config["label_names"] == CLASSES
    classifier = timm.create_model(f"local-dir:{tmp_path / 'classifier'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), ours(x), atol=1e-5, rtol=0)


def test_export_refuses_a_full_folder_and_an_export_that_does_not_verify(tmp_path_factory, tmp_path, capsys,
                                                                         monkeypatch):
    from localmim_cli.tasks import export

    run = tiny_pretrain_run(tmp_path_factory)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, err = run_main(capsys, "export", run, "--out", full)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (full / "keep.txt").read_text() == "mine"

    monkeypatch.setattr(export, "reload_checks", lambda *a, **k: {"create_model('local-dir:...')": 0.5})
    code, err = run_main(capsys, "export", run, "--out", tmp_path / "bad")
    assert code == 2 and "differ" in err and "0.5" in err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_exported_encoder_initialises_finetuning(tmp_path_factory, tmp_path):
    from localmim_cli.weights.sources import load_encoder_weights

    run = tiny_pretrain_run(tmp_path_factory)
    out = tmp_path / "encoder"
    invoke("export", run, "--out", out)
    weights = load_encoder_weights(out)
    assert weights.kind == "export" and weights.pooling == "norm_then_pool"
    assert weights.shape == load_encoder_weights(run).shape
    train, _ = photo_sets(tmp_path_factory)
    invoke("finetune", train, "--init", out, "--preset", "ft-small", "--epochs", 1, "--workers", 0,
           "--device", "cpu", "--out", tmp_path / "ft")
    assert checkpoints.load(tmp_path / "ft").meta["init"]["kind"] == "export"
