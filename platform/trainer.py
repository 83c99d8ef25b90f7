"""Methods as Ray Train trainers: `build_trainer(...)` returns a ready `TorchTrainer` for any registered method.

Use it from your own Ray script (the repository root must be on the workers' PYTHONPATH, see platform.cluster):

    import ray
    from platform import cluster
    from platform.trainer import build_trainer

    cluster.connect()                                   # or ray.init(runtime_env=cluster.runtime_env())
    trainer = build_trainer("source_only", task="synthetic-urban", overrides={"learning_rate": 0.01}, seed=0)
    result = trainer.fit()
    print(result.metrics["val_target/miou"], result.checkpoint)

Each Train worker runs `train_loop_per_worker`: the generic loop of platform.loop over the method contract, with Ray
Train as its Session (rank, device, report + checkpoint, resume) and, on rank 0, MLflow as its logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from platform import checkpoints, tasks
from platform import config as config_module
from platform.datasets import resolve_root
from platform.loop import TrialRunner, TrialSpec
from platform.tracking import TrialLogger


class RayTrainSession:
    """platform.loop.Session over Ray Train's worker context."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")

    def report(self, metrics: Mapping[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        return checkpoint_directory(ray.train.get_checkpoint())


@contextlib.contextmanager
def checkpoint_directory(checkpoint: ray.train.Checkpoint | None) -> Iterator[str | None]:
    """A local directory holding `checkpoint` (None when there is none): what Session.resume_dir yields."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield directory


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """The Ray Train worker function: config = {"spec": TrialSpec dict, "tracking": {"uri", "run_id"} or None}."""
    _quiet_report_log()
    session = RayTrainSession()
    tracking = config.get("tracking")
    logger = None
    if tracking and session.rank == 0:
        logger = TrialLogger(tracking["uri"], tracking["run_id"])
    TrialRunner(TrialSpec.from_dict(config["spec"]), session, logger).run()


def _quiet_report_log() -> None:
    """Ray Train logs every report (with all metrics) at INFO through a logger named by its file path, outside the
    `ray.train` hierarchy that RunConfig.logging_config controls; our metrics are in MLflow and Tune already."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def trainer_for_spec(
    spec: TrialSpec,
    *,
    name: str,
    storage_path: str,
    workers: int = 1,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0,
    tracking: Mapping[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    max_failures: int = 0,
) -> TorchTrainer:
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "tracking": dict(tracking) if tracking else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints.KEPT),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def build_trainer(
    method: str,
    task: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    eval_every: int | None = None,
    workers: int = 1,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0,
    data_root: str | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    tracking: Mapping[str, str] | None = None,
    max_failures: int = 0,
    sync_batchnorm: bool = False,
    source_val: float = 0.0,
) -> TorchTrainer:
    """A ready TorchTrainer running `method` on `task` (default: the method's default task).

    `overrides` are Hyperparams field values on top of the search space's per-task defaults; everything is validated
    here (config.UsageError) before a worker starts. `tracking={"uri": ..., "run_id": ...}` makes rank 0 log into an
    existing MLflow run. Synthetic task data is generated here if missing; a missing real dataset raises
    DatasetNotFoundError with the command that prepares it.
    """
    resolved = config_module.resolve(method, task, overrides, max_steps, eval_every, source_val)
    data_root = resolve_root(data_root or tasks.default_data_root())
    tasks.prepare(resolved.task, data_root)
    spec = TrialSpec(
        method=resolved.method.name,
        task=resolved.task.name,
        hyperparams=dict(resolved.base),
        seed=seed,
        max_steps=resolved.max_steps,
        eval_every=resolved.eval_every,
        data_root=data_root,
        threads=cpus_per_worker,
        sync_batchnorm=sync_batchnorm,
        source_val=resolved.source_val,
    )
    name = name or f"{resolved.method.name}-{resolved.task.name}-seed{seed}"
    storage = storage_path or config_module.DEFAULT_STORAGE
    storage = storage if "://" in storage else os.path.abspath(storage)
    spec = dataclasses.replace(spec, store_root=f"{storage.rstrip('/')}/{name}/store")
    return trainer_for_spec(
        spec,
        name=name,
        storage_path=storage,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        tracking=tracking,
        max_failures=max_failures,
    )
