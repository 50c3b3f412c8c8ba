"""Exponential moving average of a network's weights (mean-teacher style)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``self.module``, an EMA copy of ``model``.

    ``update(model, step)`` applies θ' ← α θ' + (1 − α) θ with α = min(1 − 1/(step + 1), decay)
    (Tarvainen & Valpola 2017; SSL4MIS ``update_ema_variables``), so early steps follow the
    student closely. Buffers (BatchNorm/InstanceNorm running stats) are copied. Under DDP the
    student's weights are already identical across ranks after each step, so the EMA is too.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = warmup
        self.module = copy.deepcopy(_unwrap(model))
        self.module.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        step = self.num_updates if step is None else step
        alpha = min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay
        src = _unwrap(model)
        for ema_p, p in zip(self.module.parameters(), src.parameters()):
            ema_p.mul_(alpha).add_(p.detach(), alpha=1.0 - alpha)
        for ema_b, b in zip(self.module.buffers(), src.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))

    def to(self, device) -> EMA:
        self.module.to(device)
        return self


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP and/or torch.compile wrapper."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


_unwrap = unwrap
