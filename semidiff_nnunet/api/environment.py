"""The workspace and the environment of stock nnU-Net commands (``semidiff env``)."""

from __future__ import annotations

import os
from pathlib import Path

from semidiff_nnunet import paths
from semidiff_nnunet.api import installed


def ensure_workspace() -> tuple[list[str], Path]:
    """Fill unset nnU-Net path variables with folders of the semidiff workspace; return (the names that
    were filled, the workspace)."""
    return paths.ensure_nnunet_env(), paths.workspace()


def env_lines(run_dir: Path | None = None) -> list[str]:
    """``export`` lines stock nnU-Net commands need to load semidiff runs."""
    paths.ensure_nnunet_env()
    lines = [f"export {v}={_quote(os.environ[v])}" for v in paths.NNUNET_VARS if v != "nnUNet_results"]
    lines.append(f"export nnUNet_results={_quote(str(run_dir) if run_dir else os.environ['nnUNet_results'])}")
    lines.append(f"export nnUNet_extTrainer={_quote(str(installed.write_trainer_shim()))}")
    return lines


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
