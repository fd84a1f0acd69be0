"""Shared fixtures: the real CLI as a subprocess, a tiny run configuration, real photos on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TINY_TOML = """
[model]
img_size = 32
taps = [1, 2, 3, 4]
scales = [4.0, 2.0, 1.0, 0.5]

[model.encoder]
name = "vit"
options = { arch = "vit_tiny", patch_size = 8, embed_dim = 32, depth = 4, num_heads = 2 }

[model.decoder]
width = 32
num_heads = 2

[data]
workers = 0
repeats = 4

[optim]
base_lr = 5e-3
warmup_epochs = 1

[train]
epochs = 2
batch_size = 4
log_every = 1
device = "cpu"
precision = "fp32"
"""


def cli_env(**extra: str) -> dict[str, str]:
    # Not MLFLOW_TRACKING_URI either: an in-process MLflow run of an earlier test exports it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALMIM_") and k != "MLFLOW_TRACKING_URI"}
    # One thread per process keeps runs bit-reproducible and stops two processes fighting for cores.
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    env.update(extra)
    return env


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`localmim ARGS...` in a fresh interpreter, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "localmim_cli", *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(), cwd=cwd, timeout=timeout)


@pytest.fixture
def one_thread():
    """One intra-op thread: reproducible, and far faster than two threads on a busy 2-core box.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """A nested folder of real photos (the built-in sample photos, as JPEG and PNG)."""
    from PIL import Image

    from localmim_cli.data.sample_photos import sample_photo_paths

    root = tmp_path_factory.mktemp("photos")
    for i, src in enumerate(sample_photo_paths()[:4]):
        sub = root / ("a" if i % 2 else "b") / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.open(src).convert("RGB")
        img.thumbnail((160, 160))
        img.save(sub / f"{src.stem}.{'jpg' if i % 2 else 'png'}")
    return root


def to_authors_layout(state: dict) -> dict:
    """Our LocalMIM state dict in the published key layout (published.to_our_keys, inverted),
    with the fixed Sobel weights the published files carry, one per decoder."""
    import torch

    out = {}
    for key, value in state.items():
        if key == "target.sobel_bias":
            for k, pair in enumerate(value):
                out[f"hog_enc.{k}.conv.bias"] = pair.clone()
            continue
        if m := re.fullmatch(r"encoder\.tap_norms\.(\d+)\.(.*)", key):
            new = f"norm.{m.group(1)}.{m.group(2)}"
        elif m := re.fullmatch(r"encoder\.(cls_token|pos_embed|patch_embed\..*|blocks\..*)", key):
            new = m.group(1)
        elif m := re.fullmatch(r"decoders\.(\d+)\.(.*)", key):
            new = f"decoder.{m.group(1)}.{m.group(2)}"
        else:
            raise AssertionError(f"no published name for {key}")
        out[new] = value.clone()
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    n_decoders = len({k.split(".")[1] for k in out if k.startswith("decoder.")})
    for k in range(n_decoders):
        out[f"hog_enc.{k}.conv.weight"] = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1)
    return out
