"""The task registry: which datasets and splits a domain-adaptation task trains and evaluates on.

A task names its labelled source training split, its target training split (read WITHOUT pixel labels: the stream
projects the label column away; image-level labels only where the task defines them), and its labelled target
validation split, plus the resize policy. Evaluation is always at the full label resolution of the validation split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
from dataclasses import dataclass

from methods.contract import TaskInfo
from platform import synthetic
from platform.datasets import (
    DamagedDatasetError,
    DatasetNotFoundError,
    Manifest,
    damaged_shards,
    is_uri,
    join,
    read_manifest,
    resolve_root,
    split_files,
)


@dataclass(frozen=True)
class Split:
    dataset: str
    split: str


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    info: TaskInfo
    source_train: Split
    target_train: Split
    target_val: Split
    synthetic: bool = False  # generated on demand by platform.synthetic, cached under the data root
    source_size: tuple[int, int] | None = None  # (H, W) training images are resized to; None keeps the native size
    target_size: tuple[int, int] | None = None  # also the size target images are segmented at during evaluation
    hflip: bool = True  # random horizontal flips of training images
    train_scale_range: tuple[float, float] | None = None  # random rescaling of training images after the resize
    train_crop: tuple[int, int] | None = None  # random crop (H, W) of training images after rescaling
    target_test: Split | None = None  # the split papers report on when it is not the validation split
    eval_classes: tuple[int, ...] | None = None  # classes val_target/miou averages over (default: all)
    class_subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()  # extra means over subsets: ("miou13", ids)
    lung_metrics: bool = False  # per-class Dice, recall, precision (%) and ASD (mm) per image, averaged
    # A source split whose rows have image-level labels and no pixel labels (SLRT's 2,400 gastroscope images),
    # streamed together with `source_train`: their pixel labels are all ignore_index, their image-level labels reach
    # methods as Batch.source_image_label (TaskInfo.source_image_labels must then be True).
    source_weak: Split | None = None

    @property
    def source_splits(self) -> tuple[Split, ...]:
        """What the source training stream reads, in this order (row indices run over their concatenation)."""
        return (self.source_train,) + ((self.source_weak,) if self.source_weak else ())

    @property
    def datasets(self) -> tuple[str, ...]:
        splits = (*self.source_splits, self.target_train, self.target_val) + (
            (self.target_test,) if self.target_test else ()
        )
        return tuple(dict.fromkeys(s.dataset for s in splits))


def _synthetic(
    name: str,
    description: str,
    class_names: tuple[str, ...],
    channels: int,
    hflip: bool,
    target_image_labels: bool = False,
) -> Task:
    return Task(
        name=name,
        description=description,
        synthetic=True,
        hflip=hflip,
        info=TaskInfo(
            num_classes=len(class_names),
            in_channels=channels,
            class_names=class_names,
            target_image_labels=target_image_labels,
        ),
        source_train=Split(f"{name}-source", "train"),
        target_train=Split(f"{name}-target", "train"),
        target_val=Split(f"{name}-target", "val"),
    )


_TASKS = (
    _synthetic(
        "synthetic-urban",
        "street scenes, rendered → real-looking (palette, texture, noise, blur, lighting, label shift); 7 classes",
        synthetic.URBAN_CLASSES,
        3,
        hflip=True,
    ),
    _synthetic(
        "synthetic-endoscopy",
        "normal tissue vs lesion, gastroscope → enteroscope look; image-level labels on target",
        synthetic.ENDOSCOPY_CLASSES,
        3,
        hflip=True,
        target_image_labels=True,
    ),
    # No flips for chest X-rays: left and right lungs are different classes.
    dataclasses.replace(
        _synthetic(
            "synthetic-cxr",
            "chest X-ray lungs (background, left lung, right lung), Montgomery → JSRT-like intensity shift",
            synthetic.CXR_CLASSES,
            1,
            hflip=False,
        ),
        lung_metrics=True,
    ),
)


def cityscapes_train_classes() -> tuple[str, ...]:
    """The 19 Cityscapes training classes in trainId order, from the official cityscapesscripts label table."""
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {label.trainId: label.name for label in labels if 0 <= label.trainId < 255}
    return tuple(by_train_id[i] for i in range(len(by_train_id)))


# Score subsets of the 19 Cityscapes training classes (datasets.md): SYNTHIA's 16 and 13, NTHU's 13.
SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
NTHU_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # road ... bicycle without wall, fence, pole, terrain,
# truck, train


def _cityscapes_target(name: str, description: str, source: Split, source_size: tuple[int, int], **kwargs) -> Task:
    """Cityscapes as the target: train images unlabelled for adaptation, val (500 images) for scoring at 2048x1024;
    training sizes as the papers resize them (CIRN Impl. details; the AdaptSegNet convention CSCL and TD/TF share)."""
    return Task(
        name=name,
        description=description,
        info=TaskInfo(num_classes=19, in_channels=3, class_names=cityscapes_train_classes()),
        source_train=source,
        target_train=Split("cityscapes", "train"),
        target_val=Split("cityscapes", "val"),
        source_size=source_size,
        target_size=(512, 1024),
        **kwargs,
    )


def _nthu(city: str) -> Task:
    """Cityscapes → NTHU (CSCL Sec. 4.4): the model keeps the 19 Cityscapes classes; scored on the 13 that NTHU
    labels, on each city's test split (NTHU images are 2048x1024, segmented at 1024x512 like Cityscapes)."""
    return Task(
        name=f"cityscapes-nthu-{city}",
        description=f"Cityscapes train → NTHU {city.title()}; 13 classes",
        info=TaskInfo(num_classes=19, in_channels=3, class_names=cityscapes_train_classes()),
        source_train=Split("cityscapes", "train"),
        target_train=Split(f"nthu-{city}", "train"),
        target_val=Split(f"nthu-{city}", "test"),
        source_size=(512, 1024),
        target_size=(512, 1024),
        eval_classes=NTHU_13,
    )


_PAPER_TASKS = (
    _cityscapes_target(
        "gta5-cityscapes",
        "GTA5 (24,966 frames) → Cityscapes; scored on Cityscapes val, 19 classes",
        Split("gta5", "train"),
        (720, 1280),
    ),
    _cityscapes_target(
        "synthia-cityscapes",
        "SYNTHIA-RAND-CITYSCAPES → Cityscapes; scored on 16 classes (and 13)",
        Split("synthia", "train"),
        (760, 1280),
        eval_classes=SYNTHIA_16,
        class_subsets=(("miou13", SYNTHIA_13),),
    ),
    *(_nthu(city) for city in ("rome", "rio", "tokyo", "taipei")),
    # The endoscopy papers' own data (not public): gastroscope (source) → enteroscope (target), converted with
    # `python -m platform.data convert endoscopy`; both papers leave the input size open: 512x512 here.
    Task(
        name="endoscopy",
        description="gastroscope → enteroscope lesions (normal, disease); image-level labels on target",
        # image-level labels on both sides: the converter's rows without a mask (SLRT's image-labelled gastroscope
        # images) stream with every pixel ignored; a masked row's image labels are the classes its mask holds
        info=TaskInfo(
            num_classes=2,
            in_channels=3,
            class_names=("normal", "disease"),
            target_image_labels=True,
            source_image_labels=True,
        ),
        source_train=Split("endoscopy-gastroscope", "train"),
        target_train=Split("endoscopy-enteroscope", "train"),
        target_val=Split("endoscopy-enteroscope", "test"),
        source_size=(512, 512),
        target_size=(512, 512),
    ),
    # SeUDA: Montgomery → JSRT at 512x512, 7:1:2 splits; model selection on JSRT val, the paper reports JSRT test.
    Task(
        name="montgomery-jsrt",
        description="Montgomery County → JSRT chest X-rays; per-lung Dice, recall, precision, ASD",
        info=TaskInfo(num_classes=3, in_channels=1, class_names=("background", "left lung", "right lung")),
        source_train=Split("montgomery", "train"),
        target_train=Split("jsrt", "train"),
        target_val=Split("jsrt", "val"),
        target_test=Split("jsrt", "test"),
        hflip=False,
        lung_metrics=True,
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASKS + _PAPER_TASKS}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def default_data_root() -> str:
    """$UDA_DATA_ROOT, else ~/.cache/uda-platform/data (absolute: trial processes change directory; or a URI such as
    s3://bucket/data, read through pyarrow's filesystems)."""
    return resolve_root(os.environ.get("UDA_DATA_ROOT", "~/.cache/uda-platform/data"))


def prepare(task: Task, data_root: str) -> dict[str, str]:
    """Make sure every dataset of the task is present; returns {dataset: fingerprint}.

    Synthetic datasets are generated here on first use (deterministic, cached). A real dataset that is missing raises
    DatasetNotFoundError with the command that prepares it.
    """
    fingerprints = {}
    for dataset in task.datasets:
        if task.synthetic and not is_uri(data_root):
            manifest = synthetic.ensure(data_root, dataset)
            if not manifest.shards or damaged_shards(data_root, manifest):  # written before shard records, or hurt
                shutil.rmtree(join(data_root, dataset))
                manifest = synthetic.ensure(data_root, dataset)
        elif task.synthetic:
            try:
                manifest = read_manifest(data_root, dataset)
            except DatasetNotFoundError:
                raise DatasetNotFoundError(
                    f"synthetic dataset {dataset!r} is not under {data_root}; synthetic data is generated on a local "
                    f"data root only: run `python -m platform.data prepare {task.name} --data-root DIR` and copy DIR "
                    f"there, or give a local --data-root"
                ) from None
        else:
            try:
                manifest = read_manifest(data_root, dataset)
            except DatasetNotFoundError:
                raise DatasetNotFoundError(
                    f"dataset {dataset!r} for task {task.name} is not prepared under {data_root}; convert the official "
                    f"download with: python -m platform.data convert {converter_for(dataset)} SRC_DIR "
                    f"{join(data_root, dataset)}"
                ) from None
        if not task.synthetic:
            _check_shards(data_root, manifest)
        fingerprints[dataset] = manifest.fingerprint
    return fingerprints


def _check_shards(data_root: str, manifest: Manifest) -> None:
    """Every shard as large as the manifest says (one stat each); else the damaged one and how to repair it."""
    damaged = damaged_shards(data_root, manifest)
    if damaged:
        relative, reason = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DamagedDatasetError(
            f"dataset {manifest.name!r} under {data_root} has a damaged shard {relative}: {reason}{more}; repair it "
            f"with: {repair_command(manifest, join(data_root, manifest.name))}"
        )


def repair_command(manifest: Manifest, out: str) -> str:
    """The `convert` command that made the dataset (same source and options): run again, it rewrites damaged shards."""
    source = manifest.source
    if "converter" not in source:
        return f"python -m platform.data convert {converter_for(manifest.name)} SRC_DIR {out}"
    flags = [f"--{key} {value}" for key, value in sorted(source.get("options", {}).items())]
    flags += [f"--limit {source['limit']}"] if source.get("limit") else []
    flags += [f"--codec {source['codec']}"] if source.get("codec") else []
    return " ".join(["python -m platform.data convert", source["converter"], source["source"], out, *flags])


def held_out(sample_id: str, fraction: float) -> bool:
    """Whether a source sample is in the source-validation slice: the first 8 bytes of SHA-256(id), as a fraction of
    2^64, fall below `fraction`. A pure function of the sample's id: the same on every machine, seed, worker count
    and shard layout, and nested (the slice of a smaller fraction lies inside that of a larger one)."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class SourceValidationError(ValueError):
    """A `--source-val` fraction whose slice is empty or the whole split: bad input (one line, exit code 2)."""


def source_validation_rows(task: Task, data_root: str, fraction: float) -> tuple[int, ...]:
    """The row indices (in `task.source_train`, the labelled source split) of the source-validation slice: held out
    from training and scored as `val_source/*` at every evaluation (`--source-val FRACTION`; 0: none). Only images
    with pixel labels are held out: those of `source_weak`, and rows of the labelled split that carry image-level
    labels only (the endoscopy converter's unmasked gastroscope images), have nothing to score and stay in training.
    Read once per process and dataset version (the ids, and the label column where a task has such rows).
    SourceValidationError if the slice would be empty or the whole split."""
    if not fraction:
        return ()
    fingerprint = read_manifest(data_root, task.source_train.dataset).fingerprint
    return _source_validation_rows(task.name, data_root, fraction, fingerprint)


@functools.lru_cache(maxsize=32)
def _source_validation_rows(task_name: str, data_root: str, fraction: float, fingerprint: str) -> tuple[int, ...]:
    from platform.stream import labelled_rows, row_ids  # pyarrow: only where a slice is asked for

    task = get(task_name)
    files = split_files(data_root, task.source_train.dataset, task.source_train.split)
    ids = row_ids(files)
    rows = [i for i, sample_id in enumerate(ids) if held_out(sample_id, fraction)]
    scoreable = len(ids)
    if task.info.source_image_labels:
        labelled = labelled_rows(files)
        rows, scoreable = [i for i in rows if labelled[i]], sum(labelled)
    if not rows or len(rows) == scoreable:
        raise SourceValidationError(
            f"--source-val {fraction:g} holds out {len(rows)} of the {scoreable} pixel-labelled source training "
            f"images of {task.name}; choose a fraction that leaves images on both sides, e.g. --source-val 0.1"
        )
    return tuple(rows)


def runtime_info(task: Task, data_root: str, source_val: float = 0.0) -> TaskInfo:
    """The task's TaskInfo with the sizes of its training splits, read from the prepared datasets' manifests
    (`source_train_size` without the source-validation slice of `source_val`, so that epochs count trained images)."""

    def count(split: Split) -> int:
        manifest = read_manifest(data_root, split.dataset)
        if split.split not in manifest.splits:
            raise DatasetNotFoundError(
                f"dataset {split.dataset!r} has no split {split.split!r}; it has {', '.join(manifest.splits)}"
            )
        return manifest.splits[split.split].count

    return dataclasses.replace(
        task.info,
        source_train_size=sum(count(split) for split in task.source_splits)
        - len(source_validation_rows(task, data_root, source_val)),
        target_train_size=count(task.target_train),
    )


def converter_for(dataset: str) -> str:
    """The converter that produces a dataset name ("nthu-rome" ← nthu, "endoscopy-gastroscope" ← endoscopy)."""
    return dataset.split("-")[0]
