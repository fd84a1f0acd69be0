"""Hiera (Ryali et al., ICML 2023) as a LocalMIM encoder, built on timm's `Hiera`.

Hiera is a hierarchical ViT made for MAE: its mask units are windows of 8x8 tokens (32 px at the
default 4 px patch stride) that stay intact through every pooling, so masked units can be dropped
before the first block and the model runs on visible units only, as LocalMIM's ViT does. timm
does the masking natively (`forward_intermediates(x, mask=keep)`); this module only translates
between LocalMIM's index tensors and Hiera's boolean keep-mask and token layout.

Taps are the stage ends; `tap_layers` are STAGE numbers 1..S (not block numbers). Stage s has
stride patch_stride * q_stride^min(s-1, q_pool) px and embed_dim * dim_mul^(s-1) channels: with
the defaults 4, 8, 16 and 32 px. Each tap gets its own LayerNorm (`tap_norms.K`), as LocalMIM's
Swin has one per stage. Stages above the highest tap are dropped (no parameter without gradient).

Token order: timm returns each stage's visible tokens as (B, visible units in raster order,
MUy, MUx, C): unit by unit, each unit's tokens row by row. `ids_restore` of a tap gives every
cell of that tap's grid its index in that order; hidden cells follow, unit by unit.
"""

from __future__ import annotations

import copy
from typing import Any

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.models.hiera import Hiera
from torch import nn

from localmim_cli.encoders.base import MaskedEncoder, TapInfo, TapOutput

# A small Hiera for CPUs when no `arch` is named: 4 stages of 1, 1, 2, 1 blocks, width 32.
SMALL_DEFAULTS = {"embed_dim": 32, "num_heads": 1, "stages": (1, 1, 2, 1)}
_PAIRS = ("q_stride", "mask_unit_size", "patch_stride", "patch_kernel", "patch_padding")


class HieraOptions(BaseModel):
    """Options of the `hiera` encoder. Unset values: the named `arch`'s, else timm's `Hiera`
    defaults, except embed_dim 32, num_heads 1, stages [1, 1, 2, 1] (a small model) without arch."""

    model_config = ConfigDict(extra="forbid")

    arch: str | None = Field(None, description="timm Hiera configuration to start from, e.g. hiera_tiny_224 "
                                               "(random init; the image size is the run's)")
    embed_dim: int | None = Field(None, ge=1, description="width of stage 1 (doubles per stage)")
    num_heads: int | None = Field(None, ge=1, description="heads of stage 1 (doubles per stage)")
    stages: list[int] | None = Field(None, min_length=2, description="blocks per stage")
    q_pool: int | None = Field(None, ge=0, description="stages ending with 2x2 pooling (timm: 3, and at "
                                                        "most stages-1 when stages are given)")
    q_stride: int | None = Field(None, ge=1, description="pooling stride per side (timm: 2)")
    mask_unit_size: int | None = Field(None, ge=1, description="mask unit side in tokens; must equal "
                                                               "q_stride^(stages-1) (timm: 8)")
    mask_unit_attn: list[bool] | None = Field(None, description="per stage: attention within mask units "
                                                                "(timm: true, true, false, false)")
    patch_stride: int | None = Field(None, ge=1, description="patch embedding stride in px (timm: 4)")
    patch_kernel: int | None = Field(None, ge=1, description="patch embedding kernel in px (timm: 7)")
    patch_padding: int | None = Field(None, ge=0, description="patch embedding padding in px (timm: 3)")
    dim_mul: float | None = Field(None, gt=0, description="width factor per stage (timm: 2)")
    head_mul: float | None = Field(None, gt=0, description="heads factor per stage (timm: 2)")
    mlp_ratio: float | None = Field(None, gt=0, description="timm: 4")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth at the last block")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str | None) -> str | None:
        if arch is not None:
            known = [n for n in timm.list_models("hiera_*")]
            if arch not in known:
                raise ValueError(f"{arch!r} is not a timm Hiera configuration; one of {', '.join(known)}")
        return arch

    @model_validator(mode="after")
    def _consistent(self) -> "HieraOptions":
        kw = self.timm_kwargs()
        if self.arch is None:
            n_stages = len(kw["stages"])
            mu, q = kw.get("mask_unit_size", (8, 8))[0], kw.get("q_stride", (2, 2))[0]
            if mu != q ** (n_stages - 1):
                raise ValueError(f"mask_unit_size {mu} must be q_stride^(stages-1) = {q}^{n_stages - 1} = "
                                 f"{q ** (n_stages - 1)}: Hiera keeps a mask unit whole through every pooling")
            attn = kw.get("mask_unit_attn")
            if attn is not None and len(attn) != n_stages:
                raise ValueError(f"mask_unit_attn has {len(attn)} entries for {n_stages} stages")
            if attn is None and n_stages != 4:
                raise ValueError(f"{n_stages} stages: give mask_unit_attn, one true/false per stage")
            if kw.get("q_pool", 3) >= n_stages:
                raise ValueError(f"q_pool {kw.get('q_pool', 3)} must be below the {n_stages} stages")
        return self

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for timm's Hiera (sizes as pairs), defaults filled in when no arch."""
        kw: dict[str, Any] = {} if self.arch else dict(SMALL_DEFAULTS)
        for name in ("embed_dim", "num_heads", "q_pool", "dim_mul", "head_mul", "mlp_ratio"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.stages is not None:
            kw["stages"] = tuple(self.stages)
            kw.setdefault("q_pool", min(3, len(self.stages) - 1))  # timm's 3 needs 4 stages or more
        if self.mask_unit_attn is not None:
            kw["mask_unit_attn"] = tuple(self.mask_unit_attn)
        for name in _PAIRS:
            if getattr(self, name) is not None:
                kw[name] = (getattr(self, name),) * 2
        if self.drop_path:
            kw["drop_path_rate"] = self.drop_path
        return kw


def create_trunk(options: HieraOptions, img_size: int) -> Hiera:
    """timm's Hiera for `img_size`, without a classifier (num_classes=0)."""
    kw = options.timm_kwargs()
    if options.arch:
        model = timm.create_model(options.arch, pretrained=False, img_size=img_size, num_classes=0, **kw)
    else:
        model = Hiera(img_size=(img_size, img_size), num_classes=0, **kw)
    if not isinstance(model, Hiera):
        raise ValueError(f"arch {options.arch!r} does not build a timm Hiera")
    return model


class MaskedHiera(MaskedEncoder):
    tap_unit = "stage"  # tap numbers count Hiera's stages, not blocks

    def __init__(self, options: HieraOptions, img_size: int, tap_layers: list[int] | None = None):
        super().__init__()
        self.options = options
        self.img_size = img_size
        trunk = create_trunk(options, img_size)
        patch = trunk.patch_stride[0]
        mu = trunk.mask_unit_size[0]
        q = trunk.q_stride[0]
        n_stages = len(trunk.stage_ends)
        if len(set(trunk.patch_stride)) > 1 or len(set(trunk.mask_unit_size)) > 1 or len(set(trunk.q_stride)) > 1:
            raise ValueError("the hiera encoder needs square patch strides, mask units and pooling")
        if img_size % (patch * mu):
            raise ValueError(f"image size {img_size} is not divisible by Hiera's mask unit of {patch * mu} px "
                             f"({mu} tokens of {patch} px)")
        taps = list(tap_layers) if tap_layers else list(range(1, n_stages + 1))
        bad = [t for t in taps if not 1 <= t <= n_stages]
        if bad:
            raise ValueError(f"taps {bad} are outside Hiera's stages 1..{n_stages} (hiera taps are stage numbers)")
        if sorted(set(taps)) != taps:
            raise ValueError(f"taps must be increasing and distinct stage numbers, got {taps}")
        if taps[-1] < n_stages:
            # Stages above the highest tap would get no gradient (and break DDP): drop them.
            trunk.prune_intermediate_layers([t - 1 for t in taps], prune_head=True, coarse=True)
        trunk.reset_classifier(0, reset_other=True)  # the head's norm is replaced by the last tap norm
        self.trunk = trunk
        self.tap_layers = taps
        self.unit_px = patch * mu
        self.unit_grid = (trunk.mask_spatial_shape[0], trunk.mask_spatial_shape[1])
        self.taps, norms = [], []
        norm_type, eps = type(trunk.blocks[0].norm1), trunk.blocks[0].norm1.eps
        for k, stage in enumerate(taps):
            pools = min(stage - 1, trunk.q_pool)
            channels = trunk.feature_info[stage - 1]["num_chs"]
            self.taps.append(TapInfo(channels, patch * q ** pools))
            norms.append(norm_type(channels, eps=eps))
            per_side = mu // q ** pools  # tokens per mask unit side at this stage
            unit, offset = _cell_layout(self.unit_grid, per_side)
            self.register_buffer(f"cell_unit_{k}", unit, persistent=False)
            self.register_buffer(f"cell_offset_{k}", offset, persistent=False)
        self.tap_norms = nn.ModuleList(norms)

    @property
    def num_units(self) -> int:
        return self.unit_grid[0] * self.unit_grid[1]

    def forward_taps(self, images, ids_keep, ids_restore):
        batch = images.shape[0]
        keep = torch.zeros(batch, self.num_units, dtype=torch.bool, device=images.device)
        keep.scatter_(1, ids_keep, True)  # (B, units) Hiera's convention: True = visible
        feats = self.trunk.forward_intermediates(images, mask=keep, indices=[t - 1 for t in self.tap_layers],
                                                 output_fmt="NHWC", intermediates_only=True)
        n_keep = ids_keep.shape[1]
        # Where each unit's block of tokens starts, in units: visible units in raster order first,
        # then the hidden ones (the decoder fills those with mask tokens).
        visible_rank = keep.long().cumsum(1) - 1
        hidden_rank = (~keep).long().cumsum(1) - 1
        unit_slot = torch.where(keep, visible_rank, n_keep + hidden_rank)  # (B, units)
        outputs = []
        for k, x in enumerate(feats):  # x: (B, n_keep, MUy, MUx, C)
            per_unit = x.shape[2] * x.shape[3]
            tokens = self.tap_norms[k](x.reshape(batch, -1, x.shape[-1]))  # (B, n_keep * per_unit, C)
            cell_unit = getattr(self, f"cell_unit_{k}")
            cell_offset = getattr(self, f"cell_offset_{k}")
            ids = unit_slot.gather(1, cell_unit.expand(batch, -1)) * per_unit + cell_offset  # (B, h*w)
            side = self.unit_px // self.taps[k].stride_px
            grid = (self.unit_grid[0] * side, self.unit_grid[1] * side)
            outputs.append(TapOutput(tokens, 0, grid, ids))
        return outputs

    def forward_features(self, images):
        # timm's Hiera head: average the last stage's tokens, then a LayerNorm (here the last tap's).
        x = self.trunk.forward_features(images)  # (B, N, C), not in raster order: pooling does not care
        return self.tap_norms[-1](x.mean(dim=1))

    def to_timm(self) -> Hiera:
        """A timm Hiera (num_classes=0) holding these weights; its pre-logits equal forward_features."""
        model = create_trunk(self.options, self.img_size)
        pruned = self.tap_layers[-1] < len(model.stage_ends)
        if pruned:
            model.prune_intermediate_layers([t - 1 for t in self.tap_layers], prune_head=True, coarse=True)
        model.reset_classifier(0, reset_other=True)  # as the trunk: no head norm yet
        model.load_state_dict(self.trunk.state_dict())
        model.head.norm = copy.deepcopy(self.tap_norms[-1])  # pool, then this norm: timm's head order
        if not pruned:
            # How timm rebuilds it (localmim export): a named Hiera with these sizes. A pruned
            # trunk (top stages untapped) has no create_model equivalent and says nothing.
            model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                                    "architecture": self.options.arch or "hiera_tiny_224"}
            model.model_args = {"img_size": [self.img_size, self.img_size],
                                **{k: list(v) if isinstance(v, tuple) else v
                                   for k, v in self.options.timm_kwargs().items()}}
        return model.eval()


def _cell_layout(unit_grid: tuple[int, int], per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a tap with per_side x per_side tokens per mask unit, each grid cell's (raster order)
    unit index and its offset inside that unit's block of tokens (row-major within the unit)."""
    rows, cols = unit_grid[0] * per_side, unit_grid[1] * per_side
    y = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    x = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    unit = (y // per_side) * unit_grid[1] + x // per_side
    offset = (y % per_side) * per_side + x % per_side
    return unit.reshape(-1), offset.reshape(-1)


def build_hiera(options: HieraOptions, img_size: int, tap_layers: list[int] | None) -> MaskedHiera:
    return MaskedHiera(options, img_size, tap_layers)
