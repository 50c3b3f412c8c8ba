"""One process at a time per run and per preprocessed dataset, and a failed run keeps its evidence.

Two real processes each time: a child holds a lock (as a training or a preprocessing command holds it),
and the command under test (this process) must refuse naming it, or with ``--wait`` wait and then go
on. A lock left by a killed process (or by an orphaned worker it forked) never blocks. A run that fails
once its training started keeps its folder and training log, and the error names the folder and the
last checkpoint; one refused while its trainer is being set up still leaves no folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from semidiff_nnunet import api, locks
from semidiff_nnunet.errors import SemidiffError

TINY_RUN = ["-c", "2d", "--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "0", "--no-val", *TINY]

# A child that holds the lock at argv[1] until its stdin closes; with argv[2] == "fork" it first forks a
# grandchild that outlives it (as an augmentation worker may outlive a killed training).
HOLD = """
import os, sys, time
from pathlib import Path
from semidiff_nnunet import locks
with locks.exclusive(Path(sys.argv[1]), "holding it for a test"):
    if sys.argv[2:] == ["fork"]:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        print("worker", pid, flush=True)
    print("locked", flush=True)
    sys.stdin.read()
"""

# A child that tries the lock at argv[1] once, without waiting, and prints what it got.
TRY = """
import sys
from pathlib import Path
from semidiff_nnunet import locks
try:
    with locks.exclusive(Path(sys.argv[1]), "trying it for a test"):
        print("acquired")
except locks.BusyError as e:
    print("busy:", e)
"""


class Holder:
    """A child process holding the lock ``path`` (its details written into the lock file)."""

    def __init__(self, path: Path, fork: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), *(["fork"] if fork else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.worker = None
        for line in self.proc.stdout:
            if line.startswith("worker"):
                self.worker = int(line.split()[1])
            if line.startswith("locked"):
                break
        assert self.proc.poll() is None, "the lock holder died"
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()
        if self.worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker, signal.SIGKILL)


def try_lock(path: Path) -> str:
    return subprocess.run([sys.executable, "-c", TRY, str(path)], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def _run(demo2d: str, seed: int):
    return api.run_info(demo2d, "supervised", "3", seed, "2d", 0, "semidiffDemoPlans")


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("Error: "), err[-3000:]
    return " ".join(lines[-1].split())


def _train_kwargs(**kw):
    args = dict(labeled="3", configuration="2d", plans_name="semidiffDemoPlans", device="cpu", epochs=1,
                iters_per_epoch=1, val_iters_per_epoch=0, final_validation=False, show_progress=False)
    args.update(kw)
    return args


# ---------------------------------------------------------------------------------------------- one run, one process
def test_a_second_command_on_a_run_in_training_refuses_naming_the_first(demo2d, run_cli):
    """The user's case: the same `semidiff train` twice, then once more with --continue, while the first
    trains. Before, the second replaced the first's run folder under it; now both refuse in one sentence
    naming the first process (pid, host, start time) and --wait, and the first's files are untouched."""
    info = _run(demo2d, 41)
    info.fold_folder.mkdir(parents=True)
    (info.fold_folder / "training_log_first.txt").write_text("epoch 0\n")
    (info.fold_folder / "checkpoint_best.pth.tmp").write_bytes(b"being written")
    with Holder(locks.run_lock_file(info.fold_folder)) as first:
        for extra in ([], ["--continue"]):
            code, _, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", "3", "--seed", "41",
                                   *TINY_RUN, *extra)
            msg = _error_line(err)
            assert code == 1, err[-3000:]
            assert f"(process {first.pid} on {socket.gethostname()}, started 20" in msg, msg
            assert f"is training the run in {info.fold_folder}" in msg and "--wait" in msg, msg
            assert sorted(p.name for p in info.fold_folder.iterdir()) == ["checkpoint_best.pth.tmp",
                                                                          "training_log_first.txt"]
        assert first.proc.poll() is None


def test_wait_starts_when_the_other_process_ends_and_holds_the_run_while_training(demo2d, monkeypatch):
    """--wait: the command says whom it waits for, starts only once that process released the run, and
    then holds the run itself for the whole training (a third process trying it meanwhile is refused)."""
    from semidiff_nnunet.registry import get_registry

    info = _run(demo2d, 42)
    lock = locks.run_lock_file(info.fold_folder)
    trainer_cls = get_registry().method("supervised").load_trainer()
    run_training = trainer_cls.run_training
    seen = {}

    def probing(self):
        seen["during training"] = try_lock(lock)
        return run_training(self)

    monkeypatch.setattr(trainer_cls, "run_training", probing)
    with Holder(lock) as first:
        waited = []

        def log(message):
            waited.append(message)
            assert not info.fold_folder.exists()  # nothing started while the other holds the run
            first.release()

        done = api.train(demo2d, "supervised", seed=42, wait=True, log=log, **_train_kwargs())
    assert done.finished
    assert len(waited) == 1 and waited[0].startswith(f"Waiting for process {first.pid} on {socket.gethostname()}")
    assert seen["during training"].startswith(f"busy: Another semidiff command (process {os.getpid()} on ")
    assert try_lock(lock) == "acquired"  # released when the command ended


def test_a_lock_left_by_a_killed_process_or_its_orphaned_worker_never_blocks(demo2d):
    """flock, not a pid file: a holder killed with SIGKILL (its details still in the lock file) holds
    nothing, nor does a worker it forked that is still running."""
    info = _run(demo2d, 43)
    lock = locks.run_lock_file(info.fold_folder)
    with Holder(lock, fork=True) as first:
        assert locks.holder(lock)["pid"] == first.pid
        assert try_lock(lock).startswith(f"busy: Another semidiff command (process {first.pid} on ")
        first.kill()
        os.kill(first.worker, 0)  # the orphaned worker still runs
        assert locks.holder(lock)["pid"] == first.pid  # a stale record, not a lock
        done = api.train(demo2d, "supervised", seed=43, **_train_kwargs())
        assert done.finished


def test_preprocessing_is_one_process_at_a_time(demo2d):
    """Two plan-and-train on one new dataset deleted each other's preprocessed folder (nnU-Net's
    preprocessor removes it first): while one writes it, another refuses naming it, or with wait waits."""
    name = api.planning.dataset_name(demo2d)
    lock = locks.preprocessing_lock_file(api.planning.preprocessed_folder(name))
    with Holder(lock) as first:
        with pytest.raises(SemidiffError, match=rf"\(process {first.pid} on .*\) is preprocessing {name}; .*--wait"):
            api.plan_and_preprocess(demo2d, ["2d"], show_progress=False)
        waited = []
        api.plan_and_preprocess(demo2d, ["2d"], show_progress=False, wait=True,
                                log=lambda m: (waited.append(m), first.release()))
        assert len(waited) == 1 and f"process {first.pid}" in waited[0]


# ---------------------------------------------------------------------------------------------- a failed run
def _diverging(monkeypatch) -> dict:
    """The supervised trainer's loss turns NaN from iteration ``returned["from"]`` on; one such step ends it."""
    from semidiff_nnunet.registry import get_registry

    cls = get_registry().method("supervised").load_trainer()
    original = cls.compute_losses
    when = {"from": 0}

    def diverging(self, labeled, unlabeled):
        terms = original(self, labeled, unlabeled)
        return {k: v * float("nan") for k, v in terms.items()} if self.iteration >= when["from"] else terms

    monkeypatch.setattr(cls, "compute_losses", diverging)
    monkeypatch.setattr(cls, "max_nonfinite_steps", 1)
    return when


def test_a_run_that_fails_after_it_started_keeps_its_folder_and_names_it(demo2d, run_cli, monkeypatch):
    """Diverged in its first step (no checkpoint yet): before, the folder with its log was deleted while
    the error pointed there; now it is kept and the error names it. Diverged in epoch 2: the error names
    the last checkpoint too."""
    when = _diverging(monkeypatch)
    info = _run(demo2d, 44)
    code, _, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", "3", "--seed", "44", *TINY_RUN)
    msg = _error_line(err)
    assert code == 1 and "Training diverged" in msg, msg
    assert f"the run folder {info.fold_folder} keeps its training log (no checkpoint was saved yet;" in msg, msg
    assert list(info.fold_folder.glob("training_log_*.txt")) and (info.fold_folder / "semidiff_run.json").is_file()

    when["from"] = 2  # in the second epoch, after checkpoint_latest.pth of the first
    info = _run(demo2d, 45)
    code, _, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", "3", "--seed", "45", *TINY_RUN,
                           "--save-every", "1")
    msg = _error_line(err)
    assert code == 1 and "Training diverged" in msg, msg
    assert (f"the run folder {info.fold_folder} keeps its training log and its last checkpoint, "
            f"checkpoint_latest.pth (--continue resumes from it)." in msg), msg
    assert (info.fold_folder / "checkpoint_latest.pth").is_file()


def test_a_crash_after_the_start_names_the_folder_and_a_refused_set_up_leaves_none(demo2d, monkeypatch):
    """Any other exception once training started keeps the folder and notes it on the traceback; a
    SemidiffError raised while the trainer is set up (a user mistake, e.g. unfitting pretrained weights)
    still leaves no half-made run folder."""
    from semidiff_nnunet.registry import get_registry

    cls = get_registry().method("supervised").load_trainer()

    def crash(self, labeled, unlabeled):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cls, "compute_losses", crash)
    info = _run(demo2d, 46)
    with pytest.raises(RuntimeError, match="out of memory") as caught:
        api.train(demo2d, "supervised", seed=46, **_train_kwargs())
    assert any(f"the run folder {info.fold_folder} keeps its training log" in n for n in caught.value.__notes__)
    assert (info.fold_folder / "semidiff_run.json").is_file()

    def refuse(self):
        raise SemidiffError("--pretrained-weights x.pth does not fit this run's network.")

    monkeypatch.setattr(cls, "build_method", refuse)
    info = _run(demo2d, 47)
    with pytest.raises(SemidiffError, match=r"^--pretrained-weights x.pth does not fit this run's network.$"):
        api.train(demo2d, "supervised", seed=47, **_train_kwargs())
    assert not info.fold_folder.exists()
