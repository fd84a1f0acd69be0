"""The built-in sample photos: real RGB photographs that ship inside scikit-image's wheel.

They make `localmim pretrain` runnable with no data folder and let the tests use real photos
offline. Only the photos whose licence scikit-image states are used (public domain or CC0);
`motorcycle_left/right.png` are left out because no licence is stated for them. Seven scenes are
enough for a smoke test or a demo, not for a benchmark.

The folder is found with `importlib.util.find_spec`, which does not import scikit-image (its
import is slow and pulls in scipy); only the data files are read, with Pillow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from localmim_cli.errors import DataError

# file name in `<skimage>/data/` -> (what it shows, where it comes from, licence), as stated in
# scikit-image 0.26's `skimage/data/_fetchers.py` docstrings.
SAMPLE_PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut.png": ("astronaut Eileen Collins, 512x512", "NASA Great Images", "public domain"),
    "chelsea.png": ("Chelsea the cat, 451x300", "Stefan van der Walt", "CC0"),
    "coffee.png": ("a coffee cup, 600x400", "Rachel Michetti, Pikolo Espresso Bar", "CC0"),
    "hubble_deep_field.jpg": ("Hubble eXtreme Deep Field, 1000x872", "NASA / HubbleSite",
                              "public domain"),
    "ihc.png": ("immunohistochemistry of colonic glands, 512x512", "CMMI",
                "no known copyright restrictions"),
    "retina.jpg": ("human retina fundus photograph, 1411x1411", "Mikael Haggstrom, Wikimedia Commons",
                   "CC0 1.0"),
    "rocket.jpg": ("DSCOVR launch on Falcon 9, 640x427", "SpaceX", "public domain"),
}

SAMPLE_PHOTOS_CREDIT = (
    "Built-in sample photos: seven photographs shipped with scikit-image (BSD-3-Clause package), "
    "each public domain or CC0 as stated in scikit-image's docstrings:\n"
    + "\n".join(f"- {name}: {what}; {source}; {licence}"
                for name, (what, source, licence) in sorted(SAMPLE_PHOTOS.items()))
)


def skimage_data_dir() -> Path:
    """`<site-packages>/skimage/data`, without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in sample photos come from scikit-image, which is not installed: "
                        "`pip install scikit-image`, or give a data path")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sample_photo_paths() -> list[Path]:
    """The sample photos present in this scikit-image install, sorted by file name.

    The order is fixed (it decides dataset indices and class labels), so it is by name rather
    than by anything the install could change. A photo missing from a future scikit-image is
    left out rather than failing; having none at all is an error.
    """
    folder = skimage_data_dir()
    paths = [folder / name for name in sorted(SAMPLE_PHOTOS) if (folder / name).is_file()]
    if not paths:
        raise DataError(f"{folder}: none of the built-in sample photos ({', '.join(sorted(SAMPLE_PHOTOS))}) "
                        "is there; reinstall scikit-image, or give a data path")
    return paths
