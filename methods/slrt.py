"""SLRT: semantic-transferable weakly-supervised endoscopic lesion segmentation (Dong et al., ICCV 2019).

Implements ../shared/papers/001_1bc4ba71fc4bf48c.txt ("the paper"; reading notes ../shared/papers/notes/slrt.md, a
first reading checked line by line against the paper here). No public implementation exists (the paper's
http://ai.sia.cn/lwfb/ holds no code); this one follows the text.

Components, as printed:
- E + S2: DeepLab-v3 on ResNet-50 from ImageNet, last two strides 1 (output stride 8), multi-grid dilations (1, 2, 4)
  in the last block ("three dilated convolutional filters with stride of {1, 2, 4}", read as DeepLab-v3's multi-grid
  rates 4·(1, 2, 4) at output stride 8), S2 = ASPP + pixel classifier (Sec. 3.3; methods/shared/segmenter.py).
- S1: the image-level head on E's features (global average pooling, 1x1 convolution to 2 logits, "whether the input
  image has lesion or not", softmax cross-entropy J, Eq. 2), and the refinement of S2 by S1 (choice 2).
- D: five 3x3 stride-2 convolutions {16, 32, 64, 64, 1}, LeakyReLU 0.2 between them, on the softmax of S2 upsampled
  to the image (Sec. 3.3; `slrt_discriminator`).
- Eq. 1: L = L_C + L_S + η L_D + µ L_SRT, µ = 10, η = 0.3, α = 1, γ = 0.7 (Fig. 5's captions). One Adam step on
  E, S1, S2 and the refinement per iteration, then D's step (Sec. 3.4). Adam 1e-4, decay 0.7 every 950 steps,
  batch 4.
- Alg. 1 (λ_k) from a pass over the whole target training set at every epoch (`TargetPass("every_epoch")`), p =
  25% + 5% per epoch, at most 55%; Eq. 5 and Alg. 2 (SLIC superpixels, the 8-neighbour vote) on each step's target
  batch; Alg. 3 (centroid histories) and Eq. 7 every step.
- Inference (Sec. 3.4 "Testing"): E, S1 and S2, the refinement; D and the pseudo-label machinery are not involved.

Readings of what is printed:
1. The sign of λ in Eq. 3-4. As printed, +λ‖ŷ‖₁ with λ ≥ 0 makes a label e_k cost −log p_k + λ > 0 = the cost of the
   zero label, so no pixel could ever be selected; the text calls it "a negative sparse constraint to prevent the
   trivial solution from ignoring all pseudo pixel labels" and says "a larger λ can promote the selection of more
   pseudo labels". Read −λ_k‖ŷ‖₁: Eq. 5 is then exactly Eq. 4's minimiser (tested by brute force). λ‖ŷ‖₁ is a
   constant for the network: only the cross-entropy over selected pixels trains it.
2. Alg. 1. Line 2 ("Set MP_k = ∅") inside the image loop would keep only the last image: read as an initialisation
   ("after obtaining maximum predicted probability M_j of each pixel for all target images, we sort the
   probabilities of all pixels predicted as class k"). Line 12's index is read 1-based, T_k = ⌈(1−p)·n_k⌉ of the
   ascending sort, so that Eq. 5's strict ">" keeps exactly ⌊p·n_k⌋ pixels of class k (a 0-based literal index keeps
   one fewer whenever (1−p)·n_k is an integer, none at all for n_k = 4, p = 25%). A class no pixel is predicted as
   has no λ_k in the text: λ_k = 0, which selects nothing. "axis = 3" is the class axis of NHWC tensors. The pass
   collects at S2's output resolution (output stride 8; the full-resolution pass over Cityscapes would hold 1.5 G
   values), Eq. 5 runs at image size on upsampled logits.
3. Eq. 5's k* is the argmax of p_k / e^{−λ_k}, which is not the plain argmax Alg. 1 sorts by: a class with a low
   threshold takes pixels whose plain argmax is another class, so the selected fraction is not p (logged).
4. Alg. 2: line 9's 3x3 window includes the centre, which is unlabelled (line 7), so the vote is over the 8
   neighbours; "> 4" needs 5 of them with label N_k in the pixel's superpixel (a border pixel with 5 neighbours needs
   all of them, a corner can never be filled). Only unlabelled pixels change. Line 2 loops over the whole target
   set, but Alg. 3 line 4 and Sec. 3.4 ("In each training step ... ultimate pseudo pixel labels ŷ are generated via
   Algorithm 2") run it on each iteration's target images: λ_k from the latest pass, Eq. 5 and the vote per step.
5. Alg. 3: lines 9-10 are an exponentially weighted sum over iterations, C_k ← γ C_k + C_k^{(n)} ("sum"); earlier
   terms were computed with earlier parameters and are constants (detached), the gradient reaches the current term
   only. Lines 7-8 divide by |x| (all pixels of the image): choice 4.
6. Eq. 6: D is the probability of "target" (its first term is log D(S2(x_t))); D maximises Eq. 6 (BCE with target 1,
   source 0: ½[BCE(D(P_s), 0) + BCE(D(P_t), 1)]), S2 "is trained to fool D" through the target term only, in the
   non-saturating form BCE(D(P_t), 0) weighted by η (AdaptSegNet's, the LtA the paper compares with); the source
   term sends no gradient to the network.
7. Image-level labels: y^tc = 1 when the target image label holds any class but class 0 ("normal"); they reach
   S1's loss and nothing else — the paper describes no other use (no pseudo-label filtering by image label). Target
   pixel labels never reach the method (the platform's target stream carries none; a test checks which Batch fields
   the step reads).

Choices the paper leaves open (hyperparameters where two readings are plausible):
1. Numerics of Alg. 1 and Eq. 5 in float32. A float32 softmax returns exactly 1.0 for logit margins above ~17
   nats and `log_softmax` exactly 0.0 (log(1 + s) rounds to 0), so on a trained model every confident pixel ties at
   the threshold and Eq. 5's strict ">" selects nothing for that class. λ_k is a log already: the pass stores
   −log p_max = log1p(Σ_{j≠max} e^{l_j − l_max}), exact until exp underflows (~87-103 nats), and Eq. 5 compares
   log p_k + λ_k > 0 (`stable_log_probabilities`; tested with margins 20-27 nats, where the probability rule selects
   none and this one the expected two). Measured: thresholds of 1 − 1e-5 and closer are common after 300 steps.
2. The refinement "via convolution operation" (Fig. 2's dashed arrows, not in the text): a 1x1 convolution over
   [S2's logits ‖ S1's softmax], initialised to pass S2's logits through (so training starts from S2's own
   prediction), gradients into S1 too; every later use of S2's output (L_S, D, pseudo labels, prediction) is the
   refined one. `refinement="image"` (default) broadcasts S1's image probability; "pixel" uses S1's 1x1 convolution
   before its pooling (a class-activation map, a probability per pixel). With a spatially constant input, "image"
   amounts to a learned per-image bias on each class's logits.
3. "pixel feature maps ... by subnet S2" (Alg. 3 line 5): `centroid_features="s2"` is the ASPP projection (256
   channels, the classifier's input; `DeepLabV3Head.embed`); on the tiny network, whose S2 is a 1x1 classifier, E's
   features; "encoder" is E's output. Labels are resized to the feature map by nearest neighbour; ignored source
   pixels and unlabelled target pixels count for no class. Without the pseudo-label generator (BL+AL+SRT, which
   Table 2 prints with the same IoUs as Ours-woPL: one configuration), the target centroids use S2's argmax on every
   target pixel.
4. The scale of Eq. 1's terms, and why µ = 10 collapsed training (issue 16, item 7). Measured on synthetic-urban
   (300 steps, seed 0, this file's defaults otherwise): with L_S taken as a mean over pixels and µ·L_SRT as printed,
   training collapses to one class (6.1 mIoU, as in the issue; without L_SRT 41.1). The log shows why: L_SRT sums
   ‖C^s − C^t‖² + α‖C^s − C^t‖₁ over K classes × F channels (7 × 128 here) and the history sum of lines 9-10 scales
   centroids by up to 1/(1 − γ) = 3.3 (the L2 term by up to 11), so µ·L_SRT starts near 400 against a cross-entropy
   near 2; its trivial minimiser is F = 0 (both centroids at the origin), and gradient descent takes it: the mean
   feature norm falls from 8 to 1e-5 within 100 steps on both domains, and then nothing can be classified. The
   history's scale is not the cause on its own (`centroid_history="mean"`, normalised by the accumulated weight:
   also 6.1), nor the channel sum (`srt_reduction="mean"`, ÷ K·F: 12.2). The cause is the reduction the paper
   implies for L_S: Eq. 3 sums the cross-entropy over the |x| pixels of each image, so the printed µ = 10 and
   η = 0.3 weigh L_SRT and L_D against a loss |x| times the per-pixel mean. `loss_reduction="pixel_sum"` (default)
   keeps L_S as a mean and divides the per-image terms (L_C, η·L_D, µ·L_SRT) by |x| — the printed objective divided
   by a constant, with the same minimiser and, under Adam, the same steps. With it µ = 10 does not collapse
   (42.1 mIoU; 47.5 with η on the same footing). The weights it gives, per |x| of the source image: 1/4,096 on
   the 64x64 synthetic tasks (η·L_D at 7e-5 of L_S), 1/262,144 on endoscopy at 512x512, 1/921,600 on GTA5. Where
   the domains' training sizes differ (GTA5 720x1280, Cityscapes 512x1024), the printed sums would also weigh the
   target cross-entropy against the source one by |x_t|/|x_s| (0.57 there): both are means here, weight 1, and
   the one factor is the source image's 1/|x| (equal sizes on the synthetic and endoscopy tasks: no difference). Under
   the SGD the synthetic tasks train with (search_spaces/slrt.py) a constant factor is not neutral: S1's image-level
   term then barely trains (measured, `python -m platform.sweep slrt`: S1's target accuracy 0.67 at step 600, the
   share of target images with a lesion, and L_C at 0.65 against log 2 = 0.69; again 0.66 on synthetic-endoscopy's
   generator version 3), which is a limitation of this
   default on the synthetic tasks, not a reading of the paper; `open_choices` has "mean". "mean" gives the weights against the per-pixel mean as the
   platform's other methods use them. Alg. 3 lines 7-8 print 1/|x| (all pixels), which makes a "centroid" the class
   frequency times the class mean: target classes cover only about p of the pixels, so the target centroids would
   be systematically shorter than the source ones, and shrinking features lowers the loss even when the classes are
   aligned. `centroid_normalisation="class"` (default) divides by the class's pixel count (the centroid the text
   describes, "the centroids of the class k"); "image" is the literal 1/|x|. `centroid_history="sum"` (default, as
   printed) includes every class in Eq. 7 (a class never seen on a side has C = 0 there); "mean" normalises by the
   accumulated weight W_k ← γ W_k + 1[present] and only compares classes seen on both sides. `srt_reduction`: "sum"
   as printed, "mean" divides by the compared classes × channels. Centroids are computed over the whole global
   batch (sums and counts reduced with `ctx.all_reduce_mean`, the gradient through each worker's own terms), so that
   data-parallel workers keep identical histories.
5. Alg. 2 in place or simultaneous: line 14 writes into the ŷ line 9 reads, in raster order ("raster", a sequential
   loop, practical at synthetic sizes only), so a pixel filled earlier can vote for later ones; "simultaneous"
   (default) lets every vote read Eq. 5's labels (vectorised; no raster-order bias that a flip would change). The
   two differ only on chains of holes (tested on a hand-made map).
6. SLIC [1] (scikit-image; no parameter printed): about H·W / `superpixel_size`² segments in CIELAB,
   `superpixel_compactness` 10 (SLIC's m for CIELAB), 10 iterations, no smoothing, connected segments, on the
   augmented target image the step sees (so segments and pseudo labels align by construction);
   `superpixel_scale` < 1 runs SLIC on the image resized by that factor and resizes the segment map back (for the
   cost at 1024x512). `superpixel_source="store"` computes the superpixels in Alg. 1's pass instead, on the
   unaugmented images at the task's target size, and keeps them in the platform's per-sample store (int16, about
   H·W·2 bytes per target image: 3.1 GB for Cityscapes' 2,975 images at 1024x512); each step gets them placed like
   its crop (padding: segment id −1, which never votes). Both cost one SLIC per target image per epoch (the pass
   runs every epoch and writes a new store version); the store moves the cost out of the step.
7. "each training epoch" for p: an epoch of the target training set (`portion_every="target"`, the set Alg. 1 passes
   over; endoscopy: 300 images, 75 steps at batch 4); "source" counts source epochs.
8. Sec. 3.1's "We firstly forward image x_s ... to optimize the whole network excluding D ... the target image ...
   is then forwarded into our model to fine-tuning the whole network" can be read as a source phase before
   adaptation; Alg. 3 and Sec. 3.4 start every term at iteration 1. `source_warmup_steps` (default 0, as Sec. 3.4)
   spends that many steps on the source terms of L_S and L_C first (a stage that never loads target images).
9. Eq. 3's target term sums over all pixels: divided by the number of target pixels
   (`target_loss_normalisation="pixels"`, default), so its weight grows with the selected fraction; "selected" is
   the mean over selected pixels. The source term is the mean over labelled source pixels (the platform's
   segmentation loss; only ignore-labelled pixels are left out), not over all pixels: the two differ only where
   source labels have ignored pixels.
10. D's optimiser is not printed: Adam at `discriminator_learning_rate` 1e-4 with the network's betas and schedule
   ("The Adam optimizer is used to train whole networks"); D's loss is not scaled by η (η weighs the generator's
   term of Eq. 1; D's own step is invariant to a constant factor under Adam).
11. y^sc (Eq. 2, source): the source images' image-level labels where the task has them (`Batch.source_image_label`;
   the endoscopy task's 2,400 image-labelled gastroscope images stream with all-ignore pixel labels, so they train
   S1 and nothing else), otherwise read off the pixel labels of the crop the step sees.
12. Batch norm and workers: batch norm trains (batch 4). Two workers at `batch_size=2` reproduce the global batch of
   4 for every loss and for the centroids (reduced over workers), but each worker's batch norm normalises over its
   own 2 images unless `--sync-batchnorm` (GPUs); four workers at batch 1 are rejected before anything starts
   (DeepLab-v3's image-pooling batch norm cannot train on one image; SegmenterRecipe's check).
13. Length and schedule: the paper prints no number of iterations. `num_steps` = 9,500, ten of the 950-step decay
   periods (the learning rate ends at 0.7^9 ≈ 4% of the initial; p reaches 55% after 6 target epochs, 450 steps on
   endoscopy, 4,464 on Cityscapes). "exponential decay with the rate and step size as 0.7 and 950" is read as the
   staircase lr·0.7^⌊t/950⌋ ("step size"); `lr_decay_staircase=False` gives lr·0.7^(t/950). Adam's betas are not
   printed: (0.9, 0.999).
14. Which forward Eq. 5's thresholds apply to: the step's own target forward (`pseudo_label_forward="train"`,
   Sec. 3.4: "We then obtain the target softmax output S2(x_t) ... and ultimate pseudo pixel labels ŷ are generated
   via Algorithm 2"), in train mode; Alg. 1's pass runs in eval mode (batch-norm running statistics). At the
   thresholds of a trained model (1 − 1e-5 and closer) the two disagree: "eval" labels the batch with a separate
   no-grad forward in eval mode, the outputs λ_k was ranked on.

Ablations (Tables 2-4; search_spaces/slrt.py): `classification_head` (S1, L_C, the refinement: on for Table 1-2's
endoscopy models, "we remove the classification head" on SYNTHIA/GTA5 → Cityscapes, Sec. 4.3), `adversarial` (AL),
`pseudo_labels` (PL; Ours-woPL = BL+AL+SRT), `semantic_transfer` (SRT), `class_balance` (False: Ours-woCB, one λ
from all pixels pooled, Eq. 3's "global weight"), `superpixels` (False: Ours-woSP). `class_balance` and
`superpixels` do nothing without `pseudo_labels`. BL without the classification head never loads target images
(Tables 3-4's source-only DeepLab-v3).

Logged (train/...): the losses, λ_k per class (`lambda/<class>`), the portion p, the fraction of target pixels with a
pseudo label after Eq. 5 and after Alg. 2 (and per class), SLIC's seconds per step, the centroid distance and the
mean feature norm per domain (a collapse shows there first), S1's accuracy on the target batch and on the whole
target set at the latest pass. `samples`: the prediction, Eq. 5's seeds, the labels after Alg. 2's vote and the
superpixel boundaries on the first target validation images (λ_k from Alg. 1 over those images at p = portion_max:
`samples` is not given the training state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.contract import (
    SOURCE,
    TARGET,
    Augmentation,
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
    require,
    steps,
)
from methods.shared.discriminators import slrt_discriminator
from methods.shared.losses import domain_bce, segmentation_loss
from methods.shared.optim import exponential_decay, poly_schedule
from methods.shared.recipes import SegmenterRecipe, recipe_segmenter
from methods.shared.segmenter import Features, ImageClassifier, Segmenter, imagenet_normalise, upsample

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # D(·) is the probability of "target": Eq. 6's first term is log D(S2(x_t))
IMAGE_CLASSES = 2  # S1: "whether the input image has lesion or not" (Sec. 3.2)
MAX_SUPERPIXEL_ID = 32_767  # superpixel maps are stored as int16 in the per-sample store


@dataclass(frozen=True)
class Hyperparams(SegmenterRecipe):
    # E + S2: DeepLab-v3 on ResNet-50, last two strides 1, multi-grid (1, 2, 4), ASPP + pixel classifier (Sec. 3.3)
    architecture: str = "deeplabv3_resnet50"
    freeze_batchnorm: bool = False  # not printed; batch 4 trains batch norm (docstring, choice 12)
    learning_rate: float = 1e-4  # "The initial learning rate is set as 1.0 × 10^−4" (Sec. 3.4)
    batch_size: int = 4  # "with the batch size as 4" (Sec. 3.4)
    # Eq. 1, Eq. 7, Alg. 3: the values of Fig. 5's captions, "(a) when γ = 0.7, α = 1", "(b) when µ = 10, η = 0.3"
    mu: float = 10.0  # µ, weight of L_SRT, Eq. 1
    eta: float = 0.3  # η, weight of L_D, Eq. 1
    alpha: float = 1.0  # α, weight of the ℓ1 term of L_SRT, Eq. 7
    gamma: float = 0.7  # γ, decay of the centroid histories, Alg. 3 lines 9-10
    # Alg. 1: "p is starting from 25% and empirically added by 5% in each training epoch ... maximum portion p is
    # set as 55%" (Sec. 3.2); an epoch is one of the split named here (docstring, choice 7)
    portion_start: float = 0.25
    portion_step: float = 0.05
    portion_max: float = 0.55
    portion_every: Literal["target", "source"] = "target"
    # Optimisation: "The Adam optimizer is used to train whole networks ... exponential decay with the rate and step
    # size as 0.7 and 950" (Sec. 3.4)
    num_steps: int = 9_500  # not printed: ten decay periods (docstring, choice 13)
    segmenter_optimizer: Literal["adam", "sgd"] = "adam"  # "sgd": the recipe's SGD, the synthetic tasks' footing
    adam_beta1: float = 0.9  # not printed: Adam's defaults
    adam_beta2: float = 0.999
    lr_schedule: Literal["exponential", "poly"] = "exponential"  # "poly": the recipe's, with segmenter_optimizer=sgd
    lr_decay_rate: float = 0.7  # Sec. 3.4
    lr_decay_steps: int = 950  # Sec. 3.4
    lr_decay_staircase: bool = True  # "step size": lr · 0.7^⌊t/950⌋; False: lr · 0.7^(t/950) (docstring, choice 13)
    discriminator_learning_rate: float = 1e-4  # D's optimiser is not printed: the same Adam (docstring, choice 10)
    source_warmup_steps: int = 0  # steps on the source terms alone before adaptation (docstring, choice 8)
    # Ablation switches: every row of Tables 2-4 is a run of this method (docstring, "Ablations")
    classification_head: bool = True  # S1, L_C and the refinement; False on street scenes (Sec. 4.3)
    adversarial: bool = True  # AL: D and η·L_D
    pseudo_labels: bool = True  # PL: Alg. 1, Eq. 5, Alg. 2 and the target term of L_S
    semantic_transfer: bool = True  # SRT: Alg. 3, µ·L_SRT
    class_balance: bool = True  # False: Ours-woCB, one λ for every class (Table 2)
    superpixels: bool = True  # False: Ours-woSP, no Alg. 2 vote (Tables 2-4)
    # Open choices (docstring, "Choices the paper leaves open")
    refinement: Literal["image", "pixel"] = "image"  # choice 2
    superpixel_vote: Literal["simultaneous", "raster"] = "simultaneous"  # choice 5
    superpixel_vote_threshold: int = 4  # Alg. 2 line 13: "if C_hw[N_k] > 4"
    superpixel_size: int = 16  # not printed: SLIC region side in pixels (choice 6)
    superpixel_compactness: float = 10.0  # not printed: SLIC's m for CIELAB (choice 6)
    superpixel_scale: float = 1.0  # SLIC on the image resized by this factor, for speed (choice 6)
    superpixel_source: Literal["step", "store"] = "step"  # per step on the batch, or cached per image (choice 6)
    centroid_features: Literal["s2", "encoder"] = "s2"  # choice 3
    centroid_normalisation: Literal["class", "image"] = "class"  # choice 4
    centroid_history: Literal["sum", "mean"] = "sum"  # choice 4
    srt_reduction: Literal["sum", "mean"] = "sum"  # choice 4
    target_loss_normalisation: Literal["pixels", "selected"] = "pixels"  # choice 9
    loss_reduction: Literal["pixel_sum", "mean"] = "pixel_sum"  # Eq. 3 sums over pixels (choice 4: the µ finding)
    pseudo_label_forward: Literal["train", "eval"] = "train"  # which forward Eq. 5 thresholds (choice 14)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("mu", "eta", "alpha", "discriminator_learning_rate"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        require(self.discriminator_learning_rate > 0, "discriminator_learning_rate must be > 0")
        require(0 <= self.gamma < 1, f"gamma must be in [0, 1) (got {self.gamma})")
        require(0 < self.portion_start <= 1, f"portion_start must be in (0, 1] (got {self.portion_start})")
        require(0 <= self.portion_step <= 1, f"portion_step must be in [0, 1] (got {self.portion_step})")
        require(
            self.portion_start <= self.portion_max <= 1,
            f"portion_max must be in [portion_start, 1] (got {self.portion_max})",
        )
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (got {getattr(self, name)})")
        require(0 < self.lr_decay_rate <= 1, f"lr_decay_rate must be in (0, 1] (got {self.lr_decay_rate})")
        require(self.lr_decay_steps >= 1, f"lr_decay_steps must be >= 1 (got {self.lr_decay_steps})")
        require(self.num_steps >= 1, f"num_steps must be >= 1 (got {self.num_steps})")
        require(
            0 <= self.source_warmup_steps < self.num_steps,
            f"source_warmup_steps must be in [0, num_steps) (got {self.source_warmup_steps})",
        )
        require(
            0 <= self.superpixel_vote_threshold < 8,
            f"superpixel_vote_threshold must be in [0, 8) (got {self.superpixel_vote_threshold})",
        )
        require(self.superpixel_size >= 1, f"superpixel_size must be >= 1 (got {self.superpixel_size})")
        require(self.superpixel_compactness > 0, "superpixel_compactness must be > 0")
        require(0 < self.superpixel_scale <= 1, f"superpixel_scale must be in (0, 1] (got {self.superpixel_scale})")
        for name, valid in (
            ("portion_every", (TARGET, SOURCE)),
            ("segmenter_optimizer", ("adam", "sgd")),
            ("lr_schedule", ("exponential", "poly")),
            ("refinement", ("image", "pixel")),
            ("superpixel_vote", ("simultaneous", "raster")),
            ("superpixel_source", ("step", "store")),
            ("centroid_features", ("s2", "encoder")),
            ("centroid_normalisation", ("class", "image")),
            ("centroid_history", ("sum", "mean")),
            ("srt_reduction", ("sum", "mean")),
            ("target_loss_normalisation", ("pixels", "selected")),
            ("loss_reduction", ("pixel_sum", "mean")),
            ("pseudo_label_forward", ("train", "eval")),
        ):
            require(
                getattr(self, name) in valid, f"{name} must be one of {', '.join(valid)} (got {getattr(self, name)!r})"
            )

    @property
    def uses_target(self) -> bool:
        """Whether the adaptation stage reads target images at all (Table 3/4's BL does not)."""
        return self.classification_head or self.adversarial or self.pseudo_labels or self.semantic_transfer


# ---------------------------------------------------------------------------------------------------- modules


class Refiner(nn.Module):
    """The "dashed arrows" of Fig. 2: "the prediction of subnet S2 is refined by classification probability via
    convolution operation" (Sec. 3.1). A 1x1 convolution over [S2's logits (B, K, h, w) ‖ S1's probabilities
    (B, 2, h, w)] to K refined logits, initialised to pass S2's logits through unchanged (choice 2)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(num_classes + IMAGE_CLASSES, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :num_classes, 0, 0] = torch.eye(num_classes)
            self.conv.bias.zero_()

    def forward(self, logits: Tensor, probabilities: Tensor) -> Tensor:
        """logits (B, K, h, w); probabilities (B, 2) for the whole image or (B, 2, h', w') per pixel."""
        if probabilities.dim() == 2:
            probabilities = probabilities[:, :, None, None].expand(-1, -1, *logits.shape[-2:])
        elif probabilities.shape[-2:] != logits.shape[-2:]:
            probabilities = F.interpolate(probabilities, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([logits, probabilities], dim=1))


# ---------------------------------------------------------------------------------------------------- pure rules


def portion(epoch: int, start: float, step: float, maximum: float) -> float:
    """p of Alg. 1 after `epoch` completed epochs: start + step · epoch, at most `maximum` (Sec. 3.2)."""
    return min(start + step * epoch, maximum)


def stable_log_probabilities(logits: Tensor, dim: int = 1) -> Tensor:
    """log softmax that keeps the confidence of saturated pixels (choice 1).

    log p_k = (l_k − l_max) − log1p(Σ_{j≠argmax} exp(l_j − l_max)). The largest class's value is −log1p(s) with s
    the sum of the other classes' exp-ratios: exact in float32 while exp does not underflow (margins up to about
    87-103 nats), where `log_softmax`, which forms log(1 + s), returns exactly 0 for every margin above ~17 nats and
    a softmax returns exactly 1.0, so that every pixel of a confident class would tie at the threshold."""
    top, index = logits.max(dim, keepdim=True)
    ratios = torch.exp(logits - top).scatter(dim, index, 0.0)
    return (logits - top) - torch.log1p(ratios.sum(dim, keepdim=True))


def class_balance_lambdas(
    negative_log_confidence: Tensor, prediction: Tensor, num_classes: int, portion_p: float, class_balance: bool = True
) -> Tensor:
    """Alg. 1 (λ_k of Eq. 4) over all target pixels: negative_log_confidence (N,) = −log max_k S2_k and prediction
    (N,) = argmax_k S2_k. Lines 11-13 with the 1-based index T_k = ⌈(1−p)·n_k⌉ of the ascending sort: λ_k is the
    ⌊p·n_k⌋-th (0-based) smallest −log p of the pixels predicted as k, so that Eq. 5's strict "> e^{−λ_k}" keeps
    exactly ⌊p·n_k⌋ of them (ties aside). A class no pixel is predicted as gets λ_k = 0, which selects nothing.
    `class_balance=False` (Ours-woCB): one λ from all pixels pooled, Eq. 3's "global weight". Returns (K,) float32."""
    values = negative_log_confidence.float()

    def quantile(v: Tensor) -> Tensor:
        if v.numel() == 0:
            return torch.zeros((), dtype=torch.float32)
        # ⌊p·n⌋ without float error: 0.35 · 180 is 62.999... in floating point (one rank short of the printed p)
        k = min(math.floor(portion_p * v.numel() + 1e-9), v.numel() - 1)
        return v.kthvalue(k + 1).values

    if not class_balance:
        return quantile(values).expand(num_classes).clone()
    return torch.stack([quantile(values[prediction == k]) for k in range(num_classes)])


def class_balanced_pseudo_labels(log_probabilities: Tensor, lambdas: Tensor, unlabelled: int = 255) -> Tensor:
    """Eq. 5 with the sign of λ_k read as −λ_k‖ŷ‖₁ (choice 1 of "Readings"): per pixel, k* = argmax_k p_k / e^{−λ_k}
    = argmax_k (log p_k + λ_k), labelled k* iff p_{k*} > e^{−λ_{k*}}, i.e. log p_{k*} + λ_{k*} > 0; otherwise the zero
    label (`unlabelled`). log_probabilities (B, K, H, W), lambdas (K,) → labels (B, H, W) int64."""
    scores = log_probabilities + lambdas.to(log_probabilities).view(1, -1, 1, 1)
    best, label = scores.max(1)
    return torch.where(best > 0, label, torch.full_like(label, unlabelled))


def superpixels(images: Tensor, size: int, compactness: float = 10.0, scale: float = 1.0) -> Tensor:
    """Alg. 2 line 4, "super-pixel segmentation priors S_j^t of x_j^t": SLIC [1] (scikit-image) per image.
    images (B, C, H, W) in [0, 1] → segment ids (B, H, W) int64, on the images' device. About H·W / size² segments
    (CIELAB, `compactness`, 10 iterations, no smoothing, connected segments); with `scale` < 1 SLIC runs on the image
    resized by `scale` (same segment count) and its map is resized back (nearest)."""
    batch, channels, height, width = images.shape
    small = images
    if scale < 1:
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        small = F.interpolate(images.float(), size=shape, mode="bilinear", align_corners=False, antialias=True)
    from skimage.segmentation import slic  # here, not at import: scikit-image costs every process 0.4 s to import

    segments = max(1, round(height * width / size**2))
    arrays = small.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy().astype(np.float64)
    maps = []
    for array in arrays:
        rgb = channels == 3
        maps.append(
            slic(
                array if rgb else array[..., 0],
                n_segments=segments,
                compactness=compactness,
                max_num_iter=10,
                sigma=0,
                start_label=0,
                channel_axis=-1 if rgb else None,
                convert2lab=rgb,
                enforce_connectivity=True,
            )
        )
    out = torch.from_numpy(np.stack(maps).astype(np.int64))
    if out.shape[-2:] != (height, width):
        out = F.interpolate(out[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
    return out.to(images.device)


NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def superpixel_vote(
    labels: Tensor,
    segments: Tensor,
    num_classes: int,
    unlabelled: int = 255,
    threshold: int = 4,
    mode: Literal["simultaneous", "raster"] = "simultaneous",
) -> Tensor:
    """Alg. 2 lines 5-17: an unlabelled pixel takes class N_k when more than `threshold` of its 8 neighbours carry
    pseudo label N_k and lie in its superpixel (line 9's 3x3 window; the centre is unlabelled, so it never counts).
    Labelled pixels never change; neighbours outside the image, or with a negative segment id (no superpixel),
    never count. "simultaneous" (default, choice 5): every vote reads the Eq. 5 labels; "raster": line 14 writes into
    the labels line 9 reads, in raster order (h, then w), as the loop is printed.
    labels (B, H, W) int64, segments (B, H, W) int64 → labels (B, H, W)."""
    if mode == "raster":
        return _raster_vote(labels, segments, num_classes, unlabelled, threshold)
    height, width = labels.shape[-2:]
    padded_labels = F.pad(labels, (1, 1, 1, 1), value=unlabelled)
    padded_segments = F.pad(segments, (1, 1, 1, 1), value=-1)
    counts = labels.new_zeros((labels.shape[0], num_classes, height, width))
    for dy, dx in NEIGHBOURS:
        neighbour = padded_labels[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        same = (padded_segments[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == segments) & (segments >= 0)
        votes = F.one_hot(torch.where(neighbour == unlabelled, num_classes, neighbour), num_classes + 1)
        counts += votes[..., :num_classes].permute(0, 3, 1, 2) * same[:, None]
    best, winner = counts.max(1)
    return torch.where((labels == unlabelled) & (best > threshold), winner, labels)


def _raster_vote(labels: Tensor, segments: Tensor, num_classes: int, unlabelled: int, threshold: int) -> Tensor:
    out = labels.detach().cpu().numpy().copy()
    seg = segments.detach().cpu().numpy()
    _, height, width = out.shape
    for b, h, w in zip(*np.nonzero(out == unlabelled)):  # raster order: np.nonzero is row-major
        if out[b, h, w] != unlabelled or seg[b, h, w] < 0:
            continue
        counts = np.zeros(num_classes, dtype=np.int64)
        for dy, dx in NEIGHBOURS:
            y, x = h + dy, w + dx
            if 0 <= y < height and 0 <= x < width and seg[b, y, x] == seg[b, h, w] and out[b, y, x] != unlabelled:
                counts[out[b, y, x]] += 1
        if counts.max() > threshold:
            out[b, h, w] = int(counts.argmax())
    return torch.from_numpy(out).to(labels.device)


def valid_pixels(augmentation: Augmentation | None, shape: tuple[int, int], device: torch.device) -> Tensor | None:
    """Which pixels of an augmented crop (B, H, W) lie inside the resized image (the rest is the platform's padding,
    which is no image to pseudo-label); None when the batch carries no augmentation record."""
    if augmentation is None:
        return None
    height, width = shape
    size, crop = augmentation.size.to(device), augmentation.crop.to(device)
    rows = torch.arange(height, device=device)[None, :, None] < (size[:, 0] - crop[:, 0])[:, None, None]
    cols = torch.arange(width, device=device)[None, None, :] < (size[:, 1] - crop[:, 1])[:, None, None]
    cols = torch.where(augmentation.flip.to(device)[:, None, None], cols.flip(-1), cols)
    return rows & cols


def class_feature_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Alg. 3 lines 7-8 before the division: Σ_pixels F · 1[label = k] over the batch (K, F), the pixel count of each
    class (K,) and the number of pixels (a scalar tensor). features (B, F, h, w); labels (B, h, w) with any value
    outside 0..K−1 (ignore, unlabelled) counting for no class."""
    inside = (labels >= 0) & (labels < num_classes)
    one_hot = F.one_hot(torch.where(inside, labels, num_classes), num_classes + 1)[..., :num_classes]
    one_hot = one_hot.permute(0, 3, 1, 2).to(features)
    sums = torch.einsum("bkhw,bfhw->kf", one_hot, features)
    total = torch.tensor(float(labels.numel()), device=features.device)
    return sums, one_hot.sum((0, 2, 3)), total


def batch_centroids(sums: Tensor, counts: Tensor, total: Tensor, normalisation: str) -> Tensor:
    """Alg. 3 lines 7-8: "class" divides each class's sum by its pixel count (a centroid, choice 4); "image" by the
    number of pixels, 1/|x| as printed. A class without pixels gets 0 either way. (K, F)."""
    if normalisation == "image":
        return sums / total
    return sums / counts.clamp_min(1e-12).unsqueeze(1)


def update_centroid_history(
    history: Tensor, weight: Tensor, current: Tensor, present: Tensor, gamma: float, mode: str
) -> tuple[Tensor, Tensor]:
    """Alg. 3 lines 9-10, C_k = Σ_{x=1}^{n} C_k^{(x)} γ^{n−x}, recursively C_k ← γ·C_k + C_k^{(n)} ("sum", as
    printed; C_k^{(n)} = 0 for a class absent from the batch). "mean" divides by the accumulated weight of the steps
    where the class was present, W_k ← γ·W_k + 1[present] (choice 4). history (K, F) and weight (K,) are the previous
    step's (detached); current (K, F) carries the gradient; present (K,) bool. Returns (C (K, F), W (K,))."""
    presence = present.to(current)
    new_weight = gamma * weight + presence
    if mode == "sum":
        return gamma * history + presence[:, None] * current, new_weight
    numerator = gamma * weight[:, None] * history + presence[:, None] * current
    return torch.where(new_weight[:, None] > 0, numerator / new_weight.clamp_min(1e-12)[:, None], history), new_weight


def srt_loss(source: Tensor, target: Tensor, alpha: float, valid: Tensor, reduction: str = "sum") -> Tensor:
    """Eq. 7: Σ_k ‖C_k^s − C_k^t‖²₂ + α‖C_k^s − C_k^t‖₁ over the classes in `valid` (K,) bool; "mean" divides by
    (valid classes × channels) (choice 4). source, target (K, F) → scalar."""
    difference = (source - target)[valid]
    loss = difference.pow(2).sum() + alpha * difference.abs().sum()
    if reduction == "mean":
        loss = loss / max(1, difference.numel())
    return loss


def lesion_present(image_labels: Tensor) -> Tensor:
    """S1's target from image-level labels (B, K) (1 where class k is present): 1 if any class other than class 0
    ("normal") is present. (B,) int64."""
    return (image_labels[:, 1:] > 0).any(1).long()


def lesion_present_in_pixels(labels: Tensor, num_classes: int) -> Tensor:
    """S1's target from pixel labels (B, H, W): 1 if any pixel carries a class other than 0 (ignored pixels do not
    count). (B,) int64."""
    return ((labels > 0) & (labels < num_classes)).flatten(1).any(1).long()


def target_segmentation_loss(logits: Tensor, labels: Tensor, unlabelled: int, normalisation: str) -> Tensor:
    """Eq. 3's target term with Eq. 5's labels: −Σ_b ŷ_b^T log S2(x)_b over the pseudo-labelled pixels, divided by
    all pixels ("pixels", the source term's |x|) or by the labelled ones ("selected") (choice 9). logits
    (B, K, h, w) are upsampled to the labels' size (B, H, W) first. 0 (with a gradient path) when nothing is labelled."""
    logits = upsample(logits, tuple(labels.shape[-2:]))
    total = F.cross_entropy(logits, labels, ignore_index=unlabelled, reduction="sum")
    labelled = (labels != unlabelled).sum()
    if normalisation == "selected":
        return total / labelled.clamp_min(1)
    return total / labels.numel()


def adversarial_loss(d_target: Tensor) -> Tensor:
    """The segmenter's side of Eq. 6 (S2 "is trained to fool D"): D should take target outputs for source ones."""
    return domain_bce(d_target, SOURCE_LABEL)


def discriminator_loss(d_source: Tensor, d_target: Tensor) -> Tensor:
    """D's side of Eq. 6 (maximise log D(S2(x_t)) + log(1 − D(S2(x_s)))): ½[BCE(D(P_s), 0) + BCE(D(P_t), 1)]."""
    return 0.5 * (domain_bce(d_source, SOURCE_LABEL) + domain_bce(d_target, TARGET_LABEL))


def output_map(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """D's input: the softmax of (refined) S2 logits upsampled to the image size (B, K, H, W)."""
    return F.softmax(upsample(logits, size), dim=1)


# ---------------------------------------------------------------------------------------------------- build


def build(hp: Hyperparams, info: TaskInfo) -> nn.ModuleDict:
    require(info.num_classes >= 2, f"slrt needs at least 2 classes (got {info.num_classes})")
    if hp.classification_head:
        require(
            info.target_image_labels,
            "classification_head=True trains S1 on target image-level labels, which this task does not have "
            "(TaskInfo.target_image_labels=False); set classification_head=False, as the paper does on street "
            "scenes (Sec. 4.3)",
        )
    segmenter = recipe_segmenter(hp, info)
    modules = nn.ModuleDict({"segmenter": segmenter})
    if hp.classification_head:
        modules["classifier"] = ImageClassifier(segmenter.feature_channels, IMAGE_CLASSES)
        modules["refine"] = Refiner(info.num_classes)
    if hp.adversarial:
        modules["discriminator"] = slrt_discriminator(info.num_classes)
    return modules


def _network_modules(hp: Hyperparams) -> tuple[str, ...]:
    return ("segmenter",) + (("classifier", "refine") if hp.classification_head else ())


def _schedule(
    hp: Hyperparams, optimizer: torch.optim.Optimizer, num_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if hp.lr_schedule == "poly":
        return poly_schedule(optimizer, num_steps, hp.poly_power)
    if hp.lr_decay_staircase:
        return exponential_decay(optimizer, hp.lr_decay_rate, hp.lr_decay_steps)
    rate, every = hp.lr_decay_rate, hp.lr_decay_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate ** (step / every))


def network_optimizer(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> Optim:
    """ "The Adam optimizer is used to train whole networks" (Sec. 3.4): one Adam over E, S2, S1 and the refinement,
    one learning rate. With segmenter_optimizer="sgd" (the synthetic tasks' footing): the recipe's SGD with S2, S1
    and the refinement as the head group at head_lr_multiplier × the learning rate."""
    segmenter: Segmenter = modules["segmenter"]
    heads = [p for name in _network_modules(hp)[1:] for p in modules[name].parameters()]
    if hp.segmenter_optimizer == "adam":
        params = list(segmenter.parameters()) + heads
        optimizer = torch.optim.Adam(params, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2))
    else:
        optimizer = torch.optim.SGD(
            [
                {"params": list(segmenter.backbone_parameters()), "lr": hp.learning_rate},
                {"params": list(segmenter.head_parameters()) + heads, "lr": hp.learning_rate * hp.head_lr_multiplier},
            ],
            lr=hp.learning_rate,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )
    return Optim(optimizer, _schedule(hp, optimizer, num_steps))


def optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    out = {"network": network_optimizer(hp, modules, num_steps)}
    if hp.adversarial:
        adam = torch.optim.Adam(
            modules["discriminator"].parameters(),
            lr=hp.discriminator_learning_rate,
            betas=(hp.adam_beta1, hp.adam_beta2),
        )
        out["discriminator"] = Optim(adam, _schedule(hp, adam, num_steps))
    return out


def warmup_optimizers(hp: Hyperparams, modules: nn.ModuleDict, num_steps: int) -> dict[str, Optim]:
    return {"network": network_optimizer(hp, modules, num_steps)}


# ---------------------------------------------------------------------------------------------------- forward


class Output(NamedTuple):
    """One forward pass: E's features, S2's pixel features (Alg. 3 line 5), the (refined) S2 logits and S1's."""

    features: Features
    embedding: Tensor
    logits: Tensor
    image_logits: Tensor | None


def s2(segmenter: Segmenter, features: Features) -> tuple[Tensor, Tensor]:
    """S2's pixel features and logits. DeepLab-v3: the ASPP projection (256 channels) and its 1x1 classifier; a head
    without an embedding (the tiny network's 1x1 classifier): E's features."""
    head = segmenter.classifier
    if hasattr(head, "embed"):
        embedding = head.embed(features)
        return embedding, head.classifier(embedding)
    return features.main, segmenter.classify(features)


def forward(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor) -> Output:
    """E → S1 and S2 → refinement (Sec. 3.4 "Testing"), images ImageNet-normalised (B, C, H, W)."""
    features = modules["segmenter"].encode(images)
    embedding, logits = s2(modules["segmenter"], features)
    image_logits = None
    if hp.classification_head:
        classifier: ImageClassifier = modules["classifier"]
        image_logits = classifier(features)
        if hp.refinement == "image":
            probabilities = F.softmax(image_logits, dim=1)
        else:  # S1's 1x1 convolution before its pooling: a classification probability per pixel (choice 2)
            probabilities = F.softmax(classifier.fc(features.main), dim=1)
        logits = modules["refine"](logits, probabilities)
    return Output(features, embedding, logits, image_logits)


def centroid_features(hp: Hyperparams, output: Output) -> Tensor:
    return output.embedding if hp.centroid_features == "s2" else output.features.main


# ---------------------------------------------------------------------------------------------------- pseudo labels


def pseudo_label_targets(ctx: StepContext, batch: Batch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5 with the thresholds of the latest Alg. 1 pass, then Alg. 2's superpixel vote, on the step's target batch
    at image size (Alg. 3 line 4; Sec. 3.4 "ultimate pseudo pixel labels ŷ are generated via Algorithm 2" in each
    training step). logits (B, K, h, w) detached → labels (B, H, W) with `ignore_index` for the zero label."""
    hp, info = ctx.hp, ctx.info
    unlabelled, size = info.ignore_index, tuple(batch.target_image.shape[-2:])
    with torch.no_grad():
        log_probabilities = stable_log_probabilities(upsample(_full_precision(logits.detach()), size))
        labels = class_balanced_pseudo_labels(log_probabilities, ctx.state["lambdas"], unlabelled)
        valid = valid_pixels(batch.target_augmentation, size, labels.device)
        if valid is not None:
            labels = torch.where(valid, labels, torch.full_like(labels, unlabelled))
        metrics = {"pseudo_label_fraction_eq5": (labels != unlabelled).float().mean()}
        if hp.superpixels:
            segments, seconds, cached = _target_superpixels(hp, batch)
            if valid is not None:
                segments = torch.where(valid, segments, torch.full_like(segments, -1))
            labels = superpixel_vote(
                labels, segments, info.num_classes, unlabelled, hp.superpixel_vote_threshold, hp.superpixel_vote
            )
            metrics["superpixel_seconds"] = torch.tensor(seconds)
            metrics["superpixels_cached"] = torch.tensor(float(cached))
        metrics["pseudo_label_fraction"] = (labels != unlabelled).float().mean()
        for k, name in enumerate(info.class_names):
            metrics[f"pseudo_label_fraction/{name}"] = (labels == k).float().mean()
    return labels, metrics


def _full_precision(tensor: Tensor) -> Tensor:
    """float32 at least (a half-precision softmax saturates at margins of about 8 nats)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _target_superpixels(hp: Hyperparams, batch: Batch) -> tuple[Tensor, float, bool]:
    """The step's superpixel maps: from the per-sample store (choice 6) where the stage's pass put them, else SLIC
    on the step's own target images. Returns (segments (B, H, W) int64, seconds spent on SLIC here, cached)."""
    stored = batch.target_extras.get("superpixels") if hp.superpixel_source == "store" else None
    if stored is not None:
        return stored.long(), 0.0, True
    started = time.perf_counter()
    segments = superpixels(batch.target_image, hp.superpixel_size, hp.superpixel_compactness, hp.superpixel_scale)
    return segments, time.perf_counter() - started, False


# ---------------------------------------------------------------------------------------------------- SRT


def _reduced_sum(ctx: StepContext, local: Tensor) -> Tensor:
    """A per-worker sum whose value is the mean over workers (ctx.all_reduce_mean) and whose gradient flows into
    this worker's own term: after the platform averages gradients over workers, the gradient is that of the
    whole global batch's statistic (identity on one worker)."""
    return ctx.all_reduce_mean(local.detach()) + (local - local.detach())


def _domain_centroids(
    ctx: StepContext, domain: str, features: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Alg. 3 lines 7-10 for one domain: this step's centroids over the global batch, merged into the history kept
    in ctx.state (detached: earlier terms are constants). features (B, F, h, w); labels at image size (B, H, W).
    Returns (C (K, F) with the gradient of the current term, valid (K,) bool, metrics)."""
    hp, info = ctx.hp, ctx.info
    labels = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()
    sums, counts, total = class_feature_sums(features, labels, info.num_classes)
    sums, counts, total = _reduced_sum(ctx, sums), ctx.all_reduce_mean(counts), ctx.all_reduce_mean(total)
    present = counts > 0
    current = batch_centroids(sums, counts, total, hp.centroid_normalisation)
    key = f"centroids_{domain}"
    history = ctx.state.get(key)
    if history is None:
        history = torch.zeros_like(current.detach())
        weight = torch.zeros(info.num_classes, device=current.device, dtype=current.dtype)
    else:
        history, weight = history.to(current), ctx.state[f"centroid_weights_{domain}"].to(current)
    centroids, weight = update_centroid_history(history, weight, current, present, hp.gamma, hp.centroid_history)
    ctx.state[key], ctx.state[f"centroid_weights_{domain}"] = centroids.detach(), weight.detach()
    valid = weight > 0 if hp.centroid_history == "mean" else torch.ones_like(present)
    norm = features.detach().norm(dim=1).mean()
    return centroids, valid, {f"feature_norm_{domain}": norm}


def semantic_transfer_loss(
    ctx: StepContext, features_s: Tensor, labels_s: Tensor, features_t: Tensor, labels_t: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Alg. 3 + Eq. 7: L_SRT between the source centroids (ground truth) and the target ones (pseudo labels)."""
    hp = ctx.hp
    source, valid_s, metrics = _domain_centroids(ctx, SOURCE, features_s, labels_s)
    target, valid_t, metrics_t = _domain_centroids(ctx, TARGET, features_t, labels_t)
    valid = valid_s & valid_t
    loss = srt_loss(source, target, hp.alpha, valid, hp.srt_reduction)
    distance = (source - target).detach().norm(dim=1)[valid]
    metrics.update(metrics_t)
    metrics["centroid_distance"] = distance.mean() if distance.numel() else torch.zeros(())
    return loss, metrics


# ---------------------------------------------------------------------------------------------------- train step


def source_image_targets(ctx: StepContext, batch: Batch) -> Tensor:
    """y^sc of Eq. 2: the source images' image-level labels where the task has them (Batch.source_image_label),
    else read off the pixel labels of the crop the step sees (choice 11)."""
    if batch.source_image_label is not None:
        return lesion_present(batch.source_image_label)
    return lesion_present_in_pixels(batch.source_label, ctx.info.num_classes)


def target_image_targets(batch: Batch) -> Tensor:
    """y^tc of Eq. 2: the target images' image-level labels, the only target annotation (Sec. 3.1)."""
    if batch.target_image_label is None:
        raise ValueError("slrt's classification head needs Batch.target_image_label (the task's image-level labels)")
    return lesion_present(batch.target_image_label)


def image_term_weight(hp: Hyperparams, images: Tensor) -> float:
    """The weight of Eq. 1's per-image terms (L_C, η·L_D, µ·L_SRT) next to L_S taken as a mean over pixels.
    "pixel_sum": 1/|x| for images (B, C, H, W), |x| = H·W: Eq. 3 sums the cross-entropy over the |x| pixels of an
    image, so with L_S as a mean the printed objective is divided by |x| throughout (the same minimiser; Adam's
    step does not change with a constant factor of the loss). "mean": 1, the weights against a per-pixel mean."""
    return 1.0 / (images.shape[-2] * images.shape[-1]) if hp.loss_reduction == "pixel_sum" else 1.0


def train_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """One iteration (Sec. 3.4, Alg. 3): Eq. 1 minimised over E, S1, S2 and the refinement by one Adam step, then
    D's step on Eq. 6 with the detached outputs."""
    hp, info, modules = ctx.hp, ctx.info, ctx.modules
    metrics: dict[str, Tensor] = {}
    source_size = tuple(batch.source_image.shape[-2:])
    per_image = image_term_weight(hp, batch.source_image)

    # Alg. 3 line 3 / Sec. 3.4: forward the source images with their image and pixel labels.
    out_s = forward(hp, modules, imagenet_normalise(batch.source_image))
    loss_seg_source = segmentation_loss(out_s.logits, batch.source_label, info.ignore_index)  # Eq. 3, source term
    total = loss_seg_source
    metrics["loss_seg_source"] = loss_seg_source.detach()
    if hp.classification_head:  # Eq. 2, source term
        loss_cls_source = F.cross_entropy(out_s.image_logits, source_image_targets(ctx, batch))
        total = total + per_image * loss_cls_source
        metrics["loss_cls_source"] = loss_cls_source.detach()
    if not hp.uses_target:  # BL without the classification head (Tables 3-4): source only
        _descend(ctx, "network", total)
        metrics["loss_total"] = total.detach()
        return metrics

    # Sec. 3.4: the target softmax output S2(x_t) for the image with only its image-level label.
    target_size = tuple(batch.target_image.shape[-2:])
    out_t = forward(hp, modules, imagenet_normalise(batch.target_image))
    if hp.classification_head:  # Eq. 2, target term
        y_tc = target_image_targets(batch)
        loss_cls_target = F.cross_entropy(out_t.image_logits, y_tc)
        total = total + per_image * loss_cls_target
        metrics["loss_cls_target"] = loss_cls_target.detach()
        metrics["cls_accuracy_target"] = (out_t.image_logits.detach().argmax(1) == y_tc).float().mean()

    # Alg. 3 line 4 / Alg. 2: the ultimate pseudo pixel labels of the target batch; Eq. 3's target term.
    labels_t = None
    labelling_logits = out_t.logits if hp.pseudo_label_forward == "train" else _eval_logits(hp, modules, batch)
    if hp.pseudo_labels:
        labels_t, pl_metrics = pseudo_label_targets(ctx, batch, labelling_logits)
        metrics.update(pl_metrics)
        loss_seg_target = target_segmentation_loss(
            out_t.logits, labels_t, info.ignore_index, hp.target_loss_normalisation
        )
        total = total + loss_seg_target
        metrics["loss_seg_target"] = loss_seg_target.detach()
        metrics["portion"] = torch.tensor(float(ctx.state["portion"]))
        if "pass_cls_accuracy_target" in ctx.state:  # S1 on the whole target set at the latest pass
            metrics["pass_cls_accuracy_target"] = torch.tensor(float(ctx.state["pass_cls_accuracy_target"]))
        for k, name in enumerate(info.class_names):
            metrics[f"lambda/{name}"] = ctx.state["lambdas"][k].detach().float()

    # Eq. 6, the segmenter's side: η · L_D through the target outputs.
    if hp.adversarial:
        loss_adv = adversarial_loss(modules["discriminator"](output_map(out_t.logits, target_size)))
        total = total + per_image * hp.eta * loss_adv
        metrics["loss_adv_target"] = loss_adv.detach()

    # Alg. 3 lines 5-10, Eq. 7: µ · L_SRT over S2's pixel features.
    if hp.semantic_transfer:
        if labels_t is None:  # BL+AL+SRT (= Ours-woPL): S2's own argmax on every target pixel (choice 3)
            labels_t = upsample(labelling_logits.detach(), target_size).argmax(1)
            valid = valid_pixels(batch.target_augmentation, target_size, labels_t.device)
            if valid is not None:  # the platform's padding is no target pixel
                labels_t = torch.where(valid, labels_t, torch.full_like(labels_t, info.ignore_index))
        loss_srt, srt_metrics = semantic_transfer_loss(
            ctx, centroid_features(hp, out_s), batch.source_label, centroid_features(hp, out_t), labels_t
        )
        total = total + per_image * hp.mu * loss_srt
        metrics["loss_srt"] = loss_srt.detach()
        metrics.update(srt_metrics)

    # Eq. 1 over the whole network excluding D (Sec. 3.1).
    _descend(ctx, "network", total)
    metrics["loss_total"] = total.detach()

    # Eq. 6, D's side, on the detached softmax outputs of both domains.
    if hp.adversarial:
        discriminator = modules["discriminator"]
        loss_d = discriminator_loss(
            discriminator(output_map(out_s.logits.detach(), source_size)),
            discriminator(output_map(out_t.logits.detach(), target_size)),
        )
        _descend(ctx, "discriminator", loss_d)
        metrics["loss_d"] = loss_d.detach()
    return metrics


@torch.no_grad()
def _eval_logits(hp: Hyperparams, modules: nn.ModuleDict, batch: Batch) -> Tensor:
    """The target batch's logits in eval mode (batch-norm running statistics), the forward Alg. 1's pass saw
    (choice 14); every module's mode is restored afterwards."""
    modes = {name: module.training for name, module in modules.items()}
    modules.eval()
    try:
        return forward(hp, modules, imagenet_normalise(batch.target_image)).logits
    finally:
        for name, module in modules.items():
            module.train(modes[name])


def _descend(ctx: StepContext, name: str, loss: Tensor) -> None:
    optimizer = ctx.optimizers[name]
    optimizer.zero_grad(set_to_none=True)
    ctx.backward(loss)
    ctx.step(name)


def warmup_step(ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
    """Choice 8: the source terms of Eq. 1 alone (L_S and L_C on source), before the target is used."""
    hp, info, modules = ctx.hp, ctx.info, ctx.modules
    out_s = forward(hp, modules, imagenet_normalise(batch.source_image))
    loss = segmentation_loss(out_s.logits, batch.source_label, info.ignore_index)
    metrics = {"loss_seg_source": loss.detach()}
    if hp.classification_head:
        loss_cls = F.cross_entropy(out_s.image_logits, source_image_targets(ctx, batch))
        loss = loss + image_term_weight(hp, batch.source_image) * loss_cls
        metrics["loss_cls_source"] = loss_cls.detach()
    _descend(ctx, "network", loss)
    return metrics


# ---------------------------------------------------------------------------------------------------- Alg. 1 pass


def collect(ctx: StepContext, images: Tensor, image_labels: Tensor | None) -> dict[str, Tensor]:
    """Alg. 1 lines 1-9 for one batch of target training images (eval mode, no gradients): −log max_k S2 and
    argmax_k S2 per output pixel (choice 1); S1's image-level accuracy; with superpixel_source="store", the images'
    superpixel maps for the per-sample store (choice 6)."""
    hp = ctx.hp
    output = forward(hp, ctx.modules, imagenet_normalise(images))
    log_probabilities = stable_log_probabilities(_full_precision(output.logits))
    top, prediction = log_probabilities.max(1)
    out = {"negative_log_confidence": (-top).flatten(), "prediction": prediction.flatten().to(torch.int16)}
    if output.image_logits is not None and image_labels is not None:
        out["image_correct"] = (output.image_logits.argmax(1) == lesion_present(image_labels)).float()
    if hp.superpixels and hp.superpixel_source == "store":
        segments = superpixels(images, hp.superpixel_size, hp.superpixel_compactness, hp.superpixel_scale)
        if int(segments.max()) > MAX_SUPERPIXEL_ID:
            raise ValueError(
                f"{int(segments.max()) + 1} superpixels per image do not fit the store's int16 maps: raise "
                f"superpixel_size (got {hp.superpixel_size})"
            )
        out["superpixels"] = segments
    return out


def update(ctx: StepContext, gathered: Mapping[str, Tensor]) -> dict[str, Any]:
    """Alg. 1 lines 10-14 over the whole target training set, with p for the epochs completed so far."""
    hp = ctx.hp
    epoch = ctx.target_epoch if hp.portion_every == TARGET else ctx.source_epoch
    p = portion(epoch, hp.portion_start, hp.portion_step, hp.portion_max)
    lambdas = class_balance_lambdas(
        gathered["negative_log_confidence"].cpu(),
        gathered["prediction"].long().cpu(),
        ctx.info.num_classes,
        p,
        hp.class_balance,
    )
    out: dict[str, Any] = {"lambdas": lambdas, "portion": p}
    if "image_correct" in gathered:
        out["pass_cls_accuracy_target"] = float(gathered["image_correct"].float().mean())
    return out


def target_pass(hp: Hyperparams) -> TargetPass | None:
    if not hp.pseudo_labels:
        return None
    store = {}
    if hp.superpixels and hp.superpixel_source == "store":
        store = {"superpixels": SampleMap(dtype=torch.int16, interpolation="nearest", fill=-1)}
    return TargetPass("every_epoch", collect, update, store=store, every=hp.portion_every)


def stages(hp: Hyperparams) -> tuple[Stage, ...]:
    adapt = Stage(
        name="adapt",
        trains=_network_modules(hp) + (("discriminator",) if hp.adversarial else ()),
        budget=steps(hp.num_steps - hp.source_warmup_steps),
        optimizers=optimizers,
        step=train_step,
        target_pass=target_pass(hp),
        uses_target=hp.uses_target,
    )
    if hp.source_warmup_steps == 0:
        return (adapt,)
    warmup = Stage(
        name="source_warmup",
        trains=_network_modules(hp),
        budget=steps(hp.source_warmup_steps),
        optimizers=warmup_optimizers,
        step=warmup_step,
        uses_target=False,
    )
    return warmup, adapt


# ---------------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict(hp: Hyperparams, modules: nn.ModuleDict, images: Tensor, stage: StagePosition) -> Tensor:
    """Sec. 3.4 "Testing": E, then S1 and S2 and the refinement; D and the pseudo-label machinery are not involved."""
    return upsample(forward(hp, modules, imagenet_normalise(images)).logits, tuple(images.shape[-2:]))


PALETTE = torch.tensor(
    [
        [0.1, 0.6, 0.1],
        [0.9, 0.1, 0.1],
        [0.1, 0.3, 0.9],
        [0.9, 0.8, 0.1],
        [0.6, 0.1, 0.8],
        [0.1, 0.8, 0.8],
        [0.9, 0.5, 0.1],
        [0.5, 0.5, 0.5],
    ]
)


def colourise(labels: Tensor, num_classes: int) -> Tensor:
    """Label maps (B, H, W) → RGB (B, 3, H, W) in [0, 1]; values outside 0..K−1 (the zero label) black."""
    palette = torch.cat([PALETTE.repeat(math.ceil(num_classes / len(PALETTE)), 1)[:num_classes], torch.zeros(1, 3)])
    index = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes).cpu()
    return palette[index].permute(0, 3, 1, 2)


@torch.no_grad()
def samples(hp: Hyperparams, modules: nn.ModuleDict, images: SampleImages, stage: StagePosition) -> dict[str, Tensor]:
    """Fig. 4's pseudo-label propagation on the first target validation images: the prediction, the Eq. 5 seeds,
    the labels after Alg. 2's vote and the superpixel boundaries. `samples` is not given the training state, so λ_k
    comes from Alg. 1 over these images themselves at p = portion_max (not the trial's current λ_k)."""
    target = images.target
    output = forward(hp, modules, imagenet_normalise(target))
    size = tuple(target.shape[-2:])
    num_classes = output.logits.shape[1]
    log_probabilities = stable_log_probabilities(upsample(output.logits.float(), size))
    top, prediction = log_probabilities.max(1)
    lambdas = class_balance_lambdas(
        (-top).flatten(), prediction.flatten(), num_classes, hp.portion_max, hp.class_balance
    )
    seeds = class_balanced_pseudo_labels(log_probabilities, lambdas, unlabelled=-1)
    segments = superpixels(target, hp.superpixel_size, hp.superpixel_compactness, hp.superpixel_scale)
    voted = superpixel_vote(seeds, segments, num_classes, -1, hp.superpixel_vote_threshold, hp.superpixel_vote)
    from skimage.segmentation import mark_boundaries

    boundaries = np.stack(
        [
            mark_boundaries(image.permute(1, 2, 0).cpu().numpy(), segment.cpu().numpy())
            for image, segment in zip(target.float().clamp(0, 1), segments)
        ]
    )
    return {
        "target_prediction": colourise(prediction, num_classes),
        "target_pseudo_labels_eq5": colourise(seeds, num_classes),
        "target_pseudo_labels_alg2": colourise(voted, num_classes),
        "target_superpixels": torch.from_numpy(boundaries).permute(0, 3, 1, 2).float(),
    }


METHOD = Method(
    name="slrt",
    paper="Dong et al., Semantic-Transferable Weakly-Supervised Endoscopic Lesions Segmentation, ICCV 2019 "
    "(../shared/papers/001_1bc4ba71fc4bf48c.txt)",
    hyperparams=Hyperparams,
    build=build,
    stages=stages,
    predict=predict,
    tasks=("synthetic-endoscopy", "synthetic-urban", "endoscopy", "gta5-cityscapes", "synthia-cityscapes"),
    samples=samples,
    imagenet_backbone=True,  # "ResNet-50 ... which is pre-trained with ImageNet" (Sec. 3.3)
)
