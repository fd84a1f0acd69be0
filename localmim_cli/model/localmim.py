"""LocalMIM: a masked encoder, one local decoder per tap, one reconstruction target per scale.

images -> masking -> encoder taps -> local decoders -> per-scale predictions
images -> target (once per batch, all scales)       -> per-scale targets
loss_k = sum(mse_k * mask_k) / sum(mask_k); loss = sum_k loss_k (all weights 1, as published)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from localmim_cli.model.decoder import LocalDecoder, check_scale
from localmim_cli.encoders.base import MaskedEncoder
from localmim_cli.model.masking import Masking, mask_at_scale, masking_from_mask, masking_from_noise
from localmim_cli.targets.base import ReconstructionTarget


@dataclass(frozen=True)
class DecoderShape:
    """width: one for every decoder, or one per tap (published Swin: C_dec/2 for the first tap)."""

    width: int | tuple[int, ...] = 256
    depth: int = 1
    num_heads: int = 8
    mlp_ratio: float = 4.0

    def widths(self, n_taps: int) -> list[int]:
        if isinstance(self.width, int):
            return [self.width] * n_taps
        if len(self.width) != n_taps:
            raise ValueError(f"{len(self.width)} decoder widths {list(self.width)} given for {n_taps} taps; "
                             "give one width, or one per tap")
        return list(self.width)


@dataclass
class LocalMIMOutput:
    """loss: scalar sum over scales; losses: (S,) per scale; the rest per scale, lowest tap first.

    preds[k], targets[k]: (B, cells_k, dim_k); masks[k]: (B, cells_k) loss weights; mask: (B, L).
    cells[k]: None where those hold every cell of scale k in raster order; else (B, cells_k) the
    raster indices of the cells they hold (a forward with loss_only).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    preds: list[torch.Tensor] = field(repr=False)
    targets: list[torch.Tensor] = field(repr=False)
    masks: list[torch.Tensor] = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    ids_restore: torch.Tensor = field(repr=False)
    cells: list[torch.Tensor | None] = field(repr=False)


def cell_sizes(encoder: MaskedEncoder, scales: list[float]) -> list[int]:
    """Pixel side of one target cell per tap: the tap's stride divided by its scale."""
    if len(scales) != len(encoder.taps):
        raise ValueError(f"{len(scales)} scales given for {len(encoder.taps)} taps "
                         f"(layers {encoder.tap_layers}); give one scale per tap")
    cells = []
    for tap, layer, scale in zip(encoder.taps, encoder.tap_layers, scales):
        check_scale(scale)
        cell = tap.stride_px / scale
        if cell != int(cell) or cell < 1:
            raise ValueError(f"tap at layer {layer} (stride {tap.stride_px}px) at scale {scale} "
                             f"gives a cell of {cell}px, which is not a whole number of pixels")
        cells.append(int(cell))
    return cells


class LocalMIM(nn.Module):
    def __init__(self, encoder: MaskedEncoder, target: ReconstructionTarget, scales: list[float],
                 decoder: DecoderShape = DecoderShape(), mask_ratio: float = 0.75,
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        self.encoder = encoder
        self.target = target
        self.scales = list(scales)
        self.mask_ratio = mask_ratio
        self.cells_px = cell_sizes(encoder, scales)
        if list(target.cells_px) != self.cells_px:
            raise ValueError(f"target built for cells {target.cells_px}, model needs {self.cells_px}")
        unit_h, unit_w = encoder.unit_grid
        decoders = []
        widths = decoder.widths(len(encoder.taps))
        for tap, layer, scale, dim, width in zip(encoder.taps, encoder.tap_layers, scales, target.dims, widths):
            grid = (unit_h * encoder.unit_px // tap.stride_px, unit_w * encoder.unit_px // tap.stride_px)
            if scale < 1 and (grid[0] % round(1 / scale) or grid[1] % round(1 / scale)):
                raise ValueError(f"tap at layer {layer} has a {grid[0]}x{grid[1]} grid, which does "
                                 f"not divide by the pooling factor {round(1 / scale)} of scale {scale}")
            decoders.append(LocalDecoder(tap.channels, grid, encoder.n_prefix, width, decoder.depth,
                                         decoder.num_heads, decoder.mlp_ratio, scale, dim,
                                         layer_norm_eps, label=f"{encoder.tap_unit} {layer}"))
        self.decoders = nn.ModuleList(decoders)

    @property
    def num_units(self) -> int:
        return self.encoder.unit_grid[0] * self.encoder.unit_grid[1]

    def masking(self, batch: int, device: torch.device, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> Masking:
        if mask is not None:
            return masking_from_mask(mask.to(device))
        if noise is None:
            noise = torch.rand(batch, self.num_units, device=device)
        if getattr(self.encoder, "mask_shared_by_batch", False):
            noise = noise[:1].expand(batch, -1)  # one mask for the batch: the first image's
        return masking_from_noise(noise.to(device), self.mask_ratio)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, loss_only: bool = False) -> LocalMIMOutput:
        """images (B, 3, H, W) normalized; noise (B, L) uniform, or mask (B, L) with 1 = hidden.

        loss_only: decoders predict only the cells the loss weighs, where they can (see
        loss_tokens); the losses and gradients are the same, while preds[k], targets[k] and
        masks[k] hold only the cells out.cells[k] (None: scale k was predicted everywhere).
        """
        masking = self.masking(images.shape[0], images.device, noise, mask)
        unit_px = self.encoder.unit_px
        weights = [mask_at_scale(masking.mask, self.encoder.unit_grid, unit_px / cell) for cell in self.cells_px]
        tokens = self.loss_tokens(weights) if loss_only else [None] * len(weights)
        taps = self.encoder.forward_taps(images, masking.ids_keep, masking.ids_restore)
        preds = [decoder(tap, only=t) for decoder, tap, t in zip(self.decoders, taps, tokens)]
        with torch.no_grad():
            targets = self.target(images)
        kept, masks, losses, cells = [], [], [], []
        for decoder, pred, target, weight, t in zip(self.decoders, preds, targets, weights, tokens):
            # clamp: a mask that hides nothing gives a zero loss rather than 0/0
            total = weight.sum().clamp_min(1e-12)
            at = None if t is None else decoder.cells(t)
            if at is not None:   # the cells left out all weigh zero
                target = target.gather(1, at.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
                weight = weight.gather(1, at)
            per_cell = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, cells)
            losses.append((per_cell * weight).sum() / total)
            kept.append(target)
            masks.append(weight)
            cells.append(at)
        losses_t = torch.stack(losses)
        return LocalMIMOutput(losses_t.sum(), losses_t, preds, kept, masks, masking.mask,
                              masking.ids_restore, cells)

    def loss_tokens(self, weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per decoder, the tokens (B, n) whose cells carry loss weight, raster order, or None
        where the decoder runs in full: it pools (scale < 1), its rows need different counts
        (decoders batch their rows: a user's mask may hide more in one image), or every token
        (or none) is needed."""
        needed = {k: d.tokens_with_weight(w) for k, (d, w) in enumerate(zip(self.decoders, weights))
                  if d.decodes_by_token}
        counts = torch.stack([n.sum(dim=1) for n in needed.values()]).tolist() if needed else []   # one host sync
        tokens: list[torch.Tensor | None] = [None] * len(weights)
        for (k, n), row_counts in zip(needed.items(), counts):
            if len(set(row_counts)) == 1 and 0 < row_counts[0] < n.shape[1]:
                tokens[k] = n.nonzero()[:, 1].reshape(n.shape[0], -1)   # row-major: each row's in order
        return tokens
