"""SeUDA: Eq. 2-4 on hand values, the frozen segmenter, post-processing of every row, histogram matching, stage-1
reuse at the printed GAN budget, and step-level tests: each stage's step as the platform runs it, every optimiser's
gradients and returned losses against Eq. 1-4 recomputed here without the method's functions, the real and fake
targets, each weight in its place, the pool, every detach, the schedules and the optimisers' hyperparameters."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import methods
import search_spaces
from methods import seuda
from methods.contract import Batch, SampleImages, StagePosition, TaskInfo
from methods.shared.gan import ImagePool
from platform import budgets, checkpoints, config, loop
from platform.config import UsageError
from platform.loop import LocalSession, TrialRunner, TrialSpec

INFO = TaskInfo(num_classes=3, in_channels=1, class_names=("background", "left lung", "right lung"))


def test_least_squares_losses_by_hand():
    # generator: mean (D − 1)² = ((0.5 − 1)² + (1 − 1)²) / 2
    assert seuda.generator_gan_loss(torch.tensor([0.5, 1.0])).item() == pytest.approx(0.125)
    # discriminator: ½[mean (D(real) − 1)² + mean D(fake)²] = ½[(0.04 + 0) / 2 + (0.09 + 0.01) / 2]
    loss = seuda.discriminator_loss(torch.tensor([0.8, 1.0]), torch.tensor([0.3, -0.1]))
    assert loss.item() == pytest.approx(0.5 * (0.02 + 0.05))


def test_cycle_loss_and_the_weights_of_eq_4():
    x = torch.zeros(1, 1, 2, 2)
    assert seuda.cycle_loss(x + 0.5, x, x - 0.25, x).item() == pytest.approx(0.75)  # L1 means of both cycles
    hp = seuda.Hyperparams()
    total = seuda.generator_objective(hp, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.1), torch.tensor(4.0))
    assert total.item() == pytest.approx(1.0 + 0.5 * 2.0 + 10 * 0.1 + 0.5 * 4.0)
    cyuda = seuda.Hyperparams(lambda_sem=0.0)
    assert seuda.generator_objective(
        cyuda, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.1), None
    ).item() == pytest.approx(3.0)


def test_one_hot_masks_leave_ignored_pixels_empty():
    masks = seuda.one_hot_masks(torch.tensor([[[0, 2], [255, 1]]]), 3, 255)
    assert masks[0, :, 0, 0].tolist() == [1, 0, 0] and masks[0, :, 0, 1].tolist() == [0, 0, 1]
    assert masks[0, :, 1, 0].tolist() == [0, 0, 0]


def test_postprocessing_keeps_the_largest_component_per_lung_and_fills_holes():
    drawn = np.array(
        [
            [1, 1, 1, 0, 0, 0, 2],
            [1, 0, 1, 0, 2, 2, 0],
            [1, 1, 1, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0],
        ]
    )
    expected = np.array(
        [
            [1, 1, 1, 0, 0, 0, 2],  # the corner 2 touches the block diagonally: one 8-connected component
            [1, 1, 1, 0, 2, 2, 0],  # the hole is filled
            [1, 1, 1, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],  # the stray left-lung pixel is dropped
        ]
    )
    assert np.array_equal(seuda.postprocess(drawn, 3), expected)
    assert not seuda.postprocess(np.zeros((3, 3), np.int64), 3).any()


def test_histogram_matching_maps_target_intensities_onto_the_source_histogram():
    histogram = seuda.SourceHistogram(1)
    source = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)  # 3/4 black, 1/4 white
    histogram.add(source)
    assert histogram.counts[0, 0] == 3 and histogram.counts[0, 255] == 1
    target = torch.tensor([0.2, 0.3, 0.4, 0.5]).reshape(1, 1, 2, 2)  # darker half, brighter half: ordered
    matched = seuda.histogram_match(target, histogram.counts)
    assert matched.flatten().tolist() == [0.0, 0.0, 0.0, 1.0]  # the CDF of the source, rank for rank


def _runner(data_root, **overrides):
    defaults = search_spaces.load("seuda").task_defaults["synthetic-cxr"]
    spec = TrialSpec(
        method="seuda",
        task="synthetic-cxr",
        hyperparams={**defaults, **overrides},
        seed=0,
        max_steps=4,
        eval_every=1000,
        data_root=data_root,
    )
    return TrialRunner(spec, LocalSession())


def _context(runner, stage):
    """The stage's StepContext through the loop's own stage set-up (modes, optimisers)."""
    index = runner.stages.index(stage)
    return loop.enter_stage(runner.trial, index, loop.Optimisers(runner.trial), runner.state, runner.generator).ctx


def _batch(generator):
    return Batch(
        source_image=torch.rand(2, 1, 64, 64, generator=generator),
        source_label=torch.randint(0, 3, (2, 64, 64), generator=generator),
        target_image=torch.rand(2, 1, 64, 64, generator=generator),
    )


def test_l_sem_reaches_the_generator_through_the_frozen_segmenter(data_root):
    runner = _runner(data_root)
    segmenter_stage, translate = runner.stages
    assert [s.name for s in runner.stages] == ["segmenter", "translate"] and not segmenter_stage.uses_target
    ctx = _context(runner, translate)
    segmenter = runner.modules["segmenter"]
    assert not segmenter.training and not any(p.requires_grad for p in segmenter.parameters())
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}  # weights and batch-norm statistics
    generator = torch.Generator().manual_seed(0)
    batch = _batch(generator)

    # L_sem alone: its gradient reaches G_t→s (through f_s) and nothing of G_s→t
    fake_s = runner.modules["generator_t2s"](seuda.to_gan(batch.target_image))
    masks = torch.softmax(seuda.segment(runner.modules, seuda.from_gan(fake_s)), dim=1)
    seuda.generator_gan_loss(runner.modules["discriminator_m"](masks)).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in runner.modules["generator_t2s"].parameters()
        if p.dim() > 1
    )
    assert all(p.grad is None for p in runner.modules["generator_s2t"].parameters())
    assert all(p.grad is None for p in segmenter.parameters())
    for p in runner.modules.parameters():
        p.grad = None

    metrics = seuda.gan_step(ctx, batch)
    assert {"loss_g", "loss_cyc", "loss_sem", "loss_d_s", "loss_d_t", "loss_d_m"} <= set(metrics)
    assert all(torch.equal(before[k], v) for k, v in segmenter.state_dict().items())
    assert [len(ctx.state[p]) for p in ("pool_s", "pool_t", "pool_m")] == [2, 2, 2]  # the pools fill up


def test_cyuda_has_no_mask_discriminator_and_baselines_have_one_stage(data_root):
    cyuda = _runner(data_root, lambda_sem=0.0)
    assert "discriminator_m" not in cyuda.modules
    metrics = seuda.gan_step(_context(cyuda, cyuda.stages[1]), _batch(torch.Generator().manual_seed(0)))
    assert "loss_sem" not in metrics and "loss_d_m" not in metrics
    for adaptation in ("none", "histogram"):
        runner = _runner(data_root, adaptation=adaptation)
        assert [s.name for s in runner.stages] == ["segmenter"] and set(runner.modules) == {
            "segmenter",
            "source_histogram",
        }


def test_a_stage_1_checkpoint_is_reused_and_skips_stage_1(data_root, tmp_path):
    first = _runner(data_root, adaptation="none")
    first.run()
    meta = first.reporter._checkpoint_meta(first.trial.positions[0], first.session.reports[-1], 1)
    checkpoints.write_weights(str(tmp_path), checkpoints.LAST, first.modules, meta)
    path = str(tmp_path / "last.pt")
    second = _runner(data_root, segmenter_weights=path)
    assert [s.name for s in second.stages] == ["translate"]
    for name in ("segmenter", "source_histogram"):
        for key, value in first.modules[name].state_dict().items():
            assert torch.equal(second.modules[name].state_dict()[key], value), key
    # the platform validates the file before any trial starts; a file of another method is named
    method, task = methods.get("seuda"), config.tasks.get("synthetic-cxr")
    config.check_weights_files(method, task, {"architecture": "tiny", "segmenter_weights": path})
    torch.save({"discriminator.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="holds no 'segmenter' weights"):
        config.check_weights_files(
            method, task, {"architecture": "tiny", "segmenter_weights": str(tmp_path / "other.pt")}
        )
    with pytest.raises(ValueError, match="only trains the segmenter"):
        seuda.Hyperparams(adaptation="none", segmenter_weights=path)


def test_inference_goes_through_the_translator_and_post_processing_in_every_row(data_root):
    runner = _runner(data_root)
    runner.modules.eval()
    images = torch.rand(2, 1, 64, 64)
    scores = seuda.predict(runner.hp, runner.modules, images, StagePosition("translate", 1))
    assert set(scores.unique().tolist()) <= {0.0, 1.0} and torch.all(scores.sum(1) == 1)  # post-processed one-hot
    expected = seuda.segment(runner.modules, seuda.translate(runner.modules, images)).argmax(1)
    cleaned = np.stack([seuda.postprocess(e, 3) for e in expected.numpy()])
    assert np.array_equal(scores.argmax(1).numpy(), cleaned)
    # stage 1 (T-noDA, S-test) is post-processed the same way (Sec. 3), and T-HistM after histogram matching
    raw = seuda.predict(runner.hp, runner.modules, images, StagePosition("segmenter", 0))
    untranslated = np.stack([seuda.postprocess(e, 3) for e in seuda.segment(runner.modules, images).argmax(1).numpy()])
    assert np.array_equal(raw.argmax(1).numpy(), untranslated) and torch.all(raw.sum(1) == 1)
    runner.modules["source_histogram"].add(torch.rand(4, 1, 64, 64))
    histogram = dataclasses.replace(runner.hp, adaptation="histogram")
    matched = seuda.histogram_match(images, runner.modules["source_histogram"].counts)
    cleaned = np.stack([seuda.postprocess(e, 3) for e in seuda.segment(runner.modules, matched).argmax(1).numpy()])
    scores = seuda.predict(histogram, runner.modules, images, StagePosition("segmenter", 0))
    assert np.array_equal(scores.argmax(1).numpy(), cleaned)
    off = dataclasses.replace(runner.hp, postprocess=False)
    assert torch.equal(
        seuda.predict(off, runner.modules, images, StagePosition("segmenter", 0)), seuda.segment(runner.modules, images)
    )
    translate = StagePosition("translate", 1)
    samples = seuda.samples(runner.hp, runner.modules, SampleImages(target=images, source=images), translate)
    assert set(samples) == {"target", "target_to_source"}


def test_the_gan_stage_lasts_the_printed_epochs_whether_stage_1_runs_or_is_reused(data_root, tmp_path):
    hp = seuda.Hyperparams()
    info = dataclasses.replace(INFO, source_train_size=96, target_train_size=172)  # Montgomery, JSRT train (7:1:2)
    in_trial = budgets.stage_steps(seuda.stages(hp), info, 1, 1, None)
    weights = tmp_path / "stage1.pt"
    weights.write_bytes(b"")  # the stages only read the field
    reused = budgets.stage_steps(
        seuda.stages(dataclasses.replace(hp, segmenter_weights=str(weights))), info, 1, 1, None
    )
    assert in_trial == [200 * 96, 200 * 96] and reused == [200 * 96]  # 200 source epochs of GANs either way


# ------------------------------------------------------------------ step level, against Eq. 1-4
#
# The stages' steps as the platform runs them (modules, modes, optimisers from `loop.enter_stage`), in float64; each
# optimiser's gradients are recorded when it steps and compared with the gradient of the loss it should minimise,
# written below from the paper with the modules' forward passes. α, β, λ are set apart from each other and from the
# paper's (0.7, 3, 1.3), so that a swapped or dropped weight changes a gradient.

WEIGHTS = {"alpha": 0.7, "beta": 3.0, "lambda_sem": 1.3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Every optimiser step while attached: its name, its parameters' names, gradients, values before and after."""

    def __init__(self, modules: nn.ModuleDict, optimizers: dict):
        names = {id(p): n for n, p in modules.named_parameters()}
        self.calls: list[dict] = []
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

            optimizer.register_step_pre_hook(before)
            optimizer.register_step_post_hook(after)

    def call(self, name: str) -> dict:
        [call] = [c for c in self.calls if c["optimizer"] == name]
        return call


def assert_gradients(call: dict, loss: torch.Tensor, reference: nn.ModuleDict) -> None:
    params = dict(reference.named_parameters())
    expected = torch.autograd.grad(loss, [params[n] for n in call["names"]], allow_unused=True, retain_graph=True)
    for name, got, want in zip(call["names"], call["grads"], expected):
        want = torch.zeros_like(params[name]) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10, msg=f"gradient of {name}")


def _stage(data_root, name, **overrides):
    """A float64 seuda trial on synthetic-cxr at its own budgets and the StepContext of stage `name`."""
    defaults = search_spaces.load("seuda").task_defaults["synthetic-cxr"]
    spec = TrialSpec(
        method="seuda",
        task="synthetic-cxr",
        hyperparams={**defaults, **WEIGHTS, **overrides},
        seed=0,
        max_steps=None,
        eval_every=None,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    runner.modules.double()
    index = [s.name for s in runner.stages].index(name)
    ctx = loop.enter_stage(runner.trial, index, loop.Optimisers(runner.trial), runner.state, runner.generator).ctx
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 64, 64), generator=generator)
    labels[:, :3] = 255
    batch = Batch(
        source_image=torch.rand(2, 1, 64, 64, generator=generator, dtype=torch.float64),
        source_label=labels,
        target_image=torch.rand(2, 1, 64, 64, generator=generator, dtype=torch.float64),
    )
    return runner, ctx, batch


def segmenter_logits(m, images):
    """f_s on images in [0, 1], normalised with the ImageNet channel means (grey images), logits at image size."""
    mean, std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
    logits = m["segmenter"]((images - mean) / std)
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def cross_entropy(logits, labels):
    valid = labels != 255
    log_p = F.log_softmax(logits, 1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return -(log_p * valid).sum() / valid.sum()


def lsq(prediction, target):
    """The least-squares GAN loss that replaces Eq. 1's log likelihood (Sec. 2.3): mean (D(x) − target)²."""
    return ((prediction - target) ** 2).mean()


def test_stage1_descends_the_pixel_cross_entropy_with_sgd_and_counts_the_source_histogram(data_root):
    runner, ctx, batch = _stage(data_root, "segmenter")
    assert ctx.stage_steps == 300 and not runner.modules["generator_t2s"].training  # 3 epochs of 800 at batch 8
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = seuda.segmenter_step(ctx, batch)
    loss = cross_entropy(segmenter_logits(reference, batch.source_image), batch.source_label)
    assert out["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-9)
    call = recorder.call("segmenter")
    assert_gradients(call, loss, reference)
    optimizer = ctx.optimizers["segmenter"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-1])
    lrs = [g["lr"] for g in optimizer.param_groups for _ in g["params"]]
    for name, before, after, grad, lr in zip(call["names"], call["before"], call["after"], call["grads"], lrs):
        torch.testing.assert_close(after, before - lr * (grad + 5e-4 * before), msg=name)  # SGD, momentum's first
    levels = (batch.source_image * 255).round().long().flatten()
    assert torch.equal(ctx.modules["source_histogram"].counts[0], torch.bincount(levels, minlength=256).double())


def gan_reference(hp, m, batch, pools, generator):
    """Eq. 4 for the generators and ½[(D(real) − 1)² + D(pooled fake)²] for D_s, D_t, D_m (choice 4), with
    CycleGAN's pool of the 50 previous fakes (the same random draws as the step: `generator` is a copy of its)."""
    x_s, x_t = batch.source_image * 2 - 1, batch.target_image * 2 - 1
    fake_s, fake_t = m["generator_t2s"](x_t), m["generator_s2t"](x_s)  # x_t→s, x_s→t
    gan_t2s = lsq(m["discriminator_s"](fake_s), 1.0)  # L_GAN(G_t→s, D_s): G wants D_s to call x_t→s real
    gan_s2t = lsq(m["discriminator_t"](fake_t), 1.0)
    cycle = (m["generator_s2t"](fake_s) - x_t).abs().mean() + (m["generator_t2s"](fake_t) - x_s).abs().mean()
    total = gan_s2t + hp.alpha * gan_t2s + hp.beta * cycle
    masks = torch.softmax(segmenter_logits(m, (fake_s + 1) / 2), 1)  # f_s(x_t→s), gradients through frozen f_s
    if hp.lambda_sem > 0:
        sem = lsq(m["discriminator_m"](masks), 1.0)
        total = total + hp.lambda_sem * sem
    valid = batch.source_label != 255
    y_s = F.one_hot(torch.where(valid, batch.source_label, 0), 3).permute(0, 3, 1, 2).double() * valid[:, None]
    d_losses = {}
    pairs = [("discriminator_s", x_s, fake_s, "pool_s"), ("discriminator_t", x_t, fake_t, "pool_t")]
    if hp.lambda_sem > 0:
        pairs.append(("discriminator_m", y_s, masks, "pool_m"))
    for name, real, fake, pool in pairs:
        pooled = ImagePool(hp.pool_size, list(pools[pool])).query(fake.detach(), generator)
        d_losses[name] = 0.5 * (lsq(m[name](real), 1.0) + lsq(m[name](pooled), 0.0))
    return total, d_losses, {"gan_t2s": gan_t2s, "gan_s2t": gan_s2t, "cyc": cycle}


def _full_pools(ctx, generator):
    """Pools of 50 earlier fakes each, so that a query swaps some images (p = ½) as it does after 50 steps."""
    ctx.state.update(
        {
            "pool_s": [torch.rand(1, 1, 64, 64, generator=generator, dtype=torch.float64) * 2 - 1 for _ in range(50)],
            "pool_t": [torch.rand(1, 1, 64, 64, generator=generator, dtype=torch.float64) * 2 - 1 for _ in range(50)],
            "pool_m": [
                torch.softmax(torch.randn(1, 3, 64, 64, generator=generator, dtype=torch.float64), 1) for _ in range(50)
            ],
        }
    )
    return {k: list(ctx.state[k]) for k in ("pool_s", "pool_t", "pool_m")}


@pytest.mark.parametrize(
    "weights",
    [{}, {"alpha": 0.0, "lambda_sem": 2.0}, {"alpha": 2.0, "beta": 0.0}, {"lambda_sem": 0.0}],
    ids=["seuda", "alpha=0", "beta=0", "cyuda"],
)
def test_gan_step_generators_descend_eq4_and_each_discriminator_its_pooled_least_squares_loss(data_root, weights):
    runner, ctx, batch = _stage(data_root, "translate", **weights)
    segmenter = ctx.modules["segmenter"]
    assert not segmenter.training and not any(p.requires_grad for p in segmenter.parameters())
    frozen = {k: v.clone() for k, v in segmenter.state_dict().items()}  # weights and batch-norm statistics
    pools = _full_pools(ctx, torch.Generator().manual_seed(4))
    reference = copy.deepcopy(ctx.modules)
    draws = torch.Generator().set_state(ctx.generator.get_state())
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = seuda.gan_step(ctx, batch)
    loss_g, d_losses, parts = gan_reference(ctx.hp, reference, batch, pools, draws)
    assert [c["optimizer"] for c in recorder.calls] == ["generators", *d_losses]  # generators first, then D_s, D_t, D_m
    assert out["loss_g"].item() == pytest.approx(loss_g.item(), rel=1e-9)
    for key in ("gan_t2s", "gan_s2t", "cyc"):
        assert out[f"loss_{key}"].item() == pytest.approx(parts[key].item(), rel=1e-9), key
    assert_gradients(recorder.call("generators"), loss_g, reference)
    for name, loss in d_losses.items():
        assert out[f"loss_{name.replace('discriminator', 'd')}"].item() == pytest.approx(loss.item(), rel=1e-9)
        assert_gradients(recorder.call(name), loss, reference)
    assert all(torch.equal(frozen[k], v) for k, v in segmenter.state_dict().items())  # f_s is not updated
    assert all(p.grad is None for p in segmenter.parameters())
    used = ("pool_s", "pool_t") + (("pool_m",) if ctx.hp.lambda_sem > 0 else ())
    assert all(len(ctx.state[pool]) == 50 for pool in used)  # full pools stay full


def test_the_pool_swaps_some_fakes_here(data_root):
    """(A guard for the test above: with full pools and this generator, a query returns some stored fakes, so a
    bypassed pool changes the discriminators' gradients.)"""
    runner, ctx, batch = _stage(data_root, "translate")
    _full_pools(ctx, torch.Generator().manual_seed(4))
    fakes = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    draws = torch.Generator().set_state(ctx.generator.get_state())
    pooled = ImagePool(50, list(ctx.state["pool_s"])).query(fakes, draws)
    assert not torch.equal(pooled, fakes)


def test_real_and_fake_targets_with_constant_discriminators(data_root):
    """Every discriminator's last convolution outputs c: each generator term is (c − 1)² (G wants "real" = 1), each
    discriminator's loss ½[(c − 1)² + c²], and its bias gradient ½[2(c − 1) + 2c] (real 1, fake 0)."""
    runner, ctx, batch = _stage(data_root, "translate")
    c = 0.3
    for name in ("discriminator_s", "discriminator_t", "discriminator_m"):
        last = [m for m in ctx.modules[name].modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(c)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = seuda.gan_step(ctx, batch)
    for key in ("loss_gan_t2s", "loss_gan_s2t", "loss_sem"):
        assert out[key].item() == pytest.approx((c - 1) ** 2, rel=1e-9), key
    for name in ("discriminator_s", "discriminator_t", "discriminator_m"):
        assert out[f"loss_{name.replace('discriminator', 'd')}"].item() == pytest.approx(0.5 * ((c - 1) ** 2 + c**2))
        call = recorder.call(name)
        bias = max(i for i, n in enumerate(call["names"]) if n.endswith("bias"))
        assert call["grads"][bias].item() == pytest.approx(0.5 * (2 * (c - 1) + 2 * c), rel=1e-9), name


def test_gan_schedules_and_optimiser_hyperparameters(data_root):
    runner, ctx, batch = _stage(data_root, "translate")
    steps = ctx.stage_steps
    assert steps == 300  # 3 source epochs of 800 images at batch 8 (gan_epochs)
    optims = seuda.gan_optimizers(ctx.hp, ctx.modules, steps)
    assert set(optims) == {"generators", "discriminator_s", "discriminator_t", "discriminator_m"}
    generators = {id(p) for name in ("generator_t2s", "generator_s2t") for p in ctx.modules[name].parameters()}
    assert {id(p) for g in optims["generators"].optimizer.param_groups for p in g["params"]} == generators
    for name, optim in optims.items():
        group = optim.optimizer.param_groups[0]
        assert isinstance(optim.optimizer, torch.optim.Adam)
        assert (group["lr"], group["betas"]) == (0.002, (0.5, 0.999)), name  # Sec. 2.3; CycleGAN's betas
    # "linearly decayed": constant for the first half of the stage, then linearly to 0 (choice 3)
    expected = {0: 1.0, 149: 1.0, 150: 1.0, 225: 0.5, 299: 1 / 150}
    for step in range(steps):
        if step in expected:
            for name, optim in optims.items():
                assert optim.optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * expected[step]), (name, step)
        for optim in optims.values():
            optim.optimizer.step()
            optim.scheduler.step()
