"""One training run of any task: everything but the task's own model, data and loss.

    with process_group(settings.train) as placement:
        resumed = checked_resume(run_dir, resume, settings, RESUMABLE_CHANGES)
        task = ...                          # the task's model and dataset (weights from `resumed`)
        summary = train(task, resolved, run_dir, resumed, console, placement)

`train` plans the steps and the lr, makes the optimizer and grad scaler from the task's
parameter groups, restores a resumed run exactly, writes settings, provenance and manifest,
wraps the model for DDP, feeds it from one loader that lives as long as the run, and runs the
step loop with checkpoints, metrics.jsonl, the loggers (`train.loggers`) and progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from localmim_cli.data.samplers import StepBatches, loader_kwargs
from localmim_cli.engine import checkpoints, distributed, resumes, runs, wrapping
from localmim_cli.engine import optimizer as adamw
from localmim_cli.engine.activation_checkpointing import checkpoint_blocks
from localmim_cli.engine.compiling import Compilation
from localmim_cli.engine.threads import ThreadChoice, choose_intra_op_threads, intra_op_threads
from localmim_cli.engine.loop import Placement, RunOutput, Trainer, resolve_precision, run_loop
from localmim_cli.engine.plan import StepPlan, plan_steps
from localmim_cli.engine.schedule import PolySchedule, lr_at
from localmim_cli.engine.progress import StepProgress
from localmim_cli.engine.stopping import ignore_stop_signals
from localmim_cli.engine.task import Position, TrainingTask
from localmim_cli.errors import CheckpointError, RunDirError

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.engine.loggers import Loggers
    from localmim_cli.config.layers import Resolved


@contextlib.contextmanager
def process_group(train_settings: Any) -> Iterator[Placement]:
    """This process's place in the run (torchrun's process group joined, when there is one),
    with the device and precision that `train.device` and `train.precision` ask for."""
    world = distributed.from_environment()
    device = distributed.choose_device(train_settings.device, world)
    created = distributed.init(world, device)
    try:
        yield Placement(world, device, resolve_precision(train_settings.precision, device))
    finally:
        if created:   # a group the caller made (a script running several runs) stays up for the next
            distributed.shutdown(world)


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a resume that would change the recipe: only the `allowed` settings may differ."""
    changed = {k: v for k, v in resumes.changed_settings(saved, current).items() if k not in allowed}
    if changed:
        diffs = "; ".join(f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in changed.items())
        raise RunDirError(f"--resume would change settings the run was started with ({diffs}); "
                          f"start a new run instead, or change only {', '.join(sorted(allowed))}")


def checked_resume(run_dir: Path, resume: bool, settings: Any, allowed: set[str]) -> checkpoints.Checkpoint | None:
    """With --resume, the run's latest checkpoint, once its recipe is known to match `settings`
    but for the `allowed` settings; else None. Call it before anything is written."""
    if not resume:
        return None
    ckpt = checkpoints.load(run_dir / "checkpoints")
    saved = ckpt.meta.get("settings")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt.path / 'meta.json'}: no settings recorded, so the run cannot be resumed")
    check_resume_compatible(saved, settings.model_dump(mode="json"), allowed)
    resumes.check_records(run_dir)   # the records the resume appends to: refused now if broken
    return ckpt


def optimizer_state_into(spread: wrapping.Replicated | wrapping.Sharded, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, ckpt: checkpoints.Checkpoint) -> None:
    """The resumed checkpoint's optimizer and grad-scaler state (into sharded parameters under
    FSDP); a CheckpointError naming the file when it does not fit this run's parameters."""
    training = ckpt.training_state()
    try:
        spread.load_optimizer_state(optimizer, training["optimizer"])
        scaler.load_state_dict(training["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.training_file}: optimizer state does not fit the model "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def resumed_position(ckpt: checkpoints.Checkpoint) -> Position:
    try:
        return Position(**ckpt.meta["position"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.path / 'meta.json'}: no valid position to resume from ({exc})") from None


def already_finished(run_dir: Path, pos: Position, plan: StepPlan, say: Callable[..., None]) -> dict[str, Any]:
    """A resume of a run that has done all its steps: say so, with the real last loss; write nothing."""
    last = resumes.last_metrics(run_dir)
    loss = f"; last loss {last['loss']:.4f}" if "loss" in last else ""
    more = "train.iterations (--iterations)" if plan.iterations else "--epochs"
    say(f"already finished at epoch {pos.epoch} (step {pos.step} of {plan.total_steps}){loss}; nothing to do "
        f"(raise {more} to train further)")
    return {**last, "steps": pos.step, "run_dir": str(run_dir), "epochs": plan.epochs, "already_finished": True}


def schedule_change(saved: dict[str, Any], plan: StepPlan, pos: Position) -> list[str]:
    """Lines saying how a resume with other train.epochs (train.iterations) moves the lr
    schedule, or none."""
    if plan.schedule is not None:
        before = saved["train"]["iterations"]
        if before == plan.iterations:
            return []
        old = dataclasses.replace(plan.schedule, total_steps=before).at(pos.step)
        kind = "poly" if isinstance(plan.schedule, PolySchedule) else "step"
        return [f"note: train.iterations {before} -> {plan.iterations}: the {kind} schedule now ends at step "
                f"{plan.iterations}, so the lr from step {pos.step} on follows the new curve "
                f"({old:.3g} -> {plan.lr_at(pos.step):.3g} at this step)"]
    before = saved["train"]["epochs"]
    if before == plan.epochs:
        return []
    old = lr_at(pos.step, plan.steps_per_epoch, plan.lr, plan.min_lr, plan.warmup_epochs, before)
    new = plan.lr_at(pos.step)
    return [f"note: train.epochs {before} -> {plan.epochs}: the warmup + cosine schedule now spans "
            f"{plan.epochs} epochs ({plan.total_steps} steps), so the lr from step {pos.step} on follows the "
            f"new curve ({old:.3g} -> {new:.3g} at this step), not the one the run started with"]


def speed_line(tr: Any, compilation: Compilation, optimizer: torch.optim.Optimizer, threads: ThreadChoice,
               device: torch.device) -> str:
    """One line: how the step runs (compiled or eager, checkpointing, sharding, optimizer, threads)."""
    parts = [f"compiled ({tr.compile})" if compilation.active else "eager",
             f"AdamW {adamw.implementation(optimizer.param_groups)}"]
    if tr.activation_checkpointing:
        parts.append("activation checkpointing")
    if getattr(tr, "fsdp", False):
        parts.append("FSDP (sharded)")
    if device.type == "cpu":
        parts.append(f"{threads.intra_op} intra-op thread(s) ({threads.reason})")
    return "step: " + ", ".join(parts)


def run_loader(dataset: Dataset, sampler: StepBatches, workers: int, device: torch.device) -> DataLoader:
    """One loader for the whole run: its workers persist across epochs, so no epoch pays their
    start-up again. Between passes the sampler moves (`set_position`), and the epoch rides along
    with every index, since the workers keep the dataset copy they started with."""
    extra = {"worker_init_fn": ignore_stop_signals} if workers > 0 else {}
    collate = getattr(dataset, "collate", None)  # a dataset may batch its own way (PretrainImages)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate() if collate else None,
                      **loader_kwargs(workers, device, persistent=True), **extra)


def train(task: TrainingTask, resolved: Resolved, run_dir: Path, resumed: checkpoints.Checkpoint | None,
          console: Console, placement: Placement) -> dict[str, Any]:
    """Train `task` to the end of `train.epochs`, from the start or from `resumed` (a checkpoint
    `checked_resume` returned); returns the last metrics record with "steps", "run_dir" and
    "epochs". Every process calls this; the main process alone writes."""
    settings = resolved.settings
    tr, opt = settings.train, settings.optim
    world, device = placement.world, placement.device
    say = console.print if world.is_main else (lambda *a, **k: None)

    plan = plan_steps(len(task.dataset), settings, world.size)
    threads = choose_intra_op_threads(device, settings.data.workers, tr.threads)
    pos = Position()
    if resumed is not None:
        pos = resumed_position(resumed)
        task.restore(resumed)          # whole weights, before any sharding
        if pos.step >= plan.total_steps:
            return already_finished(run_dir, pos, plan, say)
    blocks = task.blocks()
    if tr.activation_checkpointing:
        checkpoint_blocks(blocks)
    # Compiled before DDP wraps it (as recommended); under FSDP after sharding, so that the
    # compiled graph is the sharded model's.
    if getattr(tr, "fsdp", False):
        spread = wrapping.wrap(task.model, blocks, True, world, device, placement.precision)
        compilation = Compilation(task.model, tr.compile, device, say)
    else:
        compilation = Compilation(task.model, tr.compile, device, say)
        spread = wrapping.wrap(task.model, blocks, False, world, device, placement.precision)
    optimizer = adamw.adamw(task.param_groups(), lr=plan.lr, betas=opt.betas)   # the sharded parameters
    scaler = torch.amp.GradScaler(device.type, enabled=placement.precision == "fp16")
    metrics = runs.MetricsLog(run_dir / "metrics.jsonl")
    ckpt_dir = run_dir / "checkpoints"
    if resumed is not None:
        optimizer_state_into(spread, optimizer, scaler, resumed)
        if world.is_main:
            checkpoints.clear_partials(ckpt_dir)   # what a crash mid-save left: never read, only takes space
            for warning in metrics.truncate_after(pos.step):
                console.print(f"[yellow]warning:[/] {warning}")
        say(f"resuming from {resumed.path.name}: epoch {pos.epoch}, step {pos.step}")
        for line in schedule_change(resumed.meta["settings"], plan, pos):
            say(line)

    if world.is_main:
        fresh_manifest = runs.manifest(world, device, tr.seed, task.data_record(), {
            "precision": placement.precision, "effective_batch": plan.effective_batch, "lr": plan.lr,
            "speed": {
                "precision_requested": tr.precision, "compile": tr.compile if compilation.active else "off",
                "activation_checkpointing": tr.activation_checkpointing, "fsdp": getattr(tr, "fsdp", False),
                "optimizer": adamw.implementation(optimizer.param_groups),
                "intra_op_threads": threads.intra_op, "threads_reason": threads.reason},
            **task.run_record()})
        if resumed is None:
            resolved.write(run_dir)
            runs.write_manifest(run_dir, fresh_manifest)
        else:
            record = resumes.resume_record(
                resumes.changed_settings(resumed.meta["settings"], settings.model_dump(mode="json")),
                resolved.provenance, dataclasses.asdict(pos), device=str(device), world_size=world.size,
                precision=placement.precision)
            resumes.append_resume(run_dir, resolved.to_json(), record, fresh_manifest, resolved.provenance_dict())
        task.write_files(run_dir)
    for line in task.describe():
        say(line)
    say(f"{plan.describe()} on {device} "
        f"({world.size} process(es), {placement.precision})")
    say(plan.scaling)
    say(speed_line(tr, compilation, optimizer, threads, device))
    sampler = StepBatches(len(task.dataset), tr.batch_size, world.rank, world.size, tr.seed)
    loader = run_loader(task.dataset, sampler, settings.data.workers, device)

    def batches(epoch: int, start: int) -> DataLoader:
        sampler.set_position(epoch, start, plan.micro_steps_in(epoch))
        return loader

    def save(position: Position) -> None:
        model_state = spread.model_state()              # sharded: every process takes part
        optimizer_state = spread.optimizer_state(optimizer)
        if not world.is_main:
            return
        meta = {"kind": task.kind, "position": dataclasses.asdict(position),
                "settings": settings.model_dump(mode="json"), "provenance": resolved.provenance,
                "run_dir": str(run_dir), **task.checkpoint_meta()}
        checkpoints.save(ckpt_dir, checkpoints.step_name(position.step), model_state, meta,
                         {"optimizer": optimizer_state, "scaler": scaler.state_dict()},
                         keep_last=tr.keep_last)

    task.model.train()
    loggers = start_loggers(tr.loggers, run_dir, settings, pos.step, console) if world.is_main else None
    try:
        with intra_op_threads(threads.intra_op), \
                StepProgress(console, plan.total_steps, pos.step, world.is_main, label=task.kind) as progress:
            output = RunOutput(metrics, progress, world.is_main, loggers)
            trainer = Trainer(task=task, net=spread.net, no_sync=spread.no_sync, compilation=compilation,
                              optimizer=optimizer, scaler=scaler, clip_grad=opt.clip_grad,
                              placement=placement, plan=plan, log_every=tr.log_every,
                              checkpoint_every=tr.checkpoint_every, batches=batches, save=save,
                              ckpt_dir=ckpt_dir, output=output)
            task.on_train_start(dataclasses.replace(pos), output)
            summary = run_loop(trainer, pos)
    finally:
        if loggers is not None:   # a crash, a divergence or Ctrl-C still leaves the loggers' files whole
            loggers.close()
    return {**summary, "run_dir": str(run_dir), "epochs": plan.epochs}


def start_loggers(names: list[str], run_dir: Path, settings: Any, start_step: int, console: Console) -> Loggers | None:
    """The run's loggers (`train.loggers`); a resumed run's continue from `start_step`. A logger
    that cannot start is named in a warning and the run goes on without it."""
    if not names:
        return None
    from localmim_cli.engine.loggers import Loggers

    def warn(text: str) -> None:
        console.print(f"warning: {text}", style="yellow", markup=False, highlight=False)

    return Loggers(names, run_dir, settings.model_dump(mode="json"), start_step, warn)
