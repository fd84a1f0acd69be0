"""`localmim finetune --task segmentation` through the real CLI: a short CPU fine-tune from a
briefly pretrained encoder learns, a resume is exact, the published recipe plans on an
ADE20K-shaped folder, every data error is one line naming the file, and a published LocalMIM
ViT checkpoint starts a run with all its encoder weights.

The scenes are real photos: shapes cut from three sample photos pasted on two others
(tests/segmentation_photos.py), in both layouts. The encoder is a tiny ViT (conftest TINY_TOML:
32 px, 8-px patches, width 32, 4 blocks) pretrained for 14 steps on the sample photos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_TOML, run_cli
from localmim_cli.errors import UsageError
from segmentation_photos import CLASSES, make_ade20k_set, make_pairs_set
from tiny_runs import invoke, run_main, shared

pytestmark = pytest.mark.usefixtures("one_thread")

CONFORMANCE = Path("/work/shared/conformance/vit_hog_reference_weights.safetensors")
# seg-small at the tiny encoder's scale: 64 px crops of scenes resized to 128 x 64, UperNet of 64
SMALL = ["--preset", "seg-small", "--set", "model.img_size=64", "--set", "data.scale=[128,64]",
         "--set", "model.decoder_channels=64", "--set", "model.aux_channels=32", "--set", "val.stride=43",
         "--batch-size", "4", "--workers", "0", "--device", "cpu", "--set", "train.loggers=[]"]


def rows(run: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind", "train") == kind]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A pretrain run of the tiny ViT: 2 epochs (14 steps) on the built-in sample photos."""
    def build(root: Path) -> None:
        (root / "tiny.toml").write_text(TINY_TOML)
        torch.manual_seed(0)
        invoke("pretrain", "--config", root / "tiny.toml", "--out", root / "run")
    return shared(tmp_path_factory, "seg-encoder", build) / "run"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "seg-pairs", lambda root: make_pairs_set(root / "set", 40, 96)) / "set"


@pytest.fixture(scope="module")
def ade_scenes(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "seg-ade", lambda root: make_ade20k_set(root / "set", 16, 4, 96)) / "set"


@pytest.fixture(scope="module")
def learned(encoder, scenes, tmp_path_factory) -> tuple[Path, str]:
    """(a 100-step CPU fine-tune of the pretrained tiny ViT validated every 25 steps, its stdout)."""
    run = tmp_path_factory.mktemp("seg-run") / "seg"
    r = run_cli("finetune", scenes, "--task", "segmentation", "--init", encoder, *SMALL, "--iterations", 100,
                "--set", "optim.warmup_steps=10", "--set", "val.every=25", "--set", "data.val_fraction=0.2",
                "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    return run, r.stdout


def test_a_short_cpu_finetune_learns_well_above_the_majority_class(learned, scenes):
    from localmim_cli.tasks.segmentation.metric import confusion, scores

    run, stdout = learned
    assert "init " in stdout and "encoder tensors loaded; new: aux_head.*, decode_head.*" in stdout

    # The baseline: the most frequent training class everywhere, scored on the run's validation images.
    manifest = json.loads((run / "manifest.json").read_text())
    pixels = manifest["data"]["class_pixels"]
    majority = int(np.argmax(pixels))
    val = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert val["classes"] == CLASSES
    from localmim_cli.config.segmentation import SegDataSettings
    from localmim_cli.tasks.segmentation.data import read_mask, read_seg_data
    data = read_seg_data(SegDataSettings(path=scenes, val_fraction=0.2), seed=0)
    matrix = sum(confusion(torch.full_like(m, majority), m, len(CLASSES))
                 for m in (torch.from_numpy(read_mask(p.mask, False).astype(np.int64)) for p in data.val))
    baseline = scores(matrix, CLASSES)["mIoU"]

    validations = rows(run, "val")
    assert [v["step"] for v in validations] == [25, 50, 75, 100]
    best = max(v["val_mIoU"] for v in validations)
    assert 10 < baseline < 25
    assert best > 2 * baseline, (best, baseline)
    assert val["best"]["val_mIoU"] == best == manifest["best"]["val_mIoU"]
    assert rows(run)[-1]["step"] == 100 and rows(run)[-1]["lr"] < rows(run)[1]["lr"]   # poly decay
    assert json.loads((run / "classes.json").read_text()) == CLASSES


def panel_pixels(png: Path, layout: dict, row: int, column: int) -> np.ndarray:
    """One panel of a figure, cut from the PNG where the sidecar's layout puts it."""
    side, pad = layout["panel_px"], layout["pad"]
    x = pad + column * (side + pad)
    y = layout["header_px"] + pad + row * layout["row_px"] + layout["title_px"]
    return np.asarray(Image.open(png).convert("RGB"))[y:y + side, x:x + side]


def test_visualize_draws_prediction_ground_truth_and_a_legend_of_the_classes_present(learned, scenes, tmp_path):
    from localmim_cli.config.segmentation import SegDataSettings
    from localmim_cli.data.sample_photos import sample_photo_paths
    from localmim_cli.tasks.segmentation.data import SegEvalSamples, read_mask, read_seg_data
    from localmim_cli.tasks.segmentation.inference import infer, predict_labels
    from localmim_cli.tasks.segmentation.recipe import segmenter_from_checkpoint

    run, _ = learned
    val = read_seg_data(SegDataSettings(path=scenes, val_fraction=0.2), seed=0).val[:2]
    no_mask = sample_photo_paths()[0]                     # a photo outside any layout: no ground truth
    png = tmp_path / "seg.png"
    r = run_cli("visualize", run, *(p.image for p in val), no_mask, "--out", png)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{val[0].image.name}: predicted " in r.stdout and "no mask found" in r.stdout
    sidecar = json.loads(png.with_suffix(".json").read_text())
    layout = sidecar["layout"]
    assert Image.open(png).size == (layout["width"], layout["height"])
    assert layout["panels"] == ["image", "prediction", "ground truth", "legend"]
    assert (layout["columns"], layout["rows"]) == (4, 3) and sidecar["classes"] == CLASSES

    # What it predicts is what validation predicts: the run's slide inference, at the image's size.
    model, settings, _ = segmenter_from_checkpoint(run)
    samples = SegEvalSamples(val, tuple(settings.data.scale), False)
    for row, (pair, item) in enumerate(zip(val, sidecar["images"])):
        image, mask = samples[row]
        logits = infer(model.predict, image[None], len(CLASSES), settings.val.mode, settings.model.img_size,
                       settings.val.stride)
        predicted = np.bincount(predict_labels(logits, tuple(mask.shape)).ravel().numpy(), minlength=len(CLASSES))
        truth = np.bincount(read_mask(pair.mask, False).ravel(), minlength=len(CLASSES))
        present = {k for k in range(len(CLASSES)) if predicted[k] or truth[k]}
        assert item["mask"] == str(pair.mask)
        assert {c["name"] for c in item["classes"]} == {CLASSES[k] for k in present}     # the legend's names
        for c in item["classes"]:
            assert (c["predicted_pixels"], c["truth_pixels"]) == (predicted[c["index"]], truth[c["index"]])
        legend = panel_pixels(png, layout, row, 3).reshape(-1, 3)
        for c in item["classes"][:item["legend_shown"]]:                       # each swatch is drawn
            assert (legend == c["colour"]).all(axis=1).any(), c
    assert sidecar["images"][2]["mask"] is None and "truth_pixels" not in sidecar["images"][2]["classes"][0]
    assert (panel_pixels(png, layout, 2, 2) == 255).all()                       # no ground truth: blank


def test_visualize_replaces_only_its_own_figure_and_only_when_asked(learned, scenes, tmp_path, capsys):
    run, _ = learned
    image = scenes / "images" / "scene_0000.png"
    fig = tmp_path / "fig.png"
    assert run_main(capsys, "visualize", run, image, "--out", fig)[0] == 0
    code, err = run_main(capsys, "visualize", run, image, "--out", fig)
    assert code == 2 and "exists (an earlier figure written by `localmim visualize`); pass --overwrite" in err
    assert run_main(capsys, "visualize", run, image, "--out", fig, "--overwrite")[0] == 0
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"not a figure")
    code, err = run_main(capsys, "visualize", run, "--out", mine)
    assert code == 2 and "exists and is not a figure written by `localmim visualize`" in err
    assert mine.read_bytes() == b"not a figure"
    code, err = run_main(capsys, "visualize", run, "--out", run / "checkpoints" / "fig.png")
    assert code == 2 and "nothing is ever written inside checkpoints" in err
    code, err = run_main(capsys, "visualize", run, "--score-threshold", "0.3", "--out", tmp_path / "a.png")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--score-threshold: not an option of a segmentation run's figure" in err
    assert not (tmp_path / "a.png").exists()


def test_resume_of_a_segmentation_run_is_exact(encoder, ade_scenes, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["finetune", ade_scenes, "--init", encoder, *SMALL, "--iterations", 12,
            "--set", "optim.warmup_steps=3", "--set", "val.every=6", "--set", "train.checkpoint_every=4",
            "--set", "train.log_every=2", "--set", "train.keep_last=5"]
    invoke(*args, "--out", whole)
    names = sorted(p.name for p in (whole / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000008", "step-00000012"]
    shutil.copytree(whole, cut)
    for name in names[1:]:
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"name": names[0]}))
    invoke(*args, "--out", cut, "--resume")

    a = load_file(str(whole / "checkpoints" / names[-1] / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / names[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("pyramid.encoder.blocks.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def same(records):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait")} for r in records]
    assert same(rows(cut)) == same(rows(whole))
    assert same(rows(cut, "val")) == same(rows(whole, "val"))
    meta = json.loads((whole / "checkpoints" / names[-1] / "meta.json").read_text())
    assert meta["kind"] == "segmentation" and meta["classes"] == CLASSES
    assert meta["segmenter"]["reduce_zero_label"] is True          # the ADE20K layout: 0 is "other"

    # The best checkpoint rebuilds for inference, and scores its own validation images as the run did.
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.distributed import from_environment
    from localmim_cli.tasks.segmentation.data import read_seg_data
    from localmim_cli.tasks.segmentation.metric import scores
    from localmim_cli.tasks.segmentation.recipe import segmenter_from_checkpoint, validation_confusion

    model, settings, classes = segmenter_from_checkpoint(whole / "checkpoints" / "best")
    data = read_seg_data(settings.data, settings.train.seed, classes)
    matrix = validation_confusion(model, data, settings, Placement(from_environment(), torch.device("cpu"), "fp32"))
    best = json.loads((whole / "manifest.json").read_text())["best"]
    assert scores(matrix, classes)["mIoU"] == pytest.approx(best["val_mIoU"], abs=1e-9)


def test_dry_run_of_the_published_recipe_on_an_ade20k_shaped_folder(tmp_path):
    ade = make_ade20k_set(tmp_path / "ADEChallengeData2016", 6, 2, 96, ade_ids=(3, 13, 127, 143))
    out = invoke("finetune", ade, "--preset", "seg-vit-b-ade20k", "--dry-run", "--device", "cpu")
    assert "ade20k layout, 150 classes; 6 training and 2 validation images" in out
    assert "model: ViT width 768, depth 12, 12 heads, patch 16" in out and "512 px crops" in out
    assert "160000 steps (3 steps/epoch" in out
    assert "effective batch 2 per device x 1 accumulation x 1 device = 2" in out
    assert not (tmp_path / "runs").exists() and "would write to" in out


def pairs(tmp_path: Path) -> Path:
    return make_pairs_set(tmp_path / "set", 4, 48)


def _missing_mask(root: Path) -> Path:
    (root / "masks" / "scene_0002.png").unlink()
    return root / "images" / "scene_0002.png"


def _size_mismatch(root: Path) -> Path:
    Image.new("L", (40, 48)).save(root / "masks" / "scene_0001.png")
    return root / "masks" / "scene_0001.png"


def _label_outside(root: Path) -> Path:
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[5, 5] = 7
    Image.fromarray(mask, mode="L").save(root / "masks" / "scene_0003.png")
    return root / "masks" / "scene_0003.png"


def _empty_split(root: Path) -> Path:
    for p in (root / "images").iterdir():
        p.unlink()
    return root / "images"


def _colour_mask(root: Path) -> Path:
    Image.new("RGB", (48, 48)).save(root / "masks" / "scene_0000.png")
    return root / "masks" / "scene_0000.png"


@pytest.mark.parametrize("breaks, says", [(_missing_mask, "no mask"), (_size_mismatch, "a mask must have its image's size"),
                                          (_label_outside, "label 7 is outside the 4 classes"),
                                          (_empty_split, "empty split"), (_colour_mask, "a RGB image")])
def test_each_data_error_is_one_line_naming_the_file(tmp_path, capsys, breaks, says):
    root = pairs(tmp_path)
    named = breaks(root)
    code, err = run_main(capsys, "finetune", root, "--task", "segmentation", "--arch", "vit_tiny_patch16_224",
                         "--dry-run")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(named) in lines[0] and says in lines[0], lines[0]


def test_an_empty_ade20k_validation_split_is_named(tmp_path, capsys):
    ade = make_ade20k_set(tmp_path / "ade", 2, 1, 48)
    for p in (ade / "images" / "validation").iterdir():
        p.unlink()
    code, err = run_main(capsys, "finetune", ade, "--task", "segmentation", "--arch", "vit_tiny_patch16_224",
                         "--dry-run")
    assert code == 2 and f"{ade / 'images' / 'validation'}: empty split" in err


@pytest.mark.skipif(not CONFORMANCE.is_file(), reason="the conformance weights are not on this machine")
def test_a_published_localmim_vit_starts_a_run_with_every_encoder_weight(scenes, tmp_path):
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.segmentation import SegmentationSettings
    from localmim_cli.model.feature_pyramid import pyramid_spec, resize_positions
    from localmim_cli.tasks.segmentation.recipe import build_segmenter
    from localmim_cli.weights.sources import load_encoder_weights

    weights = load_encoder_weights(CONFORMANCE)
    assert weights.kind == "published" and weights.shape.patch_size == 16
    settings = resolve_settings(SegmentationSettings, "seg-small", sets=["model.img_size=64", "val.stride=43"], environ={}).settings
    model = build_segmenter(settings, len(CLASSES), pyramid_spec(weights, 64), weights)
    ours = model.state_dict()
    encoder = weights.encoder_state()
    for key, value in encoder.items():       # every one of the published encoder's tensors, in place
        if key == "pos_embed":
            assert torch.equal(ours["pyramid.encoder.pos_embed"], resize_positions(value, 14, 4))
        elif key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            assert torch.equal(ours[f"pyramid.encoder.{key[:-len('qkv.bias')]}q_bias"], q)
            assert torch.equal(ours[f"pyramid.encoder.{key[:-len('qkv.bias')]}v_bias"], v)
        else:
            assert torch.equal(ours[f"pyramid.encoder.{key}"], value), key
    assert len(model.init_report.loaded) == len(encoder) + weights.shape.depth

    out = invoke("finetune", scenes, "--init", CONFORMANCE, *SMALL, "--iterations", 2,
                 "--set", "val.every=0", "--set", "data.val_fraction=0.1", "--out", tmp_path / "run")
    line = next(line for line in out.splitlines() if line.startswith("init "))
    assert f"{len(encoder) + weights.shape.depth} encoder tensors loaded" in line
    assert ("new: aux_head.*, decode_head.*, encoder.blocks.*.attn.relative_position_bias_table, "
            "encoder.blocks.*.gamma_1, encoder.blocks.*.gamma_2, levels.* (pyramid)") in line
    assert "positions resampled 14^2 -> 4^2" in line


def test_the_python_api_takes_the_task(encoder, scenes, tmp_path):
    import localmim_cli as lm

    small = {"model.img_size": 64, "data.scale": [128, 64], "model.decoder_channels": 16, "model.aux_channels": 8,
             "val.stride": 43, "val.every": 0, "train.batch_size": 4, "data.workers": 0, "train.device": "cpu",
             "train.loggers": []}
    run = lm.finetune(scenes, init=encoder, task="segmentation", preset="seg-small", out=tmp_path / "api",
                      settings=small, train__iterations=2, quiet=True)
    assert json.loads((run / "settings.json").read_text())["task"] == "segmentation"
    assert [r["step"] for r in rows(run, "val")] == [2]
    with pytest.raises(UsageError, match="--preset ft-small is for 'classification'"):
        lm.finetune(scenes, init=encoder, task="segmentation", preset="ft-small", out=tmp_path / "no")


def test_a_swin_encoder_segments_through_its_four_stages(scenes, tmp_path):
    swin = ["--set", "model.encoder.options.embed_dim=16", "--set", "model.encoder.options.num_heads=[1,1,2,2]",
            "--set", "model.decoder.width=[16,16,16,16]", "--set", "model.decoder.num_heads=2",
            "--set", "train.batch_size=8", "--set", "data.workers=0", "--set", "train.epochs=1",
            "--set", "optim.warmup_epochs=1", "--set", "train.visualize_every=0", "--set", "train.loggers=[]",
            "--device", "cpu", "--precision", "fp32"]
    invoke("pretrain", "--preset", "swin-demo", *swin, "--out", tmp_path / "swin")
    out = invoke("finetune", scenes, "--task", "segmentation", "--init", tmp_path / "swin", *SMALL, "--iterations", 2,
                 "--set", "val.every=0", "--set", "model.decoder_channels=16", "--out", tmp_path / "seg")
    assert "swin_tiny_patch4_window7_224 stages, 64 px crops" in out
    line = next(line for line in out.splitlines() if line.startswith("init "))
    assert "new: aux_head.*, decode_head.*, norms.* (a LayerNorm per stage)" in line
    state = load_file(str(tmp_path / "seg" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert [tuple(state[f"pyramid.norms.{k}.weight"].shape) for k in range(4)] == [(16,), (32,), (64,), (128,)]
    assert rows(tmp_path / "seg", "val")[0]["step"] == 2


def test_an_exported_encoder_inits_a_segmenter_as_its_pretrain_run_does(encoder, tmp_path):
    from localmim_cli.config.segmentation import SegmentationSettings
    from localmim_cli.model.feature_pyramid import pyramid_spec
    from localmim_cli.tasks.segmentation.recipe import build_segmenter
    from localmim_cli.weights.sources import load_encoder_weights

    invoke("export", encoder, "--out", tmp_path / "exported")
    settings = SegmentationSettings.model_validate({"model": {"img_size": 64, "decoder_channels": 16,
                                                              "aux_channels": 8}, "val": {"stride": 43}})
    for source in (tmp_path / "exported", encoder):
        weights = load_encoder_weights(source)
        model = build_segmenter(settings, 3, pyramid_spec(weights, 64), weights)
        assert len(model.init_report.loaded) == len(weights.encoder_state()) + weights.shape.depth
        state = model.state_dict()
        assert torch.equal(state["pyramid.encoder.blocks.3.mlp.fc2.weight"], weights.state["blocks.3.mlp.fc2.weight"])


def test_class_names_from_classes_json_or_from_the_masks(tmp_path, capsys):
    from localmim_cli.config.segmentation import SegDataSettings
    from localmim_cli.tasks.segmentation.data import read_seg_data

    root = make_pairs_set(tmp_path / "set", 4, 48)
    (root / "classes.txt").unlink()
    unnamed = read_seg_data(SegDataSettings(path=root, val_fraction=0.25), seed=0)
    assert unnamed.classes[0] == "class_0" and len(unnamed.classes) <= len(CLASSES)
    (root / "classes.json").write_text(json.dumps(CLASSES + ["unused"]))
    named = read_seg_data(SegDataSettings(path=root, val_fraction=0.25), seed=0)
    assert named.classes == CLASSES + ["unused"] and len(named.train) == 3 and len(named.val) == 1
    assert sum(named.class_pixels) == 3 * 48 * 48 and named.class_pixels[-1] == 0
    (root / "classes.json").write_text('{"0": "background"}')
    code, err = run_main(capsys, "finetune", root, "--task", "segmentation", "--arch", "vit_tiny_patch16_224",
                         "--dry-run")
    assert code == 2 and f"{root / 'classes.json'}: expected a list of class names" in err


@pytest.fixture(scope="module")
def seg_run(encoder, scenes, tmp_path_factory) -> Path:
    """A 20-step fine-tune of the pretrained tiny ViT, validated (slide) at its last step."""
    run = tmp_path_factory.mktemp("seg-run") / "run"
    r = run_cli("finetune", scenes, "--task", "segmentation", "--init", encoder, *SMALL, "--iterations", 20,
                "--set", "optim.warmup_steps=5", "--set", "data.val_fraction=0.2", "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    return run


def test_evaluate_of_a_segmentation_run_scores_its_validation_as_the_run_did(seg_run, scenes, tmp_path):
    r = run_cli("evaluate", seg_run, scenes, "--device", "cpu", "--workers", "0", "--out", tmp_path / "slide.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "slide inference (window 64, stride 43)" in r.stdout and "per class" in r.stdout
    slide = json.loads((tmp_path / "slide.json").read_text())
    val = rows(seg_run, "val")[-1]
    assert slide["protocol"] == "segmentation" and slide["images"] == val["val_images"] == 8
    assert (slide["mIoU"], slide["mAcc"], slide["aAcc"]) == (val["val_mIoU"], val["val_mAcc"], val["val_aAcc"])
    assert {k: v["IoU"] for k, v in slide["per_class"].items()} == val["val_IoU"]
    assert list(slide["per_class"]) == CLASSES

    # whole-image inference is a flag away; the scenes resize to 64 x 64, one window, so both agree
    r = run_cli("evaluate", seg_run, scenes, "--device", "cpu", "--workers", "0", "--mode", "whole")
    assert r.returncode == 0, r.stdout + r.stderr
    whole = json.loads(Path(r.stdout.split("results: ")[-1].strip()).read_text())
    assert whole["mode"] == "whole" and whole["stride"] is None and whole["mIoU"] == slide["mIoU"]


def test_evaluating_a_segmenter_on_a_classification_folder_is_one_line(seg_run, tmp_path, capsys):
    (tmp_path / "cat").mkdir()
    code, err = run_main(capsys, "evaluate", seg_run, tmp_path, "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "ADE20K layout" in err and "pairs layout" in err


def test_the_python_api_evaluates_a_segmentation_run(seg_run, scenes, tmp_path):
    import localmim_cli as lm

    results = lm.evaluate(seg_run, scenes, train__device="cpu", data__workers=0, out=tmp_path / "api.json", quiet=True)
    assert results["protocol"] == "segmentation"
    assert results["mIoU"] == rows(seg_run, "val")[-1]["val_mIoU"]
    assert json.loads(Path(results["written_to"]).read_text())["mIoU"] == results["mIoU"]


def test_seg_linear_on_a_pretrained_encoder_beats_a_random_one(scenes, tmp_path):
    """The dense probe tells a pretrained encoder from a random-init one: the tiny ViT pretrained
    120 steps on the scenes' own photos, against the same ViT after steps of lr 1e-12 (its
    initialisation), the probe at the pretraining size (4 x 4 patch features)."""
    common = ["--config", tmp_path / "tiny.toml", "--set", "data.repeats=1"]
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    torch.manual_seed(0)
    invoke("pretrain", scenes / "images", *common, "--set", "train.epochs=12", "--set", "optim.base_lr=0.1",
           "--out", tmp_path / "pretrained")
    invoke("pretrain", scenes / "images", *common, "--set", "train.epochs=1", "--set", "optim.base_lr=1e-12",
           "--out", tmp_path / "random")
    miou = {}
    for name in ("pretrained", "random"):
        r = run_cli("evaluate", tmp_path / name, scenes, "--protocol", "seg-linear", "--img-size", 32,
                    "--device", "cpu", "--workers", "0", "--out", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stdout + r.stderr
        results = json.loads((tmp_path / f"{name}.json").read_text())
        assert results["feature_grid"] == [4, 4] and results["features"]["cache_hits"] == 0
        miou[name] = results["mIoU"]
    assert miou["pretrained"] > miou["random"] + 2, miou
    again = run_cli("evaluate", tmp_path / "random", scenes, "--protocol", "seg-linear", "--img-size", 32,
                    "--device", "cpu", "--workers", "0", "--out", tmp_path / "again.json")
    assert again.returncode == 0
    cached = json.loads((tmp_path / "again.json").read_text())
    assert cached["features"]["cache_hits"] == 2 and cached["mIoU"] == miou["random"]
