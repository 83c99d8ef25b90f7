"""Segmenters: an encoder E and a pixel classifier C, the split every method in this package relies on.

CSCL aligns E's features and applies C to them; AdaptSegNet and CIRN put a discriminator on C's output; SLRT adds an
image-level head on E. So every segmenter exposes `encode`, `classify` and `forward = classify ∘ encode`, returns
logits at feature resolution (upsampling to label size belongs to the loss or to evaluation), and splits its
parameters into backbone and head groups (the papers train the head at 10× the backbone learning rate).

`build_segmenter(name, info)` is the one way methods obtain a segmenter, so a new architecture is one more entry in
`ARCHITECTURES`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from methods.contract import TaskInfo


class Segmenter(nn.Module):
    """E → C. Shapes: images (B, C_in, H, W) → features (B, F, H/s, W/s) → logits (B, K, H/s, W/s)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module, feature_channels: int, output_stride: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.feature_channels = feature_channels
        self.output_stride = output_stride

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def classify(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.encode(images))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyEncoder(nn.Module):
    """A small dilated CNN with the interface of the paper backbones, for CPU tests and the synthetic tasks.

    Same recipe as DeepLab's dilated ResNets, scaled down: two stride-2 stages, then two stages that keep the
    resolution and dilate by 2 and 4 instead of striding (output stride 4, about 0.2 M parameters).
    """

    out_channels = 128
    output_stride = 4

    def __init__(self, in_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            _conv_bn_relu(in_channels, 32, stride=2),
            _conv_bn_relu(32, 32),
            _conv_bn_relu(32, 64, stride=2),
            _conv_bn_relu(64, 64),
            _conv_bn_relu(64, 96, dilation=2),
            _conv_bn_relu(96, self.out_channels, dilation=4),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def tiny_segmenter(info: TaskInfo) -> Segmenter:
    encoder = TinyEncoder(info.in_channels)
    classifier = nn.Conv2d(TinyEncoder.out_channels, info.num_classes, kernel_size=1)
    return Segmenter(encoder, classifier, TinyEncoder.out_channels, TinyEncoder.output_stride)


ARCHITECTURES: dict[str, Callable[[TaskInfo], Segmenter]] = {
    "tiny": tiny_segmenter,
}


def build_segmenter(name: str, info: TaskInfo) -> Segmenter:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](info)


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of logits (B, K, h, w) to `size` (H, W), the field's convention before argmax or loss."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def imagenet_normalise(images: Tensor) -> Tensor:
    """Images (B, C, H, W) in [0, 1] → ImageNet-normalised; single-channel images use the channel means."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device, dtype=images.dtype)
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device, dtype=images.dtype)
    if images.shape[1] == 1:
        mean, std = mean.mean().reshape(1), std.mean().reshape(1)
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
