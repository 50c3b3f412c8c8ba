"""A planned nnU-Net U-Net conditioned on the diffusion time, shared by the diffusion methods
(Diff-CL's DS network, SuperDiffusion's two pathways).

:class:`TimestepConditionedUNet` adds ``Linear(SiLU(temb))`` (one shift per channel) to the output
of every encoder stage through forward hooks, so any encoder nnU-Net plans (2D or 3D, plain or
residual) works unchanged; the projections are zero-initialised, so the network starts as the
planned one.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from semidiff_nnunet.diffusion import TimestepEmbedding

__all__ = ["TimestepConditionedUNet"]


class TimestepConditionedUNet(nn.Module):
    """A planned U-Net whose encoder stages get ``Linear(SiLU(temb))`` added (per channel).

    forward(x, t): ``x`` (B, C_in, *spatial) (e.g. Diff-CL's image ⊕ Y_t), ``t`` (B,) → the U-Net's
    output. The projections are zero-initialised, so the network starts as the planned one.
    """

    def __init__(self, unet: nn.Module, embedding_dim: int = 128):
        super().__init__()
        self.unet = unet
        hidden = 2 * embedding_dim
        self.time_embed = TimestepEmbedding(embedding_dim, hidden)
        self.time_proj = nn.ModuleList(nn.Linear(hidden, c) for c in unet.encoder.output_channels)
        for proj in self.time_proj:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self._emb: Tensor | None = None
        for i, stage in enumerate(unet.encoder.stages):
            stage.register_forward_hook(functools.partial(self._add_time, i))

    def _add_time(self, index: int, _module, _inputs, output: Tensor) -> Tensor:
        if self._emb is None:  # the U-Net called on its own
            return output
        shift = self.time_proj[index](self._emb).to(output.dtype)
        return output + shift.view(*shift.shape, *([1] * (output.ndim - 2)))

    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    def forward(self, x: Tensor, t: Tensor) -> Tensor | list[Tensor]:
        self._emb = nn.functional.silu(self.time_embed(t))
        try:
            return self.unet(x)
        finally:
            self._emb = None
