"""Options of the built-in `pixel` target: no torch, so settings that name it validate without
loading the target's code."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PixelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    normalize: bool = Field(True, description="per cell: subtract the mean, divide by sqrt(var + 1e-6)")


PIXEL_SUMMARY = "per-cell normalized RGB pixels (MAE norm_pix; published Swin target)"
