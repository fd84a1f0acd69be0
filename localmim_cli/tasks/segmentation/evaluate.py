"""Evaluation of a segmenter: mIoU, mAcc, aAcc and per-class IoU over a split, with the
validation's own inference (tasks/segmentation/inference.py) and metric (metric.py).

What is scored: DATA being the folder the run was trained on, its validation split as the run
derived it (ADE20K's images/validation; a pairs folder's held-out share, from the run's seed);
another ADE20K folder, its validation split; another pairs folder, all of its pairs. Test mode
and stride are the run's (`val.mode`, `val.stride`) unless `--mode` / `--stride` say otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings


def evaluate(checkpoint: Path, data: Path, settings: "EvaluateSettings",
             console: "Console") -> tuple[dict[str, Any], Path | None]:
    from localmim_cli.engine.distributed import World, choose_device
    from localmim_cli.engine.loop import Placement, resolve_precision
    from localmim_cli.tasks.segmentation.data import read_seg_data
    from localmim_cli.tasks.segmentation.metric import scores
    from localmim_cli.tasks.segmentation.recipe import segmenter_from_checkpoint, validation_confusion
    from localmim_cli.weights.locate import checkpoint_folder

    if settings.protocol == "seg-linear":
        from localmim_cli.tasks.segmentation.probe import evaluate_probe
        return evaluate_probe(checkpoint, data, settings, console)
    if settings.protocol != "auto":
        raise UsageError(f"--protocol {settings.protocol}: {checkpoint} is a segmentation model, scored by its "
                         "own head (leave --protocol out)")
    found = checkpoint_folder(checkpoint)
    model, run, classes = segmenter_from_checkpoint(checkpoint)
    trained_on = run.data.path
    same = trained_on is not None and Path(trained_on).resolve() == Path(data).resolve()
    d = run.data.model_copy(update={"path": Path(data), "workers": settings.data.workers, "layout": "auto",
                                    **({} if same else {"val_path": None, "val_fraction": 0.0})})
    split = read_seg_data(d, run.train.seed, classes)
    samples = split.val or split.train
    what = ("the run's validation images" if same and split.val else
            f"the validation images of {data}" if split.val else f"all {len(samples)} images of {data}")
    mode = run.val.mode if settings.mode == "auto" else settings.mode
    stride = settings.stride or run.val.stride
    val = run.val.model_copy(update={"mode": mode, "stride": stride})
    if mode == "slide" and stride > run.model.img_size:
        raise UsageError(f"--stride {stride} is larger than the window {run.model.img_size}")
    device = choose_device(settings.train.device, World())
    precision = resolve_precision(settings.train.precision, device)
    console.print(f"segmentation model {found.folder}, {len(classes)} classes; {mode} inference"
                  + (f" (window {run.model.img_size}, stride {stride})" if mode == "slide" else "")
                  + f" on {device} ({precision}); scoring {len(samples)} images: {what}")
    split.val = samples
    placement = Placement(World(), device, precision)
    matrix = validation_confusion(model.to(device), split, run.model_copy(update={"val": val, "data": d}), placement)
    result = scores(matrix, classes)
    return {"protocol": "segmentation", "checkpoint_kind": found.kind, "evaluated_on": what,
            "images": len(samples), "mode": mode, "window": run.model.img_size,
            "stride": stride if mode == "slide" else None, "classes": classes, **result}, found.run_dir


def print_table(results: dict[str, Any], console: "Console") -> None:
    if results["protocol"] == "seg-linear":
        from localmim_cli.tasks.segmentation.probe import print_probe
        return print_probe(results, console)
    from localmim_cli.tasks.segmentation.metric import print_scores

    print_scores(results, f"segmentation: {results['checkpoint']} ({results['mode']}, {results['images']} images)",
                 console)
