"""Where a run lives: its folders, by method, labeled spec, seed, configuration and fold."""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from semidiff_nnunet import paths, planning
from semidiff_nnunet.api import installed


@dataclass
class RunInfo:
    dataset: str
    method: str
    trainer: str
    labeled_tag: str
    seed: int
    configuration: str
    fold: int | str
    plans_name: str
    run_root: Path  # an nnUNet_results-like folder
    model_folder: Path  # <run_root>/<dataset>/<trainer>__<plans>__<configuration>
    fold_folder: Path

    @property
    def finished(self) -> bool:
        """``checkpoint_final.pth`` is there and whole: torch writes a zip archive, whose directory is at its
        end, so a truncated or overwritten file is no finished run (``--continue`` trains it again from its
        best resume point; a benchmark does so by itself)."""
        final = self.fold_folder / "checkpoint_final.pth"
        return final.is_file() and zipfile.is_zipfile(final)

    def resumable_checkpoint(self) -> Path | None:
        """The first resume point the run folder holds (whether it loads is checked on --continue:
        :func:`~semidiff_nnunet.training.checkpoint.resume_checkpoint`)."""
        for name in ("checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_best.pth"):
            if (self.fold_folder / name).is_file():
                return self.fold_folder / name
        return None


def run_info(dataset: str | int, method: str, labeled: str = "1.0", seed: int = 0, configuration: str = "2d",
             fold: int | str = 0, plans_name: str = "nnUNetPlans", held_out: float | None = None,
             stage: str = "") -> RunInfo:
    """Where a run lives. ``held_out``: the share of the fold's validation cases the run keeps apart for
    scoring (:func:`~semidiff_nnunet.api.splits.held_out_cases`); such runs live apart (``lab0.1_ho0.5``), one folder per share.
    ``stage``: a stage of ``semidiff benchmark --from-checkpoint`` (``first-e4``, ``from-first-e4``), its own
    folder too (``lab0.1_ho0.5_from-first-e4``)."""
    from semidiff_nnunet.training.splits import LabeledSpec, held_out_tag

    name = planning.dataset_name(dataset)
    cls = installed.method_trainer(method)
    spec = LabeledSpec.parse(labeled)
    tag = spec.tag + held_out_tag(held_out) + (f"_{stage}" if stage else "")
    root = paths.run_root(method, tag, seed)
    model = root / name / f"{cls.__name__}__{plans_name}__{configuration}"
    return RunInfo(name, method, cls.__name__, tag, seed, configuration, fold, plans_name, root, model,
                   model / f"fold_{fold}")


@contextlib.contextmanager
def results_root(root: Path):
    """``nnUNet_results`` set to ``root`` inside the block (nnU-Net's trainer writes there)."""
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def run_root(method: str, labeled: str = "1.0", seed: int = 0) -> Path:
    """The ``nnUNet_results``-like folder of the runs of (method, labeled spec, seed)."""
    from semidiff_nnunet.training.splits import LabeledSpec

    installed.check_method(method)
    return paths.run_root(method, LabeledSpec.parse(labeled).tag, seed)
