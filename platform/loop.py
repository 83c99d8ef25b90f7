"""The generic training loop: runs any registered method's stages on a task, evaluates, reports, checkpoints.

This is what each trial's worker executes (platform/tuning.py runs it inline in a Tune trial, platform/trainer.py in
every Ray Train worker). It knows nothing about a particular method. Its parts, each doing one thing:

- `open_trial`: what one trial is made of (method, hyperparameters, task with its split sizes, modules, stages and
  their step budgets, data files); builds, trains nothing, talks to no other worker;
- `Progress`: where the trial is (stage, steps, batches drawn, latest target pass, best evaluation), the only state
  that resume needs besides weights, optimisers and the method's state;
- `Optimisers`: each stage's optimisers and schedules, or one set shared by the stages of an `optimizer_scope`;
- `enter_stage`: the one stage set-up (modes, optimisers, the `StepContext`), shared by the loop, the sweep's cost
  probe (`cli.probe_costs`) and the registry's contract test;
- `DataFeed`: the stage's source and target streams as `Batch`es, with the per-sample store's maps aligned;
- `TargetPasses`: passes over the whole target set (gathered outputs for `update`, per-image maps for the store);
- `Evaluator`: `method.predict` on the target validation split, and the images `method.samples` draws on;
- `Reporter`: loss windows, MLflow metrics (one point per key and step), reports and checkpoints;
- `TrialRunner.run`: walks the stages.

It talks to the outside world through two small interfaces: a `Session` (rank, world size, device, `report`, the
checkpoint to resume from: Ray Train, Tune, or a local object in tests and benchmarks) and an optional `RunLogger`
(rank 0 only: MLflow in production).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import methods
from methods.contract import (
    Augmentation,
    Batch,
    Method,
    Optim,
    SampleImages,
    Stage,
    StagePosition,
    StepContext,
    TaskInfo,
    stage_positions,
)
from platform import budgets, checkpoints, distributed, store, tasks
from platform.datasets import split_files
from platform.metrics import LungMetrics, confusion_matrix, segmentation_metrics
from platform.stream import Placement, Policy, TrainStream, decode_sample, eval_batches, finish, first_rows, place_map

PRIMARY_METRIC = "val_target/miou"
PREDICTIONS = "uda/predictions"  # Evaluator.samples' key for the platform's prediction grid (no method's name)
log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the trial fails with this message."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial; plain data so that it travels through Ray as a dict."""

    method: str
    task: str
    hyperparams: Mapping[str, Any]  # overrides of the method's paper defaults, already validated
    seed: int
    max_steps: int | None  # share budgets: the trial's length; absolute budgets: scale to it (None: their length)
    eval_every: int | None  # None: a fifth of the trial's steps
    data_root: str
    log_every: int = 10
    eval_batch_size: int = 16
    threads: int = 1  # torch intra-op threads per worker (= CPUs per worker)
    sync_batchnorm: bool = False  # batch statistics over all workers (GPU workers only; see platform/distributed.py)
    tags: Mapping[str, str] = field(default_factory=dict)  # extra context for checkpoint sidecars; "trial_id" marks
    # the trial's checkpoints, so that a trial restored from another's (PBT's exploit) says whose it took
    tracked_hyperparams: tuple[str, ...] = ()  # logged as hp/<name> at every evaluation (values PBT changes)
    store_root: str | None = None  # the per-sample store's root in the trial's storage (None: a temporary dir)
    precision: str = "fp32"  # fp32 | bf16 | fp16: torch.autocast for steps and predict (StepContext.precision)
    # how many latest checkpoints Ray/Tune keeps (None: all, as under PBT); the per-sample store keeps every version
    # one of them names
    checkpoints_kept: int | None = checkpoints.KEPT
    # --source-val: the fraction of the labelled source training split held out from training (by a hash of each
    # sample id, tasks.held_out) and scored as val_source/* at every evaluation; 0 holds out nothing
    source_val: float = 0.0

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

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


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


# ---------------------------------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Where a trial is; changed only through its methods, saved in every checkpoint."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    source_batches: int = 0  # batches this rank has drawn from each stream (to resume at the same sample)
    target_batches: int = 0
    last_pass_epoch: int = -1  # epoch (of the pass's split) of the latest target pass in this stage
    best_metric: float = -math.inf
    best_step: int = -1
    store_version: str | None = None  # the per-sample store in force in this stage (platform/store.py)

    def drew(self, source: bool, target: bool) -> None:
        self.source_batches += int(source)
        self.target_batches += int(target)

    def stepped(self) -> None:
        self.stage_step += 1
        self.global_step += 1

    def passed(self, epoch: int, version: str | None) -> None:
        self.last_pass_epoch = epoch
        self.store_version = version or self.store_version

    def next_stage(self) -> None:
        self.stage_index += 1
        self.stage_step = 0
        self.last_pass_epoch = -1
        self.store_version = None

    def evaluated(self, metric: float) -> bool:
        """Record an evaluation; True if it is the best so far."""
        if metric > self.best_metric:
            self.best_metric, self.best_step = metric, self.global_step
            return True
        return False


# ---------------------------------------------------------------------------------------------------- the trial


@dataclass
class Trial:
    """What one trial is made of (see `open_trial`)."""

    spec: TrialSpec
    method: Method
    hp: Any
    task: tasks.Task
    info: TaskInfo  # with the split sizes
    modules: nn.ModuleDict
    stages: tuple[Stage, ...]
    positions: list[StagePosition]
    budgets: list[int]  # steps per stage
    files: dict[str, list[str]]  # source_train (every source split), source_val (the labelled one), target_*
    fingerprints: dict[str, str]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    scaler: Any = None  # StepScaler (a torch.amp.GradScaler) under fp16
    source_holdout: tuple[int, ...] = ()  # rows of files["source_val"] never trained on, scored as val_source/*

    @property
    def total_steps(self) -> int:
        return sum(self.budgets)

    @property
    def eval_every(self) -> int:
        return self.spec.eval_every or max(1, self.total_steps // 5)


def open_trial(spec: TrialSpec, device: torch.device, rank: int = 0, world_size: int = 1) -> Trial:
    """Resolve the method and task, check the data, build the modules on `device` and plan the stage budgets."""
    method = methods.get(spec.method)
    hp = methods.make_hyperparams(method, spec.hyperparams)
    task = tasks.get(spec.task)
    fingerprints = tasks.prepare(task, spec.data_root)
    info = tasks.runtime_info(task, spec.data_root, spec.source_val)
    holdout = tasks.source_validation_rows(task, spec.data_root, spec.source_val)
    torch.manual_seed(spec.seed)  # module initialisation
    modules = method.build(hp, info)
    if spec.sync_batchnorm:
        modules = distributed.sync_batchnorm(modules)
    stages = tuple(method.stages(hp))
    steps = budgets.stage_steps(stages, info, hp.batch_size, world_size, spec.max_steps)
    files = {
        "source_train": [f for s in task.source_splits for f in split_files(spec.data_root, s.dataset, s.split)],
        "target_train": split_files(spec.data_root, task.target_train.dataset, task.target_train.split),
        "target_val": split_files(spec.data_root, task.target_val.dataset, task.target_val.split),
        # the first of the source splits, so that its row indices are those of source_train
        "source_val": split_files(spec.data_root, task.source_train.dataset, task.source_train.split),
    }
    if spec.precision not in ("fp32", *PRECISIONS):
        raise ValueError(f"precision must be fp32, bf16 or fp16 (got {spec.precision!r})")
    scaler = StepScaler(device.type) if spec.precision == "fp16" else None
    return Trial(
        spec,
        method,
        hp,
        task,
        info,
        modules.to(device),
        stages,
        stage_positions(stages),
        steps,
        files,
        fingerprints,
        device,
        rank,
        world_size,
        scaler,
        holdout,
    )


class StepScaler(torch.amp.GradScaler):
    """fp16's gradient scaler, updated once at the end of each train step (the loop's call), with the scale fixed
    within the step. GradScaler allows one step per optimiser between two updates; a method's step may update one
    optimiser several times (CSCL's Alg. 2 steps E on line 4 and again on line 6), so a second step of an optimiser
    starts that optimiser's bookkeeping afresh and carries its earlier inf/NaN finding to the step's update (an
    overflow anywhere in the step still backs the scale off). The update is skipped after a step that stepped
    nothing through the scaler (GradScaler cannot update without a step; e.g. every optimiser of the step
    received no gradient). Uses GradScaler's per-optimiser state (torch.amp.grad_scaler, torch 2.13)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stepped = False
        self._carried: list[torch.Tensor] = []  # inf/NaN findings of optimisers stepped again within this step

    def step(self, optimizer, *args, **kwargs):
        from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            self._carried.extend(state["found_inf_per_device"].values())
            self._per_optimizer_states[id(optimizer)] = _refresh_per_optimizer_state()
        self.stepped = True
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None) -> None:
        from torch.amp.grad_scaler import OptState

        if self.stepped:
            for index, found_inf in enumerate(self._carried):  # keyed apart from every optimiser's id
                self._per_optimizer_states[-1 - index] = {
                    "stage": OptState.STEPPED,
                    "found_inf_per_device": {found_inf.device: found_inf},
                }
            super().update(new_scale)
        self.stepped, self._carried = False, []


def set_modes(modules: nn.ModuleDict, stage: Stage) -> None:
    """The stage's modules train; every other one is in eval mode with gradients off for the whole stage."""
    unknown = set(stage.trains) - set(modules.keys())
    if unknown:
        raise ValueError(
            f"stage {stage.name!r} trains unknown modules {sorted(unknown)}; the method builds {sorted(modules.keys())}"
        )
    for name, module in modules.items():
        trained = name in stage.trains
        module.train(trained)
        module.requires_grad_(trained)


@contextlib.contextmanager
def all_eval(modules: nn.ModuleDict) -> Iterator[None]:
    """Every module in eval mode inside the block, without gradients; modes restored after."""
    modes = {name: module.training for name, module in modules.items()}
    modules.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for name, module in modules.items():
            module.train(modes[name])


# ---------------------------------------------------------------------------------------------------- optimisers


class Optimisers:
    """Each stage's optimisers, built when the stage begins; stages of one `optimizer_scope` share theirs."""

    def __init__(self, trial: Trial):
        self.trial = trial
        self.current: dict[str, Optim] = {}
        self.scopes: dict[str, dict[str, Optim]] = {}
        self._saved_scopes: dict[str, Any] = {}

    def for_stage(self, index: int, saved: Mapping[str, Any] | None = None) -> dict[str, Optim]:
        """The optimisers of stage `index` (state from `saved`, a checkpoint's, when resuming inside it)."""
        trial, stage = self.trial, self.trial.stages[index]
        scope = stage.optimizer_scope
        if scope is not None and scope in self.scopes:
            self.current = self.scopes[scope]
            return self.current
        steps = trial.budgets[index]
        if scope is not None:
            steps = sum(b for s, b in zip(trial.stages, trial.budgets) if s.optimizer_scope == scope)
        built = dict(stage.optimizers(trial.hp, trial.modules, steps))
        distributed.synchronise_gradients(built.values())
        state = self._saved_scopes.pop(scope, None) if scope is not None else saved
        if state:
            _load(built, state)
        if scope is not None:
            self.scopes[scope] = built
        self.current = built
        return built

    def step_schedules(self) -> None:
        for optim in self.current.values():
            if optim.scheduler is not None:
                optim.scheduler.step()

    def state_dict(self, stage: Stage) -> dict[str, Any]:
        scoped = stage.optimizer_scope is not None
        return {
            "current": {} if scoped else _state(self.current),
            "scopes": {scope: _state(optims) for scope, optims in self.scopes.items()},
        }

    def restore_scopes(self, saved: Mapping[str, Any]) -> None:
        self._saved_scopes = dict(saved.get("scopes", {}))


def _state(optims: Mapping[str, Optim]) -> dict[str, Any]:
    return {
        "optimizers": {n: o.optimizer.state_dict() for n, o in optims.items()},
        "schedulers": {n: o.scheduler.state_dict() for n, o in optims.items() if o.scheduler is not None},
    }


def _load(optims: Mapping[str, Optim], state: Mapping[str, Any]) -> None:
    """Continue saved optimisers and schedules. The learning rates the factory just built from the trial's
    hyperparameters win over the saved ones: where they differ (PBT perturbed them before restoring another trial's
    checkpoint), every group's rate is rescaled by new ÷ saved base rate, so the schedule continues from its step
    with the new rate; where they are equal nothing changes."""
    for name, optim in optims.items():
        groups = optim.optimizer.param_groups
        fresh = list(optim.scheduler.base_lrs) if optim.scheduler is not None else [g["lr"] for g in groups]
        optim.optimizer.load_state_dict(state["optimizers"][name])
        if optim.scheduler is not None:
            optim.scheduler.load_state_dict(state["schedulers"][name])
            saved = list(optim.scheduler.base_lrs)
            optim.scheduler.base_lrs = fresh
        else:
            saved = [group["lr"] for group in optim.optimizer.param_groups]
        for group, new, old in zip(optim.optimizer.param_groups, fresh, saved):
            if new != old:
                group["lr"] *= new / old
                group["initial_lr"] = new


# ---------------------------------------------------------------------------------------------------- stages


@dataclass
class EnteredStage:
    stage: Stage
    position: StagePosition
    steps: int
    optims: dict[str, Optim]
    ctx: StepContext


def enter_stage(
    trial: Trial,
    index: int,
    optimisers: Optimisers,
    state: dict[str, Any],
    generator: torch.Generator,
    saved_optimisers: Mapping[str, Any] | None = None,
) -> EnteredStage:
    """Set the stage's modes, build (or continue) its optimisers and make its StepContext."""
    stage, position = trial.stages[index], trial.positions[index]
    set_modes(trial.modules, stage)
    optims = optimisers.for_stage(index, saved_optimisers)
    ctx = StepContext(
        hp=trial.hp,
        info=trial.info,
        modules=trial.modules,
        optimizers={name: optim.optimizer for name, optim in optims.items()},
        state=state,
        stage=stage.name,
        stage_step=0,
        stage_steps=trial.budgets[index],
        target_epoch=0,
        generator=generator,
        device=trial.device,
        stage_index=index,
        round=position.round,
        all_reduce_mean=distributed.all_reduce_mean,
        all_reduce_sum=distributed.all_reduce_sum,
        precision=trial.spec.precision,
        scaler=trial.scaler,
    )
    return EnteredStage(stage, position, trial.budgets[index], optims, ctx)


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(trial: Trial) -> contextlib.AbstractContextManager:
    """The trial's precision for steps and predict: torch.autocast in bf16/fp16, nothing in fp32."""
    return _autocast(trial.device, trial.spec.precision)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def start_stage(entered: EnteredStage) -> None:
    """`Stage.on_start` (once, when the stage begins): every module in eval mode, no gradients."""
    if entered.stage.on_start is None:
        return
    with all_eval(entered.ctx.modules):
        update = entered.stage.on_start(entered.ctx)
    entered.ctx.state.update(update or {})


def epochs_consumed(trial: Trial, stage_step: int) -> tuple[int, int]:
    """(source, target) epochs this stage has consumed after `stage_step` steps (every worker draws a batch)."""
    consumed = stage_step * trial.hp.batch_size * trial.world_size
    return consumed // max(1, trial.info.source_train_size), consumed // max(1, trial.info.target_train_size)


# ---------------------------------------------------------------------------------------------------- data


class DataFeed:
    """The stage's training batches: source (and target) streams from where `progress` says this rank is."""

    def __init__(self, trial: Trial, stage: Stage, progress: Progress):
        self.trial, self.progress = trial, progress
        info, task, batch_size = trial.info, trial.task, trial.hp.batch_size
        common = {
            "batch_size": batch_size,
            "num_classes": info.num_classes,
            "seed": trial.spec.seed,
            "rank": trial.rank,
            "world_size": trial.world_size,
            "threads": max(1, trial.spec.threads),
        }
        self.target_policy = Policy(task.target_size, task.hflip, task.train_scale_range, task.train_crop)
        source_policy = Policy(task.source_size, task.hflip, task.train_scale_range, task.train_crop)
        columns = ["image", "label"] + (["image_labels"] if info.source_image_labels else [])
        self.source = iter(
            TrainStream(
                trial.files["source_train"],
                columns,
                policy=source_policy,
                start_sample=progress.source_batches * batch_size,
                exclude=trial.source_holdout,
                **common,
            )
        )
        self.target = None
        if stage.uses_target:
            columns = ["image"] + (["image_labels"] if info.target_image_labels else [])
            self.target = iter(
                TrainStream(
                    trial.files["target_train"],
                    columns,
                    policy=self.target_policy,
                    start_sample=progress.target_batches * batch_size,
                    **common,
                )
            )

    def next_batch(self, extras: store.SampleStore | None, specs: Mapping[str, Any]) -> Batch:
        source = self._on_device(next(self.source))
        target = self._on_device(next(self.target)) if self.target is not None else {}
        self.progress.drew(True, self.target is not None)
        maps = {}
        if extras is not None and target:
            maps = {name: self._placed(extras, name, spec, target) for name, spec in specs.items()}
        return Batch(
            source_image=source["image"],
            source_label=source["label"],
            target_image=target.get("image"),
            target_image_label=target.get("image_labels"),
            source_image_label=source.get("image_labels"),
            source_index=source["index"],
            target_index=target.get("index"),
            source_augmentation=_augmentation(source),
            target_augmentation=_augmentation(target) if target else None,
            target_extras=maps,
        )

    def _placed(self, extras: store.SampleStore, name: str, spec: Any, target: dict) -> torch.Tensor:
        """The stored maps of the batch's target rows, placed like their images (Batch.target_extras)."""
        out = []
        arrays = extras.read(name, target["index"].tolist())
        for row, array in enumerate(arrays):
            placement = Placement(
                tuple(target["aug_size"][row].tolist()),
                tuple(target["aug_crop"][row].tolist()),
                bool(target["aug_flip"][row]),
            )
            out.append(place_map(torch.from_numpy(array.copy()), placement, spec.interpolation, spec.fill))
        return torch.stack(out).to(self.trial.device)

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stream's uint8 batch → model inputs on this worker's device (converted there: 4x fewer bytes to copy)."""
        return finish({key: value.to(self.trial.device, non_blocking=True) for key, value in batch.items()})


def _augmentation(batch: Mapping[str, torch.Tensor]) -> Augmentation:
    return Augmentation(
        size=batch["aug_size"], scale=batch["aug_scale"], crop=batch["aug_crop"], flip=batch["aug_flip"]
    )


# ---------------------------------------------------------------------------------------------------- target passes


class TargetPasses:
    """Runs a stage's `TargetPass` when it is due and keeps the per-sample store it writes."""

    def __init__(self, trial: Trial, store_root: str):
        self.trial, self.store_root = trial, store_root
        self.extras: store.SampleStore | None = None
        kept = trial.spec.checkpoints_kept
        self._named: collections.deque[str | None] | None = None if kept is None else collections.deque(maxlen=kept)

    def specs(self, stage: Stage) -> Mapping[str, Any]:
        return stage.target_pass.store if stage.target_pass is not None else {}

    def reopen(self, stage: Stage, progress: Progress) -> bool:
        """After a restore: open the store version the checkpoint names; False if it must be computed again."""
        self.extras = None
        self.checkpointed(progress.store_version, prune=False)  # the checkpoint restored from is still kept
        if not self.specs(stage) or progress.store_version is None:
            return True
        found = torch.tensor([float(store.exists(self.store_root, progress.store_version))])
        if distributed.all_reduce_sum(found).item() == self.trial.world_size:  # every rank, or none, runs the pass
            self.extras = store.SampleStore(self.store_root, progress.store_version, self.specs(stage))
            return True
        log.warning(
            "per-sample store %s is gone: the target pass runs again with the restored model", progress.store_version
        )
        return False

    def checkpointed(self, version: str | None, prune: bool = True) -> None:
        """A checkpoint naming `version` was reported (or restored): delete the versions that neither a kept
        checkpoint names nor the stage uses (with every checkpoint kept, as under PBT, nothing)."""
        if self._named is None:
            return
        self._named.append(version)
        if prune:
            keep = {name for name in self._named if name} | ({self.extras.version} if self.extras else set())
            store.prune(self.store_root, keep, in_store=self.trial.rank == 0)

    def due(self, stage: Stage, ctx: StepContext, progress: Progress) -> bool:
        target_pass = stage.target_pass
        if target_pass is None:
            return False
        epoch = ctx.source_epoch if target_pass.every == "source" else ctx.target_epoch
        return progress.last_pass_epoch < 0 or (
            target_pass.schedule == "every_epoch" and epoch > progress.last_pass_epoch
        )

    def run(self, stage: Stage, ctx: StepContext, progress: Progress) -> None:
        """One pass over the whole target set: gathered outputs → `update` → state; stored maps → a new version."""
        trial, target_pass = self.trial, stage.target_pass
        specs = self.specs(stage)
        version = store.version_name(progress.global_step, ctx.stage_index) if specs else None
        writer = store.StoreWriter(self.store_root, version, specs, trial.rank) if specs else None
        gathered: dict[str, list[torch.Tensor]] = {}
        columns = ["image"] + (["image_labels"] if trial.info.target_image_labels else [])
        with all_eval(trial.modules):
            for batch in eval_batches(
                trial.files["target_train"],
                columns,
                trial.spec.eval_batch_size,
                trial.info.num_classes,
                trial.rank,
                trial.world_size,
                trial.task.target_size,
            ):
                images = batch["image"].to(trial.device)
                labels = batch.get("image_labels")
                out = target_pass.collect(ctx, images, None if labels is None else labels.to(trial.device))
                for key, value in out.items():
                    if key in specs:
                        _check_map(key, value, images)
                        writer.add(key, batch["index"], value)
                    else:
                        gathered.setdefault(key, []).append(value.detach())
        if writer is not None:
            self._publish(writer, specs)
        merged = {key: distributed.all_gather_cat(torch.cat(values)) for key, values in gathered.items()}
        if target_pass.update is not None:
            ctx.state.update(target_pass.update(ctx, merged))
        epoch = ctx.source_epoch if target_pass.every == "source" else ctx.target_epoch
        progress.passed(epoch, version)

    def _publish(self, writer: store.StoreWriter, specs: Mapping[str, Any]) -> None:
        writer.close()
        distributed.barrier()
        if self.trial.rank == 0:
            store.mark_complete(self.store_root, writer.version, specs, self.trial.world_size)
        distributed.barrier()
        self.extras = store.SampleStore(self.store_root, writer.version, specs)


def _check_map(key: str, value: torch.Tensor, images: torch.Tensor) -> None:
    if tuple(value.shape[-2:]) != tuple(images.shape[-2:]) or value.shape[0] != images.shape[0]:
        raise ValueError(
            f"target pass output {key!r} has shape {tuple(value.shape)}; a stored map must cover its "
            f"images: (B, ..., H, W) = ({images.shape[0]}, ..., {images.shape[-2]}, {images.shape[-1]})"
        )


# ---------------------------------------------------------------------------------------------------- evaluation


def evaluate_split(
    method: Any,
    hp: Any,
    modules: nn.ModuleDict,
    task: tasks.Task,
    files: list[str],
    stage: StagePosition,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    prefix: str,
    precision: str = "fp32",
    rows: tuple[int, ...] | None = None,
    size: tuple[int, int] | None | str = "target",
) -> dict[str, float]:
    """One pass over a labelled split (this worker's share; only `rows` where given), metrics reduced over all
    workers; images segmented at `size` ("target": the task's target size); `predict` runs under the trial's
    precision (autocast for bf16/fp16), its logits are scored in float32."""
    info = task.info
    size = task.target_size if size == "target" else size
    matrix = torch.zeros(info.num_classes, info.num_classes, dtype=torch.int64)
    lungs = LungMetrics(info.class_names) if task.lung_metrics else None
    columns = ["image", "label"] + (["spacing_mm"] if lungs else [])
    with all_eval(modules):
        for batch in eval_batches(files, columns, batch_size, info.num_classes, rank, world_size, size, rows):
            with _autocast(device, precision):
                logits = method.predict(hp, modules, batch["image"].to(device), stage).float()
            label = batch["label"]
            if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
                logits = nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
            prediction = logits.argmax(1).cpu()
            matrix += confusion_matrix(prediction, label, info.num_classes, info.ignore_index)
            if lungs is not None:
                for index in range(len(prediction)):
                    lungs.add(prediction[index].numpy(), label[index].numpy(), batch["spacing_mm"][index].tolist())
    matrix = distributed.all_reduce_sum(matrix)
    metrics = segmentation_metrics(matrix, info.class_names, prefix, task.eval_classes, task.class_subsets)
    if lungs is not None:
        metrics.update(lungs.summarise(distributed.all_gather_cat(lungs.tensor()), prefix))
    return metrics


class Evaluator:
    """Scores the trial on the target validation split (and the source-validation slice); gives `method.samples`
    its fixed images."""

    def __init__(self, trial: Trial, sample_count: int = 4):
        self.trial, self.sample_count = trial, sample_count
        self._sample_images: SampleImages | None = None
        self._labelled: dict[str, torch.Tensor] | None = None  # the prediction grid's images and labels

    def evaluate(self, position: StagePosition) -> dict:
        """Target validation as `val_target/*`; with a source-validation slice (`--source-val`) also that slice,
        segmented at the source training size, as `val_source/*` (what the report's source-val rule selects by)."""
        trial = self.trial
        common = (trial.spec.eval_batch_size, trial.rank, trial.world_size, trial.device)
        model = (trial.method, trial.hp, trial.modules, trial.task)
        metrics = evaluate_split(
            *model, trial.files["target_val"], position, *common, "val_target", trial.spec.precision
        )
        if trial.source_holdout:
            metrics.update(
                evaluate_split(
                    *model,
                    trial.files["source_val"],
                    position,
                    *common,
                    "val_source",
                    trial.spec.precision,
                    rows=trial.source_holdout,
                    size=trial.task.source_size,
                )
            )
        return metrics

    def samples(self, position: StagePosition) -> dict[str, torch.Tensor]:
        """`method.samples` on the first target validation and source training images, modules in eval mode, and
        under `PREDICTIONS` the platform's grid for every method: those target images | `method.predict` | ground
        truth in the task's colours, (H, W, 3) uint8 (the Reporter logs it apart from the method's own)."""
        trial = self.trial
        out: dict[str, torch.Tensor] = {}
        with all_eval(trial.modules):
            if trial.method.samples is not None:
                out.update(trial.method.samples(trial.hp, trial.modules, self.sample_images(), position))
            out[PREDICTIONS] = self._prediction_grid(position)
        return out

    def _prediction_grid(self, position: StagePosition) -> torch.Tensor:
        from platform.tracking import label_palette, prediction_grid

        trial = self.trial
        if self._labelled is None:
            columns, count, size = ["image", "label"], self.sample_count, trial.task.target_size
            self._labelled = next(
                eval_batches(trial.files["target_val"], columns, count, trial.info.num_classes, size=size)
            )
        images, labels = self._labelled["image"].to(trial.device), self._labelled["label"]
        logits = trial.method.predict(trial.hp, trial.modules, images, position)
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        grid = prediction_grid(images, logits.argmax(1).cpu(), labels, label_palette(trial.info.class_names))
        return torch.from_numpy(grid)

    def sample_images(self) -> SampleImages:
        if self._sample_images is None:
            trial, count = self.trial, self.sample_count
            target = next(
                eval_batches(
                    trial.files["target_val"], ["image"], count, trial.info.num_classes, size=trial.task.target_size
                )
            )["image"]
            source = [
                decode_sample(row, trial.info.num_classes, trial.task.source_size, flip=False)["image"]
                for row in first_rows(trial.files["source_train"], ["image"], count, skip=trial.source_holdout)
            ]
            self._sample_images = SampleImages(
                target=target.to(trial.device), source=torch.stack(source).to(trial.device)
            )
        return self._sample_images


# ---------------------------------------------------------------------------------------------------- reporting


class Reporter:
    """Loss windows, MLflow metrics, Tune/Train reports and checkpoints (rank 0 writes; every rank reduces)."""

    def __init__(self, trial: Trial, session: Session, logger: RunLogger | None):
        self.trial, self.session, self.logger = trial, session, logger
        self._log_window: dict[str, list[float]] = {}  # → MLflow every log_every steps (and at evaluations)
        self._report_window: dict[str, list[float]] = {}  # → the report at each evaluation (Tune, schedulers)
        self.evaluations: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def check_finite(self, losses: Mapping[str, torch.Tensor], stage: Stage, step: int) -> None:
        if not losses:
            return
        values = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).detach().reshape(()).cpu() for v in losses.values()]
        )
        local = not bool(torch.isfinite(values).all())
        # every worker stops at the same step (one raising alone would leave the others in the next all-reduce)
        if distributed.all_reduce_sum(torch.tensor([float(local)])).item() > 0:
            if not local:
                raise NonFiniteLossError(f"a loss of another worker became non-finite at step {step}; the trial stops")
            name, value = next((n, float(v)) for n, v in zip(losses, values) if not math.isfinite(float(v)))
            raise NonFiniteLossError(
                f"train/{name} became {value} at step {step} (stage {stage.name!r}); the trial stops here"
            )

    def losses(self, losses: Mapping[str, torch.Tensor], step: int) -> None:
        for name, value in losses.items():
            value = float(value)
            self._log_window.setdefault(f"train/{name}", []).append(value)
            self._report_window.setdefault(f"train/{name}", []).append(value)
        if step % self.trial.spec.log_every == 0:
            self._log_losses(step)

    def _log_losses(self, step: int) -> None:
        averages = self._drain(self._log_window)  # every rank drains: the mean over workers is collective
        if self.logger and averages:
            self.logger.log_metrics(averages, step)

    def evaluation(
        self,
        metrics: dict[str, float],
        progress: Progress,
        position: StagePosition,
        training_state: Mapping[str, Any],
        samples: Mapping[str, torch.Tensor],
    ) -> None:
        """Report an evaluation with its checkpoint; rank 0 logs metrics, both weights files and the samples."""
        step = progress.global_step
        improved = progress.evaluated(metrics[PRIMARY_METRIC])
        metrics["time/elapsed_s"] = time.perf_counter() - self.started  # this process's loop, resumes excluded
        self._log_losses(step)  # what the log window holds since its last point: one MLflow point per key and step
        logged = dict(metrics)
        metrics.update(self._drain(self._report_window))
        metrics.update(
            {"step": step, "stage_index": progress.stage_index, "val_target/best_miou": progress.best_metric}
        )
        logged.update({"stage_index": progress.stage_index, "val_target/best_miou": progress.best_metric})
        logged.update(
            {f"hp/{name}": float(getattr(self.trial.hp, name)) for name in self.trial.spec.tracked_hyperparams}
        )
        self.evaluations.append(metrics)
        # MLflow first: Tune may stop the trial inside `report` (ASHA, PBT's exploit), and what follows never runs
        if self.logger is not None:
            self.logger.log_metrics(logged, step)
            meta = self._checkpoint_meta(position, metrics, step)
            self.logger.log_checkpoint(checkpoints.LAST, self.trial.modules, meta)
            if improved:
                self.logger.log_checkpoint(checkpoints.BEST, self.trial.modules, meta)
            own = {name: batch for name, batch in samples.items() if name != PREDICTIONS}
            if own:
                self.logger.log_images(own, step)
            if PREDICTIONS in samples and hasattr(self.logger, "log_predictions"):
                self.logger.log_predictions(samples[PREDICTIONS].numpy(), step)
        with tempfile.TemporaryDirectory(prefix="uda-ckpt-") as directory:
            checkpoint_dir = None
            if self.session.rank == 0:
                checkpoints.save_training_state(directory, training_state)
                checkpoint_dir = directory
            self.session.report(metrics, checkpoint_dir)

    def _checkpoint_meta(self, position: StagePosition, metrics: Mapping[str, float], step: int) -> dict[str, Any]:
        trial = self.trial
        return {
            "method": trial.spec.method,
            "task": trial.spec.task,
            "seed": trial.spec.seed,
            "hyperparams": dataclasses.asdict(trial.hp),
            "stage": position.name,
            "stage_index": position.index,
            "round": position.round,
            "step": step,
            PRIMARY_METRIC: metrics[PRIMARY_METRIC],
            "dataset_fingerprints": trial.fingerprints,
            **trial.spec.tags,
        }

    def _drain(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Mean of each loss over the window and over all workers (the loss of the global batch, like one worker
        at the global batch size would log it)."""
        names = sorted(name for name, values in window.items() if values)
        local = torch.tensor(
            [sum(window[n]) / len(window[n]) for n in names], dtype=torch.float64, device=self.trial.device
        )  # NCCL reduces CUDA tensors only
        window.clear()
        means = distributed.all_reduce_sum(local) / distributed.world_size()
        return dict(zip(names, means.cpu().tolist()))


# ---------------------------------------------------------------------------------------------------- the runner


class TrialRunner:
    """One trial of one method on one task (one process; one of `world_size` data-parallel workers)."""

    def __init__(self, spec: TrialSpec, session: Session, logger: RunLogger | None = None):
        self.spec, self.session, self.logger = spec, session, logger
        self.trial = open_trial(spec, session.device, session.rank, session.world_size)
        self.state: dict[str, Any] = self.trial.method.init_state(self.trial.hp, self.trial.info)
        self.generator = torch.Generator().manual_seed(spec.seed * 1000 + session.rank)
        self.progress = Progress()
        self.optimisers = Optimisers(self.trial)
        self.evaluator = Evaluator(self.trial)
        self.reporter = Reporter(self.trial, session, logger)
        self.passes: TargetPasses | None = None  # while `run` runs

    # the names tests and tools read
    @property
    def method(self) -> Method:
        return self.trial.method

    @property
    def hp(self) -> Any:
        return self.trial.hp

    @property
    def modules(self) -> nn.ModuleDict:
        return self.trial.modules

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.trial.stages

    @stages.setter
    def stages(self, value: tuple[Stage, ...]) -> None:
        self.trial.stages = tuple(value)
        self.trial.positions = stage_positions(self.trial.stages)

    @property
    def evaluations(self) -> list[dict[str, float]]:
        return self.reporter.evaluations

    def run(self) -> dict[str, float]:
        torch.set_num_threads(max(1, self.spec.threads))
        distributed.broadcast_parameters(self.trial.modules)
        with self._store_root() as root:
            self.passes = passes = TargetPasses(self.trial, root)
            saved = self._restore(passes)
            while self.progress.stage_index < len(self.trial.stages):
                self._run_stage(passes, saved)
                saved = None
                self.progress.next_stage()
            if not self.evaluations and self.trial.stages:
                # restored after the last step (the process died between its final report and its exit): evaluate
                # and report once more, so that Tune and the caller get the trial's final metrics
                self._evaluate(
                    enter_stage(self.trial, len(self.trial.stages) - 1, self.optimisers, self.state, self.generator)
                )
        return self.evaluations[-1] if self.evaluations else {}

    def _run_stage(self, passes: TargetPasses, saved: Mapping[str, Any] | None) -> None:
        index = self.progress.stage_index
        entered = enter_stage(
            self.trial, index, self.optimisers, self.state, self.generator, saved.get("current") if saved else None
        )
        if self.progress.stage_step == 0:
            passes.extras = None  # a new stage: no maps until its own first pass
            start_stage(entered)
        elif not passes.reopen(entered.stage, self.progress):
            self.progress.last_pass_epoch = -1
        feed, ctx, stage = DataFeed(self.trial, entered.stage, self.progress), entered.ctx, entered.stage
        while self.progress.stage_step < entered.steps:
            ctx.stage_step = self.progress.stage_step
            ctx.source_epoch, ctx.target_epoch = epochs_consumed(self.trial, ctx.stage_step)
            if passes.due(stage, ctx, self.progress):
                passes.run(stage, ctx, self.progress)
            batch = feed.next_batch(passes.extras, passes.specs(stage))
            with autocast(self.trial):
                losses = stage.step(ctx, batch)
            if self.trial.scaler is not None:
                self.trial.scaler.update()
            self.reporter.check_finite(losses, stage, self.progress.global_step + 1)
            self.optimisers.step_schedules()
            self.progress.stepped()
            self.reporter.losses(losses, self.progress.global_step)
            if self.progress.global_step % self.trial.eval_every == 0 or self.progress.stage_step == entered.steps:
                self._evaluate(entered)

    def _evaluate(self, entered: EnteredStage) -> None:
        started = time.perf_counter()
        metrics = self.evaluator.evaluate(entered.position)
        metrics["time/eval_s"] = time.perf_counter() - started
        samples = self.evaluator.samples(entered.position) if self.logger is not None else {}
        self.reporter.evaluation(metrics, self.progress, entered.position, self._training_state(entered.stage), samples)
        if self.passes is not None:
            self.passes.checkpointed(self.progress.store_version)

    def _training_state(self, stage: Stage) -> dict[str, Any]:
        return {
            "modules": self.trial.modules.state_dict(),
            "optimisers": self.optimisers.state_dict(stage),
            "method_state": self.state,
            "progress": dataclasses.asdict(self.progress),
            "generator": self.generator.get_state(),
            "trial_id": self.spec.tags.get("trial_id", ""),
            "scaler": self.trial.scaler.state_dict() if self.trial.scaler is not None else {},
        }

    def _restore(self, passes: TargetPasses) -> dict[str, Any] | None:
        """Continue from the session's checkpoint, if any; returns the optimiser state of the stage it was in."""
        with self.session.resume_dir() as directory:
            if directory is None:
                return None
            saved = checkpoints.load_training_state(directory)
        self.trial.modules.load_state_dict(saved["modules"])
        self.state = dict(saved["method_state"])
        self.progress = Progress(**saved["progress"])
        self.generator.set_state(saved["generator"])
        self.optimisers.restore_scopes(saved["optimisers"])
        if self.trial.scaler is not None and saved.get("scaler"):
            self.trial.scaler.load_state_dict(saved["scaler"])
        donor = saved.get("trial_id", "")
        if donor and donor != self.spec.tags.get("trial_id", donor) and self.logger is not None:
            # PBT's exploit: this trial continues from another trial's checkpoint, with its own hyperparameters
            self.logger.set_tags({f"uda.pbt.exploit.step-{self.progress.global_step:08d}": donor})
        if self.progress.stage_step >= self.trial.budgets[self.progress.stage_index]:
            self.progress.next_stage()  # the checkpoint closed its stage: continue with the next one
            return None
        return saved["optimisers"]

    @contextlib.contextmanager
    def _store_root(self) -> Iterator[str]:
        if self.spec.store_root:
            yield self.spec.store_root
            return
        directory = tempfile.mkdtemp(prefix="uda-store-")
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
