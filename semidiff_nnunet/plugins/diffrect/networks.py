"""DiffRect's rectification model (Liu et al., MICCAI 2024), 2D and 3D from nnU-Net plans.

``RectificationNet`` is the authors' ``UNet_LDMV2(ldm_method='replace')`` written once for any
``conv_op``:

* calibration-guidance embedding ``TimestepEmbedding(128, temb_dim)`` of the guidance
  τ = (1 − Dice)·999 (:func:`semidiff_nnunet.losses.diffrect.calibration_guidance`);
* **semantic context embedding block** B_sem (paper eq. 5): ``encoder`` on
  ``cat(image, colour-coded label)`` plus ``embedder`` on the image alone, whose feature maps are
  added stage by stage to the encoder's (the sums propagate to the next stage);
* **latent denoiser** ε (``LatentDenoiser``, the authors' ``DeUNet``) on the encoder's bottleneck
  z (paper eq. 7–11), an x0-predictor; its diffusion (noise, loss, DDIM sampling) is in
  :mod:`.rectification` — the network holds no schedule or loss code;
* ``decoder``: the bottleneck skip is *replaced* by the denoised latent; output (B, C, *spatial).

Width rule (documented in the plugin): stage ``i`` has ``max(2, round(width_factor ·
features_per_stage[i]))`` channels for the first ``min(num_stages, n_stages)`` stages of the plans,
pooled by the plans' strides with the plans' kernel sizes; ``width_factor = 0.5`` turns nnU-Net's
2D 32-64-128-256-512 into the authors' 16-32-64-128-256. The denoiser has widths (w, 1.5w, 2w)
of the bottleneck width w (authors 256-384-512) and pools by 2 along every latent axis whose size
is even and ≥ 4 (so any planned patch works; the authors' 16² latent pools to 8², 4²); the
embedding MLPs have ``max(32, 2w)`` hidden/out units (authors 512 for w = 256). Patches are
always divisible by the product of the plans' strides, so no padding is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_dim_to_conv_op,
    get_matching_instancenorm,
)
from torch import Tensor, nn

from semidiff_nnunet.diffusion import TimestepEmbedding
from semidiff_nnunet.networks.blocks import TembConvBlock, TembDown, TembUp, ops_from_plans

__all__ = ["RectEncoder", "RectDecoder", "LatentDenoiser", "RectificationNet", "rectification_net_from_plans",
           "latent_denoiser", "latent_strides", "AUTHORS_DROPOUT"]

#: dropout per encoder stage in the authors' rectification encoders (PyMIC UNet), decoder 0
AUTHORS_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


def _stage_ops(ops: dict, kernel_size, dropout_p: float) -> dict:
    out = {k: v for k, v in ops.items() if k not in ("dropout_op", "dropout_op_kwargs")}
    out["kernel_size"] = list(kernel_size)
    if dropout_p > 0:
        out["dropout_op"] = nn.Dropout  # element-wise, as the authors' ConvBlock
        out["dropout_op_kwargs"] = {"p": dropout_p}
    return out


class RectEncoder(nn.Module):
    """Stage 0 a :class:`TembConvBlock`, stage i ≥ 1 max-pool by ``strides[i]`` + block.

    ``forward(x (B, C_in, *spatial), temb (B, E), added=None) -> [f_0, ..., f_{n−1}]``; with
    ``added`` (the embedder's features, same shapes) ``f_i = stage_i(f_{i−1}) + added[i]``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], strides, kernel_sizes, temb_dim: int,
                 ops: dict, dropout: Sequence[float] = ()):
        super().__init__()
        drop = list(dropout) + [0.0] * len(widths)
        stages = [TembConvBlock(in_channels, widths[0], temb_dim, **_stage_ops(ops, kernel_sizes[0], drop[0]))]
        for i in range(1, len(widths)):
            stages.append(TembDown(widths[i - 1], widths[i], temb_dim, strides[i],
                                   **_stage_ops(ops, kernel_sizes[i], drop[i])))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor, temb: Tensor, added: Sequence[Tensor] | None = None) -> list[Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x, temb)
            if added is not None:
                x = x + added[i]
            feats.append(x)
        return feats


class RectDecoder(nn.Module):
    """Transposed-conv up path over the encoder's skips and an output conv (kernel of stage 0).
    ``forward(feats, temb) -> (B, num_classes, *spatial)``."""

    def __init__(self, widths: Sequence[int], strides, kernel_sizes, temb_dim: int, num_classes: int, ops: dict):
        super().__init__()
        self.ups = nn.ModuleList(
            TembUp(widths[i + 1], widths[i], widths[i], temb_dim, strides[i + 1], **_stage_ops(ops, kernel_sizes[i], 0))
            for i in reversed(range(len(widths) - 1)))
        k = list(kernel_sizes[0])
        self.out_conv = ops["conv_op"](widths[0], num_classes, k, padding=[(i - 1) // 2 for i in k])

    def forward(self, feats: Sequence[Tensor], temb: Tensor) -> Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip, temb)
        return self.out_conv(x)


def latent_strides(latent_shape: Sequence[int], levels: int = 2) -> list[list[int]]:
    """Per-level pooling of the denoiser: 2 along each axis whose current size is even and ≥ 4 (so
    the pooled axis keeps ≥ 2 voxels for instance norm), else 1."""
    out, cur = [], list(latent_shape)
    for _ in range(levels):
        s = [2 if c % 2 == 0 and c >= 4 else 1 for c in cur]
        out.append(s)
        cur = [c // k for c, k in zip(cur, s)]
    return out


class LatentDenoiser(nn.Module):
    """DiffRect's latent denoising U-Net ε (``DeUNet``): two down and two up temb-blocks.

    ``forward(x_t (B, w, *latent), t (B,), cond (B, w, *latent)) -> x̂_0 (B, w, *latent)``.
    Widths (w, 1.5w, 2w); its own ``TimestepEmbedding(128, temb_dim)`` of the diffusion step.
    ``condition="skip"`` (authors' code): the condition is added to x_t only for the last
    up-block's skip connection, the down path sees the raw x_t; ``"input"`` adds it to the down
    path's input too (a reading of the paper's "fed into the denoising model").
    """

    def __init__(self, width: int, latent_shape: Sequence[int], ops: dict, temb_dim: int,
                 embedding_dim: int = 128, condition: str = "skip"):
        super().__init__()
        if condition not in ("skip", "input"):
            raise ValueError(f"condition must be 'skip' or 'input', got {condition!r}")
        self.condition = condition
        w = [width, int(round(1.5 * width)), 2 * width]
        s = latent_strides(latent_shape)
        k = [3] * len(latent_shape)
        o = _stage_ops(ops, k, 0)
        self.temb = TimestepEmbedding(embedding_dim, temb_dim)
        self.down1 = TembDown(w[0], w[1], temb_dim, s[0], **o)
        self.down2 = TembDown(w[1], w[2], temb_dim, s[1], **o)
        self.up1 = TembUp(w[2], w[1], w[1], temb_dim, s[1], **o)
        self.up2 = TembUp(w[1], w[0], w[0], temb_dim, s[0], **o)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        temb = self.temb(t)
        x0 = x_t + cond
        h1 = self.down1(x0 if self.condition == "input" else x_t, temb)
        h2 = self.down2(h1, temb)
        return self.up2(self.up1(h2, h1, temb), x0, temb)


class RectificationNet(nn.Module):
    """The rectification model: B_sem (encoder + image embedder), latent denoiser, decoder.

    The parts, in the order :class:`~.rectification.LatentRectification` uses them:

    * ``embed(guidance (B,)) -> temb (B, E)``: the calibration-guidance embedding;
    * ``context(image, colour, temb) -> (image features, encoder features)``: B_sem on
      cat(image, colour) plus the image embedder (paper eq. 5); the last encoder feature is z;
    * ``encode(image, colour, temb, image features)[-1]``: the bottleneck of another colour map
      (x_start of the latent diffusion);
    * ``denoiser(x_t, t, cond) -> x̂_0`` (paper eq. 7–11);
    * ``decode(features, latent, temb) -> logits (B, C, *spatial)``: the decoder with the bottleneck
      skip *replaced* by ``latent``.

    ``image`` (B, C_img, *spatial), colours (B, 3, *spatial) in [0, 1].
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], strides, kernel_sizes,
                 ops: dict, latent_shape: Sequence[int], *, dropout: Sequence[float] = AUTHORS_DROPOUT,
                 embedding_dim: int = 128, condition: str = "skip"):
        super().__init__()
        self.num_classes = num_classes
        temb_dim = max(32, 2 * widths[-1])
        self.guidance_embedding = TimestepEmbedding(embedding_dim, temb_dim)
        self.encoder = RectEncoder(in_channels + 3, widths, strides, kernel_sizes, temb_dim, ops, dropout)
        self.embedder = RectEncoder(in_channels, widths, strides, kernel_sizes, temb_dim, ops, dropout)
        self.decoder = RectDecoder(widths, strides, kernel_sizes, temb_dim, num_classes, ops)
        self.denoiser = LatentDenoiser(widths[-1], latent_shape, ops, temb_dim, embedding_dim, condition)

    def embed(self, guidance: Tensor) -> Tensor:
        return self.guidance_embedding(guidance)

    def encode(self, image: Tensor, colour: Tensor, temb: Tensor, image_features: Sequence[Tensor]) -> list[Tensor]:
        return self.encoder(torch.cat([image, colour.to(image.dtype)], 1), temb, image_features)

    def context(self, image: Tensor, colour: Tensor, temb: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(image embeddings, encoder features of cat(image, colour)) — the block B_sem."""
        img = self.embedder(image, temb)
        return img, self.encode(image, colour, temb, img)

    def decode(self, features: Sequence[Tensor], latent: Tensor, temb: Tensor) -> Tensor:
        return self.decoder([*features[:-1], latent], temb)

    def forward(self, run, *args):
        """``run(self, *args)``: one pass of a procedure over the parts (e.g. a training pass of
        :class:`~.rectification.LatentRectification`) as this module's forward, so that under DDP the
        pass goes through the wrapper's forward and its gradients are averaged over the ranks."""
        return run(self, *args)


def rectification_net_from_plans(arch_kwargs: dict, patch_size: Sequence[int], in_channels: int, num_classes: int,
                                 width_factor: float = 0.5, num_stages: int = 5, **kwargs) -> RectificationNet:
    """Build a :class:`RectificationNet` from a configuration's ``network_arch_init_kwargs``.

    Takes the first ``min(num_stages, n_stages)`` stages of the plans (the authors have 5 stages,
    4 poolings), their strides and kernel sizes, ``conv_op``, norm and nonlinearity; widths
    ``max(2, round(width_factor · features_per_stage[i]))``; the latent shape is
    ``patch_size / prod(strides)``. ``kwargs`` (dropout, embedding_dim, condition) go to
    :class:`RectificationNet`.
    """
    n = min(int(num_stages), int(arch_kwargs["n_stages"]))
    if n < 1:
        raise ValueError("num_stages must be at least 1")
    feats = arch_kwargs["features_per_stage"]
    feats = [feats] * n if isinstance(feats, int) else list(feats)
    widths = [max(2, int(round(width_factor * f))) for f in feats[:n]]
    dim = len(patch_size)
    strides = [[s] * dim if isinstance(s, int) else list(s) for s in arch_kwargs["strides"][:n]]
    kernels = [[k] * dim if isinstance(k, int) else list(k) for k in arch_kwargs["kernel_sizes"][:n]]
    total = [math.prod(s[d] for s in strides) for d in range(dim)]
    if any(p % t for p, t in zip(patch_size, total)):
        raise ValueError(f"patch size {list(patch_size)} is not divisible by the plans' pooling {total}")
    latent = [p // t for p, t in zip(patch_size, total)]
    return RectificationNet(in_channels, num_classes, widths, strides, kernels, ops_from_plans(arch_kwargs),
                            latent, **kwargs)


def latent_denoiser(width: int, latent_shape: Sequence[int], arch_kwargs: dict | None = None, *,
                    condition: str = "skip", temb_dim: int | None = None) -> LatentDenoiser:
    """DiffRect's LFR denoiser on its own. ``arch_kwargs`` (plans) give the operators; default:
    instance norm + LeakyReLU with the conv matching ``len(latent_shape)``."""
    if arch_kwargs is None:
        conv = convert_dim_to_conv_op(len(latent_shape))
        ops = {"conv_op": conv, "norm_op": get_matching_instancenorm(conv), "norm_op_kwargs": {"affine": True},
               "dropout_op": None, "dropout_op_kwargs": {}, "nonlin": nn.LeakyReLU,
               "nonlin_kwargs": {"negative_slope": 0.01}, "conv_bias": True}
    else:
        ops = ops_from_plans(arch_kwargs)
    return LatentDenoiser(width, latent_shape, ops, temb_dim or max(32, 2 * width), condition=condition)
