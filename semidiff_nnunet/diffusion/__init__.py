"""Diffusion toolkit shared by the diffusion-based methods: math only, no networks.

* ``schedules``: β tables (linear, cosine, sigmoid) and continuous-time log SNR / γ(t).
* ``sampling``: q_sample, x0/ε/v conversions, DDPM and DDIM steps, spaced and asymmetric time
  grids, and the schedulers ``DiffusionScheduler`` (integer t) and ``ContinuousScheduler`` (t ∈ [0, 1]).
* ``embedding``: sinusoidal timestep embedding and its MLP module.
* ``labels``: integer labels ↔ one-hot ↔ [−1, 1]·scale.

All sample tensors are ``(B, C, *spatial)`` (2D or 3D); per-sample coefficients are ``(B,)``.
Hand-written rather than taken from diffusers: the project does not depend on diffusers, DiffRect
needs guided-diffusion's spacing and clipping semantics and DDP/ProtoDiff need continuous time with
asymmetric steps, which diffusers' schedulers do not offer; the module is small and tested against
closed forms (tests/test_diffusion.py).
"""

from semidiff_nnunet.diffusion.embedding import TimestepEmbedding, get_timestep_embedding
from semidiff_nnunet.diffusion.labels import (
    labels_to_onehot,
    labels_to_signed,
    onehot_to_signed,
    signed_to_labels,
    signed_to_onehot_probs,
)
from semidiff_nnunet.diffusion.sampling import (
    PREDICTION_TYPES,
    ContinuousScheduler,
    DiffusionScheduler,
    StepOutput,
    asymmetric_time_pairs,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    eps_from_v,
    eps_from_x0,
    expand_to,
    normalize_prediction_type,
    predictions_to_x0_eps,
    q_sample,
    spaced_timesteps,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from semidiff_nnunet.diffusion.schedules import (
    BETA_SCHEDULES,
    LOG_SNR_SCHEDULES,
    alphas_cumprod_from_betas,
    betas_for_alpha_bar,
    continuous_gamma,
    cosine_beta_schedule,
    cosine_log_snr,
    get_beta_schedule,
    get_log_snr_fn,
    linear_beta_schedule,
    linear_log_snr,
    log_snr_to_alpha_sigma,
    sigmoid_beta_schedule,
)

__all__ = [
    # schedules
    "BETA_SCHEDULES",
    "LOG_SNR_SCHEDULES",
    "alphas_cumprod_from_betas",
    "betas_for_alpha_bar",
    "continuous_gamma",
    "cosine_beta_schedule",
    "cosine_log_snr",
    "get_beta_schedule",
    "get_log_snr_fn",
    "linear_beta_schedule",
    "linear_log_snr",
    "log_snr_to_alpha_sigma",
    "sigmoid_beta_schedule",
    # sampling
    "PREDICTION_TYPES",
    "ContinuousScheduler",
    "DiffusionScheduler",
    "StepOutput",
    "asymmetric_time_pairs",
    "ddim_step",
    "ddpm_posterior",
    "ddpm_step",
    "eps_from_v",
    "eps_from_x0",
    "expand_to",
    "normalize_prediction_type",
    "predictions_to_x0_eps",
    "q_sample",
    "spaced_timesteps",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
    # embedding
    "TimestepEmbedding",
    "get_timestep_embedding",
    # labels
    "labels_to_onehot",
    "labels_to_signed",
    "onehot_to_signed",
    "signed_to_labels",
    "signed_to_onehot_probs",
]
