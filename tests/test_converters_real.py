"""Converters on the real subsets in ``$SEMIDIFF_TEST_DATA`` (``../shared/data``); skipped without it.

The data are never copied into the repository: the tests read them where they are and write
into pytest's tmp_path. The quick tests convert a few real cases (linked into a source folder of
the download's layout) and check them file by file; the ``slow`` ones convert every case of a
subset and plan the result with nnU-Net (a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semidiff_nnunet.dataset_conversion.api import convert_dataset
from semidiff_nnunet.dataset_conversion.common import verify_dataset

PH2_CASES = "PH2Dataset/PH2 Dataset images"
LA_CASES = "2018LA_Seg_Training Set"


def data_dir(sub: str) -> Path:
    root = os.environ.get("SEMIDIFF_TEST_DATA")
    if not root:
        pytest.skip("SEMIDIFF_TEST_DATA is not set (point it at the shared real-data folder)")
    path = Path(root) / sub
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return path


def linked_subset(src: Path, cases_dir: str, cases: list[str], dst: Path, extra: tuple[str, ...] = ()) -> Path:
    """A source folder of the download's layout holding only ``cases`` (their folders recreated, the
    files linked to the real ones) and the files ``extra``."""
    for case in cases:
        for f in (src / cases_dir / case).rglob("*"):
            if f.is_file():
                link = dst / f.relative_to(src)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
    for name in extra:
        (dst / name).symlink_to(src / name)
    return dst


def plan_with_nnunet(dataset: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Run nnU-Net's fingerprint extractor and default planner on a converted dataset (subprocess)."""
    env = dict(os.environ, nnUNet_raw=str(dataset.parent), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    env.pop("nnUNet_n_proc_DA", None)
    dataset_id = int(dataset.name[7:10])
    code = (
        "from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments\n"
        f"extract_fingerprints([{dataset_id}], num_processes=2, check_dataset_integrity=False, clean=True, "
        "verbose=False)\n"
        f"plan_experiments([{dataset_id}])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, encoding="utf-8", errors="replace",
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    plans = json.loads((tmp_path / "pre" / dataset.name / "nnUNetPlans.json").read_text(encoding="utf-8"))
    fp = json.loads((tmp_path / "pre" / dataset.name / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    return plans, fp


# ----------------------------------------------------------------------------- PH2
def test_ph2_real_masks_read_exactly(tmp_path):
    """IMD002's mask is an RGB 0/255 BMP, IMD003's a 1-bit BMP: both are read exactly."""
    src = data_dir("ph2")
    subset = linked_subset(src, PH2_CASES, ["IMD002", "IMD003"], tmp_path / "src")
    out = convert_dataset("ph2", subset, dataset_id=912, raw_root=tmp_path / "raw", num_processes=1)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert ds["numTraining"] == 2 and ds["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    for case in ("IMD002", "IMD003"):
        case_dir = src / PH2_CASES / case
        src_mask = np.asarray(Image.open(case_dir / f"{case}_lesion" / f"{case}_lesion.bmp").convert("L")) > 0
        lab = np.asarray(Image.open(out / "labelsTr" / f"{case}.png"))
        assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
        assert (lab.astype(bool) == src_mask).all()
        img = np.asarray(Image.open(out / "imagesTr" / f"{case}_0000.png"))
        assert (img == np.asarray(Image.open(case_dir / f"{case}_Dermoscopic_Image" / f"{case}.bmp").convert("RGB"))).all()
    verify_dataset(out, num_processes=1)


@pytest.mark.slow
def test_ph2_real_all_cases_plan_with_nnunet(tmp_path):
    """Every case of the subset converts, passes nnU-Net's integrity check and plans."""
    src = data_dir("ph2")
    out = convert_dataset("ph2", src, dataset_id=912, raw_root=tmp_path / "raw", num_processes=2)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert ds["numTraining"] == len([p for p in (src / PH2_CASES).iterdir() if p.is_dir()]) == 60
    verify_dataset(out, num_processes=1)
    plans, fp = plan_with_nnunet(out, tmp_path)
    assert len(plans["configurations"]["2d"]["patch_size"]) == 2
    assert len(fp["foreground_intensity_properties_per_channel"]) == 3


# ----------------------------------------------------------------------------- LA (UA-MT h5)
def test_la_uamt_real_geometry_and_split(tmp_path):
    import h5py
    import SimpleITK as sitk

    src = data_dir("la_uamt")
    train = (src / "train.list").read_text(encoding="utf-8").split()
    test = (src / "test.list").read_text(encoding="utf-8").split()
    subset = linked_subset(src, LA_CASES, [train[0], test[0]], tmp_path / "src", ("train.list", "test.list"))
    out = convert_dataset("la2018", subset, dataset_id=902, raw_root=tmp_path / "raw", num_processes=1)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert ds["numTraining"] == 1
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{test[0]}.nii.gz"]
    assert ds["semidiff"]["spacing_assumed"] == [0.625, 0.625, 0.625]
    img = sitk.ReadImage(str(out / "imagesTr" / f"{train[0]}_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / f"{train[0]}.nii.gz"))
    assert img.GetSpacing() == pytest.approx((0.625, 0.625, 0.625))
    with h5py.File(src / LA_CASES / train[0] / "mri_norm2.h5") as f:
        assert img.GetSize() == f["image"].shape  # (x, y, z), z = 88 slices
        assert img.GetSize()[2] == 88
        assert (sitk.GetArrayFromImage(lab) == f["label"][()].transpose(2, 1, 0)).all()
    verify_dataset(out, num_processes=1)


@pytest.mark.slow
def test_la_uamt_real_all_cases_plan_with_nnunet(tmp_path):
    src = data_dir("la_uamt")
    out = convert_dataset("la2018", src, dataset_id=902, raw_root=tmp_path / "raw", num_processes=1)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    train = (src / "train.list").read_text(encoding="utf-8").split()
    test = (src / "test.list").read_text(encoding="utf-8").split()
    assert ds["numTraining"] == len(train) == 8
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == sorted(f"{c}.nii.gz" for c in test)
    verify_dataset(out, num_processes=1)
    plans, _ = plan_with_nnunet(out, tmp_path)
    assert plans["configurations"]["3d_fullres"]["spacing"] == pytest.approx([0.625, 0.625, 0.625])


# ----------------------------------------------------------------------------- Kvasir-SEG
@pytest.fixture(scope="module")
def kvasir_raw(tmp_path_factory):
    return convert_dataset("kvasir-seg", data_dir("kvasir_seg"), dataset_id=914,
                           raw_root=tmp_path_factory.mktemp("raw"), num_processes=1)


def test_kvasir_seg_real(kvasir_raw):
    src = data_dir("kvasir_seg")
    ds = json.loads((kvasir_raw / "dataset.json").read_text(encoding="utf-8"))
    assert ds["numTraining"] == 5
    for m in sorted((src / "Kvasir-SEG" / "masks").iterdir()):
        raw = np.asarray(Image.open(m).convert("L"))
        assert len(np.unique(raw)) > 2  # noisy JPEG mask
        lab = np.asarray(Image.open(kvasir_raw / "labelsTr" / (m.stem + ".png")))
        assert set(np.unique(lab)) == {0, 1}
        assert (lab == (raw > 127)).mean() > 0.99
        img = np.asarray(Image.open(kvasir_raw / "imagesTr" / (m.stem + "_0000.png")))
        assert img.shape == lab.shape + (3,)
    verify_dataset(kvasir_raw, num_processes=1)


@pytest.mark.slow
def test_kvasir_seg_real_plans_with_nnunet(kvasir_raw, tmp_path):
    plans, fp = plan_with_nnunet(kvasir_raw, tmp_path)
    assert len(plans["configurations"]["2d"]["patch_size"]) == 2
    assert len(fp["foreground_intensity_properties_per_channel"]) == 3
