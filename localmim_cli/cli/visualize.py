"""`localmim visualize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import NO_VALUE
from localmim_cli.cli.output import console


def visualize(
    checkpoint: Annotated[Path, typer.Argument(
        help="A pretraining run directory, a checkpoint folder (or its model.safetensors), or a "
             "published LocalMIM ViT checkpoint (.pth or .safetensors, authors' key layout).",
        show_default=False)],
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Image files or folders (searched recursively). Leave out for the built-in sample photos.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Figure to write (FIG.png); its sidecar FIG.json goes beside it. Default: "
                            "RUN/figures/reconstruction.png for a run directory, else ./reconstruction.png "
                            "(reconstruction-2.png, ... when that exists).",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar=NO_VALUE, help="Replace an earlier figure of localmim's at --out (never any "
                                              "other file).")] = False,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of the masks: the same seed gives the same masks on every run and device (default 0)",
        show_default=False)] = None,
    mask_from: Annotated[Optional[Path], typer.Option(
        "--mask-from", help="Reuse masks: a previous figure's .json sidecar, or a .json/.npy holding "
                            "(L,) or (N, L) 0/1 values (1 = hidden).", show_default=False)] = None,
    mask_ratio: Annotated[Optional[float], typer.Option(
        "--mask-ratio", help="Share of patches hidden. Default: the model's.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where to run the model: cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Draw what every scale reconstructs: input, mask, and per scale the target next to the prediction.

    Writes one PNG (a row per image) and a JSON sidecar with each image's mask and per-scale loss.
    """
    from localmim_cli.tasks import visualize as task

    out, sidecar = task.visualize(checkpoint, images, out, seed, mask_from, mask_ratio, device, overwrite)
    console.print(f"wrote {out} ({len(sidecar['images'])} image(s)) and {out.with_suffix('.json').name}",
                  highlight=False)
    for item in sidecar["images"]:
        losses = ", ".join(f"{v:.4f}" for v in item["losses"])
        console.print(f"  {Path(item['path']).name}: loss per scale {losses}", highlight=False)
