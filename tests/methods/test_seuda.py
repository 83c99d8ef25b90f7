"""SeUDA: Eq. 2-4 on hand values, the frozen segmenter, post-processing, histogram matching, stage-1 reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import methods
import search_spaces
from methods import seuda
from methods.contract import Batch, SampleImages, StagePosition, TaskInfo
from platform import checkpoints, config, loop
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


def test_inference_goes_through_the_translator_and_post_processing(data_root):
    runner = _runner(data_root)
    runner.modules.eval()
    images = torch.rand(2, 1, 64, 64)
    scores = seuda.predict(runner.hp, runner.modules, images, StagePosition("translate", 1))
    assert set(scores.unique().tolist()) <= {0.0, 1.0} and torch.all(scores.sum(1) == 1)  # post-processed one-hot
    expected = seuda.segment(runner.modules, seuda.translate(runner.modules, images)).argmax(1)
    cleaned = np.stack([seuda.postprocess(e, 3) for e in expected.numpy()])
    assert np.array_equal(scores.argmax(1).numpy(), cleaned)
    raw = seuda.predict(runner.hp, runner.modules, images, StagePosition("segmenter", 0))  # stage 1: T-noDA, raw logits
    assert torch.equal(raw, seuda.segment(runner.modules, images))
    translate = StagePosition("translate", 1)
    samples = seuda.samples(runner.hp, runner.modules, SampleImages(target=images, source=images), translate)
    assert set(samples) == {"target", "target_to_source"}
