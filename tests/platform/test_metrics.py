import math

import torch

from platform.metrics import confusion_matrix, iou_per_class, mean_iou, metric_key, segmentation_metrics


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
