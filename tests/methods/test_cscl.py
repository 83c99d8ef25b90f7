"""CSCL: its rules against values worked out by hand, the readings of issue 19 (methods/cscl.py docstring a-g), and
step-level tests: each line of Algorithm 2 as the platform runs it, its optimisers' gradients and returned losses
against the paper's equations recomputed here without any of the method's functions, the real and fake targets of
D, every weight in its place, every detach, the schedules and the optimisers' hyperparameters."""

from __future__ import annotations

import copy
import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import search_spaces
from methods import contract, cscl
from methods.contract import Batch, StagePosition, StepContext, TaskInfo
from methods.shared.segmenter import FCN8sHead, Features, Segmenter
from platform import loop
from platform.loop import LocalSession, TrialRunner, TrialSpec


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


INFO = TaskInfo(num_classes=3, in_channels=3, class_names=("a", "b", "c"))


# ------------------------------------------------------------------ readings of issue 19 (docstring a-g)


def test_selection_amount_is_counted_in_integers_so_that_40_percent_of_5_is_2():
    assert 0.35 + 0.05 < 0.4  # what floating point gives
    assert cscl.selection_amount(1, 0.35, 0.05, 0.5) == Fraction(2, 5)
    assert [cscl.selection_amount(e, 0.35, 0.05, 0.5) for e in range(5)] == [
        Fraction(35, 100),
        Fraction(40, 100),
        Fraction(45, 100),
        Fraction(50, 100),
        Fraction(50, 100),
    ]
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])  # five pixels of class 0: ⌊0.4 · 5⌋ = 2 → 0.7
    prediction = torch.zeros(5, dtype=torch.long)
    portion = cscl.selection_amount(1, 0.35, 0.05, 0.5)
    assert cscl.class_thresholds(confidence, prediction, 1, portion).tolist() == pytest.approx([0.7])
    for n in (10, 15, 20, 25):  # ⌊0.4 · n⌋ exactly, for every multiple of 5
        ranked = torch.linspace(1.0, 0.01, n)
        threshold = cscl.class_thresholds(ranked, torch.zeros(n, dtype=torch.long), 1, portion)
        assert threshold.item() == pytest.approx(ranked[2 * n // 5].item())


def test_discriminator_downsampling_is_derived_from_the_feature_stride_and_validated():
    # conv arithmetic of D's five 4x4 convolutions (padding 1): stride 2 halves, stride 1 loses one pixel
    assert cscl.discriminator_output_side(64, 5) == 2  # DeepLab-v2 on a 512-pixel side: 64 → 32 → ... → 2
    assert cscl.discriminator_output_side(16, 2) == 1  # FCN-8s on Cityscapes: 16 → 8 → 4 → 3 → 2 → 1
    assert cscl.discriminator_output_side(16, 3) == 0 and cscl.discriminator_output_side(22, 3) == 0  # the bug
    assert cscl.discriminator_output_side(22, 2) == 2  # GTA5's 22 rows at stride 32
    derived = {
        a: cscl.discriminator_downsampling(cscl.Hyperparams(architecture=a))
        for a in ("deeplabv2_resnet101", "fcn8s_vgg16", "tiny")
    }
    assert derived["deeplabv2_resnet101"] == 5 and derived["fcn8s_vgg16"] == 2 and derived["tiny"] == 2
    assert cscl.discriminator_downsampling(cscl.Hyperparams(discriminator_downsampling=4)) == 4  # as configured
    with pytest.raises(ValueError, match=r"discriminator_downsampling=3 leaves D no output on fcn8s_vgg16.*at most 2"):
        cscl.Hyperparams(architecture="fcn8s_vgg16", discriminator_downsampling=3)
    vgg = search_spaces.load("cscl").grids["table1_vgg16"]
    assert all(cscl.discriminator_downsampling(cscl.Hyperparams(**row)) == 2 for row in vgg)


PAPER_INFO = TaskInfo(num_classes=19, in_channels=3, class_names=tuple(f"c{k}" for k in range(19)))
VGG16 = {"architecture": "fcn8s_vgg16", "segmenter_optimizer": "adam", "learning_rate": 1e-4}


def test_the_vgg16_model_at_paper_sizes_has_a_discriminator_output():
    """The real FCN-8s CSCL, built on the meta device (shapes only, no memory), at Cityscapes, GTA5 and SYNTHIA
    sizes: E's stride-32 features, D, T_Q, T_C and C's prediction at image size."""
    hp = cscl.Hyperparams(**VGG16)
    with torch.device("meta"):
        modules = cscl.build(hp, PAPER_INFO)
    modules.eval()
    for size, d_size in (((512, 1024), (1, 5)), ((720, 1280), (2, 7)), ((760, 1280), (2, 7))):
        images = torch.empty(1, 3, *size, device="meta")
        features = modules["segmenter"].encode(images)
        assert features.main.shape[-2:] == (size[0] // 32, size[1] // 32) and features.main.shape[1] == 4096
        assert modules["discriminator"](features.main).shape[-2:] == d_size
        p = cscl.transferability_map(hp, modules, features.main)
        assert modules["critic"](features.main, p).shape[-2:] == features.main.shape[-2:]
        assert cscl.predict(hp, modules, images, StagePosition("adapt")).shape == (1, 19, *size)


class FCN8sShapes(nn.Module):
    """A stand-in for FCN-8s's VGG-16 encoder with its outputs' shapes (fc7 at stride 32 with 4096 channels, pool4
    at 16 with 512, pool3 at 8 with 256), a few thousand parameters instead of 134 million."""

    def __init__(self):
        super().__init__()
        self.fc7, self.pool4, self.pool3 = nn.Conv2d(3, 4096, 1), nn.Conv2d(3, 512, 1), nn.Conv2d(3, 256, 1)

    def forward(self, images):
        return Features(
            F.relu(self.fc7(F.avg_pool2d(images, 32))),
            (F.relu(self.pool4(F.avg_pool2d(images, 16))), F.relu(self.pool3(F.avg_pool2d(images, 8)))),
        )


def test_one_vgg16_step_and_predict_at_gta5_to_cityscapes_sizes(monkeypatch):
    """Alg. 2 once and `predict` on a 1280x720 GTA5 and a 1024x512 Cityscapes image through every CSCL module as
    built for FCN-8s (derived D, FCN-8s head with its skips, T_Q, T_C at 4096 channels); only the VGG-16 layers
    are replaced by a stand-in of the same output shapes (their full-size run: benchmarks/cscl_vgg16_paper_size.py)."""
    monkeypatch.setattr(
        cscl, "recipe_segmenter", lambda hp, info: Segmenter(FCN8sShapes(), FCN8sHead(info.num_classes), 4096, 8, 3)
    )
    torch.manual_seed(0)
    hp = cscl.Hyperparams(**VGG16, discriminator_learning_rate=1.5e-6)
    modules = cscl.build(hp, PAPER_INFO)
    modules.train()
    ctx = StepContext(
        hp=hp,
        info=PAPER_INFO,
        modules=modules,
        optimizers={n: o.optimizer for n, o in cscl.optimizers(hp, modules, 10).items()},
        state={"thresholds": torch.full((19,), 0.5)},
        stage="adapt",
        stage_step=0,
        stage_steps=10,
        target_epoch=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    batch = Batch(
        source_image=torch.rand(1, 3, 720, 1280),
        source_label=torch.randint(0, 19, (1, 720, 1280)),
        target_image=torch.rand(1, 3, 512, 1024),
    )
    losses = cscl.train_step(ctx, batch)
    assert {"loss_seg_source", "loss_adv", "loss_d", "loss_cri", "loss_reg", "domain_gap"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    modules.eval()
    assert cscl.predict(hp, modules, batch.target_image, StagePosition("adapt")).shape == (1, 19, 512, 1024)
    with pytest.raises(ValueError, match=r"=2 leaves D no output on \(8, 8\) features of fcn8s_vgg16; at most 0 fit"):
        cscl.discriminate(hp, modules, torch.zeros(1, 4096, 8, 8))


def test_trained_classes_make_a_k_class_model_inside_the_task_label_map():
    """Reading d: K = the 13 NTHU classes; the others are ignored in the source labels and never predicted."""
    nthu = search_spaces.load("cscl").task_defaults["cityscapes-nthu-rome"]["trained_classes"]
    assert cscl.Hyperparams(trained_classes=nthu).trained_class_ids() == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    with pytest.raises(ValueError, match="trained_classes must be comma-separated class ids"):
        cscl.Hyperparams(trained_classes="road,sky")
    with pytest.raises(ValueError, match=r"trained_classes \[3\] are not classes of the task"):
        cscl.build(cscl.Hyperparams(architecture="tiny", trained_classes="0,3"), INFO)
    labels = torch.tensor([[[0, 1, 2, 255]]])
    assert cscl.restrict_labels(labels, (0, 2), 255).tolist() == [[[0, 255, 2, 255]]]
    hp = cscl.Hyperparams(architecture="tiny", trained_classes="0,2")
    modules = cscl.build(hp, INFO).eval()
    logits = cscl.predict(hp, modules, torch.rand(2, 3, 64, 64), StagePosition("adapt"))
    assert torch.softmax(logits, 1)[:, 1].max() == 0 and set(logits.argmax(1).unique().tolist()) <= {0, 2}


def test_domain_gap_is_the_proxy_a_distance_of_d():
    source, target = torch.tensor([2.0, 1.0, -1.0, 3.0]), torch.tensor([-2.0, -1.0, -3.0, -0.5])
    # source: 1 of 4 wrong (< 0); target: 0 of 4 wrong (>= 0) → ε = ½ (1/4 + 0) → 2 (1 − 2 · 1/8) = 1.5
    assert cscl.domain_gap(source, target).item() == pytest.approx(1.5)
    assert cscl.domain_gap(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(0.0)  # undecided D: no gap


# ------------------------------------------------------------------ Alg. 2, step by step, against the equations
#
# Every test below runs a line of Alg. 2 as the platform runs it (modules, modes and optimisers from the loop's own
# `enter_stage`), in float64, records each optimiser's gradients when it steps, and recomputes the loss that
# optimiser should minimise straight from the paper's equations, with the modules' forward passes and none of
# methods/cscl.py's functions. Weights are set apart from each other and from the defaults (ξ1, ξ2, ξ3 = 0.7, 0.9,
# 1.3; γ = 0.4; EMA momentum 0.8), so that a swapped, dropped or ignored one changes a gradient.

EPS = 1e-8
WEIGHTS = {"xi1": 0.7, "xi2": 0.9, "xi3": 1.3, "gamma": 0.4, "centroid_momentum": 0.8}
K = 7  # synthetic-urban's classes
THRESHOLDS = [0.36, 0.33, 0.38, 0.35, 0.32, 0.37, 0.34]  # a mix of soft and zero labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one intra-op thread is faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Every optimiser step taken while it is attached: which optimiser, its parameters' names, their gradients
    when it steps and their values before and after."""

    def __init__(self, modules: nn.ModuleDict, optimizers: dict):
        names = {id(p): n for n, p in modules.named_parameters()}
        self.calls: list[dict] = []
        self.handles = []
        for name, optimizer in optimizers.items():
            params = [p for group in optimizer.param_groups for p in group["params"]]

            def before(opt, args, kwargs, name=name, params=params):
                self.calls.append(
                    {
                        "optimizer": name,
                        "names": [names[id(p)] for p in params],
                        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
                        "before": [p.detach().clone() for p in params],
                    }
                )

            def after(opt, args, kwargs, params=params):
                self.calls[-1]["after"] = [p.detach().clone() for p in params]

            self.handles += [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def sequence(self) -> list[str]:
        return [call["optimizer"] for call in self.calls]


def assert_gradients(call: dict, loss: torch.Tensor, reference: nn.ModuleDict) -> None:
    """The gradients the step produced for one optimiser equal d loss / d its parameters in `reference` (a copy of
    the modules as they were when that loss was computed)."""
    params = dict(reference.named_parameters())
    expected = torch.autograd.grad(loss, [params[n] for n in call["names"]], allow_unused=True, retain_graph=True)
    for name, got, want in zip(call["names"], call["grads"], expected):
        want = torch.zeros_like(params[name]) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10, msg=f"gradient of {name}")


def trial(data_root, **overrides):
    """A CSCL trial on synthetic-urban in float64 and its adapt stage's StepContext through `loop.enter_stage`."""
    defaults = search_spaces.load("cscl").task_defaults["synthetic-urban"]
    spec = TrialSpec(
        method="cscl",
        task="synthetic-urban",
        hyperparams={**defaults, **WEIGHTS, **overrides},
        seed=0,
        max_steps=None,
        eval_every=None,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    runner.modules.double()
    index = [s.name for s in runner.stages].index("adapt")
    ctx = loop.enter_stage(runner.trial, index, loop.Optimisers(runner.trial), runner.state, runner.generator).ctx
    ctx.state["thresholds"] = torch.tensor(THRESHOLDS)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, K, (2, 64, 64), generator=generator)
    labels[:, :4] = 255  # some unlabelled source pixels
    batch = Batch(
        source_image=torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64),
        source_label=labels,
        target_image=torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64),
    )
    step = cscl.Step(
        x_s=normalise(batch.source_image),
        y_s=batch.source_label,
        x_t=normalise(batch.target_image),
        delta=ctx.state["thresholds"].double(),
    )
    return runner, ctx, batch, step


# ---- the equations, written here from the paper (and the docstring's readings), independent of methods/cscl.py


def normalise(images):
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def eq2_p(hp, m, features):
    """P = 1 − U(T_Q(D(F))) with D's output probability (reading a), U the entropy of a Bernoulli in bits."""
    d = m["discriminator"](features)
    q = torch.sigmoid(m["quantizer"](torch.sigmoid(d) if hp.quantizer_input == "probability" else d))
    entropy = -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    return resize(1 - entropy, features.shape[-2:])


def classify(m, features, p):
    """C on F ⊙ (1 + P) (choice 1, residual), or on F itself (C^b) when p is None."""
    main = features.main if p is None else features.main * (1 + p)
    return m["segmenter"].classify(features._replace(main=main))


def eq7_source(logits, labels, reduction="image"):
    """Σ_m −log C(x)_m^{y_m} per image over labelled pixels, / |x| (reading b), mean over images."""
    log_p = F.log_softmax(resize(logits, labels.shape[-2:]), 1)
    valid = labels != 255
    nll = -log_p.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0] * valid
    return nll.sum() / valid.sum() if reduction == "selected" else (nll.sum((1, 2)) / nll[0].numel()).mean()


def eq8_cost(labels, probabilities, delta, gamma):
    """S_C per pixel: Σ_k −ŷ_k log(C_k/δ_k) + γ ŷ_k log ŷ_k, with 0 log 0 = 0."""
    log_ratio = torch.log(probabilities) - torch.log(delta.view(1, -1, 1, 1))
    entropy = torch.where(labels > 0, labels * torch.log(torch.where(labels > 0, labels, 1.0)), 0.0)
    return (-labels * log_ratio + gamma * entropy).sum(1)


def eq10_labels(probabilities, delta, gamma):
    """Eq. 9 ŷ_k = (C_k/δ_k)^{1/γ} / Σ_j (C_j/δ_j)^{1/γ}, kept where S_C(ŷ) < S_C(0) = 0 (Eq. 10), else 0."""
    powers = (probabilities / delta.view(1, -1, 1, 1)) ** (1 / gamma)
    soft = powers / powers.sum(1, keepdim=True)
    keep = eq8_cost(soft, probabilities, delta, gamma) < 0
    return soft * keep[:, None]


def eq7_target(labels, probabilities, delta, gamma, reduction="image"):
    cost = eq8_cost(labels, probabilities, delta, gamma)
    selected = labels.sum(1) > 0
    return cost[selected].mean() if reduction == "selected" else (cost.sum((1, 2)) / cost[0].numel()).mean()


def bce(logits, label):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def centroid(features, weights):
    """Eq. 12-13 for one batch: Σ w_k F / Σ w_k per class (K, F), and which classes have pixels."""
    sums = torch.einsum("bkhw,bfhw->kf", weights, features)
    counts = weights.sum((0, 2, 3))
    return sums / counts.clamp_min(EPS)[:, None], counts > EPS


def ema(history, seen, batch, present, momentum):
    mixed = torch.where(seen[:, None], momentum * history + (1 - momentum) * batch, batch)
    return torch.where(present[:, None], mixed, history), seen | present


def eq11(source, target, valid):
    """½ [KL(F_s^k ‖ F_t^k) + KL(F_t^k ‖ F_s^k)], mean over valid k, centroids made distributions by l1 (choice 2;
    ε added before normalising, and logs of entries below ε taken at ε, as the method guards them)."""
    p = source.clamp_min(0) + EPS
    q = target.clamp_min(0) + EPS
    p, q = (p / p.sum(1, keepdim=True))[valid], (q / q.sum(1, keepdim=True))[valid]
    log_p, log_q = p.clamp_min(EPS).log(), q.clamp_min(EPS).log()
    return (0.5 * ((p * (log_p - log_q)).sum(1) + (q * (log_q - log_p)).sum(1))).mean()


def one_hot(ids, k):
    return F.one_hot(ids, k).permute(0, 3, 1, 2).to(torch.float64)


def reference_pseudo_labels(hp, m, step, size):
    features = m["segmenter"].encode(step.x_t)
    logits = classify(m, features, eq2_p(hp, m, features.main))
    probabilities = torch.softmax(resize(logits, size), 1)
    if not hp.confidence_guided:
        return one_hot(probabilities.argmax(1), K)
    return eq10_labels(probabilities, step.delta, hp.gamma)


# ---- line 4


def test_line4_e_and_c_descend_the_source_term_of_eq7_with_p_detached(data_root):
    runner, ctx, _, step = trial(data_root)
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line4_update_segmenter_on_source(ctx, step)
    assert recorder.sequence() == ["segmenter"]
    features = reference["segmenter"].encode(step.x_s)
    loss = eq7_source(classify(reference, features, eq2_p(ctx.hp, reference, features.main).detach()), step.y_s)
    assert out["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)
    for name in ("discriminator", "quantizer", "critic"):  # P is an attention map here: nothing reaches D or T_Q
        assert all(p.grad is None for p in ctx.modules[name].parameters()), name
    # the update: SGD, momentum 0.9 (its first step is the gradient), weight decay 5e-4, the head at 10x
    optimizer = ctx.optimizers["segmenter"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-1])
    assert {(g["momentum"], g["weight_decay"]) for g in optimizer.param_groups} == {(0.9, 5e-4)}
    call, lrs = recorder.calls[0], [g["lr"] for g in optimizer.param_groups for _ in g["params"]]
    for name, before, after, grad, lr in zip(call["names"], call["before"], call["after"], call["grads"], lrs):
        torch.testing.assert_close(after, before - lr * (grad + 5e-4 * before), msg=name)


def test_line4_selected_reduction_averages_over_labelled_pixels(data_root):
    runner, ctx, _, step = trial(data_root, eq7_reduction="selected")
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line4_update_segmenter_on_source(ctx, step)
    features = reference["segmenter"].encode(step.x_s)
    logits = classify(reference, features, eq2_p(ctx.hp, reference, features.main).detach())
    loss = eq7_source(logits, step.y_s, "selected")
    assert out["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)
    assert loss.item() > eq7_source(logits, step.y_s, "image").item()  # 1/16 of the pixels are unlabelled


# ---- line 5


@pytest.mark.parametrize("confidence_guided", [True, False])
def test_line5_pseudo_labels_are_eq10_with_the_configured_gamma_or_one_hot_argmax(data_root, confidence_guided):
    runner, ctx, _, step = trial(data_root, confidence_guided=confidence_guided)
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line5_pseudo_labels(ctx, step)
    assert recorder.sequence() == []
    with torch.no_grad():
        expected = reference_pseudo_labels(ctx.hp, reference, step, (64, 64))
        expected_features = reference_pseudo_labels(ctx.hp, reference, step, (16, 16))
    torch.testing.assert_close(step.labels_t, expected)
    torch.testing.assert_close(step.labels_t_features, expected_features)
    kept = expected.sum(1) > 0
    assert out["pseudo_label_fraction"].item() == pytest.approx(kept.double().mean().item())
    if confidence_guided:
        assert kept.any() and (~kept).any()  # both a soft label and the zero label occur in this batch


# ---- line 6


def line6_reference(hp, m, step, labels_features, state):
    """(loss of E, loss of D, L_adv, L_div) from Eq. 1 and Eq. 11-13, with the EMA centroids of choice 3."""
    features_s, features_t = m["segmenter"].encode(step.x_s).main, m["segmenter"].encode(step.x_t).main
    loss_adv = bce(m["discriminator"](features_t), 1.0)  # E: target features → "source" (1)
    loss_e = hp.xi2 * loss_adv
    loss_div = torch.zeros(())
    if hp.symmetric_divergence:
        y = F.interpolate(step.y_s[:, None].double(), size=features_s.shape[-2:], mode="nearest")[:, 0].long()
        weights_s = one_hot(torch.where(y == 255, 0, y), K) * (y != 255)[:, None]
        weights_t = labels_features * one_hot(labels_features.argmax(1), K)
        batch_s, present_s = centroid(features_s, weights_s)
        batch_t, present_t = centroid(features_t, weights_t)
        empty = torch.zeros(K, dtype=torch.bool)
        current_s, seen_s = ema(
            state.get("centroids_source", torch.zeros_like(batch_s)),
            state.get("centroids_source_seen", empty),
            batch_s,
            present_s,
            hp.centroid_momentum,
        )
        current_t, seen_t = ema(
            state.get("centroids_target", torch.zeros_like(batch_t)),
            state.get("centroids_target_seen", empty),
            batch_t,
            present_t,
            hp.centroid_momentum,
        )
        loss_div = eq11(current_s, current_t, seen_s & seen_t)
        loss_e = loss_e + hp.xi3 * loss_div
    d_s, d_t = m["discriminator"](features_s.detach()), m["discriminator"](features_t.detach())
    loss_d = 0.5 * (bce(d_s, 1.0) + bce(d_t, 0.0))  # D: source 1, target 0
    return loss_e, loss_d, loss_adv, loss_div


@pytest.mark.parametrize(
    "weights", [{}, {"xi2": 0.0, "xi3": 2.0}, {"xi2": 2.0, "xi3": 0.0}], ids=["paper-like", "xi2=0", "xi3=0"]
)
def test_line6_e_and_d_play_eq1_and_e_descends_eq11_with_the_ema_centroids(data_root, weights):
    runner, ctx, _, step = trial(data_root, **weights)
    generator = torch.Generator().manual_seed(2)  # a history from earlier steps, for the even classes only
    history = {
        "centroids_source": torch.rand(K, 128, generator=generator, dtype=torch.float64),
        "centroids_target": torch.rand(K, 128, generator=generator, dtype=torch.float64),
        "centroids_source_seen": torch.arange(K) % 2 == 0,
        "centroids_target_seen": torch.arange(K) % 2 == 0,
    }
    ctx.state.update(history)
    reference = copy.deepcopy(ctx.modules)
    with torch.no_grad():
        labels_features = reference_pseudo_labels(ctx.hp, reference, step, (16, 16))
    cscl.line5_pseudo_labels(ctx, step)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line6_update_encoder_and_discriminator(ctx, step)
    assert recorder.sequence() == ["segmenter", "discriminator"]
    loss_e, loss_d, loss_adv, loss_div = line6_reference(ctx.hp, reference, step, labels_features, history)
    assert out["loss_adv"].item() == pytest.approx(loss_adv.item(), rel=1e-9)
    assert out["loss_div"].item() == pytest.approx(loss_div.item(), rel=1e-9) and loss_div.item() > 0
    assert out["loss_d"].item() == pytest.approx(loss_d.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss_e, reference)  # E (C has no gradient: it is not in this loss)
    assert_gradients(recorder.calls[1], loss_d, reference)  # D on detached features of E before E's update
    assert all(p.grad is None or not p.grad.any() for p in ctx.modules["segmenter"].classifier.parameters())


def test_line6_real_and_fake_targets_of_d_and_e_with_a_constant_d(data_root):
    """D's last convolution outputs c everywhere: E's L_adv is BCE(c, source = 1) = softplus(−c), D's loss
    ½[softplus(−c) + softplus(c)], and D's bias gradient ½[(σ(c) − 1) + σ(c)]; the domain gap of an undecided D
    is 0 and of a D that calls everything source is 0 too (it is wrong on every target feature)."""
    runner, ctx, _, step = trial(data_root, symmetric_divergence=False)
    last = ctx.modules["discriminator"].model[-1]
    c = 0.7
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(c)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line6_update_encoder_and_discriminator(ctx, step)
    softplus = lambda x: math.log1p(math.exp(x))
    assert out["loss_adv"].item() == pytest.approx(softplus(-c), rel=1e-9)
    assert out["loss_d"].item() == pytest.approx(0.5 * (softplus(-c) + softplus(c)), rel=1e-9)
    sigmoid = 1 / (1 + math.exp(-c))
    bias = recorder.calls[1]["names"].index("discriminator.model.8.bias")
    assert recorder.calls[1]["grads"][bias].item() == pytest.approx(0.5 * ((sigmoid - 1) + sigmoid), rel=1e-9)
    assert out["domain_gap"].item() == pytest.approx(0.0)


# ---- line 7


def line7_reference(hp, m, step, labels_t):
    """L_seg (both terms of Eq. 7, P with gradients) + ξ1 L_cri (Eq. 3), E's features frozen; and the target term."""
    with torch.no_grad():
        features_s, features_t = m["segmenter"].encode(step.x_s), m["segmenter"].encode(step.x_t)
    p_s, p_t = eq2_p(hp, m, features_s.main), eq2_p(hp, m, features_t.main)
    source = eq7_source(classify(m, features_s, p_s), step.y_s, hp.eq7_reduction)
    probabilities_t = torch.softmax(resize(classify(m, features_t, p_t), (64, 64)), 1)
    target = eq7_target(labels_t, probabilities_t, step.delta, hp.gamma, hp.eq7_reduction)
    critic = 0.5 * (-m["critic"](features_s.main, p_s).mean() - m["critic"](features_t.main, p_t).mean())
    return source + target + hp.xi1 * critic, source + target, critic, target


@pytest.mark.parametrize("weights", [{}, {"xi1": 0.0}, {"xi1": 2.0}, {"eq7_reduction": "selected"}])
def test_line7_t_q_descends_l_seg_plus_xi1_l_cri_through_p_only(data_root, weights):
    runner, ctx, _, step = trial(data_root, **weights)
    cscl.line5_pseudo_labels(ctx, step)
    reference = copy.deepcopy(ctx.modules)
    with torch.no_grad():
        labels_t = reference_pseudo_labels(ctx.hp, reference, step, (64, 64))
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line7_update_quantizer(ctx, step)
    assert recorder.sequence() == ["quantizer"]
    loss, loss_seg, loss_cri, target = line7_reference(ctx.hp, reference, step, labels_t)
    assert out["loss_seg_quantizer"].item() == pytest.approx(loss_seg.item(), rel=1e-9)
    assert out["loss_cri"].item() == pytest.approx(loss_cri.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)
    assert abs(target.item()) > 1e-3  # the target term matters in this batch (a dropped one would show)
    optimizer = ctx.optimizers["quantizer"]
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]) == (1e-4, (0.9, 0.99))


# ---- line 8


def line8_reference(hp, m, step, labels_t):
    """L_reg (Eq. 6) with R = R^s + R^a (Eq. 4-5) of the current T_Q, over labelled source and selected target
    pixels, V upsampled to the image."""
    with torch.no_grad():
        features_s, features_t = m["segmenter"].encode(step.x_s), m["segmenter"].encode(step.x_t)
        p_s, p_t = eq2_p(hp, m, features_s.main), eq2_p(hp, m, features_t.main)

        def reward(features, p, labels):
            with_p = torch.softmax(resize(classify(m, features, p), (64, 64)), 1)
            without_p = torch.softmax(resize(classify(m, features, None), (64, 64)), 1)
            k = labels.argmax(1, keepdim=True)
            r_s = (with_p.argmax(1, keepdim=True) == k).double()
            r_a = (with_p.gather(1, k) > without_p.gather(1, k)).double()
            return (r_s + r_a)[:, 0]

        y_s = torch.where(step.y_s == 255, 0, step.y_s)
        reward_s = reward(features_s, p_s, one_hot(y_s, K))
        reward_t = reward(features_t, p_t, labels_t)
    value_s = resize(m["critic"](features_s.main, p_s), (64, 64))[:, 0]
    value_t = resize(m["critic"](features_t.main, p_t), (64, 64))[:, 0]
    valid_s, valid_t = step.y_s != 255, labels_t.sum(1) > 0
    loss = 0.5 * (((value_s - reward_s) ** 2)[valid_s].mean() + ((value_t - reward_t) ** 2)[valid_t].mean())
    return loss, reward_t


def test_line8_t_c_regresses_the_rewards_of_eq4_and_eq5(data_root):
    runner, ctx, _, step = trial(data_root)
    cscl.line5_pseudo_labels(ctx, step)
    cscl.line7_update_quantizer(ctx, step)  # line 8 sees T_Q after its update
    for p in ctx.modules.parameters():  # what line 8 alone leaves
        p.grad = None
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.line8_update_critic(ctx, step)
    assert recorder.sequence() == ["critic"]
    loss, reward_t = line8_reference(ctx.hp, reference, step, step.labels_t)
    assert out["loss_reg"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert out["reward_target_mean"].item() == pytest.approx(reward_t.mean().item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)
    assert set(reward_t.unique().tolist()) == {0.0, 1.0, 2.0}  # both rewards occur
    for name in ("segmenter", "discriminator", "quantizer"):  # T_C's loss reaches T_C only
        assert all(p.grad is None or not p.grad.any() for p in ctx.modules[name].parameters()), name


# ---- the Eq. 7 reading and the whole iteration


def test_eq7_reading_updates_e_and_c_with_the_target_term_last(data_root):
    runner, ctx, _, step = trial(data_root, pseudo_label_training="eq7")
    cscl.line5_pseudo_labels(ctx, step)
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = cscl.eq7_update_segmenter_on_target(ctx, step)
    features = reference["segmenter"].encode(step.x_t)
    probabilities = torch.softmax(
        resize(classify(reference, features, eq2_p(ctx.hp, reference, features.main).detach()), (64, 64)), 1
    )
    loss = eq7_target(step.labels_t, probabilities, step.delta, ctx.hp.gamma)
    assert out["loss_seg_target"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)


def test_a_full_iteration_runs_lines_4_to_8_in_order_on_one_batch(data_root):
    runner, ctx, batch, _ = trial(data_root)
    twin_runner, twin, _, twin_step = trial(data_root)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    losses = cscl.train_step(ctx, batch)
    assert recorder.sequence() == ["segmenter", "segmenter", "discriminator", "quantizer", "critic"]
    expected = {}
    for line in (
        cscl.line4_update_segmenter_on_source,
        cscl.line5_pseudo_labels,
        cscl.line6_update_encoder_and_discriminator,
        cscl.line7_update_quantizer,
        cscl.line8_update_critic,
    ):
        expected.update(line(twin, twin_step))
    assert set(losses) == set(expected) and all(torch.equal(losses[k], expected[k]) for k in losses)
    for (name, ours), theirs in zip(ctx.modules.state_dict().items(), twin.modules.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert "loss_seg_target" not in losses  # Alg. 2 as printed: no E, C update on the target term


def test_schedules_and_optimiser_hyperparameters(data_root):
    assert cscl.METHOD.imagenet_backbone  # "initially pre-trained by the ImageNet" (Sec. 3.5): paper tasks ask for it
    runner, ctx, _, _ = trial(data_root)
    stage_steps = ctx.stage_steps
    assert stage_steps == 200  # 2 source epochs of 800 images at batch 8
    optims = cscl.optimizers(ctx.hp, ctx.modules, stage_steps)
    for name, learning_rate in (("discriminator", 1.5e-4), ("quantizer", 1e-4), ("critic", 1e-4)):
        group = optims[name].optimizer.param_groups[0]
        assert isinstance(optims[name].optimizer, torch.optim.Adam)
        assert (group["lr"], group["betas"]) == (learning_rate, (0.9, 0.99)), name
    for _ in range(50):
        for optim in optims.values():
            optim.optimizer.step()
            optim.scheduler.step()
    poly = (1 - 50 / stage_steps) ** 0.9  # lr_0 (1 − t/T)^0.9 at t = 50
    assert optims["segmenter"].optimizer.param_groups[1]["lr"] == pytest.approx(1e-1 * poly)
    assert optims["discriminator"].optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4 * poly)
    vgg = cscl.Hyperparams(architecture="tiny", segmenter_optimizer="adam", learning_rate=1e-4)
    adam = cscl.optimizers(vgg, cscl.build(vgg, INFO), 100)["segmenter"]
    assert adam.optimizer.param_groups[0]["betas"] == (0.9, 0.99) and adam.scheduler is not None
    constant = cscl.Hyperparams(architecture="tiny", segmenter_optimizer="adam", adam_schedule="constant")
    assert all(
        o.scheduler is None
        for o in cscl.optimizers(constant, cscl.build(constant, INFO), 100).values()
        if isinstance(o.optimizer, torch.optim.Adam)
    )


def test_the_threshold_pass_follows_alg1_with_s_a_of_the_source_epoch(data_root):
    runner, ctx, batch, _ = trial(data_root)
    ctx.source_epoch, ctx.target_epoch = 2, 0  # S_A = 35% + 2 · 5% = 45%, whatever the target epoch
    with torch.no_grad():
        out = cscl.collect_confidences(ctx, batch.target_image, None)
        features = ctx.modules["segmenter"].encode(normalise(batch.target_image))
        probabilities = torch.softmax(classify(ctx.modules, features, eq2_p(ctx.hp, ctx.modules, features.main)), 1)
    confidence, prediction = probabilities.max(1)
    torch.testing.assert_close(out["confidence"], confidence.flatten())
    assert torch.equal(out["prediction"].long(), prediction.flatten())
    update = cscl.update_thresholds(ctx, out)
    assert update["selection_amount"] == pytest.approx(0.45)
    for k in range(K):
        ranked = confidence.flatten()[prediction.flatten() == k].sort(descending=True).values
        expected = ranked[45 * len(ranked) // 100] if len(ranked) else 1.0
        assert update["thresholds"][k].item() == pytest.approx(float(expected), rel=1e-6), k


def test_prediction_goes_through_the_transferability_map(data_root):
    runner, ctx, batch, _ = trial(data_root)
    ctx.modules.eval()
    images = batch.target_image
    with torch.no_grad():
        logits = cscl.predict(ctx.hp, ctx.modules, images, StagePosition("adapt"))
        features = ctx.modules["segmenter"].encode(normalise(images))
        expected = resize(classify(ctx.modules, features, eq2_p(ctx.hp, ctx.modules, features.main)), (64, 64))
        without = resize(classify(ctx.modules, features, None), (64, 64))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, without)


def test_the_logits_reading_feeds_d_logits_to_t_q(data_root):
    runner, ctx, _, step = trial(data_root, quantizer_input="logits")
    with torch.no_grad():
        features = ctx.modules["segmenter"].encode(step.x_s).main
        p = cscl.transferability_map(ctx.hp, ctx.modules, features)
        probability = eq2_p(dataclasses.replace(ctx.hp, quantizer_input="probability"), ctx.modules, features)
    torch.testing.assert_close(p, eq2_p(ctx.hp, ctx.modules, features))
    assert not torch.allclose(p, probability)


# ------------------------------------------------------------------ stages


def test_source_warmup_is_line_4_alone_before_the_first_threshold_pass(data_root):
    runner, ctx, batch, _ = trial(data_root, source_warmup=0.25)
    warmup, adapt = cscl.stages(ctx.hp)
    assert (warmup.trains, warmup.uses_target, warmup.target_pass) == (("segmenter",), False, None)
    epochs = ctx.hp.epochs
    assert (warmup.budget, adapt.budget) == (contract.epochs(0.25 * epochs), contract.epochs(0.75 * epochs))
    assert adapt.target_pass is not None and adapt.target_pass.every == "source"  # S_A counts source epochs
    assert set(cscl.warmup_optimizers(ctx.hp, ctx.modules, 10)) == {"segmenter"}
    assert len(cscl.stages(cscl.Hyperparams(source_warmup=0.0))) == 1  # Alg. 2 as printed
    reference = copy.deepcopy(ctx.modules)
    optimizers = {"segmenter": cscl.warmup_optimizers(ctx.hp, ctx.modules, 10)["segmenter"].optimizer}
    ctx.optimizers = optimizers
    recorder = Recorder(ctx.modules, optimizers)
    out = cscl.warmup_step(ctx, dataclasses.replace(batch, target_image=None))
    features = reference["segmenter"].encode(normalise(batch.source_image))
    loss = eq7_source(
        classify(reference, features, eq2_p(ctx.hp, reference, features.main).detach()), batch.source_label
    )
    assert out["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss, reference)


def test_ablation_switches_build_and_stage_what_table1_removes(data_root):
    no_tc = cscl.Hyperparams(critical_transfer=False)
    assert cscl.stages(no_tc)[-1].trains == ("segmenter", "discriminator")
    assert set(cscl.build(dataclasses.replace(no_tc, architecture="tiny"), INFO)) == {"segmenter", "discriminator"}
    assert cscl.stages(cscl.Hyperparams(confidence_guided=False))[-1].target_pass is None
    runner, ctx, batch, _ = trial(data_root, critical_transfer=False, symmetric_divergence=False)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    losses = cscl.train_step(ctx, batch)
    assert recorder.sequence() == ["segmenter", "segmenter", "discriminator"]
    assert "loss_div" not in losses and "loss_cri" not in losses
