"""Augmentation workers whose batches depend only on (seed, stream, epoch): reproducible with workers.

nnU-Net's ``NonDetMultiThreadedAugmenter`` hands out batches in whatever order its worker processes
finish them, with unseeded workers, so two runs (or a run and its resumed copy) see different
batches as soon as ``nnUNet_n_proc_DA > 0``. :class:`EpochSeededAugmenter` restarts batchgenerators'
order-preserving ``MultiThreadedAugmenter`` at every epoch with worker seeds drawn from
``(seed, stream, epoch, worker)`` (numpy and torch both seeded in each worker), so the batches of an
epoch are the same in every run and after ``--continue``. The price is one worker start per epoch
(about a second), against epochs of 250 iterations.

Exactly the same batches also need every transform to compute the same floats: nnU-Net's Gaussian blur
(batchgeneratorsv2's ``GaussianBlurTransform(benchmark=True)``) times an FFT and a direct convolution the first
time it meets a shape in a worker and keeps the faster, so under load a worker may pick the other one and
its batches differ in the last bit (a resumed run then drifted from the uninterrupted one).
:func:`pin_blur_algorithm` turns that timing off in every loader the engine serves: the direct convolution
(what ``benchmark=False`` always uses; the blur's kernels, σ ≤ 1 voxel in nnU-Net's pipeline, are small).

Every worker (also of nnU-Net's augmenters, through :class:`WorkerLoader`) ends when the process that
started it dies, also by ``kill -9``, which runs no clean-up (on Linux; elsewhere they outlive it as before).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: have the kernel kill it (SIGKILL) when the process that started it dies;
    if that happened already (before this ran), exit now. Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


class WorkerLoader:
    """Forwards to ``loader`` (batchgenerators calls ``set_thread_id`` in each worker as it starts): the
    worker ends when the process that built this wrapper dies (:func:`die_with_parent`). For the workers
    of batchgenerators' augmenters, e.g. ``NonDetMultiThreadedAugmenter(WorkerLoader(loader), ...)``."""

    def __init__(self, loader):
        self.loader = loader
        self._parent = os.getpid()

    def set_thread_id(self, thread_id: int) -> None:
        die_with_parent(self._parent)
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _TorchSeedingLoader(WorkerLoader):
    """A :class:`WorkerLoader` that, when a worker starts (``set_thread_id``, right after batchgenerators
    seeded numpy with the worker's seed), seeds torch from numpy too, and keeps torch to one
    thread: the workers are forked from a process whose OpenMP pool has run, and a forked child that
    enters a parallel region waits for threads it does not have (as torch's own DataLoader workers do)."""

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(int(np.random.randint(0, 2**31 - 1)))
        super().set_thread_id(thread_id)


def pin_blur_algorithm(obj, _seen: set[int] | None = None) -> int:
    """Set ``benchmark=False`` on every ``GaussianBlurTransform`` reachable from ``obj`` (a loader, a
    transform, a list or dict of them): the same convolution, so the same floats, in every worker and run
    (see the module docstring). Follows attributes of transforms and loaders, and the items of lists, tuples
    and dicts; returns how many blurs it switched."""
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    seen = set() if _seen is None else _seen
    if id(obj) in seen or isinstance(obj, (np.ndarray, torch.Tensor, str, bytes, int, float)) or obj is None:
        return 0
    seen.add(id(obj))
    switched = 0
    if isinstance(obj, GaussianBlurTransform):
        switched += int(bool(obj.benchmark))
        obj.benchmark = False
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif _seen is None or isinstance(obj, BasicTransform):  # the loader itself, and transforms all the way down
        children = list(getattr(obj, "__dict__", {}).values())
    else:
        children = []
    return switched + sum(pin_blur_algorithm(c, seen) for c in children)


def worker_seeds(seed: int, stream: int, epoch: int, num_processes: int) -> list[int]:
    return [int(np.random.SeedSequence([seed, stream, epoch, i]).generate_state(1)[0] % (2**31 - 1))
            for i in range(num_processes)]


class EpochSeededAugmenter:
    """``next()`` gives the loader's next batch; ``start_epoch(e)`` (re)starts the workers for epoch ``e``."""

    def __init__(self, data_loader, num_processes: int, seed: int, stream: int, num_cached: int = 2,
                 pin_memory: bool = False):
        self.data_loader = data_loader
        self.num_processes, self.num_cached, self.pin_memory = num_processes, num_cached, pin_memory
        self.seed, self.stream = seed, stream
        self._gen: MultiThreadedAugmenter | None = None

    def start_epoch(self, epoch: int) -> None:
        self._finish()
        self._gen = MultiThreadedAugmenter(_TorchSeedingLoader(self.data_loader), None, self.num_processes,
                                           self.num_cached, worker_seeds(self.seed, self.stream, epoch,
                                                                         self.num_processes),
                                           pin_memory=self.pin_memory, wait_time=0.002)

    def __iter__(self):
        return self

    def __next__(self):
        if self._gen is None:
            raise RuntimeError("EpochSeededAugmenter: call start_epoch(epoch) before asking for batches")
        return next(self._gen)

    def _finish(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen._finish()
