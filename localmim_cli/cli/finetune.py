"""`localmim finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.options import (NO_VALUE, AccumOpt, BaseLrOpt, BatchOpt, ConfigOpt, DeviceOpt,
                                      EpochsOpt, OutOpt, OverwriteOpt, PrecisionOpt, PresetOpt, ResumeOpt,
                                      SeedOpt, SetOpt, WorkersOpt)
from localmim_cli.cli.output import console, note_others_env, print_settings
from localmim_cli.errors import UsageError


def finetune(
    data: Annotated[Optional[Path], typer.Argument(
        help="The task's data. classification: a folder with one subfolder of images per class "
             "(ImageFolder layout). segmentation: the ADE20K layout (images/{training,validation}, "
             "annotations/{training,validation}) or pairs (images/NAME.*, masks/NAME.png, optional "
             "classes.txt). detection: COCO instances, as COCO's layout (annotations/instances_{train,val}2017.json, "
             "train2017/, val2017/), train/ and val/ each with annotations.json + images/, or one annotations.json "
             "+ images/ with --val. Optional with --resume.", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="What to fine-tune for: classification (default), segmentation or detection. A preset "
                       "or a resumed run brings its own task.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start from: a pretrain run directory, a localmim checkpoint, a published "
                       "LocalMIM/MAE ViT .pth/.safetensors, or an exported encoder folder.")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    val: Annotated[Optional[Path], typer.Option(
        "--val", help="Separate validation folder (data.val_path): classification the same class subfolders, "
                      "segmentation the same layout, detection annotations.json + images/.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="data.val_fraction: share of each class held out when there is no --val (0 = none)")] = None,
    epochs: EpochsOpt = None,
    iterations: Annotated[Optional[int], typer.Option(
        help="train.iterations: optimizer steps of a run counted in steps (segmentation)")] = None,
    batch_size: BatchOpt = None,
    accum_steps: AccumOpt = None,
    lr: Annotated[Optional[float], typer.Option(help="optim.lr, absolute (overrides --base-lr)")] = None,
    base_lr: BaseLrOpt = None,
    layer_decay: Annotated[Optional[float], typer.Option(help="optim.layer_decay")] = None,
    drop_path: Annotated[Optional[float], typer.Option(help="model.drop_path")] = None,
    arch: Annotated[Optional[str], typer.Option(
        help="model.arch: the timm architecture the checkpoint must be, e.g. vit_base_patch16_224")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="model.img_size (default: the checkpoint's)")] = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    workers: WorkersOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", metavar=NO_VALUE, help="Check everything a real start checks (settings, data, checkpoint, "
                                            "device, model, at least one optimizer step per epoch, that --out "
                                            "may be written), then stop without writing anything.")] = False,
) -> None:
    """Fine-tune a pretrained encoder for a task (--task; default classification).

    classification: the published ViT protocol. Global average pooling with a new norm and
    head, layer-wise lr decay, drop path, Mixup/CutMix, RandAugment, random erasing, label
    smoothing, AdamW with warmup + cosine (--preset ft-small: small labelled sets, without the
    heavy regularisation, the head starting from a linear probe: model.head_init=linear_probe).
    The run first scores the --init encoder's k-NN and linear probe on its own split and ends
    saying whether fine-tuning beat them (train.init_probes=off skips that);
    train.head_warmup_epochs=N trains the head alone on the frozen encoder first.

    segmentation: the published ADE20K protocol. The encoder's features at four depths (ViT;
    Swin: its stages) at strides 4-32, UperNet with an FCN auxiliary head, random resize, crop,
    flip and photometric distortion, layer-wise lr decay, AdamW with warmup + poly over
    train.iterations (--iterations), validation mIoU (slide or whole inference).
    detection: ViTDet's protocol on torchvision's Mask R-CNN (--set model.masks=false: Faster
    R-CNN). A ViT through window attention with global blocks and ViTDet's simple pyramid from
    its last block (a Swin: its stages and an FPN), large-scale jitter, layer-wise lr decay,
    AdamW with warmup and steps over train.iterations, validation COCO box and mask AP.
    Writes into the run directory: settings.json, settings.provenance.json, classes.json,
    manifest.json, metrics.jsonl (training and validation lines), checkpoints/ (the last ones,
    and best/ by the task's validation score). Under torchrun every process runs this same
    command; rank 0 alone writes.
    """
    from localmim_cli.config.resolve import choose_task, resolve_resumed, resolve_settings
    from localmim_cli.config.tasks import finetune_task
    from localmim_cli.engine import runs
    from localmim_cli.tasks import finetune as fine_tuning

    schema = finetune_task(choose_task(task, preset, config, out if resume else None)).schema
    counts = schema.model_fields["train"].annotation.model_fields
    for flag, value, field, other in (("--epochs", epochs, "epochs", "--iterations"),
                                      ("--iterations", iterations, "iterations", "--epochs")):
        if value is not None and field not in counts:
            raise UsageError(f"{flag}: this task's runs are counted in {other[2:]}, not {field}; use {other}")
    flags = {"task": task, "data.path": str(data) if data else None, "init": str(init) if init else None,
             "data.val_path": str(val) if val else None, "data.val_fraction": val_fraction,
             "train.epochs": epochs, "train.iterations": iterations, "train.batch_size": batch_size, "train.accum_steps": accum_steps,
             "optim.lr": lr, "optim.base_lr": base_lr, "optim.layer_decay": layer_decay,
             "model.drop_path": drop_path, "model.arch": arch, "model.img_size": img_size,
             "train.precision": precision, "train.device": device, "train.seed": seed, "data.workers": workers}
    resolved = (resolve_resumed(schema, out, preset, config, set_, flags) if resume
                else resolve_settings(schema, preset, config, set_, flags))
    note_others_env(resolved)
    run_dir = out or runs.default_run_dir(preset or "finetune")
    if dry_run:
        if resume:
            raise UsageError("--dry-run checks a new run; drop --resume")
        init = resolved.settings.init   # read, so never written over or inside
        runs.check(Path(run_dir), resume, overwrite, reads=[init] if init else [])   # as a real start, changing nothing
        print_settings(resolved)
        console.print(fine_tuning.check(resolved.settings) + f"; would write to {run_dir}")
        return
    summary = fine_tuning.finetune(resolved, run_dir, resume=resume, overwrite=overwrite, console=console)
    if summary and not summary.get("already_finished"):
        console.print(fine_tuning.done_line(resolved.settings, summary, run_dir))
