"""An exponential moving average of a network's weights: what sampling and the next stage use."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Ema:
    """Exponential moving average of the weights, kept on every rank (DDP keeps the weights identical).
    The decay warms up as min(decay, (1+step)/(10+step)), so short runs are not stuck at their init."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.module.parameters(), module.parameters()):
            ema.lerp_(p.detach(), 1 - decay)
        for ema, b in zip(self.module.buffers(), module.buffers()):
            ema.copy_(b)
