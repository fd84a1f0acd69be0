"""`localmim benchmark --preset <a segmentation or detection preset>`: that task's training step
against the classification fine-tune step of the same encoder, at the same batch, crop, device
and precision, timed interleaved in one process.

A step is what the task's run does per batch (its recipe's `benchmark_step`: the model built
from settings, its loss on a synthetic batch already on the device, backward, and the AdamW step
on its layer-decay groups as the engine takes it). The baseline is classification's: the same
ViT (model.arch) as a timm classifier at model.img_size, Mixup/CutMix and label-smoothed
cross-entropy, layer-decay AdamW, 1000 classes (ImageNet's, the published fine-tune). Each step
is built, counted (FLOPs of one step, a warm-up step) and warmed up in turn, its peak memory
measured as growth over what was allocated before (engine/peak_memory.py), then all are timed
interleaved (engine/step_timer.py), so load that comes and goes falls on both alike. Every
figure comes with its ratio task / classification.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from localmim_cli.config.layers import Resolved
from localmim_cli.errors import UsageError

RATIO_KEYS = ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image")
IMAGENET_CLASSES = 1000


@dataclass
class BenchStep:
    """One task's step, built: `loss()` runs the forward on its synthetic batch (on the device)."""
    what: str                                   # one line: the model, the batch
    model: torch.nn.Module
    loss: Callable[[], torch.Tensor]
    groups: list[dict[str, Any]]                # the optimizer's parameter groups (layer decay)
    lr: float
    betas: tuple[float, float]
    clip_grad: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def synthetic_images(batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) normal noise, as normalized images, on the device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def baseline_settings(settings: Any) -> Any:
    """Classification fine-tuning settings at the task's encoder, crop, batch, device and precision."""
    from localmim_cli.config.schema import FinetuneSettings

    m, t = settings.model, settings.train
    return FinetuneSettings.model_validate({
        "model": {"arch": m.arch, "img_size": m.img_size, "drop_path": m.drop_path},
        "train": {"batch_size": t.batch_size, "device": t.device, "precision": t.precision, "seed": t.seed}})


def benchmark_task(resolved: Resolved, *, label: str, steps: int = 10, warmup: int = 3,
                   progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict[str, Any]:
    """Time the task step of `resolved` (a fine-tuning task's settings) against classification's;
    a JSON-ready dict: "classification" and "configured" (the task's step), each with img_per_s,
    step_ms, peak_memory_bytes and flops_per_image, and "vs_classification" (configured /
    classification, one ratio per figure)."""
    from localmim_cli.engine import distributed
    from localmim_cli.engine.loop import resolve_precision
    from localmim_cli.engine.step_timer import time_interleaved
    from localmim_cli.engine.threads import choose_intra_op_threads
    from localmim_cli.tasks.benchmark import _device_name, ratios
    from localmim_cli.tasks.finetune import recipe_for

    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {warmup}")
    settings = resolved.settings
    if not settings.model.arch:
        raise UsageError(f"benchmark --preset {label}: the step is built from model.arch (a timm ViT) without "
                         "weights; this recipe has none: give one with --set model.arch=vit_base_patch16_224")
    progress = progress or (lambda phase, total: lambda: None)
    device = distributed.choose_device(settings.train.device, distributed.World())
    precision = resolve_precision(settings.train.precision, device)
    threads = choose_intra_op_threads(device, 0, settings.train.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads.intra_op)
    try:
        baseline = baseline_settings(settings)
        contenders = [("classification", "classification fine-tune", recipe_for(baseline), baseline),
                      ("configured", label, recipe_for(settings), settings)]
        _warm(contenders[0][2], baseline, device, precision)
        prepared = {key: _prepare(name, recipe, s, device, precision, warmup, progress)
                    for key, name, recipe, s in contenders}
        advance = progress(f"timing {steps} steps each, interleaved", steps * len(prepared))
        seconds = time_interleaved([p.run for p in prepared.values()], steps, device, after_each=advance)
        result: dict[str, Any] = {
            "task": settings.task, "preset": label, "device": str(device), "device_name": _device_name(device),
            "torch": torch.__version__, "batch_size": settings.train.batch_size, "img_size": settings.model.img_size,
            "arch": settings.model.arch, "precision": precision, "steps": steps, "warmup": warmup,
            "threads": {"intra_op": threads.intra_op, "cores": threads.cores, "reason": threads.reason},
            "memory_method": prepared["configured"].memory_method}
        for (key, p), times in zip(prepared.items(), seconds):
            result[key] = p.finish(times)
        del prepared
        result["vs_classification"] = ratios(result["configured"], result["classification"], RATIO_KEYS)
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _step(bench: BenchStep, device: torch.device, precision: str) -> Callable[[], None]:
    """One optimizer step exactly as the engine takes it: autocast forward, scaled backward,
    lr times each group's lr_scale, AdamW (engine/optimizer.py's choice of implementation)."""
    from localmim_cli.engine import optimizer as adamw
    from localmim_cli.engine.loop import autocast, optimizer_step

    optimizer = adamw.adamw(bench.groups, lr=bench.lr, betas=bench.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with autocast(precision, device):
            loss = bench.loss()
        scaler.scale(loss).backward()
        optimizer_step(bench.model, optimizer, scaler, bench.lr, bench.clip_grad)
    step.optimizer = optimizer
    return step


def _warm(recipe: Any, settings: Any, device: torch.device, precision: str) -> None:
    """One untimed step first: lazy initialisation weighs on neither contender."""
    from localmim_cli.engine.step_timer import synchronize

    bench = recipe.benchmark_step(settings, device)
    _step(bench, device, precision)()
    synchronize(device)


class _Prepared:
    def __init__(self, entry: dict[str, Any], run: Callable[[], None], batch: int, flops: int, peak):
        self.entry, self.run, self.batch, self.flops = entry, run, batch, flops
        self.peak_bytes, self.memory_method = peak.bytes, peak.method

    def finish(self, seconds: list[float]) -> dict[str, Any]:
        from localmim_cli.engine.step_timer import median

        step_s = median(seconds)
        return {**self.entry, "img_per_s": self.batch / step_s, "step_ms": 1e3 * step_s,
                "step_ms_all": [1e3 * s for s in seconds], "peak_memory_bytes": self.peak_bytes,
                "flops_per_image": self.flops / self.batch}


def _prepare(name: str, recipe: Any, settings: Any, device: torch.device, precision: str, warmup: int,
             progress) -> _Prepared:
    """Build, count FLOPs (one step) and warm up under one peak-memory measurement: the first
    steps allocate the optimizer state, so the peak is the steady state's."""
    from localmim_cli.engine import optimizer as adamw
    from localmim_cli.engine.peak_memory import PeakMemory
    from localmim_cli.tasks.benchmark import count_flops

    advance = progress(f"{name}: build, 1 counted and {warmup} warm-up step(s)", 1 + warmup)
    with PeakMemory(device) as peak:
        torch.manual_seed(settings.train.seed)
        bench = recipe.benchmark_step(settings, device)
        step = _step(bench, device, precision)
        flops = count_flops(step)
        advance()
        for _ in range(warmup):
            step()
            advance()
    entry = {"label": name, "what": bench.what, "precision": precision,
             "parameters": sum(p.numel() for p in bench.model.parameters() if p.requires_grad),
             "optimizer": "AdamW " + adamw.implementation(step.optimizer.param_groups), **bench.extra}
    return _Prepared(entry, step, settings.train.batch_size, flops, peak)
