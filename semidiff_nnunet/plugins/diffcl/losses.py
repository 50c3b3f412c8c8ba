"""Diff-CL's losses (Guo et al. 2025, §4.1, §4.3, §4.4) as plain functions, plus its memory bank.

* :func:`dice_ce` — D(P, Y) + w·E(P, Y) (eq. 8–9 and 20–21) on logits and integer labels.
* :func:`cross_pseudo_supervision` — DS ↔ CS cross pseudo supervision (eq. 6–7): each network's
  softmax is supervised by the other's hard pseudo labels (argmax, no gradient).
* :class:`MemoryBank` — per-class FIFO queues of DS features of labeled pixels the DS network
  predicts correctly (§4.3), bounded, synchronised across DDP ranks.
* :func:`label_propagation_loss` — the inter-sample contrastive loss (eq. 11–15).

The supervised terms (eq. 18–21) of the planned networks use nnU-Net's own Dice+CE (deep
supervision); the trainer only sets its CE weight to β·λ(t).

Tensors are ``(B, C, *spatial)`` for 2D and 3D alike; labels ``(B, *spatial)`` long.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from semidiff_nnunet.diffusion import labels_to_onehot

__all__ = ["soft_dice_loss", "dice_ce", "cross_pseudo_supervision", "MemoryBank", "gather_variable",
           "label_propagation_loss"]


def soft_dice_loss(logits: Tensor, labels: Tensor, include_background: bool = False, smooth: float = 1e-5,
                   mask: Tensor | None = None) -> Tensor:
    """1 − mean_c 2Σ p_c y_c / (Σ p_c + Σ y_c) (eq. 8/20), sums over the batch and space (batch Dice,
    as the V-Net SSL code bases compute it on LA). Background is left out unless asked (nnU-Net,
    and the LA code's foreground-only Dice); with a single class it is used anyway. ``mask``
    (B, *spatial) in {0, 1}: only those pixels count."""
    probs = torch.softmax(logits.float(), 1)
    onehot = labels_to_onehot(labels, probs.shape[1], dtype=probs.dtype)
    if mask is not None:
        m = mask.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * m, onehot * m
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background and dice.numel() > 1:
        dice = dice[1:]
    return 1 - dice.mean()


def dice_ce(logits: Tensor, labels: Tensor, ce_weight: float = 1.0, include_background: bool = False,
            mask: Tensor | None = None) -> Tensor:
    """D(softmax(logits), labels) + ``ce_weight``·CE(logits, labels) (eq. 6–9 with λ = ``ce_weight``).
    ``logits`` (B, C, *spatial); ``labels`` (B, *spatial), treated as constants; ``mask`` (B, *spatial)
    in {0, 1}: the pixels that count (e.g. confident pseudo labels), all when None."""
    labels = labels.detach().long()
    loss = soft_dice_loss(logits, labels, include_background, mask=mask)
    if ce_weight:
        if mask is None:
            ce = F.cross_entropy(logits.float(), labels)
        else:
            m = mask.to(torch.float32)
            ce = (F.cross_entropy(logits.float(), labels, reduction="none") * m).sum() / m.sum().clamp_min(1.0)
        loss = loss + ce_weight * ce
    return loss


def cross_pseudo_supervision(logits_cs: Tensor, logits_ds: Tensor, lambda_cs: float = 1.0,
                             lambda_ds: float = 1.0, pseudo_cs: Tensor | None = None,
                             pseudo_ds: Tensor | None = None, mask_cs: Tensor | None = None,
                             mask_ds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(L_p^c, L_p^d) of eq. 7 and 6 on unlabeled patches.

    L_p^d = D(P̃, Ŷ) + λ₁ E(P̃, Ŷ) with Ŷ = argmax of the CS logits; L_p^c = D(P̂, Ỹ) + λ₂ E(P̂, Ỹ)
    with Ỹ = argmax of the DS logits. ``lambda_ds`` = λ₁, ``lambda_cs`` = λ₂. Pseudo labels carry no
    gradient, so L_p^c trains only CS and L_p^d only DS. Symmetric: swapping the networks (and the
    λs) swaps the two losses. ``pseudo_cs``/``pseudo_ds``: the argmaxes when the caller has them;
    ``mask_cs``/``mask_ds``: which pixels of CS's / DS's pseudo labels are used (confidence masking).
    """
    pseudo_cs = logits_cs.detach().argmax(1) if pseudo_cs is None else pseudo_cs
    pseudo_ds = logits_ds.detach().argmax(1) if pseudo_ds is None else pseudo_ds
    return (dice_ce(logits_cs, pseudo_ds, lambda_cs, mask=mask_ds),
            dice_ce(logits_ds, pseudo_cs, lambda_ds, mask=mask_cs))


# ------------------------------------------------------------------------------------------ memory bank
def gather_variable(x: Tensor) -> Tensor:
    """Concatenate ``x`` (N_r, ...) of every DDP rank in rank order (N_r may differ between ranks);
    ``x`` itself when torch.distributed is not initialised. Rows are padded to the largest N_r for
    ``all_gather`` and the padding is dropped again."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class MemoryBank:
    """Per-class FIFO queues of L2-normalised feature vectors (Diff-CL's MB, §4.3).

    ``features`` (C, size, d), ``count`` (C,) filled slots, ``ptr`` (C,) next slot to overwrite: when
    a queue is full, the oldest entries go first. ``update`` admits only labeled pixels whose
    prediction equals their label, at most ``per_step`` random ones per class and step on each rank,
    then gathers the admitted features and labels of all DDP ranks (rank order), so every rank
    pushes the same entries and the banks stay identical. Checkpointed via ``state_dict``.
    """

    def __init__(self, num_classes: int, dim: int, size: int = 512, per_step: int = 64, device=None):
        if size < 1 or per_step < 1:
            raise ValueError("memory bank size and per_step must be at least 1")
        self.num_classes, self.dim, self.size, self.per_step = num_classes, dim, size, per_step
        self.features = torch.zeros(num_classes, size, dim, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.ptr = torch.zeros(num_classes, dtype=torch.long, device=device)

    def to(self, device) -> MemoryBank:
        self.features, self.count, self.ptr = self.features.to(device), self.count.to(device), self.ptr.to(device)
        return self

    @torch.no_grad()
    def select(self, labels: Tensor, predictions: Tensor,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Indices and labels of admitted pixels: ``labels == predictions``, at most ``per_step``
        random ones per class. ``labels``, ``predictions`` (N,). Returns (indices (M,), labels (M,))."""
        labels, predictions = labels.reshape(-1).long(), predictions.reshape(-1).long()
        correct = (labels == predictions) & (labels >= 0) & (labels < self.num_classes)
        picked = []
        for c in range(self.num_classes):
            idx = torch.nonzero(correct & (labels == c)).flatten()
            if idx.numel() > self.per_step:
                perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[: self.per_step]
                idx = idx[perm.to(idx.device)]
            picked.append(idx)
        idx = torch.cat(picked)
        return idx, labels[idx]

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Enqueue ``features`` (N, d) with classes ``labels`` (N,) (normalised here), FIFO per class."""
        features = F.normalize(features.detach().float(), dim=1).to(self.features.device)
        labels = labels.to(self.features.device)
        for c in range(self.num_classes):
            new = features[labels == c][-self.size:]
            n = new.shape[0]
            if n == 0:
                continue
            slots = (self.ptr[c] + torch.arange(n, device=new.device)) % self.size
            self.features[c, slots] = new
            self.ptr[c] = (self.ptr[c] + n) % self.size
            self.count[c] = torch.clamp(self.count[c] + n, max=self.size)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, predictions: Tensor, project=None,
               generator: torch.Generator | None = None) -> int:
        """Admit correctly predicted labeled pixels: ``features`` (N, F), ``labels``/``predictions``
        (N,); ``project`` (e.g. the projection head, (M, F) -> (M, d)) is applied to the admitted rows
        only. Gathers the admitted features across DDP ranks. Returns the number pushed (all ranks)."""
        idx, lab = self.select(labels, predictions, generator)
        feats = features[idx].detach()
        feats = gather_variable((project(feats) if project is not None else feats).float())
        lab = gather_variable(lab)
        self.push(feats, lab)
        return int(lab.numel())

    def sample(self, per_class: int, generator: torch.Generator | None = None) -> list[Tensor | None]:
        """``a``: for each class up to ``per_class`` random stored features (p, d), None when empty."""
        out = []
        for c in range(self.num_classes):
            n = int(self.count[c])
            if n == 0:
                out.append(None)
                continue
            idx = torch.randperm(n, generator=generator, device="cpu")[:per_class].to(self.features.device)
            out.append(self.features[c, idx])
        return out

    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "count": self.count.clone(), "ptr": self.ptr.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(f"memory bank shape {tuple(state['features'].shape)} does not match "
                             f"{tuple(self.features.shape)} (num_classes, bank_size, proj_dim)")
        self.features.copy_(state["features"])
        self.count.copy_(state["count"])
        self.ptr.copy_(state["ptr"])


# -------------------------------------------------------------------------------------- contrastive
def label_propagation_loss(anchors: list[Tensor | None], unlabeled: Tensor, top_k: int, temperature: float,
                           reduction: str = "sum") -> Tensor:
    """L_cl of eq. 11–15.

    ``anchors``: per class γ the labeled features a^γ (p_γ, d) (None: class skipped);
    ``unlabeled``: b (q, d). With cos = cosine similarity (eq. 11), per class:
    b^{γ,P} = the ``top_k`` b_j with the largest Σ_i cos(b_j, a_i) (eq. 12), b^{γ,N} the ``top_k``
    with the largest Σ_i (1 − cos(b_j, a_i)) (eq. 13), and for every a_i ∈ a^γ, b_j ∈ b^{γ,P}

        L(a_i, b_j) = −log( e^{cos(a_i,b_j)/τ} / (e^{cos(a_i,b_j)/τ} + Σ_{b_α ∈ b^{γ,N}} e^{cos(a_i,b_α)/τ}) )

    (eq. 14; the text's "b_j ∈ b^{γ,N}" there is read as b^{γ,P}, as eq. 15 sums it).
    ``reduction="sum"`` is eq. 15 (Σ_γ Σ_i Σ_j); ``"mean"`` divides by the number of terms.
    Gradients reach ``unlabeled`` (and ``anchors`` if they require them); the top-k choice is not
    differentiated. Returns a scalar (zero, still attached to ``unlabeled``, when no class has anchors).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    b = F.normalize(unlabeled.float(), dim=1)
    k = min(int(top_k), b.shape[0])
    total, terms = unlabeled.sum() * 0.0, 0
    for a in anchors:
        if a is None or a.numel() == 0 or k == 0:
            continue
        cos = F.normalize(a.float(), dim=1) @ b.t()  # (p, q)
        score = cos.detach().sum(0)  # Σ_i cos(b_j, a_i), (q,)
        pos = score.topk(k).indices  # eq. 12
        neg = (-score).topk(k).indices  # eq. 13: largest Σ(1 − cos) = smallest Σ cos
        logit_pos = cos[:, pos] / temperature  # (p, k)
        lse_neg = torch.logsumexp(cos[:, neg] / temperature, dim=1, keepdim=True)  # (p, 1)
        loss = torch.logaddexp(logit_pos, lse_neg) - logit_pos  # eq. 14, (p, k)
        total = total + loss.sum()
        terms += loss.numel()
    if reduction == "mean" and terms:
        total = total / terms
    return total
