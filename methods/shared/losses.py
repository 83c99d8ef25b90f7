"""Losses shared by several methods. Pure: tensors in, tensor out; no mutation, no backward, no global randomness."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.shared.segmenter import upsample


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-wise cross-entropy, mean over labelled pixels.

    logits (B, K, h, w) are upsampled bilinearly to the label size (B, H, W) first (the field's convention: the loss
    is computed at label resolution). Pixels labelled `ignore_index` do not count. A batch with no labelled pixel
    gives 0 (not NaN), so that an all-ignore crop cannot poison a run.
    """
    logits = upsample(logits, tuple(labels.shape[-2:]))
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)


def domain_bce(logits: Tensor, label: float) -> Tensor:
    """Binary cross-entropy of a domain discriminator's logits (B, 1, h, w) against one domain label (0 or 1), mean
    over all outputs."""
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
