import dataclasses

import pytest
import torch

from methods.contract import StagePosition
from platform import checkpoints
from platform.budgets import split_budget
from platform.loop import LocalSession, NonFiniteLossError, TrialRunner, TrialSpec


def spec(data_root, **changes):
    base = TrialSpec(
        method="source_only",
        task="synthetic-urban",
        hyperparams={"architecture": "tiny", "learning_rate": 0.01, "batch_size": 4},
        seed=0,
        max_steps=6,
        eval_every=3,
        data_root=data_root,
    )
    return dataclasses.replace(base, **changes)


def test_split_budget():
    assert split_budget(10, [1.0]) == [10]
    assert split_budget(10, [0.25, 0.25, 0.5]) == [2, 2, 6]
    assert split_budget(7, [0.5, 0.5]) == [4, 3]
    with pytest.raises(ValueError, match="sum to 1"):
        split_budget(10, [0.5, 0.4])


def test_reports_every_eval_and_at_the_end(data_root):
    session = LocalSession()
    runner = TrialRunner(spec(data_root, max_steps=7, eval_every=3), session)
    final = runner.run()
    assert [r["step"] for r in session.reports] == [3, 6, 7]
    assert 0 <= final["val_target/miou"] <= 100
    assert final["val_target/best_miou"] == max(r["val_target/miou"] for r in session.reports)
    assert "train/loss_seg_source" in final and "val_target/iou/road" in final


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(data_root, tmp_path):
    straight = LocalSession()
    TrialRunner(spec(data_root), straight).run()
    first = LocalSession(checkpoint_root=str(tmp_path))
    TrialRunner(spec(data_root, max_steps=6), first).run()
    # restart from the step-3 checkpoint, as Ray Train does after a worker failure
    resumed = LocalSession(resume_from=str(tmp_path / "step-00000003"))
    TrialRunner(spec(data_root), resumed).run()
    assert resumed.reports[-1]["step"] == 6
    assert resumed.reports[-1]["val_target/miou"] == pytest.approx(straight.reports[-1]["val_target/miou"], abs=1e-9)
    assert resumed.reports[-1]["train/loss_seg_source"] == pytest.approx(
        straight.reports[-1]["train/loss_seg_source"], rel=1e-6
    )


def test_non_finite_loss_fails_the_trial_with_the_reason(data_root):
    runner = TrialRunner(
        spec(
            data_root,
            hyperparams={"architecture": "tiny", "learning_rate": 1e6, "batch_size": 8},
            max_steps=30,
            eval_every=30,
        ),
        LocalSession(),
    )
    with pytest.raises(NonFiniteLossError, match=r"train/loss_seg_source became nan at step \d+ \(stage 'source'\)"):
        runner.run()


def test_stages_without_target_never_see_target_images_and_eval_is_in_eval_mode(data_root):
    runner = TrialRunner(spec(data_root, max_steps=2, eval_every=2), LocalSession())
    stage = runner.stages[0]
    seen = []

    def spy_step(ctx, batch):
        seen.append(batch.target_image)
        return stage.step(ctx, batch)

    runner.stages = (dataclasses.replace(stage, step=spy_step),)
    modes = []
    runner.modules["segmenter"].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    runner.run()
    assert seen == [None, None]
    assert modes[:2] == [True, True] and not any(modes[2:])  # 2 training steps, then evaluation only in eval mode


def test_frozen_modules_do_not_change_and_trained_ones_do(data_root):
    runner = TrialRunner(spec(data_root, max_steps=2, eval_every=2), LocalSession())
    runner.modules["frozen"] = torch.nn.BatchNorm2d(3)
    before = {k: v.clone() for k, v in runner.modules.state_dict().items()}

    stage = runner.stages[0]

    def step(ctx, batch):
        ctx.modules["frozen"](batch.source_image)  # a forward pass through a frozen BN must not update its statistics
        return stage.step(ctx, batch)

    runner.stages = (dataclasses.replace(stage, step=step),)
    runner.run()
    after = runner.modules.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("frozen."))
    assert not torch.equal(before["segmenter.classifier.weight"], after["segmenter.classifier.weight"])
    assert not runner.modules["frozen"].weight.requires_grad


def test_weights_checkpoint_round_trip(data_root, tmp_path):
    runner = TrialRunner(spec(data_root, max_steps=2, eval_every=2), LocalSession())
    runner.run()
    meta = runner.reporter._checkpoint_meta(runner.trial.positions[0], {"val_target/miou": 1.0}, 2)
    checkpoints.write_weights(str(tmp_path), checkpoints.BEST, runner.modules, meta)
    modules, loaded_meta = checkpoints.load_modules(str(tmp_path / "best_val_target_miou.pt"))
    assert loaded_meta["method"] == "source_only" and loaded_meta["step"] == 2
    state = torch.load(tmp_path / "best_val_target_miou.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in runner.modules.state_dict().items())
    images = torch.rand(1, 3, 64, 128)
    runner.modules.eval()
    modules.eval()
    method = runner.method
    assert torch.equal(
        method.predict(runner.hp, runner.modules, images, StagePosition("source")),
        method.predict(runner.hp, modules, images, StagePosition("source")),
    )


def test_a_perturbed_learning_rate_reaches_the_restored_optimisers(data_root, tmp_path):
    """PBT restores one trial's checkpoint with another learning rate: the schedule continues from its step with
    the new base rate; with the same rate, nothing changes (resume stays exact)."""
    first = LocalSession(checkpoint_root=str(tmp_path))
    TrialRunner(spec(data_root, tags={"trial_id": "donor"}), first).run()
    restored = []

    class Logger:
        def __init__(self):
            self.tags = {}

        def log_metrics(self, metrics, step):
            restored.append((step, {k: v for k, v in metrics.items() if k.startswith("hp/")}))

        def log_checkpoint(self, kind, modules, meta):
            pass

        def log_images(self, images, step):
            pass

        def set_tags(self, tags):
            self.tags.update(tags)

    logger = Logger()
    changed = spec(
        data_root,
        hyperparams={"architecture": "tiny", "learning_rate": 0.02, "batch_size": 4},
        tags={"trial_id": "exploiter"},
        tracked_hyperparams=("learning_rate",),
    )
    runner = TrialRunner(changed, LocalSession(resume_from=str(tmp_path / "step-00000003")), logger)
    seen = []
    stage = runner.stages[0]

    def step(ctx, batch):
        seen.append([g["lr"] for g in ctx.optimizers["segmenter"].param_groups])
        return stage.step(ctx, batch)

    runner.stages = (dataclasses.replace(stage, step=step),)
    runner.run()
    # source_only's poly schedule over 6 steps at step 3, backbone and the 10x head: 0.02 · (1 - 3/6)^0.9
    factor = (1 - 3 / 6) ** 0.9
    assert seen[0] == pytest.approx([0.02 * factor, 0.2 * factor])
    assert logger.tags == {"uda.pbt.exploit.step-00000003": "donor"}  # whose checkpoint it took, and when
    assert restored[-1] == (6, {"hp/learning_rate": 0.02})


def test_mlflow_gets_an_evaluation_even_when_tune_stops_the_trial_at_its_report(data_root):
    """ASHA's stop and PBT's exploit end the trial inside `report`: that evaluation's metrics and checkpoint must
    already be in MLflow (before, exploited trials' runs missed the evaluations at which they were exploited)."""

    class Stopped(Exception):
        pass

    class StoppingSession(LocalSession):
        def report(self, metrics, checkpoint_dir=None):
            super().report(metrics, checkpoint_dir)
            if metrics["step"] == 3:
                raise Stopped

    logged = []

    class Logger:
        def log_metrics(self, metrics, step):
            logged.append(("metrics", step, "val_target/miou" in metrics))

        def log_checkpoint(self, kind, modules, meta):
            logged.append((kind, meta["step"]))

        def log_images(self, images, step):
            pass

    with pytest.raises(Stopped):
        TrialRunner(spec(data_root), StoppingSession(), Logger()).run()
    assert ("metrics", 3, True) in logged and (checkpoints.LAST, 3) in logged


def test_a_trial_started_again_reuses_its_run_and_says_so(tmp_path):
    """Tune starting a trial again (a retry, also from scratch; a resumed sweep; PBT) finds the trial's run: the
    second start returns the same run and `existed`, which is what counts `uda.restarts` (platform/tuning.py)."""
    from platform.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("restarts")
    parent = tracker.start_sweep(experiment, "sweep", {}, {}, {})
    first, existed_first = tracker.start_trial(experiment, parent, "t_00000", "a", {"seed": 0}, {})
    other, existed_other = tracker.start_trial(experiment, parent, "t_00001", "b", {"seed": 1}, {})
    again, existed_again = tracker.start_trial(experiment, parent, "t_00000", "a", {"seed": 0}, {})
    assert (existed_first, existed_other, existed_again) == (False, False, True)
    assert again == first and other != first
