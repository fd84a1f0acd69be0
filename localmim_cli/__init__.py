"""localmim: LocalMIM (CVPR 2023) pretraining of vision backbones from the command line."""

from localmim_cli.version import __version__

__all__ = ["__version__"]
