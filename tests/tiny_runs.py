"""Folders and runs built once per session and shared by the finetune, evaluate and export tests.

Photo sets are crops of the built-in sample photos, one class per photo (7 classes). Checkpoints
to start from come from a real `localmim pretrain` run (in process, a few steps of a tiny model)
and from its weights rewritten into the authors' layout. What they build is cached under
pytest's base temp folder, so a session builds each once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from conftest import to_authors_layout
from labelled_photos import make_labelled_sample_set
from localmim_cli.data.sample_photos import sample_photo_paths
from localmim_cli.engine import checkpoints

CLASSES = sorted(p.stem for p in sample_photo_paths())

# A tiny LocalMIM: 32 px, 8 px patches, width 48, 2 layers, 6 heads (the published "small" name
# implies 6 heads, so the authors'-layout copy of it reads back with the right head count).
TINY_PRETRAIN = """
[model]
img_size = 32
taps = [1, 2]
scales = [2.0, 1.0]
[model.encoder]
name = "vit"
options = { arch = "vit_tiny", patch_size = 8, embed_dim = 48, depth = 2, num_heads = 6 }
[model.target]
name = "hog"
[model.decoder]
width = 32
depth = 1
num_heads = 2
[data]
workers = 0
[optim]
lr = 3e-3
warmup_epochs = 0
[train]
epochs = 1
batch_size = 16
log_every = 4
device = "cpu"
precision = "fp32"
"""


def shared(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per session (per xdist worker) and reused by every test file."""
    root = tmp_path_factory.getbasetemp() / "localmim-ft-shared" / name
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root)
        (root / ".done").touch()
    return root


def invoke(*args) -> str:
    """The CLI in this process (no interpreter start-up); fails the test on a non-zero exit."""
    from typer.testing import CliRunner

    from localmim_cli.cli.app import app
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def photo_sets(tmp_path_factory) -> tuple[Path, Path]:
    """(training folder: 24 crops per photo, held-out folder: 10 other crops per photo), 48 px."""
    def build(root: Path) -> None:
        make_labelled_sample_set(root / "train", n_per_class=24, size=48, seed=0)
        make_labelled_sample_set(root / "heldout", n_per_class=10, size=48, seed=1)
    root = shared(tmp_path_factory, "photos", build)
    return root / "train", root / "heldout"


def tiny_pretrain_run(tmp_path_factory) -> Path:
    """A real `localmim pretrain` run directory: one epoch of the tiny model on the photo crops."""
    train, _ = photo_sets(tmp_path_factory)

    def build(root: Path) -> None:
        (root / "tiny.toml").write_text(TINY_PRETRAIN)
        torch.manual_seed(0)
        invoke("pretrain", train, "--config", root / "tiny.toml", "--out", root / "run")
    return shared(tmp_path_factory, "pretrain", build) / "run"


def published_pth(tmp_path_factory) -> Path:
    """The tiny pretrain run's weights as the authors save them: {"model": ..., "args": ...}."""
    run = tiny_pretrain_run(tmp_path_factory)

    def build(root: Path) -> None:
        state = to_authors_layout(checkpoints.load(run).model_state())
        args = argparse.Namespace(model="MIM_vit_small_patch16", ID=[0, 1], hog_nbins=9, input_size=32)
        torch.save({"model": state, "args": args, "epoch": 1}, root / "checkpoint-1.pth")
    return shared(tmp_path_factory, "published", build) / "checkpoint-1.pth"


def run_main(capsys, *args) -> tuple[int, str]:
    """The console-script entry point (`localmim_cli.cli.app.main`, which maps user errors to exit 2)
    in this process: (exit status, stderr)."""
    from localmim_cli.cli.app import main
    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["localmim", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err
