"""Pretraining images: the seeded dataset, its batches, and how a run gets them.

Sample i of epoch e always gets the same crop, flip and masking noise, drawn from generators
seeded by (run seed, e, i) (see `augment`). A sample is decoded in a loader worker, either all
the way to the normalized view (the CPU path), or, when the run decodes JPEGs on the GPU, only
read: the worker sends the file's bytes with the view parameters it drew, and the main process
decodes the batch's JPEGs with nvJPEG and cuts the same views there (`gpu_decode`). Images
the GPU cannot take (other formats, CMYK, progressive or EXIF-rotated JPEGs) take the CPU path
in the worker whatever the mode.

A file that fails to decode during training does not raise in the worker (that would print the
worker's traceback): the batch carries the one-line error, and the main process raises it. With
skip_unreadable, the file is replaced by the next readable one (in path order, so
deterministically) and the batch carries the name, for the run to list in skipped.jsonl.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from localmim_cli.data.augment import (
    CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, ViewParams, center_crop_transform, draft_size_for,
    generator_for, pillow_view, random_resized_crop_params, to_tensor, view_params,
)
from localmim_cli.data.decode import Decoded, decode, load_rgb, open_image, orientation_of, to_rgb
from localmim_cli.data.sources import IMAGE_SUFFIXES, ImageRef, find_images, read_bytes, resolve_image_paths
from localmim_cli.errors import DataError

if TYPE_CHECKING:
    from localmim_cli.config.schema import DataSettings
    from localmim_cli.data.index import DataIndex
    from localmim_cli.engine.distributed import World

__all__ = [  # the names callers take from here; the rest live in the modules named above
    "CROP_RATIO", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "PretrainImages", "center_crop_transform",
    "collate_samples", "decode", "draft_size_for", "find_images", "generator_for", "load_rgb",
    "pretrain_dataset", "random_resized_crop_params", "resolve_image_paths", "to_rgb", "to_tensor",
]


class JpegBytes(NamedTuple):
    """A JPEG left for the GPU to decode: its bytes and its upright full size."""
    data: bytes
    full_size: tuple[int, int]


class LoadFailure(NamedTuple):
    """A sample that could not be loaded, carried to the main process as one line."""
    message: str


def _gpu_decodable(img) -> bool:
    """nvJPEG through torchvision takes baseline RGB or grayscale JPEGs; EXIF-rotated ones would
    need the transpose too, which the CPU path already does."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and not img.info.get("progressive")
            and not img.info.get("progression") and orientation_of(img) == 1)


class PretrainImages(Dataset):
    """Unlabelled images with seeded RandomResizedCrop + flip, and per-sample masking noise.

    Length is len(paths) * repeats; index i reads paths[i % len(paths)]. Sample i of epoch e
    always gets the same crop, flip and noise. The epoch comes from `set_epoch`, or from the
    index itself when a sampler yields (epoch, i) pairs: use that with persistent workers,
    which keep the dataset copy they started with and never see a later `set_epoch`.

    `paths` are files or tar members (`sources.Member`). With skip_unreadable, a file that
    fails to decode is replaced by the next readable one and its name recorded in `skipped`
    (of this copy of the dataset) and in the sample's "skipped" entry (which reaches the main
    process through the batch). With jpeg_bytes, JPEGs the GPU can decode come back undecoded.
    """

    def __init__(
        self, paths: Sequence[ImageRef], img_size: int, crop_scale: tuple[float, float], hflip: bool,
        seed: int, num_units: int, skip_unreadable: bool = False, repeats: int = 1, *, draft: bool = True,
        jpeg_bytes: bool = False,
    ):
        if not paths:
            raise DataError("no images to train on")
        if repeats < 1 or num_units < 0 or img_size < 1:
            raise ValueError("need repeats >= 1, num_units >= 0 and img_size >= 1")
        self.paths = list(paths)
        self.img_size = img_size
        self.num_units = num_units
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = hflip
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.repeats = repeats
        self.draft_size = draft_size_for(img_size, self.crop_scale[0]) if draft else None
        self.jpeg_bytes = jpeg_bytes
        self.index: DataIndex | None = None  # the run's data index these paths came from, if any
        self.epoch = 0
        self.skipped: list[str] = []
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, ref: ImageRef) -> Decoded | JpegBytes:
        if not self.jpeg_bytes:
            return decode(ref, self.draft_size)
        data = read_bytes(ref)
        try:
            with open_image(ref, data) as img:
                if _gpu_decodable(img):
                    return JpegBytes(data, img.size)
        except DataError:
            raise
        except Exception:
            pass  # not an image Pillow recognises: decode() below names the file and the reason
        return decode(ref, self.draft_size, data=data)

    def _decode(self, first: int, skipped: list[tuple[str, str]] | None = None) -> Decoded | JpegBytes:
        """paths[first], or with skip_unreadable the next readable path after it."""
        count = len(self.paths)
        for step in range(count):
            k = (first + step) % count
            if k in self._unreadable:
                continue
            try:
                return self._load(self.paths[k])
            except DataError as error:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(k)
                self.skipped.append(str(self.paths[k]))
                if skipped is not None:
                    skipped.append((str(self.paths[k]), str(error).removeprefix(f"{self.paths[k]}: ")))
        raise DataError(f"none of the {count} images could be decoded (first: {self.paths[0]})")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        # Two streams: changing the augmentation settings leaves the masks as they were.
        view_rng = generator_for(self.seed, epoch, i, "view")
        noise_rng = generator_for(self.seed, epoch, i, "noise")

        skipped: list[tuple[str, str]] = []
        loaded = self._decode(i % len(self.paths), skipped)
        params = view_params(loaded.full_size, self.crop_scale, self.hflip, view_rng)
        sample: dict[str, Any] = {
            "noise": torch.rand(self.num_units, generator=noise_rng),  # (num_units,) in [0, 1)
            "index": i, "epoch": epoch,
            "view": torch.tensor(params, dtype=torch.int64),  # (5,): top, left, height, width, flip
            "skipped": skipped,
        }
        if isinstance(loaded, JpegBytes):
            sample["jpeg"] = torch.from_numpy(np.frombuffer(loaded.data, dtype=np.uint8).copy())
        else:
            sample["image"] = pillow_view(loaded.image, loaded.reduction, params, self.img_size)  # (3, S, S)
        return sample

    def __getitems__(self, keys: list) -> list[dict[str, Any] | LoadFailure]:
        """A batch's samples, as the loader fetches them. A decode error becomes a LoadFailure
        (one line, no worker traceback) that `collate_samples` turns into the batch."""
        try:
            return [self[key] for key in keys]
        except DataError as error:
            return [LoadFailure(str(error))]

    def collate(self):
        """The loader's collate_fn for this dataset (a plain function: cheap to send to workers)."""
        return functools.partial(collate_samples, img_size=self.img_size)


def collate_samples(samples: list[dict[str, Any] | LoadFailure], img_size: int) -> dict[str, Any]:
    """Samples -> a batch: "image" (B, 3, S, S) with zeros where a JPEG awaits the GPU, "jpeg"
    (their bytes) and "jpeg_slots" (their rows), "noise", "index", "epoch", "view" (B, 5), and
    "skipped" [(file, why)]. A failed sample makes the batch {"error": message}."""
    for sample in samples:
        if isinstance(sample, LoadFailure):
            return {"error": sample.message}
    skipped = [entry for s in samples for entry in s.pop("skipped")]
    jpeg_slots = [slot for slot, s in enumerate(samples) if "jpeg" in s]
    jpeg = [samples[slot].pop("jpeg") for slot in jpeg_slots]
    images = torch.zeros(len(samples), 3, img_size, img_size)
    for slot, s in enumerate(samples):
        if "image" in s:
            images[slot] = s.pop("image")
    batch = default_collate(samples)
    batch.update(image=images, jpeg=jpeg, jpeg_slots=jpeg_slots, skipped=skipped)
    return batch


def pretrain_dataset(data: DataSettings, img_size: int, num_units: int, seed: int, *,
                     run_dir: Path | None = None, world: World | None = None, resume: bool = False,
                     jpeg_bytes: bool = False) -> tuple[PretrainImages, list[tuple[ImageRef, str]]]:
    """The pretraining dataset `data` describes, from the run's data index (built and checked
    now, or with `resume` reused after a check that the data did not change; see `index`).

    Returns the dataset and the files left out as unreadable (empty unless skip_unreadable).
    """
    index = data_index(data, run_dir, world, resume)
    dataset = PretrainImages(index.readable(), img_size, data.crop_scale, data.hflip, seed, num_units,
                             data.skip_unreadable, data.repeats, jpeg_bytes=jpeg_bytes)
    dataset.index = index
    return dataset, index.unreadable_refs()


def data_index(data: DataSettings, run_dir: Path | None, world: World | None, resume: bool) -> DataIndex:
    """The index of `data.path`: built by rank 0 (and written into `run_dir`, when there is one)
    while the other ranks wait, then read by them; with `resume`, the run's own index, once the
    data is found unchanged."""
    from localmim_cli.data import index as indexing
    from localmim_cli.data.sources import source_of
    from localmim_cli.engine import distributed

    source = source_of(data.path)
    if run_dir is None:
        return indexing.build_index(source, data.check, data.skip_unreadable)
    world = world or distributed.World()
    path = Path(run_dir) / indexing.INDEX_NAME
    if world.is_main:
        if resume and path.is_file():
            index = indexing.verify_unchanged(indexing.read_index(path), source, path)
        else:
            index = indexing.build_index(source, data.check, data.skip_unreadable)
            if resume:
                indexing.verify_fingerprint(Path(run_dir), index)
        indexing.write_index(path, index)
    distributed.barrier(world)
    return index if world.is_main else indexing.read_index(path)
