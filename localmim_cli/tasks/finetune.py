"""Fine-tuning a pretrained encoder for classification: the published ViT protocol (MAE's).

checkpoint -> timm VisionTransformer (global average pool, a new fc_norm, a new head with
trunc-normal(2e-5) weights) -> RandAugment + random erasing -> Mixup/CutMix -> soft-target or
label-smoothed cross-entropy -> AdamW (0.9, 0.999) with layer-wise lr decay, warmup + cosine.

What is fine-tuning's own is here (`FinetuneTask`); the run around it is `engine.training`'s, as
for pretraining: the same run directory, checkpoints, exact resume (per-sample augmentations,
per-step mixing and drop path are all seeded from the run seed), precision, torchrun, and no
host synchronisation per step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS
from localmim_cli.engine.task import TrainingTask
from localmim_cli.errors import CheckpointError, DataError, ModelError, NonFiniteWeights, UsageError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from localmim_cli.engine.checkpoints import Checkpoint
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.task import Position, RunLog
    from localmim_cli.tasks.features import LabelledSplit

    from localmim_cli.weights.sources import EncoderWeights, ViTShape
    from localmim_cli.weights.via_timm import PluginShape
    from localmim_cli.config.layers import Resolved
    from localmim_cli.config.schema import FinetuneSettings

BEST = "best"  # checkpoints/best: the best validation top-1 of the run

# Settings a resume may change without breaking exact continuation.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                     "train.device", "train.eval_every", "train.eval_batch_size", "data.workers",
                     "data.path", "data.val_path", "init", "train.loggers", *RESUMABLE_SPEED_SETTINGS}


# ---------------------------------------------------------------------------------------------
# Model


def model_shape(settings: "FinetuneSettings", weights: "EncoderWeights | None") -> "ViTShape | PluginShape":
    """The ViT to fine-tune: the checkpoint's, checked against model.arch, at model.img_size.
    A checkpoint of another encoder plugin: its to_timm() model (a PluginShape)."""
    from localmim_cli.weights import via_timm
    from localmim_cli.weights.sources import arch_shape, check_arch, require_vit

    m = settings.model
    if weights is not None and via_timm.is_plugin_checkpoint(weights):
        return via_timm.plugin_shape(weights, m.arch, m.img_size).with_drop_path(m.drop_path)
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
    from localmim_cli.weights.loading import load_exactly
    from localmim_cli.weights.via_timm import PluginShape, init_classifier

    if isinstance(shape, PluginShape):
        return init_classifier(shape, weights, num_classes, settings.model.head_init_std)
    model = create_vit(shape, num_classes=num_classes, pooling="pool_then_norm",
                       drop_path=settings.model.drop_path, arch=settings.model.arch)
    if weights is not None:
        state = fit_positions(weights.encoder_state(), weights.shape, shape.img_size)
        load_exactly(model, state, weights.source, allow_missing=("fc_norm.", "head."))
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
    from localmim_cli.data.samplers import loader_kwargs
    from localmim_cli.engine.loop import autocast
    from localmim_cli.tasks.features import EvalSamples

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
# Training


def run(resolved: "Resolved", run_dir: Path, resume: bool, console: "Console",
        weights: "EncoderWeights | None" = None) -> dict[str, Any]:
    """Fine-tune; returns a summary. The run directory must already be prepared (runs.prepare).
    The resolved settings and their provenance are written into it once a resume has been
    checked against the checkpoint.

    weights: the --init checkpoint, when the caller has read it already (else read here).
    """
    import torch

    from localmim_cli.engine import training
    from localmim_cli.tasks.features import labelled_split
    from localmim_cli.weights.sources import ViTShape, load_encoder_weights
    from localmim_cli.weights.via_timm import shape_from_record

    settings: FinetuneSettings = resolved.settings
    tr, d = settings.train, settings.data
    if d.path is None:
        raise DataError("finetune needs DATA, a folder with one subfolder of images per class")
    with training.process_group(tr) as placement:
        resumed = training.checked_resume(run_dir, resume, settings, RESUMABLE_CHANGES)
        split = labelled_split(d.path, d.val_path, d.val_fraction, tr.seed,
                               classes=resumed.meta["classes"] if resumed else None)
        if len(split.classes) < 2:
            raise DataError(f"{d.path}: only one class folder ({split.classes[0]}); classification needs two or more")
        if resumed is not None:
            timm_meta = resumed.meta["timm"]
            shape = shape_from_record(timm_meta) if timm_meta.get("plugin") else ViTShape(**timm_meta["shape"])
            weights, init_record = None, resumed.meta.get("init")
        else:
            if weights is None and settings.init:
                weights = load_encoder_weights(settings.init)
            shape = model_shape(settings, weights)
            init_record = ({"source": str(weights.source), "kind": weights.kind,
                            "shape": dataclasses.asdict(weights.shape)} if weights else None)
        torch.manual_seed(tr.seed)
        model = build_classifier(shape, len(split.classes), settings, weights).to(placement.device)
        task = FinetuneTask(settings, model, split, shape, init_record, placement, run_dir)
        summary = training.train(task, resolved, run_dir, resumed, console, placement)
    return {**summary, "classes": len(split.classes), "val": task.last_val, "best": task.best}


class FinetuneTask(TrainingTask):
    """A classifier on labelled images: augmented samples, Mixup/CutMix, cross-entropy, and a
    validation pass at the end of every eval_every-th epoch (and of the last)."""

    kind = "finetune"
    loss_count = 1

    def __init__(self, settings: "FinetuneSettings", model: "torch.nn.Module", split: "LabelledSplit",
                 shape: "ViTShape | PluginShape", init_record: dict[str, Any] | None, placement: "Placement",
                 run_dir: Path):
        from localmim_cli.data.images import draft_size_for
        from localmim_cli.tasks.features import AugmentedSamples

        d = settings.data
        self.settings, self.model, self.split, self.shape = settings, model, split, shape
        self.init_record, self.placement, self.run_dir = init_record, placement, run_dir
        self.dataset = AugmentedSamples(split.train, train_transform(settings, shape.img_size), settings.train.seed,
                                        draft_size_for(shape.img_size, d.crop_scale[0]), d.repeats)
        self.loss_fn = criterion(settings)
        self.mix = mixer(settings, len(split.classes))
        self.timm_record = _timm_record(settings, shape, len(split.classes))
        self.best: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        opt = self.settings.optim
        return layer_decay_groups(self.model, opt.weight_decay, opt.layer_decay)

    def forward(self, net: "torch.nn.Module", batch: Any, epoch: int, micro_step: int):
        import numpy as np
        import torch

        from localmim_cli.seeding import derive_seed

        device = self.placement.device
        x, y = (t.to(device, non_blocking=True) for t in batch)
        # Mixing and drop path draw from global generators: seed them per micro-step so a
        # resumed run draws exactly what the uninterrupted run would have.
        step_seed = derive_seed(self.settings.train.seed, "micro", self.placement.world.rank, epoch, micro_step)
        torch.manual_seed(step_seed)
        if self.mix is not None:
            np_state = np.random.get_state()
            np.random.seed(step_seed % 2**32)
            x, y = self.mix(x, y)
            np.random.set_state(np_state)
        loss = self.loss_fn(net(x).float(), y)
        return loss, loss.reshape(1), x.shape[0]

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        return {"loss": losses[0]}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"classes": self.split.classes, "timm": self.timm_record, "init": self.init_record,
                "val": self.last_val, "best": self.best}

    def restore(self, ckpt: "Checkpoint") -> None:
        from localmim_cli.weights.loading import load_exactly

        load_exactly(self.model, ckpt.model_state(), ckpt.path)
        self.best, self.last_val = ckpt.meta.get("best") or {}, ckpt.meta.get("val") or {}

    def data_record(self) -> dict[str, Any]:
        from localmim_cli.data.index import fingerprint
        from localmim_cli.tasks.features import split_record
        return {**split_record(self.split), "fingerprint": fingerprint([p for p, _ in self.split.train])}

    def run_record(self) -> dict[str, Any]:
        return {"init": self.init_record, "model": self.timm_record}

    def describe(self) -> list[str]:
        init = self.init_record
        return [f"data: {self.split.describe()}",
                f"model: {self.shape.describe()}, {len(self.split.classes)} classes; init: "
                + (f"{init['kind']} {init['source']}" if init else "random (from scratch)")
                + f"; layer decay {self.settings.optim.layer_decay:g}"]

    def write_files(self, run_dir: Path) -> None:
        from localmim_cli.engine import atomic
        atomic.write_json(run_dir / "classes.json", self.split.classes)

    def on_epoch_end(self, position: "Position", log: "RunLog") -> None:
        tr = self.settings.train
        if position.epoch == tr.epochs or (tr.eval_every and position.epoch % tr.eval_every == 0):
            self._validate(position.epoch - 1, position.step, log)

    def _validate(self, epoch: int, step: int, log: "RunLog") -> None:
        if not self.split.val:
            return
        p = self.placement
        self.last_val = {"epoch": epoch, "step": step, **validate(self.model, self.split.val, self.shape.img_size,
                                                                  self.settings, p.device, p.precision, p.world)}
        improved = not self.best or self.last_val["val_top1"] > self.best["val_top1"]
        if improved:
            self.best = dict(self.last_val)
            if p.world.is_main:
                self._save_best(epoch, step)
        log.record({"kind": "val", **self.last_val, "best": improved})
        v = self.last_val
        log.note(f"epoch {epoch}: val top-1 {v['val_top1']:.2f}%  top-5 {v['val_top5']:.2f}%  "
                 f"loss {v['val_loss']:.4f}  ({v['val_images']} images)")


    def _save_best(self, epoch: int, step: int) -> None:
        """checkpoints/best/: the weights of the best validation top-1 so far, beside the last
        train.keep_last (which keep only the newest); export and evaluate take it like any
        checkpoint folder. Recorded in manifest.json under "best"."""
        from localmim_cli.engine import checkpoints, runs

        meta = {"kind": self.kind, "position": {"epoch": epoch + 1, "micro_step": 0, "step": step},
                "settings": self.settings.model_dump(mode="json"), "run_dir": str(self.run_dir),
                **self.checkpoint_meta()}
        checkpoints.save(self.run_dir / "checkpoints", BEST, self.model.state_dict(), meta, latest=False)
        runs.update_manifest(self.run_dir, best={"checkpoint": f"checkpoints/{BEST}", **self.best})


def _timm_record(settings: "FinetuneSettings", shape: "ViTShape | PluginShape", num_classes: int) -> dict[str, Any]:
    """What rebuilds the fine-tuned model with timm: checkpoints and the manifest record it."""
    from localmim_cli.weights.sources import timm_model_args
    from localmim_cli.weights.via_timm import PluginShape

    if isinstance(shape, PluginShape):
        return shape.timm_record(num_classes)
    return {"architecture": settings.model.arch or shape.arch,
            "model_args": timm_model_args(shape, "pool_then_norm", num_classes),
            "shape": dataclasses.asdict(shape)}


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
    try:
        weights = load_encoder_weights(settings.init) if settings.init else None
    except NonFiniteWeights as exc:   # not a divergence: the run would start from them
        raise CheckpointError(f"--init {settings.init}: the initial weights are not finite: {exc.file} holds "
                              f"{exc.detail}; pass a checkpoint saved before its run diverged") from None
    return split, weights, model_shape(settings, weights)


def check(settings: "FinetuneSettings") -> str:
    """What `--dry-run` checks, which is what a real start checks before it trains: data,
    checkpoint, device, model and a step plan (one full optimizer step per epoch at least)."""
    from localmim_cli.engine import distributed
    from localmim_cli.engine.plan import plan_steps

    split, weights, shape = preflight(settings, resume=False)
    world = distributed.from_environment()
    device = distributed.choose_device(settings.train.device, world)
    model = build_classifier(shape, len(split.classes), settings, weights)
    plan = plan_steps(len(split.train) * settings.data.repeats, settings, world.size)
    n_params = sum(p.numel() for p in model.parameters())
    return (f"{split.describe()}\nmodel: {shape.describe()}, {n_params / 1e6:.2f} M parameters\n"
            f"{plan.steps_per_epoch} steps/epoch x {plan.epochs} epochs on {device} ({world.size} process(es)); "
            f"{plan.scaling}")


def finetune(resolved: "Resolved", run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
             console: "Console | None" = None) -> dict[str, Any]:
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
