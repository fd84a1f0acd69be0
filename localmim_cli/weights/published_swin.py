"""Maps checkpoints in the published LocalMIM Swin key layout onto our model, and back.

Published (`Swin/models_mim.py`)             ours (LocalMIM with the `swin` encoder)
encoder.patch_embed.*, encoder.layers.*       encoder.patch_embed.*, encoder.layers.*
encoder.norm.K.*                              encoder.tap_norms.K.*
decoder.K.pred.weight (out, width), Linear    decoders.K.pred.0.weight (out, width, 1, 1), 1x1 conv
decoder.K.*                                   decoders.K.*
hog_enc.K.conv.bias (2,)                      target.sobel_bias[K]
Constants the published files carry and ours compute are checked, not loaded: each block's
`attn.relative_position_index` and each HOG layer's Sobel `conv.weight`. Any other key, or any
of ours the file lacks, is refused with the names (CheckpointError).
Reading the files (.pth with an allow-list, .safetensors) is published.read_published; the
model settings a file was trained with are read off its tensors by `settings_from_published_swin`.
"""

from __future__ import annotations

import re

import torch

from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice
from localmim_cli.errors import CheckpointError
from localmim_cli.targets.hog import sobel_kernels
from localmim_cli.weights.loading import load_exactly
from localmim_cli.weights.published import key_indices

# The published Swin decoders' heads (decoder_num_heads, every size); the weights do not hold them.
PUBLISHED_DECODER_HEADS = 4


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


def load_published_swin_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load a published-layout state dict into a LocalMIM with the swin encoder, every key placed.

    Raises CheckpointError naming the keys when the file and the model do not fit each other
    (a decoder head other than the scale-1 projection, a target without Sobel biases, ...).
    """
    load_exactly(model, from_published_swin(state), source or "the published Swin weights")


def is_published_swin(state: dict[str, torch.Tensor]) -> bool:
    """The authors' LocalMIM Swin pretraining layout: encoder.layers, tap norms encoder.norm.K, decoder.K."""
    return "encoder.norm.0.weight" in state and any(k.startswith("encoder.layers.") for k in state) \
        and any(k.startswith("decoder.0.") for k in state)


def settings_from_published_swin(state: dict[str, torch.Tensor], args: dict, source: str = "") -> ModelSettings:
    """Model settings that reproduce a published LocalMIM Swin, read off its tensors: a tap after
    every stage, Linear decoder heads (scale 1); HOG when the file has Sobel layers, else pixels
    (normalized unless its args say norm_pix_loss=False)."""
    try:
        return _settings(state, args, source)
    except (KeyError, IndexError) as exc:   # a tensor the layout has was not in the file
        raise CheckpointError(f"{source}: not a complete published LocalMIM Swin (no {exc})") from None


def _settings(state: dict[str, torch.Tensor], args: dict, source: str) -> ModelSettings:
    n_stages = len(key_indices(state, r"^encoder\.layers\.(\d+)\."))
    n_taps = len(key_indices(state, r"^encoder\.norm\.(\d+)\.weight$"))
    if n_taps != n_stages:
        raise CheckpointError(f"{source}: {n_taps} tap norms for {n_stages} stages; published Swin files "
                              "tap every stage")
    depths = [len(key_indices(state, rf"^encoder\.layers\.{k}\.blocks\.(\d+)\.")) for k in range(n_stages)]
    # relative_position_bias_table: ((2 ws - 1)^2, heads)
    tables = [state[f"encoder.layers.{k}.blocks.0.attn.relative_position_bias_table"] for k in range(n_stages)]
    patch_weight = state["encoder.patch_embed.proj.weight"]  # (C, 3, p, p)
    dim, patch = patch_weight.shape[0], patch_weight.shape[-1]
    unit_px = patch * 2 ** (n_stages - 1)   # the last stage's token, which the last decoder's grid counts
    last_grid = state[f"decoder.{n_taps - 1}.pos_embed"].shape[1]
    widths = [state[f"decoder.{k}.embed.weight"].shape[0] for k in range(n_taps)]
    out_dims = [state[f"decoder.{k}.pred.weight"].shape[0] for k in range(n_taps)]
    if any(k.startswith("hog_enc.") for k in state):
        target = PluginChoice(name="hog", options={"nbins": out_dims[0] // 3,
                                                   "bias": "hog_enc.0.conv.bias" in state})
    else:
        target = PluginChoice(name="pixel", options={"normalize": bool(args.get("norm_pix_loss", True))})
    fc1 = state["encoder.layers.0.blocks.0.mlp.fc1.weight"]
    dec_fc1 = state["decoder.0.blocks.0.mlp.fc1.weight"]
    return ModelSettings(
        encoder=PluginChoice(name="swin", options={
            "arch": None, "patch_size": patch, "embed_dim": dim, "depths": depths,
            "num_heads": [t.shape[1] for t in tables], "window_size": _window_of_table(tables[0]),
            "mlp_ratio": fc1.shape[0] / dim, "qkv_bias": "encoder.layers.0.blocks.0.attn.qkv.bias" in state}),
        target=target,
        img_size=round(last_grid ** 0.5) * unit_px,
        taps=list(range(1, n_taps + 1)),
        scales=[1.0] * n_taps,
        decoder=DecoderSettings(
            width=widths[0] if len(set(widths)) == 1 else widths,
            depth=len(key_indices(state, r"^decoder\.0\.blocks\.(\d+)\.")),
            num_heads=int(args.get("decoder_num_heads") or PUBLISHED_DECODER_HEADS),
            mlp_ratio=dec_fc1.shape[0] / widths[0]),
    )
