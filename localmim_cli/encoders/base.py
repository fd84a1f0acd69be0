"""What an encoder plugin provides (interface version 1).

An encoder sees only the visible mask units of each image and hands back the features of a few
of its layers ("taps"). LocalMIM attaches a light decoder to each tap. Everything the rest of the
program needs to know about an encoder is on `MaskedEncoder`; nothing else is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from localmim_cli.plugins.api import ENCODER_API_VERSION  # noqa: F401  (plugins import it from here)


@dataclass(frozen=True)
class TapInfo:
    """One tap: its feature width and the pixel stride of its token grid."""

    channels: int
    stride_px: int


@dataclass
class TapOutput:
    """Features of one tap for a masked batch.

    tokens:      (B, n_prefix + n_visible, C): prefix tokens (a ViT's cls) then the visible
                 tokens of the tap's grid, in the order given by ids_restore
    n_prefix:    how many leading tokens are not on the grid
    grid:        (h, w) of the tap's full token grid
    ids_restore: (B, h*w) position of each grid cell in [visible..., masked...]
    """

    tokens: torch.Tensor
    n_prefix: int
    grid: tuple[int, int]
    ids_restore: torch.Tensor


class MaskedEncoder(nn.Module):
    """Base class of encoders. Subclasses set the attributes and implement the two forwards.

    unit_px:    side in pixels of a mask unit (the patch for a ViT)
    unit_grid:  (rows, cols) of mask units for the configured image size
    taps:       TapInfo for each tapped layer, lowest first
    tap_layers: the (1-indexed) layer numbers tapped, for display and checkpoints
    tap_unit:   what those numbers count, for display ("layer"; a hierarchical encoder: "stage")
    n_prefix:   optional, default 0; the prefix tokens (a ViT's cls) its taps carry. It only
                sizes the decoders' stored position tables (one zero row per prefix token, as
                published checkpoints store them); decoders read each TapOutput's n_prefix
    mask_shared_by_batch: optional, default False; True asks LocalMIM for one mask per batch
                (the first image's), as GreenMIM-style encoders are published; forward_taps
                must still accept different masks per image

    What localmim relies on beyond the signatures (docs/plugins.md; `localmim_cli.plugins.testing`
    checks each): a tap's grid is the image side over its stride, and the stride and unit_px
    divide one another; hidden units' pixels must not reach any tap; every trainable parameter
    gets a gradient from forward_taps (DistributedDataParallel needs it).
    """

    unit_px: int
    unit_grid: tuple[int, int]
    taps: list[TapInfo]
    tap_layers: list[int]
    tap_unit: str = "layer"
    n_prefix: int = 0

    def forward_taps(self, images: torch.Tensor, ids_keep: torch.Tensor,
                     ids_restore: torch.Tensor) -> list[TapOutput]:
        """Run on the visible units only; return one TapOutput per tap."""
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked forward for fine-tuning and probes: (B, C) pooled features."""
        raise NotImplementedError

    def to_timm(self) -> nn.Module:
        """Optional: this encoder as a timm model (no classifier) holding these weights, such that
        `m.forward_head(m.forward_features(x), pre_logits=True)` equals `self.forward_features(x)`.
        Encoders without a timm counterpart leave it unimplemented (NotImplementedError); finetune
        and export need it. For export, the model also says how timm rebuilds it:
        `pretrained_cfg["architecture"]` and a `model_args` attribute (create_model kwargs).
        """
        raise NotImplementedError
