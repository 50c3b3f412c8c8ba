"""Chaos: a real `semidiff train` killed with SIGKILL at ten random moments, `--continue` after each.

The run (BCP: two phases, a fresh optimiser per phase, the pre-training epoch chosen on validation, a
teacher; two augmentation workers; a checkpoint every epoch) is killed wherever the moment falls:
while Python starts, during a step, a validation, a checkpoint write. After each kill no process of
the killed command may be left (its augmentation workers die with it), and `--continue` must pick up
whatever the dead one left. The final weights, optimiser states and logs must equal an uninterrupted
run's, bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import assert_same_state

from semidiff_nnunet.training.checkpoint import safe_load
from semidiff_nnunet.training.curves import MEASURED_LOG_KEYS

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "semidiff_nnunet.cli.main"]
KILLS = 10
METHOD = "bcp"


def _args(dataset: str, seed: int) -> list[str]:
    return ["train", dataset, "-m", METHOD, "--labeled", "4", "--seed", str(seed), "-c", "2d", "--epochs", "6",
            "--iters-per-epoch", "3", "--val-iters", "1", "--save-every", "1", "--no-val",
            "--plans", "semidiffDemoPlans", "--device", "cpu"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(args: list[str], env: dict) -> subprocess.Popen:
    """The command in its own session, its stderr in a file (a pipe nobody reads could fill and block it)."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    proc.errfile = err
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    proc.errfile.seek(0)
    return proc.errfile.read().decode("utf-8", "replace")[-3000:]


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the command itself (not its group: its workers must follow on their own) after ``delay``
    seconds; False if it ended first."""
    deadline = time.time() + delay
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    proc.wait(30)
    for _ in range(100):  # the kernel signals the workers when their parent dies
        if not _group_alive(proc.pid):
            return True
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("a process of the killed command outlived it for 10 s (an augmentation worker?)")


def _final(info) -> dict:
    ck = safe_load(info.fold_folder / "checkpoint_final.pth")
    logging = {k: v for k, v in ck["logging"].items() if k not in MEASURED_LOG_KEYS}
    return {"network": ck["network_weights"], "optimizer": ck["optimizer_state"], "semidiff": ck["semidiff"],
            "epoch": ck["current_epoch"], "logging": logging}


def test_kill_9_at_ten_random_moments_then_continue_equals_an_uninterrupted_run(demo2d):
    from semidiff_nnunet import api

    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", nnUNet_n_proc_DA="2",
               OMP_WAIT_POLICY="PASSIVE", nnUNet_compile="false")
    folder = api.run_info(demo2d, METHOD, "4", 41, "2d", 0, "semidiffDemoPlans").fold_folder
    t0 = time.time()
    reference = _start(_args(demo2d, 41), env)
    started = None  # when the trainer wrote its log: set-up (imports, split, networks) is over
    while reference.poll() is None:
        if started is None and any(folder.glob("training_log_*.txt")):
            started = time.time() - t0
        time.sleep(0.05)
    uninterrupted = time.time() - t0
    assert reference.returncode == 0, _stderr(reference)
    assert started is not None
    # moments spread over set-up and training: about half of the attempts get into training, and each
    # such attempt trains for about a fifth of the run before its kill
    latest = started + 2 * (uninterrupted - started) / KILLS

    # the same run under another seed would differ: kill the same seed's run in its own results folder
    chaos_env = dict(env, nnUNet_results=os.environ["nnUNet_results"] + "_chaos")
    os.makedirs(chaos_env["nnUNet_results"], exist_ok=True)
    rng = random.Random(20261207)
    kills, attempts = 0, 0
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "the run keeps ending before it can be killed"
        proc = _start([*_args(demo2d, 41), "--continue"], chaos_env)
        if not _kill_after(proc, rng.uniform(0.2, latest)):
            assert proc.returncode == 0, _stderr(proc)
            break  # finished before its moment came: nothing left to interrupt
        kills += 1
    if kills == KILLS:  # the last attempt, left alone
        proc = _start([*_args(demo2d, 41), "--continue"], chaos_env)
        proc.wait(600)
        assert proc.returncode == 0, _stderr(proc)
    assert kills >= KILLS // 2, f"only {kills} kills landed in {attempts} attempts"

    os.environ["nnUNet_results"], saved = chaos_env["nnUNet_results"], os.environ["nnUNet_results"]
    try:
        chaotic = _final(api.run_info(demo2d, METHOD, "4", 41, "2d", 0, "semidiffDemoPlans"))
    finally:
        os.environ["nnUNet_results"] = saved
    calm = _final(api.run_info(demo2d, METHOD, "4", 41, "2d", 0, "semidiffDemoPlans"))
    assert calm["epoch"] == chaotic["epoch"] == 6
    assert_same_state(calm, chaotic)
    assert torch.is_tensor(next(iter(calm["network"].values())))
