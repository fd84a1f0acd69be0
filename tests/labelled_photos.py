"""Labelled image folders for tests, made offline from the built-in sample photos."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from localmim_cli.data.images import CROP_RATIO, generator_for, load_rgb, random_resized_crop_params
from localmim_cli.data.sample_photos import SAMPLE_PHOTOS_CREDIT, sample_photo_paths


def make_labelled_sample_set(out_dir: Path, n_per_class: int, size: int, seed: int = 0, *,
                             crop_scale: tuple[float, float] = (0.2, 1.0)) -> Path:
    """An ImageFolder whose classes are the sample photos: out_dir/<photo stem>/<stem>_<k>.png,
    n_per_class seeded random-resized crops of size x size pixels from each photo, and
    SOURCES.txt crediting the photos. Returns out_dir."""
    out_dir = Path(out_dir)
    assert not out_dir.exists() or not any(out_dir.iterdir()), f"{out_dir} is not empty"
    for photo in sample_photo_paths():
        image = load_rgb(photo)
        class_dir = out_dir / photo.stem
        class_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n_per_class):
            rng = generator_for(seed, "sample-set", photo.stem, k)
            top, left, h, w = random_resized_crop_params(*image.size, crop_scale, CROP_RATIO, rng)
            crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            crop.save(class_dir / f"{photo.stem}_{k:04d}.png")
    (out_dir / "SOURCES.txt").write_text(SAMPLE_PHOTOS_CREDIT + "\n")
    return out_dir
