"""Every search space is literal data that fits its method's Hyperparams."""

from __future__ import annotations

import dataclasses
import os

import pytest

import methods
import search_spaces
from platform import config, tasks
from tests.methods.test_registry import paper_task_overrides

SPACE_DIR = os.path.dirname(search_spaces.__file__)


def test_every_search_space_belongs_to_a_registered_method_and_vice_versa():
    spaces = {f[:-3] for f in os.listdir(SPACE_DIR) if f.endswith(".py") and f != "__init__.py"}
    assert spaces == set(methods.REGISTRY)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_search_space_fits_the_method(name):
    method = methods.get(name)
    space = search_spaces.load(name)
    fields = {f.name for f in dataclasses.fields(method.hyperparams)}
    assert space.default_task in method.tasks
    assert tasks.get(space.default_task).synthetic
    assert set(space.task_defaults) <= set(method.tasks)
    assert set(method.tasks) <= set(tasks.TASKS)
    for task, defaults in space.task_defaults.items():
        assert set(defaults) <= fields, task
        methods.make_hyperparams(method, defaults)
    assert all(steps >= 1 for steps in space.max_steps.values())
    assert set(space.ranges) <= fields
    for grid in space.grids:
        for point in space.grid_points(grid):
            assert set(point) <= fields | {search_spaces.SEED_AXIS}, grid
    for task in method.tasks:  # every grid and range is valid on every task the method lists
        resolved = config.resolve(name, task, paper_task_overrides(method, task))
        for grid in space.grids:
            config.plan_sweep(resolved, grid, None, None, (0,), [])
        if space.ranges:
            config.plan_sweep(resolved, None, "tpe", 2, (0,), [])


def test_grids_cite_their_source():
    """Each named grid carries a comment saying which paper figure or table (or why none) it reproduces."""
    for name in methods.REGISTRY:
        text = open(os.path.join(SPACE_DIR, f"{name}.py")).read()
        for grid in search_spaces.load(name).grids:
            line = next(i for i, row in enumerate(text.splitlines()) if row.strip().startswith(f'"{grid}":'))
            above = text.splitlines()[line - 1].strip()
            assert above.startswith("#"), f"grid {grid!r} of {name} has no comment citing its source"
