"""CSCL's rules against values worked out by hand, and which parameters each line of Algorithm 2 updates."""

from __future__ import annotations

import math

import pytest
import torch

from methods import contract, cscl
from methods.contract import Batch, StepContext, TaskInfo


def pixels(*rows):
    """Per-pixel probability vectors → a (1, K, 1, N) map."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


# ------------------------------------------------------------------ Eq. 8-10


def test_soft_pseudo_labels_by_hand_including_the_zero_label():
    # δ = (0.9, 0.6), γ = 0.5 → (C_k/δ_k)^2
    probabilities = pixels((0.95, 0.05), (0.6, 0.4), (0.3, 0.7))
    labels = cscl.soft_pseudo_labels(probabilities, torch.tensor([0.9, 0.6]), gamma=0.5)[0, :, 0].T
    # pixel 1: (1.05556², 0.08333²) = (1.11420, 0.00694), Z = 1.12114 > 1 → kept
    assert labels[0].tolist() == pytest.approx([1.11420 / 1.12114, 0.00694 / 1.12114], abs=1e-4)
    # pixel 2: (0.66667², 0.66667²) = (0.44444, 0.44444), Z = 0.88889 < 1 → the zero label
    assert labels[1].tolist() == [0.0, 0.0]
    # pixel 3: (0.33333², 1.16667²) = (0.11111, 1.36111), Z = 1.47222 → kept; the lower threshold wins class 1
    assert labels[2].tolist() == pytest.approx([0.11111 / 1.47222, 1.36111 / 1.47222], abs=1e-4)


def test_the_kept_label_has_the_lower_selection_cost_and_minimises_it_over_the_simplex():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(1, 4, 6, 6, generator=generator) * 2, dim=1)
    thresholds = torch.tensor([0.5, 0.7, 0.3, 0.9])
    gamma = 0.25
    labels = cscl.soft_pseudo_labels(probabilities, thresholds, gamma)
    kept = labels.sum(1) > 0
    assert kept.any() and (~kept).any()
    cost = cscl.selection_cost(labels, probabilities, thresholds, gamma)
    log_ratio = torch.log(probabilities / thresholds.view(1, -1, 1, 1))
    optimum = torch.softmax(log_ratio / gamma, dim=1)  # Eq. 9's ŷ for every pixel, before the selection
    optimum_cost = cscl.selection_cost(optimum, probabilities, thresholds, gamma)
    assert torch.allclose(optimum_cost, -gamma * torch.logsumexp(log_ratio / gamma, dim=1), atol=1e-5)  # closed form
    assert (cost[kept] < 0).all() and (cost[~kept] == 0).all()  # kept: cheaper than S_C(0) = 0
    assert torch.all(optimum_cost[~kept] >= 0)  # where the zero label was chosen, ŷ would have cost more
    assert torch.allclose(labels[kept.unsqueeze(1).expand_as(labels)], optimum[kept.unsqueeze(1).expand_as(labels)])
    for _ in range(20):  # Eq. 9 minimises S_C over the simplex
        other = torch.softmax(torch.randn(1, 4, 6, 6, generator=generator), dim=1)
        assert torch.all(cscl.selection_cost(other, probabilities, thresholds, gamma) >= optimum_cost - 1e-5)


def test_target_term_of_eq7_by_hand():
    labels = pixels((0.5, 0.5), (0.0, 0.0))
    probabilities = pixels((0.8, 0.2), (0.3, 0.7))
    loss = cscl.target_segmentation_loss(labels, probabilities, torch.tensor([0.5, 0.5]), gamma=0.25)
    expected = -0.5 * math.log(1.6) - 0.5 * math.log(0.4) + 0.25 * 2 * 0.5 * math.log(0.5)  # only pixel 1 counts
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert cscl.target_segmentation_loss(labels * 0, probabilities, torch.ones(2), 0.25).item() == 0.0


# ------------------------------------------------------------------ Alg. 1


def test_class_thresholds_by_hand():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.55, 0.4])
    prediction = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # class 0 sorted (0.9, 0.8, 0.7, 0.6): index ⌊0.35·4⌋ = 1; class 1 (0.95, 0.55, 0.5): ⌊1.05⌋ = 1; class 2: 0;
    # class 3 is never predicted: δ = 1
    assert cscl.class_thresholds(confidence, prediction, 4, 0.35).tolist() == pytest.approx([0.8, 0.55, 0.4, 1.0])
    assert cscl.class_thresholds(confidence, prediction, 4, 0.5).tolist() == pytest.approx([0.7, 0.55, 0.4, 1.0])


def test_selection_amount_grows_five_points_per_epoch_to_fifty_percent():
    amounts = [cscl.selection_amount(e, 0.35, 0.05, 0.5) for e in range(6)]
    assert amounts == pytest.approx([0.35, 0.40, 0.45, 0.50, 0.50, 0.50])


# ------------------------------------------------------------------ Eq. 2, 11-13


def test_transferability_is_one_minus_the_binary_entropy():
    p = cscl.transferability(torch.tensor([0.0, math.log(3), 30.0, -30.0]))
    assert p.tolist() == pytest.approx([0.0, 1 + 0.75 * math.log2(0.75) + 0.25 * math.log2(0.25), 1.0, 1.0], abs=1e-5)
    features, attention = torch.full((1, 2, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    assert cscl.modulate(features, attention, "residual").flatten().tolist() == [3.0, 3.0]
    assert cscl.modulate(features, attention, "multiply").flatten().tolist() == [1.0, 1.0]
    assert cscl.modulate(features, None, "residual") is features


def test_symmetric_divergence_by_hand_symmetric_and_zero_for_equal_centroids():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    only_first = torch.tensor([True, False])
    assert cscl.symmetric_divergence(p, q, only_first).item() == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-5)
    both = torch.tensor([True, True])
    assert cscl.symmetric_divergence(p, q, both).item() == pytest.approx(0.25 * (kl_pq + kl_qp), rel=1e-5)
    assert cscl.symmetric_divergence(p, q, both).item() == pytest.approx(cscl.symmetric_divergence(q, p, both).item())
    assert cscl.symmetric_divergence(p, p, both).item() == pytest.approx(0.0, abs=1e-7)
    assert cscl.symmetric_divergence(p, q, torch.tensor([False, False])).item() == 0.0


def test_centroids_by_hand():
    features = torch.tensor([[[[1.0, 3.0, 5.0]], [[2.0, 0.0, 4.0]]]])  # (1, F=2, 1, 3)
    labels = torch.tensor([[[0, 0, 255]]])
    sums, counts = cscl.class_centroid_sums(features, cscl.source_class_weights(labels, 2, 255))
    assert (sums / counts.clamp_min(1e-8).unsqueeze(1))[0].tolist() == [2.0, 1.0] and counts.tolist() == [2.0, 0.0]
    pseudo = pixels((0.8, 0.2), (0.3, 0.7), (0.0, 0.0))  # Eq. 13: ŷ_k · 1[argmax ŷ = k]
    weights = cscl.target_class_weights(pseudo)
    assert weights[0, :, 0].T.flatten().tolist() == pytest.approx([0.8, 0.0, 0.0, 0.7, 0.0, 0.0])
    sums, counts = cscl.class_centroid_sums(features, weights)
    assert (sums[1] / counts[1]).tolist() == pytest.approx([3.0, 0.0])  # class 1: pixel 2 only
    assert cscl.as_distribution(torch.tensor([[1.0, 3.0]]), "l1").tolist() == [[0.25, 0.75]]
    assert cscl.as_distribution(torch.tensor([[0.0, math.log(3)]]), "softmax")[0].tolist() == pytest.approx(
        [0.25, 0.75]
    )


# ------------------------------------------------------------------ Eq. 3-6


def test_rewards_on_a_hand_made_prediction():
    with_p = pixels((0.7, 0.3), (0.4, 0.6), (0.2, 0.8), (0.6, 0.4))
    without_p = pixels((0.6, 0.4), (0.45, 0.55), (0.3, 0.7), (0.7, 0.3))
    labels = pixels((1, 0), (1, 0), (0, 1), (1, 0))
    # R^s: argmax right, wrong, right, right; R^a: 0.7 > 0.6, 0.4 < 0.45, 0.8 > 0.7, 0.6 < 0.7
    assert cscl.rewards(with_p, without_p, labels)[0, 0].tolist() == [2.0, 0.0, 2.0, 1.0]
    value = torch.tensor([[[1.5, 0.5, 2.0, 0.0]]])
    reward = torch.tensor([[[2.0, 0.0, 2.0, 1.0]]])
    valid = torch.tensor([[[True, True, False, True]]])
    assert cscl.reward_regression_loss(value, reward, valid).item() == pytest.approx((0.25 + 0.25 + 1.0) / 3)
    assert cscl.critic_loss(value).item() == pytest.approx(-1.0)


# ------------------------------------------------------------------ Alg. 2: who moves


INFO = TaskInfo(num_classes=3, in_channels=3, class_names=("a", "b", "c"))


def _context(**changes):
    torch.manual_seed(0)
    hp = cscl.Hyperparams(
        architecture="tiny",
        freeze_batchnorm=False,
        learning_rate=0.01,
        batch_size=2,
        discriminator_downsampling=2,
        **changes,
    )
    modules = cscl.build(hp, INFO)
    modules.train()
    optims = cscl.optimizers(hp, modules, 10)
    ctx = StepContext(
        hp=hp,
        info=INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={"thresholds": torch.tensor([0.6, 0.5, 0.7])},
        stage="adapt",
        stage_step=0,
        stage_steps=10,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    generator = torch.Generator().manual_seed(1)
    step = cscl.Step(
        x_s=torch.randn(2, 3, 64, 64, generator=generator),
        y_s=torch.randint(0, 3, (2, 64, 64), generator=generator),
        x_t=torch.randn(2, 3, 64, 64, generator=generator),
        delta=ctx.state["thresholds"],
    )
    return ctx, step


def _moved(ctx, run) -> set[str]:
    before = {n: p.detach().clone() for n, p in ctx.modules.named_parameters()}
    run()
    after = dict(ctx.modules.named_parameters())
    parts = {
        n: "C" if n.startswith("segmenter.classifier") else ("E" if n.startswith("segmenter") else n.split(".")[0])
        for n in before
    }
    return {parts[n] for n in before if not torch.equal(before[n], after[n])}


def test_each_line_of_algorithm_2_updates_exactly_its_parameters():
    ctx, step = _context()
    assert _moved(ctx, lambda: cscl.line4_update_segmenter_on_source(ctx, step)) == {"E", "C"}
    assert _moved(ctx, lambda: cscl.line5_pseudo_labels(ctx, step)) == set()
    assert step.labels_t.shape == (2, 3, 64, 64)
    assert _moved(ctx, lambda: cscl.line6_update_encoder_and_discriminator(ctx, step)) == {"E", "discriminator"}
    assert _moved(ctx, lambda: cscl.line7_update_quantizer(ctx, step)) == {"quantizer"}
    assert _moved(ctx, lambda: cscl.line8_update_critic(ctx, step)) == {"critic"}  # T_C's loss does not move E
    assert _moved(ctx, lambda: cscl.eq7_update_segmenter_on_target(ctx, step)) == {"E", "C"}


def test_a_full_step_and_the_ablation_switches():
    ctx, step = _context(pseudo_label_training="eq7")
    metrics = cscl.train_step(
        ctx, Batch(source_image=torch.rand(2, 3, 64, 64), source_label=step.y_s, target_image=torch.rand(2, 3, 64, 64))
    )
    assert {"loss_seg_source", "loss_adv", "loss_div", "loss_d", "loss_cri", "loss_reg", "loss_seg_target"} <= set(
        metrics
    )
    assert all(torch.isfinite(v) for v in metrics.values())
    assert "centroids_source" in ctx.state  # the EMA of choice 3

    no_tc, _ = _context(critical_transfer=False)
    assert set(no_tc.modules) == {"segmenter", "discriminator"}
    assert cscl.stages(no_tc.hp)[-1].trains == ("segmenter", "discriminator")
    no_cg, step_cg = _context(confidence_guided=False)
    assert cscl.stages(no_cg.hp)[-1].target_pass is None
    cscl.line5_pseudo_labels(no_cg, step_cg)
    assert torch.all(step_cg.labels_t.sum(1) == 1) and set(step_cg.labels_t.unique().tolist()) == {0.0, 1.0}
    no_sd, step_sd = _context(symmetric_divergence=False)
    cscl.line5_pseudo_labels(no_sd, step_sd)
    assert "loss_div" not in cscl.line6_update_encoder_and_discriminator(no_sd, step_sd)
    alg2, _ = _context()  # the default: Alg. 2 literally
    metrics = cscl.train_step(
        alg2, Batch(source_image=torch.rand(2, 3, 64, 64), source_label=step.y_s, target_image=torch.rand(2, 3, 64, 64))
    )
    assert "loss_seg_target" not in metrics


def test_source_warmup_is_line_4_alone_before_the_first_threshold_pass():
    ctx, step = _context(source_warmup=0.25)
    warmup, adapt = cscl.stages(ctx.hp)
    assert (warmup.trains, warmup.uses_target, warmup.target_pass) == (("segmenter",), False, None)
    epochs = ctx.hp.epochs
    assert (warmup.budget, adapt.budget) == (contract.epochs(0.25 * epochs), contract.epochs(0.75 * epochs))
    assert adapt.target_pass is not None and adapt.target_pass.every == "source"  # S_A counts source epochs
    assert set(cscl.warmup_optimizers(ctx.hp, ctx.modules, 10)) == {"segmenter"}
    batch = Batch(source_image=torch.rand(2, 3, 64, 64), source_label=step.y_s, target_image=None)
    assert _moved(ctx, lambda: cscl.warmup_step(ctx, batch)) == {"E", "C"}
    assert len(cscl.stages(cscl.Hyperparams(source_warmup=0.0))) == 1  # Alg. 2 as printed


def test_threshold_pass_uses_the_epoch_schedule():
    ctx, _ = _context()
    gathered = {"confidence": torch.tensor([0.9, 0.8, 0.7]), "prediction": torch.tensor([0, 0, 1], dtype=torch.int16)}
    ctx.target_epoch, ctx.source_epoch = 0, 3  # S_A grows with source epochs (docstring: the epoch reading)
    update = cscl.update_thresholds(ctx, gathered)
    assert update["selection_amount"] == pytest.approx(0.5)
    assert update["thresholds"].tolist() == pytest.approx([0.8, 0.7, 1.0])
    out = cscl.collect_confidences(ctx, torch.rand(2, 3, 64, 64), None)
    assert out["confidence"].shape == out["prediction"].shape == (2 * 16 * 16,)
