"""SemiGDA's networks around a frozen diffusers ``AutoencoderKL``; every width comes from its config.

* :class:`LatentMappingModel` — GMS's ``ResAttnUNet_DS`` (King-HAW/GMS
  ``networks/latent_mapping_model.py``), only its ``out`` head (SemiGDA uses only that): no
  down-sampling, an input 3×3 conv to ``ch``, an encoder of residual attention blocks ``ch·mult``,
  a nested decoder on concatenations, GN-SiLU-conv3×3 head, Kaiming fan-out init. SD's
  ``ch = 32, mult = [1, 2, 4, 4]`` is the VAE's ``block_out_channels / 4`` (128 / 4) and its
  ratios; for any VAE: ``ch = block_out_channels[0] // 4`` (at least the group count), ``mult`` =
  the VAE's width ratios, as many levels as the VAE. GroupNorm with 16 groups (GMS), or the largest
  divisor of every width ≤ 16 for a small VAE.
* :class:`ResNetBranch` — the authors' modified ResNet-34 (``model/resnet.py``): conv3×3 stride 1
  to the VAE's first width, BN, ReLU (no max-pool); one stride-2 layer of BasicBlocks per VAE
  down-sampling with the VAE's next widths (SD: 256, 512, 512) and ResNet-34's block counts
  3, 4, 6 (3 again beyond); ``conv_out`` = ConvBlock(→ 2·latent channels, dropout 0.1). Its
  output goes through the VAE's ``quant_conv``; skips are [conv1, layer1, ...] = the VAE encoder's
  per-level widths and resolutions.
* :class:`SkipDecoder` — the frozen VAE decoder with trainable skip adapters (CDSA, eq. 7–10): at
  the first res block of every up level, ``h = adapter(cat(block(h), skip))``, adapter = a diffusers
  ``ResnetBlock2D(2·C → C)`` (the authors' LDM ``ResnetBlock``); one adapter set per branch.
  The VAE path's skip of level i is the output of the encoder's last res block of level i (of the
  three ``hs`` entries the authors pop per level, the one whose width fits their ``Jump`` block).
* :class:`SemiGDANet` — the whole model; its ``forward`` is inference: the mean of the two
  branches' class probabilities, returned as log-probabilities (nnU-Net's softmax gives them back).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------- inputs, masks


def to_rgb(x: Tensor) -> Tensor:
    """Any number of input channels → the VAE's 3: RGB slot k is the mean of the channels c with
    c mod 3 = k, or of all channels if there is none (1 channel: repeated, the authors' grayscale
    rule; 3: unchanged; 2: (c0, c1, mean); 4: ((c0 + c3)/2, c1, c2))."""
    c = x.shape[1]
    if c == 3:
        return x
    slots = []
    for k in range(3):
        idx = list(range(k, c, 3))
        slots.append(x[:, idx].mean(1) if idx else x.mean(1))
    return torch.stack(slots, 1)


def to_vae_range(x: Tensor, mode: str, zscore_scale: float = 3.0) -> Tensor:
    """Images in the VAE's [−1, 1]: ``"rgb01"`` (nnU-Net's rgb_to_0_1 normalisation, the authors'
    ``/255``) → 2x − 1; ``"zscore"`` (nnU-Net's z-score and others) → clamp(x / 3, −1, 1)."""
    if mode == "rgb01":
        return 2 * x - 1
    return (x / zscore_scale).clamp(-1, 1)


def class_levels(num_classes: int, device=None) -> Tensor:
    """The grey level of every class: v_k = 2k/(K−1) − 1 (K = 2: −1, 1)."""
    return torch.linspace(-1.0, 1.0, num_classes, device=device)


def encode_mask(labels: Tensor, num_classes: int) -> Tensor:
    """ACR conversion (eq. 11, generalised): labels (B, H, W) → 3 identical channels of v_label."""
    v = class_levels(num_classes, labels.device)[labels.long()]
    return v[:, None].expand(-1, 3, -1, -1).contiguous()


def decode_mask(image: Tensor, num_classes: int) -> Tensor:
    """ACR reversion: decoded RGB (B, 3, H, W) → class probabilities (B, K, H, W). y = channel mean,
    clamped to [−1, 1]; p_k = max(0, 1 − |y − v_k| / Δ), Δ the level spacing (hat functions, they sum
    to 1). K = 2: p_1 = clamp((y + 1)/2, 0, 1), the authors' decoding."""
    y = image.float().mean(1, keepdim=True).clamp(-1, 1)
    u = (y + 1) * ((num_classes - 1) / 2.0)  # position in level units: class k at u = k
    # float rounding of the levels (K > 5) is snapped to the level (values within 1e-5 of it; gradient kept)
    r = u.round()
    u = u + ((r - u) * ((u - r).abs() < 1e-5)).detach()
    k = torch.arange(num_classes, device=image.device, dtype=u.dtype).view(1, -1, 1, 1)
    return (1 - (u - k).abs()).clamp_min(0)


# ---------------------------------------------------------------------------------------------- mapping model
def _groups(widths, preferred: int = 16) -> int:
    g = preferred
    while any(w % g for w in widths):
        g -= 1
    return g


class _SpatialSelfAttention(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        # softmax(q kᵀ / √c) v over all latent positions (GMS's single-head attention); PyTorch's fused
        # attention never holds the n × n weights, so memory grows with n, not n² (a VAE that down-samples
        # less than SD's 8× gives many positions: 20 480 for a 256×320 patch at 2×)
        h = self.norm(x)
        b, c, hh, ww = h.shape
        # contiguous (b, 1, n, c): a strided view would send PyTorch to its n × n fallback
        q, k, v = (f(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.GroupNorm(groups, cin, eps=1e-6), nn.PReLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = nn.Sequential(nn.GroupNorm(groups, cout, eps=1e-6), nn.PReLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv2(self.conv1(x))


class ResAttBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.resblock = _ResBlock(cin, cout, groups)
        self.attention = _SpatialSelfAttention(cout, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(self.resblock(x))


class LatentMappingModel(nn.Module):
    """GMS's ``ResAttnUNet_DS`` with L levels (GMS: 4), ``out`` head only (see the module docstring)."""

    def __init__(self, channels: int, ch: int, mult: list[int]):
        super().__init__()
        widths = [ch * m for m in mult]
        self.groups = g = _groups([ch, *widths])
        self.input_blocks = nn.Conv2d(channels, ch, 3, padding=1)
        ins = [ch, *widths[:-1]]
        self.encoder = nn.ModuleList(ResAttBlock(i, o, g) for i, o in zip(ins, widths))
        # nested decoder: level L-2 .. 0 on cat(x_level, previous), then level "0" on cat(x0, ...)
        dec, prev = [], widths[-1]
        for lvl in range(len(widths) - 2, -1, -1):
            dec.append(ResAttBlock(widths[lvl] + prev, widths[lvl], g))
            prev = widths[lvl]
        dec.append(ResAttBlock(ch + prev, ch, g))
        self.decoder = nn.ModuleList(dec)
        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-6), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, z: Tensor) -> Tensor:
        x0 = self.input_blocks(z)
        xs, h = [], x0
        for block in self.encoder:
            h = block(h)
            xs.append(h)
        d = xs[-1]
        for block, skip in zip(self.decoder, [*reversed(xs[:-1]), x0]):
            d = block(torch.cat([skip, d], 1))
        return self.out(d)


# ---------------------------------------------------------------------------------------------- ResNet branch
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


RESNET34_BLOCKS = (3, 4, 6, 3)


class ResNetBranch(nn.Module):
    """The discriminative encoder E (eq. 3): output (B, 2·z, H/f, W/f) for the VAE's ``quant_conv``,
    and skips at the VAE encoder's levels (widths ``block_out_channels``)."""

    def __init__(self, widths: list[int], moments: int, dropout: float = 0.1):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(inplace=True))
        layers = []
        for i in range(1, len(widths)):
            n = RESNET34_BLOCKS[(i - 1) % len(RESNET34_BLOCKS)]
            blocks = [_BasicBlock(widths[i - 1], widths[i], 2)] + [_BasicBlock(widths[i], widths[i], 1)
                                                                     for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(layers)
        c = widths[-1]
        self.conv_out = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Conv2d(c, moments, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.conv1(x)
        skips = [h]
        for layer in self.layers:
            h = layer(h)
            skips.append(h)
        return self.conv_out(h), skips


# ---------------------------------------------------------------------------------------------- VAE parts
def vae_widths(vae) -> list[int]:
    return [int(c) for c in vae.config.block_out_channels]


def vae_precision(vae, x: Tensor):
    """float32 for the VAE under mixed precision when its config asks for it (``force_upcast``: SD's
    VAE overflows in float16, diffusers upcasts it too); nothing otherwise."""
    if getattr(vae.config, "force_upcast", False) and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _upcast(vae) -> bool:
    return bool(getattr(vae.config, "force_upcast", False))


def encode_with_skips(vae, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The VAE encoder's moments after ``quant_conv`` (B, 2z, h, w) and the output of its last res
    block per level (the skips), as diffusers' ``Encoder.forward`` computes them."""
    with vae_precision(vae, x):
        return _encode_with_skips(vae, x.float() if _upcast(vae) else x)


def _encode_with_skips(vae, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    enc = vae.encoder
    h = enc.conv_in(x)
    skips = []
    for down in enc.down_blocks:
        for res in down.resnets:
            h = res(h, None)
        skips.append(h)
        for d in down.downsamplers or []:
            h = d(h)
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    return vae.quant_conv(h), skips


def posterior(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the diagonal Gaussian (logvar clamped to [−30, 20], as LDM)."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def make_adapters(vae) -> nn.ModuleList:
    """One ``ResnetBlock2D(2C → C)`` per decoder level (C = that level's width; SD: 512, 512, 256, 128)."""
    from diffusers.models.resnet import ResnetBlock2D

    groups = int(vae.config.norm_num_groups)
    return nn.ModuleList(ResnetBlock2D(in_channels=2 * c, out_channels=c, temb_channels=None, groups=groups,
                                       eps=1e-6, dropout=0.0) for c in reversed(vae_widths(vae)))


def decode_with_adapters(vae, z: Tensor, skips: list[Tensor], adapters: nn.ModuleList) -> Tensor:
    """``vae.decode`` on the latent ``z`` (unscaled) with the skip adapters (diffusers'
    ``Decoder.forward`` with h = adapter(cat(resnets[0](h), skip)) in every up block)."""
    with vae_precision(vae, z):
        if _upcast(vae):
            z, skips = z.float(), [s.float() for s in skips]
        return _decode_with_adapters(vae, z, skips, adapters)


def _decode_with_adapters(vae, z: Tensor, skips: list[Tensor], adapters: nn.ModuleList) -> Tensor:
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    dec = vae.decoder
    h = dec.mid_block(dec.conv_in(z), None)
    for up, adapter, skip in zip(dec.up_blocks, adapters, reversed(skips)):
        for j, res in enumerate(up.resnets):
            h = res(h, None)
            if j == 0:
                h = adapter(torch.cat([h, skip.to(h.dtype)], 1), None)
        for u in up.upsamplers or []:
            h = u(h)
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------- model
class SemiGDANet(nn.Module):
    """Frozen VAE + mapping model + ResNet branch + two adapter sets. ``forward`` = inference."""

    def __init__(self, vae, num_classes: int, input_mode: str = "zscore", zscore_scale: float = 3.0,
                 mapping_ch: int = 0, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError("SemiGDA needs at least two classes")
        self.vae = vae
        self.vae.requires_grad_(False)
        self.num_classes, self.input_mode, self.zscore_scale = num_classes, input_mode, zscore_scale
        self.scale = float(vae.config.scaling_factor)
        widths = vae_widths(vae)
        z = int(vae.config.latent_channels)
        ch = mapping_ch or max(widths[0] // 4, 1)
        self.mapping = LatentMappingModel(z, ch, [max(w // widths[0], 1) for w in widths])
        self.resnet = ResNetBranch(widths, 2 * z, dropout)
        self.adapters_vae = make_adapters(vae)
        self.adapters_cnn = make_adapters(vae)
        self.downsampling = 2 ** (len(widths) - 1)
        # the frozen VAE is not part of state_dict (it is loaded from its path); see the hooks
        self._register_state_dict_hook(_drop_vae_keys)
        self._register_load_state_dict_pre_hook(_fill_vae_keys, with_module=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self

    # ------------------------------------------------------------------ pieces
    def vae_input(self, x: Tensor) -> Tensor:
        return to_vae_range(to_rgb(x), self.input_mode, self.zscore_scale)

    def image_latent(self, x_rgb: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The frozen encoder (eq. 1): latent mean·scale, std·scale and skips, no gradient."""
        with torch.no_grad():
            moments, skips = encode_with_skips(self.vae, x_rgb)
            mean, std = posterior(moments)
        return mean * self.scale, std * self.scale, skips

    def mask_latent(self, labels: Tensor) -> Tensor:
        """z_g (eq. 4): the frozen encoder's latent mean·scale of the ACR-encoded mask."""
        with torch.no_grad():
            moments, _ = encode_with_skips(self.vae, encode_mask(labels, self.num_classes))
            return posterior(moments)[0] * self.scale

    def cnn_latent(self, x_rgb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """z_r (eq. 3): ResNet → ``quant_conv`` (frozen, gradient flows through) → mean·scale."""
        out, skips = self.resnet(x_rgb)
        return posterior(self.vae.quant_conv(out))[0] * self.scale, skips

    def decode(self, z: Tensor, skips: list[Tensor], adapters: nn.ModuleList) -> Tensor:
        """Class probabilities (B, K, H, W) of a scaled latent through the frozen decoder."""
        return decode_mask(decode_with_adapters(self.vae, z / self.scale, skips, adapters), self.num_classes)

    def branches(self, x: Tensor, latent_noise: bool = False, decode: bool = True) -> dict:
        """Both branches on images ``x`` (nnU-Net's channels): latents ``vae_latent`` (z̃_v, mapped),
        ``cnn_latent`` (z_r) and, with ``decode``, probabilities ``vae_prob`` and ``cnn_prob``.
        ``latent_noise``: the mapping model sees z = μ + σ·ε instead of μ (stage 2 augmentation)."""
        x_rgb = self.vae_input(x)
        mean, std, vae_skips = self.image_latent(x_rgb)
        z_in = mean + std * torch.randn_like(std) if latent_noise else mean
        out = {"vae_latent": self.mapping(z_in)}
        out["cnn_latent"], cnn_skips = self.cnn_latent(x_rgb)
        if decode:
            out["vae_prob"] = self.decode(out["vae_latent"], vae_skips, self.adapters_vae)
            out["cnn_prob"] = self.decode(out["cnn_latent"], cnn_skips, self.adapters_cnn)
        return out

    def check_input(self, x: Tensor) -> None:
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"SemiGDA needs patch sides divisible by {self.downsampling} (the VAE's "
                             f"down-sampling), got {tuple(x.shape[2:])}")

    def forward(self, x: Tensor) -> Tensor:
        """Inference: log of the mean of the two branches' probabilities (no latent noise)."""
        out = self.branches(x)
        p = 0.5 * (out["vae_prob"] + out["cnn_prob"])
        return torch.log(p.clamp_min(1e-6))


def _drop_vae_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "vae.")]:
        del state_dict[k]
    return state_dict


def _fill_vae_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for k, v in module.vae.state_dict().items():
        state_dict.setdefault(prefix + "vae." + k, v)


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


__all__ = ["SemiGDANet", "LatentMappingModel", "ResNetBranch", "encode_mask", "decode_mask", "to_rgb",
           "to_vae_range", "class_levels", "make_adapters", "encode_with_skips", "decode_with_adapters",
           "posterior", "count_parameters"]
