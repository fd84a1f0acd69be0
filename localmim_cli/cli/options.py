"""Options that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

# The metavar of a flag that takes no value: --help shows nothing after it (not "<bool>").
NO_VALUE = ""


class _BareFlags:
    """Flags take no value, so --help shows no type after them. Typer would show `<bool>` after
    the flags it adds itself (--help on every command, the completion flags) and after any flag
    declared without metavar=NO_VALUE."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = NO_VALUE
        return params


class _Command(_BareFlags, TyperCommand):
    pass


class _Group(_BareFlags, TyperGroup):
    pass


class App(typer.Typer):
    """The Typer application of `localmim` and of its command groups: every command's --help
    line and every flag that takes no value show no type."""

    def __init__(self, **kwargs):
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args, cls=_Command, **kwargs):
        return super().command(*args, cls=cls, **kwargs)

PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="Named recipe (see `localmim presets list`) or a preset .toml file.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Settings file (.toml or .json), layered over the preset.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override any setting: --set optim.base_lr=1e-4 (repeatable).")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Run directory. Default: a new folder under $LOCALMIM_HOME/runs "
                        "(or the platform's user data folder).")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", metavar=NO_VALUE, help="Continue the run in --out exactly where its last checkpoint left it.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar=NO_VALUE, help="Replace a non-empty --out.")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="train.epochs")]
BatchOpt = Annotated[Optional[int], typer.Option(help="train.batch_size, per device")]
AccumOpt = Annotated[Optional[int], typer.Option(help="train.accum_steps")]
BaseLrOpt = Annotated[Optional[float], typer.Option(help="optim.base_lr (per 256 images)")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="train.precision: auto, bf16, fp16, fp32")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="train.device: auto, cpu, cuda, cuda:N")]
SeedOpt = Annotated[Optional[int], typer.Option(help="train.seed")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="data.workers, loader processes")]
