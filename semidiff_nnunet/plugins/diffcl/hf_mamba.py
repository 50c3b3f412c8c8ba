"""Diff-CL's high-frequency Mamba module (HF-Mamba, Guo et al. 2025, §4.2, eq. 10, Fig. 3), 2D and 3D.

    F_g = FFT(SA(f̂))                     spatial attention, then the spectrum
    F_h = iFFT(HPF(fftShift(F_g)))       keep the high frequencies only
    F_m = SM(LN(F_h)) + F_h              space Mamba (forward, backward, inter-slice scans)
    F_o = MLP(LN(F_m)) + F_m

Choices where the paper is silent or loose (all ours):

* **SA** is SegMamba's gated spatial convolution (GSC; the paper takes SA "from Xing et al.",
  whose only spatial module is GSC): (conv3-norm-ReLU)² + conv1-norm-ReLU, summed, conv1-norm-ReLU,
  plus the input. Convolutions and normalisation come from the plans (``conv_op``, ``norm_op``),
  so one code path serves 2D and 3D.
* **HPF** zeroes the centred frequencies whose normalised radius is below ``threshold`` (Table 2's
  ``HF``): with ν_i = (k_i − ⌊n_i/2⌋)/(n_i/2) ∈ [−1, 1) per axis after fftshift (±1 = Nyquist),
  a frequency is kept when ‖ν‖₂ ≥ HF (a spherical/disk stop band). The DC term (ν = 0) is always
  removed, the Nyquist corner (a checkerboard) always kept. We apply ``ifftshift`` before the
  inverse FFT (eq. 10 omits it; without it the output is modulated by a checkerboard) and keep
  the real part. The FFT runs in float32 (half-precision FFTs need power-of-two sizes).
* **SM** is :class:`~semidiff_nnunet.networks.mamba.TriOrientedMamba` (d_state 16, d_conv 4,
  expand 2 as SegMamba); **LN** a LayerNorm over channels per token; **MLP** SegMamba's
  ``MlpChannel`` (Linear C→2C, GELU, Linear 2C→C per token).
* **Residual around the module** (``residual=True``): the output is f̂ + F_o. Eq. 10 ends at F_o,
  which holds only high frequencies of f̂; replacing a backbone feature map by it would discard the
  low-frequency content every later layer relies on. SegMamba's layers are residual too.
* **Placement** (:func:`insert_hf_mamba`): after one encoder stage of the planned network, by
  default the last (the bottleneck): the paper's Fig. 3 shows one module on the CS features; the
  bottleneck has the fewest tokens (the sequential scan costs O(L) steps, the FFT O(L log L)),
  the widest receptive field to complete with global context, and is where SegMamba's deepest ToM
  sits. Any stage can be chosen (``stage``), e.g. ``-2`` for finer detail at more cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semidiff_nnunet.plugins.diffcl.mamba import DIRECTIONS, TriOrientedMamba

__all__ = ["high_pass_mask", "high_pass_filter", "GatedSpatialConv", "HFMamba", "HFMambaStage",
           "insert_hf_mamba", "find_hf_mamba"]


def high_pass_mask(spatial_shape: Sequence[int], threshold: float, device=None) -> Tensor:
    """Boolean (*spatial) mask in fftshifted layout: True where ‖ν‖₂ ≥ ``threshold`` (kept)."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) - n // 2) / (n / 2) for n in spatial_shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    radius = torch.sqrt(sum(g ** 2 for g in grids))
    return radius >= threshold


def high_pass_filter(x: Tensor, threshold: float) -> Tensor:
    """Real part of iFFT(ifftshift(HPF(fftshift(FFT(x))))) over the spatial axes of ``x`` (B, C, *spatial)."""
    dims = tuple(range(2, x.ndim))
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)
    spectrum = spectrum * high_pass_mask(x.shape[2:], threshold, x.device)
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims).real
    return out.to(x.dtype)


class GatedSpatialConv(nn.Module):
    """SegMamba's GSC ("SA" of eq. 10): ``(B, C, *spatial) -> (B, C, *spatial)`` with a residual."""

    def __init__(self, channels: int, conv_op: type[nn.Module], norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None):
        super().__init__()

        def block(kernel: int) -> nn.Sequential:
            layers = [conv_op(channels, channels, kernel, 1, kernel // 2)]
            if norm_op is not None:
                layers.append(norm_op(channels, **(norm_op_kwargs or {})))
            return nn.Sequential(*layers, nn.ReLU())

        self.branch3 = nn.Sequential(block(3), block(3))
        self.branch1 = block(1)
        self.fuse = block(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.branch3(x) + self.branch1(x)) + x


class HFMamba(nn.Module):
    """HF-Mamba (eq. 10) on ``(B, C, *spatial)`` features; returns the same shape.

    Args:
        channels: C. conv_op / norm_op / norm_op_kwargs: the plans' operators (for SA).
        hf_threshold: Table 2's HF (normalised radius of the stop band, see module docstring).
        d_state, d_conv, expand: Mamba sizes. slice_scan: add the inter-slice scan (3D: across
            slices; 2D: across rows, i.e. down each column). scan_backend, chunk_size: see
            :func:`~semidiff_nnunet.networks.mamba.selective_scan`.
        mlp_ratio: hidden width of the MLP as a multiple of C (SegMamba: 2).
        residual: return f̂ + F_o (our choice) instead of F_o.
    """

    def __init__(self, channels: int, conv_op: type[nn.Module], norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None, hf_threshold: float = 0.5, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, slice_scan: bool = True, scan_backend: str = "auto",
                 chunk_size: int = 0, mlp_ratio: float = 2.0, residual: bool = True):
        super().__init__()
        self.hf_threshold, self.residual = float(hf_threshold), residual
        self.sa = GatedSpatialConv(channels, conv_op, norm_op, norm_op_kwargs)
        self.norm1 = nn.LayerNorm(channels)
        directions = DIRECTIONS if slice_scan else ("forward", "backward")
        self.mamba = TriOrientedMamba(channels, d_state, d_conv, expand, directions, scan_backend, chunk_size)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(round(mlp_ratio * channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, f: Tensor) -> Tensor:
        spatial = f.shape[2:]
        h = high_pass_filter(self.sa(f), self.hf_threshold)  # F_h, (B, C, *spatial)
        tokens = h.flatten(2).transpose(1, 2)  # (B, L, C)
        m = self.mamba(self.norm1(tokens), spatial) + tokens  # F_m
        o = self.mlp(self.norm2(m)) + m  # F_o
        o = o.transpose(1, 2).reshape(f.shape)
        return f + o if self.residual else o


class HFMambaStage(nn.Module):
    """An encoder stage followed by HF-Mamba: ``forward(x) = hfm(stage(x))``."""

    def __init__(self, stage: nn.Module, hfm: HFMamba):
        super().__init__()
        self.stage, self.hfm = stage, hfm

    def forward(self, x: Tensor) -> Tensor:
        return self.hfm(self.stage(x))

    def compute_conv_feature_map_size(self, input_size):  # nnU-Net's VRAM estimate: the stage's share
        return self.stage.compute_conv_feature_map_size(input_size) if hasattr(
            self.stage, "compute_conv_feature_map_size") else 0


def insert_hf_mamba(network: nn.Module, stage: int = -1, **hfm_kwargs) -> nn.Module:
    """Put an :class:`HFMamba` after encoder stage ``stage`` of a dynamic_network_architectures U-Net
    (``PlainConvUNet``/``ResidualEncoderUNet``: ``network.encoder.stages``), in place; returns
    ``network``. Width and operators come from the encoder (which the plans built); ``hfm_kwargs``
    go to :class:`HFMamba`. ``stage`` counts from 0 (first stage) or from the end (−1 = bottleneck).
    """
    encoder = network.encoder
    n = len(encoder.stages)
    if not -n <= stage < n:
        raise ValueError(f"hfm_stage={stage} is outside the encoder's {n} stages (use 0..{n - 1} or -1..-{n})")
    idx = stage % n
    channels = encoder.output_channels[idx]
    hfm = HFMamba(channels, encoder.conv_op, encoder.norm_op, encoder.norm_op_kwargs, **hfm_kwargs)
    encoder.stages[idx] = HFMambaStage(encoder.stages[idx], hfm)
    return network


def find_hf_mamba(network: nn.Module) -> list[HFMamba]:
    """The HF-Mamba modules inside ``network``."""
    return [m for m in network.modules() if isinstance(m, HFMamba)]
