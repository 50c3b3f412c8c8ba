"""2D natural-image datasets: ``busi``, ``isic2018``, ``glas``, ``bcss``.

* BUSI: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/"benign (N).png"`` with
  ``"benign (N)_mask.png"`` and, for several lesions, ``_mask_1.png``, ``_mask_2.png`` (OR-merged).
  Normal cases keep their empty masks. Cases are named ``benign_001`` and so on; the class of
  every case is in ``busi_classes.json``. Ultrasound images are written grayscale
  (``channels=rgb`` keeps three channels).
* ISIC 2018 Task 1: ``ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_XXXXXXX.jpg`` and
  ``ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_XXXXXXX_segmentation.png``. Training
  and Validation go to imagesTr with ``splits_final.json`` (official train/val); Test to
  imagesTs (labelsTs when its ground truth is present).
* GlaS: ``Warwick_QU_Dataset`` (or ``Warwick QU Dataset (Released 2016_07_08)``), flat
  ``train_N.bmp``/``testA_N.bmp``/``testB_N.bmp`` with ``*_anno.bmp`` instance maps, binarised
  (> 0). Train to imagesTr, testA/testB to imagesTs/labelsTs (``test_sets.json``).
* BCSS: ``rgbs_colorNormalized/TCGA-*.png`` and ``masks/TCGA-*.png``; value 0 (outside ROI) is a
  don't-care region and becomes nnU-Net's ignore label. ``classes=all`` (default) keeps the 21
  classes 1..21 (label 0 "background" is declared but does not occur), ``classes=tumor`` is
  binary tumour (1) vs. other tissue.
"""

from __future__ import annotations

import re
from pathlib import Path

from semidiff_nnunet.dataset_conversion.common import (
    RGB_CHANNELS,
    ConversionError,
    DatasetWriter,
    convert_case_2d,
    find_dir,
    list_files,
    log,
    run_jobs,
    save_json,
    strip_ext,
)

# ----------------------------------------------------------------------------- BUSI
BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_RE = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?$", re.IGNORECASE)


def convert_busi(source: Path, target: Path, *, channels: str = "gray", num_processes: int | None = None) -> dict:
    source = Path(source)
    root = None
    for cand in (source, source / "Dataset_BUSI_with_GT"):
        if all((cand / c).is_dir() for c in BUSI_CLASSES):
            root = cand
    if root is None:
        found = find_dir(source, "Dataset_BUSI_with_GT", max_depth=2)
        if found is not None and (found / "benign").is_dir():
            root = found
    if root is None:
        raise ConversionError(f"{source} holds no Dataset_BUSI_with_GT/{{benign,malignant,normal}} folders; expected "
                              f"the BUSI download.")
    if channels not in ("gray", "rgb"):
        raise ConversionError(f"Option channels={channels!r} must be gray or rgb.")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    jobs, classes = [], {}
    for cls in BUSI_CLASSES:
        folder = root / cls
        if not folder.is_dir():
            log.warning("busi: %s is missing; no %s cases.", folder, cls)
            continue
        images, masks = {}, {}
        for p in list_files(folder, (".png",)):
            m = _BUSI_RE.match(strip_ext(p.name))
            if m is None:
                raise ConversionError(f"{p} does not follow BUSI's naming '{cls} (N).png' / '{cls} (N)_mask.png'.")
            n = int(m.group(2))
            (masks.setdefault(n, []) if m.group(3) else images.setdefault(n, [])).append(p)
        for n in sorted(images):
            img = images[n][0]
            if n not in masks:
                raise ConversionError(f"{folder / f'{cls} ({n})_mask.png'} is missing; expected the mask of {img.name}.")
            case = f"{cls}_{n:03d}"
            classes[case] = cls
            jobs.append(dict(image=str(img), out_image=str(w.image("train", case)),
                             masks=[str(m) for m in sorted(masks[n])], out_label=str(w.label("train", case)),
                             channels=channels, mode="nonzero", allowed=(0, 1)))
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ConversionError(f"{masks[orphans[0]][0]} has no image '{cls} ({orphans[0]}).png'.")
    multi = sum(1 for j in jobs if len(j["masks"]) > 1)
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="busi: converting")
    save_json(classes, w.root / "busi_classes.json")
    if multi:
        w.note(f"{multi} case(s) have several lesion masks (_mask_N), OR-merged")
    return w.finish(converter="busi", channel_names=RGB_CHANNELS if channels == "rgb" else {0: "ultrasound"},
                    labels={"background": 0, "lesion": 1}, dataset_name="BUSI", source_form="Dataset_BUSI_with_GT",
                    reference="Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 2020",
                    description="Breast ultrasound lesions (benign, malignant; normal cases with empty masks)")


# ----------------------------------------------------------------------------- ISIC 2018
def _isic_dir(source: Path, kind: str, split: str) -> Path | None:
    names = {"input": [f"ISIC2018_Task1-2_{split}_Input"], "gt": [f"ISIC2018_Task1_{split}_GroundTruth"]}[kind]
    for n in names:
        d = find_dir(source, n, max_depth=2)
        if d is not None:
            return d
    return None


def convert_isic2018(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    source = Path(source)
    w = DatasetWriter(target, ".png")
    jobs, per_split = [], {}
    for split in ("Training", "Validation", "Test"):
        inp, gt = _isic_dir(source, "input", split), _isic_dir(source, "gt", split)
        if inp is None:
            if split == "Training":
                raise ConversionError(f"{source} holds no ISIC2018_Task1-2_Training_Input folder; expected the ISIC "
                                      f"2018 Task 1 download.")
            continue
        if split != "Test" and gt is None:
            raise ConversionError(f"{source} holds {inp.name} but no ISIC2018_Task1_{split}_GroundTruth folder.")
        dst = "test" if split == "Test" else "train"
        for img in list_files(inp, (".jpg", ".jpeg", ".png")):
            case = strip_ext(img.name)
            mask = gt / f"{case}_segmentation.png" if gt is not None else None
            if mask is not None and not mask.is_file():
                raise ConversionError(f"{mask} is missing; expected the lesion mask of {img.name}.")
            per_split.setdefault(split, []).append(case)
            jobs.append(dict(image=str(img), out_image=str(w.image(dst, case)),
                             masks=[str(mask)] if mask else [], out_label=str(w.label(dst, case)) if mask else None,
                             channels="rgb", mode="binary", allowed=(0, 1)))
    w.make_dirs("train")
    if "Test" in per_split:
        w.make_dirs("test")
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="isic2018: converting")
    if "Validation" in per_split:
        w.write_splits(per_split["Training"], per_split["Validation"])
        w.note("splits_final.json: official Training vs. Validation")
    form = "ISIC 2018 Task 1 (" + ", ".join(f"{k} {len(v)}" for k, v in per_split.items()) + ")"
    return w.finish(converter="isic2018", channel_names=RGB_CHANNELS, labels={"background": 0, "lesion": 1},
                    dataset_name="ISIC2018", source_form=form,
                    reference="Codella et al. 2019 (ISIC 2018); Tschandl et al. 2018 (HAM10000)",
                    description="ISIC 2018 Task 1 lesion boundary segmentation")


# ----------------------------------------------------------------------------- GlaS
_GLAS_RE = re.compile(r"^(train|testA|testB)_(\d+)$")


def convert_glas(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    source = Path(source)
    root = None
    for cand in [source] + sorted(p for p in source.iterdir() if p.is_dir()):
        if list(cand.glob("train_*_anno.bmp")):
            root = cand
            break
    if root is None:
        raise ConversionError(f"{source} holds no train_N.bmp / train_N_anno.bmp files; expected the GlaS "
                              f"Warwick_QU_Dataset folder.")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train", "test")
    jobs, sets = [], {}
    for img in list_files(root, (".bmp",)):
        stem = strip_ext(img.name)
        if stem.endswith("_anno"):
            continue
        m = _GLAS_RE.match(stem)
        if m is None:
            continue
        anno = root / f"{stem}_anno.bmp"
        if not anno.is_file():
            raise ConversionError(f"{anno} is missing; expected the gland annotation of {img.name}.")
        dst = "train" if m.group(1) == "train" else "test"
        if dst == "test":
            sets.setdefault(m.group(1), []).append(stem)
        jobs.append(dict(image=str(img), out_image=str(w.image(dst, stem)), masks=[str(anno)],
                         out_label=str(w.label(dst, stem)), channels="rgb", mode="nonzero", allowed=(0, 1)))
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="glas: converting")
    w.write_test_sets(sets)
    w.note("gland instance ids binarised (> 0 -> 1)")
    return w.finish(converter="glas", channel_names=RGB_CHANNELS, labels={"background": 0, "gland": 1},
                    dataset_name="GlaS", source_form="Warwick QU (GlaS 2015) BMP",
                    reference="Sirinukunwattana et al., Gland segmentation in colon histology images, MedIA 2017",
                    description="GlaS colon histology glands (binary)")


# ----------------------------------------------------------------------------- BCSS
BCSS_CLASSES = (
    "tumor", "stroma", "lymphocytic_infiltrate", "necrosis_or_debris", "glandular_secretions", "blood", "exclude",
    "metaplasia_NOS", "fat", "plasma_cells", "other_immune_infiltrate", "mucoid_material", "normal_acinus_or_duct",
    "lymphatics", "undetermined", "nerve", "skin_adnexa", "blood_vessel", "angioinvasion", "dcis", "other",
)


def convert_bcss(source: Path, target: Path, *, classes: str = "all", num_processes: int | None = None) -> dict:
    source = Path(source)
    img_d = find_dir(source, "rgbs_colorNormalized", max_depth=2)
    msk_d = find_dir(source, "masks", max_depth=2)
    if img_d is None or msk_d is None:
        raise ConversionError(f"{source} needs rgbs_colorNormalized/ and masks/ folders (the BCSS download).")
    if classes == "all":
        labels = {"background": 0, **{c: i + 1 for i, c in enumerate(BCSS_CLASSES)}, "ignore": 22}
        vmap = {0: 22}
    elif classes == "tumor":
        labels = {"background": 0, "tumor": 1, "ignore": 2}
        vmap = {0: 2, 1: 1, **{v: 0 for v in range(2, 22)}}
    else:
        raise ConversionError(f"Option classes={classes!r} must be all or tumor.")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    jobs = []
    for img in list_files(img_d, (".png",)):
        mask = msk_d / img.name
        if not mask.is_file():
            raise ConversionError(f"{mask} is missing; expected the mask of {img.name} (same file name).")
        case = strip_ext(img.name)
        jobs.append(dict(image=str(img), out_image=str(w.image("train", case)), masks=[str(mask)],
                         out_label=str(w.label("train", case)), channels="rgb", mode="values", value_map=vmap,
                         strict_map=(classes == "tumor"), allowed=sorted(labels.values())))
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="bcss: converting")
    w.note("mask value 0 (outside_roi) -> ignore label " + str(labels["ignore"]))
    if classes == "all":
        w.note("label 0 'background' is declared for nnU-Net but BCSS has no such class; it does not occur")
    return w.finish(converter="bcss", channel_names=RGB_CHANNELS, labels=labels, dataset_name="BCSS",
                    source_form="BCSS (rgbs_colorNormalized + masks)",
                    reference="Amgad et al., Structured crowdsourcing enables convolutional segmentation of "
                              "histology images, Bioinformatics 2019",
                    description=f"BCSS breast cancer semantic segmentation ({classes} classes), whole ROIs")
