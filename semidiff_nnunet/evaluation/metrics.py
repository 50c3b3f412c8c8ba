"""Per-class segmentation metrics: Dice, Jaccard (IoU), HD95 and ASD, for 2D and 3D label maps.

Definitions (all distances in the unit of ``spacing``, i.e. mm for medical images)
--------------------------------------------------------------------------------
* **Dice** ``2·TP / (2·TP + FP + FN)`` and **Jaccard / IoU** ``TP / (TP + FP + FN)``, exactly as nnU-Net's
  ``compute_metrics`` (``nnunetv2.evaluation.evaluate_predictions``) computes them.
* **Surface** of a binary mask: the foreground voxels that have at least one face-neighbour (connectivity 1)
  in the background, the outside of the image counting as background. This is ``mask ^ erosion(mask)``, the
  same surface as medpy's ``medpy.metric.binary`` (default ``connectivity=1``). Distances are Euclidean
  distances between voxel centres, computed with ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``,
  so anisotropic spacing is exact.
* For every surface voxel of the prediction, its distance to the nearest surface voxel of the reference
  (``d(P→R)``), and vice versa (``d(R→P)``). The **symmetric surface distances** are the pooled multiset
  ``D = d(P→R) ∪ d(R→P)`` (``|∂P| + |∂R|`` values).
* **HD95** = the 95th percentile of the pooled set ``D``, by ``numpy.percentile`` (linear interpolation).
  This is what medpy's ``hd95`` computes. It is *not* MONAI's ``compute_hausdorff_distance(percentile=95)``,
  which takes ``max(P95(d(P→R)), P95(d(R→P)))`` (usually larger), nor SemiGDA's "HD95" (= Hausdorff × 0.95).
* **ASD** (average symmetric surface distance, ASSD) = the mean of the pooled set ``D``
  ``= (Σ d(P→R) + Σ d(R→P)) / (|∂P| + |∂R|)`` (Heimann et al. 2009). This is medpy 0.5.2's ``assd``; earlier
  medpy releases averaged the two directed means instead (equal only when ``|∂P| = |∂R|``). medpy's ``asd``,
  which SSL4MIS and DiffRect report as "ASD", is the *directed* mean of ``d(P→R)`` only.

Empty masks (per class and case; "empty" means no voxel of the class outside the ignore region)
----------------------------------------------------------------------------------------------
=======================  ==========  ==============  ============
prediction / reference   Dice, IoU   HD95, ASD       nnU-Net Dice
=======================  ==========  ==============  ============
both non-empty           value       value           same
empty / non-empty        0           NaN             0
non-empty / empty        0           NaN             0
both empty               NaN         NaN             NaN
=======================  ==========  ==============  ============

Means over cases skip NaN (and the folder summary counts the NaNs), so a case where a class is absent from
both prediction and reference does not count, and a missed or hallucinated class costs Dice 0 but is left out
of the distance means (look at ``nan_count`` next to HD95/ASD). Dice and IoU are exactly nnU-Net's; nnU-Net
computes no distances. SSL4MIS's validation (``code/val_2D.py``, HiLab-git/SSL4MIS @126084d) returns
(Dice 0, HD95 50, ASD 10) unless both masks are non-empty, so a correctly absent class is penalised too;
an older version (@f5b9b38) returns (0, 0) for an empty prediction and lets medpy raise for an empty
reference, and its test scripts call medpy unguarded (an empty mask raises). DiffRect uses the
(0, 0, 50, 10) rule for (Dice, Jaccard, HD95, ASD). Such fixed penalties depend on the image size and are not
comparable with ours; their "ASD" is also medpy's directed ``asd``, and SSL4MIS hard-codes the spacing.

Dataset-level IoU and mIoU
-------------------------
Per class, the **dataset-level IoU** pools the voxel counts of every case before dividing:
``ΣTP / Σ(TP + FP + FN)`` (a large case weighs more; a class absent from a case's prediction and reference
adds nothing). **mIoU** is the mean of these over the classes, background (label value 0) included, as
ProtoDiff reports it (a confusion matrix accumulated over the test set); it is not the mean of the per-case
Jaccard values. A class with no voxel in any prediction or reference is NaN and left out of the mean.

Ignore label
------------
Voxels of the ignore region (``reference == ignore_label``) are removed from both masks before anything is
computed: they count as neither TP, FP, FN nor TN (as in nnU-Net), and a prediction that extends into the
ignore region is cut at its border. The border of the ignore region therefore acts like the image border: a
mask touching it has surface there, and a prediction and a reference that both reach it agree there.

Implementation
--------------
scipy only (medpy is not a dependency): the surfaces and distance transforms are medpy's algorithm, computed
once per label for both HD95 and ASD and on the bounding box of ``pred | ref`` only (which changes no value).
On a 128×256×256 pair this took 0.6 s against 7 s for medpy's ``hd95`` + ``assd``; the tests check that the
distances equal medpy's.

Singleton axes
--------------
Axes of length 1 are dropped (with their spacing) before surfaces are extracted: nnU-Net reads a 2D image as a
``1 × H × W`` volume with a dummy spacing (999 × the in-plane spacing), and in 3D every voxel of a one-slice
volume would be "surface". Dice and IoU do not depend on this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

__all__ = [
    "METRIC_NAMES",
    "NNUNET_METRIC_NAMES",
    "EXTRA_METRIC_NAMES",
    "LabelOrRegion",
    "average_surface_distance",
    "binary_metrics",
    "compute_metrics",
    "confusion_counts",
    "dataset_iou",
    "dice",
    "hd95",
    "jaccard",
    "key_to_label",
    "label_key",
    "nan_mean",
    "normalize_labels",
    "surface_distances",
]

#: The per-label metrics nnU-Net's ``summary.json`` holds, in nnU-Net's order.
NNUNET_METRIC_NAMES: tuple[str, ...] = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
#: The per-label metrics we add (``Jaccard`` equals ``IoU``; it is there under the name papers use).
EXTRA_METRIC_NAMES: tuple[str, ...] = ("Jaccard", "HD95", "ASD")
METRIC_NAMES: tuple[str, ...] = NNUNET_METRIC_NAMES + EXTRA_METRIC_NAMES

#: A label value, or a region (a tuple of label values evaluated as one mask, as in nnU-Net).
LabelOrRegion = int | tuple[int, ...]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _prepare(
    pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    pred = _as_bool(pred_mask)
    ref = _as_bool(ref_mask)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference have different shapes: {pred.shape} vs {ref.shape}")
    valid = None
    if ignore_mask is not None:
        ignore = _as_bool(ignore_mask)
        if ignore.shape != ref.shape:
            raise ValueError(f"ignore_mask has shape {ignore.shape}, expected {ref.shape}")
        valid = ~ignore
        pred = pred & valid
        ref = ref & valid
    return pred, ref, valid


def _normalize_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise ValueError(f"spacing has {sp.size} values but the masks have {ndim} axes")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def _counts(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None) -> tuple[int, int, int, int]:
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp = n_pred - tp
    fn = n_ref - tp
    n_valid = pred.size if valid is None else int(np.count_nonzero(valid))
    tn = n_valid - tp - fp - fn
    return tp, fp, fn, tn


def confusion_counts(
    pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` voxel counts of a binary prediction against a binary reference.

    Voxels where ``ignore_mask`` is true are not counted (nnU-Net's convention)."""
    return _counts(*_prepare(pred_mask, ref_mask, ignore_mask))


def dataset_iou(counts: Iterable[Mapping[str, float]]) -> float:
    """Dataset-level IoU of one class: ``ΣTP / Σ(TP + FP + FN)`` over the cases' counts (mappings with
    ``TP``, ``FP``, ``FN``); NaN when the class has no voxel in any prediction or reference."""
    tp = fp = fn = 0
    for c in counts:
        tp, fp, fn = tp + int(c["TP"]), fp + int(c["FP"]), fn + int(c["FN"])
    return _dice_iou(tp, fp, fn)[1]


def _dice_iou(tp: int, fp: int, fn: int) -> tuple[float, float]:
    if tp + fp + fn == 0:
        return float("nan"), float("nan")
    return 2.0 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None) -> float:
    """Dice ``2·TP / (2·TP + FP + FN)``; NaN when both masks are empty (as nnU-Net)."""
    tp, fp, fn, _ = confusion_counts(pred_mask, ref_mask, ignore_mask)
    return _dice_iou(tp, fp, fn)[0]


def jaccard(pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None) -> float:
    """Jaccard index (IoU) ``TP / (TP + FP + FN)``; NaN when both masks are empty (as nnU-Net)."""
    tp, fp, fn, _ = confusion_counts(pred_mask, ref_mask, ignore_mask)
    return _dice_iou(tp, fp, fn)[1]


def _squeeze_singletons(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = [ax for ax, n in enumerate(pred.shape) if n != 1]
    if len(keep) == pred.ndim:
        return pred, ref, spacing
    if not keep:  # a single voxel
        return pred.reshape(1), ref.reshape(1), spacing[-1:]
    shape = tuple(pred.shape[ax] for ax in keep)
    return pred.reshape(shape), ref.reshape(shape), spacing[keep]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(np.any(mask, axis=other)) if other else np.flatnonzero(mask)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _directed_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both masks non-empty, same shape, singleton axes already removed."""
    # Everything outside the bounding box of pred | ref is background for both masks, and
    # binary_erosion treats the outside of the array as background (border_value=0), so cropping to that
    # box changes neither the surfaces nor any surface-to-surface distance; it only saves time.
    box = _bounding_box(pred | ref)
    pred, ref = pred[box], ref[box]
    footprint = generate_binary_structure(pred.ndim, connectivity)
    pred_surface = pred & ~binary_erosion(pred, structure=footprint, border_value=0)
    ref_surface = ref & ~binary_erosion(ref, structure=footprint, border_value=0)
    dist_to_ref = distance_transform_edt(~ref_surface, sampling=spacing)
    dist_to_pred = distance_transform_edt(~pred_surface, sampling=spacing)
    return dist_to_ref[pred_surface], dist_to_pred[ref_surface]


def surface_distances(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    ignore_mask: np.ndarray | None = None,
    connectivity: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d(P→R), d(R→P))`` between two binary masks, in units of ``spacing``.

    ``d(P→R)`` holds, for every surface voxel of the prediction, the distance to the nearest surface voxel of
    the reference (one value per surface voxel). ``spacing`` is per axis in array order (a scalar applies to
    all axes; None means 1). Both arrays are empty when either mask is empty (the distances are undefined).
    See the module docstring for the surface, the ignore region and singleton axes."""
    pred, ref, _ = _prepare(pred_mask, ref_mask, ignore_mask)
    sp = _normalize_spacing(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        return np.zeros(0), np.zeros(0)
    pred, ref, sp = _squeeze_singletons(pred, ref, sp)
    return _directed_distances(pred, ref, sp, connectivity)


def _hd95_asd(d_pr: np.ndarray, d_rp: np.ndarray) -> tuple[float, float]:
    if d_pr.size == 0 or d_rp.size == 0:
        return float("nan"), float("nan")
    pooled = np.concatenate([d_pr, d_rp])
    return float(np.percentile(pooled, 95)), float(pooled.mean())


def hd95(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    ignore_mask: np.ndarray | None = None,
) -> float:
    """95th percentile (linear interpolation) of the pooled symmetric surface distances; NaN if a mask is empty."""
    return _hd95_asd(*surface_distances(pred_mask, ref_mask, spacing, ignore_mask))[0]


def average_surface_distance(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    ignore_mask: np.ndarray | None = None,
) -> float:
    """ASD/ASSD: mean of the pooled symmetric surface distances; NaN if a mask is empty."""
    return _hd95_asd(*surface_distances(pred_mask, ref_mask, spacing, ignore_mask))[1]


def binary_metrics(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    ignore_mask: np.ndarray | None = None,
) -> dict[str, float | int]:
    """All metrics of one binary mask pair, keyed by :data:`METRIC_NAMES`.

    The nnU-Net keys (Dice, IoU, FP, TP, FN, TN, n_pred, n_ref) have nnU-Net's values and conventions;
    Jaccard (= IoU), HD95 and ASD are added. Surfaces are extracted once for both distance metrics."""
    pred, ref, valid = _prepare(pred_mask, ref_mask, ignore_mask)
    sp = _normalize_spacing(spacing, pred.ndim)
    tp, fp, fn, tn = _counts(pred, ref, valid)
    dsc, iou = _dice_iou(tp, fp, fn)
    if tp + fp > 0 and tp + fn > 0:
        hd, asd = _hd95_asd(*_directed_distances(*_squeeze_singletons(pred, ref, sp), connectivity=1))
    else:
        hd, asd = float("nan"), float("nan")
    return {
        "Dice": dsc,
        "IoU": iou,
        "FP": fp,
        "TP": tp,
        "FN": fn,
        "TN": tn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
        "Jaccard": iou,
        "HD95": hd,
        "ASD": asd,
    }


def _region_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    if isinstance(label_or_region, tuple):
        return np.isin(seg, np.asarray(label_or_region))
    return seg == label_or_region


def normalize_labels(labels: Iterable[int | Sequence[int]]) -> list[LabelOrRegion]:
    """Labels as ints, regions (several labels evaluated as one mask) as tuples of ints."""
    out: list[LabelOrRegion] = []
    for lab in labels:
        if isinstance(lab, (list, tuple, np.ndarray)):
            out.append(tuple(int(v) for v in lab))
        else:
            out.append(int(lab))
    return out


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Iterable[int | Sequence[int]],
    spacing: float | Sequence[float] | None = None,
    ignore_label: int | None = None,
) -> dict[LabelOrRegion, dict[str, float | int]]:
    """Metrics of every label (or region) of two label maps of the same shape (2D or 3D).

    ``spacing`` is per axis in array order (nnU-Net's ``properties['spacing']`` order). Voxels where
    ``ref == ignore_label`` are excluded (see the module docstring). Returns ``{label: binary_metrics(...)}``."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference have different shapes: {pred.shape} vs {ref.shape}")
    sp = _normalize_spacing(spacing, ref.ndim)
    ignore_mask = (ref == ignore_label) if ignore_label is not None else None
    return {
        lab: binary_metrics(_region_mask(pred, lab), _region_mask(ref, lab), sp, ignore_mask)
        for lab in normalize_labels(labels)
    }


def label_key(label_or_region: LabelOrRegion) -> str:
    """The JSON key nnU-Net uses for a label or region: ``'1'``, ``'(1, 2)'``."""
    return str(label_or_region)


def key_to_label(key: str | int | tuple) -> LabelOrRegion:
    """Inverse of :func:`label_key` (also accepts ints and tuples unchanged)."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, tuple):
        return tuple(int(v) for v in key)
    try:
        return int(key)
    except ValueError:
        parts = key.replace("(", "").replace(")", "").split(",")
        return tuple(int(p) for p in parts if p.strip())


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")
