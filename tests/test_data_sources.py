"""Where training images come from, through the real CLI: the run's data index (built once,
checked on --resume), list files and tar shards (training and resuming exactly), named errors for
bad lists and shards, and files that fail to decode only once training reads them."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import cli_env, run_cli
from localmim_cli.config.schema import DataSettings
from localmim_cli.data import index as indexing
from localmim_cli.data.images import data_index
from localmim_cli.data.sources import find_images
from localmim_cli.engine import checkpoints
from localmim_cli.errors import DataError
from tiny_runs import invoke, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_EPOCH = ["--set", "train.epochs=1", "--set", "data.repeats=2"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load(run_dir).model_state()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def write_shards(images: list[Path], root: Path, per_shard: int) -> list[Path]:
    """WebDataset layout: samples keyed by basename, an image member plus a caption member each."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, first in enumerate(range(0, len(images), per_shard)):
        shard = root / f"shards-{n:03d}.tar"
        with tarfile.open(shard, "w") as tar:
            for k, image in enumerate(images[first:first + per_shard]):
                key = f"{first + k:06d}"
                tar.add(image, arcname=f"{key}{image.suffix.lower()}")
                caption = root / "caption.txt"
                caption.write_text(f"sample {key}")
                tar.add(caption, arcname=f"{key}.txt")
        shards.append(shard)
    (root / "caption.txt").unlink()
    return shards


@pytest.fixture
def data(tmp_path, photo_folder) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(photo_folder, folder)
    return folder


# --- the index --------------------------------------------------------------------------------

def test_resume_reuses_the_index_without_opening_files(data, tmp_path, monkeypatch):
    settings = DataSettings(path=data)
    first = data_index(settings, tmp_path, None, resume=False)
    assert (tmp_path / indexing.INDEX_NAME).is_file() and len(first.readable()) == 4

    def no_opening(*args, **kwargs):
        raise AssertionError("a resume opened an image to check it")
    monkeypatch.setattr(indexing, "read_problem", no_opening)
    moved = tmp_path / "moved"
    data.rename(moved)  # the folder may move: names are relative to it
    again = data_index(DataSettings(path=moved), tmp_path, None, resume=True)
    assert again.fingerprint == first.fingerprint
    assert again.readable() == [moved / p.relative_to(data) for p in first.readable()]


def test_a_lost_index_is_rebuilt_on_resume_and_checked_against_the_manifest(data, tmp_path):
    settings = DataSettings(path=data)
    first = data_index(settings, tmp_path, None, resume=False)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"data": {"fingerprint": first.fingerprint, "index": indexing.INDEX_NAME}}))
    (tmp_path / indexing.INDEX_NAME).unlink()
    assert data_index(settings, tmp_path, None, resume=True).fingerprint == first.fingerprint
    (tmp_path / indexing.INDEX_NAME).unlink()
    shutil.copy(next(data.rglob("*.jpg")), data / "added.jpg")
    with pytest.raises(DataError, match="changed since the run started"):
        data_index(settings, tmp_path, None, resume=True)


def test_changed_folder_is_refused_on_resume_with_the_differences(data, tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    invoke("pretrain", data, "--config", tiny_config, "--out", out, *ONE_EPOCH)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["index"] == "data-index.json" and manifest["data"]["images"] == 4

    jpg = next(data.rglob("*.jpg"))
    shutil.copy(jpg, data / "added.jpg")
    os.utime(jpg, ns=(jpg.stat().st_atime_ns, jpg.stat().st_mtime_ns + 10**9))
    code, err = run_main(capsys, "pretrain", data, "--out", out, "--resume", "--epochs", "2")
    assert code == 2, err
    assert "changed since the run started" in err and "added.jpg (added)" in err
    assert f"{jpg.relative_to(data).as_posix()} (modified" in err and "another --out" in err
    assert "Traceback" not in err


# --- list files and shards train, and resume exactly, as the same images in a folder do --------

def test_list_file_and_tar_shards_train_and_resume_exactly_like_the_folder(data, tmp_path, tiny_config):
    images = find_images(data)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    lines = ["# training images", ""] + [os.path.relpath(p, listing.parent) for p in images]
    listing.write_text("\n".join(lines) + "\n")
    write_shards(images, tmp_path / "shards", per_shard=3)
    common = ["--config", tiny_config, "--set", "data.repeats=2"]

    straight = tmp_path / "straight"
    invoke("pretrain", data, *common, "--set", "train.epochs=2", "--out", straight)
    for name, source in [("list", listing), ("shards", tmp_path / "shards" / "shards-{000..001}.tar")]:
        out = tmp_path / f"run-{name}"
        invoke("pretrain", source, *common, "--set", "train.epochs=1", "--out", out)
        assert json.loads((out / "manifest.json").read_text())["data"]["kind"] == name
        invoke("pretrain", "--out", out, "--resume", "--epochs", "2")
        assert_same_weights(straight, out)


# --- bad input is named -----------------------------------------------------------------------

def test_missing_list_line_and_bad_shards_are_named(tmp_path, data, tiny_config, capsys):
    listing = tmp_path / "train.txt"
    listing.write_text(f"{next(data.rglob('*.jpg'))}\n\nmissing/photo.jpg\n")
    code, err = run_main(capsys, "pretrain", listing, "--config", tiny_config, "--dry-run")
    assert code == 2 and f"{listing}, line 3: missing/photo.jpg: no such file" in err, err

    shards = write_shards(find_images(data), tmp_path / "shards", per_shard=2)
    shards[1].write_bytes(shards[1].read_bytes()[:1200])  # cut inside the first member's data
    code, err = run_main(capsys, "pretrain", tmp_path / "shards", "--config", tiny_config, "--dry-run")
    assert code == 2 and f"{shards[1]}:" in err and "truncated" in err and "Traceback" not in err, err

    code, err = run_main(capsys, "pretrain", str(tmp_path / "shards" / "shards-{000..004}.tar"),
                         "--config", tiny_config, "--dry-run")
    assert code == 2 and "shards-002.tar: no such shard" in err, err


# --- a file that passes the header check but not decoding --------------------------------------

def test_truncated_jpeg_found_in_training_is_named_or_listed_when_skipped(data, tmp_path, tiny_config):
    cut = data / "cut.jpg"
    img = Image.open(next(data.rglob("*.png"))).convert("RGB")
    img.save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:1500])  # headers intact, scan data cut short
    args = ["--config", tiny_config, *ONE_EPOCH, "--workers", "1"]
    r = run_cli("pretrain", data, *args, "--out", tmp_path / "run", env=cli_env())
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cut.jpg" in r.stderr and "--skip-unreadable" in r.stderr and "Traceback" not in r.stderr

    out = tmp_path / "skipping"
    code_ok = invoke("pretrain", data, *args, "--out", out, "--skip-unreadable")
    assert "could not be decoded during training" in code_ok
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [entry["file"] for entry in listed] == [str(cut)]
    assert json.loads((out / "manifest.json").read_text())["data"]["skipped_during_training"] == 1


# --- large images ------------------------------------------------------------------------------

def test_a_huge_image_is_refused_by_name_before_its_pixels_are_decoded(tmp_path, capsys):
    import struct
    import zlib

    huge = tmp_path / "data" / "huge.png"
    huge.parent.mkdir()
    Image.new("RGB", (8, 8)).save(huge)
    raw = bytearray(huge.read_bytes())
    raw[16:24] = struct.pack(">II", 20000, 10000)  # IHDR says 200 megapixels; no pixels follow
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    huge.write_bytes(bytes(raw))
    code, err = run_main(capsys, "pretrain", huge.parent, "--dry-run")
    assert code == 2 and "huge.png" in err and "megapixel limit" in err and "Traceback" not in err, err


def test_large_non_jpeg_is_reduced_before_the_crop_with_the_same_geometry(tmp_path):
    from localmim_cli.data.images import PretrainImages
    from localmim_cli.data.sample_photos import sample_photo_paths

    png = next(p for p in sample_photo_paths() if p.name == "coffee.png")  # 600 x 400
    fast = PretrainImages([png], 32, (0.2, 1.0), True, seed=3, num_units=4, repeats=4)
    exact = PretrainImages([png], 32, (0.2, 1.0), True, seed=3, num_units=4, repeats=4, draft=False)
    from localmim_cli.data.decode import decode
    decoded = decode(png, fast.draft_size)
    assert decoded.reduction == 400 // fast.draft_size and decoded.full_size == (600, 400)
    for i in range(4):
        a, b = fast[i], exact[i]
        assert torch.equal(a["view"], b["view"])  # crops chosen in full-resolution pixels
        diff = ((a["image"] - b["image"]) * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255).abs()
        assert diff.mean() < 2.0, (i, diff.mean().item())  # box-reduced then bicubic vs bicubic alone
