"""Decoding an image file (or a tar member) to upright 8-bit RGB, quickly and safely.

Decoding always ends in 8-bit RGB: grayscale and palette images are expanded, transparent images
are composited onto black (see `to_rgb`), 16-bit images are scaled rather than clipped, and a
file that will not decode raises `DataError` naming it.

Large images are decoded at a reduced size when the caller says how small they may get
(`draft_size`): JPEGs through libjpeg's DCT scaling (`draft`), other formats by an integer box
reduction (`Image.reduce`) right after decoding, so the resampling that follows works on a few
hundred pixels a side instead of tens of megapixels. Crop geometry stays in full-resolution
coordinates: `Decoded.reduction` says how to map it. Images above MAX_PIXELS are refused by name
before their pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from localmim_cli.data.sources import ImageRef, Member, read_bytes
from localmim_cli.errors import DataError

# Pillow refuses images above twice its MAX_IMAGE_PIXELS (about 179 megapixels) as possible
# decompression bombs, and only warns between one and two times it. One limit, stated once.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
# Below MAX_PIXELS an image is decoded (reduced, see above), so Pillow's warning between one and
# two times its limit says nothing here, and would print once per loader worker. Set once at
# import: catch_warnings() per file is not thread-safe, and the pre-flight check runs in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Decoded(NamedTuple):
    image: Image.Image  # 8-bit RGB, upright, possibly decoded at 1/reduction of full size
    full_size: tuple[int, int]  # (width, height) of the upright full-resolution image
    reduction: int  # full-res pixel x is at x / reduction in `image` (JPEG draft or Image.reduce)


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    # Black, because the colour under a transparent pixel is arbitrary (often garbage left by the
    # editor); compositing makes the result depend only on what is visible. Same as premultiplying.
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # (H, W); rint then clip guards rounding only
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")  # (H, W, 3)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 255], for integer or float data with no known white level."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new 8-bit RGB image.

    - L, 1, YCbCr, CMYK, RGB: Pillow's conversion.
    - RGBA, LA, PA, and P with a transparent colour: composited onto black.
    - I;16*: 16-bit, white = 65535, so divided by 257 (65535 -> 255), not clipped at 255.
    - I (32-bit): read as 16-bit when all values lie in 0..65535 (how Pillow opens some 16-bit
      files), else stretched min-max. F (float): x255 when within [0, 1], else stretched.
    """
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(img.convert("RGBA"))
    if mode.startswith("I;16"):
        return _gray_array_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(img).astype(np.float64)
        in_16bit = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        return _gray_array_to_rgb(values / 257.0 if in_16bit else _stretch(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img).astype(np.float64))
        unit = values.size == 0 or (values.min() >= 0 and values.max() <= 1)
        return _gray_array_to_rgb(values * 255.0 if unit else _stretch(values))
    return img.convert("RGB")  # raises ValueError for modes Pillow cannot convert


def orientation_of(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block should not lose the photo; show it as stored
        return 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as shown: the transposes 5..8 swap the sides."""
    return (size[1], size[0]) if orientation >= 5 and orientation in _UPRIGHT else size


def too_large(name: object, width: int, height: int) -> DataError:
    return DataError(f"{name}: {width}x{height} pixels ({width * height / 1e6:.0f} megapixels) is above "
                     f"the {MAX_PIXELS / 1e6:.0f}-megapixel limit (a guard against decompression "
                     f"bombs); downscale it, or leave it out (--skip-unreadable)")


def open_image(ref: ImageRef, data: bytes | None = None) -> Image.Image:
    """Pillow's lazy open of a file or member (header only); the caller closes it.

    The size limit is checked here, before any pixel is decoded. Pillow's own guard is kept
    silent below it (its warning would print once per worker) and named by file above it.
    """
    if data is None and isinstance(ref, Member):
        data = read_bytes(ref)
    try:
        img = Image.open(io.BytesIO(data) if data is not None else Path(ref))
    except Image.DecompressionBombError as error:
        raise DataError(f"{ref}: above the {MAX_PIXELS / 1e6:.0f}-megapixel limit (a guard against "
                        f"decompression bombs; {error}); downscale it, or leave it out "
                        f"(--skip-unreadable)") from error
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise too_large(ref, img.width, img.height)
    return img


def decode(ref: ImageRef, draft_size: int | None = None, data: bytes | None = None) -> Decoded:
    """Open `ref` (or its already-read bytes `data`) as upright 8-bit RGB; see `load_rgb`.
    Raises DataError naming the file (or shard and member)."""
    try:
        with open_image(ref, data) as img:
            orientation = orientation_of(img)
            width, height = img.size
            reduction = 1
            is_jpeg = img.format == "JPEG"
            if draft_size and is_jpeg and min(width, height) >= 2 * draft_size:
                # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size, several times faster. It
                # never goes below draft_size on either side; the box says the exact factor.
                drafted = img.draft("RGB", (draft_size, draft_size))
                if drafted is not None:
                    reduction = round(width / drafted[1][2])
            img.load()
            rgb = to_rgb(img)
        if draft_size and not is_jpeg and min(width, height) >= 2 * draft_size:
            # Other formats decode in full; an integer box reduction right away keeps the
            # resampling after it cheap. Sides stay >= draft_size (reduce rounds up).
            reduction = min(width, height) // draft_size
            rgb = rgb.reduce(reduction)
    except DataError:
        raise
    except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, EOFError, ...
        raise DataError(f"{ref}: cannot read image ({type(error).__name__}: {error})") from error
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return Decoded(rgb, upright_size((width, height), orientation), reduction)


def load_rgb(path: ImageRef, draft_size: int | None = None) -> Image.Image:
    """An image file as an upright 8-bit RGB PIL image.

    With `draft_size`, an image whose smaller side is at least 2 * draft_size is decoded at a
    reduced size whose sides are still >= draft_size: exact enough when the image is later
    resized down to at most draft_size pixels anyway, and much faster for large photos.
    """
    return decode(path, draft_size).image
