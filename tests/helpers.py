"""Helpers shared by several test modules (``from helpers import ...``; pytest puts ``tests/`` on
``sys.path``). Fixtures stay in ``conftest.py``; these are plain functions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from semidiff_nnunet.testing import assert_same_state  # noqa: F401  (its one home: the plugin authors' kit)


# ----------------------------------------------------------------------------- methods
def builtin_methods() -> list[str]:
    """The built-in methods, sorted, from their one home: the ``semidiff`` entry points of pyproject.toml
    (as installed), read through the registry. A test lists or parametrises over these, never a copy."""
    from semidiff_nnunet.registry import Registry

    return Registry().builtin_names("method")


# ----------------------------------------------------------------------------- files

def raw(dataset: str) -> Path:
    """``$nnUNet_raw/<dataset>`` of the test workspace."""
    return Path(os.environ["nnUNet_raw"]) / dataset


def load_image(path: Path) -> np.ndarray:
    """The voxel array of an image or segmentation file (any format SimpleITK reads)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def names(folder: Path) -> list[str]:
    """Sorted file names in ``folder`` ([] if it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def tree_digest(root: Path) -> str:
    """One hash over every path and file content below ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def convert_untouched(name: str, source: Path, raw_root: Path, **kwargs) -> Path:
    """``convert_dataset(name, source, raw_root=raw_root, **kwargs)`` checking that the source is left
    byte-for-byte unchanged and that no temporary folder is left next to the result."""
    from semidiff_nnunet.dataset_conversion.api import convert_dataset

    digest = tree_digest(source)
    kwargs.setdefault("num_processes", 1)
    out = convert_dataset(name, source, raw_root=raw_root, **kwargs)
    assert tree_digest(source) == digest, "the source was modified"
    assert [p.name for p in raw_root.iterdir()] == [out.name], "temporary folders were left behind"
    return out


# ----------------------------------------------------------------------------- stock nnU-Net
def assert_stock_predictor_matches(run_cli, dataset: str, method: str, labeled: str, ours: Path, workdir: Path, *,
                                   configuration: str = "2d", plans: str = "semidiffDemoPlans") -> dict[str, str]:
    """Stock ``nnUNetv2_predict``, in a clean interpreter whose nnU-Net variables are only the ones
    ``semidiff env`` prints, predicts ``imagesTs`` of ``dataset`` with the run (method, labeled, seed 0, fold 0) and
    gives the same segmentations as the ones in ``ours`` (our prediction of the same images, no TTA).

    Returns that environment (e.g. to check ``nnUNet_results`` or the ``nnUNet_extTrainer`` shim).
    """
    from semidiff_nnunet import api

    ours_files = sorted(Path(ours).glob("*.nii.gz"))
    assert ours_files, f"{ours} holds no predictions to compare"
    trainer = api.run_info(dataset, method, labeled, 0, configuration, 0, plans).trainer
    code, env_out, err = run_cli("env", "-m", method, "--labeled", labeled)
    assert code == 0, err
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # a fresh shell + eval "$(semidiff env)"
    exports = [line[len("export "):] for line in env_out.splitlines() if line.startswith("export ")]
    assert exports, env_out  # (earlier in-process output may come first)
    for line in exports:
        key, value = line.split("=", 1)
        env[key] = value.strip("'")
    stock = Path(workdir) / f"stock_{method}_{configuration}"
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(raw(dataset) / "imagesTs"),
                           "-o", str(stock), "-d", dataset, "-tr", trainer, "-p", plans, "-c", configuration, "-f", "0",
                           "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                          env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in stock.glob("*.nii.gz")) == [f.name for f in ours_files]
    for f in ours_files:
        assert np.array_equal(load_image(f), load_image(stock / f.name)), f.name
    return env
