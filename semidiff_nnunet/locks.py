"""One process at a time: exclusive locks on a run folder (while it trains) and on a dataset's
preprocessed data (while it is written).

A lock is ``fcntl.flock`` on a small lock file next to what it guards (never inside a folder that may
be deleted): ``<model folder>/.fold_0.lock`` for a run, ``$nnUNet_preprocessed/.<dataset>.lock`` for
preprocessing. The kernel releases a flock when the last descriptor of the holder closes, i.e. when
the process ends however it ends (crash, SIGKILL, reboot): a lock left by a dead process never blocks.
The holder writes its pid, host and start time into the file; they only name it in the refusal. The
lock is not inherited: a forked child (nnU-Net's augmentation workers) closes its copy of the
descriptor, so a worker that outlives a killed training holds nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from semidiff_nnunet.errors import SemidiffError

try:
    import fcntl
except ImportError:  # Windows: no flock; commands then run unlocked, as before
    fcntl = None

_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # closing a copy in the child leaves the parent's lock in place (LOCK_UN there would release it)
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class BusyError(SemidiffError):
    """Another process holds the lock (the message names it)."""


def run_lock_file(fold_folder: Path) -> Path:
    """The lock file of a run: ``.fold_0.lock`` beside its ``fold_0`` folder (which a failed start may remove)."""
    return fold_folder.parent / f".{fold_folder.name}.lock"


def preprocessing_lock_file(preprocessed_folder: Path) -> Path:
    """The lock file of a dataset's preprocessed data: ``.<Dataset>.lock`` beside its folder."""
    return preprocessed_folder.parent / f".{preprocessed_folder.name}.lock"


def holder(path: Path) -> dict:
    """What the lock file says about its last holder ({} if nothing): pid, host, started, command."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(path: Path) -> str:
    info = {}
    for _ in range(20):  # a holder that has just locked writes its details a moment later
        info = holder(path)
        if info:
            break
        time.sleep(0.05)
    if not info:
        return "another process"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


@contextlib.contextmanager
def exclusive(path: Path, doing: str, wait: bool = False,
              log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if missing) for the ``with`` block.

    Held by another process: raise :class:`BusyError`, one sentence naming the holder and ``doing`` (what
    it does: "training the run in ..."), or with ``wait`` block until it is released, after telling ``log``.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _describe(path)
            if not wait:
                raise BusyError(f"Another semidiff command ({other}) is {doing}; wait for it to end, or pass "
                                f"--wait to start when it has.") from None
            if log is not None:
                log(f"Waiting for {other}, which is {doing}.")
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held.add(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield
    finally:
        if fd in _held:
            _held.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: nobody to name
        os.close(fd)
