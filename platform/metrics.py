"""Segmentation metrics over a whole split, and the per-image lung metrics of the chest X-ray tasks.

mIoU follows the field's convention (../shared/reference/conventions.md) and the official Cityscapes pixel-level
evaluator: one bincount confusion matrix over every evaluated pixel of the split (not a mean of per-image IoUs),
pixels whose ground truth is 255 ignored, IoU_c = TP / (TP + FP + FN), mean over the classes whose IoU is defined
(TP + FP + FN > 0). A prediction outside the K classes (possible when scoring PNG files) goes to a "void" column: a
false negative of the true class and nobody's false positive, exactly as cityscapesscripts counts predictions of
classes that are not evaluated. Subset means (SYNTHIA's 13 of 16, NTHU's 13 of 19) are means over rows of the same
matrix, never averages of means. Values are percentages, like the papers' tables.

Lung metrics (SeUDA Table 1): per image and per lung, Dice, recall and precision (%) and the average symmetric surface
distance (mm, from the pixel spacing), then averaged over the images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def confusion_matrix(
    prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255, void: bool = False
) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; with `void`, (K, K + 1) and predictions
    outside [0, K) counted in the last column (otherwise they must not occur)."""
    valid = label != ignore_index
    truth, predicted = label[valid].long(), prediction[valid].long()
    columns = num_classes + 1 if void else num_classes
    if void:
        predicted = torch.where((predicted >= 0) & (predicted < num_classes), predicted, num_classes)
    return torch.bincount(truth * columns + predicted, minlength=num_classes * columns).reshape(num_classes, columns)


def iou_per_class(matrix: Tensor) -> list[float]:
    """IoU of each class in percent; NaN where the class is in neither ground truth nor prediction."""
    matrix = matrix.double()
    classes = matrix.shape[0]
    true_positive = matrix.diag()[:classes] if matrix.shape[1] == classes else matrix[:, :classes].diag()
    false_negative = matrix.sum(1) - true_positive
    false_positive = matrix[:, :classes].sum(0) - true_positive
    union = true_positive + false_negative + false_positive
    return [float(tp / u * 100) if u > 0 else math.nan for tp, u in zip(true_positive, union)]


def mean_iou(matrix: Tensor, classes: Sequence[int] | None = None) -> float:
    ious = iou_per_class(matrix)
    defined = [ious[c] for c in (classes if classes is not None else range(len(ious))) if not math.isnan(ious[c])]
    return sum(defined) / len(defined) if defined else math.nan


def metric_key(name: str) -> str:
    """A class name as a metric-name component: 'traffic light' → 'traffic_light'."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip())


def segmentation_metrics(
    matrix: Tensor,
    class_names: Sequence[str],
    prefix: str,
    eval_classes: Sequence[int] | None = None,
    subsets: Sequence[tuple[str, Sequence[int]]] = (),
) -> dict[str, float]:
    """`{prefix}/miou` over `eval_classes` (default all), `{prefix}/<subset name>` per subset, per-class
    `{prefix}/iou/<class>` (evaluated classes only) and `{prefix}/pixel_accuracy`."""
    classes = list(eval_classes) if eval_classes is not None else list(range(len(class_names)))
    ious = iou_per_class(matrix)
    metrics = {f"{prefix}/miou": mean_iou(matrix, classes)}
    for name, subset in subsets:
        metrics[f"{prefix}/{name}"] = mean_iou(matrix, subset)
    for index in classes:
        if not math.isnan(ious[index]):
            metrics[f"{prefix}/iou/{metric_key(class_names[index])}"] = ious[index]
    counted = matrix[classes][:, classes]
    total = matrix[classes].sum()
    metrics[f"{prefix}/pixel_accuracy"] = float(counted.diag().sum() / total * 100) if total > 0 else math.nan
    return metrics


# ------------------------------------------------------------------------------------------------ lung metrics


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def average_surface_distance(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (mm) between two boolean masks: the mean, over the boundary pixels of both,
    of the distance to the nearest boundary pixel of the other. NaN if either mask is empty."""
    if not prediction.any() or not truth.any():
        return math.nan
    surface_p, surface_t = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~surface_t, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~surface_p, sampling=spacing)
    distances = np.concatenate([to_truth[surface_p], to_prediction[surface_t]])
    return float(distances.mean())


def lung_scores(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, recall, precision (%) and ASD (mm) of one class in one image: boolean masks."""
    tp = float(np.logical_and(prediction, truth).sum())
    predicted, actual = float(prediction.sum()), float(truth.sum())
    return {
        "dice": 200 * tp / (predicted + actual) if predicted + actual else math.nan,
        "recall": 100 * tp / actual if actual else math.nan,
        "precision": 100 * tp / predicted if predicted else math.nan,
        "asd_mm": average_surface_distance(prediction, truth, spacing),
    }


LUNG_METRICS = ("dice", "recall", "precision", "asd_mm")


class LungMetrics:
    """Per-image lung scores for the classes ≥ 1, as rows of a tensor (so that workers can gather them), averaged
    over images (NaN entries, e.g. the ASD of an empty prediction, left out and counted)."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.rows: list[list[float]] = []

    def add(self, prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> None:
        row = []
        for index in range(1, len(self.class_names)):
            scores = lung_scores(prediction == index, truth == index, spacing)
            row.extend(scores[m] for m in LUNG_METRICS)
        self.rows.append(row)

    def tensor(self) -> Tensor:
        # the width from the classes, not the rows: a worker that scored no image still gathers a (0, width) tensor
        width = len(LUNG_METRICS) * (len(self.class_names) - 1)
        return torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.rows), width)

    def summarise(self, rows: Tensor, prefix: str) -> dict[str, float]:
        out = {}
        columns = [(m, n) for n in self.class_names[1:] for m in LUNG_METRICS]
        for column, (metric, name) in enumerate(columns):
            values = rows[:, column]
            defined = values[~torch.isnan(values)]
            out[f"{prefix}/{metric}/{metric_key(name)}"] = float(defined.mean()) if len(defined) else math.nan
            if metric == "asd_mm":
                out[f"{prefix}/asd_undefined/{metric_key(name)}"] = float(len(values) - len(defined))
        return out
