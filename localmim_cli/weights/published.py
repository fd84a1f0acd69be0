"""Published checkpoints: reading the files safely, and the authors' LocalMIM ViT key layout.

Published `.pth` files are `{"model": state_dict, "args": argparse.Namespace, ...}`. They are
read with `torch.load(weights_only=True)` and an allow-list holding `argparse.Namespace` alone:
nothing else in the file can run code while loading, and a file that needs anything more is
refused with a message naming what it wanted. The Swin layout's keys are in published_swin.py;
which layout a file holds is told by locate.py.

A ViT file holds its sizes in its tensors' shapes except the attention heads (and, for LocalMIM,
which layers its tap norms sit on): `published_vit_dims` reads them all, once, for every caller.
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice
from localmim_cli.encoders.vit import VIT_ARCHS, default_vit_taps
from localmim_cli.errors import CheckpointError
from localmim_cli.weights.loading import KeyReport, check_finite, compare, read_safetensors

SAFE_GLOBALS = [argparse.Namespace]


def read_published(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in the authors' layout, the run's args as a dict, or {} when absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_safetensors(path), {}
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first line is generic advice; the global the file wanted comes later
        wanted = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f"it wants {wanted.group(1)}" if wanted else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: the file holds a pickled object outside the allow-list "
            f"(only tensors, plain containers and argparse.Namespace are read). Details: "
            f"{detail}") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    state = obj.get("model", obj)
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    check_finite(state, path)
    return state, args


# ---------------------------------------------------------------------------------------------
# A ViT's sizes, read off its tensors


VIT_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight")


@dataclass(frozen=True)
class PublishedViT:
    """The architecture of a ViT in timm's/MAE's names (a published LocalMIM or MAE file)."""

    embed_dim: int
    depth: int
    patch_size: int
    img_size: int
    num_heads: int
    heads_guessed: bool        # neither the file's model name nor a published width said
    mlp_ratio: float
    qkv_bias: bool
    taps: list[int] | None     # 1-indexed layers of LocalMIM's tap norms; None: no tap norms


def heads_for(embed_dim: int, model_name: str) -> tuple[int, bool]:
    """(attention heads, guessed) of a ViT whose weights cannot say: the named size's heads
    ("MIM_vit_base_patch16" -> 12) where they divide the width, else those of the size with
    this width, else 64-wide heads (every size but huge has them) as a guess."""
    name = model_name.lower()
    for arch, (_, _, heads) in VIT_ARCHS.items():
        if arch.removeprefix("vit_") in name and embed_dim % heads == 0:
            return heads, False
    same_width = [heads for width, _, heads in VIT_ARCHS.values() if width == embed_dim]
    return (same_width[0] if same_width else max(1, embed_dim // 64)), True


def key_indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """The numbers that group 1 of `pattern` matches in the state's keys, sorted, each once."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def published_vit_dims(state: dict[str, torch.Tensor], args: dict, source: Path | str = "") -> PublishedViT:
    """Every size of a ViT file; taps from its args.ID (0-indexed blocks) or the published rule."""
    missing = [k for k in VIT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a ViT checkpoint in the published LocalMIM/MAE layout "
                              f"(no {', '.join(missing)})")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(key_indices(state, r"^blocks\.(\d+)\."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    side = round((state["pos_embed"].shape[1] - 1) ** 0.5)  # pos_embed (1, 1 + side^2, C)
    heads, guessed = heads_for(dim, str(args.get("model", "")))
    n_taps = len(key_indices(state, r"^norm\.(\d+)\.weight$"))
    taps = None
    if n_taps:
        taps = [int(t) + 1 for t in args.get("ID") or []] or default_vit_taps(depth)[-n_taps:]
        if len(taps) != n_taps or len(set(taps)) != n_taps or not all(1 <= t <= depth for t in taps):
            raise CheckpointError(f"{source}: cannot tell which layers its {n_taps} tap norms sit on "
                                  f"(depth {depth}, args.ID {args.get('ID')})")
    return PublishedViT(dim, depth, patch, side * patch, heads, guessed,
                        state["blocks.0.mlp.fc1.weight"].shape[0] / dim, "blocks.0.attn.qkv.bias" in state, taps)


# ---------------------------------------------------------------------------------------------
# The LocalMIM ViT layout


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    """The authors' LocalMIM ViT pretraining layout: tap norms norm.K and decoders decoder.K."""
    return "norm.0.weight" in state and "cls_token" in state and any(k.startswith("decoder.0.") for k in state)


_RULES = [
    (re.compile(r"^(cls_token|pos_embed|patch_embed\..*|blocks\..*)$"), r"encoder.\1"),
    (re.compile(r"^norm\.(\d+)\.(weight|bias)$"), r"encoder.tap_norms.\1.\2"),
    (re.compile(r"^decoder\.(\d+)\.(.*)$"), r"decoders.\1.\2"),
    (re.compile(r"^hog_enc\.(\d+)\.conv\.bias$"), r"target.sobel_bias.\1"),
]


def to_our_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys; the fixed Sobel weights are dropped (ours are constants), per-scale Sobel
    biases are stacked into the target's (S, 2) buffer."""
    ours: dict[str, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        if re.match(r"^hog_enc\.\d+\.conv\.weight$", key):
            continue
        for pattern, repl in _RULES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                if new.startswith("target.sobel_bias."):
                    biases[int(new.rsplit(".", 1)[1])] = value
                else:
                    ours[new] = value
                break
        else:
            ours[key] = value  # left as is, so it is reported as unexpected by name
    if biases:
        ours["target.sobel_bias"] = torch.stack([biases[k] for k in sorted(biases)])
    return ours


def settings_from_published(state: dict[str, torch.Tensor], args: dict, source: Path | str = "") -> ModelSettings:
    """Model settings that reproduce a published LocalMIM ViT's architecture."""
    try:
        return _settings(state, args, source)
    except (KeyError, IndexError) as exc:   # a tensor the layout has was not in the file
        raise CheckpointError(f"{source}: not a complete published LocalMIM ViT (no {exc})") from None


def _settings(state: dict[str, torch.Tensor], args: dict, source: Path | str) -> ModelSettings:
    vit = published_vit_dims(state, args, source)
    if vit.taps is None:
        raise CheckpointError(f"{source}: a ViT without LocalMIM tap norms (norm.K) has no decoders to rebuild")
    dec_width = state["decoder.0.embed.weight"].shape[0]
    dec_depth = 1 + max(key_indices(state, r"^decoder\.0\.blocks\.(\d+)\."))
    out_dims, scales = [], []
    for k in range(len(vit.taps)):
        convs = key_indices(state, rf"^decoder\.{k}\.pred\.(\d+)\.weight$")
        out_dims.append(state[f"decoder.{k}.pred.{convs[-1]}.weight"].shape[0])
        n_up = sum(1 for i in convs[:-1] if state[f"decoder.{k}.pred.{i}.weight"].dim() == 4)
        pooled = convs == [1]  # AvgPool at index 0 then the 1x1 conv
        scales.append(0.5 if pooled else float(2**n_up))
    return ModelSettings(
        encoder=PluginChoice(name="vit", options={
            "arch": None, "patch_size": vit.patch_size, "embed_dim": vit.embed_dim, "depth": vit.depth,
            "num_heads": vit.num_heads, "mlp_ratio": vit.mlp_ratio, "qkv_bias": vit.qkv_bias}),
        target=PluginChoice(name="hog", options={"nbins": out_dims[0] // 3,
                                                 "bias": any(k.endswith("conv.bias") for k in state)}),
        img_size=vit.img_size,
        taps=vit.taps,
        scales=scales,
        # Decoder heads are not in the weights either: the published decoders have 32-wide heads.
        decoder=DecoderSettings(width=dec_width, depth=dec_depth, num_heads=max(1, dec_width // 32),
                                mlp_ratio=state["decoder.0.blocks.0.mlp.fc1.weight"].shape[0] / dec_width),
    )


def load_published_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> KeyReport:
    """Load an authors'-layout state dict when every key fits; the report says what did not
    (`raise_if_incomplete(path)` to refuse)."""
    ours = to_our_keys(state)
    report = compare(model, ours)
    if not report:
        model.load_state_dict(ours)
    return report
