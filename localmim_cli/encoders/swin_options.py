"""Options of the built-in `swin` encoder and the Swin size table: no torch, as for vit_options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Published sizes: (embed_dim C, blocks per stage, heads per stage).
SWIN_ARCHS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


class SwinOptions(BaseModel):
    """Options of the built-in `swin` encoder. `arch` fills embed_dim, depths and heads unless given."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    arch: Literal["swin_tiny", "swin_small", "swin_base", "swin_large"] | None = "swin_base"
    patch_size: int = Field(4, ge=1)
    embed_dim: int | None = Field(None, ge=1, description="width C of stage 1; stage k has C * 2^(k-1)")
    depths: list[int] | None = Field(None, description="blocks per stage")
    num_heads: list[int] | None = Field(None, description="attention heads per stage")
    window_size: int = Field(7, ge=1, description="attention window side in tokens (published: 7 or 14)")
    window_coords: Literal["published", "grid"] = Field(
        "published", description="where masked pretraining places tokens after a patch merging when "
        "forming windows: 'published' as the authors' code (each token at its unit-major index read "
        "as a raster index), 'grid' at its true position (as the unmasked forward always does)")
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth at the last block "
                                                          "(published pretraining: 0)")

    @model_validator(mode="after")
    def _fill_from_arch(self) -> "SwinOptions":
        if self.arch is not None:
            width, depths, heads = SWIN_ARCHS[self.arch]
            # Only what was left out comes from the arch: a given value is used as given.
            self.embed_dim = width if self.embed_dim is None else self.embed_dim
            self.depths = list(depths) if self.depths is None else self.depths
            self.num_heads = list(heads) if self.num_heads is None else self.num_heads
        missing = [n for n in ("embed_dim", "depths", "num_heads") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"set arch or all of embed_dim, depths, num_heads (missing: {missing})")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need one entry per stage")
        if min(self.depths) < 1 or min(self.num_heads) < 1:
            raise ValueError(f"every stage needs at least one block and one head: depths {self.depths}, "
                             f"num_heads {self.num_heads}")
        for k, heads in enumerate(self.num_heads):
            if self.stage_dim(k) % heads:
                raise ValueError(f"stage {k + 1} width {self.stage_dim(k)} is not divisible by its {heads} heads")
        self.arch = self.size_name()  # the size actually built (None: a size of its own), as for vit
        return self

    def stage_dim(self, k: int) -> int:
        """Width of stage k (0-indexed): C * 2^k."""
        return self.embed_dim * 2**k

    def size_name(self) -> str | None:
        """The published size (swin_tiny ... swin_large) these widths, depths and heads are, if any."""
        sizes = (self.embed_dim, tuple(self.depths), tuple(self.num_heads))
        return next((name for name, size in SWIN_ARCHS.items() if size == sizes), None)


SWIN_SUMMARY = "Swin Transformer on visible 32-px units (published LocalMIM Swin), taps after every stage"
