"""The detector: encoder -> multi-scale features (model/feature_pyramid.py) -> neck -> torchvision's
Mask R-CNN (Faster R-CNN without masks), as ViTDet's detectron2 configs build it.

    images -> pyramid: 4 levels at strides 4..32
        ViT:  ViTDet's simple pyramid from the last block (model/simple_pyramid.py), then per level a
              1x1 and a 3x3 convolution, each with a LayerNorm, to `neck_channels` (SimpleFeaturePyramid)
        Swin: its four stages, each behind a LayerNorm, then torchvision's FeaturePyramidNetwork
              (top-down, LayerNorm in its convolutions: ViTDet's Swin configs)
        + a fifth level at stride 64 by a 1x1 max pool of stride 2 (LastLevelMaxPool)
    -> RPN (rpn_convs 3x3 convolutions, anchors anchor_sizes x aspect_ratios, one size per level)
    -> box head: box_convs 3x3 convolutions (LayerNorm) and one fc (ViTDet's 4conv1fc)
    -> mask head: mask_convs 3x3 convolutions (LayerNorm) and the 2x up-convolution predictor

torchvision's detector normalises the images (ImageNet mean and std) and batches them; here the
batch is always padded to the square crop (ViTDet's square_pad), training crops are taken as they
come (large-scale jitter made them), and test images are resized to fit the crop (longest side,
ViTDet's ResizeShortestEdge(crop, max_size=crop)) with the detections scaled back. RoI features
are torchvision's MultiScaleRoIAlign with adaptive sampling (detectron2's sampling_ratio 0; its
ROIAlignV2's half-pixel alignment torchvision's pooler does not take).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from localmim_cli.config.detection import DetModelSettings
from localmim_cli.data.augment import IMAGENET_MEAN, IMAGENET_STD

LEVEL_NAMES = ["0", "1", "2", "3"]   # the RoI poolers' levels (strides 4..32); "pool" is stride 64


def norm_for(kind: str):
    """The neck's and heads' normalisation: detectron2's "LN" (a LayerNorm over channels, eps 1e-6)."""
    from timm.layers import LayerNorm2d
    return functools.partial(LayerNorm2d, eps=1e-6) if kind == "layernorm" else None


def conv_norm(cin: int, cout: int, kernel: int, norm) -> nn.Module:
    """detectron2's Conv2d(..., bias=not norm, norm=...) without activation."""
    from torchvision.ops.misc import Conv2dNormActivation
    return Conv2dNormActivation(cin, cout, kernel, norm_layer=norm, activation_layer=None)


class SimpleNeck(nn.Module):
    """ViTDet's per-level convolutions (no top-down path): 1x1 then 3x3, each with a norm."""

    def __init__(self, in_channels: list[int], channels: int, norm):
        super().__init__()
        self.lateral = nn.ModuleList(conv_norm(c, channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(conv_norm(channels, channels, 3, norm) for _ in in_channels)

    def forward(self, levels: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((name, o(lat(x))) for name, lat, o, x in zip(LEVEL_NAMES, self.lateral, self.output, levels))
        out["pool"] = F.max_pool2d(out[LEVEL_NAMES[-1]], kernel_size=1, stride=2)   # LastLevelMaxPool
        return out


class FPNNeck(nn.Module):
    """torchvision's FeaturePyramidNetwork (with a norm in its convolutions) and LastLevelMaxPool."""

    def __init__(self, in_channels: list[int], channels: int, norm):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        self.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm)

    def forward(self, levels: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(LEVEL_NAMES, levels)))


class DetectionBackbone(nn.Module):
    """pyramid + neck: images (B, 3, S, S) -> OrderedDict of 5 levels (B, neck_channels, S/s, S/s),
    s = 4..64, as torchvision's detectors take a backbone (with `out_channels`)."""

    def __init__(self, pyramid: nn.Module, channels: int, norm_kind: str):
        super().__init__()
        from localmim_cli.model.simple_pyramid import SimplePyramid

        self.pyramid = pyramid
        neck = SimpleNeck if isinstance(pyramid, SimplePyramid) else FPNNeck
        self.neck = neck(pyramid.feature_info.channels(), channels, norm_for(norm_kind))
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.neck(self.pyramid(images))


class SquareTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform, but every batch padded to `side` x `side` (ViTDet's
    square_pad); training images are not resized (the augmentation sized them), test images are
    resized to fit `side` (and the detections scaled back by torchvision's postprocess)."""

    def __init__(self, side: int):
        super().__init__(side, side, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=side, _skip_resize=True)
        self.side = side

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        batch = images[0].new_zeros(len(images), images[0].shape[0], self.side, self.side)
        for i, image in enumerate(images):
            batch[i, :, :image.shape[1], :image.shape[2]].copy_(image)
        return batch


class Detector(FasterRCNN):
    """torchvision's Faster R-CNN with the mask branch of its Mask R-CNN when `masks`, built as the
    settings say; `num_layers` / `layer_of` number its parameters for layer-wise lr decay."""

    def __init__(self, backbone: DetectionBackbone, num_classes: int, m: DetModelSettings):
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
        from torchvision.models.detection.rpn import RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        c, norm = backbone.out_channels, norm_for(m.head_norm)
        anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes), (tuple(m.aspect_ratios),) * len(m.anchor_sizes))
        super().__init__(
            backbone, num_classes=None, min_size=m.img_size, max_size=m.img_size,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=m.rpn_convs),
            rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_train=m.rpn_train_proposals, rpn_post_nms_top_n_test=m.rpn_test_proposals,
            rpn_batch_size_per_image=m.rpn_batch,
            box_roi_pool=MultiScaleRoIAlign(LEVEL_NAMES, output_size=7, sampling_ratio=0),
            box_head=FastRCNNConvFCHead((c, 7, 7), [c] * m.box_convs, [m.box_fc], norm_layer=norm),
            box_predictor=FastRCNNPredictor(m.box_fc, num_classes + 1),
            box_score_thresh=m.score_thresh, box_nms_thresh=m.nms_thresh, box_detections_per_img=m.detections,
            box_batch_size_per_image=m.roi_batch)
        self.transform = SquareTransform(m.img_size)
        self.num_classes = num_classes
        if m.masks:
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
            self.roi_heads.mask_roi_pool = MultiScaleRoIAlign(LEVEL_NAMES, output_size=14, sampling_ratio=0)
            self.roi_heads.mask_head = MaskRCNNHeads(c, [c] * m.mask_convs, 1, norm_layer=norm)
            self.roi_heads.mask_predictor = MaskRCNNPredictor(c, c, num_classes + 1)

    @property
    def num_layers(self) -> int:
        return self.backbone.pyramid.num_layers

    def layer_of(self, name: str) -> int:
        """The pyramid's rule for the encoder; the neck and heads are the top layer (lr scale 1)."""
        prefix = "backbone.pyramid."
        if name.startswith(prefix):
            return self.backbone.pyramid.layer_of(name[len(prefix):])
        return self.num_layers - 1


def detection_loss(losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, parts) of torchvision's loss dict, parts in LOSS_NAMES order (zero where absent)."""
    total = sum(losses.values())
    device = total.device
    parts = torch.stack([losses.get(k, torch.zeros((), device=device)).detach().float() for k in LOSS_NAMES])
    return total, parts


LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask")
