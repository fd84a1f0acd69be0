"""The settings of `localmim finetune --task segmentation`: the published ADE20K protocol
(mmsegmentation's UperNet recipe of BEiT/MAE, which LocalMIM's segmentation code follows).

The defaults are the published ViT-B recipe (`presets/seg-vit-b-ade20k.toml` spells it out);
the run counts optimizer steps (`train.iterations`), not epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from localmim_cli.config.schema import (MAX_BATCH, MAX_IMG_SIZE, MAX_LR, MAX_REPEATS, MAX_STEPS, MAX_WORKERS,
                                        SEED_RANGE, Strict, TrainingRunSettings, _min_lr_below_lr)


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] <= value[1]:
        raise ValueError(f"expected 0 < low <= high, got {list(value)}")
    return value


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
Scale = tuple[Annotated[int, Field(ge=8, le=MAX_IMG_SIZE)], Annotated[int, Field(ge=8, le=MAX_IMG_SIZE)]]


class SegModelSettings(Strict):
    arch: str | None = Field(None, description="timm ViT architecture the --init checkpoint must match, e.g. "
                                               "vit_base_patch16_224; empty = whatever the checkpoint is")
    img_size: int = Field(512, ge=16, le=MAX_IMG_SIZE, description="training crop side in pixels; the encoder runs at this "
                                                  "size (ViT position embeddings resampled to it)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate at the last block")
    taps: list[int] | None = Field(None, min_length=4, max_length=4, description="ViT: the 4 blocks (1-indexed) "
                                   "whose outputs feed the pyramid; empty = 2, 4, L-2, L (published "
                                   "out_indices [1, 3, 9, 11] for 12 blocks). Swin: its four stages")
    rel_pos_bias: bool = Field(True, description="ViT: a new relative position bias per block, zero at the "
                                                 "start (BEiT-style, as published)")
    layer_scale: float | None = Field(1.0, gt=0, description="ViT: layer-scale factors per block, starting "
                                      "at this value (published 1.0); empty = none")
    decoder_channels: int = Field(768, ge=8, description="UperNet channels (published: 768 for ViT-B, 512 for Swin)")
    aux_channels: int = Field(256, ge=8, description="FCN auxiliary head channels (published 256)")
    aux_weight: float = Field(0.4, ge=0, description="weight of the auxiliary head's loss (published 0.4; "
                                                     "0 = no auxiliary head)")
    aux_level: int = Field(3, ge=1, le=4, description="pyramid level (1 = stride 4 ... 4 = stride 32) the "
                                                      "auxiliary head reads (published: 3, stride 16)")
    dropout: float = Field(0.1, ge=0, lt=1, description="channel dropout before each head's classifier")


class SegDataSettings(Strict):
    path: Path | None = Field(None, description="ADE20K layout (images/{training,validation}, "
                              "annotations/{training,validation}) or pairs layout (images/NAME.*, masks/NAME.png, "
                              "optional classes.txt or classes.json)")
    val_path: Path | None = Field(None, description="pairs layout: a separate validation folder of the same layout")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="pairs layout without val_path: share of the "
                                                             "images held out for validation (0 = none)")
    layout: Literal["auto", "ade20k", "pairs"] = Field("auto", description="auto = ade20k when "
                                                       "annotations/training exists, else pairs")
    reduce_zero_label: bool | None = Field(None, description="label 0 is 'other' and ignored, 1..N become "
                                           "0..N-1 (mmsegmentation's reduce_zero_label); empty = on for "
                                           "the ADE20K layout, off for pairs")
    scale: Scale = Field((2048, 512), description="training resize target (long, short) before the ratio "
                         "(published 2048 x 512); validation images are resized to it (ratio 1)")
    ratio_range: Range = Field((0.5, 2.0), description="random resize ratio range (published 0.5 - 2.0)")
    cat_max_ratio: float = Field(0.75, gt=0, le=1, description="random crop: retry (up to 10 times) while one "
                                 "class covers more than this share of the crop's labelled pixels")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    photometric: bool = Field(True, description="photometric distortion (brightness, contrast, saturation, hue)")
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="loader processes per device")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="passes over the training images per epoch (small folders)")
    check: Literal["full", "none"] = Field("full", description="before training: read every mask and image "
                                           "header (sizes, labels), or trust the files")


class SegOptimSettings(Strict):
    base_lr: float = Field(6.4e-3, gt=0, le=MAX_LR, description="peak lr per 256 images: lr = base_lr x "
                           "effective batch / 256 (6.4e-3 gives the published ViT-B 4e-4 at 16 images per step)")
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="absolute peak lr; overrides base_lr scaling when set")
    min_lr: float = Field(0.0, ge=0, description="where the poly decay ends")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    layer_decay: float = Field(0.65, gt=0, le=1, description="layer-wise lr decay: block i of L gets "
                               "layer_decay^(L+1-i) of the lr, the embeddings ^(L+1), pyramid and heads 1")
    no_decay_1d: bool = Field(True, description="no weight decay on 1-D parameters and biases (the published "
                              "ViT recipe; its position embedding and cls token do get decay)")
    no_decay_names: list[str] = Field(default_factory=list, description="no weight decay on parameters whose "
                                      "name contains one of these (the published Swin recipe: "
                                      "absolute_pos_embed, relative_position_bias_table, norm)")
    warmup_steps: int = Field(1500, ge=0, le=MAX_STEPS, description="linear warmup in optimizer steps (published 1500)")
    warmup_ratio: float = Field(1e-6, gt=0, le=1, description="the warmup's first lr as a share of the peak")
    power: float = Field(1.0, gt=0, description="poly decay power (published 1.0)")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm; empty = no clipping")

    _floor_below_peak = model_validator(mode="after")(_min_lr_below_lr)


class SegValSettings(Strict):
    every: int = Field(16000, ge=0, le=MAX_STEPS, description="optimizer steps between validation passes (0 = the last "
                                                "step only; published 16000)")
    mode: Literal["slide", "whole"] = Field("slide", description="slide: windows of model.img_size at "
                                            "val.stride, their logits averaged (published ViT); whole: the "
                                            "resized image at once (published Swin)")
    stride: int = Field(341, ge=1, le=MAX_IMG_SIZE, description="slide: window stride in pixels (published 341 for 512 crops)")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="windows (slide) or images (whole) per forward")


class SegTrainSettings(TrainingRunSettings):
    iterations: int = Field(160000, ge=1, le=MAX_STEPS, description="optimizer steps of the run (published 160k)")
    batch_size: int = Field(2, ge=2, le=MAX_BATCH, description="images per device per micro-step (published 2 on each "
                                                 "of 8 GPUs); 2 at least for the heads' batch norms")
    seed: int = Field(0, **SEED_RANGE, description="run seed: split, augmentations, dropout and drop path derive from it")
    log_every: int = Field(50, ge=1, le=MAX_STEPS, description="optimizer steps between logged metrics")
    checkpoint_every: int = Field(16000, ge=0, le=MAX_STEPS, description="optimizer steps between checkpoints "
                                                           "(0 = at each epoch's end); the last step always")


class SegmentationSettings(Strict):
    """Everything `localmim finetune --task segmentation` reads."""

    task: Literal["segmentation"] = Field("segmentation", description="the fine-tuning task "
                                          "(--task; see config/tasks.py): set when the run starts")
    init: Path | None = Field(None, description="encoder to start from: a pretrain run, a checkpoint, a "
                                                "published ViT or Swin .pth/.safetensors, or an exported encoder")
    model: SegModelSettings = Field(default_factory=SegModelSettings)
    data: SegDataSettings = Field(default_factory=SegDataSettings)
    optim: SegOptimSettings = Field(default_factory=SegOptimSettings)
    train: SegTrainSettings = Field(default_factory=SegTrainSettings)
    val: SegValSettings = Field(default_factory=SegValSettings)

    @model_validator(mode="after")
    def _stride_within_window(self) -> "SegmentationSettings":
        if self.val.mode == "slide" and self.val.stride > self.model.img_size:
            raise ValueError(f"val.stride {self.val.stride} is larger than the window model.img_size "
                             f"{self.model.img_size}: pixels between windows would get no prediction")
        return self
