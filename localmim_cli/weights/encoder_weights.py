"""What weights loaded from any source are: `EncoderWeights` (the tensors, their architecture,
how features are pooled, where they came from) and `ViTShape` (a ViT's architecture). The
loaders (sources.py) make them; the timm builders for plugin encoders (via_timm.py) and the
tasks take them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Kind = Literal["pretrain", "finetune", "published", "export"]
# What a checkpoint's features are: mean of normed tokens, norm of the mean, or a plain mean.
Pooling = Literal["norm_then_pool", "pool_then_norm", "pool"]

FALLBACK_ARCH = "vit_base_patch16_224"   # any size builds from it: the kwargs replace its sizes


@dataclass(frozen=True)
class ViTShape:
    """The architecture of a ViT encoder, enough to build it in timm."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def timm_kwargs(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.qkv_bias}

    @property
    def named_arch(self) -> str | None:
        """timm's name for this size (e.g. vit_base_patch16_224), when timm has one."""
        import timm

        from localmim_cli.encoders.vit import vit_arch_of

        stem = vit_arch_of(self.embed_dim, self.depth, self.num_heads)
        if stem is None or self.mlp_ratio != 4.0 or not self.qkv_bias:
            return None
        name = f"{stem}_patch{self.patch_size}_224"
        return name if timm.is_model(name) else None

    @property
    def arch(self) -> str:
        return self.named_arch or FALLBACK_ARCH

    def describe(self) -> str:
        name = self.named_arch
        return (f"ViT width {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, patch "
                f"{self.patch_size}, {self.img_size} px" + (f" ({name})" if name else " (no timm name: "
                                                             f"built from {FALLBACK_ARCH} with these sizes)"))

    def same_architecture(self, other: "ViTShape") -> bool:
        """Same weights shapes and function (image size aside: positions can be resampled)."""
        a, b = self.timm_kwargs(), other.timm_kwargs()
        a.pop("img_size"), b.pop("img_size")
        return a == b


@dataclass
class EncoderWeights:
    kind: Kind
    source: Path                       # what the user gave
    shape: ViTShape
    state: dict[str, "torch.Tensor"]     # timm names (see the module docstring)
    pooling: Pooling
    classes: list[str] | None = None   # a fine-tuned model's class names, in head order
    run_dir: Path | None = None        # the run directory the checkpoint belongs to, if any
    model_file: Path | None = None     # the tensor file read (for cache keys)
    meta: dict[str, Any] = field(default_factory=dict)
    encoder_name: str = "vit"          # the pretraining encoder plugin (pretrain kind, published Swin)

    @property
    def file(self) -> Path:
        """The file the weights were read from (what a problem with them names), else the source."""
        return self.model_file or self.source

    def identity(self) -> dict[str, Any]:
        """What identifies these weights for a feature cache: the file, its size and mtime."""
        f = self.model_file
        st = f.stat() if f is not None and f.is_file() else None
        return {"file": str(f.resolve()) if f else str(self.source), "size": st.st_size if st else None,
                "mtime_ns": st.st_mtime_ns if st else None, "kind": self.kind, "pooling": self.pooling}

    def describe(self) -> str:
        if self.encoder_name != "vit":
            return f"{self.kind} checkpoint {self.source}: {self.encoder_name!r} encoder plugin, " \
                   f"{self.shape.img_size or self.meta['settings']['model']['img_size']} px"
        guessed = ("; the file does not say how many attention heads, so "
                   f"{self.shape.num_heads} was assumed" if self.meta.get("heads_guessed") else "")
        return f"{self.kind} checkpoint {self.source}: {self.shape.describe()}{guessed}"

    @property
    def pretrained_encoder(self) -> bool:
        """Weights of one of our pretraining encoders, whole (a pretrain checkpoint, a published
        LocalMIM Swin): its meta holds the model settings, its features are forward_features."""
        return self.kind == "pretrain" or (self.kind == "published" and self.encoder_name != "vit")

    @property
    def has_head(self) -> bool:
        """A fine-tuned model's classifier is in the weights (a ViT's head.*, or any model built
        via an encoder plugin's to_timm(): fine-tuned checkpoints always keep their head)."""
        if not self.classes:
            return False
        return "head.weight" in self.state or (self.kind == "finetune" and self.encoder_name != "vit")

    def encoder_state(self) -> dict[str, "torch.Tensor"]:
        """Only what a new fine-tuning model takes over: no norm after the blocks, no head."""
        return {k: v for k, v in self.state.items()
                if k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks."))}
