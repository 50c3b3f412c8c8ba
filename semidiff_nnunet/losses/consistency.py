"""Unsupervised loss terms of the classic semi-supervised baselines, as plain functions.

No network code here: every function takes logits or probabilities shaped ``(B, C, *spatial)``
(2D and 3D alike) and returns a scalar (or a map where said). Targets that the papers treat
as constants (teacher outputs, pseudo labels) are detached inside the function, so a caller
cannot forget it. Used by ``plugins/uamt.py``, ``cps.py``, ``fixmatch.py``, ``urpc.py``,
``cct.py`` and ``entropy_min.py``; the equations are cited there.
"""

from __future__ import annotations

import math

import numpy
import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_mse(student_logits: Tensor, target_probs: Tensor, reduction: str = "mean") -> Tensor:
    """(softmax(student) − target)², the mean-teacher consistency (SSL4MIS ``softmax_mse_loss``).

    ``target_probs`` (B, C, *spatial) is detached. ``reduction="none"`` returns the
    (B, C, *spatial) map; ``"mean"`` averages over every voxel and class.
    """
    dist = (torch.softmax(student_logits.float(), 1) - target_probs.detach().float()) ** 2
    return dist if reduction == "none" else dist.mean()


def entropy_map(probs: Tensor, normalize: bool = True, eps: float = 0.0) -> Tensor:
    """Per-voxel Shannon entropy −Σ_c p_c log p_c of probabilities (B, C, *spatial) -> (B, 1, *spatial).

    ``normalize`` divides by log C, the largest possible value, so the map lies in [0, 1]
    (Vu et al. 2019, Eq. 2; SSL4MIS ``entropy_loss``). ``eps`` is added inside the log
    (SSL4MIS uses 1e-6 for the UA-MT uncertainty); with ``eps=0`` zero probabilities count 0.
    """
    probs = probs.float()
    logp = torch.log(probs + eps) if eps > 0 else torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    ent = -(probs * logp).sum(1, keepdim=True)
    return ent / math.log(probs.shape[1]) if normalize else ent


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean normalised entropy of softmax(logits), Vu et al. 2019 Eq. 2–3 (ADVENT ``MinEnt``).

    L_ent = 1/N Σ_x −Σ_c p_x,c log p_x,c / log C, computed with ``log_softmax`` (exact, stable).
    """
    logp = torch.log_softmax(logits.float(), 1)
    ent = -(logp.exp() * logp).sum(1)
    return ent.mean() / math.log(logits.shape[1])


def uamt_threshold(progress: float, num_classes: int, start: float = 0.75) -> float:
    """UA-MT uncertainty threshold H = (start + (1 − start)·r)·U_max, U_max = ln C (Yu et al. 2019 §2.2).

    ``progress`` r ∈ [0, 1] is the ramp value (sigmoid ramp over the run in SSL4MIS);
    for C = 2 this is SSL4MIS's ``(0.75 + 0.25·r)·ln 2``.
    """
    return (start + (1.0 - start) * float(progress)) * math.log(num_classes)


def uncertainty_masked_mse(student_logits: Tensor, teacher_probs: Tensor, uncertainty: Tensor,
                           threshold: float) -> tuple[Tensor, Tensor]:
    """UA-MT consistency (Yu et al. 2019 Eq. 2): MSE only where the teacher is certain.

    L_c = Σ_x 𝟙(u_x < H) ‖f(x) − f'(x)‖² / (2 Σ_x 𝟙(u_x < H) + 1e-16)  (SSL4MIS's normalisation:
    the squared distance is summed over classes, averaged over the kept voxels, halved).
    ``uncertainty`` is (B, 1, *spatial). Returns (loss, mask); the teacher is detached.
    """
    mask = (uncertainty.detach() < threshold).float()
    dist = softmax_mse(student_logits, teacher_probs, reduction="none")
    return (mask * dist).sum() / (2 * mask.sum() + 1e-16), mask


def cross_pseudo_supervision(logits_a: Tensor, logits_b: Tensor) -> tuple[Tensor, Tensor]:
    """CPS (Chen et al. 2021 Eq. 2): each network's CE against the other's argmax (a constant).

    Returns (CE(a, argmax b), CE(b, argmax a)), each averaged over all voxels.
    """
    pseudo_a = logits_a.detach().argmax(1)
    pseudo_b = logits_b.detach().argmax(1)
    return F.cross_entropy(logits_a.float(), pseudo_b), F.cross_entropy(logits_b.float(), pseudo_a)


def fixmatch_loss(strong_logits: Tensor, weak_logits: Tensor, threshold: float = 0.95) -> tuple[Tensor, Tensor]:
    """FixMatch unlabeled loss (Sohn et al. 2020 Eq. 4), per voxel instead of per image.

    ℓ_u = 1/N Σ_x 𝟙(max_c q_x,c ≥ τ) H(argmax q_x, p_x(strong)), q = softmax(weak) detached.
    Averaged over *all* N voxels (masked ones count zero), as in the paper's 1/(μB).
    Returns (loss, mask (B, *spatial) float).
    """
    q = torch.softmax(weak_logits.detach().float(), 1)
    conf, pseudo = q.max(1)
    mask = (conf >= threshold).float()
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * mask).mean(), mask


def urpc_loss(scale_logits: list[Tensor]) -> Tensor:
    """Uncertainty-rectified pyramid consistency (Luo et al. 2022 Eq. 5–7; SSL4MIS URPC).

    ``scale_logits``: S logits (B, C, *spatial) already resized to one resolution. With
    p_s = softmax, p̄ = mean_s p_s and D_s = KL(p̄ ‖ p_s) = Σ_c p̄ (log p̄ − log p_s) (B, 1, *spatial):

        L = 1/S Σ_s [ mean(‖p̄ − p_s‖² · e^{−D_s}) / (mean(e^{−D_s}) + 1e-8) + mean(D_s) ]

    where the first mean runs over batch, classes and voxels and the others over batch and
    voxels (SSL4MIS). p̄ is not detached (as in SSL4MIS: gradients reach every scale).
    """
    probs = [torch.softmax(s.float(), 1) for s in scale_logits]
    mean = torch.stack(probs).mean(0)
    log_mean = torch.log(mean.clamp_min(1e-12))
    total = 0.0
    for p, s in zip(probs, scale_logits):
        kl = (mean * (log_mean - torch.log_softmax(s.float(), 1))).sum(1, keepdim=True)
        w = torch.exp(-kl)
        total = total + ((mean - p) ** 2 * w).mean() / (w.mean() + 1e-8) + kl.mean()
    return total / len(probs)


def largest_components(seg: Tensor, num_classes: int) -> Tensor:
    """Per sample and foreground class, the largest connected component of ``seg`` (B, *spatial)
    (full connectivity); voxels of the other components become background (the authors'
    ``get_ACDC_2DLargestCC`` / ``LargestCC_pancreas``)."""
    from scipy import ndimage

    arr = seg.detach().cpu().numpy()
    out = numpy.zeros_like(arr)
    structure = ndimage.generate_binary_structure(arr.ndim - 1, arr.ndim - 1)
    for i in range(arr.shape[0]):
        for c in range(1, num_classes):
            components, n = ndimage.label(arr[i] == c, structure=structure)
            if n == 0:
                continue
            sizes = numpy.bincount(components.ravel())[1:]
            out[i][components == int(numpy.argmax(sizes)) + 1] = c
    return torch.from_numpy(out).to(seg.device)
