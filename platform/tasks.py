"""The task registry: which datasets and splits a domain-adaptation task trains and evaluates on.

A task names its labelled source training split, its target training split (read WITHOUT pixel labels: the stream
projects the label column away; image-level labels only where the task defines them), and its labelled target
validation split, plus the resize policy. Evaluation is always at the full label resolution of the validation split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from methods.contract import TaskInfo
from platform import synthetic
from platform.datasets import DatasetNotFoundError, read_manifest


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

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.dataset for s in (self.source_train, self.target_train, self.target_val)))


def _synthetic(name: str, description: str, class_names: tuple[str, ...], channels: int, hflip: bool,
               target_image_labels: bool = False) -> Task:
    return Task(
        name=name, description=description, synthetic=True, hflip=hflip,
        info=TaskInfo(num_classes=len(class_names), in_channels=channels, class_names=class_names,
                      target_image_labels=target_image_labels),
        source_train=Split(f"{name}-source", "train"),
        target_train=Split(f"{name}-target", "train"),
        target_val=Split(f"{name}-target", "val"),
    )


_TASKS = (
    _synthetic("synthetic-urban", "street scenes, rendered → real-looking (palette, texture, noise, blur, lighting, "
               "label shift); 7 classes", synthetic.URBAN_CLASSES, 3, hflip=True),
    _synthetic("synthetic-endoscopy", "normal tissue vs lesion, gastroscope → enteroscope look; image-level labels on "
               "target", synthetic.ENDOSCOPY_CLASSES, 3, hflip=True, target_image_labels=True),
    # No flips for chest X-rays: left and right lungs are different classes.
    _synthetic("synthetic-cxr", "chest X-ray lungs (background, left lung, right lung), Montgomery → JSRT-like "
               "intensity shift", synthetic.CXR_CLASSES, 1, hflip=False),
)


def cityscapes_train_classes() -> tuple[str, ...]:
    """The 19 Cityscapes training classes in trainId order, from the official cityscapesscripts label table."""
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {label.trainId: label.name for label in labels if 0 <= label.trainId < 255}
    return tuple(by_train_id[i] for i in range(len(by_train_id)))


_PAPER_TASKS = (
    # GTA5 frames resized to 1280x720 and Cityscapes to 1024x512 for training (CIRN Impl. details; the AdaptSegNet
    # convention the CSCL and TD/TF code bases share); evaluation at Cityscapes' full 2048x1024.
    Task(name="gta5-cityscapes", description="GTA5 (24,966 frames) → Cityscapes train; scored on Cityscapes val, 19 classes",
         info=TaskInfo(num_classes=19, in_channels=3, class_names=cityscapes_train_classes()),
         source_train=Split("gta5", "train"), target_train=Split("cityscapes", "train"),
         target_val=Split("cityscapes", "val"), source_size=(720, 1280), target_size=(512, 1024)),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASKS + _PAPER_TASKS}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def default_data_root() -> str:
    """$UDA_DATA_ROOT, else ~/.cache/uda-platform/data (absolute: trial processes change directory)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("UDA_DATA_ROOT", "~/.cache/uda-platform/data")))


def prepare(task: Task, data_root: str) -> dict[str, str]:
    """Make sure every dataset of the task is present; returns {dataset: fingerprint}.

    Synthetic datasets are generated here on first use (deterministic, cached). A real dataset that is missing raises
    DatasetNotFoundError with the command that prepares it.
    """
    fingerprints = {}
    for dataset in task.datasets:
        if task.synthetic:
            manifest = synthetic.ensure(data_root, dataset)
        else:
            try:
                manifest = read_manifest(data_root, dataset)
            except DatasetNotFoundError:
                raise DatasetNotFoundError(
                    f"dataset {dataset!r} for task {task.name} is not prepared under {data_root}; convert the official "
                    f"download with: python -m platform.data convert {dataset} SRC_DIR {os.path.join(data_root, dataset)}"
                ) from None
        fingerprints[dataset] = manifest.fingerprint
    return fingerprints
