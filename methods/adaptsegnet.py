"""AdaptSegNet: output-space adversarial adaptation, single level (Tsai et al., "Learning to Adapt Structured Output
Space for Semantic Segmentation", CVPR 2018). The paper is not among ../shared/papers; its recipe is the one the
CSCL, SLRT and CIRN papers build on and compare against ("LtA"), as summarised in ../shared/reference/conventions.md.

One step (the order of the reference implementation):
1. segmenter on source images: L_seg = cross-entropy with the labels;
2. segmenter on target images, softmax upsampled to the input size, through D: L_adv = BCE(D(P_t), source), so that
   target outputs look like source outputs to D; the segmenter minimises L_seg + λ_adv · L_adv;
3. D on the detached source and target softmax maps: L_D = ½ [BCE(D(P_s), source) + BCE(D(P_t), target)].
Labels: source = 0, target = 1, as in the reference implementation.

The discriminator is the output-space one (five 4x4 stride-2 convolutions {64, 128, 256, 512, 1}, LeakyReLU 0.2),
Adam 1e-4, betas (0.9, 0.99), with the same poly decay as the segmenter.

Deviations: none known. The multi-level variant (a second discriminator on conv4 outputs, λ 0.0002) is not
implemented: the papers here compare against the single-level model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import Batch, Method, Optim, Stage, StagePosition, StepContext, TaskInfo, require, steps
from methods.shared.discriminators import output_space_discriminator
from methods.shared.losses import domain_bce, segmentation_loss
from methods.shared.optim import poly_schedule
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import imagenet_normalise, upsample


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    lambda_adv: float = 0.001  # weight of L_adv for the single-level model (Tsai et al. Sec. 4; conventions.md)
    discriminator_learning_rate: float = 1e-4  # Adam, conventions.md ("Adam 1e-4, betas (0.9, 0.99)")
    discriminator_beta1: float = 0.9
    discriminator_beta2: float = 0.99
    # Iterations: the reference implementation trains 250,000 and stops early at 150,000 (Tsai et al. Sec. 4); we use
    # the early-stopped count
    num_steps: int = 150_000

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_steps >= 1, f"num_steps must be >= 1 (got {self.num_steps})")
        require(self.lambda_adv >= 0, f"lambda_adv must be >= 0 (got {self.lambda_adv})")
        require(
            self.discriminator_learning_rate > 0,
            f"discriminator_learning_rate must be > 0 (got {self.discriminator_learning_rate})",
        )
        for name in ("discriminator_beta1", "discriminator_beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")


SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # the reference implementation's domain labels


def adversarial_loss(d_target: Tensor) -> Tensor:
    """L_adv: the segmenter wants D to take target outputs for source outputs."""
    return domain_bce(d_target, SOURCE_LABEL)


def discriminator_loss(d_source: Tensor, d_target: Tensor) -> Tensor:
    """L_D = ½ [BCE(D(P_s), source) + BCE(D(P_t), target)]."""
    return 0.5 * (domain_bce(d_source, SOURCE_LABEL) + domain_bce(d_target, TARGET_LABEL))


def output_map(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """The discriminator's input: softmax of the logits upsampled to the image size (B, K, H, W)."""
    return F.softmax(upsample(logits, size), dim=1)


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    return nn.ModuleDict(
        {"segmenter": recipe_segmenter(hp, info), "discriminator": output_space_discriminator(info.num_classes)}
    )


def optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    adam = torch.optim.Adam(
        modules["discriminator"].parameters(),
        lr=hp.discriminator_learning_rate,
        betas=(hp.discriminator_beta1, hp.discriminator_beta2),
    )
    return {
        "segmenter": recipe_optim(hp, modules["segmenter"], num_steps),
        "discriminator": Optim(adam, poly_schedule(adam, num_steps, hp.poly_power)),
    }


def train_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    segmenter, discriminator = ctx.modules["segmenter"], ctx.modules["discriminator"]
    optimize_segmenter, optimize_discriminator = ctx.optimizers["segmenter"], ctx.optimizers["discriminator"]
    source_size, target_size = tuple(batch.source_image.shape[-2:]), tuple(batch.target_image.shape[-2:])

    # 1-2. Segmenter: L_seg on source + λ_adv · L_adv on target (D's gradients from this pass are discarded below).
    optimize_segmenter.zero_grad(set_to_none=True)
    source_logits = segmenter(imagenet_normalise(batch.source_image))
    loss_seg = segmentation_loss(source_logits, batch.source_label, ctx.info.ignore_index)
    target_logits = segmenter(imagenet_normalise(batch.target_image))
    loss_adv = adversarial_loss(discriminator(output_map(target_logits, target_size)))
    ctx.backward(loss_seg + ctx.hp.lambda_adv * loss_adv)
    ctx.step("segmenter")

    # 3. Discriminator on detached outputs of both domains.
    optimize_discriminator.zero_grad(set_to_none=True)
    loss_d = discriminator_loss(
        discriminator(output_map(source_logits.detach(), source_size)),
        discriminator(output_map(target_logits.detach(), target_size)),
    )
    ctx.backward(loss_d)
    ctx.step("discriminator")
    return {"loss_seg_source": loss_seg.detach(), "loss_adv_target": loss_adv.detach(), "loss_d": loss_d.detach()}


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    return (
        Stage(
            name="adapt",
            trains=("segmenter", "discriminator"),
            budget=steps(hp.num_steps),
            optimizers=optimizers,
            step=train_step,
        ),
    )


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    return upsample(modules["segmenter"](imagenet_normalise(images)), tuple(images.shape[-2:]))


METHOD = Method(
    name="adaptsegnet",
    paper="Tsai et al., Learning to Adapt Structured Output Space for Semantic Segmentation, CVPR 2018 (single level)",
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
    ),
    imagenet_backbone=True,  # DeepLab-v2 from ImageNet (the reference implementation's recipe)
)
