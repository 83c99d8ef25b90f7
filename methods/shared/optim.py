"""Optimisation helpers as the papers print them."""

from __future__ import annotations

import torch

from methods.shared.segmenter import Segmenter


def poly_schedule(
    optimizer: torch.optim.Optimizer, num_steps: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr_0 · (1 − t / num_steps)^power, the DeepLab "poly" policy (CSCL Sec. 3.5, CIRN, AdaptSegNet)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, num_steps)) ** power)


def segmenter_sgd(
    segmenter: Segmenter, learning_rate: float, momentum: float, weight_decay: float, head_lr_multiplier: float
) -> torch.optim.SGD:
    """SGD with the classifier head at `head_lr_multiplier` × the backbone learning rate (DeepLab-v2 convention)."""
    return torch.optim.SGD(
        [
            {"params": list(segmenter.backbone_parameters()), "lr": learning_rate},
            {"params": list(segmenter.head_parameters()), "lr": learning_rate * head_lr_multiplier},
        ],
        lr=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def exponential_decay(optimizer: torch.optim.Optimizer, gamma: float, every: int) -> torch.optim.lr_scheduler.StepLR:
    """lr_t = lr_0 · gamma^floor(t / every) (SLRT Sec. 3.4: decay 0.7 every 950 steps)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=gamma)


def linear_decay(
    optimizer: torch.optim.Optimizer, constant_steps: int, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr constant for `constant_steps`, then linearly to 0 over `decay_steps` (CycleGAN; TD/TF Sec. 4: 10 epochs
    constant, 5 epochs of decay)."""

    def factor(step: int) -> float:
        if step < constant_steps:
            return 1.0
        return max(0.0, 1.0 - (step - constant_steps) / max(1, decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
