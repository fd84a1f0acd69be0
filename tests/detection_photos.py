"""COCO-format detection sets for tests, made offline from the built-in sample photos.

Each image is a crop of a background photo with several objects pasted on it: a disc, a
rectangle or a triangle cut from one of three object photos (astronaut, cat, coffee), each its
own category. An object's mask is exact (the pasted pixels that stay visible, the last pasted
on top), its polygon is the shape's outline and its box the mask's bounds, so a model has to
tell the photos' textures apart and find where each one lies.

    splits layout   DATA/train/annotations.json + DATA/train/images/, DATA/val/... (the same)
    COCO layout     DATA/annotations/instances_{train,val}2017.json + DATA/{train,val}2017/

Categories take COCO's own ids (1 person, 17 cat, 47 cup: not contiguous, as in COCO). Masks are
stored as polygons where the shape is whole, as RLE where a later object covers part of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from localmim_cli.data.images import generator_for, load_rgb
from localmim_cli.data.sample_photos import SAMPLE_PHOTOS_CREDIT, sample_photo_paths

OBJECTS = ("astronaut", "chelsea", "coffee")
BACKGROUNDS = ("rocket", "hubble_deep_field")
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]


def _rand(gen, low: float, high: float) -> float:
    import torch
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def _crop(photo: Image.Image, w: int, h: int, gen, low: float = 0.3, high: float = 0.8) -> Image.Image:
    side = _rand(gen, low, high) * min(photo.size)
    left, top = _rand(gen, 0, photo.width - side), _rand(gen, 0, photo.height - side)
    return photo.resize((w, h), Image.BILINEAR, box=(left, top, left + side, top + side))


def _shape(size: int, gen) -> list[float]:
    """A disc (as a 16-gon), a rectangle or a triangle: its outline as a COCO polygon."""
    w, h = (_rand(gen, 0.2, 0.45) * size for _ in range(2))
    x, y = _rand(gen, 0, size - w), _rand(gen, 0, size - h)
    kind = int(_rand(gen, 0, 3))
    if kind == 0:
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pts = np.stack([x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)], 1)
    elif kind == 1:
        pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
    else:
        pts = np.array([[x, y + h], [x + w, y + h], [x + w / 2, y]])
    return [round(float(v), 2) for v in pts.ravel()]


def compose(photos, size: int, gen) -> tuple[Image.Image, list[tuple[int, list[float], np.ndarray]]]:
    """One image and its objects: (category index, polygon, visible mask) each."""
    image = _crop(photos[BACKGROUNDS[int(_rand(gen, 0, len(BACKGROUNDS)))]], size, size, gen)
    owner = np.full((size, size), -1, dtype=np.int16)
    objects = []
    for n in range(int(_rand(gen, 2, 5))):
        k = int(_rand(gen, 0, len(OBJECTS)))
        poly = _shape(size, gen)
        shape = Image.new("L", (size, size), 0)
        ImageDraw.Draw(shape).polygon([tuple(p) for p in np.asarray(poly).reshape(-1, 2)], fill=255)
        image.paste(_crop(photos[OBJECTS[k]], size, size, gen, 0.15, 0.4), (0, 0), shape)
        owner[np.asarray(shape) > 0] = n
        objects.append((k, poly))
    return image, [(k, poly, (owner == n).astype(np.uint8)) for n, (k, poly) in enumerate(objects)]


def _annotations(photos, folder: Path, n_images: int, size: int, seed: int, tag: str) -> dict:
    from pycocotools import mask as mask_utils

    folder.mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        image, objects = compose(photos, size, generator_for(seed, "det", tag, i))
        name = f"{tag}_{i:04d}.jpg"
        image.save(folder / name, quality=95)
        images.append({"id": 1000 + i, "file_name": name, "width": size, "height": size})
        for k, poly, mask in objects:
            if mask.sum() < 20:          # hidden under later objects
                continue
            rle = mask_utils.encode(np.asfortranarray(mask))
            ys, xs = np.nonzero(mask)
            drawn = Image.new("L", (size, size), 0)
            ImageDraw.Draw(drawn).polygon([tuple(p) for p in np.asarray(poly).reshape(-1, 2)], fill=1)
            whole = np.array_equal(np.asarray(drawn), mask)
            seg = [poly] if whole else {"size": [size, size], "counts": rle["counts"].decode("ascii")}
            anns.append({"id": len(anns) + 1 + 10000 * (tag == "val"), "image_id": 1000 + i,
                         "category_id": CATEGORIES[k]["id"], "iscrowd": 0, "area": float(mask.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                                  float(ys.max() + 1 - ys.min())], "segmentation": seg})
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def make_detection_set(out: Path, n_train: int, n_val: int, size: int, seed: int = 0, layout: str = "splits") -> Path:
    """A COCO-format set in `layout` ("splits" or "coco"); returns out."""
    photos = {p.stem: load_rgb(p) for p in sample_photo_paths()}
    for tag, n in (("train", n_train), ("val", n_val)):
        if layout == "coco":
            folder, ann_file = out / f"{tag}2017", out / "annotations" / f"instances_{tag}2017.json"
        else:
            folder, ann_file = out / tag / "images", out / tag / "annotations.json"
        data = _annotations(photos, folder, n, size, seed, tag)
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps(data))
    (out / "SOURCES.txt").write_text(SAMPLE_PHOTOS_CREDIT + "\n")
    return out
