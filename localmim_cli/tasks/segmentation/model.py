"""The segmenter: encoder -> multi-scale features (model/feature_pyramid.py) -> UperNet decode
head + FCN auxiliary head, as the published mmsegmentation config builds it.

    images (B, 3, H, W) -> pyramid: 4 levels, strides 4..32
        -> UperNet (PSP on the stride-32 level, top-down FPN, fused at stride 4)
           -> dropout2d -> 1x1 conv: decode logits (B, K, H/4, W/4)
        -> FCN head on level `aux_level` (training only): 3x3 conv-BN-ReLU -> dropout2d -> 1x1 conv

The UperNet body is segmentation_models_pytorch's `UPerNetDecoder` (a maintained implementation
of the same head: lateral 1x1 conv-BN-ReLU, PSP pooling 1/2/3/6, 3x3 FPN convs, fusion conv);
it adds a LayerNorm to each input feature, which mmsegmentation's UPerHead has not, so those
are replaced by identities. Weights start as mmsegmentation's ConvModule starts them (Kaiming
normal, fan_out; BatchNorm 1/0) and the classifiers from N(0, 0.01), zero bias.

The FCN auxiliary head is written here: torchvision's `FCNHead` fixes its hidden width at a
quarter of the input (192 for ViT-B, where the published head has 256) and drops single
activations where the published one (mmsegmentation's) drops whole channels.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from localmim_cli.model.feature_pyramid import StagePyramid, ViTPyramid


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UperNetHead(nn.Module):
    """levels (4 x (B, C_i, H/s_i, W/s_i)) -> logits (B, K, H/4, W/4)."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, dropout: float):
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        # smp counts encoder outputs from stride 1; the two finest (unused by UperNet) are placeholders
        self.body = UPerNetDecoder([0, 0, *in_channels], encoder_depth=5, decoder_channels=channels)
        self.body.feature_norms = nn.ModuleList(nn.Identity() for _ in in_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.body([None, None, *levels])))


class FCNHead(nn.Module):
    """One level (B, C, h, w) -> logits (B, K, h, w): mmsegmentation's FCNHead with one conv."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


def init_head(head: nn.Module) -> None:
    """mmsegmentation's initialisation of its heads (see the module docstring)."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)


class Segmenter(nn.Module):
    """The whole model; `forward` returns the decode logits at stride 4 and, in training with an
    auxiliary head, the auxiliary logits at its level's stride."""

    def __init__(self, pyramid: ViTPyramid | StagePyramid, num_classes: int, decoder_channels: int = 768,
                 aux_channels: int = 256, aux_level: int = 3, aux_weight: float = 0.4, dropout: float = 0.1):
        super().__init__()
        self.pyramid = pyramid
        self.num_classes = num_classes
        channels = pyramid.feature_info.channels()
        self.decode_head = UperNetHead(channels, decoder_channels, num_classes, dropout)
        init_head(self.decode_head)
        self.aux_level, self.aux_weight = aux_level, aux_weight
        self.aux_head = FCNHead(channels[aux_level - 1], aux_channels, num_classes, dropout) if aux_weight > 0 else None
        if self.aux_head is not None:
            init_head(self.aux_head)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        levels = self.pyramid(images)
        logits = self.decode_head(levels)
        aux = self.aux_head(levels[self.aux_level - 1]) if self.aux_head is not None and self.training else None
        return logits, aux

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Decode logits upsampled to the input size (B, K, H, W), as inference scores them."""
        logits = self.decode_head(self.pyramid(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def num_layers(self) -> int:
        return self.pyramid.num_layers

    def layer_of(self, name: str) -> int:
        """The lr-decay layer of a parameter (the pyramid's rule; the heads are the top layer)."""
        if name.startswith("pyramid."):
            return self.pyramid.layer_of(name[len("pyramid."):])
        return self.num_layers - 1


def segmentation_loss(logits: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, (decode, aux)) cross-entropy of logits upsampled to the labels' size, pixels
    labelled 255 counting zero. The mean runs over every pixel, ignored ones included, as
    mmsegmentation 0.11 (the published version) averages (later versions added avg_non_ignore)."""
    from localmim_cli.tasks.segmentation.augment import IGNORE

    def ce(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="none").mean()

    decode = ce(logits)
    aux_loss = ce(aux) if aux is not None else torch.zeros((), device=logits.device)
    return decode + aux_weight * aux_loss, torch.stack([decode.detach(), aux_loss.detach()])
