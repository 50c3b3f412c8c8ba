"""How a training run reports its progress: a callback object the caller (the CLI) supplies.

The trainer never draws on a terminal. ``api.train(..., progress=cb)`` hands ``cb`` to the
trainer, which calls::

    cb.start(total=iterations_of_the_run, completed=iterations_already_done, description=method)
    cb.step(loss=float, epoch=e, num_epochs=n, phase="co-training" or "")   # after every iteration
    cb.close()

and, if it has the method, after every epoch (validation included)::

    cb.epoch_end(epoch=e, num_epochs=n, phase=..., loss=mean training loss, terms={name: mean},
                 seconds=epoch time, pseudo_dice=nnU-Net's validation pseudo Dice or None)

``semidiff_nnunet.cli.progress.RichTrainingProgress`` draws a rich progress bar; anything with
these three methods works (a notebook widget, a logger, a test recorder).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class TrainingProgress(Protocol):
    def start(self, total: int, completed: int, description: str) -> None: ...

    def step(self, loss: float, epoch: int, num_epochs: int, phase: str) -> None: ...

    def close(self) -> None: ...
