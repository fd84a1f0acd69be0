"""`--protocol seg-linear`: a cheap dense probe of an encoder, to compare pretraining runs
without a full fine-tune.

The frozen encoder's patch features (a ViT: the tokens after its last block, as a grid of
stride `patch`; a Swin: its stride-16 stage) of each image, resized to img_size x img_size, are
standardised (per channel, over the training pixels: the probe then needs no tuning of lr per
encoder) and read by one 1x1 convolution whose logits are upsampled bilinearly to the mask's
size, trained with cross-entropy (255 ignored) by AdamW over full batches of the cached
features. It is scored by the segmentation metric (metric.py: mIoU, mAcc, aAcc) at each
validation mask's own size. Features are cached like the classification probes'
(tasks/features.py), keyed by checkpoint, images and size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.nn import functional as F

from localmim_cli.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings
    from localmim_cli.tasks.segmentation.data import Pair


def evaluate_probe(checkpoint: Path, data: Path, settings: "EvaluateSettings",
                   console: "Console") -> tuple[dict[str, Any], Path | None]:
    from localmim_cli.config.segmentation import SegDataSettings
    from localmim_cli.engine.distributed import World, choose_device
    from localmim_cli.engine.loop import resolve_precision
    from localmim_cli.tasks.features import FeatureCache, cache_dir_for
    from localmim_cli.tasks.segmentation.data import read_seg_data
    from localmim_cli.tasks.segmentation.metric import confusion, scores
    from localmim_cli.weights.sources import load_encoder_weights

    weights = load_encoder_weights(checkpoint)
    split = read_seg_data(SegDataSettings(path=data, val_path=settings.data.val_path, val_fraction=settings.data.val_fraction),
                          settings.train.seed)
    if not split.val:
        raise DataError(f"{data}: no validation images: give --val DIR or a --val-fraction above 0")
    probe = settings.seg_linear
    size = settings.model.img_size or probe.img_size
    device = choose_device(settings.train.device, World())
    precision = resolve_precision(settings.train.precision, device)
    console.print(f"{weights.describe()}; protocol seg-linear at {size} px on {device} ({precision}); "
                  f"data: {split.describe()}")
    cache = FeatureCache(cache_dir_for(weights.run_dir), enabled=settings.cache)
    holder: dict[str, torch.nn.Module] = {}

    def features(pairs: Sequence["Pair"]) -> tuple[torch.Tensor, torch.Tensor]:
        key = _cache_key(weights.identity(), pairs, split.reduce_zero_label, size)
        hit = cache.get(key)
        if hit is not None:
            return hit
        if "model" not in holder:
            holder["model"] = _patch_features(weights, size).to(device)
        feats, masks = _extract(holder["model"], pairs, split.reduce_zero_label, size, settings.train.batch_size,
                                device, precision)
        cache.put(key, feats, masks, {"checkpoint": weights.identity(), "images": len(pairs), "img_size": size})
        return feats, masks

    train_f, train_m = features(split.train)
    val_f, _ = features(split.val)
    k = len(split.classes)
    head, mean, std = _fit(train_f.float(), train_m, k, probe, settings.train.seed, device)
    matrix = torch.zeros(k, k, dtype=torch.int64)
    from localmim_cli.tasks.segmentation.data import read_mask
    with torch.no_grad():
        for f, pair in zip(val_f.float(), split.val):
            mask = torch.from_numpy(read_mask(pair.mask, split.reduce_zero_label).astype("int64"))
            logits = head(((f.to(device) - mean) / std)[None])
            pred = F.interpolate(logits, size=tuple(mask.shape), mode="bilinear", align_corners=False).argmax(1)[0]
            matrix += confusion(pred.cpu(), mask, k)
    result = scores(matrix, split.classes)
    return {"protocol": "seg-linear", "checkpoint_kind": weights.kind,
            "model": weights.shape.describe() if weights.shape.depth else weights.encoder_name,
            "img_size": size, "feature_grid": list(train_f.shape[-2:]), "feature_dim": int(train_f.shape[1]),
            "data": split.record(), "classes": split.classes, "seg_linear": probe.model_dump(),
            "features": {"cache": str(cache.folder) if settings.cache else None, "cache_hits": cache.hits},
            **result}, weights.run_dir


def _cache_key(identity: dict[str, Any], pairs: Sequence["Pair"], reduce_zero_label: bool, size: int) -> str:
    from localmim_cli.data.index import fingerprint

    record = {"probe": "seg-linear-1", "checkpoint": identity,
              "images": fingerprint([p.image for p in pairs] + [p.mask for p in pairs]),
              "reduce_zero_label": reduce_zero_label, "img_size": size, "normalize": "imagenet"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


class _Tokens(torch.nn.Module):
    """Images (B, 3, S, S) -> the frozen encoder's patch grid (B, C, S/p, S/p)."""

    def __init__(self, pyramid: torch.nn.Module):
        super().__init__()
        self.pyramid = pyramid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.pyramid
        if hasattr(p, "taps"):   # a ViT (BEiT's backbone: the pretrained function at the start)
            return p.encoder.forward_intermediates(images, indices=[p.shape.depth - 1], intermediates_only=True)[0]
        return p(images)[2]      # a hierarchical encoder's stride-16 stage


def _patch_features(weights, size: int) -> torch.nn.Module:
    from localmim_cli.model.feature_pyramid import pyramid_from_weights, pyramid_spec

    pyramid, _ = pyramid_from_weights(pyramid_spec(weights, size), weights)
    return _Tokens(pyramid).eval()


def _extract(model: torch.nn.Module, pairs: Sequence["Pair"], reduce_zero_label: bool, size: int, batch_size: int,
             device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, g, g) features and (N, size, size) masks (nearest; 255 ignored) of the pairs."""
    import numpy as np

    from localmim_cli.data.decode import load_rgb
    from localmim_cli.engine.loop import autocast
    from localmim_cli.tasks.segmentation.augment import normalize, resize_image
    from localmim_cli.tasks.segmentation.data import read_mask

    feats, masks = [], []
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        images = torch.stack([normalize(resize_image(np.asarray(load_rgb(p.image)), (size, size))) for p in chunk])
        for p in chunk:
            m = torch.from_numpy(read_mask(p.mask, reduce_zero_label).astype("int64"))[None, None].float()
            masks.append(F.interpolate(m, size=(size, size), mode="nearest")[0, 0].to(torch.uint8))
        with torch.no_grad(), autocast(precision, device):
            feats.append(model(images.to(device)).float().cpu())
    return torch.cat(feats), torch.stack(masks)


def _fit(feats: torch.Tensor, masks: torch.Tensor, k: int, probe, seed: int, device: torch.device):
    """The 1x1 head trained on standardised features; (head, mean, std) on `device`."""
    from localmim_cli.tasks.segmentation.augment import IGNORE

    feats, masks = feats.to(device), masks.to(device).long()
    mean = feats.mean(dim=(0, 2, 3), keepdim=True)[0]
    std = feats.std(dim=(0, 2, 3), keepdim=True)[0] + 1e-6
    x = (feats - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(feats.shape[1], k, 1).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay)
    for _ in range(probe.steps):
        logits = F.interpolate(head(x), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval(), mean, std


def print_probe(results: dict[str, Any], console: "Console") -> None:
    from localmim_cli.tasks.segmentation.metric import print_scores

    print_scores(results, f"seg-linear: {results['checkpoint']} ({results['img_size']} px, "
                          f"features {results['feature_grid'][0]}x{results['feature_grid'][1]})", console)
