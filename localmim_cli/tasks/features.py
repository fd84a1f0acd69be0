"""Labelled image folders, their train/validation split, and features of a checkpoint on them.

A labelled folder is ImageFolder-style: one subfolder per class. Validation comes from a second
folder with the same class names, or from a seeded stratified split of the first.

Features are computed once per (checkpoint, images, preprocessing) and cached as safetensors:
`<run dir>/eval/cache/` when the checkpoint belongs to a run directory, else
`$LOCALMIM_HOME/cache/features/`. The cache key hashes the checkpoint file's path, size and
mtime, the images' fingerprint (relative paths, sizes, mtimes, in order), the class names and
the preprocessing, so a changed file or setting never reuses stale features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from localmim_cli.data.images import center_crop_transform, load_rgb
from localmim_cli.data.index import fingerprint
from localmim_cli.data.labelled import LabelledImages, split_indices
from localmim_cli.data.samplers import loader_kwargs
from localmim_cli.errors import DataError
from localmim_cli.seeding import derive_seed

FEATURES_VERSION = 1
Sample = tuple[Path, int]


# ---------------------------------------------------------------------------------------------
# Labelled folders and the split


@dataclass
class LabelledSplit:
    classes: list[str]          # label i is classes[i]
    train: list[Sample]
    val: list[Sample]
    root: Path
    val_root: Path | None
    val_fraction: float

    def describe(self) -> str:
        how = f"validation folder {self.val_root}" if self.val_root else (
            f"{self.val_fraction:g} of each class held out" if self.val else "no validation images")
        return (f"{len(self.classes)} classes; {len(self.train)} training and {len(self.val)} "
                f"validation images ({how})")


def _identity(img):
    return img


def read_labelled(root: Path) -> LabelledImages:
    """The folder's classes and samples; DataError for a missing folder, no class subfolders,
    or a class folder without images, each naming the path."""
    return LabelledImages(Path(root), _identity)


def labelled_split(data: Path, val_path: Path | None, val_fraction: float, seed: int,
                   classes: Sequence[str] | None = None) -> LabelledSplit:
    """Train and validation samples of `data`.

    classes: the label order to use (a fine-tuned model's); the folders may hold a subset of
    them, but a class folder outside the list is an error. None = the sorted class folders of
    `data`, which `val_path` must then match.
    """
    base = read_labelled(data)
    order = list(classes) if classes is not None else list(base.classes)
    remap = _remap(base, order, f"{data}")
    samples = [(p, remap[label]) for p, label in base.samples]
    if val_path is not None:
        val_base = read_labelled(val_path)
        val_remap = _remap(val_base, order, f"--val {val_path}")
        val = [(p, val_remap[label]) for p, label in val_base.samples]
        return LabelledSplit(order, samples, val, Path(data), Path(val_path), 0.0)
    train_idx, val_idx = split_indices([label for _, label in samples], val_fraction, seed)
    return LabelledSplit(order, [samples[i] for i in train_idx], [samples[i] for i in val_idx],
                         Path(data), None, val_fraction)


def _remap(found: LabelledImages, order: list[str], where: str) -> dict[int, int]:
    unknown = [c for c in found.classes if c not in order]
    if unknown:
        listing = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataError(f"{where}: class folder(s) {listing} are not among the {len(order)} classes "
                        f"expected ({', '.join(order[:10])}{' ...' if len(order) > 10 else ''})")
    return {i: order.index(name) for i, name in enumerate(found.classes)}


def split_record(split: LabelledSplit) -> dict[str, Any]:
    """What a run or a result file records about the data."""
    return {"root": str(split.root), "val_root": str(split.val_root) if split.val_root else None,
            "val_fraction": split.val_fraction, "classes": split.classes,
            "train_images": len(split.train), "val_images": len(split.val),
            "train_fingerprint": fingerprint([p for p, _ in split.train]),
            "val_fingerprint": fingerprint([p for p, _ in split.val])}


# ---------------------------------------------------------------------------------------------
# Datasets


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Run a block with Python's, NumPy's and torch's CPU generators seeded, then restore them.

    timm's and torchvision's transforms draw from these global generators; seeding them per
    sample makes a sample's augmentation a function of (run seed, epoch, index) alone.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AugmentedSamples(Dataset):
    """Labelled samples through a random training transform, seeded per (seed, epoch, index).

    Length is len(samples) * repeats. Items are keyed by (epoch, index), as the training
    engine's sampler yields them: its loader's workers persist across epochs, so the epoch
    cannot be set on the dataset.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, seed: int,
                 draft_size: int | None = None, repeats: int = 1):
        if not samples:
            raise DataError("no training images")
        self.samples, self.transform, self.seed = list(samples), transform, seed
        self.draft_size, self.repeats = draft_size, repeats

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        path, label = self.samples[i % len(self.samples)]
        image = load_rgb(path, self.draft_size)
        with seeded_global_rngs(derive_seed(self.seed, "augment", epoch, i)):
            x = self.transform(image)   # (3, S, S)
        return x, label


class EvalSamples(Dataset):
    """Labelled samples through the deterministic evaluation transform."""

    def __init__(self, samples: Sequence[Sample], img_size: int, crop_fraction: float):
        self.samples = list(samples)
        self.transform = center_crop_transform(img_size, crop_fraction)
        self.draft_size = int(np.ceil(img_size / crop_fraction))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path, self.draft_size)), label


# ---------------------------------------------------------------------------------------------
# Extraction and the cache


@torch.no_grad()
def extract(model: torch.nn.Module, samples: Sequence[Sample], img_size: int, crop_fraction: float,
            batch_size: int, workers: int, device: torch.device, precision: str = "fp32",
            console: Console | None = None, label: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C) float32 on the CPU, labels (N,) int64) in sample order. With a console, a
    progress bar over the images (on a terminal), labelled `label`."""
    from localmim_cli.engine.loop import autocast
    from localmim_cli.engine.progress import StepProgress

    if not samples:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    loader = DataLoader(EvalSamples(samples, img_size, crop_fraction), batch_size=batch_size,
                        shuffle=False, **loader_kwargs(workers, device))
    model = model.to(device).eval()
    feats, labels = [], []
    shown = console is not None
    with StepProgress(console or Console(quiet=True), len(samples), 0, shown, label=label) as progress:
        for images, y in loader:
            with autocast(precision, device):
                f = model(images.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            labels.append(y)
            progress.advance(len(y))
    return torch.cat(feats), torch.cat(labels).long()


def cache_key(identity: dict[str, Any], samples: Sequence[Sample], classes: Sequence[str],
              img_size: int, crop_fraction: float) -> str:
    record = {"version": FEATURES_VERSION, "checkpoint": identity,
              "images": fingerprint([p for p, _ in samples]) if samples else "none",
              "labels": hashlib.sha256(json.dumps([int(y) for _, y in samples]).encode()).hexdigest()[:16],
              "classes": list(classes), "img_size": img_size, "crop_fraction": crop_fraction,
              "interpolation": "bicubic", "normalize": "imagenet"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir_for(run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir / "eval" / "cache"
    from localmim_cli.engine.runs import home
    return home() / "cache" / "features"


class FeatureCache:
    """features-<key>.safetensors files in one folder; writes are atomic."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder, self.enabled = folder, enabled
        self.hits = 0

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.enabled:
            return None
        path = self.folder / f"features-{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError):
            return None   # a damaged cache file is recomputed, not trusted
        self.hits += 1
        return data["features"], data["labels"]

    def put(self, key: str, features: torch.Tensor, labels: torch.Tensor, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from localmim_cli.engine import atomic
        atomic.write_tensors(self.folder / f"features-{key}.safetensors",
                             {"features": features.contiguous(), "labels": labels.contiguous()},
                             metadata={"info": json.dumps(info)})


def features_for(model_factory: Callable[[], torch.nn.Module], identity: dict[str, Any],
                 samples: Sequence[Sample], classes: Sequence[str], img_size: int, crop_fraction: float,
                 cache: FeatureCache, *, batch_size: int, workers: int, device: torch.device,
                 precision: str, model_holder: dict[str, torch.nn.Module], console: Console | None = None,
                 label: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Cached features of `samples`, computing (and building the model, once) only on a miss."""
    key = cache_key(identity, samples, classes, img_size, crop_fraction)
    hit = cache.get(key)
    if hit is not None:
        return hit
    if "model" not in model_holder:
        model_holder["model"] = model_factory()
    feats, labels = extract(model_holder["model"], samples, img_size, crop_fraction, batch_size, workers,
                            device, precision, console, label)
    cache.put(key, feats, labels, {"checkpoint": identity, "images": len(samples), "img_size": img_size,
                                   "crop_fraction": crop_fraction})
    return feats, labels
