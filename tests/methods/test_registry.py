"""The registry and the contract every registered method must satisfy."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
import torch

import methods
import search_spaces
from methods.contract import Method, StepContext
from platform import tasks
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


def _stage_batch(runner: TrialRunner, stage):
    source, target = runner._streams(stage)
    return runner._next_batch(source, target)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_contract(name, data_root):
    """Build tiny, a few CPU steps of every stage, finite losses, exactly the trained parameters change, state and
    weights round-trip through torch.save/torch.load(weights_only=True)."""
    method: Method = methods.get(name)
    hp_class = method.hyperparams
    assert dataclasses.is_dataclass(hp_class) and hp_class.__dataclass_params__.frozen
    assert "batch_size" in {f.name for f in dataclasses.fields(hp_class)}
    space = search_spaces.load(name)
    task = tasks.get(space.default_task)
    assert task.synthetic, "the default task must run on a laptop"
    spec = TrialSpec(
        method=name,
        task=task.name,
        hyperparams=dict(space.task_defaults.get(task.name, {})),
        seed=0,
        max_steps=4 * len(method.stages(methods.make_hyperparams(method, {}))),
        eval_every=1000,
        data_root=data_root,
    )
    runner = TrialRunner(spec, LocalSession())
    for stage in runner.stages:
        runner._set_modes(stage)
        optims = stage.optimizers(runner.hp, runner.modules, 10)
        ctx = StepContext(
            hp=runner.hp,
            info=runner.info,
            modules=runner.modules,
            optimizers={n: o.optimizer for n, o in optims.items()},
            state=runner.state,
            stage=stage.name,
            stage_step=0,
            stage_steps=10,
            target_epoch=0,
            generator=runner.generator,
            device=runner.device,
        )
        if stage.target_pass is not None:
            runner._maybe_target_pass(stage, ctx)
        before = {k: v.detach().clone() for k, v in runner.modules.state_dict().items()}
        for step in range(2):
            ctx.stage_step = step
            losses = stage.step(ctx, _stage_batch(runner, stage))
            assert losses and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()), stage.name
        after = runner.modules.state_dict()
        for key in before:
            module = key.split(".")[0]
            changed = not torch.equal(before[key], after[key])
            if module not in stage.trains:
                assert not changed, f"stage {stage.name!r} changed {key} of a module it does not train"
        for module in stage.trains:
            assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(module + ".")), module
    buffer = io.BytesIO()
    torch.save({"modules": runner.modules.state_dict(), "state": runner.state}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    fresh = method.build(runner.hp, runner.info)
    fresh.load_state_dict(restored["modules"])
    images = runner._next_batch(runner._streams(runner.stages[-1])[0], None).source_image[:2]
    runner.modules.eval()
    fresh.eval()
    last = runner.stages[-1].name
    logits = method.predict(runner.hp, runner.modules, images, last)
    assert logits.shape == (2, task.info.num_classes, *images.shape[-2:])
    assert torch.equal(logits, method.predict(runner.hp, fresh, images, last))
