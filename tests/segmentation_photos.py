"""Segmentation sets for tests, made offline from the built-in sample photos.

Each image is a crop of a background photo with shapes (discs, rectangles, triangles) cut
from object photos pasted on it; the mask says, pixel by pixel, which photo it shows. Classes
are the source photos, so the masks are exact and a model has to tell textures and colours
apart to score. Several objects per image, of random size, place and shape; the last pasted
wins where they overlap.

    pairs layout    images/NAME.png, masks/NAME.png (0 = background, 1.. = objects), classes.txt
    ADE20K layout   images/{training,validation}/NAME.jpg, annotations/{training,validation}/NAME.png:
                    1 = background, 2.. = objects, 0 = "other" (the pixels of one more background
                    photo, ignored), classes.txt beside them; or with `ade_ids`, the objects under
                    the ADE20K ids given (an ADE20K-shaped folder of the 150 classes)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from localmim_cli.data.images import generator_for, load_rgb
from localmim_cli.data.sample_photos import SAMPLE_PHOTOS_CREDIT, sample_photo_paths

OBJECTS = ("astronaut", "chelsea", "coffee")       # the classes after "background"
BACKGROUNDS = ("rocket", "hubble_deep_field")
OTHER = "ihc"                                       # ADE20K layout: label 0, "other"
CLASSES = ["background", "astronaut", "cat", "coffee"]


def _photos() -> dict[str, Image.Image]:
    return {p.stem: load_rgb(p) for p in sample_photo_paths()}


def _rand(gen, low: float, high: float) -> float:
    import torch
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def _crop(photo: Image.Image, w: int, h: int, gen) -> Image.Image:
    """A random window of the photo, resized to w x h."""
    side = _rand(gen, 0.3, 0.8) * min(photo.size)
    left = _rand(gen, 0, photo.width - side)
    top = _rand(gen, 0, photo.height - side)
    return photo.resize((w, h), Image.BILINEAR, box=(left, top, left + side, top + side))


def _shape_mask(size: int, gen) -> Image.Image:
    """A disc, a rectangle or a triangle (255 inside) somewhere in a size x size frame."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    w, h = (int(_rand(gen, 0.3, 0.6) * size) for _ in range(2))
    x, y = int(_rand(gen, 0, size - w)), int(_rand(gen, 0, size - h))
    kind = int(_rand(gen, 0, 3))
    if kind == 0:
        draw.ellipse((x, y, x + w, y + h), fill=255)
    elif kind == 1:
        draw.rectangle((x, y, x + w, y + h), fill=255)
    else:
        draw.polygon([(x, y + h), (x + w, y + h), (x + w // 2, y)], fill=255)
    return mask


def compose(photos: dict[str, Image.Image], size: int, gen, with_other: bool) -> tuple[Image.Image, np.ndarray]:
    """One image and its labels: 0 = background, k = OBJECTS[k - 1], -1 = the "other" photo."""
    image = _crop(photos[BACKGROUNDS[int(_rand(gen, 0, len(BACKGROUNDS)))]], size, size, gen)
    labels = np.zeros((size, size), dtype=np.int16)
    if with_other:   # a band of another photo across one side, labelled "other"
        band = Image.new("L", (size, size), 0)
        ImageDraw.Draw(band).rectangle((0, 0, size, int(_rand(gen, 0.1, 0.25) * size)), fill=255)
        image.paste(_crop(photos[OTHER], size, size, gen), (0, 0), band)
        labels[np.asarray(band) > 0] = -1
    for _ in range(int(_rand(gen, 2, 4))):
        k = int(_rand(gen, 0, len(OBJECTS)))
        shape = _shape_mask(size, gen)
        image.paste(_crop(photos[OBJECTS[k]], size, size, gen), (0, 0), shape)
        labels[np.asarray(shape) > 0] = k + 1
    return image, labels


def make_pairs_set(out: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """The pairs layout (see the module docstring); returns out."""
    photos = _photos()
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for i in range(n_images):
        image, labels = compose(photos, size, generator_for(seed, "seg-pairs", i), with_other=False)
        image.save(out / "images" / f"scene_{i:04d}.png")
        Image.fromarray(labels.astype(np.uint8), mode="L").save(out / "masks" / f"scene_{i:04d}.png")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "SOURCES.txt").write_text(SAMPLE_PHOTOS_CREDIT + "\n")
    return out


def make_ade20k_set(out: Path, n_train: int, n_val: int, size: int, seed: int = 0,
                    ade_ids: tuple[int, ...] | None = None) -> Path:
    """The ADE20K layout (see the module docstring); with `ade_ids` (4 ids in 1..150: background
    first) the labels are those ADE20K classes and no classes.txt is written. Returns out."""
    photos = _photos()
    ids = ade_ids or tuple(range(1, len(CLASSES) + 1))
    for split, n in (("training", n_train), ("validation", n_val)):
        (out / "images" / split).mkdir(parents=True)
        (out / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, labels = compose(photos, size, generator_for(seed, "seg-ade", split, i), with_other=True)
            stored = np.where(labels < 0, 0, np.asarray(ids)[np.clip(labels, 0, None)]).astype(np.uint8)
            name = f"ADE_{split[:3]}_{i:08d}"
            image.save(out / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(stored, mode="L").save(out / "annotations" / split / f"{name}.png")
    if ade_ids is None:
        (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "SOURCES.txt").write_text(SAMPLE_PHOTOS_CREDIT + "\n")
    return out
