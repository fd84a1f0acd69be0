"""Reads checkpoints in the published LocalMIM ViT key layout and maps them onto our model.

Published `.pth` files are `{"model": state_dict, "args": argparse.Namespace, ...}`. They are
read with `torch.load(weights_only=True)` and an allow-list holding `argparse.Namespace` alone:
nothing else in the file can run code while loading, and a file that needs anything more is
refused with a message naming what it wanted.
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice
from localmim_cli.errors import CheckpointError

SAFE_GLOBALS = [argparse.Namespace]




@dataclass
class ImportReport:
    missing: list[str] = field(default_factory=list)      # ours, not in the file
    unexpected: list[str] = field(default_factory=list)   # in the file, not placed anywhere

    def raise_if_incomplete(self, path: Path | str) -> None:
        if self.missing or self.unexpected:
            raise CheckpointError(f"{path}: keys do not match the model: missing {self.missing[:10]}"
                                  f"{' ...' if len(self.missing) > 10 else ''}, unexpected "
                                  f"{self.unexpected[:10]}{' ...' if len(self.unexpected) > 10 else ''}")


def read_published(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in the authors' layout, the run's args as a dict, or {} when absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_file(str(path)), {}
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
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, args


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    return "norm.0.weight" in state and any(k.startswith("decoder.0.") for k in state)


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


def settings_from_published(state: dict[str, torch.Tensor], args: dict) -> ModelSettings:
    """Model settings that reproduce a published checkpoint's architecture, read off its shapes."""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    n_patches = state["pos_embed"].shape[1] - 1
    side = round(n_patches**0.5)
    n_taps = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("norm."))
    dec_width = state["decoder.0.embed.weight"].shape[0]
    dec_depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("decoder.0.blocks."))
    # Heads are not in the weights: take them from the published model name, else 64-wide heads.
    heads = {"small": 6, "base": 12, "large": 16, "huge": 16}
    name = str(args.get("model", ""))
    num_heads = next((h for size, h in heads.items() if size in name), max(1, dim // 64))
    out_dims = []
    scales = []
    for k in range(n_taps):
        convs = sorted(int(m.group(1)) for key in state
                       if (m := re.match(rf"^decoder\.{k}\.pred\.(\d+)\.weight$", key)))
        last = state[f"decoder.{k}.pred.{convs[-1]}.weight"]
        out_dims.append(last.shape[0])
        n_up = sum(1 for i in convs if state[f"decoder.{k}.pred.{i}.weight"].dim() == 4
                   and i != convs[-1])
        pooled = convs[0] == 1 and len(convs) == 1  # AvgPool at index 0 then the 1x1 conv
        scales.append(0.5 if pooled else float(2**n_up))
    nbins = out_dims[0] // 3
    taps = [int(t) + 1 for t in args.get("ID", [])] or [2, 4, depth - 2, depth][-n_taps:]
    if len(set(taps)) != len(taps):
        raise CheckpointError(f"cannot tell which layers the {n_taps} decoders of this depth-{depth} "
                              "checkpoint were attached to (no ID in its args)")
    return ModelSettings(
        encoder=PluginChoice(name="vit", options={
            "arch": None, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": num_heads,
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim}),
        target=PluginChoice(name="hog", options={"nbins": nbins,
                                                 "bias": any(k.endswith("conv.bias") for k in state)}),
        img_size=side * patch,
        taps=taps,
        scales=scales,
        decoder=DecoderSettings(width=dec_width, depth=dec_depth, num_heads=max(1, dec_width // 32),
                                mlp_ratio=state["decoder.0.blocks.0.mlp.fc1.weight"].shape[0] / dec_width),
    )


def load_published_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> ImportReport:
    ours = to_our_keys(state)
    result = model.load_state_dict(ours, strict=False)
    return ImportReport(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys))
