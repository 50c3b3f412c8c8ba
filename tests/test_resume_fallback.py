"""``--continue`` over a damaged ``checkpoint_latest.pth`` resumes from the previous one, exactly; when no
checkpoint loads it says so in one sentence; augmentation workers end with their process (``kill -9``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import assert_same_state

from semidiff_nnunet.errors import SemidiffError

PLANS = "semidiffDemoPlans"


def _train(name, epochs=3, **kw):
    from semidiff_nnunet import api

    kw.setdefault("val_iters_per_epoch", 0)
    return api.train(name, "mean-teacher", labeled="4", seed=7, configuration="2d", fold=0, device="cpu",
                     epochs=epochs, iters_per_epoch=2, plans_name=PLANS, save_every=1,
                     final_validation=False, show_progress=False, **kw)


def _final(info) -> dict:
    return torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def _interrupted_run(name, monkeypatch):
    """A 3-epoch run killed after its second epoch: checkpoint_latest.pth holds 2 epochs, _previous 1."""
    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    shutil.rmtree(api.run_info(name, "mean-teacher", "4", 7, "2d", 0, PLANS).fold_folder, ignore_errors=True)
    original = MeanTeacherTrainer.on_epoch_end

    def crash_after_second_epoch(self):
        original(self)
        if self.current_epoch == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(MeanTeacherTrainer, "on_epoch_end", crash_after_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            _train(name)
    return api.run_info(name, "mean-teacher", "4", 7, "2d", 0, PLANS)


def _epochs(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["current_epoch"])


@pytest.mark.parametrize("n_proc_da", ["0", "2"])  # without augmentation workers and with them
def test_continue_falls_back_to_the_previous_checkpoint_and_ends_as_an_uninterrupted_run(demo2d, n_proc_da,
                                                                                         monkeypatch):
    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    monkeypatch.setenv("nnUNet_n_proc_DA", n_proc_da)
    shutil.rmtree(api.run_info(demo2d, "mean-teacher", "4", 7, "2d", 0, PLANS).fold_folder, ignore_errors=True)
    straight = _train(demo2d)
    reference = _final(straight)
    assert not (straight.fold_folder / "checkpoint_previous.pth").exists()  # a finished run keeps final and best
    shutil.rmtree(straight.fold_folder)

    info = _interrupted_run(demo2d, monkeypatch)
    latest, previous = info.fold_folder / "checkpoint_latest.pth", info.fold_folder / "checkpoint_previous.pth"
    assert (_epochs(latest), _epochs(previous)) == (2, 1)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated (a full disk, a crash)
    said, kept = [], []
    original_save = MeanTeacherTrainer.save_checkpoint

    def save_and_look(self, filename):
        original_save(self, filename)
        if filename.endswith("checkpoint_latest.pth"):  # the damaged latest replaced: not kept as the previous
            kept.append(_epochs(previous))

    monkeypatch.setattr(MeanTeacherTrainer, "save_checkpoint", save_and_look)
    resumed = _final(_train(demo2d, continue_training=True, log=said.append))
    assert kept == [1]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("checkpoint_latest.pth is damaged (") and \
        said[0].endswith("; resuming from checkpoint_previous.pth (1 epochs done) instead."), said
    # the redone epoch is the same epoch again: the RNG state in the checkpoint makes it so
    assert_same_state({"n": reference["semidiff"]["networks"], "s": reference["semidiff"]["states"]},
          {"n": resumed["semidiff"]["networks"], "s": resumed["semidiff"]["states"]})
    assert_same_state(reference["optimizer_state"], resumed["optimizer_state"])
    assert_same_state(reference["logging"]["train_losses"], resumed["logging"]["train_losses"])
    assert reference["semidiff"]["iteration"] == resumed["semidiff"]["iteration"] == 6
    assert not previous.exists()


def test_continue_without_a_usable_checkpoint_says_so_in_one_sentence(demo2d, monkeypatch):
    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    info = _interrupted_run(demo2d, monkeypatch)
    try:
        names = sorted(p.name for p in info.fold_folder.glob("checkpoint_*.pth"))
        assert names == ["checkpoint_best.pth", "checkpoint_latest.pth", "checkpoint_previous.pth"]
        for n in names:
            (info.fold_folder / n).write_bytes(b"PK\x03\x04 not a checkpoint")
        with pytest.raises(SemidiffError) as e:
            _train(demo2d, continue_training=True, log=print)
        msg = str(e.value)
        assert msg.startswith(f"No checkpoint of the run in {info.fold_folder} can be resumed: checkpoint_latest.pth (")
        assert all(n in msg for n in names) and "delete that folder" in msg and "\n" not in msg, msg
        # the run folder is kept as it was (the evidence), nothing was trained over it
        assert sorted(p.name for p in info.fold_folder.glob("checkpoint_*.pth")) == names
    finally:
        shutil.rmtree(api.run_info(demo2d, "mean-teacher", "4", 7, "2d", 0, PLANS).fold_folder, ignore_errors=True)


def test_resume_picks_the_latest_and_keeps_the_previous_one(tmp_path):
    """Unit level: an intact latest is taken without reading the others; save_atomic rotates the replaced file."""
    from semidiff_nnunet.training import checkpoint as ckpt

    def state(epoch):
        return {"current_epoch": epoch, ckpt.SEMIDIFF_KEY: {}}

    latest = str(tmp_path / ckpt.LATEST)
    ckpt.save_atomic(state(1), latest, keep_previous=str(tmp_path / ckpt.PREVIOUS))
    assert not (tmp_path / ckpt.PREVIOUS).exists()
    ckpt.save_atomic(state(2), latest, keep_previous=str(tmp_path / ckpt.PREVIOUS))
    assert _epochs(latest) == 2 and _epochs(tmp_path / ckpt.PREVIOUS) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LATEST, ckpt.PREVIOUS]  # no .tmp left
    (tmp_path / ckpt.PREVIOUS).write_bytes(b"garbage")  # not read while the latest loads
    said = []
    assert ckpt.resume_checkpoint(tmp_path, said.append) == tmp_path / ckpt.LATEST and said == []
    # a damaged latest: of previous and best, the one with more epochs done
    (tmp_path / ckpt.LATEST).write_bytes(b"")
    ckpt.save_atomic(state(1), str(tmp_path / ckpt.PREVIOUS))
    ckpt.save_atomic(state(2), str(tmp_path / ckpt.BEST))
    assert ckpt.resume_checkpoint(tmp_path, said.append) == tmp_path / ckpt.BEST
    assert len(said) == 1 and said[0].startswith(f"{ckpt.LATEST} is damaged (")
    assert said[0].endswith("; resuming from checkpoint_best.pth (2 epochs done) instead.")
    # a stock nnU-Net checkpoint is no semidiff training state
    torch.save({"current_epoch": 3}, tmp_path / ckpt.BEST)
    assert ckpt.resume_checkpoint(tmp_path) == tmp_path / ckpt.PREVIOUS
    assert ckpt.resume_checkpoint(tmp_path / "nothing") is None


# ---------------------------------------------------------------------------------------------- workers
_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from semidiff_nnunet.training.augmenters import EpochSeededAugmenter, WorkerLoader

    class Loader:
        def set_thread_id(self, i):
            pass
        def __iter__(self):
            return self
        def __next__(self):
            return {"data": np.zeros((1, 2), dtype=np.float32)}

    train = EpochSeededAugmenter(Loader(), 3, seed=0, stream=0)
    train.start_epoch(0)
    next(train)
    val = NonDetMultiThreadedAugmenter(WorkerLoader(Loader()), None, 1, 2, None, wait_time=0.002)
    next(val)
    pids = [p.pid for p in train._gen._processes] + [p.pid for p in val._processes]
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_augmentation_workers_end_when_their_process_is_killed():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = []
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 4 and all(_alive(p) for p in pids), pids
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "augmentation workers outlived their process"
    finally:
        child.kill()
        for p in pids:  # a worker that outlived it (the test failed): not left behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_damaged_final_checkpoint_is_no_finished_run(tmp_path):
    """A truncated ``checkpoint_final.pth`` (disk full, a copy cut short) does not make a run count as finished
    (the benchmark would skip it and score a file that cannot load)."""
    from semidiff_nnunet import api

    fold = tmp_path / "fold_0"
    fold.mkdir()
    info = api.RunInfo("D", "supervised", "SupervisedTrainer", "lab0.1", 0, "2d", 0, "P", tmp_path, tmp_path, fold)
    assert not info.finished
    final = fold / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.ones(64, 64)}, "current_epoch": 3}, final)
    assert info.finished
    data = final.read_bytes()
    final.write_bytes(data[: len(data) * 2 // 3])
    assert not info.finished
    final.write_bytes(b"")
    assert not info.finished


def test_the_latest_checkpoint_knows_the_best_score_of_its_own_epoch(demo2d, monkeypatch):
    """nnU-Net writes checkpoint_latest.pth before it takes the epoch's best EMA pseudo Dice; a run resumed from
    it then compared later epochs with a stale best (and could replace checkpoint_best.pth with a worse one)."""
    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    shutil.rmtree(api.run_info(demo2d, "mean-teacher", "4", 7, "2d", 0, PLANS).fold_folder, ignore_errors=True)
    original = MeanTeacherTrainer.on_epoch_end

    def crash_after_first_epoch(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(MeanTeacherTrainer, "on_epoch_end", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(demo2d, val_iters_per_epoch=1)
    info = api.run_info(demo2d, "mean-teacher", "4", 7, "2d", 0, PLANS)
    latest = torch.load(info.fold_folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    best = torch.load(info.fold_folder / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and latest["logging"]["ema_fg_dice"] == best["logging"]["ema_fg_dice"]
    assert latest["_best_ema"] is not None and latest["_best_ema"] == best["_best_ema"] == \
        latest["logging"]["ema_fg_dice"][0]  # the first epoch is the best so far
