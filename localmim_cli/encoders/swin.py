"""Swin Transformer that encodes the visible mask units only, tapped after every stage.

As the published LocalMIM Swin (built on GreenMIM): 4-px patches; mask units of 32 px, i.e.
one token of the last stage, so patch merging never crosses a unit border; the encoder sees
only the visible units' tokens, kept unit by unit (each unit's tokens row by row). Windows are
found from token coordinates (swin_groups.py), so hidden tokens are never materialised. After
a patch merging the published code gives tokens other coordinates than their positions
(`published_merged_coords`); option `window_coords` chooses between that and true positions.

Taps: stage k's output after its patch merging (the last stage has none), each behind its own
LayerNorm: widths 2C, 4C, 8C, 8C and strides 8, 16, 32, 32 px for the four stages.

Parameter names follow the published checkpoints without their `encoder.` prefix (`layers.N`
with each stage's merge at its end; `tap_norms.K` for the published `norm.K`), so importing one
is a rename (published_swin.py); `to_timm()` maps them onto timm's layout.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from localmim_cli.encoders.base import ENCODER_API_VERSION, MaskedEncoder, TapInfo, TapOutput
from localmim_cli.encoders.swin_options import SWIN_ARCHS, SWIN_SUMMARY, SwinOptions  # noqa: F401  (re-exported)
from localmim_cli.encoders.swin_blocks import SwinStage
from localmim_cli.encoders.swin_groups import visible_groups, window_partition
from localmim_cli.model.masking import unit_major_restore
from localmim_cli.plugins.api import EncoderPlugin


class SwinPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, C): a p x p convolution with stride p, then a LayerNorm."""

    def __init__(self, patch_size: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


def unit_token_coords(ids_keep: torch.Tensor, unit_grid: tuple[int, int], per_side: int) -> torch.Tensor:
    """(L, n_keep) visible units -> (L, n_keep * per_side^2, 2) (row, col) of their tokens on the
    grid per_side times finer than the units, unit by unit, each unit row by row."""
    inner = torch.arange(per_side, device=ids_keep.device)
    rows = (ids_keep // unit_grid[1])[:, :, None, None] * per_side + inner[:, None]
    cols = (ids_keep % unit_grid[1])[:, :, None, None] * per_side + inner[None, :]
    rows, cols = torch.broadcast_tensors(rows, cols)  # (L, n_keep, per_side, per_side)
    return torch.stack([rows, cols], dim=-1).reshape(ids_keep.shape[0], -1, 2)


def published_merged_coords(ids_keep: torch.Tensor, unit_grid: tuple[int, int], per_side: int) -> torch.Tensor:
    """The coordinates the published pretraining code gives tokens after a patch merging.

    It keeps tokens unit by unit but takes their coordinates from a raster-ordered grid: a
    token's coordinates are its index in the unit-major order of the whole grid (all units,
    each row by row) read as a raster index. Windows at stages 2-4 are formed on these; the
    published checkpoints were trained so (the conformance cards confirm it to 1e-6). Where a
    unit is one token (the last stage) both readings agree.
    (L, n_keep) -> (L, n_keep * per_side^2, 2)
    """
    inner = torch.arange(per_side * per_side, device=ids_keep.device)
    index = (ids_keep[:, :, None] * per_side**2 + inner).reshape(ids_keep.shape[0], -1)
    width = unit_grid[1] * per_side
    return torch.stack([index // width, index % width], dim=-1)


class MaskedSwin(MaskedEncoder):
    tap_unit = "stage"
    n_prefix = 0
    # Published: one mask per batch (GreenMIM-style); LocalMIM draws it from the first image's
    # noise. Different masks per image work too, at the cost of one window layout per image.
    mask_shared_by_batch = True

    def __init__(self, options: SwinOptions, img_size: int, tap_layers: list[int],
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        n_stages = len(options.depths)
        patch = options.patch_size
        self.unit_px = patch * 2 ** (n_stages - 1)  # one token of the last stage
        if img_size % self.unit_px:
            raise ValueError(f"image size {img_size} is not divisible by the swin mask unit of {self.unit_px} px "
                             f"({patch} px patches merged {n_stages - 1} times)")
        bad = [t for t in tap_layers if not 1 <= t <= n_stages]
        if bad:
            raise ValueError(f"taps {bad} are outside the swin stages 1..{n_stages} (swin taps are stage numbers)")
        if sorted(set(tap_layers)) != list(tap_layers):
            raise ValueError(f"taps must be increasing and distinct stage numbers, got {tap_layers}")
        self.options = options
        self.img_size = img_size
        self.layer_norm_eps = layer_norm_eps
        self.unit_grid = (img_size // self.unit_px, img_size // self.unit_px)
        self.tap_layers = list(tap_layers)
        self.patch_grid = img_size // patch
        # Stages above the highest tap would get no gradient in pretraining: they are not built.
        n_built = self.tap_layers[-1]
        # A tap sits after its stage's patch merging (the last stage has none): 2C, 4C, 8C, 8C wide.
        scales = [2 ** min(t, n_stages - 1) for t in self.tap_layers]
        self.taps = [TapInfo(options.embed_dim * s, patch * s) for s in scales]

        self.patch_embed = SwinPatchEmbed(patch, options.embed_dim, layer_norm_eps)
        # On the CPU whatever the default device: the rates are plain numbers (and the model
        # can then be laid out on the meta device to count or plan it without memory).
        rates = torch.linspace(0, options.drop_path, sum(options.depths), device="cpu").tolist()
        first = [sum(options.depths[:k]) for k in range(n_stages)]
        self.layers = nn.ModuleList(
            SwinStage(options.stage_dim(k), self.patch_grid // 2**k, options.depths[k], options.num_heads[k],
                      options.window_size, options.mlp_ratio, options.qkv_bias,
                      rates[first[k]: first[k] + options.depths[k]], layer_norm_eps, downsample=k < n_stages - 1)
            for k in range(n_built)
        )
        self.tap_norms = nn.ModuleList(nn.LayerNorm(tap.channels, eps=layer_norm_eps) for tap in self.taps)
        self.apply(_init_weights)

    def forward_taps(self, images, ids_keep, ids_restore):
        batch = images.shape[0]
        # One window layout serves the batch when every image hides the same units (one host
        # sync per forward); otherwise each image gets its own.
        shared = batch == 1 or torch.equal(ids_keep, ids_keep[:1].expand_as(ids_keep))
        layout_ids = ids_keep[:1] if shared else ids_keep
        side = self.unit_px // self.options.patch_size  # tokens per unit side at this stage
        x = self.patch_embed(images)  # (B, H, W, C)
        x = x.reshape(batch, self.unit_grid[0], side, self.unit_grid[1], side, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, -1, side * side, x.shape[-1])  # (B, units, side^2, C), raster units
        x = torch.gather(x, 1, ids_keep[:, :, None, None].expand(-1, -1, *x.shape[2:]))
        x = x.reshape(batch, -1, x.shape[-1])  # (B, n_keep * side^2, C), unit by unit
        outputs = []
        published = self.options.window_coords == "published"
        for k, stage in enumerate(self.layers):
            place = published_merged_coords if published and k > 0 else unit_token_coords
            coords = place(layout_ids, self.unit_grid, side)
            grid = (self.unit_grid[0] * side, self.unit_grid[1] * side)
            x = stage(x, lambda window, shift: visible_groups(coords, grid, window, shift))
            if stage.downsample is not None:
                x = stage.downsample(x, (side, side))
                side //= 2
            if k + 1 in self.tap_layers:
                i = self.tap_layers.index(k + 1)
                restore = unit_major_restore(ids_restore, self.unit_grid, side)
                outputs.append(TapOutput(self.tap_norms[i](x), 0, (self.unit_grid[0] * side,
                                                                   self.unit_grid[1] * side), restore))
        return outputs

    def forward_features(self, images):
        """All tokens, ordinary shifted windows; the last tap's norm on every token, then their
        mean. (The published fine-tuning model pools first and then applies a new LayerNorm;
        timm's Swin, which finetune and export go through, can only norm, then pool, so the
        pretrained last tap norm is used in that order here and in to_timm().)"""
        x = self.patch_embed(images)
        side = x.shape[1]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H*W, C) raster
        for stage in self.layers:
            grid = (side, side)
            x = stage(x, lambda window, shift: window_partition(grid, window, shift, x.device))
            if stage.downsample is not None:
                x = stage.downsample(x, grid)
                side //= 2
        return self.tap_norms[-1](x).mean(dim=1)

    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments AdamW leaves undecayed across the whole LocalMIM model (encoder and
        decoders), besides biases and norms: the published Swin pretraining exempts every name
        containing 'position_bias' (the relative-position bias tables) or 'token' (the decoders'
        mask tokens)."""
        return {"position_bias", "token"}

    def to_timm(self) -> nn.Module:
        """A timm SwinTransformer (num_classes=0) with these weights (see swin_timm.py)."""
        from localmim_cli.encoders.swin_timm import to_timm_swin

        return to_timm_swin(self)


def _init_weights(m: nn.Module) -> None:
    # Published (GreenMIM) initialisation: linears trunc-normal(0.02) with zero bias, unit norms;
    # the patch convolution keeps PyTorch's default, the bias tables their own trunc-normal.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_swin(options: SwinOptions, img_size: int, tap_layers: list[int] | None) -> MaskedSwin:
    return MaskedSwin(options, img_size, tap_layers or list(range(1, len(options.depths) + 1)))


plugin = EncoderPlugin(
    name="swin",
    api_version=ENCODER_API_VERSION,
    options=SwinOptions,
    build=build_swin,
    summary=SWIN_SUMMARY,
)
