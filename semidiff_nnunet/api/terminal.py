"""Progress bars on the terminal, and nnU-Net's own prints kept off it while they show."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress(enabled: bool):
    """A rich progress bar (None when ``enabled`` is false)."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as p:
        yield p


@contextlib.contextmanager
def quiet(enabled: bool):
    """Silence nnU-Net's own prints/tqdm bars while our progress bar is shown."""
    if not enabled:
        yield
        return
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield
