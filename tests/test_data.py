"""Data: finding, decoding, seeded augmentation, pre-flight checks, labelled sets.

Every image here is a real photo (scikit-image's sample photos) written with Pillow into tmp_path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from localmim_cli.data.images import IMAGE_SUFFIXES, PretrainImages, center_crop_transform, decode, find_images, generator_for, load_rgb, pretrain_dataset, random_resized_crop_params, resolve_image_paths, to_tensor
from localmim_cli.data.index import check_readable, fingerprint
from localmim_cli.data.labelled import LabelledImages, find_classes, split_indices
from localmim_cli.errors import DataError
from localmim_cli.data.sample_photos import SAMPLE_PHOTOS, SAMPLE_PHOTOS_CREDIT, sample_photo_paths
from localmim_cli.config.schema import DataSettings
from labelled_photos import make_labelled_sample_set

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalization: (3, H, W) -> 0..255 floats."""
    return (x * STD + MEAN) * 255


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """A few sample photos, decoded once, shrunk so the tests stay fast."""
    out = {}
    for path in sample_photo_paths()[:4]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((160, 160), Image.BICUBIC)
        out[path.stem] = img
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos) -> Path:
    """Nested folder of photos in every accepted format, plus things that are not images."""
    root = tmp_path_factory.mktemp("images")
    a, b, c, d = photos.values()
    (root / "x" / "y" / "z").mkdir(parents=True)
    a.save(root / "a.jpg", quality=95)
    b.save(root / "x" / "b.PNG")
    c.save(root / "x" / "c.webp", lossless=True)
    d.save(root / "x" / "y" / "d.bmp")
    a.save(root / "x" / "y" / "z" / "e.tiff")
    b.save(root / "x" / "y" / "z" / "f.TIF")
    c.save(root / "x" / "y" / "z" / "g.jpeg", quality=95)
    (root / "notes.txt").write_text("not an image")
    (root / "x" / "h.gif").write_bytes(b"GIF89a")  # a suffix we do not accept
    a.save(root / "x" / "._a.jpg", format="JPEG")  # macOS resource-fork litter: hidden, skipped
    (root / ".cache").mkdir()
    a.save(root / ".cache" / "thumb.jpg")
    return root


# --- sample photos ---------------------------------------------------------------------------


def test_sample_photos_are_the_licensed_rgb_photos():
    paths = sample_photo_paths()
    assert [p.name for p in paths] == sorted(SAMPLE_PHOTOS) == [p.name for p in sorted(paths)]
    assert not any("motorcycle" in p.name for p in paths)  # no licence stated
    for path in paths:
        with Image.open(path) as img:
            assert img.mode == "RGB" and min(img.size) >= 300
        assert path.name in SAMPLE_PHOTOS_CREDIT
    assert resolve_image_paths(None) == paths


# --- finding ---------------------------------------------------------------------------------


def test_find_images_recurses_filters_suffixes_and_sorts(folder):
    found = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    assert found == ["a.jpg", "x/b.PNG", "x/c.webp", "x/y/d.bmp",
                     "x/y/z/e.tiff", "x/y/z/f.TIF", "x/y/z/g.jpeg"]
    assert set(IMAGE_SUFFIXES) == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def test_find_images_takes_one_image_file_but_not_another_file(folder):
    assert find_images(folder / "a.jpg") == [folder / "a.jpg"]
    with pytest.raises(DataError, match="notes.txt"):
        find_images(folder / "notes.txt")


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: no such folder"):
        find_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as error:
        find_images(empty)
    assert str(empty) in str(error.value) and ".jpg" in str(error.value) and ".tiff" in str(error.value)


# --- decoding --------------------------------------------------------------------------------


def test_every_format_decodes_to_the_same_rgb(folder, photos):
    a, b, c, d = (np.asarray(p) for p in photos.values())
    lossless = {"x/b.PNG": b, "x/c.webp": c, "x/y/d.bmp": d, "x/y/z/e.tiff": a, "x/y/z/f.TIF": b}
    for name, expected in lossless.items():
        img = load_rgb(folder / name)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), expected), name
    jpeg = np.asarray(load_rgb(folder / "a.jpg"), dtype=float)
    assert np.abs(jpeg - a).mean() < 3  # quality-95 JPEG


def test_modes_convert_to_8bit_rgb(tmp_path, photos):
    rgb = next(iter(photos.values()))
    gray = rgb.convert("L")
    cases = {
        "gray.png": (gray, np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)),
        "palette.png": (rgb.convert("P"), np.asarray(rgb.convert("P").convert("RGB"))),
    }
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected), name

    # RGBA: opaque pixels keep their colour, transparent ones become black (documented choice).
    rgba = rgb.convert("RGBA")
    alpha = np.full(rgb.size[::-1], 255, np.uint8)
    alpha[:, : rgb.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert (out[:, : rgb.width // 2] == 0).all()
    assert np.array_equal(out[:, rgb.width // 2:], np.asarray(rgb)[:, rgb.width // 2:])

    # Palette with a transparent entry: that entry goes black too.
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal_t.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "pal_t.png"))
    assert (out[np.asarray(pal) == 0] == 0).all()

    # CMYK JPEG: Pillow's conversion, close to the original colours.
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = np.asarray(load_rgb(tmp_path / "cmyk.jpg"), dtype=float)
    assert np.abs(out - np.asarray(rgb, dtype=float)).mean() < 4


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_images_are_scaled_not_clipped(tmp_path, photos, suffix):
    gray8 = np.asarray(next(iter(photos.values())).convert("L")).astype(np.uint16)
    gray16 = gray8 * 257  # the same picture, 16-bit: 255 -> 65535
    gray16[0, :3] = (65535, 0, 257 * 100)
    Image.fromarray(gray16).save(tmp_path / f"deep{suffix}")
    with Image.open(tmp_path / f"deep{suffix}") as img:
        assert img.mode.startswith("I;16")
    out = np.asarray(load_rgb(tmp_path / f"deep{suffix}"))
    assert out.dtype == np.uint8 and out.shape == (*gray16.shape, 3)
    assert tuple(out[0, :3, 0]) == (255, 0, 100)
    expected = gray8.copy()
    expected[0, :3] = (255, 0, 100)
    assert np.array_equal(out[:, :, 1], expected)


def test_32bit_integer_and_float_images(photos):
    gray = np.asarray(next(iter(photos.values())).convert("L")).astype(np.int32)
    from localmim_cli.data.images import to_rgb

    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(gray * 257)))[:, :, 0], gray)
    stretched = np.asarray(to_rgb(Image.fromarray(gray * 100000)))[:, :, 0]  # beyond 16 bits
    assert stretched.min() == 0 and stretched.max() == 255
    unit = np.asarray(to_rgb(Image.fromarray((gray / 255).astype(np.float32))))[:, :, 0]
    assert np.abs(unit.astype(int) - gray).max() <= 1


def test_exif_orientation_is_applied(tmp_path, photos):
    rgb = next(iter(photos.values())).crop((0, 0, 160, 100))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    rgb.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    decoded = decode(tmp_path / "turned.jpg")
    assert decoded.image.size == (100, 160) and decoded.full_size == (100, 160)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="x.jpg"):
        load_rgb(bad)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_rgb(truncated)


# --- pretraining dataset ---------------------------------------------------------------------


def make_dataset(paths, **overrides) -> PretrainImages:
    options = dict(img_size=32, num_units=16, crop_scale=(0.2, 1.0), hflip=True, seed=7)
    options.update(overrides)
    return PretrainImages(paths, **options)


def test_sample_has_normalized_image_noise_and_index(folder):
    ds = make_dataset(find_images(folder), repeats=3)
    assert len(ds) == 21
    sample = ds[9]
    assert sample["index"] == 9
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["noise"].shape == (16,) and sample["noise"].dtype == torch.float32
    assert 0 <= sample["noise"].min() and sample["noise"].max() < 1
    values = pixels(sample["image"])
    assert values.min() > -0.5 and values.max() < 255.5  # a real 0..255 picture under the norm
    with pytest.raises(IndexError):
        ds[21]
    # The positional order pretrain.py uses.
    positional = PretrainImages(find_images(folder), 32, (0.2, 1.0), True, 7, 16, False, 3)
    assert torch.equal(positional[9]["image"], sample["image"])


def test_same_seed_epoch_index_gives_identical_samples(folder):
    paths = find_images(folder)
    one, two = make_dataset(paths), make_dataset(paths)
    for i in (0, 3, 6):
        a, b = one[i], two[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["noise"], b["noise"])
    # Order does not matter: asking for 6 first gives the same sample 6.
    assert torch.equal(make_dataset(paths)[6]["image"], one[6]["image"])
    # An explicit (epoch, index) key is the same as set_epoch.
    one.set_epoch(3)
    assert torch.equal(one[2]["image"], two[(3, 2)]["image"])


def test_epoch_and_seed_change_the_view(folder):
    paths = find_images(folder)
    ds = make_dataset(paths)
    first = ds[4]
    ds.set_epoch(1)
    second = ds[4]
    assert not torch.equal(first["image"], second["image"])
    assert not torch.equal(first["noise"], second["noise"])
    assert not torch.equal(make_dataset(paths, seed=8)[4]["noise"], first["noise"])
    # Augmentation settings do not move the masks: noise has its own stream.
    assert torch.equal(make_dataset(paths, hflip=False, crop_scale=(0.5, 1.0))[4]["noise"], first["noise"])


def test_loader_workers_do_not_change_samples(folder):
    ds = make_dataset(find_images(folder), repeats=2)
    ds.set_epoch(2)

    def batches(workers):
        loader = DataLoader(ds, batch_size=5, num_workers=workers, shuffle=False)
        return [(b["image"], b["noise"], b["index"]) for b in loader]

    for (i0, n0, x0), (i2, n2, x2) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(i0, i2) and torch.equal(n0, n2) and torch.equal(x0, x2)


def test_crop_params_match_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    for seed in range(200):
        width, height = [(640, 427), (100, 900), (300, 300), (50, 400)][seed % 4]
        scale = [(0.08, 1.0), (0.2, 1.0), (0.9, 1.0), (0.01, 0.02)][seed % 4]
        ours = random_resized_crop_params(width, height, scale, (3 / 4, 4 / 3), generator_for(seed))
        with torch.random.fork_rng():  # torchvision draws from the global RNG; leave it as it was
            torch.manual_seed(generator_for(seed).initial_seed())
            theirs = tv.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), scale, [3 / 4, 4 / 3])
        assert ours == tuple(theirs), seed


def test_jpeg_draft_decode_is_close_to_full_decode(tmp_path, photos):
    big = next(iter(photos.values())).resize((1600, 1600), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    fast = make_dataset([tmp_path / "big.jpg"], img_size=64, repeats=8)
    exact = make_dataset([tmp_path / "big.jpg"], img_size=64, repeats=8, draft=False)
    assert decode(tmp_path / "big.jpg", fast.draft_size).reduction == 8  # the draft is really used
    assert fast.draft_size * 8 <= 1600
    for i in range(8):
        diff = (pixels(fast[i]["image"]) - pixels(exact[i]["image"])).abs().mean().item()
        # Measured 0.25-0.75 levels of 255 here: same crop box, libjpeg's scaled IDCT vs full decode.
        assert diff < 1.5, (i, diff)


def test_unreadable_file_stops_or_is_skipped(folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "x" / "x.jpg"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    paths = find_images(root)
    k = paths.index(bad)

    with pytest.raises(DataError, match="x.jpg"):
        make_dataset(paths)[k]

    skipping = make_dataset(paths, skip_unreadable=True)
    replaced = skipping[k]
    assert skipping.skipped == [str(bad)]
    # Replaced by the next readable image, decoded with sample k's own randomness.
    assert torch.equal(replaced["image"], make_dataset([paths[k + 1]] * len(paths))[k]["image"])
    skipping[k]
    assert skipping.skipped == [str(bad)]  # remembered, not counted twice

    with pytest.raises(DataError, match=r"(?s)1 of 8 .*x\.jpg"):
        check_readable(paths, skip_unreadable=False)
    readable, unreadable = check_readable(paths, skip_unreadable=True)
    assert readable == [p for p in paths if p != bad]
    assert [p for p, _ in unreadable] == [bad]


def test_deep_check_catches_truncated_files(tmp_path, photos):
    cut = tmp_path / "cut.jpg"
    next(iter(photos.values())).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:800])
    assert check_readable([cut], skip_unreadable=False)[0] == [cut]  # the header looks fine
    with pytest.raises(DataError, match="cut.jpg"):
        check_readable([cut], skip_unreadable=False, deep=True)


def test_all_unreadable_is_an_error_even_when_skipping(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"no")
    with pytest.raises(DataError, match="none of the images"):
        check_readable([bad], skip_unreadable=True)


def test_pretrain_dataset_from_settings(folder):
    ds, unreadable = pretrain_dataset(DataSettings(path=folder, repeats=2), img_size=32,
                                      num_units=4, seed=1)
    assert len(ds) == 14 and unreadable == []
    assert ds[0]["image"].shape == (3, 32, 32)


def test_fingerprint_tracks_names_sizes_and_mtimes(folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(folder, root)  # copytree keeps mtimes
    paths = find_images(root)
    print_ = fingerprint(paths)
    assert len(print_) == 16 and fingerprint(paths) == print_
    moved = tmp_path / "moved"
    root.rename(moved)
    assert fingerprint(find_images(moved)) == print_  # relative paths: moving the folder keeps it
    target = moved / "a.jpg"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert fingerprint(find_images(moved)) != print_
    with pytest.raises(DataError, match="gone.jpg"):
        fingerprint([moved / "gone.jpg"])


# --- labelled images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labelled") / "set"
    return make_labelled_sample_set(out, n_per_class=5, size=24, seed=3)


def test_find_classes_takes_the_subfolders_and_ignores_loose_files(labelled):
    assert (labelled / "SOURCES.txt").is_file()
    assert find_classes(labelled) == sorted(p.stem for p in sample_photo_paths())


def test_labelled_images_classes_labels_and_transform(labelled):
    ds = LabelledImages(labelled, center_crop_transform(16))
    assert ds.classes == sorted(ds.classes) and len(ds) == 5 * len(ds.classes)
    assert ds.targets == sorted(ds.targets)
    x, y = ds[7]
    assert x.shape == (3, 16, 16) and y == 1 and ds.samples[7][0].parent.name == ds.classes[1]
    x, y = LabelledImages(labelled, to_tensor)[0]
    assert x.shape == (3, 24, 24) and y == 0


def test_labelled_images_errors_name_the_folder(tmp_path, photos):
    flat = tmp_path / "flat"
    flat.mkdir()
    next(iter(photos.values())).save(flat / "a.png")
    with pytest.raises(DataError, match="has no class subfolders"):
        LabelledImages(flat, to_tensor)
    (flat / "cats" / "nested").mkdir(parents=True)
    next(iter(photos.values())).save(flat / "cats" / "nested" / "c.png")
    (flat / "dogs").mkdir()
    with pytest.raises(DataError, match=r"dogs.*no images"):
        LabelledImages(flat, to_tensor)
    (flat / "dogs" / "d.jpg").write_bytes(b"")
    ds = LabelledImages(flat, to_tensor)  # nested images count; a broken file fails when read
    assert ds.classes == ["cats", "dogs"] and ds.targets == [0, 1]
    with pytest.raises(DataError, match="d.jpg"):
        ds[1]


def test_split_is_stratified_and_seeded():
    labels = [0] * 10 + [1] * 4 + [2] * 2 + [3]
    train, val = split_indices(labels, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    val_counts = np.bincount([labels[i] for i in val], minlength=4).tolist()
    assert val_counts == [2, 1, 1, 0]  # round(n/4), >=1 when the class has 2+, the lone one trains
    assert split_indices(labels, 0.25, seed=0) == (train, val)
    assert any(split_indices(labels, 0.25, seed=s)[1] != val for s in range(1, 5))
    assert split_indices(labels, 0.0, seed=0) == (list(range(len(labels))), [])
    with pytest.raises(ValueError):
        split_indices(labels, 1.0, seed=0)
