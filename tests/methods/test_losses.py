import math

import pytest
import torch

from methods.shared.losses import segmentation_loss
from methods.shared.optim import poly_schedule
from methods.shared.segmenter import upsample


def test_segmentation_loss_by_hand_with_ignored_pixels():
    # Two classes, 1x3 image at label resolution; pixel 3 ignored.
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 0.0, -5.0]]]])
    labels = torch.tensor([[[0, 1, 255]]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)) / 2
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_upsamples_logits_to_label_size():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    loss = segmentation_loss(logits, labels)
    assert loss.item() == pytest.approx(math.log(3))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 3, 3), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_does_not_mutate_its_inputs():
    logits, labels = torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 4, 4))
    before = (logits.clone(), labels.clone())
    segmentation_loss(logits, labels)
    assert torch.equal(logits, before[0]) and torch.equal(labels, before[1])


def test_poly_schedule_values():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = poly_schedule(optimizer, num_steps=10, power=0.9)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 1.0
    assert rates[5] == pytest.approx((1 - 5 / 10) ** 0.9)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_upsample_is_identity_at_same_size():
    x = torch.randn(1, 2, 4, 4)
    assert upsample(x, (4, 4)) is x
    assert upsample(x, (8, 6)).shape == (1, 2, 8, 6)
