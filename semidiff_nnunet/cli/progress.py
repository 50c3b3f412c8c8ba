"""The rich progress bar the CLI hands to training (``semidiff_nnunet.training.progress``)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichTrainingProgress:
    """One bar over all training iterations (epochs × iterations), showing epoch, phase and loss.

    ``stop_requested``: asked after every iteration; when it answers True the training stops with
    ``KeyboardInterrupt``. The CLI uses it for a Ctrl-C whose ``KeyboardInterrupt`` Python swallowed
    (raised inside a finaliser or weakref callback, it is only printed as "Exception ignored").
    """

    def __init__(self, stop_requested: Callable[[], bool] | None = None) -> None:
        self.stop_requested = stop_requested
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), redirect_stdout=True,
                                 redirect_stderr=True, transient=False)  # stdout stays for results
        self.task = None
        self.name = ""

    def start(self, total: int, completed: int, description: str) -> None:
        self.name = escape(description)
        self.task = self.progress.add_task(f"{self.name} training", total=total, completed=completed,
                                           loss=float("nan"))
        self.progress.start()

    def step(self, loss: float, epoch: int, num_epochs: int, phase: str) -> None:
        if self.stop_requested is not None and self.stop_requested():
            raise KeyboardInterrupt
        where = f"{escape(phase)} " if phase else ""
        self.progress.update(self.task, advance=1, loss=float(loss),
                             description=f"{self.name} {where}epoch {epoch + 1}/{num_epochs}")

    def close(self) -> None:
        """Stop drawing (the bar stays on screen); safe to call twice and before :meth:`start`."""
        if self.task is not None:
            self.progress.stop()
