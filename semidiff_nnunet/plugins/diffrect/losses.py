"""DiffRect's label colouring, calibration guidance and pseudo-label losses (Liu et al., MICCAI 2024).

Plain functions on tensors shaped ``(B, C, *spatial)`` (probabilities/logits) or ``(B, *spatial)``
(integer labels), 2D and 3D alike. Pseudo labels are produced under ``no_grad`` and every target
is detached inside the loss, so no gradient can reach the network that made a target.

* :func:`semantic_colors` / :func:`colorize` — the semantic colouring scheme (paper eq. 4);
* :func:`calibration_guidance` — τ of eq. 5–6, as the authors' code feeds it: (1 − Dice)·999;
* :func:`dice_loss` / :func:`ce_dice` — SSL4MIS ``DiceLoss`` (+ CE), the authors' loss;
* :func:`confident_pseudo_label` — the authors' min-max-normalised confidence threshold;
* :func:`complementary_loss` — the authors' complementary term with its entropy weight.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff_nnunet.diffusion import labels_to_onehot

__all__ = ["PAPER_COLORS", "semantic_colors", "colorize", "dice_loss", "ce_dice", "calibration_guidance",
           "confident_pseudo_label", "complementary_loss"]

#: the authors' colour maps (``train_diffrect_ACDC.py``), RGB in [0, 255]
PAPER_COLORS = {
    2: ((0, 0, 0), (255, 255, 255)),
    3: ((0, 0, 0), (255, 0, 0), (0, 255, 0)),
    4: ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)),
}


def semantic_colors(num_classes: int) -> Tensor:
    """C distinct RGB colours in [0, 1], float32 ``(C, 3)``; row c colours class c.

    C ≤ 4: the authors' colours (C = 1: black). C > 4: the four of C = 4 followed by greedy
    farthest-point picks (max of the min Euclidean distance to the colours chosen so far, ties to
    the first candidate) on the RGB grid with 5 levels per channel (a finer grid beyond 125
    classes); the 5th colour is white. Deterministic, injective, and the colours of C > 4 classes
    are a prefix of those of C + 1 classes (up to 125).
    """
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    if num_classes == 1:
        return torch.zeros(1, 3)
    if num_classes in PAPER_COLORS:
        return torch.tensor(PAPER_COLORS[num_classes], dtype=torch.float32) / 255
    levels = 5
    while levels ** 3 < num_classes:
        levels += 1
    grid = torch.tensor(list(itertools.product(range(levels), repeat=3)), dtype=torch.float64) / (levels - 1)
    chosen = torch.tensor(PAPER_COLORS[4], dtype=torch.float64) / 255
    dist = torch.cdist(grid, chosen).min(1).values
    picks = [chosen]
    for _ in range(num_classes - 4):
        i = int(torch.argmax(dist))  # first maximum: deterministic
        picks.append(grid[i : i + 1])
        dist = torch.minimum(dist, torch.cdist(grid, grid[i : i + 1])[:, 0])
    return torch.cat(picks).float()


def colorize(labels: Tensor, num_classes: int) -> Tensor:
    """Integer labels ``(B, *spatial)`` → colour maps ``(B, 3, *spatial)`` in [0, 1] (paper eq. 4).

    Same values as the authors' numpy → PIL → ``ToTensor`` path (colour/255)."""
    colors = semantic_colors(num_classes).to(labels.device)
    return colors[labels.long()].movedim(-1, 1)


def dice_loss(probs: Tensor, labels: Tensor, smooth: float = 1e-5, keep: Tensor | None = None) -> Tensor:
    """SSL4MIS ``DiceLoss``: mean over all C classes (background included) of
    1 − (2 Σ p·y + s) / (Σ p² + Σ y² + s), sums over the whole batch. ``probs`` (B, C, *spatial),
    ``labels`` (B, *spatial) long (detached); ``keep`` (B, *spatial) bool: only those voxels count.
    Returns a scalar."""
    probs = probs.float()
    target = labels_to_onehot(labels.detach(), probs.shape[1])
    if keep is not None:
        mask = keep.detach().unsqueeze(1).float()
        probs, target = probs * mask, target * mask
    dims = [0, *range(2, probs.ndim)]
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def ce_dice(logits: Tensor, labels: Tensor, keep: Tensor | None = None) -> Tensor:
    """CE(logits, labels) + Dice(softmax(logits), labels), the authors' loss on GT and pseudo labels;
    with ``keep`` (B, *spatial) bool, both over the kept voxels only (CE averaged over them)."""
    labels = labels.detach().long()
    if keep is None:
        return F.cross_entropy(logits.float(), labels) + dice_loss(torch.softmax(logits.float(), 1), labels)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    kept = keep.detach().float()
    return ((ce * kept).sum() / kept.sum().clamp_min(1.0)
            + dice_loss(torch.softmax(logits.float(), 1), labels, keep=keep))


@torch.no_grad()
def calibration_guidance(labels_a: Tensor, labels_b: Tensor, num_classes: int, scale: float = 999.0) -> Tensor:
    """Calibration guidance τ (paper eq. 6) as the authors compute it: ``scale``·(1 − mean_c Dice_c)
    of two hard label maps ``(B, *spatial)`` over the whole batch (background included, smooth
    1e-5). The paper writes τ = Dice(y_a, y_b); the code feeds 1 − Dice scaled to [0, 999] through
    the sinusoidal embedding, which we follow. Returns a 0-d float32 tensor (broadcast it to (B,))."""
    return (scale * dice_loss(labels_to_onehot(labels_a, num_classes), labels_b)).float()


@torch.no_grad()
def confident_pseudo_label(probs: Tensor, threshold: float = 0.8) -> Tensor:
    """Hard pseudo labels ``(B, *spatial)`` from probabilities ``(B, C, *spatial)`` (authors' code).

    q = (p − min_c p) / max_c p (the authors' ``normalize``: it divides by the max, not by
    max − min); classes with q ≤ threshold are zeroed and the argmax is taken, so a voxel whose
    every q is below the threshold becomes class 0 (background), it is not ignored."""
    probs = probs.float()
    # the class with the largest p also has the largest q = 1 - min/max, so the masked argmax is
    # argmax p where (max - min) / max > threshold, else 0 (two reductions instead of four)
    top, label = probs.max(1)
    confident = (top - probs.min(1).values) > threshold * top
    return torch.where(confident, label, torch.zeros_like(label))


@torch.no_grad()
def confident_mask(probs: Tensor, threshold: float = 0.8) -> Tensor:
    """The voxels :func:`confident_pseudo_label` labels by their argmax (the others it sets to background):
    (max − min) / max > ``threshold`` over the classes; ``(B, *spatial)`` bool."""
    probs = probs.float()
    top = probs.max(1).values
    return (top - probs.min(1).values) > threshold * top


def complementary_loss(weak_probs: Tensor, strong_probs: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' complementary loss ``get_comp_loss`` → (a·CE(1 − p_s, argmin p_w), a).

    a = mean over (b, c) of 1 − H(p_s[b, c, :] / Σ p_s[b, c, :]) / log N, the entropy of each
    class map taken as a distribution over the N voxels (``Categorical(probs=...)`` on the
    reshaped (B, C, N) tensor, whose log clamps p to [eps, 1 − eps]; a keeps its gradient, as in the
    code). ``1 − p_s`` is passed to CE as logits, as in the code. The caller adds
    ``a · loss``, i.e. a² overall (authors' code). Shapes (B, C, *spatial); ``weak_probs`` detached.
    """
    b, c = strong_probs.shape[:2]
    flat = strong_probs.float().reshape(b, c, -1)
    n = flat.shape[-1]
    dist = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    # Categorical's entropy: p·log(clamp(p, eps, 1 - eps)). Not xlogy(p, p): its gradient is 0/0 = NaN
    # where a softmax probability underflows to exactly 0, which a confident network reaches in float32.
    eps = torch.finfo(dist.dtype).eps
    entropy = -(dist * torch.log(dist.clamp(eps, 1 - eps))).sum(-1)
    a = (1 - entropy / math.log(n)).mean() if n > 1 else flat.new_tensor(1.0)
    comp_labels = torch.argmin(weak_probs.detach(), dim=1)
    return a * F.cross_entropy(1 - strong_probs.float(), comp_labels), a
