"""Checkpoints and random-number state, built on nnU-Net's own checkpoint dict.

``save`` lets nnU-Net's ``save_checkpoint`` assemble its dict (network, optimizer, grad scaler,
logger, epoch, init args, mirroring axes and whatever a future nnU-Net adds) and adds one key,
``"semidiff"``: every network, extra optimizer, method state, the iteration counter and the RNG
state. ``network_weights`` holds the inference network, so stock ``nnUNetv2_predict`` loads the run.
``load`` hands nnU-Net's part back to nnU-Net's ``load_checkpoint`` and restores the rest.
Every checkpoint is read with :func:`safe_load` (``torch.load(weights_only=True)`` and an allowlist of plain
data types): a file that needs anything else is refused before any of its code runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from semidiff_nnunet.training.ema import unwrap
from semidiff_nnunet.training.nnunet_compat import nnunet_checkpoint, nnunet_load

SEMIDIFF_KEY = "semidiff"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- safe loading
def _numpy_safe_globals() -> list:
    """The numpy callables and types our checkpoints (and stock nnU-Net's) hold, under both module spellings
    (``numpy._core`` of numpy 2, ``numpy.core`` of numpy 1) so a checkpoint written with either loads:

    * ``multiarray._reconstruct`` and ``ndarray``: numpy arrays (the numpy RNG state, the loaders' RNG);
    * ``multiarray.scalar``: numpy scalars (nnU-Net's logger values and ``_best_ema``, ``np.str_`` case ids);
    * ``dtype`` and the dtype classes of booleans, integers, floats and strings: the dtypes those arrays and
      scalars carry (unpickling an array or scalar sets a dtype's state, which torch allows only for
      allowlisted classes). Object, void (structured) and datetime dtypes are left out: none of ours holds
      them, and an object array is how arbitrary Python objects would ride along.
    """
    reconstruct, scalar = np.ndarray.__reduce__(np.empty(0))[0], np.float32(0).__reduce__()[0]
    entries: list = [np.ndarray, np.dtype]
    for fn in (reconstruct, scalar):
        entries += [(fn, f"numpy._core.multiarray.{fn.__name__}"), (fn, f"numpy.core.multiarray.{fn.__name__}")]
    kinds = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.str_]
    entries += sorted({type(np.dtype(k)) for k in kinds}, key=lambda t: t.__name__)
    return entries


SAFE_GLOBALS = _numpy_safe_globals()  # beyond torch's own: tensors, torch.device/dtype/Size, OrderedDict, set


def _unsupported(path, error: Exception) -> str | None:
    """What the file needs beyond the allowlist, read without running it (the pickle's globals), else from
    torch's refusal; None where torch refused something else (a file that is no checkpoint at all)."""
    with contextlib.suppress(Exception), torch.serialization.safe_globals(SAFE_GLOBALS):
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if names:
            names = sorted(set(names))
            return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    text = str(error)
    match = (re.search(r"GLOBAL (\S+) (?:was not|whose module)", text)
             or re.search(r"but got <class '([^']+)'>", text) or re.search(r"but got (\S+)", text))
    return match.group(1) if match else None


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed: tensors, numbers, strings,
    containers and numpy arrays/scalars load; anything else (a class, a function such as ``os.system``) is
    refused with a :class:`~semidiff_nnunet.errors.SemidiffError` naming the file and what it needs, and
    nothing from the file runs. A file that is no checkpoint raises what ``torch.load`` raises (also an
    ``UnpicklingError``: an opcode the safe unpickler does not run). Every checkpoint semidiff reads goes
    through here."""
    from semidiff_nnunet.errors import SemidiffError

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        needs = _unsupported(path, e)
        if needs is None:
            raise
        raise SemidiffError(f"Refused to load {Path(path)}: it needs {needs}, and semidiff loads only "
                            f"tensors, numbers, strings and plain numpy arrays from a checkpoint (anything else could "
                            f"run code from the file); use a checkpoint written by nnU-Net or semidiff.") from None


def save_atomic(checkpoint: dict, filename: str, keep_previous: str | None = None) -> None:
    """Write ``checkpoint`` to ``filename`` through a temporary file, flushed to disk before it replaces the
    old one: never a half-written checkpoint, also after a power cut. ``keep_previous``: first keep the
    file ``filename`` holds now under this name (a hard link replaced atomically, so ``filename`` never goes
    missing; where the file system has no hard links, a rename)."""
    tmp = filename + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and os.path.isfile(filename):
        link = keep_previous + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        try:
            os.link(filename, link)
            os.replace(link, keep_previous)
        except OSError:
            os.replace(filename, keep_previous)
    os.replace(tmp, filename)
    _fsync_dir(os.path.dirname(os.path.abspath(filename)))


def _fsync_dir(folder: str) -> None:
    """Make the renames in ``folder`` durable (where the platform lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: the files ``--continue`` may resume from, in this order: each a complete training state of the run at the
#: end of an epoch (network, optimisers, method states, RNG), so training goes on exactly as if uninterrupted.
#: ``checkpoint_previous.pth`` is the ``checkpoint_latest.pth`` before the last one. ``checkpoint_final.pth``
#: is no resume point (written after training ended; a run that has one is finished).
LATEST, PREVIOUS, BEST = "checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_best.pth"
RESUME_POINTS = (LATEST, PREVIOUS, BEST)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 90 else text[:87] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def resume_checkpoint(folder: str | os.PathLike, log=None) -> Path | None:
    """The checkpoint of the run in ``folder`` that ``--continue`` resumes from: ``checkpoint_latest.pth``
    where it loads (:func:`safe_load`) and holds a semidiff training state; else, of ``checkpoint_previous.pth``
    and ``checkpoint_best.pth``, the usable one with more epochs done, telling ``log`` in one line which file
    was damaged and which one the run resumes from instead. None where the folder holds none of them; a
    :class:`~semidiff_nnunet.errors.SemidiffError` naming the files where none of them is usable, and
    :func:`safe_load`'s refusal of a file that needs code to load (a crafted file is no damage to step around)."""
    from semidiff_nnunet.errors import SemidiffError

    folder = Path(folder)
    present = [folder / n for n in RESUME_POINTS if (folder / n).is_file()]
    if not present:
        return None
    bad, good = [], []  # (file, reason) / (epochs done, file)
    for path in present:
        if good and good[0][1].name == LATEST:
            break  # the latest loads: the others are not read
        try:
            ck = safe_load(path)
            if not isinstance(ck, dict) or SEMIDIFF_KEY not in ck or "current_epoch" not in ck:
                raise ValueError("no semidiff training state in it")
            good.append((int(ck["current_epoch"]), path))
            del ck
        except SemidiffError:
            raise  # refused (it needs code to load): a crafted file is reported, not stepped around
        except Exception as e:  # noqa: BLE001 (truncated, corrupted, no training state: not a resume point)
            bad.append((path, _reason(e)))
    if not good:
        names = ", ".join(f"{p.name} ({why})" for p, why in bad)
        raise SemidiffError(f"No checkpoint of the run in {folder} can be resumed: {names}; delete that folder to "
                            f"train the run again from the start, or put back an intact checkpoint_latest.pth.")
    epochs, chosen = max(good, key=lambda g: (g[0], -RESUME_POINTS.index(g[1].name)))
    if bad and log is not None:
        damaged = "; ".join(f"{p.name} is damaged ({why})" for p, why in bad)
        log(f"{damaged}; resuming from {chosen.name} ({epochs} epochs done) instead.")
    return chosen


# ---------------------------------------------------------------------------------------------- pretrained weights
SEG_LAYERS = ".seg_layers."  # nnU-Net's segmentation heads (``decoder.seg_layers.N``)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def pretrained_state(path: str) -> dict:
    """``network_weights`` of a checkpoint file (stock nnU-Net's or a semidiff run's: both hold the network
    that predicts there)."""
    from semidiff_nnunet.errors import SemidiffError

    try:
        checkpoint = safe_load(path)
    except SemidiffError:
        raise
    except Exception as e:  # noqa: BLE001 (anything torch cannot read)
        raise SemidiffError(f"--pretrained-weights {path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                            f"give a checkpoint_final.pth of nnU-Net or of a semidiff run.") from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise SemidiffError(f"--pretrained-weights {path} holds no 'network_weights' (not an nnU-Net checkpoint); "
                            f"give a checkpoint_final.pth of nnU-Net or of a semidiff run.")
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in weights.items()}


def _widened(checkpoint_shape: tuple, network_shape: tuple) -> bool:
    """A convolution of the network that reads more input channels (dim 1) than the checkpoint's, all else equal."""
    return (len(checkpoint_shape) == len(network_shape) >= 3 and checkpoint_shape[0] == network_shape[0]
            and checkpoint_shape[2:] == network_shape[2:] and checkpoint_shape[1] < network_shape[1])


def transfer_weights(network: torch.nn.Module, pretrained: dict, key_map, source: str,
                     extra_inputs: bool = False) -> dict:
    """Initialise ``network`` from ``pretrained`` (a state dict) with nnU-Net's ``load_pretrained_weights``
    semantics: every tensor the network takes from a checkpoint must be there with the same shape, or the
    load is refused naming the keys (and shapes); extra checkpoint tensors are ignored. Deviation from
    nnU-Net: the segmentation heads (``.seg_layers.``) are copied too where their shapes match (same classes,
    e.g. ``supervised`` → a semi-supervised method) and skipped where the class count differs.

    ``key_map(key)``: the checkpoint key for the network's ``key`` (None: a tensor the method adds, left as
    built). A checkpoint holding every tensor of this very network (a run of the same method) is loaded
    key for key instead. ``extra_inputs``: the network reads the checkpoint's inputs followed by channels of
    its own (SuperDiffusion's image ⊕ noisy mask); a convolution that reads more input channels than the
    checkpoint's takes the checkpoint's weights for the leading channels and zeros for the others, so the
    network starts computing what the checkpoint computed whatever the extra channels hold. Returns
    ``{"loaded": n, "new": [...], "skipped_heads": [...], "widened": [...]}``.
    """
    from semidiff_nnunet.errors import SemidiffError

    target = network.state_dict()
    same_network = all(k in pretrained for k in target if SEG_LAYERS not in k)
    mapping = {k: k for k in target} if same_network else {k: key_map(k) for k in target}
    new = [k for k, src in mapping.items() if src is None]
    missing = [src for src in mapping.values() if src is not None and src not in pretrained and SEG_LAYERS not in src]
    if missing:
        raise SemidiffError(f"--pretrained-weights {source} does not fit this run's network: {len(missing)} of the "
                            f"tensors it needs are not in the checkpoint ({_examples(missing)}); pretrain with the "
                            f"same plans (planner, --plans) and configuration.")
    widened = [k for k, src in mapping.items() if extra_inputs and src is not None and src in pretrained
               and SEG_LAYERS not in src and _widened(_shape(pretrained[src]), _shape(target[k]))]
    wrong = [f"{src} is {_shape(pretrained[src])} there, {_shape(target[k])} here" for k, src in mapping.items()
             if src is not None and src in pretrained and SEG_LAYERS not in src and k not in widened
             and _shape(pretrained[src]) != _shape(target[k])]
    if wrong:
        raise SemidiffError(f"--pretrained-weights {source} does not fit this run's network: {len(wrong)} tensor "
                            f"shape(s) differ ({_examples(wrong, 2)}); pretrain with the same plans (planner, --plans), "
                            f"configuration and number of input channels.")
    if not any(src is not None for src in mapping.values()):
        raise SemidiffError(f"--pretrained-weights {source}: no tensor of this method's network comes from an nnU-Net "
                            f"U-Net checkpoint; start from a checkpoint of a run of the same method or without it.")
    state, loaded, skipped = dict(target), 0, []
    for k, src in mapping.items():
        if src is None:
            continue
        if SEG_LAYERS in src and (src not in pretrained or _shape(pretrained[src]) != _shape(target[k])):
            skipped.append(k)  # another class count: the heads start as built
            continue
        if k in widened:  # the checkpoint's channels first, the network's own channels start at zero
            weight = torch.zeros_like(target[k])
            weight[:, :pretrained[src].shape[1]] = pretrained[src].to(dtype=target[k].dtype)
            state[k] = weight
        else:
            state[k] = pretrained[src].to(dtype=target[k].dtype)
        loaded += 1
    network.load_state_dict(state)
    return {"loaded": loaded, "new": new, "skipped_heads": skipped, "widened": widened}


def describe_transfer(report: dict, source: str, new_owner: str) -> str:
    """One log line for a :func:`transfer_weights` report: what came from ``source``, what stayed as built."""
    parts = [f"pretrained weights from {source}: {report['loaded']} tensors loaded"]
    if report["skipped_heads"]:
        parts.append(f"segmentation heads kept as built (another class count): {', '.join(report['skipped_heads'])}")
    if report["new"]:
        parts.append(f"{len(report['new'])} tensors of {new_owner} left as built")
    if report["widened"]:
        parts.append(f"input channels beyond the checkpoint's start at zero in {', '.join(report['widened'])}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- the trainer's part
class CheckpointMixin:
    """The trainer's ``save_checkpoint``/``load_checkpoint`` (see the module docstring) and
    ``--pretrained-weights``. Checkpointed: the main network and nnU-Net's state, every network, optimiser
    and state a method registered (``register_network``/``register_state``), the iteration, the phase and
    the random state (the loaders' included: see :mod:`~.loaders`), so ``--continue`` goes on exactly."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = nnunet_checkpoint(self)
        checkpoint["network_weights"] = unwrap(self.inference_network()).state_dict()
        checkpoint[SEMIDIFF_KEY] = {
            "method": self.method_name,
            "run": self.run_config.to_json(),
            "iteration": self.iteration,
            "phase": self.current_phase.name,
            "networks": {"network": unwrap(self.network).state_dict(),
                         **{n: unwrap(m).state_dict() for n, m in self.extra_networks.items()}},
            "optimizers": {n: opt.state_dict() for n, (opt, _) in self.extra_optimizers.items()},
            "states": {n: s.state_dict() for n, s in self.method_states.items()},
            "rng": self._rng_snapshot(),
        }
        latest = os.path.basename(filename) == LATEST
        # the checkpoint_latest.pth being replaced stays as checkpoint_previous.pth (the resume point when the
        # new one turns out damaged), unless it is the damaged one this run resumed around
        keep = os.path.join(os.path.dirname(filename), PREVIOUS) if latest and self._latest_intact else None
        save_atomic(checkpoint, filename, keep_previous=keep)
        if latest:
            self._latest_intact = True

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Resume: the phase of the checkpoint's epoch is entered first (its ``on_phase_start`` rebuilds the
        optimisers it restarts); a checkpoint written at the last epoch of the previous phase holds that
        phase's optimiser states, so an optimiser the new phase restarted stays fresh, as in an
        uninterrupted run. The random state is restored when training starts (``on_train_start``)."""
        from semidiff_nnunet.errors import SemidiffError
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            self._latest_intact = os.path.basename(checkpoint) == LATEST
            self.print_to_log_file(f"resuming from {checkpoint}", also_print_to_console=False)
            checkpoint = safe_load(checkpoint, map_location=self.device)
        semi = checkpoint.get(SEMIDIFF_KEY)
        if semi is None:
            raise SemidiffError("This checkpoint was not written by a semidiff trainer and cannot be resumed here.")
        # the phase first: an optimiser it rebuilds must exist before its saved state is loaded
        self.current_epoch = int(checkpoint["current_epoch"])
        self._enter_phase_of_current_epoch()
        fresh = self._restarted if semi.get("phase") not in (None, self.current_phase.name) else set()
        if "network" in fresh:
            checkpoint = {**checkpoint, "optimizer_state": self.optimizer.state_dict()}
        # nnU-Net restores its part (main network, optimizer, grad scaler, logger, epoch, ...)
        nnunet_load(self, {**checkpoint, "network_weights": semi["networks"]["network"]})
        for name, module in self.extra_networks.items():
            unwrap(module).load_state_dict(semi["networks"][name])
        for name, (opt, _) in self.extra_optimizers.items():
            if name not in fresh:
                opt.load_state_dict(semi["optimizers"][name])
        for name, state in self.method_states.items():
            state.load_state_dict(semi["states"][name])
        self.iteration = int(semi.get("iteration", 0))
        self._pending_rng = semi.get("rng")

    @property
    def starts_from_pretrained(self) -> bool:
        """True for a new run with ``--pretrained-weights`` (its networks are initialised from them); False
        without them and when the run continues (its own checkpoint holds the networks)."""
        return bool(self.run_config.pretrained_weights) and not self.plans_manager.plans.get("continue_training")

    def initialise_from_pretrained(self, module: torch.nn.Module, key_map, extra_inputs: bool = False) -> bool:
        """Initialise another network of the method (one it builds in ``build_method``, e.g. a second branch)
        from the run's ``--pretrained-weights``, as ``self.network`` was (:func:`transfer_weights`:
        ``key_map(key)`` gives the checkpoint key of ``module``'s tensor ``key``, None for a tensor left as
        built; ``extra_inputs`` for a network that reads the image followed by channels of its own). Does
        nothing and returns False without ``--pretrained-weights`` or when the run continues (its own
        checkpoint holds the network)."""
        if not self.starts_from_pretrained:
            return False
        path = self.run_config.pretrained_weights
        report = transfer_weights(unwrap(module), pretrained_state(path), key_map, path, extra_inputs=extra_inputs)
        self.print_to_log_file(describe_transfer(report, f"{path} for {type(unwrap(module)).__name__}", "its own"),
                               also_print_to_console=False)
        return True

    def load_pretrained_weights(self, path: str) -> None:
        """Initialise ``self.network`` from the checkpoint at ``path`` (see :func:`transfer_weights`, with the
        method's ``pretrained_key``); called in ``initialize`` before ``build_method``, so EMA teachers copied
        from the network there start from these weights."""
        report = transfer_weights(unwrap(self.network), pretrained_state(path), self.pretrained_key, path,
                                  extra_inputs=self.pretrained_extra_inputs)
        self.print_to_log_file(describe_transfer(report, path, f"{self.method_name}'s own"),
                               also_print_to_console=False)
