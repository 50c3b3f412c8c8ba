"""``pancreas-ct`` converter on tiny replicas of the TCIA DICOM download and the MC-Net h5 form.

The DICOM fixture writes one real (tiny) CT series per case with SimpleITK: a body (40 HU) that
fills only the lower half of the slices, air (-1000 HU) elsewhere and a "pancreas" blob (100 HU)
inside the body, so a label put on the wrong z end lands in air and fails the HU check. The
labels are NIfTI files stored three ways: on the image's grid, with a z-reversed header (same
physical place, different array order), and z-flipped with the image's header (the trap).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_untouched, names, tree_digest

from semidiff_nnunet.dataset_conversion.api import convert_dataset, list_converters
from semidiff_nnunet.dataset_conversion.common import verify_dataset
from semidiff_nnunet.errors import SemidiffError

SHAPE = (6, 16, 16)  # z, y, x
SPACING = (0.8, 0.8, 2.0)  # x, y, z
ORIGIN = (-6.4, -6.4, -100.0)
UID_ROOT = "1.2.826.0.1.3680043.2.1125.7"


# ----------------------------------------------------------------------------- helpers
def convert(source: Path, tmp_path: Path, **kw) -> Path:
    return convert_untouched("pancreas-ct", source, tmp_path / "raw", **kw)


def ct_volume(num: int) -> np.ndarray:
    vol = np.full(SHAPE, -1000, np.int16)
    vol[:3, 2:14, 2:14] = 40 + num  # body only in slices 0-2
    vol[1:3, 5:9, 6:10] = 100  # pancreas blob
    return vol


def reference_image(vol: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def write_dicom_series(vol: np.ndarray, folder: Path, num: int) -> None:
    """A CT series as the TCIA download has it: one file per slice, instance numbers top-down."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = reference_image(vol)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {
        "0008|0060": "CT", "0010|0010": f"PANCREAS_{num:04d}", "0010|0020": f"PANCREAS_{num:04d}",
        "0020|000d": f"{UID_ROOT}.{num}.1", "0020|000e": f"{UID_ROOT}.{num}.2",
        "0020|0037": "1\\0\\0\\0\\1\\0", "0008|103e": "Pancreas", "0018|0050": str(SPACING[2]),
        "0028|0030": f"{SPACING[1]}\\{SPACING[0]}",
    }
    nz = vol.shape[0]
    for k in range(nz):
        sl = img[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{c:g}" for c in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(nz - k))
        sl.SetMetaData("0008|0018", f"{UID_ROOT}.{num}.3.{k + 1}")
        writer.SetFileName(str(folder / f"1-{nz - k:03d}.dcm"))
        writer.Execute(sl)


def write_label(vol: np.ndarray, path: Path, how: str) -> None:
    import SimpleITK as sitk

    lab = (vol == 100).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "grid":  # on the image's grid
        img = sitk.GetImageFromArray(lab)
        img.CopyInformation(reference_image(vol))
    elif how == "reversed_header":  # same physical place, array stored top-down
        img = sitk.GetImageFromArray(np.ascontiguousarray(lab[::-1]))
        img.SetSpacing(SPACING)
        img.SetOrigin((ORIGIN[0], ORIGIN[1], ORIGIN[2] + (SHAPE[0] - 1) * SPACING[2]))
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    elif how == "flipped":  # the trap: z-flipped array with the image's header
        img = sitk.GetImageFromArray(np.ascontiguousarray(lab[::-1]))
        img.CopyInformation(reference_image(vol))
    elif how == "wrong_size":
        img = sitk.GetImageFromArray(np.ascontiguousarray(lab[:-1]))
        img.SetSpacing(SPACING)
    elif how == "in_air":  # a blob outside the body whichever way round
        air = np.zeros_like(lab)
        air[1:3, 0:2, 0:2] = 1
        img = sitk.GetImageFromArray(air)
        img.CopyInformation(reference_image(vol))
    else:
        raise ValueError(how)
    sitk.WriteImage(img, str(path), useCompression=True)


def make_tcia(root: Path, cases: dict[int, str]) -> Path:
    """``Pancreas-CT/PANCREAS_XXXX/<study>/<series>/*.dcm`` + ``TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz``."""
    for num, how in cases.items():
        vol = ct_volume(num)
        series = (root / "Pancreas-CT" / f"PANCREAS_{num:04d}" / f"11-24-2015-PANCREAS{num:04d}-Pancreas-{num}"
                  / f"Pancreas-{num}")
        write_dicom_series(vol, series, num)
        write_label(vol, root / "TCIA_pancreas_labels-02-05-2017" / f"label{num:04d}.nii.gz", how)
    return root


def make_h5(root: Path, nums=(1, 2, 25, 70), train=(2, 70), test=(1, 25), lists=True) -> Path:
    """MC-Net's ``data/Pancreas/{train,test}.list`` + ``Pancreas_h5/imageXXXX_norm.h5`` (x, y, z)."""
    import h5py

    base = root / "Pancreas" / "Pancreas_h5"
    base.mkdir(parents=True)
    for num in nums:
        img = np.random.default_rng(num).standard_normal((12, 10, 8)).astype(np.float32)
        lab = np.zeros((12, 10, 8), np.float32)  # MC-Net stores the label as float32
        lab[3:8, 2:6, 1:4 + num % 3] = 1
        with h5py.File(base / f"image{num:04d}_norm.h5", "w") as f:
            f.create_dataset("image", data=img, compression="gzip")
            f.create_dataset("label", data=lab, compression="gzip")
    if lists:
        (root / "Pancreas" / "train.list").write_text("".join(f"image{n:04d}\n" for n in train), encoding="utf-8")
        (root / "Pancreas" / "test.list").write_text("".join(f"image{n:04d}\n" for n in test), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- tests
def test_listed_with_free_default_id():
    listed = {c["name"]: c for c in list_converters()}
    spec = listed["pancreas-ct"]
    assert spec["default_id"] == 504 and spec["default_name"] == "PancreasCT"
    assert [c["name"] for c in listed.values() if c["default_id"] == 504] == ["pancreas-ct"]
    assert "keep_duplicates" in spec["options"]


def test_tcia_dicom_orientation_split_and_rerun(tmp_path):
    import SimpleITK as sitk

    src = make_tcia(tmp_path / "tcia", {1: "grid", 2: "reversed_header", 3: "flipped", 25: "grid"})
    out = convert(src, tmp_path, dataset_id=904, keep_duplicates=False)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert ds["channel_names"] == {"0": "CT"} and ds["labels"] == {"background": 0, "pancreas": 1}
    assert ds["file_ending"] == ".nii.gz" and ds["numTraining"] == 2
    # MC-Net's lists: case 1 is a test case, 2 and 3 train; 25 is a duplicate, dropped
    assert names(out / "imagesTr") == ["pancreas_0002_0000.nii.gz", "pancreas_0003_0000.nii.gz"]
    assert names(out / "labelsTr") == ["pancreas_0002.nii.gz", "pancreas_0003.nii.gz"]
    assert names(out / "imagesTs") == ["pancreas_0001_0000.nii.gz"]
    assert names(out / "labelsTs") == ["pancreas_0001.nii.gz"]
    assert not (out / "splits_final.json").exists()
    assert json.loads((out / "test_sets.json").read_text(encoding="utf-8")) == {"mcnet_test": ["pancreas_0001"]}
    info = ds["semidiff"]
    assert info["source_form"].startswith("TCIA DICOM")
    assert info["label_placement"] == {"pancreas_0001": "physical", "pancreas_0002": "physical",
                                       "pancreas_0003": "flip_z"}
    assert info["dropped_duplicates"] == ["pancreas_0025"]
    assert info["split"] == "mcnet" and "not confirmed" in info["split_assumed"]
    assert info["spacing_assumed"] is None
    notes = " ".join(info["notes"])
    assert "flipped along z: pancreas_0003" in notes and "2 train, 1 test" in notes
    for sub, case in (("Ts", "pancreas_0001"), ("Tr", "pancreas_0002"), ("Tr", "pancreas_0003")):
        img = sitk.ReadImage(str(out / f"images{sub}" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out / f"labels{sub}" / f"{case}.nii.gz"))
        assert img.GetSize() == (16, 16, 6) and img.GetSpacing() == pytest.approx(SPACING)
        assert img.GetOrigin() == pytest.approx(ORIGIN)
        assert lab.GetSpacing() == pytest.approx(SPACING) and lab.GetOrigin() == pytest.approx(ORIGIN)
        assert lab.GetDirection() == pytest.approx(img.GetDirection())
        hu, seg = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
        assert hu.min() == -1000 and hu[1, 6, 7] == 100  # HU kept, z order by position
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) == {0, 1}
        assert (seg == (hu == 100)).all(), f"{case}: the label is not on the blob"
    verify_dataset(out, num_processes=1)

    first = tree_digest(out)
    with pytest.raises(SemidiffError, match="already exists; pass --overwrite"):
        convert_dataset("pancreas-ct", src, dataset_id=904, raw_root=tmp_path / "raw", num_processes=1)
    out2 = convert(src, tmp_path, dataset_id=904, keep_duplicates=False, overwrite=True, verify=True)
    assert out2 == out and tree_digest(out2) == first


def test_tcia_split_none_and_keep_duplicates(tmp_path):
    src = make_tcia(tmp_path / "tcia", {2: "grid", 25: "grid"})
    out = convert(src, tmp_path, dataset_id=904, split="none", keep_duplicates="true")
    assert names(out / "labelsTr") == ["pancreas_0002.nii.gz", "pancreas_0025.nii.gz"]
    assert not (out / "imagesTs").exists() and not (out / "test_sets.json").exists()
    info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["semidiff"]
    assert info["dropped_duplicates"] == [] and info["split_assumed"] is None


@pytest.mark.parametrize("how, message", [
    ("wrong_size", r"label0002\.nii\.gz has size \(16, 16, 5\) but the CT series of pancreas_0002 has \(16, 16, 6\)"),
    ("in_air", r"label0002\.nii\.gz does not fit the CT of pancreas_0002 in physical space nor flipped along z"),
])
def test_tcia_bad_label_names_the_case(tmp_path, how, message):
    src = make_tcia(tmp_path / "tcia", {2: how})
    with pytest.raises(SemidiffError, match=message):
        convert_dataset("pancreas-ct", src, dataset_id=904, raw_root=tmp_path / "raw", num_processes=1)
    assert list((tmp_path / "raw").iterdir()) == [], "a half-written dataset was left behind"


def test_tcia_missing_label(tmp_path):
    src = make_tcia(tmp_path / "tcia", {2: "grid"})
    (src / "TCIA_pancreas_labels-02-05-2017" / "label0002.nii.gz").unlink()
    with pytest.raises(SemidiffError, match=r"label0002\.nii\.gz is missing"):
        convert_dataset("pancreas-ct", src, dataset_id=904, raw_root=tmp_path / "raw", num_processes=1)


def test_h5_form_with_shipped_lists(tmp_path):
    import h5py
    import SimpleITK as sitk

    src = make_h5(tmp_path / "mcnet")
    out = convert(src, tmp_path, dataset_id=904, keep_duplicates=False)
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    info = ds["semidiff"]
    assert info["source_form"].startswith("MC-Net/BCP h5")
    assert info["spacing_assumed"] == [1.0, 1.0, 1.0] and "ASSUMED 1.0 x 1.0 x 1.0 mm" in " ".join(info["notes"])
    assert info["dropped_duplicates"] == ["pancreas_0025", "pancreas_0070"]
    assert info["split_assumed"] is None and info["split_source"].endswith("test.list")
    assert names(out / "labelsTr") == ["pancreas_0002.nii.gz"]
    assert names(out / "labelsTs") == ["pancreas_0001.nii.gz"]
    img = sitk.ReadImage(str(out / "imagesTr" / "pancreas_0002_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / "pancreas_0002.nii.gz"))
    assert img.GetSize() == (12, 10, 8) and img.GetSpacing() == (1.0, 1.0, 1.0)
    with h5py.File(src / "Pancreas" / "Pancreas_h5" / "image0002_norm.h5") as f:
        assert np.allclose(sitk.GetArrayFromImage(img), f["image"][()].transpose(2, 1, 0))
        assert (sitk.GetArrayFromImage(lab) == f["label"][()].transpose(2, 1, 0)).all()
    verify_dataset(out, num_processes=1)

    out = convert(src, tmp_path, dataset_id=904, keep_duplicates=True, overwrite=True, spacing="1,1,2")
    assert names(out / "labelsTr") == ["pancreas_0002.nii.gz", "pancreas_0070.nii.gz"]
    assert names(out / "labelsTs") == ["pancreas_0001.nii.gz", "pancreas_0025.nii.gz"]
    img = sitk.ReadImage(str(out / "imagesTs" / "pancreas_0025_0000.nii.gz"))
    assert img.GetSpacing() == (1.0, 1.0, 2.0)


def test_h5_without_lists_uses_mcnet_split_and_checks_labels(tmp_path):
    import h5py

    src = make_h5(tmp_path / "mcnet", nums=(1, 3), lists=False)
    out = convert(src / "Pancreas" / "Pancreas_h5", tmp_path, dataset_id=904)
    info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["semidiff"]
    assert "MC-Net's published" in info["split_source"] and info["split_assumed"]
    assert names(out / "labelsTr") == ["pancreas_0003.nii.gz"] and names(out / "labelsTs") == ["pancreas_0001.nii.gz"]

    with h5py.File(src / "Pancreas" / "Pancreas_h5" / "image0003_norm.h5", "a") as f:
        lab = f["label"][()]
        lab[0, 0, 0] = 2
        del f["label"]
        f.create_dataset("label", data=lab)
    with pytest.raises(SemidiffError, match=r"image0003_norm\.h5 contains label values \[2\]"):
        convert_dataset("pancreas-ct", src, dataset_id=905, raw_root=tmp_path / "raw2", num_processes=1)


def test_source_with_neither_form(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SemidiffError, match="holds neither Pancreas-CT/PANCREAS_XXXX"):
        convert_dataset("pancreas-ct", tmp_path / "empty", raw_root=tmp_path / "raw", num_processes=1)
