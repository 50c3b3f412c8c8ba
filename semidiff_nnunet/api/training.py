"""``semidiff train`` and ``plan-and-train``: one run, checked before anything is created, trained by the
method's trainer (one process, or a distributed run), resumed with the settings it started with."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semidiff_nnunet import locks, paths, planning
from semidiff_nnunet.api import installed, options, preprocessing, run_folders, splits, terminal
from semidiff_nnunet.api.run_folders import RunInfo
from semidiff_nnunet.errors import SemidiffError

if TYPE_CHECKING:
    from semidiff_nnunet.training.progress import TrainingProgress


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

    ``held_out``: keep this share of the fold's validation cases apart
    (:func:`~semidiff_nnunet.api.splits.held_out_cases`): the run neither trains nor validates on them (nnU-Net's
    pseudo Dice, ``checkpoint_best.pth``, a method's own selection see only the rest), so
    :func:`~semidiff_nnunet.api.benchmarking.benchmark` can score it on them; the run gets its own folder.

    ``pretrained_weights``: a checkpoint (stock nnU-Net's or a semidiff run's) that initialises the new run's
    network (nnU-Net's ``-pretrained_weights``; see ``SemiSupervisedTrainer.load_pretrained_weights``).
    A resumed run keeps the weights of its checkpoint: the same file again is ignored, another one refused.
    ``stage``: the run's stage of ``semidiff benchmark --from-checkpoint``, its own folder
    (:func:`~semidiff_nnunet.api.run_folders.run_info`).

    ``nproc`` > 1: a distributed run of that many ranks on this node (:mod:`semidiff_nnunet.training.
    distributed`); under ``torchrun`` the ranks come from the environment instead.

    ``progress`` receives the training's progress (:mod:`semidiff_nnunet.training.progress`);
    ``show_progress`` keeps nnU-Net's own prints off the terminal (they still reach the training log).
    """
    opts = options.check_train_options(method, labeled, fold, device, overrides, epochs, iters_per_epoch,
                                       val_iters_per_epoch, save_every, configuration)
    options.check_counts(nproc=nproc)
    if held_out is not None:
        from semidiff_nnunet.training.splits import check_held_out_share

        held_out = check_held_out_share(held_out)
    pretrained = options.check_pretrained_weights(pretrained_weights)
    from semidiff_nnunet.training import distributed
    from semidiff_nnunet.training.hparams import hparams_to_dict
    from semidiff_nnunet.training.run_config import RunConfig

    paths.ensure_nnunet_env()
    fold = opts.fold
    info = run_folders.run_info(dataset, method, labeled, seed, configuration, fold, plans_name, held_out, stage)
    plans = planning.load_plans(info.dataset, plans_name)
    config = options.plans_configuration(plans, configuration, plans_name, info.dataset)
    if hasattr(opts.trainer_cls, "check_options"):  # now with the dimensions the plans give
        opts.trainer_cls.check_options(opts.hparams, configuration, len(config.patch_size))
    if not (planning.preprocessed_folder(info.dataset) / config.data_identifier).is_dir():
        raise SemidiffError(f"{info.dataset} is not preprocessed for {configuration!r}; run "
                            f"`semidiff plan-and-train {info.dataset} -c {configuration} ...` first.")
    options.check_fold(info.dataset, fold)
    held_ids = [] if held_out is None else splits.held_out_cases(info.dataset, fold, held_out, configuration,
                                                                 plans_name)[1]
    _check_resumed_held_out(info, held_ids)
    if not info.fold_folder.is_dir():  # a new run: a split that cannot be drawn fails before any folder exists
        splits.check_split(info.dataset, config.data_identifier, fold, opts.labeled, seed, held_ids)
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
        if world > 1 and distributed.rank() == 0:  # one writer, before the ranks' trainers look for it
            splits.write_default_split(info.dataset, planning.preprocessed_folder(info.dataset) / config.data_identifier)
        if torchrun:
            import torch.distributed as dist

            dist.barrier()  # no rank starts before rank 0 has cleared a dead attempt (and written the split)

        installed.activate_trainer_shim()
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
    with run_folders.results_root(run_root):
        with terminal.quiet(show_progress):  # nnU-Net's banner goes to the training log
            trainer = trainer_cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                  device=device)
        trainer.progress = progress
        if checkpoint is not None:
            trainer.load_checkpoint(str(checkpoint))
        with terminal.quiet(show_progress and getattr(trainer, "local_rank", 0) != 0):
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
    installed.activate_trainer_shim()
    dataset_json = planning.dataset_json(planning.preprocessed_folder(info.dataset))
    with run_folders.results_root(info.run_root):
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
    (steps already done are skipped; see :func:`~semidiff_nnunet.api.preprocessing.plan_and_preprocess`), then
    :func:`train`. ``wait``: wait for another process that writes the dataset's preprocessed data or trains the
    run (else refuse). Every option is checked before planning writes anything."""
    opts = options.check_train_options(method, labeled, fold, device, overrides, epochs, iters_per_epoch,
                                       val_iters_per_epoch, save_every, configuration)
    options.check_counts(num_processes=num_processes, nproc=nproc)
    options.check_pretrained_weights(pretrained_weights)
    if planner not in (None, planning.DEFAULT_PLANNER):
        planning.planner_class(planner)  # before the dataset is even looked up
    options.check_fold(planning.dataset_name(dataset), opts.fold)
    pname = preprocessing.plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target,
                                              plans_name=plans_name, num_processes=num_processes,
                                              show_progress=show_progress, planner=planner, wait=wait, log=log)
    return train(dataset, method, labeled=labeled, seed=seed, configuration=configuration, fold=fold, device=device,
                 epochs=epochs, iters_per_epoch=iters_per_epoch, overrides=overrides,
                 continue_training=continue_training, plans_name=pname, val_iters_per_epoch=val_iters_per_epoch,
                 save_every=save_every, final_validation=final_validation, show_progress=show_progress,
                 progress=progress, nproc=nproc, pretrained_weights=pretrained_weights, wait=wait, log=log)


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
