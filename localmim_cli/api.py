"""The Python API: the command line's tasks as functions, for notebooks and scripts.

    import localmim_cli as lm
    run = lm.pretrain("photos/", preset="demo", out="runs/demo", train__epochs=2)
    lm.visualize(run, out="runs/demo/fig.png")
    lm.export(run, out="exported/")
    tuned = lm.finetune("labelled/", init=run, preset="ft-small", out="runs/ft")
    results = lm.evaluate(tuned, "labelled/")

Settings are layered exactly as on the command line (defaults < preset < `config` file <
LOCALMIM_* environment < keyword overrides), validated by the same schema, and recorded with
their provenance in the run directory. A keyword override names a setting with `__` between
levels (`train__epochs=2`, `model__encoder__options={"arch": "vit_small"}`); `settings=` takes
the same as a dict of dotted names (`{"train.epochs": 2}`). Errors are the command line's:
`localmim_cli.errors.UserError` and its subclasses, each naming what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rich.console import Console

from localmim_cli.config.layers import Resolved
from localmim_cli.config.resolve import resolve_resumed, resolve_settings
from localmim_cli.config.schema import EvaluateSettings, PretrainSettings
from localmim_cli.engine import runs


def _console(quiet: bool) -> Console:
    return Console(soft_wrap=True, quiet=quiet)


def _overrides(settings: Mapping[str, Any] | None, keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted setting -> value, from `settings=` and `a__b=` keywords (the keywords win)."""
    merged = dict(settings or {})
    merged.update({key.replace("__", "."): value for key, value in keywords.items()})
    return merged


def _resolve(schema, preset: str | None, config: Path | str | None, overrides: dict[str, Any],
             out: Path | str | None, resume: bool) -> Resolved:
    names = {dotted: "python:" + dotted.replace(".", "__") for dotted in overrides}
    if resume:
        return resolve_resumed(schema, Path(out) if out is not None else None, preset, config,
                               flags=overrides, flag_names=names)
    return resolve_settings(schema, preset, config, flags=overrides, flag_names=names)


def pretrain(data: Path | str | None = None, *, preset: str | None = None, config: Path | str | None = None,
             out: Path | str | None = None, resume: bool = False, overwrite: bool = False,
             settings: Mapping[str, Any] | None = None, quiet: bool = False, **overrides: Any) -> Path:
    """Pretrain on a folder of images (None: the built-in sample photos); returns the run directory."""
    from localmim_cli.tasks import pretrain as task

    values = _overrides(settings, overrides)
    if data is not None:
        values["data.path"] = str(data)
    resolved = _resolve(PretrainSettings, preset, config, values, out, resume)
    run_dir = Path(out) if out is not None else runs.default_run_dir(preset or "pretrain")
    task.pretrain(resolved, run_dir, resume=resume, overwrite=overwrite, console=_console(quiet))
    return run_dir


def finetune(data: Path | str | None = None, *, init: Path | str | None = None, task: str | None = None,
             preset: str | None = None, config: Path | str | None = None, out: Path | str | None = None,
             resume: bool = False, overwrite: bool = False, settings: Mapping[str, Any] | None = None,
             quiet: bool = False, **overrides: Any) -> Path:
    """Fine-tune for `task` (default classification: a folder with one subfolder per class; a
    preset or a resumed run brings its own task); returns the run directory."""
    from localmim_cli.config.resolve import choose_task
    from localmim_cli.config.tasks import finetune_task
    from localmim_cli.tasks import finetune as fine_tuning

    values = _overrides(settings, overrides)
    if data is not None:
        values["data.path"] = str(data)
    if init is not None:
        values["init"] = str(init)
    if task is not None:
        values["task"] = task
    chosen = choose_task(task, preset, config, Path(out) if resume and out is not None else None)
    resolved = _resolve(finetune_task(chosen, "task=").schema, preset, config, values, out, resume)
    run_dir = Path(out) if out is not None else runs.default_run_dir(preset or "finetune")
    fine_tuning.finetune(resolved, run_dir, resume=resume, overwrite=overwrite, console=_console(quiet))
    return run_dir


def evaluate(checkpoint: Path | str, data: Path | str, *, config: Path | str | None = None,
             out: Path | str | None = None, overwrite: bool = False, settings: Mapping[str, Any] | None = None,
             quiet: bool = False, **overrides: Any) -> dict[str, Any]:
    """Score a checkpoint on a labelled folder (`protocol="knn"`, ...); returns the results, which
    are also written as JSON (their path under the key "written_to"). `overwrite` replaces an
    earlier results file of localmim's at `out`, never any other file."""
    from localmim_cli.tasks import evaluate as task

    resolved = _resolve(EvaluateSettings, None, config, _overrides(settings, overrides), None, False)
    results, path = task.evaluate(checkpoint, data, resolved.settings, out, _console(quiet), overwrite)
    return {**results, "written_to": str(path)}


def export(checkpoint: Path | str, out: Path | str, *, with_head: bool = False,
           overwrite: bool = False) -> dict[str, Any]:
    """Export the encoder for `timm.create_model`, verified by reloading; returns the report."""
    from localmim_cli.tasks.export import export_encoder

    return export_encoder(Path(checkpoint), Path(out), with_head=with_head, overwrite=overwrite)


def visualize(checkpoint: Path | str, images: list[Path | str] | None = None, *, out: Path | str | None = None,
              seed: int | None = None, mask_from: Path | str | None = None, mask_ratio: float | None = None,
              device: str = "cpu", overwrite: bool = False, score_threshold: float | None = None) -> Path:
    """Draw every scale's target next to its prediction (a pretraining run), or a fine-tuning
    run's predictions (segmentation: overlay, ground truth, legend; detection: boxes, masks and
    scores at or above `score_threshold`); returns the PNG written (its JSON sidecar lies beside
    it). `overwrite` replaces an earlier figure of localmim's at `out`, never any other file."""
    from localmim_cli.tasks import visualize as task

    png, _ = task.visualize(checkpoint, images, out, seed, mask_from, mask_ratio, device, overwrite,
                            score_threshold)
    return png
