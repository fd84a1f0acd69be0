"""One training run of any task: everything but the task's own model, data and loss.

    with process_group(settings.train) as placement:
        resumed = checked_resume(run_dir, resume, settings, RESUMABLE_CHANGES)
        task = ...                          # the task's model and dataset (weights from `resumed`)
        summary = train(task, resolved, run_dir, resumed, console, placement)

`train` plans the steps and the lr, makes the optimizer and grad scaler from the task's
parameter groups, restores a resumed run exactly, writes settings, provenance and manifest,
wraps the model for DDP, feeds it from one loader that lives as long as the run, and runs the
step loop with checkpoints, metrics.jsonl and progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from localmim_cli.data.samplers import StepBatches, loader_kwargs
from localmim_cli.engine import checkpoints, distributed, runs, wrapping
from localmim_cli.engine import optimizer as adamw
from localmim_cli.engine.activation_checkpointing import checkpoint_blocks
from localmim_cli.engine.compiling import Compilation
from localmim_cli.engine.threads import ThreadChoice, choose_intra_op_threads, intra_op_threads
from localmim_cli.engine.loop import Placement, RunOutput, Trainer, resolve_precision, run_loop
from localmim_cli.engine.plan import plan_steps
from localmim_cli.engine.progress import StepProgress
from localmim_cli.engine.task import Position, TrainingTask
from localmim_cli.errors import RunDirError

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.config.layers import Resolved


@contextlib.contextmanager
def process_group(train_settings: Any) -> Iterator[Placement]:
    """This process's place in the run (torchrun's process group joined, when there is one),
    with the device and precision that `train.device` and `train.precision` ask for."""
    world = distributed.from_environment()
    device = distributed.choose_device(train_settings.device, world)
    distributed.init(world, device)
    try:
        yield Placement(world, device, resolve_precision(train_settings.precision, device))
    finally:
        distributed.shutdown(world)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"a.b.c": value}; plugin `options` stay whole, as one value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a resume that would change the recipe: only the `allowed` settings may differ."""
    before, now = flatten(saved), flatten(current)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in allowed]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise RunDirError(f"--resume would change settings the run was started with ({diffs}); "
                          f"start a new run instead, or change only {', '.join(sorted(allowed))}")


def checked_resume(run_dir: Path, resume: bool, settings: Any, allowed: set[str]) -> checkpoints.Checkpoint | None:
    """With --resume, the run's latest checkpoint, once its recipe is known to match `settings`
    but for the `allowed` settings; else None. Call it before anything is written."""
    if not resume:
        return None
    ckpt = checkpoints.load(run_dir / "checkpoints")
    check_resume_compatible(ckpt.meta["settings"], settings.model_dump(mode="json"), allowed)
    return ckpt


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
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs(workers, device, persistent=True))


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
    if resumed is not None:
        task.restore(resumed)          # whole weights, before any sharding
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
    pos = Position()
    if resumed is not None:
        training = resumed.training_state()
        spread.load_optimizer_state(optimizer, training["optimizer"])
        scaler.load_state_dict(training["scaler"])
        pos = Position(**resumed.meta["position"])
        if world.is_main:
            metrics.truncate_after(pos.step)
        say(f"resuming from {resumed.path.name}: epoch {pos.epoch}, step {pos.step}")

    if world.is_main:
        resolved.write(run_dir)
        task.write_files(run_dir)
        runs.write_manifest(run_dir, runs.manifest(world, device, tr.seed, task.data_record(), {
            "precision": placement.precision, "effective_batch": plan.effective_batch, "lr": plan.lr,
            "resumed": resumed is not None, "speed": {
                "precision_requested": tr.precision, "compile": tr.compile if compilation.active else "off",
                "activation_checkpointing": tr.activation_checkpointing, "fsdp": getattr(tr, "fsdp", False),
                "optimizer": adamw.implementation(optimizer.param_groups),
                "intra_op_threads": threads.intra_op, "threads_reason": threads.reason},
            **task.run_record()}))
    for line in task.describe():
        say(line)
    say(f"{plan.steps_per_epoch} steps/epoch x {plan.epochs} epochs on {device} "
        f"({world.size} process(es), {placement.precision})")
    say(plan.scaling)
    say(speed_line(tr, compilation, optimizer, threads, device))
    sampler = StepBatches(len(task.dataset), tr.batch_size, world.rank, world.size, tr.seed)
    loader = run_loader(task.dataset, sampler, settings.data.workers, device)

    def batches(epoch: int, start: int) -> DataLoader:
        sampler.set_position(epoch, start, plan.micro_steps_per_epoch)
        return loader

    def save(position: Position) -> None:
        model_state = spread.model_state()              # sharded: every process takes part
        optimizer_state = spread.optimizer_state(optimizer)
        if not world.is_main:
            return
        meta = {"kind": task.kind, "position": dataclasses.asdict(position),
                "settings": settings.model_dump(mode="json"), "provenance": resolved.provenance,
                "run_dir": str(run_dir), **task.checkpoint_meta()}
        checkpoints.save(ckpt_dir, f"step-{position.step:08d}", model_state, meta,
                         {"optimizer": optimizer_state, "scaler": scaler.state_dict()},
                         keep_last=tr.keep_last)

    task.model.train()
    with intra_op_threads(threads.intra_op), \
            StepProgress(console, plan.total_steps, pos.step, world.is_main, label=task.kind) as progress:
        trainer = Trainer(task=task, net=spread.net, no_sync=spread.no_sync, compilation=compilation,
                          optimizer=optimizer, scaler=scaler, clip_grad=opt.clip_grad,
                          placement=placement, plan=plan, log_every=tr.log_every,
                          checkpoint_every=tr.checkpoint_every, batches=batches, save=save,
                          ckpt_dir=ckpt_dir, output=RunOutput(metrics, progress, world.is_main))
        summary = run_loop(trainer, pos)
    return {**summary, "run_dir": str(run_dir), "epochs": tr.epochs}
