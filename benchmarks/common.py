"""Helpers shared by the benchmarks: one in-process training run, several in parallel processes, the train command."""

from __future__ import annotations

import _bootstrap

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from mlflow.tracking import MlflowClient

import search_spaces
from platform import tasks
from platform.loop import LocalSession, TrialRunner, TrialSpec


def train_once(
    method: str,
    task: str,
    overrides: Mapping[str, Any],
    seed: int,
    steps: int | None,
    data_root: str | None = None,
    defaults_from: str | None = None,
) -> dict[str, float]:
    """Train with the platform's loop in this process (no Ray: these benchmarks measure methods, not orchestration)
    and return the final evaluation. Hyperparameters: the search space's task defaults, then `overrides`; `steps`
    scales the stages to that many steps in all (None: their own budgets)."""
    base = tasks.get(task.split("+")[0]).name
    defaults = search_spaces.load(defaults_from or method).task_defaults.get(base, {})
    spec = TrialSpec(
        method=method,
        task=task,
        hyperparams={**defaults, **overrides},
        seed=seed,
        max_steps=steps,
        eval_every=steps or 10**9,  # once at the end (and at the end of every stage)
        data_root=data_root or tasks.default_data_root(),
        threads=1,
    )
    return TrialRunner(spec, LocalSession()).run()


def _call(job: tuple) -> dict[str, float]:
    function, args = job
    return function(*args)


def parallel(jobs: Sequence[tuple], processes: int = 2) -> list[dict[str, float]]:
    """Run (function, args) jobs in `processes` worker processes (one thread each), in order."""
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_call, jobs))


def mean_std(values: Sequence[float]) -> str:
    """Mean ± sample std over the defined values (NaN, e.g. the ASD of an empty prediction, left out and counted)."""
    defined = [v for v in values if v == v]
    if not defined:
        return "  n/a        "
    spread = statistics.stdev(defined) if len(defined) > 1 else 0.0
    missing = f" ({len(values) - len(defined)} undefined)" if len(defined) < len(values) else ""
    return f"{statistics.mean(defined):5.1f} ± {spread:4.1f}{missing}"


def train_command(
    method: str, task: str, steps: int, eval_every: int, data_root: str, extra: Sequence[str] = ()
) -> dict[str, float]:
    """`python -m platform.train` as a user runs it, in a scratch directory with its own MLflow store. Returns the
    whole command's seconds, the trial's MLflow run duration, the worker loop's own time (`time/elapsed_s`) and the
    final target mIoU."""
    with tempfile.TemporaryDirectory(prefix="uda-bench-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        env = dict(os.environ, PYTHONPATH=_bootstrap.ROOT, UDA_DATA_ROOT=data_root)
        started = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "platform.train",
                method,
                "--task",
                task,
                "--max-steps",
                str(steps),
                "--eval-every",
                str(eval_every),
                "--tracking-uri",
                store,
                "--storage-path",
                f"{scratch}/results",
                *extra,
            ],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        )
        command = time.perf_counter() - started
        if out.returncode != 0:
            raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
        client = MlflowClient(store)
        experiment = client.get_experiment_by_name(f"{method}/{task}")
        child = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
        elapsed = client.get_metric_history(child.info.run_id, "time/elapsed_s")
        return {
            "command": command,
            "trial": (child.info.end_time - child.info.start_time) / 1000,
            "loop": max(m.value for m in elapsed),
            "miou": child.data.metrics["val_target/miou"],
        }
