"""Options of the built-in `hog` target: no torch, so settings that name it validate without
loading the target's code."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HOGOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nbins: int = Field(9, ge=2, description="orientation bins over 180 degrees (published: 9 ViT-B, 18 ViT-L)")
    bias: bool = Field(False, description="frozen random Sobel bias per scale (published ViT-L / Swin)")
    soft: bool = Field(False, description="split magnitude linearly between the two nearest bins "
                                          "(not in the published code; robust to rounding)")


HOG_SUMMARY = "per-channel histograms of oriented gradients per cell (published LocalMIM ViT target)"
