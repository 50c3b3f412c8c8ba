"""Shared fixtures: an isolated nnU-Net workspace and tiny planned synthetic datasets (2D and 3D)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

#: the plugin authors' test kit (fixtures ``semidiff_dataset2d``/``3d``, checks in semidiff_nnunet.testing);
#: its datasets live in this session's workspace (``semidiff_workspace`` below)
pytest_plugins = ["semidiff_nnunet.testing"]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["nnUNet_compile"] = "false"
# A shell that starts the suite as a background job without job control makes SIGINT ignored, and
# the CLI subprocesses would inherit that (the Ctrl-C tests then see no interrupt). A handler here is
# reset to the default in every exec'd child, so the children get Python's KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semidiff_ws")
    os.environ["SEMIDIFF_HOME"] = str(root)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        os.environ[var] = str(root / var)
    os.environ.pop("nnUNet_extTrainer", None)
    return root


def _prepare(dim: int, dataset_id: int, name: str, **kw) -> str:
    from semidiff_nnunet import api

    return api.prepare_demo_dataset(dim=dim, show_progress=False, dataset_id=dataset_id, name=name, **kw)


@pytest.fixture(scope="session")
def semidiff_workspace(workspace) -> Path:
    """The test kit's workspace is this session's (its datasets next to demo2d and demo3d)."""
    return workspace


@pytest.fixture(scope="session")
def demo2d(workspace) -> str:
    """12 training + 3 test 2D cases (32x32), 3 extra unlabeled images, plans with 8 features, batch 2."""
    return _prepare(2, 980, "Tiny2D", num_train=12, num_test=3, num_unlabeled=3, shape=(32, 32),
                    max_features=8, batch_size=2)


@pytest.fixture(scope="session")
def demo3d(workspace) -> str:
    """8 training + 2 test 3D cases (16x24x24), plans with 8 features, batch 2."""
    return _prepare(3, 981, "Tiny3D", num_train=8, num_test=2, shape=(16, 24, 24), max_features=8, batch_size=2)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``semidiff ARGS`` in-process; return (exit code, stdout, stderr)."""
    from semidiff_nnunet.cli.main import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["semidiff", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


TINY = ["--plans", "semidiffDemoPlans", "--device", "cpu"]
