"""Search spaces: one module per method holding literal data (see search_spaces/source_only.py for the fields).

This loader only reads and checks the data; `platform.tuning` turns it into Tune and Optuna objects.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

RANGE_KINDS = ("uniform", "loguniform", "randint", "choice")
SEED_AXIS = "seed"


@dataclass(frozen=True)
class SearchSpace:
    method: str
    default_task: str
    task_defaults: Mapping[str, Mapping[str, Any]]
    max_steps: Mapping[str, int]
    grids: Mapping[str, Any]
    ranges: Mapping[str, tuple]
    # fields Population Based Training may change while a trial runs (loss weights, learning rates; never a field
    # that changes the network): a subset of RANGES, which give their distributions
    perturbable: tuple[str, ...] = ()

    def grid_points(self, name: str) -> list[dict[str, Any]]:
        """The points of a named grid, in a deterministic order (products expand row-major in key order)."""
        if name not in self.grids:
            raise ValueError(
                f"unknown grid {name!r} for {self.method}; valid: {', '.join(sorted(self.grids)) or '(none)'}"
            )
        return expand_grid(self.grids[name])


def expand_grid(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [dict(point) for point in grid]


def load(method: str) -> SearchSpace:
    try:
        module = importlib.import_module(f"search_spaces.{method}")
    except ModuleNotFoundError as error:
        if error.name != f"search_spaces.{method}":
            raise
        raise ValueError(f"no search space for method {method!r} (expected search_spaces/{method}.py)") from None
    return _from_module(method, module)


def _from_module(method: str, module: ModuleType) -> SearchSpace:
    space = SearchSpace(
        method=method,
        default_task=module.DEFAULT_TASK,
        task_defaults=dict(getattr(module, "TASK_DEFAULTS", {})),
        max_steps=dict(getattr(module, "MAX_STEPS", {})),
        grids=dict(getattr(module, "GRIDS", {})),
        ranges=dict(getattr(module, "RANGES", {})),
        perturbable=tuple(getattr(module, "PERTURBABLE", ())),
    )
    unknown = sorted(set(space.perturbable) - set(space.ranges))
    if unknown:
        raise ValueError(
            f"search_spaces/{method}.py: PERTURBABLE {unknown} must be keys of RANGES (their distributions)"
        )
    for name, spec in space.ranges.items():
        if not isinstance(spec, tuple) or not spec or spec[0] not in RANGE_KINDS:
            raise ValueError(
                f"search_spaces/{method}.py: range {name!r} must be a tuple starting with one of {RANGE_KINDS}"
            )
    return space
