"""Images in: finding, decoding and augmenting them, deterministically.

Every random choice a sample gets (its crop, its flip, its masking noise) comes from a
`torch.Generator` seeded by a hash of (seed, epoch, index). Nothing reads the global RNG, so a
sample is the same whatever the worker count, process count or the order samples are asked for,
and a resumed run sees exactly the images it would have seen.

Decoding always ends in 8-bit RGB: grayscale and palette images are expanded, transparent images
are composited onto black (see `to_rgb`), 16-bit images are scaled rather than clipped, and a
file that will not decode raises `DataError` naming it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from localmim_cli.seeding import derive_seed
from localmim_cli.errors import DataError

if TYPE_CHECKING:
    from localmim_cli.config.schema import DataSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision's default)




# ---------------------------------------------------------------------------------------------
# Finding images


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _accepted() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def find_images(root: Path) -> list[Path]:
    """Every image under `root`, recursively (symlinked folders too), sorted by path.

    Names starting with "." are skipped: they are hidden folders such as `.ipynb_checkpoints`,
    or macOS `._photo.jpg` resource forks, which carry an image suffix but are not images.
    A file path is accepted as a one-image list if it is an image.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if is_image(root):
            return [root]
        raise DataError(f"{root}: not an image file (accepted suffixes: {_accepted()})")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    images: list[Path] = []
    seen_dirs: set[str] = set()  # real paths walked, so a symlink loop is walked once
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images += [Path(folder, f) for f in files if not f.startswith(".") and is_image(Path(f))]
    if not images:
        raise DataError(f"{root}: no images found (looked recursively for {_accepted()})")
    return sorted(images)


def resolve_image_paths(path: Path | None) -> list[Path]:
    """The images of `data.path`; no path means the built-in sample photos."""
    if path is None:
        from localmim_cli.data.sample_photos import sample_photo_paths

        return sample_photo_paths()
    return find_images(path)


# ---------------------------------------------------------------------------------------------
# Decoding

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Decoded(NamedTuple):
    image: Image.Image  # 8-bit RGB, upright, possibly decoded at 1/reduction of full size
    full_size: tuple[int, int]  # (width, height) of the upright full-resolution image
    reduction: int  # JPEG draft factor (1, 2, 4 or 8): full-res pixel x is at x / reduction


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    # Black, because the colour under a transparent pixel is arbitrary (often garbage left by the
    # editor); compositing makes the result depend only on what is visible. Same as premultiplying.
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # (H, W); rint then clip guards rounding only
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")  # (H, W, 3)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 255], for integer or float data with no known white level."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new 8-bit RGB image.

    - L, 1, YCbCr, CMYK, RGB: Pillow's conversion.
    - RGBA, LA, PA, and P with a transparent colour: composited onto black.
    - I;16*: 16-bit, white = 65535, so divided by 257 (65535 -> 255), not clipped at 255.
    - I (32-bit): read as 16-bit when all values lie in 0..65535 (how Pillow opens some 16-bit
      files), else stretched min-max. F (float): x255 when within [0, 1], else stretched.
    """
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(img.convert("RGBA"))
    if mode.startswith("I;16"):
        return _gray_array_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(img).astype(np.float64)
        in_16bit = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        return _gray_array_to_rgb(values / 257.0 if in_16bit else _stretch(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img).astype(np.float64))
        unit = values.size == 0 or (values.min() >= 0 and values.max() <= 1)
        return _gray_array_to_rgb(values * 255.0 if unit else _stretch(values))
    return img.convert("RGB")  # raises ValueError for modes Pillow cannot convert


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block should not lose the photo; show it as stored
        return 1


def decode(path: Path, draft_size: int | None = None) -> Decoded:
    """Open `path` as upright 8-bit RGB; see `load_rgb`. Raises DataError naming the file."""
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            width, height = img.size
            reduction = 1
            if draft_size and img.format == "JPEG" and min(width, height) >= 2 * draft_size:
                # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size, several times faster. It
                # never goes below draft_size on either side; the box says the exact factor.
                drafted = img.draft("RGB", (draft_size, draft_size))
                if drafted is not None:
                    reduction = round(width / drafted[1][2])
            img.load()
            rgb = to_rgb(img)
    except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, EOFError, ...
        raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
        if orientation >= 5:  # the transposes that swap width and height
            width, height = height, width
    return Decoded(rgb, (width, height), reduction)


def load_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """An image file as an upright 8-bit RGB PIL image.

    With `draft_size`, a JPEG whose smaller side is at least 2 * draft_size is decoded at a
    reduced size whose sides are still >= draft_size: exact enough when the image is later
    resized down to at most draft_size pixels anyway, and much faster for large photos.
    """
    return decode(path, draft_size).image


# ---------------------------------------------------------------------------------------------
# Seeded randomness and augmentation


def generator_for(seed: int, *parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop, by torchvision's `RandomResizedCrop.get_params`.

    Ten tries at a random area share and log-uniform aspect ratio; if none fits, a central crop
    clamped to the ratio range. Same draws in the same order, but from `generator`.
    """
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision, so rounding matches too
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_size_for(img_size: int, min_scale: float, min_ratio: float = CROP_RATIO[0]) -> int:
    """Decoded side that keeps every RandomResizedCrop at >= img_size pixels.

    The narrowest crop has side sqrt(min_scale * W * H * min_ratio) >= min(W, H) *
    sqrt(min_scale * min_ratio), so decoding with min(W, H) >= this size means crops are only
    ever resized down, never up: the JPEG draft costs no detail the output could show.
    """
    return math.ceil(img_size / math.sqrt(min_scale * min_ratio))


# uint8 value -> normalized float, per channel: (3, 256). A table lookup in numpy instead of
# torch arithmetic: torch's elementwise ops on one small image stalled on intra-op threads in
# the main process here (7-40 ms vs 0.3 ms at 224 px on a busy 2-core machine).
_NORMALIZE = ((np.arange(256)[None, :] / 255 - np.array(IMAGENET_MEAN)[:, None])
              / np.array(IMAGENET_STD)[:, None]).astype(np.float32)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 (3, H, W), ImageNet mean/std normalized."""
    pixels = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.stack([_NORMALIZE[c][pixels[:, :, c]] for c in range(3)]))  # (3, H, W)


def center_crop_transform(img_size: int, crop_fraction: float = 0.875) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation transform: shorter side to img_size / crop_fraction (bicubic), centre crop, normalize."""

    def transform(img: Image.Image) -> torch.Tensor:
        short = img_size / crop_fraction
        factor = short / min(img.size)
        resized = img.resize((max(img_size, round(img.width * factor)),
                              max(img_size, round(img.height * factor))), Image.BICUBIC)
        left, top = (resized.width - img_size) // 2, (resized.height - img_size) // 2
        return to_tensor(resized.crop((left, top, left + img_size, top + img_size)))  # (3, S, S)

    return transform


# ---------------------------------------------------------------------------------------------
# Pretraining dataset


class PretrainImages(Dataset):
    """Unlabelled images with seeded RandomResizedCrop + flip, and per-sample masking noise.

    Length is len(paths) * repeats; index i reads paths[i % len(paths)]. Sample i of epoch e
    always gets the same crop, flip and noise. The epoch comes from `set_epoch`, or from the
    index itself when a sampler yields (epoch, i) pairs: use that with persistent workers,
    which keep the dataset copy they started with and never see a later `set_epoch`.

    With skip_unreadable, a file that fails to decode is replaced by the next readable one (in
    path order, so deterministically) and its name recorded in `skipped`. In loader workers
    `skipped` fills in the workers' copies; `check_readable` before training is what reports.
    """

    def __init__(
        self, paths: Sequence[Path], img_size: int, crop_scale: tuple[float, float], hflip: bool,
        seed: int, num_units: int, skip_unreadable: bool = False, repeats: int = 1, *, draft: bool = True,
    ):
        if not paths:
            raise DataError("no images to train on")
        if repeats < 1 or num_units < 0 or img_size < 1:
            raise ValueError("need repeats >= 1, num_units >= 0 and img_size >= 1")
        self.paths = [Path(p) for p in paths]
        self.img_size = img_size
        self.num_units = num_units
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = hflip
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.repeats = repeats
        self.draft_size = draft_size_for(img_size, self.crop_scale[0]) if draft else None
        self.epoch = 0
        self.skipped: list[str] = []
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, first: int) -> Decoded:
        """paths[first], or with skip_unreadable the next readable path after it."""
        count = len(self.paths)
        for step in range(count):
            k = (first + step) % count
            if k in self._unreadable:
                continue
            try:
                return decode(self.paths[k], self.draft_size)
            except DataError:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(k)
                self.skipped.append(str(self.paths[k]))
        raise DataError(f"none of the {count} images could be decoded (first: {self.paths[0]})")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        # Two streams: changing the augmentation settings leaves the masks as they were.
        view_rng = generator_for(self.seed, epoch, i, "view")
        noise_rng = generator_for(self.seed, epoch, i, "noise")

        decoded = self._decode(i % len(self.paths))
        top, left, h, w = random_resized_crop_params(*decoded.full_size, self.crop_scale, CROP_RATIO, view_rng)
        r = decoded.reduction  # crop chosen in full-resolution pixels, cut from the drafted decode
        box = (left / r, top / r, (left + w) / r, (top + h) / r)
        view = decoded.image.resize((self.img_size, self.img_size), Image.BICUBIC, box=box)
        if self.hflip and torch.rand(1, generator=view_rng).item() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "image": to_tensor(view),  # (3, S, S)
            "noise": torch.rand(self.num_units, generator=noise_rng),  # (num_units,) in [0, 1)
            "index": i,
        }


def pretrain_dataset(data: DataSettings, img_size: int, num_units: int, seed: int,
                     ) -> tuple[PretrainImages, list[tuple[Path, str]]]:
    """The pretraining dataset `data` describes, after the pre-flight read check.

    Returns the dataset and the files left out as unreadable (empty unless skip_unreadable).
    """
    paths = resolve_image_paths(data.path)
    readable, unreadable = check_readable(paths, data.skip_unreadable)
    dataset = PretrainImages(readable, img_size, data.crop_scale, data.hflip, seed, num_units,
                             data.skip_unreadable, data.repeats)
    return dataset, unreadable


# ---------------------------------------------------------------------------------------------
# Pre-flight and fingerprint

_SHOWN_BAD = 20  # bad files listed in an error message; the rest are counted


def _read_problem(path: Path, deep: bool) -> str | None:
    """None if `path` looks readable, else why not."""
    try:
        if deep:
            decode(path, draft_size=64)  # full decode, cheap for JPEGs at 1/8 scale
        else:
            with Image.open(path) as img:
                img.verify()  # header (and PNG chunk CRCs); does not decode pixels
        return None
    except DataError as error:
        return str(error).removeprefix(f"{path}: ")
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def check_readable(paths: Sequence[Path], skip_unreadable: bool, *, deep: bool = False,
                   threads: int | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Open every file before training, so a bad one stops the run before the first step.

    Header check by default (catches non-images and most corrupt files in milliseconds each);
    `deep` decodes fully, which also catches truncated files. Returns (readable, unreadable);
    unreadable is non-empty only with skip_unreadable, else any bad file raises DataError
    listing them.
    """
    paths = [Path(p) for p in paths]
    threads = threads or min(32, 4 * (os.cpu_count() or 1))  # file I/O bound: threads overlap it
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(lambda p: _read_problem(p, deep), paths))
    readable = [p for p, problem in zip(paths, problems) if problem is None]
    unreadable = [(p, problem) for p, problem in zip(paths, problems) if problem is not None]
    if unreadable and (not skip_unreadable or not readable):
        shown = "\n".join(f"  {p}: {why}" for p, why in unreadable[:_SHOWN_BAD])
        more = f"\n  ... and {len(unreadable) - _SHOWN_BAD} more" if len(unreadable) > _SHOWN_BAD else ""
        advice = ("none of the images can be read" if not readable
                  else "fix or remove them, or pass --skip-unreadable (data.skip_unreadable) "
                  "to leave them out")
        raise DataError(f"{len(unreadable)} of {len(paths)} image files cannot be read "
                        f"({advice}):\n{shown}{more}")
    return readable, unreadable


def fingerprint(paths: Sequence[Path]) -> str:
    """16 hex digits of sha256 over (relative path, size, mtime) of each file, in order.

    Cheap (stat only, no contents), and relative to the files' common folder, so moving the
    folder keeps it. Order counts: it decides which image each dataset index reads.
    """
    paths = [Path(p).absolute() for p in paths]
    if not paths:
        return hashlib.sha256(b"").hexdigest()[:16]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
        except OSError as error:
            raise DataError(f"{p}: cannot stat ({error.strerror})") from error
        digest.update(f"{p.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Labelled images (fine-tuning and evaluation)


def find_classes(root: Path) -> list[str]:
    """Sorted names of the class subfolders of an ImageFolder-style `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(entry.name for entry in root.iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders: put each class's images in its own folder")
    return classes


class LabelledImages(Dataset):
    """ImageFolder layout: root/<class>/**/<image>; label = index of the class in sorted order.

    Images directly in root (outside any class folder) are ignored, as torchvision does.
    """

    def __init__(self, root: Path, transform: Callable[[Image.Image], torch.Tensor], *,
                 draft_size: int | None = None):
        self.root = Path(root).expanduser()
        self.transform = transform
        self.draft_size = draft_size
        self.classes = find_classes(self.root)
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            try:
                images = find_images(self.root / name)
            except DataError as error:
                raise DataError(f"{self.root / name}: class folder '{name}' has no images "
                                f"(accepted suffixes: {_accepted()})") from error
            self.samples += [(path, label) for path in images]
        self.targets = [label for _, label in self.samples]

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path, self.draft_size)), label


def split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split -> (train indices, val indices), each sorted.

    Each class gives round(n * val_fraction) samples to val, at least 1 and at most n - 1 when
    it has two or more (so every class is in both sides). Order within a class comes from a
    hash of (seed, index), which no library version can change.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    train: list[int] = []
    val: list[int] = []
    for members in by_class.values():
        shuffled = sorted(members, key=lambda index: derive_seed(seed, "split", index))
        n_val = round(len(shuffled) * val_fraction)
        if val_fraction > 0 and len(shuffled) >= 2:
            n_val = min(max(n_val, 1), len(shuffled) - 1)
        val += shuffled[:n_val]
        train += shuffled[n_val:]
    return sorted(train), sorted(val)
