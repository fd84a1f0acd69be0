"""localmim-hiera: timm's Hiera as a LocalMIM encoder (entry point `hiera` in `localmim.encoders`).

    pip install localmim-hiera
    localmim pretrain --encoder hiera --preset hiera-demo
"""

from localmim_cli.encoders.base import ENCODER_API_VERSION
from localmim_cli.plugins.api import EncoderPlugin

from localmim_hiera.encoder import HieraOptions, MaskedHiera, build_hiera

__version__ = "0.1.0"

plugin = EncoderPlugin(
    name="hiera",
    api_version=ENCODER_API_VERSION,
    options=HieraOptions,
    build=build_hiera,
    summary="Hiera (timm; hierarchical, native mask units); taps = stage ends 1..4, strides 4/8/16/32 px",
)

__all__ = ["HieraOptions", "MaskedHiera", "build_hiera", "plugin"]
