"""Method hyperparameters: a dataclass per method, defaults from its paper, ``--set key=value``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass

from semidiff_nnunet.errors import SemidiffError

#: a setting naming a discrete β schedule: the keys of ``semidiff_nnunet.diffusion.BETA_SCHEDULES`` (a test
#: keeps them equal; the alias lives here so that reading a method's settings imports no torch)
BetaSchedule = typing.Literal["linear", "cosine", "sigmoid"]
#: a setting naming a continuous log-SNR schedule: the keys of ``semidiff_nnunet.diffusion.LOG_SNR_SCHEDULES``
LogSnrSchedule = typing.Literal["cosine", "linear"]


@dataclass
class BaseHParams:
    """Settings every method has.

    unlabeled_batch_size: patches per unlabeled batch; 0 means the labeled batch size from the
        plans (SSL4MIS uses equal labeled/unlabeled halves of each batch).

    The schedule policy (the engine's, the same for every method; see
    ``SemiSupervisedTrainer.burnin_iterations`` and ``ramp``):

    burnin, burnin_min, burnin_max: a supervised burn-in of ``burnin`` × the run's iterations,
        at least ``burnin_min`` and at most ``burnin_max`` iterations, and never more than a
        quarter of the run; no unlabeled batch is drawn and no unlabeled loss is computed during it.
        Defaults from SSL4MIS's mean-teacher recipe: no consistency before iteration 1000 of 30 000
        (3 %, an absolute 1000).
    rampup_min, rampup_max: every ramp-up of an unlabeled weight starts after the burn-in and lasts
        the method's ``rampup_fraction`` × the run, at least ``rampup_min`` and at most
        ``rampup_max`` iterations, capped by what is left of the run (SSL4MIS ramps over its whole
        30 000-iteration run; a nnU-Net-length run of 250 000 iterations therefore ramps over 30 000,
        a short run over at least 200 iterations).

    weak_view: the unlabeled stream's weak view, from which pseudo labels and confidence masks come:
        ``"nnunet"``, nnU-Net's whole training augmentation (geometry, then its intensity transforms:
        about three patches in four change intensity), or ``"geometry"``, nnU-Net's spatial transforms
        only (crop, rotation, scaling, mirroring), as the weak view of FixMatch and UniMatch's authors
        (rotation and flips, resize). The strong view, where a method has one, is built on the weak view.
        Default ``"nnunet"``; each method states its choice and source.

    warmup_from_pretrained: with ``--pretrained-weights`` the network starts trained, so what only warms
        it up is skipped: the supervised burn-in and the phases declared ``warmup`` (BCP's pre-training).
        ``true`` runs them anyway (the earlier behaviour). Phases that train what the checkpoint lacks
        (SuperDiffusion's label-free pathways, SemiGDA's alignment) always run.

    rampup_from_pretrained: the ramp-ups of the unlabeled weights run in full from a trained start too
        (default ``true``: the authors' schedules, which start from scratch). ``false``: a trained start
        (``--pretrained-weights`` with ``warmup_from_pretrained`` off) gives every unlabeled weight that
        ramps through the engine's ``ramp`` its full value from the first iteration, as a ramp-up only warms
        up a teacher the checkpoint already holds trained. Over a short second stage the authors' ramp keeps
        the weight near zero (mean teacher's 0.1 reaches 0.001–0.097 over 400 iterations); a method whose
        pseudo labels come from a network the checkpoint lacks (CPS's second network) is better left
        ramping. Measured on PH2 (docs/results.md): mean teacher at full weight is level with the authors'
        ramp, its consistency being about 1e-4 at a converged start. A method's own ramps (SuperDiffusion's λ, SemiGDA's λ_u) are not
        the engine's and always run.

    pseudo_diagnostic: opt-in diagnostic of the pseudo labels' accuracy over training (off by default).
        The unlabeled stream then also carries the hidden label of each unlabeled patch (training
        cases only; extra unlabeled images have none); the engine takes it out of the batch before the
        method sees it and compares it, without gradient, with what the method reports through
        ``report_pseudo_labels``: terms ``_pseudo_accuracy`` (share of reported voxels whose pseudo label
        is right) and ``_pseudo_dice`` (foreground Dice), and ``_pseudo_coverage`` (share of voxels kept
        by the method's confidence mask). It reads hidden labels for a plot only: nothing it computes
        reaches a loss, an optimiser or a random stream (the scramble-label test checks that).
    """

    unlabeled_batch_size: int = 0
    burnin: float = 0.03
    burnin_min: int = 100
    burnin_max: int = 1000
    rampup_min: int = 200
    rampup_max: int = 30000
    weak_view: typing.Literal["nnunet", "geometry"] = "nnunet"
    warmup_from_pretrained: bool = False
    rampup_from_pretrained: bool = True
    pseudo_diagnostic: bool = False


def _convert(value: str, annotation, name: str):
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split("|")[0].strip(), str)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return check_choice(name, value, typing.get_args(annotation))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0]
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
        return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise SemidiffError(f"--set {name}={value}: expected a value of type "
                            f"{getattr(annotation, '__name__', annotation)}.") from None


def check_choice(name: str, value, choices: tuple):
    """``value`` if it is one of ``choices`` (a ``Literal[...]`` field's), else one sentence naming them
    and the closest one."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SemidiffError(f"--set {name}={value}: choose one of {', '.join(map(str, choices))}{hint}.")
    return value


def check_choices(hp) -> None:
    """Every ``Literal[...]`` field of the hyperparameter dataclass ``hp`` holds one of its choices
    (values given as Python objects, e.g. by the api, bypass the string parser)."""
    for key, annotation in typing.get_type_hints(type(hp)).items():
        if typing.get_origin(annotation) is typing.Literal:
            check_choice(key, getattr(hp, key), typing.get_args(annotation))


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SemidiffError(f"--set {item!r}: write overrides as key=value, e.g. --set consistency=0.2.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve_hparams(cls: type, overrides: dict[str, typing.Any] | None = None):
    """Instantiate ``cls`` with string (CLI) or typed overrides; unknown keys get closest names."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SemidiffError(f"Unknown hyperparameter {key!r} for this method.{hint} "
                                f"Known: {', '.join(sorted(fields))}.")
        kwargs[key] = _convert(value, hints.get(key, str), key) if isinstance(value, str) else value
    hp = cls(**kwargs)
    check_choices(hp)
    return hp


def hparams_to_dict(hp) -> dict:
    return dataclasses.asdict(hp)


#: ``field(metadata={BEFORE: value})`` on a setting added after runs existed: the behaviour of a run that
#: recorded no such key (so a benchmark never takes an older run for one with the new default)
BEFORE = "before"


def legacy_values(hparams_class) -> dict:
    """``{name: value}`` of the settings that declare what runs recorded before them did (:data:`BEFORE`)."""
    return {f.name: f.metadata[BEFORE] for f in dataclasses.fields(hparams_class) if BEFORE in f.metadata}
