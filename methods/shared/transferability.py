"""Quantified transferability from a discriminator's confidence, as CSCL (Eq. 2) and TD/TF (Eq. 1) define it.

P = 1 − H(σ(logits)), H the binary entropy in bits over the discriminator's two outcomes, so that P ∈ [0, 1]: 0 where
the discriminator is undecided (σ = 0.5), 1 where it is certain. The same rule as `methods/cscl.py:transferability`
(a shared copy for TD/TF; CSCL keeps its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8


def transferability(logits: Tensor) -> Tensor:
    """Logits of a discriminator (any shape) → P = 1 − H₂(σ(logits)), same shape, in [0, 1]."""
    p = torch.sigmoid(logits)
    entropy = -(p * torch.log2(p.clamp_min(EPS)) + (1 - p) * torch.log2((1 - p).clamp_min(EPS)))
    return 1 - entropy
