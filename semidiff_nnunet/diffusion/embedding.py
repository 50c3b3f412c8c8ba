"""Sinusoidal timestep embeddings and the MLP that turns them into a conditioning vector."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["get_timestep_embedding", "TimestepEmbedding"]


def get_timestep_embedding(timesteps: Tensor, embedding_dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM sinusoidal embedding (Ho et al. 2020, after Vaswani et al. 2017 §3.5).

    With h = embedding_dim // 2 and frequencies ω_k = max_period^(−k/(h−1)), k = 0..h−1:
    ``emb[:, k] = sin(t ω_k)``, ``emb[:, h + k] = cos(t ω_k)`` (sin first, the highest frequency 1
    and the lowest 1/max_period); an odd ``embedding_dim`` gets a zero last column. This is
    ``get_timestep_embedding`` of the DDPM code, used by DiffRect's rectification model (with float
    t, the calibration guidance) and, with the same formula, lucidrains' ``SinusoidalPosEmb``.

    ``timesteps``: (B,) int or float (a 0-d tensor or Python number is treated as B=1).
    Returns float32 ``(B, embedding_dim)`` (float64 if ``timesteps`` is float64).
    """
    t = torch.as_tensor(timesteps)
    t = t.reshape(1) if t.ndim == 0 else t
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be at least 4, got {embedding_dim}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = embedding_dim // 2
    freqs = torch.exp(-math.log(max_period) / (half - 1) * torch.arange(half, device=t.device, dtype=dtype))
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """t ↦ Linear(act(Linear(sinusoid(t)))): the DDPM time-embedding MLP.

    DiffRect (rectification model and its latent denoiser): ``TimestepEmbedding(128, 512)``, i.e.
    128 → Linear 512 → SiLU ("swish") → Linear 512. SuperDiffusion: ``TimestepEmbedding(64, 256,
    out_dim=64, act=nn.GELU)``. Networks add ``Linear(out_dim, C)(act(temb))`` to their features.

    Input ``timesteps`` (B,) int or float; output ``(B, out_dim)``.
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        hidden_dim: int = 512,
        out_dim: int | None = None,
        act: type[nn.Module] = nn.SiLU,
        max_period: float = 10000.0,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.max_period = max_period
        self.linear_1 = nn.Linear(embedding_dim, hidden_dim)
        self.act = act()
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim if out_dim is None else out_dim)

    def forward(self, timesteps: Tensor) -> Tensor:
        emb = get_timestep_embedding(timesteps, self.embedding_dim, self.max_period)
        emb = emb.to(device=self.linear_1.weight.device, dtype=self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))
