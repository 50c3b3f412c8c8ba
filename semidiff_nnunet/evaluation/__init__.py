"""Segmentation metrics (Dice, Jaccard, HD95, ASD, dataset-level mIoU) and folder evaluation with an
nnU-Net-style summary.json.

Importing this package is light (numpy and scipy); nnU-Net is imported when a folder is evaluated.
See :mod:`semidiff_nnunet.evaluation.metrics` for the definitions and the empty-mask convention.
"""

from semidiff_nnunet.evaluation.folder import (
    MIN_CASES_FOR_POOL,
    TABLE_COLUMNS,
    dataset_level_iou,
    evaluate_case,
    evaluate_folder,
    summary_notes,
    summary_table_rows,
)
from semidiff_nnunet.evaluation.metrics import (
    EXTRA_METRIC_NAMES,
    METRIC_NAMES,
    NNUNET_METRIC_NAMES,
    LabelOrRegion,
    average_surface_distance,
    binary_metrics,
    compute_metrics,
    confusion_counts,
    dataset_iou,
    dice,
    hd95,
    jaccard,
    surface_distances,
)

__all__ = [
    "EXTRA_METRIC_NAMES",
    "METRIC_NAMES",
    "MIN_CASES_FOR_POOL",
    "NNUNET_METRIC_NAMES",
    "TABLE_COLUMNS",
    "LabelOrRegion",
    "average_surface_distance",
    "binary_metrics",
    "compute_metrics",
    "confusion_counts",
    "dataset_iou",
    "dataset_level_iou",
    "dice",
    "evaluate_case",
    "evaluate_folder",
    "hd95",
    "jaccard",
    "summary_notes",
    "summary_table_rows",
    "surface_distances",
]
