"""`localmim export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
) -> None:
    """Export the encoder for timm: model.safetensors + config.json, verified by reloading it.

    The reloaded model's pooled features are compared with the checkpoint's on a probe batch;
    a difference of 1e-4 or more is an error and leaves nothing behind.
    """
    from localmim_cli.tasks.export import TOLERANCE, export_encoder, load_call

    report = export_encoder(checkpoint, out, with_head=with_head, overwrite=overwrite)
    console.print(f"exported {report['source_kind']} checkpoint {checkpoint} -> {report['out']}")
    console.print(f"  {report['description']}; {report['num_classes'] or 'no'} classes")
    console.print(f"  reloaded through timm: max abs feature difference {report['max_abs_diff']:.3g} "
                  f"(< {TOLERANCE:g})")
    console.print("  load it with:", highlight=False)
    console.print(f"    timm.create_model('local-dir:{report['out']}', pretrained=True)", highlight=False)
    console.print(f"    {load_call(report)}", highlight=False, soft_wrap=True)
