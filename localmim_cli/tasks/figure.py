"""Composing reconstruction figures with Pillow: square panels with titles, one row per image.

Everything here is deterministic: the same arrays and titles give the same PNG bytes (no
timestamps or other metadata are written, text is drawn with Pillow's bundled default font).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 6                      # pixels between panels and around the figure
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
HIDDEN_GREY = 128            # the grey of hidden patches in the masked-input panel
FONT_SIZE = 12


@dataclass
class Panel:
    pixels: np.ndarray        # (h, w, 3) uint8
    title: list[str]          # lines, wrapped to the panel width when drawn
    name: str = ""            # machine-readable column name, for the sidecar


def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the bitmap font, no size
        return ImageFont.load_default()


def _line_height(f) -> int:
    top, bottom = f.getbbox("Ag")[1::2]
    return int(bottom - min(top, 0)) + 3


def wrap(text: str, width: int, f) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than the width gets a line of its own."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            trial = f"{current} {word}" if current else word
            if current and f.getlength(trial) > width:
                lines.append(current)
                current = word
            else:
                current = trial
        lines.append(current)
    return lines


def upscale(pixels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a square-ish panel to size x size (integer repeats when possible)."""
    h, w = pixels.shape[:2]
    if (h, w) == (size, size):
        return pixels
    if size % h == 0 and size % w == 0:
        return np.repeat(np.repeat(pixels, size // h, axis=0), size // w, axis=1)
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.NEAREST))


def unit_mask_to_pixels(mask: np.ndarray, grid: tuple[int, int], unit_px: int) -> np.ndarray:
    """(L,) 0/1 mask over the unit grid, raster order -> (H, W) bool, True = hidden."""
    m = np.asarray(mask).reshape(grid).astype(bool)
    return np.repeat(np.repeat(m, unit_px, axis=0), unit_px, axis=1)


def masked_view(pixels: np.ndarray, mask: np.ndarray, grid: tuple[int, int], unit_px: int) -> np.ndarray:
    """The input with its hidden patches greyed out."""
    hidden = unit_mask_to_pixels(mask, grid, unit_px)
    out = pixels.copy()
    out[hidden] = HIDDEN_GREY
    return out


def paste_visible(prediction: np.ndarray, pixels: np.ndarray, mask: np.ndarray, grid: tuple[int, int],
                  unit_px: int) -> np.ndarray:
    """A whole picture: visible patches are the input pixels exactly, hidden ones the prediction's.

    prediction, pixels: (H, W, 3) uint8 of the same size; mask (L,) with 1 = hidden.
    """
    if prediction.shape != pixels.shape:
        raise ValueError(f"prediction {prediction.shape} and input {pixels.shape} differ in size")
    hidden = unit_mask_to_pixels(mask, grid, unit_px)
    return np.where(hidden[:, :, None], prediction, pixels).astype(np.uint8)


def vector_length_map(cells: np.ndarray, cell_px: int) -> np.ndarray:
    """Fallback drawing for targets without `render`: each cell's vector length, grey, max = white."""
    norms = np.linalg.norm(np.asarray(cells, np.float64), axis=-1)
    peak = norms.max()
    gray = np.rint(255 * norms / peak).astype(np.uint8) if peak > 0 else np.zeros(norms.shape, np.uint8)
    gray = np.repeat(np.repeat(gray, cell_px, axis=0), cell_px, axis=1)
    return np.repeat(gray[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class Layout:
    panel_px: int
    columns: int
    rows: int
    header_lines: int
    title_lines: int
    line_px: int

    @property
    def width(self) -> int:
        return PAD + self.columns * (self.panel_px + PAD)

    @property
    def header_px(self) -> int:
        return PAD + self.header_lines * self.line_px

    @property
    def row_px(self) -> int:
        return self.title_lines * self.line_px + self.panel_px + PAD

    @property
    def height(self) -> int:
        return self.header_px + PAD + self.rows * self.row_px

    def panel_origin(self, row: int, column: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a panel's image."""
        x = PAD + column * (self.panel_px + PAD)
        y = self.header_px + PAD + row * self.row_px + self.title_lines * self.line_px
        return x, y

    def as_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "panel_px": self.panel_px,
                "columns": self.columns, "rows": self.rows, "pad": PAD,
                "header_px": self.header_px, "row_px": self.row_px,
                "title_px": self.title_lines * self.line_px}


def compose(rows: list[list[Panel]], panel_px: int, header: list[str]) -> tuple[Image.Image, Layout]:
    """One row of equal square panels per image, titles above each panel, header text on top."""
    if not rows or not rows[0]:
        raise ValueError("a figure needs at least one panel")
    f = font()
    line_px = _line_height(f)
    columns = max(len(r) for r in rows)
    width = PAD + columns * (panel_px + PAD)
    header_wrapped = [line for text in header for line in wrap(text, width - 2 * PAD, f)]
    titles = [[[line for text in p.title for line in wrap(text, panel_px, f)] for p in r] for r in rows]
    title_lines = max(len(t) for r in titles for t in r)
    layout = Layout(panel_px, columns, len(rows), len(header_wrapped), title_lines, line_px)

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header_wrapped):
        draw.text((PAD, PAD + i * line_px), line, fill=TEXT, font=f)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            x, y = layout.panel_origin(r, c)
            for i, line in enumerate(titles[r][c]):
                draw.text((x, y - (title_lines - i) * line_px), line, fill=TEXT, font=f)
            canvas.paste(Image.fromarray(upscale(panel.pixels, panel_px)), (x, y))
    return canvas, layout


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG with no time in it, and only the given text chunks: identical inputs give identical bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6, pnginfo=info)
    return buffer.getvalue()
