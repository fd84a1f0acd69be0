"""Labelled image folders for tests from Fashion-MNIST (Zalando's product photos, MIT licence), as
Debian's `dataset-fashion-mnist` installs it (`.ci/run` installs the package on a clean machine).

A set is a class-folder subset of the 60,000 training images: a seeded, balanced draw per class,
28 px greyscale upscaled to the run's size and saved as RGB PNGs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(name: str, offset: int) -> np.ndarray:
    path = FASHION_MNIST / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install Debian's dataset-fashion-mnist "
                                f"(apt-get install dataset-fashion-mnist; .ci/run does it)")
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def make_fashion_mnist_sets(out_dir: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """(out_dir/train, out_dir/val): n_train and n_val different images per class of the
    training file, drawn with `seed`, each size x size pixels (bicubic from 28 px)."""
    images = read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx("train-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    for label, name in enumerate(CLASSES):
        chosen = rng.permutation(np.flatnonzero(labels == label))[:n_train + n_val]
        for part, indices in (("train", chosen[:n_train]), ("val", chosen[n_train:])):
            folder = out_dir / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                image = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB")
                image.save(folder / f"{name}_{i:05d}.png")
    (out_dir / "SOURCES.txt").write_text("Fashion-MNIST (Zalando Research, MIT licence), from Debian's "
                                         "dataset-fashion-mnist: a balanced subset of its training file\n")
    return out_dir / "train", out_dir / "val"
