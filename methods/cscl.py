"""CSCL: Critical Semantic-Consistent Learning for unsupervised domain adaptation (Dong et al., ECCV 2020).

Implements ../shared/papers/002_c46badf92f1b9b44.txt. No public implementation exists; this one follows the text:

- E and C: DeepLab-v2 on ResNet-101 or FCN-8s on VGG-16 (Sec. 3.5), or the small CPU network; both paper networks
  "are initially pre-trained by the ImageNet" (Sec. 3.5), so a paper task needs `backbone_weights`
  (`Method.imagenet_backbone`).
- D (Eq. 1): five convolutions {64, 128, 256, 512, 1}, LeakyReLU 0.2, on E's features.
- T_Q (Eq. 2): one convolution to 1 channel on D's output probability; P = 1 − U(σ(T_Q(σ(D(F))))), U the binary
  entropy.
- T_C (Eq. 3, 6): a state branch of three convolutions {64, 32, 16} on F and a policy branch of two convolutions of 16
  on P, concatenated, one convolution to the critic value V_cri; L_cri = −V_cri, L_reg = (V_cri − R)².
- Rewards (Eq. 4, 5): R^s = 1 where C's prediction equals the label's argmax; R^a = 1 where C's probability of the
  labelled class is higher with P than without it (C^b); R = R^s + R^a. Labels: source ground truth, or the target
  soft pseudo labels (pixels whose pseudo label is the zero vector have no label and no reward).
- Class thresholds δ_k (Alg. 1) from a pass over the whole target training set every epoch, with S_A = 35% + 5% per
  epoch, at most 50%.
- Epochs (Sec. 3.3 "S_A ... increased by 5% in each epoch"; Sec. 4.2 "efficient convergence when the iterative epoch
  number is 5"): neither says which set an epoch passes over. Read as one epoch = one pass over the SOURCE training
  set, for the budget and for S_A alike: with batch size 1 an iteration draws one source and one target image, and
  5 source epochs of GTA5 (124,830 iterations) are the length the field trains this recipe for (AdaptSegNet stops at
  150,000), where 5 target epochs of Cityscapes (14,875) would be a tenth of it. The trial lasts `epochs` source
  epochs (`epochs(hp.epochs, of="source")`), the threshold pass runs every source epoch (`TargetPass(every="source")`)
  and S_A grows with `ctx.source_epoch`. (Before contract v2 the budget counted source epochs and S_A target epochs,
  so on GTA5 → Cityscapes S_A reached 50% at 7% of training.)
- Soft pseudo labels (Eq. 9, 10): ŷ_k ∝ (C_k/δ_k)^{1/γ}, kept where its selection cost S_C (Eq. 8) is lower than the
  zero label's. Closed form: S_C(ŷ) = −γ log Σ_k (C_k/δ_k)^{1/γ} and S_C(0) = 0, so ŷ is kept iff
  Σ_k (C_k/δ_k)^{1/γ} > 1 (`soft_pseudo_labels`; `selection_cost` computes Eq. 8 directly, the tests compare them).
- L_seg (Eq. 7): cross-entropy on source plus the target term −ŷ_k log(C_k/δ_k) + γ ŷ_k log ŷ_k.
- L_div (Eq. 11-13): symmetric KL between the source centroid F_s^k (pixels labelled k) and the target soft centroid
  F_t^k (pixels whose pseudo label's argmax is k, weighted by ŷ_k), averaged over classes.
- One iteration follows Alg. 2: line 4 E, C ← source term of L_seg; line 5 pseudo labels (Eq. 10); line 6 E, D ←
  ξ2 L_adv + ξ3 L_div; line 7 T_Q ← L_seg + ξ1 L_cri; line 8 T_C ← L_reg (Eq. 14 is their sum).
- Optimisation (Sec. 3.5): ResNet-101: SGD 2.5e-4, poly 0.9; VGG-16: Adam 1e-4, betas (0.9, 0.99); D: Adam 1.5e-4
  (ResNet) or 1.5e-6 (VGG); batch size 1; ξ1 = 0.3, ξ2 = 0.001, ξ3 = 10, γ = 0.25.
- Ablations of Table 1: `critical_transfer=False` (w/oTC: no T_Q, T_C, L_cri, L_reg; C sees F), `confidence_guided=
  False` (w/oCG: the pseudo label of every pixel is the one-hot argmax of C, no thresholds, no soft labels, no
  selection), `symmetric_divergence=False` (w/oSD: no L_div).

Readings of the text, decided here (the paper's words first; the other reading is an option where it is plausible):

a. T_Q's input. "the output probabilities of D can determine whether the corresponding features are transferable
   ... T_Q encodes the output probability of D via one convolutional layer" (Sec. 3.2), and Eq. 1-2 call
   D(E(x)) "the probability output of D": T_Q sees σ(D(F)) (`quantizer_input="probability"`, default); "logits"
   feeds D's logits (this implementation before issue 19).
b. Sums or means in Eq. 7. Both terms are printed as sums over pixels and classes inside an expectation over
   images. The sum over a 1280x720 image would multiply the gradient by 921,600 against the per-pixel mean that the
   printed SGD learning rate 2.5e-4 (DeepLab's) is made for, so the constant 1/|x| is read as folded into the
   learning rate: `eq7_reduction="image"` (default) divides each image's sum by its pixel count and averages over
   the batch. Ignored source pixels and target pixels whose pseudo label is the zero vector contribute 0 to the sum,
   exactly as in Eq. 7, so the target term's weight grows with the number of selected pixels ("allocating ŷ as 0
   can neglect this unconfident pseudo label"). `"selected"` (before issue 19) takes the mean over labelled source
   pixels and over selected target pixels instead, which gives the target term the same weight however few pixels
   are selected. (The literal sum is `"image"` with the learning rates multiplied by the pixel count.)
c. Learning-rate schedules of the Adam optimisers. Sec. 3.5 prints "initial learning rate" for the VGG-16 Adam and
   for D's Adam, i.e. a rate that changes, and names one schedule, the poly policy with power 0.9:
   `adam_schedule="poly"` (default) applies it to every Adam here (E and C in the VGG setting, D, T_Q, T_C);
   "constant" keeps their rates fixed.
d. Cityscapes → NTHU. "source and target domains share the consistent annotations" (Sec. 3.1) and NTHU "shares 13
   common categories with Cityscapes" (Sec. 4.1; Table 3 has 13 columns): K = 13 there. `trained_classes` (the
   comma-separated class ids of the task's label map that form K; "" = all of them) is set to the 13 NTHU classes
   by the NTHU tasks' defaults (search_spaces/cscl.py): source pixels of the other six Cityscapes classes are
   ignored and C's logits of those classes are masked out of every softmax (training, Alg. 1, Eq. 10, L_div over the
   13, prediction), so the 19-output head acts as a 13-class classifier.
e. Fig. 3(b)'s "domain gap" is not defined in the text. Each step logs `domain_gap`, the proxy A-distance
   2 (1 − 2ε) of D on that step's features (ε: D's error on the batch's source and target features, before D's
   update, Ben-David et al.); the category-wise gap L_div is logged as `loss_div`.
f. Alg. 1's index ⌊S_A · length(S_k)⌋ with S_A = 35% + 5% per epoch: in floating point 0.35 + 0.05 is
   0.39999999999999997, which puts the threshold one rank short of 40% for every class with 5, 10, 15, ... pixels.
   S_A is counted in integers (basis points, `selection_amount` returns an exact fraction) and the index is exact.
g. D's strides are not printed (conventions.md lists CSCL's D among 4x4 stride-2 discriminators). Five stride-2
   layers fit DeepLab-v2's stride-8 features of the smallest paper input (Cityscapes and NTHU at 1024x512: 64x128
   features, D output 2x4) but not FCN-8s's stride-32 ones (16x32 on Cityscapes, 22x40 on GTA5: three or more
   stride-2 layers leave no output). `discriminator_downsampling=None` (default) derives the number of stride-2
   layers from the architecture: the most of D's five (the others stride 1) that leave D an output on E's features
   of the smallest image side the architecture meets on CSCL's tasks (`SMALLEST_IMAGE_SIDE`): 5 for DeepLab-v2
   (as printed for the field), 2 for FCN-8s (D output 1x5 on Cityscapes, 2x7 on GTA5), 2 for the small network on
   the 64x128 synthetic images. An explicit value that leaves no output there is refused when the hyperparameters
   are made (before any trial starts); a step on features smaller than that names the field and what fits.

Choices the paper leaves open (each a hyperparameter where two readings are plausible, so a sweep can compare them):

1. How P modulates the features C sees: `modulation="residual"` (default) uses F ⊙ (1 + P), so that a pixel with
   P = 0 keeps its features, the reading of attention maps in the transferable-attention work CSCL's quantizer
   resembles; "multiply" uses F ⊙ P. P is computed at D's output resolution and resized bilinearly to F's. C sees
   modulated features in training and at test time (the paper's prediction path is E → T_Q → C).
2. How feature centroids become the probability vectors a KL divergence needs: `centroid_distribution="l1"`
   (default) normalises the non-negative centroid to sum 1 (every encoder here ends with a ReLU), "softmax" takes a
   softmax over channels.
3. Centroids per batch or over the dataset (Eq. 12, 13 are dataset expectations): `centroids="ema"` (default) keeps an
   exponential moving average per class with `centroid_momentum` and lets gradients flow through the current batch's
   share; "batch" uses the batch's centroids only. Classes without a centroid on both sides are left out of the mean.
4. Who learns from the target term of L_seg. Eq. 7 and Eq. 14 minimise it over E and C; Alg. 2 line 4 updates E and
   C with the source term only and line 7 updates T_Q with the whole L_seg, so that the pseudo labels reach E only
   through L_div (line 6). `pseudo_label_training="alg2"` (default) follows Alg. 2 literally; "eq7" also updates E
   and C with the target term, as the last update of the iteration. Measured on synthetic-urban (200 steps): "eq7"
   self-trains C on its own soft labels, the selected fraction of target pixels climbs to 90-100% and the run
   collapses on some seeds (final mIoU 23.0 and 2-9%, seeds 1 and 0 without L_div), while "alg2" stays stable (36.9
   and 39.9 on the same seeds; measured before readings a, b and f); the `open_choices` grid compares them.
5. Not printed: T_Q's and T_C's kernels (3x3, ReLU between layers); T_Q's and T_C's optimiser (Adam 1e-4, betas
   (0.9, 0.99), like D's family); D's loss is not scaled by ξ2 (Adam is invariant to the scale, and the min-max of
   Eq. 1 has the same solution); Eq. 1's printed signs read as the standard GAN game (D: source 1, target 0; E:
   target → source); P is detached in line 4 (it is an attention map there, not something the source loss should
   train through D).
6. Thresholds are computed from C's outputs at the classifier's resolution (not the label's): one value per output
   pixel of every target image, which keeps the pass's memory to tens of MB on Cityscapes. A class that no pixel is
   predicted as gets δ_k = 1.
7. Pseudo labels from a source-trained C. Sec. 3.3 mines them "after the source samples are utilized to train E and
   C", with the generator of CBST/CRST [46, 47], which self-train from a source-trained model; Alg. 2 itself starts
   all updates at iteration 1. `source_warmup` is the share of the budget spent on line 4 alone before the full
   iteration (and the first threshold pass) starts; 0 (default) is Alg. 2 as printed. Measured on synthetic-urban
   with "alg2" (200 steps, before readings a, b and f): 0.25 gave 42.4 vs 36.9 mIoU on seed 1 and 40.5 vs 39.9 on
   seed 0 without L_div, so it is a sweepable option, not the default; with "eq7" it does not prevent the collapse of
   choice 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import (
    Batch,
    Method,
    Optim,
    Stage,
    StagePosition,
    StepContext,
    TargetPass,
    TaskInfo,
    epochs,
    require,
)
from methods.shared.discriminators import ConvDiscriminator
from methods.shared.losses import domain_bce, segmentation_loss
from methods.shared.optim import poly_schedule
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import Features, imagenet_normalise, upsample

EPS = 1e-8


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    xi1: float = 0.3  # weight of L_cri, Eq. 14 (Sec. 3.5)
    xi2: float = 0.001  # weight of L_adv, Eq. 14 (Sec. 3.5)
    xi3: float = 10.0  # weight of L_div, Eq. 14 (Sec. 3.5)
    gamma: float = 0.25  # γ of the soft pseudo labels, Eq. 7-10 (Sec. 3.5)
    selection_start: float = 0.35  # S_A at the first epoch, Alg. 1 (Sec. 3.3)
    selection_step: float = 0.05  # S_A grows by 5% per epoch (Sec. 3.3)
    selection_max: float = 0.5  # S_A stops at 50% (Sec. 3.3)
    epochs: float = 5.0  # training length in source epochs: "convergence when the iterative epoch number is 5" (4.2)
    segmenter_optimizer: Literal["sgd", "adam"] = "sgd"  # SGD for ResNet-101, Adam for VGG-16 (Sec. 3.5)
    segmenter_beta1: float = 0.9  # Adam of the VGG-16 setting: "momentum 0.9 and 0.99" (Sec. 3.5)
    segmenter_beta2: float = 0.99
    discriminator_learning_rate: float = 1.5e-4  # Adam; 1.5e-4 with ResNet-101, 1.5e-6 with VGG-16 (Sec. 3.5)
    # stride-2 layers among D's five, not printed; None: derived from the architecture (docstring, reading g)
    discriminator_downsampling: int | None = None
    agent_learning_rate: float = 1e-4  # T_Q and T_C, Adam: not printed (docstring, choice 5)
    quantizer_input: Literal["probability", "logits"] = "probability"  # "the output probability of D" (reading a)
    eq7_reduction: Literal["image", "selected"] = "image"  # Eq. 7's sums over pixels per image (reading b)
    adam_schedule: Literal["poly", "constant"] = "poly"  # "initial learning rate" of every Adam (reading c)
    trained_classes: str = ""  # K of Eq. 7-13: comma-separated class ids, "" = all (reading d: NTHU's 13)
    modulation: Literal["residual", "multiply"] = "residual"  # docstring, choice 1
    centroid_distribution: Literal["l1", "softmax"] = "l1"  # docstring, choice 2
    centroids: Literal["ema", "batch"] = "ema"  # docstring, choice 3
    centroid_momentum: float = 0.9  # docstring, choice 3
    pseudo_label_training: Literal["alg2", "eq7"] = "alg2"  # docstring, choice 4
    source_warmup: float = 0.0  # share of the budget on Alg. 2 line 4 alone first (docstring, choice 7)
    critical_transfer: bool = True  # False: Table 1 "Ours-w/oTC"
    confidence_guided: bool = True  # False: Table 1 "Ours-w/oCG"
    symmetric_divergence: bool = True  # False: Table 1 "Ours-w/oSD"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("xi1", "xi2", "xi3"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        require(self.gamma > 0, f"gamma must be > 0 (got {self.gamma})")
        require(0 < self.selection_start <= 1, f"selection_start must be in (0, 1] (got {self.selection_start})")
        require(0 <= self.selection_step <= 1, f"selection_step must be in [0, 1] (got {self.selection_step})")
        require(
            self.selection_start <= self.selection_max <= 1,
            f"selection_max must be in [selection_start, 1] (got {self.selection_max})",
        )
        for name in ("segmenter_beta1", "segmenter_beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")
        for name in ("discriminator_learning_rate", "agent_learning_rate"):
            require(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        if self.discriminator_downsampling is not None:
            require(
                0 <= self.discriminator_downsampling <= 5,
                f"discriminator_downsampling must be in [0, 5] or None (got {self.discriminator_downsampling})",
            )
            side = smallest_feature_side(self.architecture)
            fits = fitting_downsampling(side)
            require(
                self.discriminator_downsampling <= fits,
                f"discriminator_downsampling={self.discriminator_downsampling} leaves D no output on {self.architecture}"
                f"'s {side}-pixel feature side (a {smallest_image_side(self.architecture)}-pixel image side, the "
                f"smallest on CSCL's tasks): at most {fits} fit; leave it unset (None) to derive it",
            )
        self.trained_class_ids()  # parses, or names what is wrong
        require(0 <= self.centroid_momentum < 1, f"centroid_momentum must be in [0, 1) (got {self.centroid_momentum})")
        require(0 <= self.source_warmup < 1, f"source_warmup must be in [0, 1) (got {self.source_warmup})")
        require(self.epochs > 0, f"epochs must be > 0 (got {self.epochs})")
        for name, valid in (
            ("segmenter_optimizer", ("sgd", "adam")),
            ("modulation", ("residual", "multiply")),
            ("centroid_distribution", ("l1", "softmax")),
            ("centroids", ("ema", "batch")),
            ("pseudo_label_training", ("eq7", "alg2")),
            ("quantizer_input", ("probability", "logits")),
            ("eq7_reduction", ("image", "selected")),
            ("adam_schedule", ("poly", "constant")),
        ):
            require(
                getattr(self, name) in valid, f"{name} must be one of {', '.join(valid)} (got {getattr(self, name)!r})"
            )

    def trained_class_ids(self) -> tuple[int, ...]:
        """`trained_classes` parsed: the class ids that form K (empty: every class of the task)."""
        if not self.trained_classes.strip():
            return ()
        try:
            ids = tuple(int(part) for part in self.trained_classes.split(","))
        except ValueError:
            raise ValueError(
                f"trained_classes must be comma-separated class ids, e.g. 0,1,2 (got {self.trained_classes!r})"
            ) from None
        require(
            all(i >= 0 for i in ids) and len(set(ids)) == len(ids) and len(ids) >= 2,
            f"trained_classes must be at least two distinct class ids >= 0 (got {self.trained_classes!r})",
        )
        return ids


# ---------------------------------------------------------------------------------------------------- D's strides

# Stride of E's features (`Features.main`) per architecture; DeepLab-v2/v3 and SeUDA's segmenter: 8.
FEATURE_STRIDE = {"tiny": 4, "fcn8s_vgg16": 32}
# The shorter image side E meets on CSCL's tasks: 512 on the paper tasks (Cityscapes and NTHU frames at 1024x512,
# Sec. 4; GTA5 is 720, SYNTHIA 760), 64 for the small CPU network (the synthetic tasks' 64x128 images).
SMALLEST_IMAGE_SIDE = {"tiny": 64}
DISCRIMINATOR_LAYERS, DISCRIMINATOR_KERNEL = 5, 4  # the output-space discriminator's five 4x4 convolutions


def smallest_image_side(architecture: str) -> int:
    return SMALLEST_IMAGE_SIDE.get(architecture, 512)


def smallest_feature_side(architecture: str) -> int:
    return smallest_image_side(architecture) // FEATURE_STRIDE.get(architecture, 8)


def discriminator_output_side(side: int, downsampling: int) -> int:
    """The side of D's output on a feature map of side `side`: the first `downsampling` of its five 4x4 convolutions
    (padding 1) have stride 2, the others stride 1; 0 when a layer has nothing left to convolve."""
    for index in range(DISCRIMINATOR_LAYERS):
        stride = 2 if index < downsampling else 1
        side = (side + 2 - DISCRIMINATOR_KERNEL) // stride + 1
        if side < 1:
            return 0
    return side


def fitting_downsampling(side: int) -> int:
    """The most stride-2 layers (at most 5) that leave D an output on features of side `side`."""
    fits = [d for d in range(DISCRIMINATOR_LAYERS + 1) if discriminator_output_side(side, d) >= 1]
    if not fits:
        raise ValueError(f"D's five 4x4 convolutions leave no output on a {side}-pixel feature map at any stride")
    return max(fits)


def discriminator_downsampling(hp: Hyperparams) -> int:
    """D's stride-2 layers: the configured number, or the one derived from the architecture (reading g)."""
    if hp.discriminator_downsampling is not None:
        return hp.discriminator_downsampling
    return fitting_downsampling(smallest_feature_side(hp.architecture))


# ---------------------------------------------------------------------------------------------------- modules


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class TransferabilityQuantizer(nn.Module):
    """T_Q: one convolution to 1 channel on D's output probability (B, 1, h, w) → logits of σ(·), whose entropy
    gives P (reading a: or on D's logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(1, 1)

    def forward(self, d_output: Tensor) -> Tensor:
        return self.conv(d_output)


class TransferabilityCritic(nn.Module):
    """T_C: state branch {64, 32, 16} on F, policy branch {16, 16} on P, concatenated, one convolution → V_cri."""

    def __init__(self, feature_channels: int):
        super().__init__()
        self.state = nn.Sequential(
            _conv(feature_channels, 64), nn.ReLU(True), _conv(64, 32), nn.ReLU(True), _conv(32, 16), nn.ReLU(True)
        )
        self.policy = nn.Sequential(_conv(1, 16), nn.ReLU(True), _conv(16, 16), nn.ReLU(True))
        self.value = _conv(32, 1)

    def forward(self, features: Tensor, transferability: Tensor) -> Tensor:
        """features (B, F, h, w), transferability P (B, 1, h, w) → V_cri (B, 1, h, w)."""
        return self.value(torch.cat([self.state(features), self.policy(transferability)], dim=1))


# ---------------------------------------------------------------------------------------------------- pure rules


def transferability(quantizer_logits: Tensor) -> Tensor:
    """Eq. 2: P = 1 − U(f), f = σ(T_Q(D(F))) over the two outcomes {source, target}, U the entropy in bits, so that
    P ∈ [0, 1] (P = 0 where T_Q is undecided, 1 where it is certain)."""
    f = torch.sigmoid(quantizer_logits)
    entropy = -(f * torch.log2(f.clamp_min(EPS)) + (1 - f) * torch.log2((1 - f).clamp_min(EPS)))
    return 1 - entropy


def modulate(features: Tensor, transferability_map: Tensor | None, mode: str) -> Tensor:
    """The features C sees: F ⊙ (1 + P) ("residual") or F ⊙ P ("multiply"); F itself without P (w/oTC, C^b)."""
    if transferability_map is None:
        return features
    return features * (1 + transferability_map) if mode == "residual" else features * transferability_map


BASIS_POINTS = 10_000  # S_A is counted in 1/10,000 (reading f)


def selection_amount(epoch: int, start: float, step: float, maximum: float) -> Fraction:
    """S_A of Alg. 1 at a given epoch: start + step · epoch, at most `maximum`, counted in integers (basis points):
    an exact fraction, so that 35% + 5% is 40% and not 0.39999999999999997 (reading f)."""

    def points(value: float) -> int:
        return round(value * BASIS_POINTS)

    return Fraction(min(points(start) + points(step) * epoch, points(maximum)), BASIS_POINTS)


def class_thresholds(confidence: Tensor, prediction: Tensor, num_classes: int, portion: Fraction | float) -> Tensor:
    """Alg. 1. confidence (N,) = max_k C_k and prediction (N,) = argmax_k C_k over all target pixels.
    δ_k = S_k[⌊portion · |S_k|⌋], S_k the confidences of pixels predicted as k sorted in descending order, the index
    computed exactly (`portion` as a fraction); δ_k = 1 for a class that no pixel is predicted as. Returns (K,)."""
    portion = Fraction(portion)
    thresholds = torch.ones(num_classes, dtype=torch.float32)
    for k in range(num_classes):
        ranked = confidence[prediction == k].float().sort(descending=True).values
        if ranked.numel():
            index = portion.numerator * ranked.numel() // portion.denominator
            thresholds[k] = ranked[min(index, ranked.numel() - 1)]
    return thresholds


def soft_pseudo_labels(probabilities: Tensor, thresholds: Tensor, gamma: float) -> Tensor:
    """Eq. 9-10. probabilities C (B, K, H, W), thresholds δ (K,) → ŷ (B, K, H, W), per pixel either
    (C_k/δ_k)^{1/γ} / Σ_j (C_j/δ_j)^{1/γ} or the zero vector, whichever has the lower selection cost (Eq. 8):
    the soft label's cost is −γ log Σ_j (C_j/δ_j)^{1/γ} and the zero label's is 0."""
    log_ratio = torch.log(probabilities.clamp_min(EPS)) - torch.log(thresholds.view(1, -1, 1, 1).to(probabilities))
    log_powers = log_ratio / gamma
    log_total = torch.logsumexp(log_powers, dim=1, keepdim=True)
    return torch.exp(log_powers - log_total) * (log_total > 0)


def hard_pseudo_labels(probabilities: Tensor) -> Tensor:
    """The w/oCG ablation: every pixel gets the one-hot label of C's argmax."""
    return F.one_hot(probabilities.argmax(1), probabilities.shape[1]).permute(0, 3, 1, 2).to(probabilities)


def selection_cost(labels: Tensor, probabilities: Tensor, thresholds: Tensor, gamma: float) -> Tensor:
    """Eq. 8's S_C and, with C carrying gradients, Eq. 7's target term per pixel:
    Σ_k −ŷ_k log(C_k/δ_k) + γ ŷ_k log ŷ_k (0 log 0 = 0). labels, probabilities (B, K, H, W) → (B, H, W)."""
    log_ratio = torch.log(probabilities.clamp_min(EPS)) - torch.log(thresholds.view(1, -1, 1, 1).to(probabilities))
    entropy_term = torch.where(labels > 0, labels * torch.log(labels.clamp_min(EPS)), torch.zeros_like(labels))
    return (-labels * log_ratio + gamma * entropy_term).sum(1)


def target_segmentation_loss(
    labels: Tensor, probabilities: Tensor, thresholds: Tensor, gamma: float, reduction: str = "selected"
) -> Tensor:
    """Eq. 7's target term. "image": each image's sum over pixels divided by its pixel count (zero-vector labels
    contribute 0), mean over the batch; "selected": mean over the pixels whose pseudo label is not the zero vector
    (0 if there are none). Reading b of the docstring."""
    cost = selection_cost(labels, probabilities, thresholds, gamma)
    if reduction == "image":
        return cost.mean()
    selected = labels.sum(1) > 0
    if not selected.any():
        return probabilities.sum() * 0.0
    return cost[selected].mean()


def source_segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Eq. 7's source term: cross-entropy of C's logits (B, K, h, w), upsampled to the labels (B, H, W). "image":
    each image's sum over pixels divided by its pixel count (ignored pixels contribute 0), mean over the batch;
    "selected": mean over labelled pixels (the shared `segmentation_loss`). Reading b of the docstring."""
    if reduction != "image":
        return segmentation_loss(logits, labels, ignore_index)
    logits = upsample(logits, tuple(labels.shape[-2:]))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").mean()


MASKED_LOGIT = -1e4  # a logit whose softmax is 0: classes outside K (reading d)


def restrict_classes(logits: Tensor, classes: tuple[int, ...]) -> Tensor:
    """Logits (B, K_task, h, w) with every class outside `classes` masked out of the softmax (no-op when empty)."""
    if not classes:
        return logits
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    return logits.masked_fill(~keep.view(1, -1, 1, 1), MASKED_LOGIT)


def restrict_labels(labels: Tensor, classes: tuple[int, ...], ignore_index: int) -> Tensor:
    """Class ids (B, H, W) with every class outside `classes` set to `ignore_index` (no-op when empty)."""
    if not classes:
        return labels
    keep = torch.zeros(max(max(classes), int(labels.max())) + 1, dtype=torch.bool, device=labels.device)
    keep[list(classes)] = True
    valid = labels != ignore_index
    kept = keep[torch.where(valid, labels, 0)] & valid
    return torch.where(kept, labels, torch.full_like(labels, ignore_index))


def domain_gap(d_source: Tensor, d_target: Tensor) -> Tensor:
    """Fig. 3(b), reading e: the proxy A-distance 2 (1 − 2ε) of D on a batch, ε its error rate over the source
    logits (source = 1: wrong where < 0) and the target logits (target = 0: wrong where ≥ 0), each domain half."""
    error = 0.5 * ((d_source < 0).float().mean() + (d_target >= 0).float().mean())
    return 2 * (1 - 2 * error)


def class_centroid_sums(features: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """features (B, F, h, w), per-pixel class weights (B, K, h, w) → (Σ w_k F (K, F), Σ w_k (K,))."""
    sums = torch.einsum("bkhw,bfhw->kf", weights, features)
    return sums, weights.sum((0, 2, 3))


def source_class_weights(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Eq. 12's indicator 1[argmax y_m = k]: labels (B, h, w) → one-hot (B, K, h, w), ignored pixels all zero."""
    valid = labels != ignore_index
    one_hot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return one_hot * valid.unsqueeze(1)


def target_class_weights(pseudo_labels: Tensor) -> Tensor:
    """Eq. 13's weights ŷ_k · 1[argmax ŷ = k] (zero for pixels whose pseudo label is the zero vector)."""
    winner = F.one_hot(pseudo_labels.argmax(1), pseudo_labels.shape[1]).permute(0, 3, 1, 2).to(pseudo_labels)
    return pseudo_labels * winner


def as_distribution(centroids: Tensor, mode: str) -> Tensor:
    """Centroids (K, F) → probability vectors over F (docstring, choice 2)."""
    if mode == "softmax":
        return F.softmax(centroids, dim=1)
    positive = centroids.clamp_min(0) + EPS
    return positive / positive.sum(1, keepdim=True)


def symmetric_divergence(source: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Eq. 11: mean over valid classes k of ½ [KL(F_s^k ‖ F_t^k) + KL(F_t^k ‖ F_s^k)]. source, target (K, F)
    probability vectors; valid (K,) bool. 0 when no class is valid."""
    if not valid.any():
        return source.sum() * 0.0
    p, q = source[valid], target[valid]
    log_p, log_q = torch.log(p.clamp_min(EPS)), torch.log(q.clamp_min(EPS))
    kl_pq = (p * (log_p - log_q)).sum(1)
    kl_qp = (q * (log_q - log_p)).sum(1)
    return (0.5 * (kl_pq + kl_qp)).mean()


def rewards(with_p: Tensor, without_p: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4-5. with_p = C(F̃), without_p = C^b(F) probabilities and labels (one-hot or soft) all (B, K, H, W) →
    R = R^s + R^a (B, H, W) in {0, 1, 2}."""
    k = labels.argmax(1, keepdim=True)
    segmentation = with_p.argmax(1, keepdim=True) == k
    amelioration = with_p.gather(1, k) > without_p.gather(1, k)
    return (segmentation.float() + amelioration.float()).squeeze(1)


def reward_regression_loss(value: Tensor, reward: Tensor, valid: Tensor) -> Tensor:
    """Eq. 6: mean over valid pixels of (V_cri − R)². value, reward (B, H, W), valid (B, H, W) bool."""
    if not valid.any():
        return value.sum() * 0.0
    return ((value - reward) ** 2)[valid].mean()


def critic_loss(value: Tensor) -> Tensor:
    """Eq. 3: L_cri = −V_cri (mean over pixels)."""
    return -value.mean()


# ---------------------------------------------------------------------------------------------------- build


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    outside = [k for k in hp.trained_class_ids() if k >= info.num_classes]
    require(not outside, f"trained_classes {outside} are not classes of the task (it has {info.num_classes})")
    segmenter = recipe_segmenter(hp, info)
    modules = {
        "segmenter": segmenter,
        "discriminator": ConvDiscriminator(segmenter.feature_channels, downsampling=discriminator_downsampling(hp)),
    }
    if hp.critical_transfer:
        modules["quantizer"] = TransferabilityQuantizer()
        modules["critic"] = TransferabilityCritic(segmenter.feature_channels)
    return nn.ModuleDict(modules)


def _adam(parameters, learning_rate: float, betas: tuple[float, float]) -> torch.optim.Adam:
    return torch.optim.Adam(parameters, lr=learning_rate, betas=betas)


def optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    def adam_schedule(adam: torch.optim.Adam) -> torch.optim.lr_scheduler.LRScheduler | None:
        return poly_schedule(adam, num_steps, hp.poly_power) if hp.adam_schedule == "poly" else None  # reading c

    if hp.segmenter_optimizer == "sgd":
        segmenter = recipe_optim(hp, modules["segmenter"], num_steps)
    else:
        adam = _adam(modules["segmenter"].parameters(), hp.learning_rate, (hp.segmenter_beta1, hp.segmenter_beta2))
        segmenter = Optim(adam, adam_schedule(adam))
    out = {"segmenter": segmenter}
    agents = {"discriminator": hp.discriminator_learning_rate}
    if hp.critical_transfer:
        agents.update(quantizer=hp.agent_learning_rate, critic=hp.agent_learning_rate)
    for name, learning_rate in agents.items():
        adam = _adam(modules[name].parameters(), learning_rate, (0.9, 0.99))
        out[name] = Optim(adam, adam_schedule(adam))
    return out


# ---------------------------------------------------------------------------------------------------- forward paths


def discriminate(hp: Hyperparams, modules: nn.ModuleDict, features: Tensor) -> Tensor:
    """D's logits on features F (B, F, h, w); features too small for D's strides are named in one line."""
    downsampling = discriminator_downsampling(hp)
    side = min(features.shape[-2:])
    if discriminator_output_side(side, downsampling) < 1:
        fits = [d for d in range(DISCRIMINATOR_LAYERS + 1) if discriminator_output_side(side, d) >= 1]
        raise ValueError(
            f"discriminator_downsampling={downsampling} leaves D no output on {tuple(features.shape[-2:])} features "
            f"of {hp.architecture}; " + (f"at most {max(fits)} fit these" if fits else "no stride fits these")
        )
    return modules["discriminator"](features)


def transferability_map(hp: Hyperparams, modules: nn.ModuleDict, features: Tensor) -> Tensor:
    """P for features F (B, F, h, w): D's output probability (reading a) through T_Q, Eq. 2, resized to F's size
    (B, 1, h, w)."""
    d_output = discriminate(hp, modules, features)
    if hp.quantizer_input == "probability":
        d_output = torch.sigmoid(d_output)
    p = transferability(modules["quantizer"](d_output))
    return F.interpolate(p, size=features.shape[-2:], mode="bilinear", align_corners=False)


def segment(hp: Hyperparams, modules: nn.ModuleDict, features: Features, p: Tensor | None) -> Tensor:
    """C on the features modulated by P (or on F when p is None): logits at the classifier's resolution, classes
    outside K masked out (reading d)."""
    logits = modules["segmenter"].classify(features._replace(main=modulate(features.main, p, hp.modulation)))
    return restrict_classes(logits, hp.trained_class_ids())


def _probabilities(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.softmax(upsample(logits, size), dim=1)


def pseudo_labels(hp: Hyperparams, state: Mapping[str, Any], probabilities: Tensor) -> Tensor:
    """Line 5 of Alg. 2: Eq. 10 with the latest thresholds, or the w/oCG hard labels."""
    if not hp.confidence_guided:
        return hard_pseudo_labels(probabilities)
    return soft_pseudo_labels(probabilities, state["thresholds"].to(probabilities.device), hp.gamma)


def _thresholds(hp: Hyperparams, state: Mapping[str, Any], num_classes: int, device: torch.device) -> Tensor:
    return state["thresholds"].to(device) if hp.confidence_guided else torch.ones(num_classes, device=device)


def _centroid_distributions(
    hp: Hyperparams, state: dict[str, Any], name: str, features: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Class centroids of one domain as distributions (K, F), and which classes have one (K,) (choice 3)."""
    sums, counts = class_centroid_sums(features, weights.to(features))
    present = counts > EPS
    batch = sums / counts.clamp_min(EPS).unsqueeze(1)
    if hp.centroids == "ema":
        history = state.get(f"centroids_{name}")
        seen = state.get(f"centroids_{name}_seen")
        if history is None:
            history = torch.zeros_like(batch).detach()
            seen = torch.zeros_like(present)
        history, seen = history.to(batch.device), seen.to(batch.device)
        mixed = torch.where(
            seen.unsqueeze(1), hp.centroid_momentum * history + (1 - hp.centroid_momentum) * batch, batch
        )
        current = torch.where(present.unsqueeze(1), mixed, history)
        state[f"centroids_{name}"] = current.detach()
        state[f"centroids_{name}_seen"] = seen | present
        return as_distribution(current, hp.centroid_distribution), seen | present
    return as_distribution(batch, hp.centroid_distribution), present


def _resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


# ---------------------------------------------------------------------------------------------------- Alg. 2


@dataclass
class Step:
    """What the lines of one iteration share: the normalised batch, labels and the thresholds in force."""

    x_s: Tensor
    y_s: Tensor
    x_t: Tensor
    delta: Tensor  # δ_k (K,)
    labels_t: Tensor | None = None  # soft pseudo labels at image resolution (B, K, H, W), from line 5
    labels_t_features: Tensor | None = None  # the same at E's feature resolution, for L_div
    frozen_features: tuple[Features, Features] | None = None  # E(x_s), E(x_t) without gradients, lines 7-8

    @property
    def size_s(self) -> tuple[int, int]:
        return tuple(self.x_s.shape[-2:])

    @property
    def size_t(self) -> tuple[int, int]:
        return tuple(self.x_t.shape[-2:])


def train_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    hp = ctx.hp
    step = Step(
        x_s=imagenet_normalise(batch.source_image),
        y_s=restrict_labels(batch.source_label, hp.trained_class_ids(), ctx.info.ignore_index),
        x_t=imagenet_normalise(batch.target_image),
        delta=_thresholds(hp, ctx.state, ctx.info.num_classes, batch.target_image.device),
    )
    metrics = line4_update_segmenter_on_source(ctx, step)
    metrics.update(line5_pseudo_labels(ctx, step))
    metrics.update(line6_update_encoder_and_discriminator(ctx, step))
    if hp.critical_transfer:
        metrics.update(line7_update_quantizer(ctx, step))
        metrics.update(line8_update_critic(ctx, step))
    if hp.pseudo_label_training == "eq7":
        metrics.update(eq7_update_segmenter_on_target(ctx, step))
    return metrics


def line4_update_segmenter_on_source(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Alg. 2, line 4: E and C minimise the source term of L_seg (P, if any, is a given attention map here)."""
    hp, modules = ctx.hp, ctx.modules
    features = modules["segmenter"].encode(step.x_s)
    p = transferability_map(hp, modules, features.main).detach() if hp.critical_transfer else None
    loss = source_segmentation_loss(
        segment(hp, modules, features, p), step.y_s, ctx.info.ignore_index, hp.eq7_reduction
    )
    _descend(ctx, "segmenter", loss)
    return {"loss_seg_source": loss.detach()}


@torch.no_grad()
def line5_pseudo_labels(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Line 5: confident soft pseudo labels of the target images, Eq. 10, at image and at E's feature resolution."""
    hp, modules = ctx.hp, ctx.modules
    features = modules["segmenter"].encode(step.x_t)
    p = transferability_map(hp, modules, features.main) if hp.critical_transfer else None
    logits = segment(hp, modules, features, p)
    step.labels_t = pseudo_labels(hp, ctx.state, _probabilities(logits, step.size_t))
    step.labels_t_features = pseudo_labels(hp, ctx.state, _probabilities(logits, tuple(features.main.shape[-2:])))
    return {"pseudo_label_fraction": (step.labels_t.sum(1) > 0).float().mean()}


def line6_update_encoder_and_discriminator(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Line 6: min over E, max over D of ξ2 L_adv + ξ3 L_div (D: source → 1, target → 0; E: target → source)."""
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    segmenter, discriminator = modules["segmenter"], modules["discriminator"]
    features_s, features_t = segmenter.encode(step.x_s).main, segmenter.encode(step.x_t).main
    loss_adv = domain_bce(discriminate(hp, modules, features_t), 1.0)
    loss_encoder = hp.xi2 * loss_adv
    metrics = {"loss_adv": loss_adv.detach()}
    if hp.symmetric_divergence:
        weights_s = source_class_weights(
            _resize_labels(step.y_s, features_s.shape[-2:]), info.num_classes, info.ignore_index
        )
        dist_s, valid_s = _centroid_distributions(hp, ctx.state, "source", features_s, weights_s)
        dist_t, valid_t = _centroid_distributions(
            hp, ctx.state, "target", features_t, target_class_weights(step.labels_t_features)
        )
        loss_div = symmetric_divergence(dist_s, dist_t, valid_s & valid_t)
        loss_encoder = loss_encoder + hp.xi3 * loss_div
        metrics["loss_div"] = loss_div.detach()
    _descend(ctx, "segmenter", loss_encoder)  # only E has gradients: C's are None and the optimiser skips them
    d_s, d_t = discriminator(features_s.detach()), discriminator(features_t.detach())
    loss_d = 0.5 * (domain_bce(d_s, 1.0) + domain_bce(d_t, 0.0))
    _descend(ctx, "discriminator", loss_d)
    metrics["loss_d"] = loss_d.detach()
    metrics["domain_gap"] = domain_gap(d_s.detach(), d_t.detach())  # Fig. 3(b), reading e
    return metrics


def line7_update_quantizer(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Line 7: T_Q minimises L_seg (both terms of Eq. 7) + ξ1 L_cri; gradients reach T_Q through P only."""
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    features_s, features_t = _frozen_features(ctx, step)
    p_s, p_t = transferability_map(hp, modules, features_s.main), transferability_map(hp, modules, features_t.main)
    loss_seg = source_segmentation_loss(
        segment(hp, modules, features_s, p_s), step.y_s, info.ignore_index, hp.eq7_reduction
    ) + target_segmentation_loss(
        step.labels_t,
        _probabilities(segment(hp, modules, features_t, p_t), step.size_t),
        step.delta,
        hp.gamma,
        hp.eq7_reduction,
    )
    critic = modules["critic"]
    loss_cri = 0.5 * (critic_loss(critic(features_s.main, p_s)) + critic_loss(critic(features_t.main, p_t)))
    _descend(ctx, "quantizer", loss_seg + hp.xi1 * loss_cri)
    return {
        "loss_seg_quantizer": loss_seg.detach(),
        "loss_cri": loss_cri.detach(),
        "transferability_mean": 0.5 * (p_s.detach().mean() + p_t.detach().mean()),
    }


def line8_update_critic(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Line 8: T_C regresses the rewards R = R^s + R^a of the current quantizer's transferability (Eq. 4-6)."""
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    features_s, features_t = _frozen_features(ctx, step)
    with torch.no_grad():
        p_s, p_t = transferability_map(hp, modules, features_s.main), transferability_map(hp, modules, features_t.main)
        reward_s = rewards(
            _probabilities(segment(hp, modules, features_s, p_s), step.size_s),
            _probabilities(segment(hp, modules, features_s, None), step.size_s),
            source_class_weights(step.y_s, info.num_classes, info.ignore_index),
        )
        reward_t = rewards(
            _probabilities(segment(hp, modules, features_t, p_t), step.size_t),
            _probabilities(segment(hp, modules, features_t, None), step.size_t),
            step.labels_t,
        )
    critic = modules["critic"]
    value_s = upsample(critic(features_s.main, p_s), step.size_s)[:, 0]
    value_t = upsample(critic(features_t.main, p_t), step.size_t)[:, 0]
    loss_reg = 0.5 * (
        reward_regression_loss(value_s, reward_s, step.y_s != info.ignore_index)
        + reward_regression_loss(value_t, reward_t, step.labels_t.sum(1) > 0)
    )
    _descend(ctx, "critic", loss_reg)
    return {"loss_reg": loss_reg.detach(), "reward_target_mean": reward_t.mean()}


def _frozen_features(ctx: StepContext, step: Step) -> tuple[Features, Features]:
    """E(x_s), E(x_t) without gradients, computed once for lines 7 and 8 (E does not change between them)."""
    if step.frozen_features is None:
        with torch.no_grad():
            step.frozen_features = (
                ctx.modules["segmenter"].encode(step.x_s),
                ctx.modules["segmenter"].encode(step.x_t),
            )
    return step.frozen_features


def eq7_update_segmenter_on_target(ctx: StepContext, step: Step) -> dict[str, Tensor]:
    """Eq. 7 / Eq. 14: E and C also minimise the target term of L_seg (docstring, choice 4)."""
    hp, modules = ctx.hp, ctx.modules
    features = modules["segmenter"].encode(step.x_t)
    p = transferability_map(hp, modules, features.main).detach() if hp.critical_transfer else None
    probabilities = _probabilities(segment(hp, modules, features, p), step.size_t)
    loss = target_segmentation_loss(step.labels_t, probabilities, step.delta, hp.gamma, hp.eq7_reduction)
    _descend(ctx, "segmenter", loss)
    return {"loss_seg_target": loss.detach()}


def _descend(ctx: StepContext, name: str, loss: Tensor) -> None:
    """One update of module `name`'s optimiser on `loss` (gradients of other modules are cleared by their own
    optimisers before their own updates)."""
    optimizer = ctx.optimizers[name]
    optimizer.zero_grad(set_to_none=True)
    ctx.backward(loss)
    ctx.step(name)


# ---------------------------------------------------------------------------------------------------- Alg. 1 pass


def collect_confidences(ctx: StepContext, images: Tensor, image_labels: Tensor | None) -> dict[str, Tensor]:
    """Alg. 1, lines 1-7 for one batch: max probability and argmax of C per output pixel."""
    logits = _logits(ctx.hp, ctx.modules, imagenet_normalise(images))
    probabilities = F.softmax(logits, dim=1)
    confidence, prediction = probabilities.max(1)
    return {"confidence": confidence.flatten(), "prediction": prediction.flatten().to(torch.int16)}


def update_thresholds(ctx: StepContext, gathered: Mapping[str, Tensor]) -> dict[str, Any]:
    """Alg. 1, lines 8-11 over the whole target set, with S_A for the current (source) epoch."""
    portion = selection_amount(ctx.source_epoch, ctx.hp.selection_start, ctx.hp.selection_step, ctx.hp.selection_max)
    thresholds = class_thresholds(
        gathered["confidence"].cpu(), gathered["prediction"].long().cpu(), ctx.info.num_classes, portion
    )
    return {"thresholds": thresholds, "selection_amount": float(portion)}  # state holds plain numbers


def _logits(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor) -> Tensor:
    features = modules["segmenter"].encode(images)
    p = transferability_map(hp, modules, features.main) if hp.critical_transfer else None
    return segment(hp, modules, features, p)


def warmup_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    return {"segmenter": optimizers(hp, modules, num_steps)["segmenter"]}


def warmup_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Choice 7: line 4 of Alg. 2 alone (E and C on the source term of L_seg), before pseudo labels are mined."""
    step = Step(
        x_s=imagenet_normalise(batch.source_image),
        y_s=restrict_labels(batch.source_label, ctx.hp.trained_class_ids(), ctx.info.ignore_index),
        x_t=batch.source_image[:0],
        delta=torch.ones(ctx.info.num_classes),
    )
    return line4_update_segmenter_on_source(ctx, step)


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    trains = ("segmenter", "discriminator") + (("quantizer", "critic") if hp.critical_transfer else ())
    target_pass = None
    if hp.confidence_guided:
        target_pass = TargetPass("every_epoch", collect_confidences, update_thresholds, every="source")
    adapt = Stage(
        name="adapt",
        trains=trains,
        budget=epochs(hp.epochs * (1.0 - hp.source_warmup), of="source"),
        optimizers=optimizers,
        step=train_step,
        target_pass=target_pass,
    )
    if hp.source_warmup == 0:
        return (adapt,)
    warmup = Stage(
        name="source_warmup",
        trains=("segmenter",),
        budget=epochs(hp.epochs * hp.source_warmup, of="source"),
        optimizers=warmup_optimizers,
        step=warmup_step,
        uses_target=False,
    )
    return warmup, adapt


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    """E → T_Q's transferability → C on the modulated features (Sec. 3.5 "forward x into E and C")."""
    return upsample(_logits(hp, modules, imagenet_normalise(images)), tuple(images.shape[-2:]))


METHOD = Method(
    name="cscl",
    paper="Dong et al., CSCL: Critical Semantic-Consistent Learning for UDA, ECCV 2020 "
    "(../shared/papers/002_c46badf92f1b9b44.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=(
        "synthetic-urban",
        "gta5-cityscapes",
        "synthia-cityscapes",
        "cityscapes-nthu-rome",
        "cityscapes-nthu-rio",
        "cityscapes-nthu-tokyo",
        "cityscapes-nthu-taipei",
    ),
    imagenet_backbone=True,  # "initially pre-trained by the ImageNet" (Sec. 3.5)
)
