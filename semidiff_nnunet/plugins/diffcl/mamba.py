"""Selective state-space scan (Mamba's S6) in pure PyTorch, and SegMamba's tri-orientated Mamba.

* :func:`selective_scan` — the selective scan of Gu & Dao 2023 (Mamba, Algorithm 2; Diff-CL eq. 4):
  with Δ = softplus(δ + bias), Ā_t = exp(Δ_t A), B̄_t x_t = Δ_t B_t x_t,

      h_t = Ā_t ⊙ h_{t−1} + Δ_t B_t x_t,   y_t = C_t · h_t + D ⊙ x_t,   out_t = y_t ⊙ SiLU(z_t),

  with h_0 = 0. Same signature and semantics as ``mamba_ssm``'s ``selective_scan_fn`` /
  ``selective_scan_ref``. ``backend="torch"`` runs everywhere (CPU included): vectorised over batch,
  channels and state, a Python loop over the sequence (``chunk_size=0``) or over chunks of it with
  a closed form inside each chunk (``chunk_size>0``: fewer, larger kernels, better on GPUs).
  ``backend="fused"`` calls mamba-ssm's CUDA kernel (optional extra ``[mamba]``); ``"auto"`` takes
  the kernel when it is installed and the tensors are on CUDA, and the PyTorch scan otherwise.
* :class:`MambaScanBranch` — one direction's parameters of a Mamba block (depthwise causal conv1d
  with kernel ``d_conv``, x-projection to (Δ, B, C), Δ-projection, A = −exp(A_log), D).
* :class:`TriOrientedMamba` — SegMamba's ToM layer (Xing et al., MICCAI 2024, ``Mamba(...,
  bimamba_type="v3", nslices=...)``): one shared input projection (to x and the gate z), three
  scans with their own conv/SSM parameters — forward, backward (the flipped sequence) and
  inter-slice — summed and sent through one shared output projection.

Token order. Tokens are the voxels of a ``(B, C, *spatial)`` map flattened in C order (the last
axis fastest). SegMamba's inter-slice scan cuts the flattened sequence into ``nslices`` chunks
(one per slice of the first spatial axis when ``nslices`` equals its size, which is how SegMamba
sets it for its 128³ patches) and interleaves them, so consecutive tokens are the same in-plane
position on consecutive slices: the first spatial axis varies fastest. We compute ``nslices``
from the actual feature map (= its first spatial size), so the scan is SegMamba's for any patch
size. **2D (our choice):** the first spatial axis is the image rows, so the inter-slice scan walks
down each column (pixel (h, w) of every row, then column w + 1): a column-major scan that links
vertical neighbours the forward/backward row-major scans keep ``W`` steps apart.
``slice_scan=False`` drops it (forward and backward scans only, Vision-Mamba style).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff_nnunet.errors import SemidiffError

__all__ = [
    "fused_scan_available",
    "selective_scan",
    "selective_scan_torch",
    "scan_order",
    "MambaScanBranch",
    "TriOrientedMamba",
    "DIRECTIONS",
]

DIRECTIONS = ("forward", "backward", "slice")
SCAN_BACKENDS = ("auto", "torch", "fused")


@functools.lru_cache(maxsize=1)
def _fused_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` or None (not installed / not importable)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - ImportError, or a build against another torch/CUDA
        return None
    return selective_scan_fn


def fused_scan_available() -> bool:
    """True when mamba-ssm's fused CUDA selective scan can be imported and a GPU is visible."""
    return torch.cuda.is_available() and _fused_scan_fn() is not None


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         chunk_size: int = 0) -> Tensor:
    """Pure-PyTorch selective scan (the recurrence in the module docstring).

    Shapes (mamba-ssm's): ``u``, ``delta``, ``z`` (Bt, Dm, L); ``A`` (Dm, N) real; ``B``, ``C``
    (Bt, N, L) (input-dependent), or grouped (Bt, G, N, L) where channel group g (Dm/G consecutive
    channels) uses B[:, g]; ``D``, ``delta_bias`` (Dm,). Returns (Bt, Dm, L) in ``u``'s dtype; the
    scan itself runs in float32.

    ``chunk_size = 0``: one step per token. ``chunk_size = T > 0``: inside a chunk of T tokens,
    h_t = exp(S_t) h_in + Σ_{s≤t} exp(S_t − S_s) Δ_s B_s x_s with S the running sum of Δ A
    (S_t − S_s ≤ 0 for s ≤ t since A < 0, so every exponential is at most 1 — no overflow); costs
    O(T) more memory per token.
    """
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bt, dm, length = u.shape
    n = A.shape[1]
    B, C = (_per_channel(m, dm) for m in (B, C))  # (Bt, Dm or 1, L, N)
    dA = delta.unsqueeze(-1) * A[:, None, :]  # (Bt, Dm, L, N): log Ā_t
    dBu = (delta * u).unsqueeze(-1) * B  # (Bt, Dm, L, N)
    h = u.new_zeros(bt, dm, n)
    states = []
    if chunk_size <= 0:
        # unbind once: indexing step by step would make backward allocate a full-size gradient per step
        for decay_t, dbu_t in zip(torch.exp(dA).unbind(2), dBu.unbind(2)):
            h = decay_t * h + dbu_t
            states.append(h)
        hs = torch.stack(states, dim=2)
    else:
        for start in range(0, length, chunk_size):
            a = dA[:, :, start:start + chunk_size]  # (Bt, Dm, T, N)
            s = torch.cumsum(a, dim=2)
            size = a.shape[2]
            diff = s.unsqueeze(3) - s.unsqueeze(2)  # (Bt, Dm, T(t), T(s), N): S_t − S_s
            causal = torch.ones(size, size, dtype=torch.bool, device=u.device).tril()
            weights = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf")))
            hc = torch.einsum("bdtsn,bdsn->bdtn", weights, dBu[:, :, start:start + size])
            hc = hc + torch.exp(s) * h.unsqueeze(2)
            states.append(hc)
            h = hc[:, :, -1]
        hs = torch.cat(states, dim=2)
    y = (hs * C).sum(-1)  # (Bt, Dm, L)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def _per_channel(m: Tensor, channels: int) -> Tensor:
    """B or C, (Bt, N, L) or grouped (Bt, G, N, L), as (Bt, 1 or Dm, L, N)."""
    if m.ndim == 3:
        return m.transpose(1, 2).unsqueeze(1)
    groups = m.shape[1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    return m.repeat_interleave(channels // groups, dim=1).transpose(2, 3)


@torch.compiler.disable  # nnU-Net compiles networks on CUDA: keep the loop (or kernel) out of the graph
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   backend: str = "auto", chunk_size: int = 0) -> Tensor:
    """Selective scan with a choice of implementation (shapes as :func:`selective_scan_torch`).

    ``backend``: ``"torch"`` (pure PyTorch), ``"fused"`` (mamba-ssm's CUDA kernel; a clear error
    when it is missing or the tensors are not on CUDA) or ``"auto"`` (fused when possible).
    """
    if backend not in SCAN_BACKENDS:
        raise SemidiffError(f"scan_backend={backend!r}: choose one of {', '.join(SCAN_BACKENDS)}.")
    use_fused = backend == "fused" or (backend == "auto" and u.is_cuda and _fused_scan_fn() is not None)
    if use_fused:
        fn = _fused_scan_fn()
        if fn is None:
            raise SemidiffError("scan_backend=fused needs mamba-ssm: pip install 'semidiff-nnunet[mamba]' "
                                "(CUDA only), or use --set scan_backend=torch.")
        if not u.is_cuda:
            raise SemidiffError("scan_backend=fused runs on CUDA tensors only; use --set scan_backend=torch "
                                "(or auto) on the CPU.")
        return fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
                  None if D is None else D.float(), None if z is None else z.contiguous(),
                  None if delta_bias is None else delta_bias.float(), delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


def scan_order(spatial_shape: Sequence[int], direction: str, device=None) -> Tensor:
    """Token permutation of one scan: ``tokens[:, :, order]`` is the sequence that direction reads.

    Tokens are numbered in C order over ``spatial_shape``. ``forward``: identity; ``backward``:
    reversed; ``slice``: the first spatial axis fastest (SegMamba's inter-slice scan; in 2D a
    column-major scan). Returns a long tensor of length prod(spatial_shape).
    """
    shape = tuple(int(s) for s in spatial_shape)
    length = math.prod(shape)
    idx = torch.arange(length, device=device)
    if direction == "forward":
        return idx
    if direction == "backward":
        return idx.flip(0)
    if direction == "slice":
        return idx.view(shape).movedim(0, -1).reshape(-1)
    raise ValueError(f"unknown scan direction {direction!r}; choose from {DIRECTIONS}")


class MambaScanBranch(nn.Module):
    """The per-direction part of a Mamba block (``mamba_simple.Mamba`` with its initialisation).

    forward(x, z): ``x``, ``z`` (B, d_inner, L) in this branch's token order →
    SiLU(causal depthwise conv1d(x)) → x_proj → (Δ, B, C) → selective scan with gate z →
    (B, d_inner, L).
    """

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 1,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # mamba_simple: dt weights U(±dt_rank^-0.5), bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max]
        std = dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation: A = −(1, 2, ..., N) for every channel
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))

    def ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(u, δ, B, C) of the scan for ``x`` (B, d_inner, L): u = SiLU(conv(x)); δ before bias/softplus."""
        length = x.shape[-1]
        u = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(u.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L), bias added in the scan
        return u, delta, b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous()

    def forward(self, x: Tensor, z: Tensor, backend: str = "auto", chunk_size: int = 0) -> Tensor:
        u, delta, b, c = self.ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        return selective_scan(u, delta, A, b, c, self.D, z, self.dt_proj.bias, True, backend, chunk_size)


class TriOrientedMamba(nn.Module):
    """SegMamba's tri-orientated Mamba (``bimamba_type="v3"``) on tokens of a 2D or 3D map.

    Args:
        d_model: token width (the feature channels).
        d_state, d_conv, expand: SSM state size N, causal conv kernel, inner width factor
            (SegMamba/Mamba defaults 16, 4, 2).
        directions: any of ``forward``, ``backward``, ``slice`` (see the module docstring).
        backend, chunk_size: how the scan runs (:func:`selective_scan`).

    forward(x, spatial_shape): ``x`` (B, L, d_model) with L = prod(spatial_shape) tokens in C order
    → (B, L, d_model) = out_proj(Σ_directions reorder⁻¹(scan(reorder(in_proj(x))))). The directions'
    scans run as one grouped scan (their channels stacked), so the sequential loop runs once.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 directions: Sequence[str] = DIRECTIONS, backend: str = "auto", chunk_size: int = 0):
        super().__init__()
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {tuple(directions)}")
        if backend not in SCAN_BACKENDS:
            raise SemidiffError(f"scan_backend={backend!r}: choose one of {', '.join(SCAN_BACKENDS)}.")
        self.d_model, self.d_inner = d_model, expand * d_model
        self.directions = tuple(directions)
        self.backend, self.chunk_size = backend, chunk_size
        dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # keyed "<direction>_scan" ("forward" is taken by nn.Module)
        self.branches = nn.ModuleDict({f"{d}_scan": MambaScanBranch(self.d_inner, d_state, d_conv, dt_rank)
                                       for d in self.directions})
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: Tensor, spatial_shape: Sequence[int]) -> Tensor:
        if x.shape[1] != math.prod(spatial_shape):
            raise ValueError(f"{x.shape[1]} tokens do not fill the spatial shape {tuple(spatial_shape)}")
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2·d_inner, L)
        # every direction's scan inputs, stacked along the channels: one scan (grouped B and C)
        orders, us, deltas, bs, cs, zs, As, Ds, biases = [], [], [], [], [], [], [], [], []
        for name in self.directions:
            branch = self.branches[f"{name}_scan"]
            order = scan_order(spatial_shape, name, x.device)
            xs, z = xz[..., order].chunk(2, dim=1)
            u, delta, b, c = branch.ssm_inputs(xs)
            for store, value in ((orders, order), (us, u), (deltas, delta), (bs, b), (cs, c), (zs, z),
                                 (As, -torch.exp(branch.A_log.float())), (Ds, branch.D),
                                 (biases, branch.dt_proj.bias)):
                store.append(value)
        y = selective_scan(torch.cat(us, 1), torch.cat(deltas, 1), torch.cat(As), torch.stack(bs, 1),
                           torch.stack(cs, 1), torch.cat(Ds), torch.cat(zs, 1), torch.cat(biases), True,
                           self.backend, self.chunk_size)
        out = None
        for name, order, part in zip(self.directions, orders, y.chunk(len(self.directions), dim=1)):
            part = part[..., torch.argsort(order)] if name != "forward" else part
            out = part if out is None else out + part
        return self.out_proj(out.transpose(1, 2))
