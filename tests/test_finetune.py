"""`localmim finetune` on real photos: it learns, resumes exactly, takes published checkpoints,
and refuses bad input with a message (exit 2) through the real CLI.

Data: crops of the built-in sample photos, one class per photo; checkpoints to start from: a
tiny real pretraining run and its weights in the authors' layout (tests/tiny_runs.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from localmim_cli.engine import checkpoints
from tiny_runs import CLASSES, invoke, photo_sets, published_pth, run_main, tiny_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")


def val_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == "val"]


# ------------------------------------------------------------------------------ learning


def test_finetune_cli_learns_the_photo_classes(tmp_path_factory, tmp_path):
    from rich.console import Console

    from localmim_cli.tasks.evaluate import run_evaluation
    from localmim_cli.config.schema import EvaluateSettings

    train, heldout = photo_sets(tmp_path_factory)
    init = tiny_pretrain_run(tmp_path_factory)
    run = tmp_path / "ft"
    r = run_cli("finetune", train, "--init", init, "--preset", "ft-small", "--epochs", 6, "--val-fraction",
                0.2, "--workers", 0, "--device", "cpu", "--precision", "fp32", "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "val top-1" in r.stdout

    assert json.loads((run / "classes.json").read_text()) == CLASSES
    ckpt = checkpoints.load(run)
    assert ckpt.meta["kind"] == "finetune" and ckpt.meta["classes"] == CLASSES
    assert ckpt.meta["init"]["kind"] == "pretrain"
    state = ckpt.model_state()
    assert state["head.weight"].shape == (len(CLASSES), 48) and "fc_norm.weight" in state
    assert not any(k.startswith(("decoders", "encoder.", "norm.")) for k in state)
    assert len(val_lines(run)) == 6
    # The best validation top-1 is kept beside the last checkpoints, recorded, and usable.
    best_line = max(val_lines(run), key=lambda v: v["val_top1"])
    best = checkpoints.load(run / "checkpoints" / "best")
    assert best.meta["best"]["val_top1"] == best_line["val_top1"] == best.meta["val"]["val_top1"]
    assert best.meta["position"]["step"] == best_line["step"] and best_line["best"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["best"]["checkpoint"] == "checkpoints/best" and manifest["best"]["step"] == best_line["step"]
    assert len(list((run / "checkpoints").glob("step-*"))) == 2
    settings = json.loads((run / "settings.json").read_text())
    assert settings["optim"]["layer_decay"] == 0.75 and settings["mixup"]["prob"] == 0  # from ft-small

    # Held-out crops the run never saw: well above the 1-in-7 chance.
    results, path = run_evaluation(run, heldout, EvaluateSettings(data={"workers": 0}, train={"device": "cpu"}), Console(quiet=True))
    assert path.parent == run / "evaluations" and path.name.endswith("-classifier.json") and path.is_file()
    assert results["images"] == 70
    assert results["top1"] >= 40.0, results["top1"]
    assert results["top5"] >= results["top1"]
    assert {row["class"] for row in results["per_class"]} == set(CLASSES)
    assert sum(row["correct"] for row in results["per_class"]) == round(results["top1"] * 70 / 100)

    best_results, _ = run_evaluation(run / "checkpoints" / "best", heldout, EvaluateSettings(data={"workers": 0}, train={"device": "cpu"}),
                                     Console(quiet=True))
    assert best_results["images"] == 70 and best_results["checkpoint_kind"] == "finetune"

    # DATA = the training folder: scored on the images the run held out, not on what it trained on.
    again, again_path = run_evaluation(run, train, EvaluateSettings(data={"workers": 0}, train={"device": "cpu"}), Console(quiet=True))
    assert again_path != path and path.is_file() and again_path.is_file()   # a new file, nothing overwritten
    assert "held out" in again["evaluated_on"]
    assert again["images"] == val_lines(run)[-1]["val_images"]
    assert again["top1"] == pytest.approx(val_lines(run)[-1]["val_top1"], abs=1e-3)


def test_resume_continues_exactly(tmp_path_factory, tmp_path):
    train, _ = photo_sets(tmp_path_factory)
    init = tiny_pretrain_run(tmp_path_factory)
    common = ["finetune", train, "--init", init, "--preset", "ft-small", "--epochs", 2, "--batch-size", 16,
              "--workers", 0, "--device", "cpu", "--precision", "fp32", "--set", "train.eval_every=0"]
    whole = tmp_path / "whole"
    invoke(*common, "--out", whole)
    names = [p.name for p in checkpoints.list_checkpoints(whole / "checkpoints")]
    assert len(names) == 2

    # The same run "interrupted" after epoch 1: its last checkpoint gone, latest pointing at the first.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / names[1])
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"name": names[0]}))
    invoke("finetune", "--resume", "--out", cut)

    a, b = load_file(str(whole / "checkpoints" / names[1] / "model.safetensors")), checkpoints.load(cut).model_state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == \
           [json.loads(x)["step"] for x in (whole / "metrics.jsonl").read_text().splitlines()]


def test_head_warmup_trains_the_head_alone_then_everything_and_resumes_exactly(tmp_path_factory, tmp_path):
    """LP-FT: epoch 1 of 2 moves only fc_norm and the head; a run cut after it resumes to the same weights."""
    from localmim_cli.weights.sources import load_encoder_weights

    train, _ = photo_sets(tmp_path_factory)
    init = tiny_pretrain_run(tmp_path_factory)
    common = ["finetune", train, "--init", init, "--preset", "ft-small", "--epochs", 2, "--batch-size", 16,
              "--workers", 0, "--device", "cpu", "--precision", "fp32", "--set", "train.eval_every=0",
              "--set", "train.head_warmup_epochs=1", "--set", "train.init_probes=off"]
    whole = tmp_path / "whole"
    invoke(*common, "--out", whole)
    first, last = checkpoints.list_checkpoints(whole / "checkpoints")
    start = load_encoder_weights(init).encoder_state()
    after_probe, after_all = load_file(str(first / "model.safetensors")), load_file(str(last / "model.safetensors"))
    encoder = [k for k in after_probe if not k.startswith(("head.", "fc_norm."))]
    assert set(encoder) == set(start) and all(torch.equal(after_probe[k], start[k]) for k in encoder)
    assert not torch.equal(after_probe["head.weight"], after_all["head.weight"])
    assert not torch.equal(after_probe["blocks.0.attn.qkv.weight"], after_all["blocks.0.attn.qkv.weight"])

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / last.name)
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"name": first.name}))
    invoke("finetune", "--resume", "--out", cut)
    resumed = checkpoints.load(cut).model_state()
    assert all(torch.equal(after_all[k], resumed[k]) for k in after_all)


@pytest.mark.parametrize("fc_norm", [True, False], ids=["fc_norm", "no_fc_norm"])
def test_linear_probe_head_init_makes_the_model_the_probe(tmp_path_factory, fc_norm):
    """LP-FT's start: fc_norm and the head fitted on the classifier's own features score the
    validation images exactly as the probe did, far above a fresh head's chance. Without an
    fc_norm (as an encoder plugin's timm model may be) the classifier alone takes the probe."""
    from localmim_cli.config.schema import FinetuneSettings
    from localmim_cli.engine.distributed import World
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.classification.metric import validate
    from localmim_cli.tasks.classification.model import build_classifier, model_shape
    from localmim_cli.tasks.classification.probe_head import fit_probe_head
    from localmim_cli.tasks.features import labelled_split
    from localmim_cli.weights.sources import load_encoder_weights

    train, _ = photo_sets(tmp_path_factory)
    weights = load_encoder_weights(tiny_pretrain_run(tmp_path_factory))
    settings = FinetuneSettings(data={"workers": 0, "val_fraction": 0.3}, model={"head_init": "linear_probe"})
    split = labelled_split(train, None, 0.3, settings.train.seed)
    shape = model_shape(settings, weights)
    model = build_classifier(shape, len(split.classes), settings, weights)
    if not fc_norm:
        model.fc_norm = torch.nn.Identity()
    placement = Placement(World(), torch.device("cpu"), "fp32")
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    record = fit_probe_head(model, settings, split, shape.img_size, placement)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder_before.items())
    assert model.training   # left as it was found
    scored = validate(model, split.val, shape.img_size, settings, placement.device, "fp32", placement.world)
    assert scored["val_top1"] == pytest.approx(record["val_top1"], abs=1e-4)   # the same images right
    assert record["val_top1"] >= 50.0, record   # 7 classes: chance is 14%


# ------------------------------------------------------------------------------ published checkpoints


def test_published_checkpoint_initialises_finetuning(tmp_path_factory, tmp_path):
    from localmim_cli.weights.sources import load_encoder_weights
    from localmim_cli.tasks.classification.model import build_classifier, model_shape
    from localmim_cli.config.schema import FinetuneSettings

    pth = published_pth(tmp_path_factory)
    train, _ = photo_sets(tmp_path_factory)
    weights = load_encoder_weights(pth)
    assert weights.kind == "published"
    assert (weights.shape.embed_dim, weights.shape.depth, weights.shape.num_heads) == (48, 2, 6)
    assert weights.pooling == "norm_then_pool"          # norm.1 (the last tap, on the last layer) kept
    assert not any(k.startswith(("decoder", "hog_enc")) for k in weights.state)

    settings = FinetuneSettings()
    model = build_classifier(model_shape(settings, weights), 7, settings, weights)
    published = torch.load(pth, weights_only=False)["model"]
    ours = model.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "pos_embed"):
        assert torch.equal(ours[key], published[key]), key
    assert ours["head.weight"].abs().max() < 1e-4             # trunc-normal(2e-5) head
    assert torch.equal(ours["fc_norm.weight"], torch.ones(48))  # a new norm, not the tap norm

    run = tmp_path / "ft"
    invoke("finetune", train, "--init", pth, "--preset", "ft-small", "--epochs", 1, "--workers", 0,
           "--device", "cpu", "--out", run)
    meta = checkpoints.load(run).meta
    assert meta["init"]["kind"] == "published" and meta["init"]["source"] == str(pth)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_exit_2_with_a_message(tmp_path_factory, tmp_path, capsys):
    train, _ = photo_sets(tmp_path_factory)
    init = tiny_pretrain_run(tmp_path_factory)
    flat = tmp_path / "flat"                      # images, but no class subfolders
    flat.mkdir()
    for src in sorted((train / CLASSES[0]).iterdir())[:3]:
        shutil.copy(src, flat / src.name)
    holey = tmp_path / "holey"                    # one class folder holds no images
    shutil.copytree(train, holey)
    (holey / "zebra").mkdir()
    (holey / "zebra" / "notes.txt").write_text("no pictures here")
    out = tmp_path / "runs"

    # One in a fresh interpreter, as a user runs it: the process exit status itself.
    r = run_cli("finetune", flat, "--init", init, "--out", out / "a")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "flat" in r.stderr and "no class subfolders" in r.stderr

    # The rest through the same entry point in this process (no interpreter start-up each).
    cases = {
        "empty class": (["finetune", holey, "--init", init, "--out", out / "b"], ["zebra", "has no images"]),
        "arch": (["finetune", train, "--init", init, "--preset", "vit-b16-ft-1600ep", "--out", out / "c"],
                 ["vit_base_patch16_224", "width 48", "model.arch"]),
        "missing init": (["finetune", train, "--init", tmp_path / "nothing.pth", "--out", out / "d"],
                         ["nothing.pth", "no such checkpoint"]),
        "no head": (["evaluate", init, train, "--protocol", "classifier", "--out", out / "e.json"],
                    ["classifier", "knn"]),
        "head warmup": (["finetune", train, "--init", init, "--epochs", 3, "--set", "train.head_warmup_epochs=3",
                         "--out", out / "f"], ["train.head_warmup_epochs 3", "train.epochs 3"]),
    }
    for name, (args, phrases) in cases.items():
        code, err = run_main(capsys, *args)
        assert code == 2, f"{name}: {err}"
        assert "Traceback" not in err, f"{name}: {err}"
        for phrase in phrases:
            assert phrase in " ".join(err.split()), f"{name}: {phrase!r} not in {err}"
    assert not any((out / x).exists() for x in "abcdef")


# ------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name, arch, lr, min_lr, layer_decay, drop_path, epochs, warmup", [
    ("vit-b16-ft-1600ep", "vit_base_patch16_224", 2e-3, 1e-5, 0.65, 0.1, 100, 20),
    ("vit-b16-ft-100ep", "vit_base_patch16_224", 4e-3, 1e-6, 0.75, 0.1, 100, 20),
    ("vit-l16-ft", "vit_large_patch16_224", 3e-3, 1e-6, 0.75, 0.2, 50, 5),
])
def test_published_finetune_presets_hold_the_published_numbers(name, arch, lr, min_lr, layer_decay, drop_path,
                                                               epochs, warmup):
    """Method digest section 2.2: effective batch 1024 on 8 GPUs, the absolute lr at that batch."""
    from localmim_cli.config.layers import resolve
    from localmim_cli.config.presets import effective_batch, load_preset, scaled_lr
    from localmim_cli.config.schema import FinetuneSettings

    info, values = load_preset(name)
    assert info.kind == "finetune" and info.world_size == 8
    s = resolve(FinetuneSettings, preset=values, preset_name=name, environ={}).settings
    assert effective_batch(s, info.world_size) == 1024
    assert scaled_lr(s, info.world_size) == pytest.approx(lr)
    assert (s.model.arch, s.optim.min_lr, s.optim.layer_decay, s.model.drop_path) == (arch, min_lr, layer_decay,
                                                                                      drop_path)
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.betas, s.optim.weight_decay) == (epochs, warmup,
                                                                                          (0.9, 0.999), 0.05)
    assert (s.mixup.mixup, s.mixup.cutmix, s.mixup.switch_prob, s.optim.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (s.data.auto_augment, s.data.reprob, s.data.remode, s.model.head_init_std) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", 2e-5)
