"""The `localmim` command line: each subcommand is a thin function over the modules below it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from localmim_cli import __version__

app = typer.Typer(
    name="localmim",
    help="LocalMIM (CVPR 2023): masked image modeling with local multi-scale reconstruction.\n\n"
         "Pretrain a vision backbone on a folder of images, look at what every scale "
         "reconstructs, fine-tune and evaluate it.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
presets_app = typer.Typer(help="Named, validated recipes: the paper's, and small ones for CPUs and one GPU.",
                          no_args_is_help=True)
config_app = typer.Typer(help="Show the settings a command would run with, and where each came from.",
                         no_args_is_help=True)
plugins_app = typer.Typer(help="Installed encoders and reconstruction targets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(config_app, name="config")
app.add_typer(plugins_app, name="plugins")

# soft_wrap: lines in logs and pipes stay whole instead of breaking at 80 columns
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """Any problem the user can fix: printed without a traceback, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from localmim_cli.data import DataError
    from localmim_cli.layers import SettingsError
    from localmim_cli.training import TrainingDiverged
    from localmim_cli.published import CheckpointError
    from localmim_cli.registry import PluginError
    from localmim_cli.runs import RunDirError
    return (UserError, SettingsError, DataError, CheckpointError, PluginError, RunDirError, TrainingDiverged,
            ValueError)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"localmim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = None) -> None:
    pass


# Options shared by every command that reads settings.
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="Named recipe (see `localmim presets list`) or a preset .toml file.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Settings file (.toml or .json), layered over the preset.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override any setting: --set optim.base_lr=1e-4 (repeatable).")]


def resolve_settings(schema, preset: str | None, config: Path | None, sets: list[str] | None,
                     flags: dict[str, Any], base: tuple[str, dict] | None = None):
    """Layer defaults < preset (or a resumed run's settings) < file < env < flags."""
    from localmim_cli.layers import resolve
    from localmim_cli.presets_catalog import load_preset

    preset_dict, preset_name = None, None
    if base is not None:
        preset_name, preset_dict = base
    elif preset:
        info, preset_dict = load_preset(preset)
        preset_name = info.name
    given = {k: v for k, v in flags.items() if v is not None}
    return resolve(schema, preset=preset_dict, preset_name=preset_name, config_file=config,
                   environ=os.environ, flags=given, sets=list(sets or []),
                   flag_names={"data.path": "DATA"})


@app.command()
def pretrain(
    data: Annotated[Optional[Path], typer.Argument(
        help="Folder of images (searched recursively; JPEG, PNG, WebP, BMP, TIFF). "
             "Leave out to use the built-in sample photos.", show_default=False)] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Run directory. Default: a new folder under $LOCALMIM_HOME/runs "
                            "(or the platform's user data folder).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where "
                                                          "its last checkpoint left it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    epochs: Annotated[Optional[int], typer.Option(help="train.epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="train.batch_size, per device")] = None,
    accum_steps: Annotated[Optional[int], typer.Option(help="train.accum_steps")] = None,
    base_lr: Annotated[Optional[float], typer.Option(help="optim.base_lr (per 256 images)")] = None,
    precision: Annotated[Optional[str], typer.Option(help="train.precision: auto, bf16, fp16, fp32")] = None,
    device: Annotated[Optional[str], typer.Option(help="train.device: auto, cpu, cuda, cuda:N")] = None,
    seed: Annotated[Optional[int], typer.Option(help="train.seed")] = None,
    workers: Annotated[Optional[int], typer.Option(help="data.workers, loader processes")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="model.encoder.name (a plugin)")] = None,
    target: Annotated[Optional[str], typer.Option(help="model.target.name (a plugin)")] = None,
    skip_unreadable: Annotated[Optional[bool], typer.Option(
        "--skip-unreadable", help="Leave out images that fail to decode (counted in the manifest).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve settings, check the data and "
                                                            "build the model, then stop.")] = False,
) -> None:
    """Pretrain a LocalMIM model on a folder of images.

    Writes into the run directory: settings.json (resolved values) and settings.provenance.json
    (which layer set each), manifest.json, metrics.jsonl, checkpoints/ (safetensors + JSON).
    Under torchrun every process runs this same command; rank 0 alone writes.
    """
    from localmim_cli import pretrain as pretrain_mod
    from localmim_cli import runs
    from localmim_cli.distributed import from_environment
    from localmim_cli.settings import PretrainSettings

    world = from_environment()
    flags = {"data.path": str(data) if data else None, "train.epochs": epochs,
             "train.batch_size": batch_size, "train.accum_steps": accum_steps, "optim.base_lr": base_lr,
             "train.precision": precision, "train.device": device, "train.seed": seed,
             "data.workers": workers, "model.encoder.name": encoder, "model.target.name": target,
             "data.skip_unreadable": skip_unreadable}
    base = runs.resumed_settings(out, preset) if resume else None
    resolved = resolve_settings(PretrainSettings, preset, config, set_, flags, base)
    settings = resolved.settings
    run_dir = out or runs.default_run_dir(preset or "pretrain")

    if dry_run:
        from localmim_cli.build import build_model
        from localmim_cli.data import pretrain_dataset
        _print_settings(resolved)
        model = build_model(settings.model)
        dataset, unreadable = pretrain_dataset(settings.data, settings.model.img_size, model.num_units,
                                               settings.train.seed)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        console.print(f"{len(dataset.paths)} images ({len(unreadable)} unreadable left out); model {n_params / 1e6:.2f} M trainable parameters; "
                      f"cells {model.cells_px} px at layers {model.encoder.tap_layers}; would write to {run_dir}")
        return

    if world.is_main:
        runs.prepare(run_dir, resume, overwrite)
        console.print(f"run directory: {run_dir}")
    summary = pretrain_mod.run(resolved, run_dir, resume, console)
    if world.is_main and summary:
        console.print(f"[green]done[/]: {summary['steps']} steps, final loss {summary.get('loss', float('nan')):.4f}; "
                      f"checkpoints in {run_dir / 'checkpoints'}")


def _print_settings(resolved) -> None:
    table = Table(title="resolved settings", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("from")
    for path, value, source in resolved.as_rows(plugin_defaults=True):
        table.add_row(path, json.dumps(value), source)
    console.print(table)


@config_app.command("show")
def config_show(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    command: Annotated[str, typer.Option(help="Which command's settings: pretrain, finetune, evaluate")] = "pretrain",
    resolved_only: Annotated[bool, typer.Option("--resolved", help="Print only the resolved values as JSON.")] = False,
) -> None:
    """Print every setting with its value and the layer that set it (default, preset, file, env, flag)."""
    schema = _schema_for(command)
    resolved = resolve_settings(schema, preset, config, set_, {})
    if resolved_only:
        console.print_json(json.dumps(resolved.settings.model_dump(mode="json")))
    else:
        _print_settings(resolved)


def _schema_for(command: str):
    from localmim_cli.settings import PretrainSettings
    schemas = {"pretrain": PretrainSettings}
    from localmim_cli.settings import EvaluateSettings, FinetuneSettings
    schemas.update(finetune=FinetuneSettings, evaluate=EvaluateSettings)
    if command not in schemas:
        raise UserError(f"--command {command!r}: choose one of {', '.join(schemas)}")
    return schemas[command]


@presets_app.command("list")
def presets_list() -> None:
    """List the shipped presets."""
    from localmim_cli.presets_catalog import list_presets
    table = Table()
    table.add_column("name", style="bold")
    table.add_column("for")
    table.add_column("summary")
    for info in list_presets():
        table.add_row(info.name, info.kind, info.summary)
    console.print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or .toml file")],
                 world_size: Annotated[Optional[int], typer.Option(
                     help="Processes to compute the effective batch and lr for (default: the "
                          "number the recipe assumes).")] = None) -> None:
    """Explain a preset: what it is for, its values, and the batch and lr it gives."""
    from localmim_cli.presets_catalog import load_preset, scaling_line
    info, values = load_preset(name)
    world_size = world_size or info.world_size
    schema = _schema_for(info.kind)
    resolved = resolve_settings(schema, name, None, None, {})
    console.print(f"[bold]{info.name}[/] ({info.kind}): {info.summary}\n")
    console.print(info.description.strip() + "\n", highlight=False)
    if info.kind == "pretrain":
        console.print(scaling_line(resolved.settings, world_size), highlight=False)
    console.print_json(json.dumps(values))


@plugins_app.command("list")
def plugins_list() -> None:
    """Show every encoder and target plugin, its distribution and version, and whether it loaded."""
    from localmim_cli import registry
    table = Table()
    for col in ("kind", "name", "distribution", "version", "status"):
        table.add_column(col)
    for kind in registry.GROUPS:
        for r in registry.discover(kind):
            status = (f"[green]ok[/] {r.plugin.summary}" if r.ok else f"[red]broken[/]: {r.error}")
            table.add_row(kind[:-1], r.name, r.distribution, r.version, status)
    console.print(table)


from localmim_cli.visualize import visualize_command  # noqa: E402
app.command("visualize")(visualize_command)


from localmim_cli.evaluate import evaluate_command  # noqa: E402
from localmim_cli.export import export_command  # noqa: E402
from localmim_cli.finetune import finetune_command  # noqa: E402

app.command("finetune")(finetune_command)
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)


def main() -> None:
    try:
        app()
    except SystemExit:  # typer's own exits (--help, usage errors): before the clause below imports torch
        raise
    except _user_errors() as exc:
        if os.environ.get("LOCALMIM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; the last checkpoint is intact (continue with --resume)")
        sys.exit(130)
