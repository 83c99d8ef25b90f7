"""Resolving and validating what a user asked for, before anything starts.

Every check that can fail on user input lives here and raises `UsageError` with one line naming what is wrong and the
valid choices or the fix. The CLI turns it into exit code 2; the programmatic API lets it propagate. Nothing here
starts Ray, touches MLflow or writes data.

Precedence of hyperparameter values: the method's paper defaults (its Hyperparams dataclass) < the search space's
per-task defaults < `--set key=value` < the swept values of a grid point or a sampled configuration. Setting with
`--set` a key that the chosen grid or search also sweeps is an error rather than a silent override.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import methods
import search_spaces
from methods.contract import RANDOM_INIT, Method, weights_file_fields
from platform import budgets, tasks
from platform.tasks import Task
from search_spaces import SEED_AXIS, SearchSpace

DEFAULT_STORAGE = os.path.expanduser("~/ray_results/uda")

# How a trial trains (platform.tuning): "train" = a Ray Train worker group, "inline" = in the Tune trial's process
# (one worker); "auto" = inline for one worker per trial, else train.
INLINE, TRAIN = "inline", "train"
RUNNERS = ("auto", INLINE, TRAIN)


def trial_runner(requested: str, workers: int) -> str:
    if requested == "auto":
        return INLINE if workers == 1 else TRAIN
    return requested


class UsageError(ValueError):
    """Bad user input: the message is one line, printed as is, and the process exits with code 2."""


@dataclass(frozen=True)
class Resolved:
    method: Method
    task: Task
    space: SearchSpace
    base: Mapping[str, Any]  # per-task defaults + --set overrides (not yet the swept values)
    # the trial's length for share budgets (--max-steps, else MAX_STEPS); for absolute budgets --max-steps scales the
    # stages to it, None keeps their own length (platform/budgets.py)
    max_steps: int | None
    eval_every: int | None  # None: a fifth of each trial's steps
    source_val: float = 0.0  # --source-val: the held-out fraction of the source training split (tasks.held_out)


def method_and_task(method_name: str, task_name: str | None = None) -> tuple[Method, SearchSpace, Task]:
    """The method, its search space and the task (the space's default when None); UsageError naming the valid
    choices otherwise. Checked before anything else reads --set, so that errors come in the order users expect."""
    try:
        method = methods.get(method_name)
    except methods.UnknownMethodError as error:
        raise UsageError(str(error)) from None
    try:
        space = search_spaces.load(method.name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    task_name = task_name or space.default_task
    if task_name not in tasks.TASKS or task_name not in method.tasks:
        kind = "unknown task" if task_name not in tasks.TASKS else "task not supported by this method:"
        raise UsageError(f"{kind} {task_name!r} for {method.name}; valid: {', '.join(method.tasks)}")
    return method, space, tasks.get(task_name)


def resolve(
    method_name: str,
    task_name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    eval_every: int | None = None,
    source_val: float = 0.0,
) -> Resolved:
    method, space, task = method_and_task(method_name, task_name)
    base = {**space.task_defaults.get(task.name, {}), **(overrides or {})}
    hp = check_hyperparams(method, base)
    check_weights_files(method, task, base)
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1 (got {max_steps})")
    try:
        shares = budgets.uses_shares(method.stages(hp))
    except budgets.BudgetError as error:
        raise UsageError(f"{method.name}: {error}") from None
    if max_steps is None and shares:
        max_steps = space.max_steps.get(task.name)
        if max_steps is None:
            raise UsageError(f"search_spaces/{method.name}.py has no step budget for {task.name}; pass --max-steps N")
    if eval_every is not None and eval_every < 1:
        raise UsageError(f"--eval-every must be >= 1 (got {eval_every})")
    if not 0 <= source_val < 1:
        raise UsageError(f"--source-val must be a fraction in [0, 1), e.g. 0.1 (got {source_val:g})")
    return Resolved(method, task, space, base, max_steps, eval_every, source_val)


def trial_steps(resolved: Resolved, point: Mapping[str, Any], data_root: str, workers: int) -> list[int]:
    """Steps per stage of the trial running `point` (on top of resolved.base) with `workers` workers; the task's
    data must be prepared (epoch budgets read its split sizes). UsageError if they cannot be resolved."""
    hp = check_hyperparams(resolved.method, {**resolved.base, **point})
    try:
        info = tasks.runtime_info(resolved.task, data_root, resolved.source_val)
    except tasks.SourceValidationError as error:
        raise UsageError(str(error)) from None
    try:
        return budgets.stage_steps(resolved.method.stages(hp), info, hp.batch_size, workers, resolved.max_steps)
    except budgets.BudgetError as error:
        raise UsageError(str(error)) from None


def evaluations(stage_steps: Sequence[int], eval_every: int | None) -> int:
    """Evaluations (= Tune reports) of a trial: every `eval_every` steps (default a fifth of its steps) and at the
    end of every stage (platform/loop.py)."""
    total = sum(stage_steps)
    every = eval_every or max(1, total // 5)
    ends = {sum(stage_steps[: i + 1]) for i in range(len(stage_steps))}
    return len(set(range(every, total + 1, every)) | ends)


def check_hyperparams(method: Method, values: Mapping[str, Any]) -> Any:
    """The method's Hyperparams with `values` applied; UsageError on an unknown key or a failed range check."""
    try:
        return methods.make_hyperparams(method, values)
    except (ValueError, TypeError) as error:
        message = str(error)
        if not message.startswith("unknown hyperparameter"):
            message = f"invalid hyperparameters for {method.name}: {message}"
        raise UsageError(message) from None


def check_weights_files(method: Method, task: Task, values: Mapping[str, Any]) -> None:
    """Every non-empty WeightsFile field must name an existing file that fits the modules (built once here); a
    method that starts from ImageNet needs its backbone weights on a paper task (or an explicit `random`)."""
    check_imagenet_backbone(method, task, values)
    fields = weights_file_fields(method.hyperparams)
    given = {name: values[name] for name in fields if values.get(name) and values[name] != RANDOM_INIT}
    if not given:
        return
    for name, path in given.items():
        if not os.path.isfile(path):
            raise UsageError(f"{name}: no such file {path!r}; give the path of a weights file on this machine")
    try:
        method.build(check_hyperparams(method, values), task.info)
    except (ValueError, RuntimeError, OSError) as error:
        raise UsageError(f"{', '.join(f'{k}={v}' for k, v in given.items())} cannot be loaded: {error}") from None


def check_imagenet_backbone(method: Method, task: Task, values: Mapping[str, Any]) -> None:
    if not method.imagenet_backbone or task.synthetic:
        return
    hp = check_hyperparams(method, values)
    if getattr(hp, "backbone_weights", RANDOM_INIT) != "":
        return
    from methods.shared.segmenter import IMAGENET_FILES

    file = IMAGENET_FILES.get(getattr(hp, "architecture", ""), "the torchvision ImageNet weights of the backbone")
    raise UsageError(
        f"{method.name} starts from ImageNet weights on {task.name} (its paper's setting): pass --set "
        f"backbone_weights=/path/to/{file} (https://download.pytorch.org/models/{file}), or --set "
        f"backbone_weights={RANDOM_INIT} to train from random weights on purpose"
    )


# ---------------------------------------------------------------------------------------------- --set key=value


def parse_overrides(method: Method, assignments: Sequence[str]) -> dict[str, Any]:
    """`["xi1=0.3", "architecture=tiny"]` → typed values, by the types of the method's Hyperparams fields."""
    hints = typing.get_type_hints(method.hyperparams)
    valid = methods.hyperparam_names(method)
    parsed: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        key = key.strip()
        if not separator or not key:
            raise UsageError(f"malformed --set {assignment!r}: expected key=value, e.g. --set {valid[0]}=...")
        if key not in valid:
            raise UsageError(f"unknown hyperparameter {key!r} for {method.name}; valid: {', '.join(valid)}")
        parsed[key] = _convert(key, text.strip(), hints[key])
    return parsed


def _convert(key: str, text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise UsageError(f"invalid value for {key}: {text!r}; valid: {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(hint)):
            return None
        return _convert(key, text, options[0])
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            value = float(text)
            if math.isnan(value):
                raise ValueError
            return value
    except ValueError:
        raise UsageError(f"invalid value for {key}: {text!r} is not a {hint.__name__}") from None
    return text


# ---------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
    """What to run: explicit points (grid or random search) or a TPE search, times seeds."""

    mode: Literal["grid", "random", "tpe"]
    points: tuple[Mapping[str, Any], ...]  # grid/random: every configuration; tpe: the points to evaluate first
    seeds: tuple[int, ...]
    num_samples: int  # tpe: configurations to sample (each runs once per seed); grid: repeats of every point
    grid_name: str | None = None

    @property
    def num_trials(self) -> int:
        if self.mode == "tpe":
            return self.num_samples * len(self.seeds)
        repeats = self.num_samples if self.mode == "grid" else 1
        return len(self.points) * len(self.seeds) * repeats

    @property
    def swept_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for p in self.points for k in p))


def check_pbt(resolved: Resolved, sweep: Sweep, runner: str) -> None:
    """Population Based Training evolves a sampled population of inline trials over the PERTURBABLE fields."""
    space = resolved.space
    if sweep.mode != "random":
        raise UsageError(
            "--scheduler pbt evolves a population sampled from RANGES: use --search random (the default) "
            "with --num-samples N, not --grid or --search tpe"
        )
    if not space.perturbable:
        raise UsageError(f"search_spaces/{resolved.method.name}.py declares no PERTURBABLE fields for --scheduler pbt")
    if sweep.num_samples < 2:
        raise UsageError(f"--scheduler pbt needs a population: --num-samples >= 2 (got {sweep.num_samples})")
    if runner != INLINE:
        raise UsageError(
            "--scheduler pbt exploits Tune checkpoints, which Ray Train trials keep in Ray Train's own "
            "storage: use one worker per trial (the inline runner)"
        )


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"malformed --seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"malformed --seeds {text!r}: expected distinct comma-separated integers, e.g. --seeds 0,1,2")
    return seeds


def plan_sweep(
    resolved: Resolved,
    grid: str | None,
    search: str | None,
    num_samples: int | None,
    seeds: Sequence[int],
    set_keys: Sequence[str],
    sampling_seed: int = 0,
) -> Sweep:
    """Turn --grid / --search / --num-samples / --seeds into explicit points, validating every one of them."""
    space, method = resolved.space, resolved.method
    if grid and search:
        raise UsageError("--grid and --search are exclusive: a grid runs every point, a search samples --num-samples")
    if num_samples is not None and num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
    if grid:
        try:
            raw_points = space.grid_points(grid)
        except ValueError as error:
            raise UsageError(str(error)) from None
        seed_values = {p.pop(SEED_AXIS) for p in raw_points if SEED_AXIS in p}
        points = _unique(raw_points)
        if seed_values:
            seeds = tuple(sorted(seed_values))
        sweep = Sweep("grid", tuple(points), tuple(seeds), num_samples or 1, grid_name=grid)
    else:
        mode = search or "random"
        if mode not in ("random", "tpe"):
            raise UsageError(f"unknown --search {mode!r}; valid: random, tpe")
        if not space.ranges:
            raise UsageError(
                f"search_spaces/{method.name}.py defines no RANGES to search; use --grid "
                f"({', '.join(space.grids) or 'none defined'})"
            )
        samples = num_samples if num_samples is not None else 2
        first = {key: _base_value(resolved, key) for key in space.ranges}
        if mode == "random":
            points = [first] + sample_points(space.ranges, samples - 1, sampling_seed)
            sweep = Sweep("random", tuple(points[:samples]), tuple(seeds), samples)
        else:
            sweep = Sweep("tpe", (first,), tuple(seeds), samples)
    conflicts = sorted(set(set_keys) & set(sweep.swept_keys if sweep.mode != "tpe" else space.ranges))
    if conflicts:
        raise UsageError(
            f"--set {conflicts[0]} conflicts with the sweep, which varies {conflicts[0]}; drop one of them"
        )
    for point in sweep.points:
        check_hyperparams(method, {**resolved.base, **point})
        if set(point) & set(weights_file_fields(method.hyperparams)):
            check_weights_files(method, resolved.task, {**resolved.base, **point})
    if sweep.mode == "tpe":
        for key, spec in space.ranges.items():
            for bound in _range_bounds(spec):
                check_hyperparams(method, {**resolved.base, key: bound})
    return sweep


def _base_value(resolved: Resolved, key: str) -> Any:
    if key in resolved.base:
        return resolved.base[key]
    return getattr(resolved.method.hyperparams(), key)


def _unique(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, unique = set(), []
    for point in points:
        marker = tuple(sorted((k, repr(v)) for k, v in point.items()))
        if marker not in seen:
            seen.add(marker)
            unique.append(point)
    return unique


def _range_bounds(spec: tuple) -> list[Any]:
    kind = spec[0]
    if kind == "choice":
        return list(spec[1])
    if kind == "randint":
        return [spec[1], spec[2] - 1]
    return [spec[1], spec[2]]


def sample_points(ranges: Mapping[str, tuple], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` configurations drawn from the ranges with a seeded Generator (so the sweep is reproducible)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    points = []
    for _ in range(max(0, count)):
        point = {}
        for key, spec in ranges.items():
            kind = spec[0]
            if kind == "uniform":
                point[key] = float(rng.uniform(spec[1], spec[2]))
            elif kind == "loguniform":
                point[key] = float(math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))))
            elif kind == "randint":
                point[key] = int(rng.integers(spec[1], spec[2]))
            else:
                point[key] = spec[1][int(rng.integers(len(spec[1])))]
        points.append(point)
    return points


def hyperparams_dict(method: Method, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of the resolved Hyperparams (what MLflow records as params)."""
    return dataclasses.asdict(check_hyperparams(method, values))
