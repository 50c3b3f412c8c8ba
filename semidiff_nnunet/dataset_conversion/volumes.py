"""3D NIfTI datasets: ``brats2019``, ``msd-prostate``, ``mscmrseg2019``.

BraTS 2019: ``MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/BraTS19_*/BraTS19_*_{t1,t1ce,t2,flair,seg}.nii.gz``.
``setting=ssl`` (default; the SSL4MIS setting): FLAIR only, whole tumour (seg > 0 -> 1).
``setting=regions``: the four modalities (T1, T1ce, T2, FLAIR) and the challenge's regions (whole
tumour, tumour core, enhancing tumour; labels 1/2/4 mapped to nnU-Net's 2/1/3 as in nnU-Net's
own BraTS conversion). Split (``split=ssl4mis``): SSL4MIS's val (25) and test (60) lists, the
other cases (250) train; test to imagesTs/labelsTs, train/val with ``splits_final.json``.

MSD Task05 Prostate: ``Task05_Prostate/{imagesTr,labelsTr,imagesTs}`` with 4D (T2, ADC) images
split into ``_0000`` (T2) and ``_0001`` (ADC); ``channels=t2`` keeps T2 only (DiffRect's 1-channel
setting, whose modality is unverified). Labels 0 background, 1 PZ, 2 TZ.

MS-CMRSeg 2019: ``patientN_{C0,T2,LGE}.nii.gz`` and ``patientN_{...}_manual.nii.gz`` anywhere under
SOURCE (``sequence=LGE`` by default). Raw label values 200/500/600 are mapped to 1 LV myocardium,
2 LV blood pool, 3 RV blood pool (MyoPS/MS-CMRSeg convention; check on your copy). Images without
a manual label go to imagesTs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from semidiff_nnunet.dataset_conversion import _known_splits as known
from semidiff_nnunet.dataset_conversion.common import (
    ConversionError,
    DatasetWriter,
    check_values,
    convert_case_3d,
    find_dir,
    label_volume_like,
    list_files,
    log,
    read_volume,
    run_jobs,
    write_volume,
)

# ----------------------------------------------------------------------------- BraTS 2019
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")


def convert_brats_case(*, case_dir: str, case: str, out_images: list[str], out_label: str | None,
                       modalities: list[str], setting: str) -> list[int]:
    import SimpleITK as sitk

    from semidiff_nnunet.dataset_conversion.common import copy_volume_image

    d = Path(case_dir)

    def find(mod: str) -> Path:
        for ext in (".nii.gz", ".nii"):
            p = d / f"{case}_{mod}{ext}"
            if p.is_file():
                return p
        raise ConversionError(f"{d / (case + '_' + mod + '.nii.gz')} is missing; expected the {mod} volume of {case}.")

    for mod, dst in zip(modalities, out_images):
        copy_volume_image(find(mod), Path(dst))
    if out_label is None:
        return []
    seg_path = find("seg")
    seg_img = read_volume(seg_path)
    ref = label_volume_like(seg_img, read_volume(find(modalities[0])), seg_path, Path(out_images[0]))
    seg = sitk.GetArrayFromImage(seg_img).astype(np.int32)
    check_values(seg, (0, 1, 2, 4), seg_path)
    if setting == "ssl":
        new = (seg > 0).astype(np.uint8)
    else:
        new = np.zeros_like(seg, dtype=np.uint8)
        new[seg == 2] = 1
        new[seg == 1] = 2
        new[seg == 4] = 3
    write_volume(new, Path(out_label), reference=ref)
    return sorted(np.unique(new).tolist())


def convert_brats2019(source: Path, target: Path, *, setting: str = "ssl", split: str = "ssl4mis",
                      num_processes: int | None = None) -> dict:
    source = Path(source)
    if setting not in ("ssl", "regions"):
        raise ConversionError(f"Option setting={setting!r} must be ssl or regions.")
    if split not in ("ssl4mis", "none"):
        raise ConversionError(f"Option split={split!r} must be ssl4mis or none.")
    case_dirs = sorted({p.parent for p in source.rglob("BraTS19_*_flair.nii*")}, key=lambda p: p.name)
    if not case_dirs:
        raise ConversionError(f"{source} holds no BraTS19_*/BraTS19_*_flair.nii.gz files; expected "
                              f"MICCAI_BraTS_2019_Data_Training/{{HGG,LGG}}/.")
    modalities = ["flair"] if setting == "ssl" else list(BRATS_MODALITIES)
    w = DatasetWriter(target, ".nii.gz")
    w.make_dirs("train")
    val_ids, test_ids = set(known.BRATS19_SSL4MIS_VAL), set(known.BRATS19_SSL4MIS_TEST)
    jobs, groups = [], {"train": [], "val": [], "test": []}
    for d in case_dirs:
        case = d.name
        group = "train"
        if split == "ssl4mis":
            group = "test" if case in test_ids else "val" if case in val_ids else "train"
        dst = "test" if group == "test" else "train"
        groups[group].append(case)
        has_seg = any((d / f"{case}_seg{e}").is_file() for e in (".nii.gz", ".nii"))
        if not has_seg and dst == "train":
            raise ConversionError(f"{d / (case + '_seg.nii.gz')} is missing; expected the segmentation of {case}.")
        jobs.append(dict(case_dir=str(d), case=case,
                         out_images=[str(w.image(dst, case, i)) for i in range(len(modalities))],
                         out_label=str(w.label(dst, case)) if has_seg else None, modalities=modalities,
                         setting=setting))
    if groups["test"]:
        w.make_dirs("test")
    run_jobs(convert_brats_case, jobs, num_processes=num_processes, description="brats2019: converting")
    if split == "ssl4mis":
        w.write_splits(groups["train"], groups["val"])
        w.note(f"SSL4MIS split: {len(groups['train'])} train, {len(groups['val'])} val, {len(groups['test'])} test")
    if setting == "ssl":
        channel_names = {0: "FLAIR"}
        labels = {"background": 0, "whole_tumor": 1}
        regions = None
        w.note("SSL setting: FLAIR only, whole tumour (seg > 0); SSL4MIS's crop and normalisation are left to nnU-Net")
    else:
        channel_names = {0: "T1", 1: "T1ce", 2: "T2", 3: "FLAIR"}
        labels = {"background": 0, "whole_tumor": (1, 2, 3), "tumor_core": (2, 3), "enhancing_tumor": (3,)}
        regions = (1, 2, 3)
        w.note("seg 2 (edema) -> 1, 1 (necrosis/non-enhancing) -> 2, 4 (enhancing) -> 3; regions WT, TC, ET")
    return w.finish(converter="brats2019", channel_names=channel_names, labels=labels, dataset_name="BraTS2019",
                    source_form=f"MICCAI_BraTS_2019_Data_Training ({setting} setting)", regions_class_order=regions,
                    reference="Menze et al. TMI 2015; Bakas et al. 2017/2018 (BraTS)",
                    description="BraTS 2019 glioma segmentation")


# ----------------------------------------------------------------------------- MSD prostate
def split_4d_case(*, image: str, out_images: list[str], keep: list[int], label: str | None = None,
                  out_label: str | None = None) -> list[int]:
    import SimpleITK as sitk

    img = read_volume(Path(image))
    if img.GetDimension() != 4:
        raise ConversionError(f"{image} is {img.GetDimension()}D; expected a 4D (T2, ADC) MSD prostate image.")
    arr = sitk.GetArrayFromImage(img)  # (c, z, y, x)
    if arr.shape[0] != 2:
        raise ConversionError(f"{image} has {arr.shape[0]} modalities; expected 2 (T2, ADC).")
    spacing, origin = img.GetSpacing()[:3], img.GetOrigin()[:3]
    direction = np.array(img.GetDirection()).reshape(4, 4)[:3, :3].reshape(-1)
    ref = None
    for c, dst in zip(keep, out_images):
        ch = sitk.GetImageFromArray(arr[c])
        ch.SetSpacing(spacing)
        ch.SetOrigin(origin)
        ch.SetDirection(tuple(direction))
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(ch, dst, useCompression=True)
        ref = ch if ref is None else ref
    if label is None:
        return []
    lab_img = read_volume(Path(label))
    ref = label_volume_like(lab_img, ref, Path(label), Path(image))
    lab = sitk.GetArrayFromImage(lab_img).astype(np.int32)
    check_values(lab, (0, 1, 2), label)
    write_volume(lab.astype(np.uint8), Path(out_label), reference=ref)
    return sorted(np.unique(lab).tolist())


def convert_msd_prostate(source: Path, target: Path, *, channels: str = "t2,adc",
                         num_processes: int | None = None) -> dict:
    source = Path(source)
    root = source if (source / "imagesTr").is_dir() else find_dir(source, "Task05_Prostate", max_depth=2)
    if root is None or not (root / "imagesTr").is_dir():
        raise ConversionError(f"{source} holds no Task05_Prostate/imagesTr folder; expected the MSD Task05 download.")
    names = [c.strip().lower() for c in channels.split(",") if c.strip()]
    if names not in (["t2", "adc"], ["t2"], ["adc"]):
        raise ConversionError(f"Option channels={channels!r} must be t2,adc or t2 or adc.")
    keep = [{"t2": 0, "adc": 1}[n] for n in names]
    w = DatasetWriter(target, ".nii.gz")
    w.make_dirs("train")
    jobs = []
    for img in list_files(root / "imagesTr", (".nii.gz",)):
        case = img.name[: -len(".nii.gz")]
        lab = root / "labelsTr" / img.name
        if not lab.is_file():
            raise ConversionError(f"{lab} is missing; expected the label of {img.name}.")
        jobs.append(dict(image=str(img), out_images=[str(w.image("train", case, i)) for i in range(len(keep))],
                         keep=keep, label=str(lab), out_label=str(w.label("train", case))))
    if (root / "imagesTs").is_dir():
        for img in list_files(root / "imagesTs", (".nii.gz",)):
            case = img.name[: -len(".nii.gz")]
            jobs.append(dict(image=str(img), out_images=[str(w.image("test", case, i)) for i in range(len(keep))],
                             keep=keep))
        w.make_dirs("test_images")
    run_jobs(split_4d_case, jobs, num_processes=num_processes, description="msd-prostate: converting")
    return w.finish(converter="msd-prostate", channel_names={i: n.upper() for i, n in enumerate(names)},
                    labels={"background": 0, "PZ": 1, "TZ": 2}, dataset_name="Prostate",
                    source_form="MSD Task05_Prostate (4D T2+ADC)", license="CC BY-SA 4.0",
                    reference="Antonelli et al., The Medical Segmentation Decathlon, Nat. Commun. 2022",
                    description="Prostate peripheral and transition zones")


# ----------------------------------------------------------------------------- MS-CMRSeg 2019
MSCMR_LABELS = {"background": 0, "LV_myocardium": 1, "LV_blood_pool": 2, "RV_blood_pool": 3}
MSCMR_MAP = {200: 1, 500: 2, 600: 3}


def convert_mscmrseg(source: Path, target: Path, *, sequence: str = "LGE", num_processes: int | None = None) -> dict:
    source = Path(source)
    seq = sequence.upper()
    if seq not in ("LGE", "C0", "T2"):
        raise ConversionError(f"Option sequence={sequence!r} must be LGE, C0 or T2.")
    rx = re.compile(rf"^(patient\d+)_{seq}\.nii(\.gz)?$", re.IGNORECASE)
    rx_gt = re.compile(rf"^(patient\d+)_{seq}_manual\.nii(\.gz)?$", re.IGNORECASE)
    images, labels = {}, {}
    for p in source.rglob("patient*"):
        if not p.is_file():
            continue
        m, g = rx.match(p.name), rx_gt.match(p.name)
        if m:
            images[m.group(1).lower()] = p
        elif g:
            labels[g.group(1).lower()] = p
    if not images:
        raise ConversionError(f"{source} holds no patientN_{seq}.nii.gz files; expected the MS-CMRSeg 2019 download.")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ConversionError(f"{labels[orphans[0]]} has no image {orphans[0]}_{seq}.nii.gz.")
    w = DatasetWriter(target, ".nii.gz")
    w.make_dirs("train")
    jobs = []
    key = lambda s: int(s[len("patient"):])  # noqa: E731
    for pid in sorted(images, key=key):
        case = f"{pid}_{seq}"
        if pid in labels:
            jobs.append(dict(images=[str(images[pid])], out_images=[str(w.image("train", case))],
                             label=str(labels[pid]), out_label=str(w.label("train", case)), value_map=MSCMR_MAP,
                             strict_map=False, allowed=MSCMR_LABELS.values()))
        else:
            jobs.append(dict(images=[str(images[pid])], out_images=[str(w.image("test", case))]))
    n_test = sum(1 for j in jobs if j.get("label") is None)
    if n_test:
        w.make_dirs("test_images")
        w.note(f"{n_test} {seq} image(s) without a manual label -> imagesTs")
    log.info("mscmrseg2019: %d %s images, %d labelled", len(images), seq, len(labels))
    run_jobs(convert_case_3d, jobs, num_processes=num_processes, description="mscmrseg2019: converting")
    w.note("label values 200 -> 1 (LV myocardium), 500 -> 2 (LV blood pool), 600 -> 3 (RV blood pool)")
    return w.finish(converter="mscmrseg2019", channel_names={0: seq}, labels=MSCMR_LABELS,
                    dataset_name="MSCMRSeg2019", source_form=f"MS-CMRSeg 2019 NIfTI ({seq})",
                    reference="Zhuang, Multivariate mixture model for myocardial segmentation combining multi-source "
                              "images, TPAMI 2019 (MS-CMRSeg 2019)",
                    description=f"MS-CMRSeg 2019 {seq} cardiac MRI")
