"""CPU end-to-end CLI runs of the six classic baselines (2D and 3D) and stock nnU-Net loading.

``api.predict`` goes through ``nnUNetPredictor.initialize_from_trained_model_folder``, i.e. the
exported ``checkpoint_final.pth`` must load into the network stock nnU-Net builds from the plans.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY

pytestmark = pytest.mark.slow

METHODS = {
    "uamt": ("semidiff_nnunet.plugins.uamt", "UAMTTrainer", {"teacher"}, set()),
    "cps": ("semidiff_nnunet.plugins.cps", "CPSTrainer", set(), {"network_2"}),
    "fixmatch": ("semidiff_nnunet.plugins.fixmatch", "FixMatchTrainer", set(), set()),
    "urpc": ("semidiff_nnunet.plugins.urpc", "URPCTrainer", set(), set()),
    "cct": ("semidiff_nnunet.plugins.cct", "CCTTrainer", set(), {"aux_decoders"}),
    "entropy-min": ("semidiff_nnunet.plugins.entropy_min", "EntropyMinTrainer", set(), set()),
}
TERMS = {"uamt": "consistency", "cps": "cps", "fixmatch": "unsupervised", "urpc": "consistency",
         "cct": "consistency", "entropy-min": "entropy"}


@pytest.fixture(autouse=True)
def baselines_registered():
    """Until pyproject.toml declares the entry points, register the plugins in-process (no-op after)."""
    from semidiff_nnunet.registry import get_registry

    reg = get_registry()
    for name, (module, *_rest) in METHODS.items():
        if name not in reg.names("method"):
            reg.register(importlib.import_module(module), name)
    assert set(METHODS) <= set(reg.names("method"))


def _raw(name: str) -> Path:
    return Path(os.environ["nnUNet_raw"]) / name


def _load(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _train_and_predict(run_cli, tmp_path, dataset, method, config, labeled, epochs):
    code, _, err = run_cli("plan-and-train", dataset, "-m", method, "--labeled", labeled, "-c", config,
                           "--epochs", str(epochs), "--iters-per-epoch", "2", "--no-val", *TINY)
    assert code == 0, err
    from semidiff_nnunet import api

    info = api.run_info(dataset, method, labeled, 0, config, 0, "semidiffDemoPlans")
    module, trainer, states, networks = METHODS[method]
    assert info.fold_folder.parts[-2] == f"{trainer}__semidiffDemoPlans__{config}"
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == epochs and ck["trainer_name"] == trainer
    assert set(ck["semidiff"]["states"]) == states
    assert set(ck["semidiff"]["networks"]) == {"network"} | networks
    assert set(ck["semidiff"]["optimizers"]) == networks
    # the exported weights are the main network's, nothing else
    assert ck["network_weights"].keys() == ck["semidiff"]["networks"]["network"].keys()
    term = ck["logging"][f"term/{TERMS[method]}"]
    assert len(term) == epochs and all(np.isfinite(term))
    assert all(np.isfinite(ck["logging"]["train_losses"]))

    pred = tmp_path / f"{method}_{config}"
    api.predict(dataset, method, _raw(dataset) / "imagesTs", pred, labeled=labeled, configuration=config,
                device="cpu", plans_name="semidiffDemoPlans", use_mirroring=False, show_progress=False)
    return pred


@pytest.mark.parametrize("method", list(METHODS))
def test_baseline_2d_cli(method, demo2d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo2d, method, "2d", "0.2", 2)
    files = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert files == ["demots_000.nii.gz", "demots_001.nii.gz", "demots_002.nii.gz"]
    seg = _load(pred / files[0])
    assert seg.shape == _load(_raw(demo2d) / "labelsTs" / files[0]).shape
    assert set(np.unique(seg)) <= {0, 1, 2}


@pytest.mark.parametrize("method", list(METHODS))
def test_baseline_3d_cli(method, demo3d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo3d, method, "3d_fullres", "2", 1)
    ref = _load(_raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = _load(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
    # the CLI's predict (sliding window, no TTA) works on the same run
    code, _, err = run_cli("predict", "-d", demo3d, "-m", method, "--labeled", "2", "-c", "3d_fullres",
                           "-i", _raw(demo3d) / "imagesTs", "-o", tmp_path / "cli", "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    assert np.array_equal(_load(tmp_path / "cli" / "demots_000.nii.gz"), seg)
