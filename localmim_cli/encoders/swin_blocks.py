"""Swin's parts that see tokens as a flat sequence: window attention, block, patch merging, stage.

Which tokens attend to which comes in as a `WindowGroups` (swin_groups.py), so the same
modules run the masked pretraining forward (visible tokens only) and the unmasked one.
Parameter names are those of the published checkpoints and of timm's Swin (`norm1`, `attn.qkv`,
`attn.relative_position_bias_table`, `mlp.fc1`, `downsample.reduction`, ...).
"""

from __future__ import annotations

from typing import Callable

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.nn import functional as F

from localmim_cli.encoders.swin_groups import WindowGroups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           fused: bool) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over (B, K, h, S, d); bias (L, K, h, S, S), L = 1 or B.

    fused (GPUs): scaled_dot_product_attention, whose kernels never store the attention matrix
    for the backward pass; it scales q @ k rather than q, a difference of rounding only.
    Otherwise the published order, (q * scale) @ k then bias: the same rounding as the
    checkpoints saw, which the conformance tests check on CPUs.
    """
    if not fused:
        attn = (q * scale) @ k.transpose(-2, -1) + bias
        return attn.softmax(dim=-1) @ v
    shape = q.shape

    def flat(t: torch.Tensor) -> torch.Tensor:   # (B*K, h, S, .): the kernels take 4-D inputs
        return t.reshape(-1, *t.shape[2:])
    mask = flat(bias.to(q.dtype).expand(shape[0], -1, -1, -1, -1))
    return F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=scale).reshape(shape)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # one learned bias per head for each relative offset (dy, dx) in [-(ws-1), ws-1]^2
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
        batch, _, chans = x.shape
        qkv = groups.pack(self.qkv(x))  # (B, K, S, 3C)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(3, 0, 1, 4, 2, 5)  # 3 x (B, K, h, S, d)
        bias = groups.attention_bias(self.relative_position_bias_table)  # (L, K, h, S, S), L = 1 or B
        x = attend(q, k, v, bias, self.scale, fused=x.is_cuda)  # (B, K, h, S, d)
        x = x.transpose(2, 3).reshape(batch, groups.groups, groups.size, chans)
        return self.proj(groups.unpack(x))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), groups))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood -> one token of twice the width.

    Tokens come as consecutive blocks of h x w raster-ordered tokens (one block per mask unit in
    pretraining, one block for a whole grid unmasked); merging stays inside a block, so a
    visible mask unit never needs a hidden neighbour. The 4 neighbours are concatenated in the
    published pretraining order (row, col) = (0,0), (0,1), (1,0), (1,1).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        """(B, n * h * w, C) -> (B, n * h/2 * w/2, 2C)"""
        batch, _, chans = x.shape
        h, w = block
        x = x.reshape(batch, -1, h // 2, 2, w // 2, 2, chans).permute(0, 1, 2, 4, 3, 5, 6)
        return self.reduction(self.norm(x.reshape(batch, -1, 4 * chans)))


class SwinStage(nn.Module):
    """Blocks alternating plain and shifted windows, then (all stages but the last) a merge.

    As published (and in timm): a stage whose grid fits in one window uses that grid as its
    single window, unshifted; the bias table is sized for the window actually used.
    """

    def __init__(self, dim: int, grid_side: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: list[float], eps: float, downsample: bool):
        super().__init__()
        fits = grid_side <= window_size
        self.window_size = grid_side if fits else window_size
        self.shift_size = 0 if fits else window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, self.window_size, mlp_ratio, qkv_bias, drop_path[i], eps)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, eps) if downsample else None

    def forward(self, x: torch.Tensor, make_groups: Callable[[int, int], WindowGroups]) -> torch.Tensor:
        """x (B, N, C); make_groups(window, shift) lays out these N tokens. Merging is the caller's."""
        plain = make_groups(self.window_size, 0)
        shifted = make_groups(self.window_size, self.shift_size) if self.shift_size else plain
        for i, block in enumerate(self.blocks):
            x = block(x, shifted if i % 2 else plain)
        return x
