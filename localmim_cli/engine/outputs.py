"""Where a command may write: one rule for every folder and file a user names as an output.

    a folder (pretrain/finetune --out, export --out)   written when missing or empty; replaced,
                                                       with --overwrite, only when it is
                                                       recognisably the same kind of localmim
                                                       output (a run directory, an export folder)
    a file (visualize --out, evaluate --out)           written when missing; overwritten, with
                                                       --overwrite, only when localmim wrote it as
                                                       that kind of file (its mark, below)
    never                                              inside a checkpoint folder or a run's
                                                       checkpoints/; over, inside or around what
                                                       the command reads (an export's source run,
                                                       a fine-tune's --init)

A file localmim writes carries its mark: JSON files a "written_by" entry ("localmim evaluate"),
PNG figures a text chunk of the same name. Nothing else is ever replaced.

`check_folder` and `check_file` decide before anything is computed or written, and change nothing,
so a dry run makes the same decision as the real start (including whether the place can be written
at all). The callers then write: a run directory is cleared by engine/runs.py, an export folder
replaced by renaming a finished temporary folder over it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from localmim_cli.errors import OutputError
from localmim_cli.weights.locate import LATEST

WRITTEN_BY = "written_by"   # the JSON entry, and the PNG text chunk, that marks a file as ours
LOCK = ".localmim.lock"     # a run directory's lock file (engine/runs.py); not content


def mark(command: str) -> str:
    """The mark of files `localmim COMMAND` writes, e.g. "localmim visualize"."""
    return f"localmim {command}"


# -- what a folder or file is -------------------------------------------------------------------


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_dir(folder: Path) -> bool:
    """A localmim run directory: its manifest.json says localmim wrote it, or it holds
    settings.json and a checkpoints/ folder with checkpoints in it."""
    manifest = _json_object(folder / "manifest.json")
    if manifest is not None and "localmim" in manifest:
        return True
    checkpoints = folder / "checkpoints"
    return (folder / "settings.json").is_file() and checkpoints.is_dir() and (
        (checkpoints / LATEST).is_file() or any(checkpoints.glob("step-*")))


def is_export_folder(folder: Path) -> bool:
    """A `localmim export` folder: config.json with its "localmim" block, and model.safetensors
    (or, for --format detectron2 / mmdet, the file that block names)."""
    config = _json_object(folder / "config.json")
    ours = config.get("localmim") if config is not None else None
    if not isinstance(ours, dict):
        return False
    file = ours.get("file") if isinstance(ours.get("file"), str) else "model.safetensors"
    return Path(file).name == file and (folder / file).is_file()


def is_checkpoint_area(folder: Path) -> bool:
    """A checkpoint folder (meta.json beside model.safetensors), or a run's checkpoints/ folder."""
    if (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file():
        return True
    return folder.name == "checkpoints" and ((folder / LATEST).is_file() or is_run_dir(folder.parent))


def json_marked(path: Path, command: str) -> bool:
    data = _json_object(path)
    return data is not None and data.get(WRITTEN_BY) == mark(command)


def png_marked(path: Path, command: str) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(WRITTEN_BY) == mark(command)
    except (OSError, UnidentifiedImageError, ValueError):
        return False


@dataclass(frozen=True)
class FolderKind:
    what: str                        # "localmim run directory"
    holds: str                       # what tells it apart, for the refusal
    recognise: Callable[[Path], bool]
    reuse: str                       # what to pass to write into a non-empty one


@dataclass(frozen=True)
class FileKind:
    what: str                        # "figure written by `localmim visualize`"
    recognise: Callable[[Path], bool]


RUN = FolderKind("localmim run directory", "a manifest.json written by localmim, or settings.json with "
                 "checkpoints/", is_run_dir, "pass --resume to continue that run or --overwrite to replace it")
EXPORT = FolderKind("localmim export folder", 'config.json with a "localmim" block, and model.safetensors',
                    is_export_folder, "pass --overwrite to replace an earlier export")
FIGURE = FileKind("figure written by `localmim visualize`", lambda p: png_marked(p, "visualize"))
FIGURE_SIDECAR = FileKind("figure sidecar written by `localmim visualize`", lambda p: json_marked(p, "visualize"))
EVALUATION = FileKind("results file written by `localmim evaluate`", lambda p: json_marked(p, "evaluate"))


# -- the rule ----------------------------------------------------------------------------------


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK] if folder.is_dir() else []


def refuse_protected(out: Path, flag: str = "--out", reads: Iterable[Path | str] = ()) -> None:
    """Refuse an output inside a checkpoint folder or a run's checkpoints/ (symlinks followed),
    and one that is, lies inside or holds any of `reads` (what the command reads)."""
    out = Path(out).expanduser()
    target = out.resolve()
    for folder in (target, *target.parents):
        if is_checkpoint_area(folder):
            raise OutputError(f"{flag} {out}: inside {folder}, which holds localmim checkpoints; nothing is "
                              "ever written inside checkpoints: pick a path outside it")
    for source in reads:
        real = source_root(Path(source))
        if real == target or real in target.parents or target in real.parents:
            where = "is" if real == target else "lies inside" if real in target.parents else "holds"
            run = "" if real == Path(source).expanduser().resolve() else f" (the run {source} belongs to)"
            raise OutputError(f"{flag} {out} {where} {real}{run}, which this command reads; refusing to write "
                              f"over or inside it: pick an {flag} outside it")


def source_root(path: Path) -> Path:
    """What reading `path` reads, to keep outputs off it: the run directory it lies in (a
    checkpoint of a run), else the file or folder itself; symlinks followed."""
    real = path.expanduser().resolve()
    return next((folder for folder in (real, *real.parents) if is_run_dir(folder)), real)


def check_writable(out: Path, flag: str = "--out") -> None:
    """Whether `out` can be created (or written) where it is: its nearest existing folder takes a
    new entry. Tried for real (a hidden folder made and removed at once), since permission bits
    say nothing about read-only or virtual file systems, nor about what root may do."""
    out = Path(out).expanduser()
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out}: {parent} is a file, so nothing can be written under it; "
                          f"pick another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".localmim-probe-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot be written ({parent}: {exc.strerror or exc}); "
                          f"pick another {flag}") from None


def check_folder(out: Path, kind: FolderKind, overwrite: bool, *, flag: str = "--out",
                 reads: Iterable[Path | str] = ()) -> bool:
    """Whether `out` may be written as a `kind` folder; an OutputError naming it when not.
    Returns True when it holds an earlier output of that kind, which the write replaces."""
    out = Path(out).expanduser()
    refuse_protected(out, flag, reads)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a folder; pick another {flag}")
    check_writable(out, flag)
    if not _entries(out):
        return False
    if not overwrite:
        raise OutputError(f"{flag} {out} is not empty: {kind.reuse}, or pick a new {flag}")
    if not kind.recognise(out):
        raise OutputError(f"--overwrite: {out} is not a {kind.what} (it lacks {kind.holds}); refusing to "
                          f"delete it: pick an empty or new {flag}")
    return True


def check_file(out: Path, kind: FileKind, overwrite: bool, *, flag: str = "--out",
               reads: Iterable[Path | str] = ()) -> bool:
    """Whether `out` may be written as a `kind` file; an OutputError naming it when not.
    Returns True when it is an earlier file of that kind, which the write replaces."""
    out = Path(out).expanduser()
    refuse_protected(out, flag, reads)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a folder; name the file to write")
    check_writable(out, flag)
    if not (out.exists() or out.is_symlink()):
        return False
    if out.is_symlink() or not kind.recognise(out):
        raise OutputError(f"{flag} {out} exists and is not a {kind.what}; refusing to overwrite it: "
                          f"pick another {flag}")
    if not overwrite:
        raise OutputError(f"{flag} {out} exists (an earlier {kind.what}); pass --overwrite to replace it, "
                          f"or pick another {flag}")
    return True


def clear_folder(folder: Path) -> None:
    """Empty a folder `check_folder` allowed to be replaced (its lock file stays: it is held)."""
    import shutil

    for entry in _entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
