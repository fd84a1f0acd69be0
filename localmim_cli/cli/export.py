"""`localmim export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import NO_VALUE
from localmim_cli.cli.output import console


def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="A pretrain or finetune run directory, a localmim checkpoint, or a published LocalMIM/MAE "
             "ViT .pth/.safetensors.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write model.safetensors and "
                                                          "config.json into.", show_default=False)],
    with_head: Annotated[bool, typer.Option(
        "--with-head", metavar=NO_VALUE,
        help="Keep a fine-tuned model's classifier head (label names go into config.json).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=NO_VALUE, help="Replace a non-empty --out.")] = False,
    format_: Annotated[Optional[str], typer.Option(
        "--format", help="timm (default): model.safetensors + config.json. detectron2: the ViT as ViTDet's "
                         "backbone (backbone.net.*) or the Swin as its SwinTransformer (backbone.bottom_up.*), in "
                         "model_final.pth. mmdet: the ViT as mmdetection's ViTDet ViT, the Swin in the original "
                         "layout (convert_weights=True), in backbone.pth. Also takes a detection run.",
        show_default=False)] = None,
) -> None:
    """Export the encoder for timm, detectron2 or mmdetection, checked before anything is kept.

    timm: model.safetensors + config.json, verified by reloading it: the reloaded model's pooled
    features are compared with the checkpoint's on a probe batch; a difference of 1e-4 or more is
    an error and leaves nothing behind. detectron2 / mmdet: every tensor's name and shape checked
    against the framework's backbone definition (ViTDet's ViT, the Swin Transformer), the file
    read back; the config lines that load it are printed.
    """
    if format_ not in (None, "timm"):
        from localmim_cli.tasks.detection.export import export_backbone, load_lines

        report = export_backbone(checkpoint, out, format_, overwrite=overwrite)
        console.print(f"exported {checkpoint} -> {report['path']} ({report['format']}, {report['backbone']} "
                      f"backbone, {report['tensors']} tensors, names and shapes as the framework defines them)",
                      highlight=False)
        if report["initialised_by_the_framework"]:
            console.print(f"  left to the framework's initialisation: {len(report['initialised_by_the_framework'])} "
                          f"tensors (e.g. {report['initialised_by_the_framework'][0]})", highlight=False)
        console.print("  load it with:", highlight=False)
        for line in load_lines(report):
            console.print(f"    {line}", highlight=False, soft_wrap=True)
        return
    from localmim_cli.tasks.export import TOLERANCE, export_encoder, load_call

    report = export_encoder(checkpoint, out, with_head=with_head, overwrite=overwrite)
    console.print(f"exported {report['source_kind']} checkpoint {checkpoint} -> {report['out']}")
    console.print(f"  {report['description']}; {report['num_classes'] or 'no'} classes")
    console.print(f"  reloaded through timm: max abs feature difference {report['max_abs_diff']:.3g} "
                  f"(< {TOLERANCE:g})")
    console.print("  load it with:", highlight=False)
    console.print(f"    timm.create_model('local-dir:{report['out']}', pretrained=True)", highlight=False)
    console.print(f"    {load_call(report)}", highlight=False, soft_wrap=True)
