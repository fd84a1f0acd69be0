"""The settings of a run: one pydantic model tree, unknown keys refused.

Values arrive in layers (see `layers.py`); this module only says what is valid. Plugin options
(`model.encoder.options`, `model.target.options`) are validated by the plugin's own model once
the plugin is known, so a third-party encoder's options are checked as strictly as ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginChoice(Strict):
    name: str = Field(description="entry-point name of the plugin (see `localmim plugins list`)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the plugin")


class DecoderSettings(Strict):
    width: int = Field(256, ge=8, description="decoder embedding width (published ViT: 256)")
    depth: int = Field(1, ge=1, description="transformer blocks per decoder (published: 1)")
    num_heads: int = Field(8, ge=1, description="attention heads (published ViT: 8)")
    mlp_ratio: float = Field(4.0, gt=0)


class ModelSettings(Strict):
    encoder: PluginChoice = Field(default_factory=lambda: PluginChoice(name="vit"))
    target: PluginChoice = Field(default_factory=lambda: PluginChoice(name="hog"))
    img_size: int = Field(224, ge=8, description="square input side in pixels")
    taps: list[int] | None = Field(None, description="1-indexed encoder layers that get a decoder; "
                                                     "empty = the encoder's default (ViT: 2, 4, L-2, L)")
    scales: list[float] = Field([4.0, 2.0, 1.0, 0.5], description="resolution factor of each "
                                "decoder's prediction relative to its tap grid, one per tap")
    decoder: DecoderSettings = Field(default_factory=DecoderSettings)
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches hidden")
    layer_norm_eps: float = Field(1e-6, gt=0)


class DataSettings(Strict):
    path: Path | None = Field(None, description="image folder (recursive); empty = built-in sample photos")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range")
    hflip: bool = Field(True, description="random horizontal flip")
    workers: int = Field(2, ge=0, description="loader processes per device")
    skip_unreadable: bool = Field(False, description="skip files that fail to decode (counted in the log) "
                                                     "instead of stopping")
    repeats: int = Field(1, ge=1, description="passes over the folder per epoch (small folders)")

    @model_validator(mode="after")
    def _crop_range(self) -> "DataSettings":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class OptimSettings(Strict):
    base_lr: float = Field(1.5e-4, gt=0, description="lr per 256 images; lr = base_lr * effective batch / 256")
    lr: float | None = Field(None, gt=0, description="absolute lr; overrides base_lr scaling when set")
    min_lr: float = Field(0.0, ge=0, description="floor of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; norms and biases are excluded")
    betas: tuple[float, float] = Field((0.9, 0.95))
    warmup_epochs: float = Field(40, ge=0, description="linear warmup, per step")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm; empty = no clipping")


class TrainSettings(Strict):
    epochs: int = Field(1600, ge=1)
    batch_size: int = Field(256, ge=1, description="images per device per micro-step")
    accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, else fp32")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    seed: int = Field(0, description="run seed; crops, flips and masks derive from it per sample")
    log_every: int = Field(20, ge=1, description="optimizer steps between logged metrics")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints "
                                                       "(0 = at each epoch's end only)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    visualize_every: int = Field(0, ge=0, description="epochs between reconstruction figures (0 = never)")


class PretrainSettings(Strict):
    """Everything `localmim pretrain` reads."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

