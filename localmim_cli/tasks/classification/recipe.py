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
from localmim_cli.errors import DataError, UsageError
from localmim_cli.tasks.classification.data import criterion, mixer, train_transform
from localmim_cli.tasks.classification.metric import validate
from localmim_cli.tasks.classification.model import build_classifier, layer_decay_groups, model_shape, timm_record

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
        self.timm_record = timm_record(settings, shape, len(split.classes))
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
    with runs.claimed(run_dir, resume, overwrite, is_main, console.print):
        return run(resolved, run_dir, resume, console, weights)
