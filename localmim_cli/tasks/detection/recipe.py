"""The detection recipe: a pretrained encoder fine-tuned inside torchvision's Mask R-CNN, ViTDet's
protocol (the LocalMIM code publishes none; the ViTDet paper's detectron2 configs are followed).

checkpoint -> pyramid (ViT: ViTDet's simple pyramid from the last block, window attention with
global blocks; Swin: its stages + FPN) -> Mask R-CNN (2-conv RPN, 4conv1fc box head, LayerNorm
heads) -> large-scale jitter (flip, resize 0.1-2.0 of the crop, crop) -> the summed RPN and RoI
losses -> AdamW with layer-wise lr decay, linear warmup and steps at milestones over
train.iterations -> validation COCO box (and mask) AP every val.every steps, checkpoints/best/
by box AP.

The run around it is `engine.training`'s, as for every task: the run directory, exact resume
(per-sample augmentation and per-step sampling / drop path seeded from the run seed), SIGTERM
saves, torchrun, loggers, progress.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.config.schema import RESUMABLE_SPEED_SETTINGS
from localmim_cli.tasks.recipe import Recipe, ValidatedTask

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.detection import DetectionSettings
    from localmim_cli.engine.checkpoints import Checkpoint
    from localmim_cli.engine.loop import Placement
    from localmim_cli.engine.task import Position, RunLog
    from localmim_cli.model.feature_pyramid import PyramidSpec
    from localmim_cli.tasks.detection.data import DetData, DetImage
    from localmim_cli.tasks.detection.model import Detector
    from localmim_cli.tasks.task_benchmark import BenchStep
    from localmim_cli.weights.encoder_weights import EncoderWeights


class DetectionRecipe(Recipe):
    name = "detection"
    resumable_changes = frozenset({"train.iterations", "val.every", "val.batch_size", "data.val_path",
                                   "data.check", *RESUMABLE_SPEED_SETTINGS})

    def read_data(self, settings: DetectionSettings, resumed: Checkpoint | None = None) -> DetData:
        from localmim_cli.tasks.detection.data import read_det_data

        return read_det_data(settings.data, settings.model.masks, resumed.meta["classes"] if resumed else None)

    def describe_data(self, data: DetData) -> str:
        return data.describe()

    def epoch_images(self, settings: DetectionSettings, data: DetData) -> int:
        return len(data.train_images) * settings.data.repeats

    def model_shape(self, settings: DetectionSettings, weights: EncoderWeights | None,
                    resumed: Checkpoint | None = None) -> PyramidSpec:
        from localmim_cli.model.feature_pyramid import PyramidSpec, pyramid_spec

        if resumed is not None:
            return PyramidSpec(**resumed.meta["detector"]["pyramid"])
        return pyramid_spec(weights, settings.model.img_size, settings.model.arch, vit="vit_simple")

    def build_model(self, settings: DetectionSettings, data: DetData, shape: PyramidSpec,
                    weights: EncoderWeights | None) -> Detector:
        return build_detector(settings, len(data.classes), shape, weights)

    def describe_model(self, shape: PyramidSpec, model: torch.nn.Module) -> str:
        n_params = sum(p.numel() for p in model.parameters())
        heads = "Mask R-CNN" if model.roi_heads.has_mask() else "Faster R-CNN"
        line = f"model: {shape.describe()} + {heads}, {n_params / 1e6:.2f} M parameters"
        report = getattr(model, "init_report", None)
        return line + (f"\n{report.describe()}" if report is not None else "")

    def training_task(self, settings: DetectionSettings, data: DetData, shape: PyramidSpec,
                      model: torch.nn.Module, init_record: dict[str, Any] | None, placement: Placement,
                      run_dir: Path) -> DetectionTask:
        return DetectionTask(settings, model, data, shape, init_record, placement, run_dir)

    def score_line(self, summary: dict[str, Any], run_dir: Path) -> str:
        val, best = summary.get("val") or {}, summary.get("best") or {}
        if not val:
            return ""
        mask = f", mask AP {val['val_mask_AP']:.2f}" if val.get("val_mask_AP") is not None else ""
        return (f"; val box AP {val['val_box_AP']:.2f}{mask} (best box AP {best['val_box_AP']:.2f} at step "
                f"{best['step']}, kept in {Path(run_dir) / 'checkpoints' / 'best'})")

    def benchmark_step(self, settings: DetectionSettings, device: torch.device) -> BenchStep:
        """The detector of model.arch with COCO's 80 categories on images of uniform noise, each
        with 4 boxes (and box-shaped masks) of random categories: the summed RPN and RoI losses."""
        import torch

        from localmim_cli.config.presets import scaled_lr
        from localmim_cli.engine.param_groups import layer_decay_groups
        from localmim_cli.model.feature_pyramid import pyramid_spec
        from localmim_cli.tasks.detection.model import detection_loss
        from localmim_cli.tasks.task_benchmark import BenchStep

        m, opt, batch, side = settings.model, settings.optim, settings.train.batch_size, settings.model.img_size
        n, per_image = 80, 4
        spec = pyramid_spec(None, side, m.arch, vit="vit_simple")
        model = build_detector(settings, n, spec, None).to(device).train()
        gen = torch.Generator().manual_seed(settings.train.seed)
        images = [torch.rand(3, side, side, generator=gen).to(device) for _ in range(batch)]
        targets = []
        for _ in range(batch):
            corner = torch.rand(per_image, 2, generator=gen) * 0.6 * side
            size = (0.1 + 0.3 * torch.rand(per_image, 2, generator=gen)) * side
            boxes = torch.cat([corner, (corner + size).clamp(max=side)], 1).round()
            target = {"boxes": boxes, "labels": torch.randint(1, n + 1, (per_image,), generator=gen)}
            if m.masks:
                masks = torch.zeros(per_image, side, side, dtype=torch.uint8)
                for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                    masks[k, y1:y2, x1:x2] = 1
                target["masks"] = masks
            targets.append({k: v.to(device) for k, v in target.items()})

        def loss() -> torch.Tensor:
            return detection_loss(model(images, targets))[0]
        groups = layer_decay_groups(model, opt.weight_decay, opt.layer_decay, opt.no_decay_1d, opt.no_decay_names,
                                    opt.no_decay_norm)
        heads = "Mask R-CNN" if m.masks else "Faster R-CNN"
        return BenchStep(f"{spec.describe()} + {heads}, {n} categories, {per_image} boxes per image", model, loss,
                         groups, scaled_lr(settings), tuple(opt.betas), opt.clip_grad)


RECIPE = DetectionRecipe()


def build_detector(settings: DetectionSettings, num_classes: int, spec: PyramidSpec,
                   weights: EncoderWeights | None) -> Detector:
    """The detector with the encoder's weights in (none: fresh, as a resumed run's start); its
    `init_report` names what was loaded and what is new."""
    from localmim_cli.model.feature_pyramid import pyramid_from_weights
    from localmim_cli.tasks.detection.model import DetectionBackbone, Detector

    m = settings.model
    pyramid, report = pyramid_from_weights(spec, weights, drop_path=m.drop_path, window_size=m.window_size,
                                           global_blocks=m.global_blocks, rel_pos=m.rel_pos)
    model = Detector(DetectionBackbone(pyramid, m.neck_channels, m.head_norm), num_classes, m)
    neck = "simple pyramid convolutions" if spec.kind == "vit_simple" else "FPN"
    report.new += ["neck.*", "rpn.*", "roi_heads.*"]
    report.notes.append(f"new neck ({neck}) and heads (RPN, box{', mask' if m.masks else ''})")
    model.init_report = report if weights is not None else None
    return model


def detector_from_checkpoint(path: Path | str) -> tuple[Detector, DetectionSettings, dict[str, Any]]:
    """A detection run, its checkpoints/ folder or one checkpoint (best/, step-N) as (the model
    with its weights, in eval mode; the run's settings; its meta), for inference. A
    CheckpointError names the path when it is not a detection checkpoint."""
    from localmim_cli.config.detection import DetectionSettings
    from localmim_cli.engine import checkpoints
    from localmim_cli.errors import CheckpointError
    from localmim_cli.model.feature_pyramid import PyramidSpec
    from localmim_cli.weights.loading import load_exactly
    from localmim_cli.weights.locate import checkpoint_folder

    found = checkpoint_folder(path)
    if found.kind != DetectionTask.kind:
        raise CheckpointError(f"{found.folder}: a {found.kind} checkpoint, not a detection one")
    ckpt = checkpoints.load(found.folder)
    settings = DetectionSettings.model_validate(ckpt.meta["settings"])
    record = ckpt.meta["detector"]
    model = build_detector(settings, record["num_classes"], PyramidSpec(**record["pyramid"]), None)
    load_exactly(model, ckpt.model_state(), ckpt.model_file)
    return model.eval(), settings, ckpt.meta


class DetectionTask(ValidatedTask):
    """COCO instances through large-scale jitter, torchvision's summed detection losses, and
    validation COCO AP every val.every steps (and at the last)."""

    kind = "detection"
    loss_count = 5
    best_metric = "val_box_AP"

    def __init__(self, settings: DetectionSettings, model: Detector, data: DetData, spec: PyramidSpec,
                 init_record: dict[str, Any] | None, placement: Placement, run_dir: Path):
        from localmim_cli.tasks.detection.augment import LargeScaleJitter
        from localmim_cli.tasks.detection.data import DetTrainSamples

        super().__init__(settings, model, init_record, placement, run_dir)
        d = settings.data
        self.data, self.spec = data, spec
        augment = LargeScaleJitter(settings.model.img_size, tuple(d.scale_range), d.hflip)
        self.dataset = DetTrainSamples(data.train_images, augment, settings.model.masks, settings.train.seed,
                                       d.repeats)
        self.report = getattr(model, "init_report", None)
        self._gt = None

    def param_groups(self) -> list[dict[str, Any]]:
        from localmim_cli.engine.param_groups import layer_decay_groups

        opt = self.settings.optim
        return layer_decay_groups(self.model, opt.weight_decay, opt.layer_decay, opt.no_decay_1d, opt.no_decay_names,
                                  opt.no_decay_norm)

    def forward(self, net: torch.nn.Module, batch: Any, epoch: int, micro_step: int):
        import torch

        from localmim_cli.seeding import derive_seed
        from localmim_cli.tasks.detection.model import detection_loss

        device = self.placement.device
        images, targets = batch
        images = [i.to(device, non_blocking=True) for i in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        # Proposal sampling, dropout and drop path draw from the global generator: seeded per
        # micro-step, so a resumed run draws exactly what the uninterrupted run would have.
        torch.manual_seed(derive_seed(self.settings.train.seed, "micro", self.placement.world.rank, epoch, micro_step))
        total, parts = detection_loss(net(images, targets))
        return total, parts, len(images)

    def loss_fields(self, losses: list[float]) -> dict[str, float]:
        from localmim_cli.tasks.detection.model import LOSS_NAMES

        fields = dict(zip(LOSS_NAMES, losses))
        if not self.settings.model.masks:
            fields.pop("loss_mask")
        return {"loss": sum(fields.values()), **fields}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"classes": self.data.classes, "category_ids": self.data.category_ids,
                "detector": self.detector_record(), **super().checkpoint_meta()}

    def detector_record(self) -> dict[str, Any]:
        """What rebuilds the model: the pyramid, the classes, masks or not."""
        return {"pyramid": dataclasses.asdict(self.spec), "num_classes": len(self.data.classes),
                "masks": self.settings.model.masks}

    def data_record(self) -> dict[str, Any]:
        return self.data.record()

    def run_record(self) -> dict[str, Any]:
        return {"init": self.init_record, "model": self.detector_record()}

    def describe(self) -> list[str]:
        init = self.init_record
        heads = "Mask R-CNN" if self.settings.model.masks else "Faster R-CNN"
        lines = [f"data: {self.data.describe()}",
                 f"model: {self.spec.describe()} + {heads}, {len(self.data.classes)} categories; init: "
                 + (f"{init['kind']} {init['source']}" if init else "random (from scratch)")
                 + f"; layer decay {self.settings.optim.layer_decay:g}"]
        if self.report is not None:
            lines.append(self.report.describe())
        return lines

    def write_files(self, run_dir: Path) -> None:
        from localmim_cli.engine import atomic
        atomic.write_json(run_dir / "categories.json",
                          [{"id": i, "name": n} for i, n in zip(self.data.category_ids, self.data.classes)])

    def on_step_end(self, position: Position, log: RunLog) -> None:
        every = self.settings.val.every
        if position.step == self.settings.train.iterations or (every and position.step % every == 0):
            self.run_validation(position.epoch, dataclasses.replace(position), log)

    def has_validation(self) -> bool:
        return self.data.val is not None

    def validate(self) -> dict[str, Any]:
        from localmim_cli.tasks.detection.metric import ground_truth, scores

        if self._gt is None:
            self._gt = ground_truth(self.data.val, category_ids=self.data.category_ids)
        results = predict_split(self.model, self.data.val.images, self.data.category_ids, self.settings,
                                self.placement)
        s = scores(self._gt, results, self.settings.model.masks)
        record = {f"val_box_{k}": v for k, v in s["box"].items()}
        record.update({f"val_mask_{k}": v for k, v in s.get("mask", {}).items()})
        return {**record, "val_images": len(self.data.val.images), "val_detections": len(results)}

    def validation_note(self, v: dict[str, Any]) -> str:
        mask = f"  mask AP {v['val_mask_AP']:.2f}" if v.get("val_mask_AP") is not None else ""
        return (f"step {v['step']}: val box AP {v['val_box_AP']:.2f}  AP50 {_pct(v['val_box_AP50'])}  "
                f"AP75 {_pct(v['val_box_AP75'])}{mask}  ({v['val_images']} images, {v['val_detections']} detections)")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def predict_split(model: Detector, images: list[DetImage], category_ids: list[int], settings: DetectionSettings,
                  placement: Placement) -> list[dict[str, Any]]:
    """COCO results of `images`, each process taking every world-size-th image, gathered on every
    process in image order."""
    import torch
    from torch.utils.data import DataLoader

    from localmim_cli.data.samplers import loader_kwargs
    from localmim_cli.engine.loop import autocast
    from localmim_cli.tasks.detection.data import DetEvalSamples, collate
    from localmim_cli.tasks.detection.metric import to_results

    world, device = placement.world, placement.device
    mine = images[world.rank::world.size]
    results: list[dict[str, Any]] = []
    if mine:
        loader = DataLoader(DetEvalSamples(mine), batch_size=settings.val.batch_size, shuffle=False,
                            collate_fn=collate, **loader_kwargs(settings.data.workers, device))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch, indices in loader:
                with autocast(placement.precision, device):
                    outputs = model([b.to(device, non_blocking=True) for b in batch])
                for out, i in zip(outputs, indices):
                    results += to_results(out, mine[i].image_id, category_ids)
        model.train(was_training)
    if world.distributed:
        import torch.distributed as dist
        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    order = {image.image_id: k for k, image in enumerate(images)}
    return sorted(results, key=lambda r: (order[r["image_id"]], -r["score"]))
