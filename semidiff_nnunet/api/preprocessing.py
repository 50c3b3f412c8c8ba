"""``semidiff plan-and-train``'s first half: nnU-Net's fingerprint, plans and preprocessed data, each step
skipped when done, one process at a time per dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from semidiff_nnunet import locks, paths, planning
from semidiff_nnunet.api import options, terminal


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
            ident = options.plans_configuration(plans, c, pname, name).data_identifier
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
    with terminal.progress(show_progress) as progress:
        task = progress.add_task(f"{name}: planning", total=len(steps)) if progress else None
        for label, fn in steps:
            if progress:
                progress.update(task, description=f"{name}: {label}")
            with terminal.quiet(show_progress):
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
        unl_ok = Path(str(folder) + paths.UNLABELED_SUFFIX).is_dir()
    return ids <= have and unl_ok
