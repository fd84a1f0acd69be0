"""The built-in targets as their entry points name them (`localmim.targets`: hog, pixel).

As for the encoders (encoders/builtin.py): options from torch-free modules, builders that import
the target's code only when called, so listing and validating settings load no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from localmim_cli.plugins.api import TARGET_API_VERSION, TargetPlugin
from localmim_cli.targets.hog_options import HOG_SUMMARY, HOGOptions
from localmim_cli.targets.pixel_options import PIXEL_SUMMARY, PixelOptions

if TYPE_CHECKING:
    from localmim_cli.targets.hog import HOGTarget
    from localmim_cli.targets.pixel import PixelTarget


def build_hog(options: HOGOptions, cells_px: list[int]) -> "HOGTarget":
    from localmim_cli.targets.hog import HOGTarget
    return HOGTarget(options, cells_px)


def build_pixel(options: PixelOptions, cells_px: list[int]) -> "PixelTarget":
    from localmim_cli.targets.pixel import PixelTarget
    return PixelTarget(options, cells_px)


hog = TargetPlugin(name="hog", api_version=TARGET_API_VERSION, options=HOGOptions, build=build_hog,
                   summary=HOG_SUMMARY)
pixel = TargetPlugin(name="pixel", api_version=TARGET_API_VERSION, options=PixelOptions, build=build_pixel,
                     summary=PIXEL_SUMMARY)
