"""Checks of the options every command shares, done before any work: folds, ``--set`` items, counts,
devices, checkpoints, folders and configurations. Each mistake is one sentence naming the fix."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semidiff_nnunet import planning
from semidiff_nnunet.api import installed
from semidiff_nnunet.errors import SemidiffError

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from semidiff_nnunet.training.splits import LabeledSpec


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


def check_counts(minimum: int = 1, **options: int | None) -> None:
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
    classes = {m: installed.method_trainer(m) for m in methods}
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
    check_counts(epochs=epochs, iters_per_epoch=iters_per_epoch, save_every=save_every)
    check_counts(0, val_iters=val_iters_per_epoch)
    installed.check_method(method)

    from semidiff_nnunet.training.hparams import resolve_hparams
    from semidiff_nnunet.training.run_config import split_overrides
    from semidiff_nnunet.training.splits import LabeledSpec

    trainer_cls = installed.method_trainer(method)
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


def resolve_device(device: str) -> torch.device:
    """``--device``: ``auto`` (cuda, else mps, else cpu), ``cpu``, ``cuda`` or ``mps``, if available."""
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


def unique_folds(folds: Sequence) -> tuple:
    """``-f`` values parsed (0-4 or ``all``), each once, in the order given."""
    return tuple(dict.fromkeys(parse_fold(f) for f in folds))




def check_folder(path: str | Path, what: str) -> Path:
    """An existing folder given as ``what`` (``Input folder``, ``--pred folder``). A path that starts with
    ``/Dataset...`` is what ``$nnUNet_raw/Dataset...`` becomes in a shell where ``nnUNet_raw`` is unset: the
    sentence says so."""
    path = Path(path)
    if path.is_dir():
        return path
    hint = ""
    if path.is_absolute() and len(path.parts) > 1 and path.parts[1].startswith("Dataset"):
        hint = '; nnUNet_raw is not set: run eval "$(semidiff env)" first'
    raise SemidiffError(f"{what} {path} does not exist{hint}.")


def plans_configuration(plans: dict, configuration: str, plans_name: str, dataset: str) -> ConfigurationManager:
    """Configuration ``configuration`` of ``plans`` as nnU-Net's trainer sees it (nnU-Net's ``PlansManager``,
    which resolves ``inherits_from``: ``3d_cascade_fullres`` takes the patch size and data of ``3d_fullres``);
    a name the plans lack is refused naming the ones they have."""
    if configuration not in plans["configurations"]:
        raise SemidiffError(f"Configuration {configuration!r} is not in {plans_name} of {dataset} (has: "
                            f"{', '.join(plans['configurations'])}); pick one of those with -c.")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_configuration(configuration)
