"""localmim: LocalMIM (CVPR 2023) pretraining of vision backbones from the command line."""

__version__ = "0.1.0"
