"""The generic training loop: runs any registered method's stages on a task, evaluates, reports, checkpoints.

This is what each Ray Train worker executes (see platform/trainer.py for the Ray side). It knows nothing about a
particular method: it builds the modules, walks `method.stages(hp)`, puts each stage's trained modules in train mode
and every other module in eval mode without gradients, feeds batches from the Parquet streams, runs the stage's target
passes when they are due, and evaluates `method.predict` on the target validation split every `eval_every` steps and
at the end of every stage. It talks to the outside world through two small interfaces:

- a `Session` (rank, world size, device, `report`, the checkpoint to resume from): Ray Train in production, a local
  object in tests and benchmarks;
- an optional `RunLogger` (rank 0 only): MLflow in production.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import methods
from methods.contract import Batch, Optim, Stage, StepContext
from platform import checkpoints, distributed, tasks
from platform.datasets import split_files
from platform.metrics import LungMetrics, confusion_matrix, segmentation_metrics
from platform.stream import Policy, TrainStream, eval_batches, finish, row_groups

PRIMARY_METRIC = "val_target/miou"


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the trial fails with this message."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial; plain data so that it travels through Ray as a dict."""

    method: str
    task: str
    hyperparams: Mapping[str, Any]  # overrides of the method's paper defaults, already validated
    seed: int
    max_steps: int
    eval_every: int
    data_root: str
    log_every: int = 10
    eval_batch_size: int = 16
    threads: int = 1  # torch intra-op threads per worker (= CPUs per worker)
    sync_batchnorm: bool = False  # batch statistics over all workers (GPU workers only; see platform/distributed.py)
    tags: Mapping[str, str] = field(default_factory=dict)  # extra context for checkpoint sidecars

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrialSpec:
        return cls(**raw)


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: Mapping[str, float], checkpoint_dir: str | None) -> None: ...

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]: ...


class RunLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_checkpoint(self, kind: str, modules: nn.ModuleDict, meta: Mapping[str, Any]) -> None: ...

    def log_images(self, images: Mapping[str, torch.Tensor], step: int) -> None: ...


class LocalSession:
    """A single-process session: reports are kept in memory, checkpoints under `checkpoint_root` if given."""

    rank, world_size = 0, 1

    def __init__(self, device: str = "cpu", checkpoint_root: str | None = None, resume_from: str | None = None):
        self.device = torch.device(device)
        self.checkpoint_root, self.resume_from = checkpoint_root, resume_from
        self.reports: list[dict[str, float]] = []

    def report(self, metrics: Mapping[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_root:
            target = os.path.join(self.checkpoint_root, f"step-{int(metrics['step']):08d}")
            os.makedirs(target, exist_ok=True)
            for name in os.listdir(checkpoint_dir):
                os.replace(os.path.join(checkpoint_dir, name), os.path.join(target, name))
            self.latest = target

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        yield self.resume_from


@dataclass
class Progress:
    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    source_batches: int = 0  # batches this rank has drawn from each stream (to resume at the same sample)
    target_batches: int = 0
    last_pass_epoch: int = -1  # target epoch of the latest target pass in this stage
    best_metric: float = -math.inf
    best_step: int = -1


def split_budget(max_steps: int, shares: list[float]) -> list[int]:
    """Steps per stage: round(share · max_steps) for every stage but the last, which takes the remainder."""
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"stage budget shares must sum to 1 (got {shares})")
    steps = [int(round(share * max_steps)) for share in shares[:-1]]
    return steps + [max_steps - sum(steps)]


def evaluate_split(
    method: Any,
    hp: Any,
    modules: nn.ModuleDict,
    task: tasks.Task,
    files: list[str],
    stage_name: str,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    prefix: str,
) -> dict[str, float]:
    """One pass over a labelled split (this worker's share), metrics reduced over all workers."""
    info = task.info
    matrix = torch.zeros(info.num_classes, info.num_classes, dtype=torch.int64)
    lungs = LungMetrics(info.class_names) if task.lung_metrics else None
    columns = ["image", "label"] + (["spacing_mm"] if lungs else [])
    modes = {name: module.training for name, module in modules.items()}
    modules.eval()
    try:
        with torch.no_grad():
            for batch in eval_batches(files, columns, batch_size, info.num_classes, rank, world_size, task.target_size):
                logits = method.predict(hp, modules, batch["image"].to(device), stage_name)
                label = batch["label"]
                if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
                    logits = nn.functional.interpolate(
                        logits, size=label.shape[-2:], mode="bilinear", align_corners=False
                    )
                prediction = logits.argmax(1).cpu()
                matrix += confusion_matrix(prediction, label, info.num_classes, info.ignore_index)
                if lungs is not None:
                    for index in range(len(prediction)):
                        lungs.add(prediction[index].numpy(), label[index].numpy(), batch["spacing_mm"][index].tolist())
    finally:
        for name, module in modules.items():
            module.train(modes[name])
    matrix = distributed.all_reduce_sum(matrix)
    metrics = segmentation_metrics(matrix, info.class_names, prefix, task.eval_classes, task.class_subsets)
    if lungs is not None:
        metrics.update(lungs.summarise(distributed.all_gather_cat(lungs.tensor()), prefix))
    return metrics


class TrialRunner:
    """One trial of one method on one task (one process; one of `world_size` data-parallel workers)."""

    def __init__(self, spec: TrialSpec, session: Session, logger: RunLogger | None = None):
        self.spec, self.session, self.logger = spec, session, logger
        self.method = methods.get(spec.method)
        self.hp = methods.make_hyperparams(self.method, spec.hyperparams)
        self.task = tasks.get(spec.task)
        self.info = self.task.info
        self.device = session.device
        torch.set_num_threads(max(1, spec.threads))
        torch.manual_seed(spec.seed)
        self.modules = self.method.build(self.hp, self.info)
        if spec.sync_batchnorm:
            self.modules = distributed.sync_batchnorm(self.modules)
        self.modules = self.modules.to(self.device)
        distributed.broadcast_parameters(self.modules)
        self.state: dict[str, Any] = self.method.init_state(self.hp, self.info)
        self.stages = self.method.stages(self.hp)
        self.budgets = split_budget(spec.max_steps, [s.budget_share for s in self.stages])
        self.generator = torch.Generator().manual_seed(spec.seed * 1000 + session.rank)
        self.progress = Progress()
        self.fingerprints = tasks.prepare(self.task, spec.data_root)
        splits = {
            "source_train": self.task.source_train,
            "target_train": self.task.target_train,
            "target_val": self.task.target_val,
        }
        self._files = {name: split_files(spec.data_root, split.dataset, split.split) for name, split in splits.items()}
        self.num_target_train = sum(g.num_rows for g in row_groups(self._files["target_train"]))
        self._loss_window: dict[str, list[float]] = {}
        self._report_window: dict[str, list[float]] = {}
        self.evaluations: list[dict[str, float]] = []

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        self._started = time.perf_counter()
        optimizer_state = self._restore()
        while self.progress.stage_index < len(self.stages):
            self._run_stage(self.stages[self.progress.stage_index], optimizer_state)
            optimizer_state = None
            self.progress.stage_index += 1
            self.progress.stage_step = 0
            self.progress.last_pass_epoch = -1
        if not self.evaluations and self.stages:
            # restored after the last step (the process died between its final report and its exit): evaluate and
            # report once more, so that Tune and the caller get the trial's final metrics
            self._evaluate_and_report(self.stages[-1], {})
        return self.evaluations[-1] if self.evaluations else {}

    def _run_stage(self, stage: Stage, optimizer_state: Mapping[str, Any] | None) -> None:
        steps = self.budgets[self.progress.stage_index]
        self._set_modes(stage)
        optims = dict(stage.optimizers(self.hp, self.modules, steps))
        if optimizer_state:
            for name, optim in optims.items():
                optim.optimizer.load_state_dict(optimizer_state["optimizers"][name])
                if optim.scheduler is not None:
                    optim.scheduler.load_state_dict(optimizer_state["schedulers"][name])
        distributed.synchronise_gradients(optims.values())
        ctx = StepContext(
            hp=self.hp,
            info=self.info,
            modules=self.modules,
            optimizers={n: o.optimizer for n, o in optims.items()},
            state=self.state,
            stage=stage.name,
            stage_step=self.progress.stage_step,
            stage_steps=steps,
            target_epoch=0,
            generator=self.generator,
            device=self.device,
        )
        source, target = self._streams(stage)
        while self.progress.stage_step < steps:
            ctx.stage_step = self.progress.stage_step
            ctx.target_epoch = self._target_epoch()
            self._maybe_target_pass(stage, ctx)
            batch = self._next_batch(source, target)
            losses = stage.step(ctx, batch)
            self._check_finite(losses, stage)
            for optim in optims.values():
                if optim.scheduler is not None:
                    optim.scheduler.step()
            self.progress.stage_step += 1
            self.progress.global_step += 1
            self._record_losses(losses)
            step = self.progress.global_step
            if step % self.spec.log_every == 0:
                averages = self._drain(self._loss_window)  # every rank drains: the mean over workers is collective
                if self.logger:
                    self.logger.log_metrics(averages, step)
            if step % self.spec.eval_every == 0 or self.progress.stage_step == steps:
                self._evaluate_and_report(stage, optims)

    # ------------------------------------------------------------------ data

    def _streams(self, stage: Stage) -> tuple[Iterator[dict], Iterator[dict] | None]:
        batch_size, task = self.hp.batch_size, self.task
        common = {
            "batch_size": batch_size,
            "num_classes": self.info.num_classes,
            "seed": self.spec.seed,
            "rank": self.session.rank,
            "world_size": self.session.world_size,
            "threads": max(1, self.spec.threads),
        }
        policy = lambda size: Policy(
            size=size, hflip=task.hflip, scale_range=task.train_scale_range, crop=task.train_crop
        )
        source = iter(
            TrainStream(
                self._files["source_train"],
                ["image", "label"],
                policy=policy(task.source_size),
                start_sample=self.progress.source_batches * batch_size,
                **common,
            )
        )
        if not stage.uses_target:
            return source, None
        columns = ["image", "image_labels"] if self.info.target_image_labels else ["image"]
        target = iter(
            TrainStream(
                self._files["target_train"],
                columns,
                policy=policy(task.target_size),
                start_sample=self.progress.target_batches * batch_size,
                **common,
            )
        )
        return source, target

    def _next_batch(self, source: Iterator[dict], target: Iterator[dict] | None) -> Batch:
        source_batch = self._on_device(next(source))
        self.progress.source_batches += 1
        target_batch = {}
        if target is not None:
            target_batch = self._on_device(next(target))
            self.progress.target_batches += 1
        return Batch(
            source_image=source_batch["image"],
            source_label=source_batch["label"],
            target_image=target_batch.get("image"),
            target_image_label=target_batch.get("image_labels"),
        )

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stream's uint8 batch → model inputs on this worker's device (converted there: 4x fewer bytes to copy)."""
        return finish({key: value.to(self.device, non_blocking=True) for key, value in batch.items()})

    def _target_epoch(self) -> int:
        consumed = self.progress.stage_step * self.hp.batch_size * self.session.world_size
        return consumed // max(1, self.num_target_train)

    # ------------------------------------------------------------------ target passes

    def _maybe_target_pass(self, stage: Stage, ctx: StepContext) -> None:
        target_pass = stage.target_pass
        if target_pass is None:
            return
        due = self.progress.last_pass_epoch < 0 or (
            target_pass.schedule == "every_epoch" and ctx.target_epoch > self.progress.last_pass_epoch
        )
        if not due:
            return
        columns = ["image", "image_labels"] if self.info.target_image_labels else ["image"]
        gathered: dict[str, list[torch.Tensor]] = {}
        with self._all_eval(), torch.no_grad():
            for batch in eval_batches(
                self._files["target_train"],
                columns,
                self.spec.eval_batch_size,
                self.info.num_classes,
                self.session.rank,
                self.session.world_size,
                self.task.target_size,
            ):
                images = batch["image"].to(self.device)
                labels = batch.get("image_labels")
                out = target_pass.collect(ctx, images, None if labels is None else labels.to(self.device))
                for key, value in out.items():
                    gathered.setdefault(key, []).append(value.detach())
        merged = {key: distributed.all_gather_cat(torch.cat(values)) for key, values in gathered.items()}
        self.state.update(target_pass.update(ctx, merged))
        self.progress.last_pass_epoch = ctx.target_epoch

    # ------------------------------------------------------------------ evaluation, reporting, checkpoints

    def evaluate(self, stage_name: str, split: str = "target_val", prefix: str = "val_target") -> dict[str, float]:
        """Score `method.predict` on a labelled target split at the labels' full resolution."""
        return evaluate_split(
            self.method,
            self.hp,
            self.modules,
            self.task,
            self._files[split],
            stage_name,
            self.spec.eval_batch_size,
            self.session.rank,
            self.session.world_size,
            self.device,
            prefix,
        )

    def _evaluate_and_report(self, stage: Stage, optims: Mapping[str, Optim]) -> None:
        started = time.perf_counter()
        metrics = self.evaluate(stage.name)
        metrics["time/eval_s"] = time.perf_counter() - started
        metrics["time/elapsed_s"] = time.perf_counter() - self._started  # this process's loop, resumes excluded
        step = self.progress.global_step
        improved = metrics[PRIMARY_METRIC] > self.progress.best_metric
        if improved:
            self.progress.best_metric, self.progress.best_step = metrics[PRIMARY_METRIC], step
        metrics.update(self._drain(self._report_window))
        metrics.update(
            {"step": step, "stage_index": self.progress.stage_index, "val_target/best_miou": self.progress.best_metric}
        )
        self.evaluations.append(metrics)
        with tempfile.TemporaryDirectory(prefix="uda-ckpt-") as directory:
            checkpoint_dir = None
            if self.session.rank == 0:
                checkpoints.save_training_state(directory, self._training_state(optims))
                checkpoint_dir = directory
            self.session.report(metrics, checkpoint_dir)
        if self.logger is not None:
            self.logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            meta = self._checkpoint_meta(stage, metrics)
            self.logger.log_checkpoint(checkpoints.LAST, self.modules, meta)
            if improved:
                self.logger.log_checkpoint(checkpoints.BEST, self.modules, meta)
            samples = self.samples(stage.name)
            if samples:
                self.logger.log_images(samples, step)

    def samples(self, stage_name: str, count: int = 4) -> dict[str, torch.Tensor]:
        """`method.samples` on the first `count` target validation images, modules in eval mode."""
        if self.method.samples is None:
            return {}
        batch = next(
            eval_batches(self._files["target_val"], ["image"], count, self.info.num_classes, size=self.task.target_size)
        )
        modes = {name: module.training for name, module in self.modules.items()}
        self.modules.eval()
        try:
            with torch.no_grad():
                return dict(self.method.samples(self.hp, self.modules, batch["image"].to(self.device), stage_name))
        finally:
            for name, module in self.modules.items():
                module.train(modes[name])

    def _checkpoint_meta(self, stage: Stage, metrics: Mapping[str, float]) -> dict[str, Any]:
        return {
            "method": self.spec.method,
            "task": self.spec.task,
            "seed": self.spec.seed,
            "hyperparams": dataclasses.asdict(self.hp),
            "stage": stage.name,
            "step": self.progress.global_step,
            PRIMARY_METRIC: metrics[PRIMARY_METRIC],
            "dataset_fingerprints": self.fingerprints,
            **self.spec.tags,
        }

    def _training_state(self, optims: Mapping[str, Optim]) -> dict[str, Any]:
        return {
            "modules": self.modules.state_dict(),
            "optimizers": {n: o.optimizer.state_dict() for n, o in optims.items()},
            "schedulers": {n: o.scheduler.state_dict() for n, o in optims.items() if o.scheduler is not None},
            "method_state": self.state,
            "progress": dataclasses.asdict(self.progress),
            "generator": self.generator.get_state(),
        }

    def _restore(self) -> dict[str, Any] | None:
        with self.session.resume_dir() as directory:
            if directory is None:
                return None
            saved = checkpoints.load_training_state(directory)
        self.modules.load_state_dict(saved["modules"])
        self.state = dict(saved["method_state"])
        self.progress = Progress(**saved["progress"])
        self.generator.set_state(saved["generator"])
        if self.progress.stage_step >= self.budgets[self.progress.stage_index]:
            # The checkpoint closed its stage: continue with the next one and fresh optimisers.
            self.progress.stage_index += 1
            self.progress.stage_step = 0
            self.progress.last_pass_epoch = -1
            return None
        return saved

    # ------------------------------------------------------------------ helpers

    def _set_modes(self, stage: Stage) -> None:
        unknown = set(stage.trains) - set(self.modules.keys())
        if unknown:
            raise ValueError(
                f"stage {stage.name!r} trains unknown modules {sorted(unknown)}; "
                f"the method builds {sorted(self.modules.keys())}"
            )
        for name, module in self.modules.items():
            trained = name in stage.trains
            module.train(trained)
            module.requires_grad_(trained)

    @contextlib.contextmanager
    def _all_eval(self) -> Iterator[None]:
        modes = {name: module.training for name, module in self.modules.items()}
        self.modules.eval()
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module.train(modes[name])

    def _check_finite(self, losses: Mapping[str, torch.Tensor], stage: Stage) -> None:
        if not losses:
            return
        values = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).detach().reshape(()).cpu() for v in losses.values()]
        )
        if not torch.isfinite(values).all():
            bad = {name: float(v) for name, v in zip(losses, values) if not math.isfinite(float(v))}
            name, value = next(iter(bad.items()))
            raise NonFiniteLossError(
                f"train/{name} became {value} at step {self.progress.global_step + 1} "
                f"(stage {stage.name!r}); the trial stops here"
            )

    def _record_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            value = float(value)
            self._loss_window.setdefault(f"train/{name}", []).append(value)
            self._report_window.setdefault(f"train/{name}", []).append(value)

    def _drain(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Mean of each loss over the window and over all workers (the loss of the global batch, like one worker
        at the global batch size would log it)."""
        names = sorted(name for name, values in window.items() if values)
        local = torch.tensor(
            [sum(window[n]) / len(window[n]) for n in names], dtype=torch.float64, device=self.device
        )  # NCCL reduces CUDA tensors only
        window.clear()
        means = distributed.all_reduce_sum(local) / distributed.world_size()
        return dict(zip(names, means.cpu().tolist()))
