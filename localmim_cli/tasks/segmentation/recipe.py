"""The segmentation recipe: a pretrained encoder fine-tuned as a semantic segmenter, the
published ADE20K protocol (mmsegmentation's UperNet, as BEiT, MAE and LocalMIM ran it).

checkpoint -> multi-scale pyramid (ViT: BEiT backbone with fpn1..4; Swin: its stages) ->
UperNet + FCN auxiliary head (weight 0.4) -> resize 0.5-2.0, crop with cat_max_ratio, flip,
photometric distortion -> cross-entropy (255 ignored) -> AdamW with layer-wise lr decay, linear
warmup + poly decay over train.iterations -> validation mIoU every val.every steps (slide or
whole inference), checkpoints/best/ by mIoU.

The run around it is `engine.training`'s, as for every task: the run directory, exact resume
(per-sample augmentation and per-step dropout / drop path seeded from the run seed), SIGTERM
saves, torchrun (batch norms synchronised across processes), loggers, progress.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS
from localmim_cli.tasks.recipe import Recipe, ValidatedTask

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.segmentation import SegmentationSettings
    from localmim_cli.engine.checkpoints import Checkpoint
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.task import Position, RunLog
    from localmim_cli.model.feature_pyramid import PyramidSpec
    from localmim_cli.tasks.segmentation.data import SegData
    from localmim_cli.tasks.segmentation.model import Segmenter
    from localmim_cli.tasks.task_benchmark import BenchStep
    from localmim_cli.weights.encoder_weights import EncoderWeights


class SegmentationRecipe(Recipe):
    name = "segmentation"
    resumable_changes = frozenset({"train.iterations", "val.every", "val.batch_size", "data.val_path",
                                   "data.check", *RESUMABLE_SPEED_SETTINGS})

    def read_data(self, settings: SegmentationSettings, resumed: Checkpoint | None = None) -> SegData:
        from localmim_cli.tasks.segmentation.data import read_seg_data

        return read_seg_data(settings.data, settings.train.seed, resumed.meta["classes"] if resumed else None)

    def describe_data(self, data: SegData) -> str:
        return data.describe()

    def epoch_images(self, settings: SegmentationSettings, data: SegData) -> int:
        return len(data.train) * settings.data.repeats

    def model_shape(self, settings: SegmentationSettings, weights: EncoderWeights | None,
                    resumed: Checkpoint | None = None) -> PyramidSpec:
        from localmim_cli.model.feature_pyramid import PyramidSpec, pyramid_spec

        if resumed is not None:
            return PyramidSpec(**resumed.meta["segmenter"]["pyramid"])
        return pyramid_spec(weights, settings.model.img_size, settings.model.arch)

    def build_model(self, settings: SegmentationSettings, data: SegData, shape: PyramidSpec,
                    weights: EncoderWeights | None) -> Segmenter:
        return build_segmenter(settings, len(data.classes), shape, weights)

    def describe_model(self, shape: PyramidSpec, model: torch.nn.Module) -> str:
        n_params = sum(p.numel() for p in model.parameters())
        line = f"model: {shape.describe()} + UperNet, {n_params / 1e6:.2f} M parameters"
        report = getattr(model, "init_report", None)
        return line + (f"\n{report.describe()}" if report is not None else "")

    def training_task(self, settings: SegmentationSettings, data: SegData, shape: PyramidSpec,
                      model: torch.nn.Module, init_record: dict[str, Any] | None, placement: Placement,
                      run_dir: Path) -> SegmentationTask:
        return SegmentationTask(settings, model, data, shape, init_record, placement, run_dir)

    def score_line(self, summary: dict[str, Any], run_dir: Path) -> str:
        val, best = summary.get("val") or {}, summary.get("best") or {}
        if not val:
            return ""
        return (f"; val mIoU {val['val_mIoU']:.2f}% (best {best['val_mIoU']:.2f}% at step {best['step']}, "
                f"kept in {Path(run_dir) / 'checkpoints' / 'best'})")

    def benchmark_step(self, settings: SegmentationSettings, device: torch.device) -> BenchStep:
        """The segmenter of model.arch with ADE20K's 150 classes on normal-noise crops labelled in
        16 x 16 blocks of random classes: decode + auxiliary loss, layer-decay groups."""
        import torch
        from torch.nn import functional as F

        from localmim_cli.config.presets import scaled_lr
        from localmim_cli.data import ade20k
        from localmim_cli.engine.param_groups import layer_decay_groups
        from localmim_cli.model.feature_pyramid import pyramid_spec
        from localmim_cli.tasks.segmentation.model import segmentation_loss
        from localmim_cli.tasks.task_benchmark import BenchStep, synthetic_images

        m, opt, batch = settings.model, settings.optim, settings.train.batch_size
        n = len(ade20k.CLASSES)
        spec = pyramid_spec(None, m.img_size, m.arch)
        model = build_segmenter(settings, n, spec, None).to(device).train()
        images = synthetic_images(batch, m.img_size, settings.train.seed, device)
        blocks = torch.randint(0, n, (batch, 1, -(-m.img_size // 16), -(-m.img_size // 16)),
                               generator=torch.Generator().manual_seed(settings.train.seed))
        labels = F.interpolate(blocks.float(), scale_factor=16, mode="nearest")[:, 0, :m.img_size, :m.img_size]
        labels = labels.long().to(device)

        def loss() -> torch.Tensor:
            logits, aux = model(images)
            return segmentation_loss(logits, aux, labels, m.aux_weight)[0]
        groups = layer_decay_groups(model, opt.weight_decay, opt.layer_decay, opt.no_decay_1d, opt.no_decay_names)
        return BenchStep(f"{spec.describe()} + UperNet ({m.decoder_channels} channels), {n} classes", model, loss,
                         groups, scaled_lr(settings), tuple(opt.betas), opt.clip_grad)


RECIPE = SegmentationRecipe()


def build_segmenter(settings: SegmentationSettings, num_classes: int, spec: PyramidSpec,
                    weights: EncoderWeights | None) -> Segmenter:
    """The segmenter with the encoder's weights in (none: fresh, as a resumed run's start);
    its `init_report` names what was loaded and what is new."""
    from localmim_cli.model.feature_pyramid import pyramid_from_weights
    from localmim_cli.tasks.segmentation.model import Segmenter

    m = settings.model
    pyramid, report = pyramid_from_weights(spec, weights, taps=m.taps, drop_path=m.drop_path,
                                           rel_pos_bias=m.rel_pos_bias, layer_scale=m.layer_scale)
    model = Segmenter(pyramid, num_classes, m.decoder_channels, m.aux_channels, m.aux_level, m.aux_weight, m.dropout)
    heads = ["decode_head (UperNet)"] + (["aux_head (FCN)"] if model.aux_head is not None else [])
    report.new += [f"{head.split(' ')[0]}.*" for head in heads]
    report.notes.append("new heads: " + ", ".join(heads))
    model.init_report = report if weights is not None else None
    return model


def segmenter_from_checkpoint(path: Path | str) -> tuple[Segmenter, SegmentationSettings, list[str]]:
    """A segmentation run, its checkpoints/ folder or one checkpoint (best/, step-N) as (the
    model with its weights, in eval mode; the run's settings; the class names), for inference.
    A CheckpointError names the path when it is not a segmentation checkpoint."""
    from localmim_cli.config.segmentation import SegmentationSettings
    from localmim_cli.engine import checkpoints
    from localmim_cli.errors import CheckpointError
    from localmim_cli.model.feature_pyramid import PyramidSpec
    from localmim_cli.weights.loading import load_exactly
    from localmim_cli.weights.locate import checkpoint_folder

    found = checkpoint_folder(path)
    if found.kind != SegmentationTask.kind:
        raise CheckpointError(f"{found.folder}: a {found.kind} checkpoint, not a segmentation one")
    ckpt = checkpoints.load(found.folder)
    settings = SegmentationSettings.model_validate(ckpt.meta["settings"])
    record = ckpt.meta["segmenter"]
    model = build_segmenter(settings, record["num_classes"], PyramidSpec(**record["pyramid"]), None)
    load_exactly(model, ckpt.model_state(), ckpt.model_file)
    return model.eval(), settings, list(ckpt.meta["classes"])


class SegmentationTask(ValidatedTask):
    """Pixel-labelled images through the published augmentation, decode + 0.4 auxiliary
    cross-entropy, and validation mIoU every val.every steps (and at the last)."""

    kind = "segmentation"
    loss_count = 2          # decode, auxiliary
    best_metric = "val_mIoU"

    def __init__(self, settings: SegmentationSettings, model: Segmenter, data: SegData, spec: PyramidSpec,
                 init_record: dict[str, Any] | None, placement: Placement, run_dir: Path):
        import torch

        from localmim_cli.tasks.segmentation.augment import SegAugment
        from localmim_cli.tasks.segmentation.data import SegTrainSamples

        if placement.world.distributed and placement.device.type == "cuda":
            # the published SyncBN: batch statistics over all GPUs (torch has it for CUDA only)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(settings, model, init_record, placement, run_dir)
        d = settings.data
        self.data, self.spec = data, spec
        augment = SegAugment(settings.model.img_size, tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio,
                             d.hflip, d.photometric)
        self.dataset = SegTrainSamples(data.train, augment, data.reduce_zero_label, settings.train.seed, d.repeats)
        self.report = getattr(model, "init_report", None)

    def param_groups(self) -> list[dict[str, Any]]:
        from localmim_cli.engine.param_groups import layer_decay_groups

        opt = self.settings.optim
        return layer_decay_groups(self.model, opt.weight_decay, opt.layer_decay, opt.no_decay_1d, opt.no_decay_names)

    def forward(self, net: torch.nn.Module, batch: Any, epoch: int, micro_step: int):
        import torch

        from localmim_cli.seeding import derive_seed
        from localmim_cli.tasks.segmentation.model import segmentation_loss

        device = self.placement.device
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        # Dropout and drop path draw from the global generator: seeded per micro-step, so a
        # resumed run draws exactly what the uninterrupted run would have.
        torch.manual_seed(derive_seed(self.settings.train.seed, "micro", self.placement.world.rank, epoch, micro_step))
        logits, aux = net(images)
        total, parts = segmentation_loss(logits, aux, labels, self.settings.model.aux_weight)
        return total, parts, images.shape[0]

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        decode, aux = losses
        return {"loss": decode + self.settings.model.aux_weight * aux, "loss_decode": decode, "loss_aux": aux}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"classes": self.data.classes, "segmenter": self.segmenter_record(), **super().checkpoint_meta()}

    def segmenter_record(self) -> dict[str, Any]:
        """What rebuilds the model: the pyramid, the classes, the data's label convention."""
        return {"pyramid": dataclasses.asdict(self.spec), "num_classes": len(self.data.classes),
                "reduce_zero_label": self.data.reduce_zero_label}

    def data_record(self) -> dict[str, Any]:
        return self.data.record()

    def run_record(self) -> dict[str, Any]:
        return {"init": self.init_record, "model": self.segmenter_record()}

    def describe(self) -> list[str]:
        init = self.init_record
        lines = [f"data: {self.data.describe()}",
                 f"model: {self.spec.describe()} + UperNet ({self.settings.model.decoder_channels} channels), "
                 f"{len(self.data.classes)} classes; init: "
                 + (f"{init['kind']} {init['source']}" if init else "random (from scratch)")
                 + f"; layer decay {self.settings.optim.layer_decay:g}"]
        if self.report is not None:
            lines.append(self.report.describe())
        return lines

    def write_files(self, run_dir: Path) -> None:
        from localmim_cli.engine import atomic
        atomic.write_json(run_dir / "classes.json", self.data.classes)

    def on_step_end(self, position: Position, log: RunLog) -> None:
        every = self.settings.val.every
        if position.step == self.settings.train.iterations or (every and position.step % every == 0):
            self.run_validation(position.epoch, dataclasses.replace(position), log)

    def has_validation(self) -> bool:
        return bool(self.data.val)

    def validate(self) -> dict[str, Any]:
        from localmim_cli.tasks.segmentation.metric import scores

        matrix = validation_confusion(self.model, self.data, self.settings, self.placement)
        result = scores(matrix, self.data.classes)
        return {"val_mIoU": result["mIoU"], "val_mAcc": result["mAcc"], "val_aAcc": result["aAcc"],
                "val_images": len(self.data.val),
                "val_IoU": {name: v["IoU"] for name, v in result["per_class"].items()}}

    def validation_note(self, v: dict[str, Any]) -> str:
        return (f"step {v['step']}: val mIoU {v['val_mIoU']:.2f}%  mAcc {v['val_mAcc']:.2f}%  "
                f"aAcc {v['val_aAcc']:.2f}%  ({v['val_images']} images, {self.settings.val.mode})")


def validation_confusion(model: Segmenter, data: SegData, settings: SegmentationSettings,
                         placement: Placement) -> torch.Tensor:
    """The confusion matrix of the validation split, each process taking every world-size-th
    image, summed over processes."""
    import torch
    from torch.utils.data import DataLoader

    from localmim_cli.data.samplers import loader_kwargs
    from localmim_cli.engine import distributed
    from localmim_cli.engine.loop import autocast
    from localmim_cli.tasks.segmentation.data import SegEvalSamples
    from localmim_cli.tasks.segmentation.inference import infer, predict_labels
    from localmim_cli.tasks.segmentation.metric import confusion

    world, device = placement.world, placement.device
    k = len(data.classes)
    matrix = torch.zeros(k, k, dtype=torch.float64, device=device)
    mine = data.val[world.rank::world.size]
    if mine:
        loader = DataLoader(SegEvalSamples(mine, tuple(settings.data.scale), data.reduce_zero_label), batch_size=1,
                            shuffle=False, **loader_kwargs(settings.data.workers, device))
        net = model.module if hasattr(model, "module") else model
        was_training = net.training
        net.eval()

        def predict(x: torch.Tensor) -> torch.Tensor:
            with autocast(placement.precision, device):
                return net.predict(x)

        v = settings.val
        with torch.no_grad():
            for image, mask in loader:
                image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                logits = infer(predict, image, k, v.mode, settings.model.img_size, v.stride, v.batch_size)
                matrix += confusion(predict_labels(logits, tuple(mask.shape[-2:])), mask, k).double()
        net.train(was_training)
    return distributed.all_reduce_mean(matrix, world) * world.size
