"""Atomic writes: whole or not at all, with the permissions a plain open() would give."""

from __future__ import annotations

import os

import pytest

from localmim_cli.engine import atomic


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "settings.json"
    atomic.write_text(target, "old")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_with(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_safetensors_and_checkpoints_are_readable_by_others(tmp_path):
    """safetensors creates its file 0600; written through atomic, it gets the umask's 0644."""
    import torch

    from localmim_cli.engine import checkpoints

    old = os.umask(0o022)
    try:
        atomic.write_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        saved = checkpoints.save(tmp_path / "checkpoints", "step-1", {"w": torch.zeros(2)}, {})
    finally:
        os.umask(old)
    for path in (tmp_path / "t.safetensors", saved / "model.safetensors", saved / "meta.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
