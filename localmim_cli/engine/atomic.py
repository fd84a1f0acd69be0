"""Writes that either happen whole or not at all: write a temporary sibling, fsync, rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def normal_permissions(path: Path) -> None:
    """What a plain open() gives a new file: 0666 less the umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Call writer(tmp_path), then move tmp_path onto path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        # mkstemp creates the file private (0600), and some writers (safetensors) make their own
        # file that way; give the result the permissions a plain open() would.
        normal_permissions(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, whole or not at all, readable like any other file the run writes."""
    from safetensors.torch import save_file

    write_with(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda p: p.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
