"""Polyp datasets: ``kvasir-seg``, ``cvc-clinicdb`` and ``polyp-pranet`` (the PraNet package).

Forms:

* Kvasir-SEG download: ``Kvasir-SEG/{images,masks}/<id>.jpg`` (1000; masks are JPEG, so they are
  thresholded at 127). Every case goes to imagesTr (there is no official split).
* CVC-ClinicDB download: ``Original/*.tif`` and ``Ground Truth/*.tif`` (612), also the
  ``PNG/``/``TIF/`` variant; every case goes to imagesTr.
* PraNet package: ``TrainDataset/{image,mask}/*.png`` (900 Kvasir + 550 ClinicDB = 1450) and
  ``TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,CVC-300,ETIS-LaribPolypDB}/{images,masks}``
  (possibly nested ``TestDataset/TestDataset``). ``polyp-pranet`` converts all of it (test sets
  to imagesTs/labelsTs, membership in ``test_sets.json``); ``kvasir-seg`` and ``cvc-clinicdb``
  given the package take their own part (ClinicDB training images have numeric names, Kvasir's
  are ids).

All polyp masks are thresholded at 127 (JPEG noise, also inside the package's PNGs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semidiff_nnunet.dataset_conversion.common import (
    IMAGE_EXTS_2D,
    RGB_CHANNELS,
    ConversionError,
    DatasetWriter,
    convert_case_2d,
    find_dir,
    list_files,
    log,
    run_jobs,
    safe_case_id,
    strip_ext,
)

THRESHOLD = 127
LABELS = {"background": 0, "polyp": 1}
TEST_SETS = {  # folder name in TestDataset -> case prefix
    "Kvasir": "kvasir",
    "CVC-ClinicDB": "clinicdb",
    "CVC-ColonDB": "colondb",
    "CVC-300": "cvc300",
    "ETIS-LaribPolypDB": "etis",
}


def _sub(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (folder / n).is_dir():
            return folder / n
    return None


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a folder with ``image(s)/`` and ``mask(s)/`` subfolders, matched by stem."""
    img_d = _sub(folder, ("images", "image", "Original"))
    msk_d = _sub(folder, ("masks", "mask", "Ground Truth", "GroundTruth"))
    if img_d is None or msk_d is None:
        raise ConversionError(f"{folder} needs an images/ and a masks/ folder (or image/ and mask/).")
    masks = {strip_ext(p.name): p for p in list_files(msk_d, IMAGE_EXTS_2D)}
    out = []
    for img in list_files(img_d, IMAGE_EXTS_2D):
        m = masks.get(strip_ext(img.name))
        if m is None:
            raise ConversionError(f"{msk_d} has no mask for {img.name}; expected a file with the same name.")
        out.append((img, m))
    if not out:
        raise ConversionError(f"{img_d} holds no images; expected png/jpg/tif files.")
    return out


def find_pranet(source: Path) -> tuple[Path | None, Path | None]:
    train = find_dir(source, "TrainDataset", max_depth=2)
    test = find_dir(source, "TestDataset", max_depth=2)
    if test is not None and (test / "TestDataset").is_dir():
        test = test / "TestDataset"
    return train, test


def _find_kvasir_original(source: Path) -> Path | None:
    for cand in (source, source / "Kvasir-SEG", source / "kvasir-seg"):
        if (cand / "images").is_dir() and (cand / "masks").is_dir():
            return cand
    found = find_dir(source, "Kvasir-SEG", max_depth=2)
    if found is not None and (found / "images").is_dir():
        return found
    return None


def _find_clinicdb_original(source: Path) -> Path | None:
    for cand in (source, source / "CVC-ClinicDB", source / "PNG", source / "TIF"):
        if (cand / "Original").is_dir() and (cand / "Ground Truth").is_dir():
            return cand
    found = find_dir(source, "Original", max_depth=3)
    if found is not None and (found.parent / "Ground Truth").is_dir():
        return found.parent
    return None


def _case(prefix: str, img: Path) -> str:
    """The case id of ``img``: ``prefix`` + its sanitised stem (the one naming rule of all three converters)."""
    return f"{prefix}{safe_case_id(strip_ext(img.name))}"


def _job(w: DatasetWriter, split: str, case: str, img: Path, msk: Path) -> dict:
    return dict(image=str(img), out_image=str(w.image(split, case)), masks=[str(msk)],
                out_label=str(w.label(split, case)), channels="rgb", mode="binary", threshold=THRESHOLD,
                allowed=(0, 1))


def _is_clinicdb_name(p: Path) -> bool:
    return strip_ext(p.name).isdigit()


def _pranet_test_jobs(w: DatasetWriter, test: Path | None, only: tuple[str, ...] | None) -> tuple[list, dict]:
    jobs, sets = [], {}
    if test is None:
        return jobs, sets
    for folder, prefix in TEST_SETS.items():
        if only is not None and folder not in only:
            continue
        d = test / folder
        if not d.is_dir():
            log.warning("PraNet TestDataset has no %s folder; that test set is skipped.", folder)
            continue
        for img, msk in _pairs(d):
            case = _case(f"{prefix}_", img)
            jobs.append(_job(w, "test", case, img, msk))
            sets.setdefault(folder, []).append(case)
    return jobs, sets


def _run(w: DatasetWriter, jobs: list, sets: dict, *, converter: str, name: str, form: str,
         num_processes: int | None) -> dict:
    w.make_dirs("train")
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description=f"{converter}: converting")
    w.write_test_sets(sets)
    return w.finish(converter=converter, channel_names=RGB_CHANNELS, labels=LABELS, dataset_name=name,
                    source_form=form, description=f"{name} polyp segmentation (binary); masks thresholded at {THRESHOLD}")


@dataclass(frozen=True)
class _Part:
    """A dataset with a download of its own that is also a part of the PraNet package."""

    converter: str
    dataset_name: str
    test_set: str  # its folder in TestDataset
    prefix: str  # case-id prefix of its training cases
    download: str  # its own download, as detected (source_form)
    expected: str  # its own download's layout (error message)
    find_download: Callable[[Path], Path | None]
    in_train: Callable[[Path], bool]  # which TrainDataset images are its own


KVASIR = _Part("kvasir-seg", "KvasirSEG", "Kvasir", "", "Kvasir-SEG download (JPEG images and masks)",
               "Kvasir-SEG download (Kvasir-SEG/images + masks)", _find_kvasir_original,
               lambda img: not _is_clinicdb_name(img))
CLINICDB = _Part("cvc-clinicdb", "CVCClinicDB", "CVC-ClinicDB", "clinicdb_",
                 "CVC-ClinicDB download (Original/ + Ground Truth/)",
                 "CVC-ClinicDB download (Original/ + Ground Truth/)", _find_clinicdb_original, _is_clinicdb_name)


def _convert_part(part: _Part, source: Path, target: Path, num_processes: int | None) -> dict:
    """Convert ``part`` from its own download or, failing that, from its share of the PraNet package."""
    source = Path(source)
    w = DatasetWriter(target, ".png")
    own = part.find_download(source)
    if own is not None:
        form = part.download
        jobs, sets = [_job(w, "train", _case(part.prefix, img), img, msk) for img, msk in _pairs(own)], {}
    else:
        train, test = find_pranet(source)
        if train is None:
            raise ConversionError(f"{source} is neither a {part.expected} nor the PraNet package "
                                  f"(TrainDataset/ + TestDataset/).")
        form = f"PraNet package ({part.test_set} part)"
        jobs = [_job(w, "train", _case(part.prefix, img), img, msk) for img, msk in _pairs(train) if part.in_train(img)]
        test_jobs, sets = _pranet_test_jobs(w, test, (part.test_set,))
        jobs += test_jobs
        w.make_dirs("test")
    log.info("%s: detected %s", part.converter, form)
    return _run(w, jobs, sets, converter=part.converter, name=part.dataset_name, form=form,
                num_processes=num_processes)


def convert_kvasir(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    return _convert_part(KVASIR, source, target, num_processes)


def convert_clinicdb(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    return _convert_part(CLINICDB, source, target, num_processes)


def convert_pranet(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    source = Path(source)
    train, test = find_pranet(source)
    if train is None or test is None:
        raise ConversionError(f"{source} is not the PraNet polyp package; expected TrainDataset/ and TestDataset/ "
                              f"folders.")
    w = DatasetWriter(target, ".png")
    jobs = [_job(w, "train", _case("clinicdb_" if _is_clinicdb_name(img) else "kvasir_", img), img, msk)
            for img, msk in _pairs(train)]
    test_jobs, sets = _pranet_test_jobs(w, test, None)
    w.make_dirs("test")
    w.note(f"test sets: {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}")
    return _run(w, jobs + test_jobs, sets, converter="polyp-pranet", name="PolypPraNet",
                form="PraNet package (TrainDataset + TestDataset)", num_processes=num_processes)
