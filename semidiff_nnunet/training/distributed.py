"""Distributed training on torch.distributed, the engine nnU-Net itself uses (``nnUNetv2_train -num_gpus``).

Two ways in:

* ``api.train(..., nproc=N)`` / ``semidiff train ... --nproc N``: :func:`launch` spawns N processes on
  this node (one per GPU on CUDA, N CPU ranks with gloo under ``--device cpu``), rendezvous on a free
  local port; rank 0's progress events travel to the caller's progress bar through a queue;
* ``torchrun`` (multi-node): every process runs the CLI; :func:`init_from_env` joins the group from
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (env:// rendezvous).

Backend: NCCL on CUDA, gloo on the CPU. What the trainer does under DDP is in
:class:`semidiff_nnunet.training.trainer.SemiSupervisedTrainer` (``is_ddp``).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable

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


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun set up (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``);
    False when this process was not started that way or the group already exists."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device), init_method="env://")
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


def _worker(local_rank: int, nproc: int, port: int, device_type: str, fn: Callable, args: tuple, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend_for(device), rank=local_rank, world_size=nproc)
    try:
        fn(*args, device=device, progress=QueueProgress(q) if local_rank == 0 else None)
    except SemidiffError as e:
        q.put(("error", (local_rank, str(e))))
        raise
    except KeyboardInterrupt:
        q.put(("interrupted", (local_rank,)))
        raise
    except BaseException as e:  # the first line of the error: its kind and what went wrong
        first = (str(e).strip().splitlines() or [""])[0]
        q.put(("error", (local_rank, f"rank {local_rank}: {type(e).__name__}: {first}")))
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, device: torch.device, fn: Callable, args: tuple, progress=None) -> None:
    """Run ``fn(*args, device=..., progress=...)`` in ``nproc`` spawned ranks of one process group; relay
    rank 0's progress to ``progress``; a failing rank ends the launch with its one-sentence error."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise SemidiffError(f"--nproc {nproc} asks for {nproc} GPUs but {torch.cuda.device_count()} are visible; "
                            f"give at most {torch.cuda.device_count()} or use --device cpu.")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    context = mp.start_processes(_worker, args=(nproc, free_port(), device.type, fn, args, q), nprocs=nproc,
                                 join=False, start_method="spawn")
    errors: list[tuple[int, str]] = []
    interrupted = False

    def drain(block: bool) -> None:
        nonlocal interrupted
        while True:
            try:
                kind, payload = q.get(timeout=0.2) if block else q.get_nowait()
            except queue_module.Empty:
                return
            block = False
            if kind == "error":
                errors.append(payload)
            elif kind == "interrupted":
                interrupted = True
            elif progress is not None:
                getattr(progress, kind)(*payload)

    try:
        while True:
            drain(block=True)
            try:
                if context.join(timeout=0.05):
                    break
            except mp.ProcessRaisedException:
                break
            except mp.ProcessExitedException:
                break
        drain(block=False)
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(5)
    if errors:
        errors.sort()
        raise SemidiffError(errors[0][1])
    if interrupted:
        raise KeyboardInterrupt
    failed = [(i, p.exitcode) for i, p in enumerate(context.processes) if p.exitcode not in (0, None)]
    if failed:
        raise SemidiffError(f"Rank {failed[0][0]} of the distributed run exited with code {failed[0][1]}; its "
                            f"training log in the run folder says why.")
