"""What a fine-tuning task's `localmim visualize` figure is, and the drawing the tasks share.

`localmim visualize RUN IMAGES...` draws a pretraining run's reconstructions (tasks/visualize.py);
for a fine-tuning run it draws what the task predicts, through the task's own figure: the
`figure` its entry in config/tasks.py names ("module:attribute" of a `TaskFigure`), chosen by
the task the checkpoint records. tasks/visualize.py keeps what every figure shares (the output
rule, the images, the device) and branches on no task's name.

Drawing helpers for dense predictions: one colour per class, overlays on the image, panels
letterboxed to a square (the figure's panels are square; images keep their aspect ratio), a
legend panel of colour swatches and names, and the PNG + JSON sidecar written as visualize
writes its figures (marked, so only an earlier figure of localmim's is ever replaced).
"""

from __future__ import annotations

import colorsys
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from localmim_cli.tasks.figure import BACKGROUND, PAD, TEXT, Panel, font

if TYPE_CHECKING:
    import torch

MIN_PANEL_PX = 160            # room for a legend line such as "background 8% | 43%"
MAX_PANEL_PX = 384
ALPHA = 0.5                      # the class colour's share of an overlaid pixel
SWATCH_PX = 10


@dataclass(frozen=True)
class FigureRequest:
    checkpoint: Path              # as given: a run directory, its checkpoints/, one checkpoint
    images: list[Path]            # image files, found
    out: Path                     # the PNG to write (already checked against the output rule)
    device: "torch.device"
    options: dict[str, Any]       # the figure flags given, each one the figure's `options` names


class TaskFigure(ABC):
    """One fine-tuning task's figure."""

    default_name: str              # RUN/figures/<default_name> when --out is left out
    what: str                      # "a segmentation run's figure", for messages
    options: frozenset[str] = frozenset()   # the visualize flags it takes (their Python names)

    @abstractmethod
    def draw(self, request: FigureRequest) -> dict[str, Any]:
        """Run the checkpoint's model on the images, write request.out and its sidecar
        (`write`); return the sidecar. Each sidecar image has a one-line "summary"."""


def figure_for(path: Path) -> TaskFigure | None:
    """The figure of the fine-tuning task a checkpoint records (its settings' "task"), or None:
    a pretraining checkpoint, a task without a figure, or anything that is not one of our
    checkpoints (the reconstruction figure then says what it needs)."""
    from localmim_cli.config.tasks import FINETUNE_TASKS
    from localmim_cli.errors import UserError
    from localmim_cli.weights.locate import CheckpointFolder, locate

    try:
        found = locate(path)
    except UserError:
        return None
    if not isinstance(found, CheckpointFolder) or found.kind == "pretrain":
        return None
    settings = found.meta.get("settings")
    info = FINETUNE_TASKS.get(settings.get("task")) if isinstance(settings, dict) else None
    if info is None or info.figure is None:
        return None
    module, _, attribute = info.figure.partition(":")
    return getattr(importlib.import_module(module), attribute)


def describe_checkpoint(path: Path) -> str:
    """One line: the checkpoint folder a path leads to, its kind and position."""
    from localmim_cli.weights.locate import checkpoint_folder

    found = checkpoint_folder(path)
    position = found.meta.get("position") or {}
    where = ", ".join(f"{k} {position[k]}" for k in ("epoch", "step") if k in position)
    return f"{found.folder} ({found.kind} checkpoint{', ' + where if where else ''})"


# -- colours and panels ------------------------------------------------------------------------


def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8, one colour per class: hues a golden angle apart (neighbouring classes far
    apart on the colour wheel), saturation and brightness alternating so that colours whose hues
    come round again still differ. The same n gives the same colours in every figure."""
    colours = []
    for k in range(n):
        hue = (k * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6)[k % 2]
        value = (0.95, 0.75, 0.55)[(k // 2) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)


def overlay(pixels: np.ndarray, labels: np.ndarray, colours: np.ndarray, ignore: int | None = None) -> np.ndarray:
    """The image with each pixel's class colour blended in at ALPHA; `ignore` labels stay as they are."""
    labels = np.asarray(labels)
    drawn = labels != ignore if ignore is not None else np.ones(labels.shape, bool)
    out = pixels.astype(np.float32)
    tint = colours[np.where(drawn, labels, 0)].astype(np.float32)
    out[drawn] = (1 - ALPHA) * out[drawn] + ALPHA * tint[drawn]
    return np.rint(out).astype(np.uint8)


def blend_where(pixels: np.ndarray, where: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The image with `colour` blended in at ALPHA where `where` (H, W) is true."""
    out = pixels.copy()
    out[where] = np.rint((1 - ALPHA) * pixels[where] + ALPHA * colour.astype(np.float32)).astype(np.uint8)
    return out


def panel_side(sizes: list[tuple[int, int]]) -> int:
    """One side for every panel of a figure: the largest image side, within MIN..MAX_PANEL_PX."""
    return int(min(max(max(max(s) for s in sizes), MIN_PANEL_PX), MAX_PANEL_PX))


@dataclass(frozen=True)
class Fit:
    """Where an image lies in its square panel: scaled by `scale`, its top-left at (x, y)."""
    scale: float
    x: int
    y: int
    width: int
    height: int


def fit(height: int, width: int, side: int) -> Fit:
    scale = side / max(height, width)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return Fit(scale, (side - w) // 2, (side - h) // 2, w, h)


def letterbox(pixels: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 resized (keeping its aspect ratio) into a side x side panel, centred on
    the figure's background."""
    f = fit(pixels.shape[0], pixels.shape[1], side)
    image = Image.fromarray(pixels)
    if (f.width, f.height) != image.size:
        resample = Image.NEAREST if f.scale >= 1 and float(f.scale).is_integer() else Image.BILINEAR
        image = image.resize((f.width, f.height), resample)
    panel = Image.new("RGB", (side, side), BACKGROUND)
    panel.paste(image, (f.x, f.y))
    return np.asarray(panel)


def blank(side: int) -> np.ndarray:
    return np.full((side, side, 3), BACKGROUND, dtype=np.uint8)


@dataclass(frozen=True)
class LegendEntry:
    colour: np.ndarray            # (3,) uint8
    text: str


def legend(entries: list[LegendEntry], side: int, heading: str | None = None) -> tuple[np.ndarray, int]:
    """A panel of colour swatches, each with its text, one per line, as many as fit; a last line
    says how many more there are. Returns (the panel, how many entries it shows)."""
    f = font()
    top, bottom = f.getbbox("Ag")[1::2]
    line = max(int(bottom - min(top, 0)) + 4, SWATCH_PX + 4)
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = PAD
    if heading:
        draw.text((PAD, y), heading, fill=TEXT, font=f)
        y += line
    room = max((side - y - PAD) // line, 1)
    shown = len(entries) if len(entries) <= room else room - 1
    for entry in entries[:shown]:
        x0, y0 = PAD, y + (line - SWATCH_PX) // 2
        draw.rectangle((x0, y0, x0 + SWATCH_PX - 1, y0 + SWATCH_PX - 1), fill=tuple(int(c) for c in entry.colour),
                       outline=TEXT)
        draw.text((x0 + SWATCH_PX + 4, y), clip_text(entry.text, side - x0 - SWATCH_PX - 4 - PAD, f),
                  fill=TEXT, font=f)
        y += line
    if shown < len(entries):
        draw.text((PAD, y), f"+ {len(entries) - shown} more (in the sidecar)", fill=TEXT, font=f)
    return np.asarray(image), shown


def clip_text(text: str, width: int, f) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


# -- writing ----------------------------------------------------------------------------------


def write(rows: list[list[Panel]], side: int, header: list[str], out: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Compose the rows, write the PNG and its sidecar (out.json) atomically, both marked as
    visualize's (engine/outputs.py). Returns the sidecar as written, with the layout in it."""
    from localmim_cli.engine import atomic
    from localmim_cli.engine.outputs import WRITTEN_BY, mark
    from localmim_cli.tasks.figure import compose, png_bytes

    figure, layout = compose(rows, side, header)
    sidecar = {WRITTEN_BY: mark("visualize"), "figure": out.name, **sidecar,
               "layout": {**layout.as_dict(), "panels": [p.name for p in max(rows, key=len)]}}
    atomic.write_bytes(out, png_bytes(figure, {WRITTEN_BY: mark("visualize")}))
    atomic.write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def percent(part: int, whole: int) -> str:
    share = 100 * part / whole if whole else 0.0
    return f"{share:.0f}%" if share >= 1 or share == 0 else "<1%"
