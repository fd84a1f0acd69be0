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
             "published LocalMIM ViT checkpoint (.pth or .safetensors, authors' key layout); or a "
             "segmentation or detection fine-tuning run (or one of its checkpoints) for its task's figure.",
        show_default=False)],
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Image files or folders (searched recursively). Leave out for the built-in sample photos.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Figure to write (FIG.png); its sidecar FIG.json goes beside it. Default: "
                            "RUN/figures/reconstruction.png for a run directory, else ./reconstruction.png "
                            "(reconstruction-2.png, ... when that exists); segmentation.png or "
                            "detections.png for a fine-tuning run.",
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
    score_threshold: Annotated[Optional[float], typer.Option(
        "--score-threshold", help="Detection runs: draw the detections scoring at least this (0 to 1; "
                                  "default 0.5).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where to run the model: cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Draw what a run's model does on images, one row per image.

    A pretraining run: what every scale reconstructs (input, mask, and per scale the target next
    to the prediction). A segmentation run: the image, the prediction overlaid in class colours,
    the ground truth where the image has a mask in one of the layouts (pairs: masks/NAME.png
    beside images/; ADE20K: annotations/SPLIT/NAME.png), and a legend of the classes present.
    A detection run: the image and its boxes, masks (Mask R-CNN) and category names with scores
    at or above --score-threshold. Writes one PNG and a JSON sidecar of what it drew.
    """
    from localmim_cli.tasks import visualize as task

    out, sidecar = task.visualize(checkpoint, images, out, seed, mask_from, mask_ratio, device, overwrite,
                                  score_threshold)
    console.print(f"wrote {out} ({len(sidecar['images'])} image(s)) and {out.with_suffix('.json').name}",
                  highlight=False)
    for item in sidecar["images"]:
        what = item.get("summary") or "loss per scale " + ", ".join(f"{v:.4f}" for v in item["losses"])
        console.print(f"  {Path(item['path']).name}: {what}", highlight=False)
