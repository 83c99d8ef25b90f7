"""Every method under `--precision`: its steps go through `ctx.backward` / `ctx.step` (so that fp16's gradient scaler
applies), and its steps under bf16 stay finite and close to fp32 (issue 20, item 7).

The steps run the way the loop runs them (its own stage set-up, data feed, autocast and once-per-step scaler update)
for one step per stage on the method's default synthetic task. fp16 itself is not run here: CPU float16
convolutions are emulated (20 source_only steps took 376 s against 5 s in bf16, measured); fp16's scaler in float32
checks the wiring instead (below).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import methods
import search_spaces
from platform import config, loop
from platform.loop import LocalSession, StepScaler, TrialRunner, TrialSpec


def _run(name: str, data_root: str, steps: int, precision: str = "fp32", scaler: StepScaler | None = None):
    """`steps` train steps split over the method's stages, as the loop runs them. Returns (the losses of every step
    as [{name: float}], the modules' final state)."""
    space = search_spaces.load(name)
    spec = TrialSpec(
        method=name,
        task=space.default_task,
        hyperparams=dict(space.task_defaults.get(space.default_task, {})),
        seed=0,
        max_steps=steps,
        eval_every=10**9,
        data_root=data_root,
        precision=precision,
        threads=1,
    )
    runner = TrialRunner(spec, LocalSession())
    trial = runner.trial
    if scaler is not None:
        trial.scaler = scaler
    if steps == len(trial.stages):
        assert trial.budgets == [1] * steps, f"not one step per stage: {trial.budgets}"
    optimisers, history = loop.Optimisers(trial), []
    with tempfile.TemporaryDirectory() as store_root:
        passes = loop.TargetPasses(trial, store_root)
        for index, stage in enumerate(trial.stages):
            entered = loop.enter_stage(trial, index, optimisers, runner.state, runner.generator)
            loop.start_stage(entered)
            loop.set_modes(trial.modules, stage)
            feed = loop.DataFeed(trial, stage, runner.progress)
            for step in range(trial.budgets[index]):
                entered.ctx.stage_step = step
                if passes.due(stage, entered.ctx, runner.progress):
                    passes.run(stage, entered.ctx, runner.progress)
                batch = feed.next_batch(passes.extras, passes.specs(stage))
                with loop.autocast(trial):
                    losses = stage.step(entered.ctx, batch)
                if trial.scaler is not None:
                    assert trial.scaler.stepped, f"{stage.name}: no optimiser stepped through ctx.step"
                    trial.scaler.update()
                history.append({k: float(v) for k, v in losses.items() if torch.as_tensor(v).numel() == 1})
                runner.progress.stepped()
    return history, {k: v.detach().clone() for k, v in trial.modules.state_dict().items()}


def _losses(metrics: dict[str, float]) -> dict[str, float]:
    """The loss terms of a step's metrics (not its counts, fractions or timings)."""
    return {k: v for k, v in metrics.items() if k.startswith("loss")}


def _stages(name: str) -> int:
    method, space = methods.get(name), search_spaces.load(name)
    return len(method.stages(config.check_hyperparams(method, space.task_defaults.get(space.default_task, {}))))


class CheckingScaler(StepScaler):
    """fp16's scaler that fails a step which bypasses the context: every optimiser step must run inside
    `ctx.step` (the scaler's step), and every such step must follow a `ctx.backward` (the scaler's scale) since the
    previous one. A step calling `loss.backward()` or `optimizer.step()` itself would leave fp16 gradients unscaled
    or step an optimiser on gradients 2^16 too large."""

    def __init__(self):
        super().__init__("cpu")
        self.scaled, self.inside = False, False

    def scale(self, outputs):
        self.scaled = True
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        assert self.scaled, "ctx.step without a ctx.backward since the previous step"
        self.scaled, self.inside = False, True
        try:
            return super().step(optimizer, *args, **kwargs)
        finally:
            self.inside = False


# bf16 keeps 8 bits of mantissa. The first loss of the first step (the same weights and batch as fp32's) stays within
# FIRST_LOSS_RTOL of fp32's. Later stages start from weights that differ by the rounding of the earlier steps, and
# discrete choices amplify that: thresholds that rounding flips (TD/TF's Eq. 11 selected no pixel in fp32 and some in
# bf16, CSCL's L_div moved by 35% at its first step on a near-uniform network) and the pseudo labels of a later
# stage (CIRN's stage 3: 9%, TD/TF's third round: 15%; all measured at two steps per stage). There, the first loss
# of each stage's step is held to the same order as fp32's, STAGE_LOSS_RTOL.
FIRST_LOSS_RTOL = 0.01
STAGE_LOSS_RTOL = 0.5


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_step_goes_through_the_context_and_bf16_stays_near_fp32(name, data_root):
    """One step of every stage in float32 with fp16's gradient scaler, which fails any step that bypasses
    `ctx.backward` / `ctx.step`, and checks the scaler stepped in every train step; then the same steps under bf16
    autocast: finite, weights kept in float32, each stage's first loss near fp32's. (One step per stage, not the
    issue's 20 steps in all: every step function runs under both, at a fraction of the suite time.)"""
    scaler = CheckingScaler()
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: None if scaler.inside else pytest.fail("an optimiser stepped outside ctx.step")
    )
    try:
        reference, _ = _run(name, data_root, _stages(name), scaler=scaler)
    finally:
        handle.remove()
    bf16, state = _run(name, data_root, _stages(name), precision="bf16")
    assert len(bf16) == len(reference) == _stages(name)
    assert all(math.isfinite(v) for losses in bf16 for v in losses.values())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in state.values()), "autocast keeps the weights in float32"
    for index in range(len(reference)):  # the step of each stage
        first = next(iter(_losses(reference[index])))
        tolerance = FIRST_LOSS_RTOL if index == 0 else STAGE_LOSS_RTOL
        assert bf16[index][first] == pytest.approx(reference[index][first], rel=tolerance), (index, first)


def test_a_step_that_steps_nothing_leaves_the_scaler_alone():
    """ctx.step on an optimiser whose parameters received no gradient updates nothing (as a plain step would), and
    the scaler then skips its update instead of failing ("No inf checks were recorded")."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = StepScaler("cpu")
    ctx = dataclasses.replace(_bare_context(), optimizers={"w": optimizer}, scaler=scaler, precision="fp16")
    ctx.step("w")
    scaler.update()
    assert torch.equal(weight, torch.ones(2)) and not scaler.stepped
    ctx.backward((weight * torch.tensor([1.0, 2.0])).sum())
    assert torch.equal(weight.grad, torch.tensor([1.0, 2.0]) * scaler.get_scale())
    ctx.step("w")
    assert scaler.stepped
    scaler.update()
    assert torch.allclose(weight.detach(), torch.tensor([0.9, 0.8]))


def test_two_steps_of_one_optimiser_in_a_train_step_keep_the_scale_and_its_overflow():
    """CSCL steps E twice per iteration. The second step of one optimiser within a train step is allowed, both use
    the scale the step started with, and an overflow in the first (its update skipped) still backs the scale off at
    the step's end."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = StepScaler("cpu", init_scale=16.0)
    ctx = dataclasses.replace(_bare_context(), optimizers={"w": optimizer}, scaler=scaler, precision="fp16")
    ctx.backward((weight * torch.tensor([float("inf"), 1.0])).sum())  # overflows: this update is skipped
    ctx.step("w")
    assert torch.equal(weight.detach(), torch.ones(2))
    optimizer.zero_grad()
    ctx.backward((weight * torch.tensor([1.0, 2.0])).sum())
    assert torch.equal(weight.grad, torch.tensor([16.0, 32.0]))  # still the step's scale
    ctx.step("w")
    assert torch.allclose(weight.detach(), torch.tensor([0.9, 0.8]))
    scaler.update()
    assert scaler.get_scale() == 8.0  # backed off (x0.5) for the first step's overflow
    optimizer.zero_grad()
    ctx.backward((weight * torch.tensor([1.0, 1.0])).sum())
    ctx.step("w")
    scaler.update()
    assert scaler.get_scale() == 8.0 and torch.allclose(weight.detach(), torch.tensor([0.8, 0.7]))


def _bare_context():
    from methods.contract import StepContext, TaskInfo

    return StepContext(
        hp=None,
        info=TaskInfo(num_classes=2, in_channels=3, class_names=("a", "b")),
        modules=torch.nn.ModuleDict(),
        optimizers={},
        state={},
        stage="s",
        stage_step=0,
        stage_steps=1,
        target_epoch=0,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
