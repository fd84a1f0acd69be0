"""Segmentation scores as mmsegmentation computes them: a confusion matrix summed over the whole
split (not averaged per image), then

    IoU_k = intersection_k / union_k        Acc_k = intersection_k / labelled pixels of k
    mIoU  = mean of IoU_k, mAcc = mean of Acc_k, over the classes present (NaN skipped)
    aAcc  = correctly labelled pixels / labelled pixels

Pixels labelled 255 (ignored) are left out. Counts are int64 on the device and summed over
processes before the scores are taken.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from localmim_cli.tasks.segmentation.augment import IGNORE

if TYPE_CHECKING:
    from rich.console import Console


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted, of the
    pixels of `target` that are not IGNORE. pred and target: the same shape, integer labels."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc (percent, None where the class never
    occurs in the labels nor in the predictions) from a summed confusion matrix."""
    m = matrix.double().cpu()
    intersection = m.diag()
    labelled = m.sum(dim=1)
    predicted = m.sum(dim=0)
    union = labelled + predicted - intersection
    iou = intersection / union            # NaN where union is 0, as mmsegmentation
    acc = intersection / labelled

    def mean(values: torch.Tensor) -> float:
        present = values[~values.isnan()]
        return 100 * float(present.mean()) if len(present) else math.nan

    total = float(labelled.sum())
    return {"mIoU": mean(iou), "mAcc": mean(acc), "aAcc": 100 * float(intersection.sum()) / max(total, 1.0),
            "per_class": {name: {"IoU": None if math.isnan(i) else 100 * i, "Acc": None if math.isnan(a) else 100 * a}
                          for name, i, a in zip(classes, iou.tolist(), acc.tolist())},
            "pixels": int(total)}


def print_scores(results: dict[str, Any], title: str, console: "Console") -> None:
    """mIoU, mAcc, aAcc, then each class's IoU and accuracy (a fine-tuned segmenter's or a probe's)."""
    from rich.table import Table

    summary = Table(title=title)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in ("mIoU", "mAcc", "aAcc"):
        summary.add_row(key, f"{results[key]:.2f}%")
    console.print(summary)
    per_class = Table(title="per class")
    for col, justify in (("class", "left"), ("IoU", "right"), ("Acc", "right")):
        per_class.add_column(col, justify=justify)
    for name, v in results["per_class"].items():
        per_class.add_row(name, *("-" if v[k] is None else f"{v[k]:.2f}%" for k in ("IoU", "Acc")))
    console.print(per_class)
