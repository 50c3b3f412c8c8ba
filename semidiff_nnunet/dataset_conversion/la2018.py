"""``la2018``: 2018 Atrial Segmentation Challenge (left atrium, LGE-MRI, binary).

Forms (detected from SOURCE):

* original: ``Training Set/<ID>/{lgemri.nrrd, laendo.nrrd}`` (labels 0/255 -> 0/1, geometry kept,
  0.625 mm isotropic); a ``Testing Set/`` with labels goes to imagesTs.
* UA-MT h5: ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with ``image`` (float32, z-scored) and
  ``label`` (uint8 0/1), axes (x, y, z) as pynrrd reads them. The h5 stores no spacing: the
  original 0.625 mm isotropic spacing is restored (``spacing`` option to change it).

Split (``split=uamt``, default): UA-MT's 80 training ids go to imagesTr, its 20 test ids to
imagesTs/labelsTs; ``train.list``/``test.list`` found in SOURCE (or its parent) take precedence
over the built-in copies. Cases in neither list go to imagesTr (with a note). ``split=none``
puts every case in imagesTr.
"""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet.dataset_conversion import _known_splits as known
from semidiff_nnunet.dataset_conversion.common import (
    ConversionError,
    DatasetWriter,
    as_floats,
    convert_case_3d,
    convert_case_h5_xyz,
    log,
    read_list,
    run_jobs,
)

LA_SPACING = (0.625, 0.625, 0.625)
LABELS = {"background": 0, "left_atrium": 1}


def _lists(source: Path) -> tuple[list[str], list[str], str]:
    for folder in (source, source.parent):
        tr, te = folder / "train.list", folder / "test.list"
        if tr.is_file() and te.is_file():
            return read_list(tr), read_list(te), f"{tr} and {te}"
    return list(known.LA_UAMT_TRAIN), list(known.LA_UAMT_TEST), "UA-MT's published train.list/test.list"


def convert(source: Path, target: Path, *, split: str = "uamt", spacing: str | None = None,
            num_processes: int | None = None) -> dict:
    source = Path(source)
    if split not in ("uamt", "none"):
        raise ConversionError(f"Option split={split!r} must be uamt or none.")
    h5s = sorted(source.rglob("mri_norm2.h5"))
    nrrds = sorted(source.rglob("lgemri.nrrd"))
    if h5s and nrrds:
        raise ConversionError(f"{source} holds both UA-MT h5 files and original nrrd files; give one form's folder.")
    if not h5s and not nrrds:
        raise ConversionError(f"{source} holds neither <ID>/lgemri.nrrd (original LA 2018 download) nor "
                              f"<ID>/mri_norm2.h5 (UA-MT form).")
    w = DatasetWriter(target, ".nii.gz")
    train_ids, test_ids, list_src = _lists(source)
    train_set, test_set = set(train_ids), set(test_ids)
    jobs, unlisted, in_test, challenge_test = [], [], [], []
    form = "UA-MT h5 (mri_norm2.h5)" if h5s else "original nrrd (lgemri.nrrd + laendo.nrrd)"
    log.info("la2018: detected the %s form in %s", form, source)
    spacing_xyz = as_floats(spacing, 3, "spacing") if spacing else LA_SPACING
    for f in h5s or nrrds:
        case = f.parent.name
        official_test = any(p.name.lower() == "testing set" for p in f.parents)
        if split == "uamt" and (case in test_set or official_test):
            dst = "test"
            (challenge_test if official_test and case not in test_set else in_test).append(case)
        else:
            dst = "train"
            if split == "uamt" and case not in train_set:
                unlisted.append(case)
        if h5s:
            jobs.append(("h5", dict(h5=str(f), out_image=str(w.image(dst, case)), out_label=str(w.label(dst, case)),
                                    spacing=spacing_xyz, form="UA-MT")))
        else:
            lab = f.parent / "laendo.nrrd"
            if not lab.is_file():
                if dst == "test":
                    lab = None
                else:
                    raise ConversionError(f"{lab} is missing; expected the LA cavity label next to {f.name}.")
            jobs.append(("nrrd", dict(images=[str(f)], out_images=[str(w.image(dst, case))],
                                      label=str(lab) if lab else None,
                                      out_label=str(w.label(dst, case)) if lab else None,
                                      value_map={255: 1}, allowed=(0, 1))))
    w.make_dirs("train")
    if in_test or challenge_test:
        w.make_dirs("test")
    if h5s:
        run_jobs(convert_case_h5_xyz, [j for _, j in jobs], num_processes=num_processes, description="la2018: converting")
        w.note(f"UA-MT h5 stores no spacing; restored {spacing_xyz[0]} x {spacing_xyz[1]} x {spacing_xyz[2]} mm "
               f"(the challenge's 0.625 mm isotropic){' (from the spacing option)' if spacing else ''}; "
               f"origin and direction are identity.")
    else:
        run_jobs(convert_case_3d, [j for _, j in jobs], num_processes=num_processes, description="la2018: converting")
        w.note("labels 255 -> 1; geometry copied from lgemri.nrrd")
    if split == "uamt":
        w.note(f"split from {list_src}: {len(jobs) - len(in_test) - len(challenge_test)} training, "
               f"{len(in_test)} UA-MT test cases")
        if unlisted:
            w.note(f"{len(unlisted)} case(s) are in neither list and went to imagesTr: {', '.join(unlisted[:5])}")
        w.write_test_sets({"uamt_test": in_test, "challenge_test": challenge_test})
    return w.finish(converter="la2018", channel_names={0: "MRI"}, labels=LABELS, dataset_name="LA2018",
                    source_form=form, reference="Xiong et al., A global benchmark of algorithms for segmenting the "
                                                "left atrium from LGE-MRI, MedIA 2021; UA-MT (Yu et al., MICCAI 2019)",
                    description="2018 Atrial Segmentation Challenge, left atrium cavity",
                    extra={"spacing_assumed": list(spacing_xyz) if h5s else None})
