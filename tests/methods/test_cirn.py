"""CIRN: every equation on hand values, and step-level tests that recompute each optimiser's loss from the paper's
equations (Eq. 1-9) with the modules' own forward passes and compare gradients (../shared/STYLE.md)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

import methods
import search_spaces
from methods import cirn
from methods.contract import Batch, SampleImages, StagePosition, StepContext, TaskInfo
from methods.shared.segmenter import Features, imagenet_normalise

INFO = TaskInfo(num_classes=3, in_channels=3, class_names=("road", "car", "sky"))
SIZE = (32, 64)  # divisible by 4 (G) and by 32 (the output-space D)
TINY = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "batch_size": 2,
    "generator_filters": 4,
    "generator_blocks": 1,
    "patch_discriminator_filters": 4,
    "pool_size": 4,
    "source_steps": 10,
    "translation_steps": 10,
    "adaptation_steps": 10,
    "self_training_steps": 10,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models are too small to share, and oversubscribed threads on a loaded machine
    make each step 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hp(**overrides) -> cirn.Hyperparams:
    return cirn.Hyperparams(**{**TINY, **overrides})


def _build(hp: cirn.Hyperparams, seed: int = 0):
    torch.manual_seed(seed)
    return cirn.build(hp, INFO)


def _stage(hp, name):
    return next(s for s in cirn.stages(hp) if s.name == name)


def _modes(modules, stage):
    """What the platform does for a stage: its modules train with gradients, all others are frozen in eval mode."""
    for name, module in modules.items():
        module.train(name in stage.trains)
        module.requires_grad_(name in stage.trains)


def _enter(hp, modules, name, state=None, num_steps=10):
    """Enter a stage as the platform does: modes, optimisers, then `on_start` (all eval, no grad) merged into state."""
    stage = _stage(hp, name)
    _modes(modules, stage)
    optims = stage.optimizers(hp, modules, num_steps)
    ctx = StepContext(
        hp=hp,
        info=INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state=cirn.init_state(hp, INFO) if state is None else state,
        stage=name,
        stage_step=0,
        stage_steps=num_steps,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    if stage.on_start is not None:
        training = {n: m.training for n, m in modules.items()}
        modules.eval()
        with torch.no_grad():
            ctx.state.update(stage.on_start(ctx) or {})
        for n, m in modules.items():
            m.train(training[n])
    return stage, ctx, optims


def _batch(seed=0, extras=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (2, *SIZE), generator=g)
    labels[0, :2] = 255  # some ignored pixels
    return Batch(
        source_image=torch.rand(2, 3, *SIZE, generator=g),
        source_label=labels,
        target_image=torch.rand(2, 3, *SIZE, generator=g),
        target_extras=extras or {},
    )


def _capture(optimizer, modules, names):
    """The gradients an optimiser steps with, by parameter name, captured by a hook on `step`."""
    grads = {}

    def hook(opt, args, kwargs):
        for module in names:
            for n, p in modules[module].named_parameters():
                grads[f"{module}.{n}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()

    optimizer.register_step_pre_hook(hook)
    return grads


def _grads(loss, reference, names):
    named = [(f"{m}.{n}", p) for m in names for n, p in reference[m].named_parameters()]
    values = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, values)}


def _assert_grads_equal(ours, theirs, atol=1e-6, rtol=1e-4):
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=atol, rtol=rtol), name


def _grads_differ(ours, theirs):
    return any(not torch.allclose(ours[n], theirs[n], atol=1e-6, rtol=1e-4) for n in ours)


def _constant_output(discriminator, value):
    """Make a discriminator output `value` everywhere: its last convolution's weights 0, its bias the value."""
    last = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _norm(images):
    return imagenet_normalise(images)


# ------------------------------------------------------------------------------------------ hand values: stage 2


def test_cosine_distance_by_hand():
    p = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    q = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    assert cirn.cosine_distance(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert cirn.cosine_distance(p, q).item() == pytest.approx(1 - 0.375 / 0.625)  # 0.4
    one, other = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert cirn.cosine_distance(one, other).item() == pytest.approx(1.0)
    assert cirn.cosine_distance(torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)).shape == (2, 1, 4, 5)


def test_weight_map_and_weighted_bce_by_hand():
    r = torch.tensor([0.4, 0.0, 1.0])
    assert cirn.adversarial_weights(r, 40.0, 0.4).tolist() == pytest.approx([16.4, 0.4, 40.4])
    logits = torch.zeros(1, 1, 1, 2)
    weights = torch.tensor([16.4, 0.4]).view(1, 1, 1, 2)
    assert cirn.weighted_domain_bce(logits, 1.0, weights).item() == pytest.approx(math.log(2) * 8.4)
    x = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)  # BCE vs 1 is softplus(−x), vs 0 softplus(x)
    assert cirn.weighted_domain_bce(x, 1.0).item() == pytest.approx((F.softplus(-x)).mean().item())
    assert cirn.weighted_domain_bce(x, 0.0).item() == pytest.approx((F.softplus(x)).mean().item())
    # λ_cos = 0 with ε = 1 is the unweighted loss
    w = cirn.adversarial_weights(torch.rand(1, 1, 1, 2), 0.0, 1.0)
    assert cirn.weighted_domain_bce(x, 1.0, w).item() == pytest.approx(cirn.weighted_domain_bce(x, 1.0).item())


def test_weight_discrepancy_by_hand_and_its_gradient_vanishes_for_equal_weights():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0])
    c, d = torch.tensor([2.0, 1.0]), torch.tensor([2.0])
    assert cirn.weight_discrepancy([a, b], [c, d]).item() == pytest.approx(8 / 9)  # (1,2,2)·(2,1,2) / 9
    assert cirn.weight_discrepancy([a], [-a]).item() == pytest.approx(-1.0)
    w1 = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w2 = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g1, g2 = torch.autograd.grad(cirn.weight_discrepancy([w1], [w2]), [w1, w2])
    assert g1.abs().max() < 1e-7 and g2.abs().max() < 1e-7  # choice 7: exact copies never get pushed apart


def test_eq6_on_the_summed_logits_and_clan_s_per_classifier_terms():
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    summed = cirn.segmentation_terms(_hp(), z, z, label, 255)
    assert summed.item() == pytest.approx(math.log(1 + math.exp(-2)))  # CE of (2, 0): 0.126928
    each = cirn.segmentation_terms(_hp(seg_loss_terms="each"), z, z, label, 255)
    assert each.item() == pytest.approx(2 * math.log(1 + math.exp(-1)))  # 0.626523
    assert cirn.segmentation_terms(_hp(), z, None, label, 255).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_eq8_composition():
    hp = _hp()
    total = cirn.stage2_objective(hp, torch.tensor(0.5), torch.tensor(2.0), torch.tensor(0.8))
    assert total.item() == pytest.approx(0.5 + 0.001 * 2.0 + 0.01 * 0.8)  # 0.51


def _acm(modules: int, attention="residual"):
    classifier = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        classifier.weight.fill_(1.0)
        classifier.bias.fill_(0.1)
    head = cirn.AncillaryClassifier(_PixelHead(classifier), 1, modules, attention)
    for module in head.attention:
        torch.nn.init.zeros_(module.conv.weight)  # a = σ(0) = 0.5 everywhere
    return head


class _PixelHead(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, features):
        return self.conv(features.main)


def test_acm_by_hand():
    from methods.shared.segmenter import Features

    f = Features(torch.full((1, 1, 4, 4), 2.0))
    # K = 2, (1 + 0.5)·2 through w = 1, b = 0.1, summed over the two modules
    assert torch.allclose(_acm(2)(f), torch.full((1, 1, 4, 4), 2 * (1.5 * 2 + 0.1)))  # 6.2
    assert torch.allclose(_acm(0)(f), torch.full((1, 1, 4, 4), 2.1))  # K = 0: the plain classifier
    assert torch.allclose(_acm(2, "multiply")(f), torch.full((1, 1, 4, 4), 2 * (0.5 * 2 + 0.1)))  # 2.2
    head = _acm(3)
    torch.manual_seed(0)
    for module in head.attention:
        torch.nn.init.normal_(module.conv.weight)
    features = Features(torch.randn(2, 1, 6, 10))
    maps = head.attention_maps(features)
    assert all(m.shape == (2, 1, 6, 10) and m.min() >= 0 and m.max() <= 1 for m in maps)
    each = [head.classifier(features._replace(main=features.main * (1 + a))) for a in maps]
    assert torch.allclose(head(features), sum(each))  # the output is the sum of the K modules


def test_attention_module_is_seans_pooled_sigmoid_map():
    module = cirn.AttentionModule(4)
    torch.manual_seed(1)
    torch.nn.init.normal_(module.conv.weight)
    f = torch.randn(2, 4, 8, 12)
    pooled = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)(f)
    upsampled = torch.nn.UpsamplingBilinear2d(size=(8, 12))(pooled)  # SEAN: upsample, then the 1x1 conv
    expected = torch.sigmoid(F.conv2d(upsampled, module.conv.weight))
    assert torch.allclose(module(f), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ hand values: stage 1


def test_gan_losses_and_eq3_by_hand():
    d = torch.tensor([0.5, 1.0])
    assert cirn.gan_loss(d, True, "lsgan").item() == pytest.approx(0.125)
    assert cirn.gan_loss(d, False, "lsgan").item() == pytest.approx(0.625)
    assert cirn.gan_loss(torch.zeros(2), True, "vanilla").item() == pytest.approx(math.log(2))
    loss = cirn.patch_discriminator_loss(torch.tensor([0.8]), torch.tensor([0.3]), "lsgan")
    assert loss.item() == pytest.approx(0.5 * (0.04 + 0.09))
    x = torch.zeros(1, 1, 2, 2)
    assert cirn.cycle_loss(x + 0.5, x, x - 0.25, x).item() == pytest.approx(0.75)
    hp = _hp(lambda_identity=0.5)
    total = cirn.stage1_generator_objective(
        hp, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.1), torch.tensor(4.0), torch.tensor(0.2)
    )
    assert total.item() == pytest.approx(1.0 + 2.0 + 10 * 0.1 + 1.0 * 4.0 + 0.5 * 0.2)


def test_random_crop_takes_the_same_window_for_image_and_label():
    images = torch.arange(2 * 8 * 12, dtype=torch.float32).view(2, 1, 8, 12)
    labels = images[:, 0].long()
    crops, crop_labels = cirn.random_crop(images, labels, 4, torch.Generator().manual_seed(3))
    assert crops.shape == (2, 1, 4, 4) and crop_labels.shape == (2, 4, 4)
    assert torch.equal(crops[:, 0].long(), crop_labels)
    again, _ = cirn.random_crop(images, labels, 4, torch.Generator().manual_seed(3))
    assert torch.equal(again, crops)  # randomness only from the generator
    same, same_labels = cirn.random_crop(images, labels, 0, torch.Generator())
    assert same is images and same_labels is labels
    with pytest.raises(ValueError, match="multiple of 4"):
        _hp(translation_crop=6)


# ------------------------------------------------------------------------------------------ hand values: stage 3


def test_median_capped_thresholds_by_hand():
    confidence = torch.tensor([0.6, 0.95, 0.97, 0.99, 0.3, 0.5, 0.7])
    prediction = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    thresholds = cirn.median_capped_thresholds(confidence, prediction, 3, cap=0.9)
    # class 0: rank round(2) = 2 → 0.97, capped at 0.9; class 1: rank round(1.5) = 2 → 0.7; class 2: no pixel → 0
    assert thresholds.tolist() == pytest.approx([0.9, 0.7, 0.0])
    labels = cirn.apply_thresholds(
        prediction.view(1, 1, 7), confidence.double().view(1, 1, 7) * 255, thresholds * 255, 255
    )
    assert labels.view(-1).tolist() == [255, 0, 0, 0, 255, 255, 1]  # 3 of 4 and 1 of 3 kept
    # round half to even: 5 pixels → rank round(2.5) = 2; 1 pixel → rank 0
    five = cirn.median_capped_thresholds(
        torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), torch.zeros(5, dtype=torch.long), 1, 0.9
    )
    assert five.item() == pytest.approx(0.3)
    one = cirn.median_capped_thresholds(torch.tensor([0.42]), torch.zeros(1, dtype=torch.long), 1, 0.9)
    assert one.item() == pytest.approx(0.42)


def test_class_portion_thresholds_by_hand():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.55])
    prediction = torch.tensor([0] * 10 + [1])
    thresholds = cirn.class_portion_thresholds(confidence, prediction, 3, portion=0.2)
    # class 0 descending: rank ⌊0.2·10⌋ = 2 → 0.7 (3 pixels kept); class 1: rank 0 → 0.55; class 2 absent → 1
    assert thresholds.tolist() == pytest.approx([0.7, 0.55, 1.0])


def test_histogram_thresholds_agree_with_the_rules_on_quantised_confidences():
    torch.manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(4, 3, 9, 11), dim=1)
    probabilities[:, 2] = probabilities[:, 2] * 0  # class 2 is never the argmax
    confidence, prediction = probabilities.max(1)
    levels = cirn.quantise(confidence)
    histograms = cirn.confidence_histograms(levels, prediction, 3)
    assert histograms.shape == (3, 256) and int(histograms.sum()) == levels.numel()
    quantised = levels.double().flatten() / 255
    for rule, exact in (
        ("median_capped", cirn.median_capped_thresholds(quantised, prediction.flatten(), 3, 0.9)),
        ("class_portion", cirn.class_portion_thresholds(quantised, prediction.flatten(), 3, 0.2)),
    ):
        from_histograms = cirn.threshold_levels(histograms, rule, cap=0.9, portion=0.2)
        assert torch.allclose(from_histograms / 255, exact, atol=1e-9), rule
    assert cirn.threshold_levels(histograms, "argmax", 0.9, 0.2).tolist() == [0.0, 0.0, 0.0]
    # by hand in levels: class 0 at levels {100, 250, 250, 252}: rank 2 → 250, capped at 0.9·255; class 1 at
    # {10, 20, 30}: rank round(1.5) = 2 → 30, or for CBST at p = 0.5 descending rank 1 → 20; class 2 empty
    counts = torch.zeros(3, 256, dtype=torch.long)
    counts[0, 100], counts[0, 250], counts[0, 252] = 1, 2, 1
    counts[1, 10], counts[1, 20], counts[1, 30] = 1, 1, 1
    assert cirn.threshold_levels(counts, "median_capped", 0.9, 0.5).tolist() == pytest.approx([229.5, 30.0, 0.0])
    assert cirn.threshold_levels(counts, "class_portion", 0.9, 0.5).tolist() == pytest.approx([250.0, 20.0, 255.0])
    # the cap in level units keeps exactly the pixels whose confidence rounds to at least 0.9
    assert cirn.quantise(torch.tensor([0.8995, 0.9005])).tolist() == [229, 230]
    kept = cirn.apply_thresholds(
        torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[229, 230]]]), torch.tensor([0.9 * 255]), 255
    )
    assert kept.view(-1).tolist() == [255, 0]


def test_apply_thresholds_keeps_ignored_pixels_ignored():
    prediction = torch.tensor([[[0, 1, 255]]])
    levels = torch.tensor([[[255, 0, 255]]])
    labels = cirn.apply_thresholds(prediction, levels, torch.tensor([0.0, 0.0, 0.0]), 255)
    assert labels.tolist() == [[[0, 1, 255]]]


# ------------------------------------------------------------------------------------------ stage 0 and 1 steps


def test_source_step_trains_s_on_the_source_cross_entropy():
    hp = _hp()
    modules = _build(hp)
    stage, ctx, _ = _enter(hp, modules, "source")
    assert not stage.uses_target and stage.trains == ("source_segmenter",)
    reference = copy.deepcopy(modules)
    grads = _capture(ctx.optimizers["source_segmenter"], modules, ["source_segmenter"])
    batch = _batch()
    metrics = cirn.source_step(ctx, dataclasses.replace(batch, target_image=None))
    loss = F.cross_entropy(
        _up(reference["source_segmenter"](_norm(batch.source_image)), SIZE), batch.source_label, ignore_index=255
    )
    assert metrics["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-6)
    _assert_grads_equal(grads, _grads(loss, reference, ["source_segmenter"]))


def _stage1_losses(hp, reference, batch):
    """Eq. 1-5 recomputed from the paper with least-squares GAN terms, from the modules' forward passes."""
    g, f = reference["generator_s2t"], reference["generator_t2s"]
    d_t, d_s = reference["discriminator_t"], reference["discriminator_s"]
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    fake_t, fake_s = g(x_s), f(x_t)
    gan_g = ((d_t(fake_t) - 1) ** 2).mean()  # G fools D_T: D_T(G(x_s)) → real
    gan_f = ((d_s(fake_s) - 1) ** 2).mean()
    cyc = (f(fake_t) - x_s).abs().mean() + (g(fake_s) - x_t).abs().mean()  # F(G(x_s)), G(F(x_t))
    s_logits = reference["source_segmenter"](_norm((fake_t + 1) / 2))
    sem = F.cross_entropy(_up(s_logits, SIZE), batch.source_label, ignore_index=255)  # Eq. 4 against y_s
    generators = gan_g + gan_f + hp.lambda_cyc * cyc + hp.lambda_sem * sem
    fake_t, fake_s = fake_t.detach(), fake_s.detach()  # the pools are empty: the current fakes are used
    discriminators = 0.5 * (((d_t(x_t) - 1) ** 2).mean() + (d_t(fake_t) ** 2).mean()) + 0.5 * (
        ((d_s(x_s) - 1) ** 2).mean() + (d_s(fake_s) ** 2).mean()
    )
    return generators, discriminators, sem


def test_translation_step_gradients_follow_eq_5_and_the_corrected_eq_3():
    hp = _hp(lambda_cyc=3.0, lambda_sem=2.0)
    modules = _build(hp)
    stage, ctx, _ = _enter(hp, modules, "translate")
    reference = copy.deepcopy(modules)
    grads_g = _capture(ctx.optimizers["generators"], modules, cirn.GENERATORS)
    grads_d = _capture(ctx.optimizers["patch_discriminators"], modules, cirn.PATCH_DISCRIMINATORS)
    batch = _batch()
    metrics = cirn.translation_step(ctx, batch)
    generators, discriminators, sem = _stage1_losses(hp, reference, batch)
    assert metrics["loss_g"].item() == pytest.approx(generators.item(), rel=1e-5)
    assert (metrics["loss_d_t"] + metrics["loss_d_s"]).item() == pytest.approx(discriminators.item(), rel=1e-5)
    assert metrics["loss_sem"].item() == pytest.approx(sem.item(), rel=1e-5)
    _assert_grads_equal(grads_g, _grads(generators, reference, cirn.GENERATORS))
    _assert_grads_equal(grads_d, _grads(discriminators, reference, cirn.PATCH_DISCRIMINATORS))
    # Eq. 3 as printed, F(G(x_t)), would give another cycle loss than the one the step used
    g, f = reference["generator_s2t"], reference["generator_t2s"]
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    with torch.no_grad():
        corrected = (f(g(x_s)) - x_s).abs().mean() + (g(f(x_t)) - x_t).abs().mean()
        printed = (f(g(x_s)) - x_s).abs().mean() + (f(g(x_t)) - x_t).abs().mean()
    assert metrics["loss_cyc"].item() == pytest.approx(corrected.item(), rel=1e-5)
    assert abs(printed.item() - corrected.item()) > 1e-3
    assert [len(ctx.state["pool_s"]), len(ctx.state["pool_t"])] == [2, 2]


def test_semantic_loss_reaches_g_through_the_frozen_source_model_only():
    """L_sem's gradient reaches G (not F) through S, and S is frozen. λ_sem is large and λ_cyc 0 so that L_sem
    dominates G's gradient (an untrained S passes a small one)."""
    hp = _hp(lambda_sem=1e4, lambda_cyc=0.0)
    modules = _build(hp)
    _, ctx, _ = _enter(hp, modules, "translate")
    s = modules["source_segmenter"]
    assert not s.training and not any(p.requires_grad for p in s.parameters())
    before = copy.deepcopy(s.state_dict())  # weights and batch-norm statistics
    reference = copy.deepcopy(modules)
    grads = _capture(ctx.optimizers["generators"], modules, cirn.GENERATORS)
    batch = _batch()
    cirn.translation_step(ctx, batch)
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())
    assert all(p.grad is None for p in s.parameters())
    with_sem, _, _ = _stage1_losses(hp, reference, batch)
    _assert_grads_equal(grads, _grads(with_sem, reference, cirn.GENERATORS))
    without_sem, _, _ = _stage1_losses(dataclasses.replace(hp, lambda_sem=0.0), reference, batch)
    expected = _grads(without_sem, reference, cirn.GENERATORS)
    g_names = [n for n in grads if n.startswith("generator_s2t")]
    f_names = [n for n in grads if n.startswith("generator_t2s")]
    assert _grads_differ({n: grads[n] for n in g_names}, {n: expected[n] for n in g_names})  # L_sem reached G
    _assert_grads_equal({n: grads[n] for n in f_names}, {n: expected[n] for n in f_names})  # and not F


def test_patch_discriminator_labels_are_pinned():
    c = 0.3
    for mode, real, fake in (
        ("lsgan", (c - 1) ** 2, c**2),
        ("vanilla", math.log(1 + math.exp(-c)), math.log(1 + math.exp(c))),
    ):
        hp = _hp(gan_mode=mode)
        modules = _build(hp)
        _, ctx, _ = _enter(hp, modules, "translate")
        for name in cirn.PATCH_DISCRIMINATORS:
            _constant_output(modules[name], c)
        metrics = cirn.translation_step(ctx, _batch())
        assert metrics["loss_gan_g"].item() == pytest.approx(real, rel=1e-5)  # generators want "real"
        assert metrics["loss_gan_f"].item() == pytest.approx(real, rel=1e-5)
        assert metrics["loss_d_t"].item() == pytest.approx(0.5 * (real + fake), rel=1e-5)
        assert metrics["loss_d_s"].item() == pytest.approx(0.5 * (real + fake), rel=1e-5)


# ------------------------------------------------------------------------------------------ stage 2 steps


def _stage2_losses(hp, reference, batch, detach_weight_map=False):
    """Eq. 6-8 and CLAN's weight discrepancy recomputed from the paper, and D's side of Eq. 7."""
    with torch.no_grad():
        x_i = (reference["generator_s2t"](batch.source_image * 2 - 1) + 1) / 2 if hp.use_cir else batch.source_image
        x_i = x_i.clamp(0, 1)
    segmenter, acm, d = reference["segmenter"], reference["acm"], reference["discriminator"]
    f_i = segmenter.encode(_norm(x_i))
    z_i = segmenter.classify(f_i) + acm(f_i)
    seg = F.cross_entropy(_up(z_i, SIZE), batch.source_label, ignore_index=255)  # Eq. 6 on softmax(z_C + z_ACM)
    f_t = segmenter.encode(_norm(batch.target_image))
    z_c, z_a = segmenter.classify(f_t), acm(f_t)
    p1, p2 = F.softmax(_up(z_c, SIZE), 1), F.softmax(_up(z_a, SIZE), 1)
    r = 1 - (p1 * p2).sum(1, keepdim=True) / (p1.norm(dim=1, keepdim=True) * p2.norm(dim=1, keepdim=True))
    weights = hp.lambda_cos * (r.detach() if detach_weight_map else r) + hp.epsilon
    p_t = F.softmax(_up(z_c + z_a, SIZE), 1)
    d_t = _up(d(p_t), SIZE)
    adv = (weights * F.softplus(-d_t)).mean()  # −(λ_cos R + ε) log D(P_T): target predicted as CIR (label 1)
    w_c = torch.cat([p.reshape(-1) for p in segmenter.classifier.parameters()])
    w_a = torch.cat([p.reshape(-1) for p in acm.classifier.parameters()])
    weight = w_c @ w_a / (w_c.norm() * w_a.norm())
    segmenter_loss = seg + hp.lambda_adv * adv + hp.lambda_weight * weight
    d_i = _up(d(F.softmax(_up(z_i.detach(), SIZE), 1)), SIZE)
    d_t = _up(d(p_t.detach()), SIZE)
    w_d = hp.lambda_cos * r.detach() + hp.epsilon
    d_loss = F.softplus(-d_i).mean() + (w_d * F.softplus(d_t)).mean()  # −log D(P_I) − w log(1 − D(P_T))
    return segmenter_loss, d_loss, {"seg": seg, "adv": adv, "weight": weight, "r": r}


STUDENT = ("segmenter", "acm")


def _adapt(hp, seed=0):
    modules = _build(hp, seed)
    _, ctx, _ = _enter(hp, modules, "adapt")
    return modules, ctx


def test_adaptation_step_gradients_follow_eq_6_to_8():
    # large weights so that every term shows; independent classifiers, since L_W has no gradient at cosine 1
    hp = _hp(lambda_adv=1.0, lambda_weight=0.5, lambda_cos=3.0, epsilon=0.5, acm_init="independent")
    modules, ctx = _adapt(hp)
    reference = copy.deepcopy(modules)
    grads_s = _capture(ctx.optimizers["segmenter"], modules, STUDENT)
    grads_d = _capture(ctx.optimizers["discriminator"], modules, ("discriminator",))
    batch = _batch()
    metrics = cirn.adaptation_step(ctx, batch)
    segmenter_loss, d_loss, parts = _stage2_losses(hp, reference, batch)
    assert metrics["loss_seg"].item() == pytest.approx(parts["seg"].item(), rel=1e-5)
    assert metrics["loss_adv"].item() == pytest.approx(parts["adv"].item(), rel=1e-5)
    assert metrics["loss_weight"].item() == pytest.approx(parts["weight"].item(), rel=1e-5)
    assert metrics["loss_d"].item() == pytest.approx(d_loss.item(), rel=1e-5)
    assert metrics["cosine_distance_mean"].item() == pytest.approx(parts["r"].mean().item(), rel=1e-5)
    _assert_grads_equal(grads_s, _grads(segmenter_loss, reference, STUDENT))
    _assert_grads_equal(grads_d, _grads(d_loss, reference, ("discriminator",)))
    # the translator and S stay as they were: frozen modules, batch-norm buffers included
    for name in ("generator_s2t", "generator_t2s", "source_segmenter"):
        assert all(torch.equal(v, reference[name].state_dict()[k]) for k, v in modules[name].state_dict().items())


def test_adaptation_step_flipped_sign_or_swapped_labels_would_change_the_gradients():
    """Controls for the test above: the same recomputation with the segmenter's adversarial target swapped (the
    target predicted as target) gives other gradients, so that test can fail."""
    hp = _hp(lambda_adv=1.0, lambda_weight=0.5, lambda_cos=3.0, epsilon=0.5)
    modules, ctx = _adapt(hp)
    reference = copy.deepcopy(modules)
    grads_s = _capture(ctx.optimizers["segmenter"], modules, STUDENT)
    batch = _batch()
    cirn.adaptation_step(ctx, batch)
    _, _, parts = _stage2_losses(hp, reference, batch)
    d = reference["discriminator"]
    segmenter, acm = reference["segmenter"], reference["acm"]
    f_t = segmenter.encode(_norm(batch.target_image))
    z_c, z_a = segmenter.classify(f_t), acm(f_t)
    d_t = _up(d(F.softmax(_up(z_c + z_a, SIZE), 1)), SIZE)
    weights = hp.lambda_cos * parts["r"] + hp.epsilon
    swapped = parts["seg"] + hp.lambda_adv * (weights * F.softplus(d_t)).mean() + hp.lambda_weight * parts["weight"]
    assert _grads_differ(grads_s, _grads(swapped, reference, STUDENT))


def test_discriminator_labels_and_the_places_of_lambda_cos_and_epsilon():
    c = 0.7
    for lambda_cos, epsilon in ((0.0, 2.0), (2.0, 0.0), (3.0, 0.5)):
        hp = _hp(lambda_cos=lambda_cos, epsilon=epsilon)
        modules, ctx = _adapt(hp)
        _constant_output(modules["discriminator"], c)
        metrics = cirn.adaptation_step(ctx, _batch())
        mean_weight = lambda_cos * metrics["cosine_distance_mean"].item() + epsilon
        assert metrics["weight_map_mean"].item() == pytest.approx(mean_weight, rel=1e-5)
        # the segmenter wants target predictions taken for CIR ones (label 1): −w log σ(c)
        assert metrics["loss_adv"].item() == pytest.approx(mean_weight * math.log(1 + math.exp(-c)), rel=1e-5)
        # D: CIR → 1 unweighted, −log σ(c); target → 0 weighted, −w log(1 − σ(c))
        assert metrics["loss_d_source"].item() == pytest.approx(math.log(1 + math.exp(-c)), rel=1e-5)
        assert metrics["loss_d_target"].item() == pytest.approx(mean_weight * math.log(1 + math.exp(c)), rel=1e-5)
        assert metrics["d_source_mean"].item() == pytest.approx(1 / (1 + math.exp(-c)), rel=1e-5)
    assert 0 < metrics["cosine_distance_mean"].item() < 1


def test_epsilon_scales_the_adversarial_gradient_where_it_stands():
    """With R's contribution off (λ_cos = 0), the adversarial part of the segmenter's gradient is ε times that of
    ε = 1: measured as (grad at ε) − (grad at ε = 0)."""
    grads = {}
    for epsilon in (0.0, 1.0, 2.0):
        hp = _hp(lambda_adv=1.0, lambda_cos=0.0, epsilon=epsilon)
        modules, ctx = _adapt(hp)
        grads[epsilon] = _capture(ctx.optimizers["segmenter"], modules, STUDENT)
        cirn.adaptation_step(ctx, _batch())
    one = {n: grads[1.0][n] - grads[0.0][n] for n in grads[0.0]}
    two = {n: grads[2.0][n] - grads[0.0][n] for n in grads[0.0]}
    assert any(v.abs().sum() > 1e-6 for v in one.values())
    _assert_grads_equal(two, {n: 2 * v for n, v in one.items()}, atol=1e-6, rtol=1e-3)


def test_the_weight_map_sends_gradients_unless_detached():
    """With D constant, the segmenter's adversarial term reaches it only through R: the default lets it (CLAN),
    `detach_weight_map` does not."""
    for detach in (False, True):
        hp = _hp(lambda_adv=1.0, lambda_cos=5.0, epsilon=0.4, detach_weight_map=detach)
        modules, ctx = _adapt(hp)
        _constant_output(modules["discriminator"], 0.7)
        reference = copy.deepcopy(modules)
        grads = _capture(ctx.optimizers["segmenter"], modules, STUDENT)
        batch = _batch()
        cirn.adaptation_step(ctx, batch)
        through_r, _, _ = _stage2_losses(hp, reference, batch, detach_weight_map=False)
        constant_r, _, _ = _stage2_losses(hp, reference, batch, detach_weight_map=True)
        expected, other = (constant_r, through_r) if detach else (through_r, constant_r)
        _assert_grads_equal(grads, _grads(expected, reference, STUDENT))
        assert _grads_differ(grads, _grads(other, reference, STUDENT))


def test_the_acm_classifier_is_copied_from_c_when_stage_2_starts():
    for init in ("copy", "independent"):
        hp = _hp(acm_init=init)
        modules = _build(hp)
        c, acm = modules["segmenter"].classifier, modules["acm"]
        assert not torch.equal(acm.classifier.weight, c.weight)  # built with its own draw
        attention = copy.deepcopy(acm.attention.state_dict())
        state = {"pool_s": [torch.zeros(1)], "pool_t": [torch.zeros(1)]}
        _enter(hp, modules, "adapt", state=state)
        copied = all(torch.equal(v, c.state_dict()[k]) for k, v in acm.classifier.state_dict().items())
        assert copied == (init == "copy")
        assert all(torch.equal(v, attention[k]) for k, v in acm.attention.state_dict().items())
        assert state["pool_s"] == [] and state["pool_t"] == []  # stage 1's pools are freed


def test_build_makes_k_attention_modules_and_the_acm_sums_k_modulated_classifications():
    """Table 3's axis: `K` attention modules from `build`, and ACM(f) = Σ_k Cls((1 + a_k)⊙f) over exactly those."""
    for k in range(4):
        assert len(_build(_hp(K=k))["acm"].attention) == k
    acm = _build(_hp(K=3))["acm"]
    with torch.no_grad():
        for module in acm.attention:  # distinct maps, so that a module counted twice or skipped changes the sum
            module.conv.weight.normal_()
    features = Features(main=torch.randn(2, acm.attention[0].conv.in_channels, 5, 6))
    maps = [module(features.main) for module in acm.attention]  # each module by hand: test_attention_module_*
    assert all(not torch.equal(maps[0], a) for a in maps[1:])
    expected = sum(acm.classifier(features._replace(main=features.main * (1 + a))) for a in maps)
    torch.testing.assert_close(acm(features), expected)


def test_with_k_0_copied_classifiers_stay_identical_and_r_stays_zero():
    """Choice 7: K = 0 with `acm_init=copy` and Eq. 6 on the sum keeps ACM ≡ C (R ≡ 0); independent draws do not."""
    for init in ("copy", "independent"):
        hp = _hp(K=0, acm_init=init, lambda_adv=1.0, lambda_weight=1.0)
        modules, ctx = _adapt(hp)
        for step in range(2):
            ctx.stage_step = step
            metrics = cirn.adaptation_step(ctx, _batch(step))
        c, acm = modules["segmenter"].classifier, modules["acm"].classifier
        identical = torch.allclose(c.weight, acm.weight, atol=1e-7) and torch.allclose(c.bias, acm.bias, atol=1e-7)
        assert identical == (init == "copy")
        assert (metrics["cosine_distance_mean"].item() < 1e-6) == (init == "copy")


def test_stage_2_without_adaptation_is_supervised_training_of_c_on_cir_images():
    hp = _hp(adaptation=False, self_training=False)
    modules = _build(hp)
    assert "acm" not in modules and "discriminator" not in modules
    stage, ctx, _ = _enter(hp, modules, "adapt")
    assert stage.trains == ("segmenter",) and not stage.uses_target
    reference = copy.deepcopy(modules)
    grads = _capture(ctx.optimizers["segmenter"], modules, ["segmenter"])
    batch = dataclasses.replace(_batch(), target_image=None)
    metrics = cirn.adaptation_step(ctx, batch)
    with torch.no_grad():
        x_i = ((reference["generator_s2t"](batch.source_image * 2 - 1) + 1) / 2).clamp(0, 1)
    loss = F.cross_entropy(_up(reference["segmenter"](_norm(x_i)), SIZE), batch.source_label, ignore_index=255)
    assert metrics["loss_seg"].item() == pytest.approx(loss.item(), rel=1e-5)
    _assert_grads_equal(grads, _grads(loss, reference, ["segmenter"]))


def test_optimisers_hyperparameters_and_schedules():
    hp = _hp()
    modules = _build(hp)
    stage, ctx, optims = _enter(hp, modules, "adapt", num_steps=100)
    sgd = ctx.optimizers["segmenter"]
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([2.5e-4, 2.5e-3])
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    head = {id(p) for p in sgd.param_groups[1]["params"]}
    assert {id(p) for p in modules["acm"].parameters()} <= head  # the ACM at the head's 10x
    assert {id(p) for p in modules["segmenter"].classifier.parameters()} <= head
    adam = ctx.optimizers["discriminator"]
    assert adam.defaults["lr"] == 1e-4 and adam.defaults["betas"] == (0.9, 0.99)
    assert adam.defaults["weight_decay"] == 5e-4
    for _ in range(50):
        for optim in optims.values():
            optim.optimizer.step()
            optim.scheduler.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 0.5**0.9)  # poly at half the stage
    assert adam.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5**0.9)
    _, ctx, optims = _enter(hp, modules, "translate", num_steps=100)
    generators = ctx.optimizers["generators"]
    assert generators.defaults["lr"] == 2e-4 and generators.defaults["betas"] == (0.5, 0.999)
    for step in range(75):
        generators.step()
        optims["generators"].scheduler.step()
        if step == 48:
            assert generators.param_groups[0]["lr"] == pytest.approx(2e-4)  # constant for half the stage
    assert generators.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.5)  # then linearly to 0
    _, ctx, _ = _enter(hp, modules, "self_train", num_steps=100)
    assert [g["lr"] for g in ctx.optimizers["segmenter"].param_groups] == pytest.approx([2.5e-4, 2.5e-3])


# ------------------------------------------------------------------------------------------ stage 3 steps


def _after_stage_2(hp, seed=0):
    modules = _build(hp, seed)
    _, ctx, _ = _enter(hp, modules, "adapt")
    cirn.adaptation_step(ctx, _batch(5))  # a stage-2 model that is not the initial one
    return modules


def _pass(ctx, images):
    stage = _stage(ctx.hp, "self_train")
    with torch.no_grad():
        ctx.modules.eval()
        out = stage.target_pass.collect(ctx, images, None)
        for name in stage.trains:
            ctx.modules[name].train()
    gathered = {k: v for k, v in out.items() if k not in stage.target_pass.store}
    ctx.state.update(stage.target_pass.update(ctx, gathered))
    return {k: out[k] for k in stage.target_pass.store}


def test_offline_self_training_uses_the_stored_labels_and_the_whole_set_thresholds():
    hp = _hp()
    modules = _after_stage_2(hp)
    stage, ctx, _ = _enter(hp, modules, "self_train")
    assert (
        set(stage.target_pass.store) == {"pseudo_label", "confidence"} and stage.target_pass.schedule == "stage_start"
    )
    assert stage.target_pass.store["pseudo_label"].fill == 255 and "teacher" not in modules
    batch = _batch()
    stored = _pass(ctx, batch.target_image)
    # the stored maps are the stage-2 model's argmax and quantised confidence on the unaugmented images
    with torch.no_grad():
        modules.eval()
        f = modules["segmenter"].encode(_norm(batch.target_image))
        probabilities = F.softmax(_up(modules["segmenter"].classify(f) + modules["acm"](f), SIZE), 1)
        for name in stage.trains:
            modules[name].train()
    confidence, prediction = probabilities.max(1)
    assert torch.equal(stored["pseudo_label"].long(), prediction)
    assert torch.equal(stored["confidence"].long(), torch.round(confidence * 255).long())
    expected = cirn.median_capped_thresholds(
        stored["confidence"].double().flatten() / 255, prediction.flatten(), 3, 0.9
    )
    assert torch.allclose(ctx.state["pseudo_label_thresholds"] / 255, expected)
    # a flipped crop, as the store would hand it over, with one row outside the image (fill 255 / 0)
    extras = {k: v.flip(-1).clone() for k, v in stored.items()}
    extras["pseudo_label"][:, 0] = 255
    extras["confidence"][:, 0] = 0
    batch = dataclasses.replace(_batch(1), target_extras=extras)
    reference = copy.deepcopy(modules)
    grads = _capture(ctx.optimizers["segmenter"], modules, STUDENT)
    metrics = cirn.self_training_step(ctx, batch)
    thresholds = ctx.state["pseudo_label_thresholds"]
    labels = extras["pseudo_label"].long().clone()
    keep = (labels != 255) & (extras["confidence"].double() >= thresholds[labels.clamp(max=2)])
    labels[~keep] = 255
    f = reference["segmenter"].encode(_norm(batch.target_image))
    loss = F.cross_entropy(
        _up(reference["segmenter"].classify(f) + reference["acm"](f), SIZE), labels, ignore_index=255
    )
    assert metrics["loss_seg_target"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["pseudo_label_fraction"].item() == pytest.approx(keep.float().mean().item())
    assert metrics["pseudo_label_threshold/road"].item() == pytest.approx(thresholds[0].item() / 255)
    assert cirn.metric_name("traffic light") == "traffic_light"
    _assert_grads_equal(grads, _grads(loss, reference, STUDENT))
    assert "discriminator" not in stage.trains


def test_offline_step_without_stored_maps_only_for_batches_without_sample_identity():
    """A batch with no sample identity (the CLI's cost probe) cannot have stored maps and is labelled by the current
    model instead; a platform batch (with `target_index`) without its maps is an error, not a silent fallback."""
    hp = _hp(pseudo_label_rule="argmax")
    modules = _after_stage_2(hp)
    _, ctx, _ = _enter(hp, modules, "self_train")
    batch = _batch()
    _pass(ctx, batch.target_image)
    assert cirn.self_training_step(ctx, batch)["pseudo_label_fraction"].item() == 1.0
    with pytest.raises(ValueError, match="no stored pseudo labels"):
        cirn.self_training_step(ctx, dataclasses.replace(batch, target_index=torch.tensor([0, 1])))


def test_online_teacher_is_a_frozen_snapshot_of_the_stage_2_model():
    hp = _hp(pseudo_label_mode="online", pseudo_label_rule="argmax")
    modules = _after_stage_2(hp)
    teacher = modules["teacher"]
    assert set(teacher) == set(STUDENT)
    assert not torch.equal(teacher["segmenter"].classifier.weight, modules["segmenter"].classifier.weight)
    stage, ctx, _ = _enter(hp, modules, "self_train")
    assert stage.target_pass.store == {}
    for name in STUDENT:  # on_start copied the student into the teacher
        assert all(torch.equal(v, modules[name].state_dict()[k]) for k, v in teacher[name].state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    _pass(ctx, _batch().target_image)
    snapshot = copy.deepcopy(teacher.state_dict())  # weights and batch-norm buffers
    for step in range(2):
        ctx.stage_step = step
        batch = _batch(step)
        with torch.no_grad():
            f = teacher["segmenter"].encode(_norm(batch.target_image))
            labels = _up(teacher["segmenter"].classify(f) + teacher["acm"](f), SIZE).argmax(1)  # argmax rule
        f = modules["segmenter"].encode(_norm(batch.target_image))
        with torch.no_grad():
            loss = F.cross_entropy(_up(modules["segmenter"].classify(f) + modules["acm"](f), SIZE), labels)
        metrics = cirn.self_training_step(ctx, batch)
        assert metrics["loss_seg_target"].item() == pytest.approx(loss.item(), rel=1e-4)
        assert metrics["pseudo_label_fraction"].item() == 1.0
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(teacher["segmenter"].classifier.weight, modules["segmenter"].classifier.weight)


def test_every_stage_changes_exactly_its_modules():
    for mode in ("offline", "online"):
        hp = _hp(pseudo_label_mode=mode)
        modules = _build(hp)
        state = cirn.init_state(hp, INFO)
        for stage in cirn.stages(hp):
            _, ctx, _ = _enter(hp, modules, stage.name, state=state)
            extras = _pass(ctx, _batch().target_image) if stage.name == "self_train" else {}
            before = copy.deepcopy(modules.state_dict())
            for step in range(2):
                ctx.stage_step = step
                batch = _batch(step, extras)
                losses = stage.step(ctx, batch if stage.uses_target else dataclasses.replace(batch, target_image=None))
                assert all(torch.isfinite(v) for v in losses.values()), stage.name
            after = modules.state_dict()
            for key in before:
                module = key.split(".")[0]
                if module not in stage.trains:
                    assert torch.equal(before[key], after[key]), (stage.name, key)
            for module in stage.trains:
                assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(module + ".")), module


# ------------------------------------------------------------------------------------------ switches, reuse


def test_switches_give_the_table_4_pipelines():
    names = lambda **kw: [s.name for s in cirn.stages(_hp(**kw))]
    assert names() == ["source", "translate", "adapt", "self_train"]
    assert names(use_cir=False, adaptation=False, self_training=False) == ["adapt"]  # SO
    assert names(adaptation=False, self_training=False) == ["source", "translate", "adapt"]  # CIR
    assert names(use_cir=False, self_training=False) == ["adapt"]  # ASS
    assert names(self_training=False) == ["source", "translate", "adapt"]  # CIR+ASS
    assert names(use_cir=False) == ["adapt", "self_train"]  # ASS+ST
    assert names(lambda_sem=0.0) == ["translate", "adapt", "self_train"]  # plain CycleGAN: no S to train
    assert names(last_stage="translate") == ["source", "translate"]
    assert [s.budget.steps for s in cirn.stages(_hp(source_steps=3, translation_steps=4))] == [3, 4, 10, 10]
    paper = cirn.Hyperparams()
    assert [s.budget.steps for s in cirn.stages(paper)] == [100_000] * 4
    assert (paper.K, paper.lambda_adv, paper.lambda_cos, paper.epsilon) == (2, 0.001, 40.0, 0.4)
    assert {"source_segmenter", "generator_s2t"}.isdisjoint(_build(_hp(use_cir=False)))
    with pytest.raises(ValueError, match="last_stage=translate is not among"):
        _hp(use_cir=False, last_stage="translate")
    with pytest.raises(ValueError, match="translator_weights needs use_cir=True"):
        _hp(use_cir=False, translator_weights="x.pt")
    with pytest.raises(ValueError, match="K must be >= 0"):
        _hp(K=-1)


def test_reused_stages_load_their_modules_and_are_skipped(tmp_path):
    hp = _hp()
    trained = _build(hp, seed=1)
    path = str(tmp_path / "cirn.pt")
    torch.save(trained.state_dict(), path)

    def same(a, b):
        return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    reused_hp = _hp(translator_weights=path)
    reused = _build(reused_hp)
    assert [s.name for s in cirn.stages(reused_hp)] == ["adapt", "self_train"]
    for name in ("generator_s2t", "generator_t2s", "discriminator_t", "discriminator_s", "source_segmenter"):
        assert same(reused[name], trained[name]), name
    assert not same(reused["segmenter"], trained["segmenter"])
    adapted = _build(_hp(adapted_weights=path))
    assert [s.name for s in cirn.stages(_hp(adapted_weights=path))] == ["self_train"]
    for name in ("segmenter", "acm", "discriminator", "generator_s2t"):
        assert same(adapted[name], trained[name]), name
    # a source_only checkpoint (keys segmenter.*) or a cirn one (source_segmenter.*) gives S
    source_only = str(tmp_path / "source_only.pt")
    torch.save({f"segmenter.{k}": v for k, v in trained["segmenter"].state_dict().items()}, source_only)
    s = _build(_hp(source_segmenter_weights=source_only))
    assert same(s["source_segmenter"], trained["segmenter"])
    assert [x.name for x in cirn.stages(_hp(source_segmenter_weights=source_only))] == [
        "translate",
        "adapt",
        "self_train",
    ]
    # module keys do not depend on the weights files: checkpoints rebuild with the fields cleared
    assert set(reused.state_dict()) == set(_build(hp).state_dict()) == set(adapted.state_dict())
    assert set(reused) == set(_build(dataclasses.replace(reused_hp, translator_weights="")))
    with pytest.raises(ValueError, match="holds no 'generator_s2t' weights"):
        _build(_hp(translator_weights=source_only))
    with pytest.raises(ValueError, match="give at most one of"):
        _hp(translator_weights=path, adapted_weights=path)


def test_predict_follows_the_stage_and_samples_show_the_cir():
    hp = _hp()
    modules = _build(hp)
    modules.eval()
    images = torch.rand(2, 3, *SIZE)
    for name in ("source", "translate"):
        expected = _up(modules["source_segmenter"](_norm(images)), SIZE)
        assert torch.equal(cirn.predict(hp, modules, images, StagePosition(name)), expected)
    f = modules["segmenter"].encode(_norm(images))
    expected = _up(modules["segmenter"].classify(f) + modules["acm"](f), SIZE)
    for index, name in ((2, "adapt"), (3, "self_train")):
        logits = cirn.predict(hp, modules, images, StagePosition(name, index))
        assert logits.shape == (2, 3, *SIZE) and torch.allclose(logits, expected, atol=1e-6)
    plain = _build(_hp(adaptation=False))
    plain.eval()
    assert torch.equal(
        cirn.predict(_hp(adaptation=False), plain, images, StagePosition("adapt")),
        _up(plain["segmenter"](_norm(images)), SIZE),
    )
    pictures = SampleImages(target=images, source=torch.rand(2, 3, *SIZE))
    shown = cirn.samples(hp, modules, pictures, StagePosition("adapt", 2))
    assert set(shown) == {"source", "source_to_target", "target", "target_to_source"}
    with torch.no_grad():
        g_x = ((modules["generator_s2t"](pictures.source * 2 - 1) + 1) / 2).clamp(0, 1)
    assert torch.allclose(shown["source_to_target"], g_x)  # G(x_s), the CIR
    shown = cirn.samples(hp, modules, pictures, StagePosition("self_train", 3))
    assert set(shown) == {"target", "pseudo_label_argmax", "pseudo_label_confidence"}
    assert shown["pseudo_label_argmax"].shape == (2, 3, *SIZE) and shown["pseudo_label_confidence"].shape == (
        2,
        1,
        *SIZE,
    )
    assert all(0 <= v.min() and v.max() <= 1 for v in shown.values())
    assert cirn.samples(_hp(use_cir=False), _build(_hp(use_cir=False)), pictures, StagePosition("adapt")) == {}


def test_registered_with_a_search_space_that_fits():
    assert methods.get("cirn") is cirn.METHOD
    assert cirn.METHOD.imagenet_backbone  # "pretrained on ImageNet": a paper task refuses random weights silently
    space = search_spaces.load("cirn")
    assert space.default_task == "synthetic-urban" and not space.max_steps  # absolute stage budgets
    defaults = space.task_defaults["synthetic-urban"]
    methods.make_hyperparams(cirn.METHOD, defaults)
    assert [p["K"] for p in space.grid_points("table3")] == [0, 1, 2, 3, 4]
    assert [p["epsilon"] for p in space.grid_points("epsilon")] == [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert [p["lambda_cos"] for p in space.grid_points("lambda_cos")] == [1.0, 10.0, 20.0, 40.0, 80.0]
    rows = [
        [s.name for s in cirn.stages(methods.make_hyperparams(cirn.METHOD, p))] for p in space.grid_points("table4")
    ]
    assert rows == [
        ["adapt"],
        ["source", "translate", "adapt"],
        ["adapt"],
        ["source", "translate", "adapt"],
        ["adapt", "self_train"],
        ["source", "translate", "adapt", "self_train"],
    ]
    for grid in space.grids:
        for point in space.grid_points(grid):
            methods.make_hyperparams(cirn.METHOD, {**defaults, **point})
