"""The built-in encoders as their entry points name them (`localmim.encoders`: vit, swin).

Declared here, apart from the model code, with options from torch-free modules and builders that
import the model code only when called: listing plugins and validating settings that name an
encoder (`config show`, a bad option in `--dry-run`) then never load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from localmim_cli.encoders.swin_options import SWIN_SUMMARY, SwinOptions
from localmim_cli.encoders.vit_options import VIT_SUMMARY, ViTOptions
from localmim_cli.plugins.api import ENCODER_API_VERSION, EncoderPlugin

if TYPE_CHECKING:
    from localmim_cli.encoders.swin import MaskedSwin
    from localmim_cli.encoders.vit import MaskedViT


def build_vit(options: ViTOptions, img_size: int, tap_layers: list[int] | None) -> "MaskedViT":
    from localmim_cli.encoders import vit
    return vit.build_vit(options, img_size, tap_layers)


def build_swin(options: SwinOptions, img_size: int, tap_layers: list[int] | None) -> "MaskedSwin":
    from localmim_cli.encoders import swin
    return swin.build_swin(options, img_size, tap_layers)


vit = EncoderPlugin(name="vit", api_version=ENCODER_API_VERSION, options=ViTOptions, build=build_vit,
                    summary=VIT_SUMMARY)
swin = EncoderPlugin(name="swin", api_version=ENCODER_API_VERSION, options=SwinOptions, build=build_swin,
                     summary=SWIN_SUMMARY)
