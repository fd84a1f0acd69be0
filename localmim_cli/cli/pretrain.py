"""`localmim pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import (NO_VALUE, AccumOpt, BaseLrOpt, BatchOpt, ConfigOpt, DeviceOpt,
                                      EpochsOpt, OutOpt, OverwriteOpt, PrecisionOpt, PresetOpt, ResumeOpt,
                                      SeedOpt, SetOpt, WorkersOpt)
from localmim_cli.cli.output import console, note_others_env, print_settings
from localmim_cli.errors import UsageError


def pretrain(
    data: Annotated[Optional[Path], typer.Argument(
        help="Folder of images (searched recursively; JPEG, PNG, WebP, BMP, TIFF), a text file listing "
             "image paths (one per line, relative to the list), or WebDataset tar shards (a .tar, a folder "
             "of them, or a pattern like 'shards-{000..009}.tar'). Leave out to use the built-in sample "
             "photos.", show_default=False)] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    accum_steps: AccumOpt = None,
    base_lr: BaseLrOpt = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    workers: WorkersOpt = None,
    encoder: Annotated[Optional[str], typer.Option(help="model.encoder.name (a plugin)")] = None,
    target: Annotated[Optional[str], typer.Option(help="model.target.name (a plugin)")] = None,
    skip_unreadable: Annotated[Optional[bool], typer.Option(
        "--skip-unreadable/--no-skip-unreadable", metavar=NO_VALUE,
        help="data.skip_unreadable: leave out images that fail to decode (listed in the manifest), "
             "or stop on the first one.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", metavar=NO_VALUE, help="Check everything a real start checks (settings, device, "
                                            "data, model, at least one optimizer step per epoch, that "
                                            "--out may be written), then stop without writing anything.")] = False,
) -> None:
    """Pretrain a LocalMIM model on a folder of images.

    Writes into the run directory: settings.json (resolved values) and settings.provenance.json
    (which layer set each), manifest.json, metrics.jsonl, checkpoints/ (safetensors + JSON).
    Under torchrun every process runs this same command; rank 0 alone writes.
    """
    from localmim_cli.config.resolve import resolve_resumed, resolve_settings
    from localmim_cli.config.schema import PretrainSettings
    from localmim_cli.engine import runs
    from localmim_cli.tasks import pretrain as task

    if data is not None and str(data).lower() in ("true", "false") and not data.exists():
        raise UsageError(f"DATA {data}: no such folder; flags take no value here (--skip-unreadable or "
                         "--no-skip-unreadable, not --skip-unreadable true)")
    flags = {"data.path": str(data) if data else None, "train.epochs": epochs,
             "train.batch_size": batch_size, "train.accum_steps": accum_steps, "optim.base_lr": base_lr,
             "train.precision": precision, "train.device": device, "train.seed": seed,
             "data.workers": workers, "model.encoder.name": encoder, "model.target.name": target,
             "data.skip_unreadable": skip_unreadable}
    resolved = (resolve_resumed(PretrainSettings, out, preset, config, set_, flags) if resume
                else resolve_settings(PretrainSettings, preset, config, set_, flags))
    note_others_env(resolved)
    run_dir = out or runs.default_run_dir(preset or "pretrain")
    if dry_run:
        runs.check(Path(run_dir), resume, overwrite)   # as a real start, changing nothing
        print_settings(resolved)
        console.print(task.check(resolved.settings) + f"; would write to {run_dir}")
        return
    summary = task.pretrain(resolved, run_dir, resume=resume, overwrite=overwrite, console=console)
    if summary and not summary.get("already_finished"):
        console.print(f"[green]done[/]: {summary['steps']} steps, final loss {summary.get('loss', float('nan')):.4f}; "
                      f"checkpoints in {Path(run_dir) / 'checkpoints'}")
