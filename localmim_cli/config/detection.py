"""The settings of `localmim finetune --task detection`: Mask R-CNN (torchvision's) on COCO-format
instances, the ViTDet recipe (Li et al., ECCV 2022, as detectron2's ViTDet configs give it),
since the LocalMIM code publishes no detection recipe.

The defaults are the ViTDet ViT-B Mask R-CNN recipe (`presets/det-vit-b-coco.toml` spells it out);
the run counts optimizer steps (`train.iterations`), not epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from localmim_cli.config.schema import (MAX_BATCH, MAX_IMG_SIZE, MAX_LR, MAX_REPEATS, MAX_STEPS, MAX_WORKERS,
                                        SEED_RANGE, Strict, TrainingRunSettings)
from localmim_cli.config.segmentation import Range

Share = Annotated[float, Field(gt=0, lt=1)]
Side = Annotated[int, Field(ge=1, le=MAX_IMG_SIZE)]


class DetModelSettings(Strict):
    arch: str | None = Field(None, description="timm ViT architecture the --init checkpoint must match, e.g. "
                                               "vit_base_patch16_224; empty = whatever the checkpoint is")
    img_size: int = Field(1024, ge=32, le=MAX_IMG_SIZE, description="training crop side in pixels (ViTDet: 1024); "
                          "every image is padded to this square, test images resized to fit it")
    masks: bool = Field(True, description="Mask R-CNN (instance masks); false = Faster R-CNN (boxes only)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate at the last block")
    window_size: int = Field(14, ge=0, le=MAX_IMG_SIZE, description="ViT: window attention side in patches "
                             "(ViTDet: 14); 0 = global attention in every block")
    global_blocks: list[int] | None = Field(None, description="ViT: the blocks (1-indexed) with global attention; "
                                            "empty = the last of each quarter (ViT-B: 3, 6, 9, 12, ViTDet's)")
    rel_pos: bool = Field(True, description="ViT: a decomposed relative position bias in every block, zero at "
                                            "the start (ViTDet)")
    neck_channels: int = Field(256, ge=8, le=4096, description="channels of the pyramid the heads read (ViTDet: 256)")
    anchor_sizes: list[Side] = Field([32, 64, 128, 256, 512], min_length=5, max_length=5,
                                     description="anchor side in pixels at strides 4, 8, 16, 32, 64")
    aspect_ratios: list[Annotated[float, Field(gt=0)]] = Field([0.5, 1.0, 2.0], min_length=1,
                                                              description="anchor aspect ratios (height / width)")
    rpn_convs: int = Field(2, ge=1, le=8, description="3x3 convolutions of the RPN head (ViTDet: 2)")
    box_convs: int = Field(4, ge=0, le=8, description="box head: 3x3 convolutions before its fc (ViTDet: 4conv1fc)")
    box_fc: int = Field(1024, ge=8, le=8192, description="box head: width of its fully connected layer")
    mask_convs: int = Field(4, ge=1, le=8, description="mask head: 3x3 convolutions (ViTDet: 4)")
    head_norm: Literal["layernorm", "none"] = Field("layernorm", description="normalisation in the neck and "
                                                    "the box and mask heads (ViTDet: LayerNorm)")
    rpn_batch: int = Field(256, ge=1, le=4096, description="anchors sampled per image for the RPN loss")
    roi_batch: int = Field(512, ge=1, le=8192, description="proposals sampled per image for the box and mask losses")
    rpn_train_proposals: int = Field(1000, ge=1, le=100000, description="proposals kept per image after NMS in "
                                     "training (detectron2: 1000)")
    rpn_test_proposals: int = Field(1000, ge=1, le=100000, description="proposals kept per image after NMS in testing")
    score_thresh: float = Field(0.05, ge=0, lt=1, description="test: detections below this score are dropped")
    nms_thresh: float = Field(0.5, gt=0, le=1, description="test: per-class NMS IoU")
    detections: int = Field(100, ge=1, le=10000, description="test: detections kept per image (COCO: 100)")


class DetDataSettings(Strict):
    path: Path | None = Field(None, description="COCO layout (annotations/instances_{train,val}YYYY.json + "
                              "{train,val}YYYY/) or splits layout (train/ and val/, each annotations.json + "
                              "images/), or one split (annotations.json + images/) with data.val_path")
    val_path: Path | None = Field(None, description="a validation split folder: annotations.json + images/ "
                                  "(overrides the one DATA holds)")
    layout: Literal["auto", "coco", "splits", "split"] = Field("auto", description="auto = coco when "
                                                                "annotations/instances_*.json exist, splits when "
                                                                "train/annotations.json does, else split")
    scale_range: Range = Field((0.1, 2.0), description="large-scale jitter: the crop side times U(low, high) is "
                               "the size the image is resized to fit (ViTDet: 0.1 - 2.0)")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    invalid: Literal["error", "skip"] = Field("error", description="an annotation whose box is degenerate or "
                                              "outside its image: stop with an error naming it, or leave it out "
                                              "(counted in the run's records)")
    workers: int = Field(4, ge=0, le=MAX_WORKERS, description="loader processes per device")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="passes over the training images per epoch (small sets)")
    check: Literal["full", "none"] = Field("full", description="before training: open every image's header (its "
                                           "size against the annotations), or only check that the files exist")


class DetOptimSettings(Strict):
    base_lr: float = Field(4e-4, gt=0, le=MAX_LR, description="peak lr per 256 images: lr = base_lr x effective "
                           "batch / 256 (4e-4 gives ViTDet's 1e-4 at 64 images per step)")
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="absolute peak lr; overrides base_lr scaling when set")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    layer_decay: float = Field(0.7, gt=0, le=1, description="layer-wise lr decay: block i of L gets "
                               "layer_decay^(L+1-i) of the lr, the embeddings ^(L+1), pyramid and heads 1 (ViTDet: 0.7)")
    no_decay_1d: bool = Field(False, description="no weight decay on 1-D parameters and biases (ViTDet: biases "
                              "do get decay)")
    no_decay_norm: bool = Field(True, description="no weight decay on normalisation layers (detectron2's "
                                "weight_decay_norm 0)")
    no_decay_names: list[str] = Field(["pos_embed"], description="no weight decay on parameters whose name "
                                      "contains one of these (ViTDet ViT: pos_embed; Swin: relative_position_bias_table)")
    schedule: Literal["step"] = Field("step", description="lr x gamma at each milestone, after a linear warmup "
                                      "(detectron2's WarmupParamScheduler over MultiStepParamScheduler)")
    milestones: list[Share] = Field([0.888889, 0.962963], description="shares of train.iterations where the lr "
                                    "drops (ViTDet 100 epochs: 163889 and 177546 of 184375)")
    gamma: float = Field(0.1, gt=0, le=1, description="the factor at each milestone")
    warmup_steps: int = Field(250, ge=0, le=MAX_STEPS, description="linear warmup in optimizer steps (ViTDet: 250)")
    warmup_factor: float = Field(1e-3, gt=0, le=1, description="the warmup's first lr, as a share of the peak")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm; empty = no clipping")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if sorted(value) != value:
            raise ValueError(f"milestones must increase, got {value}")
        return value


class DetValSettings(Strict):
    every: int = Field(5000, ge=0, le=MAX_STEPS, description="optimizer steps between validation passes (0 = the "
                       "last step only; detectron2: 5000)")
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="images per forward in validation")


class DetTrainSettings(TrainingRunSettings):
    iterations: int = Field(184375, ge=1, le=MAX_STEPS, description="optimizer steps of the run (ViTDet 100 "
                            "epochs of COCO at 64 images per step: 184375)")
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="images per device per micro-step (ViTDet: 1 on "
                            "each of 64 GPUs)")
    seed: int = Field(0, **SEED_RANGE, description="run seed: augmentations, sampling, drop path derive from it")
    log_every: int = Field(20, ge=1, le=MAX_STEPS, description="optimizer steps between logged metrics")
    checkpoint_every: int = Field(5000, ge=0, le=MAX_STEPS, description="optimizer steps between checkpoints "
                                  "(0 = at each epoch's end); the last step always")


class DetectionSettings(Strict):
    """Everything `localmim finetune --task detection` reads."""

    task: Literal["detection"] = Field("detection", description="the fine-tuning task "
                                       "(--task; see config/tasks.py): set when the run starts")
    init: Path | None = Field(None, description="encoder to start from: a pretrain run, a checkpoint, a "
                                                "published ViT or Swin .pth/.safetensors, or an exported encoder")
    model: DetModelSettings = Field(default_factory=DetModelSettings)
    data: DetDataSettings = Field(default_factory=DetDataSettings)
    optim: DetOptimSettings = Field(default_factory=DetOptimSettings)
    train: DetTrainSettings = Field(default_factory=DetTrainSettings)
    val: DetValSettings = Field(default_factory=DetValSettings)
