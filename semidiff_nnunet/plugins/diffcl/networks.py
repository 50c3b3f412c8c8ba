"""Diff-CL's networks (Guo et al. 2025), 2D and 3D from nnU-Net plans.

* :func:`build_cs_network` — CS: the planned network with HF-Mamba (:mod:`.hf_mamba`, eq. 10)
  after one encoder stage;
* :class:`TimestepConditionedUNet` — DS's backbone (shared, in
  :mod:`semidiff_nnunet.networks.timestep_unet`, re-exported here): a planned U-Net whose encoder
  stages get a per-channel shift ``Linear(SiLU(temb))`` of the diffusion time;
* :class:`LabelDiffusion` — the DS diffusion head: the network plus its label noise (eq. 5);
* :class:`ProjectionHead` — the per-pixel projection of the contrastive term (eq. 11–15).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import Tensor, nn

from semidiff_nnunet.diffusion import ContinuousScheduler
from semidiff_nnunet.networks.timestep_unet import TimestepConditionedUNet  # noqa: F401 (re-exported)
from semidiff_nnunet.plugins.diffcl.hf_mamba import insert_hf_mamba


def build_cs_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool = True, *, hf_threshold: float = 0.5, stage: int = -1,
                     d_state: int = 16, d_conv: int = 4, expand: int = 2, slice_scan_2d: bool = True,
                     scan_backend: str = "auto", chunk_size: int = 0, residual: bool = True) -> nn.Module:
    """The CS network: the planned network with HF-Mamba after encoder stage ``stage``."""
    net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                   num_output_channels, enable_deep_supervision)
    is_2d = len(configuration_manager.patch_size) == 2
    return insert_hf_mamba(net, stage, hf_threshold=hf_threshold, d_state=d_state, d_conv=d_conv, expand=expand,
                           slice_scan=slice_scan_2d or not is_2d, scan_backend=scan_backend, chunk_size=chunk_size,
                           residual=residual)


class LabelDiffusion(nn.Module):
    """Diff-CL's diffusion head: the DS network plus its label noise (eq. 5).

    forward(x, y0): ``x`` image (B, C_img, *spatial), ``y0`` clean one-hot labels (B, K, *spatial);
    t ~ U(0, 1), Y_t = sqrt(γ(t))·scale·Y_0 + sqrt(1 − γ(t))·ε; returns DS(x ⊕ Y_t, 1000 t).
    """

    def __init__(self, network: TimestepConditionedUNet, schedule: str = "cosine", label_scale: float = 1.0):
        super().__init__()
        self.network, self.label_scale = network, label_scale
        self.scheduler = ContinuousScheduler(schedule)

    def forward(self, x: Tensor, y0: Tensor, t: Tensor | None = None):
        t = self.scheduler.sample_times(x.shape[0], device=x.device) if t is None else t
        y_t = self.scheduler.q_sample(y0.float() * self.label_scale, t).to(x.dtype)
        return self.network(torch.cat([x, y_t], 1), t * 1000)

    def from_noise(self, x: Tensor, num_classes: int) -> Tensor | list[Tensor]:
        """DS's prediction from the image alone: Y_1 = ε ~ N(0, I) (B, K, *spatial) at t = 1, so no
        label — ground truth or pseudo — can be copied from the input."""
        y_t = torch.randn((x.shape[0], num_classes, *x.shape[2:]), device=x.device, dtype=x.dtype)
        t = torch.ones(x.shape[0], device=x.device)
        return self.network(torch.cat([x, y_t], 1), t * 1000)


class ProjectionHead(nn.Module):
    """Per-pixel MLP: (N, F) → (N, d) (a 1×1-conv head applied to the pixels actually used)."""

    def __init__(self, in_features: int, out_features: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
