"""Source only: the segmenter trained on labelled source images, evaluated on the target domain.

The "Source only" rows of every table the platform reproduces (CSCL Tables 1-3, ../shared/papers/002_c46badf92f1b9b44.txt;
CIRN Tables 1-2, 004_f2fbc54fd8dcd3d8.txt; the TD/TF and SLRT baselines): DeepLab-v2 on ResNet-101 trained with
pixel-wise cross-entropy on the source domain with the shared recipe (methods/shared/recipes.py), nothing else.

Batch-norm statistics: target images never pass through the network in train mode. The stage declares
`uses_target=False`, so the platform never even loads target training images for it; batch-norm running statistics
are estimated from source images only (a classic leak in baselines that forward target batches in train mode).

Deviations: none in the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods.contract import Batch, Method, Optim, Stage, StagePosition, StepContext, TaskInfo, require, steps
from methods.shared.losses import segmentation_loss
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import imagenet_normalise, upsample


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    """The shared DeepLab-v2 recipe, trained for `num_steps` iterations."""

    # 100,000 iterations at batch size 1: CIRN Implementation details, the DeepLab-v2 recipe its source-only row
    # shares (the other papers print no baseline budget of their own)
    num_steps: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_steps >= 1, f"num_steps must be >= 1 (got {self.num_steps})")


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    return nn.ModuleDict({"segmenter": recipe_segmenter(hp, info)})


def optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    return {"segmenter": recipe_optim(hp, modules["segmenter"], num_steps)}


def train_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    segmenter = ctx.modules["segmenter"]
    optimizer = ctx.optimizers["segmenter"]
    logits = segmenter(imagenet_normalise(batch.source_image))
    loss = segmentation_loss(logits, batch.source_label, ctx.info.ignore_index)
    optimizer.zero_grad(set_to_none=True)
    ctx.backward(loss)
    ctx.step("segmenter")
    return {"loss_seg_source": loss.detach()}


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    return (
        Stage(
            name="source",
            trains=("segmenter",),
            budget=steps(hp.num_steps),
            optimizers=optimizers,
            step=train_step,
            uses_target=False,
        ),
    )


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    return upsample(modules["segmenter"](imagenet_normalise(images)), tuple(images.shape[-2:]))


METHOD = Method(
    name="source_only",
    paper="Source-only baseline of every paper here (e.g. CSCL, ECCV 2020, Table 1; ../shared/papers/002_c46badf92f1b9b44.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=(
        "synthetic-urban",
        "synthetic-endoscopy",
        "synthetic-cxr",
        "gta5-cityscapes",
        "synthia-cityscapes",
        "cityscapes-nthu-rome",
        "cityscapes-nthu-rio",
        "cityscapes-nthu-tokyo",
        "cityscapes-nthu-taipei",
        "endoscopy",
        "montgomery-jsrt",
    ),
    imagenet_backbone=True,  # DeepLab-v2 from ImageNet, the recipe of the papers' source-only rows
)
