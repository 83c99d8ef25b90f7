"""TD/TF: every rule against values worked out by hand, and step-level tests that recompute each optimiser's loss
from the paper's equations (Eq. 2-13) with the modules' own forward passes and compare the gradients the step
produced. They fail when a sign flips, real and fake labels swap, a weight moves to another term, a term is detached
that should send gradients (or not detached where it must not), a frozen module moves, or a cycle uses the wrong
generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from methods import tdtf
from methods.contract import Batch, StepContext, TaskInfo, stage_positions
from methods.shared.gan import ResnetGenerator, VariationalBottleneck, split_resnet_generator
from methods.shared.segmenter import build_segmenter, encode_levels, imagenet_normalise, low_level_channels
from methods.shared.transferability import transferability


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one intra-op thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def bce_logits(x: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, label))


# ------------------------------------------------------------------ Eq. 1 and the residual weights


def test_transferability_is_one_minus_the_binary_entropy_in_bits():
    probabilities = [0.5, 0.25, 0.9, 0.99]
    p = transferability(torch.tensor([logit(q) for q in probabilities] + [40.0]))
    # 1 − H₂(q): 0.5 → 0; 0.25 → 1 − 0.811278; 0.9 → 1 − 0.468996; 0.99 → 1 − 0.080793; certain → 1
    assert p.tolist() == pytest.approx([0.0, 0.188722, 0.531004, 0.919207, 1.0], abs=1e-5)
    # nats would give 1 − ln 2 = 0.306853 at 0.5: the base is bits
    weights = torch.tensor([0.0, 1.0])
    assert tdtf.transferability_weights(weights, residual=True).tolist() == [1.0, 2.0]
    assert tdtf.transferability_weights(weights, residual=False).tolist() == [0.0, 1.0]


# ------------------------------------------------------------------ Eq. 6-7: the bottleneck


def test_gaussian_kl_per_element_by_hand():
    mean = torch.tensor([0.0, 1.0, 0.0, 2.0])
    log_variance = torch.tensor([0.0, 0.0, 1.0, math.log(4.0)])
    # ½(μ² + σ² − log σ² − 1): 0; ½; ½(e − 2); ½(4 + 4 − ln 4 − 1)
    expected = [0.0, 0.5, 0.5 * (math.e - 2), 0.5 * (7 - math.log(4))]
    assert tdtf.gaussian_kl(mean, log_variance).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[2:] == pytest.approx([0.359141, 2.806853], abs=1e-6)


def test_bottleneck_constraint_by_hand_for_each_reduction():
    # latent C = 2 at two positions: channel KLs (0.5, 0.359141) and (2.806853, 0); T = 1
    kl = torch.tensor([[0.5, 2.806853], [0.359141, 0.0]]).reshape(1, 2, 1, 2)
    w = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    # per-position sums 0.859141, 2.806853: (1·(−0.140859) + 2·1.806853) / 2
    assert tdtf.bottleneck_constraint(kl, w, 1.0, "channels").item() == pytest.approx(1.736423, abs=1e-5)
    p = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)  # w = P (residual_transferability=False)
    assert tdtf.bottleneck_constraint(kl, p, 1.0, "channels").item() == pytest.approx(0.903426, abs=1e-5)
    assert tdtf.bottleneck_constraint(kl, None, 1.0, "channels").item() == pytest.approx(0.832997, abs=1e-5)
    # the whole latent's sum 3.665994 against T; the mean per element (0.429571, 1.403427) against T
    assert tdtf.bottleneck_constraint(kl, None, 1.0, "elements").item() == pytest.approx(2.665994, abs=1e-5)
    assert tdtf.bottleneck_constraint(kl, None, 1.0, "mean").item() == pytest.approx(-0.083501, abs=1e-5)
    assert tdtf.reduce_kl(kl, "channels").flatten().tolist() == pytest.approx([0.859141, 2.806853], abs=1e-5)


def test_lagrange_multiplier_update_as_printed_and_dual_ascent():
    lam, history = 1e-4, []
    for constraint in (50.0, 300.0, 200.0):  # γ·L_b = 5e-5, 3e-4, 2e-4
        lam = tdtf.lagrange_update(lam, constraint, 1e-6, "max")
        history.append(lam)
    assert history == pytest.approx([1e-4, 3e-4, 3e-4])  # λ ← max(λ, γ L_b): never decreases
    assert tdtf.lagrange_update(1e-4, 300.0, 1e-6, "dual_ascent") == pytest.approx(4e-4)
    assert tdtf.lagrange_update(1e-4, -200.0, 1e-6, "dual_ascent") == 0.0  # max(0, 1e-4 − 2e-4)


def test_variational_bottleneck_and_the_generator_split():
    torch.manual_seed(0)
    generator = ResnetGenerator(3, 3, ngf=4, blocks=2)
    encoder, decoder = split_resnet_generator(generator)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert encoder(x).shape == (2, 16, 4, 4) and torch.equal(decoder(encoder(x)), generator(x))
    bottleneck = VariationalBottleneck(16)
    h = encoder(x)
    z, mean, log_variance = bottleneck(h, None)
    assert torch.equal(z, mean)  # no noise: z = μ
    noise = torch.randn(2, 16, 4, 4)
    z, mean, log_variance = bottleneck(h, noise)
    assert torch.allclose(z, mean + torch.exp(0.5 * log_variance) * noise)


# ------------------------------------------------------------------ Eq. 11: pseudo labels


def test_confident_pseudo_labels_and_the_selected_pixel_loss():
    probabilities = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.9, 0.1], [0.05, 0.95]]).T.reshape(1, 2, 1, 4)
    labels = tdtf.confident_pseudo_labels(probabilities, 0.9)
    assert labels.flatten().tolist() == [0, 255, 0, 1]  # β = 0.9 is inclusive
    from methods.shared.losses import segmentation_loss

    loss = segmentation_loss(torch.log(probabilities), labels)
    assert loss.item() == pytest.approx((-math.log(0.95) - math.log(0.9) - math.log(0.95)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.069316, abs=1e-6)  # all-pixel normalisation would give 0.051987
    none = tdtf.confident_pseudo_labels(probabilities, 0.99)
    assert segmentation_loss(torch.log(probabilities), none).item() == 0.0  # no selected pixel: 0, not NaN


# ------------------------------------------------------------------ Eq. 8-10: RA2B


def test_position_attention_by_hand():
    c1 = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    c2 = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    c3 = torch.tensor([10.0, 20.0]).reshape(1, 1, 1, 2)
    m = tdtf.attention_matrix(c1, c2)[0]
    # energies ⟨C1_i, C2_j⟩: row 1 (1, 2), row 2 (0, 0); softmax over j
    assert m.tolist() == [pytest.approx([0.268941, 0.731059], abs=1e-6), pytest.approx([0.5, 0.5])]
    fp = tdtf.position_attention(c1, c2, c3).flatten()
    assert fp.tolist() == pytest.approx([17.310586, 15.0], abs=1e-5)
    constant = torch.full((1, 1, 1, 2), 7.0)
    assert torch.allclose(tdtf.position_attention(c1, c2, constant), constant)  # a convex combination


def _ra2b_by_hand(block: tdtf.RA2B, delta: float) -> None:
    """C1 = F_i, C2 = F_i + 1, C3 = 10 F_i + 10; W_f¹ = W_f² = 1, B_f = 0; W_g = 0, B_g = 0 (g = ½)."""
    with torch.no_grad():
        for conv, (weight, bias) in zip((block.c1, block.c2, block.c3), ((1.0, 0.0), (1.0, 1.0), (10.0, 10.0))):
            conv.weight.fill_(weight)
            conv.bias.fill_(bias)
        if block.attention_on_attention:
            for layer, weight in ((block.f1, 1.0), (block.f2, 1.0), (block.g1, 0.0), (block.g2, 0.0)):
                layer.weight.copy_(torch.eye(layer.weight.shape[0]).reshape(layer.weight.shape) * weight)
                if layer.bias is not None:
                    layer.bias.zero_()
        block.delta.fill_(delta)


def test_ra2b_attention_on_attention_by_hand():
    x = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)  # F_i; C1 = (1, 0), C2 = (2, 1), C3 = (20, 10)
    block = tdtf.RA2B(1)
    _ra2b_by_hand(block, 0.1)
    # F_p = (0.731059·20 + 0.268941·10, 15) = (17.310586, 15); f = C1 + F_p = (18.310586, 15); g = ½
    assert block(x).flatten().tolist() == pytest.approx([1 + 0.1 * 0.5 * 18.310586, 0.1 * 0.5 * 15], abs=1e-5)
    with torch.no_grad():
        block.g1.weight.fill_(1.0)  # g = σ(C1) = (σ(1), ½)
    sigma1 = 1 / (1 + math.exp(-1))
    assert block(x).flatten().tolist() == pytest.approx([1 + 0.1 * 18.310586 * sigma1, 0.75], abs=1e-5)
    without_aa = tdtf.RA2B(1, attention_on_attention=False)
    _ra2b_by_hand(without_aa, 0.1)
    assert without_aa(x).flatten().tolist() == pytest.approx([1 + 1.7310586, 1.5], abs=1e-5)  # δ F_p + F_i
    _ra2b_by_hand(block, 0.0)
    assert torch.equal(block(x), x)  # δ initialised at 0: the block starts as the identity
    assert tdtf.RA2B(4).delta.item() == 0.0


def test_ra2b_with_the_printed_position_matrices():
    x = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    block = tdtf.RA2B(1, positions=2)
    _ra2b_by_hand(block, 0.1)  # W = I over positions: the same as the 1x1 reading
    assert block(x).flatten().tolist() == pytest.approx([1 + 0.1 * 0.5 * 18.310586, 0.75], abs=1e-5)
    with torch.no_grad():
        block.f1.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # W_f¹ swaps the positions of C1
        block.f1.bias.fill_(2.0)  # B_f
    # f = (C1_2, C1_1) + F_p + 2 = (0 + 17.310586 + 2, 1 + 15 + 2)
    assert block(x).flatten().tolist() == pytest.approx([1 + 0.05 * 19.310586, 0.05 * 18.0], abs=1e-5)


def test_feature_augmentor_shapes_weights_and_identity_start():
    torch.manual_seed(0)
    augmentor = tdtf.FeatureAugmentor(4, 6, 2, 5, num_ra2b=3)
    low, main, noise = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4), torch.randn(2, 2, 4, 4)
    out = augmentor(low, main, noise, None)
    assert out.shape == main.shape and (out >= 0).all()
    assert augmentor.deltas().tolist() == [0.0, 0.0, 0.0]
    # δ = 0: A_F is its two projections around the (identity) RA2B stack
    fused = F.relu(augmentor.fuse(torch.cat([F.adaptive_avg_pool2d(low, (4, 4)), main, noise], 1)))
    assert torch.allclose(out, F.relu(augmentor.project(fused)))
    w = torch.full((2, 1, 4, 4), 2.0)
    assert torch.allclose(augmentor(low, main, noise, w), F.relu(augmentor.project(2 * fused)))
    pooled = tdtf.FeatureAugmentor(4, 6, 2, 5, num_ra2b=1, downsample=2)
    assert pooled(low, main, noise, None).shape == main.shape
    grid = tdtf.FeatureAugmentor(4, 6, 2, 5, num_ra2b=1, grid=3)
    assert grid.blocks[0].f1.weight.shape == (9, 9) and grid(low, main, noise, None).shape == main.shape


# ------------------------------------------------------------------ Eq. 2-4, 12-13: GAN losses


def test_gan_losses_by_hand():
    zero = torch.zeros(3)
    assert tdtf.td_adversarial_loss(zero, True, "vanilla").item() == pytest.approx(math.log(2))
    assert tdtf.td_adversarial_loss(zero, False, "vanilla").item() == pytest.approx(math.log(2))
    # D1 at D = σ(1): the generator wants "real": −log σ(1) = softplus(−1)
    assert tdtf.td_adversarial_loss(torch.ones(2), True, "vanilla").item() == pytest.approx(0.313262, abs=1e-6)
    assert tdtf.td_discriminator_loss(torch.ones(2), -torch.ones(2), "vanilla").item() == pytest.approx(0.313262)
    assert tdtf.td_discriminator_loss(torch.tensor([0.8]), torch.tensor([0.3]), "lsgan").item() == pytest.approx(
        0.5 * (0.04 + 0.09)
    )
    x = torch.zeros(1, 1, 2, 2)
    assert tdtf.cycle_loss(x + 0.5, x, x - 0.25, x).item() == pytest.approx(0.75)


def test_feature_gan_losses_of_steps_2_and_3_by_hand():
    d_s, d_a = torch.tensor([logit(0.8)]), torch.tensor([logit(0.3)])
    # Step II: D_F takes S's features (0.8) for real, A_F's (0.3) for fake; A_F wants "real"
    assert tdtf.feature_discriminator_loss([d_s], [d_a]).item() == pytest.approx(0.579818, abs=1e-6)
    assert tdtf.fooling_loss([d_a]).item() == pytest.approx(1.203973, abs=1e-6)  # −ln 0.3
    # Step III, labels flipped: A_F's real, S's fake; S wants "real"
    assert tdtf.feature_discriminator_loss([d_a], [d_s]).item() == pytest.approx(2.813411, abs=1e-6)
    assert tdtf.fooling_loss([d_s]).item() == pytest.approx(0.223144, abs=1e-6)  # −ln 0.8
    # the expectation over (X̂s, Xt): the mean of the two domains' means
    two = tdtf.fooling_loss([d_s, torch.tensor([logit(0.5)] * 4)]).item()
    assert two == pytest.approx(0.5 * (-math.log(0.8) + math.log(2)), abs=1e-6)


# ------------------------------------------------------------------ shared segmenter levels


def test_encode_levels_returns_the_bottom_block_and_the_usual_features():
    info = TaskInfo(num_classes=2, in_channels=3, class_names=("a", "b"))
    torch.manual_seed(0)
    segmenter = build_segmenter("tiny", info).eval()
    x = torch.rand(2, 3, 32, 32)
    low, features = encode_levels(segmenter, x)
    assert low.shape == (2, low_level_channels(segmenter), 16, 16) == (2, 32, 16, 16)
    assert torch.equal(features.main, segmenter.encode(x).main)
    assert torch.equal(low, segmenter.encoder.layers[:2](x))


# ------------------------------------------------------------------ schedules, optimisers, stages


INFO = TaskInfo(
    num_classes=3, in_channels=3, class_names=("a", "b", "c"), source_train_size=2969, target_train_size=300
)


def test_paper_defaults_and_budgets():
    hp = tdtf.Hyperparams()
    assert (hp.alpha, hp.T, hp.lambda_s, hp.lambda_t, hp.gamma, hp.beta, hp.num_ra2b) == (
        10.0,
        200.0,
        1e-4,
        1e-4,
        1e-6,
        0.9,
        16,
    )
    assert (hp.architecture, hp.learning_rate, hp.poly_power, hp.td_learning_rate) == (
        "deeplabv3_resnet101",
        2e-4,
        0.9,
        2.5e-4,
    )
    stages = tdtf.stages(hp)
    assert [s.name for s in stages] == ["td", "tf_segment", "tf_augment", "tf_align"] * 3
    assert [p.round for p in stage_positions(stages)] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(s.uses_target for s in stages)
    trains = {s.name: s.trains for s in stages}
    assert trains == {
        "td": ("generator_s2t", "generator_t2s", "discriminator_t", "discriminator_s"),
        "tf_segment": ("segmenter",),
        "tf_augment": ("augmentor", "feature_discriminator"),
        "tf_align": ("segmenter", "feature_discriminator"),
    }
    # TD: 10 + 5 epochs of the 2,969 gastroscope images per round at batch 2 (Sec. 3.5, 4.1)
    steps = [s.budget.num_steps(INFO, 2) for s in stages[:4]]
    assert steps == [math.ceil(15 * 2969 / 2), math.ceil(7.5 * 2969 / 2), *[math.ceil(3.75 * 2969 / 2)] * 2]
    assert all(s.budget.of == "source" for s in stages)
    assert [s.on_start is not None for s in stages[:4]] == [True, False, True, False]
    assert all(s.target_pass is None for s in stages)


def test_switches_change_the_stage_layout_and_the_modules():
    small = {"architecture": "tiny", "batch_size": 2, "generator_filters": 4, "generator_blocks": 1}
    no_td = tdtf.Hyperparams(**small, translation=False)
    assert [s.name for s in tdtf.stages(no_td)] == ["tf_segment", "tf_augment", "tf_align"] * 3
    assert not {"generator_s2t", "discriminator_t"} & set(tdtf.build(no_td, INFO))
    no_fa = tdtf.Hyperparams(**small, feature_augmentation=False, quantified_transferability=False, alternations=2)
    assert [s.name for s in tdtf.stages(no_fa)] == ["td", "tf_segment"] * 2
    assert not {"augmentor", "feature_discriminator"} & set(tdtf.build(no_fa, INFO))
    with pytest.raises(ValueError, match="no D_F to quantify transferability"):
        tdtf.Hyperparams(feature_augmentation=False)
    assert "feature_discriminator_p" not in tdtf.build(
        tdtf.Hyperparams(**small, quantified_transferability=False), INFO
    )
    plain = tdtf.build(tdtf.Hyperparams(**small, transferability_bottleneck=False), INFO)
    assert isinstance(plain["generator_s2t"], ResnetGenerator)
    assert isinstance(tdtf.build(tdtf.Hyperparams(**small), INFO)["generator_s2t"], tdtf.BottleneckTranslator)
    round_labels = tdtf.stages(tdtf.Hyperparams(**small, pseudo_label_source="round"))
    segment = round_labels[1]
    assert segment.target_pass.schedule == "stage_start" and set(segment.target_pass.store) == {"pseudo_label"}
    assert segment.target_pass.store["pseudo_label"].fill == 255
    with pytest.raises(ValueError, match="kl_reduction must be one of"):
        tdtf.Hyperparams(kl_reduction="sum")


def test_optimizer_scopes():
    def scopes(scope):
        return [s.optimizer_scope for s in tdtf.stages(tdtf.Hyperparams(optimizer_scope=scope, alternations=2))]

    assert scopes("round") == [None, "tf0", "tf0", "tf0", None, "tf1", "tf1", "tf1"]
    assert scopes("trial") == ["td", "tf", "tf", "tf"] * 2
    assert scopes("stage") == [None] * 8


def _lr_at(optim, step: int) -> list[float]:
    for _ in range(step):
        optim.optimizer.step()
        optim.scheduler.step()
    return [group["lr"] for group in optim.optimizer.param_groups]


def test_schedules_and_optimiser_hyperparameters():
    hp = tdtf.Hyperparams(architecture="tiny", batch_size=2, generator_filters=4, generator_blocks=1)
    modules = tdtf.build(hp, INFO)
    td = tdtf.td_optimizers(hp, modules, 150)
    assert set(td) == {"generators", "discriminator_t", "discriminator_s"}
    for optim in td.values():
        assert optim.optimizer.defaults["betas"] == (0.5, 0.999) and optim.optimizer.defaults["lr"] == 2.5e-4
    generator_params = {id(p) for name in tdtf.GENERATORS for p in modules[name].parameters()}
    assert {id(p) for p in td["generators"].optimizer.param_groups[0]["params"]} == generator_params
    # 10 epochs constant, 5 of linear decay: 150 steps → constant to step 100, half at 125, 0 at 150
    assert _lr_at(td["generators"], 100) == pytest.approx([2.5e-4])
    assert _lr_at(td["generators"], 25) == pytest.approx([1.25e-4])
    assert _lr_at(td["generators"], 25) == pytest.approx([0.0], abs=1e-12)
    tf = tdtf.tf_optimizers(hp, modules, 100)
    sgd = tf["segmenter"].optimizer
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    assert _lr_at(tf["segmenter"], 50) == pytest.approx([2e-4 * 0.5**0.9, 2e-3 * 0.5**0.9])  # 1.0718e-4, head 10x
    for name in ("feature_discriminator", "augmentor"):
        adam = tf[name].optimizer
        assert adam.defaults["lr"] == 1e-4 and adam.defaults["betas"] == (0.9, 0.99)
        assert tf[name].scheduler is None  # a constant rate (reading 16)
    # an unscoped stage builds only the optimisers of the modules it trains
    unscoped = tdtf.stages(tdtf.Hyperparams(architecture="tiny", batch_size=2, optimizer_scope="stage"))
    assert [set(s.optimizers(hp, modules, 10)) for s in unscoped[1:4]] == [
        {"segmenter"},
        {"augmentor", "feature_discriminator"},
        {"segmenter", "feature_discriminator"},
    ]
    assert set(tdtf.stages(hp)[2].optimizers(hp, modules, 10)) == {"segmenter", "augmentor", "feature_discriminator"}


# ------------------------------------------------------------------ step-level tests


SMALL = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "batch_size": 2,
    "generator_filters": 4,
    "generator_blocks": 1,
    "patch_discriminator_filters": 4,
    "feature_discriminator_downsampling": 0,
    "augmentor_channels": 8,
    "augmentor_noise_channels": 2,
    "num_ra2b": 2,
    "T": 5.0,
    "pool_size": 50,
}
STAGES = {"td": 0, "tf_segment": 1, "tf_augment": 2, "tf_align": 3}


def _context(stage_name: str, state: dict | None = None, **changes):
    """The stage's modules train, the others are frozen (eval, no gradients), as the platform sets them."""
    torch.manual_seed(0)
    hp = tdtf.Hyperparams(**{**SMALL, **changes})
    modules = tdtf.build(hp, INFO)
    stage = tdtf.stages(hp)[STAGES[stage_name] if hp.translation else STAGES[stage_name] - 1]
    assert stage.name == stage_name
    for name, module in modules.items():
        module.train(name in stage.trains)
        module.requires_grad_(name in stage.trains)
    optims = stage.optimizers(hp, modules, 10)
    ctx = StepContext(
        hp=hp,
        info=INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in optims.items()},
        state={**tdtf.init_state(hp, INFO), **(state or {})},
        stage=stage_name,
        stage_step=0,
        stage_steps=10,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    return ctx, stage


def _batch(seed: int = 1, size: int = 32) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        source_image=torch.rand(2, 3, size, size, generator=generator),
        source_label=torch.randint(0, 3, (2, size, size), generator=generator),
        target_image=torch.rand(2, 3, size, size, generator=generator),
    )


def _capture(ctx) -> dict[str, dict[str, torch.Tensor | None]]:
    """The gradient every parameter of each optimiser holds when that optimiser steps."""
    seen: dict[str, dict[str, torch.Tensor | None]] = {}
    names = {id(p): n for n, p in ctx.modules.named_parameters()}
    for key, optimizer in ctx.optimizers.items():

        def hook(opt, args, kwargs, key=key):
            seen[key] = {
                names[id(p)]: None if p.grad is None else p.grad.clone() for g in opt.param_groups for p in g["params"]
            }

        optimizer.register_step_pre_hook(hook)
    return seen


def _expected(loss: torch.Tensor, modules, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in modules.named_parameters() if n.startswith(prefixes) and p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def _scale(grads: dict[str, torch.Tensor]) -> float:
    return max(g.abs().max().item() for g in grads.values())


def _assert_grads(captured: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor]):
    """Equal up to float rounding (relative to the largest gradient: a bias before an instance norm has an exact-zero
    gradient that floats give as ~1e-9)."""
    atol = 1e-5 * _scale(expected)
    assert atol > 0  # the comparison is not between zeros
    for name, grad in expected.items():
        got = captured[name]
        got = torch.zeros_like(grad) if got is None else got
        assert torch.allclose(got, grad, rtol=1e-4, atol=atol), name


def _assert_unchanged(ctx, before: dict[str, torch.Tensor]) -> None:
    after = ctx.modules.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def _zero_noise(monkeypatch):
    """ε and A_F's z are zeros, so that the recomputation needs no knowledge of the order of the draws: z = μ."""
    monkeypatch.setattr(tdtf, "standard_normal", lambda ctx, shape: torch.zeros(*shape))


def _p_by_hand(discriminator, features: torch.Tensor, size, residual: bool = True) -> torch.Tensor:
    """w = 1 + P (residual) or P per position (Eq. 1, bits) resized to `size`."""
    q = torch.sigmoid(discriminator(features))
    p = 1 + (q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    return F.interpolate(1 + p if residual else p, size=size, mode="bilinear", align_corners=False)


def _snapshot_differs(ctx):
    """A Step III has run: the P discriminator holds other weights than the live D_F, with logits spread widely
    enough that P varies over [0, 1] between positions, images and domains."""
    torch.manual_seed(5)
    snapshot = tdtf._feature_discriminator(ctx.hp, 128)
    with torch.no_grad():
        snapshot.model[-1].weight.mul_(300.0)
    ctx.modules["feature_discriminator_p"].load_state_dict(snapshot.state_dict())
    ctx.state.update(step3_done=True, transferability_ready=True)


def _td_generator_loss(ctx, batch, alpha, lambda_s, lambda_t, transferable: bool):
    """Eq. 2-5 and 7 from the generators' side, recomputed from the modules (z = μ)."""
    m, hp = ctx.modules, ctx.hp
    g, g_inv = m["generator_s2t"], m["generator_t2s"]
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    fake_t, mean_s, log_variance_s = g(x_s)  # T_D(x_s), E(x_s) of T_D's encoder
    fake_s, mean_t, log_variance_t = g_inv(x_t)  # T_D^{-1}(x_t), E(x_t) of T_D^{-1}'s encoder
    adversarial = bce_logits(m["discriminator_t"](fake_t), 1.0) + bce_logits(m["discriminator_s"](fake_s), 1.0)
    cycle = (g(fake_s)[0] - x_t).abs().mean() + (g_inv(fake_t)[0] - x_s).abs().mean()
    constraints = []
    for mean, log_variance, images in (
        (mean_s, log_variance_s, batch.source_image),
        (mean_t, log_variance_t, batch.target_image),
    ):
        kl = (0.5 * (mean**2 + log_variance.exp() - log_variance - 1)).sum(1, keepdim=True)
        w = 1.0
        if transferable:
            features = m["segmenter"].encode(imagenet_normalise(images)).main
            w = _p_by_hand(m["feature_discriminator_p"], features, kl.shape[-2:])
        constraints.append((w * (kl - hp.T)).mean())
    total = adversarial + alpha * cycle + lambda_s * constraints[0] + lambda_t * constraints[1]
    return total, adversarial, cycle, constraints


@pytest.mark.parametrize("transferable", [False, True])
def test_td_step_generators_follow_eq7(monkeypatch, transferable):
    _zero_noise(monkeypatch)
    ctx, _ = _context("td")
    if transferable:
        _snapshot_differs(ctx)
    ctx.state.update(lambda_s=0.3, lambda_t=0.7)  # distinct, so that swapping λ_s and λ_t shows
    batch = _batch()
    total, adversarial, cycle, constraints = _td_generator_loss(ctx, batch, 10.0, 0.3, 0.7, transferable)
    expected = _expected(total, ctx.modules, ("generator_s2t", "generator_t2s"))
    frozen = {k: v.clone() for k, v in ctx.modules.state_dict().items() if not k.startswith(tdtf.TD_MODULES)}
    captured = _capture(ctx)
    metrics = tdtf.td_step(ctx, batch)
    _assert_grads(captured["generators"], expected)
    assert metrics["loss_g"].item() == pytest.approx(total.item(), rel=1e-5)
    assert metrics["loss_cyc"].item() == pytest.approx(cycle.item(), rel=1e-5)
    assert metrics["loss_b_s"].item() == pytest.approx(constraints[0].item(), rel=1e-5)
    # S, D_F and the P discriminator are fixed during TD: weights and batch-norm statistics unchanged
    _assert_unchanged(ctx, frozen)
    # D1's and D2's updates on detached fakes added no gradient to the generators after their step
    for name, param in ctx.modules.named_parameters():
        if name.startswith(tdtf.GENERATORS):
            assert torch.equal(param.grad, captured["generators"][name]), name


@pytest.mark.parametrize("weight", ["alpha", "lambda_s", "lambda_t"])
def test_td_step_each_weight_multiplies_its_own_term(monkeypatch, weight):
    """Set the weight to 0, then 2: the generators' gradient moves by exactly 2x its term's gradient."""
    _zero_noise(monkeypatch)
    grads = {}
    for value in (0.0, 2.0):
        changes = {"alpha": value} if weight == "alpha" else {}
        ctx, _ = _context("td", **changes)
        if weight != "alpha":
            ctx.state[weight] = value
        captured = _capture(ctx)
        tdtf.td_step(ctx, _batch())
        grads[value] = captured["generators"]
    ctx, _ = _context("td")
    _, _, cycle, constraints = _td_generator_loss(ctx, _batch(), 10.0, 1.0, 1.0, False)
    term = {"alpha": cycle, "lambda_s": constraints[0], "lambda_t": constraints[1]}[weight]
    expected = _expected(term, ctx.modules, ("generator_s2t", "generator_t2s"))
    atol = 1e-4 * _scale(expected)
    for name, grad in expected.items():
        difference = grads[2.0][name] - grads[0.0][name]
        assert torch.allclose(difference, 2 * grad, rtol=1e-3, atol=atol), name
    if weight == "lambda_s":  # E(x_s) is T_D's encoder: L_b^s sends nothing to T_D^{-1}
        assert all(g.abs().max() == 0 for n, g in expected.items() if n.startswith("generator_t2s"))
        assert any(g.abs().max() > 0 for n, g in expected.items() if n.startswith("generator_s2t.bottleneck"))
    if weight == "lambda_t":
        assert all(g.abs().max() == 0 for n, g in expected.items() if n.startswith("generator_s2t"))


def test_td_step_discriminators_real_and_fake(monkeypatch):
    _zero_noise(monkeypatch)
    ctx, _ = _context("td")
    batch = _batch()
    m = ctx.modules
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    with torch.no_grad():
        fake_t, fake_s = m["generator_s2t"](x_s)[0], m["generator_t2s"](x_t)[0]
    captured = _capture(ctx)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # Eq. 2: D1 tells real x_t (1) from T_D(x_s) (0); Eq. 3: D2 tells real x_s (1) from T_D^{-1}(x_t) (0). The
    # discriminators step after the generators, on the fakes of the same forward pass (pool not yet full)
    metrics = tdtf.td_step(ctx, batch)
    for name, real, fake in (("discriminator_t", x_t, fake_t), ("discriminator_s", x_s, fake_s)):
        d = m[name]
        d.load_state_dict({k[len(name) + 1 :]: v for k, v in before.items() if k.startswith(name + ".")})
        loss = 0.5 * (bce_logits(d(real), 1.0) + bce_logits(d(fake), 0.0))
        _assert_grads(captured[name], _expected(loss, m, (name,)))
        assert metrics[f"loss_{name.replace('discriminator', 'd')}"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert len(ctx.state["pool_t"]) == len(ctx.state["pool_s"]) == 2


def test_td_step_values_with_known_discriminator_outputs_and_cycles(monkeypatch):
    """D1 outputs logit 1 everywhere: the generators' term is −log σ(1) (label "real"), not −log(1 − σ(1)). A T_D^{-1}
    whose last convolution is zero outputs the zero image: the source cycle T_D^{-1}(T_D(x_s)) is then exactly 0
    (mean |x_s| in the loss) and the target cycle is T_D(0) against x_t."""
    _zero_noise(monkeypatch)
    ctx, _ = _context("td")
    m = ctx.modules
    with torch.no_grad():
        last = m["discriminator_t"].model[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)
        out = m["generator_t2s"].decoder[-2]
        out.weight.zero_()
        out.bias.zero_()
    batch = _batch()
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    with torch.no_grad():
        target_cycle = (m["generator_s2t"](torch.zeros_like(x_t))[0] - x_t).abs().mean()
    metrics = tdtf.td_step(ctx, batch)
    assert metrics["loss_gan_s2t"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert metrics["loss_cyc"].item() == pytest.approx((target_cycle + x_s.abs().mean()).item(), rel=1e-5)


def test_td_step_multipliers_follow_the_printed_update_over_all_workers(monkeypatch):
    """λ_s ← max(λ_s, γ L_b^s), λ_t ← max(λ_t, γ L_b^t): T = 0 makes both constraints positive and distinct, so
    that the update takes them (a max against a negative constraint passes whatever the code does), each for its
    own domain, after the generators' step used the old multipliers."""
    _zero_noise(monkeypatch)
    ctx, _ = _context("td", gamma=1e-2, T=0.0)
    batch = _batch()
    total, _, _, constraints = _td_generator_loss(ctx, batch, 10.0, 1e-4, 1e-4, False)
    expected = [max(1e-4, 1e-2 * c.item()) for c in constraints]
    assert min(expected) > 1e-4 and abs(expected[0] - expected[1]) > 1e-3 * max(expected)  # taken, distinct
    metrics = tdtf.td_step(ctx, batch)
    assert metrics["loss_g"].item() == pytest.approx(total.item(), rel=1e-5)  # Eq. 7 with the multipliers before
    for domain, value in zip("st", expected):
        assert ctx.state[f"lambda_{domain}"] == pytest.approx(value, rel=1e-5)
        assert metrics[f"lambda_{domain}"].item() == pytest.approx(value, rel=1e-5)
    # VDB's dual ascent instead of the printed max, through the step too
    ctx, _ = _context("td", gamma=1e-2, T=0.0, multiplier_update="dual_ascent")
    tdtf.td_step(ctx, batch)
    for domain, constraint in zip("st", constraints):
        assert ctx.state[f"lambda_{domain}"] == pytest.approx(max(0.0, 1e-4 + 1e-2 * constraint.item()), rel=1e-5)
    # over workers: each domain's update takes that domain's all-reduced mean L_b
    reduced, means = [], iter([5000.0, 7000.0])
    ctx, _ = _context("td", gamma=1e-6, T=0.0)
    ctx.all_reduce_mean = lambda t: reduced.append(t.detach().clone()) or torch.full_like(t, next(means))
    tdtf.td_step(ctx, batch)
    assert [r.item() for r in reduced] == pytest.approx([c.item() for c in constraints], rel=1e-5)
    assert (ctx.state["lambda_s"], ctx.state["lambda_t"]) == pytest.approx((5e-3, 7e-3))


def test_td_noise_enters_training_and_not_the_frozen_translation():
    ctx, _ = _context("td")
    g = ctx.modules["generator_s2t"]
    x = _batch().source_image * 2 - 1
    first, kl = tdtf._translate_for_training(ctx, "generator_s2t", x)
    ctx.generator.manual_seed(0)
    again, _ = tdtf._translate_for_training(ctx, "generator_s2t", x)
    other, _ = tdtf._translate_for_training(ctx, "generator_s2t", x)  # the next draw
    assert torch.equal(first, again) and not torch.allclose(first, other)
    h = g.encoder(x)
    mean, log_variance = g.bottleneck.mean(h), g.bottleneck.log_variance(h)
    assert torch.allclose(kl, 0.5 * (mean**2 + log_variance.exp() - log_variance - 1))
    g.eval()
    frozen = tdtf.translate(ctx.modules, "generator_s2t", _batch().source_image)
    assert torch.equal(frozen, tdtf.translate(ctx.modules, "generator_s2t", _batch().source_image))
    assert torch.allclose(frozen, (g.decoder(mean) + 1) / 2)  # z = μ when frozen


def _translated(ctx, images):
    with torch.no_grad():
        return (ctx.modules["generator_s2t"](images * 2 - 1)[0] + 1) / 2


@pytest.mark.parametrize("pseudo_labelling", [True, False])
def test_step1_segmenter_follows_eq11(pseudo_labelling):
    ctx, _ = _context("tf_segment", pseudo_labelling=pseudo_labelling)
    batch = _batch()
    s = ctx.modules["segmenter"]
    with torch.no_grad():
        confidence = F.softmax(
            F.interpolate(s(imagenet_normalise(batch.target_image)), size=(32, 32), mode="bilinear"), 1
        ).max(1)[0]
    beta = confidence.median().item()  # half of the target pixels are confident
    ctx, _ = _context("tf_segment", pseudo_labelling=pseudo_labelling, beta=beta)
    s = ctx.modules["segmenter"]
    logits_s = F.interpolate(
        s(imagenet_normalise(_translated(ctx, batch.source_image))), size=(32, 32), mode="bilinear"
    )
    loss = F.cross_entropy(logits_s, batch.source_label)  # on x̂_s = T_D(x_s), with y_s
    logits_t = F.interpolate(s(imagenet_normalise(batch.target_image)), size=(32, 32), mode="bilinear")
    confidence, labels = F.softmax(logits_t, 1).max(1)
    selected = confidence >= beta
    if pseudo_labelling:
        loss = loss + F.cross_entropy(logits_t, torch.where(selected, labels, 255), ignore_index=255)
    expected = _expected(loss, ctx.modules, ("segmenter",))
    frozen = {k: v.clone() for k, v in ctx.modules.state_dict().items() if not k.startswith("segmenter.")}
    captured = _capture(ctx)
    metrics = tdtf.segment_step(ctx, batch)
    _assert_grads(captured["segmenter"], expected)
    if pseudo_labelling:
        assert metrics["pseudo_label_fraction"].item() == pytest.approx(selected.float().mean().item())
        assert 0.3 < metrics["pseudo_label_fraction"].item() < 0.7
    else:
        assert "loss_seg_target" not in metrics
    _assert_unchanged(ctx, frozen)  # T_D and the rest fixed


def test_step1_with_the_round_labels_of_the_target_pass():
    ctx, stage = _context("tf_segment", pseudo_label_source="round")
    batch = _batch()
    labels = torch.full((2, 32, 32), 255, dtype=torch.uint8)
    labels[:, :8] = 2
    batch = Batch(batch.source_image, batch.source_label, batch.target_image, target_extras={"pseudo_label": labels})
    s = ctx.modules["segmenter"]
    logits_s = F.interpolate(
        s(imagenet_normalise(_translated(ctx, batch.source_image))), size=(32, 32), mode="bilinear"
    )
    logits_t = F.interpolate(s(imagenet_normalise(batch.target_image)), size=(32, 32), mode="bilinear")
    loss = F.cross_entropy(logits_s, batch.source_label) + F.cross_entropy(logits_t, labels.long(), ignore_index=255)
    expected = _expected(loss, ctx.modules, ("segmenter",))
    captured = _capture(ctx)
    metrics = tdtf.segment_step(ctx, batch)
    _assert_grads(captured["segmenter"], expected)
    assert metrics["pseudo_label_fraction"].item() == pytest.approx(0.25)
    # the pass: S's confident argmax at the images' size, uint8 with 255 below β
    s.eval()
    out = stage.target_pass.collect(ctx, batch.target_image, None)["pseudo_label"]
    probabilities = F.softmax(
        F.interpolate(s(imagenet_normalise(batch.target_image)), size=(32, 32), mode="bilinear"), 1
    )
    confidence, argmax = probabilities.max(1)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), torch.where(confidence >= 0.9, argmax, 255))


def _levels(ctx, batch):
    s = ctx.modules["segmenter"]
    out = []
    for images in (_translated(ctx, batch.source_image), batch.target_image):
        low, features = encode_levels(s, imagenet_normalise(images))
        out.append((low, features.main))
    return out


def _augmented_by_hand(ctx, levels, transferable: bool, p_from: str = "feature_discriminator_p"):
    a = ctx.modules["augmentor"]
    out = []
    for low, main in levels:
        noise = torch.zeros(main.shape[0], ctx.hp.augmentor_noise_channels, *main.shape[-2:])
        w = None
        if transferable:
            w = _p_by_hand(ctx.modules[p_from], main.detach(), main.shape[-2:], ctx.hp.residual_transferability)
        out.append(a(low.detach(), main.detach(), noise, w))
    return out


@pytest.mark.parametrize(
    "transferable, residual, source",
    [(False, True, "step3"), (True, True, "step3"), (True, False, "step3"), (True, True, "current")],
)
def test_step2_augmentor_and_feature_discriminator_follow_eq12(monkeypatch, transferable, residual, source):
    """Also through the switches of P: w = 1 + P or P (`residual_transferability`), and P from the Step III copy
    or from the live D_F that Step II trains (`transferability_source="current"`)."""
    _zero_noise(monkeypatch)
    ctx, _ = _context("tf_augment", residual_transferability=residual, transferability_source=source)
    p_from = "feature_discriminator_p"
    if transferable and source == "step3":
        _snapshot_differs(ctx)
    elif transferable:
        with torch.no_grad():  # P spread over [0, 1], so that w ≡ 1 would show
            ctx.modules["feature_discriminator"].model[-1].weight.mul_(10.0)
        ctx.state["step3_done"] = True
        p_from = "feature_discriminator"
    with torch.no_grad():
        for block in ctx.modules["augmentor"].blocks:
            block.delta.fill_(0.5)  # so that every RA2B parameter has a gradient to compare
    batch = _batch()
    d = ctx.modules["feature_discriminator"]
    levels = [(low.detach(), main.detach()) for low, main in _levels(ctx, batch)]
    augmented = _augmented_by_hand(ctx, levels, transferable, p_from)
    # A_F: min −E[log D_F(A_F(x, z))] over both domains (non-saturating Eq. 12)
    loss_a = 0.5 * sum(bce_logits(d(x), 1.0) for x in augmented)
    expected_a = _expected(loss_a, ctx.modules, ("augmentor",))
    assert all(g.abs().sum() > 0 for n, g in expected_a.items() if n.endswith(("weight", "delta")))
    # D_F: S's features real, A_F's fake
    loss_d = 0.5 * sum(bce_logits(d(main), 1.0) for _, main in levels) + 0.5 * sum(
        bce_logits(d(x.detach()), 0.0) for x in augmented
    )
    expected_d = _expected(loss_d, ctx.modules, ("feature_discriminator.",))
    frozen = {
        k: v.clone()
        for k, v in ctx.modules.state_dict().items()
        if not k.startswith(("augmentor.", "feature_discriminator."))
    }
    captured = _capture(ctx)
    metrics = tdtf.augment_step(ctx, batch)
    _assert_grads(captured["augmentor"], expected_a)
    _assert_grads(captured["feature_discriminator"], expected_d)
    assert metrics["loss_augmentor"].item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert all(block.delta.item() != 0.5 for block in ctx.modules["augmentor"].blocks)  # every δ learns
    # S (weights and batch-norm statistics), the generators and the P discriminator are fixed in Step II
    _assert_unchanged(ctx, frozen)
    # D_F's update (on detached A_F features) added nothing to A_F's gradients after its step
    for name, param in ctx.modules.named_parameters():
        if name.startswith("augmentor."):
            assert param.grad is None or torch.equal(param.grad, captured["augmentor"][name]), name


@pytest.mark.parametrize("role", ["augmentation", "domain"])
def test_step3_segmenter_and_feature_discriminator_follow_eq13(monkeypatch, role):
    _zero_noise(monkeypatch)
    ctx, _ = _context("tf_align", feature_discriminator_role=role)
    _snapshot_differs(ctx)
    batch = _batch()
    d = ctx.modules["feature_discriminator"]
    with torch.no_grad():  # the live D_F's P spread over [0, 1] too, so that P from the copy would show
        d.model[-1].weight.mul_(100.0)
    levels = _levels(ctx, batch)
    with torch.no_grad():  # P in Step III from the D_F that Step III trains
        augmented = _augmented_by_hand(ctx, levels, True, p_from="feature_discriminator")
    (_, f_s), (_, f_t) = levels
    if role == "augmentation":  # S: both domains' features → "augmented" (1)
        loss_s = 0.5 * (bce_logits(d(f_s), 1.0) + bce_logits(d(f_t), 1.0))
        loss_d = 0.5 * sum(bce_logits(d(x), 1.0) for x in augmented) + 0.5 * (
            bce_logits(d(f_s.detach()), 0.0) + bce_logits(d(f_t.detach()), 0.0)
        )
    else:  # S: target features → source (1); D_F: source 1, target 0, A_F's 1
        loss_s = bce_logits(d(f_t), 1.0)
        loss_d = (
            bce_logits(d(f_s.detach()), 1.0)
            + bce_logits(d(f_t.detach()), 0.0)
            + 0.5 * sum(bce_logits(d(x), 1.0) for x in augmented)
        )
    expected_s = _expected(loss_s, ctx.modules, ("segmenter.",))
    expected_d = _expected(loss_d, ctx.modules, ("feature_discriminator.",))
    frozen = {
        k: v.clone()
        for k, v in ctx.modules.state_dict().items()
        if not k.startswith(("segmenter.", "feature_discriminator."))
    }
    captured = _capture(ctx)
    metrics = tdtf.align_step(ctx, batch)
    _assert_grads(captured["segmenter"], expected_s)
    _assert_grads(captured["feature_discriminator"], expected_d)
    assert metrics["loss_align"].item() == pytest.approx(loss_s.item(), rel=1e-5)
    # Eq. 13 has no segmentation term: the classifier head gets no gradient at all
    assert all(captured["segmenter"][n] is None for n, _ in ctx.modules.named_parameters() if ".classifier." in n)
    # D_F's update (on detached S features) added nothing to S's gradients after its step
    for name, param in ctx.modules.named_parameters():
        if name.startswith("segmenter.") and param.grad is not None:
            assert torch.equal(param.grad, captured["segmenter"][name]), name
    # A_F, the generators and the P discriminator stay fixed
    _assert_unchanged(ctx, frozen)
    assert ctx.state["step3_done"]


def test_augmentor_noise_comes_from_the_context_generator():
    ctx, _ = _context("tf_augment")
    low, main = torch.rand(2, 32, 16, 16), torch.rand(2, 128, 8, 8)
    ctx.generator.manual_seed(3)
    out = tdtf._augment(ctx, low, main, None)
    z = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))  # z ~ G(z) = N(0, I), Eq. 12
    assert torch.equal(out, ctx.modules["augmentor"](low, main, z, None))
    assert not torch.equal(out, ctx.modules["augmentor"](low, main, torch.zeros_like(z), None))


def test_quantified_transferability_off_uses_unit_weights(monkeypatch):
    _zero_noise(monkeypatch)
    ctx, _ = _context("tf_augment", quantified_transferability=False)
    ctx.state.update(step3_done=True, transferability_ready=True)
    batch = _batch()
    d = ctx.modules["feature_discriminator"]
    levels = [(low.detach(), main.detach()) for low, main in _levels(ctx, batch)]
    a = ctx.modules["augmentor"]
    augmented = [a(low, main, torch.zeros(2, 2, *main.shape[-2:]), None) for low, main in levels]
    expected = _expected(0.5 * sum(bce_logits(d(x), 1.0) for x in augmented), ctx.modules, ("augmentor",))
    captured = _capture(ctx)
    metrics = tdtf.augment_step(ctx, batch)
    _assert_grads(captured["augmentor"], expected)
    assert "transferability_mean" not in metrics


def test_on_start_snapshots_the_step3_discriminator():
    ctx, stage = _context("tf_augment")
    live, snapshot = ctx.modules["feature_discriminator"], ctx.modules["feature_discriminator_p"]
    assert stage.on_start(ctx) == {"transferability_ready": False}  # before any Step III: P not in force
    assert not torch.equal(live.model[0].weight, snapshot.model[0].weight)
    assert tdtf._p_discriminator(ctx) is None
    ctx.state["step3_done"] = True
    ctx.state.update(stage.on_start(ctx))
    assert torch.equal(live.model[0].weight, snapshot.model[0].weight)
    assert tdtf._p_discriminator(ctx) is snapshot
    with torch.no_grad():
        live.model[0].weight.add_(1.0)  # Step II retrains D_F: P keeps coming from the Step III copy
    assert not torch.equal(live.model[0].weight, snapshot.model[0].weight)
    assert tdtf._p_discriminator(ctx) is snapshot
    ctx.stage = "tf_align"  # in Step III itself P comes from the D_F that Step III trains
    assert tdtf._p_discriminator(ctx) is live
    ctx.state["step3_done"] = False  # ... once a Step III step has trained it
    assert tdtf._p_discriminator(ctx) is None
    current, _ = _context("tf_augment", transferability_source="current")
    assert "feature_discriminator_p" not in current.modules and tdtf._p_discriminator(current) is None
    current.state["step3_done"] = True
    assert tdtf._p_discriminator(current) is current.modules["feature_discriminator"]


def test_predict_is_s_alone_and_samples():
    ctx, _ = _context("tf_segment")
    ctx.modules.eval()
    images = torch.rand(2, 3, 32, 32)
    logits = tdtf.predict(ctx.hp, ctx.modules, images, stage_positions(tdtf.stages(ctx.hp))[0])
    expected = F.interpolate(ctx.modules["segmenter"](imagenet_normalise(images)), size=(32, 32), mode="bilinear")
    assert torch.allclose(logits, expected)
    from methods.contract import SampleImages

    out = tdtf.samples(ctx.hp, ctx.modules, SampleImages(target=images, source=images[:1]), None)
    assert set(out) == {"source", "source_to_target", "target", "target_to_source", "target_pseudo_labels"}
    assert out["source_to_target"].shape == (1, 3, 32, 32) and out["target_pseudo_labels"].shape == (2, 3, 32, 32)
    colours = tdtf.label_colours(torch.tensor([[[0, 1, 255]]]), 3)
    assert colours[0, :, 0, 2].tolist() == [0.0, 0.0, 0.0] and not torch.equal(colours[0, :, 0, 0], colours[0, :, 0, 1])
