"""`localmim benchmark`: the configured training step against a baseline timed in the same run.

One step is what `pretrain` does per batch: masking, encoder, decoders, targets, the summed loss,
backward and the AdamW step, on a synthetic batch already on the device (an optimizer step per
batch: train.accum_steps is not applied). Each configuration is built, counted (FLOPs of one
step) and warmed up in turn, its peak memory measured as growth over what was allocated before.

The baseline is the straightforward eager path: the same model and step at fp32 (fp16 autocast
with a gradient scaler on CUDA, as published), with the HOG target computed the published way
(targets/hog_reference.py: per scale and per colour channel, the whole gradient pipeline again)
and decoders that predict every cell, as published (pretraining predicts only what the loss reads).
Every figure comes with its ratio configured / baseline; bare times mean little on their own.

Steps are timed interleaved (baseline, configured, against, baseline, ...), so load that comes
and goes on a shared machine falls on all of them alike rather than on one.

The local decoders' cost: the configured model is also timed with one decoder only, on its last
tap at scale 1 (the same encoder, target, batch and precision), in the same interleaved rounds;
configured step / top-only step is what the decoders on the lower taps cost on this hardware.

The loader is measured on its own (images/s from the real folder with the configured workers),
then feeding the configured step, which gives the share of the loop spent waiting for data.
"""

from __future__ import annotations

import platform
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils import flop_counter

from localmim_cli.config.layers import Resolved
from localmim_cli.config.resolve import resolve_settings
from localmim_cli.config.schema import PretrainSettings
from localmim_cli.data.images import pretrain_dataset, resolve_image_paths
from localmim_cli.engine import distributed
from localmim_cli.engine import optimizer as adamw
from localmim_cli.engine.activation_checkpointing import checkpoint_blocks, transformer_blocks
from localmim_cli.engine.compiling import Compilation
from localmim_cli.engine.loop import autocast, optimizer_step, resolve_precision
from localmim_cli.engine.peak_memory import PeakMemory
from localmim_cli.engine.step_timer import median, synchronize, time_interleaved
from localmim_cli.engine.threads import choose_intra_op_threads
from localmim_cli.errors import UsageError
from localmim_cli.model.build import build_model
from localmim_cli.model.localmim import LocalMIM
from localmim_cli.targets.hog import HOGTarget
from localmim_cli.targets.hog_reference import PublishedHOG
from localmim_cli.tasks.pretrain import param_groups

# What each ratio compares; every one is configured / baseline (or / against).
RATIO_KEYS = ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image", "tflops")

# progress(phase, total) -> advance(): called once per unit of work of that phase
Progress = Callable[[str, int], Callable[[], None]]


def _no_progress(phase: str, total: int) -> Callable[[], None]:
    return lambda: None


def against_settings(spec: str, configured: PretrainSettings) -> Resolved:
    """The second configuration of `--against`: a preset name or file, or a settings file.

    It runs at the configured batch size, device and precision, so the two steps differ only
    in the model.
    """
    flags = {"train.batch_size": configured.train.batch_size, "train.device": configured.train.device,
             "train.precision": configured.train.precision}
    names = {k: "the benchmarked configuration" for k in flags}
    path = Path(spec).expanduser()
    if path.is_file() and not _is_preset_file(path):
        return resolve_settings(PretrainSettings, config=path, flags=flags, flag_names=names)
    return resolve_settings(PretrainSettings, preset=spec, flags=flags, flag_names=names)


def _is_preset_file(path: Path) -> bool:
    if path.suffix != ".toml":
        return False
    try:
        return "preset" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True   # let the preset reader say what is wrong with it


def benchmark(resolved: Resolved, *, label: str = "configured", against: Resolved | None = None,
              against_label: str = "against", steps: int = 10, warmup: int = 3, measure_data: bool = True,
              progress: Progress | None = None) -> dict[str, Any]:
    """Time the step of `resolved` (and of `against`) against the baseline; a JSON-ready dict.

    Ratios are configured / baseline and configured / against, one per figure in RATIO_KEYS.
    Sets torch's CPU threads for the duration (see engine/threads.py) and restores them.
    """
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {warmup}")
    settings: PretrainSettings = resolved.settings
    if measure_data:
        resolve_image_paths(settings.data.path)   # a bad folder fails now, not after the timing
    progress = progress or _no_progress
    device = distributed.choose_device(settings.train.device, distributed.World())
    threads = choose_intra_op_threads(device, settings.data.workers, settings.train.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads.intra_op)
    try:
        batch = settings.train.batch_size
        result: dict[str, Any] = {
            "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
            "batch_size": batch, "steps": steps, "warmup": warmup,
            "threads": {"intra_op": threads.intra_op, "cores": threads.cores,
                        "loader_workers": settings.data.workers, "reason": threads.reason},
        }
        _warm_process(settings, device)
        contenders = [("baseline", settings, "baseline", True),
                      ("configured", settings, label, False)]
        if settings.train.compile != "off":   # the same step uncompiled: what compiling gains
            eager = settings.model_copy(update={"train": settings.train.model_copy(update={"compile": "off"})})
            contenders.append(("eager", eager, f"{label} eager", False))
        if against is not None:
            contenders.append(("against", against.settings, against_label, False))
        if top := top_only_settings(settings):
            contenders.append(("top_only", top, f"{label} top-only", False))
        prepared = {key: _prepare(s, name, is_baseline, device, warmup, progress)
                    for key, s, name, is_baseline in contenders}
        advance = progress(f"timing {steps} steps each, interleaved", steps * len(prepared))
        seconds = time_interleaved([c.run for c in prepared.values()], steps, device, after_each=advance)
        for (key, c), times in zip(prepared.items(), seconds):
            result[key] = c.finish(times)
        result["memory_method"] = prepared["configured"].memory_method   # the same for all: one device
        if measure_data:
            c = prepared["configured"]
            result["data"] = measure_loader(settings, c.model, c.step, device, steps,
                                            result["configured"]["img_per_s"], progress)
        del prepared
        result["vs_baseline"] = ratios(result["configured"], result["baseline"])
        if "eager" in result:
            result["vs_eager"] = ratios(result["configured"], result["eager"])
        if against is not None:
            result["vs_against"] = ratios(result["configured"], result["against"])
        if "top_only" in result:
            result["local_decoders_cost"] = result["configured"]["step_ms"] / result["top_only"]["step_ms"]
            result["local_decoders_flops"] = (result["configured"]["flops_per_image"]
                                              / result["top_only"]["flops_per_image"])
        return result
    finally:
        torch.set_num_threads(previous_threads)


def top_only_settings(settings: PretrainSettings) -> PretrainSettings | None:
    """The same model with one decoder, on its last tap at scale 1; None if it has one tap already."""
    layers = build_model(settings.model).encoder.tap_layers
    if len(layers) < 2:
        return None
    model = settings.model
    width = model.decoder.width if isinstance(model.decoder.width, int) else model.decoder.width[-1]
    decoder = model.decoder.model_copy(update={"width": width})
    return settings.model_copy(update={"model": model.model_copy(
        update={"taps": [layers[-1]], "scales": [1.0], "decoder": decoder})})


def ratios(top: dict[str, Any], bottom: dict[str, Any], keys: tuple[str, ...] = RATIO_KEYS) -> dict[str, float | None]:
    """top / bottom for each figure in `keys` (None where bottom's is zero)."""
    return {k: (top[k] / bottom[k] if bottom[k] else None) for k in keys}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def baseline_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def _published_target(model: LocalMIM) -> tuple[torch.nn.Module, str]:
    """The baseline's target: HOG the published way, or the configured target when not HOG."""
    target = model.target
    if not isinstance(target, HOGTarget):
        return target, f"the configured target ({type(target).__name__}; no published variant to compare)"
    what = "HOG computed per scale and per colour channel as published; otherwise the same step"
    if target.options.soft:
        what += " (hard binning: soft binning is not in the published code)"
    return PublishedHOG(target.nbins, target.cells_px, target.sobel_bias), what


def _warm_process(settings: PretrainSettings, device: torch.device) -> None:
    """One untimed step before anything is measured: lazy initialisation (kernels, thread pools,
    allocator pools) then weighs on no one configuration's time or memory."""
    model = build_model(settings.model).to(device).train()
    step = training_step(model, settings, resolve_precision(settings.train.precision, device), device)
    step(*synthetic_batch(settings.train.batch_size, settings.model.img_size, model.num_units, 0, device))
    synchronize(device)


class _Prepared:
    """A contender built, counted and warmed up, its peak memory measured, ready to be timed."""

    def __init__(self, entry: dict[str, Any], model: LocalMIM, step, images: torch.Tensor,
                 noise: torch.Tensor, flops: int, peak: PeakMemory):
        self.entry, self.model, self.step = entry, model, step
        self.images, self.noise, self.flops = images, noise, flops
        self.peak_bytes, self.memory_method = peak.bytes, peak.method

    def run(self) -> None:
        self.step(self.images, self.noise)

    def finish(self, seconds: list[float]) -> dict[str, Any]:
        batch = self.images.shape[0]
        step_s = median(seconds)
        return {**self.entry,
                "img_per_s": batch / step_s, "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * s for s in seconds],
                "peak_memory_bytes": self.peak_bytes, "flops_per_image": self.flops / batch,
                "tflops": self.flops / step_s / 1e12}


def _prepare(settings: PretrainSettings, name: str, is_baseline: bool, device: torch.device, warmup: int,
             progress: Progress) -> _Prepared:
    """Build, count FLOPs (one step) and warm up, measuring the peak memory of all of it: the
    first steps allocate the optimizer state, so the peak is the steady state's. Contenders
    prepared earlier stay allocated; the measurement is growth, so they do not count."""
    precision = baseline_precision(device) if is_baseline else resolve_precision(settings.train.precision, device)
    batch, img_size = settings.train.batch_size, settings.model.img_size
    entry: dict[str, Any] = {"label": name, "encoder": settings.model.encoder.name,
                             "target": settings.model.target.name, "img_size": img_size, "precision": precision}
    advance = progress(f"{name}: build, 1 counted and {warmup} warm-up step(s)", 1 + warmup)
    with PeakMemory(device) as peak:
        torch.manual_seed(settings.train.seed)
        model = build_model(settings.model)
        if is_baseline:
            model.target, entry["what"] = _published_target(model)
        else:
            entry["what"] = "the step as pretrain takes it"
        model = model.to(device).train()
        entry["parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not is_baseline and settings.train.activation_checkpointing:
            checkpoint_blocks(transformer_blocks(model.encoder))
        step = training_step(model, settings, precision, device, published=is_baseline)
        images, noise = synthetic_batch(batch, img_size, model.num_units, settings.train.seed, device)
        flops = count_flops(lambda: step(images, noise))   # eager (FLOPs are counted so), a warm-up step
        advance()
        if not is_baseline:
            compilation = Compilation(model, settings.train.compile, device, lambda line: None)
            entry["compile"] = settings.train.compile if compilation.active else "off"
            if compilation.active:
                # the first compiled step compiles: always a warm-up step, never timed
                compilation.first_step(lambda: step(images, noise), undo=lambda: None)
                entry["compile"] = settings.train.compile if compilation.active else "off (failed)"
        entry["optimizer"] = "AdamW " + adamw.implementation(step.optimizer.param_groups)
        for _ in range(warmup):
            step(images, noise)
            advance()
    return _Prepared(entry, model, step, images, noise, flops, peak)


def training_step(model: LocalMIM, settings: PretrainSettings, precision: str, device: torch.device,
                  published: bool = False, loss_only: bool | None = None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """step(images, noise): one optimizer step exactly as the pretraining loop takes it (with
    `published`, torch's default AdamW and decoders predicting every cell, as the published code
    does; `loss_only` sets the latter alone). `step.optimizer` is its optimizer."""
    opt = settings.optim
    lr = opt.lr if opt.lr is not None else opt.base_lr * settings.train.batch_size / 256
    groups = param_groups(model, opt.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=opt.betas) if published else \
        adamw.adamw(groups, lr=lr, betas=opt.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_only = not published if loss_only is None else loss_only

    def step(images: torch.Tensor, noise: torch.Tensor) -> None:
        with autocast(precision, device):
            loss = model(images, noise=noise, loss_only=loss_only).loss
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, lr, opt.clip_grad)
    step.optimizer = optimizer
    return step


def synthetic_batch(batch: int, img_size: int, num_units: int, seed: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal noise as normalized images (B, 3, S, S) and masking noise (B, units), on the device."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=generator)
    noise = torch.rand(batch, num_units, generator=generator)
    return images.to(device), noise.to(device)


def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the GPU kernels of scaled_dot_product_attention, not the CPU one (its shapes are
# the same: batch, heads, rows, head width)
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call (matrix products, convolutions, attention; forward and backward)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Data loading


class _EndlessBatches:
    """Batches of random indices forever (one permutation after another), so a small folder
    never ends an epoch in the middle of a measurement."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        pending: list[int] = []
        while True:
            while len(pending) < self.batch:
                pending += torch.randperm(self.n, generator=generator).tolist()
            yield pending[:self.batch]
            pending = pending[self.batch:]


def measure_loader(settings: PretrainSettings, model: LocalMIM, step, device: torch.device, steps: int,
                   step_img_per_s: float, progress: Progress) -> dict[str, Any]:
    """The loader alone (images/s), then feeding the step (images/s and data-wait share)."""
    workers, batch = settings.data.workers, settings.train.batch_size
    dataset, _ = pretrain_dataset(settings.data, settings.model.img_size, model.num_units, settings.train.seed)
    loader = DataLoader(dataset, batch_sampler=_EndlessBatches(len(dataset), batch, settings.train.seed),
                        collate_fn=dataset.collate(),
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    # Enough batches that the few the workers finish while the first is awaited weigh little.
    n_batches = max(steps, 4 * workers, 8)
    advance = progress(f"loader alone: {n_batches} batches", n_batches)
    batches = iter(loader)
    next(batches)   # worker start-up is not loading
    start = _now(device)
    for _ in range(n_batches):
        next(batches)
        advance()
    loader_img_per_s = n_batches * batch / (_now(device) - start)

    # A fresh pass starts with an empty prefetch queue, as every epoch does.
    advance = progress(f"loader feeding the step: {steps + 1} steps", steps + 1)
    batches = iter(loader)
    waited = 0.0
    for i in range(steps + 1):
        if i == 1:   # the first step waits for the pipeline to fill; a warm-up
            start, waited = _now(device), 0.0
        t0 = _now(None)
        sample = next(batches)
        waited += _now(None) - t0
        step(sample["image"].to(device, non_blocking=True), sample["noise"].to(device, non_blocking=True))
        advance()
    elapsed = _now(device) - start
    del batches, loader
    fed = steps * batch / elapsed
    return {
        "source": str(settings.data.path) if settings.data.path else "built-in sample photos",
        "images": len(dataset.paths), "workers": workers, "loader_img_per_s": loader_img_per_s,
        "step_img_per_s": step_img_per_s, "loader_over_step": loader_img_per_s / step_img_per_s,
        "fed_img_per_s": fed, "data_wait_share": waited / elapsed,
    }


def _now(device: torch.device | None) -> float:
    """perf_counter, after the device's queued work when a device is given."""
    if device is not None:
        synchronize(device)
    return time.perf_counter()
