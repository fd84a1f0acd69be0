"""Fine-tuning a pretrained encoder for a task: what every task shares.

    localmim finetune DATA --task classification|segmentation --init CHECKPOINT

Each task is a sibling package (`tasks/classification/`, `tasks/segmentation/`) with its own
data, model head, metric and recipe (`tasks.recipe.Recipe`), and its own settings schema
(`config/tasks.py` names both). This module is the same for every task: the checks before the
run directory is touched, the --init weights, the run directory (claimed, or resumed once the
resume check passed), and the hand-over to the engine (`engine.training.train`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.config.tasks import finetune_task
from localmim_cli.errors import CheckpointError, NonFiniteWeights, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.config.layers import Resolved
    from localmim_cli.tasks.recipe import Recipe
    from localmim_cli.weights.encoder_weights import EncoderWeights

# Settings any resume may change: which task a run is cannot change (config.resolve.choose_task
# keeps the run's), and a run from before tasks had names has none recorded.
ALWAYS_RESUMABLE = {"task", "init", "data.path", "data.workers", "train.device", "train.loggers",
                    "train.log_every", "train.checkpoint_every", "train.keep_last"}


def recipe_for(settings: Any) -> Recipe:
    """The recipe of the task `settings` are for (their `task`)."""
    module, _, attribute = finetune_task(settings.task).recipe.partition(":")
    return getattr(importlib.import_module(module), attribute)


def preflight(settings: Any, resume: bool) -> tuple[Any, EncoderWeights | None, Any]:
    """Everything the user can get wrong, checked before the run directory is touched:
    (the task's data, the --init weights or None, the model shape or None on resume)."""
    from localmim_cli.weights.sources import load_encoder_weights

    recipe = recipe_for(settings)
    if settings.init is None and not settings.model.arch and not resume:
        raise UsageError("finetune needs --init CHECKPOINT (a pretrain run, a checkpoint, a published "
                         "ViT or Swin .pth, or an exported encoder); or --arch to train from scratch")
    data = recipe.read_data(settings)
    if resume:
        return data, None, None
    try:
        weights = load_encoder_weights(settings.init) if settings.init else None
    except NonFiniteWeights as exc:   # not a divergence: the run would start from them
        raise CheckpointError(f"--init {settings.init}: the initial weights are not finite: {exc.file} holds "
                              f"{exc.detail}; pass a checkpoint saved before its run diverged") from None
    return data, weights, recipe.model_shape(settings, weights)


def check(settings: Any) -> str:
    """What `--dry-run` checks, which is what a real start checks before it trains: data,
    checkpoint, device, model and a step plan (one full optimizer step per epoch at least)."""
    from localmim_cli.engine import distributed
    from localmim_cli.engine.plan import plan_steps

    recipe = recipe_for(settings)
    data, weights, shape = preflight(settings, resume=False)
    world = distributed.from_environment()
    device = distributed.choose_device(settings.train.device, world)
    model = recipe.build_model(settings, data, shape, weights)
    plan = plan_steps(recipe.epoch_images(settings, data), settings, world.size)
    return (f"{recipe.describe_data(data)}\n{recipe.describe_model(shape, model)}\n"
            f"{plan.describe()} on {device} ({world.size} process(es)); {plan.scaling}")


def run(resolved: Resolved, run_dir: Path, resume: bool, console: Console,
        weights: EncoderWeights | None = None) -> dict[str, Any]:
    """Fine-tune; returns a summary. The run directory must already be prepared (runs.prepare).
    The resolved settings and their provenance are written into it once a resume has been
    checked against the checkpoint.

    weights: the --init checkpoint, when the caller has read it already (else read here).
    """
    import torch

    from localmim_cli.data.index import verify_recorded_data
    from localmim_cli.engine import training
    from localmim_cli.tasks.recipe import init_record
    from localmim_cli.weights.sources import load_encoder_weights

    settings = resolved.settings
    recipe = recipe_for(settings)
    with training.process_group(settings.train) as placement:
        resumed = training.checked_resume(run_dir, resume, settings, ALWAYS_RESUMABLE | recipe.resumable_changes)
        data = recipe.read_data(settings, resumed)
        if resumed is not None:
            weights, record = None, resumed.meta.get("init")
        elif weights is None and settings.init:
            weights = load_encoder_weights(settings.init)
        if resumed is None:
            record = init_record(weights)
        shape = recipe.model_shape(settings, weights, resumed)
        torch.manual_seed(settings.train.seed)   # the new parts' initialisation
        model = recipe.build_model(settings, data, shape, weights).to(placement.device)
        task = recipe.training_task(settings, data, shape, model, record, placement, run_dir)
        if resumed is not None:   # before anything of the run is rewritten, as pretraining does
            verify_recorded_data(run_dir, task.data_record(), settings.data.path, settings.data.val_path)
        summary = training.train(task, resolved, run_dir, resumed, console, placement)
    return {**summary, **task.summary()}


def finetune(resolved: Resolved, run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
             console: Console | None = None) -> dict[str, Any]:
    """Check the inputs, prepare the run directory, fine-tune; returns a summary (last logged
    step, last and best validation). Every process of a torchrun calls this."""
    from rich.console import Console

    from localmim_cli.engine import distributed, runs

    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    _, weights, _ = preflight(resolved.settings, resume)
    is_main = distributed.from_environment().is_main
    init = resolved.settings.init
    with runs.claimed(run_dir, resume, overwrite, is_main, console.print, reads=[init] if init else []):
        return run(resolved, run_dir, resume, console, weights)


def done_line(settings: Any, summary: dict[str, Any], run_dir: Path) -> str:
    """The command line's last line after a run."""
    score = recipe_for(settings).score_line(summary, run_dir)
    return (f"[green]done[/]: {summary['steps']} steps, final loss {summary.get('loss', float('nan')):.4f}"
            f"{score}; checkpoints in {Path(run_dir) / 'checkpoints'}")
