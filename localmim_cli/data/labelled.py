"""Labelled images (fine-tuning and evaluation): the ImageFolder layout and a seeded split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from localmim_cli.data.decode import load_rgb
from localmim_cli.data.sources import accepted_suffixes, find_images
from localmim_cli.errors import DataError
from localmim_cli.seeding import derive_seed



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
                                f"(accepted suffixes: {accepted_suffixes()})") from error
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
