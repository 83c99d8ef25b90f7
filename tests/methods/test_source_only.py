"""source_only: its one train step as the platform runs it (modules, modes, optimiser from `loop.enter_stage`), in
float64: the gradients the step gives the segmenter's SGD equal those of the pixel cross-entropy recomputed here
from the logits, the update follows SGD with momentum 0.9, weight decay 5e-4 and the head at 10x, the poly schedule
has its values at given steps, target images never reach the network, and frozen batch-norm statistics stay put."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import search_spaces
from methods import source_only
from methods.contract import Batch, StagePosition
from platform import loop
from platform.loop import LocalSession, TrialRunner, TrialSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stage(data_root, **overrides):
    defaults = search_spaces.load("source_only").task_defaults["synthetic-urban"]
    spec = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams={**defaults, **overrides},
        seed=0,
        max_steps=None,
        eval_every=None,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    runner.modules.double()
    ctx = loop.enter_stage(runner.trial, 0, loop.Optimisers(runner.trial), runner.state, runner.generator).ctx
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 7, (2, 64, 64), generator=generator)
    labels[:, -5:] = 255
    batch = Batch(
        source_image=torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64),
        source_label=labels,
        target_image=None,  # the stage declares uses_target=False: the platform loads no target image
    )
    return runner, ctx, batch


def normalise(images):
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def cross_entropy(logits, labels):
    """Mean over labelled pixels of −log softmax(logits upsampled bilinearly to the labels)[y]."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != 255
    log_p = F.log_softmax(logits, 1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return -(log_p * valid).sum() / valid.sum()


def _capture(optimizer: torch.optim.Optimizer, names: dict) -> list[dict]:
    calls: list[dict] = []
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def before(opt, args, kwargs):
        calls.append(
            {
                "names": [names[id(p)] for p in params],
                "grads": [None if p.grad is None else p.grad.clone() for p in params],
                "before": [p.detach().clone() for p in params],
            }
        )

    def after(opt, args, kwargs):
        calls[-1]["after"] = [p.detach().clone() for p in params]

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return calls


def test_the_step_descends_the_pixel_cross_entropy_with_the_recipe_sgd(data_root):
    runner, ctx, batch = _stage(data_root)
    assert runner.stages[0].uses_target is False and ctx.stage_steps == 300
    reference = copy.deepcopy(ctx.modules)
    optimizer = ctx.optimizers["segmenter"]
    calls = _capture(optimizer, {id(p): n for n, p in ctx.modules.named_parameters()})
    out = source_only.train_step(ctx, batch)
    assert len(calls) == 1
    loss = cross_entropy(reference["segmenter"](normalise(batch.source_image)), batch.source_label)
    assert out["loss_seg_source"].item() == pytest.approx(loss.item(), rel=1e-9)
    params = dict(reference.named_parameters())
    expected = torch.autograd.grad(loss, [params[n] for n in calls[0]["names"]])
    for name, got, want in zip(calls[0]["names"], calls[0]["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10, msg=name)
    # SGD: lr 1e-2 (the synthetic default), head 10x, momentum 0.9 (its first step is the gradient), decay 5e-4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-1])
    assert {(g["momentum"], g["weight_decay"]) for g in optimizer.param_groups} == {(0.9, 5e-4)}
    head = {id(p) for p in ctx.modules["segmenter"].head_parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == head
    lrs = [g["lr"] for g in optimizer.param_groups for _ in g["params"]]
    call = calls[0]
    for name, before, after, grad, lr in zip(call["names"], call["before"], call["after"], call["grads"], lrs):
        torch.testing.assert_close(after, before - lr * (grad + 5e-4 * before), msg=name)


def test_the_poly_schedule_and_the_paper_recipe(data_root):
    runner, ctx, _ = _stage(data_root)
    optim = source_only.optimizers(ctx.hp, ctx.modules, 300)["segmenter"]
    for step in range(151):
        if step in (0, 75, 150):
            poly = (1 - step / 300) ** 0.9
            assert [g["lr"] for g in optim.optimizer.param_groups] == pytest.approx([1e-2 * poly, 1e-1 * poly])
        optim.optimizer.step()
        optim.scheduler.step()
    paper = source_only.Hyperparams()  # the DeepLab-v2 recipe (CSCL Sec. 3.5, CIRN): 100,000 iterations, batch 1
    assert (paper.architecture, paper.learning_rate, paper.freeze_batchnorm) == ("deeplabv2_resnet101", 2.5e-4, True)
    assert (paper.num_steps, paper.batch_size) == (100_000, 1)
    assert source_only.METHOD.imagenet_backbone  # paper tasks start from ImageNet weights


def test_frozen_batch_norm_statistics_do_not_move_and_predict_is_the_upsampled_logits(data_root):
    runner, ctx, batch = _stage(data_root, freeze_batchnorm=True)
    norms = [m for m in ctx.modules.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = {k: v.clone() for k, v in ctx.modules.state_dict().items() if "running" in k or "num_batches" in k}
    source_only.train_step(ctx, batch)
    after = ctx.modules.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    ctx.modules.eval()
    images = batch.source_image
    logits = source_only.predict(ctx.hp, ctx.modules, images, StagePosition("source"))
    expected = F.interpolate(
        ctx.modules["segmenter"](normalise(images)), size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(logits, expected)
    assert dataclasses.asdict(ctx.hp)["num_steps"] == 300
