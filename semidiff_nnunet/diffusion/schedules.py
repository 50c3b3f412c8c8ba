"""Noise schedules: discrete β_t tables and continuous-time γ(t) = ᾱ(t).

Conventions (the same as OpenAI guided-diffusion, which DiffRect vendors, and lucidrains
``denoising-diffusion-pytorch``, which SuperDiffusion uses):

* Discrete: T steps indexed ``t = 0 .. T-1``; ``betas[t] = β_t``;
  ``alphas_cumprod[t] = ᾱ_t = ∏_{i<=t} (1 − β_i)``; ``t = -1`` stands for the clean data (ᾱ = 1).
  Tables are float64 tensors of shape ``(T,)``; cast them at the point of use.
* Continuous: ``t ∈ [0, 1]``, ``t = 1`` is (almost) pure noise; ``γ(t) = ᾱ(t) = α(t)²`` and
  ``σ(t)² = 1 − γ(t)``. DDP-style label diffusion (Ji et al. 2023, "DDP: Diffusion model for dense
  visual prediction"; used by Diff-CL and ProtoDiff) works with ``log SNR(t) = log(γ / (1 − γ))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "linear_beta_schedule",
    "cosine_beta_schedule",
    "sigmoid_beta_schedule",
    "betas_for_alpha_bar",
    "get_beta_schedule",
    "alphas_cumprod_from_betas",
    "BETA_SCHEDULES",
    "cosine_log_snr",
    "linear_log_snr",
    "log_snr_to_alpha_sigma",
    "continuous_gamma",
    "get_log_snr_fn",
    "LOG_SNR_SCHEDULES",
]


# --------------------------------------------------------------------------- discrete (β tables)
def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> Tensor:
    """β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta) for t = 0..T-1 (guided-diffusion helper).

    Returns float64 ``(T,)``. The cap keeps the last step (where ᾱ → 0) from being singular.
    """
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float64)


def linear_beta_schedule(
    num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None
) -> Tensor:
    """Linear β from DDPM (Ho et al. 2020, §4): ``linspace(1e-4, 0.02, T)`` for T=1000.

    As in guided-diffusion / lucidrains, the defaults are rescaled by ``1000 / T`` so that any T
    spans the same total noise. Returns float64 ``(T,)``.
    """
    scale = 1000.0 / num_timesteps
    beta_start = scale * 1e-4 if beta_start is None else beta_start
    beta_end = scale * 0.02 if beta_end is None else beta_end
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ + s)/(1 + s)·π/2).

    ``β_t = min(1 − f((t+1)/T)/f(t/T), max_beta)``, so ``ᾱ_t = f((t+1)/T)/f(0)`` wherever the cap
    is not hit (in practice everywhere but the last step). This is guided-diffusion's
    ``get_named_beta_schedule("cosine", T)``, used by DiffRect with T=10. Returns float64 ``(T,)``.
    """
    return betas_for_alpha_bar(
        num_timesteps, lambda tau: math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2, max_beta=max_beta
    )


def sigmoid_beta_schedule(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid schedule (Jabri et al. 2022, arXiv 2212.11972, Fig. 8) as in lucidrains
    ``denoising-diffusion-pytorch`` 2.x ``sigmoid_beta_schedule`` (its default; SuperDiffusion, T=1000).

    ᾱ(τ) = (σ(end/tau) − σ((τ(end − start) + start)/tau)) / (σ(end/tau) − σ(start/tau)), τ = t/T,
    ``β_t = clip(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0, max_beta)``. ᾱ(1) = 0, so the last β is the cap.
    Returns float64 ``(T,)``.
    """
    tt = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    v_start = torch.tensor(start / tau, dtype=torch.float64).sigmoid()
    v_end = torch.tensor(end / tau, dtype=torch.float64).sigmoid()
    ab = (v_end - ((tt * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    ab = ab / ab[0]
    betas = 1.0 - ab[1:] / ab[:-1]
    return betas.clamp(0.0, max_beta)


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def get_beta_schedule(name: str, num_timesteps: int, **kwargs) -> Tensor:
    """β table ``(T,)`` float64 of the schedule called ``name`` (``linear``, ``cosine``, ``sigmoid``)."""
    try:
        fn = BETA_SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}") from None
    return fn(num_timesteps, **kwargs)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{i<=t} (1 − β_i) (DDPM eq. 4 notation). ``(T,)`` → ``(T,)``."""
    return torch.cumprod(1.0 - betas, dim=0)


# ------------------------------------------------------------------- continuous time (log SNR, γ)
def _as_tensor(t: Tensor | float) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


def cosine_log_snr(t: Tensor | float, ns: float = 0.0002, ds: float = 0.00025, eps: float = 1e-5) -> Tensor:
    """log SNR of the continuous cosine schedule used by DDP / Bit Diffusion label diffusion.

    γ(t) = cos²((t + ns)/(1 + ds)·π/2), log SNR = log(γ/(1 − γ)) = −log(cos⁻²(·) − 1), with
    ``cos⁻² − 1`` clamped below at ``eps`` (so γ(0) = 1/(1 + eps), not ≈ 1). Defaults are DDP's
    ``alpha_cosine_log_snr(t, ns=0.0002, ds=0.00025)``. ``t``: any shape, in [0, 1].
    """
    t = _as_tensor(t)
    x = torch.cos((t + ns) / (1 + ds) * math.pi * 0.5) ** -2 - 1
    return -torch.log(x.clamp(min=eps))


def linear_log_snr(t: Tensor | float) -> Tensor:
    """log SNR of the continuous limit of DDPM's linear β (Bit Diffusion / DDP ``beta_linear_log_snr``).

    log SNR = −log(expm1(1e-4 + 10 t²)), i.e. γ(t) = exp(−(1e-4 + 10 t²)).
    """
    t = _as_tensor(t)
    return -torch.log(torch.special.expm1(1e-4 + 10 * t**2))


LOG_SNR_SCHEDULES: dict[str, Callable[..., Tensor]] = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def get_log_snr_fn(name: str) -> Callable[..., Tensor]:
    """The continuous log-SNR function called ``name`` (``cosine`` or ``linear``)."""
    try:
        return LOG_SNR_SCHEDULES[name]
    except KeyError:
        raise ValueError(
            f"unknown continuous schedule {name!r}; choose one of {sorted(LOG_SNR_SCHEDULES)}"
        ) from None


def log_snr_to_alpha_sigma(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) = (sqrt(sigmoid(λ)), sqrt(sigmoid(−λ))), so α² = γ, α² + σ² = 1. Same shape as ``log_snr``."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def continuous_gamma(t: Tensor | float, schedule: str = "cosine", **kwargs) -> Tensor:
    """γ(t) = ᾱ(t) = sigmoid(log SNR(t)) of a continuous schedule; ``t`` any shape in [0, 1]."""
    return torch.sigmoid(get_log_snr_fn(schedule)(t, **kwargs))
