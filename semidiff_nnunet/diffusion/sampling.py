"""Forward process, prediction conversions, DDPM / DDIM steps, and two small schedulers.

Math only: no network is called here. Every function takes samples of shape ``(B, C, *spatial)``
(2D or 3D alike) and per-sample coefficients of shape ``(B,)`` (or a scalar), broadcast with
``view(B, *([1] * (x.ndim - 1)))``. The functional core is written in terms of ᾱ (``alpha_bar``),
so the discrete schedulers (``DiffusionScheduler``: integer t, β tables) and the continuous-time
one (``ContinuousScheduler``: t ∈ [0, 1], γ(t) = ᾱ(t), DDP style) share the same steps.

Equations: forward process q(x_t | x_0) (DDPM, Ho et al. 2020, eq. 4); posterior q(x_{t'} | x_t, x_0)
(DDPM eq. 6–7, generalised to any t' < t so that it works over spaced timesteps); DDIM update
(Song et al. 2021, eq. 12, with σ from eq. 16); v-parameterisation (Salimans & Ho 2022, §4 and
App. D); asymmetric time intervals ``t_diff`` (Chen et al. 2022 "Analog Bits", DDP, ProtoDiff
Algorithm 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from semidiff_nnunet.diffusion.schedules import alphas_cumprod_from_betas, get_beta_schedule, get_log_snr_fn

__all__ = [
    "StepOutput",
    "PREDICTION_TYPES",
    "normalize_prediction_type",
    "expand_to",
    "q_sample",
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_from_v",
    "eps_from_v",
    "predictions_to_x0_eps",
    "ddim_step",
    "ddpm_posterior",
    "ddpm_step",
    "spaced_timesteps",
    "asymmetric_time_pairs",
    "DiffusionScheduler",
    "ContinuousScheduler",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_PREDICTION_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon", "pred_noise": "epsilon",
    "sample": "sample", "x0": "sample", "start_x": "sample", "pred_x0": "sample",
    "v_prediction": "v_prediction", "v": "v_prediction", "pred_v": "v_prediction",
}  # fmt: skip


class StepOutput(NamedTuple):
    """Result of one reverse step: ``prev_sample`` (B, C, *spatial) at the earlier time, and the
    (possibly clipped) ``pred_x0`` (B, C, *spatial) it was computed from."""

    prev_sample: Tensor
    pred_x0: Tensor


def normalize_prediction_type(name: str) -> str:
    """Canonical name (diffusers spelling) of a prediction target: ``epsilon``, ``sample`` or
    ``v_prediction``; also accepts lucidrains (``pred_noise``/``pred_x0``/``pred_v``), ``eps``,
    ``x0``, ``v`` and guided-diffusion's ``start_x``."""
    try:
        return _PREDICTION_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown prediction type {name!r}; choose one of {PREDICTION_TYPES}") from None


def expand_to(coef: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or per-sample ``(B,)`` coefficient as a tensor broadcastable against ``x``
    ``(B, C, *spatial)``: shape ``(B, 1, ..., 1)`` (or 0-d), dtype and device of ``x``."""
    coef = torch.as_tensor(coef, device=x.device).to(x.dtype)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"per-sample coefficient must have shape (B,) with B={x.shape[0]}, got {tuple(coef.shape)}"
        )
    return coef.view(coef.shape[0], *([1] * (x.ndim - 1)))


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- forward / conversions
def q_sample(x0: Tensor, alpha_bar: Tensor | float, noise: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε  (DDPM eq. 4). ``x0``, ``noise``: (B, C, *spatial);
    ``alpha_bar``: scalar or (B,)."""
    ab = expand_to(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x_0 = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)  (DDPM eq. 4 inverted; DDIM eq. 12's "predicted x_0")."""
    ab = expand_to(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """ε = (x_t − sqrt(ᾱ) x_0) / sqrt(1 − ᾱ); the denominator is clamped at 1e-8 (as DDP does),
    so ᾱ = 1 gives a finite (irrelevant) value instead of NaN."""
    ab = expand_to(alpha_bar, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt().clamp(min=1e-8)


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x_0  (Salimans & Ho 2022, §4: v ≡ α_t ε − σ_t x)."""
    ab = expand_to(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x_0 = sqrt(ᾱ) x_t − sqrt(1 − ᾱ) v  (Salimans & Ho 2022, App. D)."""
    ab = expand_to(alpha_bar, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """ε = sqrt(1 − ᾱ) x_t + sqrt(ᾱ) v  (Salimans & Ho 2022, App. D)."""
    ab = expand_to(alpha_bar, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


def predictions_to_x0_eps(
    model_output: Tensor,
    x_t: Tensor,
    alpha_bar: Tensor | float,
    prediction_type: str,
    clip_range: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) implied by a network output of the given ``prediction_type`` at noise level ᾱ.

    With ``clip_range`` the predicted x_0 is clamped to [−clip_range, clip_range] and ε̂ is then
    recomputed from (x_t, clamped x̂_0), as guided-diffusion's ``clip_denoised=True`` + DDIM do
    (DiffRect samples this way; its training does not clip). All tensors (B, C, *spatial).
    """
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        eps = model_output
        x0 = x0_from_eps(x_t, eps, alpha_bar)
    elif kind == "sample":
        x0 = model_output
        eps = None
    else:
        x0 = x0_from_v(x_t, model_output, alpha_bar)
        eps = eps_from_v(x_t, model_output, alpha_bar)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
        eps = None
    if eps is None:
        eps = eps_from_x0(x_t, x0, alpha_bar)
    return x0, eps


# ------------------------------------------------------------------------------------ reverse steps
def ddim_step(
    x_t: Tensor,
    x0: Tensor,
    eps: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update from time t to an earlier time t' (DDIM, Song et al. 2021, eq. 12):

    x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 − ᾱ_{t'} − σ²) ε̂ + σ z,
    σ = η · sqrt((1 − ᾱ_{t'}) / (1 − ᾱ_t)) · sqrt(1 − ᾱ_t / ᾱ_{t'})   (eq. 16).

    η = 0 is the deterministic DDIM sampler (no noise is drawn at all); η = 1 gives DDPM's
    posterior variance. t' may be any earlier time (spaced or asymmetric steps); ᾱ_{t'} = 1
    returns x̂_0. ``x_t``, ``x0``, ``eps``, ``noise``: (B, C, *spatial); ᾱ's scalar or (B,).
    """
    ab_t, ab_prev = expand_to(alpha_bar_t, x_t), expand_to(alpha_bar_prev, x_t)
    out = ab_prev.sqrt() * x0
    if eta == 0:
        return out + (1 - ab_prev).clamp(min=0).sqrt() * eps
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
    if noise is None:
        noise = _randn_like(x_t, generator)
    return out + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise


def ddpm_posterior(
    x0: Tensor, x_t: Tensor, alpha_bar_t: Tensor | float, alpha_bar_prev: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t'} | x_t, x_0) (DDPM eq. 6–7) for any t' < t.

    With α = ᾱ_t/ᾱ_{t'} and β = 1 − α (the step's β; equal to β_t for consecutive steps, the
    respaced β of guided-diffusion's ``SpacedDiffusion`` otherwise):
    μ̃ = sqrt(ᾱ_{t'}) β / (1 − ᾱ_t) · x_0 + sqrt(α) (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t,
    β̃ = β (1 − ᾱ_{t'}) / (1 − ᾱ_t).
    Returns ``mean`` (B, C, *spatial) and ``variance`` broadcastable (B, 1, ..., 1).
    """
    ab_t, ab_prev = expand_to(alpha_bar_t, x_t), expand_to(alpha_bar_prev, x_t)
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    mean = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab_t) * x_t
    variance = beta * (1 - ab_prev) / (1 - ab_t)
    return mean, variance


def ddpm_step(
    x_t: Tensor,
    x0: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    variance_type: str = "fixed_small",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One ancestral DDPM step (DDPM Alg. 2, written with x̂_0): x_{t'} = μ̃(x_t, x̂_0) + s z.

    ``variance_type``: ``fixed_small`` s² = β̃ (posterior variance), ``fixed_large`` s² = β (the
    step's β; DiffRect's FIXED_LARGE). No noise is added where ᾱ_{t'} = 1 (the last step to x_0).
    """
    mean, variance = ddpm_posterior(x0, x_t, alpha_bar_t, alpha_bar_prev)
    if variance_type == "fixed_large":
        ab_t, ab_prev = expand_to(alpha_bar_t, x_t), expand_to(alpha_bar_prev, x_t)
        variance = 1 - ab_t / ab_prev
    elif variance_type != "fixed_small":
        raise ValueError(f"unknown variance_type {variance_type!r}; choose 'fixed_small' or 'fixed_large'")
    if noise is None:
        noise = _randn_like(x_t, generator)
    nonzero = (expand_to(alpha_bar_prev, x_t) < 1).to(x_t.dtype)
    return mean + nonzero * variance.clamp(min=0).sqrt() * noise


# ---------------------------------------------------------------------------------------- time grids
def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> Tensor:
    """Evenly spaced sampling timesteps, in sampling (descending) order, long ``(num_steps,)``.

    Same set as guided-diffusion's ``space_timesteps(T, [num_steps])``: round(i·(T−1)/(n−1)),
    i = 0..n−1, so the first and last original steps are always kept (DiffRect: T=10, n=2 → [9, 0]).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_train_timesteps - 1], dtype=torch.long)
    stride = (num_train_timesteps - 1) / (num_steps - 1)
    steps = sorted({round(i * stride) for i in range(num_steps)}, reverse=True)
    return torch.tensor(steps, dtype=torch.long)


def asymmetric_time_pairs(num_steps: int, t_diff: float = 0.0, t_min: float = 0.0) -> Tensor:
    """Continuous (t_now, t_next) pairs, float64 ``(num_steps, 2)``, t from 1 down to ``t_min``.

    ProtoDiff (Xi et al. 2025) Algorithm 2 / DDP ``_get_sampling_timesteps``:
    t_now = 1 − (i/n)(1 − t_min),  t_next = max(1 − ((i + 1 + t_diff)/n)(1 − t_min), t_min).
    ``t_diff`` > 0 makes the step land at a less noisy time than the next network call is told
    (asymmetric intervals; ProtoDiff uses t_diff = 1). ``t_diff = 0`` is the plain uniform grid.
    """
    i = torch.arange(num_steps, dtype=torch.float64)
    t_now = 1 - i / num_steps * (1 - t_min)
    t_next = (1 - (i + 1 + t_diff) / num_steps * (1 - t_min)).clamp(min=t_min)
    return torch.stack([t_now, t_next], dim=1)


# -------------------------------------------------------------------------------------- schedulers
class DiffusionScheduler:
    """Discrete-time Gaussian diffusion (DDPM/DDIM) with integer timesteps ``t ∈ {0..T−1}``.

    ``add_noise``/``q_sample`` for training; ``set_timesteps`` + ``step`` for sampling over
    spaced timesteps, with the DDIM (η) or ancestral DDPM update. ``t = −1`` means clean data
    (ᾱ = 1). Configurations used here: DiffRect ``DiffusionScheduler(10, "cosine",
    prediction_type="sample", clip_sample=True)`` + ``set_timesteps(2)`` (DDIM, η=0, steps [9, 0]);
    SuperDiffusion ``DiffusionScheduler(1000, "sigmoid", prediction_type="epsilon" | "sample")``.

    Args:
        num_train_timesteps: T.
        beta_schedule: ``linear``, ``cosine`` or ``sigmoid`` (see ``schedules``); ignored if ``betas``.
        betas: explicit β table ``(T,)``.
        prediction_type: what the network predicts: ``epsilon``, ``sample`` (x_0) or ``v_prediction``.
        sampler: ``ddim`` or ``ddpm``, the update used by ``step``.
        eta: DDIM η (0 = deterministic).
        variance_type: DDPM step variance, ``fixed_small`` (β̃) or ``fixed_large`` (β).
        clip_sample: clamp x̂_0 to [−clip_range, clip_range] in ``step`` (guided-diffusion ``clip_denoised``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        *,
        betas: Tensor | None = None,
        prediction_type: str = "epsilon",
        sampler: str = "ddim",
        eta: float = 0.0,
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        clip_range: float = 1.0,
        **schedule_kwargs,
    ):
        if betas is None:
            betas = get_beta_schedule(beta_schedule, num_train_timesteps, **schedule_kwargs)
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        if self.betas.ndim != 1 or self.betas.shape[0] != num_train_timesteps:
            raise ValueError(f"betas must have shape ({num_train_timesteps},), got {tuple(self.betas.shape)}")
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.prediction_type = normalize_prediction_type(prediction_type)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddim' or 'ddpm'")
        self.sampler = sampler
        self.eta = float(eta)
        self.variance_type = variance_type
        self.clip_sample = bool(clip_sample)
        self.clip_range = float(clip_range)
        # ᾱ with a leading 1 for t = -1 (clean data), cached per device.
        self._padded = {
            torch.device("cpu"): torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        }
        self.set_timesteps(num_train_timesteps)

    @property
    def _clip(self) -> float | None:
        return self.clip_range if self.clip_sample else None

    # -- schedule lookups
    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """ᾱ_t (float64), same shape as ``t`` (int or long ``(B,)``); ᾱ_{−1} = 1."""
        t = torch.as_tensor(t, dtype=torch.long)
        if ((t < -1) | (t >= self.num_train_timesteps)).any():
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}]")
        table = self._padded.get(t.device)
        if table is None:
            table = self._padded[t.device] = self._padded[torch.device("cpu")].to(t.device)
        return table[t + 1]

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (lucidrains' pred_x0 loss weight), float64."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def sample_timesteps(
        self, batch_size: int, device=None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training timesteps t ~ U{0..T−1}, long ``(batch_size,)``."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device, generator=generator)

    # -- forward process
    def q_sample(
        self,
        x0: Tensor,
        t: Tensor | int,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x_t ~ q(x_t | x_0) (DDPM eq. 4). ``x0`` (B, C, *spatial); ``t`` int or (B,);
        ``noise`` defaults to a fresh N(0, I) draw."""
        if noise is None:
            noise = _randn_like(x0, generator)
        return q_sample(x0, self.alpha_bar(t), noise)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """diffusers-style alias of ``q_sample(x0, t, noise)``."""
        return q_sample(x0, self.alpha_bar(t), noise)

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Training target for ``v_prediction``: v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0."""
        return v_from_x0_eps(x0, noise, self.alpha_bar(t))

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """What the network should output for (x_0, ε, t) under ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.get_velocity(x0, noise, t)

    def predict_x0_eps(self, model_output: Tensor, sample: Tensor, t: Tensor | int, clip: bool | None = None):
        """(x̂_0, ε̂) from a network output at x_t = ``sample``; ``clip`` defaults to ``clip_sample``."""
        clip = self.clip_sample if clip is None else clip
        return predictions_to_x0_eps(
            model_output, sample, self.alpha_bar(t), self.prediction_type, self.clip_range if clip else None
        )

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int | None = None):
        """Mean and variance of q(x_{t_prev} | x_t, x_0); ``t_prev`` defaults to ``prev_timestep(t)``."""
        t_prev = self.prev_timestep(t) if t_prev is None else t_prev
        return ddpm_posterior(x0, x_t, self.alpha_bar(t), self.alpha_bar(t_prev))

    # -- sampling
    def set_timesteps(self, num_inference_steps: int, t_diff: int = 0, timesteps=None) -> Tensor:
        """Choose the sampling timesteps: evenly spaced (``spaced_timesteps``) or an explicit list.

        ``self.timesteps`` (long, descending) are the times the network is called at; step i
        moves the sample to ``self.prev_timesteps[i] = timesteps[i + 1 + t_diff]`` (−1, i.e. x_0,
        past the end). ``t_diff`` > 0 gives ProtoDiff's asymmetric intervals in units of steps.
        Returns ``self.timesteps``.
        """
        if timesteps is None:
            ts = spaced_timesteps(self.num_train_timesteps, num_inference_steps)
        else:
            ts = torch.as_tensor(timesteps, dtype=torch.long)
            if (
                ts.ndim != 1
                or (ts[1:] >= ts[:-1]).any()
                or ts.min() < 0
                or ts.max() >= self.num_train_timesteps
            ):
                raise ValueError("timesteps must be strictly decreasing integers in [0, T-1]")
        if t_diff < 0 or int(t_diff) != t_diff:
            raise ValueError(f"t_diff must be a non-negative integer number of steps, got {t_diff}")
        n = ts.shape[0]
        padded = torch.cat([ts, torch.full((int(t_diff) + 1,), -1, dtype=torch.long)])
        self.timesteps = ts
        self.prev_timesteps = padded[1 + int(t_diff) : 1 + int(t_diff) + n]
        self._prev_table = torch.full((self.num_train_timesteps,), -2, dtype=torch.long)
        self._prev_table[ts] = self.prev_timesteps
        return self.timesteps

    def prev_timestep(self, t: Tensor | int) -> Tensor:
        """The timestep ``step`` moves to from ``t`` under the current ``set_timesteps``."""
        t = torch.as_tensor(t, dtype=torch.long)
        prev = self._prev_table[t.cpu()].to(t.device)
        if (prev == -2).any():
            raise ValueError(
                f"timestep(s) {t.tolist()} are not in the grid set by set_timesteps: {self.timesteps.tolist()}"
            )
        return prev

    def step(
        self,
        model_output: Tensor,
        t: Tensor | int,
        sample: Tensor,
        *,
        t_prev: Tensor | int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """One reverse step from x_t = ``sample`` (B, C, *spatial) at ``t`` (int or (B,)) to ``t_prev``
        (default: the grid of ``set_timesteps``) with the configured sampler (DDIM eq. 12, or
        DDPM's posterior). ``eta`` overrides the DDIM η of the constructor for this call."""
        t_prev = self.prev_timestep(t) if t_prev is None else t_prev
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0, eps = predictions_to_x0_eps(model_output, sample, ab_t, self.prediction_type, self._clip)
        if self.sampler == "ddim":
            eta = self.eta if eta is None else eta
            prev = ddim_step(sample, x0, eps, ab_t, ab_prev, eta=eta, noise=noise, generator=generator)
        else:
            prev = ddpm_step(sample, x0, ab_t, ab_prev, self.variance_type, noise=noise, generator=generator)
        return StepOutput(prev, x0)


class ContinuousScheduler:
    """Continuous-time diffusion with t ∈ [0, 1] and γ(t) = ᾱ(t) from a log-SNR schedule, as in
    DDP-style label diffusion (DDP, Diff-CL's diffusion branch, ProtoDiff).

    The network is usually conditioned on ``log_snr(t)`` (DDP feeds it to its time MLP) and
    predicts x_0 (``prediction_type="sample"``). Sampling: ``set_timesteps(n, t_diff)`` gives
    ``time_pairs`` (ProtoDiff Algorithm 2), and ``step`` applies DDIM (η=0: DDP's ``ddim_step``,
    x_next = α_next x̂_0 + σ_next ε̂).

    Args:
        schedule: ``cosine`` (γ = cos²((t + ns)/(1 + ds)·π/2)) or ``linear`` (γ = exp(−1e-4 − 10t²)).
        prediction_type, eta, clip_sample, clip_range: as in ``DiffusionScheduler``.
        **schedule_kwargs: passed to the log-SNR function (e.g. ``ns``, ``ds`` for cosine).
    """

    def __init__(
        self,
        schedule: str = "cosine",
        *,
        prediction_type: str = "sample",
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_range: float = 1.0,
        **schedule_kwargs,
    ):
        self._log_snr = get_log_snr_fn(schedule)
        self._schedule_kwargs = schedule_kwargs
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.eta = float(eta)
        self.clip_sample = bool(clip_sample)
        self.clip_range = float(clip_range)
        self.set_timesteps(1)

    @property
    def _clip(self) -> float | None:
        return self.clip_range if self.clip_sample else None

    def log_snr(self, t: Tensor | float) -> Tensor:
        """log(γ/(1 − γ)) at ``t`` (any shape; computed in float64 for floats and float64 tensors)."""
        t = t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)
        return self._log_snr(t, **self._schedule_kwargs)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """γ(t) = sigmoid(log SNR(t)), the continuous ᾱ."""
        return torch.sigmoid(self.log_snr(torch.as_tensor(t, dtype=torch.float64)))

    def sample_times(
        self, batch_size: int, t_min: float = 0.0, t_max: float = 1.0, device=None, generator=None
    ) -> Tensor:
        """Training times t ~ U(t_min, t_max), float32 ``(batch_size,)`` (DDP: U(0, 0.999))."""
        u = torch.rand(batch_size, device=device, generator=generator)
        return t_min + (t_max - t_min) * u

    def q_sample(self, x0: Tensor, t: Tensor | float, noise: Tensor | None = None, generator=None) -> Tensor:
        """x_t = sqrt(γ(t)) x_0 + sqrt(1 − γ(t)) ε. ``x0`` (B, C, *spatial); ``t`` float or (B,)."""
        if noise is None:
            noise = _randn_like(x0, generator)
        return q_sample(x0, self.alpha_bar(t), noise)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """diffusers-style alias of ``q_sample(x0, t, noise)``."""
        return q_sample(x0, self.alpha_bar(t), noise)

    def set_timesteps(self, num_inference_steps: int, t_diff: float = 0.0, t_min: float = 0.0) -> Tensor:
        """``self.time_pairs`` = ``asymmetric_time_pairs(n, t_diff, t_min)`` (float64 (n, 2)),
        ``self.timesteps`` = its first column. Returns ``self.time_pairs``."""
        self.time_pairs = asymmetric_time_pairs(num_inference_steps, t_diff, t_min)
        self.timesteps = self.time_pairs[:, 0]
        return self.time_pairs

    def step(
        self,
        model_output: Tensor,
        t: Tensor | float,
        sample: Tensor,
        *,
        t_next: Tensor | float | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """DDIM step from x_t = ``sample`` at time ``t`` to ``t_next`` (default: the pair of ``t`` in
        ``time_pairs``). ``sample`` (B, C, *spatial); ``t``, ``t_next`` float or (B,)."""
        if t_next is None:
            t0 = float(torch.as_tensor(t).reshape(-1)[0])
            match = torch.isclose(self.time_pairs[:, 0], torch.tensor(t0, dtype=torch.float64))
            if not match.any():
                raise ValueError(f"t={t0} is not in time_pairs; pass t_next or call set_timesteps")
            t_next = float(self.time_pairs[match.nonzero()[0, 0], 1])
        ab_t, ab_next = self.alpha_bar(t), self.alpha_bar(t_next)
        x0, eps = predictions_to_x0_eps(model_output, sample, ab_t, self.prediction_type, self._clip)
        eta = self.eta if eta is None else eta
        return StepOutput(
            ddim_step(sample, x0, eps, ab_t, ab_next, eta=eta, noise=noise, generator=generator), x0
        )
