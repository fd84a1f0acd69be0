"""COCO detection scores with the maintained evaluator (pycocotools' COCOeval), as detectron2's
COCOEvaluator reports them:

    box AP, AP50, AP75, APs, APm, APl           iouType "bbox"
    mask AP, AP50, AP75, APs, APm, APl          iouType "segm" (a Mask R-CNN)

in percent; an area range without ground truth scores None (COCOeval's -1). Detections are the
COCO results format (`to_results`): image_id, the category's own id, bbox [x, y, w, h], score and,
with masks, the mask above 0.5 as compressed RLE. The ground truth is the split as read and
checked (tasks/detection/data.py), crowd regions included, with each annotation's area as its
file gives it (COCOeval's area ranges use it).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch

from localmim_cli.tasks.detection.data import CocoSplit, DetImage

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def ground_truth(split: CocoSplit, images: Sequence[DetImage] | None = None, category_ids: Sequence[int] = ()):
    """A pycocotools COCO object of the split's checked annotations (of `images` only, when given)."""
    from pycocotools.coco import COCO

    from localmim_cli.tasks.detection.data import instance_area

    chosen = split.images if images is None else images
    anns = []
    for image in chosen:
        for inst in image.instances:
            ann = {"id": inst.ann_id, "image_id": image.image_id, "category_id": category_ids[inst.label - 1],
                   "bbox": list(inst.box), "area": instance_area(inst, image), "iscrowd": int(inst.iscrowd)}
            if inst.segmentation is not None:
                ann["segmentation"] = inst.segmentation
            anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": i.image_id, "width": i.width, "height": i.height, "file_name": i.path.name}
                               for i in chosen],
                    "categories": [dict(c) for c in split.categories], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
        coco.createIndex()
    return coco


def to_results(prediction: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's detections (torchvision's output, boxes x1 y1 x2 y2 at the image's size) as COCO results."""
    boxes = prediction["boxes"].float().cpu().numpy()
    scores = prediction["scores"].float().cpu().tolist()
    labels = prediction["labels"].cpu().tolist()
    rles = None
    if "masks" in prediction:
        from pycocotools import mask as mask_utils
        binary = (prediction["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)      # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    out = []
    for k, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        x1, y1, x2, y2 = (float(v) for v in box)
        entry = {"image_id": image_id, "category_id": int(category_ids[label - 1]),
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        if rles is not None:
            entry["segmentation"] = {"size": [int(v) for v in rles[k]["size"]], "counts": rles[k]["counts"].decode("ascii")}
        out.append(entry)
    return out


def coco_scores(gt, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    """AP, AP50, AP75, APs, APm, APl in percent for `iou_type` ("bbox" or "segm")."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if v < 0 else 100 * float(v)) for name, v in zip(STAT_NAMES, evaluator.stats[:6])}


def scores(gt, results: list[dict[str, Any]], masks: bool) -> dict[str, Any]:
    """{"box": {AP...}, "mask": {AP...} (with masks)}."""
    out = {"box": coco_scores(gt, results, "bbox")}
    if masks:
        # as detectron2's COCOEvaluator: without its box, a result's area is its mask's
        out["mask"] = coco_scores(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results
                                       if "segmentation" in r], "segm")
    return out
