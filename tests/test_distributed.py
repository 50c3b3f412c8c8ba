"""Distributed training: two gloo ranks on the CPU (``--nproc 2 --device cpu``), as on N GPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from conftest import TINY
from helpers import builtin_methods

from semidiff_nnunet.plugins.mean_teacher.trainer import MeanTeacherTrainer
from semidiff_nnunet.training import unwrap

pytestmark = pytest.mark.slow


class RankDumpTrainer(MeanTeacherTrainer):
    """Mean teacher that also saves every rank's networks and the patches it drew, to compare ranks."""

    method_name = "mean-teacher"

    def train_step(self, batch):
        self.__dict__.setdefault("_keys", []).append(list(batch.get("keys", [])))
        return super().train_step(batch)

    def compute_losses(self, labeled, unlabeled):
        self.__dict__.setdefault("_ukeys", []).append([str(k) for k in unlabeled["keys"]])
        self.__dict__.setdefault("_unoise", []).append(float(torch.randn(1)))
        return super().compute_losses(labeled, unlabeled)

    def on_train_end(self):
        torch.save({"network": unwrap(self.network).state_dict(), "teacher": self.teacher.module.state_dict(),
                    "keys": self.__dict__.get("_keys", []), "world": self.world_size, "batch": self.batch_size,
                    "ukeys": self.__dict__.get("_ukeys", []), "unoise": self.__dict__.get("_unoise", []),
                    "device": str(self.device)},
                   os.path.join(self.output_folder, f"rank{self.local_rank}.pt"))
        super().on_train_end()


def test_two_cpu_ranks_train_in_step(demo2d, run_cli, monkeypatch):
    from semidiff_nnunet import api
    from semidiff_nnunet.api import installed

    monkeypatch.setattr(installed, "method_trainer", lambda name: RankDumpTrainer)
    code, out, err = run_cli("train", demo2d, "-m", "mean-teacher", "--labeled", "0.5", "-c", "2d", "--epochs", "2",
                             "--iters-per-epoch", "3", "--no-val", "--nproc", "2", *TINY)
    assert code == 0, err
    info = api.run_info(demo2d, "mean-teacher", "0.5", 0, "2d", 0, "semidiffDemoPlans")
    assert (info.fold_folder / "checkpoint_final.pth").is_file()
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["world_size"] == 2
    r0, r1 = (torch.load(info.fold_folder / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["device"] == r1["device"] == "cpu"
    assert r0["batch"] + r1["batch"] == run["batch_size"]  # nnU-Net's split of the global batch
    # every network (the DDP student and the EMA teacher) is bit-identical across ranks after training
    for part in ("network", "teacher"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    # ... and the final checkpoint holds them
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(torch.equal(ck["network_weights"][k], v) for k, v in r0["network"].items())
    # the ranks trained on different patches and drew different noise (each rank its own streams)
    assert r0["keys"] != r1["keys"]
    assert r0["ukeys"] and r0["ukeys"] != r1["ukeys"] and r0["unoise"] != r1["unoise"]
    # only rank 0 writes the run's files
    assert not list(info.fold_folder.glob("training_log*rank1*"))


CI_METHODS = ("supervised", "cps", "diffrect", "diffcl")  # with mean-teacher above: what CI runs in two ranks
# every other built-in but semigda (it needs a VAE folder), opt-in: SEMIDIFF_DDP_ALL=1
OTHER_METHODS = tuple(m for m in builtin_methods() if m not in (*CI_METHODS, "mean-teacher", "semigda"))


def _dump_states(self):
    """on_train_end of the dump trainers: this rank's every network and method state."""
    states = {"network": unwrap(self.network).state_dict()}
    states.update({n: unwrap(m).state_dict() for n, m in self.extra_networks.items()})
    states.update({f"state/{n}": s.state_dict() for n, s in self.method_states.items() if hasattr(s, "state_dict")})
    torch.save(states, os.path.join(self.output_folder, f"rank{self.local_rank}_states.pt"))
    type(self).__mro__[1].on_train_end(self)


def _dump_class(method: str):
    from semidiff_nnunet import api

    base = api.method_trainer(method)
    return type(f"Dump_{base.__name__}", (base,), {"on_train_end": _dump_states, "__module__": __name__})


# module-level classes, so that spawned ranks find them by name
DUMP = {m: _dump_class(m) for m in CI_METHODS + OTHER_METHODS}
globals().update({cls.__name__: cls for cls in DUMP.values()})


ALL_RANKS = pytest.mark.skipif(os.environ.get("SEMIDIFF_DDP_ALL") != "1",
                               reason="two-rank runs beyond CI's five methods: set SEMIDIFF_DDP_ALL=1")


@pytest.mark.parametrize("method", [m if m in CI_METHODS else pytest.param(m, marks=ALL_RANKS)
                                    for m in CI_METHODS + OTHER_METHODS])
def test_every_method_trains_in_two_cpu_ranks(demo2d, run_cli, method, monkeypatch):
    """Two gloo ranks of every built-in method: the run finishes and every network and method state (EMA
    teachers, memory banks, prototypes) is bit-identical across the ranks afterwards."""
    from semidiff_nnunet import api
    from semidiff_nnunet.api import installed

    real = installed.method_trainer
    monkeypatch.setattr(installed, "method_trainer", lambda name: DUMP[name] if name == method else real(name))
    sets = {"diffrect": ["--set", "refine_start=0", "--set", "refine_min_updates=0"],
            "bcp": ["--set", "phase.pretrain=1"], "superdiffusion": ["--set", "phase.pretrain=1"]}.get(method, [])
    code, out, err = run_cli("train", demo2d, "-m", method, "--labeled", "0.5", "-c", "2d", "--epochs", "2",
                             "--iters-per-epoch", "2", "--no-val", "--nproc", "2", *sets, *TINY)
    assert code == 0, err
    info = api.run_info(demo2d, method, "0.5", 0, "2d", 0, "semidiffDemoPlans")
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 2
    assert json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["world_size"] == 2
    r0, r1 = (torch.load(info.fold_folder / f"rank{r}_states.pt", weights_only=False) for r in (0, 1))
    assert set(r0) == set(r1)
    for part, state in r0.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, r1[part][k]), f"{method}: {part}.{k} differs between the ranks"


def test_resume_with_another_world_size_is_refused(tmp_path):
    from semidiff_nnunet import api
    from semidiff_nnunet.errors import SemidiffError

    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "semidiff_run.json").write_text(json.dumps({"world_size": 2}), encoding="utf-8")
    info = api.RunInfo("D", "supervised", "SupervisedTrainer", "lab0.5", 0, "2d", 0, "P", tmp_path, tmp_path, fold)
    api._check_resumed_world_size(info, 2)
    with pytest.raises(SemidiffError, match="resume it with --nproc 2"):
        api._check_resumed_world_size(info, 1)


def test_torchrun_two_cpu_ranks(demo2d, tmp_path):
    """The multi-node entry: torchrun starts the CLI in every rank (env:// rendezvous), no --nproc."""
    import subprocess
    import sys

    from semidiff_nnunet import api

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-port", str(__import__("semidiff_nnunet.training.distributed", fromlist=["x"]).free_port()),
           "-m", "semidiff_nnunet.cli.main", "train", demo2d, "-m", "supervised", "--labeled", "0.5", "--seed", "3",
           "-c", "2d", "--epochs", "1", "--iters-per-epoch", "2", "--no-val", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    out = res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace")
    assert res.returncode == 0, out
    info = api.run_info(demo2d, "supervised", "0.5", 3, "2d", 0, "semidiffDemoPlans")
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["world_size"] == 2 and (info.fold_folder / "checkpoint_final.pth").is_file()


def test_a_distributed_run_resumes_in_two_ranks(demo2d, run_cli):
    """--continue of a two-rank run: refused with one rank, resumed with two (every rank loads the checkpoint)."""
    import shutil

    from semidiff_nnunet import api

    args = ["train", demo2d, "-m", "supervised", "--labeled", "0.5", "--seed", "4", "-c", "2d",
            "--iters-per-epoch", "2", "--no-val", *TINY]
    code, out, err = run_cli(*args, "--epochs", "2", "--nproc", "2")
    assert code == 0, err
    info = api.run_info(demo2d, "supervised", "0.5", 4, "2d", 0, "semidiffDemoPlans")
    # a run stopped after its second of three epochs: only checkpoint_latest is left
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    ck["semidiff"]["run"]["num_epochs"] = 3
    torch.save(ck, info.fold_folder / "checkpoint_latest.pth")
    (info.fold_folder / "checkpoint_final.pth").unlink()
    code, out, err = run_cli(*args, "--epochs", "3", "--continue")
    assert code == 1 and "resume it with --nproc 2" in err.replace("\n", " "), err
    code, out, err = run_cli(*args, "--epochs", "3", "--continue", "--nproc", "2")
    assert code == 0, err
    final = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    shutil.rmtree(info.run_root)


# ---------------------------------------------------------------------------------------------- failures
def _kill_rank_0_while_rank_1_works(device=None, progress=None):
    """A rank function for :func:`distributed.launch`: rank 0 is killed (as by the OOM killer); rank 1 is busy
    outside any collective (a long validation, a slow data loader) and would not notice by itself."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(150)


def _hang_rank_0(device=None, progress=None):
    """Rank 0 hangs outside any collective; rank 1 waits for it in a barrier."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        time.sleep(150)
    dist.barrier()


def test_a_killed_rank_is_reported_and_the_others_are_stopped_at_once():
    from semidiff_nnunet.errors import SemidiffError
    from semidiff_nnunet.training import distributed

    start = time.monotonic()
    with pytest.raises(SemidiffError) as e:
        distributed.launch(2, torch.device("cpu"), _kill_rank_0_while_rank_1_works, ())
    took = time.monotonic() - start
    message = str(e.value)
    assert message.startswith("Rank 0 of the distributed run was killed by SIGKILL"), message
    assert "OOM killer" in message and "the other ranks were stopped" in message, message
    assert took < 60, took  # rank 1 would sleep 150 s: it was stopped, not waited for


def test_a_rank_waiting_for_a_hung_one_gives_up_after_the_timeout(monkeypatch):
    from semidiff_nnunet.errors import SemidiffError
    from semidiff_nnunet.training import distributed

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "3")
    start = time.monotonic()
    with pytest.raises(SemidiffError) as e:
        distributed.launch(2, torch.device("cpu"), _hang_rank_0, ())
    took = time.monotonic() - start
    message = str(e.value)
    assert message.startswith("Rank 1 of the distributed run failed with") and "the other ranks were stopped" in \
        message, message
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert took < 60, took  # not 150 s (rank 0's hang), nor torch's default 30 minutes


def test_the_first_failure_is_the_cause_not_its_consequences():
    from semidiff_nnunet.training.distributed import RankFailure, failure_message, first_failure

    reset = RankFailure(1, 10.0, "RuntimeError: Connection reset by peer")
    killed = RankFailure(0, 10.2, exitcode=-signal.SIGKILL)  # seen after its peer's error, yet the cause
    assert first_failure([reset, killed]) is killed
    assert failure_message(killed, stopped=True) .startswith("Rank 0 of the distributed run was killed by SIGKILL")
    # among errors the earliest, whatever the rank
    first, later = RankFailure(1, 5.0, "ValueError: bad input"), RankFailure(0, 6.0, "RuntimeError: Connection closed")
    assert first_failure([later, first]) is first
    assert failure_message(first, stopped=True) == ("Rank 1 of the distributed run failed with ValueError: bad "
                                                    "input; the other ranks were stopped.")
    user = RankFailure(0, 1.0, "This run would not fit in memory: ...; set X=0.", user=True)
    assert failure_message(user, stopped=False) == user.message  # a user error's sentence as it is
    quiet = RankFailure(1, 1.0, exitcode=3)
    assert "exited with code 3 without an error" in failure_message(quiet, stopped=False)
    assert first_failure([]) is None


def test_the_process_group_timeout_is_a_setting(monkeypatch):
    from semidiff_nnunet.errors import SemidiffError
    from semidiff_nnunet.training import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.process_group_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.process_group_timeout().total_seconds() == 90
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "ten minutes")
    with pytest.raises(SemidiffError, match="SEMIDIFF_DDP_TIMEOUT"):
        distributed.process_group_timeout()


def test_a_rank_killed_in_training_names_itself_its_signal_and_the_run_folder(demo2d, run_cli, monkeypatch):
    """`semidiff train --nproc 2` whose rank 0 is SIGKILLed after its second epoch's checkpoint: the command ends
    promptly with that rank and signal (not rank 1's "Connection reset by peer"), where the run folder is and
    that --continue resumes it."""
    from semidiff_nnunet import api
    from semidiff_nnunet.training import distributed

    monkeypatch.setenv(distributed.FAULT_ENV, "0:SIGKILL:2")
    start = time.monotonic()
    code, out, err = run_cli("train", demo2d, "-m", "supervised", "--labeled", "0.5", "--seed", "7", "-c", "2d",
                             "--epochs", "4", "--iters-per-epoch", "1", "--save-every", "1", "--no-val", "--nproc",
                             "2", *TINY)
    took = time.monotonic() - start
    text = " ".join(err.split())
    info = api.run_info(demo2d, "supervised", "0.5", 7, "2d", 0, "semidiffDemoPlans")
    assert code == 1, err
    assert "Rank 0 of the distributed run was killed by SIGKILL" in text, text
    assert "Connection reset" not in text, text
    assert "the other ranks were stopped" in text and str(info.fold_folder) in text and "--continue" in text, text
    assert took < 120, took
    ck = torch.load(info.fold_folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 2  # what the killed rank had saved is there to resume from
    import shutil

    shutil.rmtree(info.run_root)


def test_the_fold_split_is_written_once_before_the_ranks_start(demo2d, monkeypatch, tmp_path):
    """On a dataset's first run nnU-Net's do_split writes splits_final.json in every rank at once (one rank can
    read the other's half-written file): `--nproc N` writes it first, nnU-Net's own split, in one process."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from semidiff_nnunet import api, planning
    from semidiff_nnunet.training import distributed
    from semidiff_nnunet.training.unlabeled import list_cases

    splits_file = planning.preprocessed_folder(demo2d) / "splits_final.json"
    kept = tmp_path / "splits_final.json"
    if splits_file.is_file():
        splits_file.rename(kept)
    seen = {}

    class Stop(Exception):
        pass

    def launch(nproc, *args, **kwargs):
        seen["split"] = json.loads(splits_file.read_text(encoding="utf-8")) if splits_file.is_file() else None
        raise Stop

    monkeypatch.setattr(distributed, "launch", launch)
    try:
        with pytest.raises(Stop):
            api.train(demo2d, "supervised", labeled="0.5", seed=8, configuration="2d", device="cpu", epochs=1,
                      iters_per_epoch=1, plans_name="semidiffDemoPlans", final_validation=False, show_progress=False,
                      nproc=2)
    finally:
        if kept.is_file():
            kept.replace(splits_file)
    ident = planning.load_plans(demo2d, "semidiffDemoPlans")["configurations"]["2d"]["data_identifier"]
    keys = sorted(list_cases(str(planning.preprocessed_folder(demo2d) / ident)))
    assert seen["split"] == json.loads(json.dumps(generate_crossval_split(keys, seed=12345, n_splits=5)))
    shutil.rmtree(api.run_info(demo2d, "supervised", "0.5", 8, "2d", 0, "semidiffDemoPlans").run_root,
                  ignore_errors=True)
