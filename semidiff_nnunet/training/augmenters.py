"""Augmentation workers whose batches depend only on (seed, stream, epoch): reproducible with workers.

nnU-Net's ``NonDetMultiThreadedAugmenter`` hands out batches in whatever order its worker processes
finish them, with unseeded workers, so two runs (or a run and its resumed copy) see different
batches as soon as ``nnUNet_n_proc_DA > 0``. :class:`EpochSeededAugmenter` restarts batchgenerators'
order-preserving ``MultiThreadedAugmenter`` at every epoch with worker seeds drawn from
``(seed, stream, epoch, worker)`` (numpy and torch both seeded in each worker), so the batches of an
epoch are the same in every run and after ``--continue``. The price is one worker start per epoch
(about a second), against epochs of 250 iterations.
"""

from __future__ import annotations

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter


class _TorchSeedingLoader:
    """Forwards to ``loader``; when a worker starts (``set_thread_id``, right after batchgenerators
    seeded numpy with the worker's seed) it seeds torch from numpy too, and keeps torch to one
    thread: the workers are forked from a process whose OpenMP pool has run, and a forked child that
    enters a parallel region waits for threads it does not have (as torch's own DataLoader workers do)."""

    def __init__(self, loader):
        self.loader = loader

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(int(np.random.randint(0, 2**31 - 1)))
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)


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
