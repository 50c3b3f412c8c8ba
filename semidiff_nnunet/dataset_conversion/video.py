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

Pseudo masks (``pseudo=DIR``, both converters): a folder of noisy masks the user has (MedSAM or
another model), laid out like the dataset's own masks: MOSXAV ``DIR/vNN/00001.png`` (palette or RGB
PNGs as in Annotations_Semantic; ``DIR/trainval/vNN/`` and ``DIR/test/vNN/`` are also read),
Endoscapes ``DIR/{vid}_{frame}.png`` (as semseg). A mask whose frame went to imagesUnlabeled is
written as ``labelsPseudo/CASE.png`` with exactly the label conversion of the real masks (MOSXAV
colour table / palette indices; Endoscapes 255 and the stray 7 -> ignore 7, other values outside
the label set are an error) and must have the frame's size. Masks of other frames are ignored and
counted in the log and in dataset.json's notes, so that a pseudo mask never lands on a validation
or test case: masks of annotated frames (their ground truth is in labelsTr/labelsTs), of frames of
validation videos (MOSXAV: the un-annotated frames of the ImageSets/val.txt videos, which are
near-copies of validation cases; Endoscapes: the 1 fps frames of ``val/``) and of test frames
(MOSXAV test part; Endoscapes ``test/``). A mask that matches no frame of the download, a folder
without any mask, a folder none of whose masks belongs to an imagesUnlabeled frame, and
``pseudo=`` with ``unlabeled=false`` are errors.
"""

from __future__ import annotations

from collections import Counter
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
    pseudo_dir,
    read_list,
    run_jobs,
    safe_case_id,
    strip_ext,
)

# ----------------------------------------------------------------------------- pseudo masks
_IGNORED = {"annotated": "of annotated frames (their ground truth is the label)",
            "validation": "of frames of validation videos", "test": "of test frames"}


def _add_pseudo(w: DatasetWriter, jobs: list[dict], matches: list[tuple[Path, str, int | None]], pdir: Path,
                label_kw: dict, converter: str) -> int:
    """Give the imagesUnlabeled jobs of ``matches`` (mask, kind, job index) their pseudo mask (written to
    labelsPseudo/ with ``label_kw``, the real masks' conversion); masks of other kinds are counted and
    ignored; a mask without a frame is an error. Returns the number of pseudo masks."""
    if not matches:
        raise ConversionError(f"{pdir} holds no pseudo masks; lay them out like the dataset's masks "
                              f"(see semidiff convert --list).")
    missing = [m for m, kind, _ in matches if kind == "missing"]
    if missing:
        raise ConversionError(f"Pseudo mask {missing[0]} matches no frame of the download ({len(missing)} such "
                              f"mask(s)); name pseudo masks like the dataset's own masks.")
    counts = Counter(kind for _, kind, _ in matches)
    if not counts["unlabeled"]:
        raise ConversionError(f"None of the {len(matches)} masks in {pdir} belongs to a frame in imagesUnlabeled; "
                              f"give pseudo masks of the un-annotated training frames.")
    w.make_dirs("pseudo")
    for mask, kind, i in matches:
        if kind == "unlabeled":
            case = Path(jobs[i]["out_image"]).name[: -len("_0000.png")]
            jobs[i].update(masks=[str(mask)], out_label=str(w.label("pseudo", case)), **label_kw)
    w.note(f"{counts['unlabeled']} pseudo masks of {pdir} -> labelsPseudo (frames in imagesUnlabeled)")
    ignored = [f"{counts[k]} {what}" for k, what in _IGNORED.items() if counts[k]]
    if ignored:
        log.warning("%s: ignored pseudo masks: %s.", converter, ", ".join(ignored))
        w.note("ignored pseudo masks (never on a validation or test case): " + ", ".join(ignored))
    return counts["unlabeled"]


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


def _mosxav_pseudo_masks(pdir: Path) -> list[tuple[str | None, str, str, Path]]:
    """(part or None, video, frame id, path) of every ``vNN/*.png`` in ``pdir`` (or its trainval/, test/)."""
    parts = [(p, pdir / p) for p in ("trainval", "test") if (pdir / p).is_dir()] or [(None, pdir)]
    out = []
    for part, base in parts:
        for vdir in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            out.extend((part, vdir.name, strip_ext(m.name), m) for m in list_files(vdir, (".png",)))
    return out


def convert_mosxav(source: Path, target: Path, *, channels: str = "gray", unlabeled: bool | str = True,
                   pseudo: str | None = None, num_processes: int | None = None) -> dict:
    root = _mosxav_root(Path(source))
    unlabeled = as_bool(unlabeled, "unlabeled")
    if channels not in ("gray", "rgb"):
        raise ConversionError(f"Option channels={channels!r} must be gray or rgb.")
    pdir = pseudo_dir(pseudo, "vNN/00001.png as in Annotations_Semantic")
    if pdir is not None and not unlabeled:
        raise ConversionError("Option pseudo= labels the un-annotated frames of imagesUnlabeled; drop unlabeled=false.")
    label_kw = dict(mode="values", color_map=MOSXAV_COLORS, allowed=tuple(MOSXAV_LABELS.values()))
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    jobs, by_video, n_unl = [], {}, 0
    frames: dict[tuple[str, str, str], tuple[str, int | None]] = {}  # (part, video, fid) -> (kind, job index)
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
                    frames[(part, video, fid)] = ("annotated" if part == "trainval" else "test", None)
                    jobs.append(dict(image=str(frame), out_image=str(w.image(dst, case)), masks=[str(mask)],
                                     out_label=str(w.label(dst, case)), channels=channels, **label_kw))
                elif part == "trainval" and unlabeled:
                    n_unl += 1
                    frames[(part, video, fid)] = ("unlabeled", len(jobs))
                    jobs.append(dict(image=str(frame), out_image=str(w.image("unlabeled", case)),
                                     channels=channels))
                elif part == "test":
                    frames[(part, video, fid)] = ("test", None)
    if any(p == "test" for p, _ in by_video):
        w.make_dirs("test")
    if n_unl:
        w.make_dirs("unlabeled")
    sets = root / "trainval" / "ImageSets"
    tr_v, va_v = _videos_from(sets / "train.txt"), _videos_from(sets / "val.txt")
    if pdir is not None:
        matches = []
        for part, video, fid, path in _mosxav_pseudo_masks(pdir):
            key = next((k for k in ((p, video, fid) for p in ((part,) if part else ("trainval", "test")))
                        if k in frames), None)
            kind, i = frames[key] if key else ("missing", None)
            if kind == "unlabeled" and tr_v and va_v and video in va_v:
                kind = "validation"
            matches.append((path, kind, i))
        _add_pseudo(w, jobs, matches, pdir, label_kw, "mosxav")
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="mosxav: converting")
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


def convert_endoscapes(source: Path, target: Path, *, unlabeled: bool | str = True, pseudo: str | None = None,
                       num_processes: int | None = None) -> dict:
    root = _endoscapes_root(Path(source))
    unlabeled = as_bool(unlabeled, "unlabeled")
    pdir = pseudo_dir(pseudo, "{vid}_{frame}.png as in semseg")
    if pdir is not None and not unlabeled:
        raise ConversionError("Option pseudo= labels the frames of train/ in imagesUnlabeled; drop unlabeled=false.")
    label_kw = dict(mode="values", value_map={255: 7}, allowed=tuple(ENDOSCAPES_LABELS.values()))
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    masks = {strip_ext(p.name): p for p in list_files(root / "semseg", (".png",))}
    if not masks:
        raise ConversionError(f"{root / 'semseg'} holds no PNG masks.")
    jobs, cases, paired = [], {}, set()
    frames: dict[str, tuple[str, int | None]] = {}  # frame key -> (kind, job index)
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
            frames[key] = ("test" if split == "test" else "annotated", None)
            jobs.append(dict(image=str(img), out_image=str(w.image(dst, case)), masks=[str(masks[key])],
                             out_label=str(w.label(dst, case)), channels="rgb", **label_kw))
    orphans = sorted(set(masks) - paired)
    if orphans:
        raise ConversionError(f"{masks[orphans[0]]} has no frame {orphans[0]}.jpg in train_seg/, val_seg/ or test_seg/.")
    n_unl = 0
    if unlabeled and (root / "train").is_dir():
        for img in list_files(root / "train", (".jpg", ".jpeg", ".png")):
            if strip_ext(img.name) in masks:
                continue
            n_unl += 1
            frames[strip_ext(img.name)] = ("unlabeled", len(jobs))
            jobs.append(dict(image=str(img), out_image=str(w.image("unlabeled", safe_case_id(strip_ext(img.name)))),
                             channels="rgb"))
    if "test" in cases:
        w.make_dirs("test")
    if n_unl:
        w.make_dirs("unlabeled")
    if pdir is not None:
        for split, kind in (("val", "validation"), ("test", "test")):  # 1 fps frames of val/test videos
            if (root / split).is_dir():
                for img in list_files(root / split, (".jpg", ".jpeg", ".png")):
                    frames.setdefault(strip_ext(img.name), (kind, None))
        matches = [(m, *frames.get(strip_ext(m.name), ("missing", None))) for m in list_files(pdir, (".png",))]
        _add_pseudo(w, jobs, matches, pdir, label_kw, "endoscapes2023")
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
