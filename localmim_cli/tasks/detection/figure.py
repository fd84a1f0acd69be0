"""`localmim visualize DET_RUN IMAGES...`: what a detector finds, drawn on each image.

One row per image: the image | its detections scoring at least --score-threshold (default 0.5):
each box in its category's colour with the category's name and score above it, and, for a
Mask R-CNN, its mask (binarised at 0.5, as the mask AP scores it) blended in | the list of those
detections, best first. The detector runs as validation runs it (the image resized to fit the
crop, the detections scaled back to the image), with its score threshold set to the figure's,
so a threshold below the run's model.score_thresh shows what validation would have dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from localmim_cli.errors import UsageError
from localmim_cli.tasks.figure import Panel
from localmim_cli.tasks.task_figure import FigureRequest, TaskFigure

DEFAULT_SCORE_THRESHOLD = 0.5
BOX_PX = 2


class DetectionFigure(TaskFigure):
    default_name = "detections.png"
    what = "a detection run's figure"
    options = frozenset({"score_threshold"})

    def draw(self, request: FigureRequest) -> dict[str, Any]:
        import torch

        from localmim_cli.data.decode import load_rgb
        from localmim_cli.tasks import task_figure as tf
        from localmim_cli.tasks.detection.recipe import detector_from_checkpoint

        threshold = request.options.get("score_threshold", DEFAULT_SCORE_THRESHOLD)
        if not 0 <= threshold <= 1:
            raise UsageError(f"--score-threshold {threshold:g}: a detection's score lies between 0 and 1")
        model, settings, meta = detector_from_checkpoint(request.checkpoint)
        model.roi_heads.score_thresh = threshold
        model.to(request.device)
        names, category_ids = list(meta["classes"]), list(meta["category_ids"])
        colours = tf.class_colours(len(names))
        masks = model.roi_heads.has_mask()
        found = []
        for path in request.images:
            image = np.asarray(load_rgb(path))
            x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255).to(request.device)
            with torch.no_grad():
                out = model([x])[0]
            found.append((Path(path), image, {k: t.cpu() for k, t in out.items()}))

        side = tf.panel_side([image.shape[:2] for _, image, _ in found])
        rows, entries = [], []
        for path, image, out in found:
            order = torch.argsort(out["scores"], descending=True).tolist()      # best first
            detections = []
            for i in order:
                k = int(out["labels"][i]) - 1
                box = [float(v) for v in out["boxes"][i]]
                entry = {"category_id": int(category_ids[k]), "name": names[k], "score": float(out["scores"][i]),
                         "box": box}
                if masks:
                    entry["mask_pixels"] = int((out["masks"][i, 0] > 0.5).sum())
                detections.append((k, i, entry))
            drawn = image
            for k, i, _ in reversed(detections):       # the best on top
                if masks:
                    drawn = tf.blend_where(drawn, (out["masks"][i, 0] > 0.5).numpy(), colours[k])
            panel = draw_boxes(tf.letterbox(drawn, side), tf.fit(*image.shape[:2], side),
                               [(colours[k], e["box"], f"{e['name']} {e['score']:.2f}") for k, _, e in reversed(detections)])
            listed, shown = tf.legend([tf.LegendEntry(colours[k], f"{e['name']} {e['score']:.2f}")
                                       for k, _, e in detections], side, f"score >= {threshold:g}")
            rows.append([Panel(tf.letterbox(image, side), ["image", path.name], "image"),
                         Panel(panel, ["detections", f"{len(detections)} at score >= {threshold:g}"], "detections"),
                         Panel(listed, ["found", "best first"], "legend")])
            top = ", ".join(f"{e['name']} {e['score']:.2f}" for _, _, e in detections[:4])
            entries.append({"path": str(path), "size": [int(image.shape[1]), int(image.shape[0])],
                            "detections": [e for _, _, e in detections], "legend_shown": shown,
                            "summary": f"{len(detections)} detection(s)" + (f": {top}" if top else "")
                                       + (" ..." if len(detections) > 4 else "")})

        source = tf.describe_checkpoint(request.checkpoint)
        heads = "Mask R-CNN: boxes and masks" if masks else "Faster R-CNN: boxes"
        header = [source,
                  f"{len(names)} categories; {heads} in the category's colour, with its name and score; "
                  f"detections scoring at least {threshold:g} (--score-threshold)"]
        sidecar = {"checkpoint": str(request.checkpoint), "source": source, "task": "detection",
                   "classes": names, "category_ids": category_ids, "masks": masks, "score_threshold": threshold,
                   "images": entries, "device": str(request.device)}
        return tf.write(rows, side, header, request.out, sidecar)


def draw_boxes(panel: np.ndarray, where, boxes: list[tuple[np.ndarray, list[float], str]]) -> np.ndarray:
    """Boxes (x1, y1, x2, y2 in image pixels) drawn on a letterboxed panel, each with its label
    on a patch of its colour above it (inside it where the box touches the panel's top)."""
    from PIL import Image, ImageDraw

    from localmim_cli.tasks.figure import font

    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    f = font()
    for colour, (x1, y1, x2, y2), text in boxes:
        fill = tuple(int(c) for c in colour)
        a = (where.x + x1 * where.scale, where.y + y1 * where.scale)
        b = (where.x + x2 * where.scale, where.y + y2 * where.scale)
        draw.rectangle((a[0], a[1], max(b[0], a[0] + 1), max(b[1], a[1] + 1)), outline=fill, width=BOX_PX)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
        w, h = right - left + 4, bottom - top + 3
        ty = a[1] - h if a[1] - h >= 0 else a[1]
        draw.rectangle((a[0], ty, a[0] + w, ty + h), fill=fill)
        dark = sum(fill) > 3 * 150
        draw.text((a[0] + 2 - left, ty + 1 - top), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=f)
    return np.asarray(image)


FIGURE = DetectionFigure()
