"""Box masks and mixing shared by the copy-paste / CutMix methods (BCP, UniMatch, SemiGDA), 2D and 3D.

A mask is a boolean tensor (B, 1, *spatial): True where the pasted (foreground) sample shows. The
same mask mixes images (all channels) and label maps, so image and label agree voxel for voxel.

* :func:`random_box_mask`: fixed-size boxes (BCP, Bai et al. CVPR 2023; their
  ``generate_mask``: one box of ``round(2/3 · side)`` per axis at a uniformly random position,
  the same box for the whole batch in their code — here one per sample unless ``shared=True``);
* :func:`cutmix_box_mask`: CutMix boxes as UniMatch's ``obtain_cutmix_box`` (area share
  s ~ U(0.02, 0.4) of the patch, aspect ratio r ~ U(0.3, 1/0.3) relative to the patch's, drawn
  with probability p,
  retried until the box fits); in 3D the same with the volume share s, sides
  s^(1/d) · patch side · aspect per axis, the aspects multiplying to 1.

Every draw takes an explicit ``torch.Generator`` or the global torch RNG (the trainer's seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _rand(generator: torch.Generator | None, *size: int) -> Tensor:
    return torch.rand(size, generator=generator)


def _box(spatial: Sequence[int], sides: Sequence[int], starts: Sequence[int]) -> Tensor:
    mask = torch.zeros(tuple(spatial), dtype=torch.bool)
    mask[tuple(slice(s, s + n) for s, n in zip(starts, sides))] = True
    return mask


def random_box_mask(batch: int, spatial: Sequence[int], fraction: float = 2 / 3, shared: bool = False,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """One axis-aligned box per sample with sides ``round(fraction · side)`` (at least 1) at a
    uniformly random position; ``shared=True``: the same box for the whole batch (BCP's code)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"box fraction must be in (0, 1], got {fraction}")
    sides = [max(1, int(round(fraction * s))) for s in spatial]
    masks = []
    for _ in range(1 if shared else batch):
        starts = [int(_rand(generator, 1).item() * (s - n + 1)) for s, n in zip(spatial, sides)]
        masks.append(_box(spatial, sides, starts))
    out = torch.stack(masks * batch if shared else masks)[:, None]
    return out.to(device)


def cutmix_box_mask(batch: int, spatial: Sequence[int], p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                    ratio: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Tensor:
    """UniMatch's CutMix box per sample: with probability ``p`` a box covering a share
    s ~ U(``area``) of the patch with aspect ratios in ``ratio``; otherwise an empty mask."""
    d = len(spatial)
    masks = []
    for _ in range(batch):
        mask = torch.zeros(tuple(spatial), dtype=torch.bool)
        if _rand(generator, 1).item() < p:
            for _attempt in range(100):
                share = area[0] + (area[1] - area[0]) * _rand(generator, 1).item()
                # aspect ratios r ~ U(ratio) (as the authors draw them), one per axis beyond the first;
                # normalised so that the sides multiply to share · patch: in 2D, box height / width =
                # r × patch height / width, the box covering share of the patch
                aspects = [ratio[0] + (ratio[1] - ratio[0]) * _rand(generator, 1).item() for _ in range(d - 1)]
                aspects = aspects + [1.0]
                norm = math.prod(aspects) ** (1 / d)
                sides = [int(round(share ** (1 / d) * n * a / norm)) for n, a in zip(spatial, aspects)]
                if all(1 <= n <= s for n, s in zip(sides, spatial)):
                    starts = [int(_rand(generator, 1).item() * (s - n + 1)) for s, n in zip(spatial, sides)]
                    mask = _box(spatial, sides, starts)
                    break
        masks.append(mask)
    return torch.stack(masks)[:, None].to(device)


def paste(background: Tensor, foreground: Tensor, mask: Tensor) -> Tensor:
    """``foreground`` inside ``mask``, ``background`` outside; works for images (B, C, ...) and label
    maps (B, 1, ...) or (B, ...) with the same mask."""
    if background.dim() == mask.dim() - 1:  # (B, *spatial) label maps
        mask = mask[:, 0]
    return torch.where(mask, foreground, background)
