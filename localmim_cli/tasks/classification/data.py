"""Classification training data: timm's training transform (RandAugment, random erasing),
Mixup/CutMix per batch, and the matching loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localmim_cli.config.schema import FinetuneSettings


def train_transform(settings: "FinetuneSettings", img_size: int):
    from timm.data import create_transform

    from localmim_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
    d = settings.data
    return create_transform(input_size=img_size, is_training=True, scale=d.crop_scale, hflip=d.hflip,
                            color_jitter=d.color_jitter, auto_augment=d.auto_augment or None,
                            interpolation=d.interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            re_prob=d.reprob, re_mode=d.remode, re_count=d.recount)


def criterion(settings: "FinetuneSettings"):
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if settings.mixup.active:
        return SoftTargetCrossEntropy()   # Mixup makes smoothed soft targets itself
    if settings.optim.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=settings.optim.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def mixer(settings: "FinetuneSettings", num_classes: int):
    if not settings.mixup.active:
        return None
    from timm.data import Mixup
    mx = settings.mixup
    return Mixup(mixup_alpha=mx.mixup, cutmix_alpha=mx.cutmix, cutmix_minmax=mx.cutmix_minmax, prob=mx.prob,
                 switch_prob=mx.switch_prob, mode=mx.mode, label_smoothing=settings.optim.label_smoothing,
                 num_classes=num_classes)
