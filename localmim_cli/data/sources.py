"""Where training images come from: a folder, one image, a list file of paths, or tar shards.

`data.path` (DATA on the command line) may be:

- a folder: every image under it, recursively, sorted by path;
- one image file;
- a text file of image paths, one per line (relative paths are relative to the list file;
  blank lines and lines starting with "#" are ignored); the order of the lines is kept;
- tar shards in the WebDataset layout: one `.tar`, a folder holding `*.tar` files (directly in
  it: such a folder is read as shards, in name order, and nothing else in it is read), or a brace
  pattern such as `shards-{000..009}.tar`. Members are grouped into samples by their basename
  (the name up to the first dot after the last "/"); a sample's image is its member with an
  image suffix (the first in IMAGE_SUFFIXES order when there are several).

An image is referred to either by its `Path` or, inside a shard, by a `Member` (shard, name,
byte offset, size): members are read by offset, so any sample can be read in any order, which
the seeded per-(epoch, index) crops and the exact resume need.
"""

from __future__ import annotations

import itertools
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from localmim_cli.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class Member:
    """One image inside a tar shard, read by byte offset."""
    shard: Path
    name: str
    offset: int   # of the member's data, from the start of the shard
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix


ImageRef = Union[Path, Member]


def read_bytes(ref: ImageRef) -> bytes:
    """The encoded bytes of an image; a short read names the shard and member (or the file)."""
    if isinstance(ref, Member):
        try:
            with open(ref.shard, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        except OSError as error:
            raise DataError(f"{ref}: cannot read shard ({error.strerror or error})") from error
        if len(data) != ref.size:
            raise DataError(f"{ref}: shard is truncated ({len(data)} of {ref.size} bytes of the member)")
        return data
    try:
        return Path(ref).read_bytes()
    except OSError as error:
        raise DataError(f"{ref}: cannot read ({error.strerror or error})") from error


# ---------------------------------------------------------------------------------------------
# Folders and single files


def is_image(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def accepted_suffixes() -> str:
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
        raise DataError(f"{root}: not an image file (accepted suffixes: {accepted_suffixes()})")
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
        images += [Path(folder, f) for f in files if not f.startswith(".") and is_image(f)]
    if not images:
        raise DataError(f"{root}: no images found (looked recursively for {accepted_suffixes()})")
    return sorted(images)


# ---------------------------------------------------------------------------------------------
# List files


def read_list_file(list_file: Path) -> list[Path]:
    """The image paths a list file names, in its order; a missing file names the line."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{list_file}: neither an image ({accepted_suffixes()}), a {SHARD_SUFFIX} shard nor a "
                        f"text list of image paths") from error
    except OSError as error:
        raise DataError(f"{list_file}: cannot read ({error.strerror or error})") from error
    base = list_file.parent
    paths: list[Path] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise DataError(f"{list_file}, line {number}: {entry}: no such file")
        if not is_image(path):
            raise DataError(f"{list_file}, line {number}: {entry}: not an image file "
                            f"(accepted suffixes: {accepted_suffixes()})")
        paths.append(path)
    if not paths:
        raise DataError(f"{list_file}: the list names no images")
    return paths


# ---------------------------------------------------------------------------------------------
# Tar shards


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept), as WebDataset."""
    parts = _BRACES.split(pattern)  # text, lo, hi, text, lo, hi, ..., text
    choices: list[list[str]] = []
    for i, part in enumerate(parts):
        if i % 3 == 0:
            choices.append([part])
        elif i % 3 == 1:
            lo, hi = part, parts[i + 1]
            width = len(lo) if lo.startswith("0") else 0
            choices.append([str(n).zfill(width) for n in range(int(lo), int(hi) + 1)])
    return ["".join(c) for c in itertools.product(*choices)]


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (sample key, extension): the key runs up to the
    first dot of the basename, so `a/b.seg.png` is sample `a/b`, extension `seg.png`."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def shard_images(shard: Path) -> list[Member]:
    """One image member per sample of a shard, in the shard's order; a corrupt or truncated
    shard raises DataError naming it (and the member, where one is at fault)."""
    try:
        shard_size = shard.stat().st_size
        chosen: dict[str, tuple[int, Member]] = {}  # key -> (suffix rank, member)
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = sample_key(info.name)
                suffix = "." + ext.rsplit(".", 1)[-1].lower() if ext else ""
                if suffix not in IMAGE_SUFFIXES or Path(info.name).name.startswith("."):
                    continue
                if info.offset_data + info.size > shard_size:
                    raise DataError(f"{shard}:{info.name}: shard is truncated (the member needs "
                                    f"{info.offset_data + info.size} bytes, the shard has {shard_size})")
                rank = IMAGE_SUFFIXES.index(suffix)
                if key not in chosen or rank < chosen[key][0]:
                    chosen[key] = (rank, Member(shard, info.name, info.offset_data, info.size))
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{shard}: not a readable tar shard ({type(error).__name__}: {error})") from error
    return [member for _, member in chosen.values()]


def find_shards(data: Path) -> list[Path] | None:
    """The shards `data` names, or None when it names no shards."""
    text = str(data)
    if _BRACES.search(text):
        shards = [Path(p).expanduser() for p in expand_braces(text)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such shard ({len(missing)} of the {len(shards)} "
                            f"shards {text} names are missing)")
        return shards
    if data.is_file() and data.suffix.lower() == SHARD_SUFFIX:
        return [data]
    if data.is_dir():
        shards = sorted(p for p in data.iterdir() if p.suffix.lower() == SHARD_SUFFIX and p.is_file()
                        and not p.name.startswith("."))
        return shards or None
    return None


def shard_members(shards: list[Path]) -> list[Member]:
    members = [m for shard in shards for m in shard_images(shard)]
    if not members:
        raise DataError(f"{shards[0].parent if len(shards) > 1 else shards[0]}: the shards hold no "
                        f"images (looked for members ending in {accepted_suffixes()})")
    return members


# ---------------------------------------------------------------------------------------------
# What data.path names


@dataclass(frozen=True)
class Source:
    """What `data.path` names: its kind and where relative names are taken from."""
    kind: str                  # "folder", "list", "shards" or "samples" (the built-in photos)
    path: Path | None
    shards: tuple[Path, ...] = ()


def source_of(path: Path | None) -> Source:
    if path is None:
        return Source("samples", None)
    path = Path(path).expanduser().absolute()  # workers and index names need no working folder
    shards = find_shards(path)
    if shards is not None:
        return Source("shards", path, tuple(shards))
    if path.is_file() and not is_image(path):
        return Source("list", path)
    return Source("folder", path)


def list_images(source: Source) -> list[ImageRef]:
    """The images of a source, in training order (names only: nothing is opened but shards)."""
    if source.kind == "samples":
        from localmim_cli.data.sample_photos import sample_photo_paths

        return list(sample_photo_paths())
    if source.kind == "shards":
        return list(shard_members(list(source.shards)))
    if source.kind == "list":
        return list(read_list_file(source.path))
    return list(find_images(source.path))


def resolve_image_paths(path: Path | None) -> list[ImageRef]:
    """The images of `data.path`; no path means the built-in sample photos."""
    return list_images(source_of(path))
