"""The method contract (version 2): what every registered UDA method provides to the platform, and what it gets.

A method is data plus pure functions over torch objects. It never imports Ray, MLflow or pyarrow; the platform
(`platform/`) owns processes, data streams, distributed synchronisation, evaluation, checkpoints and tracking.

The shapes of the five papers this contract has to hold (see ../shared/papers/README.md and docs/architecture.md):

- **Multi-stage training with different modules and optimisers per stage.** SeUDA trains a segmenter, then GANs with
  the segmenter frozen; CIRN trains a CycleGAN, then the adaptation network, then self-trains. A method returns a
  sequence of `Stage`s; each names the modules it trains (`Stage.trains`) and builds its own optimisers. The platform
  puts exactly those modules in train mode and every other module in eval mode with gradients off, so a frozen
  module's parameters and batch-norm statistics cannot move while gradients still flow *through* it.
- **Stage lifecycle.** `Stage.on_start(ctx)` runs once when a stage begins (copy a classifier, snapshot a frozen
  teacher into a module of the `ModuleDict`), never again when a trial resumes inside the stage. Stages may repeat
  (TD/TF alternates TD and TF for several rounds): `StepContext.round` counts the earlier stages of the same name, and
  `Stage.optimizer_scope` lets stages continue one set of optimisers and schedules across rounds.
- **Budgets as the papers print them.** A stage lasts a share of the trial's steps, a number of steps, or a number of
  epochs of the source or target training set (`share`, `steps`, `epochs`); `TaskInfo` carries the split sizes.
- **Periodic passes over the whole target training set between steps** (class-wise thresholds of CSCL Alg. 1 and
  SLRT Alg. 1, offline pseudo labels of CIRN stage 3): `Stage.target_pass`. The platform feeds every target training
  image once, in eval mode without gradients; what `collect` returns is either gathered over the whole set and every
  worker for `update`, or, for keys the pass declares in `TargetPass.store`, kept per image in the platform's
  per-sample store and handed to each training step as `Batch.target_extras`, transformed exactly like that step's
  target crop.
- **Sample identity.** Every batch says which rows of the split its samples are (`Batch.source_index`,
  `Batch.target_index`) and how each was resized, scaled, cropped and flipped (`Batch.*_augmentation`).
- **Image-level labels** on target images (SLRT, TD/TF's endoscopy): `Batch.target_image_label`; on source images
  that have no pixel labels (SLRT's 2,400 extra gastroscope images): `Batch.source_image_label`, their pixel labels
  all `ignore_index`. Target pixel labels never reach a method during training.
- **Method state across workers.** State updated inside a step from a worker's own batch (Lagrange multipliers,
  centroid histories) must be reduced over workers, or each data-parallel rank drifts away: `ctx.all_reduce_mean`.
- **Inference through a translator** (SeUDA segments target images after mapping them to the source style):
  `Method.predict` is the method's own inference path and is told the stage (`StagePosition`) the model is in.

Everything a method carries between steps (thresholds, centroid histories, image pools, Lagrange multipliers) lives
in `StepContext.state`, a dict of tensors, numbers, strings and lists/dicts of them, so that the platform can
checkpoint it with `torch.save` and restore it with `torch.load(weights_only=True)`. Per-image maps do not belong
there (they would be saved into every checkpoint): declare them in `TargetPass.store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

Hyperparams = Any  # each method's own frozen dataclass; typed per method module

# A Hyperparams field annotated `WeightsFile` names a weights file on disk (e.g. torchvision ImageNet weights).
# The platform checks before any trial starts that a non-empty value exists and fits the modules, and clears such
# fields when it rebuilds modules from an adapted checkpoint (the checkpoint already holds every weight).
WEIGHTS_FILE = "weights file"
WeightsFile = Annotated[str, WEIGHTS_FILE]
# The value of a WeightsFile field that asks, explicitly, for random initialisation (e.g. `--set
# backbone_weights=random` on a paper task whose method starts from ImageNet; see `Method.imagenet_backbone`).
RANDOM_INIT = "random"

SOURCE, TARGET = "source", "target"
Split = Literal["source", "target"]


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about a task when it builds its modules, plans its stages and computes its losses.

    The split sizes are filled in by the platform from the datasets' manifests when a trial starts (0 where a caller
    built the TaskInfo by hand, e.g. in a unit test)."""

    num_classes: int
    in_channels: int  # 3 for RGB scenes and endoscopy, 1 for chest X-rays
    class_names: tuple[str, ...]
    ignore_index: int = 255
    target_image_labels: bool = False  # target training rows carry image-level labels (Batch.target_image_label)
    source_image_labels: bool = False  # source training rows carry image-level labels (Batch.source_image_label)
    # rows of the source training split(s), pixel- and image-labelled together, that the trial trains on (without a
    # --source-val slice)
    source_train_size: int = 0
    target_train_size: int = 0  # rows of the target training split

    def split_size(self, split: Split) -> int:
        return self.source_train_size if split == SOURCE else self.target_train_size


@dataclass(frozen=True)
class Augmentation:
    """How each sample of a batch was made from its stored image, in the order the platform applies it:

    1. resize to the task's training size (bilinear; nearest for labels and integer maps), then rescale by `scale`:
       the result is `size` (H, W);
    2. crop the box `crop` = (top, left, height, width) of that image; where the box extends past the image's bottom
       or right edge, images are padded with 0 and labels with `ignore_index`;
    3. flip horizontally where `flip`.
    Shapes: size (B, 2) int64, scale (B,) float32, crop (B, 4) int64, flip (B,) bool."""

    size: Tensor
    scale: Tensor
    crop: Tensor
    flip: Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Augmentation:
        return Augmentation(
            *(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in dataclasses.fields(self))
        )


@dataclass(frozen=True)
class Batch:
    """One training batch: labelled source images and unlabelled target images.

    Shapes: images (B, C, H, W) float32 in [0, 1]; `source_label` (B, H, W) int64 with `ignore_index` where unlabelled
    (every pixel of a source image that has image-level labels only); `target_image` and everything else `target_*`
    are None in stages that declare `uses_target=False`; `*_image_label` (B, K) float32 in {0, 1}, 1 where class k is
    present in the image, or None where the task has none.
    `*_index` (B,) int64: each sample's row in its split (the concatenation of the split's shards in file order; the
    platform maps an index back to the row's string id). `*_augmentation`: how each sample was resized, cropped and
    flipped (`Augmentation`).
    `target_extras`: the per-image maps of the running stage's `TargetPass.store`, (B, H, W) or (B, C, H, W) in their
    declared dtype, transformed exactly like `target_image` (same resize, crop and flip, nearest-neighbour unless the
    map declares bilinear), filled with the map's `fill` where the crop extends past the image; empty before the
    stage's first pass.
    Normalisation (ImageNet statistics, [-1, 1] for GANs) is the method's business, not the platform's.
    """

    source_image: Tensor
    source_label: Tensor
    target_image: Tensor | None
    target_image_label: Tensor | None = None
    source_image_label: Tensor | None = None
    source_index: Tensor | None = None
    target_index: Tensor | None = None
    source_augmentation: Augmentation | None = None
    target_augmentation: Augmentation | None = None
    target_extras: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType({}))

    def to(self, device: torch.device) -> Batch:
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                moved[f.name] = MappingProxyType({k: v.to(device, non_blocking=True) for k, v in value.items()})
            else:
                moved[f.name] = None if value is None else value.to(device, non_blocking=True)
        return Batch(**moved)


@dataclass(frozen=True)
class Optim:
    """An optimiser and its learning-rate schedule (stepped by the platform once after every training step)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


class StagePosition(NamedTuple):
    """Where a trial is in `Method.stages(hp)`: the stage's name, its index in that tuple, and its round (how many
    earlier stages have the same name: 0 for the first TD of TD/TF, 2 for the third)."""

    name: str
    index: int = 0
    round: int = 0


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class StepContext:
    """Everything a train step, target pass or stage hook may read; `state` is the method's own, mutable.

    `all_reduce_mean(t)` / `all_reduce_sum(t)`: the mean / sum of a tensor over the trial's data-parallel workers,
    the identity on one worker. Every worker must call them at the same point of the same step (they are collective);
    use them for state a step updates from its own batch (a Lagrange multiplier, a centroid history), so that every
    rank keeps the same state."""

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
    stage_index: int = 0  # index of the running stage in Method.stages(hp)
    round: int = 0  # earlier stages with the same name (StagePosition.round)
    source_epoch: int = 0  # completed passes over the source training set since the stage started
    all_reduce_mean: Callable[[Tensor], Tensor] = _identity
    all_reduce_sum: Callable[[Tensor], Tensor] = _identity
    # Mixed precision (`--precision`): "fp32" (the papers' setting), "bf16" or "fp16". The platform runs every step
    # under torch.autocast for bf16/fp16; a step calls `ctx.backward(loss)` and `ctx.step(name)` instead of
    # `loss.backward()` and `optimizer.step()`, so that fp16's gradient scaler applies, and computes what must stay
    # in float32 (GAN and KL terms, softmax thresholds, entropies) inside `with ctx.full_precision():` on `.float()`
    # inputs. Under fp32 all three are the plain operations.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    scaler: Any = None  # torch.amp.GradScaler under fp16 (the platform's; updated once per step)

    @property
    def position(self) -> StagePosition:
        return StagePosition(self.stage, self.stage_index, self.round)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, name: str) -> None:
        optimizer = self.optimizers[name]
        if self.scaler is None:
            optimizer.step()
        elif any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            self.scaler.step(optimizer)  # unscales, skips the update where a gradient is inf/NaN
        # (no gradient at all: nothing to update, as a plain step would update nothing)

    def full_precision(self) -> typing.ContextManager[None]:
        """A block computed in float32 whatever `precision` is (autocast off; give it `.float()` inputs)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)


@dataclass(frozen=True)
class SampleMap:
    """A per-image output of a `TargetPass`, kept by the platform's per-sample store (not in `ctx.state`).

    `collect` returns it as (B, H, W) (or (B, channels, H, W)) at the size of the images it was given, which is the
    size the task decodes target images at before any augmentation (e.g. 512x1024 for Cityscapes). It is stored in
    `dtype` (values are converted, so keep them in its range: class ids ≤ 255 for uint8), and each training step gets
    it in `Batch.target_extras[name]` resized like the image (`interpolation`), cropped (`fill` where the crop extends
    past the image, e.g. 255 = unlabelled for pseudo labels) and flipped."""

    dtype: torch.dtype = torch.uint8
    interpolation: Literal["nearest", "bilinear"] = "nearest"
    fill: float = 0
    channels: int = 0  # 0: maps are (H, W); C > 0: maps are (C, H, W)


@dataclass(frozen=True)
class TargetPass:
    """A pass over the whole target training set, run by the platform between training steps.

    `collect(ctx, images, image_labels)` sees one batch of target training images (B, C, H, W) at the task's target
    size, unaugmented, and their image-level labels (B, K) or None, and returns a dict of tensors:
    - keys declared in `store` are per-image maps (see `SampleMap`); the platform keeps them per image (sharded over
      workers for the compute, readable by every worker, persisted with the trial's checkpoints in its storage), and
      every later step of the stage gets them, aligned with its augmented target crop, in `Batch.target_extras`;
    - every other key holds tensors whose first dimension indexes something the method chose (images, pixels,
      histogram rows). The platform concatenates each such key along dim 0 over the whole set and all workers and
      calls `update(ctx, gathered)`, whose returned entries are merged into `ctx.state`.
    A stored map that depends on the state `update` computes (a threshold) is best stored raw (prediction and
    confidence) and thresholded in the step, which sees the state: one pass instead of two.

    `schedule`: "stage_start" runs once before the stage's first step (CIRN stage 3); "every_epoch" runs before the
    first step and again each time the stage has consumed one more epoch of the `every` split (CSCL Alg. 1: S_A grows
    per epoch).
    """

    schedule: Literal["stage_start", "every_epoch"]
    collect: Callable[[StepContext, Tensor, Tensor | None], Mapping[str, Tensor]]
    update: Callable[[StepContext, Mapping[str, Tensor]], Mapping[str, Any]] | None = None
    store: Mapping[str, SampleMap] = field(default_factory=lambda: MappingProxyType({}))
    every: Split = TARGET


@dataclass(frozen=True)
class Budget:
    """How long a stage lasts: exactly one of a share of the trial's steps, a step count, or epochs of a split.

    A method's stages use shares only, or absolute budgets (steps and epochs) only:
    - shares: the trial's length comes from the search space's `MAX_STEPS` for the task (or `--max-steps`); a stage
      gets round(share · length), the last stage the remainder (shares sum to 1);
    - absolute: the stages define the trial's length, `sum(steps)`, where `epochs(e, of)` is
      ceil(e · size(of) / global batch) with size from `TaskInfo` and the global batch = batch_size × workers. The
      search space then lists no `MAX_STEPS` for the task (one truth); `--max-steps N` scales every stage down (or
      up) proportionally to N steps in all, for quick runs, and the platform says so before anything starts.
    Epoch counts that the paper prints belong in Hyperparams fields (with their citation), so that a task default or
    `--set` can change them like any other value."""

    share: float | None = None
    steps: int | None = None
    epochs: float | None = None
    of: Split = SOURCE

    def __post_init__(self) -> None:
        given = [value is not None for value in (self.share, self.steps, self.epochs)]
        if sum(given) != 1:
            raise ValueError(f"a Budget takes exactly one of share, steps, epochs (got {self})")
        if self.share is not None and not 0 < self.share <= 1:
            raise ValueError(f"a budget share must be in (0, 1] (got {self.share})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"a step budget must be >= 1 (got {self.steps})")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"an epoch budget must be > 0 (got {self.epochs})")

    @property
    def absolute(self) -> bool:
        return self.share is None

    def num_steps(self, info: TaskInfo, global_batch: int) -> int:
        """Steps of an absolute budget (steps, or epochs of a split of the task at this global batch size)."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ValueError("a share budget has no step count of its own")
        size = info.split_size(self.of)
        if size <= 0:
            raise ValueError(f"an epoch budget needs the {self.of} training split's size (TaskInfo has {size})")
        return max(1, math.ceil(self.epochs * size / global_batch))


def share(fraction: float) -> Budget:
    return Budget(share=fraction)


def steps(count: int) -> Budget:
    return Budget(steps=int(count))


def epochs(count: float, of: Split = SOURCE) -> Budget:
    return Budget(epochs=float(count), of=of)


OptimizerFactory = Callable[[Hyperparams, nn.ModuleDict, int], Mapping[str, Optim]]
TrainStep = Callable[[StepContext, Batch], Mapping[str, Tensor]]
StageHook = Callable[[StepContext], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    `trains`: names of the modules this stage optimises; they are in train mode with gradients on, every other
    module is in eval mode with `requires_grad=False` for the whole stage.
    `budget`: how long the stage lasts (`Budget`: `share(0.5)`, `steps(100_000)`, `epochs(5, of="source")`).
    `optimizers(hp, modules, num_steps)`: builds this stage's optimisers (and schedules, which need `num_steps`).
    `step(ctx, batch)`: the only place that calls `zero_grad` / `backward` / `step`; returns scalar tensors to log,
    named without a namespace (`loss_seg_source`); the platform logs them as `train/<name>` and fails the trial if
    any is not finite.
    `target_pass`: an optional pass over the whole target training set (`TargetPass`).
    `uses_target`: False for stages that never look at target images (the platform then does not even load them,
    which also guarantees that no target image passes through a module in train mode).
    `on_start(ctx)`: runs once when the stage begins, after its optimisers are built and before its first target
    pass and step, with every module in eval mode and without gradients; it may write into any module (copy C into
    an ancillary classifier, snapshot the student into a frozen teacher module) and its returned entries are merged
    into `ctx.state`. A trial that resumes inside the stage does not run it again: the checkpoint holds its effects.
    `optimizer_scope`: None (default) builds fresh optimisers and schedules for every stage, each round included.
    Stages that name the same scope share one set instead: the factory of the scope's first stage builds it once,
    with `num_steps` = the steps of every stage of the scope, and it continues from stage to stage and round to round
    (checkpointed in between; its schedules advance with every step of every stage of the scope). TD/TF: every TD
    round in scope "td" gives one constant-then-linear schedule over all rounds; Steps I-III in scope "tf" give S one
    poly schedule over all of TF.
    """

    name: str
    trains: tuple[str, ...]
    budget: Budget
    optimizers: OptimizerFactory
    step: TrainStep
    target_pass: TargetPass | None = None
    uses_target: bool = True
    on_start: StageHook | None = None
    optimizer_scope: str | None = None


def no_state(hp: Hyperparams, info: TaskInfo) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class SampleImages:
    """What `Method.samples` draws on at each evaluation: the first target validation images (at the task's target
    size) and the first source training images (at its source size, unaugmented), (N, C, H, W) in [0, 1]."""

    target: Tensor
    source: Tensor


@dataclass(frozen=True)
class Method:
    """The registration record of a method (see methods/__init__.py for the registry)."""

    name: str
    paper: str  # citation and the ../shared/papers file it implements
    hyperparams: type  # frozen dataclass with paper defaults; its field names are the only names used elsewhere
    build: Callable[[Hyperparams, TaskInfo], nn.ModuleDict]
    stages: Callable[[Hyperparams], tuple[Stage, ...]]
    # (hp, modules, images, stage) -> logits (B, K, H, W) in eval mode: the method's own inference path
    predict: Callable[[Hyperparams, nn.ModuleDict, Tensor, StagePosition], Tensor]
    tasks: tuple[str, ...]  # task names this method is meant for
    init_state: Callable[[Hyperparams, TaskInfo], dict[str, Any]] = no_state
    # (hp, modules, images, stage) -> named image batches (N, C, H, W) in [0, 1] (translated images, pseudo-label
    # maps) that the platform logs as MLflow artifacts at every evaluation; None or {} logs nothing
    samples: Callable[[Hyperparams, nn.ModuleDict, SampleImages, StagePosition], Mapping[str, Tensor]] | None = None
    # True where the paper starts its backbone from ImageNet weights (`backbone_weights`): on a paper task the
    # platform then refuses an empty `backbone_weights` before anything starts, naming the torchvision file to pass,
    # unless the user asks for random weights explicitly (RANDOM_INIT). Synthetic tasks train from scratch.
    imagenet_backbone: bool = False


def require(condition: bool, message: str) -> None:
    """Range check for `Hyperparams.__post_init__`: one clear line naming the field and the valid range."""
    if not condition:
        raise ValueError(message)


def weights_file_fields(hyperparams_class: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(hyperparams_class, include_extras=True)
    return tuple(name for name, hint in hints.items() if WEIGHTS_FILE in getattr(hint, "__metadata__", ()))


def stage_positions(stages: tuple[Stage, ...]) -> list[StagePosition]:
    """The StagePosition of every stage of `Method.stages(hp)` (rounds count earlier stages of the same name)."""
    seen: dict[str, int] = {}
    positions = []
    for index, stage in enumerate(stages):
        positions.append(StagePosition(stage.name, index, seen.get(stage.name, 0)))
        seen[stage.name] = seen.get(stage.name, 0) + 1
    return positions
