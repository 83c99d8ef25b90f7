"""The segmenter training recipe the papers share, as a Hyperparams base that methods extend.

DeepLab-v2 on ResNet-101 from ImageNet weights, SGD with momentum 0.9 and weight decay 5e-4, learning rate 2.5e-4 with
the poly policy (power 0.9), the classifier head at 10x, batch size 1 with frozen batch norm: CSCL Sec. 3.5, CIRN
Implementation details, AdaptSegNet, and ../shared/reference/conventions.md. A method whose paper prints another
value overrides the field's default in its own Hyperparams, citing its paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.contract import RANDOM_INIT, Optim, TaskInfo, WeightsFile, require
from methods.shared.optim import poly_schedule, segmenter_sgd
from methods.shared.segmenter import ARCHITECTURES, Segmenter, build_segmenter


@dataclass(frozen=True)
class SegmenterRecipe:
    architecture: str = "deeplabv2_resnet101"  # E + C: DeepLab-v2 ResNet-101 (CSCL Sec. 3.5, CIRN Impl. details)
    # ImageNet-pretrained backbone, torchvision format, by path (all papers); "random": random init on purpose
    backbone_weights: WeightsFile = ""
    freeze_batchnorm: bool = True  # batch size 1: batch-norm statistics stay as loaded (DeepLab-v2 convention)
    learning_rate: float = 2.5e-4  # SGD initial learning rate (CSCL Sec. 3.5, CIRN Impl. details)
    momentum: float = 0.9  # CIRN Impl. details
    weight_decay: float = 5e-4  # CIRN Impl. details
    poly_power: float = 0.9  # poly policy (CSCL Sec. 3.5)
    head_lr_multiplier: float = 10.0  # classifier head at 10x (DeepLab-v2 convention, conventions.md)
    batch_size: int = 1  # CSCL Sec. 3.5, CIRN Impl. details

    def __post_init__(self) -> None:
        require(
            self.architecture in ARCHITECTURES,
            f"architecture must be one of {', '.join(sorted(ARCHITECTURES))} (got {self.architecture!r})",
        )
        require(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate})")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        require(self.poly_power >= 0, f"poly_power must be >= 0 (got {self.poly_power})")
        require(self.head_lr_multiplier > 0, f"head_lr_multiplier must be > 0 (got {self.head_lr_multiplier})")
        require(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        require(
            not self.architecture.startswith("deeplabv3") or self.batch_size >= 2,
            f"{self.architecture} needs batch_size >= 2 per worker: the batch norm of its image-pooling branch "
            f"cannot train on one image (got {self.batch_size})",
        )


def recipe_segmenter(hp: SegmenterRecipe, info: TaskInfo) -> Segmenter:
    weights = "" if hp.backbone_weights == RANDOM_INIT else hp.backbone_weights
    return build_segmenter(hp.architecture, info, weights, hp.freeze_batchnorm)


def recipe_optim(hp: SegmenterRecipe, segmenter: Segmenter, num_steps: int) -> Optim:
    sgd = segmenter_sgd(segmenter, hp.learning_rate, hp.momentum, hp.weight_decay, hp.head_lr_multiplier)
    return Optim(sgd, poly_schedule(sgd, num_steps, hp.poly_power))
