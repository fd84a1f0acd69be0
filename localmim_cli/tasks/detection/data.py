"""Detection data: COCO-format instances, checked before training, and the datasets.

    coco     DATA/annotations/instances_trainYYYY.json + DATA/trainYYYY/ (and the same for val)
    splits   DATA/train/annotations.json + DATA/train/images/, DATA/val/annotations.json + DATA/val/images/
    split    DATA/annotations.json + DATA/images/ (training), validation from data.val_path (a
             folder of the same shape) or none

An annotations file is COCO's "instances" format: `images` (id, file_name relative to the images
folder, width, height), `categories` (id, name) and `annotations` (id, image_id, category_id,
bbox [x, y, width, height] in pixels, segmentation as polygons or RLE, iscrowd). Before anything
is written every annotation is checked and every image found (with data.check "full" its header
opened, its size against the file's): an image missing, a box degenerate or outside its image, an
unknown category and a malformed segmentation are each an error of one line naming the file and
the annotation id. Boxes and segmentations may instead be left out (data.invalid "skip").

Categories become labels 1..K in the order of their ids (0 is the background, as torchvision's
detectors count); predictions go back to the categories' own ids. Crowd annotations are left
out of training and kept for the evaluation (COCO ignores detections on them); training images
without any other annotation are left out (detectron2's filter_empty_annotations).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from localmim_cli.errors import DataError

if TYPE_CHECKING:
    from localmim_cli.config.detection import DetDataSettings

EDGE_SLACK = 1.0   # pixels a box may reach past its image's edge (rounding in exported annotations)


@dataclass(frozen=True)
class Instance:
    ann_id: int
    label: int                                   # 1..K
    box: tuple[float, float, float, float]       # COCO x, y, width, height
    segmentation: Any                            # polygons (list of lists), RLE (dict) or None
    iscrowd: bool
    area: float | None = None                    # as the file gives it (COCOeval's area ranges)


@dataclass
class DetImage:
    image_id: int
    path: Path
    width: int
    height: int
    instances: list[Instance]


@dataclass
class CocoSplit:
    annotations: Path
    images_dir: Path
    images: list[DetImage]
    categories: list[dict[str, Any]]             # as in the file, sorted by id
    skipped: int = 0                             # annotations left out (data.invalid "skip")

    def describe(self) -> str:
        n = sum(len(i.instances) for i in self.images)
        return f"{len(self.images)} images, {n} instances ({self.annotations})"


@dataclass
class DetData:
    layout: str
    classes: list[str]                           # label k is classes[k - 1]
    category_ids: list[int]                      # label k is COCO category category_ids[k - 1]
    train: CocoSplit
    val: CocoSplit | None
    train_images: list[DetImage] = field(default_factory=list)   # those with a non-crowd instance

    def describe(self) -> str:
        val = f"validation: {self.val.describe()}" if self.val else "no validation split"
        skipped = (self.train.skipped + (self.val.skipped if self.val else 0))
        note = f"; {skipped} invalid annotations left out" if skipped else ""
        return (f"{self.layout} layout, {len(self.classes)} categories; training: {len(self.train_images)} images "
                f"with instances of {len(self.train.images)} ({self.train.annotations}); {val}{note}")

    def record(self) -> dict[str, Any]:
        """What a run records about its data (manifest.json "data")."""
        from localmim_cli.data.index import fingerprint

        def split(s: CocoSplit | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"annotations": str(s.annotations), "images_dir": str(s.images_dir), "images": len(s.images),
                    "instances": sum(len(i.instances) for i in s.images), "skipped": s.skipped,
                    "fingerprint": fingerprint([s.annotations] + [i.path for i in s.images])}
        return {"layout": self.layout, "classes": self.classes, "category_ids": self.category_ids,
                "train_images": len(self.train_images), "train": split(self.train), "val": split(self.val)}


# ---------------------------------------------------------------------------------------------
# Layouts


def find_splits(d: DetDataSettings) -> tuple[str, tuple[Path, Path], tuple[Path, Path] | None]:
    """(layout, (train annotations, train images), (val annotations, val images) or None)."""
    if d.path is None:
        raise DataError("detection needs DATA: a COCO folder (annotations/instances_train2017.json, train2017/), a "
                        "folder of train/ and val/ (each annotations.json + images/), or one annotations.json + "
                        "images/ with --val")
    root = Path(d.path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    layout = d.layout
    if layout == "auto":
        layout = ("coco" if list((root / "annotations").glob("instances_train*.json")) else
                  "splits" if (root / "train" / "annotations.json").is_file() else "split")
    val: tuple[Path, Path] | None
    if layout == "coco":
        found = sorted((root / "annotations").glob("instances_train*.json"))
        if not found:
            raise DataError(f"{root / 'annotations'}: no instances_trainYYYY.json (the COCO layout)")
        name = found[-1].stem[len("instances_"):]                    # train2017
        train = (found[-1], root / name)
        val_file = root / "annotations" / f"instances_{name.replace('train', 'val', 1)}.json"
        val = (val_file, root / name.replace("train", "val", 1)) if val_file.is_file() else None
    elif layout == "splits":
        train = _split_folder(root / "train")
        val = _split_folder(root / "val") if (root / "val").exists() else None
    else:
        train = _split_folder(root)
        val = None
    if d.val_path is not None:
        val = _split_folder(Path(d.val_path))
    return layout, train, val


def _split_folder(folder: Path) -> tuple[Path, Path]:
    if not (folder / "annotations.json").is_file():
        raise DataError(f"{folder}: no annotations.json (a split folder holds annotations.json and images/)")
    images = folder / "images"
    return folder / "annotations.json", images if images.is_dir() else folder


# ---------------------------------------------------------------------------------------------
# Reading and checking an annotations file


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no \"{key}\" list (COCO instances format: images, annotations, categories)")
    return data


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO segmentation, or None: polygons are lists of x, y pairs (3 points
    at least); an RLE is {"size": [height, width], "counts": a string or run lengths summing to
    height x width}."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty list of polygons"
        for poly in seg:
            if not isinstance(poly, list) or not all(_number(v) for v in poly):
                return "a polygon is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"a polygon has {len(poly)} coordinates; it needs x, y pairs of 3 points or more"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_int(v) for v in size)):
            return "RLE segmentation has no size [height, width]"
        if list(size) != [height, width]:
            return f"RLE segmentation is {size[0]}x{size[1]} (height x width), its image {height}x{width}"
        if isinstance(counts, list):
            if not all(_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "RLE run lengths do not add up to height x width"
            return None
        if isinstance(counts, str):
            from pycocotools import mask as mask_utils
            try:
                area = int(mask_utils.area({"size": size, "counts": counts.encode("ascii")}))
            except Exception:
                return "RLE counts are not a valid compressed RLE string"
            if area < 0 or area > height * width:
                return "RLE counts are not a valid compressed RLE string"
            return None
        return "RLE segmentation has no counts (a string or a list of run lengths)"
    return "segmentation is neither polygons (a list) nor RLE (an object)"


def read_split(annotations: Path, images_dir: Path, invalid: str, categories: list[dict[str, Any]] | None = None,
               need_masks: bool = True, categories_from: str = "the training split's") -> CocoSplit:
    """Every image and annotation of one file, checked (see the module docstring).

    categories: the categories the split must have (those of `categories_from`), or None to take its own."""
    data = _load_json(annotations)
    where = annotations
    cats = []
    for c in data["categories"]:
        if not (isinstance(c, dict) and _int(c.get("id")) and isinstance(c.get("name"), str)):
            raise DataError(f"{where}: a category without an integer id and a name: {str(c)[:80]}")
        cats.append({"id": c["id"], "name": c["name"]})
    cats.sort(key=lambda c: c["id"])
    if len({c["id"] for c in cats}) != len(cats):
        raise DataError(f"{where}: category ids repeat")
    if not cats:
        raise DataError(f"{where}: no categories")
    if categories is not None and [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in categories]:
        raise DataError(f"{where}: its categories differ from {categories_from}; both need the same category ids "
                        "and names")
    label_of = {c["id"]: k + 1 for k, c in enumerate(cats)}

    images: dict[int, DetImage] = {}
    for entry in data["images"]:
        if not (isinstance(entry, dict) and _int(entry.get("id")) and isinstance(entry.get("file_name"), str)
                and _int(entry.get("width")) and _int(entry.get("height"))
                and entry["width"] > 0 and entry["height"] > 0):
            raise DataError(f"{where}: an image entry needs an integer id, a file_name and a positive width and "
                            f"height: {str(entry)[:100]}")
        if entry["id"] in images:
            raise DataError(f"{where}: image id {entry['id']} appears twice")
        path = images_dir / entry["file_name"]
        images[entry["id"]] = DetImage(entry["id"], path, entry["width"], entry["height"], [])
    if not images:
        raise DataError(f"{where}: no images")

    skipped = 0
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        name = f"{where}: annotation id {ann_id}"
        if not _int(ann_id):
            raise DataError(f"{where}: an annotation without an integer id: {str(ann)[:100]}")
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DataError(f"{name}: image_id {ann.get('image_id')!r} is not among the images")
        if ann.get("category_id") not in label_of:
            raise DataError(f"{name}: unknown category_id {ann.get('category_id')!r} (the categories are "
                            f"{', '.join(str(c['id']) for c in cats[:10])}{' ...' if len(cats) > 10 else ''})")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise DataError(f"{name}: iscrowd is {crowd!r}; it must be 0 or 1")
        problem = _box_problem(ann.get("bbox"), image)
        seg = ann.get("segmentation")
        if problem is None and seg is not None:
            seg_problem = segmentation_problem(seg, image.height, image.width)
            problem = f"malformed segmentation: {seg_problem}" if seg_problem else None
        if problem is None and seg is None and need_masks and not crowd:
            problem = "no segmentation, which Mask R-CNN trains on (or --set model.masks=false for boxes only)"
        if problem is not None:
            if invalid == "skip" and not problem.startswith("no segmentation"):
                skipped += 1
                continue
            hint = ("; fix the annotation, or pass --set data.invalid=skip to leave such annotations out"
                    if not problem.startswith("no segmentation") else "")
            raise DataError(f"{name} (image {image.path.name}): {problem}{hint}")
        area = float(ann["area"]) if _number(ann.get("area")) else None
        image.instances.append(Instance(ann_id, label_of[ann["category_id"]], tuple(float(v) for v in ann["bbox"]),
                                        seg, bool(crowd), area))
    return CocoSplit(annotations, images_dir, list(images.values()), cats, skipped)


def _box_problem(box: Any, image: DetImage) -> str | None:
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        return f"bbox {str(box)[:60]} is not [x, y, width, height]"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"box {box} is degenerate (width and height must be positive)"
    if x < -EDGE_SLACK or y < -EDGE_SLACK or x + w > image.width + EDGE_SLACK or y + h > image.height + EDGE_SLACK:
        return f"box {box} lies outside its image ({image.width}x{image.height})"
    return None


def check_images(split: CocoSplit, full: bool, threads: int | None = None) -> None:
    """Every image of the split exists (with `full`, opens, at the size its entry says); the first
    problem in file order is a DataError of one line naming the file."""
    import os

    from localmim_cli.data.decode import open_image, orientation_of, upright_size

    def problem(image: DetImage) -> str | None:
        where = f"{split.annotations} (image id {image.image_id})"
        if not image.path.is_file():
            return f"{image.path}: no such image, named in {where}"
        if not full:
            return None
        try:
            with open_image(image.path) as img:
                w, h = upright_size(img.size, orientation_of(img))
        except Exception as exc:
            return f"{image.path}: cannot read image ({type(exc).__name__}: {exc})"
        if (w, h) != (image.width, image.height):
            return (f"{image.path}: {w}x{h} pixels, but {where} says {image.width}x{image.height}; fix the "
                    "annotations' width and height")
        return None

    with ThreadPoolExecutor(max_workers=threads or min(16, 4 * (os.cpu_count() or 1))) as pool:
        problems = [p for p in pool.map(problem, split.images) if p]
    if problems:
        more = f" (and {len(problems) - 1} more images with problems)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def read_det_data(d: DetDataSettings, need_masks: bool, classes: Sequence[str] | None = None) -> DetData:
    """Both splits, checked; `classes`: a resumed run's category names (the data must still have them)."""
    layout, (train_file, train_dir), val = find_splits(d)
    train = read_split(train_file, train_dir, d.invalid, need_masks=need_masks)
    check_images(train, d.check == "full")
    val_split = None
    if val is not None:
        val_split = read_split(val[0], val[1], d.invalid, train.categories, need_masks=need_masks)
        check_images(val_split, d.check == "full")
    names = [c["name"] for c in train.categories]
    if classes is not None and list(classes) != names:
        raise DataError(f"{train_file}: its categories {names[:5]}... are not the run's {list(classes)[:5]}...")
    data = DetData(layout, names, [c["id"] for c in train.categories], train, val_split)
    data.train_images = [i for i in train.images if any(not inst.iscrowd for inst in i.instances)]
    if not data.train_images:
        raise DataError(f"{train_file}: no training image has an annotation (other than crowd regions)")
    return data


def read_scored_split(d: DetDataSettings, need_masks: bool, classes: Sequence[str], category_ids: Sequence[int],
                      model: str) -> tuple[CocoSplit, bool]:
    """The split an evaluation scores, checked, and whether it is a validation split: DATA's
    validation split when it has one (its training annotations are then neither read nor checked),
    else its one split. Its categories must be the `model`'s (`classes`, `category_ids`)."""
    _, train, val = find_splits(d)
    annotations, images_dir = val if val is not None else train
    run_categories = [{"id": i, "name": n} for i, n in zip(category_ids, classes)]
    split = read_split(annotations, images_dir, d.invalid, sorted(run_categories, key=lambda c: c["id"]),
                       need_masks=need_masks, categories_from=f"those {model} was trained on")
    check_images(split, d.check == "full")
    return split, val is not None


# ---------------------------------------------------------------------------------------------
# Masks


def instance_area(inst: Instance, image: DetImage) -> float:
    """The annotation's area: the file's, else its mask's, else its box's."""
    if inst.area is not None:
        return inst.area
    if inst.segmentation is not None:
        return float(instance_mask(inst, image.height, image.width).sum())
    return inst.box[2] * inst.box[3]


def instance_mask(inst: Instance, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 0/1 of an instance's segmentation at its image's size."""
    from pycocotools import mask as mask_utils

    seg = inst.segmentation
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle)


# ---------------------------------------------------------------------------------------------
# Datasets


# (H, W, 3) uint8 RGB, its instances, whether to make masks, a generator -> (image, target):
# augment.LargeScaleJitter, which imports this module (so it is not named here).
Augment = Callable[[np.ndarray, Sequence[Instance], bool, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class DetTrainSamples(Dataset):
    """Training images through large-scale jitter, keyed by (epoch, index) (see
    engine.task.TrainingTask) and seeded per (seed, epoch, index). Length len(images) * repeats.
    Items: (image (3, h, w) float in [0, 1], target {"boxes" (N, 4) x1 y1 x2 y2, "labels" (N,),
    "masks" (N, h, w) uint8 when masks}); the crowd instances are not among them."""

    def __init__(self, images: Sequence[DetImage], augment: Augment, masks: bool, seed: int,
                 repeats: int = 1):
        self.images, self.augment, self.masks = list(images), augment, masks
        self.seed, self.repeats = seed, repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from localmim_cli.data.augment import generator_for
        from localmim_cli.data.decode import load_rgb

        epoch, index = key
        image = self.images[index % len(self.images)]
        rgb = np.asarray(load_rgb(image.path))
        instances = [i for i in image.instances if not i.iscrowd]
        return self.augment(rgb, instances, self.masks, generator_for(self.seed, "detect", epoch, index))

    @staticmethod
    def collate():
        return collate


def collate(items: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Images of different sizes and their targets stay lists (the detector pads them itself)."""
    return [i for i, _ in items], [t for _, t in items]


class DetEvalSamples(Dataset):
    """Validation images at their own size: (image (3, H, W) float in [0, 1], image index)."""

    def __init__(self, images: Sequence[DetImage]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from localmim_cli.data.decode import load_rgb

        rgb = np.array(load_rgb(self.images[index].path))
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255), index
