"""`ft-small` on small real labelled sets: fine-tuning beats the k-NN and the linear probe of the
same pretrained encoder on the same split, and the run says so itself. Its head starts from a
linear probe (LP-FT), and the best checkpoint is a fine-tuned model that improves on that start.

Sets: Fashion-MNIST (Debian's dataset-fashion-mnist; 10 classes x 100 training / 50 validation
images, 32 px) and small crops of the built-in sample photos (7 classes x 40 / 20, 32 px). Each
encoder is a real `localmim pretrain` run of the tiny model (tests/tiny_runs.py) on the set's
training images; the fine-tune runs through the real CLI in a fresh interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from fashion_mnist import make_fashion_mnist_sets
from labelled_photos import make_labelled_sample_set
from tiny_runs import TINY_PRETRAIN, invoke, shared

pytestmark = pytest.mark.usefixtures("one_thread")

# Fine-tuning must clear the better probe by this many points. The margins measured (README's
# table): Fashion-MNIST and the photo crops; the bound leaves room for the spread seen across seeds.
MARGIN = 1.0


def fashion_mnist(root: Path) -> tuple[Path, Path]:
    return make_fashion_mnist_sets(root / "fm", n_train=100, n_val=50, size=32, seed=0)


def photo_crops(root: Path) -> tuple[Path, Path]:
    # Crops of 1-10% of a photo: a part of a scene is not enough to tell the photo at a glance.
    train = make_labelled_sample_set(root / "ph" / "train", n_per_class=40, size=32, seed=0, crop_scale=(0.01, 0.1))
    val = make_labelled_sample_set(root / "ph" / "val", n_per_class=20, size=32, seed=1, crop_scale=(0.01, 0.1))
    return train, val


def pretrained(tmp_path_factory, name: str, make) -> tuple[Path, Path, Path]:
    """(training folder, validation folder, a tiny pretrain run on the training folder)."""
    def build(root: Path) -> None:
        train, _ = make(root)
        (root / "tiny.toml").write_text(TINY_PRETRAIN)
        invoke("pretrain", train, "--config", root / "tiny.toml", "--out", root / "run")
    root = shared(tmp_path_factory, f"small-data-{name}", build)
    train, val = (root / "fm" / "train", root / "fm" / "val") if name == "fashion-mnist" else \
        (root / "ph" / "train", root / "ph" / "val")
    return train, val, root / "run"


@pytest.mark.parametrize("name, make", [("fashion-mnist", fashion_mnist), ("photo-crops", photo_crops)])
def test_ft_small_beats_the_probes_of_its_encoder(tmp_path_factory, tmp_path, name, make):
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings
    from localmim_cli.tasks.evaluate import run_evaluation

    train, val, encoder = pretrained(tmp_path_factory, name, make)
    run = tmp_path / "ft"
    r = run_cli("finetune", train, "--init", encoder, "--val", val, "--preset", "ft-small", "--workers", 0,
                "--device", "cpu", "--precision", "fp32", "--set", "train.loggers=[]", "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    # The probes' features are cached in the fine-tune's run, never in the run it starts from.
    assert len(list((run / "eval" / "cache").glob("features-*.safetensors"))) == 2
    assert not (encoder / "eval").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    probes, best = manifest["init_probes"], manifest["best"]["val_top1"]
    assert probes["val_images"] == len(list(val.rglob("*.png")))
    assert best >= max(probes["knn_top1"], probes["linear_top1"]) + MARGIN, (name, best, probes)
    # Fine-tuning, not the probe, made the best: it scores above the head it started from.
    start = manifest["head_start"]
    assert best > start["val_top1"], (name, best, start)
    text = " ".join(r.stdout.split())
    assert f"head starts from a linear probe (lr {start['lr']:g}" in text
    assert f"k-NN {probes['knn_top1']:.2f}%, linear {probes['linear_top1']:.2f}%: fine-tuning paid" in text

    # The figures the run compared with are `localmim evaluate`'s on the same encoder and split.
    settings = EvaluateSettings(data={"val_path": val, "workers": 0}, train={"device": "cpu"}, cache=False)
    for protocol, key in (("knn", "knn_top1"), ("linear", "linear_top1")):
        results, _ = run_evaluation(encoder, train, settings.model_copy(update={"protocol": protocol}),
                                    Console(quiet=True), out=tmp_path / f"{protocol}.json")
        assert results["top1"] == pytest.approx(probes[key], abs=1e-6), protocol
