"""``generic``: a folder of images and a folder of masks (2D png/jpg/bmp/tif or 3D nii/nrrd/mha).

Layouts recognised in SOURCE (first match wins):

* ``{train,val,test}/{image,mask}`` (also ``images``/``masks``): the Ciampi/XNet split layout;
  train+val go to imagesTr with a ``splits_final.json`` (train/val), test to imagesTs/labelsTs.
* ``images/`` + ``masks/`` (or the folders named by the ``images``/``masks`` options, relative to
  SOURCE), and optionally ``test_images``/``test_masks``.

Masks pair with images by file stem, optionally with a suffix (``mask_suffix``, auto-detected
among ``_mask``, ``_segmentation``, ``_anno``, ``_gt``, ``_label``). Without ``labels`` the
dataset is binary (mask > 0, JPEG masks thresholded at ``threshold``); with ``labels``
(``background,a,b``) mask values are kept after ``mapping`` (``255:1,128:2``).
"""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet.dataset_conversion.common import (
    IMAGE_EXTS_2D,
    RGB_CHANNELS,
    VOLUME_EXTS,
    ConversionError,
    DatasetWriter,
    as_int,
    convert_case_2d,
    convert_case_3d,
    list_files,
    log,
    open_image,
    parse_value_map,
    run_jobs,
    safe_case_id,
    strip_ext,
)

IMAGE_DIR_NAMES = ("images", "image", "imgs", "img", "Images", "Image", "Original", "input", "inputs")
MASK_DIR_NAMES = ("masks", "mask", "labels", "label", "gt", "GT", "Ground Truth", "groundtruth", "annotations",
                  "Masks", "Labels")
MASK_SUFFIXES = ("", "_mask", "_segmentation", "_Segmentation", "_anno", "_gt", "_label", "_seg")


def _pick_dir(root: Path, names, option: str | None, what: str) -> Path | None:
    if option:
        p = root / option
        if not p.is_dir():
            raise ConversionError(f"{p} is missing; expected the {what} folder named by the option.")
        return p
    for n in names:
        for cand in (root / n, root / n.lower()):
            if cand.is_dir():
                return cand
    return None


def pair_files(images_dir: Path, masks_dir: Path | None, mask_suffix: str | None = None,
               require_masks: bool = True) -> list[tuple[Path, Path | None]]:
    exts = IMAGE_EXTS_2D + VOLUME_EXTS
    images = list_files(images_dir, exts)
    if not images:
        raise ConversionError(f"{images_dir} holds no image files; expected {', '.join(exts)} files.")
    if masks_dir is None:
        if require_masks:
            raise ConversionError(f"No mask folder next to {images_dir}; expected one of {', '.join(MASK_DIR_NAMES)}.")
        return [(p, None) for p in images]
    masks = {strip_ext(p.name): p for p in list_files(masks_dir, exts)}
    if not masks:
        raise ConversionError(f"{masks_dir} holds no mask files; expected {', '.join(exts)} files.")
    suffixes = (mask_suffix,) if mask_suffix is not None else MASK_SUFFIXES
    best = None
    for suf in suffixes:
        hits = sum(1 for p in images if strip_ext(p.name) + suf in masks)
        if best is None or hits > best[1]:
            best = (suf, hits)
    suf = best[0]
    pairs = []
    for p in images:
        m = masks.get(strip_ext(p.name) + suf)
        if m is None and require_masks:
            raise ConversionError(f"{masks_dir / (strip_ext(p.name) + suf + p.suffix)} is missing; expected a mask "
                                  f"for {p.name} (masks pair with images by name{' + ' + repr(suf) if suf else ''}).")
        pairs.append((p, m))
    return pairs


def _is_volume(p: Path) -> bool:
    return p.name.lower().endswith(VOLUME_EXTS)


def _channels_auto(first: Path) -> str:
    im = open_image(first)
    return "rgb" if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "gray"


def convert(source: Path, target: Path, *, images: str | None = None, masks: str | None = None,
            test_images: str | None = None, test_masks: str | None = None, mask_suffix: str | None = None,
            labels: str | None = None, mapping: str | None = None, threshold: int | str | None = None,
            channels: str = "auto", num_processes: int | None = None,
            _converter: str = "generic", _dataset_name: str = "Generic") -> dict:
    source = Path(source)
    layout = None
    split_dirs = {}
    if images is None and masks is None:
        for split in ("train", "val", "test"):
            d = source / split
            if d.is_dir():
                img_d = _pick_dir(d, IMAGE_DIR_NAMES, None, "image")
                if img_d is not None:
                    split_dirs[split] = (img_d, _pick_dir(d, MASK_DIR_NAMES, None, "mask"))
        if "train" in split_dirs:
            layout = "split folders {train,val,test}/{image,mask}"
    if layout is None:
        img_d = _pick_dir(source, IMAGE_DIR_NAMES, images, "image")
        if img_d is None:
            raise ConversionError(f"{source} has no image folder; expected one of {', '.join(IMAGE_DIR_NAMES[:4])} "
                                  f"(or train/image, or name it with the images option).")
        split_dirs["train"] = (img_d, _pick_dir(source, MASK_DIR_NAMES, masks, "mask"))
        if test_images:
            split_dirs["test"] = (_pick_dir(source, (), test_images, "test image"),
                                  _pick_dir(source, (), test_masks, "test mask") if test_masks else None)
        layout = "image and mask folders"
    log.info("generic: detected %s in %s", layout, source)

    pairs = {s: pair_files(d[0], d[1], mask_suffix, require_masks=(s != "test")) for s, d in split_dirs.items()}
    first = pairs["train"][0][0]
    is3d = _is_volume(first)
    fe = ".nii.gz" if is3d else ".png"
    w = DatasetWriter(target, fe)

    if labels:
        names = [n.strip() for n in str(labels).split(",") if n.strip()]
        if len(names) < 2 or names[0].lower() not in ("background", "bg"):
            raise ConversionError(f"Option labels={labels!r} must start with background and name at least one class.")
        label_dict = {n: i for i, n in enumerate(names)}
        mode = "values"
    else:
        label_dict = {"background": 0, "foreground": 1}
        mode = "binary"
    vmap = parse_value_map(mapping)
    if vmap and mode == "binary":
        mode = "values"
        label_dict = {"background": 0, **{f"class_{v}": v for v in sorted(set(vmap.values())) if v > 0}}
        if sorted(label_dict.values()) != list(range(len(label_dict))):
            raise ConversionError(f"Option mapping={mapping!r} must map onto consecutive values 0, 1, 2, ...; "
                                  f"name the classes with the labels option.")
    allowed = sorted(label_dict.values())

    if is3d:
        channel_names = {0: "image"}
    else:
        ch = _channels_auto(first) if channels == "auto" else channels
        if ch not in ("rgb", "gray"):
            raise ConversionError(f"Option channels={channels!r} must be rgb, gray or auto.")
        channel_names = RGB_CHANNELS if ch == "rgb" else {0: "gray"}

    jobs3, jobs2 = [], []
    cases: dict[str, list[str]] = {}
    seen = set()
    stems = [safe_case_id(strip_ext(img.name)) for plist in pairs.values() for img, _ in plist]
    prefix_split = len(pairs) > 1 and len(set(stems)) < len(stems)
    if prefix_split:
        w.note("file names repeat across the split folders; case ids are prefixed with the split (train_, val_, test_)")
    for split, plist in pairs.items():
        dst = "test" if split == "test" else "train"
        for img, msk in plist:
            if _is_volume(img) != is3d:
                raise ConversionError(f"{img} mixes 2D and 3D files; expected only {'volumes' if is3d else '2D images'}.")
            case = safe_case_id(strip_ext(img.name))
            if prefix_split:
                case = f"{split}_{case}"
            if case in seen:
                raise ConversionError(f"{img} gives the case id {case!r} twice; rename one of the files.")
            seen.add(case)
            cases.setdefault(split, []).append(case)
            if is3d:
                jobs3.append(dict(images=[str(img)], out_images=[str(w.image(dst, case))],
                                  label=str(msk) if msk else None,
                                  out_label=str(w.label(dst, case)) if msk else None,
                                  value_map=vmap or None, binary=(mode == "binary"), allowed=allowed))
            else:
                thr = threshold
                if thr is None and msk is not None and msk.suffix.lower() in (".jpg", ".jpeg"):
                    thr = 127
                jobs2.append(dict(image=str(img), out_image=str(w.image(dst, case)),
                                  masks=[str(msk)] if msk else [], out_label=str(w.label(dst, case)) if msk else None,
                                  channels=("rgb" if channel_names == RGB_CHANNELS else "gray"), mode=mode,
                                  threshold=None if thr is None else as_int(thr, "threshold"),
                                  value_map=vmap or None, allowed=allowed))
    w.make_dirs("train")
    run_jobs(convert_case_3d if is3d else convert_case_2d, jobs3 or jobs2, num_processes=num_processes,
             description=f"{_converter}: converting")
    if "val" in cases:
        w.write_splits(cases["train"], cases["val"])
    return w.finish(converter=_converter, channel_names=channel_names, labels=label_dict, dataset_name=_dataset_name,
                    source_form=layout)
