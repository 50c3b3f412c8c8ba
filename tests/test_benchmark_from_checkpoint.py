"""`semidiff benchmark --from-checkpoint`: supervised first, then every method and the control from its checkpoint."""

from __future__ import annotations

import csv
import json
import math

import pytest

from semidiff_nnunet.api.benchmark_runs import CONVERGED_GAIN, convergence
from semidiff_nnunet.errors import SemidiffError


def test_convergence_rule_on_synthetic_curves():
    # rises early, then flat: the last quarter (epochs 15..19 of 20, q = 5) gains nothing
    saturating = [0.8 * (1 - math.exp(-k / 2)) for k in range(20)]
    v = convergence(saturating)
    assert (v["epochs"], v["window"], v["start_epoch"]) == (20, 5, 14)
    assert v["converged"] is True and 0 <= v["gain"] < CONVERGED_GAIN
    assert v["from"] == pytest.approx(saturating[14]) and v["to"] == pytest.approx(saturating[-1])
    # still rising by 0.002 per epoch: gains 5 × 0.002 = 0.01 over its last quarter
    rising = [0.5 + 0.002 * k for k in range(20)]
    v = convergence(rising)
    assert v["converged"] is False and v["gain"] == pytest.approx(0.01)
    # a noisy plateau of 40 epochs: the fit over its last 11 values, not the two end values (+0.02 apart)
    plateau = [0.70, 0.71] * 14 + [0.70, 0.69, 0.71, 0.70, 0.71, 0.70, 0.71, 0.70, 0.69, 0.70, 0.70, 0.71]
    v = convergence(plateau)
    assert v["to"] - v["from"] == pytest.approx(0.02) and v["converged"] is True
    assert abs(v["gain"]) < CONVERGED_GAIN
    # undecidable: one epoch, or an epoch without validation (NaN) in the window
    assert convergence([0.5])["converged"] is None and math.isnan(convergence([0.5])["gain"])
    assert convergence([0.1, 0.2, 0.3, float("nan")])["converged"] is None
    assert convergence([float("nan"), 0.2, 0.3, 0.3, 0.3])["converged"] is True  # NaN outside the window


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_benchmark_from_checkpoint(demo2d, run_cli, tmp_path, monkeypatch):
    """Both stages on the tiny 2D demo: supervised 2 epochs, then the control and mean teacher 1 epoch each."""
    from semidiff_nnunet import api
    from semidiff_nnunet.api import training

    out = tmp_path / "bench"
    args = ["benchmark", demo2d, "-m", "mean-teacher", "--labeled", "0.3", "--seeds", "0", "-c", "2d",
            "--from-checkpoint", "auto", "--first-epochs", "2", "--epochs", "1", "--iters-per-epoch", "2",
            "--val-iters", "1", "--plans", "semidiffDemoPlans", "--device", "cpu", "-o", out]
    code, _, err = run_cli("benchmark", demo2d, "--first-epochs", "2", "--dry-run")
    assert code == 1 and "--from-checkpoint auto" in err
    code, _, err = run_cli("benchmark", demo2d, "--from-checkpoint", "runs/{fold}/checkpoint_final.pth", "--dry-run")
    assert code == 1 and "{labeled} and {seed}" in err
    code, stdout, err = run_cli(*args, "--dry-run")
    assert code == 0 and "3 run(s)" in stdout, err
    plan = api.benchmark(demo2d, "mean-teacher", "0.3", "0", plans_name="semidiffDemoPlans", epochs=1,
                         from_checkpoint="auto", first_epochs=2, dry_run=True)
    assert [(r.label, r.status) for r in plan["runs"]] == [
        ("supervised (first stage)", "train"), ("supervised (control)", "train"), ("mean-teacher", "train")]

    trained, real_train = [], api.train

    def train(*a, **kw):  # the tables of the runs before are on disk when a run starts
        trained.append((a[1], kw.get("stage")))
        assert kw.get("save_every") == 1  # an interrupted run (the end of a session) loses one epoch at most
        if len(trained) > 1:
            assert len(_rows(out / "benchmark.csv")) == len(trained) - 1
        return real_train(*a, **kw)

    monkeypatch.setattr(training, "train", train)  # what the benchmark calls
    scratch = api.run_info(demo2d, "supervised", "0.3", 0, "2d", 0, "semidiffDemoPlans")
    scratch_before = scratch.fold_folder.exists()  # another test of the session may have trained it
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert trained == [("supervised", "first-e2"), ("supervised", "from-first-e2"), ("mean-teacher", "from-first-e2")]

    first = api.run_info(demo2d, "supervised", "0.3", 0, "2d", 0, "semidiffDemoPlans", None, "first-e2")
    control = api.run_info(demo2d, "supervised", "0.3", 0, "2d", 0, "semidiffDemoPlans", None, "from-first-e2")
    mt = api.run_info(demo2d, "mean-teacher", "0.3", 0, "2d", 0, "semidiffDemoPlans", None, "from-first-e2")
    folders = {first.fold_folder, control.fold_folder, mt.fold_folder, scratch.fold_folder}
    assert len(folders) == 4  # no stage overwrites another or a scratch run
    assert scratch.fold_folder.exists() == scratch_before  # and no scratch run was made
    ck = str((first.fold_folder / "checkpoint_final.pth").resolve())
    for info in (control, mt):
        run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
        assert run["pretrained_weights"] == ck and run["num_epochs"] == 1
    assert json.loads((first.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["num_epochs"] == 2

    rows = {(r["method"], r["stage"]): r for r in _rows(out / "benchmark.csv")}
    assert set(rows) == {("supervised", "first"), ("supervised", "second"), ("mean-teacher", "second")}
    gain = float(rows["mean-teacher", "second"]["Dice"]) - float(rows["supervised", "second"]["Dice"])
    assert float(rows["mean-teacher", "second"]["gain"]) == pytest.approx(gain)
    assert float(rows["supervised", "second"]["gain"]) == 0 and rows["supervised", "first"]["gain"] == "nan"
    assert float(rows["mean-teacher", "second"]["cost"]) > 0 and float(rows["supervised", "second"]["cost"]) == 1
    # cost from CPU seconds per iteration (the runs' cpu_seconds log, one value per epoch), not wall-clock
    import torch

    for info in (control, mt):
        log = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
        assert len(log["cpu_seconds"]) == 1 and all(v > 0 for v in log["cpu_seconds"])
    cpu = {k: float(rows[k, "second"]["cpu_s_per_it"]) for k in ("mean-teacher", "supervised")}
    assert float(rows["mean-teacher", "second"]["cost"]) == pytest.approx(cpu["mean-teacher"] / cpu["supervised"])
    # peak memory from the runs' logs (the CPU's resident set: more than torch's libraries alone)
    assert float(rows["supervised", "second"]["peak_memory"]) > 100e6
    assert float(rows["mean-teacher", "second"]["memory"]) > 0 and float(rows["supervised", "second"]["memory"]) == 1
    md = (out / "benchmark.md").read_text(encoding="utf-8")
    header = next(ln for ln in md.splitlines() if ln.startswith("| method"))
    assert "gain over control @ 0.3" in header
    col = header.split(" | ").index("gain over control @ 0.3")
    mt_line = next(ln for ln in md.splitlines() if ln.startswith("| mean-teacher "))
    assert mt_line.split(" | ")[col].strip("* |") == f"{gain:+.4f}"
    assert f"- mean-teacher @ 0.3: {gain:+.4f} (seed 0); above the control on {int(gain > 0)} of 1" in md

    verdict = json.loads((out / "first_stage.json").read_text(encoding="utf-8"))["runs"]
    assert len(verdict) == 1 and verdict[0]["epochs"] == 2 and verdict[0]["converged"] in (True, False)
    assert rows["supervised", "first"]["converged"] == str(verdict[0]["converged"])
    assert "First stage: converged when" in md and "labeled 0.3, seed 0: converged" in md
    assert (out / verdict[0]["curve"]).stat().st_size > 1000  # the first stage's curve
    assert (out / "gains.png").stat().st_size > 1000  # each method's gain over the control, seed by seed

    # again: everything is done, nothing trains; an interrupted second-stage run resumes from its checkpoint
    trained.clear()
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert trained == [] and (stdout + err).count(": done") == 3
    (mt.fold_folder / "checkpoint_final.pth").rename(mt.fold_folder / "checkpoint_latest.pth")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert trained == [("mean-teacher", "from-first-e2")] and "mean-teacher labeled 0.3 seed 0: resume" in stdout + err
    assert json.loads((mt.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["pretrained_weights"] == ck


@pytest.mark.slow
def test_cost_is_cpu_time_where_both_runs_logged_it_else_wall_clock():
    from semidiff_nnunet.api.benchmark_runs import SECOND, add_gains

    def row(method, s, cpu):
        return {"method": method, "labeled": "0.3", "seed": 0, "stage": SECOND, "Dice": 0.5, "s_per_it": s,
                "cpu_s_per_it": cpu}

    rows = [row("supervised", 1.0, 2.0), row("a", 3.0, 3.0), row("b", 5.0, float("nan"))]
    add_gains(rows)
    assert [r["cost"] for r in rows] == [1.0, 1.5, 5.0]  # b was trained before the CPU log: wall-clock


def test_cpu_seconds_count_the_reaped_workers():
    """The augmentation workers of an epoch do part of a method's work: their CPU time counts once they are reaped."""
    import subprocess
    import sys

    from semidiff_nnunet.training.curves import cpu_seconds

    before = cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"],
                   check=True)
    assert cpu_seconds() - before >= 0.5


def test_both_stages_hold_out_the_same_cases(workspace, tmp_path):
    """Without imagesTs: the first stage and the second hold out the benchmark's cases (never trained nor
    validated on), in folders of their own (``_ho0.5_first-e1``, ``_ho0.5_from-first-e1``)."""
    from semidiff_nnunet import api

    name = api.prepare_demo_dataset(dim=2, show_progress=False, dataset_id=975, name="TinyNoTestStages", num_train=10,
                                    num_test=0, shape=(32, 32), max_features=8, batch_size=2)
    result = api.benchmark(name, "supervised", "3", "0", device="cpu", epochs=1, iters_per_epoch=2,
                           val_iters_per_epoch=1, plans_name="semidiffDemoPlans", output=tmp_path,
                           show_progress=False, log=lambda *_: None, from_checkpoint="auto")
    held = json.loads((tmp_path / "held_out.json").read_text(encoding="utf-8"))["held_out"]
    assert len(held) == 1 and result["held_out_cases"] == held
    assert [(r.label, r.info.labeled_tag) for r in result["runs"]] == [
        ("supervised (first stage)", "lab3cases_ho0.5_first-e1"), ("supervised (control)", "lab3cases_ho0.5_from-first-e1")]
    for r in result["runs"]:
        split = json.loads((r.info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["split"]
        assert split["held_out"] == held
        assert not set(held) & set(split["labeled"] + split["unlabeled"] + split["validation"])
    assert [row["n_cases"] for row in result["rows"]] == [1, 1]  # both scored on the held-out case only


@pytest.mark.slow
def test_all_methods_leave_out_the_ones_that_cannot_run_and_say_why(demo2d):
    """``-m all``: every installed method that accepts the options; SemiGDA without its VAE weights is left
    out with the reason, the rest (SuperDiffusion from the checkpoint included) are planned."""
    from semidiff_nnunet import api
    from semidiff_nnunet.api import installed

    logs = []
    plan = api.benchmark(demo2d, "all", "0.3", "0", plans_name="semidiffDemoPlans", epochs=1,
                         from_checkpoint="auto", first_epochs=2, dry_run=True, log=logs.append)
    planned = {r.method for r in plan["runs"]}
    every = {m["name"] for m in installed.list_methods()}
    assert "semigda" in every and "semigda" not in planned and "superdiffusion" in planned
    assert planned == every - {"semigda"}
    assert any(line.startswith("-m all leaves out semigda:") and "vae=PATH" in line for line in logs), logs
    with pytest.raises(SemidiffError, match="semigda needs the Stable Diffusion VAE"):  # named: refused as before
        api.benchmark(demo2d, "semigda,mean-teacher", "0.3", "0", plans_name="semidiffDemoPlans", dry_run=True)
