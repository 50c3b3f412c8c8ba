"""Where datasets, preprocessed data and results live.

nnU-Net's environment variables (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``)
are honoured. Any that is unset defaults to a folder inside the semidiff workspace
(``$SEMIDIFF_HOME``, else ``~/semidiff_workspace``); :func:`ensure_nnunet_env` sets them in
``os.environ`` so nnU-Net (which reads them lazily) sees the same folders.

Run layout (each run root is itself a valid ``nnUNet_results`` tree, so stock nnU-Net
commands work with ``nnUNet_results=<run root>``)::

    $nnUNet_results/semidiff/<method>__<labeled tag>__seed<seed>/
        Dataset990_Demo2D/<Trainer>__<plans>__<configuration>/fold_0/checkpoint_final.pth
"""

from __future__ import annotations

import os
from pathlib import Path

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def workspace() -> Path:
    return Path(os.environ.get("SEMIDIFF_HOME", Path.home() / "semidiff_workspace")).expanduser()


def ensure_nnunet_env() -> list[str]:
    """Fill unset nnU-Net path variables with workspace defaults; return the names that were filled."""
    filled = []
    for var in NNUNET_VARS:
        if not os.environ.get(var):
            path = workspace() / var
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)
            filled.append(var)
    return filled


def raw_root() -> Path:
    ensure_nnunet_env()
    return Path(os.environ["nnUNet_raw"])


def preprocessed_root() -> Path:
    ensure_nnunet_env()
    return Path(os.environ["nnUNet_preprocessed"])


def results_root() -> Path:
    ensure_nnunet_env()
    return Path(os.environ["nnUNet_results"])


def runs_root() -> Path:
    return results_root() / "semidiff"


def run_root(method: str, labeled_tag: str, seed: int) -> Path:
    """The ``nnUNet_results``-like folder of one (method, labeled spec, seed) run family."""
    return runs_root() / f"{method}__{labeled_tag}__seed{seed}"


def shim_folder() -> Path:
    """Folder for ``nnUNet_extTrainer``: a small module importing every registered trainer class."""
    return workspace() / "nnunet_ext_trainers"
