"""Maps checkpoints in the published LocalMIM Swin key layout onto our model, and back.

Published (`Swin/models_mim.py`)             ours (LocalMIM with the `swin` encoder)
encoder.patch_embed.*, encoder.layers.*       encoder.patch_embed.*, encoder.layers.*
encoder.norm.K.*                              encoder.tap_norms.K.*
decoder.K.pred.weight (out, width), Linear    decoders.K.pred.0.weight (out, width, 1, 1), 1x1 conv
decoder.K.*                                   decoders.K.*
hog_enc.K.conv.bias (2,)                      target.sobel_bias[K]
Constants the published files carry and ours compute are checked, not loaded: each block's
`attn.relative_position_index` and each HOG layer's Sobel `conv.weight`. Any other key, or any
of ours the file lacks, is refused with the names (published.CheckpointError).
Reading the files (.pth with an allow-list, .safetensors) is published.read_published.
"""

from __future__ import annotations

import re

import torch

from localmim_cli.errors import CheckpointError
from localmim_cli.targets.hog import sobel_kernels


def relative_position_index(window: int) -> torch.Tensor:
    """(ws^2, ws^2) table row of each pair of a window's tokens (row-major), the Swin convention."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)])  # (2, ws^2)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1
    return delta[0] * (2 * window - 1) + delta[1]


def _window_of_table(table: torch.Tensor) -> int:
    return (round(table.shape[0] ** 0.5) + 1) // 2


_RENAMES = [
    (re.compile(r"^encoder\.norm\.(\d+)\.(weight|bias)$"), r"encoder.tap_norms.\1.\2"),
    (re.compile(r"^encoder\.((?:patch_embed|layers)\..*)$"), r"encoder.\1"),
    (re.compile(r"^decoder\.(\d+)\.pred\.(weight|bias)$"), r"decoders.\1.pred.0.\2"),
    (re.compile(r"^decoder\.(\d+)\.(.*)$"), r"decoders.\1.\2"),
]
_INDEX = re.compile(r"^encoder\.(layers\.\d+\.blocks\.\d+\.attn)\.relative_position_index$")
_SOBEL = re.compile(r"^hog_enc\.(\d+)\.conv\.(weight|bias)$")


def from_published_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' keys -> ours. Raises CheckpointError on keys it has no place for or wrong constants."""
    ours: dict[str, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    unknown, wrong = [], []
    for key, value in state.items():
        if m := _INDEX.match(key):
            table = state.get(f"encoder.{m.group(1)}.relative_position_bias_table")
            if table is None or not torch.equal(value.long(), relative_position_index(_window_of_table(table))):
                wrong.append(key)
            continue
        if m := _SOBEL.match(key):
            if m.group(2) == "bias":
                biases[int(m.group(1))] = value
            elif not torch.equal(value.float(), sobel_kernels()):
                wrong.append(key)
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                ours[new] = value.reshape(*value.shape, 1, 1) if new.endswith("pred.0.weight") else value
                break
        else:
            unknown.append(key)
    if unknown or wrong:
        raise CheckpointError(f"not a published LocalMIM Swin state dict: unknown keys {unknown[:10]}"
                              f"{' ...' if len(unknown) > 10 else ''}; constants that differ from the "
                              f"published ones: {wrong[:10]}{' ...' if len(wrong) > 10 else ''}")
    if biases:
        if sorted(biases) != list(range(len(biases))):
            raise CheckpointError(f"HOG biases for scales {sorted(biases)}: expected 0..{len(biases) - 1}")
        ours["target.sobel_bias"] = torch.stack([biases[k] for k in range(len(biases))])
    return ours


def to_published_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the authors' keys, with the constants their files carry (inverse of the above)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "target.sobel_bias":
            for k, pair in enumerate(value):
                out[f"hog_enc.{k}.conv.weight"] = sobel_kernels()
                out[f"hog_enc.{k}.conv.bias"] = pair.clone()
        elif m := re.fullmatch(r"encoder\.tap_norms\.(\d+)\.(weight|bias)", key):
            out[f"encoder.norm.{m.group(1)}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"encoder\.(layers\.\d+\.blocks\.\d+\.attn)\.relative_position_bias_table", key):
            out["encoder." + key[len("encoder."):]] = value
            out[f"encoder.{m.group(1)}.relative_position_index"] = relative_position_index(_window_of_table(value))
        elif key.startswith("encoder."):
            out[key] = value
        elif m := re.fullmatch(r"decoders\.(\d+)\.pred\.0\.(weight|bias)", key):
            out[f"decoder.{m.group(1)}.pred.{m.group(2)}"] = value.flatten(1) if m.group(2) == "weight" else value
        elif m := re.fullmatch(r"decoders\.(\d+)\.(.*)", key):
            out[f"decoder.{m.group(1)}.{m.group(2)}"] = value
        else:
            raise CheckpointError(f"{key} has no place in the published LocalMIM Swin layout")
    return out


def load_published_swin_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a published-layout state dict into a LocalMIM with the swin encoder, every key placed.

    Raises CheckpointError naming the keys when the file and the model do not fit each other
    (a decoder head other than the scale-1 projection, a target without Sobel biases, ...).
    """
    ours = from_published_swin(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    shapes = [f"{k} {tuple(ours[k].shape)} vs {tuple(expected[k].shape)}" for k in set(ours) & set(expected)
              if ours[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"the published Swin weights do not fit the model: missing {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''}, shapes {sorted(shapes)[:5]}")
    model.load_state_dict(ours)
