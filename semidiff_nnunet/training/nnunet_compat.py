"""Every place the engine reaches into nnU-Net's internals or process-wide state, one named function each.

nnU-Net's trainer is a class to subclass, not a library with hooks for what a semi-supervised engine
needs; where the engine cannot get what it needs through nnU-Net's public methods it patches, and
each patch is here, documented, undone on exit where it is temporary, and checked against the nnU-Net
version below by ``tests/test_nnunet_compat.py`` (which fails loudly on an nnU-Net upgrade that moves
or reshapes what a patch touches):

* :func:`nnunet_checkpoint` / :func:`nnunet_load` — swap the ``torch`` name inside nnU-Net's trainer
  module for one call, so that nnU-Net's own ``save_checkpoint``/``load_checkpoint`` build and read
  checkpoints in memory (nnU-Net assembles its part of the dict, including keys a future version adds);
* :func:`single_threaded_nnunet_loaders` — ``nnUNet_n_proc_DA=0`` in the environment around nnU-Net's
  ``get_dataloaders``, so nnU-Net builds no worker processes (the engine's own loaders go around them);
* :func:`without_cpu_device_warning` — ``sys.stdout`` filtered during nnU-Net's final validation, which
  prints the same warning on CPU for every case;
* :func:`loss_weights` — the CE/Dice weights of nnU-Net's ``DC_and_CE_loss`` set for one call;
* :func:`initialize_without_nnunet_ddp` — ``is_ddp`` off during nnU-Net's ``initialize`` (its DDP
  wrapping assumes one GPU per global rank; the engine wraps itself);
* :func:`place_ddp_rank` — the device (and no grad scaler on CPU) of a DDP rank;
* :func:`use_local_logger` — nnU-Net's logger's local logger replaced by the engine's;
* :func:`set_foreground_oversampling` — nnU-Net's labeled loader's foreground oversampling;
* :func:`guard_module_hooks_if_compiled` — a process-wide Dynamo setting for networks nnU-Net compiled.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: the nnU-Net release every patch here was checked against (``tests/test_nnunet_compat.py`` pins it)
NNUNET_VERSION = "2.8.1"

_nnunet_module = sys.modules[nnUNetTrainer.__module__]


# ---------------------------------------------------------------------------------------------- checkpoints
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
def nnunet_torch_io(loaded=None):
    """Patch: the global ``torch`` of ``nnunetv2.training.nnUNetTrainer.nnUNetTrainer`` is replaced by a
    :class:`_TorchIO` for the duration (``torch.save`` captures, ``torch.load`` returns ``loaded``)."""
    io = _TorchIO(loaded)
    real = _nnunet_module.torch
    _nnunet_module.torch = io
    try:
        yield io
    finally:
        _nnunet_module.torch = real


def nnunet_checkpoint(trainer) -> dict:
    """The dict nnU-Net's ``save_checkpoint`` would write for ``trainer`` (nothing is written)."""
    with nnunet_torch_io() as io:
        nnUNetTrainer.save_checkpoint(trainer, "<semidiff: in memory>")
    if io.saved is None:
        raise RuntimeError("nnU-Net's save_checkpoint wrote nothing (checkpointing disabled or not rank 0).")
    return io.saved


def nnunet_load(trainer, checkpoint: dict) -> None:
    """Run nnU-Net's ``load_checkpoint`` on an in-memory dict (it only accepts file names)."""
    with nnunet_torch_io(loaded=checkpoint):
        nnUNetTrainer.load_checkpoint(trainer, "<semidiff: in memory>")


# ---------------------------------------------------------------------------------------------- environment, stdout
@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def single_threaded_nnunet_loaders():
    """Patch: ``nnUNet_n_proc_DA=0`` in the process environment for the duration (read by nnU-Net's
    ``get_allowed_n_proc_DA``), so nnU-Net's ``get_dataloaders`` builds ``SingleThreadedAugmenter``\\ s and no
    worker processes; the previous value is put back."""
    return _env("nnUNet_n_proc_DA", "0")


class _DropLines:
    """A stdout that swallows printed lines containing ``text`` (and the newline ``print`` writes after them)."""

    def __init__(self, stream, text: str):
        self.stream, self.text, self._dropped = stream, text, False

    def write(self, s: str) -> int:
        if self.text in s or (self._dropped and s == "\n"):
            self._dropped = self.text in s
            return len(s)
        self._dropped = False
        return self.stream.write(s)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def dropping_printed_lines(text: str):
    """Patch: ``sys.stdout`` replaced for the duration by a filter that drops lines containing ``text``."""
    old = sys.stdout
    sys.stdout = _DropLines(old, text)
    try:
        yield
    finally:
        sys.stdout = old


#: what nnU-Net's ``nnUNetPredictor`` prints on a non-CUDA device each time the trainer's validation builds one
CPU_DEVICE_WARNING = "perform_everything_on_device=True is only supported for cuda"


def without_cpu_device_warning():
    """nnU-Net's ``perform_actual_validation`` asks its predictor for ``perform_everything_on_device=True``
    on every device and the predictor prints :data:`CPU_DEVICE_WARNING` on CPU; the fallback it announces is
    the right behaviour there, so the line is dropped (:func:`dropping_printed_lines`)."""
    return dropping_printed_lines(CPU_DEVICE_WARNING)


# ---------------------------------------------------------------------------------------------- trainer state
@contextlib.contextmanager
def loss_weights(loss, ce_weight: float, dice_weight: float):
    """Patch: ``weight_ce``/``weight_dice`` of nnU-Net's ``DC_and_CE_loss`` (inside its
    ``DeepSupervisionWrapper`` when deep supervision is on: ``loss.loss``) set for the duration, then restored."""
    inner = getattr(loss, "loss", loss)
    saved = inner.weight_ce, inner.weight_dice
    inner.weight_ce, inner.weight_dice = ce_weight, dice_weight
    try:
        yield loss
    finally:
        inner.weight_ce, inner.weight_dice = saved


@contextlib.contextmanager
def initialize_without_nnunet_ddp(trainer):
    """Patch: ``trainer.is_ddp`` is False during the block (nnU-Net's ``initialize``), whose DDP wrapping
    assumes a GPU per global rank; the engine wraps the networks itself afterwards."""
    ddp, trainer.is_ddp = trainer.is_ddp, False
    try:
        yield ddp
    finally:
        trainer.is_ddp = ddp


def place_ddp_rank(trainer, device) -> None:
    """Patch of nnU-Net's DDP set-up (its constructor picks ``cuda:<global rank>``): on CUDA the node-local
    rank picks the GPU (multi-node torchrun); CPU ranks (gloo) stay on the CPU, without a grad scaler."""
    if torch.device(device).type == "cuda":
        trainer.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", trainer.local_rank)))
    else:
        trainer.device = torch.device(device)
        trainer.grad_scaler = None


def use_local_logger(trainer, local_logger) -> None:
    """Patch: nnU-Net's ``MetaLogger`` keeps its readable, checkpointed values in ``local_logger``; the
    engine's (per-term curves, :class:`~.curves.SemiLocalLogger`) replaces it, so they are checkpointed too."""
    trainer.logger.local_logger = local_logger


def set_foreground_oversampling(loader, percent: float | None) -> float | None:
    """Set ``oversample_foreground_percent`` of nnU-Net's ``nnUNetDataLoader`` (None: leave it) and return
    the value it had; None for a loader without one."""
    if not hasattr(loader, "oversample_foreground_percent"):
        return None
    old = loader.oversample_foreground_percent
    if percent is not None:
        loader.oversample_foreground_percent = percent
    return old


def guard_module_hooks_if_compiled(network) -> None:
    """Methods add forward hooks during a forward (``captured_output``, ``replaced_output``: CCT,
    UniMatch, Diff-CL); a network compiled by nnU-Net (CUDA) and traced without them would keep
    ignoring them, so Dynamo must guard on module hooks. Patch: a process-wide Dynamo setting."""
    inner = getattr(network, "module", network)  # DDP
    if hasattr(network, "_orig_mod") or hasattr(inner, "_orig_mod"):
        import torch._dynamo

        torch._dynamo.config.skip_nnmodule_hook_guards = False
