"""Hidden labels never reach a loss; interrupted runs resume exactly — without augmentation workers
(``nnUNet_n_proc_DA=0``, what the API picks on a small CPU) and with them (2, what it picks on an
8-11-core machine; nnU-Net's default on GPU servers is more)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch
from helpers import assert_same_state

from semidiff_nnunet.errors import SemidiffError

pytestmark = pytest.mark.slow
PLANS = "semidiffDemoPlans"


@pytest.fixture(scope="module")
def leak2d(workspace):
    from semidiff_nnunet import api

    return api.prepare_demo_dataset(dim=2, show_progress=False, dataset_id=982, name="Leak2D", num_train=10,
                                    num_test=0, shape=(32, 32), max_features=8, batch_size=2, seed=5)


def _train(name, method="mean-teacher", labeled="0.5", epochs=2, final_validation=False, **kw):
    from semidiff_nnunet import api

    return api.train(name, method, labeled=labeled, seed=0, configuration="2d", fold=0, device="cpu",
                     epochs=epochs, iters_per_epoch=3, plans_name=PLANS, val_iters_per_epoch=1,
                     final_validation=final_validation, show_progress=False, **kw)


def _state(info) -> dict:
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return ck


def _weights(ck):
    return {"networks": ck["semidiff"]["networks"], "states": ck["semidiff"]["states"]}


def _preprocessed(name: str) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d"


def _restore_preprocessed(name: str) -> None:
    """Each test starts from the dataset as planned (a test before may have scrambled labels) and from
    an empty results folder."""
    folder = _preprocessed(name)
    backup = folder.with_name(folder.name + ".pristine")
    if not backup.is_dir():
        shutil.copytree(folder, backup)
    else:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
    shutil.rmtree(Path(os.environ["nnUNet_results"]) / "semidiff", ignore_errors=True)


def _scramble(name: str, cases: list[str], seed: int) -> None:
    folder = _preprocessed(name)
    rng = np.random.RandomState(seed)
    for case in cases:
        seg_file = folder / f"{case}_seg.b2nd"
        seg = blosc2.open(str(seg_file), mode="r")[:]
        scrambled = rng.randint(0, 3, size=seg.shape).astype(seg.dtype)
        assert not np.array_equal(scrambled, seg)
        seg_file.unlink()
        blosc2.asarray(np.ascontiguousarray(scrambled), urlpath=str(seg_file))
        with open(folder / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        props["class_locations"] = {k: (rng.randint(0, 32, size=(20, 4)) if len(v) else v)
                                    for k, v in props["class_locations"].items()}
        with open(folder / f"{case}.pkl", "wb") as f:
            pickle.dump(props, f)


WORKERS = pytest.mark.parametrize("n_proc_da", ["0", "2"])


@WORKERS
def test_scrambled_hidden_labels_give_a_bit_identical_run(leak2d, n_proc_da, monkeypatch):
    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_n_proc_DA", n_proc_da)
    _restore_preprocessed(leak2d)
    split = api.split(leak2d, "0.5", seed=0, fold=0)
    assert split.unlabeled and split.labeled
    first = _train(leak2d)
    reference = _state(first)
    run = json.loads((first.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["split"]["unlabeled"] == split.unlabeled

    shutil.rmtree(first.run_root)
    _scramble(leak2d, split.unlabeled, seed=1)  # hidden labels: scrambled
    second = _state(_train(leak2d))
    assert_same_state(_weights(reference), _weights(second))

    # control: scrambling a *labeled* case changes the run, so the comparison above can fail
    shutil.rmtree(first.run_root)
    _scramble(leak2d, split.labeled[:1], seed=2)
    third = _state(_train(leak2d))
    with pytest.raises(AssertionError):
        assert_same_state(_weights(reference), _weights(third))


@pytest.mark.parametrize("method", ["mean-teacher", "bcp", "diffcl"])
def test_pseudo_label_diagnostic_reads_hidden_labels_for_its_plot_only(leak2d, method, monkeypatch):
    """With ``pseudo_diagnostic`` on, the unlabeled stream carries the hidden labels (through the worker
    processes): the logged pseudo-label accuracy changes when they are scrambled, the weights do not."""
    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    _restore_preprocessed(leak2d)
    split = api.split(leak2d, "0.5", seed=0, fold=0)
    on = {"pseudo_diagnostic": "true"}
    if method == "bcp":
        on["phase.pretrain"] = "1"
    cls = api.method_trainer(method)
    seen, original = set(), cls.compute_losses

    def compute_losses(self, labeled, unlabeled):
        seen.update(unlabeled or {})
        return original(self, labeled, unlabeled)

    monkeypatch.setattr(cls, "compute_losses", compute_losses)
    first = _train(leak2d, method, overrides=on)
    reference = _state(first)
    accuracy = reference["logging"]["term/_pseudo_accuracy"]
    assert np.isfinite(accuracy[-1]) and 0 <= accuracy[-1] <= 1
    assert np.isfinite(reference["logging"]["term/_pseudo_dice"][-1])
    shutil.rmtree(first.run_root)
    _scramble(leak2d, split.unlabeled, seed=1)
    second = _state(_train(leak2d, method, overrides=on))
    assert_same_state(_weights(reference), _weights(second))
    assert second["logging"]["term/_pseudo_accuracy"][-1] != accuracy[-1]
    assert "data" in seen and "hidden_target" not in seen  # the method never sees the hidden labels


def test_pseudo_label_diagnostic_arithmetic():
    """Accuracy over the kept voxels with a hidden label, foreground Dice, coverage of the confidence mask."""
    from types import SimpleNamespace

    from semidiff_nnunet.training.trainer import SemiSupervisedTrainer

    t = SimpleNamespace(label_manager=SimpleNamespace(has_ignore_label=False), _reported_pseudo=None)
    hidden = torch.tensor([[[[0, 1, 1, -1]]]], dtype=torch.int16)  # (B, 1, 1, 4): the last voxel unknown
    out = SemiSupervisedTrainer._pseudo_label_diagnostic(t, hidden)
    assert all(np.isnan(float(v)) for v in out.values())  # nothing reported
    t._reported_pseudo = (torch.tensor([[[1, 1, 0, 1]]]), torch.tensor([[[True, True, False, True]]]))
    out = {k: float(v) for k, v in SemiSupervisedTrainer._pseudo_label_diagnostic(t, hidden).items()}
    # kept and known: voxels 0 (pred 1, true 0) and 1 (pred 1, true 1)
    assert out["_pseudo_accuracy"] == 0.5 and out["_pseudo_coverage"] == pytest.approx(2 / 3)
    assert out["_pseudo_dice"] == pytest.approx(2 * 1 / (2 + 1))


@WORKERS
def test_interrupted_run_resumes_exactly(leak2d, n_proc_da, monkeypatch):
    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    monkeypatch.setenv("nnUNet_n_proc_DA", n_proc_da)
    _restore_preprocessed(leak2d)
    ema = {"ema_decay": "0.95"}  # not the default: the resumed run must take it from the run, not from --set
    straight = _train(leak2d, labeled="4", epochs=3, save_every=1, overrides=ema)
    reference = _state(straight)
    shutil.rmtree(straight.run_root)

    original = MeanTeacherTrainer.on_epoch_end

    def crash_after_first_epoch(self):
        original(self)  # writes checkpoint_latest for epoch 0
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(MeanTeacherTrainer, "on_epoch_end", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(leak2d, labeled="4", epochs=3, save_every=1, overrides=ema)
    monkeypatch.setattr(MeanTeacherTrainer, "on_epoch_end", original)
    info = api.run_info(leak2d, "mean-teacher", "4", 0, "2d", 0, PLANS)
    assert (info.fold_folder / "checkpoint_latest.pth").is_file()
    assert not (info.fold_folder / "checkpoint_final.pth").is_file()
    with pytest.raises(Exception, match="--continue"):
        _train(leak2d, labeled="4", epochs=3, save_every=1)
    with pytest.raises(SemidiffError, match="started with ema_decay=0.95"):
        _train(leak2d, labeled="4", epochs=3, save_every=1, continue_training=True, overrides={"ema_decay": "0.9"})
    resumed = _state(_train(leak2d, labeled="4", epochs=3, save_every=1, continue_training=True))
    assert_same_state(_weights(reference), _weights(resumed))
    assert_same_state(reference["optimizer_state"], resumed["optimizer_state"])
    assert_same_state(reference["logging"]["train_losses"], resumed["logging"]["train_losses"])
    assert_same_state(reference["logging"]["term/consistency"], resumed["logging"]["term/consistency"])
    assert reference["semidiff"]["iteration"] == resumed["semidiff"]["iteration"] == 9


def test_continue_validates_a_run_killed_during_its_final_validation(leak2d, monkeypatch):
    """A run killed while validating has checkpoint_final but no validation: --continue validates it,
    and only that (the weights stay those of the finished run)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    _restore_preprocessed(leak2d)

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(leak2d, labeled="4", final_validation=True)
    monkeypatch.undo()
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    info = api.run_info(leak2d, "mean-teacher", "4", 0, "2d", 0, PLANS)
    final = info.fold_folder / "checkpoint_final.pth"
    before = final.read_bytes()
    assert not (info.fold_folder / "validation" / "summary.json").exists()
    _train(leak2d, labeled="4", final_validation=True, continue_training=True)
    summary = json.loads((info.fold_folder / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["metric_per_case"] and final.read_bytes() == before
