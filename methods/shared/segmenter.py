"""Segmenters: an encoder E and a pixel classifier C, the split every method in this package relies on.

CSCL aligns E's features and applies C to them; AdaptSegNet and CIRN put a discriminator on C's output; SLRT adds an
image-level head on E. So every segmenter exposes `encode(images) -> Features`, `classify(features) -> logits` and
`forward = classify ∘ encode`, returns logits at its output stride (upsampling to label size belongs to the loss or
to evaluation), and splits its parameters into backbone and head groups (the head trains at 10x the learning rate).

`Features.main` is what E produces and what aligners see (B, F, h, w); `Features.skips` holds extra encoder maps that
a classifier fuses (FCN-8s: pool4 and pool3) and that nobody else needs.

`build_segmenter(name, info, ...)` is the one way methods obtain a segmenter; a new architecture is one more entry in
`ARCHITECTURES`:

| name | E | C | paper use |
|---|---|---|---|
| tiny | 6-layer dilated CNN, stride 4 | 1x1 conv | CPU tests, synthetic tasks |
| deeplabv2_resnet101 | ResNet-101, output stride 8 | ASPP-v2: four 3x3 branches, dilations 6/12/18/24, summed | CSCL, CIRN, AdaptSegNet |
| deeplabv2_resnet101_aspp_first_two | same | the widely copied variant that returns after 2 branches | only to reproduce that code |
| deeplabv3_resnet101 | ResNet-101, output stride 8 | ASPP-v3 (1x1, 3 atrous 3x3, image pooling, BN) | TD/TF |
| deeplabv3_resnet50 | ResNet-50, output stride 8, multi-grid (1, 2, 4) | ASPP-v3 | SLRT |
| fcn8s_vgg16 | VGG-16 + fc6/fc7 as convolutions | score layers fused with pool4 and pool3 | CSCL (VGG setting) |
| seuda_resnet101 | ResNet-101 layout at half width (32 in the first layer), output stride 8 | ASPP-v2 | SeUDA |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import TaskInfo
from methods.shared.backbones import VGG16, ResNet, freeze_batchnorm, load_pretrained, resnet50, resnet101


class Features(NamedTuple):
    main: Tensor
    skips: tuple[Tensor, ...] = ()


class Segmenter(nn.Module):
    """E → C. Shapes: images (B, C_in, H, W) → Features.main (B, F, H/s, W/s) → logits (B, K, H/s', W/s')."""

    def __init__(
        self, encoder: nn.Module, classifier: nn.Module, feature_channels: int, output_stride: int, input_channels: int
    ):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.feature_channels = feature_channels
        self.output_stride = output_stride
        self.input_channels = input_channels  # what the encoder's first layer takes; grey images are replicated

    def encode(self, images: Tensor) -> Features:
        if images.shape[1] == 1 and self.input_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        features = self.encoder(images)
        return features if isinstance(features, Features) else Features(features)

    def classify(self, features: Features) -> Tensor:
        return self.classifier(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.encode(images))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()


# ---------------------------------------------------------------------------------------------------- heads


class PixelClassifier(nn.Conv2d):
    """A 1x1 convolution over `Features.main` to K classes."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, 1)

    def forward(self, features: Features) -> Tensor:  # type: ignore[override]
        return super().forward(features.main)


class DeepLabV2ASPP(nn.Module):
    """DeepLab-v2's classifier: four parallel 3x3 convolutions (dilations 6, 12, 18, 24) to K classes, outputs SUMMED.

    `first_two_branches=True` reproduces a widely copied implementation whose loop returns after the second branch;
    it exists only to compare against numbers produced by that code and is never the default.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations=(6, 12, 18, 24), first_two_branches: bool = False):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        self.first_two_branches = first_two_branches
        for branch in self.branches:
            nn.init.normal_(branch.weight, 0, 0.01)  # DeepLab-v2's initialisation of the classifier
            nn.init.zeros_(branch.bias)

    def forward(self, features: Features) -> Tensor:
        branches = self.branches[:2] if self.first_two_branches else self.branches
        return sum(branch(features.main) for branch in branches)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabV3Head(nn.Module):
    """DeepLab-v3 (Chen et al. 2017, Sec. 3.3): ASPP = one 1x1 and three atrous 3x3 convolutions plus image-level
    pooling, 256 channels each with batch norm, concatenated, a 1x1 convolution (256, BN), then 1x1 to K classes.
    Rates (6, 12, 18) at output stride 16, doubled at output stride 8."""

    def __init__(self, in_channels: int, num_classes: int, rates=(12, 24, 36), channels: int = 256):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)]
            + [_conv_bn_relu(in_channels, channels, 3, rate) for rate in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.project = _conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Features) -> Tensor:
        x = features.main
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1)))

    def embed(self, features: Features) -> Tensor:
        """The projection's output (B, 256, h, w), the pixel features the final 1x1 `classifier` maps to K logits:
        `classifier(embed(f))` equals `forward(f)` (SLRT's "pixel feature maps by subnet S2", Alg. 3 line 5)."""
        x = features.main
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class FCN8sEncoder(nn.Module):
    """VGG-16 features with fc6/fc7 as convolutions (7x7 → 4096, 1x1 → 4096); Features(fc7, skips=(pool4, pool3)).

    Deviation from the Caffe original: same-size convolutions and bilinear resizing instead of its 100-pixel input
    padding and crops (same parameters, no crop offsets to get wrong)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.features = VGG16(in_channels=in_channels).features
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop = nn.Dropout2d(0.5)

    def forward(self, images: Tensor) -> Features:
        pool3 = self.features[: VGG16.POOL3 + 1](images)
        pool4 = self.features[VGG16.POOL3 + 1 : VGG16.POOL4 + 1](pool3)
        pool5 = self.features[VGG16.POOL4 + 1 :](pool4)
        fc7 = self.drop(F.relu(self.fc7(self.drop(F.relu(self.fc6(pool5))))))
        return Features(fc7, (pool4, pool3))


class FCN8sHead(nn.Module):
    """FCN-8s skip fusion: score(fc7) ↑2 + score(pool4), ↑2 + score(pool3); logits at stride 8.

    The reference FCN-8s upsamples with deconvolutions initialised to bilinear kernels and frozen (lr_mult 0), which
    is bilinear interpolation; implemented as such. The final 8x upsampling is left to the caller like every head."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        for layer in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(layer.weight)  # FCN's "surgery" initialises the score layers at zero
            nn.init.zeros_(layer.bias)

    def forward(self, features: Features) -> Tensor:
        pool4, pool3 = features.skips
        score = self.score_fr(features.main)
        score = _resize(score, pool4) + self.score_pool4(pool4)
        return _resize(score, pool3) + self.score_pool3(pool3)


def _resize(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ImageClassifier(nn.Module):
    """Image-level classification head on a shared encoder (SLRT's S1): global average pooling, then 1x1 → logits
    (B, num_outputs)."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.fc = nn.Conv2d(in_channels, num_outputs, 1)

    def forward(self, features: Features) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(features.main, 1)).flatten(1)


# ---------------------------------------------------------------------------------------------------- tiny


def _tiny_conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyEncoder(nn.Module):
    """A small dilated CNN with the interface of the paper backbones, for CPU tests and the synthetic tasks.

    DeepLab's recipe scaled down: two stride-2 stages, then two stages that dilate (2, 4) instead of striding
    (output stride 4, about 0.2 M parameters)."""

    out_channels = 128
    output_stride = 4

    def __init__(self, in_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            _tiny_conv(in_channels, 32, stride=2),
            _tiny_conv(32, 32),
            _tiny_conv(32, 64, stride=2),
            _tiny_conv(64, 64),
            _tiny_conv(64, 96, dilation=2),
            _tiny_conv(96, self.out_channels, dilation=4),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


# ---------------------------------------------------------------------------------------------------- registry


def _resnet_weights(encoder: ResNet, path: str) -> None:
    if path:
        load_pretrained(encoder, path, ignore_prefixes=("fc.",))


def tiny(info: TaskInfo, backbone_weights: str = "", freeze_bn: bool = False) -> Segmenter:
    if backbone_weights:
        raise ValueError("the tiny architecture has no pretrained weights; leave backbone_weights empty")
    encoder = TinyEncoder(info.in_channels)
    if freeze_bn:
        freeze_batchnorm(encoder)
    return Segmenter(
        encoder,
        PixelClassifier(TinyEncoder.out_channels, info.num_classes),
        TinyEncoder.out_channels,
        TinyEncoder.output_stride,
        info.in_channels,
    )


def _deeplabv2(first_two_branches: bool) -> Callable[..., Segmenter]:
    def build(info: TaskInfo, backbone_weights: str = "", freeze_bn: bool = True) -> Segmenter:
        encoder = resnet101(output_stride=8)
        _resnet_weights(encoder, backbone_weights)
        if freeze_bn:
            freeze_batchnorm(encoder)
        head = DeepLabV2ASPP(encoder.out_channels, info.num_classes, first_two_branches=first_two_branches)
        return Segmenter(encoder, head, encoder.out_channels, 8, 3)

    return build


def _deeplabv3(depth: int) -> Callable[..., Segmenter]:
    def build(info: TaskInfo, backbone_weights: str = "", freeze_bn: bool = False) -> Segmenter:
        # SLRT: ResNet-50 with dilations {1, 2, 4} in the last block; TD/TF: ResNet-101, last two strides 1.
        encoder = resnet50(output_stride=8, multi_grid=(1, 2, 4)) if depth == 50 else resnet101(output_stride=8)
        _resnet_weights(encoder, backbone_weights)
        if freeze_bn:
            freeze_batchnorm(encoder)
        return Segmenter(encoder, DeepLabV3Head(encoder.out_channels, info.num_classes), encoder.out_channels, 8, 3)

    return build


def fcn8s_vgg16(info: TaskInfo, backbone_weights: str = "", freeze_bn: bool = False) -> Segmenter:
    encoder = FCN8sEncoder()
    if backbone_weights:
        load_pretrained(
            encoder,
            backbone_weights,
            ignore_prefixes=("classifier.6.",),
            reshape={
                "classifier.0.weight": "fc6.weight",
                "classifier.0.bias": "fc6.bias",
                "classifier.3.weight": "fc7.weight",
                "classifier.3.bias": "fc7.bias",
            },
        )
    return Segmenter(encoder, FCN8sHead(info.num_classes), 4096, 8, 3)


def seuda_resnet101(info: TaskInfo, backbone_weights: str = "", freeze_bn: bool = False) -> Segmenter:
    """SeUDA Sec. 2.1: ResNet-101 with dilated high-level blocks, 32 feature maps in the first layer, doubling when
    the size halves or dilation starts (widths 32/64/128/256 for layer1-4, output stride 8), four parallel 3x3
    dilated branches (6, 12, 18, 24); trained from scratch on X-rays in the paper, so no ImageNet weights."""
    if backbone_weights:
        raise ValueError("seuda_resnet101 is half-width: torchvision ImageNet weights do not fit it")
    encoder = ResNet((3, 4, 23, 3), output_stride=8, in_channels=info.in_channels, stem_width=32)
    return Segmenter(
        encoder, DeepLabV2ASPP(encoder.out_channels, info.num_classes), encoder.out_channels, 8, info.in_channels
    )


ARCHITECTURES: dict[str, Callable[..., Segmenter]] = {
    "tiny": tiny,
    "deeplabv2_resnet101": _deeplabv2(first_two_branches=False),
    "deeplabv2_resnet101_aspp_first_two": _deeplabv2(first_two_branches=True),
    "deeplabv3_resnet101": _deeplabv3(101),
    "deeplabv3_resnet50": _deeplabv3(50),
    "fcn8s_vgg16": fcn8s_vgg16,
    "seuda_resnet101": seuda_resnet101,
}


def build_segmenter(name: str, info: TaskInfo, backbone_weights: str = "", freeze_bn: bool | None = None) -> Segmenter:
    """`freeze_bn=None` keeps the architecture's convention (frozen for DeepLab-v2 at batch size 1)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    kwargs = {} if freeze_bn is None else {"freeze_bn": freeze_bn}
    return ARCHITECTURES[name](info, backbone_weights=backbone_weights, **kwargs)


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of logits (B, K, h, w) to `size` (H, W), the field's convention before argmax or loss."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def imagenet_normalise(images: Tensor) -> Tensor:
    """Images (B, C, H, W) in [0, 1] → ImageNet-normalised; single-channel images use the channel means."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device, dtype=images.dtype)
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device, dtype=images.dtype)
    if images.shape[1] == 1:
        mean, std = mean.mean().reshape(1), std.mean().reshape(1)
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def encode_levels(segmenter: Segmenter, images: Tensor) -> tuple[Tensor, Features]:
    """E's bottom-block map and its usual `Features`, in one pass: (low, features) with `features` equal to
    `segmenter.encode(images)`. low is ResNet's layer1 output (B, 4·stem, H/4, W/4), or the tiny encoder's first two
    layers (B, 32, H/2, W/2). TD/TF's feature augmentor reads "the features from the bottom and the last
    convolutional blocks of S" (Sec. 3.5). Other encoders raise."""
    if images.shape[1] == 1 and segmenter.input_channels == 3:
        images = images.expand(-1, 3, -1, -1)
    encoder = segmenter.encoder
    if isinstance(encoder, ResNet):
        low = encoder.layer1(encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(images)))))
        return low, Features(encoder.layer4(encoder.layer3(encoder.layer2(low))))
    if isinstance(encoder, TinyEncoder):
        low = encoder.layers[:2](images)
        return low, Features(encoder.layers[2:](low))
    raise ValueError(f"no bottom-block features for a {type(encoder).__name__} encoder (ResNet and tiny have them)")


def low_level_channels(segmenter: Segmenter) -> int:
    """Channels of `encode_levels`'s low map."""
    encoder = segmenter.encoder
    if isinstance(encoder, ResNet):
        return encoder.layer1[-1].conv3.out_channels
    if isinstance(encoder, TinyEncoder):
        return encoder.layers[1][0].out_channels
    raise ValueError(f"no bottom-block features for a {type(encoder).__name__} encoder (ResNet and tiny have them)")


# The torchvision ImageNet file each architecture's backbone loads (https://download.pytorch.org/models/<file>), for
# the one-line error that asks for it on paper tasks (contract.Method.imagenet_backbone).
IMAGENET_FILES = {
    "deeplabv2_resnet101": "resnet101-63fe2227.pth",
    "deeplabv2_resnet101_aspp_first_two": "resnet101-63fe2227.pth",
    "deeplabv3_resnet101": "resnet101-63fe2227.pth",
    "deeplabv3_resnet50": "resnet50-0676ba61.pth",
    "fcn8s_vgg16": "vgg16-397923af.pth",
}
