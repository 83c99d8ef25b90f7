"""The method contract: what every registered UDA method provides to the platform.

A method is data plus pure functions over torch objects. It never imports Ray, MLflow or pyarrow; the platform
(`platform/`) owns processes, data streams, distributed synchronisation, evaluation, checkpoints and tracking.

The shapes of the five papers this contract has to hold (see ../shared/papers/README.md):

- **Multi-stage training with different modules and optimisers per stage.** SeUDA trains a segmenter, then GANs with
  the segmenter frozen; CIRN trains a CycleGAN, then the adaptation network, then self-trains. A method therefore
  returns a sequence of `Stage`s; each names the modules it trains (`Stage.trains`) and builds its own optimisers.
  The platform puts exactly those modules in train mode and every other module in eval mode with gradients off, so a
  frozen module's parameters and batch-norm statistics cannot move while gradients still flow *through* it.
- **Alternating modules** (TD/TF alternate until convergence): stages may repeat, `Method.stages(hp)` returns as
  many as the hyperparameters ask for.
- **Periodic passes over the whole target training set between steps** (class-wise thresholds of CSCL Alg. 1 and
  SLRT Alg. 1, pseudo labels of CIRN stage 3): `Stage.target_pass`. The platform feeds every target training image
  once, in eval mode without gradients, gathers what `collect` returns over the whole set and every worker, and merges
  what `update` returns into the method's state.
- **Image-level labels on target images** (SLRT): `Batch.target_image_label`, present only when the task defines
  them (`TaskInfo.target_image_labels`). Target pixel labels never reach a method during training.
- **Inference through a translator** (SeUDA segments target images after mapping them to the source style):
  `Method.predict` is the method's own inference path and knows which stage the model is in.

Everything a method carries between steps (thresholds, centroid histories, image pools, Lagrange multipliers) lives
in `StepContext.state`, a dict of tensors, numbers, strings and lists/dicts of them, so that the platform can
checkpoint it with `torch.save` and restore it with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

Hyperparams = Any  # each method's own frozen dataclass; typed per method module

# A Hyperparams field annotated `WeightsFile` names a weights file on disk (e.g. torchvision ImageNet weights).
# The platform checks before any trial starts that a non-empty value exists and fits the modules, and clears such
# fields when it rebuilds modules from an adapted checkpoint (the checkpoint already holds every weight).
WEIGHTS_FILE = "weights file"
WeightsFile = Annotated[str, WEIGHTS_FILE]


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about a task when it builds its modules and computes its losses."""

    num_classes: int
    in_channels: int  # 3 for RGB scenes and endoscopy, 1 for chest X-rays
    class_names: tuple[str, ...]
    ignore_index: int = 255
    target_image_labels: bool = False  # the target training stream carries image-level labels (SLRT's setting)


@dataclass(frozen=True)
class Batch:
    """One training batch: labelled source images and unlabelled target images.

    Shapes: images (B, C, H, W) float32 in [0, 1]; `source_label` (B, H, W) int64 with `ignore_index` where unlabelled;
    `target_image` is None in stages that declare `uses_target=False`; `target_image_label` (B, K) float32 in {0, 1},
    1 where class k is present in the image, or None.
    Normalisation (ImageNet statistics, [-1, 1] for GANs) is the method's business, not the platform's.
    """

    source_image: Tensor
    source_label: Tensor
    target_image: Tensor | None
    target_image_label: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)})


def _to(value: Tensor | None, device: torch.device) -> Tensor | None:
    return None if value is None else value.to(device, non_blocking=True)


@dataclass(frozen=True)
class Optim:
    """An optimiser and its learning-rate schedule (stepped by the platform once after every training step)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


@dataclass
class StepContext:
    """Everything a train step, target pass or state update may read; `state` is the method's own, mutable."""

    hp: Hyperparams
    info: TaskInfo
    modules: nn.ModuleDict
    optimizers: Mapping[str, torch.optim.Optimizer]
    state: dict[str, Any]
    stage: str  # name of the running stage
    stage_step: int  # steps already taken in this stage (0 for the first step)
    stage_steps: int  # steps this stage will take in total
    target_epoch: int  # completed passes over the target training set since the stage started
    generator: torch.Generator  # the only source of randomness a method may use
    device: torch.device


@dataclass(frozen=True)
class TargetPass:
    """A pass over the whole target training set, run by the platform between training steps.

    `collect(ctx, images, image_labels)` sees one batch of target training images (B, C, H, W) and their image-level
    labels (B, K) or None, and returns tensors whose first dimension indexes something the method chose (images,
    pixels, histogram rows). The platform concatenates each key along dim 0 over the whole set and all workers, and
    calls `update(ctx, gathered)`, whose returned entries are merged into `ctx.state`.

    `schedule`: "stage_start" runs once before the stage's first step (CIRN stage 3); "every_epoch" runs before the
    first step and again each time the stage has consumed one more target epoch (CSCL Alg. 1: S_A grows per epoch).
    """

    schedule: Literal["stage_start", "every_epoch"]
    collect: Callable[[StepContext, Tensor, Tensor | None], Mapping[str, Tensor]]
    update: Callable[[StepContext, Mapping[str, Tensor]], Mapping[str, Any]]


OptimizerFactory = Callable[[Hyperparams, nn.ModuleDict, int], Mapping[str, Optim]]
TrainStep = Callable[[StepContext, Batch], Mapping[str, Tensor]]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    `trains`: names of the modules this stage optimises; they are in train mode with gradients on, every other
    module is in eval mode with `requires_grad=False` for the whole stage.
    `budget_share`: this stage's share of the trial's step budget; the shares of a method's stages sum to 1.
    `optimizers(hp, modules, num_steps)`: builds this stage's optimisers (and schedules, which need `num_steps`).
    `step(ctx, batch)`: the only place that calls `zero_grad` / `backward` / `step`; returns scalar tensors to log,
    named without a namespace (`loss_seg_source`); the platform logs them as `train/<name>` and fails the trial if
    any is not finite.
    `uses_target`: False for stages that never look at target images (the platform then does not even load them,
    which also guarantees that no target image passes through a module in train mode).
    """

    name: str
    trains: tuple[str, ...]
    budget_share: float
    optimizers: OptimizerFactory
    step: TrainStep
    target_pass: TargetPass | None = None
    uses_target: bool = True


def no_state(hp: Hyperparams, info: TaskInfo) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """The registration record of a method (see methods/__init__.py for the registry)."""

    name: str
    paper: str  # citation and the ../shared/papers file it implements
    hyperparams: type  # frozen dataclass with paper defaults; its field names are the only names used elsewhere
    build: Callable[[Hyperparams, TaskInfo], nn.ModuleDict]
    stages: Callable[[Hyperparams], tuple[Stage, ...]]
    predict: Callable[[Hyperparams, nn.ModuleDict, Tensor, str], Tensor]  # (hp, modules, images, stage) -> logits
    tasks: tuple[str, ...]  # task names this method is meant for
    init_state: Callable[[Hyperparams, TaskInfo], dict[str, Any]] = no_state
    # (hp, modules, target validation images, stage) -> named image batches in [0, 1] (e.g. translated images) that
    # the platform logs as MLflow artifacts at every evaluation; None or {} logs nothing
    samples: Callable[[Hyperparams, nn.ModuleDict, Tensor, str], Mapping[str, Tensor]] | None = None


def require(condition: bool, message: str) -> None:
    """Range check for `Hyperparams.__post_init__`: one clear line naming the field and the valid range."""
    if not condition:
        raise ValueError(message)


def weights_file_fields(hyperparams_class: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(hyperparams_class, include_extras=True)
    return tuple(name for name, hint in hints.items() if WEIGHTS_FILE in getattr(hint, "__metadata__", ()))
