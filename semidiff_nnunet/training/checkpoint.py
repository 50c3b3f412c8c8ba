"""Checkpoints and random-number state, built on nnU-Net's own checkpoint dict.

``save`` lets nnU-Net's ``save_checkpoint`` assemble its dict (network, optimizer, grad scaler,
logger, epoch, init args, mirroring axes and whatever a future nnU-Net adds) and adds one key,
``"semidiff"``: every network, extra optimizer, method state, the iteration counter and the RNG
state. ``network_weights`` holds the inference network, so stock ``nnUNetv2_predict`` loads the run.
``load`` hands nnU-Net's part back to nnU-Net's ``load_checkpoint`` and restores the rest.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SEMIDIFF_KEY = "semidiff"
_nnunet_module = sys.modules[nnUNetTrainer.__module__]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _TorchIO:
    """Stands in for the ``torch`` module inside nnU-Net's trainer module during one call: ``save``
    hands the object over instead of writing it, ``load`` returns a given object; all else is torch."""

    def __init__(self, loaded=None):
        self.saved = None
        self._loaded = loaded

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, obj, *_args, **_kwargs):
        self.saved = obj

    def load(self, *_args, **_kwargs):
        return self._loaded


@contextlib.contextmanager
def _nnunet_torch_io(loaded=None):
    io = _TorchIO(loaded)
    real = _nnunet_module.torch
    _nnunet_module.torch = io
    try:
        yield io
    finally:
        _nnunet_module.torch = real


def nnunet_checkpoint(trainer) -> dict:
    """The dict nnU-Net's ``save_checkpoint`` would write for ``trainer`` (nothing is written)."""
    with _nnunet_torch_io() as io:
        nnUNetTrainer.save_checkpoint(trainer, "<semidiff: in memory>")
    if io.saved is None:
        raise RuntimeError("nnU-Net's save_checkpoint wrote nothing (checkpointing disabled or not rank 0).")
    return io.saved


def nnunet_load(trainer, checkpoint: dict) -> None:
    """Run nnU-Net's ``load_checkpoint`` on an in-memory dict (it only accepts file names)."""
    with _nnunet_torch_io(loaded=checkpoint):
        nnUNetTrainer.load_checkpoint(trainer, "<semidiff: in memory>")


def save_atomic(checkpoint: dict, filename: str) -> None:
    """Write ``checkpoint`` to ``filename`` through a temporary file: never a half-written checkpoint."""
    tmp = filename + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, filename)
