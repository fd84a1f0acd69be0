"""The GPU data path's math, run on CPU tensors: workers send JPEG bytes with the view parameters
they drew, `place_views` decodes (torchvision's decode_jpeg, here on the CPU) and cuts the views
with `tensor_view`; the result must match the Pillow path the workers otherwise run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localmim_cli.data.augment import pillow_view, tensor_view, view_params
from localmim_cli.data.decode import decode
from localmim_cli.data.gpu_decode import place_views, uses_gpu_decode
from localmim_cli.data.images import PretrainImages, collate_samples
from localmim_cli.data.sample_photos import sample_photo_paths
from localmim_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[list[Path], list[int]]:
    """Baseline JPEGs (GPU-decodable) and files the workers must decode themselves: a PNG, a
    progressive JPEG, a CMYK JPEG and an EXIF-rotated JPEG. Returns (paths, GPU-decodable rows)."""
    root = tmp_path_factory.mktemp("gpu-path")
    photos = []
    for src in sample_photo_paths()[:4]:
        img = Image.open(src).convert("RGB")
        img.thumbnail((200, 200), Image.BICUBIC)  # small: the CPU path takes no JPEG draft either
        photos.append(img)
    paths = []
    for k, img in enumerate(photos):
        paths.append(root / f"{k}-baseline.jpg")
        img.save(paths[-1], quality=92)
    paths.append(root / "png.png")
    photos[0].save(paths[-1])
    paths.append(root / "progressive.jpg")
    photos[1].save(paths[-1], quality=92, progressive=True)
    paths.append(root / "cmyk.jpg")
    photos[2].convert("CMYK").save(paths[-1], quality=92)
    paths.append(root / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    photos[3].save(paths[-1], quality=92, exif=exif)
    return paths, [0, 1, 2, 3]


def batch_of(paths: list[Path], jpeg_bytes: bool, epoch: int = 3) -> dict:
    ds = PretrainImages(paths, SIZE, (0.2, 1.0), True, seed=7, num_units=16, jpeg_bytes=jpeg_bytes)
    return collate_samples(ds.__getitems__([(epoch, i) for i in range(len(paths))]), SIZE)


def never(epoch: int, index: int) -> torch.Tensor:
    raise AssertionError("the CPU fallback ran although the decoder took the batch")


def test_tensor_path_matches_the_pillow_path(files):
    paths, gpu_rows = files
    cpu, gpu = batch_of(paths, jpeg_bytes=False), batch_of(paths, jpeg_bytes=True)
    assert gpu["jpeg_slots"] == gpu_rows  # PNG, progressive, CMYK and rotated JPEGs stay on the CPU
    # Same crop boxes and flip decisions, same masking noise: they come from (seed, epoch, index).
    assert torch.equal(cpu["view"], gpu["view"]) and torch.equal(cpu["noise"], gpu["noise"])
    assert {bool(f) for f in cpu["view"][:, 4]} == {True, False}

    images = place_views(gpu, gpu["image"].clone(), SIZE, never)
    others = [r for r in range(len(paths)) if r not in gpu_rows]
    assert torch.equal(images[others], cpu["image"][others])
    # Decoded by torchvision's libjpeg instead of Pillow's; a different IDCT build may round a
    # pixel differently (nvJPEG on a GPU does), which no resampling can undo. Allowed: 0.01 in
    # normalized units on average (about half an 8-bit level), 2 levels at worst. Measured here:
    # 0 (both wheels carry libjpeg-turbo, and the resize reproduces Pillow's integers).
    for row in gpu_rows:
        diff = (images[row] - cpu["image"][row]).abs()
        assert diff.mean() < 0.01 and (diff * STD * 255).max() < 2.01, (row, diff.mean().item())


def test_tensor_view_equals_pillow_view_on_the_same_pixels(files):
    """The crop math alone, decoder differences aside: bit for bit, flips and reaching past the
    crop box's edges included, for views cut smaller and larger than the crop."""
    paths, _ = files
    gen = torch.Generator().manual_seed(0)
    for path in paths:
        rgb = decode(path).image
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        for size in (24, 64, 257):
            p = view_params(rgb.size, (0.05, 1.0), True, gen)
            assert torch.equal(tensor_view(pixels, p, size), pillow_view(rgb, 1, p, size)), (path, size, p)


def test_a_batch_the_decoder_refuses_takes_the_cpu_path(files):
    paths, gpu_rows = files
    cpu, gpu = batch_of(paths, jpeg_bytes=False), batch_of(paths, jpeg_bytes=True)
    gpu["jpeg"][0] = gpu["jpeg"][0][:200]  # a JPEG the decoder cannot finish
    ds = PretrainImages(paths, SIZE, (0.2, 1.0), True, seed=7, num_units=16)
    images = place_views(gpu, gpu["image"].clone(), SIZE, lambda e, i: ds[(e, i)]["image"])
    assert torch.equal(images, cpu["image"])


def test_gpu_decode_is_chosen_only_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert uses_gpu_decode("auto", cuda) and uses_gpu_decode("gpu", cuda)
    assert not uses_gpu_decode("auto", cpu) and not uses_gpu_decode("cpu", cuda)
    with pytest.raises(UsageError, match="data.decode"):
        uses_gpu_decode("gpu", cpu)
