"""Feature-space perturbations (CCT, URPC) for feature maps shaped (B, C, *spatial), 2D or 3D.

Definitions follow Ouali et al. 2020 §3.2 and their code (yassouali/CCT ``decoders.py``),
which SSL4MIS reuses for ``UNet_CCT`` and ``UNet_URPC``:

* ``feature_noise``: x + x ⊙ N, N ~ U(−r, r) of shape (C, *spatial) shared across the batch, r = 0.3;
* ``feature_dropout``: zero the voxels whose channel-mean activation exceeds γ·max, γ ~ U(0.7, 0.9)
  (one γ per sample here; one per call in the reference code);
* ``channel_dropout``: spatial dropout (whole channels, rescaled by 1/(1−p)), CCT p = 0.3,
  SSL4MIS's URPC p = 0.5; the n-D form of ``Dropout2d``.

All draw from torch's RNG (reproducible with the trainer's seed) and are active regardless of
``module.training``; callers only apply them during training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn


def feature_noise(x: Tensor, uniform_range: float = 0.3) -> Tensor:
    noise = (torch.rand(x.shape[1:], device=x.device, dtype=x.dtype) * 2 - 1) * uniform_range
    return x + x * noise.unsqueeze(0)


def feature_dropout(x: Tensor, low: float = 0.7, high: float = 0.9) -> Tensor:
    attention = x.mean(1, keepdim=True)
    peak = attention.flatten(1).max(1).values.view(-1, *([1] * (x.dim() - 1)))
    gamma = low + (high - low) * torch.rand_like(peak)
    return x * (attention < peak * gamma).to(x.dtype)


def channel_dropout(x: Tensor, p: float = 0.3) -> Tensor:
    if p <= 0:
        return x
    keep = (torch.rand(x.shape[:2] + (1,) * (x.dim() - 2), device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


PERTURBATIONS: dict[str, Callable[..., Tensor]] = {
    "feature_noise": feature_noise,
    "feature_dropout": feature_dropout,
    "dropout": channel_dropout,
}


def parse_perturbations(value: str) -> list[str]:
    """The specs of a comma-separated list (``"feature_noise:0.3,dropout"``), each checked: a known name,
    and a number after the colon where the perturbation takes one (``feature_dropout`` takes none).
    Raises ``ValueError`` with one sentence."""
    specs = [s.strip() for s in value.split(",") if s.strip()]
    for spec in specs:
        get_perturbation(spec)
    return specs


def get_perturbation(spec: str) -> Callable[[Tensor], Tensor]:
    """``"dropout"``, ``"dropout:0.5"``, ``"feature_noise:0.3"``, ``"feature_dropout"`` -> callable."""
    name, _, arg = spec.partition(":")
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {', '.join(PERTURBATIONS)}")
    if arg and name == "feature_dropout":
        raise ValueError(f"{spec!r}: feature_dropout takes no value (write feature_dropout)")
    if arg:
        try:
            float(arg)
        except ValueError:
            raise ValueError(f"{spec!r}: the value after the colon must be a number, e.g. {name}:0.3") from None
    return partial(PERTURBATIONS[name], **({"p" if name == "dropout" else "uniform_range": float(arg)}
                                            if arg and name != "feature_dropout" else {}))


@contextlib.contextmanager
def perturbed_inputs(pairs: list[tuple[nn.Module, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """Within the block, each module's first input passes through its perturbation (forward pre-hooks)."""
    handles = [m.register_forward_pre_hook(lambda _m, args, f=f: (f(args[0]), *args[1:])) for m, f in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
