"""`localmim evaluate`: k-NN, linear and few-shot probes on frozen features, the feature cache,
and where results go. The classifier protocol is exercised in test_finetune.py.

The k-NN claim: a short LocalMIM pretraining on real photos (600 steps of a tiny model, in
process) gives features that classify held-out crops better than the same encoder at its random
initialisation. The crops are small (2-10% of a photo), so colour statistics alone, which even a
random encoder passes through, do not separate the photos well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from localmim_cli.engine import checkpoints
from localmim_cli.tasks.probes import knn_scores, mean_ci95, per_class_report, topk_accuracy
from localmim_cli.config.schema import KnnSettings, PretrainSettings
from labelled_photos import make_labelled_sample_set
from tiny_runs import invoke, published_pth, shared

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT_PRETRAIN = {
    "model": {"img_size": 32, "taps": [1, 2], "scales": [2.0, 1.0],
              "encoder": {"name": "vit", "options": {"arch": None, "patch_size": 8, "embed_dim": 32,
                                                     "depth": 2, "num_heads": 2}},
              "target": {"name": "pixel"}, "decoder": {"width": 32, "depth": 1, "num_heads": 2}},
    "optim": {"lr": 5e-3, "warmup_epochs": 0}, "train": {"batch_size": 32},
}
STEPS = 600


def small_crops(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "small-crops", lambda root: make_labelled_sample_set(
        root / "data", n_per_class=40, size=48, seed=0, crop_scale=(0.02, 0.1))) / "data"


def save_run(run: Path, model, settings: PretrainSettings, step: int) -> None:
    """A run directory as `localmim pretrain` leaves it (the parts evaluate reads)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "settings.json").write_text(json.dumps(settings.model_dump(mode="json")))
    checkpoints.save(run / "checkpoints", f"step-{step:08d}", model.state_dict(),
                     {"kind": "pretrain", "position": {"epoch": 0, "micro_step": 0, "step": step},
                      "settings": settings.model_dump(mode="json"), "tap_layers": model.encoder.tap_layers})


def short_pretrain(tmp_path_factory) -> tuple[Path, Path]:
    """(run after STEPS LocalMIM steps, run of the same encoder at initialisation)."""
    data = small_crops(tmp_path_factory)

    def build(root: Path) -> None:
        from localmim_cli.model.build import build_model
        from localmim_cli.tasks.features import EvalSamples, read_labelled

        settings = PretrainSettings.model_validate(SHORT_PRETRAIN)
        torch.manual_seed(0)
        model = build_model(settings.model)
        save_run(root / "random", model, settings, 0)
        crops = EvalSamples(read_labelled(data).samples, 32, 1.0)
        images = torch.stack([crops[i][0] for i in range(len(crops))])      # (N, 3, 32, 32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.05)
        gen = torch.Generator().manual_seed(0)
        for step in range(STEPS):
            batch = images[torch.randint(0, len(images), (32,), generator=gen)]
            for group in optimizer.param_groups:
                group["lr"] = 5e-3 * min(1.0, (step + 1) / 10)
            loss = model(batch, noise=torch.rand(32, model.num_units, generator=gen)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_run(root / "pretrained", model, settings, STEPS)
    root = shared(tmp_path_factory, "short-pretrain", build)
    return root / "pretrained", root / "random"


def evaluate(*args) -> dict:
    out = Path(args[args.index("--out") + 1])
    invoke("evaluate", *args, "--workers", 0, "--device", "cpu")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------ the probes, end to end


def test_knn_after_short_pretraining_beats_random_init(tmp_path_factory, tmp_path):
    data = small_crops(tmp_path_factory)
    pretrained, random_init = short_pretrain(tmp_path_factory)
    common = [data, "--protocol", "knn", "--val-fraction", 0.5, "--k", 10, "--temperature", 0.07]
    trained = evaluate(pretrained, *common, "--out", tmp_path / "pre.json")
    baseline = evaluate(random_init, *common, "--out", tmp_path / "rand.json")
    assert trained["data"]["val_images"] == baseline["data"]["val_images"] == 140
    assert trained["knn"] == {"k": 10, "temperature": 0.07}
    assert trained["top1"] >= baseline["top1"] + 3.0, (trained["top1"], baseline["top1"])
    assert trained["top1"] > 100 / 7 * 3


def test_linear_and_fewshot_probes_share_cached_features(tmp_path_factory, tmp_path):
    data = small_crops(tmp_path_factory)
    pretrained, _ = short_pretrain(tmp_path_factory)
    cache = pretrained / "eval" / "cache"
    sweep = ["--set", "linear.epochs=30", "--set", "linear.lrs=[0.003,0.03]",
             "--set", "linear.weight_decays=[0,0.001]"]
    before = set(cache.glob("features-*.safetensors"))                # other tests' splits
    knn = evaluate(pretrained, data, "--protocol", "knn", "--out", tmp_path / "knn.json")
    files = set(cache.glob("features-*.safetensors"))
    assert len(files - before) == 2 or knn["features"]["cache_hits"] == 2   # train side, validation side
    linear = evaluate(pretrained, data, "--protocol", "linear", *sweep, "--out", tmp_path / "linear.json")
    assert linear["features"]["cache_hits"] == 2 and set(cache.glob("*.safetensors")) == files
    assert knn["features"]["dim"] == linear["features"]["dim"] == 32

    assert len(linear["sweep"]) == 4
    assert {(r["lr"], r["weight_decay"]) for r in linear["sweep"]} == {(0.003, 0), (0.003, 0.001), (0.03, 0),
                                                                        (0.03, 0.001)}
    best = max(linear["sweep"], key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    assert linear["best"] == best
    assert linear["fit_images"] + linear["holdout_images"] == linear["data"]["train_images"]
    assert linear["top1"] > 100 / 7 * 2

    few = evaluate(pretrained, data, "--protocol", "fewshot", "--way", 5, "--shot", 1, "--shot", 5,
                   "--episodes", 20, "--out", tmp_path / "few.json")
    assert few["features"]["cache_hits"] == 2
    one, five = few["fewshot"]["1-shot"], few["fewshot"]["5-shot"]
    assert one["way"] == five["way"] == 5 and one["n"] == five["n"] == 20
    assert 20 < one["mean"] <= 100 and 0 <= one["ci95"] < 30
    assert five["mean"] >= one["mean"] - 5

    # A different preprocessing is a different cache entry, never a stale hit.
    other = evaluate(pretrained, data, "--protocol", "knn", "--set", "data.eval_crop_fraction=1.0",
                     "--out", tmp_path / "knn2.json")
    assert other["features"]["cache_hits"] == 0 and len(set(cache.glob("*.safetensors")) - files) == 2
    assert not (pretrained / "evaluations").exists()     # --out was given each time


def test_results_default_to_eval_folder_outside_a_run(tmp_path_factory, tmp_path, monkeypatch):
    data = small_crops(tmp_path_factory)
    pth = published_pth(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCALMIM_HOME", str(tmp_path / "home"))
    invoke("evaluate", pth, data, "--protocol", "knn", "--workers", 0, "--device", "cpu")
    [written] = (tmp_path / "evaluations").glob("*-knn.json")
    result = json.loads(written.read_text())
    assert result["checkpoint_kind"] == "published" and result["protocol"] == "knn"
    assert len(list((tmp_path / "home" / "cache" / "features").glob("features-*.safetensors"))) == 2


# ------------------------------------------------------------------------------ the probes, by hand


def test_knn_votes_are_similarity_weighted():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    scores = knn_scores(train, labels, query, 2, KnnSettings(k=3, temperature=0.1))
    assert scores.argmax(1).tolist() == [1, 0]
    # One neighbour of class 1 outweighs two of class 0 for the first query: weights exp(cos / T).
    cos = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    expected = torch.stack([(cos / 0.1).exp()[:, :2].sum(1), (cos / 0.1).exp()[:, 2]], dim=1)
    torch.testing.assert_close(scores, expected)


def test_topk_per_class_and_interval():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 2])
    acc = topk_accuracy(scores, labels)
    assert acc["top1"] == 75.0 and acc["top5"] == 100.0           # k above the class count: all
    rows = per_class_report(scores.argmax(1), labels, ["a", "b", "c"])
    b = next(r for r in rows if r["class"] == "b")
    assert (b["images"], b["correct"], b["accuracy"], b["most_confused_with"]) == (2, 1, 50.0, "a")
    assert next(r for r in rows if r["class"] == "a")["precision"] == 50.0
    ci = mean_ci95([50.0, 60.0, 70.0])
    assert ci["mean"] == pytest.approx(60.0) and ci["ci95"] == pytest.approx(1.96 * 10 / 3**0.5)
