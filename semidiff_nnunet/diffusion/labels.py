"""Label encodings for diffusion on segmentation maps: integer labels ↔ one-hot ↔ [−1, 1]·scale.

Label diffusion (DDP / Bit Diffusion's ``bit_scale``, Diff-UNet, SuperDiffusion's mask pathway)
noises one-hot maps moved to {−1, +1} and multiplied by a scale factor (SNR control: a smaller
scale makes the same noise level destroy the label faster, Chen et al. 2022 "Analog Bits" §3).
Integer label maps have shape ``(B, *spatial)``; one-hot and signed maps ``(B, C, *spatial)``
(2D or 3D). nnU-Net targets come as ``(B, 1, *spatial)``: pass ``target[:, 0]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "labels_to_onehot",
    "onehot_to_signed",
    "signed_to_onehot_probs",
    "labels_to_signed",
    "signed_to_labels",
]


def labels_to_onehot(
    labels: Tensor, num_classes: int, ignore_index: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Integer labels ``(B, *spatial)`` in [0, C) → one-hot ``(B, C, *spatial)``.

    Pixels equal to ``ignore_index`` get an all-zero vector. Any other value outside [0, C)
    raises ``ValueError``.
    """
    if labels.is_floating_point():
        raise ValueError("labels must be an integer tensor of shape (B, *spatial)")
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (or equal ignore_index), found {labels[bad].unique().tolist()}"
        )
    onehot = torch.nn.functional.one_hot(labels.where(valid, 0), num_classes).movedim(-1, 1).to(dtype)
    if ignore_index is not None:
        onehot = onehot * valid.unsqueeze(1).to(dtype)
    return onehot


def onehot_to_signed(onehot: Tensor, scale: float = 1.0) -> Tensor:
    """One-hot (or probabilities) ``(B, C, *spatial)`` in [0, 1] → (2·p − 1)·scale in [−scale, scale]."""
    return (2 * onehot - 1) * scale


def signed_to_onehot_probs(x: Tensor, scale: float = 1.0) -> Tensor:
    """Inverse of ``onehot_to_signed``, clamped to [0, 1]: clamp((x/scale + 1)/2, 0, 1).
    Shape ``(B, C, *spatial)``; a noisy or predicted map gives per-class scores, not a softmax."""
    return ((x / scale + 1) / 2).clamp(0, 1)


def labels_to_signed(
    labels: Tensor, num_classes: int, scale: float = 1.0, ignore_index: int | None = None
) -> Tensor:
    """Integer labels ``(B, *spatial)`` → one-hot in {−scale, +scale} ``(B, C, *spatial)`` float32."""
    return onehot_to_signed(labels_to_onehot(labels, num_classes, ignore_index), scale)


def signed_to_labels(x: Tensor) -> Tensor:
    """Signed (or any per-class score) map ``(B, C, *spatial)`` → argmax labels ``(B, *spatial)`` long.
    (The scale factor is positive, so it does not change the argmax.)"""
    return x.argmax(dim=1)
