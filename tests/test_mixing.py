"""Box masks and pasting shared by BCP / UniMatch: image and label agree voxel for voxel, 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch

from semidiff_nnunet.networks.mixing import cutmix_box_mask, paste, random_box_mask


@pytest.mark.parametrize("spatial", [(24, 30), (10, 12, 14)])
def test_random_box_is_one_box_of_the_given_fraction(spatial):
    g = torch.Generator().manual_seed(0)
    mask = random_box_mask(3, spatial, 2 / 3, generator=g)
    assert mask.shape == (3, 1, *spatial) and mask.dtype == torch.bool
    sides = [round(2 / 3 * s) for s in spatial]
    for m in mask[:, 0]:
        assert int(m.sum()) == math.prod(sides)
        idx = m.nonzero()
        extent = (idx.max(0).values - idx.min(0).values + 1).tolist()
        assert extent == sides  # one solid box
    shared = random_box_mask(3, spatial, 0.5, shared=True, generator=g)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])


@pytest.mark.parametrize("spatial", [(32, 40), (12, 16, 20)])
def test_cutmix_box_area_and_probability(spatial):
    g = torch.Generator().manual_seed(1)
    mask = cutmix_box_mask(200, spatial, p=0.5, generator=g)
    share = mask.flatten(1).float().mean(1)
    drawn = share > 0
    assert 0.35 < drawn.float().mean() < 0.65  # p = 0.5
    # integer rounding of the sides moves the share a little around U(0.02, 0.4)
    assert share[drawn].min() > 0.005 and share[drawn].max() < 0.5
    for m in mask[drawn][:5, 0]:
        idx = m.nonzero()
        extent = (idx.max(0).values - idx.min(0).values + 1)
        assert int(m.sum()) == int(extent.prod())  # a solid box
    assert not cutmix_box_mask(10, spatial, p=0.0, generator=g).any()


@pytest.mark.parametrize("spatial", [(16, 20), (8, 10, 12)])
def test_paste_agrees_for_image_and_label(spatial):
    g = torch.Generator().manual_seed(2)
    mask = random_box_mask(2, spatial, 0.5, generator=g)
    img_a, img_b = torch.zeros(2, 3, *spatial), torch.ones(2, 3, *spatial)
    lab_a, lab_b = torch.zeros(2, 1, *spatial, dtype=torch.long), torch.full((2, 1, *spatial), 2)
    img, lab = paste(img_a, img_b, mask), paste(lab_a, lab_b, mask)
    assert torch.equal(img[:, :1] == 1, mask) and torch.equal(img[:, 2:] == 1, mask)
    assert torch.equal(lab == 2, mask)
    assert torch.equal(paste(lab_a[:, 0], lab_b[:, 0], mask) == 2, mask[:, 0])  # (B, *spatial) maps


def test_cutmix_box_aspect_ratio_spans_the_authors_range():
    """UniMatch's obtain_cutmix_box: height/width ratio r ~ U(0.3, 1/0.3) on a square patch."""
    g = torch.Generator().manual_seed(3)
    mask = cutmix_box_mask(1500, (64, 64), p=1.0, generator=g)
    ratios = []
    for m in mask[:, 0]:
        idx = m.nonzero()
        h, w = (idx.max(0).values - idx.min(0).values + 1).tolist()
        ratios.append(h / w)
    ratios = torch.tensor(ratios)
    assert ratios.min() < 0.4 and ratios.max() > 2.5
    assert 0.8 < ratios.median() < 1.9  # uniform r: median near 1.8 before rejecting boxes that do not fit
