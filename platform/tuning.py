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
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune
from ray.train.v2.api.exceptions import TrainingFailedError
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import Searcher

from platform import checkpoints
from platform.config import INLINE, TRAIN, Sweep
from platform.loop import PRIMARY_METRIC, TrialRunner, TrialSpec
from platform.report import is_defaults
from platform.tracking import DEFAULTS_TAG, SWEPT_TAG, Tracker, TrialLogger, system_metrics, tags_for
from platform.trainer import checkpoint_directory, trainer_for_spec

MODE = "max"
# ASHA's rungs, in evaluations (benchmarks/search_efficiency.py measures the choices)
ASHA_GRACE_PERIOD = 1
ASHA_REDUCTION_FACTOR = 2


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
    slots: str = ""  # the named SlotKeeper actor that caps running trials (resumed sweeps), or "" for none
    tracked: tuple[str, ...] = ()  # hyperparameters logged as hp/<name> at every evaluation (PBT's perturbable ones)
    precision: str = "fp32"  # --precision: fp32 | bf16 | fp16 (loop.TrialSpec.precision)
    # Tune's CheckpointConfig.num_to_keep (None under PBT; loop.TrialSpec)
    checkpoints_kept: int | None = checkpoints.KEPT
    source_val: float = 0.0  # --source-val (loop.TrialSpec.source_val)


@ray.remote(num_cpus=0)
class SlotKeeper:
    """At most `limit` trials train at once. Tune applies `max_concurrent_trials` to the trials its searcher
    suggests, not to the trials it restores on `--resume` (they all start as soon as their token resources fit,
    which for Ray Train trials is at once: three worker groups on a 2-CPU machine, one timing out). Trials of a
    resumed sweep therefore take a slot before training; a slot is keyed by trial id, so a retried trial keeps its
    own, and the driver frees the slot of a trial that ended without freeing it (SlotRelease)."""

    def __init__(self, limit: int):
        self.limit, self.holders = limit, set()

    def acquire(self, trial_id: str) -> bool:
        if trial_id in self.holders or len(self.holders) < self.limit:
            self.holders.add(trial_id)
            return True
        return False

    def release(self, trial_id: str) -> None:
        self.holders.discard(trial_id)

    def held(self) -> int:
        return len(self.holders)


SLOTS_NAMESPACE = "uda-platform"
RESTARTS_TAG = "uda.restarts"


def slot_keeper_name(sweep: str) -> str:
    return f"uda-slots-{sweep}"


@contextlib.contextmanager
def trial_slot(name: str, trial_id: str, pause_s: float = 1.0) -> Iterator[None]:
    """Hold one of the SlotKeeper's slots while the body runs (no-op without a keeper)."""
    if not name:
        yield
        return
    keeper = ray.get_actor(name, namespace=SLOTS_NAMESPACE)
    while not ray.get(keeper.acquire.remote(trial_id)):
        time.sleep(pause_s)
    try:
        yield
    finally:
        ray.get(keeper.release.remote(trial_id))


class SlotRelease(Callback):
    """Driver side: a trial that failed or was stopped (ASHA, a killed process) gives its slot back."""

    def __init__(self, name: str):
        self.name = name

    def _release(self, trial: Any) -> None:
        try:
            keeper = ray.get_actor(self.name, namespace=SLOTS_NAMESPACE)
        except ValueError:  # a sweep that was not resumed has no keeper
            return
        ray.get(keeper.release.remote(trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)


def trial_steps(template: TrialTemplate, hp: Mapping[str, Any]) -> list[int]:
    """The trial's steps per stage (what its MLflow params record)."""
    import methods
    from platform import budgets, tasks

    method = methods.get(template.method)
    values = methods.make_hyperparams(method, hp)
    info = tasks.runtime_info(tasks.get(template.task), template.data_root, template.source_val)
    return budgets.stage_steps(method.stages(values), info, values.batch_size, template.workers, template.max_steps)


def trial_label(config: Mapping[str, Any], swept: tuple[str, ...], defaults: bool = False) -> str:
    """The run name's head: the swept values first, `xi1=0.56 xi2=0.00035 · seed 0` (`defaults · seed 0` for the
    configuration that changes nothing), so that the runs table tells trials apart before it cuts names off."""
    from platform.report import compact

    parts = [f"{key}={compact(config['hp'][key])}" for key in swept if key in config["hp"]]
    return f"{'defaults' if defaults or not parts else ' '.join(parts)} · seed {config['seed']}"


def dataset_contexts(task_name: str) -> dict[str, str]:
    """What each of a task's datasets is to a trial (the runs table's Dataset column shows it)."""
    from platform import tasks

    task = tasks.get(task_name)
    contexts = {split.dataset: "train (source)" for split in task.source_splits}
    contexts.setdefault(task.target_train.dataset, "train (target, no labels)")
    if task.target_val.dataset == task.target_train.dataset:
        contexts[task.target_val.dataset] = "train (target, no labels) + validation"
    else:
        contexts.setdefault(task.target_val.dataset, "validation")
    return contexts


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
        "precision": template.precision,
        # only where a slice is held out, so that runs without one still pool with runs from before the flag
        **({"source_val": template.source_val} if template.source_val else {}),
    }
    tags = tags_for(template.method, template.task, seed, template.code_version, template.fingerprints)
    defaults = is_defaults(config["hp"], {**template.defaults, **template.base})
    tags.update({DEFAULTS_TAG: str(defaults).lower(), SWEPT_TAG: json.dumps(config["hp"], default=str)})
    run_id, started_before = tracker.start_trial(
        template.experiment_id,
        template.parent_run_id,
        trial_id,
        f"{trial_label(config, tuple(config['hp']), defaults)} · {trial_id}",
        params,
        {**tags, "uda.sweep": template.sweep_name},
    )
    tracker.log_datasets(run_id, template.fingerprints, template.data_root, dataset_contexts(template.task))
    if started_before:
        # Tune starts this trial again (from its latest checkpoint if it has one, else from scratch): a Tune-level
        # retry (inline trials' --max-failures: a lost node, a killed process), a resumed sweep or PBT's exploit; the
        # run records how many times. Ray Train's own worker-group retries (Train trials) stay inside fit(), uncounted
        restarts = int(tracker.client.get_run(run_id).data.tags.get(RESTARTS_TAG, "0")) + 1
        tracker.client.set_tag(run_id, RESTARTS_TAG, str(restarts))
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
        tracked_hyperparams=tuple(template.tracked),
        precision=template.precision,
        checkpoints_kept=template.checkpoints_kept,
        source_val=template.source_val,
        store_root=os.path.join(
            template.store_root or os.path.join(os.path.dirname(template.storage_path), "stores"), trial_id
        ),
    )
    with trial_slot(template.slots, trial_id), system_metrics(template.tracking_uri, run_id):
        if template.runner == INLINE:
            _train_inline(spec, tracker, template.tracking_uri, run_id)
        else:
            _train_with_ray_train(spec, template, tracker, trial_id, run_id)


def _train_with_ray_train(
    spec: TrialSpec, template: TrialTemplate, tracker: Tracker, trial_id: str, run_id: str
) -> None:
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


def scheduler(
    name: str | None,
    reports: int,
    ranges: Mapping[str, tuple] | None = None,
    perturbable: tuple[str, ...] = (),
    seed: int = 0,
    grace_period: int = ASHA_GRACE_PERIOD,
    reduction_factor: float = ASHA_REDUCTION_FACTOR,
) -> ASHAScheduler | PopulationBasedTraining | None:
    """`reports`: the most evaluations a trial makes (Tune iterations; config.evaluations).

    asha: stop weak trials at evaluation rungs (after `grace_period` evaluations, then every `reduction_factor`
    times as many, keeping the top 1/`reduction_factor` at each rung). pbt: Population Based Training (Jaderberg et
    al. 2017) at every evaluation: a trial in the bottom quarter continues from the checkpoint of one in the top
    quarter with the `perturbable` hyperparameters perturbed (x0.8 or x1.2, or resampled from their RANGES with
    probability 0.25). Our checkpoints are Tune's (inline trials), so an exploit restores that trial's whole training
    state; `loop._load` gives the restored optimisers the perturbed learning rates."""
    if name is None:
        return None
    if name == "pbt":
        mutations = {"hp": {key: _tune_domain(ranges[key]) for key in perturbable}}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,
            hyperparam_mutations=mutations,
            quantile_fraction=0.25,
            resample_probability=0.25,
            log_config=False,
            synch=False,
        )
    return ASHAScheduler(
        time_attr="training_iteration", max_t=reports, grace_period=grace_period, reduction_factor=reduction_factor
    )


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
