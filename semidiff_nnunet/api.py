"""The Python API behind the ``semidiff`` command line (the CLI only parses and prints).

    from semidiff_nnunet import api
    api.plan_and_preprocess("Dataset990_Demo2D", ["2d"])
    run = api.train("Dataset990_Demo2D", "mean-teacher", labeled="0.1", configuration="2d", device="cpu")
    api.predict("Dataset990_Demo2D", "mean-teacher", labeled="0.1", configuration="2d", input=..., output=...)
    api.evaluate("Dataset990_Demo2D", pred=..., ref=...)

Importing this module is light (no torch, no nnU-Net): listing methods and plugins must answer at
once. Functions that train, plan or predict import what they need when called.

``--set`` items (``overrides``) are ``{"key": "value"}`` or a list of ``"key=value"`` strings:
``key`` is a hyperparameter of the method, ``phase.NAME`` the length of one of its training
phases (a share of the run like ``0.3`` or a number of epochs like ``40``), and
``method:key`` restricts an item to one method (for :func:`benchmark`, where ``key`` alone
applies to every method that has it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semidiff_nnunet import locks, paths, planning
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.registry import get_registry

if TYPE_CHECKING:
    import torch

    from semidiff_nnunet.training.progress import TrainingProgress
    from semidiff_nnunet.training.splits import LabeledSpec, SemiSplit

SHIM_MODULE = "semidiff_registered_trainers.py"


# ---------------------------------------------------------------------------------------------- workspace
def ensure_workspace() -> tuple[list[str], Path]:
    """Fill unset nnU-Net path variables with folders of the semidiff workspace; return (the names that
    were filled, the workspace)."""
    return paths.ensure_nnunet_env(), paths.workspace()


# ---------------------------------------------------------------------------------------------- registry
def list_methods() -> list[dict]:
    reg = get_registry()
    return [{"name": n, "summary": e.spec.summary, "reference": e.spec.reference, "provider": e.provider,
             "distribution": e.distribution} for n, e in reg.entries("method").items()]


def list_plugins() -> tuple[list, list]:
    reg = get_registry()
    reg.entries("method")  # collect specs so hook failures are recorded too
    for kind in ("network", "diffusion_head", "loss", "converter"):
        reg.entries(kind)
    return list(reg.plugins.values()), list(reg.failures)


def skipped_plugins() -> list[str]:
    """Entry points of third-party plugins not loaded because ``SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD`` is set."""
    return [f"{name} ({dist})" for name, dist in get_registry().skipped]


def method_trainer(method: str) -> type:
    return get_registry().method(method).load_trainer()


def run_root(method: str, labeled: str = "1.0", seed: int = 0) -> Path:
    """The ``nnUNet_results``-like folder of the runs of (method, labeled spec, seed)."""
    from semidiff_nnunet.training.splits import LabeledSpec

    get_registry().method(method)  # an unknown name is answered with the closest ones
    return paths.run_root(method, LabeledSpec.parse(labeled).tag, seed)


# ---------------------------------------------------------------------------------------------- options
def parse_fold(value: int | str) -> int | str:
    """``"0"`` → 0, ``"all"`` → ``"all"``; anything else is a one-sentence error."""
    text = str(value).strip()
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    raise SemidiffError(f"--fold {value}: give a fold number (0, 1, ...) or all.")


def parse_overrides(overrides: dict | Sequence[str] | None) -> dict:
    """``--set`` items as a dict: a dict is returned as it is, a list of ``"key=value"`` strings parsed."""
    if overrides is None or isinstance(overrides, dict):
        return dict(overrides or {})
    from semidiff_nnunet.training.hparams import parse_overrides as parse

    return parse(list(overrides))


def parse_list(value: str | Sequence, what: str) -> list[str]:
    """A comma-separated option (``"a,b"``) or a list, as a non-empty list of strings."""
    items = [t.strip() for t in value.split(",")] if isinstance(value, str) else [str(t).strip() for t in value]
    items = [t for t in items if t]
    if not items:
        raise SemidiffError(f"{what} is empty; give a comma-separated list.")
    return items


def _check_counts(minimum: int = 1, **options: int | None) -> None:
    for option, value in options.items():
        if value is not None and value < minimum:
            raise SemidiffError(f"--{option.replace('_', '-')} must be at least {minimum} (got {value}).")


def method_overrides(methods: Sequence[str], overrides: dict | Sequence[str] | None) -> dict[str, dict]:
    """Which ``--set`` items apply to which method, every key and value checked: ``{method: {key: value}}``.

    ``method:key=value`` applies to that method only (and wins over ``key=value``). With one method,
    every plain item must be one of its hyperparameters or phases; with several, a plain item
    applies to every method that has the key and must apply to at least one.
    """
    from semidiff_nnunet.training.hparams import resolve_hparams
    from semidiff_nnunet.training.run_config import PHASE_PREFIX, check_phase_overrides, split_overrides

    items = parse_overrides(overrides)
    classes = {m: method_trainer(m) for m in methods}
    plain: dict = {}
    targeted: dict[str, dict] = {m: {} for m in classes}
    for key, value in items.items():
        prefix, sep, rest = str(key).partition(":")
        if not sep:
            plain[key] = value
        elif prefix in targeted and rest:
            targeted[prefix][rest.strip()] = value
        else:
            raise SemidiffError(f"--set {key}={value}: {prefix!r} is not one of this command's methods "
                                f"({', '.join(classes)}); write METHOD:KEY=VALUE with one of them.")

    def accepts(cls, key: str) -> bool:
        if key.startswith(PHASE_PREFIX):
            return key[len(PHASE_PREFIX):] in [p.name for p in getattr(cls, "phases", ())]
        return key in {f.name for f in _dataclass_fields(cls.hparams_class)}

    result, used = {}, set()
    for m, cls in classes.items():
        mine = dict(plain) if len(classes) == 1 else {k: v for k, v in plain.items() if accepts(cls, k)}
        used |= set(mine)
        mine.update(targeted[m])
        hp, phases = split_overrides(mine)
        try:
            resolve_hparams(cls.hparams_class, hp)
            check_phase_overrides(phases, getattr(cls, "phases", ()))
        except SemidiffError as e:
            if len(classes) == 1:
                raise
            raise SemidiffError(f"{m}: {e}") from None
        result[m] = mine
    unused = sorted(set(plain) - used)
    if unused:
        raise SemidiffError(f"--set {unused[0]} is not a hyperparameter of any of {', '.join(classes)}.")
    return result


def _dataclass_fields(cls) -> tuple:
    import dataclasses

    return dataclasses.fields(cls)


@dataclass
class TrainOptions:
    """A run's options, checked: what :func:`check_train_options` returns."""

    trainer_cls: type
    labeled: LabeledSpec
    fold: int | str
    hparams: Any  # the method's hyperparameter dataclass
    hparam_overrides: dict
    phases: dict[str, str]
    device: torch.device


def check_train_options(method: str, labeled: str = "1.0", fold: int | str = 0, device: str = "auto",
                        overrides: dict | Sequence[str] | None = None, epochs: int | None = None,
                        iters_per_epoch: int | None = None, val_iters_per_epoch: int | None = None,
                        save_every: int | None = None, configuration: str | None = None,
                        dim: int | None = None) -> TrainOptions:
    """Check every option of a run that can be checked without the dataset (method, fold, labeled spec,
    ``--set`` keys and values, counts, device, and what the method itself refuses: its trainer's
    ``check_options``), so that a mistake is answered before hours of planning.

    ``dim``: the configuration's spatial dimensions once planned; before planning it is guessed from
    nnU-Net's standard names (``2d``; ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``)."""
    fold = parse_fold(fold)  # the cheap checks first, before torch is imported
    _check_counts(epochs=epochs, iters_per_epoch=iters_per_epoch, save_every=save_every)
    _check_counts(0, val_iters=val_iters_per_epoch)
    get_registry().method(method)

    from semidiff_nnunet.training.hparams import resolve_hparams
    from semidiff_nnunet.training.run_config import split_overrides
    from semidiff_nnunet.training.splits import LabeledSpec

    trainer_cls = method_trainer(method)
    spec = LabeledSpec.parse(labeled)
    mine = method_overrides([method], overrides)[method]
    hp_overrides, phases = split_overrides(mine)
    hp = resolve_hparams(trainer_cls.hparams_class, hp_overrides)
    if dim is None and configuration is not None:
        dim = configuration_dim(configuration)
    check = getattr(trainer_cls, "check_options", None)  # SemiSupervisedTrainer's hook (a bare class may lack it)
    if check is not None:
        check(hp, configuration, dim)
    return TrainOptions(trainer_cls, spec, fold, hp, hp_overrides, phases, resolve_device(device))


def configuration_dim(configuration: str) -> int | None:
    """Spatial dimensions of an nnU-Net configuration by its name (None for a name nnU-Net does not plan
    by default: only its plans know)."""
    if configuration == "2d":
        return 2
    if configuration in ("3d_fullres", "3d_lowres", "3d_cascade_fullres"):
        return 3
    return None


# ---------------------------------------------------------------------------------------------- shim
def write_trainer_shim() -> Path:
    """Write the ``nnUNet_extTrainer`` folder: one module importing every registered trainer class."""
    folder = paths.shim_folder()
    lines = ['"""Generated by semidiff: lets stock nnU-Net find semidiff trainers by class name."""']
    for entry in get_registry().entries("method").values():
        try:
            cls = entry.spec.load_trainer()
        except Exception:  # noqa: BLE001 - a broken plugin is reported by `semidiff plugins`
            continue
        lines.append("try:")
        lines.append(f"    from {cls.__module__} import {cls.__name__}  # method {entry.spec.name!r}")
        lines.append("except Exception:  # noqa: BLE001\n    pass")
    text = "\n".join(lines) + "\n"
    target = folder / SHIM_MODULE
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{SHIM_MODULE}.tmp{os.getpid()}"  # runs of other methods may write it at the same time
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return folder


def activate_trainer_shim() -> Path:
    folder = str(write_trainer_shim())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([folder] + current)
    return Path(folder)


def env_lines(run_dir: Path | None = None) -> list[str]:
    """``export`` lines stock nnU-Net commands need to load semidiff runs."""
    paths.ensure_nnunet_env()
    lines = [f"export {v}={_quote(os.environ[v])}" for v in paths.NNUNET_VARS if v != "nnUNet_results"]
    lines.append(f"export nnUNet_results={_quote(str(run_dir) if run_dir else os.environ['nnUNet_results'])}")
    lines.append(f"export nnUNet_extTrainer={_quote(str(write_trainer_shim()))}")
    return lines


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ---------------------------------------------------------------------------------------------- devices
def resolve_device(device: str):
    import torch

    device = device.lower()
    if device == "auto":
        mps = getattr(torch.backends, "mps", None)
        device = "cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SemidiffError("--device cuda was requested but no CUDA GPU is visible; use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SemidiffError("--device mps was requested but MPS is not available; use --device cpu.")
    if device not in ("cpu", "cuda", "mps"):
        raise SemidiffError(f"--device {device!r}: choose auto, cpu, cuda or mps.")
    if device == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
        # augmentation workers compete with the CPU's compute; nnU-Net's default assumes a GPU server
        os.environ.setdefault("nnUNet_n_proc_DA", "0" if (os.cpu_count() or 1) <= 4 else str(os.cpu_count() // 4))
    return torch.device("cuda", 0) if device == "cuda" else torch.device(device)


# ---------------------------------------------------------------------------------------------- planning
def plan_and_preprocess(dataset: str | int, configurations: list[str] | None = None,
                        gpu_memory_target: float | None = None, plans_name: str | None = None,
                        num_processes: int = 2, verify: bool = True, fingerprint_voxels: float | None = None,
                        force: bool = False, show_progress: bool = True, planner: str | None = None,
                        wait: bool = False, log: Callable[[str], None] | None = None) -> str:
    """Fingerprint, plan and preprocess (skipping steps already done); return the plans name.

    One process at a time writes a dataset's preprocessed data (:mod:`semidiff_nnunet.locks`): while another
    holds it, this one refuses naming it, or with ``wait`` waits for it (telling ``log``) and then skips
    what that one did.

    ``planner``: the nnU-Net experiment planner class by name (``nnUNetv2_plan_and_preprocess -pl``):
    ``ExperimentPlanner`` (default), ``nnUNetPlannerResEncM``/``L``/``XL`` or any planner nnU-Net finds; the
    plans take the planner's name (``nnUNetResEncUNetMPlans``) unless ``plans_name`` is given."""
    if planner not in (None, planning.DEFAULT_PLANNER):
        planning.planner_class(planner)  # an unknown name is refused before any work
    name = planning.dataset_name(dataset)
    pre = planning.preprocessed_folder(name)
    pname = planning.plans_name_for(gpu_memory_target, plans_name, planner)
    with locks.exclusive(locks.preprocessing_lock_file(pre), f"preprocessing {name}", wait, log):
        _plan_and_preprocess(name, pre, pname, configurations, gpu_memory_target, num_processes, verify,
                             fingerprint_voxels, force, show_progress, planner)
    return pname


def _plan_and_preprocess(name: str, pre: Path, pname: str, configurations: list[str] | None,
                         gpu_memory_target: float | None, num_processes: int, verify: bool,
                         fingerprint_voxels: float | None, force: bool, show_progress: bool,
                         planner: str | None) -> None:
    from semidiff_nnunet import data_checks

    steps: list[tuple[str, object]] = []
    raw, state = planning.raw_folder(name), {}
    if verify:  # every raw file readable, finite, pseudo masks fitting: before planning and before reusing data
        steps.append(("checking raw data", lambda: state.update(raw=data_checks.check_raw_data(raw, pre))))
    if verify and (force or not (pre / "dataset_fingerprint.json").is_file()):
        steps.append(("checking dataset integrity", lambda: planning.verify_raw_dataset(name, num_processes)))
    if force or not (pre / "dataset_fingerprint.json").is_file():
        steps.append(("extracting fingerprint",
                      lambda: planning.extract_fingerprint(name, num_processes, fingerprint_voxels, overwrite=force)))
    if force or not (pre / f"{pname}.json").is_file():
        steps.append((f"planning ({pname})", lambda: planning.plan(name, gpu_memory_target, pname, planner)))

    def todo_configs(snapshot: dict) -> list[tuple[str, str]]:
        plans = planning.load_plans(name, pname)
        wanted = configurations or [c for c in ("2d", "3d_fullres") if c in plans["configurations"]]
        out = []
        for c in wanted:
            if c not in plans["configurations"]:
                raise SemidiffError(f"Configuration {c!r} is not in the plans of {name} (has: "
                                    f"{', '.join(plans['configurations'])}); pick one of those with -c.")
            ident = plans["configurations"][c].get("data_identifier", f"{pname}_{c}")
            # redone when a raw image/label was added, removed or changed since it was preprocessed
            if (force or not _preprocessed_complete(name, pre / ident)
                    or data_checks.changed_since_preprocessing(pre, ident, snapshot)):
                out.append((c, ident))
        return out

    def preprocess_todo() -> None:
        snapshot = state.get("raw") or data_checks.raw_snapshot(raw)
        for c, ident in todo_configs(snapshot):
            planning.preprocess(name, pname, [c], num_processes)
            data_checks.remember_preprocessed(pre, ident, snapshot)

    steps.append(("preprocessing", preprocess_todo))
    steps.append(("keeping the dataset's own split", lambda: planning.adopt_raw_split(name)))
    with _progress(show_progress) as progress:
        task = progress.add_task(f"{name}: planning", total=len(steps)) if progress else None
        for label, fn in steps:
            if progress:
                progress.update(task, description=f"{name}: {label}")
            with _quiet(show_progress):
                fn()
            if progress:
                progress.advance(task)


def _preprocessed_complete(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    raw = planning.raw_folder(name)
    ds = planning.dataset_json(raw)
    ids = {f.name[: -len(ds["file_ending"])] for f in (raw / "labelsTr").iterdir() if f.name.endswith(ds["file_ending"])}
    have = {f.name[:-4] for f in folder.iterdir() if f.name.endswith(".pkl")}
    unl_ok = True
    if (raw / "imagesUnlabeled").is_dir():
        unl_ok = Path(str(folder) + "__unlabeled").is_dir()
    return ids <= have and unl_ok


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as p:
        yield p


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence nnU-Net's own prints/tqdm bars while our progress bar is shown."""
    if not enabled:
        yield
        return
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunInfo:
    dataset: str
    method: str
    trainer: str
    labeled_tag: str
    seed: int
    configuration: str
    fold: int | str
    plans_name: str
    run_root: Path  # an nnUNet_results-like folder
    model_folder: Path  # <run_root>/<dataset>/<trainer>__<plans>__<configuration>
    fold_folder: Path

    @property
    def finished(self) -> bool:
        return (self.fold_folder / "checkpoint_final.pth").is_file()

    def resumable_checkpoint(self) -> Path | None:
        """The first resume point the run folder holds (whether it loads is checked on --continue:
        :func:`~semidiff_nnunet.training.checkpoint.resume_checkpoint`)."""
        for name in ("checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_best.pth"):
            if (self.fold_folder / name).is_file():
                return self.fold_folder / name
        return None


def run_info(dataset: str | int, method: str, labeled: str = "1.0", seed: int = 0, configuration: str = "2d",
             fold: int | str = 0, plans_name: str = "nnUNetPlans", held_out: float | None = None,
             stage: str = "") -> RunInfo:
    """Where a run lives. ``held_out``: the share of the fold's validation cases the run keeps apart for
    scoring (:func:`held_out_cases`); such runs live apart (``lab0.1_ho0.5``), one folder per share.
    ``stage``: a stage of ``semidiff benchmark --from-checkpoint`` (``first-e4``, ``from-first-e4``), its own
    folder too (``lab0.1_ho0.5_from-first-e4``)."""
    from semidiff_nnunet.training.splits import LabeledSpec, held_out_tag

    name = planning.dataset_name(dataset)
    cls = method_trainer(method)
    spec = LabeledSpec.parse(labeled)
    tag = spec.tag + held_out_tag(held_out) + (f"_{stage}" if stage else "")
    root = paths.run_root(method, tag, seed)
    model = root / name / f"{cls.__name__}__{plans_name}__{configuration}"
    return RunInfo(name, method, cls.__name__, tag, seed, configuration, fold, plans_name, root, model,
                   model / f"fold_{fold}")


@contextlib.contextmanager
def _results_root(root: Path):
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def train(dataset: str | int, method: str, labeled: str = "1.0", seed: int = 0, configuration: str = "2d",
          fold: int | str = 0, device: str = "auto", epochs: int | None = None, iters_per_epoch: int | None = None,
          overrides: dict | Sequence[str] | None = None, continue_training: bool = False,
          plans_name: str = "nnUNetPlans", val_iters_per_epoch: int | None = None, save_every: int | None = None,
          final_validation: bool = True, show_progress: bool = True,
          progress: TrainingProgress | None = None, nproc: int = 1,
          pretrained_weights: str | Path | None = None, held_out: float | None = None, wait: bool = False,
          log: Callable[[str], None] | None = None, stage: str = "") -> RunInfo:
    """Train one run; refuses to overwrite an existing run unless ``continue_training`` resumes it.

    One process at a time trains a run (:mod:`semidiff_nnunet.locks`): while another holds it, this one
    refuses naming it, or with ``wait`` waits for it (telling ``log``), then finds the run as it left it.
    A run that fails after its training started keeps its folder (training log, checkpoints) and the error
    names it; one refused while the trainer was being set up, before any step, leaves no folder behind.

    ``held_out``: keep this share of the fold's validation cases apart (:func:`held_out_cases`): the run
    neither trains nor validates on them (nnU-Net's pseudo Dice, ``checkpoint_best.pth``, a method's own
    selection see only the rest), so :func:`benchmark` can score it on them; the run gets its own folder.

    ``pretrained_weights``: a checkpoint (stock nnU-Net's or a semidiff run's) that initialises the new run's
    network (nnU-Net's ``-pretrained_weights``; see ``SemiSupervisedTrainer.load_pretrained_weights``).
    A resumed run keeps the weights of its checkpoint: the same file again is ignored, another one refused.
    ``stage``: the run's stage of ``semidiff benchmark --from-checkpoint``, its own folder (:func:`run_info`).

    ``nproc`` > 1: a distributed run of that many ranks on this node (:mod:`semidiff_nnunet.training.
    distributed`); under ``torchrun`` the ranks come from the environment instead.

    ``progress`` receives the training's progress (:mod:`semidiff_nnunet.training.progress`);
    ``show_progress`` keeps nnU-Net's own prints off the terminal (they still reach the training log).
    """
    opts = check_train_options(method, labeled, fold, device, overrides, epochs, iters_per_epoch,
                               val_iters_per_epoch, save_every, configuration)
    _check_counts(nproc=nproc)
    if held_out is not None:
        from semidiff_nnunet.training.splits import check_held_out_share

        held_out = check_held_out_share(held_out)
    pretrained = check_pretrained_weights(pretrained_weights)
    from semidiff_nnunet.training import distributed
    from semidiff_nnunet.training.hparams import hparams_to_dict
    from semidiff_nnunet.training.run_config import RunConfig

    paths.ensure_nnunet_env()
    fold = opts.fold
    info = run_info(dataset, method, labeled, seed, configuration, fold, plans_name, held_out, stage)
    plans = planning.load_plans(info.dataset, plans_name)
    if configuration not in plans["configurations"]:
        raise SemidiffError(f"Configuration {configuration!r} is not in {plans_name} of {info.dataset} (has: "
                            f"{', '.join(plans['configurations'])}); pick one of those with -c.")
    if hasattr(opts.trainer_cls, "check_options"):
        cfg = dict(plans["configurations"][configuration])
        while "inherits_from" in cfg and "patch_size" not in cfg:  # nnU-Net's configuration inheritance
            cfg = {**plans["configurations"][cfg.pop("inherits_from")], **cfg}
        patch = cfg.get("patch_size")
        opts.trainer_cls.check_options(opts.hparams, configuration, len(patch) if patch else None)
    ident = plans["configurations"][configuration].get("data_identifier", f"{plans_name}_{configuration}")
    if not (planning.preprocessed_folder(info.dataset) / ident).is_dir():
        raise SemidiffError(f"{info.dataset} is not preprocessed for {configuration!r}; run "
                            f"`semidiff plan-and-train {info.dataset} -c {configuration} ...` first.")
    check_fold(info.dataset, fold)
    held_ids = [] if held_out is None else held_out_cases(info.dataset, fold, held_out, configuration, plans_name)[1]
    _check_resumed_held_out(info, held_ids)
    if not info.fold_folder.is_dir():  # a new run: a split that cannot be drawn fails before any folder exists
        check_split(info.dataset, plans["configurations"][configuration], plans_name, configuration, fold,
                    opts.labeled, seed, held_ids)
    # from here on one process at a time (under torchrun: rank 0 for all, the others wait at its barrier)
    with locks.exclusive(locks.run_lock_file(info.fold_folder), f"training the run in {info.fold_folder}",
                         wait, log) if _env_rank() == 0 else contextlib.nullcontext():
        if continue_training and (info.finished or info.resumable_checkpoint() is not None):
            pretrained = _resumed_pretrained(info, pretrained)
        if info.finished:
            if continue_training:
                if final_validation and not (info.fold_folder / "validation" / "summary.json").is_file():
                    _validate_only(info, plans, configuration, fold, opts)  # killed during its final validation
                return info
            raise SemidiffError(f"This run already finished ({info.fold_folder}); use another --seed or --labeled, "
                                f"or delete the folder to train it again.")
        checkpoint = info.resumable_checkpoint()
        if info.fold_folder.is_dir() and checkpoint is not None and not continue_training:
            raise SemidiffError(f"A run already exists in {info.fold_folder}; pass --continue to resume it.")
        hp, phases = opts.hparams, opts.phases
        torchrun = distributed.init_from_env(opts.device) or distributed.world_size() > 1
        world = distributed.world_size() if torchrun else nproc
        if continue_training and checkpoint is not None:
            from semidiff_nnunet.training.checkpoint import resume_checkpoint

            # a damaged checkpoint_latest.pth: the previous one (or the best), said in one line
            checkpoint = resume_checkpoint(info.fold_folder, (log or print) if _env_rank() == 0 else None)
            hp, phases = _resumed_settings(info, opts.trainer_cls, hp, opts.hparam_overrides, phases)
            _check_resumed_world_size(info, world)
        if info.fold_folder.is_dir() and checkpoint is None and not continue_training and distributed.rank() == 0:
            shutil.rmtree(info.fold_folder)  # an attempt that died before its first checkpoint
        if torchrun:
            import torch.distributed as dist

            dist.barrier()  # no rank starts before rank 0 has cleared a dead attempt

        activate_trainer_shim()
        dataset_json = planning.dataset_json(planning.preprocessed_folder(info.dataset))
        RunConfig(method=method, labeled=opts.labeled, seed=seed, hparams=hparams_to_dict(hp), phases=phases,
                  num_epochs=epochs, num_iterations_per_epoch=iters_per_epoch,
                  num_val_iterations_per_epoch=val_iters_per_epoch, save_every=save_every,
                  pretrained_weights=str(pretrained) if pretrained else None, held_out=held_ids).write(plans)
        plans["continue_training"] = bool(continue_training and checkpoint is not None)
        args = (opts.trainer_cls, plans, configuration, fold, dataset_json, info.run_root,
                checkpoint if continue_training else None, final_validation, show_progress)
        before = _run_json_stamp(info)
        try:
            if nproc > 1 and not torchrun:
                distributed.launch(nproc, opts.device, run_trainer, args, progress)
            else:
                run_trainer(*args, device=opts.device, progress=progress if distributed.rank() == 0 else None)
        except Exception as e:
            if _run_json_stamp(info) != before:  # this attempt started training: its folder is the evidence
                if isinstance(e, SemidiffError):
                    raise SemidiffError(_failed_run_message(str(e), info)) from e
                e.add_note(_failed_run_message("The run failed", info))
            elif isinstance(e, SemidiffError) and checkpoint is None and before is None and distributed.rank() == 0:
                shutil.rmtree(info.fold_folder, ignore_errors=True)  # refused in its set-up: no husk left
            raise
        return info


def _env_rank() -> int:
    """This process's global rank under torchrun (``RANK``), 0 otherwise (one process, or ``--nproc``)."""
    from semidiff_nnunet.training import distributed

    return int(os.environ.get("RANK", "0") or 0) if distributed.env_world_size() > 1 else 0


def _run_json_stamp(info: RunInfo) -> tuple[int, int] | None:
    """Which ``semidiff_run.json`` the run folder holds (None: none). The trainer writes a new one (a new
    file, replaced atomically) when its set-up is done and training starts: a changed stamp after an
    attempt says that attempt started training."""
    try:
        st = (info.fold_folder / "semidiff_run.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _failed_run_message(message: str, info: RunInfo) -> str:
    """``message`` plus where the failed run's evidence is: its folder and last checkpoint."""
    last = info.resumable_checkpoint()
    kept = (f"its training log and its last checkpoint, {last.name} (--continue resumes from it)" if last else
            "its training log (no checkpoint was saved yet; the same command again starts the run over)")
    return f"{message.rstrip().rstrip('.')}; the run folder {info.fold_folder} keeps {kept}."


def run_trainer(trainer_cls, plans: dict, configuration: str, fold, dataset_json: dict, run_root: Path,
                checkpoint: Path | None, final_validation: bool, show_progress: bool, device, progress) -> None:
    """Build the trainer, resume from ``checkpoint`` if given, train and validate (one process, or one
    rank of a distributed run)."""
    with _results_root(run_root):
        with _quiet(show_progress):  # nnU-Net's banner goes to the training log
            trainer = trainer_cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                  device=device)
        trainer.progress = progress
        if checkpoint is not None:
            trainer.load_checkpoint(str(checkpoint))
        with _quiet(show_progress and getattr(trainer, "local_rank", 0) != 0):
            trainer.run_training()
            if final_validation:
                trainer.perform_actual_validation(False)


def _resumed_pretrained(info: RunInfo, given: Path | None) -> str | None:
    """A resumed run keeps the weights of its checkpoint: ``--pretrained-weights`` naming the file the run
    started from is ignored, another file is refused. Returns the run's recorded file (or None)."""
    run_json = info.fold_folder / "semidiff_run.json"
    stored = json.loads(run_json.read_text(encoding="utf-8")).get("pretrained_weights") if run_json.is_file() else None
    if given is not None and str(given) != stored:
        raise SemidiffError(f"--pretrained-weights only initialises a new run; this run resumes from its checkpoint "
                            f"(it started from {stored or 'random weights'}), so drop --pretrained-weights {given}.")
    return stored


def _check_resumed_held_out(info: RunInfo, held_ids: list[str]) -> None:
    """A run's held-out cases are fixed when it starts; if the fold's cases changed since (another
    splits_final.json), going on would select on cases it is scored on, or score on cases it trained on."""
    run_json = info.fold_folder / "semidiff_run.json"
    if not run_json.is_file():
        return
    stored = sorted((json.loads(run_json.read_text(encoding="utf-8")).get("split") or {}).get("held_out") or [])
    if stored != sorted(held_ids):
        raise SemidiffError(f"The run in {info.fold_folder} holds out other cases ({len(stored)}) than the fold now "
                            f"gives ({len(held_ids)}): splits_final.json changed since it started; delete that "
                            f"folder to train it again.")


def _check_resumed_world_size(info: RunInfo, world: int) -> None:
    run_json = info.fold_folder / "semidiff_run.json"
    if not run_json.is_file():
        return
    stored = int(json.loads(run_json.read_text(encoding="utf-8")).get("world_size", 1))
    if stored != world:
        raise SemidiffError(f"This run was trained with {stored} process(es); resume it with --nproc {stored} "
                            f"(each rank's data stream and the batch split depend on it).")


def _validate_only(info: RunInfo, plans: dict, configuration: str, fold, opts) -> None:
    """The final validation of a finished run whose validation never completed (the process was killed
    during it): rebuild the trainer with the run's own configuration (from its checkpoint), load the final
    weights and validate; nothing is trained."""
    from semidiff_nnunet.training.checkpoint import safe_load
    from semidiff_nnunet.training.run_config import RunConfig

    checkpoint = safe_load(info.fold_folder / "checkpoint_final.pth")
    RunConfig.from_json((checkpoint.get("semidiff") or {}).get("run")).write(plans)
    plans["continue_training"] = True
    activate_trainer_shim()
    dataset_json = planning.dataset_json(planning.preprocessed_folder(info.dataset))
    with _results_root(info.run_root):
        trainer = opts.trainer_cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                   device=opts.device)
        trainer.load_checkpoint(checkpoint)
        trainer.perform_actual_validation(False)


def plan_and_train(dataset: str | int, method: str, labeled: str = "1.0", seed: int = 0,
                   configuration: str = "2d", fold: int | str = 0, device: str = "auto",
                   epochs: int | None = None, iters_per_epoch: int | None = None,
                   overrides: dict | Sequence[str] | None = None, continue_training: bool = False,
                   plans_name: str | None = None, gpu_memory_target: float | None = None,
                   num_processes: int = 2, val_iters_per_epoch: int | None = None, save_every: int | None = None,
                   final_validation: bool = True, show_progress: bool = True,
                   progress: TrainingProgress | None = None, nproc: int = 1, planner: str | None = None,
                   pretrained_weights: str | Path | None = None, wait: bool = False,
                   log: Callable[[str], None] | None = None) -> RunInfo:
    """Check the run's options, plan and preprocess ``dataset`` for ``configuration`` with ``planner``
    (steps already done are skipped; see :func:`plan_and_preprocess`), then :func:`train`. ``wait``:
    wait for another process that writes the dataset's preprocessed data or trains the run (else refuse)."""
    check_train_options(method, labeled, fold, device, overrides, epochs, iters_per_epoch, val_iters_per_epoch,
                        save_every, configuration)
    _check_counts(num_processes=num_processes, nproc=nproc)
    check_pretrained_weights(pretrained_weights)
    if planner not in (None, planning.DEFAULT_PLANNER):
        planning.planner_class(planner)  # before the dataset is even looked up
    pname = plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target,
                                plans_name=plans_name, num_processes=num_processes, show_progress=show_progress,
                                planner=planner, wait=wait, log=log)
    return train(dataset, method, labeled=labeled, seed=seed, configuration=configuration, fold=fold, device=device,
                 epochs=epochs, iters_per_epoch=iters_per_epoch, overrides=overrides,
                 continue_training=continue_training, plans_name=pname, val_iters_per_epoch=val_iters_per_epoch,
                 save_every=save_every, final_validation=final_validation, show_progress=show_progress,
                 progress=progress, nproc=nproc, pretrained_weights=pretrained_weights, wait=wait, log=log)


def check_pretrained_weights(path: str | Path | None) -> Path | None:
    """``--pretrained-weights``: an existing checkpoint file (absolute path) or None."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise SemidiffError(f"--pretrained-weights {path}: no such checkpoint file; give a checkpoint_final.pth of "
                            f"nnU-Net or of a semidiff run.")
    from semidiff_nnunet.training.checkpoint import pretrained_state

    pretrained_state(str(path))  # unreadable or not nnU-Net's: refused before any run folder exists
    return path


def check_fold(name: str, fold: int | str) -> None:
    """A fold must exist in the dataset's ``splits_final.json`` (nnU-Net makes 5 when there is none);
    nnU-Net would silently train a higher one on a random 80:20 split."""
    if fold == "all":
        return
    for candidate in (planning.preprocessed_folder(name) / "splits_final.json",
                      planning.raw_folder(name) / "splits_final.json"):
        if candidate.is_file():
            n, where = len(json.loads(candidate.read_text(encoding="utf-8"))), str(candidate)
            break
    else:
        n, where = 5, "nnU-Net's default split"
    if int(fold) >= n:
        raise SemidiffError(f"--fold {fold}: {name} has {n} folds ({where}); pick 0..{n - 1} or all.")


def fold_keys(name: str, ident_folder: Path, fold: int | str) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of ``fold`` as nnU-Net's ``do_split`` will take them, without writing
    anything (nnU-Net writes its default 5-fold split only when the trainer starts)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from semidiff_nnunet.training.unlabeled import list_cases

    keys = list_cases(str(ident_folder))  # every preprocessed case has its .pkl (any nnU-Net dataset variant)
    if fold == "all":
        return keys, keys
    splits_file = planning.preprocessed_folder(name) / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text(encoding="utf-8"))
    elif len(keys) >= 5:
        splits = generate_crossval_split(keys, seed=12345, n_splits=5)
    else:
        return [], []  # too few cases to split: nnU-Net's trainer reports it
    if int(fold) >= len(splits):
        return [], []
    return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])


def check_split(name: str, config: dict, plans_name: str, configuration: str, fold: int | str, labeled,
                seed: int, held_out: Sequence[str] = ()) -> None:
    """Draw the run's labeled split once before anything is created, so that ``--labeled 1000`` on a
    48-case fold or a labels file naming validation/unknown cases fails with one sentence and leaves no
    run folder behind."""
    from semidiff_nnunet.training.splits import make_semi_split

    ident = config.get("data_identifier", f"{plans_name}_{configuration}")
    train_keys, val_keys = fold_keys(name, planning.preprocessed_folder(name) / ident, fold)
    if train_keys:  # (nothing listed: the trainer's own split reports the problem)
        make_semi_split(train_keys, val_keys, labeled, seed, held_out=held_out)


def held_out_cases(dataset: str | int, fold: int | str, share: float, configuration: str = "2d",
                   plans_name: str = "nnUNetPlans") -> tuple[list[str], list[str]]:
    """``(selection, held_out)``: the fold's validation cases (as nnU-Net's ``do_split`` takes them) split by
    :func:`~semidiff_nnunet.training.splits.carve_held_out`, ``share`` of them held out. A run trained with
    ``held_out=share`` validates and selects on ``selection`` only; the benchmark scores it on ``held_out``."""
    from semidiff_nnunet.training.splits import carve_held_out

    name = planning.dataset_name(dataset)
    fold = parse_fold(fold)
    plans = planning.load_plans(name, plans_name)
    if configuration not in plans["configurations"]:
        raise SemidiffError(f"Configuration {configuration!r} is not in {plans_name} of {name} (has: "
                            f"{', '.join(plans['configurations'])}); pick one of those with -c.")
    ident = plans["configurations"][configuration].get("data_identifier", f"{plans_name}_{configuration}")
    _, val = fold_keys(name, planning.preprocessed_folder(name) / ident, fold)
    return carve_held_out(val, share)


def _resumed_settings(info: RunInfo, trainer_cls, hp, overrides: dict, phases: dict[str, str]):
    """A resumed run keeps the hyperparameters and phase lengths it started with (also defaults changed
    since); a --set that contradicts them is a mistake, not a silent change half-way through a run.
    Returns (hyperparameters, phase overrides) of the run."""
    from semidiff_nnunet.training.hparams import hparams_to_dict, resolve_hparams
    from semidiff_nnunet.training.run_config import parse_phase_length

    run_json = info.fold_folder / "semidiff_run.json"
    if not run_json.is_file():
        return hp, phases
    run = json.loads(run_json.read_text(encoding="utf-8"))
    stored = run.get("hparams") or {}
    given = json.loads(json.dumps(hparams_to_dict(hp)))
    for key in sorted(overrides):
        if key in stored and given.get(key) != stored[key]:
            raise SemidiffError(f"This run was started with {key}={stored[key]!r}; resume it without "
                                f"--set {key}={overrides[key]} (or start a new run with another --seed).")
    # the trainer writes the run's --set phase.NAME values as "phase_overrides" (absent in older runs:
    # they ran every phase at its declared length)
    stored_phases = run.get("phase_overrides")
    if stored_phases is None:
        stored_phases = {k: v for k, v in (run.get("phases") or {}).items() if isinstance(v, str)}
    stored_phases = {str(k): str(v) for k, v in stored_phases.items()}
    for name in sorted(phases):
        was = stored_phases.get(name)
        if was is None or parse_phase_length(name, was) != parse_phase_length(name, phases[name]):
            started = f"phase.{name}={was}" if was is not None else f"the default length of phase {name!r}"
            raise SemidiffError(f"This run was started with {started}; resume it without "
                                f"--set phase.{name}={phases[name]} (or start a new run with another --seed).")
    known = set(hparams_to_dict(hp))
    hp = resolve_hparams(trainer_cls.hparams_class, {k: v for k, v in stored.items() if k in known})
    return hp, stored_phases


# ---------------------------------------------------------------------------------------------- predict
def input_cases(folder: Path, file_ending: str) -> tuple[dict[str, list[str]], list[str]]:
    """(case id → its channel files, names of the files that do not follow nnU-Net's CASE_XXXX naming)."""
    cases: dict[str, list[str]] = {}
    skipped = []
    for f in sorted(Path(folder).iterdir()):
        stem = f.name[: -len(file_ending)] if f.name.endswith(file_ending) else ""
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            cases.setdefault(stem[:-5], []).append(str(f))
        elif f.is_file():
            skipped.append(f.name)
    return cases, skipped


def unique_folds(folds: Sequence) -> tuple:
    """``-f`` values parsed (0-4 or ``all``), each once, in the order given."""
    return tuple(dict.fromkeys(parse_fold(f) for f in folds))


def trained_variants(info: RunInfo, fold, checkpoint: str = "checkpoint_final.pth") -> list[str]:
    """The (plans, configuration) pairs this method/labeled/seed was trained with, for a hint when the
    asked one does not exist (e.g. ``--plans nnUNetPlans_0.5GB`` where planning wrote ``_0p5GB``)."""
    found = []
    folder = info.run_root / info.dataset
    prefix = f"{info.trainer}__"
    for model in sorted(folder.glob(f"{prefix}*__*")) if folder.is_dir() else []:
        if (model / f"fold_{fold}" / checkpoint).is_file():
            plans, _, config = model.name[len(prefix):].rpartition("__")
            found.append(f"--plans {plans} -c {config}")
    return found


def predict(dataset: str | int, method: str, input: str | Path, output: str | Path, labeled: str = "1.0",
            seed: int = 0, configuration: str = "2d", folds: tuple = (0,), device: str = "auto",
            plans_name: str = "nnUNetPlans", checkpoint: str = "checkpoint_final.pth", tile_step_size: float = 0.5,
            use_mirroring: bool = True, show_progress: bool = True,
            log: Callable[[str], None] | None = None, save_probabilities: bool = False,
            held_out: float | None = None, stage: str = "") -> Path:
    """Segment every case of ``input`` (nnU-Net naming, CASE_XXXX.ext) into ``output``; files that do not
    follow the naming are skipped and named through ``log``.

    Several ``folds`` are ensembled (their softmax averaged, as ``nnUNetv2_predict -f 0 1 2``);
    ``tile_step_size`` is nnU-Net's ``-step_size``; ``save_probabilities`` also writes nnU-Net's
    ``CASE.npz`` (``probabilities``, (K, *spatial)) and ``CASE.pkl`` (properties), what
    ``nnUNetv2_ensemble`` reads. ``checkpoint``: ``checkpoint_final.pth`` (the end of training),
    ``checkpoint_best.pth`` (nnU-Net's best EMA pseudo Dice on the fold's validation cases) or
    ``checkpoint_latest.pth``; each holds the method's inference network. ``held_out``: the run's held-out
    share (a ``semidiff benchmark`` run on a dataset without imagesTs; see :func:`train`); ``stage``: the run's
    stage of ``semidiff benchmark --from-checkpoint`` (:func:`run_info`)."""
    folds = unique_folds(folds)
    if not 0 < tile_step_size <= 1:
        raise SemidiffError(f"--step-size {tile_step_size}: give a share of the patch size in (0, 1] (nnU-Net's "
                            f"default 0.5).")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from semidiff_nnunet.training.checkpoint import safe_load

    info = run_info(dataset, method, labeled, seed, configuration, folds[0], plans_name, held_out, stage)
    for f in folds:
        ck = info.model_folder / f"fold_{f}" / checkpoint
        if not ck.is_file():
            others = trained_variants(info, f, checkpoint)
            final = info.model_folder / f"fold_{f}" / "checkpoint_final.pth"
            hint = (f"; this run exists with {', '.join(others)} — pass that with --plans/-c" if others else
                    f"; this run has only {', '.join(sorted(p.name for p in final.parent.glob('checkpoint_*.pth')))}, "
                    f"pick one of those with --checkpoint" if final.is_file() else
                    f"; train it first (semidiff plan-and-train ... --fold {f})")
            raise SemidiffError(f"No trained model at {ck}{hint}.")
        # nnU-Net's predictor unpickles it with weights_only=False: a file that could run code is refused first
        try:
            safe_load(ck)
        except SemidiffError:
            raise
        except Exception as e:  # noqa: BLE001 (anything torch cannot read)
            raise SemidiffError(f"{ck} is not a readable PyTorch checkpoint ({type(e).__name__}); train the run "
                                f"again or pick another with --checkpoint.") from None
    input, output = Path(input), Path(output)
    if not input.is_dir():
        raise SemidiffError(f"Input folder {input} does not exist.")
    dataset_json = planning.dataset_json(info.model_folder)
    fe = dataset_json["file_ending"]
    n_ch = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    cases, skipped = input_cases(input, fe)
    if skipped and log is not None:
        log(f"skipped {len(skipped)} file(s) in {input} not named CASE_0000{fe} (nnU-Net's naming): "
            + ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if not cases:
        raise SemidiffError(f"{input} holds no images named CASE_0000{fe}; use nnU-Net's file naming.")
    # one file per channel, or one file holding all channels (RGB PNG, nnU-Net's natural-image reader)
    bad = [c for c, fs in cases.items() if len(fs) not in (1, n_ch)]
    if bad:
        raise SemidiffError(f"Case {bad[0]} in {input} has {len(cases[bad[0]])} channel file(s); the model "
                            f"expects {n_ch}.")
    torch_device = resolve_device(device)
    activate_trainer_shim()
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    with _quiet(show_progress):
        predictor.initialize_from_trained_model_folder(str(info.model_folder), use_folds=tuple(folds),
                                                       checkpoint_name=checkpoint)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _progress(show_progress) as progress:
        task = progress.add_task(f"predicting {len(cases)} case(s)", total=len(cases)) if progress else None
        for files in cases.values():
            with _quiet(show_progress):
                predictor.predict_from_files_sequential([files], str(tmp), save_probabilities=save_probabilities,
                                                        overwrite=True, folder_with_segs_from_prev_stage=None)
            if progress:
                progress.advance(task)
    output.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate(dataset: str | int | None, pred: str | Path, ref: str | Path, output_file: str | Path | None = None,
             num_processes: int = 2) -> dict:
    from semidiff_nnunet.evaluation import evaluate_folder

    pred, ref = Path(pred), Path(ref)
    for p, what in ((pred, "--pred"), (ref, "--ref")):
        if not p.is_dir():
            raise SemidiffError(f"{what} folder {p} does not exist.")
    dataset_json = None
    if dataset is not None:
        name = planning.dataset_name(dataset)
        for candidate in (planning.raw_folder(name) / "dataset.json", planning.preprocessed_folder(name) / "dataset.json"):
            if candidate.is_file():
                dataset_json = planning.read_json(candidate, required=("labels",))
                break
    output_file = Path(output_file) if output_file else pred / "summary.json"
    return evaluate_folder(str(pred), str(ref), dataset_json=dataset_json, output_file=str(output_file),
                           num_processes=num_processes)


def summary_table_rows(summary: dict) -> list[list]:
    """Rows (label, Dice, Jaccard, HD95, ASD) of an :func:`evaluate` summary, foreground mean last."""
    from semidiff_nnunet.evaluation import summary_table_rows as rows

    return rows(summary)


def summary_notes(summary: dict) -> list[str]:
    """What the table leaves out, one sentence each (NaN counts, stray values, extra files, units)."""
    from semidiff_nnunet.evaluation import summary_notes as notes

    return notes(summary)


# ---------------------------------------------------------------------------------------------- split
def split(dataset: str | int, labeled: str, seed: int = 0, fold: int | str = 0, configuration: str | None = None,
          plans_name: str = "nnUNetPlans", held_out: float | None = None) -> SemiSplit:
    """The labeled/unlabeled/validation cases a run would use (without training). ``held_out``: the share of
    the fold's validation cases kept apart for scoring (:func:`train`): they leave ``validation`` for
    ``held_out``."""
    fold = parse_fold(fold)
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from semidiff_nnunet.training.splits import (
        LabeledSpec,
        carve_held_out,
        check_held_out_share,
        make_semi_split,
    )

    if held_out is not None:
        held_out = check_held_out_share(held_out)
    from semidiff_nnunet.training.unlabeled import list_cases

    spec = LabeledSpec.parse(labeled)
    name = planning.dataset_name(dataset)
    raw = planning.raw_folder(name)
    pre = planning.preprocessed_folder(name)
    ds = planning.dataset_json(raw) if (raw / "dataset.json").is_file() else \
        planning.dataset_json(pre)
    fe = ds["file_ending"]
    ids = sorted(f.name[: -len(fe)] for f in (raw / "labelsTr").iterdir() if f.name.endswith(fe))
    splits_file = pre / "splits_final.json"
    if not splits_file.is_file() and (raw / "splits_final.json").is_file():
        splits_file = raw / "splits_final.json"  # a converter's paper split, not yet adopted by planning
    if splits_file.is_file():
        splits = load_json(str(splits_file))
    else:  # exactly what nnU-Net's do_split creates on first training
        splits = generate_crossval_split(ids, seed=12345, n_splits=5)
        if pre.is_dir():
            save_json(splits, str(splits_file))
    if fold == "all":
        tr, val = ids, ids
    elif int(fold) < len(splits):
        tr, val = splits[int(fold)]["train"], splits[int(fold)]["val"]
    else:
        raise SemidiffError(f"Fold {fold} is not in splits_final.json ({len(splits)} folds); pick 0..{len(splits) - 1}.")
    extra = []
    if configuration:
        plans = planning.load_plans(name, plans_name)
        ident = plans["configurations"][configuration]["data_identifier"]
        extra = list_cases(str(pre / (ident + "__unlabeled")))
    elif (raw / "imagesUnlabeled").is_dir():
        extra = sorted({f.name[: -len(fe) - 5] for f in (raw / "imagesUnlabeled").iterdir() if f.name.endswith(fe)})
    held = [] if held_out is None else carve_held_out(val, held_out)[1]
    return make_semi_split(tr, val, spec, seed, extra, held_out=held)


# ---------------------------------------------------------------------------------------------- demo
DEMO_PLANS = "semidiffDemoPlans"


def prepare_demo_dataset(dim: int = 2, num_unlabeled: int = 0, show_progress: bool = True,
                         max_features: int | None = None, batch_size: int | None = None, **generator_kwargs) -> str:
    """Generate the synthetic dataset, plan and preprocess it, and write small CPU plans; return its name."""
    from semidiff_nnunet.synthetic import generate_demo_dataset

    paths.ensure_nnunet_env()
    folder = generate_demo_dataset(paths.raw_root(), dim=dim, num_unlabeled=num_unlabeled, **generator_kwargs)
    name = folder.name
    configuration = "2d" if dim == 2 else "3d_fullres"
    plan_and_preprocess(name, [configuration], num_processes=2, fingerprint_voxels=1e5, show_progress=show_progress)
    planning.shrink_plans(name, "nnUNetPlans", DEMO_PLANS, max_features=max_features or (32 if dim == 2 else 16),
                          batch_size=batch_size or (4 if dim == 2 else 2))
    return name


def run_demo(dim: int = 2, device: str = "cpu", methods: list[str] | None = None, labeled: str = "0.2",
             epochs: int | None = None, iters_per_epoch: int | None = None, seed: int = 0, log=print,
             make_progress: Callable[[], TrainingProgress] | None = None) -> dict:
    """The whole job on synthetic data: plan, train each method, predict imagesTs, evaluate; return Dice."""
    if dim not in (2, 3):
        raise SemidiffError(f"--dim {dim}: the demo dataset is 2 or 3 dimensional.")
    methods = methods or ["supervised", "mean-teacher"]
    for m in methods:
        check_train_options(m, labeled, 0, device, epochs=epochs, iters_per_epoch=iters_per_epoch,
                            configuration="2d" if dim == 2 else "3d_fullres", dim=dim)
    name = prepare_demo_dataset(dim)
    configuration = "2d" if dim == 2 else "3d_fullres"
    epochs = epochs or (20 if dim == 2 else 10)
    iters_per_epoch = iters_per_epoch or (25 if dim == 2 else 10)
    raw = planning.raw_folder(name)
    result = {"dice": {}, "labels": [], "num_test": len(list((raw / "labelsTs").iterdir())),
              "runs_root": str(paths.runs_root())}
    for m in methods:
        info = run_info(name, m, labeled, seed, configuration, 0, DEMO_PLANS)
        log(f"[bold]{m}[/bold]: training {epochs} epochs x {iters_per_epoch} iterations on {device}")
        if not info.finished:
            train(name, m, labeled=labeled, seed=seed, configuration=configuration, fold=0, device=device,
                  epochs=epochs, iters_per_epoch=iters_per_epoch, plans_name=DEMO_PLANS,
                  val_iters_per_epoch=5, save_every=max(1, epochs // 4), final_validation=False,
                  continue_training=info.resumable_checkpoint() is not None,
                  progress=make_progress() if make_progress else None)
        pred = info.fold_folder / "predictions_imagesTs"
        predict(name, m, raw / "imagesTs", pred, labeled=labeled, seed=seed, configuration=configuration,
                device=device, plans_name=DEMO_PLANS)
        summary = evaluate(name, pred, raw / "labelsTs")
        names = {str(v): k for k, v in planning.dataset_json(raw)["labels"].items()}
        labels = sorted(summary["mean"])
        result["labels"] = [names.get(k, k) for k in labels]
        result["dice"][m] = {**{names.get(k, k): summary["mean"][k]["Dice"] for k in labels},
                             "mean": summary["foreground_mean"]["Dice"]}
    return result


# ---------------------------------------------------------------------------------------------- benchmark
def benchmark(dataset: str | int, methods: str | Sequence[str], labeled: str | Sequence[str] = "0.1",
              seeds: str | Sequence[int] = "0", configuration: str = "2d", fold: int | str = 0,
              device: str = "auto", epochs: int | None = None, iters_per_epoch: int | None = None,
              val_iters_per_epoch: int | None = None, overrides: dict | Sequence[str] | None = None,
              plans_name: str | None = None, gpu_memory_target: float | None = None, output: str | Path | None = None,
              dry_run: bool = False, num_processes: int = 2, log=print, show_progress: bool = True,
              make_progress: Callable[[], TrainingProgress] | None = None, planner: str | None = None,
              held_out: float | None = None, from_checkpoint: str | None = None,
              first_epochs: int | None = None) -> dict:
    """Every (method, labeled spec, seed) on one dataset: train, predict the held-out cases with the final and
    the best checkpoint, evaluate, and write benchmark.csv/.md/.png and held_out.json
    (:mod:`semidiff_nnunet.benchmark`). Every option is checked first.

    ``held_out``: on a dataset without imagesTs/labelsTs, the share of the fold's validation cases kept apart
    for scoring (default 0.5): the runs never train nor validate on them; the rest selects checkpoints.

    ``from_checkpoint``: ``"auto"`` (``supervised`` trained first, ``first_epochs`` epochs, default ``epochs``)
    or a checkpoint path with ``{labeled}``/``{seed}``; every method, and ``supervised`` as the control, then
    trains ``epochs`` more from it (:func:`semidiff_nnunet.benchmark.run_benchmark`).

    ``methods``/``labeled``/``seeds``: lists or comma-separated strings (``"all"``: every installed method).
    ``overrides``: ``--set`` items,
    ``key=value`` for every method that has the key, ``method:key=value`` for one method.
    ``dry_run``: return ``{"runs": [...], "overrides": {method: {key: value}}, "held_out_share": share or None}``
    (each run with its ``status``: train, resume or done) without planning or training.
    """
    from semidiff_nnunet import benchmark as bench
    from semidiff_nnunet.training.splits import check_held_out_share

    held_out = bench.DEFAULT_HELD_OUT if held_out is None else check_held_out_share(held_out)

    methods = parse_list(methods, "--methods")
    if methods == ["all"]:
        methods = [m["name"] for m in list_methods()]
    if from_checkpoint is not None:
        methods = bench.protocol_methods(methods, from_checkpoint, first_epochs)
    elif first_epochs is not None:
        raise SemidiffError("--first-epochs is the length of the first stage of --from-checkpoint auto; add "
                            "--from-checkpoint auto or drop --first-epochs.")
    labeled = parse_list(labeled, "--labeled")
    try:
        seeds = [int(s) for s in parse_list(seeds, "--seeds")]
    except ValueError:
        raise SemidiffError(f"--seeds {seeds}: give comma-separated integers, e.g. 0,1,2.") from None
    fold = parse_fold(fold)
    _check_counts(epochs=epochs, iters_per_epoch=iters_per_epoch, num_processes=num_processes,
                  first_epochs=first_epochs)
    _check_counts(0, val_iters=val_iters_per_epoch)
    for m in methods:
        get_registry().method(m)

    from semidiff_nnunet.training.splits import LabeledSpec

    for lab in labeled:
        LabeledSpec.parse(lab)
    per_method = method_overrides(methods, overrides)
    for m in methods:  # what each method itself refuses (its trainer's check_options), before any planning
        try:
            check_train_options(m, labeled[0], fold, "cpu", per_method[m], configuration=configuration)
        except SemidiffError as e:
            raise (e if len(methods) == 1 else SemidiffError(f"{m}: {e}")) from None
    if planner not in (None, planning.DEFAULT_PLANNER):
        planning.planner_class(planner)  # refused before any planning
    if dry_run:
        pname = planning.plans_name_for(gpu_memory_target, plans_name, planner)
        result = bench.run_benchmark(dataset, methods, labeled, seeds, configuration, fold, plans_name=pname,
                                     dry_run=True, held_out=held_out, from_checkpoint=from_checkpoint,
                                     first_epochs=first_epochs, epochs=epochs)
        return {**result, "overrides": per_method}
    resolve_device(device)
    check_fold(planning.dataset_name(dataset), fold)
    pname = plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target,
                                plans_name=plans_name, num_processes=num_processes, show_progress=show_progress,
                                planner=planner)
    return bench.run_benchmark(dataset, methods, labeled, seeds, configuration, fold, device, pname, epochs,
                               iters_per_epoch, per_method, output, log=log, show_progress=show_progress,
                               val_iters_per_epoch=10 if val_iters_per_epoch is None else val_iters_per_epoch,
                               make_progress=make_progress, held_out=held_out, from_checkpoint=from_checkpoint,
                               first_epochs=first_epochs)
