"""``semidiff benchmark``: every option checked, the dataset planned, then the runs, scores and tables of
:mod:`semidiff_nnunet.api.benchmark_runs`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semidiff_nnunet import planning
from semidiff_nnunet.api import benchmark_runs as bench
from semidiff_nnunet.api import installed, options, preprocessing
from semidiff_nnunet.errors import SemidiffError

if TYPE_CHECKING:
    from semidiff_nnunet.training.progress import TrainingProgress


def check_variants(methods: list[str], per_method: dict[str, dict]) -> None:
    """A variant (``METHOD@LABEL``) benchmarked beside another run of the same method has settings of its own
    (else both rows would be one run twice)."""
    from semidiff_nnunet.registry import split_variant

    seen: dict[tuple, str] = {}
    for m in methods:
        key = (split_variant(m)[0], tuple(sorted(per_method[m].items())))
        if key in seen:
            variant = m if "@" in m else seen[key]
            raise SemidiffError(f"{m} and {seen[key]} would be the same run twice (same method, same settings): give "
                                f"{variant} its own settings with --set {variant}:KEY=VALUE.")
        seen[key] = m


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
    (:mod:`semidiff_nnunet.api.benchmark_runs`). Every option is checked first.

    ``held_out``: on a dataset without imagesTs/labelsTs, the share of the fold's validation cases kept apart
    for scoring (default 0.5): the runs never train nor validate on them; the rest selects checkpoints.

    ``from_checkpoint``: ``"auto"`` (``supervised`` trained first, ``first_epochs`` epochs, default ``epochs``)
    or a checkpoint path with ``{labeled}``/``{seed}``; every method, and ``supervised`` as the control, then
    trains ``epochs`` more from it (:func:`semidiff_nnunet.api.benchmark_runs.run_benchmark`).

    ``methods``/``labeled``/``seeds``: lists or comma-separated strings (``"all"``: every installed method
    that accepts these options; one that refuses them, e.g. ``semigda`` without ``--set semigda:vae=PATH`` or
    on a 3D configuration, is left out with its reason logged).
    ``overrides``: ``--set`` items,
    ``key=value`` for every method that has the key, ``method:key=value`` for one method.
    ``dry_run``: return ``{"runs": [...], "overrides": {method: {key: value}}, "held_out_share": share or None}``
    (each run with its ``status``: train, resume or done) without planning or training.
    """
    from semidiff_nnunet.training.splits import check_held_out_share

    held_out = bench.DEFAULT_HELD_OUT if held_out is None else check_held_out_share(held_out)

    methods = options.parse_list(methods, "--methods")
    every = methods == ["all"]
    if every:
        methods = [m["name"] for m in installed.list_methods()]
    if from_checkpoint is not None:
        methods = bench.protocol_methods(methods, from_checkpoint, first_epochs)
    elif first_epochs is not None:
        raise SemidiffError("--first-epochs is the length of the first stage of --from-checkpoint auto; add "
                            "--from-checkpoint auto or drop --first-epochs.")
    labeled = options.parse_list(labeled, "--labeled")
    try:
        seeds = [int(s) for s in options.parse_list(seeds, "--seeds")]
    except ValueError:
        raise SemidiffError(f"--seeds {seeds}: give comma-separated integers, e.g. 0,1,2.") from None
    fold = options.parse_fold(fold)
    options.check_counts(epochs=epochs, iters_per_epoch=iters_per_epoch, num_processes=num_processes,
                         first_epochs=first_epochs)
    options.check_counts(0, val_iters=val_iters_per_epoch)
    for m in methods:
        installed.check_method(m)

    from semidiff_nnunet.training.splits import LabeledSpec

    for lab in labeled:
        LabeledSpec.parse(lab)
    per_method = options.method_overrides(methods, overrides)
    check_variants(methods, per_method)
    left_out = {}
    for m in methods:  # what each method itself refuses (its trainer's check_options), before any planning
        try:
            options.check_train_options(m, labeled[0], fold, "cpu", per_method[m], configuration=configuration)
        except SemidiffError as e:
            if not every:
                raise (e if len(methods) == 1 else SemidiffError(f"{m}: {e}")) from None
            left_out[m] = str(e)  # -m all: every method that can run here; the others named with the reason
    if left_out:
        methods = [m for m in methods if m not in left_out]
        if methods == ["supervised"] or not methods:
            raise SemidiffError(f"-m all: no semi-supervised method can run with these options "
                                f"({'; '.join(f'{m}: {why}' for m, why in left_out.items())}).")
        for m, why in left_out.items():
            log(f"-m all leaves out {m}: {why}")
    if planner not in (None, planning.DEFAULT_PLANNER):
        planning.planner_class(planner)  # refused before any planning
    options.check_fold(planning.dataset_name(dataset), fold)
    if dry_run:
        pname = planning.plans_name_for(gpu_memory_target, plans_name, planner)
        result = bench.run_benchmark(dataset, methods, labeled, seeds, configuration, fold, plans_name=pname,
                                     dry_run=True, held_out=held_out, from_checkpoint=from_checkpoint,
                                     first_epochs=first_epochs, epochs=epochs, iters_per_epoch=iters_per_epoch,
                                     overrides=per_method)  # the settings the runs would get: "done" as for real
        return {**result, "overrides": per_method}
    options.resolve_device(device)
    pname = preprocessing.plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target,
                                              plans_name=plans_name, num_processes=num_processes,
                                              show_progress=show_progress, planner=planner)
    return bench.run_benchmark(dataset, methods, labeled, seeds, configuration, fold, device, pname, epochs,
                               iters_per_epoch, per_method, output, log=log, show_progress=show_progress,
                               val_iters_per_epoch=10 if val_iters_per_epoch is None else val_iters_per_epoch,
                               make_progress=make_progress, held_out=held_out, from_checkpoint=from_checkpoint,
                               first_epochs=first_epochs)
