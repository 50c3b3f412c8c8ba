"""Evaluate a folder of predictions against a folder of references and write an nnU-Net-style ``summary.json``.

The summary keeps every field of nnU-Net's ``compute_metrics_on_folder`` (``metric_per_case`` with
``reference_file``, ``prediction_file`` and, per label, Dice, IoU, FP, TP, FN, TN, n_pred, n_ref; ``mean`` per
label; ``foreground_mean``), with nnU-Net's values, and adds per label ``Jaccard`` (= IoU), ``HD95`` and ``ASD``
(mm, see :mod:`semidiff_nnunet.evaluation.metrics` for the definitions and the empty-mask convention), plus:

* ``nan_count``: per label and metric, the number of cases whose value is NaN (left out of the mean);
* ``n_cases``; ``config`` (labels, ignore label, file ending, reader); ``definitions`` (one line per metric);
* ``spacing`` in each case (the reference's ``properties['spacing']``, in array order, used for distances);
* ``background_counts`` in each case (TP, FP, FN, TN of label value 0 against 0, ignore region left out);
* ``dataset_iou`` (per class, background ``'0'`` included: ``ΣTP / Σ(TP+FP+FN)`` over all cases) and ``mIoU``,
  their mean, background included (ProtoDiff's metric; see :func:`~.metrics.dataset_iou`).

Label keys are strings as in nnU-Net's file (``'1'``, or ``'(1, 2)'`` for a region); the returned dict is the
same structure that is written, so ``evaluate_folder(...)`` equals ``json.load(open(output_file, encoding="utf-8"))`` (NaN
included: like nnU-Net, the file holds bare ``NaN`` tokens, which Python's json reads back).
nnU-Net's ``load_summary_json`` reads the file too.

Means over cases skip NaN (as nnU-Net's ``np.nanmean``); ``foreground_mean`` averages the per-label means of all
labels except 0, also skipping NaN (nnU-Net uses a plain mean there, which only differs when one label is NaN in
every case).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.evaluation.metrics import (
    METRIC_NAMES,
    LabelOrRegion,
    compute_metrics,
    confusion_counts,
    dataset_iou,
    key_to_label,
    label_key,
    nan_mean,
    normalize_labels,
)

__all__ = ["evaluate_folder", "evaluate_case", "dataset_level_iou", "summary_table_rows", "summary_notes",
           "TABLE_COLUMNS"]

#: Below this many cases the evaluation runs in the calling process (a spawn pool costs seconds to start).
MIN_CASES_FOR_POOL = 8

#: The column headers matching :func:`summary_table_rows`.
TABLE_COLUMNS: tuple[str, ...] = ("Label", "Dice", "Jaccard", "HD95", "ASD")

DEFINITIONS = {
    "Dice": "2TP/(2TP+FP+FN); NaN when prediction and reference are both empty (nnU-Net)",
    "IoU": "TP/(TP+FP+FN); NaN when both are empty (nnU-Net)",
    "Jaccard": "same as IoU",
    "HD95": "95th percentile (numpy linear) of the pooled symmetric surface distances, in spacing units; "
    "NaN when prediction or reference is empty",
    "ASD": "mean of the pooled symmetric surface distances (ASSD), in spacing units; "
    "NaN when prediction or reference is empty",
    "mean": "per label: mean over cases, NaN values skipped (counted in nan_count)",
    "dataset_iou": "per class, background ('0') included: sum of TP over all cases / sum of (TP+FP+FN)",
    "mIoU": "mean of dataset_iou over the classes, background included (ProtoDiff); NaN classes skipped",
    "ignore_label": "voxels with reference == ignore_label are removed from both masks",
}


def _known_file_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)  # '.nii.gz' before '.gz'-less '.nii'


def _infer_file_ending(ref_folder: str) -> str:
    endings = _known_file_endings()
    found: Counter[str] = Counter()
    for name in os.listdir(ref_folder):
        if not os.path.isfile(os.path.join(ref_folder, name)):
            continue
        for e in endings:
            if name.lower().endswith(e):
                found[e] += 1
                break
    if not found:
        raise SemidiffError(
            f"No segmentation files with a known ending ({', '.join(endings)}) in {ref_folder}; "
            "pass file_ending (or a dataset.json) to say which files to evaluate."
        )
    return found.most_common(1)[0][0]


def _load_dataset_json(dataset_json: dict | str | None) -> dict | None:
    if dataset_json is None or isinstance(dataset_json, dict):
        return dataset_json
    path = os.fspath(dataset_json)
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SemidiffError(f"dataset.json not found: {path}; pass the path of an existing file.") from None
    except json.JSONDecodeError as e:
        raise SemidiffError(f"{path} is not valid JSON ({e}); fix the file.") from None


def _labels_from_dataset_json(dataset_json: dict) -> tuple[list[LabelOrRegion], int | None]:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if "labels" not in dataset_json:
        raise SemidiffError("dataset.json has no 'labels' entry; pass labels explicitly.")
    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    return normalize_labels(labels), lm.ignore_label


def _determine_reader(ds: dict | None, file_ending: str, example_file: str):
    """nnU-Net's choice of reader (dataset.json's ``overwrite_image_reader_writer`` first, then the readers that
    declare ``file_ending`` and can open ``example_file``); only if none can, any reader that opens the file."""
    import contextlib
    import io

    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    last_error: Exception | None = None
    for allow_nonmatching in (False, True):
        try:
            # nnU-Net prints tracebacks of the readers it tries, even with verbose=False
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                if ds is not None:
                    return determine_reader_writer_from_dataset_json(
                        {**ds, "file_ending": file_ending},
                        example_file,
                        allow_nonmatching_filename=allow_nonmatching,
                        verbose=False,
                    )
                return determine_reader_writer_from_file_ending(
                    file_ending, example_file, allow_nonmatching_filename=allow_nonmatching, verbose=False
                )
        except RuntimeError as e:
            last_error = e
    raise SemidiffError(
        f"No nnU-Net reader can open {example_file} ({last_error}); check the file and its ending."
    )


def _read_seg(reader, path: str) -> tuple[np.ndarray, dict]:
    try:
        return reader.read_seg(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise SemidiffError(
            f"Could not read segmentation {path} ({type(e).__name__}: {e}); check the file."
        ) from e


def evaluate_case(
    reference_file: str,
    prediction_file: str,
    reader,
    labels: Sequence[LabelOrRegion],
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Metrics of one prediction file against one reference file (both read with ``reader.read_seg``).

    Spacing is the reference's ``properties['spacing']``. Returns nnU-Net's per-case entry
    (``reference_file``, ``prediction_file``, ``metrics``) with our metrics added and the ``spacing`` used."""
    seg_ref, props_ref = _read_seg(reader, reference_file)
    seg_pred, _ = _read_seg(reader, prediction_file)
    if seg_ref.shape != seg_pred.shape:
        raise SemidiffError(
            f"Prediction {prediction_file} has shape {tuple(seg_pred.shape[1:])} but reference {reference_file} "
            f"has shape {tuple(seg_ref.shape[1:])}; predictions must be in the reference's geometry."
        )
    spacing = [float(s) for s in props_ref["spacing"]]
    # read_seg returns (1, *spatial); 2D images come as (1, 1, H, W) with a dummy first spacing.
    ref = seg_ref[0]
    pred = seg_pred[0]
    if len(spacing) != ref.ndim:
        raise SemidiffError(
            f"Reference {reference_file} has {ref.ndim} spatial axes but {len(spacing)} spacing values."
        )
    metrics = compute_metrics(pred, ref, labels, spacing=spacing, ignore_label=ignore_label)
    ignore = (ref == ignore_label) if ignore_label is not None else None
    tp, fp, fn, tn = confusion_counts(pred == 0, ref == 0, ignore)  # background, for the dataset-level mIoU
    allowed = {0} | {int(v) for lab in labels for v in (lab if isinstance(lab, tuple) else (lab,))}
    if ignore_label is not None:
        allowed.add(int(ignore_label))
    unexpected = sorted(int(v) for v in np.unique(pred) if int(v) not in allowed)
    return {
        "reference_file": reference_file,
        "prediction_file": prediction_file,
        "spacing": spacing,
        "metrics": {label_key(lab): m for lab, m in metrics.items()},
        "background_counts": {"TP": tp, "FP": fp, "FN": fn, "TN": tn},
        "unexpected_values": unexpected,
    }


def _aggregate(per_case: list[dict], labels: Sequence[LabelOrRegion]) -> tuple[dict, dict, dict]:
    means: dict[str, dict[str, float]] = {}
    nan_count: dict[str, dict[str, int]] = {}
    for lab in labels:
        k = label_key(lab)
        means[k] = {}
        nan_count[k] = {}
        for m in METRIC_NAMES:
            values = [float(case["metrics"][k][m]) for case in per_case]
            means[k][m] = nan_mean(values)
            nan_count[k][m] = int(np.isnan(values).sum())
    foreground = [k for k in means if k != "0"]
    foreground_mean = {m: nan_mean(means[k][m] for k in foreground) for m in METRIC_NAMES}
    return means, foreground_mean, nan_count


def dataset_level_iou(per_case: list[dict], labels: Sequence[LabelOrRegion]) -> tuple[dict[str, float], float]:
    """``(dataset_iou, mIoU)``: per class (background ``'0'`` first), the IoU of the counts pooled over all
    cases, and their mean (background included, NaN classes skipped)."""
    per_class = {"0": dataset_iou(case["background_counts"] for case in per_case)}
    for lab in labels:
        k = label_key(lab)
        per_class[k] = dataset_iou(case["metrics"][k] for case in per_case)
    return per_class, nan_mean(per_class.values())


def evaluate_folder(
    pred_folder: str,
    ref_folder: str,
    *,
    labels: list[int] | None = None,
    dataset_json: dict | str | None = None,
    file_ending: str | None = None,
    ignore_label: int | None = None,
    output_file: str | None = None,
    num_processes: int = 2,
) -> dict:
    """Evaluate every reference case in ``ref_folder`` against the file of the same name in ``pred_folder``.

    - ``labels``: the labels (ints) or regions (tuples) to evaluate. Default: the foreground labels/regions of
      ``dataset_json``; without one, every non-zero label found in the reference files (a class absent from all
      references is then not evaluated; pass ``labels`` to include it).
    - ``dataset_json``: a dict, or the path of ``dataset.json`` (or of its folder). Gives the reader
      (``overwrite_image_reader_writer``), ``file_ending``, labels/regions and the ignore label.
    - ``file_ending``: default ``dataset_json['file_ending']``, else the most common known ending in ``ref_folder``.
    - ``ignore_label``: default the dataset's ignore label, if any.
    - ``output_file``: where to write the summary (must end with ``.json``); None writes nothing.
    - ``num_processes``: a spawn pool is used only when > 1 and there are at least ``MIN_CASES_FOR_POOL`` cases.

    Prediction files without a reference are not evaluated. A reference without a prediction raises
    :class:`SemidiffError` naming the first such case. Returns the summary (see the module docstring)."""
    pred_folder = os.fspath(pred_folder)
    ref_folder = os.fspath(ref_folder)
    for what, folder in (("Reference", ref_folder), ("Prediction", pred_folder)):
        if not os.path.isdir(folder):
            raise SemidiffError(f"{what} folder not found: {folder}; pass an existing folder.")
    if output_file is not None and not os.fspath(output_file).endswith(".json"):
        raise SemidiffError(f"output_file must end with .json, got {output_file}.")
    ds = _load_dataset_json(dataset_json)

    if file_ending is None:
        file_ending = (
            ds["file_ending"] if ds is not None and "file_ending" in ds else _infer_file_ending(ref_folder)
        )
    names = sorted(
        n
        for n in os.listdir(ref_folder)
        if n.endswith(file_ending) and os.path.isfile(os.path.join(ref_folder, n))
    )
    if not names:
        raise SemidiffError(f"No reference files ending in {file_ending} in {ref_folder}; check the folder.")
    ref_files = [os.path.join(ref_folder, n) for n in names]
    pred_files = [os.path.join(pred_folder, n) for n in names]
    missing = [p for p in pred_files if not os.path.isfile(p)]
    if missing:
        raise SemidiffError(
            f"Missing prediction {missing[0]} ({len(missing)} of {len(names)} reference cases have no prediction); "
            "predict every case, or evaluate against a reference folder holding only the predicted cases."
        )

    rw_class = _determine_reader(ds, file_ending, ref_files[0])
    reader = rw_class()

    ds_ignore = None
    if ds is not None and (labels is None or "labels" in ds):
        ds_labels, ds_ignore = _labels_from_dataset_json(ds)
    if labels is not None:
        label_list = normalize_labels(labels)
    elif ds is not None:
        label_list = ds_labels
    else:
        found: set[int] = set()
        for f in ref_files:
            found.update(int(v) for v in np.unique(_read_seg(reader, f)[0]))
        found -= {0} if ignore_label is None else {0, ignore_label}
        label_list = sorted(found)
    if ignore_label is None:
        ignore_label = ds_ignore
    if not label_list:
        raise SemidiffError(
            f"No foreground label to evaluate: the references in {ref_folder} hold only background; pass labels."
        )

    jobs = [(r, p, reader, label_list, ignore_label) for r, p in zip(ref_files, pred_files, strict=True)]
    if num_processes > 1 and len(jobs) >= MIN_CASES_FOR_POOL:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = pool.starmap(evaluate_case, jobs)
    else:
        per_case = [evaluate_case(*job) for job in jobs]

    means, foreground_mean, nan_count = _aggregate(per_case, label_list)
    per_class_iou, miou = dataset_level_iou(per_case, label_list)
    unexpected: dict[str, list[str]] = {}
    for case in per_case:
        for v in case["unexpected_values"]:
            unexpected.setdefault(str(v), []).append(os.path.basename(case["prediction_file"]))
    extra = sorted(n for n in os.listdir(pred_folder)
                   if n.endswith(file_ending) and n not in set(names) and os.path.isfile(os.path.join(pred_folder, n)))
    label_names = {}
    if ds is not None and isinstance(ds.get("labels"), dict):
        for name, value in ds["labels"].items():
            key = label_key(tuple(value) if isinstance(value, list) else value)
            label_names[key] = str(name)
    summary = {
        "metric_per_case": per_case,
        "mean": means,
        "foreground_mean": foreground_mean,
        "nan_count": nan_count,
        "dataset_iou": per_class_iou,
        "mIoU": miou,
        "n_cases": len(per_case),
        "config": {
            "labels": [label_key(lab) for lab in label_list],
            "ignore_label": ignore_label,
            "file_ending": file_ending,
            "reader": rw_class.__name__,
            "reference_folder": ref_folder,
            "prediction_folder": pred_folder,
            "label_names": label_names,
        },
        # images without a physical spacing (PNG, BMP, JPG read by nnU-Net's natural-image reader) measure
        # distances in pixels
        "distance_unit": "px" if rw_class.__name__ == "NaturalImage2DIO" else "mm",
        "unexpected_prediction_values": unexpected,
        "extra_predictions": extra,
        "definitions": dict(DEFINITIONS),
    }
    if output_file is not None:
        parent = os.path.dirname(os.path.abspath(output_file))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{output_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, sort_keys=True, indent=4)  # nnU-Net: sort_keys, NaN as NaN
        os.replace(tmp, output_file)
    return summary


def summary_notes(summary: Mapping) -> list[str]:
    """What the table does not show, one sentence each: NaN values left out of the means, prediction
    values that are not labels, prediction files without a reference, the distance unit."""
    notes = []
    names = (summary.get("config") or {}).get("label_names") or {}
    n = summary.get("n_cases", len(summary.get("metric_per_case", [])))
    for key, counts in sorted((summary.get("nan_count") or {}).items()):
        bad = {m: c for m, c in counts.items() if c and m in ("Dice", "HD95", "ASD")}
        if bad:
            label = _fmt_label(key, names)
            notes.append(f"label {label}: " + ", ".join(f"{m} NaN in {c} of {n} cases" for m, c in bad.items())
                         + " (left out of the mean; see nan_count in summary.json)")
    for value, files in sorted((summary.get("unexpected_prediction_values") or {}).items(), key=lambda kv: int(kv[0])):
        notes.append(f"predictions hold the value {value}, which is not a label, in {len(files)} case(s) (e.g. "
                     f"{files[0]}); those voxels count as no class")
    extra = summary.get("extra_predictions") or []
    if extra:
        notes.append(f"{len(extra)} prediction file(s) have no reference and were not evaluated (e.g. {extra[0]})")
    if summary.get("distance_unit") == "px":
        notes.append("HD95 and ASD are in pixels: the images carry no physical spacing")
    return notes


def _fmt_label(key: Any, label_names: Mapping | None) -> str:
    text = label_key(key_to_label(key))
    if label_names:
        lab = key_to_label(key)
        name = label_names.get(lab, label_names.get(text))
        if name is not None:
            return f"{text} ({name})"
    return text


def summary_table_rows(
    summary: Mapping, label_names: Mapping[Any, str] | None = None
) -> list[tuple[str, float, float, float, float]]:
    """Rows ``(label, Dice, Jaccard, HD95, ASD)`` of the per-label means, in label order, then a final
    ``('foreground mean', ...)`` row. Header: :data:`TABLE_COLUMNS`.

    Works on the dict :func:`evaluate_folder` returns, on a loaded ``summary.json``, and on nnU-Net's own summary
    (whose missing metrics come out as NaN; Jaccard falls back to IoU). ``label_names`` maps a label (int, tuple
    or key string) to a name shown next to it."""

    def row(name: str, m: Mapping) -> tuple[str, float, float, float, float]:
        jac = m.get("Jaccard", m.get("IoU", float("nan")))
        return (
            name,
            float(m.get("Dice", float("nan"))),
            float(jac),
            float(m.get("HD95", float("nan"))),
            float(m.get("ASD", float("nan"))),
        )

    def order(key: Any) -> tuple:
        lab = key_to_label(key)
        return (1, lab) if isinstance(lab, tuple) else (0, (lab,))

    if label_names is None:
        label_names = (summary.get("config") or {}).get("label_names") or None
    rows = [row(_fmt_label(k, label_names), summary["mean"][k]) for k in sorted(summary["mean"], key=order)]
    rows.append(row("foreground mean", summary["foreground_mean"]))
    return rows
