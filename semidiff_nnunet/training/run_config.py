"""The run configuration: one typed object, stored in the plans, read back by anyone who needs it.

nnU-Net fixes its trainer's constructor to five arguments (plans, configuration, fold,
dataset_json, device) and rebuilds the inference network from the plans alone
(``build_network_architecture``). The run's settings therefore travel inside the plans under one
key, ``plans["semidiff"]``, written and read only here::

    cfg = RunConfig(method="diffcl", labeled=LabeledSpec.parse("0.1"), hparams={"hf_threshold": 0.6})
    cfg.write(plans)                      # the API, before constructing the trainer
    RunConfig.read(plans).seed            # the trainer
    run_hparams(plans_manager, DiffCLHParams)   # a method's build_network_architecture

Training phases (:class:`Phase`) are declared by a method; their lengths may be overridden per
run with ``--set phase.NAME=VALUE`` (a share of the run such as ``0.3``, or a number of epochs
such as ``40``), kept in :attr:`RunConfig.phases`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.hparams import resolve_hparams
from semidiff_nnunet.training.splits import LabeledSpec

PLANS_KEY = "semidiff"
PHASE_PREFIX = "phase."


@dataclass
class RunConfig:
    """Everything a run needs beyond nnU-Net's plans (see the module docstring).

    ``hparams``: the method's resolved hyperparameters as plain JSON values (the method's
    dataclass is rebuilt from them by :meth:`resolve`); ``phases``: overridden phase lengths;
    ``num_*``/``save_every``: ``None`` keeps nnU-Net's values.
    """

    method: str = ""
    labeled: LabeledSpec = field(default_factory=lambda: LabeledSpec(fraction=1.0))
    seed: int = 0
    hparams: dict[str, typing.Any] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    num_epochs: int | None = None
    num_iterations_per_epoch: int | None = None
    num_val_iterations_per_epoch: int | None = None
    save_every: int | None = None
    #: checkpoint that initialises a new run's network (``--pretrained-weights``; absolute path)
    pretrained_weights: str | None = None
    #: validation cases of the fold kept apart for the benchmark's scoring: the trainer neither trains nor
    #: validates (pseudo Dice, checkpoint_best, method selections) on them (:func:`~.splits.drop_held_out`)
    held_out: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ plans <-> object
    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["labeled"] = self.labeled.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict | None) -> RunConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["labeled"] = LabeledSpec.from_json(data["labeled"]) if data.get("labeled") else LabeledSpec(fraction=1.0)
        kwargs["hparams"] = dict(data.get("hparams") or {})
        kwargs["phases"] = {str(k): str(v) for k, v in (data.get("phases") or {}).items()}
        kwargs["held_out"] = sorted(str(k) for k in (data.get("held_out") or []))
        for key in ("seed",):
            kwargs[key] = int(kwargs.get(key) or 0)
        for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every"):
            if kwargs.get(key) is not None:
                kwargs[key] = int(kwargs[key])
        return cls(**kwargs)

    def write(self, plans: dict) -> dict:
        """Store this configuration in ``plans`` (in place) and return the plans."""
        plans[PLANS_KEY] = self.to_json()
        return plans

    @classmethod
    def read(cls, plans: dict) -> RunConfig:
        """The configuration stored in ``plans`` (defaults when there is none: stock nnU-Net plans)."""
        return cls.from_json(plans.get(PLANS_KEY))

    # ------------------------------------------------------------------ hyperparameters
    def resolve(self, hparams_class: type):
        """The method's hyperparameter dataclass with this run's values (defaults for missing keys;
        stored keys the class no longer knows are ignored, so old runs still load)."""
        known = {f.name for f in dataclasses.fields(hparams_class)}
        return resolve_hparams(hparams_class, {k: v for k, v in self.hparams.items() if k in known})


def split_overrides(overrides: dict[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """``--set`` items → (hyperparameter overrides, phase overrides ``phase.NAME=VALUE``)."""
    hparams, phases = {}, {}
    for key, value in (overrides or {}).items():
        if key.startswith(PHASE_PREFIX):
            phases[key[len(PHASE_PREFIX):]] = str(value)
        else:
            hparams[key] = value
    return hparams, phases


def run_hparams(plans, hparams_class: type):
    """The resolved hyperparameters of the run whose plans are given (a plans dict or nnU-Net's
    ``PlansManager``): what a method's static ``build_network_architecture`` reads to build the same
    network at training and at inference (stock ``nnUNetv2_predict`` included)."""
    plans = getattr(plans, "plans", plans)
    return RunConfig.read(plans).resolve(hparams_class)


def check_phase_overrides(phases: dict[str, str], declared: typing.Sequence) -> None:
    """Fail with one sentence on a ``--set phase.NAME=...`` that names no declared phase or has a bad value."""
    names = [p.name for p in declared]
    for name, value in phases.items():
        if name not in names:
            known = ", ".join(names) if names else "none (this method has a single phase)"
            raise SemidiffError(f"--set phase.{name}={value}: this method has no phase {name!r}; its phases: {known}.")
        parse_phase_length(name, value)


def parse_phase_length(name: str, value: str) -> tuple[float | None, int | None]:
    """``"0.3"`` → share 0.3 of the run; ``"40"`` → 40 epochs."""
    text = str(value).strip()
    try:
        if text.isdigit():
            return None, int(text)
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise SemidiffError(f"--set phase.{name}={value}: give a share of the run in [0, 1] (like 0.3) or a "
                            f"whole number of epochs (like 40).")
    return share, None


def write_run_info(trainer) -> None:
    """``semidiff_run.json`` in the trainer's output folder: what this run is (method, labeled cases, seed,
    hyperparameters, phases, batch sizes, world size, split), written atomically when training starts."""
    import json
    import os

    from semidiff_nnunet.training.hparams import hparams_to_dict

    t = trainer
    info = {
        "method": t.method_name,
        "trainer": t.__class__.__name__,
        "labeled": t.labeled_spec.to_json(),
        "seed": t.seed,
        "fold": t.fold,
        "configuration": t.configuration_name,
        "hparams": hparams_to_dict(t.hp),
        "phases": {s.name: [s.start, s.end] for s in t.phase_spans} if t.phases else {},
        "phase_overrides": dict(t.run_config.phases),
        "num_epochs": t.num_epochs,
        "num_iterations_per_epoch": t.num_iterations_per_epoch,
        "batch_size": t.configuration_manager.batch_size,
        "unlabeled_batch_size": (t.hp.unlabeled_batch_size or t.configuration_manager.batch_size)
        if t.uses_unlabeled else 0,
        "world_size": t.world_size,
        "pretrained_weights": t.run_config.pretrained_weights,
        "split": t.semi_split.to_json(),
    }
    tmp = os.path.join(t.output_folder, "semidiff_run.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(t.output_folder, "semidiff_run.json"))
