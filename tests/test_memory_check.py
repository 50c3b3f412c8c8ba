"""The memory check before the first training step (``semidiff_nnunet/training/memory.py``): a run whose step
cannot fit is refused in one sentence before it trains; a run that fits trains bit-identically to one without
the check."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from helpers import assert_same_state

from semidiff_nnunet.training import memory

PLANS = "semidiffDemoPlans"


def test_extrapolation_scales_the_per_patch_part_only():
    # 100 bytes of gradients and optimiser state, 200 more for one labeled + one unlabeled patch
    assert memory.extrapolate(300, 100, (1, 1), (2, 2)) == 100 + 200 * 2
    assert memory.extrapolate(300, 100, (1, 0), (4, 0)) == 100 + 200 * 4  # a step without unlabeled data
    assert memory.extrapolate(50, 100, (1, 1), (8, 8)) == 100  # noise below the fixed part: no negative part


def test_cpu_peak_sees_a_step_that_stays_below_an_earlier_peak():
    """The high-water mark is reset before the step: an earlier, larger peak of the process does not count."""
    if memory._cpu_peak_source() is None:
        pytest.skip("no /proc on this system")
    earlier = torch.ones(96 * 2**20 // 4)  # an earlier peak, 96 MB above today's use
    earlier += 1
    del earlier
    with memory._peak(torch.device("cpu")) as peak:
        step = torch.ones(32 * 2**20 // 4)  # the step: 32 MB
        step += 1
        del step
    assert 24 * 2**20 < peak.growth < 64 * 2**20, peak.growth


def test_epoch_peak_starts_again_each_epoch():
    """The per-epoch peak (the benchmark's memory column) is reset at each epoch's start: an earlier epoch's
    larger peak does not count, this epoch's allocations do."""
    if memory._cpu_peak_source() != "hwm":
        pytest.skip("no resettable VmHWM on this system")
    cpu = torch.device("cpu")
    memory.reset_epoch_peak(cpu)
    earlier = torch.ones(128 * 2**20 // 4)  # the epoch before: 128 MB
    earlier += 1
    del earlier
    before = memory.epoch_peak(cpu)
    memory.reset_epoch_peak(cpu)
    quiet = memory.epoch_peak(cpu)  # nothing allocated since the reset
    assert quiet < before - 96 * 2**20, (quiet, before)
    step = torch.ones(32 * 2**20 // 4)
    step += 1
    del step
    assert quiet + 24 * 2**20 < memory.epoch_peak(cpu) < before, (quiet, memory.epoch_peak(cpu), before)


def _train(dataset, method, sets=None, **kw):
    from semidiff_nnunet import api

    return api.train(dataset, method, labeled="0.5", seed=0, configuration="2d", fold=0, device="cpu", epochs=2,
                     iters_per_epoch=2, plans_name=PLANS, val_iters_per_epoch=0, final_validation=False,
                     show_progress=False, overrides=sets, **kw)


def test_a_run_that_would_not_fit_is_refused_before_its_first_step(demo2d, run_cli, monkeypatch):
    import shutil

    from semidiff_nnunet import api
    from semidiff_nnunet.training.trainer import SemiSupervisedTrainer

    epochs = []
    original = SemiSupervisedTrainer.on_train_epoch_start
    monkeypatch.setattr(SemiSupervisedTrainer, "on_train_epoch_start",
                        lambda self: (epochs.append(self.current_epoch), original(self)))
    monkeypatch.setattr(memory, "free_memory", lambda device: 0)  # nothing is free
    code, out, err = run_cli("train", demo2d, "-m", "superdiffusion", "--labeled", "0.5", "--seed", "11", "-c", "2d",
                             "--epochs", "2", "--iters-per-epoch", "2", "--no-val", "--set", "phase.pretrain=1",
                             "--set", "checkpointing=none", *TINY)
    text = " ".join(err.split())
    assert code == 1, err
    assert "This run would not fit in memory" in text and "0.0 GB of CPU memory is free" in text, text
    # the options that make it fit, for this method: its checkpointing, and what any run can change
    assert "--set checkpointing=all" in text and "batch_size or patch_size in the plans" in text, text
    assert "SEMIDIFF_MEMORY_CHECK=0" in text and "Traceback" not in err
    assert epochs == []  # no epoch, so no training step, started
    info = api.run_info(demo2d, "superdiffusion", "0.5", 11, "2d", 0, PLANS)
    assert not info.fold_folder.exists()  # refused in its set-up: no run folder is left behind

    # the same run with the check skipped trains
    monkeypatch.setenv(memory.MEMORY_CHECK_ENV, "0")
    code, out, err = run_cli("train", demo2d, "-m", "superdiffusion", "--labeled", "0.5", "--seed", "11", "-c", "2d",
                             "--epochs", "2", "--iters-per-epoch", "1", "--no-val", "--set", "phase.pretrain=1",
                             "--set", "checkpointing=none", *TINY)
    assert code == 0, err
    assert epochs == [0, 1]
    shutil.rmtree(info.run_root)


@pytest.mark.slow
@pytest.mark.parametrize("method,sets,n_proc_da", [("mean-teacher", None, "0"),
                                                   ("superdiffusion", {"phase.pretrain": "1"}, "2")])
def test_a_run_that_fits_trains_as_without_the_check(demo2d, method, sets, n_proc_da, monkeypatch):
    """Weights, optimiser states and losses after two epochs: bit-identical with the check on and off (the
    measured steps move no random stream, weight or state of the run)."""
    import shutil

    monkeypatch.setenv("nnUNet_n_proc_DA", n_proc_da)
    from semidiff_nnunet.training import trainer as trainer_module

    measured = []
    check = memory.check_step_memory
    monkeypatch.setattr(trainer_module, "check_step_memory", lambda trainer: measured.append(check(trainer)))
    runs = []
    for skip in ("1", "0"):
        monkeypatch.setenv(memory.MEMORY_CHECK_ENV, skip)
        info = _train(demo2d, method, sets)
        runs.append(torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False))
        shutil.rmtree(info.run_root)
    # the check ran (every phase measured) in the first run, not in the second
    phases = ["pretrain", "cotrain"] if method == "superdiffusion" else ["training"]
    assert [r.phase for r in measured[0]] == phases and measured[1] is None
    assert all(r.growth > 0 and r.fixed > 0 for r in measured[0])
    on, off = runs
    for name, state in on["semidiff"]["networks"].items():
        for k, v in state.items():
            assert torch.equal(v, off["semidiff"]["networks"][name][k]), (name, k)
    assert_same_state(on["optimizer_state"], off["optimizer_state"])
    assert_same_state(on["semidiff"]["optimizers"], off["semidiff"]["optimizers"])
    assert_same_state(on["semidiff"]["states"], off["semidiff"]["states"])
    assert on["logging"]["train_losses"] == off["logging"]["train_losses"]
    # each epoch's peak memory is logged (the benchmark's memory column): the process's resident set
    assert len(on["logging"][memory.PEAK_MEMORY_KEY]) == 2 and min(on["logging"][memory.PEAK_MEMORY_KEY]) > 100e6
