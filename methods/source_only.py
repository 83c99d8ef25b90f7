"""Source only: the segmenter trained on labelled source images, evaluated on the target domain.

The "Source only" rows of every table the platform reproduces (CSCL Tables 1-3, ../shared/papers/002_c46badf92f1b9b44.txt;
CIRN Tables 1-2, 004_f2fbc54fd8dcd3d8.txt; the TD/TF and SLRT baselines): DeepLab-v2 on ResNet-101 trained with
pixel-wise cross-entropy on the source domain with SGD, poly schedule, and nothing else.

Batch-norm statistics: target images never pass through the network in train mode. This method never looks at
`Batch.target_image` at all, so its batch-norm running statistics are estimated from source images only (a classic
leak in baseline implementations that forward target batches in train mode; see ../shared/reference/conventions.md).

Deviations: none in the method. The default `architecture` is the small CPU network until the paper backbones land in
`methods/shared` (issue "Building blocks"); the paper tasks then default to `deeplabv2_resnet101`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods.contract import Batch, Method, Optim, Stage, StepContext, TaskInfo, require
from methods.shared.losses import segmentation_loss
from methods.shared.optim import poly_schedule, segmenter_sgd
from methods.shared.segmenter import ARCHITECTURES, build_segmenter, imagenet_normalise, upsample


@dataclass(frozen=True)
class Hyperparams:
    architecture: str = "tiny"  # segmenter E+C; the papers use DeepLab-v2 ResNet-101 (CSCL Sec. 3.5, CIRN Impl.)
    learning_rate: float = 2.5e-4  # SGD initial learning rate of the segmenter, CSCL Sec. 3.5, CIRN Impl. details
    momentum: float = 0.9  # SGD momentum, CIRN Impl. details
    weight_decay: float = 5e-4  # CIRN Impl. details
    poly_power: float = 0.9  # poly learning-rate policy, CSCL Sec. 3.5
    head_lr_multiplier: float = 10.0  # classifier head at 10x lr, DeepLab-v2 convention (conventions.md)
    batch_size: int = 1  # CSCL Sec. 3.5 and CIRN Impl. details: batch size 1

    def __post_init__(self) -> None:
        require(self.architecture in ARCHITECTURES,
                f"architecture must be one of {', '.join(sorted(ARCHITECTURES))} (got {self.architecture!r})")
        require(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate})")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        require(self.poly_power >= 0, f"poly_power must be >= 0 (got {self.poly_power})")
        require(self.head_lr_multiplier > 0, f"head_lr_multiplier must be > 0 (got {self.head_lr_multiplier})")
        require(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    return nn.ModuleDict({"segmenter": build_segmenter(hp.architecture, info)})


def optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    sgd = segmenter_sgd(modules["segmenter"], hp.learning_rate, hp.momentum, hp.weight_decay, hp.head_lr_multiplier)
    return {"segmenter": Optim(sgd, poly_schedule(sgd, num_steps, hp.poly_power))}


def train_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    segmenter = ctx.modules["segmenter"]
    optimizer = ctx.optimizers["segmenter"]
    logits = segmenter(imagenet_normalise(batch.source_image))
    loss = segmentation_loss(logits, batch.source_label, ctx.info.ignore_index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss_seg_source": loss.detach()}


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    return (Stage(name="source", trains=("segmenter",), budget_share=1.0, optimizers=optimizers, step=train_step,
                  uses_target=False),)


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: str) -> Tensor:
    return upsample(modules["segmenter"](imagenet_normalise(images)), tuple(images.shape[-2:]))


METHOD = Method(
    name="source_only",
    paper="Source-only baseline of every paper here (e.g. CSCL, ECCV 2020, Table 1; ../shared/papers/002_c46badf92f1b9b44.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=("synthetic-urban", "synthetic-endoscopy", "synthetic-cxr", "gta5-cityscapes"),
)
