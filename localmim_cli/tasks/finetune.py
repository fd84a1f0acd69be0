"""Fine-tuning a pretrained encoder for classification: the published ViT protocol (MAE's).

checkpoint -> timm VisionTransformer (global average pool, a new fc_norm, a new head with
trunc-normal(2e-5) weights) -> RandAugment + random erasing -> Mixup/CutMix -> soft-target or
label-smoothed cross-entropy -> AdamW (0.9, 0.999) with layer-wise lr decay, warmup + cosine.

The loop mirrors `pretrain.py`: the same run directory, checkpoints, exact resume (per-sample
augmentations, per-step mixing and drop path are all seeded from the run seed), precision and
torchrun handling, and no host synchronisation per step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import DataError, ModelError, UsageError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from localmim_cli.weights.sources import EncoderWeights, ViTShape
    from localmim_cli.weights.via_timm import PluginShape
    from localmim_cli.config.layers import Resolved
    from localmim_cli.config.schema import FinetuneSettings

# Settings a resume may change without breaking exact continuation.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                     "train.device", "train.eval_every", "train.eval_batch_size", "data.workers",
                     "data.path", "data.val_path", "init"}


# ---------------------------------------------------------------------------------------------
# Model


def model_shape(settings: "FinetuneSettings", weights: "EncoderWeights | None") -> "ViTShape | PluginShape":
    """The ViT to fine-tune: the checkpoint's, checked against model.arch, at model.img_size.
    A checkpoint of another encoder plugin: its to_timm() model (a PluginShape)."""
    from localmim_cli.weights import via_timm
    from localmim_cli.weights.sources import arch_shape, check_arch, require_vit

    m = settings.model
    if weights is not None and via_timm.is_plugin_checkpoint(weights):
        return via_timm.plugin_shape(weights, m.arch, m.img_size)
    if weights is None:
        if not m.arch:
            raise UsageError("finetune needs --init CHECKPOINT (or model.arch to train from scratch)")
        shape = arch_shape(m.arch, m.img_size)
    else:
        require_vit(weights, "finetune")
        check_arch(weights, m.arch)
        shape = weights.shape
    if m.img_size and m.img_size != shape.img_size:
        if m.img_size % shape.patch_size:
            raise ModelError(f"model.img_size {m.img_size} is not divisible by the patch size {shape.patch_size}")
        shape = dataclasses.replace(shape, img_size=m.img_size)
    return shape


def build_classifier(shape: "ViTShape | PluginShape", num_classes: int, settings: "FinetuneSettings",
                     weights: "EncoderWeights | None") -> "torch.nn.Module":
    """The fine-tuning model with the encoder's weights in and a fresh fc_norm and head."""
    import torch
    from timm.layers import trunc_normal_

    from localmim_cli.weights.sources import create_vit, fit_positions
    from localmim_cli.weights.via_timm import PluginShape, init_classifier
    from localmim_cli.errors import CheckpointError

    if isinstance(shape, PluginShape):
        return init_classifier(shape, weights, num_classes, settings.model.head_init_std)
    model = create_vit(shape, num_classes=num_classes, pooling="pool_then_norm",
                       drop_path=settings.model.drop_path, arch=settings.model.arch)
    if weights is not None:
        state = fit_positions(weights.encoder_state(), weights.shape, shape.img_size)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("fc_norm.", "head."))]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{weights.source}: encoder weights do not fit {shape.describe()}: "
                                  f"missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=settings.model.head_init_std)
        torch.nn.init.zeros_(model.head.bias)
        torch.nn.init.ones_(model.fc_norm.weight)
        torch.nn.init.zeros_(model.fc_norm.bias)
    return model


def layer_decay_groups(model: "torch.nn.Module", weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's layer-wise groups: patch_embed/cls/pos = layer 0, block i = i + 1, norms and head
    = L + 1 (scale 1); no decay on 1-D parameters, pos_embed and cls_token (MAE's choice)."""
    from timm.optim import param_groups_layer_decay
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


# ---------------------------------------------------------------------------------------------
# Data


def train_transform(settings: "FinetuneSettings", img_size: int):
    from timm.data import create_transform

    from localmim_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
    d = settings.data
    return create_transform(input_size=img_size, is_training=True, scale=d.crop_scale, hflip=d.hflip,
                            color_jitter=d.color_jitter, auto_augment=d.auto_augment or None,
                            interpolation=d.interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            re_prob=d.reprob, re_mode=d.remode, re_count=d.recount)


def criterion(settings: "FinetuneSettings"):
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if settings.mixup.active:
        return SoftTargetCrossEntropy()   # Mixup makes smoothed soft targets itself
    if settings.optim.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=settings.optim.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def mixer(settings: "FinetuneSettings", num_classes: int):
    if not settings.mixup.active:
        return None
    from timm.data import Mixup
    mx = settings.mixup
    return Mixup(mixup_alpha=mx.mixup, cutmix_alpha=mx.cutmix, cutmix_minmax=mx.cutmix_minmax, prob=mx.prob,
                 switch_prob=mx.switch_prob, mode=mx.mode, label_smoothing=settings.optim.label_smoothing,
                 num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Validation


def validate(model: "torch.nn.Module", samples, img_size: int, settings: "FinetuneSettings",
             device: "torch.device", precision: str, world) -> dict[str, float]:
    """top-1, top-5 (top-k with k = min(5, classes)) and loss on the validation samples, each
    process taking every world-size-th image; counts are summed over processes."""
    import torch
    from torch.utils.data import DataLoader

    from localmim_cli.engine import distributed
    from localmim_cli.tasks.features import EvalSamples, loader_kwargs
    from localmim_cli.engine.loop import autocast

    mine = list(samples)[world.rank::world.size]
    batch = settings.train.eval_batch_size or settings.train.batch_size
    totals = torch.zeros(4, device=device, dtype=torch.float64)   # correct1, correct5, loss sum, n
    if mine:
        loader = DataLoader(EvalSamples(mine, img_size, settings.data.eval_crop_fraction), batch_size=batch,
                            shuffle=False, **loader_kwargs(settings.data.workers, device))
        was_training = model.training
        model.eval()
        k = min(5, model.num_classes)
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast(precision, device):
                    logits = model(images)
                logits = logits.float()
                top = logits.topk(k, dim=1).indices                      # (B, k)
                hit = top == labels[:, None]
                totals[0] += hit[:, 0].sum()
                totals[1] += hit.any(dim=1).sum()
                totals[2] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                totals[3] += labels.numel()
        model.train(was_training)
    totals = distributed.all_reduce_mean(totals, world) * world.size
    c1, c5, loss, n = totals.tolist()
    n = max(n, 1)
    return {"val_top1": 100 * c1 / n, "val_top5": 100 * c5 / n, "val_loss": loss / n, "val_images": int(n)}


# ---------------------------------------------------------------------------------------------
# The loop


def run(resolved: "Resolved", run_dir: Path, resume: bool, console: "Console",
        weights: "EncoderWeights | None" = None) -> dict[str, Any]:
    """Fine-tune; returns a summary. The run directory must already be prepared (runs.prepare).
    The resolved settings and their provenance are written into it once a resume has been
    checked against the checkpoint.

    weights: the --init checkpoint, when the caller has read it already (else read here).
    """
    from localmim_cli.engine import distributed
    world = distributed.from_environment()
    device = distributed.choose_device(resolved.settings.train.device, world)
    distributed.init(world, device)
    try:
        return _train(resolved, run_dir, resume, console, world, device, weights)
    finally:
        distributed.shutdown(world)


def _train(resolved: "Resolved", run_dir: Path, resume: bool, console: "Console", world,
           device: "torch.device", weights: "EncoderWeights | None") -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from localmim_cli.engine import atomic
    from localmim_cli.engine import checkpoints
    from localmim_cli.engine import runs
    from localmim_cli.data.images import draft_size_for, fingerprint
    from localmim_cli.errors import DataError
    from localmim_cli.weights.sources import ViTShape, load_encoder_weights, timm_model_args
    from localmim_cli.tasks.features import AugmentedSamples, labelled_split, loader_kwargs, split_record
    from localmim_cli.weights.via_timm import PluginShape, shape_from_record
    from localmim_cli.engine.progress import StepProgress
    from localmim_cli.errors import CheckpointError
    from localmim_cli.data.samplers import StepBatches
    from localmim_cli.seeding import derive_seed
    from localmim_cli.engine.loop import Loop, Position, check_resume_compatible, resolve_precision, run_loop

    settings: FinetuneSettings = resolved.settings
    tr, opt_s, d = settings.train, settings.optim, settings.data
    precision = resolve_precision(tr.precision, device)
    say = console.print if world.is_main else (lambda *a, **k: None)
    if d.path is None:
        raise DataError("finetune needs DATA, a folder with one subfolder of images per class")

    ckpt_dir = run_dir / "checkpoints"
    ckpt = checkpoints.load(ckpt_dir) if resume else None
    split = labelled_split(d.path, d.val_path, d.val_fraction, tr.seed,
                           classes=ckpt.meta["classes"] if ckpt else None)
    if len(split.classes) < 2:
        raise DataError(f"{d.path}: only one class folder ({split.classes[0]}); classification needs two or more")
    num_classes = len(split.classes)

    if ckpt is not None:
        check_resume_compatible(ckpt.meta["settings"], settings.model_dump(mode="json"), RESUMABLE_CHANGES)
        timm_meta = ckpt.meta["timm"]
        shape = shape_from_record(timm_meta) if timm_meta.get("plugin") else ViTShape(**timm_meta["shape"])
        weights = None
        init_record = ckpt.meta.get("init")
    else:
        if weights is None and settings.init:
            weights = load_encoder_weights(settings.init)
        shape = model_shape(settings, weights)
        init_record = ({"source": str(weights.source), "kind": weights.kind,
                        "shape": dataclasses.asdict(weights.shape)} if weights else None)
    torch.manual_seed(tr.seed)
    model = build_classifier(shape, num_classes, settings, weights).to(device)

    dataset = AugmentedSamples(split.train, train_transform(settings, shape.img_size), tr.seed,
                               draft_size_for(shape.img_size, d.crop_scale[0]), d.repeats)
    batches = StepBatches(len(dataset), tr.batch_size, world.rank, world.size, tr.seed)
    steps_per_epoch = batches.micro_steps_per_epoch() // tr.accum_steps
    if steps_per_epoch < 1:
        raise DataError(f"{len(dataset)} training images make no full optimizer step of {tr.batch_size} x "
                        f"{world.size} process(es) x {tr.accum_steps} accumulation; lower train.batch_size "
                        "or raise data.repeats")
    micro_per_epoch = steps_per_epoch * tr.accum_steps
    total_steps = steps_per_epoch * tr.epochs
    eff_batch = tr.batch_size * world.size * tr.accum_steps
    lr = opt_s.lr if opt_s.lr is not None else opt_s.base_lr * eff_batch / 256

    groups = layer_decay_groups(model, opt_s.weight_decay, opt_s.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=opt_s.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = criterion(settings)
    mix = mixer(settings, num_classes)
    metrics_log = runs.MetricsLog(run_dir / "metrics.jsonl")
    pos = Position()
    best: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    if ckpt is not None:
        state = ckpt.model_state()
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the model it describes")
        training = ckpt.training_state()
        optimizer.load_state_dict(training["optimizer"])
        scaler.load_state_dict(training["scaler"])
        pos = Position(**ckpt.meta["position"])
        best, last_val = ckpt.meta.get("best") or {}, ckpt.meta.get("val") or {}
        if world.is_main:
            metrics_log.truncate_after(pos.step)
        say(f"resuming from {ckpt.path.name}: epoch {pos.epoch}, step {pos.step}")

    if isinstance(shape, PluginShape):
        timm_record = shape.timm_record(num_classes)
    else:
        arch = settings.model.arch or shape.arch
        timm_record = {"architecture": arch, "model_args": timm_model_args(shape, "pool_then_norm", num_classes),
                       "shape": dataclasses.asdict(shape)}
    if world.is_main:
        resolved.write(run_dir)
        atomic.write_json(run_dir / "classes.json", split.classes)
        runs.write_manifest(run_dir, runs.manifest(world, device, tr.seed, {
            **split_record(split), "fingerprint": fingerprint([p for p, _ in split.train])},
            {"precision": precision, "effective_batch": eff_batch, "lr": lr, "resumed": resume,
             "init": init_record, "model": timm_record}))
    say(f"data: {split.describe()}")
    say(f"model: {shape.describe()}, {num_classes} classes; init: "
        + (f"{init_record['kind']} {init_record['source']}" if init_record else "random (from scratch)"))
    say(f"{steps_per_epoch} steps/epoch x {tr.epochs} epochs on {device} ({world.size} process(es), {precision}); "
        + (f"effective batch {eff_batch}; lr = {opt_s.base_lr:g} x {eff_batch}/256 = {lr:.3g}"
           if opt_s.lr is None else f"effective batch {eff_batch}; lr {lr:g} (absolute)")
        + f", layer decay {opt_s.layer_decay:g}")

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model
    lkw = loader_kwargs(d.workers, device)

    def save_checkpoint(position: Position) -> None:
        if not world.is_main:
            return
        meta = {"kind": "finetune", "position": vars(position), "settings": settings.model_dump(mode="json"),
                "provenance": resolved.provenance, "run_dir": str(run_dir),
                "classes": split.classes, "timm": timm_record, "init": init_record,
                "val": last_val, "best": best}
        checkpoints.save(ckpt_dir, f"step-{position.step:08d}", model.state_dict(), meta,
                         {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
                         keep_last=tr.keep_last)

    def run_validation(epoch: int, step: int) -> None:
        nonlocal last_val, best
        if not split.val:
            return
        last_val = {"epoch": epoch, "step": step, **validate(model, split.val, shape.img_size, settings,
                                                                 device, precision, world)}
        if not best or last_val["val_top1"] > best["val_top1"]:
            best = dict(last_val)
        if world.is_main:
            metrics_log.write({"kind": "val", **last_val})
        progress.note(f"epoch {epoch}: val top-1 {last_val['val_top1']:.2f}%  top-5 {last_val['val_top5']:.2f}%  "
                      f"loss {last_val['val_loss']:.4f}  ({last_val['val_images']} images)")

    def epoch_batches(epoch: int, start: int):
        dataset.set_epoch(epoch)
        batches.set_position(epoch, start)
        return DataLoader(dataset, batch_sampler=_FirstN(batches, micro_per_epoch - start), **lkw)

    def forward(batch, epoch: int, micro: int):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        # Mixing and drop path draw from global generators: seed them per micro-step so a
        # resumed run draws exactly what the uninterrupted run would have.
        step_seed = derive_seed(tr.seed, "micro", world.rank, epoch, micro)
        torch.manual_seed(step_seed)
        if mix is not None:
            np_state = np.random.get_state()
            np.random.seed(step_seed % 2**32)
            x, y = mix(x, y)
            np.random.set_state(np_state)
        loss = loss_fn(net(x).float(), y)
        return loss, loss.reshape(1), x.shape[0]

    def on_epoch_end(position: Position) -> None:
        if position.epoch == tr.epochs or (tr.eval_every and position.epoch % tr.eval_every == 0):
            run_validation(position.epoch - 1, position.step)

    loop = Loop(net=net, model=model, optimizer=optimizer, scaler=scaler, world=world, device=device,
                precision=precision, train=tr, optim=opt_s, lr=lr, steps_per_epoch=steps_per_epoch,
                n_losses=1, ckpt_dir=ckpt_dir, epoch_batches=epoch_batches, forward=forward,
                loss_fields=lambda losses: {"loss": losses[0]}, on_epoch_end=on_epoch_end,
                save=save_checkpoint, metrics_write=metrics_log.write)
    model.train()
    with StepProgress(console, total_steps, pos.step, world.is_main, label="finetune") as progress:
        summary = run_loop(loop, pos, progress)
    return {**summary, "run_dir": str(run_dir), "epochs": tr.epochs, "classes": num_classes,
            "val": last_val, "best": best}


class _FirstN:
    """A batch sampler cut to its first n micro-steps (whole optimizer steps only)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, max(n, 0)

    def __len__(self) -> int:
        return min(len(self.inner), self.n)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i >= self.n:
                return
            yield batch


# ---------------------------------------------------------------------------------------------
# Entry points: what the command line and the Python API call


def preflight(settings: "FinetuneSettings", resume: bool):
    """Everything the user can get wrong, checked before the run directory is touched.
    Returns (split, the --init weights or None, the model shape or None on resume)."""
    from localmim_cli.tasks.features import labelled_split
    from localmim_cli.weights.sources import load_encoder_weights

    if settings.data.path is None:
        raise UsageError("finetune needs DATA: a folder with one subfolder of images per class")
    if settings.init is None and not settings.model.arch and not resume:
        raise UsageError("finetune needs --init CHECKPOINT (a pretrain run, a checkpoint, a published "
                         "ViT .pth, or an exported encoder); or --arch to train from scratch")
    split = labelled_split(settings.data.path, settings.data.val_path, settings.data.val_fraction,
                           settings.train.seed)
    if len(split.classes) < 2:
        raise DataError(f"{settings.data.path}: only one class folder ({split.classes[0]}); "
                        "classification needs two or more")
    if resume:
        return split, None, None
    weights = load_encoder_weights(settings.init) if settings.init else None
    return split, weights, model_shape(settings, weights)


def check(settings: "FinetuneSettings") -> str:
    """What `--dry-run` checks: data, checkpoint and model; a summary."""
    split, weights, shape = preflight(settings, resume=False)
    model = build_classifier(shape, len(split.classes), settings, weights)
    n_params = sum(p.numel() for p in model.parameters())
    return f"{split.describe()}\nmodel: {shape.describe()}, {n_params / 1e6:.2f} M parameters"


def finetune(resolved: "Resolved", run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
             console: "Console | None" = None) -> dict[str, Any]:
    """Check the inputs, prepare the run directory, fine-tune; returns a summary (last logged
    step, last and best validation). Every process of a torchrun calls this."""
    from rich.console import Console

    from localmim_cli.engine import distributed, runs

    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    _, weights, _ = preflight(resolved.settings, resume)
    if distributed.from_environment().is_main:
        runs.prepare(run_dir, resume, overwrite)
        console.print(f"run directory: {run_dir}")
    return run(resolved, run_dir, resume, console, weights)
