"""``semidiff evaluate``: Dice, Jaccard, HD95, ASD and mIoU of a folder of predictions
(:mod:`semidiff_nnunet.evaluation`)."""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet import planning
from semidiff_nnunet.api import options


def evaluate(dataset: str | int | None, pred: str | Path, ref: str | Path, output_file: str | Path | None = None,
             num_processes: int = 2) -> dict:
    """Score the segmentations in ``pred`` against the references of the same names in ``ref``, write the
    summary to ``output_file`` (default ``pred/summary.json``) and return it; ``dataset`` names the labels."""
    from semidiff_nnunet.evaluation import evaluate_folder

    pred, ref = options.check_folder(pred, "--pred folder"), options.check_folder(ref, "--ref folder")
    dataset_json = None
    if dataset is not None:
        name = planning.dataset_name(dataset)
        for candidate in (planning.raw_folder(name) / "dataset.json", planning.preprocessed_folder(name) / "dataset.json"):
            if candidate.is_file():
                dataset_json = planning.read_json(candidate, required=("labels",))
                break
    output_file = Path(output_file) if output_file else pred / "summary.json"
    return evaluate_folder(str(pred), str(ref), dataset_json=dataset_json, output_file=str(output_file),
                           num_processes=num_processes)


def summary_table_rows(summary: dict) -> list[list]:
    """Rows (label, Dice, Jaccard, HD95, ASD) of an :func:`evaluate` summary, foreground mean last."""
    from semidiff_nnunet.evaluation import summary_table_rows as rows

    return rows(summary)


def summary_notes(summary: dict) -> list[str]:
    """What the table leaves out, one sentence each (NaN counts, stray values, extra files, units)."""
    from semidiff_nnunet.evaluation import summary_notes as notes

    return notes(summary)
