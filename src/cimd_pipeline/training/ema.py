"""Exponential moving average of a model's weights, which sampling uses instead of the raw ones."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of ``model`` updated as ``shadow = d * shadow + (1 - d) * weights``.

    With ``warmup`` the decay is ``min(decay, (1 + step) / (10 + step))``: a 0.9999 average is
    right for the reference's 100k+ steps but would barely move from the random initialisation in
    the few thousand steps of a CPU run.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.current_decay(step)
        shadows, lives = [], []
        for shadow, live in zip(self.shadow.state_dict().values(), model.state_dict().values()):
            if shadow.dtype.is_floating_point:
                shadows.append(shadow)
                lives.append(live)  # state_dict() tensors are already detached
            else:
                shadow.copy_(live)
        # Multi-tensor ops, the same arithmetic as ``shadow.mul_(d).add_(live, alpha=1 - d)`` per
        # tensor: that loop was 576 kernel launches per CIMD-AA training step (288 tensors), a
        # step that is launch-bound on a GPU.
        torch._foreach_mul_(shadows, d)
        torch._foreach_add_(shadows, lives, alpha=1 - d)
