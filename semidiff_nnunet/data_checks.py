"""Checks of the raw data before planning, and a record of which raw files the preprocessed data came from.

nnU-Net's own integrity check looks for NaN in ``imagesTr`` only: an infinite value passes it (and turns every
preprocessed case into NaN), ``imagesUnlabeled/`` and ``labelsPseudo/`` are never looked at, and a truncated
``.nii.gz`` is read zero-filled by SimpleITK. :func:`check_raw_data` reads every image in ``imagesTr`` and
``imagesUnlabeled/``, every label in ``labelsTr`` and every mask in ``labelsPseudo/`` once, with nnU-Net's reader for
the dataset's file ending, and answers the first problem in one sentence naming the file and the fix.

What was checked is remembered in ``$nnUNet_preprocessed/<Dataset>/semidiff_raw_files.json`` (path -> size and
mtime), so a second command reads only files that changed. The same record keeps, per preprocessed data identifier,
the raw files it was made from; :func:`changed_since_preprocessing` says when they differ now.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

from semidiff_nnunet.errors import SemidiffError

RECORD = "semidiff_raw_files.json"
FOLDERS = ("imagesTr", "labelsTr", "imagesUnlabeled", "labelsPseudo")


def raw_snapshot(raw: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of dataset.json and every data file of the raw dataset."""
    ds_file = raw / "dataset.json"
    if not ds_file.is_file():
        return {}
    file_ending = json.loads(ds_file.read_text(encoding="utf-8")).get("file_ending", "")
    out = {"dataset.json": _stat(ds_file)}
    for sub in FOLDERS:
        folder = raw / sub
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.name.endswith(file_ending) and f.is_file():
                    out[f"{sub}/{f.name}"] = _stat(f)
    return out


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _load(pre: Path) -> dict:
    try:
        record = json.loads((pre / RECORD).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(pre: Path, record: dict) -> None:
    pre.mkdir(parents=True, exist_ok=True)
    tmp = pre / f".{RECORD}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, pre / RECORD)


def check_raw_data(raw: Path, pre: Path) -> dict[str, list[int]]:
    """Check every raw file that changed since the last check; return the snapshot of the raw files.

    Raises :class:`SemidiffError` for the first unreadable, truncated, non-finite or (pseudo mask) mismatching file.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    snapshot = raw_snapshot(raw)
    if not snapshot:
        return snapshot  # no dataset.json: nnU-Net's integrity check says so
    record = _load(pre)
    checked = record.get("checked", {})
    if checked.get("dataset.json") != snapshot["dataset.json"]:
        checked = {}  # another file ending, reader or label set: check everything again
    todo = [rel for rel, st in snapshot.items() if checked.get(rel) != st]
    if not todo:
        return snapshot
    ds = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    fe = ds.get("file_ending", "")
    example = next((raw / rel for rel in snapshot if rel.startswith("imagesTr/")), None)
    if example is None:
        return snapshot  # no training image: nnU-Net's integrity check says so
    try:
        rw = determine_reader_writer_from_dataset_json(ds, str(example), verbose=False)()
    except Exception as e:  # noqa: BLE001 - nnU-Net raises plain RuntimeErrors for unknown endings
        raise SemidiffError(f"nnU-Net has no reader for the file ending {fe!r} of {raw / 'dataset.json'} "
                            f"({_reason(e)}); convert the images to a format nnU-Net reads (e.g. .nii.gz).") from None
    labeled = {rel[len("labelsTr/"):-len(fe)] for rel in snapshot if rel.startswith("labelsTr/")}
    allowed = _label_values(ds.get("labels", {}))
    new = {"dataset.json": snapshot["dataset.json"]}
    try:
        for rel in snapshot:
            if rel == "dataset.json":
                continue
            if rel.startswith("labelsPseudo/"):
                case = rel[len("labelsPseudo/"):-len(fe)]
                image = f"{'imagesTr' if case in labeled else 'imagesUnlabeled'}/{case}_0000{fe}"
                if rel in todo or image in todo:
                    _check_pseudo(rw, raw, rel, image, snapshot, allowed)
            elif rel in todo:
                _check_file(rw, raw, rel, image=rel.startswith("images"))
            new[rel] = snapshot[rel]
    finally:
        # what passed now, and what passed before and is unchanged (a failure stops the loop early)
        record["checked"] = {rel: st for rel, st in checked.items() if snapshot.get(rel) == st} | new
        _save(pre, record)
    return snapshot


def _reason(e: BaseException) -> str:
    """The most telling line of an error (SimpleITK puts the file and the cause on its last line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _gzip_error(path: Path) -> str | None:
    """Why a gzip file's stream is broken (truncated, bad CRC), or None. SimpleITK reads a truncated .nii.gz
    without error, filling the missing voxels with zeros; only decompressing to the end tells."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as e:
        return str(e) or type(e).__name__
    return None


def _read(rw, raw: Path, rel: str, image: bool):
    path = raw / rel
    if path.name.endswith(".gz"):
        err = _gzip_error(path)
        if err:
            raise SemidiffError(f"{path} is truncated or corrupt ({err}); nnU-Net's reader would fill the missing part "
                                f"with zeros, so copy or export the file again and retry.")
    try:
        return rw.read_images([str(path)])[0] if image else rw.read_seg(str(path))[0]
    except Exception as e:  # noqa: BLE001 - readers raise anything (RuntimeError, OSError, ValueError, ...)
        raise SemidiffError(f"{path} cannot be read by nnU-Net's {type(rw).__name__} ({_reason(e)}); replace it with "
                            f"a readable file (or remove it) and retry.") from None


def _check_file(rw, raw: Path, rel: str, image: bool):
    import numpy as np

    data = _read(rw, raw, rel, image)
    if image and np.issubdtype(data.dtype, np.floating):
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if nan or inf:
            raise SemidiffError(f"{raw / rel} holds {inf} infinite and {nan} NaN value(s), which would make nnU-Net's "
                                f"intensity statistics and every preprocessed case NaN; replace them with finite values "
                                f"(e.g. clip to the scanner's range) and retry.")
    return data


def _label_values(labels: dict) -> set[int]:
    out: set[int] = set()
    for v in labels.values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            out.add(int(x))
    return out


def _check_pseudo(rw, raw: Path, rel: str, image: str, snapshot: dict, allowed: set[int]) -> None:
    import numpy as np

    if image not in snapshot:
        raise SemidiffError(f"{raw / rel} has no image {image} in imagesTr/ or imagesUnlabeled/; add the image or "
                            f"remove the pseudo mask.")
    seg = _check_file(rw, raw, rel, image=False)
    img = _read(rw, raw, image, image=True)
    if tuple(seg.shape[1:]) != tuple(img.shape[1:]):
        raise SemidiffError(f"{raw / rel} has shape {tuple(seg.shape[1:])}, its image {image} has "
                            f"{tuple(img.shape[1:])}; write the pseudo mask on the image's grid.")
    unknown = [v.item() for v in np.unique(seg) if v != int(v) or int(v) not in allowed]
    if unknown:
        raise SemidiffError(f"{raw / rel} holds label(s) {', '.join(f'{v:g}' for v in unknown[:5])} that dataset.json "
                            f"does not declare ({', '.join(map(str, sorted(allowed)))}); map them to declared labels.")


def changed_since_preprocessing(pre: Path, identifier: str, snapshot: dict) -> str | None:
    """The first raw file added, removed or changed since ``identifier`` was preprocessed, or None.

    Data preprocessed before this record existed are taken as made from the current files (recorded now)."""
    record = _load(pre)
    made_from = record.get("preprocessed", {}).get(identifier)
    if made_from is None:
        remember_preprocessed(pre, identifier, snapshot)
        return None
    for rel in sorted(set(made_from) | set(snapshot)):
        if made_from.get(rel) != snapshot.get(rel):
            return rel
    return None


def remember_preprocessed(pre: Path, identifier: str, snapshot: dict) -> None:
    record = _load(pre)
    record.setdefault("preprocessed", {})[identifier] = snapshot
    _save(pre, record)
