"""CPU end-to-end CLI runs of the six classic baselines (2D and 3D) and stock nnU-Net loading.

The methods come from the installed entry points (nothing is registered by hand here).
``api.predict`` goes through ``nnUNetPredictor.initialize_from_trained_model_folder``, i.e. the
exported ``checkpoint_final.pth`` must load into the network stock nnU-Net builds from the plans;
for the methods that train extra networks, stock ``nnUNetv2_predict`` in a clean interpreter must
give the same 2D segmentations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import assert_stock_predictor_matches, load_image, raw

pytestmark = pytest.mark.slow

METHODS = {  # method: (trainer, extra states, extra networks)
    "uamt": ("UAMTTrainer", {"teacher"}, set()),
    "cps": ("CPSTrainer", set(), {"network_2"}),
    "fixmatch": ("FixMatchTrainer", set(), set()),
    "urpc": ("URPCTrainer", set(), set()),
    "cct": ("CCTTrainer", set(), {"aux_decoders"}),
    "entropy-min": ("EntropyMinTrainer", set(), set()),
}
TERMS = {"uamt": "consistency", "cps": "cps", "fixmatch": "unsupervised", "urpc": "consistency",
         "cct": "consistency", "entropy-min": "entropy"}


def _train_and_predict(run_cli, tmp_path, dataset, method, config, labeled, epochs):
    code, _, err = run_cli("plan-and-train", dataset, "-m", method, "--labeled", labeled, "-c", config,
                           "--epochs", str(epochs), "--iters-per-epoch", "2", "--no-val", *TINY)
    assert code == 0, err
    from semidiff_nnunet import api

    info = api.run_info(dataset, method, labeled, 0, config, 0, "semidiffDemoPlans")
    trainer, states, networks = METHODS[method]
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
    api.predict(dataset, method, raw(dataset) / "imagesTs", pred, labeled=labeled, configuration=config,
                device="cpu", plans_name="semidiffDemoPlans", use_mirroring=False, show_progress=False)
    return pred


@pytest.mark.parametrize("method", list(METHODS))
def test_baseline_2d_cli(method, demo2d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo2d, method, "2d", "0.2", 2)
    files = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert files == ["demots_000.nii.gz", "demots_001.nii.gz", "demots_002.nii.gz"]
    seg = load_image(pred / files[0])
    assert seg.shape == load_image(raw(demo2d) / "labelsTs" / files[0]).shape
    assert set(np.unique(seg)) <= {0, 1, 2}
    if METHODS[method][2]:  # trains more networks than it exports: stock nnU-Net must rebuild the exported one
        assert_stock_predictor_matches(run_cli, demo2d, method, "0.2", pred, tmp_path)


@pytest.mark.parametrize("method", list(METHODS))
def test_baseline_3d_cli(method, demo3d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo3d, method, "3d_fullres", "2", 1)
    ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
    # the CLI's predict (sliding window, no TTA) works on the same run
    code, _, err = run_cli("predict", "-d", demo3d, "-m", method, "--labeled", "2", "-c", "3d_fullres",
                           "-i", raw(demo3d) / "imagesTs", "-o", tmp_path / "cli", "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    assert np.array_equal(load_image(tmp_path / "cli" / "demots_000.nii.gz"), seg)
