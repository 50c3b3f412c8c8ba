"""The API behind the CLI, without training: ``--set`` routing and checks (``method:key``, ``phase.NAME``),
the run configuration and progress callback handed to the trainer, phases kept on ``--continue``, the
fold checked against the split. A stand-in trainer class records what ``api.train`` gives it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from semidiff_nnunet import api
from semidiff_nnunet.api import installed, options
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.declarations import Phase
from semidiff_nnunet.training.hparams import BaseHParams
from semidiff_nnunet.training.run_config import RunConfig
from semidiff_nnunet.training.splits import LabeledSpec


@dataclass
class StageHParams(BaseHParams):
    weight: float = 0.1
    rampup_fraction: float = 1.0


class StageTrainer:
    """Stands in for a SemiSupervisedTrainer with two phases: records its plans and its progress callback."""

    hparams_class = StageHParams
    phases = (Phase("pretrain", share=0.3), Phase("co-training"))
    created: list = []

    def __init__(self, plans, configuration, fold, dataset_json, device):
        self.plans, self.fold, self.device = plans, fold, device
        self.progress = None
        self.progress_at_training = "never trained"
        StageTrainer.created.append(self)

    def load_checkpoint(self, filename):
        self.resumed_from = filename

    def run_training(self):
        self.progress_at_training = self.progress

    def perform_actual_validation(self, save_probabilities):
        pass


@dataclass
class PlainHParams(BaseHParams):
    weight: float = 0.5


class PlainTrainer(StageTrainer):
    hparams_class = PlainHParams
    phases = ()


class DimsTrainer(PlainTrainer):
    """Records what its check_options is told (the configuration and its spatial dimensions)."""

    checked: list = []

    @classmethod
    def check_options(cls, hparams, configuration, dim):
        cls.checked.append((configuration, dim))


FAKES = {"stages": StageTrainer, "plain": PlainTrainer, "dims": DimsTrainer}


@pytest.fixture
def fakes(monkeypatch):
    """Methods "stages" and "plain" next to the real ones (the registry itself is left alone)."""
    real_trainer = api.method_trainer

    class Registry:
        def __init__(self, real):
            self.real = real

        def method(self, name):
            return name if name in FAKES else self.real.method(name)

    real_registry = installed.get_registry()
    # where the api's modules look them up (semidiff_nnunet.api only re-exports them)
    monkeypatch.setattr(installed, "method_trainer", lambda name: FAKES[name] if name in FAKES else real_trainer(name))
    monkeypatch.setattr(installed, "get_registry", lambda: Registry(real_registry))
    monkeypatch.setattr(options, "resolve_device", lambda device: "cpu")  # no torch thread / env side effects
    monkeypatch.setattr(installed, "activate_trainer_shim", lambda: None)
    StageTrainer.created.clear()
    return FAKES


# ---------------------------------------------------------------------------------------------- --set routing
def test_one_method_plain_and_phase_items(fakes):
    assert api.method_overrides(["stages"], ["weight=0.2", "phase.pretrain=0.5"]) == {
        "stages": {"weight": "0.2", "phase.pretrain": "0.5"}}
    with pytest.raises(SemidiffError, match="Did you mean weight"):
        api.method_overrides(["stages"], ["wieght=0.2"])
    with pytest.raises(SemidiffError, match="expected a value of type float"):
        api.method_overrides(["stages"], ["weight=abc"])
    with pytest.raises(SemidiffError, match=r"no phase 'warmup'; its phases: pretrain, co-training"):
        api.method_overrides(["stages"], ["phase.warmup=0.3"])
    with pytest.raises(SemidiffError, match=r"phase.pretrain=1.5: give a share"):
        api.method_overrides(["stages"], ["phase.pretrain=1.5"])
    with pytest.raises(SemidiffError, match="this method has a single phase"):
        api.method_overrides(["plain"], {"phase.pretrain": "0.3"})


def test_several_methods_key_for_all_that_have_it_method_key_for_one(fakes):
    got = api.method_overrides(["stages", "plain"], ["rampup_fraction=0.5", "weight=0.3", "plain:weight=0.9",
                                                     "phase.pretrain=4"])
    assert got == {"stages": {"rampup_fraction": "0.5", "weight": "0.3", "phase.pretrain": "4"},
                   "plain": {"weight": "0.9"}}  # METHOD:KEY wins over KEY; phase.* only where declared
    with pytest.raises(SemidiffError, match="not a hyperparameter of any of stages, plain"):
        api.method_overrides(["stages", "plain"], ["nonsense=1"])
    with pytest.raises(SemidiffError, match="^plain: Unknown hyperparameter 'rampup_fraction'"):
        api.method_overrides(["stages", "plain"], ["plain:rampup_fraction=0.5"])
    with pytest.raises(SemidiffError, match="'cps' is not one of this command's methods"):
        api.method_overrides(["stages", "plain"], ["cps:weight=1"])


def test_builtin_methods_route_too():
    got = api.method_overrides(["supervised", "mean-teacher"], ["mean-teacher:consistency=0.3"])
    assert got == {"supervised": {}, "mean-teacher": {"consistency": "0.3"}}


# ---------------------------------------------------------------------------------------------- api.train
@pytest.fixture
def planned(workspace) -> str:
    """A preprocessed-looking dataset: plans, data folders, dataset.json and a 5-fold split (no images).
    ``3d_custom`` inherits its patch size and data from ``3d_fullres`` (nnU-Net's ``inherits_from``)."""
    name = "Dataset996_CliApi"
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    for ident in ("FakePlans_2d", "FakePlans_3d_fullres"):
        (pre / ident).mkdir(parents=True, exist_ok=True)
    (pre / "FakePlans.json").write_text(json.dumps({"plans_name": "FakePlans", "configurations": {
        "2d": {"data_identifier": "FakePlans_2d", "patch_size": [32, 32], "architecture": {}},
        "3d_fullres": {"data_identifier": "FakePlans_3d_fullres", "patch_size": [8, 16, 16], "architecture": {}},
        "3d_custom": {"inherits_from": "3d_fullres", "batch_size": 1}}}), encoding="utf-8")
    (pre / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "a": 1}}),
                                      encoding="utf-8")
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 5), encoding="utf-8")
    return name


def _train(name, method="stages", **kwargs):
    args = dict(labeled="2", seed=3, configuration="2d", fold=0, device="cpu", plans_name="FakePlans")
    args.update(kwargs)
    return api.train(name, method, **args)


def test_train_hands_the_run_config_and_the_progress_to_the_trainer(fakes, planned):
    progress = object()
    info = _train(planned, epochs=4, iters_per_epoch=5, val_iters_per_epoch=0, save_every=1,
                  overrides=["weight=0.25", "phase.pretrain=0.5"], progress=progress, final_validation=False)
    trainer = StageTrainer.created[-1]
    assert trainer.progress_at_training is progress  # set before training starts
    assert "progress" not in trainer.plans["semidiff"]
    assert RunConfig.read(trainer.plans) == RunConfig(
        method="stages", labeled=LabeledSpec.parse("2"), seed=3,
        hparams={**dataclasses.asdict(BaseHParams()), "weight": 0.25, "rampup_fraction": 1.0},
        phases={"pretrain": "0.5"}, num_epochs=4, num_iterations_per_epoch=5, num_val_iterations_per_epoch=0,
        save_every=1)
    assert trainer.plans["continue_training"] is False
    assert info.fold_folder.parts[-3:] == (planned, "StageTrainer__FakePlans__2d", "fold_0")


@pytest.mark.parametrize("kwargs, message", [
    ({"fold": 5}, r"--fold 5: Dataset996_CliApi has 5 folds"),
    ({"fold": "x"}, r"--fold x: give a fold number"),
    ({"val_iters_per_epoch": -1}, r"--val-iters must be at least 0"),
    ({"epochs": 0}, r"--epochs must be at least 1"),
    ({"overrides": ["phase.cotraining=0.5"]}, r"no phase 'cotraining'"),
], ids=["fold-out-of-split", "fold-text", "val-iters", "epochs", "phase"])
def test_train_refuses_before_creating_anything(fakes, planned, kwargs, message):
    with pytest.raises(SemidiffError, match=message):
        _train(planned, seed=5, **kwargs)
    assert not StageTrainer.created
    assert not (api.paths.run_root("stages", "lab2cases", 5)).exists()


def test_a_configuration_inherits_patch_size_and_data_as_in_nnunet(fakes, planned):
    """``3d_custom`` has no patch size nor data identifier of its own: nnU-Net's PlansManager takes both from
    ``3d_fullres``, so the method's check_options hears 3 dimensions and the run finds the 3d data."""
    DimsTrainer.checked.clear()
    _train(planned, "dims", configuration="3d_custom", seed=13, final_validation=False)
    assert DimsTrainer.checked == [("3d_custom", None), ("3d_custom", 3)]  # by name, then from the plans
    assert StageTrainer.created[-1].plans["configurations"]["3d_custom"] == {"inherits_from": "3d_fullres",
                                                                             "batch_size": 1}
    with pytest.raises(SemidiffError, match=r"'3d_lowres' is not in FakePlans of Dataset996_CliApi \(has: 2d, "
                                            r"3d_fullres, 3d_custom\); pick one of those with -c"):
        _train(planned, "dims", configuration="3d_lowres", seed=13)


def test_plan_and_train_checks_the_fold_before_planning(fakes, workspace, monkeypatch):
    """``--fold 7`` on a dataset not planned yet is refused before planning writes anything (nnU-Net's default
    split has folds 0-4); a splits_final.json with more folds allows it."""
    from semidiff_nnunet.api import preprocessing

    def planning_reached(*args, **kwargs):
        raise AssertionError("planning reached")

    monkeypatch.setattr(preprocessing, "plan_and_preprocess", planning_reached)
    raw = Path(os.environ["nnUNet_raw"]) / "Dataset994_FoldFirst"
    raw.mkdir(exist_ok=True)
    (raw / "splits_final.json").unlink(missing_ok=True)
    message = r"--fold 7: Dataset994_FoldFirst has 5 folds \(nnU-Net's default split\); pick 0..4 or all"
    with pytest.raises(SemidiffError, match=message):
        api.plan_and_train("994", "plain", fold=7, device="cpu")
    with pytest.raises(SemidiffError, match=message):
        api.benchmark("994", "plain", fold=7, device="cpu")
    (raw / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 10), encoding="utf-8")
    with pytest.raises(AssertionError, match="planning reached"):
        api.plan_and_train("994", "plain", fold=7, device="cpu")


def test_a_folder_of_an_unset_nnunet_raw_gets_the_hint(fakes, planned, tmp_path):
    """``-i $nnUNet_raw/Dataset996_CliApi/imagesTs`` in a shell without nnUNet_raw arrives as
    ``/Dataset996_CliApi/imagesTs``: the sentence that reports the missing folder says what to run."""
    info = api.run_info(planned, "stages", "2", 11, "2d", 0, "FakePlans")
    info.fold_folder.mkdir(parents=True, exist_ok=True)
    torch.save({"current_epoch": 1}, info.fold_folder / "checkpoint_final.pth")  # a model to predict with
    hint = 'nnUNet_raw is not set: run eval "$(semidiff env)" first.'
    with pytest.raises(SemidiffError) as e:
        api.predict(planned, "stages", "/Dataset996_CliApi/imagesTs", tmp_path / "out", labeled="2", seed=11,
                    plans_name="FakePlans", device="cpu")
    assert str(e.value) == f"Input folder /Dataset996_CliApi/imagesTs does not exist; {hint}"
    with pytest.raises(SemidiffError) as e:
        api.predict(planned, "stages", tmp_path / "nowhere", tmp_path / "out", labeled="2", seed=11,
                    plans_name="FakePlans", device="cpu")
    assert str(e.value) == f"Input folder {tmp_path / 'nowhere'} does not exist."
    with pytest.raises(SemidiffError, match=r"--pred folder /Dataset996_CliApi/pred does not exist; nnUNet_raw is "
                                            r"not set"):
        api.evaluate(planned, "/Dataset996_CliApi/pred", tmp_path)
    with pytest.raises(SemidiffError, match=r"--ref folder /Dataset996_CliApi/labelsTs does not exist; nnUNet_raw "
                                            r"is not set"):
        api.evaluate(planned, tmp_path, "/Dataset996_CliApi/labelsTs")


def _started_run(name, run_json: dict):
    info = api.run_info(name, "stages", "2", 7, "2d", 0, "FakePlans")
    info.fold_folder.mkdir(parents=True, exist_ok=True)
    torch.save({"semidiff": {}, "current_epoch": 1}, info.fold_folder / "checkpoint_latest.pth")  # a resume point
    (info.fold_folder / "semidiff_run.json").write_text(json.dumps(run_json), encoding="utf-8")
    return info


def test_continue_keeps_the_phases_and_hparams_the_run_started_with(fakes, planned):
    _started_run(planned, {"hparams": {"weight": 0.4, "rampup_fraction": 1.0, "unlabeled_batch_size": 0},
                           "phases": {"pretrain": [0, 2], "co-training": [2, 4]},
                           "phase_overrides": {"pretrain": "0.5"}})
    _train(planned, seed=7, continue_training=True, final_validation=False)
    cfg = RunConfig.read(StageTrainer.created[-1].plans)
    assert cfg.phases == {"pretrain": "0.5"} and cfg.hparams["weight"] == 0.4
    assert StageTrainer.created[-1].plans["continue_training"] is True
    _train(planned, seed=7, continue_training=True, overrides=["phase.pretrain=0.50"], final_validation=False)
    with pytest.raises(SemidiffError, match=r"started with phase.pretrain=0.5; resume it without "
                                            r"--set phase.pretrain=0.3"):
        _train(planned, seed=7, continue_training=True, overrides=["phase.pretrain=0.3"])
    with pytest.raises(SemidiffError, match=r"started with weight=0.4"):
        _train(planned, seed=7, continue_training=True, overrides=["weight=0.2"])


def test_continue_of_a_run_from_before_phases(fakes, planned):
    """An older run (no phase_overrides in semidiff_run.json) ran every phase at its declared length."""
    _started_run(planned, {"hparams": {"weight": 0.1}})
    _train(planned, seed=7, continue_training=True, final_validation=False)
    assert RunConfig.read(StageTrainer.created[-1].plans).phases == {}
    with pytest.raises(SemidiffError, match=r"started with the default length of phase 'pretrain'"):
        _train(planned, seed=7, continue_training=True, overrides=["phase.pretrain=0.3"])


def test_results_root_when_the_shell_points_nnunet_results_at_one_run(tmp_path, monkeypatch):
    """After ``eval "$(semidiff env -m METHOD)"`` (nnUNet_results = one run root, for stock nnU-Net),
    semidiff commands in the same shell still resolve runs from the root above it."""
    from semidiff_nnunet import paths

    run = tmp_path / "semidiff" / "mean-teacher__lab0.1__seed0"
    monkeypatch.setenv("nnUNet_results", str(run))
    assert paths.results_root() == tmp_path
    assert paths.run_root("supervised", "lab0.1", 1) == tmp_path / "semidiff" / "supervised__lab0.1__seed1"
    for plain in (tmp_path / "results", tmp_path / "semidiff", tmp_path / "x" / "mean-teacher__lab0.1__seed0"):
        monkeypatch.setenv("nnUNet_results", str(plain))
        assert paths.results_root() == plain
