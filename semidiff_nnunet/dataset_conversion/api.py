"""``convert_dataset``: run a registered converter into ``$nnUNet_raw/Dataset{id:03d}_{Name}``.

The converter writes into a hidden temporary folder next to the target; only a complete (and,
with ``verify``, integrity-checked) dataset is moved into place. The source is only read.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.registry import get_registry
from semidiff_nnunet.specs import ConverterSpec

log = logging.getLogger("semidiff_nnunet.convert")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def get_converter(name: str) -> ConverterSpec:
    """The converter registered under ``name``: the registry is the only way to one (the built-in
    converters come through the ``converters`` entry point, others through their plugins)."""
    return get_registry().converter(name)


def list_converters() -> list[dict]:
    """Every registered converter: name, summary, default id/name, source layout, download hint, provider."""
    out = []
    for name, entry in get_registry().entries("converter").items():
        spec = entry.spec
        out.append({
            "name": name,
            "summary": spec.summary,
            "reference": spec.reference,
            "default_id": spec.default_id,
            "default_name": spec.default_name,
            "source_layout": spec.source_layout,
            "download_hint": spec.download_hint,
            "options": dict(spec.extra.get("options", {})),
            "provider": entry.provider,
        })
    return out


def _accepted_options(convert) -> tuple[set[str], bool]:
    sig = inspect.signature(convert)
    names = set()
    var_kw = False
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif i >= 2:
            names.add(pname)
    return names, var_kw


def target_folder(raw_root: Path, dataset_id: int, dataset_name: str) -> Path:
    return Path(raw_root) / f"Dataset{dataset_id:03d}_{dataset_name}"


def convert_dataset(name: str, source: Path, *, dataset_id: int | None = None, dataset_name: str | None = None,
                    raw_root: Path | None = None, overwrite: bool = False, verify: bool = False,
                    num_processes: int | None = None, **options) -> Path:
    """Convert ``source`` with converter ``name``; return the new dataset folder.

    ``raw_root`` defaults to ``$nnUNet_raw`` (or the semidiff workspace). Options unknown to the
    converter are an error that lists the ones it takes.
    """
    spec = get_converter(name)
    source = Path(source).expanduser()
    if not source.exists():
        raise SemidiffError(f"{source} does not exist; give the folder of the original {name} download.")
    if not source.is_dir():
        raise SemidiffError(f"{source} is a file; extract the download and give its folder.")
    source = source.resolve()

    if dataset_id is None:
        dataset_id = spec.default_id
    if dataset_id is None:
        raise SemidiffError(f"Converter {name!r} has no default dataset id; give one with --id.")
    if not 1 <= int(dataset_id) <= 999:
        raise SemidiffError(f"Dataset id {dataset_id} is out of range; nnU-Net ids are 1..999.")
    dataset_id = int(dataset_id)
    dataset_name = dataset_name or spec.default_name or name
    if not _NAME_RE.match(dataset_name):
        raise SemidiffError(f"Dataset name {dataset_name!r} may only hold letters, digits, '_' and '-'.")

    if raw_root is None:
        from semidiff_nnunet.paths import raw_root as _raw_root

        raw_root = _raw_root()
    raw_root = Path(raw_root).expanduser()
    raw_root.mkdir(parents=True, exist_ok=True)
    target = target_folder(raw_root, dataset_id, dataset_name)
    if source == target.resolve() or target.resolve() in source.parents:
        raise SemidiffError(f"{source} lies inside the target {target}; convert from the original download.")

    others = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p != target)
    if others:
        raise SemidiffError(f"Dataset id {dataset_id} is already used by {raw_root / others[0]}; choose another --id.")
    if target.exists() and not overwrite:
        raise SemidiffError(f"{target} already exists; pass --overwrite to replace it.")

    accepted, var_kw = _accepted_options(spec.convert)
    unknown = sorted(k for k in options if k not in accepted and not var_kw)
    if unknown:
        takes = ", ".join(sorted(accepted - {"num_processes"})) or "none"
        raise SemidiffError(f"Converter {name!r} does not take option {unknown[0]!r}; it takes: {takes}.")
    if "num_processes" in accepted or var_kw:
        options["num_processes"] = num_processes

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=raw_root))
    try:
        log.info("converting %s from %s", name, source)
        spec.convert(source, tmp, **options)
        if not (tmp / "dataset.json").is_file():
            raise SemidiffError(f"Converter {name!r} wrote no dataset.json; the converter is broken.")
        ds = json.loads((tmp / "dataset.json").read_text(encoding="utf-8"))
        ds["name"] = dataset_name
        (tmp / "dataset.json").write_text(json.dumps(ds, indent=4, sort_keys=False), encoding="utf-8")
        if verify:
            from semidiff_nnunet.dataset_conversion.common import verify_dataset

            verify_dataset(tmp, num_processes=1 if num_processes is None else num_processes)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=raw_root))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def summary(folder: Path) -> dict:
    """Counts and notes of a converted dataset (for printing)."""
    ds = json.loads((Path(folder) / "dataset.json").read_text(encoding="utf-8"))
    info = dict(ds.get("semidiff", {}))
    info["numTraining"] = ds["numTraining"]
    info["labels"] = ds["labels"]
    info["channel_names"] = ds["channel_names"]
    info["file_ending"] = ds["file_ending"]
    info["splits_final"] = (Path(folder) / "splits_final.json").is_file()
    return info
