"""SuperDiffusion's two pathways (Ciampi et al. 2025), 2D and 3D from nnU-Net plans.

* :class:`MaskPathway` — f_m (eq. 2, 5, 8, 12): a :class:`TimestepConditionedUNet` on
  image ⊕ noisy mask (C_img + K channels) predicting the clean mask x0 as K class logits (with
  nnU-Net's deep supervision when the trainer enables it). Its ``forward(image)`` is the whole
  inference model: one forward from pure noise at a fixed time ``infer_t`` (optionally the mean of
  ``infer_draws`` draws), so stock nnU-Net predicts with it from the image alone;
* the image pathway f_i (eq. 2, 3, 6, 11) is a plain :class:`TimestepConditionedUNet` on
  noisy image ⊕ mask predicting ε, the image recovered by eq. 3 (:func:`reconstruct_image`);
* :func:`mask_noise_input` — the mask pathway's input: "pure noise obtained by adding noise to a
  zero tensor" (eq. 5), q(0 | t) = sqrt(1 − ᾱ_t)·v_m.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semidiff_nnunet.diffusion import alphas_cumprod_from_betas, expand_to, get_beta_schedule, x0_from_eps
from semidiff_nnunet.networks.timestep_unet import TimestepConditionedUNet

__all__ = ["MaskPathway", "mask_noise_input", "reconstruct_image", "alphas_cumprod", "INFER_NOISE"]

INFER_NOISE = ("fixed", "zeros")


def alphas_cumprod(beta_schedule: str, num_timesteps: int) -> Tensor:
    """ᾱ_t, t = 0..T−1, float32 ``(T,)`` of the named β schedule (``semidiff_nnunet.diffusion``)."""
    return alphas_cumprod_from_betas(get_beta_schedule(beta_schedule, num_timesteps)).float()


def mask_noise_input(alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """q_sample of the zero mask: sqrt(ᾱ)·0 + sqrt(1 − ᾱ)·v_m (eq. 1 and 5). ``alpha_bar`` (B,)."""
    return (1 - expand_to(alpha_bar, noise)).sqrt() * noise


def reconstruct_image(noisy_image: Tensor, eps_hat: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 3: î = sqrt(1/ᾱ_t)·ĩ − sqrt(1/ᾱ_t − 1)·v̂_i, i.e. DDPM's x0 from ε (the paper prints a + where
    the inversion of eq. 1 has a −; with the true noise this returns the image exactly)."""
    return x0_from_eps(noisy_image, eps_hat, alpha_bar)


class MaskPathway(nn.Module):
    """f_m: ``mask(image, noisy_mask, t)`` → clean-mask logits; ``forward(image)`` predicts from noise.

    ``alphas_cumprod`` is a non-persistent buffer (rebuilt from the hyperparameters, not stored in
    checkpoints). Inference noise: ``infer_noise="fixed"`` draws v_m from a generator seeded with
    ``infer_seed`` (+ the draw index) on every call, so the same input gives the same output (each
    sliding-window tile sees the same noise field); ``"zeros"`` uses v_m = 0 (the noise's mean).
    ``infer_t`` < 0 means T − 1 (pure noise, eq. 5).
    """

    def __init__(self, unet: TimestepConditionedUNet, num_classes: int, beta_schedule: str = "linear",
                 num_timesteps: int = 1000, infer_t: int = -1, infer_noise: str = "fixed", infer_seed: int = 0,
                 infer_draws: int = 1):
        super().__init__()
        if infer_noise not in INFER_NOISE:
            raise ValueError(f"infer_noise={infer_noise!r}: choose one of {', '.join(INFER_NOISE)}")
        if not -1 <= infer_t < num_timesteps:
            raise ValueError(f"infer_t={infer_t} must lie in [0, {num_timesteps - 1}] (or -1 for T - 1)")
        if infer_draws < 1:
            raise ValueError(f"infer_draws={infer_draws} must be at least 1")
        self.net = unet
        self.num_classes, self.num_timesteps = num_classes, num_timesteps
        self.infer_t = num_timesteps - 1 if infer_t < 0 else infer_t
        self.infer_noise, self.infer_seed, self.infer_draws = infer_noise, infer_seed, infer_draws
        self.register_buffer("alphas_cumprod", alphas_cumprod(beta_schedule, num_timesteps), persistent=False)

    @property
    def decoder(self) -> nn.Module:  # nnU-Net toggles deep supervision through ``network.decoder``
        return self.net.decoder

    def mask(self, image: Tensor, noisy_mask: Tensor, t: Tensor) -> Tensor | list[Tensor]:
        """f_m(i, m̃, t): (B, C_img, *s), (B, K, *s), (B,) → K logits (a list per scale with deep supervision)."""
        return self.net(torch.cat([image, noisy_mask.to(image.dtype)], 1), t)

    def from_noise(self, image: Tensor, noise: Tensor, t: Tensor) -> Tensor | list[Tensor]:
        """f_m(i, v_m, t) with the mask input q(0 | t) built from ``noise`` (B, K, *s) (eq. 5, 8)."""
        return self.mask(image, mask_noise_input(self.alphas_cumprod[t], noise), t)

    def inference_noise(self, image: Tensor, draw: int = 0) -> Tensor:
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        if self.infer_noise == "zeros":
            return torch.zeros(shape, device=image.device, dtype=torch.float32)
        gen = torch.Generator(device=image.device)
        gen.manual_seed(self.infer_seed + draw)
        return torch.randn(shape, generator=gen, device=image.device, dtype=torch.float32)

    def forward(self, image: Tensor, noise: Tensor | None = None, t: Tensor | None = None) -> Tensor | list[Tensor]:
        """The inference model: f_m(image, v_m, infer_t), deterministic; with ``infer_draws`` = K > 1 the
        log of the mean softmax over K noise draws (valid logits: their softmax is the mean). Given
        ``noise`` and ``t``: the training pass :meth:`from_noise` (as the forward, so that DDP sees it)."""
        if noise is not None:
            return self.from_noise(image, noise, t)
        t = torch.full((image.shape[0],), self.infer_t, device=image.device, dtype=torch.long)
        outs = [self.from_noise(image, self.inference_noise(image, k), t) for k in range(self.infer_draws)]
        if len(outs) == 1:
            return outs[0]

        def mean_log_prob(scale_outputs):
            return torch.stack([o.float().softmax(1) for o in scale_outputs]).mean(0).clamp_min(1e-12).log()

        if isinstance(outs[0], (list, tuple)):
            return [mean_log_prob([o[s] for o in outs]) for s in range(len(outs[0]))]
        return mean_log_prob(outs)
