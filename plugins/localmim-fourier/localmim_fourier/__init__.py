"""localmim-fourier: per-cell Fourier amplitude as a LocalMIM target (entry point `fourier` in
`localmim.targets`).

    pip install localmim-fourier
    localmim pretrain --preset demo --target fourier
"""

from localmim_cli.plugins.api import TargetPlugin
from localmim_cli.targets.base import TARGET_API_VERSION

from localmim_fourier.target import FourierAmplitudeTarget, FourierOptions

__version__ = "0.1.0"

plugin = TargetPlugin(
    name="fourier",
    api_version=TARGET_API_VERSION,
    options=FourierOptions,
    build=FourierAmplitudeTarget,
    summary="per-cell log Fourier amplitude spectrum, per channel, normalized per cell (cf. MFM, Ge2-AE)",
)

__all__ = ["FourierAmplitudeTarget", "FourierOptions", "plugin"]
