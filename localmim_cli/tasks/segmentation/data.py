"""Segmentation data: two folder layouts, checked before training, and the datasets.

    ADE20K    DATA/images/{training,validation}/NAME.jpg + DATA/annotations/{training,validation}/NAME.png
              (0 = "other", ignored; 1..150 become 0..149: mmsegmentation's reduce_zero_label)
    pairs     DATA/images/NAME.<any image type> + DATA/masks/NAME.png (the class index of each pixel,
              255 ignored), class names in an optional DATA/classes.txt (one per line) or
              DATA/classes.json (a list); validation from data.val_path (the same layout) or a
              seeded share of the images (data.val_fraction)

Before anything is written every mask is read and every image header opened (data.check
"full"): an image without its mask, a mask of another size than its image, a label outside the
classes and an empty split are each an error of one line naming the file. The check also counts
each class's pixels, which the run records.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from localmim_cli.data import ade20k
from localmim_cli.data.decode import load_rgb, open_image, orientation_of, upright_size
from localmim_cli.data.sources import IMAGE_SUFFIXES
from localmim_cli.errors import DataError
from localmim_cli.tasks.segmentation.augment import IGNORE, SegAugment, normalize, rescaled_size, resize_image

if TYPE_CHECKING:
    from localmim_cli.config.segmentation import SegDataSettings


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


@dataclass
class SegData:
    layout: str                      # "ade20k" or "pairs"
    classes: list[str]               # label k is classes[k]
    train: list[Pair]
    val: list[Pair]
    root: Path
    reduce_zero_label: bool
    val_root: Path | None = None
    val_fraction: float = 0.0
    class_pixels: list[int] = field(default_factory=list)   # training pixels per class (after the check)
    checked: bool = False

    def describe(self) -> str:
        how = (f"validation from {self.val_root}" if self.val_root else
               f"{self.val_fraction:g} held out for validation" if self.val else "no validation images")
        zero = "; label 0 ignored, 1..N are the classes" if self.reduce_zero_label else ""
        return (f"{self.layout} layout, {len(self.classes)} classes; {len(self.train)} training and "
                f"{len(self.val)} validation images ({how}){zero}")

    def record(self) -> dict[str, Any]:
        """What a run records about its data (manifest.json "data")."""
        from localmim_cli.data.index import fingerprint

        return {"root": str(self.root), "layout": self.layout, "classes": self.classes,
                "reduce_zero_label": self.reduce_zero_label, "val_root": str(self.val_root) if self.val_root else None,
                "val_fraction": self.val_fraction, "train_images": len(self.train), "val_images": len(self.val),
                "class_pixels": self.class_pixels,
                "fingerprint": fingerprint([p.image for p in self.train] + [p.mask for p in self.train]),
                "val_fingerprint": fingerprint([p.image for p in self.val] + [p.mask for p in self.val])}


# ---------------------------------------------------------------------------------------------
# Layouts


def detect_layout(root: Path) -> str:
    if (root / "annotations").is_dir() or (root / "images" / "training").is_dir():
        return "ade20k"
    if (root / "masks").is_dir():
        return "pairs"
    raise DataError(f"{root}: neither the ADE20K layout (images/training + annotations/training) nor the "
                    "pairs layout (images/ + masks/); see `localmim finetune --help`")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not found:
        raise DataError(f"{folder}: empty split, no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _pairs(images: Path, masks: Path) -> list[Pair]:
    """Each image with the PNG of the same stem in `masks`; DataError for an image without one."""
    out = []
    for image in _images_in(images):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{image}: no mask {mask}")
        out.append(Pair(image, mask))
    return out


def read_class_names(root: Path) -> list[str] | None:
    """classes.txt (one name per line) or classes.json (a list of names) in `root`, or None."""
    txt, js = root / "classes.txt", root / "classes.json"
    if txt.is_file():
        names = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = txt
    elif js.is_file():
        try:
            names = json.loads(js.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{js}: not valid JSON ({exc})") from None
        where = js
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{js}: expected a list of class names, e.g. [\"background\", \"cat\"]")
    else:
        return None
    if not names:
        raise DataError(f"{where}: no class names")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: class names repeat ({sorted({n for n in names if names.count(n) > 1})[:5]})")
    if len(names) > IGNORE:
        raise DataError(f"{where}: {len(names)} classes; masks hold 8-bit labels with 255 ignored, so at most 255")
    return names


def read_seg_data(d: SegDataSettings, seed: int, classes: Sequence[str] | None = None) -> SegData:
    """The layout's training and validation pairs, checked (see the module docstring).

    classes: the class names a resumed run was started with (the check uses them as given)."""
    if d.path is None:
        raise DataError("segmentation needs DATA: an ADE20K-layout folder (images/, annotations/) or a "
                        "pairs folder (images/, masks/)")
    root = Path(d.path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    layout = detect_layout(root) if d.layout == "auto" else d.layout
    zero = reduces_zero_label(layout, d.reduce_zero_label)
    if layout == "ade20k":
        train = _pairs(root / "images" / "training", root / "annotations" / "training")
        val = _pairs(root / "images" / "validation", root / "annotations" / "validation")
        names = read_class_names(root) or (list(ade20k.CLASSES) if zero else None)
        data = SegData(layout, [], train, val, root, zero, val_root=root / "images" / "validation")
    else:
        pairs = _pairs(root / "images", root / "masks")
        names = read_class_names(root)
        if d.val_path is not None:
            val_root = Path(d.val_path)
            data = SegData(layout, [], pairs, _pairs(val_root / "images", val_root / "masks"), root, zero,
                           val_root=val_root)
        else:
            train, val = _split(pairs, d.val_fraction, seed)
            data = SegData(layout, [], train, val, root, zero, val_fraction=d.val_fraction)
    if classes is not None:
        names = list(classes)
    data.classes = names or []
    if d.check == "full" or not data.classes:
        check_pairs(data)
    return data


def reduces_zero_label(layout: str, setting: bool | None) -> bool:
    """Whether label 0 is "other" (ignored) and k is class k - 1: ADE20K's convention unless
    data.reduce_zero_label says otherwise; in the pairs layout only when it says so."""
    return (True if setting is None else setting) if layout == "ade20k" else bool(setting)


def mask_beside(image: Path) -> tuple[Path, str] | None:
    """The mask a layout keeps for `image`, and the layout, when there is one:
    ROOT/images/NAME.* -> ROOT/masks/NAME.png (pairs), ROOT/images/SPLIT/NAME.* ->
    ROOT/annotations/SPLIT/NAME.png (ADE20K)."""
    folder = image.parent
    candidates = []
    if folder.name == "images":
        candidates.append((folder.parent / "masks" / f"{image.stem}.png", "pairs"))
    if folder.parent.name == "images":
        candidates.append((folder.parent.parent / "annotations" / folder.name / f"{image.stem}.png", "ade20k"))
    return next(((mask, layout) for mask, layout in candidates if mask.is_file()), None)


def layout_root(mask: Path, layout: str) -> Path:
    """The layout's root folder (where classes.txt / classes.json lie) of one of its masks."""
    return mask.parent.parent if layout == "pairs" else mask.parent.parent.parent


def _split(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    from localmim_cli.seeding import derive_seed

    if val_fraction <= 0:
        return pairs, []
    n_val = min(max(round(len(pairs) * val_fraction), 1), len(pairs) - 1)
    order = sorted(range(len(pairs)), key=lambda i: derive_seed(seed, "seg-split", pairs[i].image.name))
    val = set(order[:n_val])
    train = [p for i, p in enumerate(pairs) if i not in val]
    if not train:
        raise DataError(f"{pairs[0].image.parent}: empty split, no training images left after holding out "
                        f"{n_val} for validation; add images or lower data.val_fraction")
    return train, [p for i, p in enumerate(pairs) if i in val]


# ---------------------------------------------------------------------------------------------
# The check


def read_mask(path: Path, reduce_zero_label: bool) -> np.ndarray:
    """(H, W) uint8 class indices, IGNORE where unlabelled (with reduce_zero_label: 0 -> IGNORE,
    k -> k - 1). DataError naming the file for an unreadable mask or one of colour pixels."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(f"{path}: a {img.mode} image; a mask holds one class index per pixel "
                                "(8-bit grey or palette PNG)")
            raw = np.asarray(img)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read mask ({type(exc).__name__}: {exc})") from None
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DataError(f"{path}: label {int(raw.max())} is above 255; masks hold 8-bit class indices")
        raw = raw.astype(np.uint8)
    if not reduce_zero_label:
        return raw
    out = raw.astype(np.int16) - 1
    out[raw == 0] = IGNORE
    out[raw == IGNORE] = IGNORE
    return out.astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as training sees it (EXIF orientation applied)."""
    try:
        with open_image(path) as img:
            return upright_size(img.size, orientation_of(img))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def _check_one(pair: Pair, reduce_zero_label: bool) -> tuple[np.ndarray | None, str | None]:
    """(label histogram, None) or (None, the problem as one line naming the file)."""
    try:
        width, height = _image_size(pair.image)
        mask = read_mask(pair.mask, reduce_zero_label)
    except DataError as exc:
        return None, str(exc)
    if mask.shape != (height, width):
        return None, (f"{pair.mask}: {mask.shape[1]}x{mask.shape[0]} pixels, but its image {pair.image} is "
                      f"{width}x{height}; a mask must have its image's size")
    return np.bincount(mask.ravel(), minlength=256), None


def check_pairs(data: SegData, threads: int | None = None) -> None:
    """Read every mask and image header of both splits; the first problem in file order is a
    DataError of one line. Fills data.class_pixels (training pixels per class) and, when no
    class names were given, data.classes (class_0 ... up to the largest label found)."""
    import os

    every = data.train + data.val
    with ThreadPoolExecutor(max_workers=threads or min(16, 4 * (os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda p: _check_one(p, data.reduce_zero_label), every))
    problems = [problem for _, problem in results if problem]
    if problems:
        more = f" (and {len(problems) - 1} more files with problems)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    hists = [h for h, _ in results]
    labelled = [int(np.nonzero(h[:IGNORE])[0].max()) if h[:IGNORE].any() else -1 for h in hists]
    if not data.classes:
        top = max(labelled, default=-1)
        if top < 1:
            raise DataError(f"{data.root}: the masks hold {'no labels' if top < 0 else 'one class only'}; "
                            "segmentation needs two or more classes (255 = ignored)")
        data.classes = [f"class_{k}" for k in range(top + 1)]
    n = len(data.classes)
    for pair, top in zip(every, labelled):
        if top >= n:
            raise _label_outside(pair.mask, top, n, data.reduce_zero_label)
    train_hist = np.sum(hists[:len(data.train)], axis=0)
    data.class_pixels = [int(c) for c in train_hist[:n]]
    data.checked = True


def _label_outside(mask: Path, top: int, n: int, reduce_zero_label: bool) -> DataError:
    zero = " (with reduce_zero_label: stored value - 1; 0 is ignored)" if reduce_zero_label else ""
    stored = top + 1 if reduce_zero_label else top
    return DataError(f"{mask}: label {stored} is outside the {n} classes{zero}; labels are "
                     f"{'1' if reduce_zero_label else '0'}..{n if reduce_zero_label else n - 1} "
                     "and 255 (ignored); fix the mask or the class list")


def read_checked_mask(pair: Pair, reduce_zero_label: bool, num_classes: int) -> np.ndarray:
    """One pair's mask (as `read_mask`), checked as training checks every pair: readable, of its
    image's size, no label outside the classes; else a DataError of one line naming the file."""
    hist, problem = _check_one(pair, reduce_zero_label)
    if problem:
        raise DataError(problem)
    labelled = np.nonzero(hist[:IGNORE])[0]
    if labelled.size and labelled.max() >= num_classes:
        raise _label_outside(pair.mask, int(labelled.max()), num_classes, reduce_zero_label)
    return read_mask(pair.mask, reduce_zero_label)


# ---------------------------------------------------------------------------------------------
# Datasets


class SegTrainSamples(Dataset):
    """Training pairs through the published augmentation, keyed by (epoch, index) (see
    engine.task.TrainingTask) and seeded per (seed, epoch, index). Length len(pairs) * repeats."""

    def __init__(self, pairs: Sequence[Pair], augment: SegAugment, reduce_zero_label: bool, seed: int,
                 repeats: int = 1):
        self.pairs, self.augment, self.reduce_zero_label = list(pairs), augment, reduce_zero_label
        self.seed, self.repeats = seed, repeats

    def __len__(self) -> int:
        return len(self.pairs) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from localmim_cli.data.augment import generator_for

        epoch, index = key
        pair = self.pairs[index % len(self.pairs)]
        image = np.array(load_rgb(pair.image))   # a copy: the augmentation works on it in place
        mask = read_mask(pair.mask, self.reduce_zero_label)
        return self.augment(image, mask, generator_for(self.seed, "segment", epoch, index))


class SegEvalSamples(Dataset):
    """Validation pairs: the image resized (keep ratio) to `scale` and normalized, with its mask
    at full size, as the published test pipeline scores (predictions are resized back)."""

    def __init__(self, pairs: Sequence[Pair], scale: tuple[int, int], reduce_zero_label: bool):
        self.pairs, self.scale, self.reduce_zero_label = list(pairs), scale, reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        image = np.asarray(load_rgb(pair.image))
        mask = read_mask(pair.mask, self.reduce_zero_label)
        resized = resize_image(image, rescaled_size(image.shape[:2], self.scale))
        return normalize(resized), torch.from_numpy(mask.astype(np.int64))
