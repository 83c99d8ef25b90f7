"""CIRN: Content Invariant Representation Network (Gao, Zhang, Zhang, "Addressing Domain Gap via Content Invariant
Representation for Semantic Segmentation", AAAI 2021). Implements ../shared/papers/004_f2fbc54fd8dcd3d8.txt; the
reading notes ../shared/papers/notes/cirn.md were checked against the paper, and where they differ the paper wins.

Three stages (Fig. 2), plus the source model that stage 1's semantic loss needs:

0. `source`: S, the frozen source segmentation model of Eq. 4 ("we pretrain a source segmentation model and fix its
   weights"), trained here with the shared DeepLab-v2 recipe on raw source images (what `source_only` trains), or
   given as a weights file (below).
1. `translate` (Eq. 1-5): CycleGAN G: S→T and F: T→S (`generator_s2t`, `generator_t2s`; 9-block ResNet generators),
   D_T and D_S (70x70 PatchGANs), the cycle loss, and the semantic-consistency loss L_sem = CE(S(G(x_s)), y_s),
   whose gradient reaches G through the frozen S. Adam 2e-4, betas (0.5, 0.999).
2. `adapt` (Eq. 6-8): the CIR images x_i = G(x_s) are translated on the fly by the frozen G in every step (the
   paper translates the source set once, "X_I consists of G(x_s)"; the same images up to the order of the task's
   resize/flip and the translation, with no dataset to store). Measured at the paper's size on 2 CPU threads
   (`python benchmarks/cirn_translation.py --repeats 2`: G on a 1280x720 source image 8.8 s of an 81.5 s stage-2
   step, 0.108), so a precomputed X_I would save at most a tenth of stage 2; on a GPU the share is unmeasured. Encoder E and
   classifier C (DeepLab-v2 ResNet-101, a fresh one: not S of stage 1; "pretrained on ImageNet": a paper task
   needs `--set backbone_weights=...`, `Method.imagenet_backbone`; C its ASPP), the ACM (K attention modules
   around a second classifier, whose weights are copied from C when the stage starts), L_seg on
   softmax(z_C + z_ACM) (Eq. 6), the pixel-weighted adversarial loss with weights λ_cos·R + ε, R the cosine
   distance of C's and ACM's softmax maps on target pixels (Eq. 7), CLAN's weight discrepancy loss, and the
   five-convolution output-space D. Segmenter: SGD 2.5e-4, momentum 0.9, weight decay
   5e-4, poly; D: Adam 1e-4, betas (0.9, 0.99). 100,000 iterations at batch 1.
3. `self_train` (Eq. 9): cross-entropy on target pseudo labels from the stage-2 model, same optimiser as stage 2.

Table 4 switches: `use_cir=False` drops stages 0-1 (stage 2 on raw source images); `adaptation=False` makes stage 2
plain supervised training of E + C (no ACM, no D, no target images: the SO and CIR rows); `self_training=False`
drops stage 3. SO = all three off; CIR+ASS+ST = the defaults. `K` = 0 makes the ACM a plain second classifier
("ACM will degenerate to a normal classifier", Table 3); with the default `acm_init="copy"` that classifier stays a
copy of C (choice 7), so K = 0 is then not CLAN's setting: `acm_init="independent"` is.

Stage reuse across trials (WeightsFile fields; the platform checks the files before any trial starts, and module
keys do not depend on them, so every checkpoint rebuilds with the fields cleared):
- `source_segmenter_weights`: a `source_only` checkpoint (its `segmenter`) or a `cirn` checkpoint (its
  `source_segmenter`) becomes S; skips stage 0.
- `translator_weights`: a `cirn` checkpoint taken after stage 1 (G, F, D_T, D_S, and S when it has one); skips
  stages 0 and 1. Every later checkpoint of a trial also qualifies: stage 1's modules are frozen afterwards.
- `adapted_weights`: a `cirn` checkpoint taken after stage 2 (E + C, the ACM and D; the translator too when it has
  one); only stage 3 runs.
- `last_stage`: the trial stops after this stage, so that stage 1 can be trained once on its own.
The chain that sweeps K or ε without retraining stage 1 per trial (each file is the run's `checkpoints/last.pt`):

    python -m platform.train cirn --task T --set last_stage=translate                           # stages 0-1, once
    python -m platform.sweep cirn --task T --grid table3 --set translator_weights=A/last.pt       # stage 2 per K
    python -m platform.train cirn --task T --set adapted_weights=B/last.pt                       # stage 3

(`--grid table3` already sets `self_training=False`; `source_segmenter_weights=` a source_only checkpoint in the
first command skips stage 0 as well.)

Choices the paper leaves open or prints ambiguously (each a hyperparameter where two readings are plausible):

1. Eq. 3 prints the target cycle as ‖F(G(x_t)) − x_t‖₁, which applies G to a target image; read as CycleGAN's
   ‖G(F(x_t)) − x_t‖₁ (a typo; not a switch).
2. GAN losses: Eq. 1-2 print the log-likelihood GAN; "we adopt CycleGAN", whose practice (and conventions.md) is the
   least-squares loss: `gan_mode="lsgan"` (default) or "vanilla" (Eq. 1-2 literally). D_S and D_T minimise
   CycleGAN's ½[real + fake] on fakes from a pool of 50; G and F the non-saturating generator terms.
3. Weights of Eq. 5: printed all 1. `lambda_sem=1` as printed; `lambda_cyc=10` because Eq. 5 restates CycleGAN's
   objective, whose cycle weight is 10 (`lambda_cyc=1`, the literal Eq. 5, is in the open-choices grid); no
   identity term (`lambda_identity=0`; CycleGAN's optional ‖G(x_t) − x_t‖₁ + ‖F(x_s) − x_s‖₁ at that weight).
4. Architectures and schedule of stage 1 are not printed: CycleGAN's (ngf 64, 9 blocks, 70x70 PatchGAN ndf 64,
   pool 50, inputs in [-1, 1]); Adam constant for `gan_constant_share` = half the stage, then linear to 0
   (CycleGAN; "initial learning rate" implies a decay). Crop: `translation_crop` (a random square crop of the
   source image and its label, and of the target image, drawn with the step's generator; 0 = full frames); 400 on
   the Cityscapes tasks (CyCADA's GTA5 → Cityscapes setting), 32 on the synthetic task (CPU budget). G is applied to
   full frames in stage 2 (fully convolutional; sizes must be divisible by 4, 720x1280 and 760x1280 are).
5. S (Eq. 4) is not specified: the platform's DeepLab-v2 recipe on raw source images (the `source_only` baseline).
   L_sem follows Eq. 4: the cross-entropy of S(G(x_s)) against the source label y_s (ignored pixels excluded), not
   against S's prediction on x_s; no semantic term on F. Means over labelled pixels instead of Eq. 4, 6 and 9's
   sums: λ_adv = 0.001 is calibrated for means (AdaptSegNet, CLAN).
6. The ACM (Figure 3 is not in the text). Attention module k, as in SEAN (Xu et al. 2019, cited; two of its
   authors are CIRN's): a_k = σ(Up(Conv1x1_k(AvgPool_3x3,s2(f)))) with a bias-free 1x1 convolution to one channel
   (computed before the bilinear upsampling, with which it commutes); f_k = (1 + a_k)⊙f (`acm_attention=
   "residual"`, SEAN's) or a_k⊙f ("multiply"). The paper's one sentence on it, "The attention map ranges from
   [0, 1], thereby playing the role of controlling features for input", fits both: "multiply" gates features
   (can suppress them), "residual" only amplifies (multiplier in [1, 2]); the default follows SEAN (above), and
   "multiply" is in the open-choices grid; ACM(f) = Σ_k Cls(f_k) with ONE classifier shared by the modules
   ("the classifier in ACM", singular, is the one the weight discrepancy loss compares with C); K = 0 gives
   ACM(f) = Cls(f). The ACM's parameters train at the head's 10x learning rate, like CLAN's second classifier.
7. "C and the classifier in ACM are copies of the last classification module": `acm_init="copy"` (default)
   copies C's initial weights into the ACM classifier when stage 2 starts (`Stage.on_start`); "independent"
   keeps its own N(0, 0.01) draw, as CLAN initialises its two classifiers. A consequence of "copy" worth knowing:
   with K = 0 and `seg_loss_terms="sum"` the two classifiers see the same features, get the same gradients (the
   weight discrepancy's gradient vanishes at cosine 1) and stay identical for the whole stage, so R ≡ 0 and the
   adversarial weight is ε everywhere: Table 3's K = 0 column is then an ε-scaled AdaptSegNet, not CLAN; run it
   with `acm_init=independent` for CLAN's reading (the open-choices grid has it; a test pins this behaviour).
8. Eq. 6: P_I = softmax(z_C + z_ACM) as printed (`seg_loss_terms="sum"`); CLAN's code trains each classifier on
   its own, CE(z_C) + CE(z_ACM) ("each", open choices). D, R's target term and `predict` always use z_C + z_ACM.
9. Eq. 7 omits D: read as D's objective −E[log D(P_I)] − E[(λ_cos R + ε) log(1 − D(P_T))], so D's labels are
   CIR = 1 and target = 0 as printed (CLAN's code uses 0 and 1: the same game with D's sign flipped). The
   segmenter's side (what λ_adv scales in Eq. 8) is the non-saturating flip −E[(λ_cos R + ε) log D(P_T)]: "large
   weights will be assigned as to encourage segmentation model to fool discriminator D"; Eq. 7's CIR term
   −E[log D(P_I)] is D's alone (P_I "is fed to D" to train it, as in CLAN and AdaptSegNet), unweighted, and D's
   loss is not scaled by λ_adv. D's output (stride 32) is upsampled bilinearly to the image size
   and multiplied per pixel by the weight map there (CLAN). R = 1 − cos over classes of softmax(Up(z_C)) and
   softmax(Up(z_ACM)) at the target image size, for target images only.
10. The weight map's gradient: `detach_weight_map=False` (default) lets the segmenter's adversarial term also
   pull p¹ and p² together through R, as CLAN's code does and as "make as similar predictions as possible" asks;
   True treats the map as a constant. D always sees a detached map.
11. Weight discrepancy (not in Eq. 8; "following the work (Luo et al. 2019)"): CLAN's L_W = cos(w_C, w_ACM) over
   the concatenated flattened weights and biases of C and the ACM classifier (not the attention convolutions),
   added to the segmenter's objective with CLAN's λ_weight = 0.01. CLAN's code adds a constant 1 (no gradient) and
   multiplies by 2 and a linear damping; neither is printed by CLAN or CIRN, so neither is used. CLAN's preheat
   (5% warm-up with an unweighted loss) and focal cross-entropy are not used either.
12. Optimisers: "We set optimizers a weight decay of 5 × 10^-4 with a poly learning rate decay policy" (plural):
   D's Adam gets weight decay 5e-4 (`discriminator_weight_decay`; CLAN's and AdaptSegNet's code use 0, in the
   open-choices grid) and the poly schedule. Stage 3 builds a fresh SGD with stage 2's settings and a poly
   schedule over its own length ("the same learning rate and optimizer with stage 2").
13. Stage 3 pseudo labels (no rule printed; Eq. 9 only): `pseudo_label_rule="median_capped"` (default): BDL's
   rule (Li et al. 2019, cited for this pipeline): per class, the confidence at rank round(n_c/2) of the pixels
   predicted as that class (ascending, half to even), capped at 0.9 (0 for a class no pixel is predicted as);
   "class_portion": CBST's class-balanced threshold, the confidence at rank ⌊p·n_c⌋ in descending order
   (`pseudo_label_portion` p = 0.2, CBST's first round; CIRN has one round), 1 for an absent class; "argmax": every
   pixel keeps its argmax. Thresholds come from one pass over the whole target training set when the stage
   starts, with confidences quantised to 1/255 (the per-class counts of 256 levels give exact order statistics of
   the quantised values; the rules on raw confidences are tested to agree on quantised inputs). Eq. 9 only: no
   source, adversarial or weight-discrepancy terms in stage 3, C and the ACM trained through softmax(z_C + z_ACM).
14. Pseudo labels fixed by the stage-2 model ("generate pseudo labels ... with the model trained in stage 2"):
   `pseudo_label_mode="offline"` (default) computes the argmax and quantised confidence of every target image once,
   unaugmented, in the stage-start pass, into the platform's per-sample store, and thresholds them in the step
   (the store hands them over resized, cropped and flipped like the step's target crop); "online" snapshots the
   stage-2 model into a frozen `teacher` module when the stage starts and labels each augmented target batch with
   it (same labels up to the augmentation's interpolation; no store).
15. Stage budgets: stage 2's 100,000 iterations are printed; stages 0, 1 and 3 are not (100,000 each: the recipe's
   source-only length for S, and stage 2's length for the CycleGAN and for self-training).
16. Table 4's garbled text is read as six rows per dataset (SO, CIR, ASS, CIR+ASS, ASS+ST, CIR+ASS+ST), as in
   the notes (section 4); the search space's `table4` grid runs them.
17. The paper reports "the best in many times experiments"; benchmarks report mean ± std over seeds and the best
   seed, both labelled.

Not implemented: a source term in stage 3 (Eq. 9 has none); per-module ACM classifiers; CLAN's damping and preheat.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import (
    Batch,
    Method,
    Optim,
    SampleImages,
    SampleMap,
    Stage,
    StagePosition,
    StepContext,
    TargetPass,
    TaskInfo,
    WeightsFile,
    require,
    steps,
)
from methods.shared.discriminators import output_space_discriminator
from methods.shared.gan import ImagePool, PatchDiscriminator, ResnetGenerator, lsgan_loss, vanilla_gan_loss
from methods.shared.losses import segmentation_loss
from methods.shared.optim import linear_decay, poly_schedule
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import DeepLabV2ASPP, Features, imagenet_normalise, upsample

STAGES = ("source", "translate", "adapt", "self_train")
SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0  # Eq. 7: D → 1 on CIR predictions (log D(P_I)), → 0 on target ones
LEVELS = 255  # confidences are quantised to k/255 for the pseudo-label thresholds and the store (choice 13)
EPS = 1e-8


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    # Table 4 switches (ablation rows) and Table 3's K
    use_cir: bool = True  # Table 4 "CIR": stage 1 (translation); False: stage 2 on raw source images
    adaptation: bool = True  # Table 4 "ASS": ACM, D and Eq. 7; False: stage 2 is CE of E + C only
    self_training: bool = True  # Table 4 "ST": stage 3
    K: int = 2  # attention modules in the ACM (Impl. details, Table 3); 0: a plain second classifier (choice 7)
    # Stage 1, Eq. 1-5
    lambda_sem: float = 1.0  # weight of L_sem, Eq. 5 (printed 1); 0: plain CycleGAN, no stage 0
    lambda_cyc: float = 10.0  # weight of L_cyc; Eq. 5 prints 1, CycleGAN's objective has 10 (choice 3)
    lambda_identity: float = 0.0  # CycleGAN's identity term; not in Eq. 5 (choice 3)
    gan_mode: Literal["lsgan", "vanilla"] = "lsgan"  # CycleGAN practice; "vanilla" = Eq. 1-2 literally (choice 2)
    gan_learning_rate: float = 2e-4  # Adam, Impl. details
    gan_beta1: float = 0.5  # Impl. details
    gan_beta2: float = 0.999  # Impl. details
    gan_constant_share: float = 0.5  # share of stage 1 at the initial rate before the linear decay (choice 4)
    pool_size: int = 50  # CycleGAN's image pool (choice 4)
    generator_filters: int = 64  # CycleGAN's ngf (choice 4)
    generator_blocks: int = 9  # CycleGAN's residual blocks for large images (choice 4)
    patch_discriminator_filters: int = 64  # 70x70 PatchGAN ndf (choice 4)
    translation_crop: int = 0  # random square crop for stage 1, 0 = full frames (choice 4)
    # Stage 2, Eq. 6-8
    lambda_adv: float = 0.001  # λ_adv, Eq. 8 (Impl. details)
    lambda_cos: float = 40.0  # λ_cos, Eq. 7 (Impl. details)
    epsilon: float = 0.4  # ε, Eq. 7 (Impl. details)
    lambda_weight: float = 0.01  # weight discrepancy loss, CLAN's λ_weight (not printed by CIRN; choice 11)
    acm_attention: Literal["residual", "multiply"] = "residual"  # (1 + a)⊙f as SEAN, or a⊙f (choice 6)
    acm_init: Literal["copy", "independent"] = "copy"  # "copies of the last classification module" (choice 7)
    seg_loss_terms: Literal["sum", "each"] = "sum"  # Eq. 6 on z_C + z_ACM, or CLAN's code (choice 8)
    detach_weight_map: bool = False  # R as a constant in the segmenter's adversarial term (choice 10)
    discriminator_learning_rate: float = 1e-4  # Adam for D, Impl. details
    discriminator_beta1: float = 0.9  # Impl. details
    discriminator_beta2: float = 0.99  # Impl. details
    discriminator_weight_decay: float = 5e-4  # "optimizers a weight decay of 5e-4" (choice 12)
    # Stage 3, Eq. 9
    pseudo_label_rule: Literal["median_capped", "class_portion", "argmax"] = "median_capped"  # choice 13
    pseudo_label_cap: float = 0.9  # BDL's cap on the per-class median (choice 13)
    pseudo_label_portion: float = 0.2  # CBST's class-balanced portion, first round (choice 13)
    pseudo_label_mode: Literal["offline", "online"] = "offline"  # per-sample store or frozen teacher (choice 14)
    # Stage budgets in optimiser steps (choice 15): stage 2 printed, the others chosen
    source_steps: int = 100_000  # stage 0, S (not printed: the recipe's source-only length)
    translation_steps: int = 100_000  # stage 1 (not printed: as stage 2)
    adaptation_steps: int = 100_000  # stage 2: "We train the network for 100,000 iterations" (Impl. details)
    self_training_steps: int = 100_000  # stage 3 (not printed: as stage 2)
    last_stage: Literal["", "source", "translate", "adapt", "self_train"] = ""  # stop after it; "" = run all
    # Stage reuse across trials (docstring)
    source_segmenter_weights: WeightsFile = ""  # S from a source_only or cirn checkpoint; skips stage 0
    translator_weights: WeightsFile = ""  # stage-1 modules from a cirn checkpoint; skips stages 0-1
    adapted_weights: WeightsFile = ""  # stage-2 modules from a cirn checkpoint; only stage 3 runs

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.K >= 0, f"K must be >= 0 (got {self.K})")
        for name in (
            "lambda_sem",
            "lambda_cyc",
            "lambda_identity",
            "lambda_adv",
            "lambda_cos",
            "epsilon",
            "lambda_weight",
            "discriminator_weight_decay",
        ):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("gan_learning_rate", "discriminator_learning_rate"):
            require(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("gan_beta1", "gan_beta2", "discriminator_beta1", "discriminator_beta2", "gan_constant_share"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")
        require(self.pool_size >= 0, f"pool_size must be >= 0 (got {self.pool_size})")
        for name in ("generator_filters", "generator_blocks", "patch_discriminator_filters"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        require(
            self.translation_crop >= 0 and self.translation_crop % 4 == 0,
            f"translation_crop must be 0 or a positive multiple of 4, as G needs (got {self.translation_crop})",
        )
        require(0 < self.pseudo_label_cap <= 1, f"pseudo_label_cap must be in (0, 1] (got {self.pseudo_label_cap})")
        require(
            0 < self.pseudo_label_portion <= 1,
            f"pseudo_label_portion must be in (0, 1] (got {self.pseudo_label_portion})",
        )
        for name in ("source_steps", "translation_steps", "adaptation_steps", "self_training_steps"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        for name, valid in (
            ("gan_mode", ("lsgan", "vanilla")),
            ("acm_attention", ("residual", "multiply")),
            ("acm_init", ("copy", "independent")),
            ("seg_loss_terms", ("sum", "each")),
            ("pseudo_label_rule", ("median_capped", "class_portion", "argmax")),
            ("pseudo_label_mode", ("offline", "online")),
            ("last_stage", ("",) + STAGES),
        ):
            require(
                getattr(self, name) in valid, f"{name} must be one of {', '.join(valid)} (got {getattr(self, name)!r})"
            )
        require(
            not self.translator_weights or self.use_cir,
            "translator_weights needs use_cir=True (the file holds stage 1, which use_cir=False does not run)",
        )
        require(
            not self.source_segmenter_weights or (self.use_cir and self.lambda_sem > 0),
            "source_segmenter_weights is S of L_sem: it needs use_cir=True and lambda_sem > 0",
        )
        given = [n for n in ("source_segmenter_weights", "translator_weights", "adapted_weights") if getattr(self, n)]
        require(len(given) <= 1, f"give at most one of {', '.join(given)}: each starts the pipeline at another stage")
        require(
            not self.adapted_weights or self.self_training,
            "adapted_weights leaves only stage 3 to run: it needs self_training=True",
        )
        names = stage_names(self, cut=False)
        require(
            not self.last_stage or self.last_stage in names,
            f"last_stage={self.last_stage} is not among this configuration's stages ({', '.join(names)})",
        )


def stage_names(hp: Hyperparams, cut: bool = True) -> tuple[str, ...]:
    """The stages this configuration runs, in order (switches, reused stages, and `last_stage` when `cut`)."""
    names = []
    if hp.use_cir and not (hp.translator_weights or hp.adapted_weights):
        if hp.lambda_sem > 0 and not hp.source_segmenter_weights:
            names.append("source")
        names.append("translate")
    if not hp.adapted_weights:
        names.append("adapt")
    if hp.self_training:
        names.append("self_train")
    if cut and hp.last_stage in names:
        names = names[: names.index(hp.last_stage) + 1]
    return tuple(names)


# ---------------------------------------------------------------------------------------------------- modules


class AttentionModule(nn.Module):
    """One attention module of the ACM (choice 6, after SEAN): features f (B, C, h, w) → a (B, 1, h, w) in [0, 1],
    a = σ(Up(Conv1x1(AvgPool_3x3,s2(f)))), the bias-free 1x1 convolution applied before the bilinear upsampling
    (they commute; one channel is cheaper to upsample than C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        pooled = F.avg_pool2d(features, 3, stride=2, padding=1, ceil_mode=True)
        logits = F.interpolate(self.conv(pooled), size=features.shape[-2:], mode="bilinear", align_corners=True)
        return torch.sigmoid(logits)


def modulate(features: Tensor, attention: Tensor, mode: str) -> Tensor:
    """The features the ACM classifier sees through attention map a: (1 + a)⊙f ("residual") or a⊙f ("multiply")."""
    return features * (1 + attention) if mode == "residual" else features * attention


class AncillaryClassifier(nn.Module):
    """The ACM (Fig. 3): K attention modules embedded in one classifier, output the sum over modules,
    ACM(f) = Σ_k Cls(f_k), f_k the features modulated by a_k; K = 0: ACM(f) = Cls(f), a normal classifier.
    `classifier` takes `Features` like the segmenter's C; logits (B, classes, h, w)."""

    def __init__(self, classifier: nn.Module, channels: int, modules: int, attention: str):
        super().__init__()
        self.classifier = classifier
        self.attention = nn.ModuleList(AttentionModule(channels) for _ in range(modules))
        self.mode = attention

    def attention_maps(self, features: Features) -> list[Tensor]:
        return [module(features.main) for module in self.attention]

    def forward(self, features: Features) -> Tensor:
        return self.classify(features, self.attention_maps(features))

    def classify(self, features: Features, maps: list[Tensor]) -> Tensor:
        if not maps:
            return self.classifier(features)
        return sum(self.classifier(features._replace(main=modulate(features.main, a, self.mode))) for a in maps)


def fresh_copy(classifier: nn.Module) -> nn.Module:
    """A classifier of the same architecture with its own initial draw (DeepLab-v2's N(0, 0.01) for the ASPP, the
    layers' default initialisation otherwise)."""
    twin = copy.deepcopy(classifier)
    if isinstance(twin, DeepLabV2ASPP):
        for branch in twin.branches:
            nn.init.normal_(branch.weight, 0, 0.01)
            nn.init.zeros_(branch.bias)
        return twin
    for module in twin.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return twin


def to_gan(images: Tensor) -> Tensor:
    """Images in [0, 1] → CycleGAN's range [-1, 1]."""
    return images * 2 - 1


def from_gan(images: Tensor) -> Tensor:
    return (images + 1) / 2


# ---------------------------------------------------------------------------------------------------- pure rules


def gan_loss(prediction: Tensor, real: bool, mode: str) -> Tensor:
    """A GAN loss on discriminator outputs: least squares (D − c)² or BCE with logits, c = 1 real, 0 fake."""
    return lsgan_loss(prediction, real) if mode == "lsgan" else vanilla_gan_loss(prediction, real)


def patch_discriminator_loss(d_real: Tensor, d_fake: Tensor, mode: str) -> Tensor:
    """D_S and D_T (Eq. 1-2 from the discriminator's side, CycleGAN's halving): ½[L(D(real), 1) + L(D(fake), 0)]."""
    return 0.5 * (gan_loss(d_real, True, mode) + gan_loss(d_fake, False, mode))


def cycle_loss(reconstructed_s: Tensor, x_s: Tensor, reconstructed_t: Tensor, x_t: Tensor) -> Tensor:
    """Eq. 3 with the target cycle read as CycleGAN's (choice 1): ‖F(G(x_s)) − x_s‖₁ + ‖G(F(x_t)) − x_t‖₁, means."""
    return (reconstructed_s - x_s).abs().mean() + (reconstructed_t - x_t).abs().mean()


def stage1_generator_objective(
    hp: Hyperparams, gan_g: Tensor, gan_f: Tensor, cyc: Tensor, sem: Tensor | None, identity: Tensor | None
) -> Tensor:
    """Eq. 5 from the generators' side: L_GAN(G) + L_GAN(F) + λ_cyc L_cyc + λ_sem L_sem (+ λ_identity L_identity)."""
    total = gan_g + gan_f + hp.lambda_cyc * cyc
    if sem is not None:
        total = total + hp.lambda_sem * sem
    if identity is not None:
        total = total + hp.lambda_identity * identity
    return total


def cosine_distance(p1: Tensor, p2: Tensor) -> Tensor:
    """R(p¹, p²) of Eq. 7: 1 − ⟨p¹, p²⟩ / (‖p¹‖ ‖p²‖) over the class dimension, per pixel.
    p1, p2 (B, K, H, W) probability maps → (B, 1, H, W), in [0, 1] for probabilities."""
    dot = (p1 * p2).sum(1, keepdim=True)
    norms = p1.norm(dim=1, keepdim=True) * p2.norm(dim=1, keepdim=True)
    return 1 - dot / norms.clamp_min(EPS)


def adversarial_weights(distance: Tensor, lambda_cos: float, epsilon: float) -> Tensor:
    """The per-pixel weight of Eq. 7's target term: λ_cos·R + ε."""
    return lambda_cos * distance + epsilon


def weighted_domain_bce(logits: Tensor, label: float, weights: Tensor | None = None) -> Tensor:
    """mean over pixels of w · BCE(D, label), D's logits (B, 1, H, W), w broadcastable (None: w = 1)."""
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label), reduction="none")
    return (bce if weights is None else bce * weights).mean()


def weight_discrepancy(parameters_c: Iterable[Tensor], parameters_acm: Iterable[Tensor]) -> Tensor:
    """CLAN's weight discrepancy loss (choice 11): the cosine similarity of the two classifiers' parameters,
    concatenated and flattened; minimising it makes the classifiers' weights different."""
    w1 = torch.cat([p.reshape(-1) for p in parameters_c])
    w2 = torch.cat([p.reshape(-1) for p in parameters_acm])
    return torch.dot(w1, w2) / (w1.norm() * w2.norm()).clamp_min(EPS)


def stage2_objective(hp: Hyperparams, seg: Tensor, adv: Tensor, weight: Tensor) -> Tensor:
    """The segmenter's stage-2 loss: Eq. 8, L_seg + λ_adv L_adv, plus λ_weight L_W (choice 11)."""
    return seg + hp.lambda_adv * adv + hp.lambda_weight * weight


def segmentation_terms(hp: Hyperparams, logits_c: Tensor, logits_acm: Tensor | None, labels: Tensor, ignore: int):
    """Eq. 6 (and Eq. 9): CE on softmax(z_C + z_ACM) ("sum"), or CE(z_C) + CE(z_ACM) ("each", CLAN's code)."""
    if logits_acm is None:
        return segmentation_loss(logits_c, labels, ignore)
    if hp.seg_loss_terms == "each":
        return segmentation_loss(logits_c, labels, ignore) + segmentation_loss(logits_acm, labels, ignore)
    return segmentation_loss(logits_c + logits_acm, labels, ignore)


def quantise(confidence: Tensor) -> Tensor:
    """Confidences in [0, 1] → integer levels round(255·c) (int64), the resolution of the thresholds and the store."""
    return torch.round(confidence.clamp(0, 1) * LEVELS).long()


def median_capped_thresholds(confidence: Tensor, prediction: Tensor, num_classes: int, cap: float) -> Tensor:
    """BDL's rule on raw confidences (N,) and predictions (N,): per class, the confidences of pixels predicted as c
    sorted ascending, the value at rank round(n_c / 2) (half to even, like numpy), at most `cap`; 0 for a class no
    pixel is predicted as. Returns (K,)."""
    thresholds = torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        ranked = confidence[prediction == k].double().sort().values
        if ranked.numel():
            rank = min(round(0.5 * ranked.numel()), ranked.numel() - 1)  # Python rounds half to even too
            thresholds[k] = min(float(ranked[rank]), cap)
    return thresholds


def class_portion_thresholds(confidence: Tensor, prediction: Tensor, num_classes: int, portion: float) -> Tensor:
    """CBST's class-balanced rule on raw confidences: per class, sorted descending, the value at rank ⌊p·n_c⌋
    (so about a portion p of the class's pixels is kept); 1 for an absent class. Returns (K,)."""
    thresholds = torch.ones(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        ranked = confidence[prediction == k].double().sort(descending=True).values
        if ranked.numel():
            thresholds[k] = float(ranked[min(int(portion * ranked.numel()), ranked.numel() - 1)])
    return thresholds


def confidence_histograms(levels: Tensor, prediction: Tensor, num_classes: int) -> Tensor:
    """Counts per (predicted class, confidence level): levels and predictions of any shape → (K, 256) int64."""
    flat = prediction.reshape(-1).long() * (LEVELS + 1) + levels.reshape(-1).long()
    return torch.bincount(flat, minlength=num_classes * (LEVELS + 1)).reshape(num_classes, LEVELS + 1)


def _level_at_rank(counts: Tensor, rank: int) -> int:
    """The level of the element at ascending rank `rank` of a histogram over levels 0..255."""
    return int(torch.searchsorted(counts.cumsum(0), torch.tensor(rank, dtype=counts.dtype), right=True))


def threshold_levels(histograms: Tensor, rule: str, cap: float, portion: float) -> Tensor:
    """The rules of choice 13 on per-class level histograms (K, 256) → thresholds in levels (K,) float64: a pixel of
    predicted class c is kept iff its level ≥ threshold[c]. Equal to the raw-confidence rules (× 255) on confidences
    that are multiples of 1/255."""
    num_classes = histograms.shape[0]
    if rule == "argmax":
        return torch.zeros(num_classes, dtype=torch.float64)
    out = torch.empty(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        counts = histograms[k].long()
        n = int(counts.sum())
        if n == 0:
            out[k] = 0.0 if rule == "median_capped" else float(LEVELS)
        elif rule == "median_capped":
            rank = min(round(0.5 * n), n - 1)
            out[k] = min(float(_level_at_rank(counts, rank)), cap * LEVELS)
        else:  # class_portion: descending rank ⌊p·n⌋ is ascending rank n − 1 − ⌊p·n⌋
            out[k] = float(_level_at_rank(counts, n - 1 - min(int(portion * n), n - 1)))
    return out


def apply_thresholds(prediction: Tensor, levels: Tensor, thresholds: Tensor, ignore_index: int) -> Tensor:
    """Pseudo labels (B, H, W): the predicted class where its confidence level reaches the class threshold, else
    `ignore_index`; pixels already `ignore_index` (outside a crop) stay ignored."""
    valid = prediction != ignore_index
    classes = torch.where(valid, prediction, torch.zeros_like(prediction)).long()
    keep = valid & (levels.to(thresholds.dtype) >= thresholds.to(levels.device)[classes])
    return torch.where(keep, classes, torch.full_like(classes, ignore_index))


def random_crop(
    images: Tensor, labels: Tensor | None, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """A random size x size window per sample (the same window for an image and its label), drawn with `generator`;
    size 0, or a window as large as the image, returns the inputs. images (B, C, H, W), labels (B, H, W)."""
    height, width = images.shape[-2:]
    if size == 0 or (size >= height and size >= width):
        return images, labels
    crop_h, crop_w = min(size, height), min(size, width)
    tops = torch.randint(0, height - crop_h + 1, (images.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, width - crop_w + 1, (images.shape[0],), generator=generator).tolist()
    windows = list(zip(tops, lefts))
    crops = torch.stack([im[:, t : t + crop_h, x : x + crop_w] for im, (t, x) in zip(images, windows)])
    if labels is None:
        return crops, None
    return crops, torch.stack([lab[t : t + crop_h, x : x + crop_w] for lab, (t, x) in zip(labels, windows)])


# ---------------------------------------------------------------------------------------------------- build


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    """Module keys depend on the switches only, never on the WeightsFile fields (checkpoints rebuild without them)."""
    modules = nn.ModuleDict()
    channels = info.in_channels
    if hp.use_cir:
        if hp.lambda_sem > 0:
            modules["source_segmenter"] = recipe_segmenter(hp, info)
        for name in ("generator_s2t", "generator_t2s"):
            modules[name] = ResnetGenerator(channels, channels, hp.generator_filters, hp.generator_blocks)
        for name in ("discriminator_t", "discriminator_s"):
            modules[name] = PatchDiscriminator(channels, hp.patch_discriminator_filters)
    segmenter = recipe_segmenter(hp, info)
    modules["segmenter"] = segmenter
    if hp.adaptation:
        classifier = fresh_copy(segmenter.classifier)
        modules["acm"] = AncillaryClassifier(classifier, segmenter.feature_channels, hp.K, hp.acm_attention)
        modules["discriminator"] = output_space_discriminator(info.num_classes)
    if hp.self_training and hp.pseudo_label_mode == "online":
        modules["teacher"] = nn.ModuleDict({name: copy.deepcopy(modules[name]) for name in _student(hp)})
    _load_weights_files(hp, modules)
    return modules


def _student(hp: Hyperparams) -> tuple[str, ...]:
    """The modules of the stage-2/3 model: E + C, and the ACM when there is one."""
    return ("segmenter", "acm") if hp.adaptation else ("segmenter",)


def _load_weights_files(hp: Hyperparams, modules: nn.ModuleDict) -> None:
    translation = ("generator_s2t", "generator_t2s", "discriminator_t", "discriminator_s")
    if hp.source_segmenter_weights:
        _load(
            modules, hp.source_segmenter_weights, "source_segmenter_weights", {"source_segmenter": ("segmenter",)}, ()
        )
    if hp.translator_weights:
        required = dict.fromkeys(translation, ())
        _load(modules, hp.translator_weights, "translator_weights", required, ("source_segmenter",))
    if hp.adapted_weights:
        required = dict.fromkeys(_student(hp) + (("discriminator",) if hp.adaptation else ()), ())
        _load(modules, hp.adapted_weights, "adapted_weights", required, translation + ("source_segmenter",))


def _load(
    modules: nn.ModuleDict,
    path: str,
    field: str,
    required: Mapping[str, tuple[str, ...]],
    optional: tuple[str, ...],
) -> None:
    """Load module weights from a checkpoint file (a ModuleDict state dict). `required` modules must be in the file
    (under their own name, or under one of the alternative prefixes listed with them), `optional` ones are loaded
    when both the file and the modules have them. Loads are strict: a mismatch names the keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = [(name, (name,) + alternatives, True) for name, alternatives in required.items()]
    wanted += [(name, (name,), False) for name in optional if name in modules]
    for name, prefixes, needed in wanted:
        part = {}
        for prefix in prefixes:
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if part:
                break
        if not part:
            if needed:
                raise ValueError(
                    f"{field}: {path} holds no {' or '.join(repr(p) for p in prefixes)} weights; "
                    "give a checkpoint of the stage it reuses (see methods/cirn.py)"
                )
            continue
        modules[name].load_state_dict(part)


# ---------------------------------------------------------------------------------------------------- forward paths


def translate(generator: nn.Module, images: Tensor) -> Tensor:
    """A CycleGAN generator on images in [0, 1]: translated images in [0, 1]."""
    return from_gan(generator(to_gan(images)))


def student_logits(modules: Mapping[str, nn.Module], images: Tensor) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """E, C and the ACM (if any) on images in [0, 1]: z_C, z_ACM (or None) at the output stride, attention maps.
    `modules` is the trial's ModuleDict or the teacher (same keys)."""
    features = modules["segmenter"].encode(imagenet_normalise(images))
    logits_c = modules["segmenter"].classify(features)
    if "acm" not in modules:
        return logits_c, None, []
    maps = modules["acm"].attention_maps(features)
    return logits_c, modules["acm"].classify(features, maps), maps


def combined(logits_c: Tensor, logits_acm: Tensor | None) -> Tensor:
    """The prediction of C and the ACM: z_C + z_ACM (Eq. 6's P_I before the softmax)."""
    return logits_c if logits_acm is None else logits_c + logits_acm


def probability_map(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """softmax of logits upsampled to the image size (B, K, H, W): D's input, R's inputs."""
    return F.softmax(upsample(logits, size), dim=1)


def discriminate(discriminator: nn.Module, probabilities: Tensor) -> Tensor:
    """D on a probability map, its stride-32 output upsampled to the map's size (CLAN), logits (B, 1, H, W)."""
    return upsample(discriminator(probabilities), tuple(probabilities.shape[-2:]))


# ---------------------------------------------------------------------------------------------------- stage 0


def source_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    return {"source_segmenter": recipe_optim(hp, modules["source_segmenter"], num_steps)}


def source_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 0: S on raw source images, pixel-wise cross-entropy (the recipe's source-only training)."""
    optimizer = ctx.optimizers["source_segmenter"]
    optimizer.zero_grad(set_to_none=True)
    logits = ctx.modules["source_segmenter"](imagenet_normalise(batch.source_image))
    loss = segmentation_loss(logits, batch.source_label, ctx.info.ignore_index)
    ctx.backward(loss)
    ctx.step("source_segmenter")
    return {"loss_seg_source": loss.detach()}


# ---------------------------------------------------------------------------------------------------- stage 1

GENERATORS = ("generator_s2t", "generator_t2s")
PATCH_DISCRIMINATORS = ("discriminator_t", "discriminator_s")


def translation_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    """Adam 2e-4, betas (0.5, 0.999) for G and F together and for D_T and D_S together (CycleGAN's two optimisers),
    constant for `gan_constant_share` of the stage, then linearly to 0."""
    constant = int(round(num_steps * hp.gan_constant_share))
    out = {}
    for name, group in (("generators", GENERATORS), ("patch_discriminators", PATCH_DISCRIMINATORS)):
        parameters = [p for module in group for p in modules[module].parameters()]
        adam = torch.optim.Adam(parameters, lr=hp.gan_learning_rate, betas=(hp.gan_beta1, hp.gan_beta2))
        out[name] = Optim(adam, linear_decay(adam, constant, num_steps - constant))
    return out


def translation_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 1, one CycleGAN iteration (Eq. 1-5): G and F on Eq. 5, then D_T and D_S on pooled fakes."""
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    g, f = modules["generator_s2t"], modules["generator_t2s"]
    d_t, d_s = modules["discriminator_t"], modules["discriminator_s"]
    source, labels = random_crop(batch.source_image, batch.source_label, hp.translation_crop, ctx.generator)
    target, _ = random_crop(batch.target_image, None, hp.translation_crop, ctx.generator)
    x_s, x_t = to_gan(source), to_gan(target)

    # Eq. 5, min over G and F (D's gradients from this pass are discarded by its own zero_grad below)
    optimize_g = ctx.optimizers["generators"]
    optimize_g.zero_grad(set_to_none=True)
    fake_t, fake_s = g(x_s), f(x_t)  # G(x_s) ∈ I (the CIR), F(x_t)
    gan_g = gan_loss(d_t(fake_t), True, hp.gan_mode)  # Eq. 1: G fools D_T
    gan_f = gan_loss(d_s(fake_s), True, hp.gan_mode)  # Eq. 2: F fools D_S
    cyc = cycle_loss(f(fake_t), x_s, g(fake_s), x_t)  # Eq. 3, target cycle G(F(x_t)) (choice 1)
    metrics = {}
    sem = None
    if "source_segmenter" in modules:
        # Eq. 4 through the frozen S (eval mode, no parameter gradients): the gradient reaches G only
        sem_logits = modules["source_segmenter"](imagenet_normalise(from_gan(fake_t)))
        sem = segmentation_loss(sem_logits, labels, info.ignore_index)
        metrics["loss_sem"] = sem.detach()
        metrics["sem_pixel_accuracy"] = _pixel_accuracy(sem_logits.detach(), labels, info.ignore_index)
    identity = None
    if hp.lambda_identity > 0:
        identity = (g(x_t) - x_t).abs().mean() + (f(x_s) - x_s).abs().mean()
        metrics["loss_identity"] = identity.detach()
    loss_g = stage1_generator_objective(hp, gan_g, gan_f, cyc, sem, identity)
    ctx.backward(loss_g)
    ctx.step("generators")

    # Eq. 1-2, max over D_T and D_S: real images against fakes from the pools of previous fakes
    optimize_d = ctx.optimizers["patch_discriminators"]
    optimize_d.zero_grad(set_to_none=True)
    loss_d_t = patch_discriminator_loss(d_t(x_t), d_t(_pooled(ctx, "pool_t", fake_t)), hp.gan_mode)
    loss_d_s = patch_discriminator_loss(d_s(x_s), d_s(_pooled(ctx, "pool_s", fake_s)), hp.gan_mode)
    ctx.backward(loss_d_t + loss_d_s)
    ctx.step("patch_discriminators")
    metrics.update(
        loss_g=loss_g.detach(),
        loss_gan_g=gan_g.detach(),
        loss_gan_f=gan_f.detach(),
        loss_cyc=cyc.detach(),
        loss_d_t=loss_d_t.detach(),
        loss_d_s=loss_d_s.detach(),
    )
    return metrics


def _pooled(ctx: StepContext, name: str, fakes: Tensor) -> Tensor:
    pool = ImagePool(ctx.hp.pool_size, ctx.state.get(name, []))
    out = pool.query(fakes.detach(), ctx.generator)
    ctx.state[name] = pool.images
    return out


def _pixel_accuracy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """S's pixel accuracy on G(x_s) against y_s: how much content the translation keeps."""
    predicted = upsample(logits, tuple(labels.shape[-2:])).argmax(1)
    valid = labels != ignore_index
    return (predicted[valid] == labels[valid]).float().mean() if valid.any() else logits.new_zeros(())


# ---------------------------------------------------------------------------------------------------- stage 2


def segmenter_sgd(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> Optim:
    """SGD 2.5e-4, momentum 0.9, weight decay 5e-4, poly: the backbone at the base rate, C and the ACM at 10x."""
    head = list(modules["segmenter"].head_parameters())
    if "acm" in _student(hp):
        head += list(modules["acm"].parameters())
    sgd = torch.optim.SGD(
        [
            {"params": list(modules["segmenter"].backbone_parameters()), "lr": hp.learning_rate},
            {"params": head, "lr": hp.learning_rate * hp.head_lr_multiplier},
        ],
        lr=hp.learning_rate,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
    )
    return Optim(sgd, poly_schedule(sgd, num_steps, hp.poly_power))


def adaptation_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    out = {"segmenter": segmenter_sgd(hp, modules, num_steps)}
    if hp.adaptation:
        adam = torch.optim.Adam(
            modules["discriminator"].parameters(),
            lr=hp.discriminator_learning_rate,
            betas=(hp.discriminator_beta1, hp.discriminator_beta2),
            weight_decay=hp.discriminator_weight_decay,
        )
        out["discriminator"] = Optim(adam, poly_schedule(adam, num_steps, hp.poly_power))
    return out


def start_adaptation(ctx: StepContext) -> dict[str, Any]:
    """`on_start` of stage 2: copy C's weights into the ACM classifier (choice 7, `acm_init="copy"`), and free the
    stage-1 image pools (they are no longer used and would be saved into every checkpoint)."""
    if ctx.hp.adaptation and ctx.hp.acm_init == "copy":
        ctx.modules["acm"].classifier.load_state_dict(ctx.modules["segmenter"].classifier.state_dict())
    return {"pool_s": [], "pool_t": []}


@torch.no_grad()
def cir_images(ctx: StepContext, batch: Batch) -> Tensor:
    """X_I: the source batch translated by the frozen G (choice: on the fly), or the raw source without CIR."""
    if not ctx.hp.use_cir:
        return batch.source_image
    return translate(ctx.modules["generator_s2t"], batch.source_image).clamp(0, 1)


def adaptation_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 2, one iteration: the segmenter on Eq. 8 + λ_weight L_W, then D on Eq. 7 (detached maps)."""
    if not ctx.hp.adaptation:
        return supervised_step(ctx, batch)
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    discriminator = modules["discriminator"]
    x_i, y_i, x_t = cir_images(ctx, batch), batch.source_label, batch.target_image
    size_i, size_t = tuple(x_i.shape[-2:]), tuple(x_t.shape[-2:])

    optimize_segmenter = ctx.optimizers["segmenter"]
    optimize_segmenter.zero_grad(set_to_none=True)
    # Eq. 6: L_seg on the CIR image, P_I from z_C + z_ACM
    logits_c_i, logits_acm_i, _ = student_logits(modules, x_i)
    loss_seg = segmentation_terms(hp, logits_c_i, logits_acm_i, y_i, info.ignore_index)
    # Eq. 7, the segmenter's side on the target image: weights λ_cos·R(p¹, p²) + ε, R from C's and ACM's softmax
    logits_c_t, logits_acm_t, maps = student_logits(modules, x_t)
    distance = cosine_distance(probability_map(logits_c_t, size_t), probability_map(logits_acm_t, size_t))
    weights = adversarial_weights(distance.detach() if hp.detach_weight_map else distance, hp.lambda_cos, hp.epsilon)
    p_t = probability_map(logits_c_t + logits_acm_t, size_t)
    loss_adv = weighted_domain_bce(discriminate(discriminator, p_t), SOURCE_LABEL, weights)
    # CLAN's weight discrepancy between C and the ACM classifier
    loss_weight = weight_discrepancy(
        modules["segmenter"].classifier.parameters(), modules["acm"].classifier.parameters()
    )
    ctx.backward(stage2_objective(hp, loss_seg, loss_adv, loss_weight))
    ctx.step("segmenter")

    # Eq. 7, D's side: CIR predictions → 1 unweighted, target predictions → 0 weighted by the detached map
    optimize_d = ctx.optimizers["discriminator"]
    optimize_d.zero_grad(set_to_none=True)
    d_i = discriminate(discriminator, probability_map((logits_c_i + logits_acm_i).detach(), size_i))
    d_t = discriminate(discriminator, p_t.detach())
    weights_d = adversarial_weights(distance.detach(), hp.lambda_cos, hp.epsilon)
    loss_d_source = weighted_domain_bce(d_i, SOURCE_LABEL)
    loss_d_target = weighted_domain_bce(d_t, TARGET_LABEL, weights_d)
    ctx.backward(loss_d_source + loss_d_target)
    ctx.step("discriminator")

    metrics = {
        "loss_seg": loss_seg.detach(),
        "loss_adv": loss_adv.detach(),
        "loss_weight": loss_weight.detach(),
        "loss_d": (loss_d_source + loss_d_target).detach(),
        "loss_d_source": loss_d_source.detach(),
        "loss_d_target": loss_d_target.detach(),
        "loss_d_target_unweighted": weighted_domain_bce(d_t.detach(), TARGET_LABEL),
        "cosine_distance_mean": distance.detach().mean(),
        "weight_map_mean": weights_d.mean(),
        "d_source_mean": torch.sigmoid(d_i.detach()).mean(),  # D's probability of "CIR" on CIR predictions
        "d_target_mean": torch.sigmoid(d_t.detach()).mean(),  # ... and on target predictions
    }
    if maps:
        metrics["attention_mean"] = torch.stack([a.detach().mean() for a in maps]).mean()
    return metrics


def supervised_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 2 without adaptation (Table 4 rows SO and CIR): E + C on the CIR (or raw source) images, CE only."""
    optimizer = ctx.optimizers["segmenter"]
    optimizer.zero_grad(set_to_none=True)
    logits = ctx.modules["segmenter"](imagenet_normalise(cir_images(ctx, batch)))
    loss = segmentation_loss(logits, batch.source_label, ctx.info.ignore_index)
    ctx.backward(loss)
    ctx.step("segmenter")
    return {"loss_seg": loss.detach()}


# ---------------------------------------------------------------------------------------------------- stage 3


def self_training_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    """ "The same learning rate and optimizer with stage 2": a fresh SGD, poly over stage 3 (choice 12)."""
    return {"segmenter": segmenter_sgd(hp, modules, num_steps)}


def start_self_training(ctx: StepContext) -> None:
    """`on_start` of stage 3, online mode: snapshot the stage-2 model into the frozen teacher (choice 14)."""
    if "teacher" in ctx.modules:
        for name, module in ctx.modules["teacher"].items():
            module.load_state_dict(ctx.modules[name].state_dict())


def _labelling_model(modules: nn.ModuleDict) -> Mapping[str, nn.Module]:
    """Who labels the target set: the frozen teacher (online), or the student at stage start (offline)."""
    return modules["teacher"] if "teacher" in modules else modules


def _predictions(model: Mapping[str, nn.Module], images: Tensor) -> tuple[Tensor, Tensor, int]:
    """The argmax class and the quantised confidence of the stage-2 model at image size, (B, H, W) each, and the
    number of classes."""
    logits_c, logits_acm, _ = student_logits(model, images)
    probabilities = probability_map(combined(logits_c, logits_acm), tuple(images.shape[-2:]))
    confidence, prediction = probabilities.max(1)
    return prediction, quantise(confidence), probabilities.shape[1]


def collect_pseudo_labels(ctx: StepContext, images: Tensor, image_labels: Tensor | None) -> dict[str, Tensor]:
    """The stage-start pass over the target set: per-class confidence histograms for the thresholds and, offline,
    each image's argmax and confidence level for the store."""
    prediction, levels, _ = _predictions(_labelling_model(ctx.modules), images)
    out = {"histogram": confidence_histograms(levels, prediction, ctx.info.num_classes)[None]}
    if ctx.hp.pseudo_label_mode == "offline":
        out.update(pseudo_label=prediction.to(torch.uint8), confidence=levels.to(torch.uint8))
    return out


def update_thresholds(ctx: StepContext, gathered: Mapping[str, Tensor]) -> dict[str, Any]:
    """The per-class thresholds (in confidence levels) over the whole target set, and the share of its pixels kept."""
    histograms = gathered["histogram"].sum(0).cpu()
    thresholds = threshold_levels(
        histograms, ctx.hp.pseudo_label_rule, ctx.hp.pseudo_label_cap, ctx.hp.pseudo_label_portion
    )
    levels = torch.arange(LEVELS + 1, dtype=torch.float64)
    kept = (histograms.double() * (levels[None] >= thresholds[:, None])).sum()
    return {
        "pseudo_label_thresholds": thresholds,
        "pseudo_label_set_fraction": float(kept / histograms.sum().clamp_min(1)),
    }


def metric_name(class_name: str) -> str:
    """A class name as the platform writes it in metric names (val_target/iou/<class>): 'traffic light' →
    'traffic_light'."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", class_name.strip())


def self_training_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Stage 3 (Eq. 9): cross-entropy of softmax(z_C + z_ACM) on the target image against its pseudo labels."""
    hp, modules, info = ctx.hp, ctx.modules, ctx.info
    thresholds = ctx.state["pseudo_label_thresholds"]
    if hp.pseudo_label_mode == "offline" and "pseudo_label" in batch.target_extras:
        prediction = batch.target_extras["pseudo_label"].long()
        levels = batch.target_extras["confidence"].long()
    elif hp.pseudo_label_mode == "offline":
        # The store is keyed by sample identity: a batch without it (the CLI's cost probe, a hand-made batch) can
        # have no stored maps, and is labelled as the pass would label it, by the current model. A batch from the
        # platform's stream always has its samples' identity; missing maps there are a platform error.
        if batch.target_index is not None:
            raise ValueError("self_train (offline): the batch carries no stored pseudo labels (target_extras)")
        with torch.no_grad():
            prediction, levels, _ = _predictions(_labelling_model(modules), batch.target_image)
    else:
        with torch.no_grad():
            prediction, levels, _ = _predictions(modules["teacher"], batch.target_image)
    labels = apply_thresholds(prediction, levels, thresholds, info.ignore_index)

    optimizer = ctx.optimizers["segmenter"]
    optimizer.zero_grad(set_to_none=True)
    logits_c, logits_acm, _ = student_logits(modules, batch.target_image)
    loss = segmentation_loss(combined(logits_c, logits_acm), labels, info.ignore_index)
    ctx.backward(loss)
    ctx.step("segmenter")
    metrics = {
        "loss_seg_target": loss.detach(),
        "pseudo_label_fraction": (labels != info.ignore_index).float().mean(),
        "pseudo_label_set_fraction": torch.tensor(float(ctx.state.get("pseudo_label_set_fraction", 0.0))),
    }
    for name, level in zip(info.class_names, thresholds.tolist()):
        metrics[f"pseudo_label_threshold/{metric_name(name)}"] = torch.tensor(level / LEVELS)
    return metrics


# ---------------------------------------------------------------------------------------------------- stages


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    store = {}
    if hp.pseudo_label_mode == "offline":
        store = {
            "pseudo_label": SampleMap(dtype=torch.uint8, interpolation="nearest", fill=255),
            "confidence": SampleMap(dtype=torch.uint8, interpolation="nearest", fill=0),
        }
    built = {
        "source": Stage(
            name="source",
            trains=("source_segmenter",),
            budget=steps(hp.source_steps),
            optimizers=source_optimizers,
            step=source_step,
            uses_target=False,
        ),
        "translate": Stage(
            name="translate",
            trains=GENERATORS + PATCH_DISCRIMINATORS,
            budget=steps(hp.translation_steps),
            optimizers=translation_optimizers,
            step=translation_step,
        ),
        "adapt": Stage(
            name="adapt",
            trains=_student(hp) + (("discriminator",) if hp.adaptation else ()),
            budget=steps(hp.adaptation_steps),
            optimizers=adaptation_optimizers,
            step=adaptation_step,
            uses_target=hp.adaptation,
            on_start=start_adaptation,
        ),
        "self_train": Stage(
            name="self_train",
            trains=_student(hp),
            budget=steps(hp.self_training_steps),
            optimizers=self_training_optimizers,
            step=self_training_step,
            target_pass=TargetPass("stage_start", collect_pseudo_labels, update_thresholds, store=store),
            on_start=start_self_training,
        ),
    }
    return tuple(built[name] for name in stage_names(hp))


def init_state(hp: Hyperparams, info: TaskInfo) -> dict[str, Any]:
    return {"pool_s": [], "pool_t": []}


# ---------------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    """Logits at image size: S in stages 0-1 (a source-only curve while the translator trains), then C + ACM
    (CLAN's evaluation: argmax of z_C + z_ACM), or C alone without adaptation."""
    size = tuple(images.shape[-2:])
    if stage.name in ("source", "translate") and "source_segmenter" in modules:
        return upsample(modules["source_segmenter"](imagenet_normalise(images)), size)
    logits_c, logits_acm, _ = student_logits(modules, images)
    return upsample(combined(logits_c, logits_acm), size)


def colour_labels(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Class ids (N, H, W) → RGB (N, 3, H, W) in [0, 1], one hue per class, ignored pixels black."""
    hues = torch.arange(num_classes, dtype=torch.float32) / max(1, num_classes)
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6  # HSV → RGB at S = V = 1
    palette = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    valid = labels != ignore_index
    rgb = palette.to(labels.device)[torch.where(valid, labels, torch.zeros_like(labels)).long()]
    return (rgb * valid[..., None]).permute(0, 3, 1, 2)


@torch.no_grad()
def samples(hp: Hyperparams, modules: nn.ModuleDict, images: SampleImages, stage: StagePosition) -> dict[str, Tensor]:
    """The CIR (translated source images G(x_s) next to x_s, and F(x_t)) while the translator is trained or used,
    and in stage 3 the labelling model's argmax map and confidence on target validation images (the thresholded
    labels need the thresholds in the method's state, which `samples` is not given)."""
    out: dict[str, Tensor] = {}
    if hp.use_cir and stage.name in ("translate", "adapt"):
        out["source"] = images.source
        out["source_to_target"] = translate(modules["generator_s2t"], images.source).clamp(0, 1)
        out["target"] = images.target
        out["target_to_source"] = translate(modules["generator_t2s"], images.target).clamp(0, 1)
    if stage.name == "self_train":
        prediction, levels, num_classes = _predictions(_labelling_model(modules), images.target)
        out["target"] = images.target
        out["pseudo_label_argmax"] = colour_labels(prediction, num_classes)
        out["pseudo_label_confidence"] = (levels.float() / LEVELS)[:, None]
    return out


METHOD = Method(
    name="cirn",
    paper="Gao, Zhang, Zhang, Addressing Domain Gap via Content Invariant Representation for Semantic "
    "Segmentation (CIRN), AAAI 2021 (../shared/papers/004_f2fbc54fd8dcd3d8.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=("synthetic-urban", "gta5-cityscapes", "synthia-cityscapes"),
    init_state=init_state,
    samples=samples,
    imagenet_backbone=True,  # "ResNet-101 ... pretrained on ImageNet" (Implementation details)
)
