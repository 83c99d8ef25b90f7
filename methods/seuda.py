"""SeUDA: semantic-aware GANs for unsupervised domain adaptation of chest X-ray lung segmentation (Chen et al., MICCAI
workshop DLMIA 2018). Implements ../shared/papers/003_2b3d70deb7bd4c82.txt.

Two stages (Sec. 2):

1. `segmenter`: f_s, the SeUDA segmenter (Sec. 2.1: dilated ResNet-101 variant, 32 feature maps in the first layer,
   four parallel 3x3 dilated branches {6, 12, 18, 24}, final upsampling; methods/shared/segmenter.py), trained on
   labelled source images with pixel-wise cross-entropy and SGD.
2. `translate`: f_s frozen (no gradient step, no batch-norm update: the platform keeps modules a stage does not train
   in eval mode without gradients); generators G_t→s and G_s→t (CycleGAN ResNet generators: encoder, transformer,
   decoder) and the 70x70 PatchGAN discriminators D_s, D_t and D_m trained on Eq. 4:

       L = L_GAN(G_s→t, D_t) + α L_GAN(G_t→s, D_s) + β L_cyc(G_t→s, G_s→t) + λ L_sem(G_t→s, D_m)

   with least-squares GAN losses (Sec. 2.3, "following the strategies of [16]"), L_cyc the L1 cycle loss of Eq. 2, and
   L_sem (Eq. 3): D_m separates source ground-truth masks y_s from f_s(G_t→s(x_t)); its gradient reaches G_t→s
   through the frozen f_s. Each discriminator is updated on one image from a pool of the 50 previous fakes (masks
   for D_m). Adam, initial learning rate 0.002. α, β, λ = 0.5, 10, 0.5.

Inference (Fig. 1 right): x_t → G_t→s → f_s → post-processing (per lung, the largest connected component, then
hole filling; Sec. 3). During stage 1 the platform's evaluations segment raw target images (T-noDA).

Post-processing of every row. Sec. 3 states it for the evaluation as a whole, before the rows are introduced: "The
prediction masks were post-processed with the largest connected-component selection and hole filling." So it
applies to every prediction `predict` makes, in every stage and for every `adaptation` (S-test, T-noDA, T-HistM,
CyUDA, SeUDA alike); `postprocess=False` turns it off for all of them. (Before issue 19 it applied to the GAN
stage's predictions only, which compared post-processed SeUDA and CyUDA rows with raw T-noDA and T-HistM rows.)

Table 1's rows, from one source segmenter. "We first established the segmenter on source training data
independently. Next, we test the segmenter under various settings" (Sec. 3): every row uses the same f_s.
- S-test: f_s on the source test split (Montgomery test; the source labels of that split, no target label);
- T-noDA (`adaptation="none"`): f_s on raw target images;
- T-HistM (`adaptation="histogram"`): target images histogram-matched to the source intensity histogram
  (scikit-image `match_histograms`) before segmenting; the histogram is accumulated over the source images stage 1
  trains on and kept in the `source_histogram` module, so it travels with the checkpoint;
- CyUDA (`lambda_sem=0`, no D_m, no L_sem) and SeUDA (the defaults): the GAN stage on top of f_s.
(T-STL trains on target labels and T-FeatDA is another method: not implemented.)
A trial trains and evaluates one row, so the shared-segmenter protocol is a sequence of trials:
benchmarks/seuda_table1.py trains f_s once per seed (an `adaptation=none` trial, whose final evaluation is T-noDA),
scores its checkpoint on the source test split (S-test) and with histogram matching (T-HistM), and runs CyUDA and
SeUDA as GAN-stage trials that reuse it through `segmenter_weights`. The 10-seed stability study (Sec. 3, "running
each model for 10 times under different initializations") reuses one f_s for the 20 GAN trials, so that the spread
is the GANs' own.

Reusing a stage-1 segmenter: `segmenter_weights=/path/to/checkpoint.pt` (any `checkpoints/last.pt` or
`checkpoints/best_val_target_miou.pt` of a `seuda` trial, downloaded from MLflow) loads that trial's `segmenter`
and `source_histogram` and skips stage 1, so a sweep over α, β, λ trains GANs only:

    python -m platform.train seuda --task montgomery-jsrt --set adaptation=none      # stage 1 once
    python -m platform.sweep seuda --task montgomery-jsrt --grid table1_stability \\
        --set segmenter_weights=/path/to/last.pt                                     # stage 2 per trial

The platform checks before any trial starts that the file exists and fits the modules. Left empty (default), every
trial trains its own segmenter first (`segmenter_epochs` source epochs). The GAN stage lasts `gan_epochs` source
epochs (200, the printed schedule) whether stage 1 runs in the trial or is reused (`epochs(hp.gan_epochs)`; a
`--max-steps N` scales the stages of the trial it is given, so a reused f_s leaves the GAN stage all N steps).

JSRT's intensities. Sec. 3: "All the images were resized to 512×512, and rescaled to [0, 255]" and nothing else;
the JSRT converter therefore inverts and rescales the 12-bit raw values linearly without histogram equalisation
(the common JSRT preprocessing equalises them, which would remove much of the intensity shift Table 1 measures;
`equalise=True` is that reading: platform/converters.py, JSRT).

Choices the paper leaves open:
1. Segmenter optimisation: "standard stochastic gradient descent", nothing else printed. The shared recipe's SGD
   (momentum 0.9, weight decay 5e-4, poly 0.9, head at 10x) at learning rate 1e-2 (the segmenter is trained from
   scratch on X-rays; 2.5e-4 is the other papers' fine-tuning rate), batch norm live.
2. Batch size: not printed; 1 (CycleGAN's, [16]); the platform uses one batch size for both stages.
3. "Adam ... initial learning rate of 0.002, which was linearly decayed every 100 epochs": read as CycleGAN's
   schedule, constant for the first half of the stage and linearly to zero over the second (`gan_constant_share`);
   Adam betas (0.5, 0.999) as in [16].
4. The min-max of Eq. 5 weights each discriminator's objective by the same α, 1 or λ as its generator term; Adam is
   invariant to that scale, so each discriminator minimises CycleGAN's ½[(D(real) − 1)² + D(fake)²] unweighted.
5. D_m's input: masks as K-channel maps at image size, one-hot ground truth (ignored pixels all zero) vs the softmax
   of f_s(x_t→s). G_t→s's L_sem is the least-squares loss of D_m on the current fake (not the pooled one).
6. Images enter the GANs in [-1, 1] and f_s in [0, 1] → the recipe's normalisation (the same as in stage 1).
7. "Largest connected component" is read per lung class (8-connectivity); filled holes take the lung's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import (
    Batch,
    Method,
    Optim,
    SampleImages,
    Stage,
    StagePosition,
    StepContext,
    TaskInfo,
    WeightsFile,
    epochs,
    require,
)
from methods.shared.gan import ImagePool, PatchDiscriminator, ResnetGenerator, lsgan_loss
from methods.shared.losses import segmentation_loss
from methods.shared.optim import linear_decay
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import imagenet_normalise, upsample

LEVELS = 256  # intensity levels of the source histogram (images are 8-bit)


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    architecture: str = "seuda_resnet101"  # Sec. 2.1
    freeze_batchnorm: bool = False  # trained from scratch (choice 1)
    learning_rate: float = 1e-2  # not printed (choice 1)
    batch_size: int = 1  # not printed (choice 2)
    adaptation: Literal["seuda", "none", "histogram"] = "seuda"  # Table 1: SeUDA/CyUDA, T-noDA, T-HistM
    alpha: float = 0.5  # α, weight of L_GAN(G_t→s, D_s) in Eq. 4 (Sec. 2.3)
    beta: float = 10.0  # β, weight of L_cyc (Sec. 2.3)
    lambda_sem: float = 0.5  # λ, weight of L_sem (Sec. 2.3); 0 is CyUDA
    gan_learning_rate: float = 0.002  # Adam, Sec. 2.3
    gan_beta1: float = 0.5  # [16] (choice 3)
    gan_beta2: float = 0.999
    gan_constant_share: float = 0.5  # share of stage 2 at the initial rate before the linear decay (choice 3)
    pool_size: int = 50  # Sec. 2.3
    generator_filters: int = 64  # ngf of [16]
    generator_blocks: int = 9  # residual blocks of [16] (9 for 256x256 and larger)
    discriminator_filters: int = 64  # ndf of [16]
    segmenter_epochs: float = 200.0  # stage 1's length in source epochs: not printed, as long as the GAN stage
    gan_epochs: float = 200.0  # stage 2: CycleGAN's 200 epochs ("linearly decayed every 100 epochs", Sec. 2.3)
    segmenter_weights: WeightsFile = ""  # a seuda checkpoint whose segmenter is reused; skips stage 1
    postprocess: bool = True  # largest connected component + hole filling, every row (Sec. 3)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "beta", "lambda_sem"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        require(self.gan_learning_rate > 0, f"gan_learning_rate must be > 0 (got {self.gan_learning_rate})")
        for name in ("gan_beta1", "gan_beta2", "gan_constant_share"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")
        require(self.pool_size >= 0, f"pool_size must be >= 0 (got {self.pool_size})")
        for name in ("generator_filters", "generator_blocks", "discriminator_filters"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("segmenter_epochs", "gan_epochs"):
            require(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        require(
            self.adaptation in ("seuda", "none", "histogram"),
            f"adaptation must be one of seuda, none, histogram (got {self.adaptation!r})",
        )
        require(
            not (self.segmenter_weights and self.adaptation != "seuda"),
            f"adaptation={self.adaptation} only trains the segmenter, which segmenter_weights already gives: "
            "score that checkpoint with `python -m platform.evaluate checkpoint` instead",
        )


# --------------------------------------------------------------------------------------------------- modules


class SourceHistogram(nn.Module):
    """Intensity counts of the source images stage 1 trained on, per channel (a buffer: saved with the weights)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(channels, LEVELS, dtype=torch.float64))

    @torch.no_grad()
    def add(self, images: Tensor) -> None:
        levels = (images.clamp(0, 1) * (LEVELS - 1)).round().long()
        for channel in range(levels.shape[1]):
            self.counts[channel] += torch.bincount(levels[:, channel].flatten(), minlength=LEVELS).double()


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    modules = nn.ModuleDict(
        {"segmenter": recipe_segmenter(hp, info), "source_histogram": SourceHistogram(info.in_channels)}
    )
    if hp.adaptation == "seuda":
        channels = info.in_channels
        modules["generator_t2s"] = ResnetGenerator(channels, channels, hp.generator_filters, hp.generator_blocks)
        modules["generator_s2t"] = ResnetGenerator(channels, channels, hp.generator_filters, hp.generator_blocks)
        modules["discriminator_s"] = PatchDiscriminator(channels, hp.discriminator_filters)
        modules["discriminator_t"] = PatchDiscriminator(channels, hp.discriminator_filters)
        if hp.lambda_sem > 0:
            modules["discriminator_m"] = PatchDiscriminator(info.num_classes, hp.discriminator_filters)
    if hp.segmenter_weights:
        _load_stage1(modules, hp.segmenter_weights)
    return modules


def _load_stage1(modules: nn.ModuleDict, path: str) -> None:
    """The `segmenter` and `source_histogram` of a seuda checkpoint file (a ModuleDict state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name in ("segmenter", "source_histogram"):
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(f"{path} holds no {name!r} weights; give a checkpoint of a seuda trial")
        missing, unexpected = modules[name].load_state_dict(part, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: {name} does not fit (missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}); was it trained with the same architecture and task?"
            )
        shapes = {k: v.shape for k, v in modules[name].state_dict().items()}
        bad = [k for k, v in part.items() if shapes[k] != v.shape]
        if bad:
            raise ValueError(f"{path}: {name} shapes differ for {bad[:5]}")


# --------------------------------------------------------------------------------------------------- losses


def generator_gan_loss(d_fake: Tensor) -> Tensor:
    """A generator's least-squares GAN term: (D(G(x)) − 1)²."""
    return lsgan_loss(d_fake, True)


def discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """½ [(D(real) − 1)² + D(fake)²] (choice 4)."""
    return 0.5 * (lsgan_loss(d_real, True) + lsgan_loss(d_fake, False))


def cycle_loss(reconstructed_t: Tensor, x_t: Tensor, reconstructed_s: Tensor, x_s: Tensor) -> Tensor:
    """Eq. 2: ‖G_s→t(G_t→s(x_t)) − x_t‖₁ + ‖G_t→s(G_s→t(x_s)) − x_s‖₁ (means over pixels)."""
    return (reconstructed_t - x_t).abs().mean() + (reconstructed_s - x_s).abs().mean()


def generator_objective(hp: Hyperparams, gan_s2t: Tensor, gan_t2s: Tensor, cyc: Tensor, sem: Tensor | None) -> Tensor:
    """Eq. 4 from the generators' side: L_GAN(G_s→t) + α L_GAN(G_t→s) + β L_cyc + λ L_sem."""
    total = gan_s2t + hp.alpha * gan_t2s + hp.beta * cyc
    return total + hp.lambda_sem * sem if sem is not None else total


def one_hot_masks(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, H, W) class ids → (B, K, H, W) one-hot masks; ignored pixels are all zero (choice 5)."""
    valid = labels != ignore_index
    masks = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return masks * valid.unsqueeze(1)


def to_gan(images: Tensor) -> Tensor:
    return images * 2 - 1


def from_gan(images: Tensor) -> Tensor:
    return (images + 1) / 2


def segment(modules: nn.ModuleDict, images: Tensor) -> Tensor:
    """f_s on images in [0, 1]: logits at image size."""
    return upsample(modules["segmenter"](imagenet_normalise(images)), tuple(images.shape[-2:]))


# ------------------------------------------------------------------------------------------------ stage steps


def segmenter_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    return {"segmenter": recipe_optim(hp, modules["segmenter"], num_steps)}


def segmenter_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 1: pixel-wise cross-entropy of f_s(x_s) against y_s (Sec. 2.1); the source histogram is accumulated."""
    optimizer = ctx.optimizers["segmenter"]
    optimizer.zero_grad(set_to_none=True)
    loss = segmentation_loss(
        ctx.modules["segmenter"](imagenet_normalise(batch.source_image)), batch.source_label, ctx.info.ignore_index
    )
    ctx.backward(loss)
    ctx.step("segmenter")
    ctx.modules["source_histogram"].add(batch.source_image)
    return {"loss_seg_source": loss.detach()}


GENERATORS = ("generator_t2s", "generator_s2t")


def gan_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    constant = int(round(num_steps * hp.gan_constant_share))
    out = {}
    groups = {"generators": [p for name in GENERATORS for p in modules[name].parameters()]}
    groups.update({name: list(modules[name].parameters()) for name in modules if name.startswith("discriminator_")})
    for name, parameters in groups.items():
        adam = torch.optim.Adam(parameters, lr=hp.gan_learning_rate, betas=(hp.gan_beta1, hp.gan_beta2))
        out[name] = Optim(adam, linear_decay(adam, constant, num_steps - constant))
    return out


def _pool(ctx: StepContext, name: str) -> ImagePool:
    return ImagePool(ctx.hp.pool_size, ctx.state.get(name, []))


def gan_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 2, one iteration: generators on Eq. 4, then D_s, D_t (and D_m) on pooled fakes (CycleGAN's order)."""
    hp, modules, optimizers = ctx.hp, ctx.modules, ctx.optimizers
    x_s, x_t = to_gan(batch.source_image), to_gan(batch.target_image)
    semantic = "discriminator_m" in modules

    optimizers["generators"].zero_grad(set_to_none=True)
    fake_s = modules["generator_t2s"](x_t)  # x_t→s
    fake_t = modules["generator_s2t"](x_s)  # x_s→t
    gan_t2s = generator_gan_loss(modules["discriminator_s"](fake_s))
    gan_s2t = generator_gan_loss(modules["discriminator_t"](fake_t))
    cyc = cycle_loss(modules["generator_s2t"](fake_s), x_t, modules["generator_t2s"](fake_t), x_s)
    sem, predicted_masks = None, None
    if semantic:
        # gradients pass through the frozen f_s (eval mode, requires_grad off) into G_t→s
        predicted_masks = F.softmax(segment(modules, from_gan(fake_s)), dim=1)
        sem = generator_gan_loss(modules["discriminator_m"](predicted_masks))
    loss_g = generator_objective(hp, gan_s2t, gan_t2s, cyc, sem)
    ctx.backward(loss_g)
    ctx.step("generators")

    metrics = {
        "loss_g": loss_g.detach(),
        "loss_gan_t2s": gan_t2s.detach(),
        "loss_gan_s2t": gan_s2t.detach(),
        "loss_cyc": cyc.detach(),
    }
    pairs = [("discriminator_s", x_s, fake_s, "pool_s"), ("discriminator_t", x_t, fake_t, "pool_t")]
    if semantic:
        metrics["loss_sem"] = sem.detach()
        real_masks = one_hot_masks(batch.source_label, ctx.info.num_classes, ctx.info.ignore_index).to(predicted_masks)
        pairs.append(("discriminator_m", real_masks, predicted_masks, "pool_m"))
    for name, real, fake, pool_name in pairs:
        pool = _pool(ctx, pool_name)
        pooled = pool.query(fake.detach(), ctx.generator)
        ctx.state[pool_name] = pool.images
        optimizers[name].zero_grad(set_to_none=True)
        loss_d = discriminator_loss(modules[name](real), modules[name](pooled))
        ctx.backward(loss_d)
        ctx.step(name)
        metrics[f"loss_{name.replace('discriminator', 'd')}"] = loss_d.detach()
    return metrics


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    segmenter = Stage(
        name="segmenter",
        trains=("segmenter", "source_histogram"),
        budget=epochs(hp.segmenter_epochs, of="source"),
        optimizers=segmenter_optimizers,
        step=segmenter_step,
        uses_target=False,
    )
    if hp.adaptation != "seuda":
        return (segmenter,)
    trains = GENERATORS + ("discriminator_s", "discriminator_t") + (("discriminator_m",) if hp.lambda_sem > 0 else ())
    translate = Stage(
        name="translate",
        trains=trains,
        budget=epochs(hp.gan_epochs, of="source"),
        optimizers=gan_optimizers,
        step=gan_step,
    )
    return (translate,) if hp.segmenter_weights else (segmenter, translate)


def init_state(hp: Hyperparams, info: TaskInfo) -> dict:
    return {"pool_s": [], "pool_t": [], "pool_m": []}


# ---------------------------------------------------------------------------------------------------- inference


def largest_component_and_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask, holes filled (Sec. 3 post-processing)."""
    from scipy import ndimage
    from skimage import measure

    if not mask.any():
        return mask
    components = measure.label(mask, connectivity=2)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == sizes.argmax())


def postprocess(prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids → per foreground class, the largest component with holes filled; the rest background."""
    out = np.zeros_like(prediction)
    for k in range(1, num_classes):
        out[largest_component_and_filled(prediction == k)] = k
    return out


def histogram_match(images: Tensor, counts: Tensor) -> Tensor:
    """Each image's intensities mapped so that its histogram matches the source histogram `counts` (C, 256), with
    scikit-image. The reference is a sample of 2^20 intensities drawn deterministically from the histogram."""
    from skimage.exposure import match_histograms

    out = torch.empty_like(images)
    for channel in range(images.shape[1]):
        weights = counts[channel].cpu().numpy()
        if weights.sum() == 0:
            raise ValueError("the source histogram is empty: adaptation=histogram needs a trained stage 1")
        repeats = np.round(weights / weights.sum() * 2**20).astype(np.int64)
        reference = np.repeat(np.arange(LEVELS, dtype=np.uint8), repeats)[None]  # a 1 x N "image"
        for index in range(images.shape[0]):
            image = (images[index, channel].clamp(0, 1) * (LEVELS - 1)).round().to(torch.uint8).cpu().numpy()
            matched = match_histograms(image, reference)
            out[index, channel] = torch.from_numpy(np.asarray(matched, dtype=np.float32) / (LEVELS - 1))
    return out


@torch.no_grad()
def translate(modules: nn.ModuleDict, images: Tensor) -> Tensor:
    """x_t → G_t→s(x_t), images in [0, 1]."""
    return from_gan(modules["generator_t2s"](to_gan(images))).clamp(0, 1)


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    """Logits at image size by the inference path of `adaptation` (through G_t→s in the GAN stage), or, with
    `postprocess` (every row, every stage: docstring), one-hot scores of the post-processed masks."""
    if hp.adaptation == "histogram":
        images = histogram_match(images, modules["source_histogram"].counts)
    elif hp.adaptation == "seuda" and stage.name == "translate":
        images = translate(modules, images)
    logits = segment(modules, images)
    if not hp.postprocess:
        return logits
    labels = logits.argmax(1).cpu().numpy()
    cleaned = np.stack([postprocess(label, logits.shape[1]) for label in labels])
    return F.one_hot(torch.from_numpy(cleaned).long(), logits.shape[1]).permute(0, 3, 1, 2).float().to(logits.device)


@torch.no_grad()
def samples(hp: Hyperparams, modules: nn.ModuleDict, images: SampleImages, stage: StagePosition) -> dict[str, Tensor]:
    """Fig. 2 (a) as artifacts: target images and their translations x_t→s (in the translate stage)."""
    if hp.adaptation != "seuda" or stage.name != "translate":
        return {}
    return {"target": images.target, "target_to_source": translate(modules, images.target)}


METHOD = Method(
    name="seuda",
    paper="Chen et al., Semantic-Aware Generative Adversarial Nets for Unsupervised Domain Adaptation in Chest X-ray "
    "Segmentation, MICCAI DLMIA 2018 (../shared/papers/003_2b3d70deb7bd4c82.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=("synthetic-cxr", "montgomery-jsrt"),
    init_state=init_state,
    samples=samples,
)
