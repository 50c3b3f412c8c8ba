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

    def __init__(self, stop_requested: Callable[[], bool] | None = None, console: Console | None = None) -> None:
        self.stop_requested = stop_requested
        self.console = console or Console(stderr=True)
        #: not a terminal (nohup, SLURM, CI: output redirected to a file): no live bar, which would show
        #: only when it closes, but one plain line per epoch, as nnU-Net prints
        self.plain = not self.console.is_terminal
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console, redirect_stdout=True,
                                 redirect_stderr=True, transient=False)  # stdout stays for results
        self.task = None
        self.name = ""

    def start(self, total: int, completed: int, description: str) -> None:
        self.name = escape(description)
        if self.plain:
            self.task = "plain"
            self.console.print(f"{self.name} training: {total} iterations ({completed} done)", soft_wrap=True,
                               markup=False, highlight=False)
            return
        self.task = self.progress.add_task(f"{self.name} training", total=total, completed=completed,
                                           loss=float("nan"))
        self.progress.start()

    def step(self, loss: float, epoch: int, num_epochs: int, phase: str) -> None:
        if self.stop_requested is not None and self.stop_requested():
            raise KeyboardInterrupt
        if self.plain:
            return
        where = f"{escape(phase)} " if phase else ""
        self.progress.update(self.task, advance=1, loss=float(loss),
                             description=f"{self.name} {where}epoch {epoch + 1}/{num_epochs}")

    def epoch_end(self, epoch: int, num_epochs: int, phase: str, loss: float, terms: dict[str, float],
                  seconds: float, pseudo_dice: float | None = None) -> None:
        """After every epoch: with no terminal, one plain line (epoch, phase, loss and its terms, time,
        validation pseudo Dice); with a terminal, nothing (the bar shows it)."""
        if not self.plain:
            return
        parts = [f"{self.name} epoch {epoch + 1}/{num_epochs}"] + ([f"phase {phase}"] if phase else [])
        parts.append(f"loss {loss:.4f}" + (" (" + ", ".join(f"{k} {v:.4g}" for k, v in terms.items()) + ")"
                                           if terms else ""))
        if pseudo_dice is not None and pseudo_dice == pseudo_dice:
            parts.append(f"pseudo Dice {pseudo_dice:.4f}")
        parts.append(f"{seconds:.1f} s")
        self.console.print(", ".join(parts), soft_wrap=True, markup=False, highlight=False)
        self.console.file.flush()

    def close(self) -> None:
        """Stop drawing (the bar stays on screen); safe to call twice and before :meth:`start`."""
        if self.task is not None and not self.plain:
            self.progress.stop()
