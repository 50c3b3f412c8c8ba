"""``semidiff predict``: segment a folder of images with a trained run (nnU-Net's sliding-window
predictor), several folds ensembled."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from semidiff_nnunet import planning
from semidiff_nnunet.api import installed, options, run_folders, terminal
from semidiff_nnunet.api.run_folders import RunInfo
from semidiff_nnunet.errors import SemidiffError


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
    share (a ``semidiff benchmark`` run on a dataset without imagesTs; see :func:`~semidiff_nnunet.api.training.train`); ``stage``: the
    run's stage of ``semidiff benchmark --from-checkpoint`` (:func:`~semidiff_nnunet.api.run_folders.run_info`)."""
    folds = options.unique_folds(folds)
    if not 0 < tile_step_size <= 1:
        raise SemidiffError(f"--step-size {tile_step_size}: give a share of the patch size in (0, 1] (nnU-Net's "
                            f"default 0.5).")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from semidiff_nnunet.training.checkpoint import safe_load

    info = run_folders.run_info(dataset, method, labeled, seed, configuration, folds[0], plans_name, held_out, stage)
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
    options.check_folder(input, "Input folder")
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
    torch_device = options.resolve_device(device)
    installed.activate_trainer_shim()
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    with terminal.quiet(show_progress):
        predictor.initialize_from_trained_model_folder(str(info.model_folder), use_folds=tuple(folds),
                                                       checkpoint_name=checkpoint)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with terminal.progress(show_progress) as progress:
        task = progress.add_task(f"predicting {len(cases)} case(s)", total=len(cases)) if progress else None
        for files in cases.values():
            with terminal.quiet(show_progress):
                predictor.predict_from_files_sequential([files], str(tmp), save_probabilities=save_probabilities,
                                                        overwrite=True, folder_with_segs_from_prev_stage=None)
            if progress:
                progress.advance(task)
    output.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return output
