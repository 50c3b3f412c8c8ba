"""Honest benchmark scores: held-out cases apart from every selection, final and best checkpoints side by side."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.splits import (
    LabeledSpec,
    carve_held_out,
    check_held_out_share,
    drop_held_out,
    make_semi_split,
)

TRAIN = [f"case_{i:02d}" for i in range(16)]
VAL = [f"val_{i}" for i in range(6)]


def test_carve_held_out_is_seeded_disjoint_and_sized():
    selection, held = carve_held_out(VAL, 0.5)
    assert sorted(selection + held) == VAL and not set(selection) & set(held) and len(held) == 3
    assert carve_held_out(list(reversed(VAL)), 0.5) == (selection, held)  # the same cases whatever the order
    assert held != sorted(VAL)[:3] or selection != sorted(VAL)[3:]  # drawn, not the first ones
    assert len(carve_held_out(VAL, 0.01)[1]) == 1  # at least one case is scored ...
    assert len(carve_held_out(VAL, 0.99)[0]) == 1  # ... and at least one selects
    with pytest.raises(SemidiffError, match="too few to keep cases for scoring apart"):
        carve_held_out(["only"], 0.5)
    for bad in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(SemidiffError, match="--held-out"):
            check_held_out_share(bad)


def test_held_out_cases_never_train_nor_validate():
    """The trainer's split (SemiSupervisedTrainer.do_split / make_semi_split) leaves the held-out cases out of
    the labeled, unlabeled and validation cases, also for fold ``all`` (validation = training cases)."""
    selection, held = carve_held_out(VAL, 0.5)
    split = make_semi_split(TRAIN, VAL, LabeledSpec.parse("0.5"), 0, held_out=held)
    assert split.held_out == held and split.validation == selection
    assert not set(held) & (set(split.labeled) | set(split.unlabeled) | set(split.validation))
    everything = TRAIN + VAL
    split = make_semi_split(everything, everything, LabeledSpec.parse("1.0"), 0, held_out=held)
    assert not set(held) & (set(split.labeled) | set(split.unlabeled) | set(split.validation))
    assert split.to_json()["held_out"] == held
    # nnU-Net's do_split result without them, its order kept
    assert drop_held_out(everything, VAL, held) == ([k for k in everything if k not in held], selection)
    with pytest.raises(SemidiffError, match="Every validation case of the fold is held out"):
        drop_held_out(TRAIN, VAL, VAL)
    ids = {"labeled": [TRAIN[0], held[0]]}
    with pytest.raises(SemidiffError, match="held-out case"):
        make_semi_split(TRAIN, VAL, LabeledSpec(ids=tuple(ids["labeled"]), source="f"), 0, held_out=held)


def test_run_config_carries_the_held_out_cases():
    from semidiff_nnunet.training.run_config import RunConfig

    plans = RunConfig(method="supervised", held_out=["b", "a"]).write({})
    assert RunConfig.read(json.loads(json.dumps(plans))).held_out == ["a", "b"]
    assert RunConfig.read({}).held_out == []  # stock plans, older runs


def test_run_folders_differ_by_held_out_spec(workspace):
    from semidiff_nnunet import api
    from semidiff_nnunet.api import benchmark_runs as benchmark

    (Path(os.environ["nnUNet_raw"]) / "Dataset979_HeldOutFolders").mkdir(exist_ok=True)
    folders = {share: api.run_info("979", "supervised", "0.5", 0, "2d", 0, "P", share).fold_folder
               for share in (None, 0.5, 0.3)}
    assert len(set(folders.values())) == 3
    assert "lab0.5_ho0.5" in str(folders[0.5]) and "_ho" not in str(folders[None])
    runs = benchmark.plan_runs("Dataset979_HeldOutFolders", ["supervised"], ["0.5"], [0], "2d", 0, "P", 0.5)
    assert runs[0].info.fold_folder == folders[0.5]
    assert benchmark.held_out_share("Dataset979_HeldOutFolders", 0.5) == 0.5  # no imagesTs/labelsTs: carve


def test_markdown_has_final_and_best_checkpoint_and_miou_columns():
    from semidiff_nnunet.api.benchmark_runs import TABLE_METRICS, markdown_table

    rows = [{"method": "a", "labeled": "0.1", "seed": 0, "Dice": 0.5, "Dice (best ckpt)": 0.6, "mIoU": 0.7,
             "HD95": 4.0},
            {"method": "b", "labeled": "0.1", "seed": 0, "Dice": 0.55, "Dice (best ckpt)": 0.52, "mIoU": 0.65,
             "HD95": 3.0}]
    md = markdown_table(rows, ["a", "b"], ["0.1"], metrics=TABLE_METRICS)
    header = next(ln for ln in md.splitlines() if ln.startswith("| method"))
    assert header == "| method | Dice @ 0.1 | Dice (best ckpt) @ 0.1 | mIoU @ 0.1 | HD95 @ 0.1 |"
    assert "| a | 0.5000 | **0.6000** | **0.7000** | 4.00 |" in md  # best checkpoint and mIoU: highest in bold
    assert "| b | **0.5500** | 0.5200 | 0.6500 | **3.00** |" in md
    assert "checkpoint_best.pth" in md and "background included" in md


def test_each_run_is_scored_with_its_final_and_its_best_checkpoint(tmp_path, monkeypatch):
    """score_run predicts with checkpoint_final.pth and checkpoint_best.pth into separate folders and reports
    both; a checkpoint_best that no validation score chose (--val-iters 0) is reported as NaN, not predicted."""
    import math

    import torch

    from semidiff_nnunet import api
    from semidiff_nnunet.api import evaluation, prediction
    from semidiff_nnunet.api.benchmark_runs import PlannedRun, score_run

    fold = tmp_path / "fold_0"
    fold.mkdir()
    torch.save({"current_epoch": 10, "_best_ema": 0.7}, fold / "checkpoint_final.pth")
    torch.save({"current_epoch": 4, "_best_ema": 0.8}, fold / "checkpoint_best.pth")
    dice = {"checkpoint_final.pth": 0.5, "checkpoint_best.pth": 0.6}
    calls = []

    def predict(name, method, images, pred, checkpoint, held_out, **kw):
        calls.append((checkpoint, Path(pred).name, held_out))
        Path(pred).mkdir(parents=True)
        (Path(pred) / "checkpoint").write_text(checkpoint, encoding="utf-8")

    def evaluate(name, pred, labels, summary_file):
        d = dice[(Path(pred) / "checkpoint").read_text(encoding="utf-8")]
        summary = {"metric_per_case": [{}], "mean": {"1": {"Dice": d}}, "mIoU": d + 0.1,
                   "foreground_mean": {"Dice": d, "Jaccard": d, "HD95": 1.0, "ASD": 1.0}}
        Path(summary_file).write_text(json.dumps(summary), encoding="utf-8")
        return summary

    monkeypatch.setattr(prediction, "predict", predict)  # what score_run calls
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    info = api.RunInfo("D", "supervised", "SupervisedTrainer", "lab1_ho0.5", 0, "2d", 0, "P", tmp_path, tmp_path,
                       fold)
    run = PlannedRun("supervised", "1", 0, info)
    row = score_run("D", run, tmp_path, tmp_path, "2d", 0, "cpu", "P", 0.5, show_progress=False)
    assert sorted(calls) == [("checkpoint_best.pth", "benchmark_predictions_best", 0.5),
                             ("checkpoint_final.pth", "benchmark_predictions", 0.5)]
    assert (row["Dice"], row["Dice (best ckpt)"], row["best_epoch"]) == (0.5, 0.6, 3)
    assert row["mIoU"] == pytest.approx(0.6) and row["mIoU (best ckpt)"] == pytest.approx(0.7)
    calls.clear()
    assert score_run("D", run, tmp_path, tmp_path, "2d", 0, "cpu", "P", 0.5, show_progress=False) == row
    assert calls == []  # scored once: nothing is predicted again while the checkpoints are unchanged
    torch.save({"current_epoch": 1, "_best_ema": float("nan")}, fold / "checkpoint_best.pth")  # never validated
    row = score_run("D", run, tmp_path, tmp_path, "2d", 0, "cpu", "P", 0.5, show_progress=False)
    assert math.isnan(row["Dice (best ckpt)"]) and row["best_epoch"] is None and row["Dice"] == 0.5


@pytest.fixture(scope="module")
def no_test_set(workspace) -> str:
    """10 training cases, no imagesTs/labelsTs: fold 0 has 2 validation cases, 1 held out, 1 selecting."""
    from semidiff_nnunet import api

    return api.prepare_demo_dataset(dim=2, show_progress=False, dataset_id=978, name="TinyNoTest", num_train=10,
                                    num_test=0, shape=(32, 32), max_features=8, batch_size=2)


@pytest.mark.slow
def test_benchmark_scores_cases_no_selection_saw(no_test_set, tmp_path):
    """End to end: the benchmark's held-out case is in no split of the run (trainer's validation included), the
    csv and md hold final and best-checkpoint scores and mIoU."""
    from semidiff_nnunet import api

    result = api.benchmark(no_test_set, "supervised", "3", "0", configuration="2d", device="cpu", epochs=2,
                           iters_per_epoch=2, val_iters_per_epoch=1, plans_name="semidiffDemoPlans", output=tmp_path,
                           show_progress=False, log=lambda *_: None)
    record = json.loads((tmp_path / "held_out.json").read_text(encoding="utf-8"))
    held, selection = record["held_out"], record["selection"]
    assert len(held) == 1 and len(selection) == 1 and record["held_out_share"] == 0.5
    assert result["held_out_cases"] == held and "1 of the 2 validation cases of fold 0" in result["markdown"]
    info = result["runs"][0].info
    assert "_ho0.5" in str(info.fold_folder)
    split = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["split"]
    assert split["held_out"] == held and split["validation"] == selection  # what nnU-Net validates and selects on
    assert not set(held) & set(split["labeled"] + split["unlabeled"] + split["validation"])
    with open(tmp_path / "benchmark.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert row["n_cases"] == "1"
    for column in ("Dice", "Dice (best ckpt)", "mIoU", "mIoU (best ckpt)", "best_epoch"):
        assert row[column] not in ("", "nan"), column
    predicted = sorted(p.name for p in (info.fold_folder / "benchmark_predictions_best").glob("*.nii.gz"))
    assert predicted == [f"{held[0]}.nii.gz"]
    md = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "Dice @ 3" in md and "Dice (best ckpt) @ 3" in md and "mIoU @ 3" in md


@pytest.mark.slow
def test_trainer_validates_on_the_selection_part_only(no_test_set, tmp_path):
    """The trainer's validation dataset (nnU-Net's per-epoch pseudo Dice, checkpoint_best, a method's selection,
    the final validation: all go through do_split) holds the selection part; no training set holds a held-out
    case."""
    import torch

    from semidiff_nnunet import api, planning
    from semidiff_nnunet.training.run_config import RunConfig

    selection, held = api.held_out_cases(no_test_set, 0, 0.5, "2d", "semidiffDemoPlans")
    plans = planning.load_plans(no_test_set, "semidiffDemoPlans")
    RunConfig(method="supervised", labeled=LabeledSpec.parse("0.5"), held_out=held).write(plans)
    plans["continue_training"] = False
    dataset_json = planning.dataset_json(planning.preprocessed_folder(no_test_set))
    with api.results_root(tmp_path):
        trainer = api.method_trainer("supervised")(plans=plans, configuration="2d", fold=0,
                                                   dataset_json=dataset_json, device=torch.device("cpu"))
        assert sorted(trainer.do_split()[1]) == selection
        dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    assert sorted(dataset_val.identifiers) == selection
    split = trainer.semi_split
    assert split.held_out == held and not set(held) & set(dataset_tr.identifiers)
    assert not set(held) & set(split.labeled + split.unlabeled + split.validation)
