"""AdaptSegNet: its losses by hand, and its train step as the platform runs it (modules, modes, optimisers from
`loop.enter_stage`), in float64: each optimiser's gradients against L_seg + λ_adv L_adv and L_D recomputed here from
the modules' forward passes, D's source/target labels with a constant D, λ_adv at 0 and 2, the detached outputs D
learns from, the schedules and the optimisers' hyperparameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import search_spaces
from methods import adaptsegnet
from methods.contract import Batch, StagePosition, TaskInfo
from platform import loop
from platform.loop import LocalSession, TrialRunner, TrialSpec

INFO = TaskInfo(num_classes=3, in_channels=3, class_names=("a", "b", "c"))


def test_losses_by_hand():
    # source = label 0 in the reference code: BCE-with-logits against 0 is softplus(x)
    d_target = torch.tensor([[[[0.0, 1.0]]]])
    assert adaptsegnet.adversarial_loss(d_target).item() == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(1))) / 2, rel=1e-6
    )
    d_source = torch.tensor([[[[2.0]]]])
    d_target = torch.tensor([[[[-1.0]]]])
    expected = 0.5 * (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(1.0)))  # softplus(2) + softplus(-(-1))
    assert adaptsegnet.discriminator_loss(d_source, d_target).item() == pytest.approx(expected, rel=1e-6)


def test_output_map_is_a_softmax_at_image_size():
    maps = adaptsegnet.output_map(torch.randn(2, 3, 4, 8), (16, 32))
    assert maps.shape == (2, 3, 16, 32)
    assert torch.allclose(maps.sum(1), torch.ones(2, 16, 32))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stage(data_root, **overrides):
    defaults = search_spaces.load("adaptsegnet").task_defaults["synthetic-urban"]
    spec = TrialSpec(
        method="adaptsegnet",
        task="synthetic-urban",
        hyperparams={**defaults, "lambda_adv": 0.7, **overrides},
        seed=0,
        max_steps=None,
        eval_every=None,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    runner.modules.double()
    ctx = loop.enter_stage(runner.trial, 0, loop.Optimisers(runner.trial), runner.state, runner.generator).ctx
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 7, (2, 64, 64), generator=generator)
    labels[:, :4] = 255
    batch = Batch(
        source_image=torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64),
        source_label=labels,
        target_image=torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64),
    )
    return runner, ctx, batch


class Recorder:
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
                    }
                )

            optimizer.register_step_pre_hook(before)


def assert_gradients(call: dict, loss: torch.Tensor, reference: nn.ModuleDict) -> None:
    params = dict(reference.named_parameters())
    expected = torch.autograd.grad(loss, [params[n] for n in call["names"]], allow_unused=True, retain_graph=True)
    for name, got, want in zip(call["names"], call["grads"], expected):
        want = torch.zeros_like(params[name]) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10, msg=f"gradient of {name}")


def normalise(images):
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def up(logits):
    return F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)


def bce(logits, label):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def reference_losses(hp, m, batch):
    """Segmenter: L_seg + λ_adv BCE(D(softmax P_t), source = 0); D: ½[BCE(D(P_s), 0) + BCE(D(P_t), 1)] on the
    segmenter's outputs before its update, detached (the reference implementation's labels: source 0, target 1)."""
    logits_s, logits_t = m["segmenter"](normalise(batch.source_image)), m["segmenter"](normalise(batch.target_image))
    valid = batch.source_label != 255
    log_p = F.log_softmax(up(logits_s), 1).gather(1, torch.where(valid, batch.source_label, 0)[:, None])[:, 0]
    loss_seg = -(log_p * valid).sum() / valid.sum()
    maps_s, maps_t = torch.softmax(up(logits_s), 1), torch.softmax(up(logits_t), 1)
    loss_adv = bce(m["discriminator"](maps_t), 0.0)
    loss_d = 0.5 * (bce(m["discriminator"](maps_s.detach()), 0.0) + bce(m["discriminator"](maps_t.detach()), 1.0))
    return loss_seg + hp.lambda_adv * loss_adv, loss_d, loss_seg, loss_adv


@pytest.mark.parametrize("lambda_adv", [0.7, 0.0, 2.0])
def test_the_step_against_the_losses_recomputed_from_the_outputs(data_root, lambda_adv):
    runner, ctx, batch = _stage(data_root, lambda_adv=lambda_adv)
    reference = copy.deepcopy(ctx.modules)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = adaptsegnet.train_step(ctx, batch)
    assert [c["optimizer"] for c in recorder.calls] == ["segmenter", "discriminator"]
    loss_segmenter, loss_d, loss_seg, loss_adv = reference_losses(ctx.hp, reference, batch)
    assert out["loss_seg_source"].item() == pytest.approx(loss_seg.item(), rel=1e-9)
    assert out["loss_adv_target"].item() == pytest.approx(loss_adv.item(), rel=1e-9)
    assert out["loss_d"].item() == pytest.approx(loss_d.item(), rel=1e-9)
    assert_gradients(recorder.calls[0], loss_segmenter, reference)
    assert_gradients(recorder.calls[1], loss_d, reference)


def test_source_and_target_labels_with_a_constant_discriminator(data_root):
    """D's last convolution outputs c: L_adv = BCE(c, source = 0) = softplus(c), L_D = ½[softplus(c) + softplus(−c)]
    and D's bias gradient ½[σ(c) + (σ(c) − 1)]."""
    runner, ctx, batch = _stage(data_root)
    last = ctx.modules["discriminator"].model[-1]
    c = 0.6
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(c)
    recorder = Recorder(ctx.modules, ctx.optimizers)
    out = adaptsegnet.train_step(ctx, batch)
    softplus = lambda x: math.log1p(math.exp(x))
    assert out["loss_adv_target"].item() == pytest.approx(softplus(c), rel=1e-9)
    assert out["loss_d"].item() == pytest.approx(0.5 * (softplus(c) + softplus(-c)), rel=1e-9)
    sigmoid = 1 / (1 + math.exp(-c))
    call = recorder.calls[1]
    bias = call["names"].index("discriminator.model.8.bias")
    assert call["grads"][bias].item() == pytest.approx(0.5 * (sigmoid + sigmoid - 1), rel=1e-9)


def test_schedules_and_optimiser_hyperparameters(data_root):
    runner, ctx, _ = _stage(data_root)
    assert ctx.stage_steps == 300
    optims = adaptsegnet.optimizers(ctx.hp, ctx.modules, 300)
    d = optims["discriminator"].optimizer
    assert isinstance(d, torch.optim.Adam) and (d.param_groups[0]["lr"], d.param_groups[0]["betas"]) == (
        1e-4,
        (0.9, 0.99),
    )
    segmenter = optims["segmenter"].optimizer
    assert [g["lr"] for g in segmenter.param_groups] == pytest.approx([1e-2, 1e-1])
    assert {(g["momentum"], g["weight_decay"]) for g in segmenter.param_groups} == {(0.9, 5e-4)}
    for step in range(121):
        if step in (0, 60, 120):
            poly = (1 - step / 300) ** 0.9
            assert d.param_groups[0]["lr"] == pytest.approx(1e-4 * poly)
            assert segmenter.param_groups[0]["lr"] == pytest.approx(1e-2 * poly)
        for optim in optims.values():
            optim.optimizer.step()
            optim.scheduler.step()
    paper = adaptsegnet.Hyperparams()
    assert (paper.lambda_adv, paper.num_steps, paper.learning_rate) == (0.001, 150_000, 2.5e-4)
    assert adaptsegnet.METHOD.imagenet_backbone
    ctx.modules.eval()
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    expected = up(ctx.modules["segmenter"](normalise(images)))
    torch.testing.assert_close(adaptsegnet.predict(ctx.hp, ctx.modules, images, StagePosition("adapt")), expected)
