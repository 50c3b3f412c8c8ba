"""`semidiff benchmark`: runs, skip/resume, CSV, Markdown (mean ± std, best in bold) and PNG."""

from __future__ import annotations

import csv
import math

import pytest

from semidiff_nnunet.api.benchmark_runs import aggregate, markdown_table

ROWS = [
    {"method": "a", "labeled": "0.1", "seed": 0, "Dice": 0.5, "HD95": 4.0},
    {"method": "a", "labeled": "0.1", "seed": 1, "Dice": 0.7, "HD95": 2.0},
    {"method": "b", "labeled": "0.1", "seed": 0, "Dice": 0.8, "HD95": 3.5},
    {"method": "b", "labeled": "0.1", "seed": 1, "Dice": 0.8, "HD95": float("nan")},
]


def test_aggregate_and_markdown():
    agg = aggregate(ROWS, ["a", "b"], ["0.1"], "Dice")
    assert agg[("a", "0.1")][0] == pytest.approx(0.6)
    assert agg[("a", "0.1")][1] == pytest.approx(math.sqrt(0.02))  # sample std
    hd = aggregate(ROWS, ["a", "b"], ["0.1"], "HD95")
    assert hd[("b", "0.1")][0] == 3.5 and math.isnan(hd[("b", "0.1")][1])  # NaN skipped; one value: no std
    md = markdown_table(ROWS, ["a", "b"], ["0.1"])
    lines = [ln for ln in md.splitlines() if ln.startswith("| a") or ln.startswith("| b")]
    assert "**0.8000 ± 0.0000**" in lines[1] and "**" not in lines[0].split("|")[2]  # best Dice: b
    assert "**3.00 ± 1.41**" in lines[0]  # best (lowest) HD95: a
    assert lines[1].endswith("| 3.50 (1/2) |")  # HD95 of b is defined for one of its two runs
    single = markdown_table(ROWS[:1], ["a"], ["0.1"])
    assert "| a | **0.5000** | **4.00** |" in single  # one seed: the mean alone, no "± 0"


@pytest.mark.slow
def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    """A benchmark must not report a run trained with another budget or other hyperparameters."""
    import json

    from semidiff_nnunet import api
    from semidiff_nnunet.api.benchmark_runs import PlannedRun, different_settings
    from semidiff_nnunet.training.hparams import hparams_to_dict

    fold = tmp_path / "fold_0"
    fold.mkdir()
    hp = json.loads(json.dumps(hparams_to_dict(api.check_train_options("mean-teacher", "0.1").hparams)))
    (fold / "semidiff_run.json").write_text(json.dumps({"num_epochs": 8, "num_iterations_per_epoch": 50,
                                                        "hparams": hp, "phase_overrides": {}}), encoding="utf-8")
    info = api.RunInfo("D", "mean-teacher", "MeanTeacherTrainer", "lab0.1", 0, "2d", 0, "P", tmp_path, tmp_path, fold)
    run = PlannedRun("mean-teacher", "0.1", 0, info)
    assert different_settings(run, 8, 50, {}) == ""
    assert different_settings(run, None, None, {}) == ""  # nothing asked: any budget
    assert "num_epochs=8, not 20" in different_settings(run, 20, 50, {})
    assert "num_iterations_per_epoch=50, not 25" in different_settings(run, 8, 25, {})
    assert "consistency=0.1, not 0.3" in different_settings(run, 8, 50, {"consistency": "0.3"})
    # a run recorded before a setting existed behaved as the setting's "before" value, not its new default
    dc_fold = tmp_path / "diffcl" / "fold_0"
    dc_fold.mkdir(parents=True)
    dc_hp = json.loads(json.dumps(hparams_to_dict(api.check_train_options("diffcl", "0.1").hparams)))
    assert dc_hp.pop("ds_from_pretrained") is True
    (dc_fold / "semidiff_run.json").write_text(json.dumps({"hparams": dc_hp, "phase_overrides": {}}), encoding="utf-8")
    dc = PlannedRun("diffcl", "0.1", 0, api.RunInfo("D", "diffcl", "DiffCLTrainer", "lab0.1", 0, "2d", 0, "P",
                                                      tmp_path, tmp_path, dc_fold))
    assert "ds_from_pretrained=False (trained before the setting existed), not True" in different_settings(dc, None,
                                                                                                            None, {})
    assert different_settings(dc, None, None, {"ds_from_pretrained": "false"}) == ""
    assert different_settings(PlannedRun("mean-teacher", "0.1", 1, api.RunInfo(
        "D", "mean-teacher", "MeanTeacherTrainer", "lab0.1", 1, "2d", 0, "P", tmp_path, tmp_path,
        tmp_path / "fold_1")), 20, 50, {}) == ""  # no run yet


def test_benchmark_cli(demo2d, run_cli, tmp_path):
    args = ["benchmark", demo2d, "-m", "supervised,mean-teacher", "--labeled", "0.3,3", "--seeds", "0",
            "-c", "2d", "--epochs", "1", "--iters-per-epoch", "2", "--plans", "semidiffDemoPlans", "--device", "cpu",
            "-o", tmp_path]
    code, out, err = run_cli(*args, "--dry-run")
    assert code == 0, err
    assert out.count("train") >= 4 and "4 run(s)" in out
    code, out, err = run_cli(*args)
    assert code == 0, err
    with open(tmp_path / "benchmark.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["labeled"]) for r in rows} == {
        ("supervised", "0.3"), ("supervised", "3"), ("mean-teacher", "0.3"), ("mean-teacher", "3")}
    assert all(r["n_cases"] == "3" and 0 <= float(r["Dice"]) <= 1 for r in rows)  # the 3 imagesTs cases
    # the final and the best (on validation) checkpoint, each scored; mIoU with the background
    assert all(0 <= float(r["Dice (best ckpt)"]) <= 1 and 0 < float(r["mIoU"]) <= 1 for r in rows)
    assert all(r["best_epoch"] == "0" for r in rows)  # one epoch: its checkpoint_best is epoch 0
    md = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "Dice @ 0.3" in md and "HD95 @ 3" in md and md.count("**") >= 4
    assert "Dice (best ckpt) @ 0.3" in md and "mIoU @ 3" in md and "held out: imagesTs/labelsTs" in md
    assert (tmp_path / "benchmark.png").stat().st_size > 1000
    assert (tmp_path / "benchmark_cases.png").stat().st_size > 1000  # held-out cases with every prediction
    code, out, err = run_cli(*args, "--dry-run")
    assert out.count("done") == 4  # finished runs are skipped
    code, out, err = run_cli(*args, "--set", "nonsense=1")
    assert code == 1 and "not a hyperparameter" in err


def test_a_variant_runs_beside_its_method_with_its_own_settings(demo2d, run_cli, tmp_path):
    """``METHOD@LABEL`` (an ablation): the same trainer with the variant's own --set, in folders of its own."""
    import json

    from semidiff_nnunet import api

    base = ["benchmark", demo2d, "--labeled", "0.3", "--seeds", "0", "-c", "2d", "--epochs", "1",
            "--iters-per-epoch", "2", "--plans", "semidiffDemoPlans", "--device", "cpu", "-o", tmp_path]
    code, _, err = run_cli(*base, "-m", "mean-teacher,mean-teacher@same", "--dry-run")
    assert code == 1 and "would be the same run twice" in err and "--set mean-teacher@same:KEY=VALUE" in err
    code, _, err = run_cli(*base, "-m", "mean-teacher@no_underscores", "--dry-run")
    assert code == 1 and "variant label of letters, digits" in err
    code, _, err = run_cli(*base, "-m", "mean-teachr@x", "--dry-run")
    assert code == 1 and "Did you mean 'mean-teacher'" in err

    args = [*base, "-m", "supervised,mean-teacher@w1", "--set", "mean-teacher@w1:consistency=1.0"]
    plain = api.run_info(demo2d, "mean-teacher", "0.3", 0, "2d", 0, "semidiffDemoPlans")
    plain_before = plain.fold_folder.exists()  # another test of the session may have trained it
    code, out, err = run_cli(*args)
    assert code == 0, err
    variant = api.run_info(demo2d, "mean-teacher@w1", "0.3", 0, "2d", 0, "semidiffDemoPlans")
    assert variant.run_root.name.startswith("mean-teacher@w1__") and variant.trainer == "MeanTeacherTrainer"
    run = json.loads((variant.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["hparams"]["consistency"] == 1.0 and run["method"] == "mean-teacher@w1"
    assert plain.fold_folder.exists() == plain_before  # the method's own run is neither made nor touched
    with open(tmp_path / "benchmark.csv", encoding="utf-8") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"supervised", "mean-teacher@w1"}
    code, out, err = run_cli(*args, "--dry-run")
    assert code == 0, err
    assert out.count("done") == 2  # found again by its name
