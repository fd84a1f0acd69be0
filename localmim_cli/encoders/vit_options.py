"""Options of the built-in `vit` encoder and the ViT size table: no torch, so settings that name
the encoder validate (`config show`, `--dry-run` errors) without loading the model code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The ViT sizes (width, depth, heads), named as timm names them; the patch size is a separate
# option. The one table of sizes: arch options, timm names of checkpoints and the heads of
# published files (which do not hold them) all read it.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


def vit_arch_of(embed_dim: int, depth: int, num_heads: int) -> str | None:
    """The VIT_ARCHS name of these sizes ("vit_base"), when they are one of them."""
    return next((name for name, dims in VIT_ARCHS.items() if dims == (embed_dim, depth, num_heads)), None)


class ViTOptions(BaseModel):
    """Options of the built-in `vit` encoder. `arch` fills width, depth and heads unless given;
    after validation it names the size the options describe, or is None for another size."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"] | None = "vit_base"
    patch_size: int = Field(16, ge=1)
    embed_dim: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    drop_path: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _fill_from_arch(self) -> "ViTOptions":
        if self.arch is not None:
            width, depth, heads = VIT_ARCHS[self.arch]
            # Only what was left out comes from the arch: a given value is used as given.
            self.embed_dim = width if self.embed_dim is None else self.embed_dim
            self.depth = depth if self.depth is None else self.depth
            self.num_heads = heads if self.num_heads is None else self.num_heads
        missing = [n for n in ("embed_dim", "depth", "num_heads") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"set arch or all of embed_dim, depth, num_heads (missing: {missing})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        # `arch` only fills what is not given; once filled it names the size actually built (None:
        # a size of its own), so `config show` never calls a 96-wide ViT "vit_base".
        self.arch = vit_arch_of(self.embed_dim, self.depth, self.num_heads)
        return self


VIT_SUMMARY = "Vision Transformer (timm blocks), published LocalMIM taps at layers 2, 4, L-2, L"
