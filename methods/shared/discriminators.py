"""Fully convolutional discriminators of the papers: five convolutions, LeakyReLU 0.2 between them, no normalisation.

| constructor | channels | kernel, stride | output | used by |
|---|---|---|---|---|
| `output_space_discriminator` | 64, 128, 256, 512, 1 | 4, 2 | logits | AdaptSegNet, CSCL's D, CIRN's D (conventions.md) |
| `slrt_discriminator` | 16, 32, 64, 64, 1 | 3, 2 | logits | SLRT Sec. 3.3 "5 convolutional layers with stride of 2 and kernel of 3" |
| `tdtf_feature_discriminator` | 16, 32, 64, 64, 1 | 4, 2 (not printed) | sigmoid | TD/TF's D_F Sec. 4 ("activated by the sigmoid function") |

TD/TF does not print D_F's kernel size or stride; we use the 4x4 stride-2 convolutions of the output-space
discriminator family it cites.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ConvDiscriminator(nn.Module):
    """(B, C, H, W) → (B, 1, H/32, W/32) for sizes divisible by 32: five stride-2 convolutions with padding 1, which
    halve even sizes for both 4x4 and 3x3 kernels."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512, 1),
        kernel_size: int = 4,
        stride: int = 2,
        negative_slope: float = 0.2,
        sigmoid: bool = False,
        downsampling: int | None = None,
    ):
        """`downsampling`: how many of the first convolutions use `stride` (the rest stride 1); default all."""
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        strided = len(channels) if downsampling is None else downsampling
        for index, width in enumerate(channels):
            layers.append(nn.Conv2d(previous, width, kernel_size, stride=stride if index < strided else 1, padding=1))
            if index < len(channels) - 1:
                layers.append(nn.LeakyReLU(negative_slope, inplace=True))
            previous = width
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.model = nn.Sequential(*layers)
        self.sigmoid = sigmoid

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def output_space_discriminator(in_channels: int) -> ConvDiscriminator:
    return ConvDiscriminator(in_channels, (64, 128, 256, 512, 1), kernel_size=4, stride=2)


def slrt_discriminator(in_channels: int) -> ConvDiscriminator:
    return ConvDiscriminator(in_channels, (16, 32, 64, 64, 1), kernel_size=3, stride=2)


def tdtf_feature_discriminator(in_channels: int) -> ConvDiscriminator:
    return ConvDiscriminator(in_channels, (16, 32, 64, 64, 1), kernel_size=4, stride=2, sigmoid=True)
