"""A deterministic synthetic dataset in nnU-Net raw format (2D or 3D), for the demo and the tests.

Each image holds a bright blob (label 1) and a darker box (label 2) on a smooth, noisy
background with a random bias field, so a small network learns it in minutes on a CPU while
the task is not trivially solved by a threshold (the classes overlap in intensity with the noise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

DEMO_IDS = {2: 990, 3: 991}
DEMO_NAMES = {2: "Demo2D", 3: "Demo3D"}


def _case(rng: np.random.RandomState, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    seg = np.zeros(shape, dtype=np.uint8)
    # label 1: an ellipsoid
    center = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
    radii = [rng.uniform(0.12 * s, 0.22 * s) for s in shape]
    ell = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1
    # label 2: an axis-aligned box somewhere else (may touch the ellipsoid; label 1 wins)
    lo = [int(rng.uniform(0.1 * s, 0.6 * s)) for s in shape]
    size = [int(rng.uniform(0.15 * s, 0.3 * s)) for s in shape]
    box = np.ones(shape, dtype=bool)
    for g, a, b in zip(grids, lo, size):
        box &= (g >= a) & (g < a + b)
    seg[box] = 2
    seg[ell] = 1
    bias = 1 + 0.3 * sum(np.sin(g / s * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.28))
                         for g, s in zip(grids, shape)) / len(shape)
    img = np.where(seg == 1, 2.0, np.where(seg == 2, 1.0, 0.0)).astype(np.float32)
    img = img * bias + rng.normal(0, 0.45, shape).astype(np.float32) + 0.5 * bias
    return img.astype(np.float32), seg


def _write(img: np.ndarray, path: Path, spacing: tuple[float, ...]) -> None:
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(img)
    itk.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    sitk.WriteImage(itk, str(path), useCompression=True)


def generate_demo_dataset(raw_root: Path | str, dim: int = 2, num_train: int | None = None, num_test: int | None = None,
                          num_unlabeled: int = 0, shape: tuple[int, ...] | None = None, seed: int = 0,
                          dataset_id: int | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``Dataset{id}_{name}`` under ``raw_root``; return its folder. Idempotent for equal arguments."""
    if dim not in (2, 3):
        raise ValueError("dim must be 2 or 3")
    num_train = num_train if num_train is not None else (40 if dim == 2 else 20)
    num_test = num_test if num_test is not None else (10 if dim == 2 else 5)
    shape = tuple(shape) if shape is not None else ((64, 64) if dim == 2 else (32, 40, 40))
    spacing = (1.0,) * dim if dim == 2 else (2.0, 1.0, 1.0)
    dataset_id = dataset_id if dataset_id is not None else DEMO_IDS[dim]
    name = name or DEMO_NAMES[dim]
    target = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    meta = {"dim": dim, "num_train": num_train, "num_test": num_test, "num_unlabeled": num_unlabeled,
            "shape": list(shape), "seed": seed}
    stamp = target / ".semidiff_synthetic.json"
    if target.exists():
        if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == meta and not overwrite:
            return target
        if not overwrite and not stamp.is_file():
            raise FileExistsError(f"{target} exists and was not made by the demo generator")
        shutil.rmtree(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for split, n in (("Tr", num_train), ("Ts", num_test)):
        for i in range(n):
            img, seg = _case(rng, shape)
            case = f"demo{split.lower()}_{i:03d}"
            _write(img, tmp / f"images{split}" / f"{case}_0000.nii.gz", spacing)
            _write(seg, tmp / f"labels{split}" / f"{case}.nii.gz", spacing)
    if num_unlabeled:
        (tmp / "imagesUnlabeled").mkdir()
        for i in range(num_unlabeled):
            img, _ = _case(rng, shape)
            _write(img, tmp / "imagesUnlabeled" / f"demoun_{i:03d}_0000.nii.gz", spacing)
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "blob": 1, "box": 2},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"semidiff synthetic {dim}D demo dataset (seed {seed})",
    }
    (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    (tmp / ".semidiff_synthetic.json").write_text(json.dumps(meta), encoding="utf-8")
    tmp.rename(target)
    return target
