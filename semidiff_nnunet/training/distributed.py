"""Distributed training on torch.distributed, the engine nnU-Net itself uses (``nnUNetv2_train -num_gpus``).

Two ways in:

* ``api.train(..., nproc=N)`` / ``semidiff train ... --nproc N``: :func:`launch` spawns N processes on
  this node (one per GPU on CUDA, N CPU ranks with gloo under ``--device cpu``), rendezvous on a free
  local port; rank 0's progress events travel to the caller's progress bar through a queue;
* ``torchrun`` (multi-node): every process runs the CLI; :func:`init_from_env` joins the group from
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (env:// rendezvous).

Backend: NCCL on CUDA, gloo on the CPU. What the trainer does under DDP is in
:class:`semidiff_nnunet.training.trainer.SemiSupervisedTrainer` (``is_ddp``).

When a rank fails, :func:`launch` stops the others at once (SIGTERM, then SIGKILL) instead of letting them
wait in a collective, and reports the failure that came first: a rank that died without a word (killed by
a signal, e.g. the kernel's OOM killer's SIGKILL, or exited without raising) is the cause, the errors its
peers raise afterwards ("Connection reset by peer") are consequences; among errors the earliest wins.
Collectives, the rendezvous included, give up after ``SEMIDIFF_DDP_TIMEOUT`` seconds (default 1800: a
rank may validate its share of the cases several minutes longer than another before nnU-Net's barrier),
the process group's ``timeout`` (NCCL's watchdog aborts with it), for a rank that hangs rather than dies.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing.connection
import os
import queue as queue_module
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semidiff_nnunet.errors import SemidiffError


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def env_world_size() -> int:
    """The world size torchrun (or any env:// launcher) announces; 1 when not launched that way."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


#: seconds a collective (and the rendezvous) waits for the other ranks before it fails
TIMEOUT_ENV = "SEMIDIFF_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: tests only: "RANK:SIGNAL:EPOCH" makes rank RANK send itself SIGNAL (e.g. 0:SIGKILL:1) when epoch EPOCH has
#: ended (after its checkpoint), as the OOM killer or a `kill` would
FAULT_ENV = "SEMIDIFF_TEST_FAULT"
#: seconds between the first failure and SIGTERM to a rank still running (after a rank raised: it may still
#: be tearing down), and between SIGTERM and SIGKILL
REPORT_GRACE_S = 10.0
KILL_GRACE_S = 5.0


def process_group_timeout() -> datetime.timedelta:
    """The process group's ``timeout`` (``SEMIDIFF_DDP_TIMEOUT`` seconds, default 30 minutes)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SemidiffError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; give a positive number (default "
                            f"{DEFAULT_TIMEOUT_S:.0f}) or unset it.")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun set up (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``);
    False when this process was not started that way or the group already exists."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    timeout = process_group_timeout()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device), init_method="env://", timeout=timeout)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QueueProgress:
    """A :class:`~semidiff_nnunet.training.progress.TrainingProgress` that forwards rank 0's events to the
    launching process (which draws them)."""

    def __init__(self, q) -> None:
        self.q = q

    def start(self, total: int, completed: int, description: str) -> None:
        self.q.put(("start", (total, completed, description)))

    def step(self, loss: float, epoch: int, num_epochs: int, phase: str) -> None:
        self.q.put(("step", (float(loss), epoch, num_epochs, phase)))

    def close(self) -> None:
        self.q.put(("close", ()))


def _inject_fault(rank: int) -> None:
    """Tests: ``SEMIDIFF_TEST_FAULT=RANK:SIGNAL:EPOCH`` (see :data:`FAULT_ENV`)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    target, sig, epoch = spec.split(":")
    if int(target) != rank:
        return
    from semidiff_nnunet.training.trainer import SemiSupervisedTrainer

    original = SemiSupervisedTrainer.on_epoch_end

    def on_epoch_end(self):
        original(self)
        if self.current_epoch >= int(epoch):  # nnU-Net's on_epoch_end has counted the epoch
            os.kill(os.getpid(), getattr(signal, sig))

    SemiSupervisedTrainer.on_epoch_end = on_epoch_end


def _worker(local_rank: int, nproc: int, port: int, device_type: str, fn: Callable, args: tuple, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    _inject_fault(local_rank)
    try:
        dist.init_process_group(backend_for(device), rank=local_rank, world_size=nproc,
                                timeout=process_group_timeout())
        fn(*args, device=device, progress=QueueProgress(q) if local_rank == 0 else None)
    except SemidiffError as e:
        q.put(("error", (time.time(), local_rank, str(e), True)))
        raise
    except KeyboardInterrupt:
        q.put(("interrupted", (local_rank,)))
        raise
    except BaseException as e:  # the first line of the error: its kind and what went wrong
        first = (str(e).strip().splitlines() or [""])[0]
        q.put(("error", (time.time(), local_rank, f"{type(e).__name__}: {first}", False)))
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class RankFailure:
    """How one rank failed: ``message`` (what it raised: a user error in full when ``user``, else the exception's
    kind and first line) or, for a rank that died without a word, ``exitcode`` (negative: the signal)."""

    rank: int
    time: float
    message: str | None = None
    user: bool = False
    exitcode: int | None = None


def first_failure(failures: list[RankFailure]) -> RankFailure | None:
    """The failure that caused the others: a rank that died without a word (a signal from outside, an exit
    without raising) before any error (its peers' errors, e.g. "Connection reset by peer", follow from it);
    otherwise the earliest error."""
    silent = sorted((f for f in failures if f.message is None), key=lambda f: (f.time, f.rank))
    raised = sorted((f for f in failures if f.message is not None), key=lambda f: (f.time, f.rank))
    return (silent or raised or [None])[0]


def failure_message(failure: RankFailure, stopped: bool) -> str:
    """One sentence for the launch's error (``api.train`` adds where the run folder and its checkpoint are)."""
    others = "; the other ranks were stopped" if stopped else ""
    if failure.message is not None:
        if failure.user:
            return failure.message
        return f"Rank {failure.rank} of the distributed run failed with {failure.message.rstrip('.')}{others}."
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = (" (the kernel's OOM killer sends it when memory runs out: `dmesg` or `journalctl -k` says whether it "
               "did)" if -code == signal.SIGKILL else "")
        return f"Rank {failure.rank} of the distributed run was killed by {name}{why}{others}."
    return f"Rank {failure.rank} of the distributed run exited with code {code} without an error{others}."


def launch(nproc: int, device: torch.device, fn: Callable, args: tuple, progress=None) -> None:
    """Run ``fn(*args, device=..., progress=...)`` in ``nproc`` spawned ranks of one process group; relay
    rank 0's progress to ``progress``. When a rank fails, the others are stopped at once and the launch ends
    with the first failure in one sentence (:func:`first_failure`, :func:`failure_message`)."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise SemidiffError(f"--nproc {nproc} asks for {nproc} GPUs but {torch.cuda.device_count()} are visible; "
                            f"give at most {torch.cuda.device_count()} or use --device cpu.")
    process_group_timeout()  # a bad setting fails here, once, not in every rank
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    context = mp.start_processes(_worker, args=(nproc, free_port(), device.type, fn, args, q), nprocs=nproc,
                                 join=False, start_method="spawn")
    procs = context.processes
    failures: dict[int, RankFailure] = {}  # rank -> its (first) failure
    exited: dict[int, float] = {}  # rank -> when its exit was seen
    stopped: set[int] = set()  # ranks this launcher terminated
    interrupted = False
    stop_at = kill_at = math.inf

    def drain() -> None:
        nonlocal interrupted
        while True:
            try:
                kind, payload = q.get_nowait()
            except queue_module.Empty:
                return
            if kind == "error":
                t, r, message, user = payload
                failures.setdefault(r, RankFailure(r, t, message, user))
            elif kind == "interrupted":
                interrupted = True
            elif progress is not None:
                getattr(progress, kind)(*payload)

    try:
        while len(exited) < nproc:
            multiprocessing.connection.wait([p.sentinel for r, p in enumerate(procs) if r not in exited], 0.05)
            now = time.time()
            drain()
            for r, p in enumerate(procs):
                if r not in exited and p.exitcode is not None:
                    exited[r] = now
                    if p.exitcode != 0 and r not in stopped and r not in failures:
                        drain()  # its last words may have arrived just now
                        failures.setdefault(r, RankFailure(r, now, exitcode=p.exitcode))
            if any(procs[r].exitcode not in (0, None) for r in failures if r not in stopped):
                stop_at = min(stop_at, now)  # a rank is gone: the others would wait for it in vain
            elif failures or interrupted:
                stop_at = min(stop_at, now + REPORT_GRACE_S)  # a rank raised and is still tearing down
            if now >= stop_at and not stopped:
                for r, p in enumerate(procs):
                    if r not in exited:
                        stopped.add(r)
                        p.terminate()
                kill_at = now + KILL_GRACE_S
            if now >= kill_at:
                for r, p in enumerate(procs):
                    if r not in exited:
                        p.kill()
        drain()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(KILL_GRACE_S)
            if p.is_alive():
                p.kill()
                p.join()
        for path in context.error_files:  # torch's per-rank traceback files (the queue brought the news)
            with contextlib.suppress(OSError):
                os.unlink(path)
    first = first_failure([f for r, f in failures.items() if r not in stopped or f.message is not None])
    if first is not None:
        raise SemidiffError(failure_message(first, bool(stopped)))
    if interrupted:
        raise KeyboardInterrupt
