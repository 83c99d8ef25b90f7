"""SLRT's rules against values worked out by hand, and step-level tests that fail when a loss is wired wrongly.

The step tests follow ../shared/STYLE.md "Testing a train step": every optimiser's gradient is compared with the
gradient of the loss recomputed here from the paper's equations (Eq. 1-7) with the modules' own forward passes.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from methods import slrt
from methods.contract import (
    SOURCE,
    TARGET,
    Augmentation,
    Batch,
    SampleImages,
    StagePosition,
    StepContext,
    TaskInfo,
)
from methods.shared.segmenter import imagenet_normalise

U = 255  # the zero pseudo label / ignore index

# ------------------------------------------------------------------ Alg. 1


def test_portion_grows_five_points_per_epoch_from_25_to_55_percent():
    values = [slrt.portion(e, 0.25, 0.05, 0.55) for e in (0, 1, 5, 6, 10)]
    assert values == pytest.approx([0.25, 0.30, 0.50, 0.55, 0.55])


def _nlc(*confidences):
    return -torch.log(torch.tensor(confidences, dtype=torch.float64)).float()


def test_lambdas_by_hand():
    # class 0: (0.6, 0.7, 0.8, 0.9), class 1: (0.55, 0.95), class 2: never predicted
    nlc = _nlc(0.6, 0.7, 0.8, 0.9, 0.55, 0.95)
    prediction = torch.tensor([0, 0, 0, 0, 1, 1])
    # p = 0.25: T_0 = ⌈0.75 · 4⌉ = 3 → SM_0[3] = 0.8 (1-based, ascending); T_1 = ⌈1.5⌉ = 2 → 0.95; λ_2 = 0
    lambdas = slrt.class_balance_lambdas(nlc, prediction, 3, 0.25)
    assert lambdas.tolist() == pytest.approx([-math.log(0.8), -math.log(0.95), 0.0], rel=1e-5)
    # p = 0.5: T_0 = 2 → 0.7; T_1 = 1 → 0.55
    lambdas = slrt.class_balance_lambdas(nlc, prediction, 3, 0.5)
    assert lambdas.tolist() == pytest.approx([-math.log(0.7), -math.log(0.55), 0.0], rel=1e-5)
    # Ours-woCB: all six pooled, ascending (0.55, 0.6, 0.7, 0.8, 0.9, 0.95), T = ⌈4.5⌉ = 5 → 0.9 for every class
    pooled = slrt.class_balance_lambdas(nlc, prediction, 3, 0.25, class_balance=False)
    assert pooled.tolist() == pytest.approx([-math.log(0.9)] * 3, rel=1e-5)


def test_eq5_with_the_threshold_keeps_floor_p_n_pixels_of_each_class():
    # 4 pixels predicted as class 0 with confidence 0.6-0.9, p = 0.25: exactly ⌊0.25 · 4⌋ = 1 passes "> 0.8"
    p0 = torch.tensor([0.6, 0.7, 0.8, 0.9], dtype=torch.float64)
    log_p = torch.log(torch.stack([p0, 1 - p0])).float().reshape(1, 2, 1, 4)
    top, prediction = log_p.max(1)
    lambdas = slrt.class_balance_lambdas(-top.flatten(), prediction.flatten(), 2, 0.25)
    labels = slrt.class_balanced_pseudo_labels(log_p, lambdas, U)
    assert labels.flatten().tolist() == [U, U, U, 0]


def test_the_threshold_index_is_exact_where_p_times_n_is_an_integer():
    # p = 0.35 (25% + 2 epochs of 5%) of 180 pixels is 63, but 0.35 * 180 is 62.999... in floating point
    negative_log = torch.linspace(0.01, 1.8, 180)
    lambdas = slrt.class_balance_lambdas(negative_log, torch.zeros(180, dtype=torch.long), 1, 0.25 + 2 * 0.05)
    assert int((negative_log < lambdas[0]).sum()) == 63


def test_saturated_confidences_keep_their_order_in_float32():
    # 8 pixels, all class 0, logit margins 20..27 nats: p = 0.25 must select the two most confident (27, 26)
    margins = torch.arange(20.0, 28.0)
    logits = torch.stack([margins, torch.zeros(8)]).reshape(1, 2, 1, 8)
    assert torch.all(F.softmax(logits, 1)[:, 0] == 1.0)  # the float32 softmax: every confidence is exactly 1
    assert torch.all(F.log_softmax(logits, 1)[:, 0] == 0.0)  # log_softmax saturates too
    log_p = slrt.stable_log_probabilities(logits)
    assert (-log_p[0, 0, 0]).tolist() == pytest.approx(torch.exp(-margins).tolist(), rel=1e-5)
    top, prediction = log_p.max(1)
    lambdas = slrt.class_balance_lambdas(-top.flatten(), prediction.flatten(), 2, 0.25)
    labels = slrt.class_balanced_pseudo_labels(log_p, lambdas, U)
    assert labels.flatten().tolist() == [U] * 6 + [0, 0]
    # the same rule on float32 probabilities (threshold 1.0, strict ">") selects nothing
    naive = F.log_softmax(logits, 1)
    naive_lambdas = slrt.class_balance_lambdas(-naive.max(1).values.flatten(), prediction.flatten(), 2, 0.25)
    assert (slrt.class_balanced_pseudo_labels(naive, naive_lambdas, U) == U).all()


# ------------------------------------------------------------------ Eq. 3-5


def _pixels(*rows):
    """Per-pixel probability vectors → a log-probability map (1, K, 1, N)."""
    return torch.log(torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows))).float()


def test_eq5_by_hand():
    lambdas = -torch.log(torch.tensor([0.9, 0.6]))
    labels = slrt.class_balanced_pseudo_labels(_pixels((0.95, 0.05), (0.55, 0.45), (0.3, 0.7)), lambdas, U)
    # (0.95, 0.05): ratios (1.056, 0.083) → 0, 0.95 > 0.9; (0.55, 0.45): ratios (0.61, 0.75) → k* = 1 but 0.45 < 0.6
    # → the zero label; (0.3, 0.7) → 1
    assert labels.flatten().tolist() == [0, U, 1]
    # the class-normalised argmax is not the plain argmax: thresholds (0.95, 0.3), p = (0.6, 0.4) → class 1
    lambdas = -torch.log(torch.tensor([0.95, 0.3]))
    assert slrt.class_balanced_pseudo_labels(_pixels((0.6, 0.4)), lambdas, U).flatten().tolist() == [1]


def test_eq5_minimises_eq4_with_the_negative_sparse_sign_and_the_printed_sign_selects_nothing():
    generator = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64) * 2, 1)
    lambdas = torch.tensor([0.3, 1.2, 0.05], dtype=torch.float64)
    labels = slrt.class_balanced_pseudo_labels(log_p, lambdas, U)
    # Eq. 4 per pixel over {0, e_1, .., e_K}: cost(e_k) = −log p_k ∓ λ_k, cost(0) = 0
    for sign, expect_any in ((-1, True), (+1, False)):
        costs = torch.cat([torch.zeros(2, 1, 5, 5, dtype=torch.float64), -log_p + sign * lambdas.view(1, -1, 1, 1)], 1)
        best = costs.argmin(1)
        brute = torch.where(best == 0, U, best - 1)
        if sign == -1:
            assert torch.equal(brute, labels)
        assert (brute != U).any() == expect_any  # +λ‖ŷ‖₁ as printed: −log p + λ > 0 = cost(0), never selected
    assert (labels != U).any() and (labels == U).any()


def test_target_segmentation_term_by_hand():
    # 2x2 map, labels (e_0, 0, e_1, 0), p_label = (0.8, ·, 0.25, ·)
    probabilities = torch.tensor([[0.8, 0.5, 0.75, 0.5], [0.2, 0.5, 0.25, 0.5]]).reshape(1, 2, 2, 2)
    logits = torch.log(probabilities)
    labels = torch.tensor([[[0, U], [1, U]]])
    expected = -(math.log(0.8) + math.log(0.25))
    pixels = slrt.target_segmentation_loss(logits, labels, U, "pixels")
    assert pixels.item() == pytest.approx(expected / 4, rel=1e-5)  # Eq. 3: the sum over pixels / |x|
    assert slrt.target_segmentation_loss(logits, labels, U, "selected").item() == pytest.approx(expected / 2, rel=1e-5)
    nothing = slrt.target_segmentation_loss(logits.requires_grad_(), torch.full_like(labels, U), U, "selected")
    assert nothing.item() == 0.0 and nothing.requires_grad


# ------------------------------------------------------------------ Alg. 2

# Two superpixels: columns 0-2 and 3-4. "u" = no pseudo label.
MAP = """
1 1 1 u 1
1 u 0 1 0
1 0 0 u 1
1 1 1 1 1
0 0 u u 0
"""


def _labels(text: str) -> torch.Tensor:
    rows = [[U if v == "u" else int(v) for v in line.split()] for line in text.strip().splitlines()]
    return torch.tensor([rows])


def test_superpixel_vote_on_a_hand_drawn_map():
    labels = _labels(MAP)
    segments = torch.tensor([[[0, 0, 0, 1, 1]] * 5])
    out = slrt.superpixel_vote(labels, segments, 2, U, 4)
    expected = labels.clone()
    # (1,1): 8 neighbours in its superpixel, 5 of class 1 and 3 of class 0 → 1
    expected[0, 1, 1] = 1
    # (2,3): 5 neighbours of class 1, but (3,2) lies in the other superpixel → 4, not > 4 → stays unlabelled;
    # (0,3), (4,2), (4,3): border pixels with at most 3 neighbours in their superpixel; labelled pixels never change
    assert torch.equal(out, expected)
    # one superpixel for the whole map: (2,3) now has its 5 votes
    expected[0, 2, 3] = 1
    assert torch.equal(slrt.superpixel_vote(labels, torch.zeros_like(segments), 2, U, 4), expected)
    # a negative segment id (no superpixel: padding) never votes nor receives
    assert torch.equal(slrt.superpixel_vote(labels, torch.full_like(segments, -1), 2, U, 4), labels)


def test_raster_vote_propagates_down_and_right_where_the_simultaneous_one_does_not():
    labels = _labels("1 1 1 0\n1 u u 0\n1 1 1 0")
    segments = torch.zeros_like(labels)
    # (1,1): 7 of class 1 → 1. (1,2): (0,1), (0,2), (2,1), (2,2) are 1 → 4 from Eq. 5's labels; in raster order
    # (1,1) was filled first, a 5th vote
    simultaneous = slrt.superpixel_vote(labels, segments, 2, U, 4, "simultaneous")
    raster = slrt.superpixel_vote(labels, segments, 2, U, 4, "raster")
    assert simultaneous[0].tolist() == [[1, 1, 1, 0], [1, 1, U, 0], [1, 1, 1, 0]]
    assert raster[0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    generator = torch.Generator().manual_seed(3)  # both readings agree on maps without chains
    random = torch.randint(0, 3, (1, 6, 6), generator=generator).masked_fill(torch.rand(1, 6, 6) > 0.2, U)
    assert torch.equal(slrt.superpixel_vote(random, torch.zeros_like(random), 3, U, 7, "raster"), random)


def test_slic_respects_a_strong_colour_edge_and_returns_full_size_maps():
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, :, :16] = 0.9  # left red
    image[0, 1, :, 16:] = 0.8  # right green
    segments = slrt.superpixels(image, size=8)
    assert segments.shape == (1, 32, 32) and segments.dtype == torch.int64
    assert set(segments[0, :, :16].unique().tolist()).isdisjoint(segments[0, :, 16:].unique().tolist())
    assert 8 <= segments.unique().numel() <= 24  # about 32·32/8² = 16
    half = slrt.superpixels(image, size=8, scale=0.5)
    assert half.shape == (1, 32, 32)
    assert set(half[0, :, :16].unique().tolist()).isdisjoint(half[0, :, 16:].unique().tolist())
    grey = slrt.superpixels(image[:, :1], size=8)
    assert grey.shape == (1, 32, 32)


def test_padding_of_a_crop_is_no_image():
    # resized to 4x6, crop box (top 2, left 3, 4, 4): rows 0-1 and columns 0-2 of the crop lie inside the image
    augmentation = Augmentation(
        size=torch.tensor([[4, 6], [4, 6]]),
        scale=torch.ones(2),
        crop=torch.tensor([[2, 3, 4, 4], [2, 3, 4, 4]]),
        flip=torch.tensor([False, True]),
    )
    valid = slrt.valid_pixels(augmentation, (4, 4), torch.device("cpu"))
    assert valid[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert valid[1].int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert slrt.valid_pixels(None, (4, 4), torch.device("cpu")) is None


# ------------------------------------------------------------------ Alg. 3, Eq. 7


def test_centroids_by_hand():
    features = torch.tensor([[[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]])  # (1, F=2, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    sums, counts, total = slrt.class_feature_sums(features, labels, 2)
    assert slrt.batch_centroids(sums, counts, total, "class").tolist() == [[1.5, 4.5], [3.0, 6.0]]
    # "image", 1/|x| as printed: (1 + 2)/3, (4 + 5)/3 and 3/3, 6/3
    assert slrt.batch_centroids(sums, counts, total, "image").flatten().tolist() == pytest.approx([1.0, 3.0, 1.0, 2.0])
    ignored = torch.tensor([[[0, U, 1]]])  # ignored and unlabelled pixels count for no class
    sums, counts, total = slrt.class_feature_sums(features, ignored, 2)
    assert slrt.batch_centroids(sums, counts, total, "class").tolist() == [[1.0, 4.0], [3.0, 6.0]]
    assert counts.tolist() == [1.0, 1.0] and total.item() == 3.0
    sums, counts, total = slrt.class_feature_sums(features, torch.zeros_like(labels), 2)
    assert slrt.batch_centroids(sums, counts, total, "class")[1].tolist() == [0.0, 0.0]  # absent class: 0


def test_centroid_history_recursion_and_its_gradient():
    gamma, present = 0.7, torch.tensor([True, True])
    c1 = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    c2 = torch.tensor([[0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    history, weight = slrt.update_centroid_history(torch.zeros(2, 2), torch.zeros(2), c1, present, gamma, "sum")
    assert history.tolist() == c1.tolist() and weight.tolist() == [1.0, 1.0]
    total, weight2 = slrt.update_centroid_history(history, weight, c2, present, gamma, "sum")
    assert total[0].tolist() == pytest.approx([0.7, 1.0])  # C = c2 + γ c1
    assert weight2.tolist() == pytest.approx([1.7, 1.7])
    total.sum().backward()
    assert c2.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # the current term only, weight γ^0
    mean, _ = slrt.update_centroid_history(history, weight, c2.detach(), present, gamma, "mean")
    assert mean[0].tolist() == pytest.approx([0.7 / 1.7, 1 / 1.7])
    # a class absent from the batch adds 0 to the sum (it decays) and leaves the mean where it was
    absent = torch.tensor([True, False])
    decayed, w = slrt.update_centroid_history(history, weight, c2.detach() * 0, absent, gamma, "sum")
    assert decayed[1].tolist() == pytest.approx([1.4, 1.4]) and w.tolist() == pytest.approx([1.7, 0.7])
    kept, _ = slrt.update_centroid_history(history, weight, c2.detach() * 0, absent, gamma, "mean")
    assert kept[1].tolist() == pytest.approx([2.0, 2.0])


def test_eq7_by_hand():
    source = torch.tensor([[1.0, 2.0], [5.0, 5.0]])
    target = torch.tensor([[0.0, 4.0], [5.0, 5.0]])
    both = torch.tensor([True, True])
    assert slrt.srt_loss(source, target, 1.0, both).item() == pytest.approx(1 + 4 + 1 + 2)
    assert slrt.srt_loss(source, target, 0.0, both).item() == pytest.approx(5)
    assert slrt.srt_loss(source, target, 1.0, both, "mean").item() == pytest.approx(8 / 4)
    target[1] = 0
    assert slrt.srt_loss(source, target, 1.0, torch.tensor([True, False])).item() == pytest.approx(8)


def test_a_sum_reduced_over_workers_keeps_this_workers_gradient():
    local = torch.tensor([1.0, 2.0], requires_grad=True)
    ctx = _context(all_reduce_mean=lambda t: (t + torch.tensor([3.0, 4.0])) / 2)  # another worker holds (3, 4)
    reduced = slrt._reduced_sum(ctx, local)
    assert reduced.tolist() == [2.0, 3.0]
    reduced.sum().backward()
    assert local.grad.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ Eq. 2, 6, modules


def test_image_level_targets():
    assert slrt.lesion_present(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])).tolist() == [0, 1, 1]
    labels = torch.zeros(3, 2, 2, dtype=torch.long)
    labels[0, 1, 1] = 1
    labels[2] = U
    assert slrt.lesion_present_in_pixels(labels, 2).tolist() == [1, 0, 0]
    assert F.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(
        math.log(1 + math.exp(2)), rel=1e-6
    )


def test_discriminator_losses_and_labels():
    zeros = torch.zeros(1, 1, 2, 2)
    assert slrt.discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    # D(x) = P(target): the segmenter wants target outputs scored as source (0): BCE(2, 0) = softplus(2)
    two = torch.full((1, 1, 2, 2), 2.0)
    assert slrt.adversarial_loss(two).item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    # D: source 0, target 1 → ½[softplus(2) + softplus(1)] for D(P_s) = 2, D(P_t) = −1
    expected = 0.5 * (math.log(1 + math.exp(2)) + math.log(1 + math.exp(1)))
    assert slrt.discriminator_loss(two, -two / 2).item() == pytest.approx(expected, rel=1e-6)
    d = slrt.slrt_discriminator(2)
    assert d(torch.zeros(2, 2, 64, 64)).shape == (2, 1, 2, 2)
    assert d(torch.zeros(1, 2, 512, 1024)).shape == (1, 1, 16, 32)


def test_refinement_starts_as_the_identity():
    refine = slrt.Refiner(3)
    logits = torch.randn(2, 3, 4, 5)
    assert torch.equal(refine(logits, torch.softmax(torch.randn(2, 2), 1)), logits)
    assert torch.equal(refine(logits, torch.softmax(torch.randn(2, 2, 2, 3), 1)), logits)


def test_learning_rate_decays_by_0_7_every_950_steps():
    hp = slrt.Hyperparams(architecture="tiny", batch_size=2)
    modules = slrt.build(hp, INFO)
    optims = slrt.optimizers(hp, modules, 5000)
    for name in ("network", "discriminator"):
        optimizer, scheduler = optims[name].optimizer, optims[name].scheduler
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 0
        lrs = {}
        for step in range(1901):
            lrs[step] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
        assert [lrs[s] for s in (0, 949, 950, 1900)] == pytest.approx([1e-4, 1e-4, 7e-5, 4.9e-5])
    network = {id(p) for p in optims["network"].optimizer.param_groups[0]["params"]}
    for name in ("segmenter", "classifier", "refine"):  # "whole networks": one Adam, one learning rate
        assert {id(p) for p in modules[name].parameters()} <= network
    assert not network & {id(p) for p in modules["discriminator"].parameters()}
    continuous = slrt.Hyperparams(architecture="tiny", batch_size=2, lr_decay_staircase=False)
    optim = slrt.optimizers(continuous, modules, 5000)["network"]
    for _ in range(475):
        optim.optimizer.step()
        optim.scheduler.step()
    assert optim.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.7**0.5)


def test_the_sgd_footing_puts_s2_s1_and_the_refinement_in_the_head_group():
    """The synthetic tasks' footing: the recipe's SGD, E at the learning rate and S2, S1 and the refinement as the
    head group at head_lr_multiplier times it; D keeps its own Adam."""
    sgd_hp = slrt.Hyperparams(architecture="tiny", batch_size=2, segmenter_optimizer="sgd", learning_rate=1e-2)
    modules = slrt.build(sgd_hp, INFO)
    sgd = slrt.optimizers(sgd_hp, modules, 5000)
    backbone, heads = sgd["network"].optimizer.param_groups
    assert isinstance(sgd["network"].optimizer, torch.optim.SGD)
    assert (backbone["lr"], heads["lr"]) == pytest.approx((1e-2, 1e-2 * sgd_hp.head_lr_multiplier))
    assert sgd_hp.head_lr_multiplier != 1
    assert all(g["momentum"] == sgd_hp.momentum and g["weight_decay"] == sgd_hp.weight_decay for g in (backbone, heads))
    segmenter = modules["segmenter"]
    assert {id(p) for p in backbone["params"]} == {id(p) for p in segmenter.backbone_parameters()}
    expected_heads = list(segmenter.head_parameters()) + [
        p for name in ("classifier", "refine") for p in modules[name].parameters()
    ]
    assert {id(p) for p in heads["params"]} == {id(p) for p in expected_heads}
    assert len(backbone["params"]) + len(heads["params"]) == len(_network_params(modules))
    assert isinstance(sgd["discriminator"].optimizer, torch.optim.Adam)


def test_pixel_refinement_reads_s1s_convolution_before_its_pooling():
    """refinement="pixel" (choice 2): the refinement's S1 input is softmax(S1's 1x1 conv) at every position, not the
    image probability broadcast; with a refinement that mixes S1's channels in, the two readings differ."""
    hp = slrt.Hyperparams(architecture="tiny", batch_size=2, refinement="pixel")
    modules = _seeded(hp)
    with torch.no_grad():
        modules["refine"].conv.weight[:, 2:] = torch.tensor([[1.5, -0.5], [-1.0, 2.0]])[..., None, None]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    features = modules["segmenter"].encode(imagenet_normalise(images))
    logits = modules["segmenter"].classify(features)
    per_pixel = torch.softmax(modules["classifier"].fc(features.main), 1)
    expected = modules["refine"].conv(torch.cat([logits, per_pixel], 1))
    got = slrt.forward(hp, modules, imagenet_normalise(images))
    assert torch.allclose(got.logits, expected, atol=1e-6)
    # "before its pooling": S1's image logits are the pixel mean of that convolution (a linear map of the features)
    assert torch.allclose(modules["classifier"].fc(features.main).mean((2, 3)), got.image_logits, atol=1e-6)
    image = slrt.forward(dataclasses.replace(hp, refinement="image"), modules, imagenet_normalise(images))
    assert torch.equal(got.image_logits, image.image_logits)  # S1's own output is the pooled one either way
    assert not torch.allclose(got.logits, image.logits, atol=1e-4)
    broadcast = torch.softmax(image.image_logits, 1)[:, :, None, None].expand_as(per_pixel)
    assert torch.allclose(image.logits, modules["refine"].conv(torch.cat([logits, broadcast], 1)), atol=1e-6)


# ------------------------------------------------------------------ step-level wiring

INFO = TaskInfo(num_classes=2, in_channels=3, class_names=("normal", "lesion"), target_image_labels=True)
SIZE = 32
LAMBDAS = torch.tensor([0.6, 0.4])  # selects some pixels of each class on the seeded network, leaves others out


def _hp(**changes):
    # superpixels from the batch's store: the gradient tests hand in maps on which Alg. 2 fills nothing; the
    # per-image terms at full weight ("mean"), so that every term's gradient is of the order of L_S's
    defaults = {
        "architecture": "tiny",
        "batch_size": 2,
        "superpixel_size": 4,
        "mu": 1.0,
        "superpixel_source": "store",
        "loss_reduction": "mean",
    }
    return slrt.Hyperparams(**{**defaults, **changes})


def _seeded(hp, info=INFO):
    """The modules from seed 0, drawn in float32 whatever the default dtype (the float64 tests convert them)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    modules = slrt.build(hp, info)
    torch.set_default_dtype(dtype)
    return modules.to(dtype).train()


def _context(hp=None, modules=None, state=None, all_reduce_mean=None):
    hp = hp or _hp()
    if modules is None:
        modules = _seeded(hp)
    optims = slrt.optimizers(hp, modules, 100)
    extra = {} if all_reduce_mean is None else {"all_reduce_mean": all_reduce_mean}
    return StepContext(
        hp=hp,
        info=INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={"lambdas": LAMBDAS.clone(), "portion": 0.25} if state is None else state,
        stage="adapt",
        stage_step=0,
        stage_steps=100,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        **extra,
    )


def _batch(target_image_label=None, source_image_label=None, extras=None):
    generator = torch.Generator().manual_seed(1)
    source_label = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    source_label[0, 8:20, 6:18] = 1  # a lesion in image 0 only
    source_label[:, :, -3:] = U
    dtype = torch.get_default_dtype()
    return Batch(
        source_image=torch.rand(2, 3, SIZE, SIZE, generator=generator, dtype=torch.float32).to(dtype),
        source_label=source_label,
        target_image=torch.rand(2, 3, SIZE, SIZE, generator=generator, dtype=torch.float32).to(dtype),
        target_image_label=torch.tensor([[1.0, 1.0], [1.0, 0.0]]) if target_image_label is None else target_image_label,
        source_image_label=source_image_label,
        target_extras={} if extras is None else extras,
    )


def _distinct_segments():
    """A superpixel map in which no two pixels share a superpixel: Alg. 2 fills nothing."""
    return {"superpixels": torch.arange(2 * SIZE * SIZE).reshape(2, SIZE, SIZE)}


def _capture(optimizer):
    """The gradients an optimiser's step sees, by parameter identity."""
    captured = {}

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                captured[id(p)] = None if p.grad is None else p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)
    return captured


def _run_step(hp, state=None, batch=None, modules=None):
    """One train step on a fresh copy of the seeded modules; returns (metrics, captured grads, modules before)."""
    ctx = _context(hp, modules=copy.deepcopy(modules) if modules is not None else None, state=state)
    before = copy.deepcopy(ctx.modules)
    grads = {name: _capture(opt) for name, opt in ctx.optimizers.items()}
    metrics = slrt.train_step(ctx, batch or _batch(extras=_distinct_segments()))
    return metrics, grads, before, ctx


# The paper's equations, recomputed with the modules' own forward passes (no helper of methods/slrt.py).


def _forward(modules, images):
    features = modules["segmenter"].encode(imagenet_normalise(images))
    logits = modules["segmenter"].classify(features)  # tiny: S2's pixel features are E's features
    image_logits = modules["classifier"](features)
    q = torch.softmax(image_logits, 1)[:, :, None, None].expand(-1, -1, *logits.shape[-2:])
    refined = modules["refine"].conv(torch.cat([logits, q], 1))
    return features.main, refined, image_logits


def _up(logits):
    return F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _eq5(logits, lambdas):
    log_p = torch.log_softmax(_up(logits.detach()).double(), 1) + lambdas.double().view(1, -1, 1, 1)
    best, label = log_p.max(1)
    return torch.where(best > 0, label, U)


def _centroids(features, labels):
    labels = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()
    rows = []
    for k in range(2):
        mask = (labels == k).float()[:, None]
        rows.append((features * mask).sum((0, 2, 3)) / mask.sum().clamp_min(1e-12))
    return torch.stack(rows)


def _paper_losses(hp, modules, batch, lambdas, history=None):
    """Eq. 1's terms for the network and Eq. 6 for D, from the paper: a dict of scalar tensors."""
    f_s, s_logits, s_image = _forward(modules, batch.source_image)
    f_t, t_logits, t_image = _forward(modules, batch.target_image)
    y_sc = torch.tensor([1, 0])  # image 0 of _batch has a lesion
    y_tc = batch.target_image_label[:, 1].long()
    pseudo = _eq5(t_logits, lambdas)
    ce_t = F.cross_entropy(_up(t_logits), pseudo, ignore_index=U, reduction="sum") / pseudo.numel()
    p_s, p_t = torch.softmax(_up(s_logits), 1), torch.softmax(_up(t_logits), 1)
    d = modules["discriminator"]
    c_s, c_t = _centroids(f_s, batch.source_label), _centroids(f_t, pseudo)
    if history is not None:  # Alg. 3 lines 9-10 with the earlier terms as constants
        c_s, c_t = hp.gamma * history[0] + c_s, hp.gamma * history[1] + c_t
    diff = c_s - c_t
    return {
        "seg_source": F.cross_entropy(_up(s_logits), batch.source_label, ignore_index=U),
        "cls": F.cross_entropy(s_image, y_sc) + F.cross_entropy(t_image, y_tc),
        "seg_target": ce_t,
        "adv": F.binary_cross_entropy_with_logits(d(p_t), torch.zeros_like(d(p_t))),
        "srt": (diff**2).sum() + hp.alpha * diff.abs().sum(),
        "d": 0.5
        * (
            F.binary_cross_entropy_with_logits(d(p_s.detach()), torch.zeros_like(d(p_s)))
            + F.binary_cross_entropy_with_logits(d(p_t.detach()), torch.ones_like(d(p_t)))
        ),
        "pseudo": pseudo,
    }


def _network_objective(hp, losses):
    # Eq. 1; "pixel_sum": Eq. 3's sums over pixels, i.e. the per-image terms divided by |x| next to mean L_S
    w = 1 / SIZE**2 if hp.loss_reduction == "pixel_sum" else 1.0
    per_image = losses["cls"] + hp.eta * losses["adv"] + hp.mu * losses["srt"]
    return losses["seg_source"] + losses["seg_target"] + w * per_image


def _network_params(modules):
    return [p for name in ("segmenter", "classifier", "refine") for p in modules[name].parameters()]


@pytest.fixture
def float64():
    """The gradient comparisons run in double precision, so that a term 1e-5 the size of the others still shows."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _close(a, b, rtol=1e-6):
    """Equal up to summation order: relative to the tensor's largest entry."""
    return torch.allclose(a, b, rtol=rtol, atol=1e-7 + rtol * float(b.abs().max()))


def _assert_grads(captured, params, expected):
    for p, g in zip(params, expected):
        got = captured[id(p)]
        if got is None:
            assert torch.count_nonzero(g) == 0
        else:
            assert _close(got, g), (got - g).abs().max()


@pytest.mark.parametrize("reduction", ["mean", "pixel_sum"])
def test_the_network_step_descends_eq1_and_the_discriminator_step_eq6(float64, reduction):
    hp = _hp(loss_reduction=reduction)
    metrics, grads, before, ctx = _run_step(hp)
    batch = _batch()
    losses = _paper_losses(hp, before, batch, LAMBDAS.clone())
    pseudo = losses["pseudo"]
    assert (pseudo != U).any() and (pseudo == U).any() and (pseudo == 0).any() and (pseudo == 1).any()
    objective = _network_objective(hp, losses)
    assert metrics["loss_total"].item() == pytest.approx(objective.item(), rel=1e-5)
    for key, name in (("seg_target", "loss_seg_target"), ("adv", "loss_adv_target"), ("srt", "loss_srt")):
        assert metrics[name].item() == pytest.approx(losses[key].item(), rel=1e-5), name
    params = _network_params(before)
    expected = torch.autograd.grad(objective, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(params, expected)]
    captured = grads["network"]
    # the step's parameters are copies of `before`'s: match them by position
    step_params = _network_params(ctx.modules)
    _assert_grads({id(b): captured[id(s)] for b, s in zip(params, step_params)}, params, expected)
    # D: Eq. 6 on the detached outputs of the network before its update, labels source 0 / target 1
    d_params = list(before["discriminator"].parameters())
    d_expected = torch.autograd.grad(losses["d"], d_params)
    d_step = list(ctx.modules["discriminator"].parameters())
    _assert_grads({id(b): grads["discriminator"][id(s)] for b, s in zip(d_params, d_step)}, d_params, d_expected)
    assert metrics["loss_d"].item() == pytest.approx(losses["d"].item(), rel=1e-5)
    # with the labels swapped the gradient would differ (the test can tell)
    _, t_logits, _ = _forward(before, batch.target_image)
    _, s_logits, _ = _forward(before, batch.source_image)
    d = before["discriminator"]
    swapped = 0.5 * (
        F.binary_cross_entropy_with_logits(d(torch.softmax(_up(s_logits), 1)), torch.ones(2, 1, 1, 1))
        + F.binary_cross_entropy_with_logits(d(torch.softmax(_up(t_logits), 1)), torch.zeros(2, 1, 1, 1))
    )
    wrong = torch.autograd.grad(swapped, d_params)
    assert not all(_close(w, e) for w, e in zip(wrong, d_expected))


@pytest.mark.parametrize("reduction", ["mean", "pixel_sum"])
def test_mu_and_eta_weigh_their_own_terms(float64, reduction):
    batch = _batch()
    lambdas = LAMBDAS.clone()
    scale = 1 / SIZE**2 if reduction == "pixel_sum" else 1.0  # pixel_sum: Eq. 3 sums over the |x| pixels
    for weight, term in (("mu", "srt"), ("eta", "adv")):
        runs = {value: _run_step(_hp(loss_reduction=reduction, **{weight: value})) for value in (0.0, 2.0)}
        before = runs[0.0][2]
        params = _network_params(before)
        grad_term = torch.autograd.grad(
            _paper_losses(_hp(), before, batch, lambdas)[term], params, allow_unused=True, retain_graph=True
        )
        for p_before, p0, p2, g in zip(
            params, _network_params(runs[0.0][3].modules), _network_params(runs[2.0][3].modules), grad_term
        ):
            g0, g2 = runs[0.0][1]["network"][id(p0)], runs[2.0][1]["network"][id(p2)]
            g = torch.zeros_like(p_before) if g is None else g
            g0 = torch.zeros_like(p_before) if g0 is None else g0
            g2 = torch.zeros_like(p_before) if g2 is None else g2
            assert _close(g2 - g0, 2 * scale * g), weight
        assert any(torch.count_nonzero(g) for g in grad_term if g is not None), term


def test_the_adversarial_term_asks_d_for_the_source_label():
    hp = _hp(mu=0.0)
    modules = _seeded(hp)
    last = modules["discriminator"].model[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(2.0)  # D(·) = 2 everywhere
    metrics, *_ = _run_step(hp, modules=modules)
    assert metrics["loss_adv_target"].item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-5)  # BCE(2, 0)


def test_what_each_optimiser_may_and_may_not_touch():
    hp = _hp()
    ctx = _context(hp)
    after_network = {}

    def snapshot(opt, args, kwargs):
        after_network.update({n: p.detach().clone() for n, p in ctx.modules.named_parameters()})

    ctx.optimizers["network"].register_step_post_hook(snapshot)
    network_grads = _capture(ctx.optimizers["network"])
    slrt.train_step(ctx, _batch(extras=_distinct_segments()))
    for name, p in ctx.modules.named_parameters():
        if not name.startswith("discriminator."):
            # D's update does not move the network, and its backward adds no gradient to the network
            assert torch.equal(p, after_network[name]), name
            if p.grad is not None:
                assert torch.equal(p.grad, network_grads[id(p)]), name
    assert any(not torch.equal(p, after_network[n]) for n, p in ctx.modules.named_parameters() if "discrim" in n)
    d_ids = {id(p) for p in ctx.modules["discriminator"].parameters()}
    assert not d_ids & set(network_grads)


def test_the_centroid_history_enters_eq7_as_a_constant(float64):
    hp = _hp()
    h_s, h_t = torch.rand(2, 128), torch.rand(2, 128)
    state = {
        "lambdas": LAMBDAS.clone(),
        "portion": 0.25,
        "centroids_source": h_s.clone(),
        "centroid_weights_source": torch.ones(2),
        "centroids_target": h_t.clone(),
        "centroid_weights_target": torch.ones(2),
    }
    metrics, grads, before, ctx = _run_step(hp, state=state)
    losses = _paper_losses(hp, before, _batch(), state["lambdas"], history=(h_s, h_t))
    assert metrics["loss_srt"].item() == pytest.approx(losses["srt"].item(), rel=1e-5)
    params = _network_params(before)
    expected = torch.autograd.grad(_network_objective(hp, losses), params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(params, expected)]
    _assert_grads(
        {id(b): grads["network"][id(s)] for b, s in zip(params, _network_params(ctx.modules))}, params, expected
    )
    # the new history is γ·H + this step's centroids, stored without a graph
    f_s, _, _ = _forward(before, _batch().source_image)
    current = _centroids(f_s, _batch().source_label).detach()
    assert torch.allclose(ctx.state["centroids_source"], 0.7 * h_s + current, atol=1e-5)
    assert not ctx.state["centroids_source"].requires_grad
    assert ctx.state["centroid_weights_source"].tolist() == pytest.approx([1.7, 1.7])
    slrt.train_step(ctx, _batch(extras=_distinct_segments()))  # a second step: no graph of step 1 is reused


def test_image_level_loss_reads_image_labels_never_pixel_labels():
    hp = _hp(adversarial=False, pseudo_labels=False, semantic_transfer=False)
    modules = _seeded(hp)
    target_logits = {}
    for label in ((1.0, 1.0), (1.0, 0.0)):
        metrics, _, before, _ = _run_step(
            hp, batch=_batch(target_image_label=torch.tensor([label, label])), modules=modules
        )
        _, _, t_image = _forward(before, _batch().target_image)
        target_logits[label] = metrics["loss_cls_target"].item()
        assert target_logits[label] == pytest.approx(
            F.cross_entropy(t_image, torch.full((2,), int(label[1]))).item(), rel=1e-5
        )
    assert target_logits[(1.0, 1.0)] != pytest.approx(target_logits[(1.0, 0.0)])
    # source: Batch.source_image_label where the task has it (here contradicting the pixels), else the pixels
    contradicting = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    metrics, _, before, _ = _run_step(hp, batch=_batch(source_image_label=contradicting), modules=modules)
    _, _, s_image = _forward(before, _batch().source_image)
    assert metrics["loss_cls_source"].item() == pytest.approx(
        F.cross_entropy(s_image, torch.tensor([0, 1])).item(), rel=1e-5
    )
    metrics, *_ = _run_step(hp, batch=_batch(), modules=modules)
    assert metrics["loss_cls_source"].item() == pytest.approx(
        F.cross_entropy(s_image, torch.tensor([1, 0])).item(), rel=1e-5
    )
    # a source image with image-level labels only (pixel labels all ignore): L_S is 0, L_C still trains S1
    image_only = _batch(source_image_label=contradicting)
    image_only = Batch(**{**image_only.__dict__, "source_label": torch.full_like(image_only.source_label, U)})
    metrics, *_ = _run_step(hp, batch=image_only, modules=modules)
    assert metrics["loss_seg_source"].item() == 0.0 and metrics["loss_cls_source"].item() > 0


class _Recording:
    """A Batch stand-in that records which fields a step reads."""

    def __init__(self, batch):
        self._batch, self.read = batch, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._batch, name)


def test_target_pixel_labels_cannot_reach_the_method():
    assert not [f for f in Batch.__dataclass_fields__ if f.startswith("target") and "label" in f and "image" not in f]
    batch = _Recording(_batch(extras=_distinct_segments()))
    slrt.train_step(_context(), batch)
    assert batch.read <= {
        "source_image",
        "source_label",
        "source_image_label",
        "target_image",
        "target_image_label",
        "target_augmentation",
        "target_extras",
    }


def test_superpixel_vote_wiring_per_step_and_from_the_store():
    hp = _hp()
    # one superpixel per image: every unlabelled pixel with 5 agreeing neighbours is filled
    single = {"superpixels": torch.zeros(2, SIZE, SIZE, dtype=torch.int16)}
    lambdas = torch.tensor([0.8, 0.5])  # leaves holes that 5 neighbours agree on
    metrics, _, before, _ = _run_step(hp, state={"lambdas": lambdas, "portion": 0.25}, batch=_batch(extras=single))
    assert metrics["superpixels_cached"].item() == 1.0
    _, t_logits, _ = _forward(before, _batch().target_image)
    seeds = _eq5(t_logits, lambdas)
    voted = seeds.clone()  # Alg. 2 straight from its lines, for one superpixel
    for b in range(2):
        for h in range(SIZE):
            for w in range(SIZE):
                if seeds[b, h, w] != U:
                    continue
                counts = [0, 0]
                for y in range(h - 1, h + 2):
                    for x in range(w - 1, w + 2):
                        if (y, x) != (h, w) and 0 <= y < SIZE and 0 <= x < SIZE and seeds[b, y, x] != U:
                            counts[int(seeds[b, y, x])] += 1
                if max(counts) > 4:
                    voted[b, h, w] = int(np.argmax(counts))
    assert (voted != seeds).any()
    assert metrics["pseudo_label_fraction_eq5"].item() == pytest.approx((seeds != U).float().mean().item())
    assert metrics["pseudo_label_fraction"].item() == pytest.approx((voted != U).float().mean().item())
    ce = F.cross_entropy(_up(t_logits), voted, ignore_index=U, reduction="sum") / voted.numel()
    assert metrics["loss_seg_target"].item() == pytest.approx(ce.item(), rel=1e-5)
    per_step, *_ = _run_step(_hp(superpixel_source="step"), batch=_batch())  # SLIC on the step's own images
    assert per_step["superpixels_cached"].item() == 0.0
    assert per_step["pseudo_label_fraction"] >= per_step["pseudo_label_fraction_eq5"]
    no_sp, *_ = _run_step(_hp(superpixels=False), batch=_batch())
    assert "superpixels_cached" not in no_sp
    assert no_sp["pseudo_label_fraction"].item() == no_sp["pseudo_label_fraction_eq5"].item()


def test_ablation_switches_build_run_and_plan_what_they_say():
    rows = {
        "BL": {"adversarial": False, "pseudo_labels": False, "semantic_transfer": False},
        "BL+AL": {"pseudo_labels": False, "semantic_transfer": False},
        "BL+AL+PL": {"semantic_transfer": False},
        "BL+AL+SRT": {"pseudo_labels": False},
        "BL+PL+SRT": {"adversarial": False},
        "Ours": {},
        "Ours-woCB": {"class_balance": False},
        "Ours-woSP": {"superpixels": False},
    }
    for row, switches in rows.items():
        hp = _hp(**switches)
        ctx = _context(hp)
        (stage,) = slrt.stages(hp)
        assert set(ctx.modules) == {"segmenter", "classifier", "refine"} | (
            {"discriminator"} if hp.adversarial else set()
        ), row
        assert set(stage.trains) == set(ctx.modules) and stage.uses_target, row
        assert (stage.target_pass is not None) == hp.pseudo_labels, row
        metrics = slrt.train_step(ctx, _batch())
        assert ("loss_adv_target" in metrics) == hp.adversarial == ("loss_d" in metrics), row
        assert ("loss_seg_target" in metrics) == hp.pseudo_labels, row
        assert ("loss_srt" in metrics) == hp.semantic_transfer == ("centroids_target" in ctx.state), row
        assert all(torch.isfinite(v) for v in metrics.values()), row
    # Tables 3-4's BL without the classification head: the source-only DeepLab-v3, no target image at all
    headless = TaskInfo(num_classes=2, in_channels=3, class_names=("a", "b"))
    hp = _hp(classification_head=False, **rows["BL"])
    (stage,) = slrt.stages(hp)
    assert not stage.uses_target and stage.trains == ("segmenter",) and stage.target_pass is None
    modules = slrt.build(hp, headless)
    assert set(modules) == {"segmenter"}
    source_only = Batch(
        source_image=torch.rand(2, 3, SIZE, SIZE), source_label=_batch().source_label, target_image=None
    )
    ctx = _context(hp, modules=modules)
    ctx.info = headless
    assert set(slrt.train_step(ctx, source_only)) == {"loss_seg_source", "loss_total"}
    with pytest.raises(ValueError, match="classification_head=False"):
        slrt.build(_hp(), headless)


def test_woPL_centroids_use_s2s_argmax_on_every_target_pixel():
    hp = _hp(pseudo_labels=False)
    metrics, _, before, ctx = _run_step(hp, state={})
    f_t, t_logits, _ = _forward(before, _batch().target_image)
    expected = _centroids(f_t, _up(t_logits).argmax(1)).detach()
    assert torch.allclose(ctx.state["centroids_target"], expected, atol=1e-5)


def test_target_pass_and_threshold_update():
    hp = _hp(superpixel_source="step")
    ctx = _context(hp)
    ctx.modules.eval()
    with torch.no_grad():
        out = slrt.collect(ctx, torch.rand(2, 3, SIZE, SIZE), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert out["negative_log_confidence"].shape == out["prediction"].shape == (2 * 8 * 8,)
    assert out["prediction"].dtype == torch.int16 and (out["negative_log_confidence"] >= 0).all()
    assert "superpixels" not in out
    ctx.target_epoch = 3
    gathered = {
        "negative_log_confidence": _nlc(0.6, 0.7, 0.8, 0.9, 0.55, 0.95),
        "prediction": torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.int16),
        "image_correct": torch.tensor([1.0, 0.0, 1.0, 1.0]),
    }
    update = slrt.update(ctx, gathered)
    assert update["portion"] == pytest.approx(0.4)  # 25% + 3 · 5%
    # p = 0.4: T_0 = ⌈2.4⌉ = 3 → 0.8; T_1 = ⌈1.2⌉ = 2 → 0.95
    assert update["lambdas"].tolist() == pytest.approx([-math.log(0.8), -math.log(0.95)], rel=1e-5)
    assert update["pass_cls_accuracy_target"] == pytest.approx(0.75)
    source_epochs = _context(_hp(portion_every=SOURCE))
    source_epochs.source_epoch, source_epochs.target_epoch = 1, 5
    assert slrt.update(source_epochs, gathered)["portion"] == pytest.approx(0.3)
    assert slrt.target_pass(_hp()).every == TARGET and slrt.target_pass(_hp(portion_every=SOURCE)).every == SOURCE
    store = slrt.target_pass(_hp(superpixel_source="store"))
    assert store.store["superpixels"].dtype == torch.int16 and store.store["superpixels"].fill == -1
    stored = slrt.collect(_context(_hp(superpixel_source="store")), torch.rand(2, 3, SIZE, SIZE), None)
    assert stored["superpixels"].shape == (2, SIZE, SIZE)


def test_source_warmup_is_a_source_only_first_stage():
    hp = _hp(num_steps=100, source_warmup_steps=25)
    warmup, adapt = slrt.stages(hp)
    assert (warmup.budget.steps, adapt.budget.steps) == (25, 75)
    assert not warmup.uses_target and warmup.target_pass is None and "discriminator" not in warmup.trains
    ctx = _context(hp)
    ctx.optimizers = {n: o.optimizer for n, o in slrt.warmup_optimizers(hp, ctx.modules, 25).items()}
    batch = Batch(source_image=torch.rand(2, 3, SIZE, SIZE), source_label=_batch().source_label, target_image=None)
    assert set(slrt.warmup_step(ctx, batch)) == {"loss_seg_source", "loss_cls_source"}
    (single,) = slrt.stages(_hp(num_steps=100))
    assert single.budget.steps == 100


def test_predict_and_samples():
    hp = _hp()
    ctx = _context(hp)
    ctx.modules.eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    logits = slrt.predict(hp, ctx.modules, images, StagePosition("adapt"))
    assert logits.shape == (2, 2, SIZE, SIZE)
    _, refined, _ = _forward(ctx.modules, images)
    assert torch.allclose(logits, _up(refined), atol=1e-6)
    out = slrt.samples(hp, ctx.modules, SampleImages(target=images, source=images), StagePosition("adapt"))
    assert set(out) == {
        "target_prediction",
        "target_pseudo_labels_eq5",
        "target_pseudo_labels_alg2",
        "target_superpixels",
    }
    assert all(v.shape == (2, 3, SIZE, SIZE) and 0 <= v.min() and v.max() <= 1 for v in out.values())


def test_range_checks():
    for bad in ({"mu": -1.0}, {"gamma": 1.0}, {"portion_max": 0.2}, {"superpixel_scale": 0.0}):
        with pytest.raises(ValueError):
            _hp(**bad)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        slrt.Hyperparams(batch_size=1)  # DeepLab-v3's pooling batch norm: four workers at batch 1 cannot train it


def test_deeplab_v3_head_embeds_s2s_pixel_features():
    from methods.shared.segmenter import DeepLabV3Head, Features

    torch.manual_seed(0)
    head = DeepLabV3Head(8, 3, rates=(1, 2, 3), channels=16).eval()
    features = Features(torch.randn(2, 8, 5, 5))
    embedding = head.embed(features)
    assert embedding.shape == (2, 16, 5, 5)
    assert torch.allclose(head.classifier(embedding), head(features), atol=1e-6)


def test_eval_forward_pseudo_labels_rank_the_outputs_alg1_saw():
    hp = _hp(pseudo_label_forward="eval", semantic_transfer=False, adversarial=False)
    modules = _seeded(hp)
    with torch.no_grad():  # running statistics that differ from the batch's, as after training
        for module in modules.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    metrics, _, before, ctx = _run_step(hp, modules=modules)
    assert all(m.training for m in ctx.modules.values())  # modes restored
    _forward(before, _batch().source_image)  # the step's two train-mode forwards move the running statistics first
    _, train_logits, _ = _forward(before, _batch().target_image)
    before.eval()
    with torch.no_grad():
        _, eval_logits, _ = _forward(before, _batch().target_image)
    labels = _eq5(eval_logits, LAMBDAS.clone())
    assert not torch.equal(labels, _eq5(train_logits, LAMBDAS.clone()))
    ce = F.cross_entropy(_up(train_logits), labels, ignore_index=U, reduction="sum") / labels.numel()
    assert metrics["loss_seg_target"].item() == pytest.approx(ce.item(), rel=1e-5)
