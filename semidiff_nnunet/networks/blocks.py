"""Generic building blocks conditioned on a time (or guidance) embedding, 2D and 3D alike.

Every block takes its operators the way nnU-Net's ``dynamic_network_architectures`` does
(``conv_op``, ``norm_op`` + kwargs, ``dropout_op`` + kwargs, ``nonlin`` + kwargs), so one code
path serves 2D and 3D and whatever normalisation the plans chose. :func:`ops_from_plans` turns a
configuration's ``network_arch_init_kwargs`` (imports already resolved by nnU-Net, or dotted
strings) into that dictionary.
"""

from __future__ import annotations

import pydoc
from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp, get_matching_pool_op
from torch import Tensor, nn

__all__ = ["ops_from_plans", "TembConvBlock", "TembDown", "TembUp"]


def _locate(obj):
    if isinstance(obj, str):
        found = pydoc.locate(obj)
        if found is None:
            raise ImportError(f"cannot import {obj!r} named in the plans")
        return found
    return obj


def ops_from_plans(arch_kwargs: dict) -> dict:
    """``conv_op``, ``norm_op``, ``norm_op_kwargs``, ``dropout_op``, ``dropout_op_kwargs``, ``nonlin``,
    ``nonlin_kwargs`` and ``conv_bias`` from a plans' ``arch_kwargs`` (dotted names resolved).
    The nonlinearity is made out-of-place (``inplace=False``): the blocks add embeddings after it."""
    nonlin_kwargs = dict(arch_kwargs.get("nonlin_kwargs") or {})
    nonlin_kwargs.pop("inplace", None)
    return {
        "conv_op": _locate(arch_kwargs["conv_op"]),
        "norm_op": _locate(arch_kwargs.get("norm_op")),
        "norm_op_kwargs": dict(arch_kwargs.get("norm_op_kwargs") or {}),
        "dropout_op": _locate(arch_kwargs.get("dropout_op")),
        "dropout_op_kwargs": dict(arch_kwargs.get("dropout_op_kwargs") or {}),
        "nonlin": _locate(arch_kwargs.get("nonlin")) or nn.LeakyReLU,
        "nonlin_kwargs": nonlin_kwargs,
        "conv_bias": bool(arch_kwargs.get("conv_bias", True)),
    }


def _same_padding(kernel_size: Sequence[int]) -> list[int]:
    return [(k - 1) // 2 for k in kernel_size]


class TembConvBlock(nn.Module):
    """conv → norm → nonlin → (+ Linear(act(temb))) → dropout → conv → norm → nonlin.

    The DDPM-style ConvBlock of DiffRect's rectification model (``networks/unet_de.py``: the
    embedding projection ``Linear(temb_dim, C_out)(swish(temb))`` is added after the first conv
    and before dropout and the second conv). ``x`` (B, C_in, *spatial), ``temb`` (B, temb_dim)
    → (B, C_out, *spatial). ``temb=None`` skips the embedding (a plain double conv).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, *, conv_op, kernel_size,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=nn.LeakyReLU, nonlin_kwargs=None, conv_bias: bool = True):
        super().__init__()
        kernel_size = list(kernel_size)
        pad = _same_padding(kernel_size)

        def norm(c):
            return norm_op(c, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

        self.conv0 = conv_op(in_channels, out_channels, kernel_size, padding=pad, bias=conv_bias)
        self.norm0 = norm(out_channels)
        self.act0 = nonlin(**(nonlin_kwargs or {}))
        self.temb_proj = nn.Linear(temb_dim, out_channels) if temb_dim else None
        self.temb_act = nn.SiLU()
        self.dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else nn.Identity()
        self.conv1 = conv_op(out_channels, out_channels, kernel_size, padding=pad, bias=conv_bias)
        self.norm1 = norm(out_channels)
        self.act1 = nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.act0(self.norm0(self.conv0(x)))
        if temb is not None and self.temb_proj is not None:
            e = self.temb_proj(self.temb_act(temb)).to(h.dtype)
            h = h + e.view(*e.shape, *([1] * (h.ndim - 2)))
        h = self.dropout(h)
        return self.act1(self.norm1(self.conv1(h)))


class TembDown(nn.Module):
    """Max-pool by ``stride`` (per axis, as the plans pool), then a :class:`TembConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, stride: Sequence[int], **ops):
        super().__init__()
        stride = list(stride)
        self.pool = get_matching_pool_op(ops["conv_op"], pool_type="max")(kernel_size=stride, stride=stride)
        self.block = TembConvBlock(in_channels, out_channels, temb_dim, **ops)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.block(self.pool(x), temb)


class TembUp(nn.Module):
    """Transposed conv (kernel = stride) to the skip's resolution, ``cat([skip, up])``, :class:`TembConvBlock`."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, temb_dim: int,
                 stride: Sequence[int], **ops):
        super().__init__()
        stride = list(stride)
        transp = get_matching_convtransp(ops["conv_op"])
        self.up = transp(in_channels, skip_channels, stride, stride, bias=ops.get("conv_bias", True))
        self.block = TembConvBlock(2 * skip_channels, out_channels, temb_dim, **ops)

    def forward(self, x: Tensor, skip: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.block(torch.cat([skip, self.up(x)], 1), temb)
