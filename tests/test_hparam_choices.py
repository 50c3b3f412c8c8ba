"""Choices are checked where they are declared: every setting of a built-in method with a fixed set of
values is a ``Literal[...]`` field of its hyperparameter dataclass, and the one option parser refuses a
wrong value, naming the choices (and the closest one), before any planning (``check_train_options``,
what every training command calls first); no method checks its strings by hand."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from helpers import builtin_methods

from semidiff_nnunet import api
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.hparams import BetaSchedule, LogSnrSchedule

# (method, setting, its choices), written out: removing a Literal makes its row fail
CHOICES = [
    ("superdiffusion", "predictor", ("auto", "teacher", "student")),
    ("superdiffusion", "beta_schedule", ("linear", "cosine", "sigmoid")),
    ("superdiffusion", "cycle", ("code", "paper")),
    ("superdiffusion", "recon_loss", ("eps", "image")),
    ("superdiffusion", "checkpointing", ("all", "rounds", "none")),
    ("superdiffusion", "optimizer", ("sgd", "adam")),
    ("superdiffusion", "infer_noise", ("fixed", "zeros")),
    ("diffrect", "low_confidence", ("background", "ignore")),
    ("diffrect", "beta_schedule", ("linear", "cosine", "sigmoid")),
    ("diffrect", "denoiser_condition", ("skip", "input")),
    ("semigda", "unsup_seg", ("cross_pseudo", "soft_dice")),
    ("semigda", "lambda_schedule", ("authors", "paper")),
    ("semigda", "input_range", ("auto", "rgb01", "zscore")),
    ("diffcl", "ds_pseudo_label", ("auto", "noise", "forward")),
    ("diffcl", "scan_backend", ("auto", "torch", "fused")),
    ("diffcl", "noise_schedule", ("cosine", "linear")),
    ("diffcl", "cl_reduction", ("sum", "mean")),
    ("protodiff", "noise_schedule", ("cosine", "linear")),
    ("bcp", "selftrain_start", ("best", "last")),
    ("bcp", "phase_lr", ("phase", "run")),
    ("unimatch", "weak_view", ("nnunet", "geometry")),
    ("unimatch", "strong_view", ("authors", "medical")),
    ("fixmatch", "weak_view", ("nnunet", "geometry")),
    ("fixmatch", "strong_view", ("authors", "medical")),
    ("mean-teacher", "weak_view", ("nnunet", "geometry")),  # BaseHParams': every method has it
]
#: string settings that are not choices: a path and lists parsed by the method
FREE_TEXT = {("semigda", "vae"), ("cct", "perturbations"), ("urpc", "head_perturbations")}


@pytest.mark.parametrize("method, key, choices", CHOICES, ids=[f"{m}.{k}" for m, k, _ in CHOICES])
def test_a_wrong_choice_is_refused_before_planning_naming_the_choices(method, key, choices):
    with pytest.raises(SemidiffError) as info:
        api.check_train_options(method, overrides={key: "bogus"}, configuration="2d")
    said = str(info.value)
    assert said.startswith(f"--set {key}=bogus: choose one of {', '.join(choices)}"), said
    with pytest.raises(SemidiffError, match=rf"\(did you mean {choices[-1]}\?\)"):  # a near miss is named
        api.check_train_options(method, overrides={key: choices[-1][:-1] + "X"}, configuration="2d")


def _hints(method: str) -> dict:
    return typing.get_type_hints(api.method_trainer(method).hparams_class)


@pytest.mark.parametrize("method", builtin_methods())
def test_every_string_setting_is_a_choice_or_free_text(method):
    hints = _hints(method)
    for field in dataclasses.fields(api.method_trainer(method).hparams_class):
        if hints[field.name] is str:
            assert (method, field.name) in FREE_TEXT, f"{method}.{field.name} is a str: make it a Literal[...]"


def test_no_method_checks_a_choice_by_hand():
    """The plugins keep no tables of allowed values (``CHOICES``, ``INPUT_RANGES``) for the parser to miss."""
    from pathlib import Path

    plugins = Path(api.__file__).resolve().parents[1] / "plugins"
    for path in plugins.rglob("trainer.py"):
        text = path.read_text(encoding="utf-8")
        assert "CHOICES = " not in text and "INPUT_RANGES" not in text, path


def test_schedule_choices_are_the_schedule_tables():
    from semidiff_nnunet.diffusion import BETA_SCHEDULES, LOG_SNR_SCHEDULES

    assert set(typing.get_args(BetaSchedule)) == set(BETA_SCHEDULES)
    assert set(typing.get_args(LogSnrSchedule)) == set(LOG_SNR_SCHEDULES)


@pytest.mark.parametrize("method, key, value, said", [
    ("cct", "perturbations", "feature_noise:0.3,vat", "unknown perturbation 'vat'; choose one of feature_noise"),
    ("cct", "perturbations", "dropout:lots", "'dropout:lots': the value after the colon must be a number"),
    ("cct", "perturbations", " , ", "cct needs at least one auxiliary decoder"),
    ("urpc", "head_perturbations", "feature_dropout:0.8", "feature_dropout takes no value"),
])
def test_a_wrong_perturbation_list_is_refused_before_planning(method, key, value, said):
    """The free-text lists are parsed with the other settings (before planning), not when the network is built."""
    with pytest.raises(SemidiffError, match=re.escape(said)):
        api.check_train_options(method, overrides={key: value}, configuration="2d")
    api.check_train_options(method, overrides={key: "feature_noise:0.2,dropout"}, configuration="2d")  # valid
