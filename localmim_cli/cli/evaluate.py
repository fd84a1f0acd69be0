"""`localmim evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import NO_VALUE
from localmim_cli.cli.output import console, note_others_env


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(
        help="A finetune or pretrain run directory, a localmim checkpoint, a published LocalMIM/MAE "
             "ViT .pth/.safetensors, or an exported encoder folder.", show_default=False)],
    data: Annotated[Path, typer.Argument(
        help="Classification: one subfolder of images per class (ImageFolder layout). Segmentation (a "
             "segmentation run, or --protocol seg-linear): ADE20K or pairs layout. Detection: COCO format.",
        show_default=False)],
    protocol: Annotated[Optional[str], typer.Option(
        help="classifier (a fine-tuned model's head), knn, linear, fewshot, seg-linear (a 1x1 head on frozen "
             "patch features, scored by mIoU); default: a fine-tuned model's own task, knn for an encoder")] = None,
    mode: Annotated[Optional[str], typer.Option(
        help="segmentation inference: slide (windows) or whole; default: the run's val.mode")] = None,
    stride: Annotated[Optional[int], typer.Option(
        help="segmentation, slide: window stride in pixels; default: the run's val.stride")] = None,
    val: Annotated[Optional[Path], typer.Option(
        "--val", help="data.val_path: separate validation folder with the same class subfolders.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="data.val_fraction: share of each class of DATA held out as validation for the probes.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Results JSON. Default: a new file per evaluation, <run dir>/evaluations/"
                            "<UTC time>-<protocol>.json (./evaluations/... for a checkpoint outside a run).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar=NO_VALUE, help="Replace an earlier results file of localmim's at --out "
                                              "(never any other file).")] = False,
    k: Annotated[Optional[int], typer.Option("--k", help="knn.k, neighbours that vote")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="knn.temperature")] = None,
    way: Annotated[Optional[int], typer.Option(help="fewshot.way, classes per episode")] = None,
    shot: Annotated[Optional[list[int]], typer.Option(help="fewshot.shots (repeatable)")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="fewshot.episodes")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="train.batch_size, images per forward")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="model.img_size (default: the checkpoint's)")] = None,
    device: Annotated[Optional[str], typer.Option(help="train.device: auto, cpu, cuda, cuda:N")] = None,
    precision: Annotated[Optional[str], typer.Option(help="train.precision: auto, bf16, fp16, fp32")] = None,
    workers: Annotated[Optional[int], typer.Option(help="data.workers, loader processes")] = None,
    seed: Annotated[Optional[int], typer.Option(help="train.seed: of the split, the sweep and the episodes")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", metavar=NO_VALUE, help="Recompute features; write no cache.")] = False,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Settings file (.toml or .json) for the evaluation.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Override any setting: --set linear.epochs=50 (repeatable).")] = None,
) -> None:
    """Score a checkpoint on a labelled folder: its classifier, or k-NN / linear / few-shot probes;
    a segmentation run's mIoU, mAcc, aAcc and per-class IoU; a detection run's COCO box and mask AP.

    Probe features (a pretrained encoder: patch tokens after all blocks, through the last tap
    norm, averaged; a fine-tuned model: its pooled, normed pre-logits) are cached between
    protocols, keyed by checkpoint, images and preprocessing.
    """
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.schema import EvaluateSettings
    from localmim_cli.tasks.evaluate import print_results, run_evaluation

    flags = {"protocol": protocol, "mode": mode, "stride": stride,
             "data.val_path": str(val) if val else None, "data.val_fraction": val_fraction,
             "knn.k": k, "knn.temperature": temperature, "fewshot.way": way, "fewshot.shots": shot or None,
             "fewshot.episodes": episodes, "train.batch_size": batch_size, "model.img_size": img_size,
             "train.device": device, "train.precision": precision, "data.workers": workers, "train.seed": seed,
             "cache": False if no_cache else None}
    resolved = resolve_settings(EvaluateSettings, None, config, set_, flags,
                                flag_names={"data.val_path": "--val", "fewshot.shots": "--shot", "cache": "--no-cache"})
    note_others_env(resolved)
    results, path = run_evaluation(checkpoint, data, resolved.settings, console, out, overwrite)
    print_results(results, path, console)
