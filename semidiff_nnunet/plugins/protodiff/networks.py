"""ProtoDiff's network (Xi et al. 2025, §2.2, Fig. 1), 2D and 3D from nnU-Net plans.

:class:`ProtoDiffNet` holds every part and is the whole inference model (what
``ProtoDiffTrainer.build_network_architecture`` returns, so stock nnU-Net rebuilds it):

* ``encoder`` — the visual encoder: nnU-Net's planned encoder; its N stage outputs are X_l;
* ``branches[i]`` — visual-specific branch φ_i: two blocks (3×3 conv → norm → GELU → 1×1 conv)
  giving F_i (``width`` channels) at the level's resolution; ``aux_heads[i]`` (1×1 conv) its
  intermediate prediction;
* ``label_encoder`` — 1×1 then 3×3 conv on the one-hot label, sigmoid·2 − 1 ∈ [−1, 1] (DDP's
  normalisation), times the signal scale s: z;
* ``projector`` — the latent projector φ: per-pixel Linear → GELU → Linear (≡ 1×1 convs) to D;
* ``decoder`` — :class:`DiffusionDecoder`: per level, cat(z_t pooled to the level, X_i) → two
  time-conditioned blocks → 1×1 conv to one channel → sigmoid = M_i; F' = Σ_i up(M_i·F_i) at the
  first level's resolution; a prediction branch of three blocks and a 1×1 conv gives the logits.

``forward(x)`` samples (Algorithm 2: DDIM from Gaussian noise with asymmetric time intervals; the
encoder and branches run once, only the decoder per step; the noise comes from a generator seeded
with ``sample_seed`` on every call, so a patch always gets the same prediction — ``semidiff predict``
and stock ``nnUNetv2_predict`` agree exactly). ``forward(x, y0=one-hot)`` is the training forward
(Algorithm 1) and returns a dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff_nnunet.diffusion import ContinuousScheduler, TimestepEmbedding, asymmetric_time_pairs, ddim_step
from semidiff_nnunet.diffusion.sampling import eps_from_x0
from semidiff_nnunet.networks.blocks import ops_from_plans

__all__ = ["ConvBlock", "DiffusionDecoder", "ProtoDiffNet", "ddim_sample"]


def _pad(kernel) -> list[int]:
    return [(k - 1) // 2 for k in kernel]


def _resize(x: Tensor, size, mode: str = "linear") -> Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=list(size), mode="area")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return F.interpolate(x, size=list(size), mode=mode, align_corners=False)


class ConvBlock(nn.Module):
    """The paper's block: conv (the plans' kernel, 3×3 in 2D) → norm → GELU → 1×1 conv; with
    ``temb_dim`` a per-channel shift Linear(SiLU(temb)) is added after the GELU (time conditioning)."""

    def __init__(self, in_channels: int, out_channels: int, ops: dict, kernel, temb_dim: int = 0):
        super().__init__()
        conv, norm = ops["conv_op"], ops.get("norm_op")
        self.conv = conv(in_channels, out_channels, list(kernel), padding=_pad(kernel), bias=ops.get("conv_bias", True))
        self.norm = norm(out_channels, **ops.get("norm_op_kwargs", {})) if norm is not None else nn.Identity()
        self.act = nn.GELU()
        self.temb = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, out_channels)) if temb_dim else None
        self.proj = conv(out_channels, out_channels, 1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.act(self.norm(self.conv(x)))
        if self.temb is not None and temb is not None:
            e = self.temb(temb).to(h.dtype)
            h = h + e.view(*e.shape, *([1] * (h.ndim - 2)))
        return self.proj(h)


class DiffusionDecoder(nn.Module):
    """Level interaction and prediction branch (module docstring). ``forward(z_t, xs, fs, temb)``:
    z_t (B, C_z, *full), xs/fs the per-level encoder features X_i and branch features F_i → logits
    (B, num_classes, *full) and the masks M_i (B, 1, *level_i)."""

    def __init__(self, label_channels: int, level_channels: list[int], width: int, num_classes: int, ops: dict,
                 kernels: list, temb_dim: int):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.ModuleList([ConvBlock(label_channels + c, width, ops, k, temb_dim), ConvBlock(width, width, ops, k, temb_dim),
                           ops["conv_op"](width, 1, 1)])
            for c, k in zip(level_channels, kernels))
        self.prediction = nn.ModuleList(ConvBlock(width, width, ops, kernels[0], temb_dim) for _ in range(3))
        self.head = ops["conv_op"](width, num_classes, 1)

    def forward(self, z_t: Tensor, xs: list[Tensor], fs: list[Tensor], temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        full = fs[0].shape[2:]
        agg, masks = None, []
        for (b1, b2, out), x_i, f_i in zip(self.levels, xs, fs):
            h = torch.cat([_resize(z_t, x_i.shape[2:], "area").to(x_i.dtype), x_i], 1)
            m = torch.sigmoid(out(b2(b1(h, temb), temb)))
            masks.append(m)
            term = _resize(m * f_i, full)
            agg = term if agg is None else agg + term
        h = agg
        for block in self.prediction:
            h = block(h, temb)
        return self.head(h), masks


class ProtoDiffNet(nn.Module):
    """The whole ProtoDiff model; see the module docstring. Build it with :meth:`from_plans`."""

    def __init__(self, encoder: nn.Module, ops: dict, kernels: list, num_classes: int, *, width: int,
                 label_channels: int = 16, proj_dim: int = 32, label_scale: float = 0.01,
                 noise_schedule: str = "cosine", sampling_steps: int = 3, t_diff: float = 1.0,
                 sample_seed: int = 0, time_embedding_dim: int = 64):
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.output_channels)
        kernels = list(kernels)[: len(channels)]
        self.num_classes, self.label_scale = num_classes, float(label_scale)
        self.sampling_steps, self.t_diff, self.sample_seed = int(sampling_steps), float(t_diff), int(sample_seed)
        self.noise_schedule = noise_schedule
        self.scheduler = ContinuousScheduler(noise_schedule)
        self.branches = nn.ModuleList(
            nn.Sequential(ConvBlock(c, width, ops, k), ConvBlock(width, width, ops, k)) for c, k in zip(channels, kernels))
        self.aux_heads = nn.ModuleList(ops["conv_op"](width, num_classes, 1) for _ in channels)
        conv = ops["conv_op"]
        self.label_encoder = nn.Sequential(conv(num_classes, label_channels, 1),
                                           conv(label_channels, label_channels, list(kernels[0]), padding=_pad(kernels[0])))
        self.projector = nn.Sequential(nn.Linear(label_channels, label_channels), nn.GELU(),
                                       nn.Linear(label_channels, proj_dim))
        temb_dim = max(32, 2 * width)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, temb_dim)
        self.decoder = DiffusionDecoder(label_channels, channels, width, num_classes, ops, kernels, temb_dim)
        self.label_channels = label_channels

    @classmethod
    def from_plans(cls, planned_network: nn.Module, arch_kwargs: dict, num_classes: int, width: int = 0, **kwargs):
        """From nnU-Net's planned network (only its ``encoder`` is kept) and the configuration's
        ``network_arch_init_kwargs``; ``width`` 0 = the plans' first-stage width."""
        encoder = planned_network.encoder
        ops = ops_from_plans(arch_kwargs)
        dim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[ops["conv_op"]]
        first_stride = arch_kwargs["strides"][0]
        if any(s != 1 for s in ([first_stride] * dim if isinstance(first_stride, int) else first_stride)):
            raise ValueError("protodiff needs plans whose first encoder stage has stride 1 (nnU-Net's planners do)")
        kernels = [[k] * dim if isinstance(k, int) else list(k) for k in arch_kwargs["kernel_sizes"]]
        width = int(width) or int(encoder.output_channels[0])
        return cls(encoder, ops, kernels, num_classes, width=width, **kwargs)

    # ------------------------------------------------------------------ parts
    def encode(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Visual encoder and branches, once per patch: (X_l per level, F_i per level)."""
        xs = list(self.encoder(x))
        return xs, [b(x_i) for b, x_i in zip(self.branches, xs)]

    def encode_label(self, onehot: Tensor) -> Tensor:
        """z ∈ [−1, 1] (unscaled): the label encoder's output after sigmoid·2 − 1."""
        return torch.sigmoid(self.label_encoder(onehot)) * 2 - 1

    def decode(self, z_t: Tensor, xs: list[Tensor], fs: list[Tensor], t: Tensor) -> Tensor:
        temb = self.time_embedding(t.reshape(-1).expand(z_t.shape[0]).float() * 1000)
        return self.decoder(z_t, xs, fs, temb)[0]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, y0: Tensor | None = None, t: Tensor | None = None, noise: Tensor | None = None,
                pixels: Tensor | None = None):
        if y0 is None:
            return self.sample(x)
        xs, fs = self.encode(x)
        z = self.encode_label(y0.to(x.dtype))
        t = self.scheduler.sample_times(x.shape[0], device=x.device) if t is None else t
        noise = torch.randn_like(z) if noise is None else noise
        z_t = self.scheduler.add_noise(z * self.label_scale, noise, t).to(z.dtype)
        logits = self.decode(z_t, xs, fs, t)
        aux = [h(f) for h, f in zip(self.aux_heads, fs)]
        latent = None
        if pixels is not None:  # the latent projector on the chosen pixels (flat indices into B·prod(full))
            flat = z.movedim(1, -1).reshape(-1, z.shape[1])
            latent = self.projector(flat[pixels])
        return {"logits": logits, "aux": aux, "latent": latent}

    @torch.no_grad()
    def sample(self, x: Tensor, steps: int | None = None, t_diff: float | None = None, seed: int | None = None) -> Tensor:
        """Algorithm 2: logits (B, num_classes, *spatial) of x (B, C, *spatial)."""
        xs, fs = self.encode(x)
        shape = (x.shape[0], self.label_channels, *fs[0].shape[2:])
        gen = torch.Generator(device=x.device).manual_seed(self.sample_seed if seed is None else int(seed))
        logits, _ = ddim_sample(lambda m, t: self.decode(m, xs, fs, t),
                                lambda logits: self.label_scale * self.encode_label(_onehot_argmax(logits)),
                                shape, self.scheduler, steps or self.sampling_steps,
                                self.t_diff if t_diff is None else t_diff, gen, x.dtype)
        return logits


def _onehot_argmax(logits: Tensor) -> Tensor:
    return F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(logits.dtype)


def ddim_sample(decode, encode, shape, scheduler: ContinuousScheduler, steps: int, t_diff: float,
                generator: torch.Generator, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Algorithm 2's loop. ``decode(m_t, t)`` → logits; ``encode(logits)`` → the predicted z̃_0 (the
    label encoder on the prediction's one-hot argmax, scaled); m_T ~ N(0, I) of ``shape``; for each
    asymmetric pair (t_now, t_next) (``asymmetric_time_pairs``): m ← DDIM(m, z̃_0, t_now → t_next)
    (η = 0). Returns (the last logits, the last m)."""
    device = generator.device
    m = torch.randn(shape, generator=generator, device=device).to(dtype)
    logits = None
    for t_now, t_next in asymmetric_time_pairs(steps, t_diff).tolist():
        logits = decode(m, torch.tensor([t_now], device=device))
        z0 = encode(logits).to(m.dtype)
        ab_now, ab_next = scheduler.alpha_bar(t_now), scheduler.alpha_bar(t_next)
        m = ddim_step(m, z0, eps_from_x0(m, z0, ab_now), ab_now, ab_next)
    return logits, m
