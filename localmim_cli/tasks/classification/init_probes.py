"""Whether a fine-tune paid: the k-NN and linear probe of its --init encoder on the run's own split.

The same probes as `localmim evaluate --protocol knn|linear` (tasks/probes.py, default settings),
on the fine-tune's training and validation images at its input size and evaluation crop. Their
features are cached in the fine-tune's own run (eval/cache), never in the run it starts from,
which a fine-tune only reads.
They cost one forward pass over the images and a sweep of linear heads on the features, which is
cheap beside any fine-tune of a small set; `train.init_probes = "auto"` skips them above
AUTO_LIMIT training images, where the pass and the sweep would no longer be.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import UserError

if TYPE_CHECKING:
    from localmim_cli.config.schema import FinetuneSettings
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.features import LabelledSplit

AUTO_LIMIT = 50_000


def wanted(settings: "FinetuneSettings", split: "LabelledSplit") -> bool:
    mode = settings.train.init_probes
    if mode == "off" or settings.init is None or not split.val:
        return False
    return mode == "on" or len(split.train) <= AUTO_LIMIT


def init_probes(settings: "FinetuneSettings", split: "LabelledSplit", img_size: int,
                placement: "Placement", run_dir: Path) -> dict[str, Any]:
    """{"knn_top1", "linear_top1", ...} of the --init encoder, or {"error": why} when the probes
    cannot run on it (the fine-tune goes on either way)."""
    import torch

    from localmim_cli.config.schema import KnnSettings, LinearProbeSettings
    from localmim_cli.tasks import probes
    from localmim_cli.tasks.features import FeatureCache, cache_dir_for, features_for
    from localmim_cli.weights.sources import load_encoder_weights, reference_feature_model

    device, knn, linear = placement.device, KnnSettings(), LinearProbeSettings()
    try:
        weights = load_encoder_weights(settings.init)
        cache = FeatureCache(cache_dir_for(run_dir))
        common = dict(batch_size=settings.train.eval_batch_size or settings.train.batch_size,
                      workers=settings.data.workers, device=device, precision=placement.precision,
                      model_holder={})
        factory = lambda: reference_feature_model(weights, img_size)  # noqa: E731
        crop = settings.data.eval_crop_fraction
        train_f, train_y = features_for(factory, weights.identity(), split.train, split.classes, img_size, crop,
                                        cache, **common)
        val_f, val_y = features_for(factory, weights.identity(), split.val, split.classes, img_size, crop,
                                    cache, **common)
        n = len(split.classes)
        # The heads' initialisation draws from torch's global generator: leave the run's untouched.
        with torch.random.fork_rng(devices=[]):
            knn_scores = probes.knn_scores(train_f.to(device), train_y.to(device), val_f.to(device), n, knn).cpu()
            fit = probes.linear_probe(train_f, train_y, val_f, val_y, n, linear, settings.train.seed, device)
    except UserError as exc:
        return {"error": str(exc)}
    return {"knn_top1": probes.topk_accuracy(knn_scores, val_y, ks=(1,))["top1"],
            "linear_top1": probes.topk_accuracy(fit["scores"], val_y, ks=(1,))["top1"],
            "val_images": len(split.val), "train_images": len(split.train), "knn": knn.model_dump(),
            "linear_best": fit["best"], "encoder": str(settings.init)}


def probes_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"initial encoder's probes skipped: {result['error']}"
    return (f"to beat (the initial encoder on the same split): k-NN top-1 {result['knn_top1']:.2f}%, "
            f"linear probe top-1 {result['linear_top1']:.2f}%")


def verdict(best_top1: float, result: dict[str, Any]) -> str:
    """How the best validation top-1 compares with the initial encoder's probes."""
    if not result or "error" in result:
        return ""
    margin = best_top1 - max(result["knn_top1"], result["linear_top1"])
    word = "paid" if margin > 0 else "did not pay"
    return (f"; initial encoder k-NN {result['knn_top1']:.2f}%, linear {result['linear_top1']:.2f}%: "
            f"fine-tuning {word} ({margin:+.2f} points over the better probe)")
