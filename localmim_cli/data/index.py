"""The data index of a run: every training image, listed and checked once, then reused.

A run's first start lists its images (a folder walk, a list file, or the members of tar shards),
stats them, checks their headers in parallel (`data.check`), and writes `data-index.json` into
the run directory: names relative to a base folder, sizes and mtimes, tar member offsets, the
unreadable files left out, and a fingerprint. Under torchrun only rank 0 does this; the other
ranks wait at a barrier and read the file.

`--resume` reads the index instead of checking every file again: it only lists and stats, and
refuses to go on when the listing changed (files added, removed, or with another size or mtime),
since each dataset index would then read another image and the steps per epoch could change.
The folder itself may move (`data.path` may change on resume): names are relative to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from PIL import Image

from localmim_cli.data.decode import decode, open_image
from localmim_cli.data.sources import ImageRef, Member, Source, find_images, list_images, read_list_file
from localmim_cli.engine import atomic
from localmim_cli.errors import DataError

INDEX_NAME = "data-index.json"
FORMAT = 1
Check = Literal["header", "full", "none"]

_SHOWN_BAD = 20  # bad files listed in an error message; the rest are counted
_SHOWN_CHANGES = 5


def _threads(threads: int | None) -> int:
    return threads or min(32, 4 * (os.cpu_count() or 1))  # file I/O bound: threads overlap it


# ---------------------------------------------------------------------------------------------
# Reading every file once before training


def read_problem(ref: ImageRef, deep: bool) -> str | None:
    """None if `ref` looks readable, else why not."""
    try:
        if deep:
            decode(ref, draft_size=64)  # full decode, cheap for JPEGs at 1/8 scale
        else:
            with open_image(ref) as img:
                img.verify()  # header (and PNG chunk CRCs); does not decode pixels
        return None
    except DataError as error:
        return str(error).removeprefix(f"{ref}: ")
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def check_readable(paths: Sequence[ImageRef], skip_unreadable: bool, *, deep: bool = False,
                   threads: int | None = None) -> tuple[list[ImageRef], list[tuple[ImageRef, str]]]:
    """Open every file before training, so a bad one stops the run before the first step.

    Header check by default (catches non-images and most corrupt files in milliseconds each);
    `deep` decodes fully, which also catches truncated files. Returns (readable, unreadable);
    unreadable is non-empty only with skip_unreadable, else any bad file raises DataError
    listing them.
    """
    refs = [p if isinstance(p, Member) else Path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=_threads(threads)) as pool:
        problems = list(pool.map(lambda ref: read_problem(ref, deep), refs))
    return _split_readable(refs, problems, skip_unreadable)


def _split_readable(refs: list[ImageRef], problems: list[str | None], skip_unreadable: bool):
    readable = [p for p, problem in zip(refs, problems) if problem is None]
    unreadable = [(p, problem) for p, problem in zip(refs, problems) if problem is not None]
    if unreadable and (not skip_unreadable or not readable):
        shown = "\n".join(f"  {p}: {why}" for p, why in unreadable[:_SHOWN_BAD])
        more = f"\n  ... and {len(unreadable) - _SHOWN_BAD} more" if len(unreadable) > _SHOWN_BAD else ""
        advice = ("none of the images can be read" if not readable
                  else "fix or remove them, or pass --skip-unreadable (data.skip_unreadable) "
                  "to leave them out")
        raise DataError(f"{len(unreadable)} of {len(refs)} image files cannot be read "
                        f"({advice}):\n{shown}{more}")
    return readable, unreadable


def fingerprint(paths: Sequence[Path]) -> str:
    """16 hex digits of sha256 over (relative path, size, mtime) of each file, in order.

    Cheap (stat only, no contents), and relative to the files' common folder, so moving the
    folder keeps it. Order counts: it decides which image each dataset index reads.
    """
    paths = [Path(p).absolute() for p in paths]
    if not paths:
        return hashlib.sha256(b"").hexdigest()[:16]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
        except OSError as error:
            raise DataError(f"{p}: cannot stat ({error.strerror})") from error
        digest.update(f"{p.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The index


FileStat = tuple[str, int, int]  # (name relative to the base, size, mtime in ns)


@dataclass(frozen=True)
class DataIndex:
    kind: str                          # Source.kind
    base: Path                         # names are relative to it
    files: list[FileStat]              # the images, or for shards the shard files
    members: list[tuple[int, str, int, int]]  # shards: (file number, member name, offset, size)
    unreadable: list[tuple[int, str]]  # (image number, why), left out with skip_unreadable
    check: str                         # how the images were checked when the index was built

    def images(self) -> list[ImageRef]:
        """Every listed image, in training order (unreadable ones included)."""
        if self.kind == "shards":
            shards = [self.base / name for name, _, _ in self.files]
            return [Member(shards[f], name, offset, size) for f, name, offset, size in self.members]
        return [self.base / name for name, _, _ in self.files]

    def readable(self) -> list[ImageRef]:
        bad = {i for i, _ in self.unreadable}
        return [ref for i, ref in enumerate(self.images()) if i not in bad]

    def unreadable_refs(self) -> list[tuple[ImageRef, str]]:
        images = self.images()
        return [(images[i], why) for i, why in self.unreadable]

    @property
    def fingerprint(self) -> str:
        """16 hex digits over the names, sizes and mtimes (and members) of what is trained on."""
        digest = hashlib.sha256(self.kind.encode())
        bad = {i for i, _ in self.unreadable}
        for name, size, mtime in self.files:
            digest.update(f"{name}\0{size}\0{mtime}\n".encode())
        for f, name, offset, size in self.members:
            digest.update(f"{f}\0{name}\0{offset}\0{size}\n".encode())
        digest.update(("unreadable:" + ",".join(map(str, sorted(bad)))).encode())
        return digest.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.kind, "base": str(self.base), "check": self.check,
                "fingerprint": self.fingerprint, "files": self.files, "members": self.members,
                "unreadable": self.unreadable}


def read_index(path: Path) -> DataIndex:
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
        return DataIndex(raw["kind"], Path(raw["base"]), [tuple(f) for f in raw["files"]],
                         [tuple(m) for m in raw["members"]], [tuple(u) for u in raw["unreadable"]],
                         raw["check"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a readable data index ({error}); delete it to rebuild it "
                        f"from the data folder, if the data is unchanged") from error


def write_index(path: Path, index: DataIndex) -> None:
    atomic.write_text(path, json.dumps(index.to_json(), separators=(",", ":")) + "\n")


def _listing(source: Source) -> tuple[Path, list[Path]]:
    """(base, the files to stat): the images, or for shards the shard files. Nothing is opened."""
    if source.kind == "shards":
        files = list(source.shards)
    elif source.kind == "list":
        files = read_list_file(source.path)
    elif source.kind == "folder":
        files = find_images(source.path)
    else:
        files = [Path(p) for p in list_images(source)]
    if source.kind == "folder" and source.path.is_dir():
        base = source.path
    else:
        base = Path(os.path.commonpath([p.absolute().parent for p in files]))
    return base, files


def _relative(path: Path, base: Path) -> str:
    text, prefix = str(path), str(base).rstrip(os.sep) + os.sep
    if text.startswith(prefix):  # the common case (a folder's own images): no path arithmetic
        return text[len(prefix):].replace(os.sep, "/")
    return os.path.relpath(path.absolute(), base.absolute()).replace(os.sep, "/")


def _stat(path: Path, base: Path) -> FileStat:
    try:
        st = os.stat(path)
    except OSError as error:
        raise DataError(f"{path}: cannot stat ({error.strerror})") from error
    return _relative(path, base), st.st_size, st.st_mtime_ns


def _stat_all(files: list[Path], base: Path) -> list[FileStat]:
    # One after the other: a stat of a listed folder's file costs microseconds, less than a
    # thread pool's bookkeeping per item.
    return [_stat(p, base) for p in files]


def _stat_and_check(path: Path, base: Path, check: Check) -> tuple[FileStat, str | None]:
    return _stat(path, base), None if check == "none" else read_problem(path, check == "full")


def build_index(source: Source, check: Check, skip_unreadable: bool, *, threads: int | None = None) -> DataIndex:
    """List, stat and check (`check`: header, full, or none) every image of `source`. The
    checks run in threads, each with its file's stat: both wait on the file system."""
    base, files = _listing(source)
    members: list[tuple[int, str, int, int]] = []
    if source.kind == "shards":
        stats = _stat_all(files, base)
        number = {p: i for i, p in enumerate(files)}
        refs: list[ImageRef] = list(list_images(source))
        members = [(number[m.shard], m.name, m.offset, m.size) for m in refs]
        if check == "none":
            problems: list[str | None] = [None] * len(refs)
        else:
            with ThreadPoolExecutor(max_workers=_threads(threads)) as pool:
                problems = list(pool.map(lambda ref: read_problem(ref, check == "full"), refs))
    else:
        refs = list(files)
        with ThreadPoolExecutor(max_workers=_threads(threads)) as pool:
            done = list(pool.map(lambda p: _stat_and_check(p, base, check), files, chunksize=64))
        stats, problems = [s for s, _ in done], [why for _, why in done]
    _split_readable(refs, problems, skip_unreadable)  # raises unless skipping
    unreadable = [(i, why) for i, why in enumerate(problems) if why is not None]
    return DataIndex(source.kind, base, stats, members, unreadable, check)


def changes(before: list[FileStat], now: list[FileStat]) -> list[str]:
    """What differs between two listings, one line each: + added, - removed, ~ changed."""
    old = {name: (size, mtime) for name, size, mtime in before}
    new = {name: (size, mtime) for name, size, mtime in now}
    out = [f"- {name} (removed)" for name in old if name not in new]
    out += [f"+ {name} (added)" for name in new if name not in old]
    for name in old.keys() & new.keys():
        (s0, m0), (s1, m1) = old[name], new[name]
        if s0 != s1:
            out.append(f"~ {name} (size {s0} -> {s1} bytes)")
        elif m0 != m1:
            out.append(f"~ {name} (modified since the run started)")
    if not out and [n for n, _, _ in before] != [n for n, _, _ in now]:
        out.append("the order of the listed files changed")
    return sorted(out, key=lambda line: line[2:])


def verify_unchanged(index: DataIndex, source: Source, index_path: Path) -> DataIndex:
    """The index, if `source` still lists exactly the files it was built from; else DataError
    naming the first differences. Lists and stats only: no file is opened."""
    if source.kind != index.kind:
        raise DataError(f"{source.path}: the run trained on a {index.kind} source ({index.base}), "
                        f"not a {source.kind}; resume with the data it started with")
    try:
        base, files = _listing(source)
    except DataError as error:
        raise DataError(f"the run's data is no longer readable as it was when the run started: "
                        f"{error}") from error
    now = _stat_all(files, base)
    if now != index.files:
        diffs = changes(index.files, now)
        shown = "; ".join(diffs[:_SHOWN_CHANGES])
        more = f"; and {len(diffs) - _SHOWN_CHANGES} more" if len(diffs) > _SHOWN_CHANGES else ""
        raise DataError(
            f"{source.path or base}: the data changed since the run started ({len(diffs)} difference(s): "
            f"{shown}{more}). Resuming would change which image each step reads. Put the data back "
            f"as it was, or start a new run on the changed data (another --out); {index_path} "
            f"lists what the run started with")
    return replace(index, base=base)


def verify_fingerprint(run_dir: Path, index: DataIndex) -> None:
    """A resumed run whose data-index.json is gone (deleted, or the run predates it): compare the
    fingerprint its manifest.json recorded with the index just built from the data now."""
    try:
        data = json.loads((run_dir / "manifest.json").read_text())["data"]
        recorded = data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing recorded to compare with
    if not recorded:
        return
    if "index" in data:
        now = index.fingerprint
    elif index.kind == "shards":
        return  # runs before the index could not read shards
    else:
        now = fingerprint(index.readable())  # how runs before the index fingerprinted their files
    if now != recorded:
        raise data_changed(index.base, run_dir, "fingerprint", recorded, now)


def data_changed(data: Path | str, run_dir: Path, key: str, recorded: str, now: str) -> DataError:
    """The one-line refusal of a resume whose data is not what the run started with."""
    return DataError(f"{data}: the data changed since the run started ({key} {recorded} in "
                     f"{run_dir / 'manifest.json'}, {now} now: files were added, removed or modified). "
                     f"Put the data back as it was, or start a new run on the changed data (another --out)")


def verify_recorded_data(run_dir: Path, now: dict[str, Any], data: Path | str, val_data: Path | str | None) -> None:
    """A resumed fine-tuning run: every fingerprint in its manifest.json "data" (the training
    images, the validation images, per split) against the same record made from the data now.
    `data` and `val_data` name the folders (a key with "val" in its path is the validation side,
    when a separate folder holds it)."""
    try:
        recorded = json.loads((run_dir / "manifest.json").read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing recorded to compare with
    for key, was in _fingerprints(recorded):
        is_now = dict(_fingerprints(now)).get(key)
        if was and is_now is not None and is_now != was:
            where = val_data if val_data is not None and "val" in key else data
            raise data_changed(where, run_dir, key, was, is_now)


def _fingerprints(record: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every entry named *fingerprint in a nested data record."""
    if not isinstance(record, dict):
        return []
    out = []
    for k, v in record.items():
        if isinstance(v, dict):
            out += _fingerprints(v, f"{prefix}{k}.")
        elif str(k).endswith("fingerprint") and isinstance(v, str):
            out.append((f"{prefix}{k}", v))
    return out
