"""The unlabeled stream: image-only loading, nnU-Net's augmentation split into geometry/intensity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from semidiff_nnunet.training.unlabeled import UnlabeledDataLoader, UnlabeledDataset, split_transforms


def test_split_transforms_of_nnunets_pipeline():
    pipeline = nnUNetTrainer.get_training_transforms(
        (32, 32), (-np.pi, np.pi), [[1, 1], [0.5, 0.5]], (0, 1), False, use_mask_for_norm=[True],
        foreground_labels=[1, 2])
    geometric, intensity = split_transforms(pipeline)
    inner = lambda t: getattr(t, "transform", t)  # noqa: E731
    kinds = {type(inner(t)) for t in geometric.transforms}
    assert kinds == {SpatialTransform, MirrorTransform}
    names = [type(inner(t)).__name__ for t in intensity.transforms]
    assert "GaussianNoiseTransform" in names and "GammaTransform" in names
    # seg-only and label-derived steps are gone
    assert not {"RemoveLabelTansform", "DownsampleSegForDSTransform", "MaskImageTransform"} & set(names)
    assert all(not isinstance(inner(t), RemoveLabelTansform) for t in intensity.transforms)


@pytest.fixture
def loader_parts(demo2d):
    pre = Path(os.environ["nnUNet_preprocessed"]) / demo2d
    pm = PlansManager(str(pre / "semidiffDemoPlans.json"))
    lm = pm.get_label_manager(json.loads((pre / "dataset.json").read_text(encoding="utf-8")))
    folder = str(pre / "nnUNetPlans_2d")
    ids = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl"))[:4]
    return UnlabeledDataset({k: folder for k in ids}), lm, folder, ids


@pytest.mark.slow  # demo2d: a dataset planned and preprocessed with nnU-Net
def test_loader_never_opens_label_files(loader_parts, tmp_path):
    dataset, lm, folder, ids = loader_parts
    # a copy of the cases without any _seg file: loading must still work
    for k in ids:
        for ext in (".b2nd", ".pkl"):
            (tmp_path / f"{k}{ext}").symlink_to(Path(folder) / f"{k}{ext}")
    ds = UnlabeledDataset({k: str(tmp_path) for k in ids})
    data, seg, seg_prev, props = ds.load_case(ids[0])
    assert seg is None and seg_prev is None and "class_locations" not in props
    loader = UnlabeledDataLoader(ds, 3, (32, 32), (32, 32), lm, ComposeTransforms([]), ComposeTransforms([]))
    batch = next(loader)
    assert set(batch) == {"data", "keys"} and batch["data"].shape == (3, 1, 32, 32)


@pytest.mark.slow  # demo2d: a dataset planned and preprocessed with nnU-Net
def test_strong_view_shares_the_geometry(loader_parts):
    dataset, lm, _, _ = loader_parts
    geometric = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1))])
    identity = ComposeTransforms([])
    loader = UnlabeledDataLoader(dataset, 4, (32, 32), (32, 32), lm, geometric, identity, strong_transforms=identity)
    np.random.seed(0)
    torch.manual_seed(0)
    batch = next(loader)
    assert torch.equal(batch["data"], batch["data_strong"])  # same crop and mirroring in both views
    noisy = ComposeTransforms([GaussianNoiseTransform(noise_variance=(0.5, 0.5), p_per_channel=1)])
    loader = UnlabeledDataLoader(dataset, 4, (32, 32), (32, 32), lm, geometric, identity, strong_transforms=noisy)
    batch = next(loader)
    diff = batch["data_strong"] - batch["data"]
    assert diff.abs().mean() > 0.1  # the strong view differs by the intensity perturbation only
    assert abs(diff.std().item() - 0.5) < 0.05  # batchgeneratorsv2 draws N(0, sigma) with sigma from noise_variance


@pytest.mark.slow  # demo2d: a dataset planned and preprocessed with nnU-Net
def test_strong_view_is_the_weak_view_plus_more(loader_parts):
    """The strong view starts from the weak view (nnU-Net's intensity augmentation included), so its
    perturbations contain the weak one's: with a strong step that adds nothing it equals the weak view,
    with a constant shift it is the weak view shifted — also when the weak view is noisy."""
    dataset, lm, _, _ = loader_parts
    geometric = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1))])
    weak_noise = ComposeTransforms([GaussianNoiseTransform(noise_variance=(0.5, 0.5), p_per_channel=1)])

    class Shift:
        def __init__(self, c):
            self.c = c

        def __call__(self, **data):
            return {**data, "image": data["image"] + self.c}

    for c in (0.0, 3.0):
        loader = UnlabeledDataLoader(dataset, 4, (32, 32), (32, 32), lm, geometric, weak_noise,
                                     strong_transforms=Shift(c))
        batch = next(loader)
        assert torch.allclose(batch["data_strong"] - batch["data"], torch.full_like(batch["data"], c), atol=1e-6)


@pytest.mark.slow  # demo2d: a dataset planned and preprocessed with nnU-Net
def test_two_strong_views_are_independent_draws_on_one_weak_view(loader_parts):
    """``strong_views=2`` (UniMatch): data_strong and data_strong_2 share the weak view's crop and
    geometry but draw their strong perturbations independently."""
    dataset, lm, _, _ = loader_parts
    geometric = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1))])
    identity = ComposeTransforms([])
    noisy = ComposeTransforms([GaussianNoiseTransform(noise_variance=(0.5, 0.5), p_per_channel=1)])
    loader = UnlabeledDataLoader(dataset, 4, (32, 32), (32, 32), lm, geometric, identity, strong_transforms=noisy,
                                 strong_views=2)
    batch = next(loader)
    assert {"data", "data_strong", "data_strong_2"} <= set(batch)
    d1, d2 = batch["data_strong"] - batch["data"], batch["data_strong_2"] - batch["data"]
    assert abs(d1.std().item() - 0.5) < 0.05 and abs(d2.std().item() - 0.5) < 0.05  # both from the weak view
    assert abs(torch.corrcoef(torch.stack([d1.flatten(), d2.flatten()]))[0, 1].item()) < 0.1  # independent
