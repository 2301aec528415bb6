"""Exponential moving average of a model's weights, the copy that sampling and evaluation use.

Diffusion models sample markedly better from an EMA of their weights than from the raw training
weights (Karras et al. 2022; DIAMOND keeps one too): the raw weights jitter with every batch's
noise draw, and a few-step sampler amplifies that jitter over a long rollout.

The average is kept in a full copy of the module (same class, same config), so the EMA model is a
drop-in `WorldModel` for rollouts. Buffers (running statistics, fixed tables) are copied, not
averaged. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first
hundreds of steps are not dominated by the random initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (call after each optimizer step)."""
        decay = self.current_decay()
        own = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            # lerp_(p, w) = avg + w * (p - avg): the average keeps `decay` of itself.
            own[name].lerp_(param.detach(), 1.0 - decay)
        own_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            own_buffers[name].copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(tensors)
        self.num_updates = int(num_updates)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self
