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
import re
from pathlib import Path

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: ``imagesUnlabeled/`` of a raw dataset, preprocessed with the configuration's plans (images only), lands
#: next to the configuration's folder: ``<data_identifier>__unlabeled/``
UNLABELED_SUFFIX = "__unlabeled"
#: ``labelsPseudo/`` with their images, preprocessed the same way: ``<data_identifier>__pseudo/``
PSEUDO_SUFFIX = "__pseudo"


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


RUN_ROOT_RE = re.compile(r".+__.+__seed\d+")


def results_root() -> Path:
    """``$nnUNet_results``; when it points at one run root (``<root>/semidiff/<method>__<tag>__seed<n>``, as
    ``eval "$(semidiff env -m METHOD)"`` sets it for stock nnU-Net), the root above it, so ``semidiff``
    commands in that shell still find every run."""
    ensure_nnunet_env()
    path = Path(os.environ["nnUNet_results"])
    if path.parent.name == "semidiff" and RUN_ROOT_RE.fullmatch(path.name):
        return path.parent.parent
    return path


def runs_root() -> Path:
    return results_root() / "semidiff"


def run_root(method: str, labeled_tag: str, seed: int) -> Path:
    """The ``nnUNet_results``-like folder of one (method, labeled spec, seed) run family."""
    return runs_root() / f"{method}__{labeled_tag}__seed{seed}"


def shim_folder() -> Path:
    """Folder for ``nnUNet_extTrainer``: a small module importing every registered trainer class."""
    return workspace() / "nnunet_ext_trainers"
