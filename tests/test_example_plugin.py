"""The example third-party plugin, pip-installed and used through the CLI exactly as outsiders would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "semidiff-example-pseudolabel"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--target", str(target), str(EXAMPLE)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    return env


def _semidiff(env, *args):
    return subprocess.run([sys.executable, "-m", "semidiff_nnunet.cli.main", *map(str, args)], env=env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=600)


def test_example_plugin_is_listed_and_trains(installed, demo2d, tmp_path):
    proc = _semidiff(installed, "methods")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "pseudo-label" in ln)
    assert "semidiff-example-pseudolabel" in line
    proc = _semidiff(installed, "plugins")
    assert "semidiff-example-pseudolabel" in proc.stdout
    proc = _semidiff(installed, "plan-and-train", demo2d, "-m", "pseudo-label", "--labeled", "0.2", "-c", "2d",
                     "--epochs", "2", "--iters-per-epoch", "2", "--no-val", "--plans", "semidiffDemoPlans",
                     "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _semidiff(installed, "predict", "-d", demo2d, "-m", "pseudo-label", "--labeled", "0.2", "-c", "2d",
                     "-i", Path(os.environ["nnUNet_raw"]) / demo2d / "imagesTs", "-o", tmp_path / "pred",
                     "--plans", "semidiffDemoPlans", "--device", "cpu", "--disable-tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3


def test_the_example_plugin_passes_the_test_kit(installed, semidiff_dataset2d, workspace):
    """The example's own tests (``examples/.../tests``: the kit's four checks on its method) pass as its author
    runs them: pytest loads ``semidiff_nnunet.testing`` through ``pytest_plugins``, the plugin through its
    entry point. They reuse this session's workspace, where ``semidiff_dataset2d`` is already planned."""
    env = {**installed, "SEMIDIFF_TESTING_WORKSPACE": str(workspace)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          cwd=EXAMPLE, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout, proc.stdout[-2000:]


def test_without_the_plugin_the_method_is_unknown(demo2d):
    env = dict(os.environ)
    proc = _semidiff(env, "train", demo2d, "-m", "pseudo-label", "--device", "cpu")
    assert proc.returncode == 1 and "Unknown method 'pseudo-label'" in proc.stderr


def test_example_plugin_trains_in_two_cpu_ranks_unchanged(installed, demo2d):
    """A third-party method gets distributed training from the engine, without a line of its own."""
    import json

    proc = _semidiff(installed, "plan-and-train", demo2d, "-m", "pseudo-label", "--labeled", "0.2", "--seed", "1",
                     "-c", "2d", "--epochs", "1", "--iters-per-epoch", "2", "--no-val", "--plans", "semidiffDemoPlans",
                     "--device", "cpu", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((Path(os.environ["nnUNet_results"]) / "semidiff").glob(f"pseudo-label__lab0.2__seed1/{demo2d}/*/fold_0"))
    assert len(runs) == 1 and (runs[0] / "checkpoint_final.pth").is_file()
    assert json.loads((runs[0] / "semidiff_run.json").read_text(encoding="utf-8"))["world_size"] == 2


def test_example_plugin_trains_on_resenc_plans(installed, demo2d, tmp_path):
    """A third-party method gets nnU-Net's residual-encoder presets for free: ``-pl nnUNetPlannerResEncM``
    plans, trains a ``ResidualEncoderUNet`` with the plugin's loss, and predicts."""
    import torch

    proc = _semidiff(installed, "plan-and-train", demo2d, "-m", "pseudo-label", "--labeled", "0.2", "--seed", "2",
                     "-c", "2d", "-pl", "nnUNetPlannerResEncM", "--epochs", "1", "--iters-per-epoch", "1",
                     "--val-iters", "0", "--no-val", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((Path(os.environ["nnUNet_results"]) / "semidiff").glob(
        f"pseudo-label__lab0.2__seed2/{demo2d}/*__nnUNetResEncUNetMPlans__2d/fold_0"))
    assert len(runs) == 1
    weights = torch.load(runs[0] / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.endswith(".blocks.0.conv1.conv.weight") for k in weights)  # only a residual stage has it
    proc = _semidiff(installed, "predict", "-d", demo2d, "-m", "pseudo-label", "--labeled", "0.2", "--seed", "2",
                     "-c", "2d", "-i", Path(os.environ["nnUNet_raw"]) / demo2d / "imagesTs", "-o", tmp_path / "pred",
                     "--plans", "nnUNetResEncUNetMPlans", "--device", "cpu", "--disable-tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3
