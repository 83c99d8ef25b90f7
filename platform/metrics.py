"""Segmentation metrics over a whole split: one confusion matrix accumulated over every evaluated pixel.

The field's convention (../shared/reference/conventions.md): a bincount confusion matrix over all pixels of the split
(not a mean of per-image IoUs), pixels labelled 255 ignored, IoU_c = TP / (TP + FP + FN), mIoU = mean over the classes
whose IoU is defined (TP + FP + FN > 0). Values are reported in percent, like the papers' tables.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor


def confusion_matrix(prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction. prediction, label: (...,) integer tensors."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(matrix: Tensor) -> list[float]:
    """IoU of each class in percent; NaN where the class is absent from both ground truth and prediction."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    return [float(tp / u * 100) if u > 0 else math.nan for tp, u in zip(true_positive, union)]


def mean_iou(matrix: Tensor) -> float:
    defined = [v for v in iou_per_class(matrix) if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def metric_key(name: str) -> str:
    """A class name as a metric-name component: 'traffic light' → 'traffic_light'."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip())


def segmentation_metrics(matrix: Tensor, class_names: tuple[str, ...], prefix: str) -> dict[str, float]:
    """`{prefix}/miou` and `{prefix}/iou/<class>` (percent) from a confusion matrix."""
    metrics = {f"{prefix}/miou": mean_iou(matrix)}
    for name, value in zip(class_names, iou_per_class(matrix)):
        if not math.isnan(value):
            metrics[f"{prefix}/iou/{metric_key(name)}"] = value
    pixels = matrix.sum()
    metrics[f"{prefix}/pixel_accuracy"] = float(matrix.diag().sum() / pixels * 100) if pixels > 0 else math.nan
    return metrics
