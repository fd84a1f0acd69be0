"""Large-scale jitter, ViTDet's training augmentation (detectron2's LSJ data loader), per sample:

    horizontal flip          probability hflip (first, as detectron2 orders them)
    ResizeScale              s ~ U(scale_range); the image resized (keep ratio, PIL bilinear) to fit
                             crop*s x crop*s, sides rounded
    FixedSizeCrop            a random crop x crop window where the image is larger (one uniform
                             draw places it on both axes), no padding here (the detector pads to
                             the square crop)
    boxes recomputed         from the cropped masks (detectron2's recompute_boxes); instances
                             that leave the crop are dropped

Polygons are moved with the image and rasterised at the crop (pycocotools), as exact as the
annotation; RLE masks are decoded at the image's size and sampled (nearest). Without masks the
boxes are moved and clipped to the crop. Every draw comes from the sample's own generator, so a
sample is the same in any worker and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from localmim_cli.tasks.detection.data import Instance, instance_mask

MIN_SIDE = 1e-5   # detectron2's Boxes.nonempty threshold


@dataclass(frozen=True)
class LargeScaleJitter:
    crop: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5

    def __call__(self, rgb: np.ndarray, instances: Sequence[Instance], masks: bool, generator: torch.Generator
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(H, W, 3) uint8 RGB and its instances -> (3, h, w) float in [0, 1] (h, w <= crop) and the target."""
        height, width = rgb.shape[:2]
        flip = bool(torch.rand(1, generator=generator).item() < self.hflip)
        scale = float(torch.empty(1, dtype=torch.float64).uniform_(*self.scale_range, generator=generator))
        factor = min(self.crop * scale / height, self.crop * scale / width)
        new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
        crop_h, crop_w = min(self.crop, new_h), min(self.crop, new_w)
        shift = float(torch.rand(1, dtype=torch.float64, generator=generator))
        top, left = round((new_h - crop_h) * shift), round((new_w - crop_w) * shift)
        fy, fx = new_h / height, new_w / width

        if flip:
            rgb = rgb[:, ::-1]
        # resizing only the part the crop keeps: the same sampling as resizing all, then cropping
        box = (left / fx, top / fy, (left + crop_w) / fx, (top + crop_h) / fy)
        out = Image.fromarray(np.ascontiguousarray(rgb)).resize((crop_w, crop_h), Image.BILINEAR, box=box)
        image = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div_(255)

        def move(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xs = width - xs if flip else xs
            return xs * fx - left, ys * fy - top

        labels, boxes, stack = [], [], []
        for inst in instances:
            if masks:
                m = self._mask(inst, height, width, flip, move, (top, left, crop_h, crop_w), (fy, fx))
                ys, xs = np.nonzero(m)
                if not len(xs):
                    continue
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])   # BitMasks.get_bounding_boxes
                stack.append(m)
            else:
                x, y, w, h = inst.box
                x1, y1 = move(np.array([x + w if flip else x]), np.array([y]))
                x2, y2 = move(np.array([x if flip else x + w]), np.array([y + h]))
                b = [float(np.clip(x1[0], 0, crop_w)), float(np.clip(y1[0], 0, crop_h)),
                     float(np.clip(x2[0], 0, crop_w)), float(np.clip(y2[0], 0, crop_h))]
                if b[2] - b[0] <= MIN_SIDE or b[3] - b[1] <= MIN_SIDE:
                    continue
                boxes.append(b)
            labels.append(inst.label)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        if masks:
            target["masks"] = (torch.from_numpy(np.stack(stack)) if stack
                               else torch.zeros(0, crop_h, crop_w, dtype=torch.uint8))
        return image, target

    @staticmethod
    def _mask(inst: Instance, height: int, width: int, flip: bool, move, window: tuple[int, int, int, int],
              factors: tuple[float, float]) -> np.ndarray:
        """The instance's mask in the crop, (crop_h, crop_w) uint8."""
        from pycocotools import mask as mask_utils

        top, left, crop_h, crop_w = window
        if isinstance(inst.segmentation, list):
            polys = []
            for poly in inst.segmentation:
                xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                xs, ys = move(xy[:, 0], xy[:, 1])
                polys.append(np.stack([xs, ys], axis=1).ravel().tolist())
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, crop_h, crop_w)))
        full = instance_mask(inst, height, width)
        if flip:
            full = full[:, ::-1]
        fy, fx = factors
        rows = np.minimum(((top + np.arange(crop_h) + 0.5) / fy).astype(np.int64), height - 1)
        cols = np.minimum(((left + np.arange(crop_w) + 0.5) / fx).astype(np.int64), width - 1)
        return np.ascontiguousarray(full[rows[:, None], cols[None, :]])
