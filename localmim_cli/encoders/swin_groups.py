"""Which tokens attend to which in a Swin block, for any subset of a token grid.

Swin attends within windows of ws x ws tokens; the shifted blocks move the window grid by
`shift` tokens. Windows are found from each token's (row, col) coordinates, so the tokens may
be any subset of the grid in any order (the visible tokens of a masked image) and no cyclic
roll is needed: a window cut by the image border is simply a smaller window.

Tokens are laid into K groups of S slots each; attention runs inside a group, with an additive
-100 between slots of different windows (and on padding slots) and the relative position bias
only between slots of the same window, as the published LocalMIM/GreenMIM Swin computes it.
exp(-100) is below float32 resolution next to any in-window weight, so how windows share a
group does not change the result; three layouts are used:

- one group of all tokens (the published "masking" mode, for at most 2 * ws^2 tokens);
- packed groups (the published "grouping" mode packs windows by a knapsack on the host; here
  windows are packed in window order on the device, no host round trip): with tokens sorted
  by window, a window starting at sorted position p goes to group p // ws^2 and, since no window
  holds more than ws^2 tokens, every group fits in S = 2 * ws^2 slots, K = ceil(N / ws^2);
- one group per window of a full grid (the unmasked forward), S = ws^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Published additive attention mask between tokens of different windows (not -inf: a padding
# slot's row is then all -100 and its softmax stays finite).
CROSS_WINDOW = -100.0


@dataclass
class WindowGroups:
    """Tokens laid into `groups` groups of `size` slots.

    L is 1 when every image of the batch has the same layout, else the batch size.
    index:  (L, K*S) token in each slot (padding slots repeat token 0; their outputs are dropped)
    slot:   (L, N)   slot of each token
    rel:    (L, K, S, S) row of the relative position table for each pair (0 when not `same`)
    same:   (L, K, S, S) both slots hold tokens of the same window
    """

    groups: int
    size: int
    index: torch.Tensor
    slot: torch.Tensor
    rel: torch.Tensor
    same: torch.Tensor

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, K, S, C)"""
        batch, _, chans = x.shape
        if self.index.shape[0] == 1:
            x = x.index_select(1, self.index[0])
        else:
            x = torch.gather(x, 1, self.index.unsqueeze(-1).expand(-1, -1, chans))
        return x.reshape(batch, self.groups, self.size, chans)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, S, C) -> (B, N, C), padding slots dropped"""
        batch, chans = x.shape[0], x.shape[-1]
        x = x.reshape(batch, -1, chans)
        if self.slot.shape[0] == 1:
            return x.index_select(1, self.slot[0])
        return torch.gather(x, 1, self.slot.unsqueeze(-1).expand(-1, -1, chans))

    def attention_bias(self, table: torch.Tensor) -> torch.Tensor:
        """(L, K, heads, S, S): the relative position bias within windows, -100 across them."""
        bias = table[self.rel].permute(0, 1, 4, 2, 3)  # (L, K, S, S, h) -> (L, K, h, S, S)
        return torch.where(self.same.unsqueeze(2), bias, bias.new_tensor(CROSS_WINDOW))


def window_ids(coords: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(..., 2) token (row, col) -> (...) id of its window; ids grow in raster order of windows.

    Shifting the windows by `shift` tokens is the same as shifting the coordinates by
    window - shift: window borders then fall on rows and columns = shift (mod window).
    """
    offset = (window - shift) % window
    cols = (grid[1] - 1 + offset) // window + 1  # windows per row of the grid
    cell = torch.div(coords + offset, window, rounding_mode="floor")
    return cell[..., 0] * cols + cell[..., 1]


def _layout(coords: torch.Tensor, window_of: torch.Tensor, slot: torch.Tensor, groups: int, size: int,
            window: int) -> WindowGroups:
    """Fill the slots. coords (L, N, 2), window_of (L, N), slot (L, N) distinct slots < groups * size."""
    n_layouts, n_tokens = window_of.shape
    device = coords.device
    tokens = torch.arange(n_tokens, device=device).expand(n_layouts, -1)
    index = torch.zeros(n_layouts, groups * size, dtype=torch.long, device=device).scatter_(1, slot, tokens)
    slot_window = torch.full((n_layouts, groups * size), -1, dtype=torch.long, device=device)
    slot_window.scatter_(1, slot, window_of)
    slot_window = slot_window.reshape(n_layouts, groups, size)
    slot_coords = torch.gather(coords, 1, index.unsqueeze(-1).expand(-1, -1, 2))
    slot_coords = slot_coords.reshape(n_layouts, groups, size, 2)
    same = (slot_window.unsqueeze(-1) == slot_window.unsqueeze(-2)) & (slot_window >= 0).unsqueeze(-1)
    # Relative position (dy, dx) in [-(ws-1), ws-1]^2 within a window -> row of the (2ws-1)^2 table.
    delta = slot_coords.unsqueeze(3) - slot_coords.unsqueeze(2) + (window - 1)  # (L, K, S, S, 2)
    rel = delta[..., 0] * (2 * window - 1) + delta[..., 1]
    rel = torch.where(same, rel, torch.zeros_like(rel))
    return WindowGroups(groups, size, index, slot, rel, same)


def one_group(coords: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> WindowGroups:
    """All N tokens in one group, windows kept apart by the mask (published "masking" mode)."""
    n_layouts, n_tokens = coords.shape[:2]
    slot = torch.arange(n_tokens, device=coords.device).expand(n_layouts, -1)
    return _layout(coords, window_ids(coords, grid, window, shift), slot, 1, n_tokens, window)


def packed_groups(coords: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> WindowGroups:
    """Whole windows packed into ceil(N / ws^2) groups of 2 * ws^2 slots (module docstring)."""
    n_layouts, n_tokens = coords.shape[:2]
    area = window * window
    groups = math.ceil(n_tokens / area)
    window_of = window_ids(coords, grid, window, shift)  # (L, N)
    order = torch.argsort(window_of, dim=1, stable=True)  # tokens sorted by window
    sorted_window = torch.gather(window_of, 1, order)
    position = torch.arange(n_tokens, device=coords.device).expand(n_layouts, -1)
    starts = torch.ones_like(sorted_window, dtype=torch.bool)
    starts[:, 1:] = sorted_window[:, 1:] != sorted_window[:, :-1]
    window_start = torch.cummax(torch.where(starts, position, 0), dim=1).values  # where each window begins
    group = torch.div(window_start, area, rounding_mode="floor")
    sorted_slot = group * (2 * area) + position - group * area  # < group * 2ws^2 + 2ws^2
    slot = torch.empty_like(sorted_slot).scatter_(1, order, sorted_slot)
    return _layout(coords, window_of, slot, groups, 2 * area, window)


def visible_groups(coords: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> WindowGroups:
    """The published choice: one group for at most 2 * ws^2 tokens, packed groups above."""
    if coords.shape[1] <= 2 * window * window:
        return one_group(coords, grid, window, shift)
    return packed_groups(coords, grid, window, shift)


def grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(1, H*W, 2) (row, col) of every cell, raster order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).unsqueeze(0)


def window_partition(grid: tuple[int, int], window: int, shift: int,
                     device: torch.device | None = None) -> WindowGroups:
    """Every token of a full grid in raster order, one group per (possibly border-cut) window."""
    coords = grid_coords(grid, device)
    offset = (window - shift) % window
    window_of = window_ids(coords, grid, window, shift)
    inside = (coords + offset) % window  # (row, col) within the window
    slot = window_of * window * window + inside[..., 0] * window + inside[..., 1]
    n_windows = ((grid[0] - 1 + offset) // window + 1) * ((grid[1] - 1 + offset) // window + 1)
    return _layout(coords, window_of, slot, n_windows, window * window, window)
