"""Dataset converters on tiny replicas of each original download layout.

Every fixture generator writes the files a user gets from the download (names, formats and
the known quirks), the test converts it through ``convert_dataset`` and checks the result file
by file, then runs nnU-Net's integrity check (in-process, see ``common.verify_dataset``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_untouched, names, tree_digest
from PIL import Image

from semidiff_nnunet.dataset_conversion import _known_splits as known
from semidiff_nnunet.dataset_conversion.api import convert_dataset, list_converters
from semidiff_nnunet.dataset_conversion.common import verify_dataset
from semidiff_nnunet.errors import SemidiffError

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- helpers
def rgb(h=16, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blob(h=16, w=20, value=255, y=4, x=5, size=6):
    m = np.zeros((h, w), np.uint8)
    m[y:y + size, x:x + size] = value
    return m


def save(arr, path: Path, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(path, **kw)
    return path


def convert(name, source, tmp_path, **kw):
    kw.setdefault("dataset_id", 900)
    return convert_untouched(name, source, tmp_path / "raw", **kw)


def dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))


def png_values(path: Path) -> set[int]:
    return set(np.unique(np.asarray(Image.open(path))).tolist())


def check(folder: Path, n_train: int, n_test: int = 0, n_test_labels: int | None = None, n_unlabeled: int = 0,
          labels: dict | None = None, channels: int | None = None):
    ds = dataset_json(folder)
    fe = ds["file_ending"]
    assert ds["numTraining"] == n_train
    assert len(names(folder / "labelsTr")) == n_train
    tr_images = names(folder / "imagesTr")
    if channels is not None:
        assert len(ds["channel_names"]) == channels
    files_per_case = 1 if fe == ".png" else len(ds["channel_names"])  # an RGB PNG holds its 3 channels
    suffixes = {f"_{c:04d}{fe}" for c in range(files_per_case)}
    assert all(n[-(5 + len(fe)):] in suffixes for n in tr_images)
    assert len(tr_images) == n_train * files_per_case
    assert len(names(folder / "imagesTs")) == n_test * files_per_case
    assert len(names(folder / "labelsTs")) == (n_test if n_test_labels is None else n_test_labels)
    assert len(names(folder / "imagesUnlabeled")) == n_unlabeled * files_per_case
    if labels is not None:
        assert ds["labels"] == labels
    verify_dataset(folder, num_processes=1)
    return ds


# ----------------------------------------------------------------------------- registry / api
def test_all_converters_listed():
    listed = {c["name"]: c for c in list_converters()}
    for name in ("generic", "hmeps", "ph2", "la2018", "kvasir-seg", "cvc-clinicdb", "polyp-pranet", "acdc", "busi",
                 "isic2018", "glas", "bcss", "mosxav", "endoscapes2023", "brats2019", "msd-prostate", "mscmrseg2019"):
        assert name in listed
        assert listed[name]["source_layout"] and listed[name]["summary"]
    ids = [c["default_id"] for c in listed.values() if c["default_id"] is not None]
    assert len(ids) == len(set(ids)), "two converters share a default id"


def test_plugin_module_is_light():
    import subprocess
    import sys

    code = ("import sys, semidiff_nnunet.plugins.converters as c; c.semidiff_register_converters(); "
            "bad=[m for m in ('numpy','SimpleITK','PIL','h5py','nnunetv2','torch') if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=True)
    assert res.stdout.strip() == "[]"


def test_conversion_api_reaches_converters_through_the_registry_only(tmp_path, monkeypatch):
    """convert_dataset runs whatever the registry holds under the name, and nothing else: no
    built-in converter is registered behind the registry's back."""
    import types

    from semidiff_nnunet import registry
    from semidiff_nnunet.hookspecs import hookimpl
    from semidiff_nnunet.specs import ConverterSpec

    def toy(source, target, *, flavour="plain"):
        (Path(target) / "dataset.json").write_text(json.dumps({"flavour": flavour}), encoding="utf-8")

    plugin = types.ModuleType("toy_plugin")
    plugin.semidiff_register_converters = hookimpl(lambda: [ConverterSpec(name="toy", convert=toy, default_id=950)])
    reg = registry.Registry(load_entry_points=False)
    reg.register(plugin, "toy-plugin", "toy-dist")
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    (tmp_path / "src").mkdir()
    out = convert_dataset("toy", tmp_path / "src", raw_root=tmp_path / "raw", flavour="spicy")
    assert out.name == "Dataset950_toy" and dataset_json(out) == {"flavour": "spicy", "name": "toy"}
    assert [c["name"] for c in list_converters()] == ["toy"]
    with pytest.raises(SemidiffError, match="Unknown converter 'ph2'"):
        convert_dataset("ph2", tmp_path / "src", raw_root=tmp_path / "raw")


def test_dataset_conversion_never_imports_plugins():
    """One direction: plugins/converters.py imports dataset_conversion (lazily), never the reverse."""
    import ast

    import semidiff_nnunet.dataset_conversion as pkg

    offending = []
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # also "from ..plugins import x" (level 2)
                mods = [("." * node.level) + (node.module or "") + "." + a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # importlib.import_module("...")
                mods = [node.value]
            else:
                continue
            offending += [f"{path.name}:{node.lineno}: {m}" for m in mods
                          if m.startswith(("semidiff_nnunet.plugins", "..plugins"))]
    assert not offending, offending


# ----------------------------------------------------------------------------- generic
def make_generic(root: Path, n=4, suffix="_mask", ext=".png", values=(0, 255)):
    for i in range(n):
        save(rgb(seed=i), root / "images" / f"case {i}{ext}")
        save(blob(value=values[1], x=i), root / "masks" / f"case {i}{suffix}.png")
    return root


def test_generic_binary_with_suffix(tmp_path):
    src = make_generic(tmp_path / "src")
    out = convert("generic", src, tmp_path)
    check(out, 4, labels={"background": 0, "foreground": 1}, channels=3)
    assert names(out / "imagesTr")[0] == "case_0_0000.png"
    assert png_values(out / "labelsTr" / "case_0.png") == {0, 1}
    img = np.asarray(Image.open(out / "imagesTr" / "case_1_0000.png"))
    assert img.shape == (16, 20, 3) and (img == rgb(seed=1)).all()


def test_generic_split_layout_and_process_pool(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for i in range(n):
            save(rgb(seed=i), src / split / "image" / f"{split}{i}.png")
            save(blob(), src / split / "mask" / f"{split}{i}.png")
    out = convert("generic", src, tmp_path, num_processes=2)
    check(out, 5, n_test=2)
    splits = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))
    assert splits == [{"train": ["train0", "train1", "train2"], "val": ["val0", "val1"]}]


def test_generic_multiclass_mapping_and_gray(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(rgb(seed=i)[..., 0], src / "img" / f"c{i}.bmp")
        m = blob(value=128)
        m[0:2, 0:2] = 255
        save(m, src / "gt" / f"c{i}.png")
    out = convert("generic", src, tmp_path, images="img", masks="gt", labels="background,a,b", mapping="128:1,255:2")
    check(out, 3, labels={"background": 0, "a": 1, "b": 2}, channels=1)
    assert png_values(out / "labelsTr" / "c0.png") == {0, 1, 2}


def test_generic_undeclared_value_is_an_error(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        save(rgb(seed=i), src / "images" / f"c{i}.png")
        m = blob(value=1)
        m[0, 0] = 7
        save(m, src / "masks" / f"c{i}.png")
    with pytest.raises(SemidiffError, match=r"c0\.png contains label values \[7\]"):
        convert_dataset("generic", src, dataset_id=900, raw_root=tmp_path / "raw", labels="background,fg",
                        num_processes=1)
    assert names(tmp_path / "raw") == [], "a failed conversion left files behind"


def test_generic_3d(tmp_path):
    import SimpleITK as sitk

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for i in range(2):
        img = sitk.GetImageFromArray(RNG.random((5, 6, 7)).astype(np.float32))
        img.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(img, str(src / "images" / f"vol{i}.nii.gz"))
        lab = sitk.GetImageFromArray((RNG.random((5, 6, 7)) > 0.5).astype(np.uint8) * 255)
        lab.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(lab, str(src / "labels" / f"vol{i}.nii.gz"))
    out = convert("generic", src, tmp_path)
    check(out, 2, channels=1)
    lab = sitk.ReadImage(str(out / "labelsTr" / "vol0.nii.gz"))
    assert lab.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}


def test_missing_mask_names_the_file(tmp_path):
    src = make_generic(tmp_path / "src", n=2)
    (src / "masks" / "case 1_mask.png").unlink()
    with pytest.raises(SemidiffError, match=r"case 1_mask\.png is missing"):
        convert_dataset("generic", src, dataset_id=900, raw_root=tmp_path / "raw", num_processes=1)


def test_target_exists_needs_overwrite_and_rerun_is_idempotent(tmp_path):
    src = make_generic(tmp_path / "src", n=2)
    out = convert("generic", src, tmp_path, dataset_name="Demo")
    first = tree_digest(out)
    with pytest.raises(SemidiffError, match="already exists; pass --overwrite"):
        convert_dataset("generic", src, dataset_id=900, dataset_name="Demo", raw_root=tmp_path / "raw")
    with pytest.raises(SemidiffError, match="already used by"):
        convert_dataset("generic", src, dataset_id=900, dataset_name="Other", raw_root=tmp_path / "raw")
    out2 = convert("generic", src, tmp_path, dataset_name="Demo", overwrite=True, verify=True)
    assert out2 == out and tree_digest(out2) == first


def test_unknown_option_and_bad_source(tmp_path):
    src = make_generic(tmp_path / "src", n=1)
    with pytest.raises(SemidiffError, match="does not take option 'colour'"):
        convert_dataset("ph2", src, raw_root=tmp_path / "raw", colour="red")
    with pytest.raises(SemidiffError, match="does not exist"):
        convert_dataset("ph2", tmp_path / "nope", raw_root=tmp_path / "raw")
    with pytest.raises(SemidiffError, match="Unknown converter 'ph3'. Did you mean 'ph2'"):
        convert_dataset("ph3", src, raw_root=tmp_path / "raw")


def test_hmeps_ciampi_layout(tmp_path):
    src = tmp_path / "HMEPS"
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            g = rgb(seed=i)[..., 0]
            save(np.stack([g] * 3, -1), src / split / "image" / f"{i:03d}.png")
            save(blob(), src / split / "mask" / f"{i:03d}.png")
    out = convert("hmeps", src, tmp_path)
    check(out, 4, channels=3)
    assert json.loads((out / "splits_final.json").read_text(encoding="utf-8"))[0]["val"] == ["val_000"]  # names repeat across splits


# ----------------------------------------------------------------------------- PH2
def make_ph2(root: Path, ids=(2, 3, 4)) -> Path:
    base = root / "PH2Dataset" / "PH2 Dataset images"
    for k in ids:
        c = f"IMD{k:03d}"
        save(rgb(18, 22, seed=k), base / c / f"{c}_Dermoscopic_Image" / f"{c}.bmp")
        m = blob(18, 22)
        if k == 2:  # the real IMD002 lesion mask is RGB 0/255
            save(np.stack([m] * 3, -1), base / c / f"{c}_lesion" / f"{c}_lesion.bmp")
        else:
            save(m, base / c / f"{c}_lesion" / f"{c}_lesion.bmp", mode="1")
        save(m, base / c / f"{c}_lesion" / f"{c}_lesion.jpg")  # distractor copy
        save(blob(18, 22, x=0), base / c / f"{c}_roi" / f"{c}_R1_Label4.bmp", mode="1")
    (root / "PH2Dataset" / "PH2_dataset.txt").write_text("Name\tClinical Diagnosis\nIMD003\t0\n", encoding="utf-8")
    return root


def test_ph2(tmp_path):
    src = make_ph2(tmp_path / "ph2")
    out = convert("ph2", src, tmp_path)
    check(out, 3, labels={"background": 0, "lesion": 1}, channels=3)
    assert names(out / "labelsTr") == ["IMD002.png", "IMD003.png", "IMD004.png"]
    for c in ("IMD002", "IMD003"):
        lab = np.asarray(Image.open(out / "labelsTr" / f"{c}.png"))
        assert lab.shape == (18, 22) and lab.dtype == np.uint8
        assert (lab == (blob(18, 22) > 0)).all()


def test_ph2_missing_image(tmp_path):
    src = make_ph2(tmp_path / "ph2", ids=(5,))
    (src / "PH2Dataset" / "PH2 Dataset images" / "IMD005" / "IMD005_Dermoscopic_Image" / "IMD005.bmp").unlink()
    with pytest.raises(SemidiffError, match=r"IMD005\.bmp is missing; expected the dermoscopic image"):
        convert_dataset("ph2", src, raw_root=tmp_path / "raw", num_processes=1)


# ----------------------------------------------------------------------------- LA 2018
def make_la_h5(root: Path, train=("A1", "A2"), test=("B1",), lists=True) -> Path:
    import h5py

    base = root / "2018LA_Seg_Training Set"
    for i, case in enumerate(list(train) + list(test)):
        (base / case).mkdir(parents=True)
        img = np.random.default_rng(i).standard_normal((12, 10, 6)).astype(np.float32)
        lab = np.zeros((12, 10, 6), np.uint8)
        lab[3:8, 2:6, 1:4] = 1
        with h5py.File(base / case / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=img, compression="gzip")
            f.create_dataset("label", data=lab, compression="gzip")
    if lists:
        (root / "train.list").write_text("".join(f"{c}\n" for c in train), encoding="utf-8")
        (root / "test.list").write_text("".join(f"{c}\n" for c in test), encoding="utf-8")
    return root


def test_la2018_uamt_h5(tmp_path):
    import h5py
    import SimpleITK as sitk

    src = make_la_h5(tmp_path / "la")
    out = convert("la2018", src, tmp_path)
    ds = check(out, 2, n_test=1, labels={"background": 0, "left_atrium": 1}, channels=1)
    assert "0.625" in " ".join(ds["semidiff"]["notes"])
    img = sitk.ReadImage(str(out / "imagesTr" / "A1_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((0.625, 0.625, 0.625))
    assert img.GetSize() == (12, 10, 6)  # x, y, z as in the h5
    with h5py.File(src / "2018LA_Seg_Training Set" / "A1" / "mri_norm2.h5") as f:
        assert np.allclose(sitk.GetArrayFromImage(img), f["image"][()].transpose(2, 1, 0))
    assert json.loads((out / "test_sets.json").read_text(encoding="utf-8")) == {"uamt_test": ["B1"]}


def test_la2018_h5_without_lists_uses_uamt_split(tmp_path):
    src = make_la_h5(tmp_path / "la", train=(known.LA_UAMT_TRAIN[0],), test=(known.LA_UAMT_TEST[0],), lists=False)
    out = convert("la2018", src / "2018LA_Seg_Training Set", tmp_path)
    check(out, 1, n_test=1)
    assert names(out / "labelsTs") == [known.LA_UAMT_TEST[0] + ".nii.gz"]


def test_la2018_bad_h5_label(tmp_path):
    import h5py

    src = make_la_h5(tmp_path / "la", train=("A1",), test=())
    with h5py.File(src / "2018LA_Seg_Training Set" / "A1" / "mri_norm2.h5", "a") as f:
        lab = f["label"][()]
        lab[0, 0, 0] = 255
        del f["label"]
        f.create_dataset("label", data=lab)
    with pytest.raises(SemidiffError, match=r"mri_norm2\.h5 contains label values \[255\]"):
        convert_dataset("la2018", src, raw_root=tmp_path / "raw", num_processes=1)


@pytest.mark.parametrize("value, error", [(1.0, None), (0.5, "holds non-integer label values")])
def test_h5_float_labels_must_be_whole_numbers(tmp_path, value, error):
    """All h5 forms share one reader: a float32 label (as MC-Net stores it) is fine when it holds
    whole numbers and an error otherwise, for LA as for Pancreas."""
    import h5py

    src = make_la_h5(tmp_path / "la", train=("A1",), test=())
    with h5py.File(src / "2018LA_Seg_Training Set" / "A1" / "mri_norm2.h5", "a") as f:
        lab = f["label"][()].astype(np.float32)
        lab[lab == 1] = value
        del f["label"]
        f.create_dataset("label", data=lab)
    if error:
        with pytest.raises(SemidiffError, match=rf"mri_norm2\.h5 {error}"):
            convert_dataset("la2018", src, raw_root=tmp_path / "raw", num_processes=1)
        return
    out = convert("la2018", src, tmp_path)
    assert names(out / "labelsTr") == ["A1.nii.gz"]
    import SimpleITK as sitk

    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "A1.nii.gz")))
    assert written.dtype == np.uint8 and written.sum() == (lab == 1).sum()


def test_la2018_original_nrrd(tmp_path):
    import nrrd
    import SimpleITK as sitk

    src = tmp_path / "LA"
    cases = [known.LA_UAMT_TRAIN[0], known.LA_UAMT_TRAIN[1], known.LA_UAMT_TEST[0]]
    for i, case in enumerate(cases):
        d = src / "Training Set" / case
        d.mkdir(parents=True)
        img = np.random.default_rng(i).integers(0, 200, (14, 12, 5)).astype(np.uint8)
        lab = np.zeros((14, 12, 5), np.uint8)
        lab[4:9, 3:7, 1:4] = 255
        header = {"space directions": np.diag([0.625] * 3), "space": "left-posterior-superior"}
        nrrd.write(str(d / "lgemri.nrrd"), img, header)
        nrrd.write(str(d / "laendo.nrrd"), lab, header)
    out = convert("la2018", src, tmp_path)
    ds = check(out, 2, n_test=1)
    assert ds["semidiff"]["source_form"].startswith("original nrrd")
    lab = sitk.ReadImage(str(out / "labelsTr" / f"{cases[0]}.nii.gz"))
    assert lab.GetSpacing() == pytest.approx((0.625,) * 3)
    assert lab.GetSize() == (14, 12, 5)
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}


# ----------------------------------------------------------------------------- polyps
def noisy_jpeg_mask(path: Path, seed=0):
    m = blob(24, 30, size=10).astype(np.int16)
    m = np.clip(m + np.random.default_rng(seed).integers(-20, 20, m.shape), 0, 255).astype(np.uint8)
    save(np.stack([m] * 3, -1), path, quality=70)


def make_kvasir(root: Path, ids=("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4")) -> Path:
    for i, c in enumerate(ids):
        save(rgb(24, 30, seed=i), root / "Kvasir-SEG" / "images" / f"{c}.jpg")
        noisy_jpeg_mask(root / "Kvasir-SEG" / "masks" / f"{c}.jpg", seed=i)
    (root / "Kvasir-SEG" / "kavsir_bboxes.json").write_text("{}", encoding="utf-8")
    return root


def test_kvasir_seg_jpeg_masks(tmp_path):
    src = make_kvasir(tmp_path / "kv")
    out = convert("kvasir-seg", src, tmp_path)
    check(out, 2, labels={"background": 0, "polyp": 1})
    lab = np.asarray(Image.open(out / "labelsTr" / "cju0qkwl35piu0993l0dewei2.png"))
    assert set(np.unique(lab)) == {0, 1}
    assert (lab == (blob(24, 30, size=10) > 0)).mean() > 0.98


PRANET_SETS = ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300", "ETIS-LaribPolypDB")


def make_pranet(root: Path, nested=True) -> Path:
    train = root / "TrainDataset"
    for i, stem in enumerate(("1", "2", "cju0qkwl35piu0993l0dewei2")):
        save(rgb(24, 30, seed=i), train / "image" / f"{stem}.png")
        save(blob(24, 30), train / "mask" / f"{stem}.png")
    test = root / "TestDataset" / ("TestDataset" if nested else "")
    for s in PRANET_SETS:
        for i in range(2 if s != "ETIS-LaribPolypDB" else 1):
            save(rgb(24, 30, seed=10 + i), test / s / "images" / f"{i + 1}.png")
            m = blob(24, 30)
            m[0, 0] = 128  # intermediate values as in the package's converted masks
            save(m, test / s / "masks" / f"{i + 1}.png")
    return root


def test_polyp_pranet(tmp_path):
    src = make_pranet(tmp_path / "pranet")
    out = convert("polyp-pranet", src, tmp_path)
    check(out, 3, n_test=9)
    assert names(out / "labelsTr") == ["clinicdb_1.png", "clinicdb_2.png", "kvasir_cju0qkwl35piu0993l0dewei2.png"]
    sets = json.loads((out / "test_sets.json").read_text(encoding="utf-8"))
    assert sets["CVC-300"] == ["cvc300_1", "cvc300_2"] and sets["ETIS-LaribPolypDB"] == ["etis_1"]
    assert set(sets) == set(PRANET_SETS)
    assert png_values(out / "labelsTs" / "etis_1.png") == {0, 1}


def test_kvasir_and_clinicdb_from_pranet(tmp_path):
    src = make_pranet(tmp_path / "pranet", nested=False)
    kv = convert("kvasir-seg", src, tmp_path)
    check(kv, 1, n_test=2)
    assert dataset_json(kv)["semidiff"]["source_form"] == "PraNet package (Kvasir part)"
    cl = convert_dataset("cvc-clinicdb", src, raw_root=tmp_path / "raw2", num_processes=1)
    check(cl, 2, n_test=2)


def test_polyp_case_ids_are_the_same_in_all_three_converters(tmp_path):
    """kvasir-seg, cvc-clinicdb and polyp-pranet name a package's images by one rule (sanitised stems)."""
    src = make_pranet(tmp_path / "pranet", nested=False)
    save(rgb(24, 30, seed=7), src / "TrainDataset" / "image" / "cju1 odd(2).png")
    save(blob(24, 30), src / "TrainDataset" / "mask" / "cju1 odd(2).png")
    pranet = convert("polyp-pranet", src, tmp_path / "p")
    kvasir = convert("kvasir-seg", src, tmp_path / "k")
    clinicdb = convert("cvc-clinicdb", src, tmp_path / "c")
    train = names(pranet / "labelsTr")
    assert "kvasir_cju1_odd_2.png" in train
    assert names(kvasir / "labelsTr") == sorted(n[len("kvasir_"):] for n in train if n.startswith("kvasir_"))
    assert names(clinicdb / "labelsTr") == [n for n in train if n.startswith("clinicdb_")]
    assert names(kvasir / "labelsTs") == [n for n in names(pranet / "labelsTs") if n.startswith("kvasir_")]
    assert names(clinicdb / "labelsTs") == [n for n in names(pranet / "labelsTs") if n.startswith("clinicdb_")]


def test_cvc_clinicdb_original_tif(tmp_path):
    src = tmp_path / "CVC-ClinicDB"
    for i in range(1, 4):
        save(rgb(24, 30, seed=i), src / "Original" / f"{i}.tif")
        save(blob(24, 30), src / "Ground Truth" / f"{i}.tif")
    out = convert("cvc-clinicdb", tmp_path / "CVC-ClinicDB", tmp_path)
    check(out, 3)
    assert names(out / "labelsTr") == ["clinicdb_1.png", "clinicdb_2.png", "clinicdb_3.png"]


# ----------------------------------------------------------------------------- 2D natural datasets
def test_busi_multi_masks_and_normal(tmp_path):
    src = tmp_path / "src" / "Dataset_BUSI_with_GT"
    g = lambda s: np.stack([rgb(seed=s)[..., 0]] * 3, -1)  # noqa: E731  (grayscale stored as RGB)
    save(g(1), src / "benign" / "benign (1).png")
    save(blob(x=0, size=4), src / "benign" / "benign (1)_mask.png")
    save(blob(x=12, size=4), src / "benign" / "benign (1)_mask_1.png")
    save(g(2), src / "benign" / "benign (10).png")
    save(np.stack([blob()] * 3, -1), src / "benign" / "benign (10)_mask.png")  # RGB mask
    save(g(3), src / "malignant" / "malignant (1).png")
    save(blob(), src / "malignant" / "malignant (1)_mask.png")
    save(g(4), src / "normal" / "normal (1).png")
    save(np.zeros((16, 20), np.uint8), src / "normal" / "normal (1)_mask.png")
    out = convert("busi", tmp_path / "src", tmp_path)
    check(out, 4, labels={"background": 0, "lesion": 1}, channels=1)
    assert names(out / "labelsTr") == ["benign_001.png", "benign_010.png", "malignant_001.png", "normal_001.png"]
    merged = np.asarray(Image.open(out / "labelsTr" / "benign_001.png"))
    assert (merged == ((blob(x=0, size=4) | blob(x=12, size=4)) > 0)).all()
    assert png_values(out / "labelsTr" / "normal_001.png") == {0}
    assert json.loads((out / "busi_classes.json").read_text(encoding="utf-8"))["malignant_001"] == "malignant"
    assert "OR-merged" in " ".join(dataset_json(out)["semidiff"]["notes"])


def test_isic2018(tmp_path):
    src = tmp_path / "isic"
    for split, n, gt in (("Training", 3, True), ("Validation", 1, True), ("Test", 2, False)):
        for i in range(n):
            c = f"ISIC_{split[:2]}{i:05d}"
            save(rgb(seed=i), src / f"ISIC2018_Task1-2_{split}_Input" / f"{c}.jpg")
            if gt:
                save(blob(), src / f"ISIC2018_Task1_{split}_GroundTruth" / f"{c}_segmentation.png")
        (src / f"ISIC2018_Task1-2_{split}_Input" / "LICENSE.txt").write_text("x", encoding="utf-8")
    out = convert("isic2018", src, tmp_path)
    check(out, 4, n_test=2, n_test_labels=0)
    split = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))[0]
    assert len(split["train"]) == 3 and split["val"] == ["ISIC_Va00000"]


def test_glas(tmp_path):
    src = tmp_path / "src" / "Warwick QU Dataset (Released 2016_07_08)"
    for part, n in (("train", 2), ("testA", 2), ("testB", 1)):
        for i in range(1, n + 1):
            save(rgb(seed=i), src / f"{part}_{i}.bmp")
            inst = np.zeros((16, 20), np.uint8)
            inst[1:5, 1:5] = 1
            inst[8:12, 10:15] = 2 + i  # several gland instance ids
            save(inst, src / f"{part}_{i}_anno.bmp")
    (src / "Grade.csv").write_text("name, grade\n", encoding="utf-8")
    out = convert("glas", tmp_path / "src", tmp_path)
    check(out, 2, n_test=3, labels={"background": 0, "gland": 1})
    assert png_values(out / "labelsTr" / "train_1.png") == {0, 1}
    assert json.loads((out / "test_sets.json").read_text(encoding="utf-8")) == {"testA": ["testA_1", "testA_2"], "testB": ["testB_1"]}


def make_bcss(root: Path) -> Path:
    for i in range(2):
        name = f"TCGA-A1-A0SK-DX1_xmin{i}.png"
        save(rgb(seed=i), root / "rgbs_colorNormalized" / name)
        m = np.full((16, 20), 2, np.uint8)
        m[:3] = 0  # outside ROI
        m[5:9, 5:9] = 1
        m[10:12, 0:3] = 21
        save(m, root / "masks" / name)
    return root


def test_bcss_ignore_label(tmp_path):
    src = make_bcss(tmp_path / "BCSS")
    out = convert("bcss", src, tmp_path)
    ds = check(out, 2)
    assert ds["labels"]["ignore"] == 22 and ds["labels"]["tumor"] == 1 and ds["labels"]["other"] == 21
    assert png_values(out / "labelsTr" / "TCGA-A1-A0SK-DX1_xmin0.png") == {1, 2, 21, 22}
    out2 = convert_dataset("bcss", src, raw_root=tmp_path / "raw2", classes="tumor", num_processes=1)
    check(out2, 2, labels={"background": 0, "tumor": 1, "ignore": 2})
    assert png_values(out2 / "labelsTr" / "TCGA-A1-A0SK-DX1_xmin1.png") == {0, 1, 2}


# ----------------------------------------------------------------------------- video datasets
MOSXAV_PALETTE = [0, 0, 0, 85, 170, 255, 170, 255, 0, 249, 193, 0, 255, 0, 0, 244, 108, 59]


def make_mosxav(root: Path, rgb_masks=False) -> Path:
    base = root / "MOSXAV_Dataset"
    for part, videos, step, maxlab in (("trainval", ("v01", "v02", "v03"), 5, 4), ("test", ("v01",), 1, 5)):
        for v in videos:
            for f in range(0, 6):
                save(np.stack([rgb(seed=f)[..., 0]] * 3, -1), base / part / "JPEGImages" / v / f"{f:05d}.jpg")
                if f % step == 0:
                    m = blob(value=1)
                    m[0:2, 0:3] = maxlab
                    p = base / part / "Annotations_Semantic" / v / f"{f:05d}.png"
                    if rgb_masks:
                        pal = np.array(MOSXAV_PALETTE, np.uint8).reshape(-1, 3)
                        save(pal[m], p)
                    else:
                        p.parent.mkdir(parents=True, exist_ok=True)
                        im = Image.fromarray(m, mode="P")
                        im.putpalette(MOSXAV_PALETTE)
                        im.save(p)
    sets = base / "trainval" / "ImageSets"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("v01\nv02\n", encoding="utf-8")
    (sets / "val.txt").write_text("v03\n", encoding="utf-8")
    (sets / "val_first_mask.json").write_text('{"videos": {}}', encoding="utf-8")
    (base / "test" / "ImageSets").mkdir(parents=True)
    (base / "test" / "ImageSets" / "test.txt").write_text("v01\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("rgb_masks", [False, True], ids=["palette", "rgb"])
def test_mosxav(tmp_path, rgb_masks):
    src = make_mosxav(tmp_path / "mosxav", rgb_masks=rgb_masks)
    out = convert("mosxav", src, tmp_path)
    # trainval: frames 0 and 5 of 3 videos annotated, 4 per video unlabeled; test: all 6 frames
    check(out, 6, n_test=6, n_unlabeled=12, channels=1)
    assert names(out / "imagesUnlabeled")[0] == "v01_00001_0000.png"
    assert png_values(out / "labelsTr" / "v01_00000.png") == {0, 1, 4}
    assert png_values(out / "labelsTs" / "test_v01_00003.png") == {0, 1, 5}
    assert json.loads((out / "splits_final.json").read_text(encoding="utf-8"))[0]["val"] == ["v03_00000", "v03_00005"]


def make_endoscapes(root: Path) -> Path:
    base = root / "endoscapes"
    frames = {"train": ["1_100", "1_125"], "val": ["2_50"], "test": ["3_75"]}
    for split, keys in frames.items():
        for k in keys:
            save(rgb(seed=len(k)), base / f"{split}_seg" / f"{k}.jpg")
            m = blob(value=5)
            m[0:2] = 255  # unlabeled
            m[3, 3] = 7  # the stray value
            m[10:12, 0:4] = 6
            save(np.stack([m] * 3, -1), base / "semseg" / f"{k}.png")
        (base / f"{split}_seg" / "annotation_coco.json").write_text("{}", encoding="utf-8")
    for k in ("1_100", "1_125", "1_150", "1_175", "4_25"):  # 1 fps frames; two of them are Seg50 frames
        save(rgb(seed=3), base / "train" / f"{k}.jpg")
    (base / "seg_label_map.txt").write_text("0 background\n", encoding="utf-8")
    return root


def test_endoscapes2023(tmp_path):
    src = make_endoscapes(tmp_path / "e")
    out = convert("endoscapes2023", src, tmp_path)
    ds = check(out, 3, n_test=1, n_unlabeled=3, channels=3)
    assert ds["labels"]["ignore"] == 7
    assert png_values(out / "labelsTr" / "1_100.png") == {0, 5, 6, 7}
    assert json.loads((out / "splits_final.json").read_text(encoding="utf-8")) == [{"train": ["1_100", "1_125"], "val": ["2_50"]}]
    assert names(out / "imagesUnlabeled") == ["1_150_0000.png", "1_175_0000.png", "4_25_0000.png"]
    out2 = convert_dataset("endoscapes2023", src, raw_root=tmp_path / "raw2", unlabeled="false", num_processes=1)
    assert not (out2 / "imagesUnlabeled").exists()


# ----------------------------------------------------------------------------- 3D datasets
def write_nii(arr_zyx, path: Path, spacing=(1.0, 1.0, 1.0), dtype=None):
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr_zyx if dtype is None else arr_zyx.astype(dtype))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def acdc_label(shape=(4, 8, 9)):
    lab = np.zeros(shape, np.uint8)
    lab[:, 1:3, 1:3] = 1
    lab[:, 4:6, 4:6] = 2
    lab[:, 6:8, 6:8] = 3
    return lab


def make_acdc_nifti(root: Path) -> Path:
    pats = {"training": [known.ACDC_SSL4MIS_TRAIN_PATIENTS[0], known.ACDC_SSL4MIS_VAL_PATIENTS[0],
                         known.ACDC_SSL4MIS_TEST_PATIENTS[0]], "testing": ["patient101"]}
    for folder, plist in pats.items():
        for p in plist:
            d = root / "database" / folder / p
            ed, es = 1, 7 + int(p[-1])  # ES frame numbers vary per patient
            d.mkdir(parents=True)
            (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 70.0\n", encoding="utf-8")
            write_nii(np.zeros((2, 4, 8, 9), np.int16), d / f"{p}_4d.nii.gz")
            for fr in (ed, es):
                write_nii(RNG.integers(0, 300, (4, 8, 9)).astype(np.int16), d / f"{p}_frame{fr:02d}.nii.gz",
                          spacing=(1.5, 1.5, 10.0))
                write_nii(acdc_label(), d / f"{p}_frame{fr:02d}_gt.nii.gz", spacing=(1.5, 1.5, 10.0))
    return root


def test_acdc_nifti(tmp_path):
    import SimpleITK as sitk

    src = make_acdc_nifti(tmp_path / "ACDC")
    out = convert("acdc", src, tmp_path)
    check(out, 4, n_test=4, labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3}, channels=1)
    tr = known.ACDC_SSL4MIS_TRAIN_PATIENTS[0]
    es = 7 + int(tr[-1])
    assert f"{tr}_frame{es:02d}.nii.gz" in names(out / "labelsTr")
    split = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))[0]
    assert split["train"] == sorted([f"{tr}_frame01", f"{tr}_frame{es:02d}"])
    assert all(c.startswith(known.ACDC_SSL4MIS_VAL_PATIENTS[0]) for c in split["val"])
    sets = json.loads((out / "test_sets.json").read_text(encoding="utf-8"))
    assert len(sets["ssl4mis_test"]) == 2 and len(sets["official_test"]) == 2
    img = sitk.ReadImage(str(out / "imagesTr" / f"{tr}_frame01_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((1.5, 1.5, 10.0))
    off = convert_dataset("acdc", src, raw_root=tmp_path / "raw2", split="official", num_processes=1)
    check(off, 6, n_test=2)
    assert not (off / "splits_final.json").exists()


def test_acdc_ssl4mis_h5_with_slices(tmp_path):
    import h5py
    import SimpleITK as sitk

    src = tmp_path / "ACDC"
    data = src / "data"
    (data / "slices").mkdir(parents=True)
    tr, va, te = "patient099", "patient028", "patient011"
    vol_lab = acdc_label()
    for p in (va, te):  # val/test patients as volume files
        for fr in ("01", "02"):
            with h5py.File(data / f"{p}_frame{fr}.h5", "w") as f:
                f["image"] = RNG.random((4, 8, 9)).astype(np.float32)
                f["label"] = vol_lab
    for fr in ("01", "02"):  # the training patient only as slices (out of order on disk)
        for k in (2, 0, 3, 1):
            with h5py.File(data / "slices" / f"{tr}_frame{fr}_slice_{k}.h5", "w") as f:
                f.create_dataset("image", data=np.full((8, 9), k, np.float32), compression="gzip")
                f.create_dataset("label", data=vol_lab[k], compression="gzip")
    for name, ids in (("train", [tr]), ("val", [va]), ("test", [te])):
        (src / f"{name}.list").write_text("".join(f"{p}_frame{fr}\n" for p in ids for fr in ("01", "02")), encoding="utf-8")
    out = convert("acdc", src, tmp_path)
    ds = check(out, 4, n_test=2)
    assert ds["semidiff"]["spacing_assumed"] == [1.0, 1.0, 10.0]
    assert "rebuilt" in " ".join(ds["semidiff"]["notes"])
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"{tr}_frame01_0000.nii.gz")))
    assert img.shape == (4, 8, 9) and [float(img[k, 0, 0]) for k in range(4)] == [0, 1, 2, 3]


def test_acdc_missing_slice(tmp_path):
    import h5py

    data = tmp_path / "ACDC" / "data" / "slices"
    data.mkdir(parents=True)
    for k in (0, 2):
        with h5py.File(data / f"patient099_frame01_slice_{k}.h5", "w") as f:
            f["image"] = np.zeros((4, 4), np.float32)
            f["label"] = np.zeros((4, 4), np.uint8)
    with pytest.raises(SemidiffError, match="not consecutive"):
        convert_dataset("acdc", tmp_path / "ACDC", raw_root=tmp_path / "raw", num_processes=1)


def make_brats(root: Path, cases) -> Path:
    for i, case in enumerate(cases):
        d = root / "MICCAI_BraTS_2019_Data_Training" / ("HGG" if i % 2 == 0 else "LGG") / case
        for mod in ("t1", "t1ce", "t2", "flair"):
            write_nii(RNG.integers(0, 500, (5, 6, 7)).astype(np.int16), d / f"{case}_{mod}.nii.gz")
        seg = np.zeros((5, 6, 7), np.uint8)
        seg[1:4, 1:3, 1:3] = 2
        seg[2, 2, 2] = 1
        seg[2, 1, 1] = 4
        write_nii(seg, d / f"{case}_seg.nii.gz")
    return root


def test_brats2019_ssl_and_regions(tmp_path):
    import SimpleITK as sitk

    cases = ["BraTS19_2013_2_1", known.BRATS19_SSL4MIS_VAL[0], known.BRATS19_SSL4MIS_TEST[0]]
    src = make_brats(tmp_path / "brats", cases)
    out = convert("brats2019", src, tmp_path)
    check(out, 2, n_test=1, labels={"background": 0, "whole_tumor": 1}, channels=1)
    assert json.loads((out / "splits_final.json").read_text(encoding="utf-8")) == [{"train": [cases[0]], "val": [cases[1]]}]
    out2 = convert_dataset("brats2019", src, raw_root=tmp_path / "raw2", setting="regions", num_processes=1)
    ds = check(out2, 2, n_test=1, channels=4)
    assert ds["regions_class_order"] == [1, 2, 3]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / "labelsTr" / f"{cases[0]}.nii.gz")))
    assert seg[2, 2, 2] == 2 and seg[2, 1, 1] == 3 and seg[1, 1, 1] == 1
    assert len(names(out2 / "imagesTr")) == 8


def test_msd_prostate_4d(tmp_path):
    import SimpleITK as sitk

    root = tmp_path / "src" / "Task05_Prostate"
    for i in range(2):
        arr = np.stack([np.full((3, 5, 6), 10, np.float32), np.full((3, 5, 6), 20, np.float32)])  # (c, z, y, x)
        img = sitk.GetImageFromArray(arr, isVector=False)
        img.SetSpacing((0.6, 0.6, 3.6, 1.0))
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(root / "imagesTr" / f"prostate_{i:02d}.nii.gz"))
        lab = np.zeros((3, 5, 6), np.uint8)
        lab[1, 1:3, 1:3] = 1
        lab[1, 3:5, 3:5] = 2
        write_nii(lab, root / "labelsTr" / f"prostate_{i:02d}.nii.gz", spacing=(0.6, 0.6, 3.6))
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"mac fork")
    (root / "imagesTs").mkdir()
    sitk.WriteImage(img, str(root / "imagesTs" / "prostate_09.nii.gz"))
    (root / "dataset.json").write_text('{"modality": {"0": "T2", "1": "ADC"}}', encoding="utf-8")
    out = convert("msd-prostate", tmp_path / "src", tmp_path)
    check(out, 2, n_test=1, n_test_labels=0, labels={"background": 0, "PZ": 1, "TZ": 2}, channels=2)
    t2 = sitk.ReadImage(str(out / "imagesTr" / "prostate_00_0000.nii.gz"))
    adc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "prostate_00_0001.nii.gz")))
    assert sitk.GetArrayFromImage(t2).max() == 10 and adc.max() == 20
    assert t2.GetSpacing() == pytest.approx((0.6, 0.6, 3.6))
    out2 = convert_dataset("msd-prostate", tmp_path / "src", raw_root=tmp_path / "raw2", channels="t2", num_processes=1)
    check(out2, 2, n_test=1, n_test_labels=0, channels=1)


def test_mscmrseg2019(tmp_path):
    import SimpleITK as sitk

    src = tmp_path / "MSCMR"
    for n in (1, 2, 10):
        write_nii(RNG.integers(0, 900, (3, 6, 7)).astype(np.int16), src / "c0t2lge" / f"patient{n}_LGE.nii.gz",
                  spacing=(0.75, 0.75, 5.0))
        write_nii(RNG.integers(0, 900, (3, 6, 7)).astype(np.int16), src / "c0t2lge" / f"patient{n}_C0.nii.gz")
    for n in (1, 2):
        lab = np.zeros((3, 6, 7), np.int16)
        lab[1, 1:3, 1:3] = 200
        lab[1, 3:5, 3:5] = 500
        lab[2, 3:5, 3:5] = 600
        write_nii(lab, src / "lgegt" / f"patient{n}_LGE_manual.nii.gz", spacing=(0.75, 0.75, 5.0))
    out = convert("mscmrseg2019", src, tmp_path)
    check(out, 2, n_test=1, n_test_labels=0, channels=1)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "patient1_LGE.nii.gz")))
    assert lab[1, 1, 1] == 1 and lab[1, 3, 3] == 2 and lab[2, 3, 3] == 3
    assert names(out / "imagesTs") == ["patient10_LGE_0000.nii.gz"]


# ----------------------------------------------------------------------------- CLI
def test_convert_command_of_the_real_cli(tmp_path, monkeypatch, run_cli):
    """``semidiff convert`` as the application the console script runs (in-process: fast)."""
    code, out, err = run_cli("convert", "--list")
    assert code == 0, err
    assert "endoscapes2023" in out and "kvasir-seg" in out
    src = make_generic(tmp_path / "src", n=2)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    code, out, err = run_cli("convert", "generic", src, "--id", "901", "--name", "Cli", "-p", "1",
                             "-o", "channels=gray", "--verify")
    assert code == 0, err
    ds = dataset_json(tmp_path / "raw" / "Dataset901_Cli")
    assert ds["channel_names"] == {"0": "gray"} and ds["name"] == "Cli" and ds["numTraining"] == 2
    code, out, err = run_cli("convert", "generic", src, "--id", "901", "--name", "Cli")
    assert code == 1 and "already exists; pass --overwrite" in err and "Traceback" not in err + out


@pytest.mark.slow
def test_installed_semidiff_convert_in_a_subprocess(tmp_path):
    """The installed ``semidiff`` script converts a dataset in a fresh interpreter, under an ASCII
    locale as on CI (output decoded as UTF-8: the CLI replaces what the locale cannot encode)."""
    exe = Path(sys.executable).parent / "semidiff"
    assert exe.is_file(), f"{exe} is missing; install the package (pip install -e .)"
    src = make_generic(tmp_path / "src", n=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", nnUNet_raw=str(tmp_path / "raw"), SEMIDIFF_HOME=str(tmp_path / "home"))

    def semidiff_convert(*args):
        return subprocess.run([str(exe), "convert", *map(str, args)], env=env, capture_output=True,
                              encoding="utf-8", errors="replace", timeout=300)

    res = semidiff_convert("generic", src, "--id", "903", "--name", "Sub", "-o", "channels=gray", "-p", "1",
                           "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Converted generic" in res.stderr and "3 training cases" in res.stderr
    assert "integrity check passed" in res.stderr
    out = tmp_path / "raw" / "Dataset903_Sub"
    ds = check(out, 3, labels={"background": 0, "foreground": 1}, channels=1)
    assert ds["name"] == "Sub" and ds["channel_names"] == {"0": "gray"}
    assert names(out / "labelsTr") == ["case_0.png", "case_1.png", "case_2.png"]
    lab = np.asarray(Image.open(out / "labelsTr" / "case_2.png"))
    assert (lab == (blob(x=2) > 0)).all()
    img = np.asarray(Image.open(out / "imagesTr" / "case_2_0000.png"))
    assert img.shape == (16, 20) and img.dtype == np.uint8

    res = semidiff_convert("generic", src, "--id", "903", "--name", "Sub")
    assert res.returncode == 1 and "already exists; pass --overwrite" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
