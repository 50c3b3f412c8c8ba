"""Unlabeled data: a label-free dataset view and a dataloader with nnU-Net's augmentation.

Hidden labels never reach this module: :class:`UnlabeledDataset` opens only the image file of
a case, and :class:`UnlabeledDataLoader` crops uniformly at random (nnU-Net's foreground
oversampling needs class locations, which come from labels). The one exception is opt-in and for a
plot only: with ``oracle=True`` (the ``pseudo_diagnostic`` hyperparameter) the dataset also opens the
hidden label where the case has one, and the loader crops and moves it with the image's geometry into
``hidden_target``, which the trainer takes out of the batch before any method sees it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from semidiff_nnunet.paths import UNLABELED_SUFFIX

_GEOMETRIC = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)


def _inner(t: BasicTransform) -> BasicTransform:
    return t.transform if isinstance(t, RandomTransform) else t


def _touches_image(t: BasicTransform) -> bool:
    """Keep transforms that change the image; drop seg-only and cascade helpers."""
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform

    inner = _inner(t)
    if isinstance(inner, MaskImageTransform):  # needs the (label-derived) seg channel
        return False
    cls = type(inner)
    return cls._apply_to_image is not BasicTransform._apply_to_image


def split_transforms(pipeline: ComposeTransforms) -> tuple[ComposeTransforms, ComposeTransforms]:
    """Split nnU-Net's training pipeline into (geometry, intensity) parts for image-only use.

    Geometry (crop/rotate/scale/mirror) is applied once per sample; the intensity part may then
    be applied to copies, giving weak and strong views that share their geometry. Mirroring moves
    before the intensity transforms, which leaves the distribution of views unchanged.
    """
    geometric, intensity = [], []
    for t in pipeline.transforms:
        if isinstance(_inner(t), _GEOMETRIC):
            geometric.append(t)
        elif _touches_image(t):
            intensity.append(t)
    return ComposeTransforms(geometric), ComposeTransforms(intensity)


class UnlabeledDataset:
    """Image-only view of one or more preprocessed folders (nnU-Net blosc2/npz or ours).

    ``sources`` maps case identifier -> folder. ``load_case`` returns ``(data, None, None,
    properties)`` with the label-derived ``class_locations`` removed from the properties.
    """

    def __init__(self, sources: dict[str, str], oracle: bool = False):
        self.sources = dict(sorted(sources.items()))
        self.identifiers = list(self.sources)
        self.oracle = oracle
        self._mmap = {} if os.name == "nt" else {"mmap_mode": "r"}

    def hidden_label(self, identifier: str):
        """The case's preprocessed label (``oracle`` only; the pseudo-label diagnostic), or None when the
        case has none (an image of ``imagesUnlabeled/``)."""
        folder = self.sources[identifier]
        b2 = os.path.join(folder, identifier + "_seg.b2nd")
        if os.path.isfile(b2):
            import blosc2

            return blosc2.open(urlpath=b2, mode="r", dparams={"nthreads": 1}, **self._mmap)
        npy = os.path.join(folder, identifier + "_seg.npy")
        if os.path.isfile(npy):
            return np.load(npy, "r")
        npz = os.path.join(folder, identifier + ".npz")
        if os.path.isfile(npz):
            with np.load(npz) as f:
                return f["seg"] if "seg" in f.files else None
        return None

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        folder = self.sources[identifier]
        b2 = os.path.join(folder, identifier + ".b2nd")
        if os.path.isfile(b2):
            import blosc2

            data = blosc2.open(urlpath=b2, mode="r", dparams={"nthreads": 1}, **self._mmap)
        else:
            npy = os.path.join(folder, identifier + ".npy")
            data = np.load(npy, "r") if os.path.isfile(npy) else np.load(os.path.join(folder, identifier + ".npz"))["data"]
        with open(os.path.join(folder, identifier + ".pkl"), "rb") as f:
            properties = pickle.load(f)
        properties.pop("class_locations", None)
        return data, None, None, properties


class UnlabeledDataLoader(nnUNetDataLoader):
    """Yields ``{'data': weak view, 'data_strong': strong view (optional), 'keys': ids}``.

    Crops are uniform random (no foreground oversampling, no ignore-label steering). The weak view
    is ``geometric`` then ``intensity`` (the trainer passes nnU-Net's augmentation split in two, or an
    empty intensity part for a geometry-only weak view, ``weak_view="geometry"``); the strong view is the weak view plus
    ``strong_transforms`` (if given), applied to a copy of the weak view: the strong view's
    perturbations always contain the weak one's (FixMatch's "weak + strong" order). With
    ``strong_views=k > 1`` the strong transforms are drawn k times independently on the same weak
    view: ``data_strong``, ``data_strong_2``, ... ``data_strong_k`` (UniMatch's two strong views).
    """

    def __init__(self, data: UnlabeledDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 geometric: BasicTransform, intensity: BasicTransform, strong_transforms: BasicTransform | None = None,
                 strong_views: int = 1):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=None)
        self.has_ignore = False  # uniform crops: never look at class locations
        self.geometric = geometric
        self.intensity = intensity
        self.strong_transforms = strong_transforms
        self.strong_views = max(1, int(strong_views))

    @staticmethod
    def strong_key(view: int) -> str:
        """The batch key of strong view ``view`` (0-based): data_strong, data_strong_2, ..."""
        return "data_strong" if view == 0 else f"data_strong_{view + 1}"

    def generate_train_batch(self):
        keys = self.get_indices()
        weak_all, strong_all = None, [None] * self.strong_views
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            hidden_all = None
            for j, key in enumerate(keys):
                data, _, _, _ = self._data.load_case(key)
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                img = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                if self.patch_size_was_2d:
                    img = img[:, 0]
                if getattr(self._data, "oracle", False):  # the diagnostic: the same crop and geometry
                    hidden = self._data.hidden_label(key)
                    seg = (torch.full((1, *img.shape[1:]), -1, dtype=torch.int16) if hidden is None else
                           torch.from_numpy(crop_and_pad_nd(hidden, bbox, -1).astype(np.int16)))
                    if self.patch_size_was_2d and hidden is not None:
                        seg = seg[:, 0]
                    moved = self.geometric(image=img, segmentation=seg)
                    img, seg = moved["image"], moved["segmentation"]
                    if hidden_all is None:
                        hidden_all = torch.empty((self.batch_size, *seg.shape), dtype=torch.int16)
                    hidden_all[j] = seg
                else:
                    img = self.geometric(image=img)["image"]
                weak = self.intensity(image=img)["image"]
                if weak_all is None:
                    weak_all = torch.empty((self.batch_size, *weak.shape), dtype=torch.float32)
                weak_all[j] = weak
                for v in range(self.strong_views if self.strong_transforms is not None else 0):
                    strong = self.strong_transforms(image=weak.clone())["image"]
                    if strong_all[v] is None:
                        strong_all[v] = torch.empty((self.batch_size, *strong.shape), dtype=torch.float32)
                    strong_all[v][j] = strong
        batch = {"data": weak_all, "keys": keys}
        if hidden_all is not None:
            batch["hidden_target"] = hidden_all
        for v, views in enumerate(strong_all):
            if views is not None:
                batch[self.strong_key(v)] = views
        return batch


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str) -> str:
    """Where images of ``imagesUnlabeled/`` are preprocessed for one configuration."""
    return str(Path(preprocessed_dataset_folder).with_name(Path(preprocessed_dataset_folder).name + UNLABELED_SUFFIX))


def list_cases(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f[: -len(".pkl")] for f in os.listdir(folder) if f.endswith(".pkl"))
