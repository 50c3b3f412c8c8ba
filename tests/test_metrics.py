"""Metrics against answers computed by hand, and folder evaluation against nnU-Net's own evaluation.

Hand computations (distances between voxel centres; surface = voxels with a face-neighbour outside the mask):

* 2D: a 10×10 square and the same square shifted by 2 columns. Each surface ring has 36 pixels. From the
  first ring to the second: the 16 top/bottom pixels over the overlap lie on the other ring (0); the two
  pixels per row left of the overlap are 2 and 1 column away (2, 1 twice); the 8 left-edge pixels are 2 columns
  away (2); of the 8 right-edge pixels (inside the other square), those next to a corner row are 1 row from the
  other ring's top/bottom (1, twice) and the others 2 columns from its right edge (2, six times).
  So each direction is {0: 16, 1: 4, 2: 16}; by symmetry the other direction is the same.
  Pooled (72 values): 32 × 0, 8 × 1, 32 × 2 → HD95 (index 0.95·71 = 67.45) = 2, ASD = (8 + 64) / 72 = 1.
  Dice = 2·80 / 200 = 0.8, IoU = 80 / 120 = 2/3.
  With spacing (sy, sx) and sy ≥ 2·sx, every non-zero distance is along x: {0: 16, sx: 2, 2sx: 18}
  → HD95 = 2·sx, ASD = (4·sx + 72·sx) / 72 = 19/18·sx, whatever sy is.
* 3D: a 10³ cube and the same cube shifted by 2 along x. Each surface has 488 voxels. From the first to the
  second: the x=0 face (100) is 2 away, the x=1 ring (36) 1 away, the rings x=2..8 and the x=9 ring
  (7·36 + 36 = 288) lie on the other surface (0); the 64 inner voxels of the x=9 face are min(2, distance to
  the nearest z or y face): 1 for the 28 next to the edge, 2 for the inner 36.
  Each direction: {0: 288, 1: 64, 2: 136} → pooled 976 values, HD95 = 2, ASD = (128 + 544) / 976 = 42/61.
  With spacing s⊥ ≥ 2·sx across x: {0: 288, sx: 36, 2sx: 164} → HD95 = 2·sx, ASD = 364/488·sx = 91/122·sx.
* A 1-pixel bar of 20 pixels and one reference pixel at its end: d(P→R) = 0..19, d(R→P) = {0}.
  Pooled [0, 0, 1, ..., 19] (21 values): HD95 = value at index 0.95·20 = 19 → 18; ASD = 190/21.
  MONAI-style max of the directed 95th percentiles would give 18.05; the mean of the two directed means
  (older medpy's assd) 4.75; medpy's directed asd 9.5.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.evaluation import (
    METRIC_NAMES,
    NNUNET_METRIC_NAMES,
    TABLE_COLUMNS,
    average_surface_distance,
    binary_metrics,
    compute_metrics,
    confusion_counts,
    dataset_iou,
    dice,
    evaluate_folder,
    hd95,
    jaccard,
    summary_table_rows,
    surface_distances,
)

NAN = float("nan")


def same(a: float, b: float, rel: float = 1e-9) -> bool:
    """Equal, NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def square_pair() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((14, 16), dtype=bool)
    a[2:12, 2:12] = True
    b = np.zeros_like(a)
    b[2:12, 4:14] = True  # shifted by 2 columns (x)
    return a, b


def cube_pair() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((14, 14, 16), dtype=bool)
    a[2:12, 2:12, 2:12] = True
    b = np.zeros_like(a)
    b[2:12, 2:12, 4:14] = True  # shifted by 2 along x (last axis)
    return a, b


def histogram(d: np.ndarray) -> dict[float, int]:
    values, counts = np.unique(np.round(d, 9), return_counts=True)
    return {float(v): int(c) for v, c in zip(values, counts, strict=True)}


# ---------------------------------------------------------------------------------------------- binary metrics


def test_shifted_square_2d_hand_values():
    a, b = square_pair()
    d_ab, d_ba = surface_distances(a, b)
    assert histogram(d_ab) == {0.0: 16, 1.0: 4, 2.0: 16}
    assert histogram(d_ba) == {0.0: 16, 1.0: 4, 2.0: 16}
    m = binary_metrics(a, b)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (80, 20, 20, 14 * 16 - 120)
    assert (m["n_pred"], m["n_ref"]) == (100, 100)
    assert m["Dice"] == pytest.approx(0.8)
    assert m["IoU"] == m["Jaccard"] == pytest.approx(2 / 3)
    assert m["HD95"] == pytest.approx(2.0)
    assert m["ASD"] == pytest.approx(1.0)
    assert dice(a, b) == pytest.approx(0.8)
    assert jaccard(a, b) == pytest.approx(2 / 3)
    assert hd95(a, b) == pytest.approx(2.0)
    assert average_surface_distance(a, b) == pytest.approx(1.0)


def test_shifted_cube_3d_hand_values():
    a, b = cube_pair()
    d_ab, d_ba = surface_distances(a, b)
    assert histogram(d_ab) == {0.0: 288, 1.0: 64, 2.0: 136}
    assert histogram(d_ba) == {0.0: 288, 1.0: 64, 2.0: 136}
    m = binary_metrics(a, b)
    assert (m["TP"], m["FP"], m["FN"]) == (800, 200, 200)
    assert m["Dice"] == pytest.approx(0.8)
    assert m["Jaccard"] == pytest.approx(2 / 3)
    assert m["HD95"] == pytest.approx(2.0)
    assert m["ASD"] == pytest.approx(42 / 61)


@pytest.mark.parametrize(
    ("spacing", "hd", "asd"),
    [
        ((1.0, 1.0), 2.0, 1.0),
        ((2.0, 1.0), 2.0, 19 / 18),
        ((5.0, 1.0), 2.0, 19 / 18),  # the spacing across the shift does not matter once it is >= 2·sx
        ((6.0, 3.0), 6.0, 19 / 6),
    ],
)
def test_anisotropic_spacing_2d(spacing, hd, asd):
    a, b = square_pair()
    m = binary_metrics(a, b, spacing=spacing)
    assert m["HD95"] == pytest.approx(hd)
    assert m["ASD"] == pytest.approx(asd)
    assert m["Dice"] == pytest.approx(0.8)  # overlap metrics ignore spacing


@pytest.mark.parametrize(
    ("spacing", "hd", "asd"),
    [
        ((3.0, 3.0, 1.0), 2.0, 91 / 122),
        ((7.0, 7.0, 1.0), 2.0, 91 / 122),
        ((2.5, 2.5, 0.5), 1.0, 91 / 244),
        ((7.0, 3.0, 0.5), 1.0, 91 / 244),
    ],
)
def test_anisotropic_spacing_3d_scales_with_shifted_axis_only(spacing, hd, asd):
    a, b = cube_pair()
    assert hd95(a, b, spacing) == pytest.approx(hd)
    assert average_surface_distance(a, b, spacing) == pytest.approx(asd)


def test_hd95_is_pooled_percentile_and_asd_is_pooled_mean():
    pred = np.zeros((3, 25), dtype=bool)
    pred[1, 0:20] = True
    ref = np.zeros_like(pred)
    ref[1, 0] = True
    d_pr, d_rp = surface_distances(pred, ref)
    assert sorted(d_pr.tolist()) == [float(i) for i in range(20)]
    assert d_rp.tolist() == [0.0]
    m = binary_metrics(pred, ref)
    assert m["HD95"] == pytest.approx(18.0)  # not max(P95(d_pr), P95(d_rp)) = 18.05
    assert m["ASD"] == pytest.approx(190 / 21)  # not (9.5 + 0) / 2 = 4.75, nor the directed 9.5
    assert m["Dice"] == pytest.approx(2 / 21)
    # symmetric in its arguments
    assert hd95(ref, pred) == pytest.approx(18.0)
    assert average_surface_distance(ref, pred) == pytest.approx(190 / 21)
    # half the spacing along the bar halves both
    assert hd95(pred, ref, (1.0, 0.5)) == pytest.approx(9.0)
    assert average_surface_distance(pred, ref, (1.0, 0.5)) == pytest.approx(95 / 21)


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_one_mask_empty(which):
    a, _ = cube_pair()
    empty = np.zeros_like(a)
    pred, ref = (empty, a) if which == "pred" else (a, empty)
    m = binary_metrics(pred, ref, spacing=(2.0, 1.0, 1.0))
    assert m["Dice"] == 0.0 and m["IoU"] == 0.0 and m["Jaccard"] == 0.0
    assert math.isnan(m["HD95"]) and math.isnan(m["ASD"])
    assert m["n_pred"] == (0 if which == "pred" else 1000)
    assert m["n_ref"] == (1000 if which == "pred" else 0)
    assert math.isnan(hd95(pred, ref)) and math.isnan(average_surface_distance(pred, ref))
    d1, d2 = surface_distances(pred, ref)
    assert d1.size == 0 and d2.size == 0


def test_both_empty():
    empty = np.zeros((5, 6, 7), dtype=bool)
    m = binary_metrics(empty, empty)
    for k in ("Dice", "IoU", "Jaccard", "HD95", "ASD"):
        assert math.isnan(m[k]), k
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (0, 0, 0, 5 * 6 * 7)


def test_identical_masks_give_zero_distance():
    a, _ = cube_pair()
    m = binary_metrics(a, a, spacing=(3.0, 2.0, 1.0))
    assert (m["Dice"], m["HD95"], m["ASD"]) == (1.0, 0.0, 0.0)


def test_ignore_region_excluded_from_counts_and_distances():
    ref = np.zeros((14, 18), dtype=np.uint8)
    ref[2:12, 2:12] = 1
    ref[:, 12:16] = 2  # ignore label
    pred = np.zeros_like(ref)
    pred[2:12, 2:16] = 1  # reaches 4 columns into the ignore region
    with_ignore = compute_metrics(pred, ref, [1], ignore_label=2)[1]
    assert (with_ignore["TP"], with_ignore["FP"], with_ignore["FN"]) == (100, 0, 0)
    assert with_ignore["TN"] == 14 * 18 - 14 * 4 - 100
    assert (with_ignore["Dice"], with_ignore["HD95"], with_ignore["ASD"]) == (1.0, 0.0, 0.0)
    without = compute_metrics(pred, ref, [1])[1]
    assert without["FP"] == 40
    assert without["Dice"] == pytest.approx(200 / 240)
    assert without["HD95"] > 0 and without["ASD"] > 0
    assert confusion_counts(pred == 1, ref == 1, ignore_mask=ref == 2) == (100, 0, 0, 14 * 18 - 56 - 100)


def test_multiclass_label_map_and_region():
    ref = np.zeros((20, 30), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2:12, 2:12] = 1
    pred[2:12, 4:14] = 1  # class 1: the shifted square
    ref[14:18, 20:26] = 2
    pred[14:18, 20:26] = 2  # class 2: exact
    pred[14:16, 2:4] = 4  # class 4: only predicted; class 3: absent from both
    res = compute_metrics(pred, ref, [1, 2, 3, 4, (1, 2)])
    assert list(res) == [1, 2, 3, 4, (1, 2)]
    assert (res[1]["Dice"], res[1]["HD95"], res[1]["ASD"]) == pytest.approx((0.8, 2.0, 1.0))
    assert (res[2]["Dice"], res[2]["IoU"], res[2]["HD95"], res[2]["ASD"]) == (1.0, 1.0, 0.0, 0.0)
    assert all(math.isnan(res[3][k]) for k in ("Dice", "IoU", "HD95", "ASD"))
    assert res[3]["TN"] == 600
    assert res[4]["Dice"] == 0.0 and res[4]["FP"] == 4 and math.isnan(res[4]["HD95"])
    # region 1+2: 64 zeros, 8 ones, 32 twos pooled (class 2 is >= 3 px from class 1)
    assert (res[(1, 2)]["TP"], res[(1, 2)]["FP"], res[(1, 2)]["FN"]) == (104, 20, 20)
    assert res[(1, 2)]["Dice"] == pytest.approx(208 / 248)
    assert res[(1, 2)]["HD95"] == pytest.approx(2.0)
    assert res[(1, 2)]["ASD"] == pytest.approx(9 / 13)


def test_singleton_axis_is_dropped_like_nnunet_2d():
    a, b = square_pair()
    m2d = binary_metrics(a, b, spacing=(2.0, 1.0))
    m3d = binary_metrics(a[None], b[None], spacing=(1998.0, 2.0, 1.0))  # nnU-Net's 2D layout
    assert m3d == m2d
    assert m3d["ASD"] == pytest.approx(19 / 18)


def test_bad_inputs_raise():
    a, b = square_pair()
    with pytest.raises(ValueError, match="shapes"):
        binary_metrics(a, b[:, :-1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, b, spacing=(0.0, 1.0))


def _random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_medpy_on_random_masks(seed):
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    shape, spacing = (12, 17, 15), (2.5, 0.7, 1.3)
    pred, ref = _random_blob(rng, shape), _random_blob(rng, shape)
    assert pred.any() and ref.any() and pred[0].any()  # touches the image border: exercises the crop
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    medpy_sd = getattr(medpy_binary, "__surface_distances")
    np.testing.assert_allclose(np.sort(d_pr), np.sort(medpy_sd(pred, ref, spacing)))
    np.testing.assert_allclose(np.sort(d_rp), np.sort(medpy_sd(ref, pred, spacing)))
    assert hd95(pred, ref, spacing) == pytest.approx(medpy_binary.hd95(pred, ref, spacing))
    asd = average_surface_distance(pred, ref, spacing)
    assert asd == pytest.approx((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    from importlib.metadata import version

    if tuple(int(v) for v in version("medpy").split(".")[:3]) >= (
        0,
        5,
        2,
    ):  # older medpy: mean of the two means
        assert asd == pytest.approx(medpy_binary.assd(pred, ref, spacing))
    assert asd != pytest.approx((d_pr.mean() + d_rp.mean()) / 2)  # the masks differ in surface size
    assert dice(pred, ref) == pytest.approx(medpy_binary.dc(pred, ref))
    assert jaccard(pred, ref) == pytest.approx(medpy_binary.jc(pred, ref))


# ------------------------------------------------------------------------------------------ folder evaluation


def _write(arr: np.ndarray, path, spacing_xyz) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, str(path))


SPACING_XYZ = (0.5, 3.0, 3.0)  # SimpleITK order (x, y, z): nnU-Net's properties['spacing'] is (3, 3, 0.5)


def _make_3d_folders(tmp_path):
    """Three cases, labels 1 and 2, shape (z, y, x) = (14, 14, 24).

    case_000: class 1 shifted by 2 along x (HD95 = 2·0.5 = 1, ASD = 91/244), class 2 exact.
    case_001: class 1 exact, class 2 not predicted (Dice 0, distances NaN).
    case_002: class 1 exact, class 2 absent from both (everything NaN)."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    base = np.zeros((14, 14, 24), dtype=np.uint8)
    cube = (slice(2, 12), slice(2, 12), slice(2, 12))
    shifted = (slice(2, 12), slice(2, 12), slice(4, 14))
    box2 = (slice(2, 6), slice(2, 6), slice(18, 22))
    r0, p0 = base.copy(), base.copy()
    r0[cube], r0[box2], p0[shifted], p0[box2] = 1, 2, 1, 2
    r1, p1 = base.copy(), base.copy()
    r1[cube], r1[box2], p1[cube] = 1, 2, 1
    r2, p2 = base.copy(), base.copy()
    r2[cube], p2[cube] = 1, 1
    for i, (r, p) in enumerate([(r0, p0), (r1, p1), (r2, p2)]):
        _write(r, ref_dir / f"case_{i:03d}.nii.gz", SPACING_XYZ)
        _write(p, pred_dir / f"case_{i:03d}.nii.gz", SPACING_XYZ)
    return pred_dir, ref_dir


def test_evaluate_folder_3d_hand_values_and_nnunet_fields(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    pred_dir, ref_dir = _make_3d_folders(tmp_path)
    out = tmp_path / "eval" / "summary.json"
    summary = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1, 2], output_file=str(out))

    # the file holds exactly what was returned (NaN included)
    with open(out, encoding="utf-8") as f:
        on_disk = json.load(f)
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(summary, sort_keys=True)
    assert {"metric_per_case", "mean", "foreground_mean", "nan_count", "n_cases"} <= set(summary)
    assert summary["n_cases"] == 3

    cases = summary["metric_per_case"]
    assert [os.path.basename(c["prediction_file"]) for c in cases] == [
        "case_000.nii.gz",
        "case_001.nii.gz",
        "case_002.nii.gz",
    ]
    assert cases[0]["reference_file"] == str(ref_dir / "case_000.nii.gz")
    assert cases[0]["spacing"] == pytest.approx([3.0, 3.0, 0.5])
    for c in cases:
        for k in ("1", "2"):
            assert set(c["metrics"][k]) == set(METRIC_NAMES)
    c0, c1, c2 = (c["metrics"] for c in cases)
    assert c0["1"]["Dice"] == pytest.approx(0.8)
    assert c0["1"]["Jaccard"] == pytest.approx(2 / 3)
    assert c0["1"]["HD95"] == pytest.approx(1.0)  # 2 voxels × 0.5 mm along x
    assert c0["1"]["ASD"] == pytest.approx(91 / 244)
    assert (c0["2"]["Dice"], c0["2"]["HD95"], c0["2"]["ASD"]) == (1.0, 0.0, 0.0)
    assert (c1["1"]["Dice"], c1["1"]["HD95"]) == (1.0, 0.0)
    assert c1["2"]["Dice"] == 0.0 and math.isnan(c1["2"]["HD95"]) and math.isnan(c1["2"]["ASD"])
    assert all(math.isnan(c2["2"][k]) for k in ("Dice", "IoU", "Jaccard", "HD95", "ASD"))

    mean = summary["mean"]
    assert mean["1"]["Dice"] == pytest.approx((0.8 + 1 + 1) / 3)
    assert mean["1"]["HD95"] == pytest.approx(1 / 3)
    assert mean["1"]["ASD"] == pytest.approx(91 / 244 / 3)
    assert mean["2"]["Dice"] == pytest.approx(0.5)  # NaN of case_002 skipped
    assert mean["2"]["HD95"] == 0.0  # only case_000 has both masks
    assert summary["nan_count"]["1"] == {m: 0 for m in METRIC_NAMES}
    assert summary["nan_count"]["2"]["Dice"] == 1
    assert summary["nan_count"]["2"]["HD95"] == summary["nan_count"]["2"]["ASD"] == 2
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((2.8 / 3) + 0.5) / 2)
    assert summary["foreground_mean"]["HD95"] == pytest.approx((1 / 3 + 0) / 2)

    # nnU-Net's own evaluation of the same files gives the same values for its fields
    nn = compute_metrics_on_folder(
        str(ref_dir), str(pred_dir), None, SimpleITKIO(), ".nii.gz", [1, 2], None, num_processes=1
    )
    assert len(nn["metric_per_case"]) == 3
    for ours, theirs in zip(cases, nn["metric_per_case"], strict=True):
        assert os.path.basename(ours["reference_file"]) == os.path.basename(theirs["reference_file"])
        for lab in (1, 2):
            for m in NNUNET_METRIC_NAMES:
                assert same(float(ours["metrics"][str(lab)][m]), float(theirs["metrics"][lab][m])), (lab, m)
    for lab in (1, 2):
        for m in NNUNET_METRIC_NAMES:
            assert same(summary["mean"][str(lab)][m], float(nn["mean"][lab][m])), (lab, m)
            assert same(summary["foreground_mean"][m], float(nn["foreground_mean"][m])), m

    # nnU-Net's loader reads our file
    loaded = load_summary_json(str(out))
    assert loaded["mean"][1]["Dice"] == pytest.approx(mean["1"]["Dice"])

    rows = summary_table_rows(summary)
    assert TABLE_COLUMNS == ("Label", "Dice", "Jaccard", "HD95", "ASD")
    assert [r[0] for r in rows] == ["1", "2", "foreground mean"]
    assert rows[0][1:] == pytest.approx((mean["1"]["Dice"], mean["1"]["Jaccard"], 1 / 3, 91 / 244 / 3))
    assert rows[2][1] == pytest.approx(summary["foreground_mean"]["Dice"])
    assert summary_table_rows(on_disk, label_names={1: "organ"})[0][0] == "1 (organ)"


def test_evaluate_folder_2d_nifti_spacing_and_inferred_labels(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a, b = square_pair()
    # SimpleITK spacing (x, y) = (1, 2): along the shift 1 mm, across it 2 mm → HD95 2, ASD 19/18
    _write(a.astype(np.uint8) * 3, ref_dir / "img.nii.gz", (1.0, 2.0))
    _write(b.astype(np.uint8) * 3, pred_dir / "img.nii.gz", (1.0, 2.0))
    _write(np.zeros((4, 4), np.uint8), pred_dir / "extra_without_reference.nii.gz", (1.0, 1.0))
    summary = evaluate_folder(str(pred_dir), str(ref_dir))  # labels and file ending inferred
    assert summary["config"]["labels"] == ["3"]
    assert summary["config"]["file_ending"] == ".nii.gz"
    assert summary["n_cases"] == 1
    m = summary["metric_per_case"][0]["metrics"]["3"]
    assert m["Dice"] == pytest.approx(0.8)
    assert m["HD95"] == pytest.approx(2.0)
    assert m["ASD"] == pytest.approx(19 / 18)


def test_dataset_level_miou_pools_cases_and_includes_background(tmp_path):
    """ProtoDiff's mIoU: per class ΣTP / Σ(TP+FP+FN) over all cases, then the mean over classes, background
    included; not the mean of per-case Jaccard values.

    case a: reference row [1 1 0 0], prediction [1 0 0 0]; case b: reference [1 0 0 0], prediction empty; a
    second row of background in both. Label 1: TP 1+0, FP 0, FN 1+1 -> 1/3 (per-case Jaccard 1/2 and 0, mean
    1/4). Background: TP 6+7, FP 1+1, FN 0 -> 13/15. mIoU = (1/3 + 13/15) / 2 = 0.6."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref_a, pred_a, ref_b = (np.zeros((2, 4), np.uint8) for _ in range(3))
    ref_a[0, :2] = 1
    pred_a[0, 0] = 1
    ref_b[0, 0] = 1
    for name, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, np.zeros((2, 4), np.uint8))):
        _write(ref, ref_dir / f"{name}.nii.gz", (1.0, 1.0))
        _write(pred, pred_dir / f"{name}.nii.gz", (1.0, 1.0))
    out = tmp_path / "summary.json"
    summary = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1], output_file=str(out))
    assert summary["dataset_iou"] == pytest.approx({"0": 13 / 15, "1": 1 / 3})
    assert summary["mIoU"] == pytest.approx(0.6)
    assert summary["mean"]["1"]["Jaccard"] == pytest.approx(0.25)  # the per-case mean differs
    assert summary["metric_per_case"][0]["background_counts"] == {"TP": 6, "FP": 1, "FN": 0, "TN": 1}
    assert json.loads(out.read_text(encoding="utf-8"))["mIoU"] == pytest.approx(0.6)
    assert math.isnan(dataset_iou([{"TP": 0, "FP": 0, "FN": 0}]))  # a class with no voxel anywhere


def test_evaluate_folder_dataset_json_ignore_label(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref = np.zeros((1, 14, 18), dtype=np.uint8)
    ref[0, 2:12, 2:12] = 1
    ref[0, :, 12:16] = 2
    pred = np.zeros_like(ref)
    pred[0, 2:12, 2:16] = 1
    _write(ref, ref_dir / "c.nii.gz", (1.0, 1.0, 1.0))
    _write(pred, pred_dir / "c.nii.gz", (1.0, 1.0, 1.0))
    ds = {
        "labels": {"background": 0, "lesion": 1, "ignore": 2},
        "file_ending": ".nii.gz",
        "channel_names": {},
    }
    ds_path = tmp_path / "dataset.json"
    ds_path.write_text(json.dumps(ds), encoding="utf-8")
    summary = evaluate_folder(str(pred_dir), str(ref_dir), dataset_json=str(ds_path))
    assert summary["config"]["ignore_label"] == 2
    assert summary["config"]["labels"] == ["1"]
    m = summary["metric_per_case"][0]["metrics"]["1"]
    assert (m["FP"], m["Dice"], m["HD95"], m["ASD"]) == (0, 1.0, 0.0, 0.0)
    background = summary["metric_per_case"][0]["background_counts"]  # the ignore region is no background either
    assert background == {"TP": 14 * 18 - 100 - 56, "FP": 0, "FN": 0, "TN": 100}
    plain = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1])
    assert plain["metric_per_case"][0]["metrics"]["1"]["FP"] == 40


def test_missing_prediction_names_first_missing_file(tmp_path):
    pred_dir, ref_dir = _make_3d_folders(tmp_path)
    os.remove(pred_dir / "case_001.nii.gz")
    os.remove(pred_dir / "case_002.nii.gz")
    with pytest.raises(SemidiffError, match=r"Missing prediction \S*case_001\.nii\.gz") as info:
        evaluate_folder(str(pred_dir), str(ref_dir), labels=[1, 2])
    assert "case_002" not in str(info.value)
    with pytest.raises(SemidiffError, match="not found"):
        evaluate_folder(str(tmp_path / "nope"), str(ref_dir), labels=[1])


@pytest.mark.slow
def test_evaluate_folder_pool_matches_sequential(tmp_path, monkeypatch):
    import semidiff_nnunet.evaluation.folder as folder

    pred_dir, ref_dir = _make_3d_folders(tmp_path)
    sequential = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1, 2], num_processes=1)
    monkeypatch.setattr(folder, "MIN_CASES_FOR_POOL", 2)
    contexts = []
    real_get_context = folder.multiprocessing.get_context

    def spy(method):
        contexts.append(method)
        return real_get_context(method)

    monkeypatch.setattr(folder.multiprocessing, "get_context", spy)
    pooled = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1, 2], num_processes=2)
    assert contexts == ["spawn"]
    assert json.dumps(pooled, sort_keys=True) == json.dumps(sequential, sort_keys=True)


def test_evaluate_folder_png_natural_images(tmp_path):
    import SimpleITK as sitk

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a, b = square_pair()
    sitk.WriteImage(sitk.GetImageFromArray(a.astype(np.uint8)), str(ref_dir / "im.png"))
    sitk.WriteImage(sitk.GetImageFromArray(b.astype(np.uint8)), str(pred_dir / "im.png"))
    summary = evaluate_folder(str(pred_dir), str(ref_dir), labels=[1])
    assert summary["config"]["reader"] == "NaturalImage2DIO"
    assert summary["config"]["file_ending"] == ".png"
    m = summary["metric_per_case"][0]["metrics"]["1"]
    assert (m["Dice"], m["HD95"], m["ASD"]) == pytest.approx((0.8, 2.0, 1.0))


def test_unreadable_or_empty_reference_folder(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    with pytest.raises(SemidiffError, match="known ending"):
        evaluate_folder(str(pred_dir), str(ref_dir), labels=[1])
    (ref_dir / "bad.nii.gz").write_text("not an image", encoding="utf-8")
    (pred_dir / "bad.nii.gz").write_text("not an image", encoding="utf-8")
    with pytest.raises(SemidiffError, match="No nnU-Net reader can open"):
        evaluate_folder(str(pred_dir), str(ref_dir), labels=[1])


def test_case_grid_picks_best_median_worst_and_draws_every_method(tmp_path):
    """benchmark_cases.png: the reference method's best, median and worst held-out cases (3D: the slice
    with the most reference foreground), the image, the reference and each method's overlay."""
    import SimpleITK as sitk

    from semidiff_nnunet.evaluation import evaluate_folder
    from semidiff_nnunet.evaluation.figures import case_grid, pick_cases

    assert pick_cases({"a": 0.9, "b": 0.1, "c": float("nan"), "d": 0.5, "e": 0.7}, 3) == [
        ("best", "a"), ("median", "d"), ("worst", "c")]
    rng = np.random.RandomState(0)
    images, labels = tmp_path / "images", tmp_path / "labels"
    preds = {m: tmp_path / m for m in ("supervised", "mean-teacher")}
    for f in (images, labels, *preds.values()):
        f.mkdir()
    for i in range(4):
        ref = np.zeros((6, 12, 12), np.uint8)
        ref[3, 2:9, 2:9] = 1  # most foreground in slice 3
        ref[1, 4:6, 4:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(rng.rand(6, 12, 12).astype(np.float32)), str(images / f"c{i}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(labels / f"c{i}.nii.gz"))
        for k, folder in enumerate(preds.values()):
            pred = ref.copy()
            pred[3, 2:2 + i + k] = 0  # case i loses i rows: c0 best, c3 worst
            sitk.WriteImage(sitk.GetImageFromArray(pred), str(folder / f"c{i}.nii.gz"))
    ds = {"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    summaries = {m: evaluate_folder(str(f), str(labels), dataset_json=ds) for m, f in preds.items()}
    out = case_grid(images, labels, preds, summaries, tmp_path / "cases.png", ".nii.gz", ds)
    assert out.stat().st_size > 1000
    import matplotlib.image

    assert matplotlib.image.imread(str(out)).shape[1] > 4 * 200  # image, reference and 2 methods side by side
    # 2D cases (nnU-Net reads them as Z = 1)
    for f in (images, labels, *preds.values()):
        for old in f.iterdir():
            old.unlink()
    for i in range(3):
        ref = np.zeros((12, 12), np.uint8)
        ref[2:9, 2:9] = 1
        sitk.WriteImage(sitk.GetImageFromArray(rng.rand(12, 12).astype(np.float32)), str(images / f"d{i}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(labels / f"d{i}.nii.gz"))
        for folder in preds.values():
            pred = ref.copy()
            pred[2:2 + i] = 0
            sitk.WriteImage(sitk.GetImageFromArray(pred), str(folder / f"d{i}.nii.gz"))
    summaries = {m: evaluate_folder(str(f), str(labels), dataset_json=ds) for m, f in preds.items()}
    assert case_grid(images, labels, preds, summaries, tmp_path / "cases2d.png", ".nii.gz", ds).stat().st_size > 1000
