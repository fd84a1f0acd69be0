"""localmim: LocalMIM (CVPR 2023) pretraining of vision backbones from the command line and Python.

`from localmim_cli import pretrain, finetune, evaluate, export, visualize`: see `localmim_cli.api`.
They load lazily, so importing the package (and running `localmim --help`) stays fast.
"""

from localmim_cli.version import __version__

__all__ = ["pretrain", "finetune", "evaluate", "export", "visualize", "__version__"]
_API = {"pretrain", "finetune", "evaluate", "export", "visualize"}


def __getattr__(name: str):
    if name in _API:
        from localmim_cli import api
        return getattr(api, name)
    raise AttributeError(f"module 'localmim_cli' has no attribute {name!r}")
