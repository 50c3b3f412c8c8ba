"""CPU end-to-end runs through the CLI on tiny generated datasets (2D and 3D)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY
from helpers import assert_stock_predictor_matches, load_image, raw

pytestmark = pytest.mark.slow
SHORT = ["--epochs", "2", "--iters-per-epoch", "2"]


def test_2d_plan_train_predict_evaluate_cli(demo2d, run_cli, tmp_path):
    code, out, err = run_cli("plan-and-train", demo2d, "-m", "mean-teacher", "--labeled", "0.2", "-c", "2d",
                             *SHORT, *TINY)
    assert code == 0, err
    assert "perform_everything_on_device" not in out + err  # nnU-Net's CPU warning during validation
    # not a terminal (as under nohup or SLURM): one plain line per epoch, with the loss terms, while it runs
    lines = [x for x in err.splitlines() if x.startswith("mean-teacher epoch ")]
    assert [x.split(",")[0] for x in lines] == ["mean-teacher epoch 1/2", "mean-teacher epoch 2/2"], err
    assert "supervised " in lines[0] and lines[0].rstrip().endswith(" s")
    from semidiff_nnunet import api

    info = api.run_info(demo2d, "mean-teacher", "0.2", 0, "2d", 0, "semidiffDemoPlans")
    assert info.fold_folder.parts[-4:] == (
        "mean-teacher__lab0.2__seed0", demo2d, "MeanTeacherTrainer__semidiffDemoPlans__2d", "fold_0")
    for f in ("checkpoint_final.pth", "progress.png", "semidiff_run.json", "validation/summary.json"):
        assert (info.fold_folder / f).is_file(), f
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (info.model_folder / f).is_file(), f
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["method"] == "mean-teacher" and run["hparams"]["consistency"] == 0.1
    split = run["split"]
    assert len(split["labeled"]) == 2 and len(split["unlabeled"]) == 7 and len(split["validation"]) == 3
    assert split["extra_unlabeled"] == ["demoun_000", "demoun_001", "demoun_002"]
    assert not set(split["validation"]) & (set(split["labeled"]) | set(split["unlabeled"]))
    plans = json.loads((info.model_folder / "plans.json").read_text(encoding="utf-8"))
    assert plans["semidiff"]["labeled"]["fraction"] == 0.2
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(ck["semidiff"]["states"]) == {"teacher"} and ck["current_epoch"] == 2
    terms = [k for k in ck["logging"] if k.startswith("term/")]
    assert {"term/supervised", "term/consistency", "term/_consistency_weight"} <= set(terms)
    assert len(ck["logging"]["term/consistency"]) == 2

    # the same run again must not overwrite it
    code, _, err = run_cli("train", demo2d, "-m", "mean-teacher", "--labeled", "0.2", "-c", "2d", *SHORT, *TINY)
    assert code == 1 and "already finished" in err

    # split command agrees with the run
    code, out, _ = run_cli("split", "-d", "980", "--labeled", "0.2", "--seed", "0", "--json")
    assert code == 0 and json.loads(out)["labeled"] == split["labeled"]

    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", "-d", "980", "-m", "mean-teacher", "--labeled", "0.2", "-c", "2d",
                           "-i", raw(demo2d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["demots_000.nii.gz", "demots_001.nii.gz", "demots_002.nii.gz"]
    code, out, err = run_cli("evaluate", "-d", "980", "--pred", pred, "--ref", raw(demo2d) / "labelsTs")
    assert code == 0, err
    summary = json.loads((pred / "summary.json").read_text(encoding="utf-8"))
    assert {"1", "2"} <= set(summary["mean"]) and "Dice" in summary["foreground_mean"]
    assert "Dice" in out

    # stock nnU-Net loads the run through the printed environment (subprocess: a clean interpreter)
    env = assert_stock_predictor_matches(run_cli, demo2d, "mean-teacher", "0.2", pred, tmp_path)
    assert env["nnUNet_results"] == str(info.run_root)


def test_3d_supervised_and_mean_teacher_cli(demo3d, run_cli, tmp_path):
    for method in ("supervised", "mean-teacher"):
        code, _, err = run_cli("plan-and-train", demo3d, "-m", method, "--labeled", "2", "-c", "3d_fullres",
                               *SHORT, "--no-val", *TINY)
        assert code == 0, err
        pred = tmp_path / method
        code, _, err = run_cli("predict", "-d", demo3d, "-m", method, "--labeled", "2", "-c", "3d_fullres",
                               "-i", raw(demo3d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                               "--device", "cpu", "--disable-tta")
        assert code == 0, err
        ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
        seg = load_image(pred / "demots_000.nii.gz")
        assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
        code, _, err = run_cli("evaluate", "-d", demo3d, "--pred", pred, "--ref", raw(demo3d) / "labelsTs")
        assert code == 0, err


@pytest.mark.parametrize("args, message", [
    (["plan-and-train", "Dataset999_Nope", "-m", "supervised"], "was not found"),
    (["plan-and-train", "980", "-m", "mean-techer"], "Did you mean 'mean-teacher'"),
    (["train", "980", "-m", "supervised", "--labeled", "1.7"], "fraction must be in (0, 1]"),
    (["train", "980", "-m", "mean-teacher", "--set", "consistensy=1"], "Did you mean consistency"),
    (["train", "980", "-m", "supervised", "-c", "3d_fullres"], "not in"),
    (["predict", "-d", "980", "-m", "supervised", "--labeled", "0.5", "-i", "/nonexistent", "-o", "/tmp/x"],
     "No trained model"),
])
def test_user_mistakes_get_one_sentence(demo2d, run_cli, args, message):
    code, out, err = run_cli(*args, *(["--plans", "semidiffDemoPlans", "--device", "cpu"]
                                      if args[0] in ("train", "predict") else []))
    assert code == 1
    assert message in err and "Traceback" not in err + out


def test_unknown_dataset_names_the_folders_searched(workspace, run_cli):
    code, out, err = run_cli("split", "-d", "Dataset998_Nope", "--labeled", "0.1")
    assert code == 1 and "Traceback" not in out + err
    text = err.replace("\n", "")
    assert os.environ["nnUNet_raw"] in text and os.environ["nnUNet_preprocessed"] in text


def test_a_split_that_cannot_be_drawn_leaves_no_run_folder(demo2d, run_cli, tmp_path):
    from semidiff_nnunet import api, paths

    validation = api.split(demo2d, "0.2").validation
    for labeled, message, tag in [
        ("1000", "asks for more labeled cases", "lab1000"),
        (validation[0], "validation case", None),
        ("demotr_999", "not training cases", None),
    ]:
        if tag is None:  # a labels file
            f = tmp_path / f"{labeled}.txt"
            f.write_text(labeled + "\n", encoding="utf-8")
            labeled = str(f)
        before = sorted(p.name for p in paths.runs_root().iterdir()) if paths.runs_root().is_dir() else []
        code, out, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", labeled, "-c", "2d", *SHORT, *TINY)
        assert code == 1 and message in err.replace("\n", " ") and "Traceback" not in out + err, err
        after = sorted(p.name for p in paths.runs_root().iterdir()) if paths.runs_root().is_dir() else []
        assert after == before, f"--labeled {labeled} left {set(after) - set(before)}"


def test_dataset_failing_integrity_check(workspace, run_cli):
    from semidiff_nnunet.synthetic import generate_demo_dataset

    folder = generate_demo_dataset(workspace / "nnUNet_raw", dim=2, num_train=4, num_test=0, shape=(16, 16),
                                   dataset_id=983, name="Broken")
    (folder / "labelsTr" / "demotr_001.nii.gz").unlink()  # a training case without its label
    code, out, err = run_cli("plan-and-train", "983", "-m", "supervised", "--device", "cpu")
    assert code == 1 and "integrity check" in err and "Traceback" not in err + out


def test_gpu_memory_target_plans_under_their_own_name(demo2d, run_cli):
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "supervised", "--labeled", "3", "-c", "2d",
                           "--gpu-memory-target", "2", "--epochs", "1", "--iters-per-epoch", "1", "--no-val",
                           "--device", "cpu")
    assert code == 0, err
    pre = Path(os.environ["nnUNet_preprocessed"]) / demo2d
    plans = json.loads((pre / "nnUNetPlans_2GB.json").read_text(encoding="utf-8"))
    assert plans["plans_name"] == "nnUNetPlans_2GB"
    from semidiff_nnunet import api

    info = api.run_info(demo2d, "supervised", "3", 0, "2d", 0, "nnUNetPlans_2GB")
    assert (info.fold_folder / "checkpoint_final.pth").is_file()
    assert info.model_folder.name == "SupervisedTrainer__nnUNetPlans_2GB__2d"
    # predicting with a plans name that was never trained names the one that was
    code, out, err = run_cli("predict", "-d", demo2d, "-m", "supervised", "--labeled", "3", "-c", "2d",
                             "--plans", "nnUNetPlans_2.0GB", "-i", raw(demo2d) / "imagesTs", "-o", "/tmp/unused",
                             "--device", "cpu")
    assert code == 1 and "--plans nnUNetPlans_2GB -c 2d" in err.replace("\n", ""), err


def test_pseudo_labels_are_preprocessed_for_unlabeled_cases_only(workspace):
    from semidiff_nnunet import api, planning
    from semidiff_nnunet.synthetic import generate_demo_dataset

    folder = generate_demo_dataset(workspace / "nnUNet_raw", dim=2, num_train=5, num_test=0, num_unlabeled=2,
                                   shape=(16, 16), dataset_id=984, name="Pseudo2D")
    (folder / "labelsPseudo").mkdir()
    src = sitk.ReadImage(str(folder / "labelsTr" / "demotr_000.nii.gz"))
    for case in ("demoun_000", "demotr_003"):
        sitk.WriteImage(src, str(folder / "labelsPseudo" / f"{case}.nii.gz"))
    name = api.plan_and_preprocess(984, ["2d"], fingerprint_voxels=1e4, show_progress=False)
    assert name == "nnUNetPlans"
    pre = planning.preprocessed_folder("Dataset984_Pseudo2D")
    assert sorted(p.name for p in (pre / "nnUNetPlans_2d__unlabeled").glob("*.pkl")) == [
        "demoun_000.pkl", "demoun_001.pkl"]
    assert not list((pre / "nnUNetPlans_2d__unlabeled").glob("*_seg.b2nd"))  # image only, no fake label
    assert sorted(p.name for p in (pre / "nnUNetPlans_2d__pseudo").glob("*_seg.b2nd")) == [
        "demotr_003_seg.b2nd", "demoun_000_seg.b2nd"]
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(fingerprint["shapes_after_crop"]) == 5  # unlabeled images are not in the fingerprint
    split = api.split(984, "1", seed=0, fold=0)
    from semidiff_nnunet.training.splits import LabeledSpec, make_semi_split

    s = make_semi_split(split.labeled + split.unlabeled, split.validation, LabeledSpec.parse("1"), 0,
                        split.extra_unlabeled, ["demoun_000", "demotr_003"])
    assert "demoun_000" in s.pseudo
    assert ("demotr_003" in s.pseudo) == ("demotr_003" in s.unlabeled)


def test_diverged_run_stops_with_one_sentence(demo2d, run_cli, monkeypatch):
    """A loss that stays NaN ends the run with an error naming the terms, not a NaN-trained model."""
    from semidiff_nnunet.registry import get_registry

    SupervisedTrainer = get_registry().method("supervised").load_trainer()
    original = SupervisedTrainer.compute_losses

    def diverging(self, labeled, unlabeled):
        terms = original(self, labeled, unlabeled)
        return {k: v * float("nan") for k, v in terms.items()}

    monkeypatch.setattr(SupervisedTrainer, "compute_losses", diverging)
    monkeypatch.setattr(SupervisedTrainer, "max_nonfinite_steps", 3)
    code, _, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", "3", "--seed", "7", "-c", "2d",
                           "--epochs", "2", "--iters-per-epoch", "2", "--no-val", *TINY)
    assert code == 1 and "Traceback" not in err
    assert "Training diverged" in err and "3 steps in a row" in err and "non-finite terms: loss" in err
