"""A transformer block's output at a few rows only, with the block's own weights.

Rows that nothing reads afterwards need no query, no attention row, no projection, no residual
and no MLP; every row still gives its key and value, so the rows computed equal the full block's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def block_at_rows(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """block(x) at `rows` of each sequence: x (B, N, D), rows (B, n) indices -> (B, n, D)."""
    attn = block.attn
    batch, n_all, dim = x.shape
    n = rows.shape[1]
    heads, head_dim = attn.num_heads, attn.head_dim
    at = rows.unsqueeze(-1).expand(-1, -1, dim)
    x_rows = x.gather(1, at)
    y = block.norm1(x)
    w_q, w_kv = attn.qkv.weight.split([attn.attn_dim, 2 * attn.attn_dim])
    b_q, b_kv = attn.qkv.bias.split([attn.attn_dim, 2 * attn.attn_dim]) if attn.qkv.bias is not None else (None, None)
    q = F.linear(y.gather(1, at), w_q, b_q).reshape(batch, n, heads, head_dim).transpose(1, 2)
    k, v = F.linear(y, w_kv, b_kv).reshape(batch, n_all, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))))
    x_rows = x_rows + block.drop_path1(block.ls1(out))
    return x_rows + block.drop_path2(block.ls2(block.mlp(block.norm2(x_rows))))
