"""``semidiff split``: which cases a run labels, leaves unlabeled, validates on and holds out, drawn as
nnU-Net's ``do_split`` and the trainer will draw them, without training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semidiff_nnunet import paths, planning
from semidiff_nnunet.api import options
from semidiff_nnunet.errors import SemidiffError

if TYPE_CHECKING:
    from semidiff_nnunet.training.splits import SemiSplit


def split(dataset: str | int, labeled: str, seed: int = 0, fold: int | str = 0, configuration: str | None = None,
          plans_name: str = "nnUNetPlans", held_out: float | None = None) -> SemiSplit:
    """The labeled/unlabeled/validation cases a run would use (without training). ``held_out``: the share of
    the fold's validation cases kept apart for scoring (:func:`~semidiff_nnunet.api.training.train`): they leave ``validation`` for
    ``held_out``."""
    fold = options.parse_fold(fold)
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
        ident = options.plans_configuration(plans, configuration, plans_name, name).data_identifier
        extra = list_cases(str(pre / (ident + paths.UNLABELED_SUFFIX)))
    elif (raw / "imagesUnlabeled").is_dir():
        extra = sorted({f.name[: -len(fe) - 5] for f in (raw / "imagesUnlabeled").iterdir() if f.name.endswith(fe)})
    held = [] if held_out is None else carve_held_out(val, held_out)[1]
    return make_semi_split(tr, val, spec, seed, extra, held_out=held)


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


def write_default_split(name: str, ident_folder: Path) -> None:
    """Write the 5-fold ``splits_final.json`` nnU-Net's ``do_split`` writes on its first training, if the
    dataset has none yet, atomically. For a distributed run, before its ranks start: each rank's trainer
    would otherwise write it at the same moment and one could read the other's half-written file."""
    import os

    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from semidiff_nnunet.training.unlabeled import list_cases

    splits_file = planning.preprocessed_folder(name) / "splits_final.json"
    keys = sorted(list_cases(str(ident_folder)))
    if splits_file.is_file() or len(keys) < 5:  # fewer cases: nnU-Net's trainer says what is wrong
        return
    tmp = splits_file.with_name(f".splits_final.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(generate_crossval_split(keys, seed=12345, n_splits=5), indent=4), encoding="utf-8")
    os.replace(tmp, splits_file)


def check_split(name: str, data_identifier: str, fold: int | str, labeled, seed: int,
                held_out: Sequence[str] = ()) -> None:
    """Draw the run's labeled split once before anything is created, so that ``--labeled 1000`` on a
    48-case fold or a labels file naming validation/unknown cases fails with one sentence and leaves no
    run folder behind."""
    from semidiff_nnunet.training.splits import make_semi_split

    train_keys, val_keys = fold_keys(name, planning.preprocessed_folder(name) / data_identifier, fold)
    if train_keys:  # (nothing listed: the trainer's own split reports the problem)
        make_semi_split(train_keys, val_keys, labeled, seed, held_out=held_out)


def held_out_cases(dataset: str | int, fold: int | str, share: float, configuration: str = "2d",
                   plans_name: str = "nnUNetPlans") -> tuple[list[str], list[str]]:
    """``(selection, held_out)``: the fold's validation cases (as nnU-Net's ``do_split`` takes them) split by
    :func:`~semidiff_nnunet.training.splits.carve_held_out`, ``share`` of them held out. A run trained with
    ``held_out=share`` validates and selects on ``selection`` only; the benchmark scores it on ``held_out``."""
    from semidiff_nnunet.training.splits import carve_held_out

    name = planning.dataset_name(dataset)
    fold = options.parse_fold(fold)
    plans = planning.load_plans(name, plans_name)
    ident = options.plans_configuration(plans, configuration, plans_name, name).data_identifier
    _, val = fold_keys(name, planning.preprocessed_folder(name) / ident, fold)
    return carve_held_out(val, share)
