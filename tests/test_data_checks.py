"""Data checks before planning: unreadable, truncated, non-finite raw files and misfit pseudo masks are refused
naming the file; preprocessed data made from raw files that changed since are redone."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from semidiff_nnunet import data_checks
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.synthetic import _write, generate_demo_dataset


def _dataset(root: Path, dataset_id: int = 940, num_unlabeled: int = 1) -> Path:
    return generate_demo_dataset(root, dim=2, num_train=4, num_test=0, num_unlabeled=num_unlabeled, shape=(16, 16),
                                 dataset_id=dataset_id, name="Checks")


def _as_mha(raw: Path) -> Path:
    """The dataset in .mha: SimpleITK's NIfTI reader turns NaN/inf into 0, its MetaImage reader keeps them (as
    nnU-Net's reader for .mha, .nrrd and NibabelIO's for .nii do)."""
    import SimpleITK as sitk

    for f in raw.rglob("*.nii.gz"):
        sitk.WriteImage(sitk.ReadImage(str(f)), str(f)[: -len(".nii.gz")] + ".mha", useCompression=True)
        f.unlink()
    ds = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps(ds | {"file_ending": ".mha"}))
    return raw


def _write_mha(img: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(img), str(path), useCompression=True)


def _refused(raw: Path, pre: Path) -> str:
    with pytest.raises(SemidiffError) as e:
        data_checks.check_raw_data(raw, pre)
    return str(e.value)


def test_clean_dataset_passes_and_a_second_check_reads_nothing(tmp_path, monkeypatch):
    raw = _dataset(tmp_path / "raw")
    pre = tmp_path / "pre"
    snapshot = data_checks.check_raw_data(raw, pre)
    assert "imagesTr/demotr_000_0000.nii.gz" in snapshot and "imagesUnlabeled/demoun_000_0000.nii.gz" in snapshot
    reads = []
    monkeypatch.setattr(data_checks, "_read", lambda *a, **k: reads.append(a[2]))
    assert data_checks.check_raw_data(raw, pre) == snapshot
    assert reads == []


def test_inf_in_imagesTr_is_refused_before_planning(workspace):
    from semidiff_nnunet import api

    raw = _as_mha(_dataset(Path(workspace) / "nnUNet_raw", dataset_id=941))
    img = np.zeros((16, 16), np.float32)
    img[3, 4] = np.inf
    _write_mha(img, raw / "imagesTr" / "demotr_002_0000.mha")
    with pytest.raises(SemidiffError) as e:
        api.plan_and_preprocess(raw.name, ["2d"], show_progress=False)
    assert "imagesTr/demotr_002_0000.mha holds 1 infinite" in str(e.value)
    assert not (Path(workspace) / "nnUNet_preprocessed" / raw.name / "dataset_fingerprint.json").exists()


def test_nan_in_imagesUnlabeled_is_refused(tmp_path):
    raw = _as_mha(_dataset(tmp_path / "raw"))
    img = np.ones((16, 16), np.float32)
    img[0, 0] = np.nan
    _write_mha(img, raw / "imagesUnlabeled" / "demoun_000_0000.mha")
    msg = _refused(raw, tmp_path / "pre")
    assert "imagesUnlabeled/demoun_000_0000.mha holds 0 infinite and 1 NaN" in msg


def test_truncated_nii_gz_is_refused_naming_it(tmp_path):
    raw = _dataset(tmp_path / "raw")
    f = raw / "imagesTr" / "demotr_001_0000.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # SimpleITK reads this without error, zero-filled
    msg = _refused(raw, tmp_path / "pre")
    assert str(f) in msg and "truncated" in msg


def test_unreadable_file_is_refused_naming_it(tmp_path):
    raw = _dataset(tmp_path / "raw")
    f = raw / "labelsTr" / "demotr_003.nii.gz"
    f.write_bytes(gzip.compress(b"not an image"))  # a sound gzip stream, but no NIfTI inside
    msg = _refused(raw, tmp_path / "pre")
    assert str(f) in msg and "cannot be read" in msg


def test_pseudo_mask_of_wrong_shape_or_unknown_label_is_refused(tmp_path):
    raw = _dataset(tmp_path / "raw")
    (raw / "labelsPseudo").mkdir()
    mask = raw / "labelsPseudo" / "demoun_000.nii.gz"
    _write(np.zeros((16, 12), np.uint8), mask, (1.0, 1.0))
    msg = _refused(raw, tmp_path / "pre")
    assert str(mask) in msg and "16, 12)" in msg and "16, 16)" in msg
    seg = np.zeros((16, 16), np.uint8)
    seg[2, 2] = 7
    _write(seg, mask, (1.0, 1.0))
    msg = _refused(raw, tmp_path / "pre")
    assert str(mask) in msg and "label(s) 7" in msg


def test_raw_label_changed_after_preprocessing_redoes_it(workspace):
    from semidiff_nnunet import api

    raw = _dataset(Path(workspace) / "nnUNet_raw", dataset_id=942, num_unlabeled=0)
    pname = api.plan_and_preprocess(raw.name, ["2d"], num_processes=1, fingerprint_voxels=1e4, show_progress=False)
    pre = Path(workspace) / "nnUNet_preprocessed" / raw.name
    ident = json.loads((pre / f"{pname}.json").read_text())["configurations"]["2d"]["data_identifier"]
    gt = pre / "gt_segmentations" / "demotr_000.nii.gz"
    before = (pre / ident / "demotr_000.pkl").stat().st_mtime_ns
    api.plan_and_preprocess(raw.name, ["2d"], num_processes=1, show_progress=False)
    assert (pre / ident / "demotr_000.pkl").stat().st_mtime_ns == before  # unchanged raw data: reused

    new = np.zeros((16, 16), np.uint8)
    new[4:8, 4:8] = 2
    _write(new, raw / "labelsTr" / "demotr_000.nii.gz", (1.0, 1.0))
    api.plan_and_preprocess(raw.name, ["2d"], num_processes=1, show_progress=False)
    from helpers import load_image

    assert np.array_equal(load_image(gt), new)
    assert (pre / ident / "demotr_000.pkl").stat().st_mtime_ns != before


def test_nnunet_integrity_message_keeps_the_line_naming_an_unreadable_file(workspace):
    from semidiff_nnunet import planning

    raw = _dataset(Path(workspace) / "nnUNet_raw", dataset_id=943, num_unlabeled=0)
    f = raw / "imagesTr" / "demotr_001_0000.nii.gz"
    f.write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(SemidiffError) as e:
        planning.verify_raw_dataset(raw.name, 1)
    assert str(f) in str(e.value)
