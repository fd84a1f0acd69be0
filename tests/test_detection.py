"""`localmim finetune --task detection` through the real CLI: a short CPU fine-tune from a briefly
pretrained encoder learns to find and segment the objects, a resume is exact, validation AP is
what pycocotools' COCOeval gives for the same detections by hand, the ViTDet recipe plans on a
COCO-shaped folder, every data error is one line naming the file and annotation, and the
encoder exports in the layouts detectron2's and mmdetection's backbones load.

The scenes are real photos: objects cut from three sample photos pasted on two others, exact
masks (tests/detection_photos.py). The encoder is a tiny ViT (conftest TINY_TOML: 32 px, 8-px
patches, width 32, 4 blocks) pretrained for 14 steps on the sample photos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TOML, run_cli
from detection_photos import CATEGORIES, make_detection_set
from tiny_runs import invoke, run_main, shared

pytestmark = pytest.mark.usefixtures("one_thread")

CONFORMANCE = Path("/work/shared/conformance/vit_hog_reference_weights.safetensors")
# det-small at the tiny encoder's scale: 128 px crops, a neck of 32 channels, few proposals
SMALL = ["--preset", "det-small", "--set", "model.img_size=128", "--set", "model.neck_channels=32",
         "--set", "model.box_fc=64", "--set", "model.mask_convs=1", "--set", "model.roi_batch=64",
         "--set", "model.rpn_train_proposals=200", "--set", "data.scale_range=[0.5,1.5]",
         "--batch-size", "4", "--workers", "0", "--device", "cpu", "--set", "train.loggers=[]"]


def rows(run: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind", "train") == kind]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A pretrain run of the tiny ViT: 2 epochs (14 steps) on the built-in sample photos (the
    segmentation tests' encoder, built once per session)."""
    def build(root: Path) -> None:
        (root / "tiny.toml").write_text(TINY_TOML)
        torch.manual_seed(0)
        invoke("pretrain", "--config", root / "tiny.toml", "--out", root / "run")
    return shared(tmp_path_factory, "seg-encoder", build) / "run"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "det-scenes", lambda root: make_detection_set(root / "set", 40, 10, 128)) / "set"


@pytest.fixture(scope="module")
def learned(encoder, scenes, tmp_path_factory) -> Path:
    """A 100-step CPU fine-tune of the pretrained tiny ViT, validated every 50 steps."""
    run = tmp_path_factory.mktemp("det-run") / "run"
    r = run_cli("finetune", scenes, "--task", "detection", "--init", encoder, *SMALL, "--iterations", 100,
                "--set", "optim.warmup_steps=10", "--set", "optim.base_lr=0.064", "--set", "val.every=50",
                "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "encoder tensors loaded; new: encoder.blocks.*.attn.rel_pos_h" in r.stdout
    return run


def test_a_short_cpu_finetune_learns_to_find_the_objects(learned):
    validations = rows(learned, "val")
    assert [v["step"] for v in validations] == [50, 100]
    last = validations[-1]
    # 10 validation images, 3 categories: detections at random places score an AP50 near 0
    assert last["val_box_AP50"] > 10, last
    assert last["val_mask_AP"] is not None and last["val_mask_AP"] > 0
    manifest = json.loads((learned / "manifest.json").read_text())
    best = max(validations, key=lambda v: v["val_box_AP"])
    assert manifest["best"]["val_box_AP"] == best["val_box_AP"]
    lrs = [r["lr"] for r in rows(learned)]
    assert lrs[-1] < lrs[len(lrs) // 2] / 50           # two steps of 0.1 near the end
    assert json.loads((learned / "categories.json").read_text()) == CATEGORIES


def test_validation_ap_is_cocoeval_on_the_same_detections_by_hand(learned, scenes, tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from localmim_cli.engine.distributed import from_environment
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.detection.data import read_det_data
    from localmim_cli.tasks.detection.recipe import detector_from_checkpoint, predict_split

    model, settings, meta = detector_from_checkpoint(learned / "checkpoints" / "best")
    data = read_det_data(settings.data, True, meta["classes"])
    results = predict_split(model, data.val.images, meta["category_ids"], settings,
                            Placement(from_environment(), torch.device("cpu"), "fp32"))
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in CATEGORIES}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(scenes / "val" / "annotations.json"))
        by_hand = {}
        for iou_type in ("bbox", "segm"):
            # as detectron2's COCOEvaluator scores masks: the results without their boxes
            dt = (gt.loadRes(str(tmp_path / "results.json")) if iou_type == "bbox" else
                  gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results]))
            e = COCOeval(gt, dt, iou_type)
            e.evaluate(), e.accumulate(), e.summarize()
            by_hand[iou_type] = e.stats
    best = json.loads((learned / "manifest.json").read_text())["best"]
    for k, name in enumerate(("AP", "AP50", "AP75")):
        assert best[f"val_box_{name}"] == pytest.approx(100 * by_hand["bbox"][k], abs=1e-9)
        assert best[f"val_mask_{name}"] == pytest.approx(100 * by_hand["segm"][k], abs=1e-9)


def test_visualize_draws_the_detections_above_the_threshold_with_names_and_scores(learned, scenes, tmp_path, capsys):
    from PIL import Image
    from pycocotools import mask as mask_utils

    from localmim_cli.engine.distributed import from_environment
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.detection.data import read_det_data
    from localmim_cli.tasks.detection.recipe import detector_from_checkpoint, predict_split

    images = sorted((scenes / "val" / "images").iterdir())[:3]
    png = tmp_path / "det.png"
    r = run_cli("visualize", learned, *images, "--score-threshold", "0.1", "--out", png)
    assert r.returncode == 0, r.stdout + r.stderr
    sidecar = json.loads(png.with_suffix(".json").read_text())
    layout = sidecar["layout"]
    assert Image.open(png).size == (layout["width"], layout["height"])
    assert layout["panels"] == ["image", "detections", "legend"] and layout["rows"] == 3
    assert sidecar["masks"] is True and sidecar["score_threshold"] == 0.1

    # The detections drawn are validation's (the same model, the same test resize), those scoring >= 0.1.
    model, settings, meta = detector_from_checkpoint(learned)
    data = read_det_data(settings.data, True, meta["classes"])
    by_name = {image.path.name: image for image in data.val.images}
    results = predict_split(model, [by_name[p.name] for p in images], meta["category_ids"], settings,
                            Placement(from_environment(), torch.device("cpu"), "fp32"))
    names = {c["id"]: c["name"] for c in CATEGORIES}
    drawn = 0
    for path, item in zip(images, sidecar["images"]):
        expected = [r for r in results if r["image_id"] == by_name[path.name].image_id and r["score"] >= 0.1]
        assert len(item["detections"]) == len(expected), path
        for got, want in zip(item["detections"], expected):
            x, y, w, h = want["bbox"]
            assert got["category_id"] == want["category_id"] and got["name"] == names[want["category_id"]]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert got["box"] == pytest.approx([x, y, x + w, y + h], abs=1e-3)
            assert got["mask_pixels"] == int(mask_utils.area(want["segmentation"]))      # the mask AP's mask
        assert f"{path.name}: {len(expected)} detection(s)" in r.stdout
        drawn += len(expected)
    assert drawn > 0, "no detection above 0.1 to draw"

    # A higher threshold draws the best of them only; the default is 0.5.
    assert run_main(capsys, "visualize", learned, *images, "--score-threshold", "0.3", "--out", tmp_path / "hi.png")[0] == 0
    high = json.loads((tmp_path / "hi.json").read_text())
    for low_item, high_item in zip(sidecar["images"], high["images"]):
        assert high_item["detections"] == [d for d in low_item["detections"] if d["score"] >= 0.3]
    assert run_main(capsys, "visualize", learned, images[0], "--out", tmp_path / "default.png")[0] == 0
    assert json.loads((tmp_path / "default.json").read_text())["score_threshold"] == 0.5
    code, err = run_main(capsys, "visualize", learned, images[0], "--score-threshold", "1.5", "--out", tmp_path / "x.png")
    assert code == 2 and "--score-threshold 1.5: a detection's score lies between 0 and 1" in err
    code, err = run_main(capsys, "visualize", learned, images[0], "--seed", "3", "--out", tmp_path / "x.png")
    assert code == 2 and "--seed: not an option of a detection run's figure" in err


def test_resume_of_a_detection_run_is_exact(encoder, scenes, tmp_path):
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["finetune", scenes, "--task", "detection", "--init", encoder, *SMALL, "--iterations", 8,
            "--set", "optim.warmup_steps=2", "--set", "val.every=4", "--set", "train.checkpoint_every=4",
            "--set", "train.log_every=2", "--set", "train.keep_last=5"]
    invoke(*args, "--out", whole)
    names = sorted(p.name for p in (whole / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000008"]
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / names[1])
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"name": names[0]}))
    invoke(*args, "--out", cut, "--resume")

    a = load_file(str(whole / "checkpoints" / names[-1] / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / names[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("backbone.pyramid.encoder.blocks.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def same(records):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait")} for r in records]
    assert same(rows(cut)) == same(rows(whole)) and same(rows(cut, "val")) == same(rows(whole, "val"))
    meta = json.loads((whole / "checkpoints" / names[-1] / "meta.json").read_text())
    assert meta["kind"] == "detection" and meta["category_ids"] == [1, 17, 47]

    # The run's encoder in detectron2's ViTDet layout: its own relative position tables included.
    invoke("export", whole, "--format", "detectron2", "--out", tmp_path / "d2")
    state = torch.load(tmp_path / "d2" / "model_final.pth", weights_only=True)["model"]
    assert state["backbone.net.blocks.0.attn.rel_pos_h"].shape == (2 * 16 - 1, 16)   # global block: 16^2 grid
    assert torch.equal(state["backbone.net.blocks.3.mlp.fc2.weight"], a["backbone.pyramid.encoder.blocks.3.mlp.fc2.weight"])
    assert "backbone.net.cls_token" not in state and len(state) == 3 + 4 * 14


def test_dry_run_of_the_vitdet_recipe_on_a_coco_shaped_folder(tmp_path):
    coco = make_detection_set(tmp_path / "coco", 6, 2, 96, layout="coco")
    out = invoke("finetune", coco, "--preset", "det-vit-b-coco", "--dry-run", "--device", "cpu")
    assert "coco layout, 3 categories; training: 6 images" in out
    assert "instances_val2017.json" in out
    assert "ViT width 768, depth 12, 12 heads, patch 16, 1024 px crops, ViTDet simple pyramid" in out
    assert "Mask R-CNN, 110." in out                        # ViTDet's ViT-B Mask R-CNN: about 111 M
    assert "184375 steps (6 steps/epoch" in out
    assert "effective batch 1 per device x 1 accumulation x 1 device = 1" in out
    assert not (tmp_path / "runs").exists() and "would write to" in out
    shown = invoke("presets", "show", "det-vit-b-coco")
    assert "ViTDet paper" in shown and "publishes no detection recipe" in shown


def small_set(tmp_path: Path) -> tuple[Path, dict]:
    root = make_detection_set(tmp_path / "set", 3, 2, 64)
    return root, json.loads((root / "train" / "annotations.json").read_text())


def _edit(root: Path, data: dict, change) -> str:
    named = change(data)
    (root / "train" / "annotations.json").write_text(json.dumps(data))
    return named


def _missing_image(root, data):
    (root / "train" / "images" / data["images"][1]["file_name"]).unlink()
    return str(root / "train" / "images" / data["images"][1]["file_name"])


def _box_outside(root, data):
    data["annotations"][0]["bbox"] = [50.0, 10.0, 30.0, 10.0]
    return f"annotation id {data['annotations'][0]['id']}"


def _degenerate(root, data):
    data["annotations"][1]["bbox"] = [5.0, 5.0, 0.0, 10.0]
    return f"annotation id {data['annotations'][1]['id']}"


def _unknown_category(root, data):
    data["annotations"][2]["category_id"] = 99
    return f"annotation id {data['annotations'][2]['id']}"


def _bad_polygon(root, data):
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]
    return f"annotation id {data['annotations'][0]['id']}"


def _bad_rle(root, data):
    data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": [10, 20]}
    return f"annotation id {data['annotations'][0]['id']}"


@pytest.mark.parametrize("breaks, says", [
    (_missing_image, "no such image"), (_box_outside, "lies outside its image (64x64)"),
    (_degenerate, "is degenerate"), (_unknown_category, "unknown category_id 99"),
    (_bad_polygon, "malformed segmentation: a polygon has 5 coordinates"),
    (_bad_rle, "malformed segmentation: RLE run lengths do not add up")])
def test_each_data_error_is_one_line_naming_the_file_and_annotation(tmp_path, capsys, breaks, says):
    root, data = small_set(tmp_path)
    named = _edit(root, data, lambda d: breaks(root, d))
    code, err = run_main(capsys, "finetune", root, "--task", "detection", "--arch", "vit_tiny_patch16_224",
                         "--dry-run")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert named in lines[0] and says in lines[0], lines[0]
    if breaks in (_box_outside, _degenerate):
        assert str(root / "train" / "annotations.json") in lines[0] and "data.invalid=skip" in lines[0]


def test_invalid_boxes_can_be_left_out(tmp_path):
    from localmim_cli.config.detection import DetDataSettings
    from localmim_cli.tasks.detection.data import read_det_data

    root, data = small_set(tmp_path)
    _edit(root, data, lambda d: _box_outside(root, d))
    read = read_det_data(DetDataSettings(path=root, invalid="skip"), need_masks=True)
    assert read.train.skipped == 1 and "1 invalid annotations left out" in read.describe()


@pytest.mark.skipif(not CONFORMANCE.is_file(), reason="the conformance weights are not on this machine")
def test_a_published_vit_exports_in_the_layouts_detectron2_and_mmdet_load(tmp_path):
    from localmim_cli.weights.sources import load_encoder_weights

    weights = load_encoder_weights(CONFORMANCE)               # a published LocalMIM ViT-Ti/16
    # detectron2's ViT(embed_dim=192, depth=12, num_heads=3, pretrain_img_size=224) as its
    # __init__ defines the state dict (projects/ViTDet), less the relative position tables,
    # which a pretrained encoder has not (detectron2 starts them at zero)
    vitdet = {"patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
              "pos_embed": (1, 197, 192)}
    for i in range(12):
        vitdet.update({f"blocks.{i}.{k}": s for k, s in (
            ("norm1.weight", (192,)), ("norm1.bias", (192,)), ("attn.qkv.weight", (576, 192)),
            ("attn.qkv.bias", (576,)), ("attn.proj.weight", (192, 192)), ("attn.proj.bias", (192,)),
            ("norm2.weight", (192,)), ("norm2.bias", (192,)), ("mlp.fc1.weight", (768, 192)),
            ("mlp.fc1.bias", (768,)), ("mlp.fc2.weight", (192, 768)), ("mlp.fc2.bias", (192,)))})
    for fmt, file, key, prefix in (("detectron2", "model_final.pth", "model", "backbone.net."),
                                   ("mmdet", "backbone.pth", "model", "")):
        out = invoke("export", CONFORMANCE, "--format", fmt, "--out", tmp_path / fmt)
        assert "left to the framework's initialisation: 24 tensors" in out
        state = torch.load(tmp_path / fmt / file, weights_only=True)[key]
        assert {k: tuple(v.shape) for k, v in state.items()} == {prefix + k: s for k, s in vitdet.items()}
        assert torch.equal(state[prefix + "blocks.7.attn.qkv.weight"], weights.state["blocks.7.attn.qkv.weight"])
        config = json.loads((tmp_path / fmt / "config.json").read_text())["localmim"]
        assert config["backbone_settings"]["window_block_indexes"] == [0, 1, 3, 4, 6, 7, 9, 10]
    # an earlier export is replaced only with --overwrite
    code = run_cli("export", CONFORMANCE, "--format", "mmdet", "--out", tmp_path / "mmdet").returncode
    assert code == 2
    invoke("export", CONFORMANCE, "--format", "mmdet", "--out", tmp_path / "mmdet", "--overwrite")


def test_evaluate_reports_cocoeval_on_the_same_detections_by_hand(learned, scenes, tmp_path):
    """`localmim evaluate DET_RUN DATA`: box and mask AP of the run's best checkpoint on the
    validation split, equal to pycocotools run by hand on the same detections."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from localmim_cli.engine.distributed import from_environment
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.detection.data import read_det_data
    from localmim_cli.tasks.detection.recipe import detector_from_checkpoint, predict_split

    best = learned / "checkpoints" / "best"
    r = run_cli("evaluate", best, scenes, "--device", "cpu", "--workers", "0", "--out", tmp_path / "det.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "AP50" in r.stdout and "mask" in r.stdout
    reported = json.loads((tmp_path / "det.json").read_text())
    assert reported["protocol"] == "detection" and reported["images"] == 10

    model, settings, meta = detector_from_checkpoint(best)
    data = read_det_data(settings.data, True, meta["classes"])
    results = predict_split(model, data.val.images, meta["category_ids"], settings,
                            Placement(from_environment(), torch.device("cpu"), "fp32"))
    assert reported["detections"] == len(results) > 0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(scenes / "val" / "annotations.json"))
        for iou_type, key in (("bbox", "box"), ("segm", "mask")):
            dt = gt.loadRes([r if iou_type == "bbox" else {k: v for k, v in r.items() if k != "bbox"}
                             for r in results])
            e = COCOeval(gt, dt, iou_type)
            e.evaluate(), e.accumulate(), e.summarize()
            for k, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
                expected = None if e.stats[k] < 0 else 100 * e.stats[k]
                assert reported[key][name] == pytest.approx(expected, abs=1e-9), (key, name)


def test_evaluating_a_detector_on_a_folder_that_is_not_coco_is_one_line(learned, tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    code, err = run_main(capsys, "evaluate", learned, tmp_path, "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "annotations.json" in err


def test_evaluate_reads_only_the_validation_split_it_scores(learned, scenes, tmp_path, capsys):
    """With a validation split in DATA, the training annotations are neither read nor checked:
    a broken training file and missing training images change nothing; the validation split's
    categories must be those the model was trained on."""
    data = tmp_path / "data"
    shutil.copytree(scenes / "val", data / "val")
    (data / "train").mkdir()
    (data / "train" / "annotations.json").write_text("{not json")          # and no training images
    code, err = run_main(capsys, "evaluate", learned / "checkpoints" / "best", data, "--device", "cpu",
                         "--workers", "0", "--out", tmp_path / "det.json")
    assert code == 0, err
    reported = json.loads((tmp_path / "det.json").read_text())
    best = json.loads((learned / "manifest.json").read_text())["best"]
    assert reported["images"] == 10 and reported["box"]["AP"] == pytest.approx(best["val_box_AP"], abs=1e-9)

    val = json.loads((data / "val" / "annotations.json").read_text())
    val["categories"][1]["name"] = "dog"
    (data / "val" / "annotations.json").write_text(json.dumps(val))
    code, err = run_main(capsys, "evaluate", learned, data, "--device", "cpu", "--workers", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(data / "val" / "annotations.json") in err and "its categories differ from those" in err
