"""``acdc``: ACDC cine-MRI (RV, myocardium, LV), in either common form.

* NIfTI download: ``training/patientXXX/`` and ``testing/patientXXX/`` with ``Info.cfg`` (ED, ES),
  ``patientXXX_frameYY.nii.gz`` and ``patientXXX_frameYY_gt.nii.gz`` (frame numbers differ per
  patient: the ED and ES frames of ``Info.cfg`` are used). Geometry is kept.
* SSL4MIS h5: ``data/patientXXX_frameYY.h5`` volumes (``image`` (Z,H,W) float32 min-max
  normalised, ``label`` uint8 0-3) and/or ``data/slices/patientXXX_frameYY_slice_N.h5`` (also
  directly in ``data/``); patients that exist only as slices are rebuilt by stacking the slices
  in order of N. The h5 has no spacing: ``spacing`` (x,y,z, default 1,1,10 as in DiffRect's test
  script) is written and stated in ``dataset.json``.

Split ``split=ssl4mis`` (default): SSL4MIS's 70/10/20 patients: train+val to imagesTr with
``splits_final.json``, test to imagesTs/labelsTs (lists in SOURCE take precedence over the
built-in copies); patients of the official ``testing/`` folder go to imagesTs as well
(``test_sets.json``). ``split=official``: ``training/`` to imagesTr, ``testing/`` to imagesTs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from semidiff_nnunet.dataset_conversion import _known_splits as known
from semidiff_nnunet.dataset_conversion.common import (
    ConversionError,
    DatasetWriter,
    as_floats,
    check_values,
    convert_case_3d,
    log,
    read_h5_volume,
    read_list,
    run_jobs,
    write_volume,
)

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
H5_SPACING = (1.0, 1.0, 10.0)
_VOL_RE = re.compile(r"^(patient\d{3})_frame(\d{2})$")
_SLICE_RE = re.compile(r"^(patient\d{3})_frame(\d{2})_slice_(\d+)$")


def read_info_cfg(path: Path) -> dict[str, str]:
    info = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def _patient_of(case: str) -> str:
    return case[: len("patient000")]


def convert_h5_case(*, files: list[str], out_image: str, out_label: str | None, spacing) -> list[int]:
    """One volume from a volume h5 (one file) or from its slice files (in slice order)."""
    images, labels = [], []
    for f in files:
        img, lab = read_h5_volume(f, "SSL4MIS", dims=None)
        if img.shape != lab.shape:
            raise ConversionError(f"{f}: image {img.shape} and label {lab.shape} differ in shape.")
        images.append(img)
        labels.append(lab)
    if len(files) == 1 and images[0].ndim == 3:
        image, label = images[0], labels[0]
    else:
        if any(i.ndim != 2 for i in images) or len({i.shape for i in images}) != 1:
            raise ConversionError(f"{files[0]}: slice files of one volume must be 2D and equally sized.")
        image, label = np.stack(images), np.stack(labels)
    check_values(label, LABELS.values(), files[0])
    write_volume(image, Path(out_image), spacing_xyz=spacing)
    if out_label:
        write_volume(label.astype(np.uint8), Path(out_label), spacing_xyz=spacing)
    return sorted(np.unique(label).tolist())


def _lists(source: Path):
    for folder in (source, source.parent, source / "ACDC"):
        files = [folder / f"{n}.list" for n in ("train", "val", "test")]
        if all(f.is_file() for f in files):
            tr, va, te = (read_list(f) for f in files)
            return ({_patient_of(c) for c in tr}, {_patient_of(c) for c in va}, {_patient_of(c) for c in te},
                    f"{files[0].parent}/{{train,val,test}}.list")
    return (set(known.ACDC_SSL4MIS_TRAIN_PATIENTS), set(known.ACDC_SSL4MIS_VAL_PATIENTS),
            set(known.ACDC_SSL4MIS_TEST_PATIENTS), "SSL4MIS's published lists")


def _find_nifti_root(source: Path) -> Path | None:
    for cand in (source, source / "database", source / "ACDC", source / "ACDC" / "database"):
        if (cand / "training").is_dir() and any((cand / "training").glob("patient*")):
            return cand
    return None


def _find_h5_data(source: Path) -> Path | None:
    for cand in (source / "data", source, source / "ACDC" / "data"):
        if cand.is_dir() and (any(cand.glob("patient*.h5")) or any((cand / "slices").glob("patient*.h5"))):
            return cand
    return None


def convert(source: Path, target: Path, *, split: str = "ssl4mis", spacing: str | None = None,
            num_processes: int | None = None) -> dict:
    source = Path(source)
    if split not in ("ssl4mis", "official"):
        raise ConversionError(f"Option split={split!r} must be ssl4mis or official.")
    nifti_root = _find_nifti_root(source)
    h5_root = None if nifti_root else _find_h5_data(source)
    if nifti_root is None and h5_root is None:
        raise ConversionError(f"{source} is neither the ACDC NIfTI download (training/patientXXX/) nor the SSL4MIS h5 "
                              f"form (data/patientXXX_frameYY.h5 or data/slices/*_slice_N.h5).")
    tr_p, va_p, te_p, list_src = _lists(source)
    w = DatasetWriter(target, ".nii.gz")
    w.make_dirs("train")
    cases: dict[str, list[str]] = {"train": [], "val": [], "test": [], "official_test": []}

    def route(patient: str, official_test: bool) -> str:
        if official_test:
            return "official_test"
        if split == "official":
            return "train"
        if patient in te_p:
            return "test"
        if patient in va_p:
            return "val"
        if patient not in tr_p:
            w.note(f"{patient} is in none of the lists; it went to the training cases")
        return "train"

    jobs = []
    if nifti_root is not None:
        form = "NIfTI download (training/, testing/)"
        for folder_name in ("training", "testing"):
            folder = nifti_root / folder_name
            if not folder.is_dir():
                continue
            for pdir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("patient")):
                info_path = pdir / "Info.cfg"
                if not info_path.is_file():
                    raise ConversionError(f"{info_path} is missing; expected ED/ES frame numbers of {pdir.name}.")
                info = read_info_cfg(info_path)
                try:
                    frames = sorted({int(info["ED"]), int(info["ES"])})
                except (KeyError, ValueError):
                    raise ConversionError(f"{info_path} lacks integer ED and ES entries.") from None
                group = route(pdir.name, folder_name == "testing")
                dst = "train" if group in ("train", "val") else "test"
                for fr in frames:
                    case = f"{pdir.name}_frame{fr:02d}"
                    img = pdir / f"{case}.nii.gz"
                    gt = pdir / f"{case}_gt.nii.gz"
                    if not img.is_file():
                        raise ConversionError(f"{img} is missing; Info.cfg names frame {fr} of {pdir.name}.")
                    if not gt.is_file():
                        if dst == "train":
                            raise ConversionError(f"{gt} is missing; expected the ground truth of {case}.")
                        gt = None
                    cases[group].append(case)
                    jobs.append(dict(images=[str(img)], out_images=[str(w.image(dst, case))],
                                     label=str(gt) if gt else None, out_label=str(w.label(dst, case)) if gt else None,
                                     allowed=LABELS.values()))
        fn = convert_case_3d
    else:
        form = "SSL4MIS h5"
        spacing_xyz = as_floats(spacing, 3, "spacing") if spacing else H5_SPACING
        volumes = {}
        for f in sorted(h5_root.glob("patient*.h5")):
            m = _VOL_RE.match(f.stem)
            if m:
                volumes[f.stem] = [f]
        slices: dict[str, list[tuple[int, Path]]] = {}
        for folder in (h5_root / "slices", h5_root):
            for f in sorted(folder.glob("patient*_slice_*.h5")) if folder.is_dir() else []:
                m = _SLICE_RE.match(f.stem)
                if m:
                    slices.setdefault(f"{m.group(1)}_frame{m.group(2)}", []).append((int(m.group(3)), f))
        rebuilt = 0
        for case, items in slices.items():
            if case in volumes:
                continue
            items.sort()
            idx = [i for i, _ in items]
            if idx != list(range(idx[0], idx[0] + len(idx))):
                raise ConversionError(f"Slices of {case} are not consecutive ({idx[:8]}...); a slice file is missing.")
            volumes[case] = [p for _, p in items]
            rebuilt += 1
        if rebuilt:
            w.note(f"{rebuilt} volume(s) rebuilt from their slice files")
        for case in sorted(volumes):
            group = route(_patient_of(case), False)
            dst = "train" if group in ("train", "val") else "test"
            cases[group].append(case)
            jobs.append(dict(files=[str(p) for p in volumes[case]], out_image=str(w.image(dst, case)),
                             out_label=str(w.label(dst, case)), spacing=spacing_xyz))
        w.note(f"SSL4MIS h5 stores no spacing; assumed {spacing_xyz} mm (x, y, z); images are the h5's min-max "
               f"normalised intensities")
        fn = convert_h5_case
    log.info("acdc: detected the %s form", form)
    if cases["test"] or cases["official_test"]:
        w.make_dirs("test")
    run_jobs(fn, jobs, num_processes=num_processes, description="acdc: converting")
    if split == "ssl4mis":
        w.write_splits(cases["train"], cases["val"])
        w.write_test_sets({"ssl4mis_test": cases["test"], "official_test": cases["official_test"]})
        w.note(f"split from {list_src}")
    return w.finish(converter="acdc", channel_names={0: "cineMRI"}, labels=LABELS, dataset_name="ACDC",
                    source_form=form, reference="Bernard et al., IEEE TMI 2018 (ACDC); SSL4MIS (Luo et al.)",
                    description="ACDC cardiac cine-MRI, ED and ES frames",
                    extra={"spacing_assumed": list(spacing_xyz) if h5_root is not None else None})
