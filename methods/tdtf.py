"""TD/TF: "What Can Be Transferred: Unsupervised Domain Adaptation for Endoscopic Lesions Segmentation" (Dong, Cong,
Sun, Zhong, Xu, CVPR 2020). Implements ../shared/papers/000_234ffb67ab86a73c.txt; reading notes in
../shared/papers/notes/tdtf.md (item numbers A1-A23 below are theirs). No public implementation exists.

What runs, as printed:

- **TD** (Sec. 3.3): CycleGAN [44]: T_D = `generator_s2t`, T_D^{-1} = `generator_t2s` (ResNet generators), D1 =
  `discriminator_t` (real x_t vs T_D(x_s), Eq. 2), D2 = `discriminator_s` (real x_s vs T_D^{-1}(x_t), Eq. 3), the L1
  cycle term L_cd weighted by α (Eq. 4-5). The residual transferability-aware bottleneck (Eq. 6-7) is a variational
  bottleneck on each generator's latent map after its last residual block ("attached on the last convolutional block
  of TD", Sec. 3.5): μ and log σ² heads, z = μ + σ·ε while TD trains, z = μ when a generator is used frozen (TF,
  samples). L_b^s = E_xs[w ⊙ (KL(E(x_s) ‖ N(0, I)) − T)], L_b^t likewise, w the residual transferability weight
  below; L_TD = Eq. 5 + λ_s L_b^s + λ_t L_b^t; after each generator update λ ← max(λ, γ·L_b) (Sec. 3.3), L_b
  averaged over data-parallel workers first (`ctx.all_reduce_mean`) so that every rank keeps the same λ.
- **TF** (Sec. 3.4): S = `segmenter` (DeepLab-v3, ResNet-101, last two strides 1; Sec. 3.5), D_F =
  `feature_discriminator` ("5 fully convolutional layers with channel number as {16, 32, 64, 64, 1}", LeakyReLU 0.2,
  final sigmoid; Sec. 3.5; kernel and stride are not printed: reading 20), A_F =
  `augmentor` with `num_ra2b` RA2B blocks (Eq. 8-10, δ initialised at 0). Step I (Eq. 11): S on translated sources
  x̂_s = T_D(x_s) with their labels plus target pixels whose max probability is ≥ β = 0.9, labelled with their
  argmax. Step II (Eq. 12): S fixed; D_F tells S's features (real) from A_F's (fake), A_F learns to fool it. Step
  III (Eq. 13): A_F fixed; D_F retrained with the labels flipped (A_F's features real, S's fake) and S learns to make
  the features of both domains look like A_F's. P = 1 − I(D_F(F)) (Eq. 1), from D_F "in Step III rather than Step
  II". S alone at test time (Sec. 3.5).
- **Schedule**: `alternations` rounds of TD then TF (Sec. 3.1: "the source samples are first passed into TD ...
  Afterwards ... into TF"; Sec. 4.2: 3 rounds). One platform stage per phase: `td`, `tf_segment` (Step I),
  `tf_augment` (Step II), `tf_align` (Step III), repeated per round (A12: phases, because Step II fixes "S learned
  from Step I" and Step III fixes "A_F learned in Step II").
- **Constants** (Sec. 3.5): α = 10, T = 200, λ_s = λ_t = 1e-4 initially, γ = 1e-6, β = 0.9, 16 RA2B; TD learning
  rate 2.5e-4 constant for 10 epochs then linearly to 0 over 5 (`td_epochs_constant`, `td_epochs_decay`); S: SGD
  2e-4, poly power 0.9; D_F: Adam 1e-4, betas (0.9, 0.99).

Readings of what is printed ambiguously or wrongly (fixed choices):

1. Eq. 2-3 print E[log D(real)] + E[1 − log D(G(x))]. For the generators this is −log D(G(x)) + 1, the
   non-saturating GAN loss, which we use; for D1/D2 "maximise −log D(fake)" has no maximum (it grows without bound
   as D(fake) → 0), so D's term is read as log(1 − D(G(x))): D1/D2 minimise ½[BCE(D(real), 1) + BCE(D(pooled fake),
   0)] (CycleGAN's halving; image pool of `pool_size` fakes, CycleGAN practice; no identity loss, Eq. 5 has none).
   `td_gan_loss="lsgan"` swaps in CycleGAN's least squares.
2. L_cd (Eq. 4) as printed: ‖T_D(T_D^{-1}(x_t)) − x_t‖₁ + ‖T_D^{-1}(T_D(x_s)) − x_s‖₁, each a mean over pixels
   (images in [-1, 1]); the cycle passes sample z too, only the real images' encodings enter the KL terms (Eq. 6).
3. Eq. 6 writes one θ_E for E(x_s) and E(x_t) (A3): each domain's KL is taken in the encoder of the generator that
   reads it, T_D's for x_s and T_D^{-1}'s for x_t (CycleGAN has two generators with their own θ, Eq. 2-4).
4. L_b^s and L_b^t are "the last two terms of Eq. (7)", which include λ; γ·λ·L_b (1e-10·L_b) would never move λ, so
   L_b is the constraint without λ, detached, and λ is updated after every TD generator step (A6). λ carries over
   from round to round (neither a reset nor the timing is printed). `multiplier_update="dual_ascent"` is VDB's
   λ ← max(0, λ + γ·L_b). The printed rule never lowers λ: measured on synthetic-endoscopy with a TD learning rate of
   2e-3, one early spike of the target KL (about 4,000 per position) set λ_t to 0.1 for the rest of the trial and
   collapsed T_D^{-1}'s latent (KL 2 against T = 50); at the printed 2.5e-4 λ stays at its initial value there.
5. "⊙ represents the channel-wise product" (Eq. 6): P is one value per position of D_F's output grid (Eq. 1 on
   D_F's map), resized bilinearly to the latent grid and broadcast over latent channels.
6. Residual transferability (Sec. 3.2: "residual transferability perception mechanism is designed to feed-back the
   positive transferability into TD ... and feature augmentor A_F"): every place P weights something uses
   w = 1 + P (`residual_transferability=False`: w = P, as the equations print it). P is the binary entropy in bits,
   so P ∈ [0, 1] (0 where D_F is undecided). Until the first Step III has trained D_F, w ≡ 1.
7. D_F's input S(x; θ_S) in Eq. 12-13 is S's features (`Features.main`: layer4, 2048 channels, stride 8), not its
   probabilities: "input source features F_s" (Sec. 3.2), A_F synthesises "features that resemble the extracted
   features" (Step II). D_F outputs logits and its printed final sigmoid is applied inside the BCE and inside P (the
   same function, computed stably).
8. Eq. 12-13 are optimised in their non-saturating form (A_F and S minimise BCE(D_F(·), real) instead of
   log(1 − D_F(·)); same fixed point, Goodfellow et al.'s practice). The expectation over x ∈ (X̂s, Xt) is the mean
   of the two domains' batch means (their images may differ in size). Within a step the generator side updates
   first, then the discriminator on the detached features of the same forward pass (CycleGAN's order).
9. Step III has no segmentation term (Eq. 13 only): S's encoder learns from D_F, its head is untouched.
10. Eq. 8 prints M_ij = exp(e_ij) / Σ_i exp(e_ij) (normalised over i) and, in words, "matrix multiplication
    between the transpose of M and reshaped C3". Taken together these are consistent, with C2 as the query and C1
    as the key; the printed summation F_p,i = Σ_j M_ij C3_j is what does not agree with the normalisation. Read as
    DANet's position attention (Fu et al. 2019, the code convention Attention-on-Attention builds on), e_ij =
    ⟨C1_i, C2_j⟩, M normalised over j, F_p,i = Σ_j M_ij C3_j: each output a convex combination, as the text's
    "average weighted feature map" says, with C1 the query, which Eq. 9 shares with the attention (the printed
    alternative would make C2 the query). No 1/√C scaling; C1, C2, C3 keep C channels ("C1, C2, C3 ∈ R^{H×W×C}"),
    1x1 convolutions.
11. Step I (Eq. 11): ŷ_t and M_v come from the same forward pass that gets the loss (ŷ_t = argmax S(x_t; θ_S),
    detached; β compared with ≥, as printed). Each term is the mean cross-entropy over its labelled pixels (ignored
    pixels: 255), the convention of BDL/CBST's ignore-label losses; the printed per-image sums over all pixels
    would divide by |x| instead. A batch without a confident pixel contributes 0.
12. Translation during TF is on the fly: the frozen T_D (eval mode, z = μ) translates each source batch.
13. Gaussian noise is concatenated to A_F's input (Sec. 3.5: the features "are first augmented with the noise from
    Gaussian distribution"; Volpi et al.'s feature generator concatenates noise too), drawn from `ctx.generator`.
14. Target image-level labels (the endoscopy tasks have them) are not used: TD/TF never mentions them.

Not printed, decided (each a field with its reason):

15. A_F's internals (A11): low-level features = S's bottom block (ResNet layer1, stride 4; tiny: its first two
    layers), average-pooled to layer4's grid, concatenated with layer4's features and `augmentor_noise_channels` of
    noise, a 1x1 convolution to `augmentor_channels` with ReLU, multiplied by w (A9: "with quantified transferability
    perception from D_F, A_F could selectively augment the transferable representations"), `num_ra2b` RA2B blocks,
    a 1x1 convolution back to layer4's channels with ReLU (layer4 features are post-ReLU, so D_F cannot tell them
    apart by sign). A_F's input features are detached in Step III (A_F is a fixed target distribution there).
16. Optimisers: TD (both generators with their bottleneck heads, D1, D2): Adam at `td_learning_rate` with
    CycleGAN's betas (0.5, 0.999) ("inspired by [44]"). S: the shared recipe's SGD (momentum 0.9, weight decay 5e-4,
    head at 10x), poly 0.9. D_F: Adam as printed, at a constant rate (only "initial learning rate" is printed, no
    schedule; a poly schedule shared by Steps I-III would decay while D_F waits through Step I); A_F: Adam with D_F's
    settings (its adversary; Volpi et al. use one rate for both).
17. Budgets: TD 10 + 5 epochs of the source set per round (an epoch of CycleGAN's unaligned data is
    max(|source|, |target|) images, the source set in every task here). TF's length is not printed: as many epochs
    as TD on the paper tasks, split I : II : III = 2 : 1 : 1 (`tf_*_epochs`: 7.5, 3.75, 3.75), so that S gets
    twice as many supervised updates (Step I) as adversarial ones (Step III), and A_F (Step II) as many as S's
    adversarial ones. The synthetic task's budgets (search_spaces/tdtf.py) are smaller and give TF 1.0 epoch against
    TD's 1.5: a CPU budget, chosen so that three rounds fit in minutes, not a reading of the paper.
18. `optimizer_scope` (how long optimisers and schedules live; contract v2 `Stage.optimizer_scope`): "round"
    (default): each TD round restarts the printed 10 + 5 epoch schedule (the printed schedule is that of one
    TD training) and Steps I-III of a round share one S optimiser with one poly schedule, one D_F and one A_F
    optimiser (their schedules advance through all three steps); "trial": one TD optimiser and schedule over all
    rounds (constant for the first 10/15 of all TD steps) and one TF set over all of TF; "stage": fresh optimisers
    in every stage.
19. Batch norm (A19): the paper prints no batch size, and DeepLab-v3's image-pooling batch norm cannot train on one
    image. Default: batch 2 per worker, backbone batch norm frozen at its ImageNet statistics
    (`freeze_batchnorm=True` freezes the encoder's only), head batch norm live. The DeepLab-v3 source-only baseline
    must run the same way (`source_only --set architecture=deeplabv3_resnet101 learning_rate=2e-4 batch_size=2`).
20. D_F's kernel size and stride are not printed ("5 fully convolutional layers", channels and activations only):
    4x4 convolutions with stride 2 as in the output-space discriminators of the same family (AdaptSegNet, CLAN), on
    S's stride-8 features (`feature_discriminator_downsampling` says how many of them downsample).
21. Where P is computed in TD (A8e): Eq. 6 weights E(x_s)'s KL by P "from input source feature F_s", so P is
    D_F on S's features of the raw x_s (and x_t for the target term), with S and D_F frozen; D_F itself is trained
    on S(T_D(x_s)) and S(x_t) (Steps II-III), so on raw source images it sees inputs a little outside what it
    was trained on (the printed expectation is over x_s ∈ X_s).

Open choices (hyperparameters, the first value is the default; grid `open_choices` compares them):

- `kl_reduction` (A5): how KL(E(x) ‖ N(0, I)) is reduced before it meets T. "channels": summed over latent channels,
  one value per position, w-weighted mean over positions and batch, L_b = mean(w·Σ_c KL) − T·mean(w). With CycleGAN's
  256 latent channels T = 200 is 0.78 nats per channel, a working bottleneck. "elements": summed over the whole
  latent map of an image (T = 200 would then force an almost input-independent latent); "mean": averaged over every
  element (KL ≪ 200 always: the constraint never binds and λ never moves). The logged `kl_s`, `kl_t` are the same
  reduction without w, the number compared with T.
- `multiplier_update`: "max" (printed), "dual_ascent" (VDB).
- `residual_transferability`: True (w = 1 + P), False (w = P).
- `transferability_source` (A8; "P ... is from D_F in Step III rather than Step II"): "step3" gives P in Step III
  from the live D_F that Step III trains (from its second step on: before any Step III has trained D_F, w ≡ 1), and
  in TD and Step II from a frozen copy of D_F (`feature_discriminator_p`) taken when a TD stage or a Step II starts
  after a Step III has run, i.e. D_F as the last Step III left it (Step II retrains D_F with Step II's labels);
  "current" uses the live D_F everywhere, Step II's included. (`step3_done` is not reset between rounds, so the
  first Step III step of rounds 2 on takes P from D_F as that round's Step II left it; every later step from D_F as
  Step III trains it.)
- `pseudo_label_source` (A15): "online" (Eq. 11 literally, labels from S in the same step); "round": labels made
  once per round by a pass over the whole target set at the start of Step I (BDL's per-round practice, which Fig.
  5b/8's "generated along the alternative iteration number" suggests), kept per image by the platform and aligned
  with each training crop (`TargetPass.store`).
- `feature_discriminator_role` (A1): "augmentation" (Eq. 12-13 as printed); "domain" reads Sec. 3.2 ("distinguishing
  whether the input is from Xs or Xt") and Step III's "target features are indistinguishable from the source one":
  Step II is unchanged, but in Step III D_F labels S's source features real, S's target features fake and A_F's
  features real (Eq. 13's A_F term as printed), and S only makes its target features look real.
- `ra2b_weights` (A10): Eq. 9 prints W ∈ R^{N×N}, B ∈ R^{N×C}, matrices over pixel positions, which only exist for
  one fixed N. "channels": 1x1 convolutions C→C and a bias per channel (Attention-on-Attention's form, any image
  size); "positions": the printed form, with A_F's input average-pooled to a fixed `ra2b_grid` x `ra2b_grid` grid
  (N = ra2b_grid²) and its output resized back to S's feature grid.
- `augmentor_downsample` (A23): A_F runs on its input average-pooled by this factor (output resized back); the N×N
  attention maps cost 16 blocks × batch × N² floats in backprop (about 26 GB at GTA5 size and factor 1).

Ablations (Tables 2-4): `quantified_transferability=False` (w/oQT: w ≡ 1 everywhere, D_F still trained as Eq. 12-13's
adversary), `pseudo_labelling=False` (w/oPL: Eq. 11 without its target term), `transferability_bottleneck=False`
(w/oTKB: plain generators, Eq. 5), `attention_on_attention=False` (w/oAA: F_o = δ·F_p + F_i, Eq. 8 + 10 without
Eq. 9). Fig. 4's complementary modules: `translation=False` (no TD; x̂_s = x_s), `feature_augmentation=False` (no
Steps II-III, no A_F or D_F; needs `quantified_transferability=False`).

Logged: `lambda_s`, `lambda_t`, `kl_s`, `kl_t` (vs T), `loss_b_s`, `loss_b_t`, the TD losses; `pseudo_label_fraction`
(target pixels with max probability ≥ β); `d_f_augmented` (D_F's mean output on A_F's features), `d_f_features` (on
S's), `ra2b_delta` (mean δ over the blocks), `transferability_mean` (mean P where it is in force). `samples`: source
and target images, their translations, and the pseudo-label maps of the target images (black = below β).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
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
    epochs,
    require,
)
from methods.shared.discriminators import ConvDiscriminator
from methods.shared.gan import (
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    VariationalBottleneck,
    lsgan_loss,
    split_resnet_generator,
    vanilla_gan_loss,
)
from methods.shared.losses import domain_bce, segmentation_loss
from methods.shared.optim import linear_decay
from methods.shared.recipes import SegmenterRecipe, recipe_optim, recipe_segmenter
from methods.shared.segmenter import encode_levels, imagenet_normalise, low_level_channels, upsample
from methods.shared.transferability import transferability


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    # S (Sec. 3.5): DeepLab-v3 on ResNet-101, SGD with initial learning rate 2e-4 and power 0.9
    architecture: str = "deeplabv3_resnet101"  # Sec. 3.5
    learning_rate: float = 2e-4  # S's SGD, Sec. 3.5
    batch_size: int = 2  # not printed; DeepLab-v3's image pooling needs >= 2 (docstring, reading 19)
    freeze_batchnorm: bool = True  # backbone batch norm frozen, head batch norm live (docstring, reading 19)
    alternations: int = 3  # rounds of TD then TF; converges at 3 (Sec. 4.2, Fig. 4)
    # TD (Sec. 3.3, 3.5)
    alpha: float = 10.0  # α, weight of L_cd, Eq. 5 and 7 (Sec. 3.5)
    T: float = 200.0  # T = T_s = T_t, transferability bottleneck threshold, Eq. 6-7 (Sec. 3.5)
    lambda_s: float = 1e-4  # initial λ_s, Eq. 7 (Sec. 3.5)
    lambda_t: float = 1e-4  # initial λ_t, Eq. 7 (Sec. 3.5)
    gamma: float = 1e-6  # γ, updating step of λ_s and λ_t (Sec. 3.3, 3.5)
    td_learning_rate: float = 2.5e-4  # Sec. 3.5
    td_epochs_constant: float = 10.0  # "initialized as 2.5e-4 for first 10 epochs" (Sec. 3.5), per TD training
    td_epochs_decay: float = 5.0  # "linearly decreases to 0 in the later 5 epochs" (Sec. 3.5)
    td_beta1: float = 0.5  # not printed: CycleGAN's Adam [44] (reading 16)
    td_beta2: float = 0.999
    td_gan_loss: Literal["vanilla", "lsgan"] = "vanilla"  # Eq. 2-3's log form (reading 1)
    generator_filters: int = 64  # CycleGAN [44] generator, ngf (Sec. 3.5 "CycleGAN ... baseline network")
    generator_blocks: int = 9  # CycleGAN's residual blocks for images of 256 and larger
    patch_discriminator_filters: int = 64  # D1, D2: CycleGAN's 70x70 PatchGAN, ndf
    pool_size: int = 50  # CycleGAN's pool of previous fakes for D1, D2 (reading 1)
    multiplier_update: Literal["max", "dual_ascent"] = "max"  # λ ← max(λ, γ L_b), Sec. 3.3 (open choice)
    kl_reduction: Literal["channels", "elements", "mean"] = "channels"  # open choice (A5)
    # TF (Sec. 3.4, 3.5)
    beta: float = 0.9  # β, pseudo-label probability threshold, Eq. 11
    num_ra2b: int = 16  # RA2B blocks in A_F (Sec. 4.2, Fig. 5a)
    feature_discriminator_learning_rate: float = 1e-4  # D_F's Adam, Sec. 3.5
    feature_discriminator_beta1: float = 0.9  # "its momentum as 0.9 and 0.99", Sec. 3.5
    feature_discriminator_beta2: float = 0.99
    feature_discriminator_downsampling: int = 5  # stride-2 layers of D_F's five; not printed (all 5, conventions.md)
    augmentor_learning_rate: float = 1e-4  # not printed: D_F's (reading 16)
    augmentor_beta1: float = 0.9
    augmentor_beta2: float = 0.99
    augmentor_channels: int = 256  # not printed: width of A_F's RA2B stack (reading 15)
    augmentor_noise_channels: int = 64  # not printed: Gaussian noise channels concatenated to A_F's input
    augmentor_downsample: int = 1  # open choice (A23): A_F on its input pooled by this factor
    tf_segment_epochs: float = 7.5  # Step I per round, not printed (reading 17)
    tf_augment_epochs: float = 3.75  # Step II per round, not printed (reading 17)
    tf_align_epochs: float = 3.75  # Step III per round, not printed (reading 17)
    optimizer_scope: Literal["round", "trial", "stage"] = "round"  # reading 18
    # open choices (docstring)
    residual_transferability: bool = True  # w = 1 + P (Sec. 3.2 "residual transferability perception")
    transferability_source: Literal["step3", "current"] = "step3"  # "P ... from D_F in Step III" (Sec. 3.4)
    pseudo_label_source: Literal["online", "round"] = "online"  # Eq. 11 literally
    feature_discriminator_role: Literal["augmentation", "domain"] = "augmentation"  # Eq. 12-13 literally
    ra2b_weights: Literal["channels", "positions"] = "channels"  # Eq. 9's W as 1x1 convolutions
    ra2b_grid: int = 16  # side of the fixed grid of ra2b_weights="positions"
    # ablations (Tables 2-4) and Fig. 4's modules
    quantified_transferability: bool = True  # False: "Ours-w/oQT"
    pseudo_labelling: bool = True  # False: "Ours-w/oPL"
    transferability_bottleneck: bool = True  # False: "Ours-w/oTKB"
    attention_on_attention: bool = True  # False: "Ours-w/oAA"
    translation: bool = True  # False: TF alone (Fig. 4)
    feature_augmentation: bool = True  # False: TD + Step I (Fig. 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.alternations >= 1, f"alternations must be >= 1 (got {self.alternations})")
        for name in ("alpha", "T", "lambda_s", "lambda_t", "gamma"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        require(0 < self.beta <= 1, f"beta must be in (0, 1] (got {self.beta})")
        require(self.num_ra2b >= 0, f"num_ra2b must be >= 0 (got {self.num_ra2b})")
        for name in ("td_learning_rate", "feature_discriminator_learning_rate", "augmentor_learning_rate"):
            require(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        for name in (
            "td_beta1",
            "td_beta2",
            "feature_discriminator_beta1",
            "feature_discriminator_beta2",
            "augmentor_beta1",
            "augmentor_beta2",
        ):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")
        require(self.td_epochs_constant >= 0, f"td_epochs_constant must be >= 0 (got {self.td_epochs_constant})")
        require(self.td_epochs_decay >= 0, f"td_epochs_decay must be >= 0 (got {self.td_epochs_decay})")
        require(
            self.td_epochs_constant + self.td_epochs_decay > 0,
            "td_epochs_constant + td_epochs_decay must be > 0 (a TD stage needs a length)",
        )
        for name in ("tf_segment_epochs", "tf_augment_epochs", "tf_align_epochs"):
            require(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        for name in (
            "generator_filters",
            "generator_blocks",
            "patch_discriminator_filters",
            "augmentor_channels",
            "augmentor_downsample",
            "ra2b_grid",
        ):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        require(self.pool_size >= 0, f"pool_size must be >= 0 (got {self.pool_size})")
        require(
            self.augmentor_noise_channels >= 0,
            f"augmentor_noise_channels must be >= 0 (got {self.augmentor_noise_channels})",
        )
        require(
            0 <= self.feature_discriminator_downsampling <= 5,
            f"feature_discriminator_downsampling must be in [0, 5] (got {self.feature_discriminator_downsampling})",
        )
        for name, valid in (
            ("td_gan_loss", ("vanilla", "lsgan")),
            ("multiplier_update", ("max", "dual_ascent")),
            ("kl_reduction", ("channels", "elements", "mean")),
            ("optimizer_scope", ("round", "trial", "stage")),
            ("transferability_source", ("step3", "current")),
            ("pseudo_label_source", ("online", "round")),
            ("feature_discriminator_role", ("augmentation", "domain")),
            ("ra2b_weights", ("channels", "positions")),
        ):
            require(
                getattr(self, name) in valid, f"{name} must be one of {', '.join(valid)} (got {getattr(self, name)!r})"
            )
        require(
            self.feature_augmentation or not self.quantified_transferability,
            "feature_augmentation=False has no D_F to quantify transferability: set quantified_transferability=False",
        )
        require(
            not (self.feature_augmentation and self.architecture.startswith("fcn8s")),
            f"A_F reads the bottom block of a ResNet or tiny encoder; {self.architecture} has none",
        )


# ---------------------------------------------------------------------------------------------------- modules


class BottleneckTranslator(nn.Module):
    """T_D or T_D^{-1} with the transferability-aware bottleneck (Eq. 6-7): a CycleGAN ResNet generator split after its
    last residual block, a variational bottleneck in between.

    `forward(x, noise)`: images (B, C, H, W) in [-1, 1], H and W divisible by 4 → (translated images, μ, log σ²), μ and
    log σ² (B, 4·ngf, H/4, W/4). `noise` ~ N(0, I) of μ's shape gives z = μ + σ·noise; None gives z = μ."""

    def __init__(self, in_channels: int, out_channels: int, ngf: int, blocks: int):
        super().__init__()
        self.encoder, self.decoder = split_resnet_generator(ResnetGenerator(in_channels, out_channels, ngf, blocks))
        self.bottleneck = VariationalBottleneck(4 * ngf)
        self.latent_channels = 4 * ngf

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        height, width = x.shape[-2:]
        if height % 4 or width % 4:
            raise ValueError(f"the TD generators need image sizes divisible by 4 (got {height}x{width})")
        z, mean, log_variance = self.bottleneck(self.encoder(x), noise)
        return self.decoder(z), mean, log_variance


class PositionLinear(nn.Module):
    """Eq. 9's W ∈ R^{N×N} as printed: a linear map over the N = H·W pixel positions, the same for every channel, plus
    an optional B ∈ R^{N×C}. (B, C, H, W) → (B, C, H, W) for H·W = N."""

    def __init__(self, positions: int, channels: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, positions))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.bias = nn.Parameter(torch.zeros(channels, positions)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = x.reshape(b, c, h * w) @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(b, c, h, w)


class RA2B(nn.Module):
    """Residual attention on attention block (Sec. 3.4, Fig. 3): (B, C, H, W) → (B, C, H, W).

    C1, C2, C3 = three 1x1 convolutions of F_i; F_p = position attention (Eq. 8); f = W_f¹C1 + W_f²F_p + B_f and
    g = σ(W_g¹C1 + W_g²F_p + B_g) (Eq. 9); F_o = δ(f ⊗ g) + F_i with δ initialised at 0 (Eq. 10). Without attention on
    attention (w/oAA): F_o = δ·F_p + F_i. `positions` > 0 gives Eq. 9's matrices over positions (N fixed)."""

    def __init__(self, channels: int, attention_on_attention: bool = True, positions: int = 0):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.attention_on_attention = attention_on_attention
        if attention_on_attention:

            def transform(bias: bool) -> nn.Module:
                if positions:
                    return PositionLinear(positions, channels, bias)
                return nn.Conv2d(channels, channels, 1, bias=bias)

            self.f1, self.f2, self.g1, self.g2 = transform(True), transform(False), transform(True), transform(False)
        self.delta = nn.Parameter(torch.zeros(1))  # Eq. 10: "δ is initialized as 0"

    def forward(self, x: Tensor) -> Tensor:
        c1 = self.c1(x)
        fp = position_attention(c1, self.c2(x), self.c3(x))
        if not self.attention_on_attention:
            return self.delta * fp + x
        information = self.f1(c1) + self.f2(fp)
        gate = torch.sigmoid(self.g1(c1) + self.g2(fp))
        return self.delta * (information * gate) + x


class FeatureAugmentor(nn.Module):
    """A_F (Sec. 3.4-3.5; internals not printed, docstring reading 15).

    `forward(low, main, noise, weights)`: S's bottom-block features low (B, C_low, h', w'), its last-block features main
    (B, C_main, h, w), noise (B, C_z, h, w) ~ N(0, I), the residual transferability weights (B, 1, h, w) or None
    → augmented features (B, C_main, h, w), non-negative like S's."""

    def __init__(
        self,
        low_channels: int,
        main_channels: int,
        noise_channels: int,
        channels: int,
        num_ra2b: int,
        attention_on_attention: bool = True,
        downsample: int = 1,
        grid: int = 0,
    ):
        super().__init__()
        self.fuse = nn.Conv2d(low_channels + main_channels + noise_channels, channels, 1)
        self.blocks = nn.Sequential(*(RA2B(channels, attention_on_attention, grid * grid) for _ in range(num_ra2b)))
        self.project = nn.Conv2d(channels, main_channels, 1)
        self.downsample = downsample
        self.grid = grid  # > 0: the RA2B stack runs on a fixed grid x grid map (ra2b_weights="positions")

    def forward(self, low: Tensor, main: Tensor, noise: Tensor, weights: Tensor | None) -> Tensor:
        size = tuple(main.shape[-2:])
        low = F.adaptive_avg_pool2d(low, size)
        x = F.relu(self.fuse(torch.cat([low, main, noise], dim=1)))
        if weights is not None:
            x = x * weights
        if self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        elif self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample, ceil_mode=True)
        x = self.blocks(x)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.relu(self.project(x))

    def deltas(self) -> Tensor:
        """δ of every RA2B block (num_ra2b,)."""
        if not len(self.blocks):
            return torch.zeros(0)
        return torch.cat([block.delta.detach() for block in self.blocks])


# ---------------------------------------------------------------------------------------------------- pure rules


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per element: ½(μ² + σ² − log σ² − 1). Same shape as the inputs."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - log_variance - 1)


def reduce_kl(kl: Tensor, reduction: str) -> Tensor:
    """Per-element KL (B, C, h, w) → one value per position (B, 1, h, w) that T is compared with (`kl_reduction`):
    "channels" Σ_c KL; "elements" Σ_c KL · h·w (so that the positions' mean is the image's Σ over all elements);
    "mean" the mean over channels."""
    if reduction == "channels":
        return kl.sum(1, keepdim=True)
    if reduction == "elements":
        return kl.sum(1, keepdim=True) * (kl.shape[-2] * kl.shape[-1])
    return kl.mean(1, keepdim=True)


def transferability_weights(p: Tensor, residual: bool) -> Tensor:
    """The weight P takes everywhere it is used (docstring, reading 6): 1 + P (residual) or P."""
    return 1 + p if residual else p


def bottleneck_constraint(kl: Tensor, weights: Tensor | None, T: float, reduction: str) -> Tensor:
    """L_b = E_x[P ⊙ (KL(E(x) ‖ N(0, I)) − T)] (the last terms of Eq. 7 without λ, reading 4).

    kl: per-element KL (B, C, h, w); weights: w per position (B, 1, h, w), or None for w ≡ 1. The KL is reduced per
    position (`reduce_kl`), then L_b = mean over batch and positions of w · (KL_pos − T)."""
    per_position = reduce_kl(kl, reduction)
    if weights is None:
        return (per_position - T).mean()
    return (weights * (per_position - T)).mean()


def lagrange_update(multiplier: float, constraint: float, gamma: float, rule: str) -> float:
    """λ ← max(λ, γ·L_b) (Sec. 3.3, printed) or, rule "dual_ascent", λ ← max(0, λ + γ·L_b)."""
    if rule == "max":
        return max(multiplier, gamma * constraint)
    return max(0.0, multiplier + gamma * constraint)


def confident_pseudo_labels(probabilities: Tensor, beta: float, ignore_index: int = 255) -> Tensor:
    """Eq. 11's ŷ and M: probabilities (B, K, H, W) → labels (B, H, W) int64, argmax where max ≥ β, else ignored."""
    confidence, labels = probabilities.max(1)
    return torch.where(confidence >= beta, labels, torch.full_like(labels, ignore_index))


def td_adversarial_loss(d_output: Tensor, real: bool, kind: str) -> Tensor:
    """One side of Eq. 2-3 (reading 1): BCE of D's logits against real (1) or fake (0), or least squares."""
    return vanilla_gan_loss(d_output, real) if kind == "vanilla" else lsgan_loss(d_output, real)


def td_discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str) -> Tensor:
    """D1 or D2: ½[L(D(real), real) + L(D(fake), fake)]."""
    return 0.5 * (td_adversarial_loss(d_real, True, kind) + td_adversarial_loss(d_fake, False, kind))


def cycle_loss(reconstructed_t: Tensor, x_t: Tensor, reconstructed_s: Tensor, x_s: Tensor) -> Tensor:
    """L_cd, Eq. 4: ‖T_D(T_D^{-1}(x_t)) − x_t‖₁ + ‖T_D^{-1}(T_D(x_s)) − x_s‖₁ (means over pixels)."""
    return (reconstructed_t - x_t).abs().mean() + (reconstructed_s - x_s).abs().mean()


def attention_matrix(c1: Tensor, c2: Tensor) -> Tensor:
    """Eq. 8's M (reading 10): c1, c2 (B, C, H, W) → (B, N, N), M_ij = softmax_j ⟨C1_i, C2_j⟩ (rows sum to 1)."""
    return torch.softmax(torch.bmm(c1.flatten(2).transpose(1, 2), c2.flatten(2)), dim=-1)


def position_attention(c1: Tensor, c2: Tensor, c3: Tensor) -> Tensor:
    """Eq. 8's F_p: (F_p)_i = Σ_j M_ij (C3)_j. c1, c2, c3 (B, C, H, W) → (B, C, H, W)."""
    b, c, h, w = c3.shape
    return torch.bmm(attention_matrix(c1, c2), c3.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def _domain_mean(losses: Sequence[Tensor]) -> Tensor:
    """E over x ∈ (X̂s, Xt): the mean of the domains' batch means (reading 8)."""
    return sum(losses) / len(losses)


def feature_discriminator_loss(real: Sequence[Tensor], fake: Sequence[Tensor]) -> Tensor:
    """D_F's side of Eq. 12 or 13: −E[log D_F(real)] − E[log(1 − D_F(fake))], each list one logit map per domain."""
    return _domain_mean([domain_bce(r, 1.0) for r in real]) + _domain_mean([domain_bce(f, 0.0) for f in fake])


def fooling_loss(d_outputs: Sequence[Tensor]) -> Tensor:
    """The generator side of Eq. 12 (A_F) or 13 (S), non-saturating (reading 8): −E[log D_F(·)]."""
    return _domain_mean([domain_bce(d, 1.0) for d in d_outputs])


# ---------------------------------------------------------------------------------------------------- build


GENERATORS = ("generator_s2t", "generator_t2s")
TD_MODULES = GENERATORS + ("discriminator_t", "discriminator_s")


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    segmenter = recipe_segmenter(hp, info)
    modules: dict[str, nn.Module] = {"segmenter": segmenter}
    channels = info.in_channels
    if hp.translation:
        for name in GENERATORS:
            if hp.transferability_bottleneck:
                modules[name] = BottleneckTranslator(channels, channels, hp.generator_filters, hp.generator_blocks)
            else:
                modules[name] = ResnetGenerator(channels, channels, hp.generator_filters, hp.generator_blocks)
        modules["discriminator_t"] = PatchDiscriminator(channels, hp.patch_discriminator_filters)  # D1
        modules["discriminator_s"] = PatchDiscriminator(channels, hp.patch_discriminator_filters)  # D2
    if hp.feature_augmentation:
        modules["feature_discriminator"] = _feature_discriminator(hp, segmenter.feature_channels)
        if hp.quantified_transferability and hp.transferability_source == "step3":
            modules["feature_discriminator_p"] = _feature_discriminator(hp, segmenter.feature_channels)
        modules["augmentor"] = FeatureAugmentor(
            low_level_channels(segmenter),
            segmenter.feature_channels,
            hp.augmentor_noise_channels,
            hp.augmentor_channels,
            hp.num_ra2b,
            hp.attention_on_attention,
            hp.augmentor_downsample,
            hp.ra2b_grid if hp.ra2b_weights == "positions" else 0,
        )
    return nn.ModuleDict(modules)


def _feature_discriminator(hp: Hyperparams, in_channels: int) -> ConvDiscriminator:
    """D_F: {16, 32, 64, 64, 1}, 4x4, LeakyReLU 0.2 (Sec. 3.5), logits out (the sigmoid is in the loss, reading 7)."""
    return ConvDiscriminator(in_channels, (16, 32, 64, 64, 1), 4, 2, downsampling=hp.feature_discriminator_downsampling)


def init_state(hp: Hyperparams, info: TaskInfo) -> dict[str, Any]:
    return {
        "lambda_s": float(hp.lambda_s),
        "lambda_t": float(hp.lambda_t),
        "pool_s": [],  # fakes T_D^{-1}(x_t) for D2
        "pool_t": [],  # fakes T_D(x_s) for D1
        "step3_done": False,  # a Step III has trained D_F: P is in force from then on
        "transferability_ready": False,  # feature_discriminator_p holds a Step III D_F
    }


# ---------------------------------------------------------------------------------------------------- optimisers


def _adam(parameters, learning_rate: float, beta1: float, beta2: float) -> torch.optim.Adam:
    return torch.optim.Adam(parameters, lr=learning_rate, betas=(beta1, beta2))


def td_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    """Adam for both generators (with their bottleneck heads) and for D1, D2; lr constant for the first
    10 / (10 + 5) of the steps, then linearly to 0 (Sec. 3.5)."""
    share = hp.td_epochs_constant / (hp.td_epochs_constant + hp.td_epochs_decay)
    constant = int(round(num_steps * share))
    groups = {
        "generators": [p for name in GENERATORS for p in modules[name].parameters()],
        "discriminator_t": list(modules["discriminator_t"].parameters()),
        "discriminator_s": list(modules["discriminator_s"].parameters()),
    }
    out = {}
    for name, parameters in groups.items():
        adam = _adam(parameters, hp.td_learning_rate, hp.td_beta1, hp.td_beta2)
        out[name] = Optim(adam, linear_decay(adam, constant, num_steps - constant))
    return out


def tf_optimizers(
    hp: Hyperparams, modules: nn.ModuleDict, num_steps: int, only: tuple[str, ...] | None = None
) -> dict[str, Optim]:
    """S: the recipe's SGD with poly 0.9 (Sec. 3.5); D_F: Adam 1e-4, betas (0.9, 0.99) (Sec. 3.5); A_F: Adam with D_F's
    settings. D_F and A_F keep their rate (reading 16). `only`: the optimisers of one unscoped stage's modules."""
    out = {}
    if only is None or "segmenter" in only:
        out["segmenter"] = recipe_optim(hp, modules["segmenter"], num_steps)
    if hp.feature_augmentation:
        for name in ("feature_discriminator", "augmentor"):
            if only is None or name in only:
                adam = _adam(
                    modules[name].parameters(),
                    getattr(hp, f"{name}_learning_rate"),
                    getattr(hp, f"{name}_beta1"),
                    getattr(hp, f"{name}_beta2"),
                )
                out[name] = Optim(adam)
    return out


# ---------------------------------------------------------------------------------------------------- helpers


def to_gan(images: Tensor) -> Tensor:
    return images * 2 - 1


def from_gan(images: Tensor) -> Tensor:
    return (images + 1) / 2


def standard_normal(ctx: StepContext, shape: Sequence[int]) -> Tensor:
    """N(0, I) noise from `ctx.generator` (a CPU generator): drawn on the CPU for CPU runs; on an accelerator, one seed
    drawn from it seeds a device generator (deterministic and resume-safe without a host-to-device copy)."""
    if ctx.device.type == "cpu":
        return torch.randn(*shape, generator=ctx.generator)
    seed = int(torch.randint(0, 2**62, (), generator=ctx.generator))
    device_generator = torch.Generator(ctx.device).manual_seed(seed)
    return torch.randn(*shape, generator=device_generator, device=ctx.device)


def _translate_for_training(ctx: StepContext, name: str, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A generator in training: its translation of x (in [-1, 1]) and the per-element KL of its latent (or None
    without the bottleneck). z = μ + σ·ε with ε from `ctx.generator`."""
    generator = ctx.modules[name]
    if not isinstance(generator, BottleneckTranslator):
        return generator(x), None
    b, _, h, w = x.shape
    noise = standard_normal(ctx, (b, generator.latent_channels, h // 4, w // 4)).to(x)
    image, mean, log_variance = generator(x, noise)
    return image, gaussian_kl(mean, log_variance)


@torch.no_grad()
def translate(modules: nn.ModuleDict, name: str, images: Tensor) -> Tensor:
    """A frozen generator's translation of images in [0, 1] (z = μ), in [0, 1]."""
    generator = modules[name]
    out = generator(to_gan(images))
    return from_gan(out[0] if isinstance(out, tuple) else out).clamp(0, 1)


def _tf_source_images(ctx: StepContext, batch: Batch) -> Tensor:
    """x̂_s = T_D(x_s) from the frozen T_D (reading 12), or x_s without TD."""
    return translate(ctx.modules, "generator_s2t", batch.source_image) if ctx.hp.translation else batch.source_image


def _p_discriminator(ctx: StepContext) -> nn.Module | None:
    """The D_F that gives P now, or None while P is not in force (no Step III yet, or w/oQT)."""
    hp, state = ctx.hp, ctx.state
    if not hp.quantified_transferability:
        return None
    if hp.transferability_source == "step3":
        if ctx.stage == "tf_align":  # Step III: D_F as it trains there ("from D_F in Step III")
            return ctx.modules["feature_discriminator"] if state.get("step3_done") else None
        return ctx.modules["feature_discriminator_p"] if state.get("transferability_ready") else None
    return ctx.modules["feature_discriminator"] if state.get("step3_done") else None


def _weights(ctx: StepContext, features: Tensor, size: Sequence[int]) -> tuple[Tensor | None, Tensor | None]:
    """(w resized to `size` (B, 1, *size), P at D_F's resolution) for S's features (B, C, h, w), both detached;
    (None, None) while P is not in force."""
    discriminator = _p_discriminator(ctx)
    if discriminator is None:
        return None, None
    with torch.no_grad():
        p = transferability(discriminator(features))
        w = transferability_weights(p, ctx.hp.residual_transferability)
        return F.interpolate(w, size=tuple(size), mode="bilinear", align_corners=False), p


def _augment(ctx: StepContext, low: Tensor, main: Tensor, weights: Tensor | None) -> Tensor:
    b, _, h, w = main.shape
    noise = standard_normal(ctx, (b, ctx.hp.augmentor_noise_channels, h, w)).to(main)
    return ctx.modules["augmentor"](low, main, noise, weights)


def _pool(ctx: StepContext, name: str) -> ImagePool:
    return ImagePool(ctx.hp.pool_size, ctx.state.get(name, []))


def _descend(ctx: StepContext, name: str, loss: Tensor) -> None:
    """One update of optimiser `name` on `loss` (other optimisers clear their own gradients before their updates)."""
    optimizer = ctx.optimizers[name]
    optimizer.zero_grad(set_to_none=True)
    ctx.backward(loss)
    ctx.step(name)


def _mean(values: Sequence[Tensor]) -> Tensor:
    return torch.stack([v.detach().float().mean() for v in values]).mean()


# ---------------------------------------------------------------------------------------------------- TD (Sec. 3.3)


def td_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """One TD iteration: generators on Eq. 7 (Eq. 5 without TKB), λ update, then D1 and D2 on pooled fakes."""
    hp, modules = ctx.hp, ctx.modules
    x_s, x_t = to_gan(batch.source_image), to_gan(batch.target_image)
    latent_size = (x_s.shape[-2] // 4, x_s.shape[-1] // 4), (x_t.shape[-2] // 4, x_t.shape[-1] // 4)
    metrics: dict[str, Tensor] = {}

    # Eq. 1, 6: P of S's features of the real x_s and x_t (S and D_F fixed), the weights of the KL terms
    w_s = w_t = None
    if hp.transferability_bottleneck:
        segmenter = modules["segmenter"]
        with torch.no_grad():
            features_s = segmenter.encode(imagenet_normalise(batch.source_image)).main
            features_t = segmenter.encode(imagenet_normalise(batch.target_image)).main
        w_s, p_s = _weights(ctx, features_s, latent_size[0])
        w_t, p_t = _weights(ctx, features_t, latent_size[1])
        if p_s is not None:
            metrics["transferability_mean"] = _mean([p_s, p_t])

    # Eq. 2-5, 7: T_D and T_D^{-1} minimise L_ad + L_ad + α L_cd + λ_s L_b^s + λ_t L_b^t
    fake_t, kl_s = _translate_for_training(ctx, "generator_s2t", x_s)  # x̂_s = T_D(x_s)
    fake_s, kl_t = _translate_for_training(ctx, "generator_t2s", x_t)  # x̂_t = T_D^{-1}(x_t)
    reconstructed_s, _ = _translate_for_training(ctx, "generator_t2s", fake_t)  # T_D^{-1}(x̂_s)
    reconstructed_t, _ = _translate_for_training(ctx, "generator_s2t", fake_s)  # T_D(x̂_t)
    gan_s2t = td_adversarial_loss(modules["discriminator_t"](fake_t), True, hp.td_gan_loss)  # Eq. 2, D1
    gan_t2s = td_adversarial_loss(modules["discriminator_s"](fake_s), True, hp.td_gan_loss)  # Eq. 3, D2
    cyc = cycle_loss(reconstructed_t, x_t, reconstructed_s, x_s)  # Eq. 4
    loss_g = gan_s2t + gan_t2s + hp.alpha * cyc  # Eq. 5
    if hp.transferability_bottleneck:
        loss_b_s = bottleneck_constraint(kl_s, w_s, hp.T, hp.kl_reduction)  # L_b^s
        loss_b_t = bottleneck_constraint(kl_t, w_t, hp.T, hp.kl_reduction)  # L_b^t
        loss_g = loss_g + ctx.state["lambda_s"] * loss_b_s + ctx.state["lambda_t"] * loss_b_t  # Eq. 7
    _descend(ctx, "generators", loss_g)
    metrics.update(
        loss_g=loss_g.detach(), loss_gan_s2t=gan_s2t.detach(), loss_gan_t2s=gan_t2s.detach(), loss_cyc=cyc.detach()
    )

    # Sec. 3.3: λ_s ← max(λ_s, γ L_b^s), λ_t ← max(λ_t, γ L_b^t), with L_b averaged over workers
    if hp.transferability_bottleneck:
        for domain, loss_b, kl in (("s", loss_b_s, kl_s), ("t", loss_b_t, kl_t)):
            constraint = float(ctx.all_reduce_mean(loss_b.detach()))
            key = f"lambda_{domain}"
            ctx.state[key] = lagrange_update(ctx.state[key], constraint, hp.gamma, hp.multiplier_update)
            metrics[f"loss_b_{domain}"] = loss_b.detach()
            metrics[f"kl_{domain}"] = reduce_kl(kl.detach(), hp.kl_reduction).mean()
            metrics[key] = torch.tensor(ctx.state[key])

    # Eq. 2-3, the discriminators' side: D1 tells x_t from T_D(x_s), D2 tells x_s from T_D^{-1}(x_t)
    for name, real, fake, pool_name in (
        ("discriminator_t", x_t, fake_t, "pool_t"),
        ("discriminator_s", x_s, fake_s, "pool_s"),
    ):
        pool = _pool(ctx, pool_name)
        pooled = pool.query(fake.detach(), ctx.generator)
        ctx.state[pool_name] = pool.images
        loss_d = td_discriminator_loss(modules[name](real), modules[name](pooled), hp.td_gan_loss)
        _descend(ctx, name, loss_d)
        metrics[f"loss_{name.replace('discriminator', 'd')}"] = loss_d.detach()
    return metrics


# ---------------------------------------------------------------------------------------------------- TF (Sec. 3.4)


def segment_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Step I, Eq. 11: S minimises the cross-entropy on (x̂_s, y_s) plus the confident target pixels."""
    hp, info, segmenter = ctx.hp, ctx.info, ctx.modules["segmenter"]
    x_hat = _tf_source_images(ctx, batch)
    loss_source = segmentation_loss(segmenter(imagenet_normalise(x_hat)), batch.source_label, info.ignore_index)
    loss = loss_source
    metrics = {"loss_seg_source": loss_source.detach()}
    if hp.pseudo_labelling:
        logits_t = segmenter(imagenet_normalise(batch.target_image))
        if hp.pseudo_label_source == "online":  # ŷ_t = argmax S(x_t; θ_S), M_v = 1[max S(x_t)_v ≥ β]
            probabilities = F.softmax(upsample(logits_t.detach(), tuple(batch.target_image.shape[-2:])), dim=1)
            labels = confident_pseudo_labels(probabilities, hp.beta, info.ignore_index)
        else:  # the labels of this round's pass (pseudo_label_source="round")
            labels = batch.target_extras["pseudo_label"].long()
        loss_target = segmentation_loss(logits_t, labels, info.ignore_index)
        loss = loss + loss_target
        metrics.update(
            loss_seg_target=loss_target.detach(), pseudo_label_fraction=(labels != info.ignore_index).float().mean()
        )
    _descend(ctx, "segmenter", loss)
    return metrics


def _tf_features(ctx: StepContext, batch: Batch) -> list[tuple[Tensor, Tensor]]:
    """(low, main) features of S for x̂_s and for x_t (with gradients where S trains)."""
    segmenter = ctx.modules["segmenter"]
    out = []
    for images in (_tf_source_images(ctx, batch), batch.target_image):
        low, features = encode_levels(segmenter, imagenet_normalise(images))
        out.append((low, features.main))
    return out


def _augmented(ctx: StepContext, levels: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """A_F(x, z) for each domain, with P from `_p_discriminator` on S's features (reading 15), and the P maps."""
    augmented, p_maps = [], []
    for low, main in levels:
        weights, p = _weights(ctx, main.detach(), main.shape[-2:])
        augmented.append(_augment(ctx, low.detach(), main.detach(), weights))
        if p is not None:
            p_maps.append(p)
    return augmented, p_maps


def augment_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Step II, Eq. 12: with S fixed, A_F learns to make D_F take its features for S's; D_F tells S's (real) from
    A_F's (fake)."""
    discriminator = ctx.modules["feature_discriminator"]
    with torch.no_grad():
        levels = _tf_features(ctx, batch)
    augmented, p_maps = _augmented(ctx, levels)
    d_augmented = [discriminator(a) for a in augmented]
    loss_augmentor = fooling_loss(d_augmented)  # min over θ_AF (non-saturating)
    _descend(ctx, "augmentor", loss_augmentor)
    d_features = [discriminator(main) for _, main in levels]
    loss_d = feature_discriminator_loss(d_features, [discriminator(a.detach()) for a in augmented])  # max over θ_DF
    _descend(ctx, "feature_discriminator", loss_d)
    metrics = {
        "loss_augmentor": loss_augmentor.detach(),
        "loss_feature_d": loss_d.detach(),
        "d_f_augmented": _mean([torch.sigmoid(d) for d in d_augmented]),
        "d_f_features": _mean([torch.sigmoid(d) for d in d_features]),
        "ra2b_delta": ctx.modules["augmentor"].deltas().mean() if ctx.hp.num_ra2b else torch.tensor(0.0),
    }
    if p_maps:
        metrics["transferability_mean"] = _mean(p_maps)
    return metrics


def align_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Step III, Eq. 13: with A_F fixed, S learns to make D_F take its features of both domains for A_F's; D_F is
    retrained with the labels flipped (A_F's real, S's fake). `feature_discriminator_role="domain"`: D_F labels S's
    source features real and its target features fake, S only moves its target features."""
    hp, discriminator = ctx.hp, ctx.modules["feature_discriminator"]
    levels = _tf_features(ctx, batch)
    with torch.no_grad():
        augmented, p_maps = _augmented(ctx, levels)
    (_, features_s), (_, features_t) = levels
    if hp.feature_discriminator_role == "augmentation":
        loss_segmenter = fooling_loss([discriminator(features_s), discriminator(features_t)])  # min over θ_S
    else:
        loss_segmenter = fooling_loss([discriminator(features_t)])
    _descend(ctx, "segmenter", loss_segmenter)
    d_augmented = [discriminator(a) for a in augmented]
    d_s, d_t = discriminator(features_s.detach()), discriminator(features_t.detach())
    if hp.feature_discriminator_role == "augmentation":
        loss_d = feature_discriminator_loss(d_augmented, [d_s, d_t])  # max over θ_DF
    else:
        loss_d = domain_bce(d_s, 1.0) + domain_bce(d_t, 0.0) + fooling_loss(d_augmented)
    _descend(ctx, "feature_discriminator", loss_d)
    ctx.state["step3_done"] = True
    metrics = {
        "loss_align": loss_segmenter.detach(),
        "loss_feature_d": loss_d.detach(),
        "d_f_augmented": _mean([torch.sigmoid(d) for d in d_augmented]),
        "d_f_features": _mean([torch.sigmoid(d_s), torch.sigmoid(d_t)]),
    }
    if p_maps:
        metrics["transferability_mean"] = _mean(p_maps)
    return metrics


def snapshot_transferability(ctx: StepContext) -> dict[str, Any]:
    """`Stage.on_start` of TD and Step II: after a Step III, copy D_F into `feature_discriminator_p`, the D_F that
    gives P in TD and Step II until the next copy (Step III itself uses the live D_F; "P ... is from D_F in Step
    III rather than Step II", `transferability_source`)."""
    ready = bool(ctx.state.get("step3_done"))
    if ready and "feature_discriminator_p" in ctx.modules:
        ctx.modules["feature_discriminator_p"].load_state_dict(ctx.modules["feature_discriminator"].state_dict())
    return {"transferability_ready": ready and "feature_discriminator_p" in ctx.modules}


@torch.no_grad()
def collect_pseudo_labels(ctx: StepContext, images: Tensor, image_labels: Tensor | None) -> dict[str, Tensor]:
    """`pseudo_label_source="round"`: Eq. 11's labels of whole target images from S at the start of Step I."""
    probabilities = F.softmax(predict(ctx.hp, ctx.modules, images, ctx.position), dim=1)
    labels = confident_pseudo_labels(probabilities, ctx.hp.beta, ctx.info.ignore_index)
    return {"pseudo_label": labels.to(torch.uint8)}


# ---------------------------------------------------------------------------------------------------- stages


def _scope(hp: Hyperparams, family: str, round_index: int) -> str | None:
    """`optimizer_scope` (reading 18) as contract scopes."""
    if hp.optimizer_scope == "stage":
        return None
    if hp.optimizer_scope == "trial":
        return family
    return None if family == "td" else f"{family}{round_index}"


def _tf_stage(scope: str | None, trains: tuple[str, ...], **kwargs: Any) -> Stage:
    """A TF stage: the first stage of a scope builds every TF optimiser, an unscoped stage only its own modules'."""
    factory = tf_optimizers if scope else functools.partial(tf_optimizers, only=trains)
    return Stage(trains=trains, optimizers=factory, optimizer_scope=scope, **kwargs)


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    on_start = snapshot_transferability if hp.feature_augmentation else None
    pseudo_label_pass = None
    if hp.pseudo_labelling and hp.pseudo_label_source == "round":
        pseudo_label_pass = TargetPass(
            "stage_start", collect_pseudo_labels, store={"pseudo_label": SampleMap(torch.uint8, "nearest", 255)}
        )
    out: list[Stage] = []
    for r in range(hp.alternations):
        if hp.translation:
            out.append(
                Stage(
                    name="td",
                    trains=TD_MODULES,
                    budget=epochs(hp.td_epochs_constant + hp.td_epochs_decay, of="source"),
                    optimizers=td_optimizers,
                    step=td_step,
                    on_start=on_start,
                    optimizer_scope=_scope(hp, "td", r),
                )
            )
        tf = functools.partial(_tf_stage, _scope(hp, "tf", r))

        out.append(
            tf(
                ("segmenter",),
                name="tf_segment",
                budget=epochs(hp.tf_segment_epochs, of="source"),
                step=segment_step,
                target_pass=pseudo_label_pass,
            )
        )
        if hp.feature_augmentation:
            out.append(
                tf(
                    ("augmentor", "feature_discriminator"),
                    name="tf_augment",
                    budget=epochs(hp.tf_augment_epochs, of="source"),
                    step=augment_step,
                    on_start=on_start,
                )
            )
            out.append(
                tf(
                    ("segmenter", "feature_discriminator"),
                    name="tf_align",
                    budget=epochs(hp.tf_align_epochs, of="source"),
                    step=align_step,
                )
            )
    return tuple(out)


# ---------------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    """S alone on the target images (Sec. 3.5): logits at image size."""
    return upsample(modules["segmenter"](imagenet_normalise(images)), tuple(images.shape[-2:]))


def label_colours(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Class maps (N, H, W) → RGB images (N, 3, H, W) in [0, 1]; ignored pixels black."""
    hues = torch.arange(num_classes, dtype=torch.float32, device=labels.device) / max(1, num_classes)
    palette = torch.stack([hues, (hues + 1 / 3) % 1, (hues + 2 / 3) % 1], dim=1) * 0.8 + 0.2  # (K, 3)
    valid = labels != ignore_index
    colours = palette[torch.where(valid, labels, 0)].permute(0, 3, 1, 2)
    return colours * valid.unsqueeze(1)


@torch.no_grad()
def samples(hp: Hyperparams, modules: nn.ModuleDict, images: SampleImages, stage: StagePosition) -> dict[str, Tensor]:
    """Translated images both ways (Fig. 2's x̂_s, x̂_t) and the pseudo-label maps of the target images (Fig. 5b, 8)."""
    out: dict[str, Tensor] = {}
    if hp.translation:
        out.update(
            source=images.source,
            source_to_target=translate(modules, "generator_s2t", images.source),
            target=images.target,
            target_to_source=translate(modules, "generator_t2s", images.target),
        )
    if hp.pseudo_labelling:
        logits = predict(hp, modules, images.target, stage)
        labels = confident_pseudo_labels(F.softmax(logits, dim=1), hp.beta)
        out["target_pseudo_labels"] = label_colours(labels, logits.shape[1])
    return out


METHOD = Method(
    name="tdtf",
    paper="Dong et al., What Can Be Transferred: Unsupervised Domain Adaptation for Endoscopic Lesions "
    "Segmentation (TD + TF modules), CVPR 2020 (../shared/papers/000_234ffb67ab86a73c.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=("synthetic-endoscopy", "synthetic-urban", "endoscopy", "gta5-cityscapes", "synthia-cityscapes"),
    init_state=init_state,
    samples=samples,
)
