"""`localmim visualize SEG_RUN IMAGES...`: what a segmenter predicts, drawn on each image.

One row per image: the image | the prediction overlaid in class colours | the ground truth
overlaid, where the image has a mask in one of the layouts (pairs: ROOT/masks/NAME.png beside
ROOT/images/; ADE20K: ROOT/annotations/SPLIT/NAME.png beside ROOT/images/SPLIT/) | a legend of
the classes present in the prediction or the ground truth, with their names and shares of the
image. Predictions are made as validation makes them (the image resized to data.scale, the
run's val.mode inference, logits resized back to the image's own size), so the figure shows
what the run's mIoU scored. Masks are checked as training checks them (one line naming the file).

Class names are the run's (classes.txt / classes.json or ADE20K's, as it recorded them); a run
that had none (class_0, class_1, ...) takes those of a classes file at the images' layout root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from localmim_cli.tasks.figure import Panel
from localmim_cli.tasks.task_figure import FigureRequest, TaskFigure


class SegmentationFigure(TaskFigure):
    default_name = "segmentation.png"
    what = "a segmentation run's figure"

    def draw(self, request: FigureRequest) -> dict[str, Any]:
        import torch

        from localmim_cli.data.decode import load_rgb
        from localmim_cli.tasks import task_figure as tf
        from localmim_cli.tasks.segmentation.augment import IGNORE
        from localmim_cli.tasks.segmentation.data import Pair, mask_beside, read_checked_mask, reduces_zero_label
        from localmim_cli.tasks.segmentation.inference import predict_image
        from localmim_cli.tasks.segmentation.recipe import segmenter_from_checkpoint

        model, settings, classes = segmenter_from_checkpoint(request.checkpoint)
        model.to(request.device)
        n = len(classes)
        colours = tf.class_colours(n)
        v = settings.val
        items = []
        for path in request.images:
            image = np.asarray(load_rgb(path))
            with torch.no_grad():
                predicted = predict_image(model.predict, image, n, tuple(settings.data.scale), v.mode,
                                          settings.model.img_size, v.stride, v.batch_size, request.device)
            predicted = predicted.cpu().numpy()
            beside = mask_beside(Path(path))
            truth = None
            if beside is not None:
                mask, layout = beside
                zero = reduces_zero_label(layout, settings.data.reduce_zero_label)
                truth = read_checked_mask(Pair(Path(path), mask), zero, n)
            items.append((Path(path), image, predicted, beside, truth))

        names, named_from = class_names(classes, [b for *_, b, _ in items if b is not None])
        side = tf.panel_side([im.shape[:2] for _, im, *_ in items])
        with_truth = any(t is not None for *_, t in items)
        rows, entries = [], []
        for path, image, predicted, beside, truth in items:
            pred_px = np.bincount(predicted.ravel(), minlength=n)[:n]
            truth_px = np.bincount(truth[truth != IGNORE].ravel(), minlength=n)[:n] if truth is not None else None
            present = [k for k in range(n) if pred_px[k] or (truth_px is not None and truth_px[k])]
            total = predicted.size
            present.sort(key=lambda k: (-max(pred_px[k], truth_px[k] if truth_px is not None else 0), k))
            legend_entries = [tf.LegendEntry(colours[k], f"{names[k]} {tf.percent(int(pred_px[k]), total)}"
                                             + (f" | {tf.percent(int(truth_px[k]), total)}" if truth_px is not None else ""))
                              for k in present]
            heading = "prediction | truth" if truth_px is not None else "share of the prediction"
            legend_px, shown = tf.legend(legend_entries, side, heading)
            row = [Panel(tf.letterbox(image, side), ["image", path.name], "image"),
                   Panel(tf.letterbox(tf.overlay(image, predicted, colours), side),
                         ["prediction", f"{v.mode} inference"], "prediction")]
            if with_truth:
                if truth is not None:
                    row.append(Panel(tf.letterbox(tf.overlay(image, truth, colours, ignore=IGNORE), side),
                                     ["ground truth", beside[0].name], "ground truth"))
                else:
                    row.append(Panel(tf.blank(side), ["ground truth", "no mask found"], "ground truth"))
            row.append(Panel(legend_px, ["classes present", f"{len(present)} of {n}"], "legend"))
            rows.append(row)
            top = ", ".join(f"{names[k]} {tf.percent(int(pred_px[k]), total)}" for k in present[:4])
            entries.append({
                "path": str(path), "mask": str(beside[0]) if beside else None,
                "size": [int(image.shape[1]), int(image.shape[0])],
                "classes": [{"index": k, "name": names[k], "colour": [int(c) for c in colours[k]],
                             "predicted_pixels": int(pred_px[k]),
                             **({"truth_pixels": int(truth_px[k])} if truth_px is not None else {})}
                            for k in present],
                "legend_shown": shown,
                "summary": f"predicted {top}" + (" ..." if len(present) > 4 else "")
                           + (f"; ground truth {beside[0].name}" if beside else "; no mask found")})

        source = tf.describe_checkpoint(request.checkpoint)
        header = [source,
                  f"{n} classes (names from {named_from}); {v.mode} inference as validation runs it; class colours "
                  f"blended in at {tf.ALPHA:.0%}" + ("; unlabelled ground-truth pixels left as they are" if with_truth else ""),
                  "Legend: the classes in the prediction or the ground truth, with their share of the image's pixels."]
        sidecar = {"checkpoint": str(request.checkpoint), "source": source, "task": "segmentation",
                   "classes": names, "class_names_from": named_from, "mode": v.mode, "images": entries,
                   "device": str(request.device)}
        return tf.write(rows, side, header, request.out, sidecar)


def class_names(recorded: list[str], masks: list[tuple[Path, str]]) -> tuple[list[str], str]:
    """(the names to draw, where they came from): the run's, unless it recorded only placeholders
    (class_0, ...) and a classes.txt / classes.json at a mask's layout root names as many or more."""
    from localmim_cli.tasks.segmentation.data import layout_root, read_class_names

    if recorded != [f"class_{k}" for k in range(len(recorded))]:
        return list(recorded), "the run"
    for root in dict.fromkeys(layout_root(mask, layout) for mask, layout in masks):
        names = read_class_names(root)
        if names and len(names) >= len(recorded):
            return names[:len(recorded)], f"{root}'s class list"
    return list(recorded), "the run (it had no class names)"


FIGURE = SegmentationFigure()
