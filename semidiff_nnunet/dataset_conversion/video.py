"""Video-frame datasets with natural unlabeled pools: ``mosxav`` and ``endoscapes2023``.

MOSXAV (X-ray angiography): ``MOSXAV_Dataset/{trainval,test}/`` with ``JPEGImages/vNN/00000.jpg``,
``Annotations_Semantic/vNN/00000.png`` (semantic ids; palette PNGs read by index, RGB PNGs through
the published colour table) and ``ImageSets/{train,val}.txt`` (trainval) / ``test.txt``.
Annotated trainval frames go to imagesTr (``splits_final.json`` from train/val.txt), the
un-annotated trainval frames (4 of every 5) to imagesUnlabeled, annotated test frames to
imagesTs/labelsTs. Frames are written grayscale (``channels=rgb`` keeps three channels).
Classes 0 background, 1 vessel, 2 contrast catheter, 3 catheter, 4 balloon, 5 others (test only).

Endoscapes2023 (Seg50): ``semseg/{vid}_{frame}.png`` (3 identical channels, value = class id,
255 = unlabeled, stray 7) paired with ``{train,val,test}_seg/{vid}_{frame}.jpg``; 255 and 7 become
the ignore label 7. train_seg + val_seg go to imagesTr with ``splits_final.json``, test_seg to
imagesTs/labelsTs; the 1 fps frames of ``train/`` without a mask go to imagesUnlabeled
(``unlabeled=false`` skips them).
"""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet.dataset_conversion.common import (
    RGB_CHANNELS,
    ConversionError,
    DatasetWriter,
    as_bool,
    convert_case_2d,
    find_dir,
    list_files,
    log,
    read_list,
    run_jobs,
    safe_case_id,
    strip_ext,
)

# ----------------------------------------------------------------------------- MOSXAV
MOSXAV_LABELS = {"background": 0, "vessel": 1, "contrast_catheter": 2, "catheter": 3, "balloon": 4, "others": 5}
MOSXAV_COLORS = {(0, 0, 0): 0, (85, 170, 255): 1, (170, 255, 0): 2, (249, 193, 0): 3, (255, 0, 0): 4,
                 (244, 108, 59): 5}


def _mosxav_root(source: Path) -> Path:
    for cand in (source, source / "MOSXAV_Dataset", source / "MOSXAV"):
        if (cand / "trainval").is_dir():
            return cand
    found = find_dir(source, "MOSXAV_Dataset", max_depth=2)
    if found is not None and (found / "trainval").is_dir():
        return found
    raise ConversionError(f"{source} holds no MOSXAV_Dataset/trainval folder; expected the MOSXAV download.")


def _videos_from(path: Path) -> list[str]:
    return sorted({line.split("/")[0] for line in read_list(path)}) if path.is_file() else []


def convert_mosxav(source: Path, target: Path, *, channels: str = "gray", unlabeled: bool | str = True,
                   num_processes: int | None = None) -> dict:
    root = _mosxav_root(Path(source))
    unlabeled = as_bool(unlabeled, "unlabeled")
    if channels not in ("gray", "rgb"):
        raise ConversionError(f"Option channels={channels!r} must be gray or rgb.")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    jobs, by_video, n_unl = [], {}, 0
    for part in ("trainval", "test"):
        base = root / part
        if not base.is_dir():
            if part == "trainval":
                raise ConversionError(f"{base} is missing; expected the trainval part of MOSXAV.")
            continue
        img_root = base / "JPEGImages"
        ann_root = base / "Annotations_Semantic"
        for d, what in ((img_root, "the frames (JPEGImages/vNN/*.jpg)"), (ann_root, "the semantic masks")):
            if not d.is_dir():
                raise ConversionError(f"{d} is missing; expected {what}.")
        for vdir in sorted(p for p in img_root.iterdir() if p.is_dir()):
            video = vdir.name
            for frame in list_files(vdir, (".jpg", ".jpeg", ".png")):
                fid = strip_ext(frame.name)
                case = safe_case_id(f"{video}_{fid}" if part == "trainval" else f"test_{video}_{fid}")
                mask = ann_root / video / f"{fid}.png"
                if mask.is_file():
                    dst = "train" if part == "trainval" else "test"
                    by_video.setdefault((part, video), []).append(case)
                    jobs.append(dict(image=str(frame), out_image=str(w.image(dst, case)), masks=[str(mask)],
                                     out_label=str(w.label(dst, case)), channels=channels, mode="values",
                                     color_map=MOSXAV_COLORS, allowed=MOSXAV_LABELS.values()))
                elif part == "trainval" and unlabeled:
                    n_unl += 1
                    jobs.append(dict(image=str(frame), out_image=str(w.image("unlabeled", case)),
                                     channels=channels))
    if any(p == "test" for p, _ in by_video):
        w.make_dirs("test")
    if n_unl:
        w.make_dirs("unlabeled")
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="mosxav: converting")
    sets = root / "trainval" / "ImageSets"
    tr_v, va_v = _videos_from(sets / "train.txt"), _videos_from(sets / "val.txt")
    if tr_v and va_v:
        tr = [c for (p, v), cs in by_video.items() if p == "trainval" and v in tr_v for c in cs]
        va = [c for (p, v), cs in by_video.items() if p == "trainval" and v in va_v for c in cs]
        w.write_splits(tr, va)
        w.note(f"splits_final.json from ImageSets/train.txt ({len(tr_v)} videos) and val.txt ({len(va_v)} videos)")
    else:
        log.warning("mosxav: %s has no train.txt/val.txt; no splits_final.json written.", sets)
    return w.finish(converter="mosxav", channel_names=RGB_CHANNELS if channels == "rgb" else {0: "xray"},
                    labels=MOSXAV_LABELS, dataset_name="MOSXAV", source_form="MOSXAV_Dataset (trainval, test)",
                    reference="Xi, Ma et al., MOSXAV (github.com/xilin-x/MOSXAV)", license="CC BY-NC-SA 4.0",
                    description="Multi-object segmentation in X-ray angiography videos, semantic masks")


# ----------------------------------------------------------------------------- Endoscapes2023
ENDOSCAPES_LABELS = {"background": 0, "cystic_plate": 1, "calot_triangle": 2, "cystic_artery": 3,
                     "cystic_duct": 4, "gallbladder": 5, "tool": 6, "ignore": 7}


def _endoscapes_root(source: Path) -> Path:
    for cand in (source, source / "endoscapes", source / "Endoscapes2023"):
        if (cand / "semseg").is_dir():
            return cand
    found = find_dir(source, "semseg", max_depth=2)
    if found is not None:
        return found.parent
    raise ConversionError(f"{source} holds no semseg/ folder; expected the extracted endoscapes.zip "
                          f"(semseg/, train_seg/, val_seg/, test_seg/, train/).")


def convert_endoscapes(source: Path, target: Path, *, unlabeled: bool | str = True,
                       num_processes: int | None = None) -> dict:
    root = _endoscapes_root(Path(source))
    unlabeled = as_bool(unlabeled, "unlabeled")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    masks = {strip_ext(p.name): p for p in list_files(root / "semseg", (".png",))}
    if not masks:
        raise ConversionError(f"{root / 'semseg'} holds no PNG masks.")
    jobs, cases, paired = [], {}, set()
    for split in ("train", "val", "test"):
        d = root / f"{split}_seg"
        if not d.is_dir():
            if split != "test":
                raise ConversionError(f"{d} is missing; expected the Seg50 frames of the {split} split.")
            continue
        dst = "test" if split == "test" else "train"
        for img in list_files(d, (".jpg", ".jpeg", ".png")):
            key = strip_ext(img.name)
            if key not in masks:
                continue  # a Seg50 frame without a semantic mask
            case = safe_case_id(key)
            paired.add(key)
            cases.setdefault(split, []).append(case)
            jobs.append(dict(image=str(img), out_image=str(w.image(dst, case)), masks=[str(masks[key])],
                             out_label=str(w.label(dst, case)), channels="rgb", mode="values",
                             value_map={255: 7}, allowed=ENDOSCAPES_LABELS.values()))
    orphans = sorted(set(masks) - paired)
    if orphans:
        raise ConversionError(f"{masks[orphans[0]]} has no frame {orphans[0]}.jpg in train_seg/, val_seg/ or test_seg/.")
    n_unl = 0
    if unlabeled and (root / "train").is_dir():
        for img in list_files(root / "train", (".jpg", ".jpeg", ".png")):
            if strip_ext(img.name) in masks:
                continue
            n_unl += 1
            jobs.append(dict(image=str(img), out_image=str(w.image("unlabeled", safe_case_id(strip_ext(img.name)))),
                             channels="rgb"))
    if "test" in cases:
        w.make_dirs("test")
    if n_unl:
        w.make_dirs("unlabeled")
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="endoscapes2023: converting")
    w.write_splits(cases.get("train", []), cases.get("val", []))
    w.note("semseg values 255 (unlabeled) and the stray 7 -> ignore label 7")
    if n_unl:
        w.note(f"{n_unl} frames of train/ without a mask -> imagesUnlabeled")
    return w.finish(converter="endoscapes2023", channel_names=RGB_CHANNELS, labels=ENDOSCAPES_LABELS,
                    dataset_name="Endoscapes2023", source_form="endoscapes.zip (Seg50 semseg)",
                    reference="Murali et al., The Endoscapes Dataset for Surgical Scene Segmentation, 2023",
                    license="CC BY-NC-SA 4.0",
                    description="Laparoscopic cholecystectomy anatomy and tool segmentation (Seg50)")
