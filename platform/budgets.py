"""Stage budgets: how many optimiser steps each stage of a trial takes (`methods.contract.Budget`).

A method's stages give shares of the trial's steps, or absolute budgets (steps, epochs of a split); never both:
- shares: the trial's length is the search space's `MAX_STEPS` for the task, or `--max-steps`;
- absolute: the stages define the trial's length; `--max-steps N` scales every stage proportionally to N steps in
  all (quick runs), each stage keeping at least one step.
Epochs count `ceil(epochs · split size / global batch)` steps, the global batch being batch_size × workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from methods.contract import Stage, TaskInfo


class BudgetError(ValueError):
    """A budget that cannot be resolved; the message is one line for the user."""


def split_budget(max_steps: int, shares: Sequence[float]) -> list[int]:
    """Steps per stage: round(share · max_steps) for every stage but the last, which takes the remainder."""
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"stage budget shares must sum to 1 (got {list(shares)})")
    steps = [int(round(share * max_steps)) for share in shares[:-1]]
    return steps + [max_steps - sum(steps)]


def scale_budget(full: Sequence[int], total: int) -> list[int]:
    """Absolute stage budgets scaled proportionally to `total` steps in all, at least one step per stage."""
    if total < len(full):
        raise BudgetError(
            f"--max-steps {total} leaves no step for some of the {len(full)} stages; use at least {len(full)}"
        )
    steps = split_budget(total, [count / sum(full) for count in full])
    for index, count in enumerate(steps):  # rounding can empty a short stage: take its step from the longest
        if count < 1:
            steps[steps.index(max(steps))] -= 1 - count
            steps[index] = 1
    return steps


def uses_shares(stages: Sequence[Stage]) -> bool:
    """Whether the stages take shares of the trial's steps (True) or define it (False); mixing kinds is an error."""
    kinds = {stage.budget.absolute for stage in stages}
    if len(kinds) > 1:
        names = ", ".join(f"{s.name}: {'steps/epochs' if s.budget.absolute else 'share'}" for s in stages)
        raise BudgetError(f"stages mix shares with step or epoch budgets ({names}); use one kind")
    return not kinds.pop() if kinds else True


def stage_steps(
    stages: Sequence[Stage], info: TaskInfo, batch_size: int, world_size: int, max_steps: int | None
) -> list[int]:
    """Steps of every stage. `max_steps`: the trial's length for share budgets (required), the total to scale
    absolute budgets to (None: their own length)."""
    if not stages:
        return []
    if uses_shares(stages):
        if max_steps is None:
            raise BudgetError(
                "the stages take shares of the trial's steps and no length is set: add MAX_STEPS for "
                "the task to the search space, or pass --max-steps N"
            )
        return split_budget(max_steps, [stage.budget.share for stage in stages])
    full = [stage.budget.num_steps(info, batch_size * world_size) for stage in stages]
    return full if max_steps is None else scale_budget(full, max_steps)


def describe(stages: Sequence[Stage], steps: Sequence[int]) -> str:
    """ "translate 300 (200 epochs of source) + adapt 300" for the sweep's description."""
    parts = []
    for stage, count in zip(stages, steps):
        budget = stage.budget
        kind = f", {budget.epochs:g} epochs of {budget.of}" if budget.epochs is not None else ""
        parts.append(f"{stage.name} {count}{kind}")
    return " + ".join(parts)
