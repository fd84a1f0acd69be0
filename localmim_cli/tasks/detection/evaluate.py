"""Evaluation of a detector: COCO box AP, AP50, AP75, APs/m/l and, for a Mask R-CNN, mask AP,
by pycocotools on the detections of the validation's own inference (recipe.predict_split) and
metric (metric.py).

What is scored: DATA's validation split (the COCO layout's val annotations, a splits folder's
val/, as the run read them; the training annotations are then not read); a folder with one
annotations.json and images/, all of it. Its categories must be those the model was trained on.
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
    from localmim_cli.tasks.detection.data import read_scored_split
    from localmim_cli.tasks.detection.metric import ground_truth, scores
    from localmim_cli.tasks.detection.recipe import detector_from_checkpoint, predict_split
    from localmim_cli.weights.locate import checkpoint_folder

    if settings.protocol != "auto":
        raise UsageError(f"--protocol {settings.protocol}: {checkpoint} is a detection model, scored by its "
                         "own heads (leave --protocol out)")
    found = checkpoint_folder(checkpoint)
    model, run, meta = detector_from_checkpoint(checkpoint)
    masks = bool(meta["detector"]["masks"])
    d = run.data.model_copy(update={"path": Path(data), "val_path": None, "workers": settings.data.workers,
                                    "layout": "auto"})
    split, is_val = read_scored_split(d, masks, meta["classes"], meta["category_ids"], str(found.folder))
    what = f"the validation split of {data}" if is_val else f"all {len(split.images)} images of {data}"
    device = choose_device(settings.train.device, World())
    precision = resolve_precision(settings.train.precision, device)
    console.print(f"detection model {found.folder} ({'Mask' if masks else 'Faster'} R-CNN, "
                  f"{len(meta['classes'])} categories) on {device} ({precision}); "
                  f"scoring {len(split.images)} images: {what}")
    category_ids = list(meta["category_ids"])
    detections = predict_split(model.to(device), split.images, category_ids,
                               run.model_copy(update={"data": d}), Placement(World(), device, precision))
    result = scores(ground_truth(split, category_ids=category_ids), detections, masks)
    return {"protocol": "detection", "checkpoint_kind": found.kind, "evaluated_on": what,
            "images": len(split.images), "detections": len(detections), "classes": meta["classes"],
            **result}, found.run_dir


def print_table(results: dict[str, Any], console: "Console") -> None:
    from rich.table import Table

    from localmim_cli.tasks.detection.metric import STAT_NAMES

    table = Table(title=f"detection: {results['checkpoint']} ({results['images']} images, "
                        f"{results['detections']} detections)")
    table.add_column("")
    for name in STAT_NAMES:
        table.add_column(name, justify="right")
    for kind in ("box", "mask"):
        if kind in results:
            table.add_row(kind, *("n/a" if results[kind][n] is None else f"{results[kind][n]:.2f}"
                                  for n in STAT_NAMES))
    console.print(table)
