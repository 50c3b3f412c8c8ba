"""DiffRect's latent flow rectification (LFR): the diffusion over the rectifier's bottleneck.

Schedule and loss code kept apart from the network (:class:`~.networks.RectificationNet`):

* :meth:`LatentRectification.loss_and_logits` — training (paper eq. 7–11): z = B_sem(image,
  condition colour); x_start = the bottleneck of (image, target colour) without gradient; x_t =
  q_sample(x_start, t), t ~ U{0..T−1}; x̂_0 = ε(x_t, t, z); returns ``(MSE(x̂_0, x_start), logits)``
  with the decoder run on z's skips and x̂_0 (the authors' ``ldm_method='replace'``);
* :meth:`LatentRectification.sample` — rectified logits (paper eq. 12 with DDIM, as the code):
  x_T ~ N(0, I) shaped like z, ``sample_steps`` DDIM steps (η = 0, x̂_0 clamped to [−1, 1] when
  ``clip_sample``: the guided-diffusion default at sampling, not in training — a code quirk kept).

Authors' schedule (``train_diffrect_ACDC.py``): T = 10, cosine β, x0-prediction, 2 DDIM steps [9, 0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff_nnunet.diffusion import DiffusionScheduler
from semidiff_nnunet.plugins.diffrect.networks import RectificationNet


class LatentRectification:
    def __init__(self, num_timesteps: int = 10, beta_schedule: str = "cosine", sample_steps: int = 2,
                 clip_sample: bool = True):
        self.scheduler = DiffusionScheduler(num_timesteps, beta_schedule, prediction_type="sample", sampler="ddim",
                                            eta=0.0, clip_sample=clip_sample)
        self.scheduler.set_timesteps(sample_steps)

    def loss_and_logits(self, net: RectificationNet, image: Tensor, cond_colour: Tensor, guidance: Tensor,
                        target_colour: Tensor) -> tuple[Tensor, Tensor]:
        """(latent MSE, logits (B, C, *spatial)) for one training pass; ``guidance`` (B,) float. ``net``
        may be DDP-wrapped: the pass runs as the network's forward."""
        return net(self._loss_and_logits, image, cond_colour, guidance, target_colour)

    def _loss_and_logits(self, net: RectificationNet, image: Tensor, cond_colour: Tensor, guidance: Tensor,
                         target_colour: Tensor) -> tuple[Tensor, Tensor]:
        temb = net.embed(guidance)
        img, feats = net.context(image, cond_colour, temb)
        with torch.no_grad():
            x_start = net.encode(image, target_colour, temb, img)[-1]
        t = self.scheduler.sample_timesteps(x_start.shape[0], device=x_start.device)
        x_t = self.scheduler.q_sample(x_start, t)
        pred = net.denoiser(x_t, t, feats[-1])
        return F.mse_loss(pred.float(), x_start.float()), net.decode(feats, pred, temb)

    @torch.no_grad()
    def sample(self, net: RectificationNet, image: Tensor, cond_colour: Tensor, guidance: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
        """Rectified logits (B, C, *spatial), no gradient: DDIM over ``scheduler.timesteps`` from N(0, I)."""
        net = getattr(net, "module", net)  # no gradient: the DDP wrapper is not needed
        temb = net.embed(guidance)
        _, feats = net.context(image, cond_colour, temb)
        cond = feats[-1]
        x = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        for t in self.scheduler.timesteps.tolist():
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x = self.scheduler.step(net.denoiser(x, tt, cond), tt, x).prev_sample.to(cond.dtype)
        return net.decode(feats, x, temb)


def latent_diffusion_head(width: int, latent_shape, arch_kwargs: dict | None = None, *, num_timesteps: int = 10,
                          beta_schedule: str = "cosine", sample_steps: int = 2, clip_sample: bool = True,
                          condition: str = "skip", temb_dim: int | None = None):
    """DiffRect's LFR head on its own: ``(LatentDenoiser, DiffusionScheduler)`` with the authors'
    schedule (T = 10, cosine, x0-prediction, DDIM η = 0 over ``sample_steps`` steps, clipping at
    sampling)."""
    from semidiff_nnunet.plugins.diffrect.networks import latent_denoiser

    denoiser = latent_denoiser(width, latent_shape, arch_kwargs, condition=condition, temb_dim=temb_dim)
    return denoiser, LatentRectification(num_timesteps, beta_schedule, sample_steps, clip_sample).scheduler
