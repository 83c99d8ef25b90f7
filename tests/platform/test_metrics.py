import math

import numpy as np
import pytest
import torch

from platform.metrics import (
    LungMetrics,
    average_surface_distance,
    confusion_matrix,
    iou_per_class,
    lung_scores,
    mean_iou,
    metric_key,
    segmentation_metrics,
)


def test_confusion_matrix_counts_by_hand_and_ignores_255():
    label = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 1, 0]])
    matrix = confusion_matrix(prediction, label, num_classes=3)
    # rows = ground truth, columns = prediction; the 255 pixel is not counted
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_iou_and_mean_over_defined_classes_only():
    matrix = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    ious = iou_per_class(matrix)
    # class 0: TP 1, FP 0, FN 1 → 1/2; class 1: TP 2, FP 2, FN 0 → 2/4; class 2: TP 0, FN 1 → 0; class 3: undefined
    assert ious[:3] == [50.0, 50.0, 0.0]
    assert math.isnan(ious[3])
    assert mean_iou(matrix) == (50 + 50 + 0) / 3


def test_matrix_accumulates_over_a_split_not_per_image_means():
    a = confusion_matrix(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    # per-image mIoU would be mean(mean(75, 0), 100) = 68.75; the split's matrix gives mean(75, 50)
    assert mean_iou(a + b) == (75 + 50) / 2


def test_named_metrics():
    matrix = torch.tensor([[3, 1], [0, 4]])
    metrics = segmentation_metrics(matrix, ("road", "traffic light"), "val_target")
    assert metrics["val_target/iou/traffic_light"] == 80.0
    assert metrics["val_target/iou/road"] == 75.0
    assert metrics["val_target/miou"] == 77.5
    assert metrics["val_target/pixel_accuracy"] == 87.5
    assert metric_key(" a/b c ") == "a_b_c"


def test_predictions_outside_the_classes_are_false_negatives_of_the_truth_only():
    label = torch.tensor([0, 0, 1, 1])
    prediction = torch.tensor([0, 7, 1, 255])  # 7 and 255: classes that are not evaluated
    matrix = confusion_matrix(prediction, label, num_classes=2, void=True)
    assert matrix.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert iou_per_class(matrix) == [50.0, 50.0]  # each: TP 1, FN 1, FP 0


def test_subset_means_are_rows_of_one_matrix():
    matrix = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]])  # class 2: undefined
    metrics = segmentation_metrics(
        matrix, ("a", "b", "c"), "t", eval_classes=(0, 1, 2), subsets=(("ab", (0, 1)), ("b", (1,)))
    )
    # a: TP 2, FP 1 → 66.67; b: TP 1, FN 1 → 50
    assert metrics["t/ab"] == pytest.approx((200 / 3 + 50) / 2)
    assert metrics["t/b"] == 50.0
    assert metrics["t/miou"] == metrics["t/ab"]  # the undefined class is left out of the mean
    assert "t/iou/c" not in metrics


def test_lung_dice_recall_precision_by_hand():
    truth = np.zeros((4, 4), bool)
    truth[:2] = True  # 8 pixels
    prediction = np.zeros((4, 4), bool)
    prediction[1:3] = True  # 8 pixels, 4 of them right
    scores = lung_scores(prediction, truth, (1.0, 1.0))
    assert scores["dice"] == 50.0 and scores["recall"] == 50.0 and scores["precision"] == 50.0


def test_average_surface_distance_of_shapes_with_a_known_distance():
    a, b = np.zeros((5, 9), bool), np.zeros((5, 9), bool)
    a[0, 0], b[3, 4] = True, True  # single pixels: ASD is the distance between them
    assert average_surface_distance(a, b, (1.0, 1.0)) == pytest.approx(5.0)
    assert average_surface_distance(a, b, (2.0, 0.5)) == pytest.approx(math.sqrt(6**2 + 2**2))
    a, b = np.zeros((2, 8), bool), np.zeros((2, 8), bool)
    a[:, 0:2], b[:, 5:7] = True, True  # two 2x2 blocks, every pixel on the surface: distances 5, 4, 4, 5 per row
    assert average_surface_distance(a, b, (1.0, 1.0)) == pytest.approx(4.5)
    assert average_surface_distance(a, b, (1.0, 2.0)) == pytest.approx(9.0)  # columns 2 mm apart
    assert average_surface_distance(a, a, (1.0, 1.0)) == 0.0
    assert math.isnan(average_surface_distance(a, np.zeros_like(a), (1.0, 1.0)))


def test_lung_metrics_average_over_images_per_lung_and_count_undefined_asd():
    lungs = LungMetrics(("background", "right lung", "left lung"))
    truth = np.zeros((4, 4), np.uint8)
    truth[:, :2], truth[:, 2:] = 1, 2
    lungs.add(truth, truth, (1.0, 1.0))  # perfect
    prediction = truth.copy()
    prediction[prediction == 2] = 0  # the left lung missed entirely
    lungs.add(prediction, truth, (1.0, 1.0))
    summary = lungs.summarise(lungs.tensor(), "test_target")
    assert summary["test_target/dice/right_lung"] == 100.0
    assert summary["test_target/dice/left_lung"] == 50.0  # mean of 100 and 0
    assert summary["test_target/recall/left_lung"] == 50.0
    assert summary["test_target/precision/left_lung"] == 100.0  # undefined for the empty prediction, left out
    assert summary["test_target/asd_mm/left_lung"] == 0.0 and summary["test_target/asd_undefined/left_lung"] == 1.0
