"""`localmim visualize`: figures of what each scale predicts, checked as images and as numbers.

Small HOG-target and pixel-target models are saved as our checkpoints; the real CLI runs on them
as a subprocess on the built-in sample photos. The figures are read back with Pillow and checked
against the layout the sidecar states, against a direct model forward, and against each other.
Refusals and replays go through the same `cli.main()` in this process, to save interpreter starts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import run_cli
from localmim_cli.errors import CheckpointError, UsageError
from localmim_cli.engine import checkpoints
from localmim_cli.model.build import build_model
from localmim_cli.tasks.figure import paste_visible, unit_mask_to_pixels
from localmim_cli.model.masking import keep_count
from localmim_cli.data.sample_photos import sample_photo_paths
from localmim_cli.seeding import derive_seed
from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice, PretrainSettings
from localmim_cli.targets.base import ReconstructionTarget
from localmim_cli.targets.hog import HOGOptions, HOGTarget
from localmim_cli.targets.pixel import PixelOptions, PixelTarget
from localmim_cli.data.prepared import prepare_image
from localmim_cli.tasks.visualize import (load_for_visualize, read_mask_file, seeded_masks,
                                    write_progress_figure)

IMG = 64
SHARED = Path(os.environ.get("LOCALMIM_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
CARD = SHARED / "conformance" / "vit_hog_reference"


def small_settings(target: str) -> ModelSettings:
    return ModelSettings(
        encoder=PluginChoice(name="vit", options={"arch": None, "patch_size": 16, "embed_dim": 64,
                                                  "depth": 4, "num_heads": 4}),
        target=PluginChoice(name=target), img_size=IMG, taps=[1, 2, 3, 4],
        decoder=DecoderSettings(width=32, num_heads=4))


def save_run(run: Path, model, settings: ModelSettings, kind: str = "pretrain") -> Path:
    meta = {"kind": kind, "position": {"epoch": 1, "micro_step": 0, "step": 1},
            "settings": PretrainSettings(model=settings).model_dump(mode="json")}
    return checkpoints.save(run / "checkpoints", "step-00000001", model.state_dict(), meta)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and does not stall on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    made = {}
    for target in ("hog", "pixel"):
        settings = small_settings(target)
        torch.manual_seed(1)
        model = build_model(settings).eval()
        step = save_run(root / f"run-{target}", model, settings)
        made[target] = {"run": root / f"run-{target}", "step": step, "model": model, "settings": settings}
    made["root"] = root
    return made


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`localmim visualize ARGS` in a fresh interpreter (one thread, no LOCALMIM_* settings)."""
    return run_cli("visualize", *args, cwd=cwd)


def main_in_process(*args, capsys, monkeypatch) -> tuple[int, str]:
    """`localmim visualize ARGS` through cli.main() in this process (the same error handling as
    the console script, without a second interpreter start): (exit status, stderr unwrapped)."""
    from localmim_cli import cli as cli_module

    monkeypatch.delenv("LOCALMIM_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["localmim", "visualize", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    code = exit_info.value.code or 0
    assert code == 0 or code == 2, captured
    return code, " ".join(captured.err.split())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def photos(n: int | None = None) -> list[Path]:
    paths = sample_photo_paths()
    return paths if n is None else paths[:n]


def read_figure(png: Path) -> tuple[np.ndarray, dict]:
    sidecar = json.loads(png.with_suffix(".json").read_text())
    with Image.open(png) as im:
        assert im.mode == "RGB"
        return np.asarray(im), sidecar


def panel(figure: np.ndarray, layout: dict, row: int, name: str) -> np.ndarray:
    """Crop one panel out of a figure, where the sidecar's layout says it is."""
    col = layout["panels"].index(name)
    x = layout["pad"] + col * (layout["panel_px"] + layout["pad"])
    y = layout["header_px"] + layout["pad"] + row * layout["row_px"] + layout["title_px"]
    return figure[y:y + layout["panel_px"], x:x + layout["panel_px"]]


def zoom(pixels: np.ndarray, size: int) -> np.ndarray:
    f = size // pixels.shape[0]
    return np.repeat(np.repeat(pixels, f, axis=0), f, axis=1)


def direct_losses(model, path: Path, index: int, seed: int) -> list[float]:
    """The contract of --seed: image i's noise is torch.rand(L) from a CPU generator seeded with
    derive_seed(seed, "visualize", i); MAE's rule turns it into the mask."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "visualize", index))
    noise = torch.rand(model.num_units, generator=gen)
    with torch.no_grad():
        out = model(prepare_image(path, IMG).tensor[None], noise=noise[None])
    return out.losses.tolist()


# -- drawing targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("nbins,b,block", [(9, 0, 0), (9, 2, 1), (9, 4, 2), (9, 7, 0), (18, 13, 1)])
def test_one_bin_hog_cell_draws_a_line_at_the_bins_angle(nbins, b, block):
    hog = HOGTarget(HOGOptions(nbins=nbins), [32])
    cells = np.zeros((1, 1, 3 * nbins))
    cells[0, 0, block * nbins + b] = 0.7  # one bin of one colour channel
    img = hog.render(cells, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
    lit = img[..., 0] > 0
    assert img[..., 0].max() == 255  # the cell's largest bin is drawn white

    theta = (b + 0.5) * math.pi / nbins  # bin centre; edge direction, counter-clockwise on screen
    direction = np.array([math.cos(theta), -math.sin(theta)])  # (column, row): rows go down
    normal = np.array([math.sin(theta), math.cos(theta)])
    rows, cols = np.nonzero(lit)
    offsets = np.stack([cols + 0.5 - 16, rows + 0.5 - 16], axis=1)
    assert np.abs(offsets @ normal).max() <= 0.5 + 1e-6  # every lit pixel is on the line
    along = offsets @ direction
    assert along.min() < -13 and along.max() > 13  # and it spans the cell, both ways
    centres = offsets + 16  # lit pixel centres, (column, row)
    for r in (-12, -6, 6, 12):  # points on the line at the bin's angle have a lit pixel on them ...
        point = 16 + r * direction
        assert np.linalg.norm(centres - point, axis=1).min() <= math.sqrt(0.5) + 1e-9, (r, theta)
    for r in (-10, -5, 5, 10):  # ... points along the gradient's direction have none near
        point = 16 + r * normal
        assert np.linalg.norm(centres - point, axis=1).min() > 2, (r, theta)


def test_hog_glyph_length_and_size_follow_bin_weights_and_cell_size():
    hog = HOGTarget(HOGOptions(nbins=9), [4, 16])
    cells = np.zeros((2, 3, 27))
    cells[..., 4] = 1.0       # vertical (90 degrees), full weight
    cells[..., 9 + 0] = 0.5   # 10 degrees, half: summed over R, G, B blocks before drawing
    assert hog.render(cells, 4).shape == (16, 24, 3)    # at least 8 px per cell
    assert hog.render(cells, 16).shape == (32, 48, 3)
    assert hog.render(cells, 16, zoom=2).shape == (64, 96, 3)
    img = hog.render(cells[:1, :1], 32)[..., 0]
    vertical = img[:, 15:17].max(axis=1) == 255
    assert vertical.sum() >= 28
    near_horizontal = (img > 0) & (img < 255)
    assert 0 < near_horizontal.sum() and np.ptp(np.nonzero(near_horizontal)[1]) <= 16  # half length
    assert img[near_horizontal].max() == 128  # half the weight, half the brightness
    # A prediction's negative weights draw nothing; an all-zero cell stays black.
    assert not hog.render(-np.ones((1, 1, 27)), 8).any()
    # Weight common to all bins is not drawn: a flat histogram with one raised bin draws that bin alone.
    flat = np.full((1, 1, 27), 0.3)
    flat[..., 4] = 0.5
    assert np.array_equal(hog.render(flat, 32), hog.render(cells[:1, :1] * np.eye(27)[4], 32))
    assert not hog.render(np.full((1, 1, 27), 0.3), 8).any()


@pytest.mark.parametrize("alpha", [15, 40, 90, 125, 165])
def test_hog_glyph_of_an_edge_lies_along_that_edge(alpha):
    """Ties the drawing to the target's own convention: an edge at `alpha` degrees (on screen,
    counter-clockwise from horizontal) lands in the bin whose glyph is drawn within a bin of it."""
    nbins = 9
    hog = HOGTarget(HOGOptions(nbins=nbins), [16])
    a = math.radians(alpha)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    edge = torch.sigmoid(((xs - 32) * math.sin(a) + (ys - 32) * math.cos(a)) / 2)
    with torch.no_grad():
        cells = hog(edge.expand(1, 3, 64, 64))[0][0].reshape(4, 4, 3, nbins)
    hist = cells[1:3, 1:3].sum(dim=(0, 1, 2))  # the central cells, R+G+B
    b = int(hist.argmax())
    drawn = (b + 0.5) * 180 / nbins
    diff = abs((drawn - alpha + 90) % 180 - 90)
    assert diff <= 180 / nbins, (alpha, b, drawn)
    glyph = hog.render(cells[1:2, 1:2].reshape(1, 1, -1).numpy(), 16)[..., 0]
    rows, cols = np.nonzero(glyph == 255)
    offsets = np.stack([cols + 0.5 - 8, rows + 0.5 - 8], axis=1)
    principal = np.linalg.svd(offsets - offsets.mean(0))[2][0]
    angle = math.degrees(math.atan2(-principal[1], principal[0])) % 180
    assert abs((angle - drawn + 90) % 180 - 90) < 3


@pytest.mark.parametrize("cell", [2, 4, 16, 32])
def test_pixel_render_of_the_target_gives_the_input_back(cell):
    target = PixelTarget(PixelOptions(), [cell])
    for path in photos(3):
        image = prepare_image(path, IMG)
        with torch.no_grad():
            cells = target(image.tensor[None])[0][0].reshape(IMG // cell, IMG // cell, -1)
        np.testing.assert_array_equal(target.render(cells, cell, image.tensor), image.pixels)
    plain = PixelTarget(PixelOptions(normalize=False), [cell])
    with torch.no_grad():
        cells = plain(image.tensor[None])[0][0].reshape(IMG // cell, IMG // cell, -1)
    np.testing.assert_array_equal(plain.render(cells, cell), image.pixels)


def test_pixel_prediction_takes_the_true_cells_statistics():
    target = PixelTarget(PixelOptions(), [16])
    image = prepare_image(photos(1)[0], IMG)
    flat = np.zeros((4, 4, 3 * 16 * 16))  # a prediction of "no variation": the true cell means
    drawn = target.render(flat, 16, image.tensor).astype(float)
    truth = image.tensor.reshape(3, 4, 16, 4, 16).permute(1, 3, 0, 2, 4).reshape(4, 4, -1).mean(-1)
    rgb = np.asarray([0.229, 0.224, 0.225]) * truth.numpy()[..., None] + [0.485, 0.456, 0.406]
    expected = np.repeat(np.repeat(rgb * 255, 16, axis=0), 16, axis=1)
    assert np.abs(drawn - expected).max() <= 0.5 + 1e-6


class CellMeans(ReconstructionTarget):
    """A target as a third-party plugin writes one: each cell's mean colour, drawn as flat tiles
    at a zoom it asks for, with its own legend. Without `drawing` it has no render at all."""

    legend = "Cell means: each cell's mean colour as a flat tile."
    min_draw_px = 12

    def __init__(self, cells_px: list[int], drawing: bool = True):
        super().__init__()
        self.cells_px, self.dims, self.drawing, self.zooms = list(cells_px), [3] * len(cells_px), drawing, []

    def forward(self, images):
        # (B, 3, H, W) -> (B, (H/c)*(W/c), 3)
        return [torch.nn.functional.avg_pool2d(images, c).flatten(2).transpose(1, 2) for c in self.cells_px]

    def render(self, cells, cell_px, image=None, *, zoom=None):
        if not self.drawing:
            raise NotImplementedError
        self.zooms.append(zoom)
        tiles = np.clip(np.asarray(cells) * 64 + 128, 0, 255).astype(np.uint8)
        side = cell_px * zoom
        return np.repeat(np.repeat(tiles, side, axis=0), side, axis=1)


@pytest.mark.parametrize("drawing", [True, False])
def test_plugin_targets_are_drawn_through_the_target_interface_alone(runs, tmp_path, drawing):
    from localmim_cli.model.localmim import DecoderShape, LocalMIM
    from localmim_cli.tasks.visualize import prepare_images, write_figure

    encoder = runs["hog"]["model"].encoder
    target = CellMeans([4, 8, 16, 32], drawing)
    model = LocalMIM(encoder, target, [4.0, 2.0, 1.0, 0.5], DecoderShape(32, 1, 4)).eval()
    images = prepare_images(photos(1), IMG)
    side = write_figure(model, images, seeded_masks(0, 1, model.num_units, 0.75), tmp_path / "means.png",
                        source="test", target_name="means", seed=0)
    assert side["layout"]["panels"] == ["input", "masked"] + [f"scale{k}.{w}" for k in range(4)
                                                              for w in ("target", "prediction")]
    if drawing:
        # 12 px per cell asked for, 4 px cells: every scale drawn at zoom 3, so panels are 3 x 64 px
        assert target.zooms == [3] * 8 and side["layout"]["panel_px"] == 3 * IMG
        assert side["notes"][0] == CellMeans.legend
    else:
        assert side["layout"]["panel_px"] == 2 * IMG  # 64 px maps, zoomed to the legible minimum
        assert "it has no drawing: each cell's vector length" in side["notes"][0]


def test_paste_keeps_visible_patches_exactly(runs):
    model = runs["pixel"]["model"]
    image = prepare_image(photos(1)[0], IMG)
    mask = seeded_masks(5, 1, model.num_units, 0.75)
    with torch.no_grad():
        out = model(image.tensor[None], mask=mask)
    pred = model.target.render(out.preds[0][0].reshape(16, 16, -1), 4, image.tensor)
    pasted = paste_visible(pred, image.pixels, mask[0].numpy(), model.encoder.unit_grid, 16)
    hidden = unit_mask_to_pixels(mask[0].numpy(), model.encoder.unit_grid, 16)
    assert pasted.dtype == np.uint8 and pasted.shape == image.pixels.shape
    assert hidden.sum() == 12 * 16 * 16
    np.testing.assert_array_equal(pasted[~hidden], image.pixels[~hidden])
    np.testing.assert_array_equal(pasted[hidden], pred[hidden])
    assert not np.array_equal(pred[~hidden], image.pixels[~hidden])  # an untrained model's guess


# -- masks ---------------------------------------------------------------------------------------


def test_seeded_masks_are_fixed_and_follow_the_ratio():
    a = seeded_masks(0, 3, 196, 0.75)
    assert torch.equal(a, seeded_masks(0, 3, 196, 0.75))
    assert (a.sum(1) == 196 - keep_count(196, 0.75)).all()
    assert not torch.equal(a[0], a[1])  # each image its own mask
    assert not torch.equal(a, seeded_masks(1, 3, 196, 0.75))
    assert (seeded_masks(0, 2, 196, 0.5).sum(1) == 98).all()
    with pytest.raises(UsageError, match="mask-ratio"):
        seeded_masks(0, 1, 16, 1.5)


def test_mask_file_is_validated(tmp_path):
    good = np.zeros(16)
    good[:12] = 1
    np.save(tmp_path / "one.npy", good)
    assert read_mask_file(tmp_path / "one.npy", 3, 16, 0.75).shape == (3, 16)
    (tmp_path / "two.json").write_text(json.dumps([good.tolist(), good[::-1].tolist()]))
    assert torch.equal(read_mask_file(tmp_path / "two.json", 2, 16)[1], torch.tensor(good[::-1].copy(), dtype=torch.float32))
    for content, n, ratio, match in [
        (np.zeros(15), 1, None, r"\(16,\)"),
        (np.stack([good] * 2), 3, None, "2 masks for 3 images"),
        (good * 2, 1, None, "0 \\(visible\\) or 1"),
        (np.zeros(16), 1, None, "hide some"),
        (good, 1, 0.5, "hides 8"),
    ]:
        np.save(tmp_path / "bad.npy", content)
        with pytest.raises(UsageError, match=match):
            read_mask_file(tmp_path / "bad.npy", n, 16, ratio)


# -- the command ------------------------------------------------------------------------------


def test_hog_figure_on_all_sample_photos(runs):
    run = runs["hog"]["run"]
    ok(cli(run, cwd=runs["root"]))  # no images: the sample photos; no --out: RUN/figures/
    png = run / "figures" / "reconstruction.png"
    figure, side = read_figure(png)
    layout = side["layout"]
    paths = photos()
    # [input | masked | target, prediction per scale], one row per photo, 8 px glyphs for 4 px cells
    assert layout["panels"] == ["input", "masked"] + [f"scale{k}.{w}" for k in range(4)
                                                      for w in ("target", "prediction")]
    assert layout["panel_px"] == 2 * IMG and layout["rows"] == len(paths)
    assert figure.shape == (layout["height"], layout["width"], 3)
    assert layout["width"] == layout["pad"] + 10 * (layout["panel_px"] + layout["pad"])
    assert side["target"] == "hog" and side["cells_px"] == [4, 8, 16, 32] and side["seed"] == 0
    assert [Path(i["path"]).name for i in side["images"]] == [p.name for p in paths]
    model = runs["hog"]["model"]
    for i, (item, path) in enumerate(zip(side["images"], paths)):
        assert item["hidden"] == 12 and len(item["mask"]) == 16
        np.testing.assert_allclose(item["losses"], direct_losses(model, path, i, seed=0), rtol=1e-4)
        pixels = prepare_image(path, IMG).pixels
        np.testing.assert_array_equal(panel(figure, layout, i, "input"), zoom(pixels, layout["panel_px"]))
        masked = panel(figure, layout, i, "masked")
        hidden = zoom(unit_mask_to_pixels(item["mask"], (4, 4), 16), layout["panel_px"])
        assert (masked[hidden] == 128).all()
        np.testing.assert_array_equal(masked[~hidden], zoom(pixels, layout["panel_px"])[~hidden])
        glyphs = panel(figure, layout, i, "scale0.target")
        assert (glyphs[..., 0] == glyphs[..., 2]).all() and glyphs.max() == 255


def test_pixel_figure_pastes_reconstructions_into_the_visible_image(runs):
    step = runs["pixel"]["step"]
    out = runs["root"] / "pixel" / "fig.png"
    paths = photos(2)
    result = ok(cli(step, *paths, "--out", out, "--seed", 3, cwd=runs["root"]))
    assert "fig.png" in result.stdout
    figure, side = read_figure(out)
    layout = side["layout"]
    assert layout["panels"] == ["input", "masked"] + [f"scale{k}.{w}" for k in range(4)
                                                      for w in ("target", "prediction", "pasted")]
    assert figure.shape == (layout["height"], layout["width"], 3) and layout["rows"] == 2
    assert any("un-normalized with true cell statistics" in n for n in side["notes"])
    model = runs["pixel"]["model"]
    for i, (item, path) in enumerate(zip(side["images"], paths)):
        np.testing.assert_allclose(item["losses"], direct_losses(model, path, i, seed=3), rtol=1e-4)
        pixels = zoom(prepare_image(path, IMG).pixels, layout["panel_px"])
        hidden = zoom(unit_mask_to_pixels(item["mask"], (4, 4), 16), layout["panel_px"])
        for k in range(4):
            np.testing.assert_array_equal(panel(figure, layout, i, f"scale{k}.target"), pixels)
            pasted = panel(figure, layout, i, f"scale{k}.pasted")
            np.testing.assert_array_equal(pasted[~hidden], pixels[~hidden])
            np.testing.assert_array_equal(pasted[hidden], panel(figure, layout, i, f"scale{k}.prediction")[hidden])


def test_same_seed_gives_identical_png_bytes_and_another_seed_another_mask(runs):
    step, root = runs["pixel"]["step"], runs["root"]
    first = root / "pixel" / "fig.png"
    if not first.is_file():  # written by the test above; made here when run alone
        ok(cli(step, *photos(2), "--out", first, "--seed", 3, cwd=root))
    again = root / "seeds" / "again.png"
    ok(cli(step, *photos(2), "--out", again, "--seed", 3, cwd=root))
    assert first.read_bytes() == again.read_bytes()
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (first, again))
    assert a["images"] == b["images"] and a["seed"] == b["seed"] == 3
    # Masks depend on the seed, the image's position and the patch count only: the HOG model's
    # figure (16 patches too, seed 0) must show other masks for the same two photos.
    hog_png = runs["hog"]["run"] / "figures" / "reconstruction.png"
    if not hog_png.is_file():
        ok(cli(runs["hog"]["run"], cwd=root))
    seed0 = json.loads(hog_png.with_suffix(".json").read_text())["images"][:2]
    assert [Path(i["path"]).name for i in seed0] == [Path(i["path"]).name for i in a["images"]]
    assert all(x["mask"] != y["mask"] for x, y in zip(seed0, a["images"]))
    assert [x["mask"] for x in seed0] == seeded_masks(0, 2, 16, 0.75).int().tolist()


def test_mask_from_replays_a_previous_figure(runs, capsys, monkeypatch):
    step, root = runs["pixel"]["step"], runs["root"]
    first = root / "pixel" / "fig.png"
    if not first.is_file():
        ok(cli(step, *photos(2), "--out", first, "--seed", 3, cwd=root))
    replay = root / "seeds" / "replay.png"
    code, err = main_in_process(step, *photos(2), "--out", replay, "--mask-from", first.with_suffix(".json"),
                                capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    a, d = (json.loads(p.with_suffix(".json").read_text()) for p in (first, replay))
    assert [x["mask"] for x in d["images"]] == [x["mask"] for x in a["images"]]
    assert d["seed"] is None and d["mask_from"].endswith("fig.json")
    np.testing.assert_allclose([x["losses"] for x in d["images"]], [x["losses"] for x in a["images"]], rtol=1e-5)


def test_progress_figure_uses_the_same_fixed_masks(runs, tmp_path):
    model = runs["hog"]["model"]
    model.train()
    side = write_progress_figure(model, photos(2), tmp_path / "epoch-1.png", seed=0, target_name="hog",
                                 title="epoch 1")
    assert model.training  # mode restored
    model.eval()
    again = write_progress_figure(model, photos(2), tmp_path / "epoch-2.png", seed=0, target_name="hog",
                                  title="epoch 1")
    assert (tmp_path / "epoch-1.png").read_bytes() == (tmp_path / "epoch-2.png").read_bytes()
    expected = seeded_masks(0, 2, 16, 0.75).int().tolist()  # as `visualize --seed 0` draws them
    assert [i["mask"] for i in side["images"]] == expected == [i["mask"] for i in again["images"]]


def test_refuses_checkpoints_without_decoders(runs, tmp_path, capsys, monkeypatch):
    model, settings = runs["hog"]["model"], runs["hog"]["settings"]
    encoder = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    monkeypatch.chdir(tmp_path)
    code, message = main_in_process(tmp_path / "encoder.safetensors", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "encoder.safetensors" in message and "decoders" in message
    assert "pretraining run directory" in message
    # timm-style keys (an exported encoder) and a fine-tuned checkpoint of ours
    save_file({k.removeprefix("encoder."): v for k, v in encoder.items()}, str(tmp_path / "timm.safetensors"))
    code, message = main_in_process(tmp_path / "timm.safetensors", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "timm.safetensors" in message and "decoders" in message
    save_run(tmp_path / "finetuned", model, settings, kind="finetune")
    code, message = main_in_process(tmp_path / "finetuned", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "'finetune'" in message and "decoders" in message
    assert "pretraining run directory" in message
    assert not (tmp_path / "reconstruction.png").exists()


def authors_layout(state: dict) -> dict:
    """Our state dict in the published LocalMIM key layout (the inverse of published.to_our_keys)."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.tap_norms."):
            out["norm." + key.removeprefix("encoder.tap_norms.")] = value
        elif key.startswith("encoder."):
            out[key.removeprefix("encoder.")] = value
        elif key.startswith("decoders."):
            out["decoder." + key.removeprefix("decoders.")] = value
    return out


def test_load_for_visualize_accepts_every_checkpoint_form(runs, tmp_path):
    import argparse

    run, step, model = runs["hog"]["run"], runs["hog"]["step"], runs["hog"]["model"]
    for form in (run, run / "checkpoints", step, step / "model.safetensors"):
        loaded, settings, source = load_for_visualize(form)
        assert not loaded.training and "pretraining checkpoint" in source and "step 1" in source
        assert settings["model"]["target"]["name"] == "hog"
        for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    published = authors_layout(model.state_dict())
    torch.save({"model": published, "args": argparse.Namespace(ID=[0, 1, 2, 3])}, tmp_path / "authors.pth")
    loaded, settings, source = load_for_visualize(tmp_path / "authors.pth")
    assert "published" in source and loaded.cells_px == model.cells_px
    assert torch.equal(loaded.decoders[3].pred[1].weight, model.decoders[3].pred[1].weight)
    # An authors' fine-tuned model (encoder and head, no decoders) and a timm export folder
    finetuned = {k: v for k, v in published.items() if not k.startswith(("decoder.", "norm."))}
    torch.save({"model": {**finetuned, "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}},
               tmp_path / "finetuned.pth")
    with pytest.raises(CheckpointError, match="classification model.*decoders"):
        load_for_visualize(tmp_path / "finetuned.pth")
    (tmp_path / "export").mkdir()
    save_file({k: v.contiguous() for k, v in finetuned.items()}, str(tmp_path / "export" / "model.safetensors"))
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only encoder weights.*decoders"):
        load_for_visualize(tmp_path / "export")


def test_refuses_missing_images_and_bad_masks(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "photo.jpg"
    code, message = main_in_process(runs["hog"]["run"], photos(1)[0], missing, capsys=capsys,
                                    monkeypatch=monkeypatch)
    assert code == 2 and str(missing) in message
    np.save(tmp_path / "short.npy", np.ones(10))
    code, message = main_in_process(runs["hog"]["run"], photos(1)[0], "--mask-from", tmp_path / "short.npy",
                                    "--out", tmp_path / "x.png", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "short.npy" in message and "16" in message
    code, message = main_in_process(runs["hog"]["run"], "--seed", 1, "--mask-from", tmp_path / "short.npy",
                                    capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "--seed or --mask-from" in message
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "reconstruction.png").exists()


# -- published checkpoints and the reference preprocessing ----------------------------------------


needs_reference = pytest.mark.skipif(not CARD.with_suffix(".json").is_file(),
                                     reason=f"conformance reference not found under {SHARED}")


@needs_reference
def test_preprocessing_matches_the_reference():
    from safetensors.torch import load_file
    ref = load_file(str(CARD.with_suffix(".safetensors")))
    names = json.loads(CARD.with_suffix(".json").read_text())["images"]
    folder = photos()[0].parent
    for i, name in enumerate(names):
        image = prepare_image(folder / name, 224)
        np.testing.assert_array_equal(image.pixels, ref["images_uint8"][i].permute(1, 2, 0).numpy())
        assert torch.equal(image.tensor, ref["images"][i])


@needs_reference
def test_published_checkpoint_with_the_reference_masks(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    ref = load_file(str(CARD.with_suffix(".safetensors")))
    weights = CARD.with_name(CARD.name + "_weights.safetensors")
    model, settings, source = load_for_visualize(weights)
    assert "published" in source and settings["model"]["img_size"] == 224
    np.save(tmp_path / "mask.npy", ref["mask"].numpy())
    folder = photos()[0].parent
    names = json.loads(CARD.with_suffix(".json").read_text())["images"]
    code, err = main_in_process(weights, *[folder / n for n in names], "--mask-from", tmp_path / "mask.npy",
                                "--out", tmp_path / "pub.png", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    figure, side = read_figure(tmp_path / "pub.png")
    assert figure.shape == (side["layout"]["height"], side["layout"]["width"], 3)
    assert side["layout"]["panel_px"] == 448  # 4 px cells drawn at 8 px
    per_image = np.asarray([i["losses"] for i in side["images"]])
    # Equal hidden counts: the reference's batch loss is the mean of the per-image losses.
    expected = [ref[f"loss.scale{k}"].item() for k in range(4)]
    np.testing.assert_allclose(per_image.mean(axis=0), expected, rtol=1e-5)
