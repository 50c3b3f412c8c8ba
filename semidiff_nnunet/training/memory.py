"""Refuse a run whose training step cannot fit in memory, before its first step.

A step that needs more memory than the device has ends badly: on CUDA with an out-of-memory error
in the middle of an epoch, on the CPU with the kernel's OOM killer, which kills the process with
SIGKILL and leaves the console silent (SuperDiffusion in 3D at nnU-Net's default plans died that
way at 22 GB in its first co-training epoch). :func:`check_step_memory` runs at the end of the
trainer's ``on_train_start`` and turns that into one sentence before any training step.

What it measures: one training iteration, the trainer's own ``train_step`` (every declared
optimisation step of the iteration: forwards, backwards, optimiser steps, EMA updates), on a real
batch of **one** labeled and one unlabeled patch drawn from the run's loaders, once per phase that
is still to run (a method's phases differ in cost: SuperDiffusion's co-training runs 2 + 2R network
passes where its pre-training runs two). Each phase is measured at its last iteration, where its
supervised burn-in is over and every scheduled step has started.

Extrapolation: the step's growth is split into a fixed part, the gradients and optimiser state the
step creates (their bytes are counted), and a per-patch part, the rest (activations and
temporaries), which scales linearly with the patches of the iteration: planned = fixed +
per-patch × (B_l + B_u) / (1 + 1), with B_l and B_u this rank's planned labeled and unlabeled
batch sizes (B_u = 0 in a step that draws no unlabeled batch). A step at one patch each keeps the
measurement itself well below the run's own peak.

How memory is read:

* CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) over the step, against
  ``torch.cuda.mem_get_info``'s free bytes plus what the allocator holds in reserve;
* CPU: torch keeps no allocator statistics there, so the step's growth is the process's resident
  set: Linux's high-water mark ``VmHWM`` is reset to the current ``VmRSS`` just before the step
  (``/proc/self/clear_refs``, "5"), after ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed
  memory back to the system (so that little freed heap is silently reused); the peak is ``VmHWM``
  after the step. ``ru_maxrss`` cannot be reset and would miss a step that stays below an earlier
  peak (preprocessing, loader start-up). Where ``clear_refs`` is not writable a thread samples
  ``VmRSS`` every millisecond instead (it can miss a short spike). The estimate is the process's own
  need; augmentation worker processes, validation and checkpoint writing come on top, and the
  comparison leaves no margin for them: it refuses what cannot fit, not what might not. Free memory
  is ``MemAvailable`` (``/proc/meminfo``), or less where the process's cgroup (a container) limits it;
  ``--nproc N`` CPU ranks on one node share it, so N times the estimate must fit.

The run is not changed by the measurement: the batch is drawn with the loaders' batch size set to one
and every random state (Python, numpy, torch, CUDA, the loaders' ``RandomState``) restored afterwards;
the step runs on the trainer itself (under DDP every rank measures, and the step's collectives match),
and afterwards every network's weights, buffers, ``requires_grad`` flags, train/eval modes and gradients,
every optimiser, LR scheduler and grad scaler state, every registered method state and the trainer's
attributes (top-level lists, dicts and sets in place) are restored. What a method keeps elsewhere
(a tensor it mutates in place without ``register_state``) is not restored — nor would ``--continue``
restore it. ``tests/test_memory_check.py`` trains with the check on and off and compares the weights.

Skip it with ``SEMIDIFF_MEMORY_CHECK=0`` (then the run starts as it did before the check existed).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import checkpoint as ckpt

#: set to 0 / false / no / off to skip the check
MEMORY_CHECK_ENV = "SEMIDIFF_MEMORY_CHECK"
_GB = 1024**3


def check_enabled() -> bool:
    return os.environ.get(MEMORY_CHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class StepMemory:
    """One phase's measured step and its extrapolation (bytes)."""

    phase: str
    growth: int  # what the measured step (one patch per batch it drew) added at its peak
    fixed: int  # gradients and optimiser state it created (independent of the batch)
    patches: tuple[int, int]  # (labeled, unlabeled and any other stream's) patches of the measured step
    planned_patches: tuple[int, int]  # the same per iteration of the run, at the planned batch sizes (this rank)

    @property
    def planned(self) -> int:
        """Bytes the step adds at the planned batch: the fixed part plus the per-patch part scaled."""
        return extrapolate(self.growth, self.fixed, self.patches, self.planned_patches)


def extrapolate(growth: int, fixed: int, patches: tuple[int, int], planned: tuple[int, int]) -> int:
    """``fixed`` + (``growth`` − ``fixed``) × planned patches / measured patches (see the module docstring)."""
    per_batch = max(0, growth - fixed)
    return int(fixed + per_batch * sum(planned) / max(1, sum(patches)))


def check_step_memory(trainer) -> list[StepMemory] | None:
    """Measure the training step of every phase still to run and raise :class:`SemidiffError` when the
    largest, at the planned batch, needs more memory than is free. Called by the trainer at the end of
    ``on_train_start`` (every rank under DDP). Returns the measurements (None: skipped)."""
    device = torch.device(trainer.device)
    if not check_enabled() or device.type not in ("cpu", "cuda"):
        return None
    spans = [s for s in trainer.phase_spans if s.end > s.start and s.end > trainer.current_epoch]
    if not spans or trainer.num_iterations_per_epoch < 1:
        return None
    streams = _streams(trainer)
    loaders = {name: _loader(gen) for name, gen in streams}
    if "train" not in loaders or any(ld is None for ld in loaders.values()):
        trainer.print_to_log_file("memory check skipped: a training loader cannot give a one-patch batch",
                                  also_print_to_console=False)
        return None
    if device.type == "cpu" and _cpu_peak_source() is None:
        return None  # no /proc (not Linux): nothing to measure with
    free = free_memory(device)
    planned = {name: int(ld.batch_size) for name, ld in loaders.items()}
    batches = _one_patch_batches(streams, loaders)
    results: list[StepMemory] = []
    oom = False
    try:
        for span in spans:
            with _restored(trainer):
                results.append(_measure(trainer, span, batches, planned))
    except torch.cuda.OutOfMemoryError:
        oom = True  # not even one patch fits
    except Exception as e:  # noqa: BLE001 — the method's step itself fails (a bug, a diverging loss):
        # that is the run's first step to report, with its folder and log, not the check's; it is undone
        trainer.print_to_log_file(f"memory check skipped: the measured step failed ({type(e).__name__}: {e})",
                                  also_print_to_console=False)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    worst = max(results, key=lambda r: r.planned) if results else None
    ranks_here = _local_ranks(trainer) if device.type == "cpu" else 1
    need = math.inf if oom else worst.planned * ranks_here
    need, free = _agree(trainer, need, free)
    if need > free:
        raise SemidiffError(_refusal(trainer, device, need, free, worst, ranks_here))
    trainer.print_to_log_file(
        "memory check: the training step at the planned batch needs about "
        + ", ".join(f"{_gb(r.planned)} ({r.phase})" for r in results)
        + f" of {_gb(free)} free on {device.type}" + (f" (x{ranks_here} ranks on this node)" if ranks_here > 1 else ""),
        also_print_to_console=False)
    return results


# ---------------------------------------------------------------------------------------------- the step
def _measure(trainer, span, batches: dict[str, dict], planned: dict[str, int]) -> StepMemory:
    """One ``train_step`` of phase ``span`` at its last iteration, on the one-patch batches; runs inside
    :func:`_restored`, which undoes everything it changes."""
    ipe = trainer.num_iterations_per_epoch
    entered = getattr(trainer, "_active_phase", None) == span.name and trainer.current_phase.name == span.name
    trainer.current_epoch = span.end - 1
    trainer.iteration = max(int(trainer.iteration), span.end * ipe - 1)
    if not entered:  # a resumed run is already inside its phase, with its optimisers' states
        trainer.on_phase_start(span)
    network = trainer.network
    if hasattr(network, "_orig_mod"):  # nnU-Net's torch.compile: measure eagerly, compile at the real shapes
        trainer.network = network._orig_mod
    feeds = {name: _Feed(batch) for name, batch in batches.items() if name != "train"}
    for name, feed in feeds.items():  # the unlabeled stream and any a method registered (next_batch)
        setattr(trainer, f"dataloader_{name}", feed)
    params = _parameters(trainer)
    had_grad = {id(p) for p in params if p.grad is not None}
    state_before = _optimiser_state_bytes(trainer)
    with _peak(torch.device(trainer.device)) as peak:
        trainer.train_step(batches["train"])
    new_grads = sum(_nbytes(p.grad) for p in params if p.grad is not None and id(p) not in had_grad)
    fixed = new_grads + max(0, _optimiser_state_bytes(trainer) - state_before)
    others = sum(f.drawn for f in feeds.values())
    planned_others = sum(planned[name] * f.drawn for name, f in feeds.items())
    return StepMemory(span.name, peak.growth, fixed, (1, others), (planned["train"], planned_others))


class _Feed:
    """Stands in for a loader during the measured step: its one-patch batch, every time, counted."""

    def __init__(self, batch: dict):
        self.batch, self.drawn = batch, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.drawn += 1
        return dict(self.batch)


def _streams(trainer) -> list[tuple[str, object]]:
    """``(name, iterator)`` of every loader training draws from: the labeled ``train``, the ``unlabeled`` one
    and a method's own (``register_loader``); validation aside."""
    if hasattr(trainer, "registered_loaders"):
        pairs = trainer.registered_loaders()
    else:
        pairs = [("train", trainer.dataloader_train), ("unlabeled", getattr(trainer, "dataloader_unlabeled", None))]
    return [(name, gen) for name, gen in pairs if name != "val" and gen is not None]


def _loader(gen):
    """The batch-making loader inside an augmenter (``SingleThreadedAugmenter``, ``EpochSeededAugmenter``,
    ``WorkerLoader``), or None."""
    loader = getattr(gen, "data_loader", gen)
    loader = getattr(loader, "loader", loader)
    return loader if hasattr(loader, "generate_train_batch") and hasattr(loader, "batch_size") else None


def _one_patch_batches(streams: list[tuple[str, object]], loaders: dict) -> dict[str, dict]:
    """A batch of one patch from every loader, made as the loader makes its batches (the same crops and
    transforms), without moving any random stream of the run."""
    rng = ckpt.rng_state()
    rs = [(ld, ld.rs.get_state()) for ld in loaders.values() if hasattr(getattr(ld, "rs", None), "get_state")]
    try:
        batches = {}
        for name, gen in streams:
            ld = loaders[name]
            size, ld.batch_size = ld.batch_size, 1
            try:
                batch = ld.generate_train_batch()
            finally:
                ld.batch_size = size
            transform = getattr(gen, "transform", None)  # a SingleThreadedAugmenter's own transform, if any
            batches[name] = transform(**batch) if transform is not None else batch
        return batches
    finally:
        ckpt.set_rng_state(rng)
        for ld, state in rs:
            ld.rs.set_state(state)


# ---------------------------------------------------------------------------------------------- restoring
def _modules(trainer) -> list[nn.Module]:
    """Every network the trainer holds: its attributes, registered networks and method states' modules."""
    found: dict[int, nn.Module] = {}
    candidates = [trainer.network, *trainer.extra_networks.values(), *trainer.__dict__.values()]
    for state in trainer.method_states.values():
        candidates.append(state)
        candidates.extend(getattr(state, "__dict__", {}).values())
    for c in candidates:
        if isinstance(c, nn.Module):
            found.setdefault(id(c), c)
    return list(found.values())


def _parameters(trainer) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for m in _modules(trainer):
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _stateful(trainer) -> list:
    """Every object of the trainer that has ``state_dict``/``load_state_dict`` (networks, optimisers, LR
    schedulers, the grad scaler, method states)."""
    found: dict[int, object] = {}
    candidates = [*_modules(trainer), trainer.optimizer, getattr(trainer, "lr_scheduler", None),
                  getattr(trainer, "grad_scaler", None), *trainer.method_states.values(),
                  *(o for pair in trainer.extra_optimizers.values() for o in pair), *trainer.__dict__.values()]
    for c in candidates:
        if c is None or isinstance(c, type):
            continue
        if callable(getattr(c, "state_dict", None)) and callable(getattr(c, "load_state_dict", None)):
            found.setdefault(id(c), c)
    return list(found.values())


class _Offloaded:
    """A tensor of a snapshot, kept on the CPU, and the device it goes back to."""

    def __init__(self, t: torch.Tensor):
        self.cpu, self.device = t.detach().to("cpu", copy=True), t.device

    def back(self) -> torch.Tensor:
        return self.cpu.to(self.device)


def _offload(x):
    """A copy of a state dict whose tensors wait on the CPU (device memory stays as the step found it)."""
    if isinstance(x, torch.Tensor):
        return _Offloaded(x)
    if type(x) in (dict, OrderedDict):
        return type(x)((k, _offload(v)) for k, v in x.items())
    if type(x) in (list, tuple):
        return type(x)(_offload(v) for v in x)
    return copy.deepcopy(x)


def _onload(x):
    if isinstance(x, _Offloaded):
        return x.back()
    if type(x) in (dict, OrderedDict):
        return type(x)((k, _onload(v)) for k, v in x.items())
    if type(x) in (list, tuple):
        return type(x)(_onload(v) for v in x)
    return x


@contextlib.contextmanager
def _restored(trainer):
    """Undo on exit what a training step (and a phase start) changed: see the module docstring."""
    attrs = dict(trainer.__dict__)
    containers = {k: (v, v.copy()) for k, v in attrs.items() if type(v) in (dict, list, set)}
    states = [(obj, _offload(obj.state_dict())) for obj in _stateful(trainer)]
    modes = [(m, m.training) for root in _modules(trainer) for m in root.modules()]
    params = [(p, p.requires_grad, None if p.grad is None else _Offloaded(p.grad)) for p in _parameters(trainer)]
    rng = ckpt.rng_state()
    try:
        yield
    finally:
        trainer.__dict__.clear()
        trainer.__dict__.update(attrs)
        for original, copy_ in containers.values():
            original.clear()
            (original.update if not isinstance(original, list) else original.extend)(copy_)
        for obj, state in states:
            obj.load_state_dict(_onload(state))
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = None if grad is None else grad.back()
        ckpt.set_rng_state(rng)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _optimiser_state_bytes(trainer) -> int:
    optimisers = [trainer.optimizer, *(opt for opt, _ in trainer.extra_optimizers.values())]
    seen: set[int] = set()
    total = 0
    for opt in optimisers:
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        for state in opt.state.values():
            total += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


# ---------------------------------------------------------------------------------------------- reading memory
class _Peak:
    growth = 0


@contextlib.contextmanager
def _peak(device: torch.device):
    """``.growth``: the bytes the block added at its peak over what was in use when it started."""
    peak = _Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.growth = max(0, torch.cuda.max_memory_allocated(device) - base)
        return
    gc.collect()
    _malloc_trim()
    if _cpu_peak_source() == "hwm":
        _reset_hwm()
        base = _status_kb("VmRSS")
        yield peak
        peak.growth = max(0, _status_kb("VmHWM") - base) * 1024
        return
    base = _status_kb("VmRSS")  # no resettable high-water mark: sample the resident set
    highest, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            highest[0] = max(highest[0], _status_kb("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
    peak.growth = max(0, max(highest[0], _status_kb("VmRSS")) - base) * 1024


# ----------------------------------------------------------------------------------------- per epoch
#: the logger key of each epoch's peak memory in bytes (its training iterations; validation excluded)
PEAK_MEMORY_KEY = "peak_memory"


def reset_epoch_peak(device: torch.device) -> None:
    """Start measuring an epoch's peak: the CUDA allocator's peak statistics, on the CPU Linux's ``VmHWM``
    (reset to the current resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu" and _cpu_peak_source() == "hwm":
        _reset_hwm()


def epoch_peak(device: torch.device) -> float:
    """Bytes in use at the peak since :func:`reset_epoch_peak`: on CUDA the allocator's most allocated
    (tensors only), on the CPU the process's highest resident set (everything it holds: libraries, model,
    data, activations; worker processes not included). NaN where it cannot be read (no resettable
    ``VmHWM``, another device)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu" and _cpu_peak_source() == "hwm":
        return float(_status_kb("VmHWM") * 1024)
    return float("nan")


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


_PEAK_SOURCE: list[str | None] = []


def _cpu_peak_source() -> str | None:
    """"hwm" (a resettable VmHWM), "sample" (VmRSS only) or None (no /proc)."""
    if not _PEAK_SOURCE:
        try:
            _status_kb("VmRSS")
            _PEAK_SOURCE.append("hwm" if _reset_hwm() else "sample")
        except (OSError, KeyError, ValueError):
            _PEAK_SOURCE.append(None)
    return _PEAK_SOURCE[0]


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: CUDA, the free device memory plus the caching
    allocator's unused reserve; CPU, ``MemAvailable``, or less where the cgroup's limit says so."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = _meminfo_kb("MemAvailable") * 1024
    headroom = _cgroup_headroom()
    return int(min(available, headroom) if headroom is not None else available)


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom() -> int | None:
    """Limit minus use (less its inactive page cache, which the kernel reclaims first) of this process's
    memory cgroup (v2, else v1), None where no limit is set."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    best = None
    for _, controllers, path in (x for x in lines if len(x) == 3):
        if controllers == "":  # v2
            dirs = [os.path.join("/sys/fs/cgroup", path.lstrip("/")), "/sys/fs/cgroup"]
            files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            dirs = [os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")), "/sys/fs/cgroup/memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
        else:
            continue
        for d in dict.fromkeys(dirs):
            limit, usage = _read_int(os.path.join(d, files[0])), _read_int(os.path.join(d, files[1]))
            if limit is None or usage is None or limit >= 1 << 60:  # v1 "unlimited" is a huge number
                continue
            room = limit - max(0, usage - _stat_field(os.path.join(d, files[2]), files[3]))
            best = room if best is None else min(best, room)
    return best


# ---------------------------------------------------------------------------------------------- ranks
def _local_ranks(trainer) -> int:
    """CPU ranks sharing this node's memory: torchrun's ``LOCAL_WORLD_SIZE`` (the launcher of ``--nproc``
    sets it too), else the world size."""
    if not getattr(trainer, "is_ddp", False):
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or trainer.world_size))
    except ValueError:
        return 1


def _agree(trainer, need: float, free: int) -> tuple[float, int]:
    """Under DDP: the largest need and the smallest free memory of all ranks, so that all ranks refuse or
    none does (a rank that refused alone would leave the others waiting in a collective)."""
    if not getattr(trainer, "is_ddp", False) or not torch.distributed.is_initialized():
        return need, free
    both = torch.tensor([need if math.isfinite(need) else float(2**62), -float(free)], dtype=torch.float64,
                        device=trainer.device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return float(both[0]), int(-both[1])


# ---------------------------------------------------------------------------------------------- the sentence
def _gb(n: float) -> str:
    return "more than the device has" if not math.isfinite(n) or n >= 2**62 else f"{n / _GB:.1f} GB"


def _refusal(trainer, device: torch.device, need: float, free: int, worst: StepMemory | None, ranks: int) -> str:
    hp = getattr(trainer, "hp", None)
    fields = getattr(type(hp), "__dataclass_fields__", {})
    patch = "x".join(str(int(s)) for s in trainer.configuration_manager.patch_size)
    if worst is None:
        what = "a training step of one patch ran out of memory"
    else:
        batch = f"{worst.planned_patches[0]} labeled" + (f" + {worst.planned_patches[1]} unlabeled"
                                                         if worst.planned_patches[1] else "")
        what = (f"the {worst.phase!r} training step needs about {_gb(need)} at the planned batch ({batch} "
                f"patches of {patch}{f' in each of {ranks} ranks' if ranks > 1 else ''})")
    fixes = ["a smaller batch_size or patch_size in the plans", "a smaller configuration (-c)"]
    if "checkpointing" in fields and getattr(hp, "checkpointing", "all") != "all":
        fixes.insert(0, "--set checkpointing=all")
    if "rounds" in fields and getattr(hp, "rounds", 0) > 1:
        fixes.append("fewer rounds (--set rounds=...)")
    if getattr(trainer, "uses_unlabeled", False) and worst is not None and worst.planned_patches[1] > 1:
        fixes.append("--set unlabeled_batch_size=1")
    fixes.append("a device with more memory" + (" (or more GPUs with --nproc)" if device.type == "cuda" else ""))
    return (f"This run would not fit in memory: {what}, but {_gb(free)} of {device.type.upper()} memory is "
            f"free; make it fit with {', '.join(fixes[:-1])} or {fixes[-1]}, or set {MEMORY_CHECK_ENV}=0 to "
            f"train anyway.")
