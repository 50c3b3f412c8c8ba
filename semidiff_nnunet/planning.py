"""Planning and preprocessing through nnU-Net, plus the unlabeled image pool.

nnU-Net plans and preprocesses ``imagesTr``/``labelsTr`` as usual. Images in an optional
``imagesUnlabeled/`` folder of the raw dataset (same file naming: ``CASE_0000.nii.gz``) are then
preprocessed with the *same* plans into ``<data_identifier>__unlabeled/``, image only: they never
enter the fingerprint, and no fake label is written. Optional ``labelsPseudo/CASE.ext`` (noisy
pseudo labels, e.g. from MedSAM) for unlabeled cases are preprocessed into
``<data_identifier>__pseudo/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.paths import PSEUDO_SUFFIX, UNLABELED_SUFFIX, ensure_nnunet_env


def dataset_name(dataset: str | int) -> str:
    """Accept ``27``, ``"27"``, ``"Dataset027_ACDC"``; return the dataset folder name or raise clearly."""
    ensure_nnunet_env()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    text = str(dataset).strip()
    if not text.startswith("Dataset") and not text.isdigit():
        raise SemidiffError(f"Dataset {text!r} is neither an id (990) nor a name (Dataset990_Demo2D).")
    try:
        name = maybe_convert_to_dataset_name(int(text) if text.isdigit() else text)
        if not any((Path(os.environ[v]) / name).is_dir() for v in ("nnUNet_raw", "nnUNet_preprocessed")):
            raise RuntimeError(name)
    except RuntimeError:
        raise SemidiffError(
            f"Dataset {text} was not found in nnUNet_raw ({os.environ['nnUNet_raw']}) or nnUNet_preprocessed "
            f"({os.environ['nnUNet_preprocessed']}); convert it first (semidiff convert ...) or point nnUNet_raw "
            f"at the folder that holds it.") from None
    return name


def dataset_id(name: str) -> int:
    return int(name[len("Dataset"):len("Dataset") + 3])


def raw_folder(name: str) -> Path:
    return Path(os.environ["nnUNet_raw"]) / name


def preprocessed_folder(name: str) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / name


DEFAULT_PLANNER = "ExperimentPlanner"


def planner_names() -> list[str]:
    """Every experiment planner class nnU-Net can find by name (the classes below
    ``nnunetv2.experiment_planning``, where ``nnUNetv2_plan_and_preprocess -pl`` looks)."""
    import importlib
    import inspect
    import pkgutil

    import nnunetv2.experiment_planning as root
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    found = set()
    for mod in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        try:
            module = importlib.import_module(mod.name)
        except Exception:  # noqa: BLE001 (a module nnU-Net itself could not import either)
            continue
        found.update(n for n, c in vars(module).items()
                     if inspect.isclass(c) and issubclass(c, ExperimentPlanner) and c.__module__ == module.__name__)
    return sorted(found)


def planner_class(name: str | None) -> type:
    """The planner class called ``name``, found as nnU-Net finds it (``recursive_find_python_class``
    under ``nnunetv2.experiment_planning``); an unknown name is one sentence listing the known ones."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    name = name or DEFAULT_PLANNER
    cls = None
    if name.isidentifier():
        with contextlib.redirect_stdout(io.StringIO()):
            cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                              current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise SemidiffError(f"--planner {name}: nnU-Net has no experiment planner of that name; known planners: "
                            f"{', '.join(planner_names())}.")
    return cls


def default_plans_name(planner: str | None) -> str:
    """The plans name a planner writes by default (``nnUNetPlans``, ``nnUNetResEncUNetMPlans``, ...)."""
    import inspect

    param = inspect.signature(planner_class(planner).__init__).parameters.get("plans_name")
    default = param.default if param is not None else inspect.Parameter.empty
    return default if isinstance(default, str) else "nnUNetPlans"


def plans_name_for(gpu_memory_target: float | None, plans_name: str | None, planner: str | None = None) -> str:
    """nnU-Net's plans name for these options: ``plans_name`` (``-overwrite_plans_name``) if given, else the
    planner's own name (``nnUNetPlans``, ``nnUNetResEncUNetMPlans``), with ``_<GB>GB`` appended for a
    ``gpu_memory_target`` (so plans for another GPU never overwrite the standard ones)."""
    if plans_name:
        return plans_name
    base = "nnUNetPlans" if planner in (None, DEFAULT_PLANNER) else default_plans_name(planner)
    if gpu_memory_target is None:
        return base
    return f"{base}_{gpu_memory_target:g}GB".replace(".", "p")


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON file as a dict; invalid JSON or a missing ``required`` key is one sentence naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SemidiffError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise SemidiffError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the "
                            f"file.") from None
    if not isinstance(data, dict):
        raise SemidiffError(f"{path} must hold a JSON object ({{...}}); fix the file.")
    missing = [k for k in required if k not in data]
    if missing:
        raise SemidiffError(f"{path} has no {', '.join(repr(k) for k in missing)} entry; add it (nnU-Net's "
                            f"dataset.json needs channel_names, labels, numTraining and file_ending).")
    return data


def dataset_json(folder: Path) -> dict:
    """``folder/dataset.json`` (a raw, preprocessed or model folder), checked for what semidiff reads."""
    return read_json(Path(folder) / "dataset.json", required=("labels", "file_ending"))


def load_plans(name: str, plans_name: str) -> dict:
    path = preprocessed_folder(name) / f"{plans_name}.json"
    if not path.is_file():
        raise SemidiffError(f"No plans {plans_name!r} for {name} ({path} is missing); run "
                            f"`semidiff plan-and-train` (or nnUNetv2_plan_and_preprocess) first.")
    return read_json(path)


_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".bmp", ".tif", ".tiff", ".jpg")


def verify_raw_dataset(name: str, num_processes: int = 2) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = raw_folder(name)
    if not (folder / "dataset.json").is_file():
        raise SemidiffError(f"{folder} has no dataset.json; convert the dataset with `semidiff convert` or write one.")
    if not (folder / "labelsTr").is_dir():
        raise SemidiffError(f"{folder} has no labelsTr folder; nnU-Net needs a label file for every training case.")
    try:
        verify_dataset_integrity(str(folder), num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = lines[0]
        # a reader's error (SimpleITK) names the file on a later line: keep that line
        naming = next((ln for ln in lines if str(folder) in ln or ln.rstrip('"').endswith(_FILE_ENDINGS)), None)
        if naming and naming != first:
            first = f"{first.rstrip(':')}: {naming}"
        raise SemidiffError(f"{name} fails nnU-Net's integrity check: {first} Fix the raw dataset and retry.") from None


def extract_fingerprint(name: str, num_processes: int = 2, max_voxels: float | None = None,
                        overwrite: bool = False) -> None:
    """nnU-Net's fingerprint; ``max_voxels`` caps the foreground intensity sample (default nnU-Net's 1e8)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    extractor = DatasetFingerprintExtractor(name, num_processes, verbose=False)
    if max_voxels is not None:
        extractor.num_foreground_voxels_for_intensitystats = float(max_voxels)
    extractor.run(overwrite_existing=overwrite)


def plan(name: str, gpu_memory_target: float | None = None, plans_name: str | None = None,
         planner: str | None = None) -> str:
    """nnU-Net's experiment planning with the planner class called ``planner`` (default
    ``ExperimentPlanner``; ``nnUNetPlannerResEncM`` etc.); returns the plans name."""
    ExperimentPlanner = planner_class(planner)
    pname = plans_name_for(gpu_memory_target, plans_name, planner)
    kwargs = {"plans_name": pname}
    if gpu_memory_target is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target)
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (a CPU training setting)
    saved = os.environ.pop("nnUNet_n_proc_DA", None) if os.environ.get("nnUNet_n_proc_DA") == "0" else None
    try:
        ExperimentPlanner(name, **kwargs).plan_experiment()
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    return pname


def preprocess(name: str, plans_name: str, configurations: list[str], num_processes: int = 2) -> None:
    """nnU-Net's preprocessing (incl. the gt_segmentations copy), then the unlabeled pool."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    plans = load_plans(name, plans_name)
    for c in configurations:
        if c not in plans["configurations"]:
            raise SemidiffError(f"Configuration {c!r} is not in the plans of {name} (has: "
                                f"{', '.join(plans['configurations'])}); pick one of those with -c.")
        preprocess_dataset(dataset_id(name), plans_name, [c], [num_processes], verbose=False,
                           show_progress_bar=False)
        preprocess_unlabeled(name, plans_name, c)


def adopt_raw_split(name: str) -> bool:
    """Copy a converter's ``splits_final.json`` (the paper's split) next to the preprocessed data.

    nnU-Net reads the split from ``nnUNet_preprocessed``; an existing one there is never replaced.
    """
    src = raw_folder(name) / "splits_final.json"
    dst = preprocessed_folder(name) / "splits_final.json"
    if src.is_file() and not dst.is_file() and dst.parent.is_dir():
        shutil.copyfile(src, dst)
        return True
    return False


def _case_files(folder: Path, file_ending: str) -> dict[str, list[str]]:
    cases: dict[str, list[str]] = {}
    for f in sorted(folder.iterdir()):
        if not f.name.endswith(file_ending):
            continue
        stem = f.name[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise SemidiffError(f"{f} does not follow nnU-Net's naming CASE_XXXX{file_ending} (channel suffix); "
                                f"rename it.")
        cases.setdefault(stem[:-5], []).append(str(f))
    return cases


def preprocess_unlabeled(name: str, plans_name: str, configuration: str) -> int:
    """Preprocess ``imagesUnlabeled/`` (and ``labelsPseudo/``) with the dataset's plans; return #images."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = raw_folder(name)
    unl = raw / "imagesUnlabeled"
    pseudo = raw / "labelsPseudo"
    if not unl.is_dir() and not pseudo.is_dir():
        return 0
    ds = dataset_json(raw)
    file_ending = ds["file_ending"]
    n_channels = len(ds.get("channel_names", ds.get("modality", {})))
    plans_manager = PlansManager(str(preprocessed_folder(name) / f"{plans_name}.json"))
    cm = plans_manager.get_configuration(configuration)
    out_base = preprocessed_folder(name) / cm.data_identifier
    pp = DefaultPreprocessor(verbose=False)

    labeled_ids = {f.name[: -len(file_ending)] for f in (raw / "labelsTr").iterdir() if f.name.endswith(file_ending)}
    count = 0
    if unl.is_dir():
        cases = _case_files(unl, file_ending)
        clash = sorted(set(cases) & labeled_ids)
        if clash:
            raise SemidiffError(f"imagesUnlabeled/ reuses training case id {clash[0]!r}; give unlabeled images "
                                f"their own case ids.")
        for case, files in cases.items():
            if len(files) != n_channels:
                raise SemidiffError(f"imagesUnlabeled/ case {case} has {len(files)} channel file(s), the dataset "
                                    f"declares {n_channels}.")
        out = Path(str(out_base) + UNLABELED_SUFFIX)
        count += _write_cases(out, cases, None, pp, plans_manager, cm, ds, save_seg=False)
    if pseudo.is_dir():
        images = {}
        for f in sorted(pseudo.iterdir()):
            if not f.name.endswith(file_ending):
                continue
            case = f.name[: -len(file_ending)]
            src = raw / "imagesTr" if case in labeled_ids else unl
            files = sorted(str(p) for p in src.glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"))
            if not files:
                raise SemidiffError(f"labelsPseudo/{f.name} has no image in imagesTr/ or imagesUnlabeled/.")
            images[case] = files
        out = Path(str(out_base) + PSEUDO_SUFFIX)
        _write_cases(out, images, {c: str(pseudo / f"{c}{file_ending}") for c in images}, pp, plans_manager, cm,
                     ds, save_seg=True)
    return count


def _write_cases(out: Path, cases: dict, segs: dict | None, pp, plans_manager, cm, dataset_json, save_seg) -> int:
    """Write preprocessed cases to a temporary folder (named for this process), then move it into place
    (never half-written)."""
    import blosc2
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blosc2.set_nthreads(1)
    try:
        for case, files in cases.items():
            seg_file = segs[case] if segs else None
            data, seg, props = pp.run_case(files, seg_file, plans_manager, cm, dataset_json)
            data = np.ascontiguousarray(data.astype(np.float32, copy=False))
            blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
            blosc2.asarray(data, urlpath=str(tmp / f"{case}.b2nd"), chunks=chunks, blocks=blocks)
            if save_seg:
                seg = np.ascontiguousarray(seg.astype(np.int16, copy=False))
                blocks, chunks = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
                blosc2.asarray(seg, urlpath=str(tmp / f"{case}_seg.b2nd"), chunks=chunks, blocks=blocks)
            else:
                props.pop("class_locations", None)
            with open(tmp / f"{case}.pkl", "wb") as f:
                pickle.dump(props, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return len(cases)


def shrink_plans(name: str, plans_name: str, new_plans_name: str, max_features: int | None = None,
                 batch_size: int | None = None, patch_size: dict[str, list[int]] | None = None,
                 n_conv_per_stage: int | None = None) -> str:
    """Copy a plans file with a smaller network/batch (same preprocessed data). For tests, demos, CPUs."""
    plans = load_plans(name, plans_name)
    plans["plans_name"] = new_plans_name
    for cname, c in plans["configurations"].items():
        if "architecture" not in c:
            continue
        kw = c["architecture"]["arch_kwargs"]
        if max_features is not None:
            kw["features_per_stage"] = [min(f, max_features) for f in kw["features_per_stage"]]
        if n_conv_per_stage is not None:
            enc = "n_conv_per_stage" if "n_conv_per_stage" in kw else "n_blocks_per_stage"  # plain / residual
            kw[enc] = [n_conv_per_stage] * len(kw[enc])
            kw["n_conv_per_stage_decoder"] = [n_conv_per_stage] * len(kw["n_conv_per_stage_decoder"])
        if batch_size is not None:
            c["batch_size"] = batch_size
        if patch_size and cname in patch_size:
            c["patch_size"] = list(patch_size[cname])
    path = preprocessed_folder(name) / f"{new_plans_name}.json"
    path.write_text(json.dumps(plans, indent=2), encoding="utf-8")
    return new_plans_name
