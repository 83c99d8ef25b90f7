"""ResNet-50/101 and VGG-16 whose parameter names and shapes match torchvision's, so ImageNet weights load by path.

ResNet is the torchvision layout ("v1.5": the stride of a bottleneck sits on its 3x3 convolution). DeepLab-v2's
original Caffe ResNet puts it on the first 1x1 convolution; with torchvision ImageNet weights (what users can download
today) we follow the torchvision layout, a documented deviation that changes no parameter shape.

Output stride: 8 replaces the strides of layer3 and layer4 by dilations 2 and 4 (DeepLab-v2, CSCL, CIRN, TD/TF:
"last two strides 1"); 16 dilates layer4 only. As in torchvision, the first block of a dilated stage keeps the
previous dilation in its 3x3 convolution. `multi_grid` multiplies layer4's dilation per block (DeepLab-v3's
multi-grid; SLRT's "dilations {1, 2, 4} in the last block").

Frozen batch norm (`freeze_batchnorm`): the statistics and affine parameters stay as loaded (the usual choice at batch
size 1, where batch statistics are meaningless). Implemented by keeping BatchNorm modules in eval mode with gradients
off, so state-dict keys stay torchvision's.

No download ever happens: `load_pretrained(module, path)` reads a file the user already has.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet. `forward` returns layer4's features (B, 2048, H/s, W/s) or, with a classifier
    (num_classes > 0), ImageNet logits."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 0,
        output_stride: int = 32,
        in_channels: int = 3,
        stem_width: int = 64,
        multi_grid: Sequence[int] = (1, 1, 1),
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32 (got {output_stride})")
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        self.inplanes, self.dilation, self.stem_width = stem_width, 1, stem_width
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(stem_width, layers[0])
        self.layer2 = self._layer(stem_width * 2, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._layer(stem_width * 4, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._layer(stem_width * 8, layers[3], stride=2, dilate=dilate[2], multi_grid=multi_grid)
        self.out_channels = stem_width * 8 * Bottleneck.expansion
        self.output_stride = output_stride
        if num_classes > 0:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.out_channels, num_classes)
        self.num_classes = num_classes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _layer(
        self, planes: int, blocks: int, stride: int = 1, dilate: bool = False, multi_grid: Sequence[int] = (1, 1, 1)
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        grid = list(multi_grid) + [multi_grid[-1]] * max(0, blocks - len(multi_grid))
        units = [Bottleneck(self.inplanes, planes, stride, previous_dilation * grid[0], downsample)]
        self.inplanes = planes * Bottleneck.expansion
        for index in range(1, blocks):
            units.append(Bottleneck(self.inplanes, planes, dilation=self.dilation * grid[index]))
        return nn.Sequential(*units)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.num_classes:
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return x


def resnet50(**kwargs) -> ResNet:
    return ResNet((3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet((3, 4, 23, 3), **kwargs)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """torchvision-compatible VGG-16 (configuration D, no batch norm): `features.N` and `classifier.{0,3,6}`."""

    POOL3, POOL4, POOL5 = 16, 23, 30  # indices of the max-pool layers in `features`

    def __init__(self, num_classes: int = 0, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        if num_classes > 0:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, num_classes),
            )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.num_classes:
            return self.classifier(torch.flatten(self.avgpool(x), 1))
        return x


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Keep every BatchNorm of `module` in eval mode with its affine parameters frozen, whatever `train()` says."""
    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.eval()
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
        bn.train = _stay_in_eval.__get__(bn)  # type: ignore[method-assign]
    return module


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    self.training = False
    return self


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class WeightsMismatchError(ValueError):
    pass


def load_pretrained(
    module: nn.Module, path: str, ignore_prefixes: Sequence[str] = (), reshape: dict[str, str] | None = None
) -> None:
    """Load a torchvision-format state dict file into `module`, strictly.

    `ignore_prefixes`: keys of the file the module deliberately lacks (an ImageNet classifier: "fc.").
    `reshape`: {file key: module key} for tensors that keep their values but change shape (VGG's fully connected
    fc6/fc7 as convolutions in FCN-8s). Any other missing, unexpected or mis-shaped key raises WeightsMismatchError
    naming the keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    reshape = reshape or {}
    expected = module.state_dict()
    state = {}
    unexpected, mis_shaped = [], []
    for key, tensor in loaded.items():
        if any(key.startswith(p) for p in ignore_prefixes):
            continue
        target = reshape.get(key, key)
        if target not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[target].shape):
            if target in reshape.values() and tensor.numel() == expected[target].numel():
                tensor = tensor.reshape(expected[target].shape)
            else:
                mis_shaped.append(f"{key} {tuple(tensor.shape)} vs {tuple(expected[target].shape)}")
                continue
        state[target] = tensor
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches: {_first(mis_shaped)}")
    if problems:
        raise WeightsMismatchError(f"{path} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)


def _first(keys: list[str], shown: int = 5) -> str:
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
