"""The classification recipe: a pretrained encoder fine-tuned as an image classifier, the
published ViT protocol (MAE's).

checkpoint -> timm VisionTransformer (global average pool, a new fc_norm, a new head with
trunc-normal(2e-5) weights) -> RandAugment + random erasing -> Mixup/CutMix -> soft-target or
label-smoothed cross-entropy -> AdamW (0.9, 0.999) with layer-wise lr decay, warmup + cosine.

The run around it is `engine.training`'s, as for pretraining and every fine-tuning task: the
same run directory, checkpoints, exact resume (per-sample augmentations, per-step mixing and
drop path are all seeded from the run seed), precision, torchrun, and no host synchronisation
per step; `checkpoints/best/` holds the best validation top-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS
from localmim_cli.errors import DataError, UsageError
from localmim_cli.tasks.classification.data import criterion, mixer, train_transform
from localmim_cli.tasks.classification.init_probes import init_probes, probes_line, verdict, wanted
from localmim_cli.tasks.classification.metric import validate
from localmim_cli.tasks.classification.probe_head import fit_probe_head, head_start_line
from localmim_cli.tasks.classification.model import build_classifier, layer_decay_groups, model_shape, timm_record
from localmim_cli.tasks.recipe import Recipe, ValidatedTask

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.schema import FinetuneSettings
    from localmim_cli.engine.checkpoints import Checkpoint
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.task import Position, RunLog
    from localmim_cli.tasks.features import LabelledSplit
    from localmim_cli.tasks.task_benchmark import BenchStep
    from localmim_cli.weights.encoder_weights import EncoderWeights, ViTShape
    from localmim_cli.weights.via_timm import PluginShape


class ClassificationRecipe(Recipe):
    name = "classification"
    resumable_changes = frozenset({"train.epochs", "train.eval_every", "train.eval_batch_size", "data.val_path",
                                   *RESUMABLE_SPEED_SETTINGS})

    def read_data(self, settings: "FinetuneSettings", resumed: "Checkpoint | None" = None) -> "LabelledSplit":
        from localmim_cli.tasks.features import labelled_split

        d = settings.data
        if d.path is None:
            raise DataError("finetune needs DATA: a folder with one subfolder of images per class")
        split = labelled_split(d.path, d.val_path, d.val_fraction, settings.train.seed,
                               classes=resumed.meta["classes"] if resumed else None)
        if len(split.classes) < 2:
            raise DataError(f"{d.path}: only one class folder ({split.classes[0]}); "
                            "classification needs two or more")
        return split

    def describe_data(self, data: "LabelledSplit") -> str:
        return data.describe()

    def epoch_images(self, settings: "FinetuneSettings", data: "LabelledSplit") -> int:
        return len(data.train) * settings.data.repeats

    def model_shape(self, settings: "FinetuneSettings", weights: "EncoderWeights | None",
                    resumed: "Checkpoint | None" = None) -> "ViTShape | PluginShape":
        from localmim_cli.weights.encoder_weights import ViTShape
        from localmim_cli.weights.via_timm import shape_from_record

        if resumed is None:
            return model_shape(settings, weights)
        timm_meta = resumed.meta["timm"]
        return shape_from_record(timm_meta) if timm_meta.get("plugin") else ViTShape(**timm_meta["shape"])

    def build_model(self, settings: "FinetuneSettings", data: "LabelledSplit", shape: "ViTShape | PluginShape",
                    weights: "EncoderWeights | None") -> "torch.nn.Module":
        return build_classifier(shape, len(data.classes), settings, weights)

    def training_task(self, settings: "FinetuneSettings", data: "LabelledSplit", shape: "ViTShape | PluginShape",
                      model: "torch.nn.Module", init_record: dict[str, Any] | None, placement: "Placement",
                      run_dir: Path) -> "ClassificationTask":
        return ClassificationTask(settings, model, data, shape, init_record, placement, run_dir)

    def score_line(self, summary: dict[str, Any], run_dir: Path) -> str:
        val, best = summary.get("val") or {}, summary.get("best") or {}
        if not val:
            return ""
        return (f"; val top-1 {val['val_top1']:.2f}% (best {best['val_top1']:.2f}% at epoch {best['epoch']}, "
                f"kept in {Path(run_dir) / 'checkpoints' / 'best'})"
                + verdict(best["val_top1"], summary.get("init_probes") or {}))

    def benchmark_step(self, settings: "FinetuneSettings", device: "torch.device") -> "BenchStep":
        """The classifier of model.arch at model.img_size with 1000 classes, Mixup/CutMix and the
        run's criterion on normal-noise images: the baseline other tasks' steps are timed against."""
        import torch

        from localmim_cli.config.presets import scaled_lr
        from localmim_cli.tasks.task_benchmark import IMAGENET_CLASSES, BenchStep, synthetic_images

        shape = model_shape(settings, None)
        model = build_classifier(shape, IMAGENET_CLASSES, settings, None).to(device).train()
        batch, seed = settings.train.batch_size, settings.train.seed
        images = synthetic_images(batch, shape.img_size, seed, device)
        labels = torch.randint(0, IMAGENET_CLASSES, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
        mix, loss_fn = mixer(settings, IMAGENET_CLASSES), criterion(settings)

        def loss() -> torch.Tensor:
            x, y = mix(images, labels) if mix is not None else (images, labels)
            return loss_fn(model(x).float(), y)
        opt = settings.optim
        return BenchStep(f"{shape.describe()}, {IMAGENET_CLASSES} classes, Mixup/CutMix", model, loss,
                         layer_decay_groups(model, opt.weight_decay, opt.layer_decay), scaled_lr(settings),
                         tuple(opt.betas), opt.clip_grad)


RECIPE = ClassificationRecipe()


class ClassificationTask(ValidatedTask):
    """A classifier on labelled images: augmented samples, Mixup/CutMix, cross-entropy, and a
    validation pass at the end of every eval_every-th epoch (and of the last)."""

    kind = "finetune"
    loss_count = 1
    best_metric = "val_top1"

    def __init__(self, settings: "FinetuneSettings", model: "torch.nn.Module", split: "LabelledSplit",
                 shape: "ViTShape | PluginShape", init_record: dict[str, Any] | None, placement: "Placement",
                 run_dir: Path):
        from localmim_cli.data.images import draft_size_for
        from localmim_cli.tasks.features import AugmentedSamples

        super().__init__(settings, model, init_record, placement, run_dir)
        d = settings.data
        self.split, self.shape = split, shape
        self.dataset = AugmentedSamples(split.train, train_transform(settings, shape.img_size), settings.train.seed,
                                        draft_size_for(shape.img_size, d.crop_scale[0]), d.repeats)
        self.loss_fn = criterion(settings)
        self.mix = mixer(settings, len(split.classes))
        self.timm_record = timm_record(settings, shape, len(split.classes))
        self.init_probes: dict[str, Any] = {}   # the --init encoder's probes: what fine-tuning must beat
        if settings.train.head_warmup_epochs and placement.world.size > 1:
            # The frozen epochs run the head outside DDP's forward, which would leave its
            # gradients unsynchronised across processes.
            raise UsageError(f"train.head_warmup_epochs {settings.train.head_warmup_epochs} runs in one process "
                             f"only, not under torchrun with {placement.world.size}; set it to 0")
        if settings.model.head_init == "linear_probe" and placement.world.size > 1:
            # The probe is fitted after DDP has broadcast the weights: one process's fit would not
            # reach the others.
            raise UsageError(f"model.head_init linear_probe runs in one process only, not under torchrun with "
                             f"{placement.world.size}; set it to trunc_normal")
        self.head_start: dict[str, Any] = {}   # the linear probe fc_norm and head started from

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
        logits = self.head_only(x) if epoch < self.settings.train.head_warmup_epochs else net(x)
        loss = self.loss_fn(logits.float(), y)
        return loss, loss.reshape(1), x.shape[0]

    def head_only(self, x: "torch.Tensor") -> "torch.Tensor":
        """Logits with the encoder frozen (LP-FT's linear-probe epochs): its features without
        autograd, so its parameters get no gradient and AdamW leaves them, and their moments,
        untouched until the whole model trains; fc_norm and the head train on those features."""
        import torch
        with torch.no_grad():
            features = self.model.forward_features(x)
        return self.model.forward_head(features)

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        return {"loss": losses[0]}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"classes": self.split.classes, "timm": self.timm_record, "init_probes": self.init_probes,
                **super().checkpoint_meta()}

    def restore(self, checkpoint: "Checkpoint") -> None:
        super().restore(checkpoint)
        self.init_probes = checkpoint.meta.get("init_probes") or {}

    def on_train_start(self, position: "Position", log: "RunLog") -> None:
        """A fresh run scores the --init encoder's probes first and, with model.head_init
        linear_probe, fits its head (a resumed one has both)."""
        from localmim_cli.engine import runs

        if position.step or not self.placement.world.is_main:
            return
        if wanted(self.settings, self.split):
            self.init_probes = init_probes(self.settings, self.split, self.shape.img_size, self.placement,
                                           self.run_dir)
            runs.update_manifest(self.run_dir, init_probes=self.init_probes)
            log.note(probes_line(self.init_probes))
        if self.settings.model.head_init == "linear_probe":
            self.head_start = fit_probe_head(self.model, self.settings, self.split, self.shape.img_size,
                                             self.placement)
            runs.update_manifest(self.run_dir, head_start=self.head_start)
            log.note(head_start_line(self.head_start))

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
            self.run_validation(position.epoch - 1, position, log)

    def has_validation(self) -> bool:
        return bool(self.split.val)

    def validate(self) -> dict[str, Any]:
        p = self.placement
        return validate(self.model, self.split.val, self.shape.img_size, self.settings, p.device, p.precision,
                        p.world)

    def validation_note(self, v: dict[str, Any]) -> str:
        return (f"epoch {v['epoch']}: val top-1 {v['val_top1']:.2f}%  top-5 {v['val_top5']:.2f}%  "
                f"loss {v['val_loss']:.4f}  ({v['val_images']} images)")

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "classes": len(self.split.classes), "init_probes": self.init_probes}
