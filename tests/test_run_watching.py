"""Watching a pretraining run: the loggers get every metrics record and the progress figures, the
k-NN monitor scores the frozen encoder on a labelled folder, the curves are drawn at the end,
and none of it changes what the run learns (an interrupted and resumed run with the monitor on
ends with the same weights, bit for bit, as an uninterrupted run without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import localmim_cli as lm
from conftest import TINY_TOML, run_cli
from localmim_cli.engine import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_TAGS = {"loss", "loss_scale0", "loss_scale1", "loss_scale2", "loss_scale3", "lr", "grad_norm",
              "images_per_s", "data_wait"}


def labelled_crops(root: Path, photos: dict[str, Path], per_class: int, side: int = 48) -> Path:
    """One class per photo, each image a different square crop of it (a fixed grid of offsets)."""
    for name, src in photos.items():
        folder = root / name
        folder.mkdir(parents=True)
        with Image.open(src) as img:
            img = img.convert("RGB")
            size = min(img.size) // 2
            for i in range(per_class):
                left = (img.width - size) * (i % 3) // 2
                top = (img.height - size) * (i // 3 % 3) // 2
                img.crop((left, top, left + size, top + size)).resize((side, side)).save(folder / f"{i}.png")
    return root


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photo_folder):
    """A run with TensorBoard, MLflow, the monitor and progress figures, stopped after one epoch
    and resumed to two; and the same recipe run straight through with none of them."""
    from localmim_cli.data.sample_photos import sample_photo_paths

    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("watching")
    photos = {p.stem: p for p in sample_photo_paths() if p.stem in ("astronaut", "coffee")}
    crops = labelled_crops(root / "crops", photos, per_class=6)
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    watched = {"train__loggers": ["tensorboard", "mlflow"], "train__monitor__path": str(crops),
               "train__monitor__k": 3, "train__visualize_every": 1}
    out = root / "watched"
    lm.pretrain(photo_folder, config=config, out=out, quiet=True, train__epochs=1, **watched)
    first = metrics(out)
    lm.pretrain(config=None, out=out, resume=True, quiet=True, train__epochs=2)
    straight = lm.pretrain(photo_folder, config=config, out=root / "straight", quiet=True, train__loggers=[])
    return out, first, straight


def test_tensorboard_holds_every_metric_and_the_figures_and_a_resume_continues_the_steps(runs):
    out, first, _ = runs
    train = [r for r in metrics(out) if "kind" not in r]
    acc = tensorboard(out)
    assert TRAIN_TAGS | {"monitor/knn_top1", "monitor/random_init_top1"} <= set(acc.Tags()["scalars"])
    # one point per logged step, the resumed run's continuing the first's: no gap, no repeat
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert max(r["step"] for r in first) < steps[-1]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in train])
    # a reconstruction figure per epoch, at that epoch's last step
    end_of_epoch = [r["step"] for r in train if r["step"] % (len(train) // 2) == 0]
    assert acc.Tags()["images"] == ["reconstruction"]
    assert [e.step for e in acc.Images("reconstruction")] == end_of_epoch


def test_mlflow_keeps_one_run_across_the_resume(runs):
    import mlflow

    out, _, _ = runs
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = (out / "mlflow_run_id").read_text()
    experiment = client.get_experiment_by_name("localmim")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    train = [r for r in metrics(out) if "kind" not in r]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [r["step"] for r in train]
    assert client.get_run(run_id).data.params["train.batch_size"] == "4"
    assert len(client.get_metric_history(run_id, "monitor.knn_top1")) == 2


def test_monitor_records_the_floor_once_and_a_score_per_epoch(runs):
    out, _, _ = runs
    watched = [r for r in metrics(out) if r.get("kind") == "monitor"]
    floor, scores = watched[0], watched[1:]
    assert floor["step"] == 0 and 0 <= floor["random_init_top1"] <= 100
    assert [r["epoch"] for r in scores] == [0, 1] and all("random_init_top1" not in r for r in scores)
    assert all(0 <= r["knn_top1"] <= 100 for r in scores)
    shown = json.loads(run_cli("runs", "show", out).stdout)
    best = max(scores, key=lambda r: r["knn_top1"])
    assert (shown["best_top1"], shown["best_at_step"]) == (pytest.approx(best["knn_top1"]), best["step"])
    assert shown["floor_top1"] == pytest.approx(floor["random_init_top1"])
    listed = " ".join(run_cli("runs", "list", out.parent).stdout.split())
    assert f"{best['knn_top1']:.1f} (floor {floor['random_init_top1']:.1f})" in listed


def test_the_run_ends_with_its_curves_drawn(runs):
    out, _, straight = runs
    for run in (out, straight):
        with Image.open(run / "figures" / "curves.png") as img:
            assert img.format == "PNG" and img.width > 600


def test_monitor_and_loggers_leave_training_exact_across_a_resume(runs):
    out, _, straight = runs
    a, b = checkpoints.load(straight).model_state(), checkpoints.load(out).model_state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_monitor_sees_the_encoder_learn(tmp_path_factory, tmp_path):
    """The recipe test_evaluate shows k-NN gains with (small crops of the sample photos, where
    colour alone separates little; pixel targets; a 2-block ViT), run by `pretrain` itself: 420
    steps lift the monitor's score above its own random-init floor. (Tiny HOG runs of a few dozen
    steps score below their floor: features first collapse towards one direction.)"""
    from test_evaluate import SHORT_PRETRAIN, small_crops

    crops = small_crops(tmp_path_factory)
    settings = {**SHORT_PRETRAIN, "data": {"workers": 0, "repeats": 12, "crop_scale": [0.5, 1.0]},
                "train": {**SHORT_PRETRAIN["train"], "epochs": 4, "log_every": 1000, "device": "cpu",
                          "precision": "fp32", "loggers": [],
                          "monitor": {"path": str(crops), "every": 2, "k": 10, "val_fraction": 0.5}}}
    out = lm.pretrain(crops, out=tmp_path / "run", settings=settings, quiet=True)
    watched = [r for r in metrics(out) if r.get("kind") == "monitor"]
    assert [r["step"] for r in watched] == [0, 210, 420]
    floor, last = watched[0]["random_init_top1"], watched[-1]["knn_top1"]
    assert last >= floor + 3.0, (floor, last)
