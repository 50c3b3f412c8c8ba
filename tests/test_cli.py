"""The installed ``semidiff`` command line, run as a user runs it (a subprocess, ASCII locale).

User mistakes end in one sentence on stderr (never a traceback) whatever typer/click raises them;
Ctrl-C exits non-zero and says how to resume; listing commands import neither torch nor nnU-Net;
every option that takes a value has help text; ``--val-iters`` and ``--set METHOD:KEY=VALUE``
reach the API. All fast (no training) but the SIGINT test, which is ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import builtin_methods

CLI = [sys.executable, "-m", "semidiff_nnunet.cli.main"]
HEAVY = ("torch", "nnunetv2", "dynamic_network_architectures", "batchgenerators", "SimpleITK")


@pytest.fixture
def cli_env(tmp_path) -> dict:
    """An empty workspace, an ASCII locale (as CI runs) and a wide terminal (no wrapped table cells)."""
    env = dict(os.environ)
    env.update(SEMIDIFF_HOME=str(tmp_path), LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               COLUMNS="250", OMP_WAIT_POLICY="PASSIVE", nnUNet_compile="false")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    for var in ("nnUNet_extTrainer", "SEMIDIFF_DEBUG"):
        env.pop(var, None)
    return env


def semidiff(env: dict, *args, python_flags: tuple[str, ...] = (), timeout: float = 120):
    return subprocess.run([sys.executable, *python_flags, *CLI[1:], *map(str, args)], env=env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)


def one_sentence(proc) -> str:
    """The process failed with exactly one line on stderr, ``Error: ...``, and no traceback anywhere."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and lines[0].rstrip().endswith("."), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("args, expected, code", [
    (["train", "990", "--bogus"], "No such option", 2),  # unknown option
    (["train", "990", "--epochs", "abc"], "'--epochs'", 2),  # bad value for a typed option
    (["train"], "Missing argument", 2),  # missing argument
    (["trian", "990"], "No such command 'trian'", 2),  # unknown command
    (["train", "990", "-f", "x"], "--fold x: give a fold number", 1),  # fold not a number
    (["split", "-d", "990", "--fold", "abc"], "--fold abc: give a fold number", 1),
    (["predict", "-d", "990", "-i", ".", "-o", "out", "--fold", "abc"], "--fold abc: give a fold number", 1),
    (["train", "990", "--val-iters", "-1"], "--val-iters must be at least 0", 1),
    (["benchmark", "990", "--seeds", "0,x"], "--seeds 0,x: give comma-separated integers", 1),
], ids=["unknown-option", "bad-value", "missing-argument", "unknown-command", "train-fold", "split-fold",
        "predict-fold", "val-iters", "seeds"])
def test_usage_error_is_one_sentence(cli_env, args, expected, code):
    proc = semidiff(cli_env, *args)
    line = one_sentence(proc)
    assert expected in line
    assert proc.returncode == code


def test_usage_error_names_the_help_to_read(cli_env):
    line = one_sentence(semidiff(cli_env, "train", "990", "--epoch", "3"))
    assert "semidiff train --help" in line


def test_square_brackets_in_messages_are_printed(cli_env):
    """Rich markup must not swallow "[red]" (or a case id in brackets) in an error message."""
    line = one_sentence(semidiff(cli_env, "train", "990", "-m", "[red]nope"))
    assert "'[red]nope'" in line


def test_no_arguments_prints_the_help(cli_env):
    proc = semidiff(cli_env)
    assert proc.returncode == 0 and "plan-and-train" in proc.stdout and "Traceback" not in proc.stderr


def test_a_fold_outside_the_split_is_refused_before_planning(cli_env):
    """README: every option is checked before any planning; a new dataset has nnU-Net's 5 default folds."""
    (Path(cli_env["nnUNet_raw"]) / "Dataset993_NewFolds").mkdir()
    line = one_sentence(semidiff(cli_env, "plan-and-train", "993", "-m", "supervised", "--fold", "7",
                                 "--device", "cpu"))
    assert "--fold 7: Dataset993_NewFolds has 5 folds (nnU-Net's default split); pick 0..4 or all." in line
    assert not any(Path(cli_env["nnUNet_preprocessed"]).iterdir())  # nothing planned nor written


def test_a_path_from_an_unset_nnunet_raw_names_the_fix(cli_env, tmp_path):
    """``--ref $nnUNet_raw/Dataset990_Demo2D/labelsTs`` in a shell without nnUNet_raw is ``/Dataset990_...``."""
    line = one_sentence(semidiff(cli_env, "evaluate", "--pred", tmp_path, "--ref", "/Dataset990_Demo2D/labelsTs"))
    assert line == ('Error: --ref folder /Dataset990_Demo2D/labelsTs does not exist; nnUNet_raw is not set: run '
                    'eval "$(semidiff env)" first.')


def test_convert_help_lists_the_converters(cli_env):
    from semidiff_nnunet.dataset_conversion.api import list_converters

    names = [c["name"] for c in list_converters()]
    proc = semidiff(cli_env, "convert", "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "Dataset converters" in proc.stdout, proc.stdout
    assert proc.stdout.index("--list") < proc.stdout.index("Dataset converters")  # after the options
    shown = {ln.split()[1] for ln in proc.stdout.splitlines() if ln.split()[:1] in (["|"], ["\u2502"])}
    assert len(names) > 5 and set(names) <= shown, proc.stdout


# ---------------------------------------------------------------------------------------------- Ctrl-C
INTERRUPTING_TRAIN = """
import sys
from semidiff_nnunet import api
from semidiff_nnunet.cli.main import main

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

api.train = interrupted
main(sys.argv[1:])
"""


def test_loader_thread_tracebacks_are_quiet_only_after_ctrl_c(capsys):
    """A background thread that dies after Ctrl-C (an augmentation thread whose workers stopped) prints
    nothing; before any Ctrl-C a dying thread is reported as Python would."""
    import threading

    from semidiff_nnunet.cli import main as cli_main

    said = []
    hook = cli_main._quiet_threads_after_interrupt(lambda args: said.append(args.exc_type))

    def die():
        raise OSError("the worker's shared memory is gone")

    for sigint in (True, False):
        cli_main._running["sigint"] = sigint
        old, threading.excepthook = threading.excepthook, hook
        try:
            t = threading.Thread(target=die)
            t.start()
            t.join()
        finally:
            threading.excepthook = old
    cli_main._running["sigint"] = False
    assert said == [OSError]


def test_ctrl_c_exits_130_with_one_sentence(cli_env):
    """What typer/click make of a KeyboardInterrupt (typer >= 0.2x returns 130, click raises Abort) ends
    in exit code 130 and one sentence on how to resume."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTING_TRAIN, "train", "990"], env=cli_env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "checkpoint" in lines[0] and "--continue" in lines[0], proc.stderr


SWALLOWING_TRAIN = """
import os, signal, sys, time, weakref
from semidiff_nnunet import api
from semidiff_nnunet.cli.main import main

class Node:
    pass

def finaliser(_):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(2)  # the KeyboardInterrupt is raised here, inside a weakref callback: Python swallows it

def train(*args, progress=None, **kwargs):
    progress.start(total=500, completed=0, description="fake")
    node = Node()
    ref = weakref.ref(node, finaliser)
    del node
    for _ in range(500):
        progress.step(loss=0.0, epoch=0, num_epochs=1, phase="")
    print("TRAINED TO THE END")

api.train = train
main(sys.argv[1:])
"""


def test_ctrl_c_that_python_swallowed_still_stops_the_training(cli_env):
    """A KeyboardInterrupt raised inside a finaliser is only printed by Python ("Exception ignored"): the
    progress callback stops the training at the next iteration, and nothing but the sentence is printed."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWING_TRAIN, "train", "990"], env=cli_env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "TRAINED TO THE END" not in proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()][-1].startswith("Interrupted: ")


DYING_WORKERS_TRAIN = """
import os, signal, sys, time
from semidiff_nnunet import api
from semidiff_nnunet.cli.main import main

def train(*args, progress=None, **kwargs):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)
    except KeyboardInterrupt:  # what batchgenerators makes of workers that Ctrl-C killed first
        raise RuntimeError("One or more background workers are no longer alive.") from None

api.train = train
main(sys.argv[1:])
"""


def test_ctrl_c_that_killed_the_workers_first_is_an_interruption(cli_env):
    proc = subprocess.run([sys.executable, "-c", DYING_WORKERS_TRAIN, "train", "990"], env=cli_env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()][-1].startswith("Interrupted: ")


FORKING_TRAIN = """
import multiprocessing, os, signal, sys, time
from semidiff_nnunet import api
from semidiff_nnunet.cli.main import main

def worker():
    time.sleep(3)  # an augmentation worker; a KeyboardInterrupt here prints "Process ...: Traceback"

def train(*args, progress=None, **kwargs):
    multiprocessing.get_context("fork").Process(target=worker, daemon=True).start()
    time.sleep(1)
    os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: every process of the foreground group
    time.sleep(3)

api.train = train
main(sys.argv[1:])
"""


def test_ctrl_c_reaches_the_cli_not_its_forked_workers(cli_env):
    proc = subprocess.run([sys.executable, "-c", FORKING_TRAIN, "train", "990"], env=cli_env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=120, start_new_session=True)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "Interrupted: the run's last checkpoint (checkpoint_latest.pth, written every --save-every epochs) is kept; "
        "run the same command with --continue to resume it."]


# ---------------------------------------------------------------------------------------------- listing
def _imported_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("args", [["methods"], ["plugins"], ["--help"], ["train", "--help"]],
                         ids=["methods", "plugins", "help", "train-help"])
def test_listing_imports_neither_torch_nor_nnunet(cli_env, args):
    proc = semidiff(cli_env, *args, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = _imported_modules(proc.stderr)
    assert "semidiff_nnunet.api" in modules  # the measurement itself works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, heavy[:10]


def test_methods_lists_every_builtin_method(cli_env):
    proc = semidiff(cli_env, "methods")
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.split() and ln.split()[0] in ("|", "\u2502")]
    first_column = {r for r in rows if r not in ("", "|")}
    assert set(builtin_methods()) <= first_column, proc.stdout
    for line in proc.stdout.splitlines():
        if " mean-teacher " in line:
            assert "semidiff-nnunet" in line  # the providing distribution


# ---------------------------------------------------------------------------------------------- help text
def test_every_option_with_a_value_has_help():
    import typer.main

    from semidiff_nnunet.cli.main import app

    checked, missing = [], []

    def walk(command, path: str) -> None:
        for param in command.params:
            if param.param_type_name == "option" and getattr(param, "is_flag", False):
                continue
            where = f"{path} {param.opts[0] if param.param_type_name == 'option' else param.name}"
            checked.append(where)
            if not (getattr(param, "help", None) or "").strip():
                missing.append(where)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "semidiff")
    assert len(checked) > 60  # the walk reached every command
    assert not missing, missing


# ---------------------------------------------------------------------------------------------- options reach the api
def test_val_iters_reaches_the_api(monkeypatch, tmp_path):
    from semidiff_nnunet import api
    from semidiff_nnunet.cli import main as cli

    calls = {}

    class Info:
        fold_folder = tmp_path

    def fake(name):
        def record(*args, **kwargs):
            calls[name] = kwargs
            return Info()
        return record

    monkeypatch.setattr(api, "train", fake("train"))
    monkeypatch.setattr(api, "plan_and_train", fake("plan_and_train"))
    monkeypatch.setattr(api, "predict", fake("predict"))
    monkeypatch.setattr(api, "ensure_workspace", lambda: ([], tmp_path))
    cli.main(["train", "990", "--val-iters", "3", "--set", "phase.pretrain=0.2", "--held-out", "0.5"])
    cli.main(["plan-and-train", "990", "--val-iters", "0"])
    assert calls["train"]["val_iters_per_epoch"] == 3 and calls["train"]["overrides"] == ["phase.pretrain=0.2"]
    assert calls["train"]["held_out"] == 0.5  # a benchmark's run, trained or continued by hand
    # a benchmark --from-checkpoint run's own folder, predicted by hand
    cli.main(["predict", "-d", "990", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--held-out", "0.5",
              "--stage", "from-first-e24"])
    assert calls["predict"]["stage"] == "from-first-e24" and calls["predict"]["held_out"] == 0.5
    calls.pop("predict")
    assert calls["plan_and_train"]["val_iters_per_epoch"] == 0
    assert all(c["progress"] is not None for c in calls.values())  # the CLI draws the progress bar


def test_benchmark_set_method_key_value(cli_env):
    """``--set METHOD:KEY=VALUE`` and ``--set KEY=VALUE`` in ``semidiff benchmark`` (the README's advice); the
    mistakes are tested on the API (tests/test_cli_api.py), which checks them once for train and benchmark."""
    (Path(cli_env["nnUNet_raw"]) / "Dataset990_Fake").mkdir()
    args = ["benchmark", "990", "-m", "supervised,mean-teacher,cps", "--plans", "nnUNetPlans", "--dry-run"]
    proc = semidiff(cli_env, *args, "--set", "mean-teacher:rampup_fraction=0.3", "--set", "rampup_fraction=0.5",
                    "--set", "mean-teacher:consistency=0.2")
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.split()[:1] in (["|"], ["\u2502"])
            and ln.split()[1] in ("supervised", "mean-teacher", "cps")}
    assert "rampup_fraction=0.3" in rows["mean-teacher"] and "consistency=0.2" in rows["mean-teacher"]
    assert "rampup_fraction=0.5" in rows["cps"] and "consistency" not in rows["cps"]  # METHOD: wins; KEY= for all
    assert "rampup_fraction" not in rows["supervised"] and "consistency" not in rows["supervised"]


# ---------------------------------------------------------------------------------------------- SIGINT in training
@pytest.mark.slow
def test_sigint_during_training_keeps_the_checkpoint(demo2d):
    """Ctrl-C in a terminal (SIGINT to the whole process group: the CLI and nnU-Net's augmentation
    workers) while a real run trains: exit 130, one sentence naming --continue, checkpoint_latest kept."""
    import torch

    from semidiff_nnunet import api

    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", nnUNet_n_proc_DA="2")
    args = ["train", demo2d, "-m", "mean-teacher", "--labeled", "3", "--seed", "31", "-c", "2d", "--epochs", "200",
            "--iters-per-epoch", "2", "--val-iters", "1", "--save-every", "1", "--no-val",
            "--plans", "semidiffDemoPlans", "--device", "cpu"]
    info = api.run_info(demo2d, "mean-teacher", "3", 31, "2d", 0, "semidiffDemoPlans")
    latest = info.fold_folder / "checkpoint_latest.pth"
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not latest.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert latest.is_file() and proc.poll() is None, "no checkpoint_latest.pth while training"
        time.sleep(2)  # inside a later epoch
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("Interrupted") and "--continue" in last and "checkpoint" in last, err[-2000:]
    assert not (info.fold_folder / "checkpoint_final.pth").is_file()
    deadline = time.time() + 30
    while time.time() < deadline:  # the workers went with the CLI process
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("augmentation workers outlived the interrupted CLI process")
    checkpoint = torch.load(latest, map_location="cpu", weights_only=False)  # intact, loadable
    assert 1 <= checkpoint["current_epoch"] < 200
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["method"] == "mean-teacher"
