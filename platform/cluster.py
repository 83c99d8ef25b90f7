"""Starting or joining Ray with the repository root on every worker's PYTHONPATH.

Our package is named `platform` and shadows the standard-library module (see platform/__init__.py). A Ray worker that
imports the standard-library `platform` before it sees the repository root cannot import `platform.sweep` later
("'platform' is not a package"). Every way this module starts or joins Ray therefore puts the root on the workers'
path before they start:

- inside a Ray job (`ray job submit --working-dir . -- python -m platform.sweep ...`): the job's runtime env already
  carries the code as `working_dir`; we pass nothing and inherit it;
- joining a running cluster (`--address` or RAY_ADDRESS): runtime env `working_dir` = the repository root, uploaded
  with data, results and stores excluded;
- starting a local cluster: runtime env `env_vars.PYTHONPATH` = the repository root (nothing to upload).

Clusters built from cluster/ install the project on every node with the root first on PYTHONPATH, so the
`ray job submit -- python -m platform.sweep ...` form (no --working-dir) works there too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Never uploaded with the code: datasets, results, MLflow stores, caches.
WORKING_DIR_EXCLUDES = [
    ".git",
    "data",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "ray_results",
    "**/__pycache__",
    ".venv",
    "venv",
    "*.parquet",
    "*.pt",
    "*.pth",
]


# Ray Train's controller polls its workers every 2 s by default; on a local machine a shorter interval makes reports
# and trial ends visible sooner (measured: about 2 s less per trial) at negligible cost.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH", "")
    parts = [REPOSITORY_ROOT] + [p for p in existing.split(os.pathsep) if p and p != REPOSITORY_ROOT]
    return os.pathsep.join(parts)


def runtime_env(address: str | None) -> dict | None:
    """The runtime env that puts the repository root on the workers' path for this way of connecting."""
    if in_ray_job():
        return None
    if address:
        return {"working_dir": REPOSITORY_ROOT, "excludes": WORKING_DIR_EXCLUDES}
    return {"env_vars": {"PYTHONPATH": _pythonpath(), **LOCAL_ENV}}


# Whether `connect` started a local cluster (which `disconnect` stops, with everything this process put in it).
started_local = False


def connect(address: str | None = None) -> None:
    """Join `address` (else $RAY_ADDRESS, else the job's cluster) or start a local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = runtime_env(address)
    kwargs = {"runtime_env": env} if env else {}
    global started_local
    started_local = address is None and not in_ray_job()
    if started_local:
        # A local cluster: the dashboard is needed (ASHA-stopped Train trials hang without it); keep it on loopback.
        # One logical CPU more than the machine has, for the trial drivers' token shares (TRIAL_DRIVER_CPUS).
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=(os.cpu_count() or 1) + 1)
    ray.init(address=address, log_to_driver=True, logging_level="WARNING", **kwargs)


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float


def node_resources() -> list[dict[str, float]]:
    """Each alive node's total resources (what one trial's bundles must fit into: preflight.check_placement)."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def disconnect() -> None:
    """Leave (or, for a local cluster this process started, stop) Ray."""
    if ray.is_initialized():
        ray.shutdown()


def resources() -> Resources:
    total = ray.cluster_resources()
    return Resources(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0))


# The Tune function that drives a trial's Train workers only waits for them: it holds a token share of a CPU so
# that a trial's CPUs are its workers' (measured here: 4 one-worker trials on 2 cores took 132 s one at a time with a
# whole CPU per driver, 70 s two at a time with token drivers). Tune refuses 0.
TRIAL_DRIVER_CPUS = 0.01


def trial_resources(inline: bool, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    """What a trial's Tune process asks for: a token share when it only drives a Ray Train worker group (the workers
    ask for theirs), the worker's CPUs and GPUs on top of it when it trains inline."""
    if not inline:
        return {"CPU": TRIAL_DRIVER_CPUS}
    return {
        "CPU": TRIAL_DRIVER_CPUS + workers * cpus_per_worker,
        **({"GPU": gpus_per_worker} if gpus_per_worker else {}),
    }


def max_concurrent_trials(available: Resources, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many trials fit at once: each needs its driver's CPU plus its workers' CPUs and GPUs."""
    by_cpu = math.floor(available.cpus / (TRIAL_DRIVER_CPUS + workers * cpus_per_worker))
    limits = [by_cpu]
    if gpus_per_worker > 0:
        limits.append(math.floor(available.gpus / (workers * gpus_per_worker)))
    return max(1, min(limits))
