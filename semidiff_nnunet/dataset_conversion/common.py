"""Shared machinery of the dataset converters.

Conventions of the written datasets (nnU-Net v2 raw format):

* 2D natural images (RGB or grayscale) are PNG files read by nnU-Net's ``NaturalImage2DIO``:
  one file ``CASE_0000.png`` per case (an RGB image is one 3-channel PNG and ``channel_names``
  lists R, G, B), labels are single-channel uint8 PNG ``CASE.png``.
* 3D volumes are ``.nii.gz`` written with SimpleITK, with the source's spacing, origin and
  direction (or a documented spacing where the source lost it).
* ``imagesTs``/``labelsTs`` hold test sets, ``imagesUnlabeled`` natural unlabeled pools (same
  naming), ``splits_final.json`` a paper-defined train/val split, ``test_sets.json`` the
  membership of named test sets, and ``dataset.json`` has a ``semidiff`` block with the
  converter, the detected source form and notes (assumed spacings and similar).

Everything a user can get wrong raises :class:`~semidiff_nnunet.errors.SemidiffError` with one
sentence naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semidiff_nnunet.errors import SemidiffError

log = logging.getLogger("semidiff_nnunet.convert")

IMAGE_EXTS_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled", "labelsPseudo")

# below this many jobs a process pool costs more than it saves
MIN_JOBS_FOR_POOL = 16


class ConversionError(SemidiffError):
    """A source that does not look like the expected download (the message says what is wrong)."""


# ----------------------------------------------------------------------------- small helpers
def as_bool(value: Any, name: str = "option") -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise SemidiffError(f"Option {name}={value!r} is not a boolean; use true or false.")


def as_int(value: Any, name: str = "option") -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SemidiffError(f"Option {name}={value!r} is not an integer.") from None


def as_floats(value: Any, n: int, name: str = "option") -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        out = tuple(float(p) for p in parts)
    except ValueError:
        raise SemidiffError(f"Option {name}={value!r} must be {n} comma-separated numbers.") from None
    if len(out) != n:
        raise SemidiffError(f"Option {name}={value!r} must be {n} comma-separated numbers.")
    return out


def default_num_processes() -> int:
    env = os.environ.get("SEMIDIFF_CONVERT_PROCESSES")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def strip_ext(name: str) -> str:
    """File name without its (possibly double, ``.nii.gz``) extension."""
    low = name.lower()
    for ext in (".nii.gz",):
        if low.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def has_ext(path: Path, exts: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(exts))


def list_files(folder: Path, exts: Sequence[str]) -> list[Path]:
    """Plain files of ``folder`` with one of ``exts``; hidden files (``._x`` macOS forks) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and has_ext(p, exts))


def pseudo_dir(value: Any, layout: str) -> Path | None:
    """The ``pseudo=DIR`` converter option (noisy pseudo masks for ``labelsPseudo/``): None when not
    given; a folder that does not exist is a :class:`ConversionError`."""
    if value is None or str(value).strip() == "":
        return None
    path = Path(str(value).strip()).expanduser()
    if not path.is_dir():
        raise ConversionError(f"pseudo={value} is not a folder; give the folder of your pseudo masks ({layout}).")
    return path.resolve()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ConversionError(f"{path} is missing; expected {what}.")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConversionError(f"{path} is missing; expected {what}.")
    return path


def find_dir(root: Path, name: str, max_depth: int = 3, *, case_insensitive: bool = True) -> Path | None:
    """First folder called ``name`` at ``root`` or below it (breadth first, ``max_depth`` levels)."""
    want = name.lower() if case_insensitive else name
    level = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in level:
            got = d.name.lower() if case_insensitive else d.name
            if got == want:
                return d
            try:
                nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
            except OSError:
                pass
        level = nxt
    return None


def read_list(path: Path) -> list[str]:
    """Case ids of a ``.list``/``.txt`` file: one per line; paths and ``.h5`` suffixes reduced to the id."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("\\", "/").rstrip("/")
        if line.endswith("/mri_norm2.h5"):
            line = line[: -len("/mri_norm2.h5")]
        line = line.split("/")[-1]
        if line.endswith(".h5"):
            line = line[:-3]
        ids.append(line)
    return ids


# ----------------------------------------------------------------------------- 2D reading
def open_image(path: Path):
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing.") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise ConversionError(f"{path} could not be read as an image ({type(e).__name__}: {e}).") from None
    return im


def read_image_2d(path: Path, channels: str = "rgb") -> np.ndarray:
    """An image as uint8 ``(H, W, 3)`` (``channels='rgb'``) or ``(H, W)`` (``'gray'``)."""
    im = open_image(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        hi = arr.max() if arr.size else 0
        if hi > 255:  # 16-bit data: scale into 8 bits
            arr = arr * (255.0 / hi)
        arr = arr.astype(np.uint8)
        if channels == "rgb":
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return arr
    if channels == "rgb":
        return np.asarray(im.convert("RGB"))
    if channels == "gray":
        if im.mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB"))
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                return rgb[..., 0].copy()
        return np.asarray(im.convert("L"))
    raise SemidiffError(f"channels={channels!r} is not supported; use rgb or gray.")


def read_mask_2d(path: Path, color_map: dict[tuple[int, int, int], int] | None = None) -> np.ndarray:
    """A label image as a 2D integer array, read exactly.

    Palette PNGs give their indices, 1-bit images 0/1, grayscale their values; an RGB mask is
    accepted when its three channels are equal, or when ``color_map`` maps every colour.
    """
    im = open_image(path)
    mode = im.mode
    if mode == "P":
        return np.asarray(im).astype(np.int32)
    if mode == "1":
        return np.asarray(im).astype(np.int32)
    if mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(im).astype(np.int32)
    if mode == "LA":
        return np.asarray(im)[..., 0].astype(np.int32)
    rgb = np.asarray(im.convert("RGB"))
    if color_map:
        return map_colors(rgb, color_map, path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int32)
    raise ConversionError(f"{path} is a colour ({mode}) mask whose channels differ; expected a grayscale, "
                          f"palette or 1-bit label image.")


def map_colors(rgb: np.ndarray, color_map: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.full(codes.shape, -1, dtype=np.int32)
    for (r, g, b), value in color_map.items():
        out[codes == ((r << 16) | (g << 8) | b)] = value
    if (out < 0).any():
        bad = np.unique(rgb[out < 0].reshape(-1, 3), axis=0)[:5]
        raise ConversionError(f"{path} contains colours {[tuple(int(v) for v in c) for c in bad]} that are "
                              f"not in the dataset's colour table {sorted(color_map)}.")
    return out


def read_binary_mask_2d(path: Path, threshold: int | None = None) -> np.ndarray:
    """A binary mask as uint8 {0, 1}.

    ``threshold=None`` reads exactly: the mask must hold 0 and at most one other value
    (0/255, 0/1, 1-bit). A lossy (JPEG) mask needs ``threshold``: the luminance ``> threshold``
    is foreground.
    """
    if threshold is not None:
        im = open_image(path)
        if im.mode == "1":
            return np.asarray(im).astype(np.uint8)
        if im.mode == "P":
            arr = np.asarray(im.convert("L"))
        elif im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
            arr = np.asarray(im.convert("RGB")).max(axis=-1)
        else:
            arr = np.asarray(im)
        return (arr > threshold).astype(np.uint8)
    arr = read_mask_2d(path)
    values = np.unique(arr)
    fg = values[values != 0]
    if len(fg) > 1:
        raise ConversionError(f"{path} is not a binary mask: it holds the values {values[:10].tolist()}; "
                              f"expected 0 and one foreground value (for lossy JPEG masks set a threshold).")
    return (arr != 0).astype(np.uint8)


def read_h5_volume(path: Path | str, form: str, *, dims: int | None = 3) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``image`` (as float32) and ``label`` (as int32) datasets of an SSL-literature h5 file.

    ``form`` names the expected layout in the error ("UA-MT", "SSL4MIS", ...). With ``dims`` set,
    both arrays must have that many dimensions and the same shape.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise ConversionError(f"{path} lacks the dataset(s) {', '.join(repr(k) for k in missing)} of the "
                                      f"{form} h5 form (has: {', '.join(f.keys())}).")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = integer_labels(np.asarray(f["label"][()]), path)
    except OSError as e:
        raise ConversionError(f"{path} could not be read as HDF5 ({e}).") from None
    if dims is not None and (image.ndim != dims or image.shape != label.shape):
        raise ConversionError(f"{path}: image {image.shape} and label {label.shape} must be {dims}D arrays of the "
                              f"same shape.")
    return image, label


def convert_case_h5_xyz(*, h5: str, out_image: str, out_label: str, spacing: Sequence[float], form: str,
                        allowed: Sequence[int] = (0, 1)) -> list[int]:
    """Convert one (x, y, z) h5 volume (job function; UA-MT's LA, MC-Net/BCP's pancreas): image and
    label written as NIfTI with ``spacing`` (x, y, z; the h5 stores none), origin and direction identity.
    Returns the label values written."""
    image, label = read_h5_volume(h5, form)
    check_values(label, allowed, h5)
    # (x, y, z) as the h5 stores it -> SimpleITK array order (z, y, x)
    write_volume(image.transpose(2, 1, 0), Path(out_image), spacing_xyz=spacing)
    write_volume(label.astype(np.uint8).transpose(2, 1, 0), Path(out_label), spacing_xyz=spacing)
    return sorted(np.unique(label).tolist())


def integer_labels(arr: np.ndarray, path: Path | str) -> np.ndarray:
    """A label map as int32; float labels (MC-Net stores float32) must hold whole numbers."""
    if np.issubdtype(arr.dtype, np.floating):
        if not np.allclose(arr, np.round(arr)):
            raise ConversionError(f"{path} holds non-integer label values; expected a label map.")
        arr = np.round(arr)
    return arr.astype(np.int32)


def check_values(arr: np.ndarray, allowed: Iterable[int], path: Path | str) -> None:
    allowed = set(int(a) for a in allowed)
    values = set(np.unique(arr).tolist())
    bad = sorted(values - allowed)
    if bad:
        raise ConversionError(f"{path} contains label values {bad[:10]} that the dataset does not declare "
                              f"(expected a subset of {sorted(allowed)}).")


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise ConversionError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                              f"{image.shape[1]}x{image.shape[0]}; expected masks of the image's size.")


# ----------------------------------------------------------------------------- writing
def write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise SemidiffError(f"Cannot write {path}: values outside 0..255.")
        arr = arr.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, compress_level=3)


def write_volume(arr_zyx: np.ndarray, path: Path, *, spacing_xyz: Sequence[float] | None = None,
                 reference=None, dtype=None) -> None:
    """Write a 3D array (SimpleITK order z, y, x) as NIfTI with ``reference``'s geometry or ``spacing_xyz``."""
    import SimpleITK as sitk

    if dtype is not None:
        arr_zyx = arr_zyx.astype(dtype, copy=False)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_zyx))
    if reference is not None:
        img.CopyInformation(reference)
    elif spacing_xyz is not None:
        img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def read_volume(path: Path):
    import SimpleITK as sitk

    if not path.is_file():
        raise ConversionError(f"{path} is missing.")
    try:
        return sitk.ReadImage(str(path))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path} could not be read as a medical image ({str(e).strip().splitlines()[-1]}).") from None


def copy_volume_image(src: Path, dst: Path) -> None:
    """Copy a ``.nii.gz`` unchanged, anything else (``.nii``, ``.nrrd``, ``.mha``) re-encoded as ``.nii.gz``."""
    import SimpleITK as sitk

    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.lower().endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        img = read_volume(src)
        sitk.WriteImage(img, str(dst), useCompression=True)


def label_volume_like(label_img, image_img, label_path: Path, image_path: Path):
    """The label image on the image's grid: geometry copied when sizes match and spacings agree."""
    if tuple(label_img.GetSize()) != tuple(image_img.GetSize()):
        raise ConversionError(f"{label_path} has size {label_img.GetSize()} but {image_path.name} has "
                              f"{image_img.GetSize()}; expected a label on the image's voxel grid.")
    if not np.allclose(label_img.GetSpacing(), image_img.GetSpacing(), rtol=1e-3, atol=1e-3):
        log.warning("%s: spacing %s differs from the image's %s; the image geometry is used.",
                    label_path.name, label_img.GetSpacing(), image_img.GetSpacing())
    return image_img


# ----------------------------------------------------------------------------- dataset layout
@dataclass
class DatasetWriter:
    """Paths of one nnU-Net raw dataset being written, and its bookkeeping."""

    root: Path
    file_ending: str
    notes: list[str] = field(default_factory=list)

    def image(self, split: str, case: str, channel: int = 0) -> Path:
        folder = {"train": "imagesTr", "test": "imagesTs", "unlabeled": "imagesUnlabeled"}[split]
        return self.root / folder / f"{case}_{channel:04d}{self.file_ending}"

    def label(self, split: str, case: str) -> Path:
        folder = {"train": "labelsTr", "test": "labelsTs", "pseudo": "labelsPseudo"}[split]
        return self.root / folder / f"{case}{self.file_ending}"

    def make_dirs(self, *splits: str) -> None:
        for s in splits:
            for sub in {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs"),
                        "test_images": ("imagesTs",), "unlabeled": ("imagesUnlabeled",),
                        "pseudo": ("labelsPseudo",)}[s]:
                (self.root / sub).mkdir(parents=True, exist_ok=True)

    def count(self, sub: str) -> int:
        folder = self.root / sub
        if not folder.is_dir():
            return 0
        return sum(1 for p in folder.iterdir() if p.name.endswith(self.file_ending))

    def cases(self, sub: str) -> list[str]:
        folder = self.root / sub
        if not folder.is_dir():
            return []
        out = set()
        for p in folder.iterdir():
            if p.name.endswith(self.file_ending):
                stem = p.name[: -len(self.file_ending)]
                out.add(stem[:-5] if sub.startswith("images") else stem)
        return sorted(out)

    def note(self, text: str) -> None:
        log.info(text)
        self.notes.append(text)

    def remove_empty_dirs(self) -> None:
        for sub in SUBFOLDERS:
            d = self.root / sub
            if d.is_dir() and not any(d.iterdir()) and sub not in ("imagesTr", "labelsTr"):
                d.rmdir()

    def write_splits(self, train: Sequence[str], val: Sequence[str]) -> None:
        """``splits_final.json`` with one fold reproducing a paper's train/val split."""
        train, val = sorted(train), sorted(val)
        overlap = set(train) & set(val)
        if overlap:
            raise SemidiffError(f"Cases {sorted(overlap)[:5]} are in both the training and the validation list.")
        if not train or not val:
            return
        save_json([{"train": train, "val": val}], self.root / "splits_final.json")

    def write_test_sets(self, sets: dict[str, Sequence[str]]) -> None:
        sets = {k: sorted(v) for k, v in sets.items() if v}
        if sets:
            save_json(sets, self.root / "test_sets.json")

    def finish(self, *, converter: str, channel_names: dict, labels: dict, dataset_name: str,
               source_form: str, description: str = "", reference: str = "", license: str = "",
               regions_class_order: Sequence[int] | None = None, extra: dict | None = None) -> dict:
        """Write ``dataset.json`` (via nnU-Net's ``generate_dataset_json``) after checking the folders."""
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        self.remove_empty_dirs()
        num_training = self.count("labelsTr")
        tr_cases = self.cases("imagesTr")
        if num_training == 0:
            raise ConversionError("No labelled training case was found in the source; check the SOURCE folder.")
        missing = sorted(set(tr_cases) - set(self.cases("labelsTr")))
        if missing:
            raise SemidiffError(f"Training cases {missing[:5]} have no label file; the converter is inconsistent.")
        info = {
            "converter": converter,
            "source_form": source_form,
            "numTest": len(self.cases("imagesTs")),
            "numTestLabels": self.count("labelsTs"),
            "numUnlabeled": len(self.cases("imagesUnlabeled")),
            "notes": list(self.notes),
        }
        if extra:
            info.update(extra)
        generate_dataset_json(
            str(self.root),
            channel_names=dict(channel_names),
            labels=dict(labels),
            num_training_cases=num_training,
            file_ending=self.file_ending,
            dataset_name=dataset_name,
            description=description or None,
            reference=reference or None,
            license=license or "see the dataset's original terms of use",
            converted_by="semidiff convert " + converter,
            regions_class_order=tuple(regions_class_order) if regions_class_order else None,
            semidiff=info,
        )
        return info


def save_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def labels_with_ignore(classes: Sequence[str]) -> dict[str, int]:
    """``{'background': 0, class_1: 1, ..., 'ignore': n}`` (nnU-Net wants the ignore label highest)."""
    labels = {name: i for i, name in enumerate(classes)}
    labels["ignore"] = len(classes)
    return labels


RGB_CHANNELS = {0: "R", 1: "G", 2: "B"}


# ----------------------------------------------------------------------------- jobs
def run_jobs(fn: Callable[..., Any], jobs: Sequence[dict], *, num_processes: int | None = None,
             description: str = "converting") -> list[Any]:
    """Run ``fn(**job)`` for every job, in a spawn process pool when there are enough jobs.

    ``fn`` must be a module-level function. A rich progress bar shows while it runs. The first
    error stops the conversion and is re-raised (a :class:`SemidiffError` keeps its message).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not jobs:
        return []
    n = default_num_processes() if num_processes is None else max(1, int(num_processes))
    n = min(n, len(jobs))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=True, disable=not _progress_enabled())
    results: list[Any] = [None] * len(jobs)
    with progress:
        task = progress.add_task(description, total=len(jobs))
        if n <= 1 or (len(jobs) < MIN_JOBS_FOR_POOL and num_processes is None):
            for i, job in enumerate(jobs):
                results[i] = fn(**job)
                progress.advance(task)
            return results
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, **job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=0.5)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        for p in pending:
                            p.cancel()
                        if isinstance(exc, SemidiffError):
                            raise SemidiffError(str(exc)) from None
                        raise exc
                    results[futures[fut]] = fut.result()
                    progress.advance(task)
    return results


def _progress_enabled() -> bool:
    if os.environ.get("SEMIDIFF_NO_PROGRESS"):
        return False
    try:
        import sys

        return sys.stderr.isatty()
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- verification
class _SerialPool:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


class _SerialMultiprocessing:
    @staticmethod
    def get_context(*_args, **_kwargs):
        return _SerialMultiprocessing

    Pool = _SerialPool


def verify_dataset(folder: Path, num_processes: int = 1) -> None:
    """nnU-Net's ``verify_dataset_integrity`` plus checks of the extra folders.

    With ``num_processes <= 1`` nnU-Net's check runs in this process (no spawn pool), which is
    much faster for small datasets. Failures raise :class:`SemidiffError` with nnU-Net's message.
    """
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    folder = Path(folder)
    buf = io.StringIO()
    try:
        if num_processes <= 1:
            original = vdi.multiprocessing
            vdi.multiprocessing = _SerialMultiprocessing
            try:
                with contextlib.redirect_stdout(buf):
                    vdi.verify_dataset_integrity(str(folder), 1)
            finally:
                vdi.multiprocessing = original
        else:
            with contextlib.redirect_stdout(buf):
                vdi.verify_dataset_integrity(str(folder), num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError, ValueError) as e:
        detail = [line for line in buf.getvalue().splitlines() if line.startswith("Error")]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        more = f" ({detail[0]})" if detail else ""
        raise SemidiffError(f"{folder.name} fails nnU-Net's integrity check: {first}{more}") from None
    check_extra_folders(folder)


def check_extra_folders(folder: Path) -> None:
    """``imagesTs``/``labelsTs``/``imagesUnlabeled`` follow nnU-Net naming and have the training channels."""
    ds = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    fe = ds["file_ending"]
    nch_files = None
    tr = folder / "imagesTr"
    per_case: dict[str, int] = {}
    for p in tr.iterdir():
        if p.name.endswith(fe):
            per_case[p.name[: -len(fe) - 5]] = per_case.get(p.name[: -len(fe) - 5], 0) + 1
    if per_case:
        nch_files = max(per_case.values())
    for sub in ("imagesTs", "imagesUnlabeled"):
        d = folder / sub
        if not d.is_dir():
            continue
        counts: dict[str, int] = {}
        for p in d.iterdir():
            stem = p.name[: -len(fe)] if p.name.endswith(fe) else ""
            if not stem or len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
                raise SemidiffError(f"{p} does not follow nnU-Net's naming CASE_XXXX{fe}.")
            counts[stem[:-5]] = counts.get(stem[:-5], 0) + 1
        wrong = [c for c, n in counts.items() if nch_files is not None and n != nch_files]
        if wrong:
            raise SemidiffError(f"{sub}/{wrong[0]} has {counts[wrong[0]]} channel file(s), imagesTr has {nch_files}.")
    lts = folder / "labelsTs"
    if lts.is_dir():
        images = {p.name[: -len(fe) - 5] for p in (folder / "imagesTs").iterdir()} if (folder / "imagesTs").is_dir() else set()
        for p in lts.iterdir():
            if p.name[: -len(fe)] not in images:
                raise SemidiffError(f"{p} has no image in imagesTs.")
    splits = folder / "splits_final.json"
    if splits.is_file():
        labelled = {p.name[: -len(fe)] for p in (folder / "labelsTr").iterdir()}
        for fold in json.loads(splits.read_text(encoding="utf-8")):
            unknown = (set(fold["train"]) | set(fold["val"])) - labelled
            if unknown:
                raise SemidiffError(f"splits_final.json names cases {sorted(unknown)[:5]} that are not in labelsTr.")


# ----------------------------------------------------------------------------- case jobs
def apply_value_map(arr: np.ndarray, mapping: dict[int, int] | None, path: Path | str,
                    strict: bool = False) -> np.ndarray:
    """Map label values (``{source: target}``); with ``strict`` an unmapped value is an error."""
    if not mapping:
        return arr
    out = arr.copy()
    values = np.unique(arr)
    for v in values.tolist():
        if v in mapping:
            out[arr == v] = mapping[v]
        elif strict:
            raise ConversionError(f"{path} contains the value {v}, which the value mapping {mapping} does not cover.")
    return out


def convert_case_2d(*, image: str, out_image: str, masks: Sequence[str] = (), out_label: str | None = None,
                    channels: str = "rgb", mode: str = "binary", threshold: int | None = None,
                    value_map: dict | None = None, strict_map: bool = False,
                    color_map: dict | None = None, allowed: Sequence[int] | None = None) -> list[int]:
    """Convert one 2D case (job function).

    ``mode``: ``binary`` (masks OR-merged, exact unless ``threshold``), ``nonzero`` (any value > 0,
    e.g. instance ids), ``values`` (label values kept, after ``value_map``/``color_map``).
    Returns the label values written.
    """
    img = read_image_2d(Path(image), channels)
    if out_label is None:
        write_png(img, Path(out_image))
        return []
    if not masks:
        raise ConversionError(f"{image} has no mask.")
    seg = None
    for m in masks:
        m = Path(m)
        if mode == "binary":
            arr = read_binary_mask_2d(m, threshold)
        elif mode == "nonzero":
            arr = (read_mask_2d(m) > 0).astype(np.uint8)
        elif mode == "values":
            arr = apply_value_map(read_mask_2d(m, color_map), value_map, m, strict_map)
        else:
            raise ValueError(mode)
        check_same_size(img, arr, Path(image), m)
        seg = arr if seg is None else np.maximum(seg, arr)
    if allowed is not None:
        check_values(seg, allowed, masks[0])
    write_png(img, Path(out_image))
    write_png(seg.astype(np.uint8), Path(out_label))
    return sorted(np.unique(seg).tolist())


def convert_case_3d(*, images: Sequence[str], out_images: Sequence[str], label: str | None = None,
                    out_label: str | None = None, value_map: dict | None = None, strict_map: bool = False,
                    allowed: Sequence[int] | None = None, binary: bool = False) -> list[int]:
    """Convert one 3D case (job function): images copied (re-encoded to .nii.gz if needed), the
    label mapped, checked and written as uint8 on the first image's grid."""
    import SimpleITK as sitk

    for src, dst in zip(images, out_images):
        copy_volume_image(Path(src), Path(dst))
    if label is None:
        return []
    ref = read_volume(Path(images[0]))
    lab_img = read_volume(Path(label))
    ref = label_volume_like(lab_img, ref, Path(label), Path(images[0]))
    arr = integer_labels(sitk.GetArrayFromImage(lab_img), label)
    if binary:
        arr = (arr > 0).astype(np.int32)
    arr = apply_value_map(arr, value_map, label, strict_map)
    if allowed is not None:
        check_values(arr, allowed, label)
    write_volume(arr.astype(np.uint8), Path(out_label), reference=ref)
    return sorted(np.unique(arr).tolist())


def parse_value_map(text: Any, name: str = "mapping") -> dict[int, int]:
    """``"255:1,128:2"`` or a dict -> ``{255: 1, 128: 2}``."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return {int(k): int(v) for k, v in text.items()}
    out = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            k, v = part.split(":")
            out[int(k)] = int(v)
        except ValueError:
            raise SemidiffError(f"Option {name}={text!r} must look like 255:1,128:2 (source:target pairs).") from None
    return out


def safe_case_id(text: str) -> str:
    """A case id nnU-Net handles well: spaces and odd characters replaced by '_'."""
    out = "".join(c if (c.isalnum() or c in "-_") else "_" for c in text.strip())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_") or "case"
