"""The registry and the contract every registered method must satisfy."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

import pytest
import torch

import methods
import search_spaces
from methods.contract import RANDOM_INIT, Method
from platform import budgets, config, loop, tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec

METHOD_DIR = os.path.dirname(methods.__file__)
NOT_METHODS = {"__init__", "contract"}


def test_every_method_module_is_registered():
    modules = {f[:-3] for f in os.listdir(METHOD_DIR) if f.endswith(".py")} - NOT_METHODS
    assert modules == set(methods.REGISTRY)


def test_registry_fails_loudly():
    with pytest.raises(KeyError, match="unknown method 'cscl2'; valid: "):
        methods.get("cscl2")
    record = methods.get("source_only")
    with pytest.raises(ValueError, match="duplicate method name 'source_only'"):
        methods._table(record, record)
    with pytest.raises(ValueError, match="unknown hyperparameter 'lr' for source_only; valid: architecture"):
        methods.make_hyperparams(record, {"lr": 1})


def paper_task_overrides(method: Method, task: str) -> dict:
    """What a paper task needs from a user before anything starts: the ImageNet weights (random init, explicitly)."""
    return {"backbone_weights": RANDOM_INIT} if method.imagenet_backbone and not tasks.get(task).synthetic else {}


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_task_a_method_lists_has_a_budget(name):
    """Share budgets need MAX_STEPS for every task; absolute budgets define the length themselves (one truth)."""
    method = methods.get(name)
    space = search_spaces.load(name)
    for task in method.tasks:
        resolved = config.resolve(name, task, paper_task_overrides(method, task))
        shares = budgets.uses_shares(method.stages(config.check_hyperparams(method, resolved.base)))
        assert (resolved.max_steps is not None) == shares, task
        assert shares or task not in space.max_steps, f"{name}: MAX_STEPS[{task!r}] would be a second budget"


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_contract(name, data_root):
    """Build tiny, a few CPU steps of every stage through the loop's own stage set-up, finite losses, exactly the
    trained parameters change, state and weights round-trip through torch.save/torch.load(weights_only=True)."""
    method: Method = methods.get(name)
    hp_class = method.hyperparams
    assert dataclasses.is_dataclass(hp_class) and hp_class.__dataclass_params__.frozen
    assert "batch_size" in {f.name for f in dataclasses.fields(hp_class)}
    space = search_spaces.load(name)
    task = tasks.get(space.default_task)
    assert task.synthetic, "the default task must run on a laptop"
    stages = method.stages(config.check_hyperparams(method, space.task_defaults.get(task.name, {})))
    spec = TrialSpec(
        method=name,
        task=task.name,
        hyperparams=dict(space.task_defaults.get(task.name, {})),
        seed=0,
        max_steps=4 * len(stages),
        eval_every=1000,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    trial, optimisers = runner.trial, loop.Optimisers(runner.trial)
    with tempfile.TemporaryDirectory() as store_root:
        passes = loop.TargetPasses(trial, store_root)
        for index, stage in enumerate(trial.stages):
            entered = loop.enter_stage(trial, index, optimisers, runner.state, runner.generator)
            loop.start_stage(entered)
            if stage.target_pass is not None:
                passes.run(stage, entered.ctx, runner.progress)
            loop.set_modes(trial.modules, stage)
            feed = loop.DataFeed(trial, stage, runner.progress)
            before = {k: v.detach().clone() for k, v in trial.modules.state_dict().items()}
            for step in range(2):
                entered.ctx.stage_step = step
                losses = stage.step(entered.ctx, feed.next_batch(passes.extras, passes.specs(stage)))
                assert losses and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()), stage.name
            after = trial.modules.state_dict()
            for key in before:
                module = key.split(".")[0]
                if module not in stage.trains:
                    assert torch.equal(before[key], after[key]), f"stage {stage.name!r} changed {key} it does not train"
            for module in stage.trains:
                assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(module + ".")), module
    buffer = io.BytesIO()
    torch.save({"modules": trial.modules.state_dict(), "state": runner.state}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    fresh = method.build(trial.hp, trial.info)
    fresh.load_state_dict(restored["modules"])
    images = loop.DataFeed(trial, dataclasses.replace(trial.stages[-1], uses_target=False), runner.progress)
    images = images.next_batch(None, {}).source_image[:2]
    trial.modules.eval()
    fresh.eval()
    last = trial.positions[-1]
    logits = method.predict(trial.hp, trial.modules, images, last)
    assert logits.shape == (2, task.info.num_classes, *images.shape[-2:])
    assert torch.equal(logits, method.predict(trial.hp, fresh, images, last))
