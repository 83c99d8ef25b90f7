"""Ray Tune wiring: search-space data → Tune param space, searcher and scheduler; one Tune trial = one training run.

A Tune *function* trainable (`run_trial`) owns each trial: it creates (or on resume finds) the trial's MLflow child
run, trains, and ends the run FINISHED or FAILED with the reason. How it trains is the sweep's trial runner:

- "train": the trial is a Ray Train run. Ray 2.60 runs Train V2, where `tune.Tuner(TorchTrainer(...))` is rejected;
  the supported pattern, used here, is that `run_trial` is the Train driver of its trial: it builds a TorchTrainer
  whose RunConfig has a stable per-trial name, the sweep's storage path and `TuneReportCallback` (which forwards
  every worker report, with its checkpoint path, to Tune) and calls `fit()`. Needed for data-parallel trials.
- "inline": a one-worker trial trains in the Tune trial's own process (`TuneSession`: reports and checkpoints go
  straight to Tune, which persists checkpoints, retries failures from the latest one and restores on --resume).
  Same loop, same method code, same MLflow logging; what it skips is Train V2's per-trial controller and worker
  group: about nine Ray processes started and stopped per trial, 11-18 s per trial on a 2-core machine
  (README, "Measured results").

Trial configs are `{"hp": {field: value, ...}, "seed": int}`; everything that is the same for all trials travels in
a `TrialTemplate` bound with `tune.with_parameters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune
from ray.train.v2.api.exceptions import TrainingFailedError
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from platform.config import INLINE, TRAIN, Sweep
from platform.loop import PRIMARY_METRIC, TrialRunner, TrialSpec
from platform.tracking import Tracker, TrialLogger, tags_for
from platform.trainer import checkpoint_directory, trainer_for_spec

MODE = "max"


@dataclass(frozen=True)
class TrialTemplate:
    """What every trial of a sweep shares."""

    method: str
    task: str
    base: Mapping[str, Any]  # per-task defaults + --set overrides
    max_steps: int | None  # loop.TrialSpec.max_steps
    eval_every: int | None
    data_root: str
    storage_path: str
    sweep_name: str
    workers: int
    cpus_per_worker: int
    gpus_per_worker: float
    max_failures: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    code_version: str
    fingerprints: Mapping[str, str]
    defaults: Mapping[str, Any]  # the method's paper defaults (to record every hyperparameter as a param)
    sync_batchnorm: bool = False  # a default, so that `--resume` of a sweep pickled before this field still loads
    runner: str = TRAIN  # likewise: sweeps pickled before inline trials existed ran every trial through Ray Train
    store_root: str = ""  # per-sample stores, one folder per trial (empty: "stores" beside storage_path)


def trial_steps(template: TrialTemplate, hp: Mapping[str, Any]) -> list[int]:
    """The trial's steps per stage (what its MLflow params record)."""
    import methods
    from platform import budgets, tasks

    method = methods.get(template.method)
    values = methods.make_hyperparams(method, hp)
    info = tasks.runtime_info(tasks.get(template.task), template.data_root)
    return budgets.stage_steps(method.stages(values), info, values.batch_size, template.workers, template.max_steps)


def trial_label(config: Mapping[str, Any], swept: tuple[str, ...]) -> str:
    parts = [f"{key}={_short(config['hp'][key])}" for key in swept if key in config["hp"]]
    return " ".join(parts + [f"seed={config['seed']}"])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialError(RuntimeError):
    """A trial failed; the message is the reason recorded in Tune and MLflow."""


def one_line(error: BaseException) -> str:
    """ "Type: first line of the message", the reason recorded in Tune and MLflow."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def failure_reason(error: BaseException) -> str:
    """The most specific one-line reason: a worker's own exception if there is one."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        first = failures[min(failures)]
        return one_line(getattr(first, "cause", None) or first)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def run_trial(config: dict[str, Any], template: TrialTemplate) -> None:
    """The Tune function trainable: drives one trial's Train workers and owns its MLflow child run."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    hp = {**template.base, **config["hp"]}
    seed = int(config["seed"])
    tracker = Tracker(template.tracking_uri)
    steps = trial_steps(template, hp)
    params = {
        **template.defaults,
        **hp,
        "seed": seed,
        "steps": sum(steps),
        "stage_steps": ",".join(map(str, steps)),
        "max_steps": template.max_steps if template.max_steps is not None else "",
        "eval_every": template.eval_every or "",
        "workers": template.workers,
    }
    tags = tags_for(template.method, template.task, seed, template.code_version, template.fingerprints)
    run_id = tracker.start_trial(
        template.experiment_id,
        template.parent_run_id,
        trial_id,
        f"{trial_id} {trial_label(config, tuple(config['hp']))}",
        params,
        {**tags, "uda.sweep": template.sweep_name},
    )
    spec = TrialSpec(
        method=template.method,
        task=template.task,
        hyperparams=hp,
        seed=seed,
        max_steps=template.max_steps,
        eval_every=template.eval_every,
        data_root=template.data_root,
        threads=template.cpus_per_worker,
        sync_batchnorm=template.sync_batchnorm,
        tags={"mlflow_run_id": run_id, "trial_id": trial_id},
        store_root=os.path.join(
            template.store_root or os.path.join(os.path.dirname(template.storage_path), "stores"), trial_id
        ),
    )
    if template.runner == INLINE:
        _train_inline(spec, tracker, template.tracking_uri, run_id)
        return
    trainer = trainer_for_spec(
        spec,
        name=trial_id,
        storage_path=template.storage_path,
        workers=template.workers,
        cpus_per_worker=template.cpus_per_worker,
        gpus_per_worker=template.gpus_per_worker,
        tracking={"uri": template.tracking_uri, "run_id": run_id},
        callbacks=[TuneReportCallback()],
        max_failures=template.max_failures,
    )
    try:
        trainer.fit()
    except TrainingFailedError as error:
        reason = failure_reason(error)
        tracker.end(run_id, "FAILED", reason)
        raise TrialError(reason) from None
    tracker.end(run_id, "FINISHED")


class TuneSession:
    """platform.loop.Session of an inline trial: this Tune trial process is the trial's only worker."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        # A trial that asked for a GPU gets it through CUDA_VISIBLE_DEVICES; one that did not stays on the CPU even
        # where the node's GPUs are visible (they belong to other trials)
        self.device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        # one INFO line per persisted checkpoint; our checkpoints are listed in MLflow and in the summary
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def report(self, metrics: Mapping[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(dict(metrics), checkpoint=checkpoint)  # Tune persists the checkpoint before returning

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        return checkpoint_directory(tune.get_checkpoint())  # set when Tune retries or restores (--resume) this trial


def _train_inline(spec: TrialSpec, tracker: Tracker, tracking_uri: str, run_id: str) -> None:
    try:
        TrialRunner(spec, TuneSession(), TrialLogger(tracking_uri, run_id)).run()
    except Exception as error:  # the trial's own error, e.g. a non-finite loss: its reason goes to MLflow and Tune
        reason = one_line(error)
        tracker.end(run_id, "FAILED", reason)
        raise TrialError(reason) from None
    tracker.end(run_id, "FINISHED")


# ---------------------------------------------------------------------------------------------- search


def _tune_domain(spec: tuple) -> Any:
    kind = spec[0]
    if kind == "uniform":
        return tune.uniform(spec[1], spec[2])
    if kind == "loguniform":
        return tune.loguniform(spec[1], spec[2])
    if kind == "randint":
        return tune.randint(spec[1], spec[2])
    return tune.choice(list(spec[1]))


def param_space(sweep: Sweep, ranges: Mapping[str, tuple]) -> dict[str, Any]:
    if sweep.mode == "tpe":
        return {"hp": {key: _tune_domain(spec) for key, spec in ranges.items()}}
    return {"hp": tune.grid_search([dict(p) for p in sweep.points]), "seed": tune.grid_search(list(sweep.seeds))}


def searcher(sweep: Sweep, sampling_seed: int) -> Searcher | None:
    if sweep.mode != "tpe":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    first = [{f"hp/{key}": value for key, value in point.items()} for point in sweep.points]
    inner = OptunaSearch(
        metric=PRIMARY_METRIC,
        mode=MODE,
        points_to_evaluate=first,
        sampler=optuna.samplers.TPESampler(seed=sampling_seed),
    )
    return SeedReplicas(inner, sweep.seeds)


def scheduler(name: str | None, reports: int) -> ASHAScheduler | None:
    """`reports`: the most evaluations a trial makes (Tune iterations; config.evaluations)."""
    if name is None:
        return None
    return ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=1, reduction_factor=2)


def num_tune_samples(sweep: Sweep) -> int:
    """Tune's num_samples: TPE draws one trial per (configuration, seed); a grid is repeated num_samples times."""
    if sweep.mode == "tpe":
        return sweep.num_samples * len(sweep.seeds)
    return sweep.num_samples if sweep.mode == "grid" else 1


class SeedReplicas(Searcher):
    """Runs every configuration that the wrapped searcher suggests once per seed and reports the mean back to it.

    Seeds are an axis of every sweep; TPE must see the mean over seeds of a configuration, not one noisy draw.
    """

    def __init__(self, inner: Searcher, seeds: tuple[int, ...]):
        super().__init__(metric=PRIMARY_METRIC, mode=MODE)
        self.inner, self.seeds = inner, tuple(seeds)
        self._queue: list[tuple[str, dict, int]] = []
        self._base_of: dict[str, str] = {}
        self._values: dict[str, list[float | None]] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if not self._queue:
            base = f"{trial_id}/configuration"
            suggested = self.inner.suggest(base)
            if not isinstance(suggested, dict):
                return suggested
            self._queue = [(base, suggested, seed) for seed in self.seeds]
        base, suggested, seed = self._queue.pop(0)
        self._base_of[trial_id] = base
        return {**suggested, "seed": seed}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        base = self._base_of.pop(trial_id, None)
        if base is None:
            return
        value = None if error or not result else result.get(PRIMARY_METRIC)
        self._values.setdefault(base, []).append(value)
        if len(self._values[base]) == len(self.seeds):
            values = [v for v in self._values.pop(base) if v is not None]
            if values:
                self.inner.on_trial_complete(base, {PRIMARY_METRIC: statistics.mean(values)})
            else:
                self.inner.on_trial_complete(base, error=True)

    def get_state(self) -> dict:
        return {"inner": self.inner.get_state() if hasattr(self.inner, "get_state") else None}

    def set_state(self, state: dict) -> None:
        if state.get("inner") is not None:
            self.inner.set_state(state["inner"])


def template_dict(template: TrialTemplate) -> dict[str, Any]:
    return dataclasses.asdict(template)
