"""ProtoDiff's class prototypes (Xi et al. 2025, §2.3): K non-learnable, ℓ2-normalised prototypes per
class in the D-dimensional latent space of the label embeddings, assigned by cosine argmax within
the pixel's class, updated by online clustering, and the two losses that anchor the latent space
to them (eq. 2 and 3).

Update rule (the paper leaves it open): ProtoSeg's momentum update (Zhou et al., "Rethinking
Semantic Segmentation: A Prototype View", CVPR 2022, whose PPC/PPD losses and 0.01/0.001 weights
ProtoDiff's eq. 2/3 and Algorithm 1 reproduce): for every prototype p_{c,k} that received pixels in
the step, m = normalise(Σ of its assigned, ℓ2-normalised embeddings) and
p_{c,k} ← normalise(γ·p_{c,k} + (1 − γ)·m), γ = ``momentum`` (ProtoSeg: 0.999). ProtoSeg balances
the assignment of the *update* with Sinkhorn-Knopp; ProtoDiff's text assigns by cosine argmax, which
we use for both the update and the losses. Under DDP the sums and counts are all-reduced before the
update, so every rank holds the same prototypes.

Shapes: pixel embeddings ``z`` (N, D) (normalised here), labels (N,) in [0, C), prototypes (C, K, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PrototypeBank", "assign_prototypes", "inter_loss", "intra_loss", "momentum_update"]


def assign_prototypes(z: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
    """k = argmax_k ⟨z_n, p_{c_n,k}⟩ (cosine: both ℓ2-normalised) within each pixel's class c_n.
    ``z`` (N, D), ``labels`` (N,), ``prototypes`` (C, K, D) → (N,) long in [0, K)."""
    z = F.normalize(z.float(), dim=1)
    own = prototypes.float()[labels]  # (N, K, D): the prototypes of each pixel's class
    return torch.einsum("nd,nkd->nk", z, own).argmax(1)


def momentum_update(prototypes: Tensor, z: Tensor, labels: Tensor, assignment: Tensor, momentum: float,
                    all_reduce: bool = True) -> Tensor:
    """ProtoSeg's online update (module docstring); returns new (C, K, D) unit-norm prototypes.
    Prototypes that received no pixel (on any rank) are left as they are."""
    C, K, D = prototypes.shape
    z = F.normalize(z.detach().float(), dim=1)
    flat = labels.long() * K + assignment.long()
    sums = torch.zeros(C * K, D, device=z.device, dtype=torch.float32).index_add_(0, flat, z)
    counts = torch.zeros(C * K, device=z.device, dtype=torch.float32).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32))
    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    old = prototypes.reshape(C * K, D).float()
    hit = counts > 0
    mean_dir = F.normalize(sums, dim=1)
    new = old.clone()
    new[hit] = F.normalize(momentum * old[hit] + (1 - momentum) * mean_dir[hit], dim=1)
    return new.reshape(C, K, D).to(prototypes.dtype)


def inter_loss(z: Tensor, labels: Tensor, assignment: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """Eq. 2, averaged over pixels: −log exp(iᵀp_{c,k}/τ) / (exp(iᵀp_{c,k}/τ) + Σ_{p⁻ ∈ P⁻} exp(iᵀp⁻/τ)),
    P⁻ = the prototypes of every *other* class (the other prototypes of class c are in neither term)."""
    C, K, D = prototypes.shape
    z = F.normalize(z.float(), dim=1)
    sims = z @ prototypes.float().reshape(C * K, D).t() / temperature  # (N, C·K)
    own_class = (torch.arange(C * K, device=z.device) // K)[None, :] == labels[:, None]
    target = labels.long() * K + assignment.long()
    keep = ~own_class
    keep[torch.arange(z.shape[0], device=z.device), target] = True
    logits = sims.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(logits, 1).sub(sims.gather(1, target[:, None])[:, 0]).mean()


def intra_loss(z: Tensor, labels: Tensor, assignment: Tensor, prototypes: Tensor) -> Tensor:
    """Eq. 3, averaged over pixels: (1 − iᵀp_{c,k})², i and p ℓ2-normalised."""
    z = F.normalize(z.float(), dim=1)
    p = prototypes.float()[labels.long(), assignment.long()]
    return (1 - (z * p).sum(1)).pow(2).mean()


class PrototypeBank:
    """The (C, K, D) prototypes as checkpointed method state (``register_state``): ``state_dict`` /
    ``load_state_dict`` hold the tensor and the number of updates.

    Initialisation: ProtoSeg's, N(0, 0.02²) then ℓ2-normalised (drawn from the seeded global RNG, so
    identical on every rank and in every run with the same seed)."""

    def __init__(self, num_classes: int, num_prototypes: int, dim: int, momentum: float = 0.999,
                 device: torch.device | str = "cpu"):
        if num_prototypes < 1:
            raise ValueError("num_prototypes must be at least 1")
        self.momentum = float(momentum)
        self.prototypes = F.normalize(torch.randn(num_classes, num_prototypes, dim) * 0.02, dim=-1).to(device)
        self.num_updates = 0

    def assign(self, z: Tensor, labels: Tensor) -> Tensor:
        return assign_prototypes(z, labels, self.prototypes)

    @torch.no_grad()
    def update(self, z: Tensor, labels: Tensor, assignment: Tensor | None = None) -> Tensor:
        """Assign (if not given) and update; returns the assignment."""
        assignment = self.assign(z, labels) if assignment is None else assignment
        self.prototypes = momentum_update(self.prototypes, z, labels, assignment, self.momentum)
        self.num_updates += 1
        return assignment

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.clone(), "num_updates": self.num_updates, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.prototypes.device, self.prototypes.dtype)
        self.num_updates = int(state["num_updates"])
