"""Options that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# The metavar of a flag that takes no value: --help shows nothing after it (not "<bool>").
NO_VALUE = ""

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
