"""``pancreas-ct``: NIH Pancreas-CT (TCIA; Roth et al. 2015), binary pancreas segmentation in CT.

Forms (detected from SOURCE, and logged):

* TCIA original: DICOM series ``Pancreas-CT/PANCREAS_00XX/<study>/<series>/*.dcm`` (82 contrast CT
  volumes, 512x512, 1.5-2.5 mm slices) and NIfTI labels ``label00XX.nii.gz`` (in
  ``TCIA_pancreas_labels-*/`` or anywhere under SOURCE; found by name). Each series is read with
  SimpleITK's ``ImageSeriesReader`` (GDCM sorts the slices by position) and written as NIfTI with
  its real geometry, in HU.
* MC-Net/CoraNet/BCP h5: ``Pancreas_h5/imageXXXX_norm.h5`` (MC-Net; BCP/CoraNet name them
  ``XXXX.h5``) with ``image`` (windowed to [-125, 275] HU, normalised) and ``label`` (0/1), axes
  (x, y, z), cropped around the pancreas. The h5 stores no spacing. MC-Net's
  ``data/Pancreas/Pre-processing.ipynb`` resamples every volume to 1 mm isotropic before cropping;
  CoraNet/BCP's preprocessing resamples to 1 mm but sets the source z spacing equal to the in-plane
  spacing first, so their z axis is only nominally 1 mm. The written spacing is therefore an
  assumption: 1 x 1 x 1 mm (``spacing`` option to change it), origin and direction identity; the
  intensities stay as stored (already normalised; nnU-Net's CT normalisation is then a harmless
  clip and affine map).

Label orientation (our handling of an unconfirmed fact). How the label NIfTIs' z axis relates to
the DICOM slices is a known trap of this dataset: the SSL papers' preprocessing stacks the slices in
InstanceNumber (MC-Net) or file-name (CoraNet/BCP) order and trusts the label's array order, and we
could not confirm which order, or whether the label headers' geometry, is right for every case.
So the array order is never trusted: the label is first put on the image grid through physical
space (``sitk.Resample`` with the identity transform, nearest neighbour, after checking that the
label's size equals the image's), then checked against the data: the labelled voxels must have a
pancreas-like mean HU (``HU_RANGE``) and lie in the body (at least ``BODY_FRACTION`` of them above
``BODY_HU``). If that fails but the label array flipped along z (with the image's geometry) passes,
the flip is used; if neither passes, the case is an error naming it. The placement used per case
is logged and recorded in ``dataset.json`` (``semidiff.label_placement``).

Cases 25 and 70 are reported as duplicates of another scan. They are kept by default so that the
62 / 20 split the SSL papers report is reproduced exactly; ``keep_duplicates=false`` drops them
(recommended for new work: MC-Net's lists put case 25 in test, so a duplicate may leak between
train and test). The current TCIA collection may not contain them at all (unconfirmed here;
MC-Net's lists and preprocessing log cover 82 cases).

Split (test cases to imagesTs/labelsTs; no validation split is defined, so no splits_final.json):

* ``split=mcnet`` (default): MC-Net's published ``data/Pancreas/{train,test}.list`` (62 train /
  20 test over cases 1-82, the 62/20 that Diff-CL and the MC-Net line of papers report). Those
  lists put case 25 in test and case 70 in train, so with ``keep_duplicates=false`` the split is
  61 / 19.
* ``split=coranet``: CoraNet/BCP's lists (cases 1-63 train, 64-82 test: 63 / 19, or 62 / 18 with
  ``keep_duplicates=false``).
* ``split=none``: every case in imagesTr.

In the h5 form, ``train.list``/``test.list`` (MC-Net) or ``train_lab.txt``+``train_unlab.txt``/
``test.txt`` (BCP) found next to the h5 folder take precedence over the built-in lists. Cases in
no list go to imagesTr (with a note).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from semidiff_nnunet.dataset_conversion.common import (
    ConversionError,
    DatasetWriter,
    as_bool,
    as_floats,
    check_values,
    convert_case_h5_xyz,
    integer_labels,
    log,
    read_list,
    read_volume,
    run_jobs,
    write_volume,
)

LABELS = {"background": 0, "pancreas": 1}
H5_SPACING = (1.0, 1.0, 1.0)
DUPLICATES = (25, 70)
HU_RANGE = (-100.0, 250.0)  # mean HU of the labelled voxels must lie in this range
BODY_HU = -500.0  # voxels above this are body (not air)
BODY_FRACTION = 0.9  # share of labelled voxels that must lie in the body

# ycwu1997/MC-Net data/Pancreas/train.list (62 ids, "imageXXXX" = PANCREAS_XXXX)
MCNET_TRAIN = (57, 18, 62, 31, 20, 17, 32, 79, 61, 64, 70, 19, 48, 76, 41, 52, 49, 71, 72, 34, 10, 15, 77,
               80, 27, 47, 22, 14, 68, 58, 7, 11, 24, 42, 82, 35, 12, 55, 75, 78, 16, 13, 53, 23, 56, 33,
               38, 30, 81, 29, 36, 44, 2, 45, 26, 65, 66, 43, 28, 63, 69, 3)
# ycwu1997/MC-Net data/Pancreas/test.list (20 ids)
MCNET_TEST = (50, 59, 37, 60, 40, 74, 4, 46, 8, 54, 5, 73, 1, 39, 6, 67, 25, 51, 21, 9)
# DeepMed-Lab-ECNU/BCP (CoraNet's lists): train_lab.txt + train_unlab.txt = 1-63, test.txt = 64-82
CORANET_TRAIN = tuple(range(1, 64))
CORANET_TEST = tuple(range(64, 83))

_CASE_DIR_RE = re.compile(r"^PANCREAS_(\d{4})$", re.IGNORECASE)
_LABEL_RE = re.compile(r"^label(\d{4})\.nii(\.gz)?$", re.IGNORECASE)
_H5_RE = re.compile(r"^(?:image)?(\d{4})(?:_norm)?\.h5$", re.IGNORECASE)
_NUM_RE = re.compile(r"(\d+)")


def case_name(num: int) -> str:
    return f"pancreas_{num:04d}"


# ----------------------------------------------------------------------------- DICOM form
def read_dicom_series(case_dir: Path, case: str):
    """The CT series of one ``PANCREAS_XXXX`` folder (the largest series when there are several)."""
    import SimpleITK as sitk

    series = []  # (n_files, folder, series id, files)
    for folder, _dirs, files in os.walk(case_dir):
        if not any(f.lower().endswith(".dcm") for f in files):
            continue
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
            series.append((len(names), folder, sid, names))
    if not series:
        raise ConversionError(f"{case_dir} holds no readable DICOM series; expected <study>/<series>/*.dcm of {case}.")
    series.sort(key=lambda s: (-s[0], s[1], s[2]))
    n, folder, sid, names = series[0]
    if len(series) > 1:
        log.warning("%s: %d DICOM series found; using the largest (%d slices in %s).", case, len(series), n, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ConversionError(f"{folder}: the DICOM series of {case} could not be read "
                              f"({str(e).strip().splitlines()[-1]}).") from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise ConversionError(f"{folder}: the DICOM series of {case} has size {image.GetSize()}; expected a 3D CT volume.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{folder}: the DICOM series of {case} is not single-channel; expected CT.")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if np.array_equal(arr, np.round(arr)) and arr.min() >= -32768 and arr.max() <= 32767:
            image = sitk.Cast(image, sitk.sitkInt16)
    return image


def placement_check(hu: np.ndarray, mask: np.ndarray) -> tuple[bool, float, float]:
    """(passes, mean HU of the labelled voxels, share of them in the body)."""
    n = int(mask.sum())
    if n == 0:
        return False, float("nan"), 0.0
    values = hu[mask].astype(np.float64)
    mean = float(values.mean())
    body = float((values > BODY_HU).mean())
    ok = HU_RANGE[0] <= mean <= HU_RANGE[1] and body >= BODY_FRACTION
    return ok, mean, body


def convert_dicom_case(*, case_dir: str, case: str, out_image: str, label: str | None = None,
                       out_label: str | None = None) -> dict:
    """One DICOM case (job function): image in HU with its geometry, label placed and checked."""
    import SimpleITK as sitk

    image = read_dicom_series(Path(case_dir), case)
    Path(out_image).parent.mkdir(parents=True, exist_ok=True)
    if label is None:
        sitk.WriteImage(image, out_image, useCompression=True)
        return {"case": case, "placement": None}
    lab_path = Path(label)
    lab_img = read_volume(lab_path)
    if lab_img.GetDimension() != 3 or tuple(lab_img.GetSize()) != tuple(image.GetSize()):
        raise ConversionError(f"{lab_path} has size {lab_img.GetSize()} but the CT series of {case} has "
                              f"{image.GetSize()}; expected a label with the image's size.")
    lab_arr = integer_labels(sitk.GetArrayFromImage(lab_img), lab_path)
    check_values(lab_arr, (0, 1), lab_path)
    if not lab_arr.any():
        raise ConversionError(f"{lab_path} is empty; expected the pancreas of {case}.")
    lab_u8 = sitk.GetImageFromArray(lab_arr.astype(np.uint8))
    lab_u8.CopyInformation(lab_img)
    hu = sitk.GetArrayViewFromImage(image)

    candidates = []
    physical = sitk.GetArrayFromImage(sitk.Resample(lab_u8, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    candidates.append(("physical", physical))
    candidates.append(("flip_z", lab_arr[::-1].astype(np.uint8)))
    tried = []
    for name, arr in candidates:
        ok, mean, body = placement_check(hu, arr > 0)
        tried.append(f"{name}: mean {mean:.0f} HU, {body:.0%} in body")
        if ok:
            write_volume(np.ascontiguousarray(arr, dtype=np.uint8), Path(out_label), reference=image)
            sitk.WriteImage(image, out_image, useCompression=True)
            return {"case": case, "placement": name, "mean_hu": round(mean, 1)}
    raise ConversionError(f"{lab_path} does not fit the CT of {case} in physical space nor flipped along z "
                          f"({'; '.join(tried)}); expected the labelled voxels to have a mean in "
                          f"[{HU_RANGE[0]:.0f}, {HU_RANGE[1]:.0f}] HU and lie in the body (> {BODY_HU:.0f} HU).")


def _find_case_dirs(source: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for folder, dirs, _files in os.walk(source):
        dirs.sort()
        keep = []
        for d in dirs:
            if d.startswith("."):
                continue
            m = _CASE_DIR_RE.match(d)
            if m:
                num = int(m.group(1))
                if num in found:
                    raise ConversionError(f"{Path(folder) / d} and {found[num]} are both case {num}; give one copy.")
                found[num] = Path(folder) / d
            else:
                keep.append(d)
        dirs[:] = keep  # do not descend into case folders (thousands of slices)
    return found


def _find_labels(source: Path) -> dict[int, Path]:
    labels: dict[int, Path] = {}
    for p in sorted(source.rglob("label*.nii*")):
        m = _LABEL_RE.match(p.name)
        if m and p.is_file() and not p.name.startswith("."):
            labels.setdefault(int(m.group(1)), p)
    return labels


# ----------------------------------------------------------------------------- h5 form
def _ids(path: Path) -> list[int]:
    out = []
    for item in read_list(path):
        m = _NUM_RE.findall(item)
        if not m:
            raise ConversionError(f"{path} has the entry {item!r}; expected case names like image0001 or 0001.h5.")
        out.append(int(m[-1]))
    return out


def _shipped_lists(folders: list[Path]) -> tuple[list[int], list[int], str] | None:
    for folder in folders:
        tr, te = folder / "train.list", folder / "test.list"
        if tr.is_file() and te.is_file():
            return _ids(tr), _ids(te), f"{tr} and {te}"
        lab, unlab, te = folder / "train_lab.txt", folder / "train_unlab.txt", folder / "test.txt"
        if lab.is_file() and unlab.is_file() and te.is_file():
            return _ids(lab) + _ids(unlab), _ids(te), f"{lab}, {unlab.name} and {te.name}"
    return None


# ----------------------------------------------------------------------------- converter
def convert(source: Path, target: Path, *, split: str = "mcnet", keep_duplicates: bool | str = True,
            spacing: str | None = None, num_processes: int | None = None) -> dict:
    source = Path(source)
    if split not in ("mcnet", "coranet", "none"):
        raise ConversionError(f"Option split={split!r} must be mcnet, coranet or none.")
    keep_dups = as_bool(keep_duplicates, "keep_duplicates")
    case_dirs = _find_case_dirs(source)
    h5s: dict[int, Path] = {}
    for p in sorted(source.rglob("*.h5")):
        m = _H5_RE.match(p.name)
        if m and not p.name.startswith("."):
            h5s.setdefault(int(m.group(1)), p)
    if case_dirs and h5s:
        raise ConversionError(f"{source} holds both PANCREAS_XXXX DICOM folders and h5 files; give one form's folder.")
    if not case_dirs and not h5s:
        raise ConversionError(f"{source} holds neither Pancreas-CT/PANCREAS_XXXX/ DICOM folders (TCIA download) "
                              f"nor Pancreas_h5/imageXXXX_norm.h5 files (MC-Net/BCP form).")
    is_h5 = bool(h5s)
    form = "MC-Net/BCP h5 (Pancreas_h5/imageXXXX_norm.h5)" if is_h5 else "TCIA DICOM + NIfTI labels"
    log.info("pancreas-ct: detected the %s form in %s", form, source)
    w = DatasetWriter(target, ".nii.gz")
    cases = h5s if is_h5 else case_dirs

    dropped = sorted(n for n in cases if n in DUPLICATES and not keep_dups)
    nums = sorted(n for n in cases if n not in dropped)
    if dropped:
        w.note(f"cases {', '.join(case_name(n) for n in dropped)} dropped as reported duplicates "
               f"(the papers' 62/20 split keeps them: keep_duplicates=true)")

    # split
    lists = None
    if is_h5 and split != "none":
        h5_dirs = sorted({p.parent for p in h5s.values()})
        folders = list(dict.fromkeys([*h5_dirs, *(d.parent for d in h5_dirs), source, source.parent]))
        lists = _shipped_lists(folders)
    if split == "none":
        train_ids, test_ids, list_src = set(nums), set(), "no split (split=none)"
    elif lists is not None:
        train_ids, test_ids, list_src = set(lists[0]), set(lists[1]), lists[2]
    elif split == "mcnet":
        train_ids, test_ids = set(MCNET_TRAIN), set(MCNET_TEST)
        list_src = "MC-Net's published data/Pancreas/train.list and test.list (built in)"
    else:
        train_ids, test_ids = set(CORANET_TRAIN), set(CORANET_TEST)
        list_src = "CoraNet/BCP's published lists (cases 1-63 train, 64-82 test; built in)"
    both = sorted(train_ids & test_ids)
    if both:
        raise ConversionError(f"Cases {both[:5]} are in both the training and the test list ({list_src}).")

    labels = {} if is_h5 else _find_labels(source)
    groups: dict[str, list[str]] = {"train": [], "test": []}
    unlisted, jobs = [], []
    spacing_xyz = as_floats(spacing, 3, "spacing") if spacing else H5_SPACING
    for n in nums:
        case = case_name(n)
        dst = "test" if n in test_ids else "train"
        if split != "none" and n not in train_ids and n not in test_ids:
            unlisted.append(case)
        groups[dst].append(case)
        if is_h5:
            jobs.append(dict(h5=str(h5s[n]), out_image=str(w.image(dst, case)), out_label=str(w.label(dst, case)),
                             spacing=spacing_xyz, form="MC-Net/BCP"))
            continue
        lab = labels.get(n)
        if lab is None and dst == "train":
            raise ConversionError(f"label{n:04d}.nii.gz is missing under {source}; expected the pancreas label of "
                                  f"PANCREAS_{n:04d} (TCIA_pancreas_labels-*/label{n:04d}.nii.gz).")
        jobs.append(dict(case_dir=str(case_dirs[n]), case=case, out_image=str(w.image(dst, case)),
                         label=str(lab) if lab else None, out_label=str(w.label(dst, case)) if lab else None))
    if not is_h5:
        orphans = sorted(set(labels) - set(case_dirs))
        if orphans:
            w.note(f"{len(orphans)} label file(s) without a DICOM case were ignored: "
                   f"{', '.join(labels[n].name for n in orphans[:5])}")
    w.make_dirs("train")
    if groups["test"]:
        w.make_dirs("test")
    log.info("pancreas-ct: %d cases (%d train, %d test)", len(nums), len(groups["train"]), len(groups["test"]))
    fn = convert_case_h5_xyz if is_h5 else convert_dicom_case
    results = run_jobs(fn, jobs, num_processes=num_processes, description="pancreas-ct: converting")

    placed = [] if is_h5 else [r for r in results if r["placement"]]
    placement = {r["case"]: r["placement"] for r in placed}
    for r in placed:
        log.info("pancreas-ct: %s: label placed by %s (mean %.0f HU)", r["case"], r["placement"], r["mean_hu"])
    if is_h5:
        w.note(f"the h5 form stores no spacing; ASSUMED {spacing_xyz[0]} x {spacing_xyz[1]} x {spacing_xyz[2]} mm"
               f"{' (from the spacing option)' if spacing else ' (MC-Net resamples to 1 mm isotropic)'}; origin and "
               f"direction are identity; intensities kept as stored (windowed [-125, 275] HU and normalised)")
    else:
        flipped = sorted(c for c, p in placement.items() if p == "flip_z")
        w.note("images in HU with the DICOM geometry; labels put on the image grid through physical space and "
               "checked against the HU (pancreas-like mean, inside the body)")
        if flipped:
            w.note(f"{len(flipped)} label(s) failed the physical-space check and were used flipped along z: "
                   f"{', '.join(flipped)}")
    if split != "none":
        w.note(f"split from {list_src}: {len(groups['train'])} train, {len(groups['test'])} test")
        if unlisted:
            w.note(f"{len(unlisted)} case(s) are in neither list and went to imagesTr: {', '.join(unlisted[:5])}")
        w.write_test_sets({f"{'shipped' if lists else split}_test": groups["test"]})
    split_assumed = None
    if split != "none" and lists is None:
        split_assumed = (f"built-in copy of {'MC-Net' if split == 'mcnet' else 'CoraNet/BCP'}'s published lists "
                         "applied to the TCIA case numbers (MC-Net's preprocessing names its files by the "
                         "PANCREAS_XXXX number); that the papers reporting 62/20 used exactly these lists is "
                         "not confirmed")
        w.note(f"split ASSUMPTION: {split_assumed}")
    return w.finish(converter="pancreas-ct", channel_names={0: "CT"}, labels=LABELS, dataset_name="PancreasCT",
                    source_form=form,
                    reference="Roth et al., DeepOrgan, MICCAI 2015 (NIH Pancreas-CT, TCIA); MC-Net (Wu et al., "
                              "MICCAI 2021) for the h5 form and split",
                    description="NIH Pancreas-CT, pancreas segmentation in contrast-enhanced abdominal CT",
                    extra={"split": split, "split_source": list_src, "split_assumed": split_assumed,
                           "dropped_duplicates": [case_name(n) for n in dropped],
                           "label_placement": placement or None,
                           "spacing_assumed": list(spacing_xyz) if is_h5 else None})
