"""SemiSupervisedTrainer: nnU-Net's trainer plus an unlabeled stream, several networks and declared steps.

The engine owns the loop, loaders, AMP, clipping, logging, phases and checkpoints. A method
subclasses it and declares what is new in its paper (see ``plugins/mean_teacher/trainer.py``):

* ``hparams_class`` — a dataclass of hyperparameters with the paper's defaults;
* ``build_method()`` — EMA copies, extra networks (``register_network``), state (``register_state``);
* ``compute_losses(labeled, unlabeled) -> dict[str, Tensor]`` — the loss terms of one step; their
  sum is minimised (keys starting with ``_`` are logged, not summed);
* optionally ``phases`` (ordered stages of the run, :class:`~.declarations.Phase`) with
  ``on_phase_start(phase)``; ``optimisation_steps()`` for more than one optimiser step per
  iteration (:class:`~.declarations.OptimStep`); ``after_step()`` (EMA updates; ``self.iteration``
  is the step that just ran); ``inference_network()``; ``get_strong_transforms()``; the static
  ``build_network_architecture`` (whatever it returns is the whole inference model; it reads the
  run's hyperparameters with :func:`~.run_config.run_hparams`).

Helpers for methods: ``joint_forward`` (one forward over labeled ⊕ unlabeled, split back),
``supervised_loss`` (nnU-Net's Dice+CE with deep supervision, CE/Dice weights per call),
``highest_resolution``, ``ramp``, ``restart_optimizer``.

The run configuration (:class:`~.run_config.RunConfig`) arrives in the plans because nnU-Net fixes
the constructor's five arguments; it is written back into the run folder's ``plans.json`` and
``semidiff_run.json``. Progress goes to ``self.progress`` (a callback the caller supplies); the
trainer never draws on a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import checkpoint as ckpt
from semidiff_nnunet.training import ramps
from semidiff_nnunet.training.augmenters import EpochSeededAugmenter, WorkerLoader
from semidiff_nnunet.training.curves import SemiLocalLogger
from semidiff_nnunet.training.declarations import OptimStep, Phase, PhaseBest, PhaseSpan, resolve_phases
from semidiff_nnunet.training.ema import unwrap
from semidiff_nnunet.training.hparams import BaseHParams, hparams_to_dict
from semidiff_nnunet.training.progress import TrainingProgress
from semidiff_nnunet.training.run_config import RunConfig
from semidiff_nnunet.training.splits import SemiSplit, drop_held_out, make_semi_split
from semidiff_nnunet.training.unlabeled import (
    UnlabeledDataLoader,
    UnlabeledDataset,
    list_cases,
    split_transforms,
    unlabeled_preprocessed_folder,
)

PSEUDO_SUFFIX = "__pseudo"
#: the validation loader's worker-seed stream (plus the rank), apart from the training streams 2·rank and
#: 2·rank + 1
VALIDATION_STREAM = 1_000_003


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
def _drop_printed(text: str):
    import sys

    old = sys.stdout
    sys.stdout = _DropLines(old, text)
    try:
        yield
    finally:
        sys.stdout = old


class PhasePolyLR:
    """nnU-Net's poly learning rate over the epochs ``[start, end)`` of one phase:
    lr = lr₀ · (1 − (epoch − start)/(end − start))^0.9 (nnU-Net's ``PolyLRScheduler`` when the phase
    is the whole run)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, start: int, end: int,
                 exponent: float = 0.9):
        self.optimizer, self.initial_lr, self.start, self.end, self.exponent = optimizer, initial_lr, start, end, exponent

    def step(self, epoch: int) -> None:
        progress = min(max(epoch - self.start, 0) / max(self.end - self.start, 1), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * (1 - progress) ** self.exponent


class SemiSupervisedTrainer(nnUNetTrainer):
    #: registered method name (informational; the registry maps names to classes)
    method_name: ClassVar[str] = "semi"
    #: dataclass of hyperparameters; subclasses extend BaseHParams
    hparams_class: ClassVar[type] = BaseHParams
    #: False for methods that never look at unlabeled data (``supervised``): no loader is built
    uses_unlabeled: ClassVar[bool] = True
    #: independent strong views of each unlabeled patch when ``get_strong_transforms`` gives transforms
    strong_views: ClassVar[int] = 1
    #: ordered stages of a run (empty: one phase, the whole run)
    phases: ClassVar[tuple[Phase, ...]] = ()
    #: validation decides something that training goes on from (a method's choice between its networks);
    #: then, as for a phase with ``select_best``, the validation batches are seeded per epoch like the
    #: training ones (with augmentation workers nnU-Net hands them out in whatever order its workers finish)
    steers_by_validation: ClassVar[bool] = False
    #: stop with a clear error after this many consecutive steps whose loss is NaN or infinite (a
    #: diverged run; a single overflowing AMP step does not count as divergence)
    max_nonfinite_steps: ClassVar[int] = 20

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        cfg = RunConfig.read(plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            # nnU-Net assumes one GPU per rank, indexed by the global rank; here CPU ranks (gloo) work too,
            # and on CUDA the node-local rank picks the GPU (multi-node torchrun)
            if torch.device(device).type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.local_rank)))
            else:
                self.device = torch.device(device)
                self.grad_scaler = None
        self.run_config = cfg
        self.seed = cfg.seed
        self.labeled_spec = cfg.labeled
        self.hp = cfg.resolve(self.hparams_class)
        if cfg.num_epochs:
            self.num_epochs = cfg.num_epochs
        if cfg.num_iterations_per_epoch:
            self.num_iterations_per_epoch = cfg.num_iterations_per_epoch
        if cfg.num_val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = cfg.num_val_iterations_per_epoch
        if cfg.save_every:
            self.save_every = cfg.save_every
        self.progress: TrainingProgress | None = None

        self.extra_networks: dict[str, nn.Module] = {}
        self.extra_optimizers: dict[str, tuple[torch.optim.Optimizer, Any]] = {}
        self.method_states: dict[str, Any] = {}
        self.iteration = 0
        self.phase_spans: list[PhaseSpan] = resolve_phases(
            self.phases, cfg.phases, self.num_epochs,
            skip_warmup=bool(cfg.pretrained_weights) and not self.hp.warmup_from_pretrained)
        self._active_phase: str | None = None
        self._restarted: set[str] = set()  # optimisers rebuilt by the current phase's on_phase_start
        self._nonfinite_steps = 0
        self.semi_split: SemiSplit | None = None
        self.dataloader_unlabeled = None
        self._pending_rng: dict | None = None
        self._latest_intact = False  # the run folder's checkpoint_latest.pth is known to load (written/resumed)

        for span in self.phase_spans:  # Phase.select_best: the phase's best weights, checkpointed
            if span.phase.select_best:
                self.register_state(f"phase_best/{span.name}", PhaseBest())

        # per-term loss curves live in nnU-Net's logger (so they are checkpointed with it)
        self.logger.local_logger = SemiLocalLogger()
        seed_everything(self.seed)  # network initialisation is reproducible

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        # with a progress display, nnU-Net's chatter goes to the log file only
        quiet = getattr(self, "progress", None) is not None
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and not quiet,
                                  add_timestamp=add_timestamp)

    # ------------------------------------------------------------------ method hooks
    @classmethod
    def check_options(cls, hp: Any, configuration: str | None, dim: int | None) -> None:
        """Refuse options this method cannot use, before any planning or run folder (``semidiff`` calls it
        when the options are checked, and again with the planned configuration): raise
        :class:`~semidiff_nnunet.errors.SemidiffError` with one sentence naming the fix. It may normalise
        ``hp`` in place (a relative path made absolute), so that a resumed run compares like with like.

        ``configuration`` is the nnU-Net configuration name (None when not known yet); ``dim`` its number
        of spatial dimensions (2 or 3; None when it cannot be known before planning: a custom name)."""

    def pretrained_key(self, key: str) -> str | None:
        """``--pretrained-weights``: the key of a stock nnU-Net checkpoint (the planned U-Net, plain or
        residual) that initialises tensor ``key`` of ``self.network``; None for a tensor this method adds
        (left as built). The default: the same key (``self.network`` is the planned U-Net). A method whose
        network wraps or changes the planned one maps its keys here; a checkpoint of a run of the same
        method is always loaded key for key."""
        return key

    def load_pretrained_weights(self, path: str) -> None:
        """Initialise ``self.network`` from the checkpoint at ``path`` (see
        :func:`~semidiff_nnunet.training.checkpoint.transfer_weights`); called in ``initialize`` before
        :meth:`build_method`, so EMA teachers copied from the network there start from these weights."""
        report = ckpt.transfer_weights(unwrap(self.network), ckpt.pretrained_state(path), self.pretrained_key, path)
        self.print_to_log_file(
            f"pretrained weights from {path}: {report['loaded']} tensors loaded"
            + (f"; segmentation heads kept as built (another class count): {', '.join(report['skipped_heads'])}"
               if report["skipped_heads"] else "")
            + (f"; {len(report['new'])} tensors of {self.method_name}'s own left as built" if report["new"] else ""),
            also_print_to_console=False)

    def build_method(self) -> None:
        """Create EMA copies, extra networks and method state. Called once after the main network."""

    def compute_losses(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """Return named loss terms of one step; their sum (keys without a leading ``_``) is minimised.

        ``labeled``: nnU-Net's batch on the device, ``data`` (B, C, *spatial) and ``target`` (a list
        of (B, 1, *spatial) maps per deep-supervision scale when deep supervision is on).
        ``unlabeled``: ``data`` (B_u, C, *spatial), optionally ``data_strong``; never a label.
        """
        raise NotImplementedError

    def supervised_losses(self, labeled: dict) -> dict[str, torch.Tensor]:
        """The losses of a burn-in iteration (labeled data only; no unlabeled batch is drawn). Default:
        nnU-Net's Dice+CE of ``self.network``; methods with more networks that learn from labels
        (CPS, Diff-CL) add theirs."""
        return {"supervised": self.supervised_loss(self.network(labeled["data"]), labeled["target"])}

    def optimisation_steps(self) -> Sequence[OptimStep]:
        """The optimisation steps of one iteration, run in order (default: ``compute_losses`` over
        every trainable network). Override to add steps, e.g. DiffRect's rectified supervision."""
        return (OptimStep("main", lambda labeled, unlabeled, carry: self.compute_losses(labeled, unlabeled)),)

    def on_phase_start(self, phase: PhaseSpan) -> None:
        """Called when ``phase`` becomes active: at its first epoch, and when a resumed run continues
        inside it (before the checkpoint's optimiser states are restored, so an optimiser rebuilt
        here receives them). Typical use: ``restart_optimizer``, freezing a network. Not for copying
        weights (e.g. initialising a teacher from the student): on ``--continue`` the networks' weights
        are restored only after this hook; copy at the phase's first step instead (as BCP does)."""

    def after_step(self) -> None:
        """Called after every optimisation step of the iteration ``self.iteration`` (EMA updates)."""

    def inference_network(self) -> nn.Module:
        """The network whose weights go into ``network_weights`` (what stock nnU-Net predicts with)."""
        return self.network

    def get_strong_transforms(self):
        """Return a batchgeneratorsv2 transform for a strong view of unlabeled patches, or None. The
        unlabeled batch then holds ``data_strong`` (and ``data_strong_2``... when the class attribute
        ``strong_views`` > 1: independent draws on the same weak view)."""
        return None

    # ------------------------------------------------------------------ helpers for methods
    def supervised_loss(self, output, target, ce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
        """nnU-Net's Dice+CE (with its deep-supervision weights) on labeled data:
        ``ce_weight``·CE + ``dice_weight``·Dice per scale (nnU-Net: 1 and 1)."""
        inner = getattr(self.loss, "loss", self.loss)  # nnU-Net's DeepSupervisionWrapper holds the loss
        saved = inner.weight_ce, inner.weight_dice
        inner.weight_ce, inner.weight_dice = ce_weight, dice_weight
        try:
            return self.loss(output, target)
        finally:
            inner.weight_ce, inner.weight_dice = saved

    def joint_forward(self, network: nn.Module, *inputs: torch.Tensor, **kwargs) -> list:
        """Run ``network`` once on the concatenation of ``inputs`` (same shape but the batch) and
        return its output split back per input (deep-supervision lists split per scale), e.g.
        ``out_l, out_u = self.joint_forward(self.network, x_l, x_u)``. ``kwargs`` go to the network."""
        sizes = [x.shape[0] for x in inputs]
        out = network(torch.cat(inputs), **kwargs)
        bounds = np.cumsum([0] + sizes)
        return [self.batch_part(out, slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def highest_resolution(output):
        return output[0] if isinstance(output, (list, tuple)) else output

    @staticmethod
    def batch_part(output, part: slice):
        """Select samples ``part`` of a network output (a deep-supervision list or one tensor)."""
        return [o[part] for o in output] if isinstance(output, (list, tuple)) else output[part]

    @staticmethod
    def labels_of(labeled: dict) -> torch.Tensor:
        """The full-resolution integer labels (B, *spatial) of a labeled batch."""
        target = labeled["target"]
        return (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()

    # ------------------------------------------------------------------ the schedule policy
    @property
    def burnin_iterations(self) -> int:
        """Iterations of supervised burn-in: ``burnin`` × run within [burnin_min, burnin_max], at most
        a quarter of the run (0 for methods that use no unlabeled data, and for a trained start: see
        :attr:`trained_start`)."""
        if not self.uses_unlabeled or self.trained_start:
            return 0
        hp = self.hp
        n = min(max(int(round(hp.burnin * self.total_iterations)), hp.burnin_min), hp.burnin_max)
        return max(0, min(n, self.total_iterations // 4))

    @property
    def trained_start(self) -> bool:
        """The run starts from ``--pretrained-weights`` and ``warmup_from_pretrained`` is off: what only warms
        up a network the checkpoint already holds trained — the supervised burn-in and the phases
        declared ``Phase(warmup=True)`` (BCP's pre-training) — is skipped. Phases that train what the
        checkpoint lacks (SuperDiffusion's diffusion pathways, SemiGDA's alignment) still run."""
        return bool(self.run_config.pretrained_weights) and not self.hp.warmup_from_pretrained

    @property
    def in_burnin(self) -> bool:
        return self.iteration < self.burnin_iterations

    def ramp_length(self, fraction: float = 1.0) -> int:
        """Iterations of a ramp-up of ``fraction`` × run: within [rampup_min, rampup_max], capped by
        the iterations left after the burn-in."""
        hp = self.hp
        n = min(max(int(round(fraction * self.total_iterations)), hp.rampup_min), hp.rampup_max)
        return max(0, min(n, self.total_iterations - self.burnin_iterations))

    def ramp(self, max_weight: float, fraction: float = 1.0, kind: str = "sigmoid") -> float:
        """An unlabeled loss weight: 0 during the burn-in, then ``max_weight`` × a ramp-up
        (``ramps.rampup``) over ``ramp_length(fraction)`` iterations, ``max_weight`` after."""
        if self.in_burnin:
            return 0.0
        return max_weight * ramps.rampup(kind, self.iteration - self.burnin_iterations, self.ramp_length(fraction))

    def register_network(self, name: str, module: nn.Module, trainable: bool = True,
                         optimizer: torch.optim.Optimizer | None = None, poly_lr: bool = True) -> nn.Module:
        """Add a network (moved to the device, checkpointed).

        Trainable ones get ``optimizer`` (default: nnU-Net's SGD) and, unless ``poly_lr=False``,
        nnU-Net's poly schedule from the optimizer's initial LR; with ``poly_lr=False`` the LR stays
        constant.
        """
        if name == "network" or name in self.extra_networks:
            raise ValueError(f"network name {name!r} is taken")
        module = module.to(self.device)
        if self.is_ddp and trainable:
            module = self.wrap_ddp(module)
        self.extra_networks[name] = module
        if trainable:
            optimizer = optimizer or self._default_optimizer(module)
            scheduler = PolyLRScheduler(optimizer, optimizer.param_groups[0]["lr"], self.num_epochs) if poly_lr else None
            self.extra_optimizers[name] = (optimizer, scheduler)
        return module

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """A trainable network under DDP (gradients averaged over ranks; the parameters are broadcast from
        rank 0 here, so every rank starts from the same weights)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if self.is_ddp else 1

    def rank_share(self, global_batch: int) -> int:
        """This rank's part of a global batch size (nnU-Net's split: the first ranks take the remainder)."""
        n, r = self.world_size, self.local_rank
        return global_batch // n + (1 if r < global_batch % n else 0)

    def _default_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                               momentum=0.99, nesterov=True)

    def restart_optimizer(self, name: str = "network", optimizer: torch.optim.Optimizer | None = None,
                          poly_lr: bool = True) -> torch.optim.Optimizer:
        """Give network ``name`` a fresh optimiser (default: nnU-Net's SGD) whose poly LR runs over the
        current phase only. Call it from ``on_phase_start``."""
        module = self.network if name == "network" else self.extra_networks[name]
        optimizer = optimizer or self._default_optimizer(module)
        self._restarted.add(name)
        span = self.current_phase
        scheduler = PhasePolyLR(optimizer, optimizer.param_groups[0]["lr"], span.start, span.end) if poly_lr else None
        if name == "network":
            self.optimizer, self.lr_scheduler = optimizer, scheduler or PhasePolyLR(
                optimizer, optimizer.param_groups[0]["lr"], 0, 0, exponent=0.0)
        else:
            self.extra_optimizers[name] = (optimizer, scheduler)
        return optimizer

    def register_state(self, name: str, obj: Any) -> Any:
        """Checkpoint ``obj`` (anything with ``state_dict``/``load_state_dict``: EMA, memory bank, ...)."""
        self.method_states[name] = obj
        return obj

    def build_planned_network(self, deep_supervision: bool | None = None, num_input_channels: int | None = None,
                              num_output_channels: int | None = None) -> nn.Module:
        """A fresh network from the plans with nnU-Net's architecture (not this method's
        ``build_network_architecture``), e.g. the second network of CPS or a network on image ⊕ label."""
        ds = self.enable_deep_supervision if deep_supervision is None else deep_supervision
        return nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration_manager, num_input_channels or self.num_input_channels,
            num_output_channels or self.label_manager.num_segmentation_heads, ds).to(self.device)

    @property
    def validation_steers_training(self) -> bool:
        """Whether validation scores change what training does (a phase's ``select_best``, or the method's
        ``steers_by_validation``): then the validation batches are reproducible with workers too."""
        return self.steers_by_validation or any(span.phase.select_best for span in self.phase_spans)

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    @property
    def current_phase(self) -> PhaseSpan:
        """The phase the current epoch belongs to."""
        for span in self.phase_spans:
            if span.start <= self.current_epoch < span.end:
                return span
        return self.phase_spans[-1]

    def _networks(self, names: Sequence[str] | None) -> list[tuple[str, nn.Module, torch.optim.Optimizer]]:
        names = ["network", *self.extra_optimizers] if names is None else list(names)
        out = []
        for n in names:
            if n == "network":
                out.append((n, self.network, self.optimizer))
            elif n in self.extra_optimizers:
                out.append((n, self.extra_networks[n], self.extra_optimizers[n][0]))
            else:
                raise ValueError(f"optimisation step names network {n!r}, which is not a trainable network "
                                 f"(trainable: network, {', '.join(self.extra_optimizers) or '-'})")
        return out

    # ------------------------------------------------------------------ setup
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        ddp, self.is_ddp = self.is_ddp, False  # nnU-Net's own DDP wrapping assumes a GPU per global rank
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        if self.run_config.pretrained_weights and not self.plans_manager.plans.get("continue_training"):
            self.load_pretrained_weights(self.run_config.pretrained_weights)  # every rank reads the same file
        if ddp:
            self._set_batch_size_and_oversample()  # this rank's share of the global batch
            self.network = self.wrap_ddp(self.network)
            self.loss = self._build_loss()  # nnU-Net's batch Dice over all ranks
        self.enable_hook_guards_if_compiled()
        self.build_method()
        self.logger.update_config({"semidiff": {"method": self.method_name, "hparams": hparams_to_dict(self.hp),
                                                "labeled": self.labeled_spec.to_json(), "seed": self.seed}})

    def enable_hook_guards_if_compiled(self) -> None:
        """Methods add forward hooks during a forward (``captured_output``, ``replaced_output``: CCT,
        UniMatch, Diff-CL); a network compiled by nnU-Net (CUDA) and traced without them would keep
        ignoring them, so Dynamo must guard on module hooks (a process-wide Dynamo setting)."""
        inner = getattr(self.network, "module", self.network)  # DDP
        if hasattr(self.network, "_orig_mod") or hasattr(inner, "_orig_mod"):
            import torch._dynamo

            torch._dynamo.config.skip_nnmodule_hook_guards = False

    def do_split(self):
        # nnU-Net's fold split less the run's held-out cases (scored by `semidiff benchmark` only): nnU-Net's
        # validation, checkpoint_best and every method's selection see only the rest
        return drop_held_out(*super().do_split(), self.run_config.held_out)

    def make_semi_split(self) -> SemiSplit:
        tr_keys, val_keys = self.do_split()
        extra = list_cases(unlabeled_preprocessed_folder(self.preprocessed_dataset_folder))
        pseudo = list_cases(self.preprocessed_dataset_folder + PSEUDO_SUFFIX)
        return make_semi_split(tr_keys, val_keys, self.labeled_spec, self.seed, extra, pseudo,
                               held_out=self.run_config.held_out)

    def get_tr_and_val_datasets(self):
        # the labeled stream sees only the labeled cases of the fold
        self.semi_split = self.make_semi_split()
        _, dataset_val = super().get_tr_and_val_datasets()
        dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, list(self.semi_split.labeled),
                                        folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        n_proc = get_allowed_n_proc_DA()
        with _env("nnUNet_n_proc_DA", "0"):  # nnU-Net's loaders single-threaded; ours go around them
            dl_tr, dl_val = super().get_dataloaders()
        if n_proc > 0:
            # training batches reproducible with workers (see training/augmenters.py); validation order
            # does not touch the weights, so it keeps nnU-Net's unordered workers
            dl_tr = EpochSeededAugmenter(dl_tr.data_loader, n_proc, self.seed, stream=2 * self.local_rank,
                                         num_cached=max(2, n_proc // 4), pin_memory=self.device.type == "cuda")
            if self.validation_steers_training:
                # a phase's best weights (or a method's choice) come from validation: its batches must be the
                # same in every run and after --continue, as the training batches
                dl_val = EpochSeededAugmenter(dl_val.data_loader, max(1, n_proc // 2), self.seed,
                                              stream=VALIDATION_STREAM + self.local_rank,
                                              num_cached=max(3, n_proc // 4), pin_memory=self.device.type == "cuda")
            else:
                # WorkerLoader: its workers end with this process, also after a kill -9
                dl_val = NonDetMultiThreadedAugmenter(WorkerLoader(dl_val.data_loader), None,
                                                      num_processes=max(1, n_proc // 2),
                                                      num_cached=max(3, n_proc // 4), seeds=None,
                                                      pin_memory=self.device.type == "cuda", wait_time=0.002)
                _ = next(dl_val)  # start its workers now, before this process's thread pool has run (fork safety)
        split = self.semi_split
        self.print_to_log_file(f"semidiff split (seed {self.seed}, labeled {self.labeled_spec.source or 'all'}): "
                               f"{len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled training cases, "
                               f"{len(split.extra_unlabeled)} extra unlabeled images, {len(split.validation)} "
                               f"validation cases")
        self.print_to_log_file("labeled cases:", ", ".join(split.labeled), also_print_to_console=False)
        if self.uses_unlabeled:
            self.dataloader_unlabeled = self._make_unlabeled_loader(split)
        return dl_tr, dl_val

    def _make_unlabeled_loader(self, split: SemiSplit):
        sources = {k: self.preprocessed_dataset_folder for k in split.unlabeled}
        extra_folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder)
        sources.update({k: extra_folder for k in split.extra_unlabeled})
        if not sources:
            self.print_to_log_file("WARNING: no unlabeled cases (every training case is labeled); the unlabeled "
                                   "stream reuses the labeled cases' images without their labels.")
            sources = {k: self.preprocessed_dataset_folder for k in split.labeled}
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=None, is_cascaded=False, foreground_labels=self.label_manager.foreground_labels,
            regions=None, ignore_label=None)
        geometric, intensity = split_transforms(pipeline)
        if self.hp.weak_view == "geometry":  # the weak view of FixMatch's and UniMatch's authors
            intensity = ComposeTransforms([])
        # the unlabeled batch is global like nnU-Net's: split over the ranks (default: as the labeled one)
        batch_size = max(1, self.rank_share(self.hp.unlabeled_batch_size)) if self.hp.unlabeled_batch_size \
            else self.batch_size
        loader = UnlabeledDataLoader(UnlabeledDataset(sources, oracle=bool(self.hp.pseudo_diagnostic)), batch_size,
                                     initial_patch_size,
                                     self.configuration_manager.patch_size, self.label_manager,
                                     geometric, intensity, self.get_strong_transforms(), self.strong_views)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return EpochSeededAugmenter(loader, max(1, n_proc // 2), self.seed, stream=1 + 2 * self.local_rank, num_cached=2,
                                    pin_memory=self.device.type == "cuda")

    def on_train_start(self):
        super().on_train_start()
        # deterministic from here on: the main process's RNG here, the workers' by (seed, epoch)
        # (each rank its own stream: different patches and noise per rank, rank 0 as a single process)
        seed_everything(self.seed + 1 + 7919 * self.local_rank)
        for i, gen in enumerate(self._augmenters()):
            if isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs = np.random.RandomState(self.seed + 17 * (i + 1) + 7919 * self.local_rank)
        if self._pending_rng is not None:
            self._restore_rng(self._pending_rng)
            self._pending_rng = None
        if self.local_rank == 0:
            self._write_run_info()

    def _augmenters(self):
        return [self.dataloader_train, self.dataloader_val, self.dataloader_unlabeled]

    def _write_run_info(self) -> None:
        info = {
            "method": self.method_name,
            "trainer": self.__class__.__name__,
            "labeled": self.labeled_spec.to_json(),
            "seed": self.seed,
            "fold": self.fold,
            "configuration": self.configuration_name,
            "hparams": hparams_to_dict(self.hp),
            "phases": {s.name: [s.start, s.end] for s in self.phase_spans} if self.phases else {},
            "phase_overrides": dict(self.run_config.phases),
            "num_epochs": self.num_epochs,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "batch_size": self.configuration_manager.batch_size,
            "unlabeled_batch_size": (self.hp.unlabeled_batch_size or self.configuration_manager.batch_size)
            if self.uses_unlabeled else 0,
            "world_size": self.world_size,
            "pretrained_weights": self.run_config.pretrained_weights,
            "split": self.semi_split.to_json(),
        }
        tmp = os.path.join(self.output_folder, "semidiff_run.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(self.output_folder, "semidiff_run.json"))

    # ------------------------------------------------------------------ phases
    def _enter_phase_of_current_epoch(self) -> None:
        span = self.current_phase
        if span.name == self._active_phase:
            return
        self._active_phase = span.name
        if self.phases:
            self.print_to_log_file(f"phase {span.name!r}: epochs {span.start}-{span.end - 1}")
        self._restarted = set()
        self.on_phase_start(span)

    # ------------------------------------------------------------------ training
    def _set_crop_policy(self) -> None:
        """Labeled crops: nnU-Net's foreground oversampling, or uniform in a ``label_free`` phase (set
        before the epoch's loader workers start, which copy the loader)."""
        loader = getattr(self.dataloader_train, "data_loader", None)
        if loader is None or not hasattr(loader, "oversample_foreground_percent"):
            return
        if not hasattr(self, "_oversample_foreground"):
            self._oversample_foreground = loader.oversample_foreground_percent
        loader.oversample_foreground_percent = 0.0 if self.current_phase.phase.label_free \
            else self._oversample_foreground

    def on_train_epoch_start(self):
        self._set_crop_policy()
        for gen in (self.dataloader_train, self.dataloader_unlabeled, self.dataloader_val):
            if isinstance(gen, EpochSeededAugmenter):
                gen.start_epoch(self.current_epoch)
        self._enter_phase_of_current_epoch()
        super().on_train_epoch_start()
        self.logger.log("phase", self.current_phase.name, self.current_epoch)
        for name, module in self.extra_networks.items():
            module.train(name in self.extra_optimizers)
        for _, sched in self.extra_optimizers.values():
            if sched is not None:
                sched.step(self.current_epoch)

    def _to_device(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(self.device, non_blocking=True)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                out[k] = [i.to(self.device, non_blocking=True) for i in v]
            else:
                out[k] = v
        return out

    def _step_runs(self, step: OptimStep) -> bool:
        if step.phases is not None and self.current_phase.name not in step.phases:
            return False
        return step.active is None or bool(step.active())

    def train_step(self, batch: dict) -> dict:
        labeled = self._to_device(batch)
        if self.in_burnin:  # labeled data only: no unlabeled batch, no unlabeled forward
            unlabeled = None
            steps = (OptimStep("burn-in", lambda lab, _unl, _carry: self.supervised_losses(lab)),)
        else:
            unlabeled = (self._to_device(next(self.dataloader_unlabeled)) if self.dataloader_unlabeled is not None
                         else None)
            steps = self.optimisation_steps()
        # the pseudo-label diagnostic's hidden labels leave the batch before any method code sees it
        hidden = unlabeled.pop("hidden_target", None) if unlabeled is not None else None
        self._reported_pseudo = None
        carry: dict = {}
        terms: dict = {}
        total = 0.0
        for step in steps:
            if not self._step_runs(step):
                continue
            nets = self._networks(step.networks)
            optimizers = [opt for _, _, opt in nets]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with self.autocast():
                step_terms = step.compute(labeled, unlabeled, carry)
                summed = [v for k, v in step_terms.items() if not k.startswith("_")]
                loss = summed[0] if len(summed) == 1 else torch.stack([v.float() for v in summed]).sum()
            if loss.requires_grad:  # a step whose loss is off this iteration updates nothing
                self.backward_and_step(loss, optimizers, [m for _, m, _ in nets])
            clash = set(step_terms) & set(terms)
            if clash:
                raise ValueError(f"optimisation step {step.name!r} returns terms already returned by an earlier "
                                 f"step: {', '.join(sorted(clash))}")
            terms.update(step_terms)
            total = total + loss.detach().float()
        if not terms:
            raise ValueError(f"no optimisation step ran in iteration {self.iteration} (phase "
                             f"{self.current_phase.name!r}); give every phase at least one step")
        if hidden is not None:
            terms.update(self._pseudo_label_diagnostic(hidden))
        self.after_step()
        self.iteration += 1
        out = {"loss": total.cpu().numpy()}
        self._check_finite(out["loss"], terms)
        if len(terms) > 1 or next(iter(terms)) != "loss":
            for k, v in terms.items():
                out["term/" + k] = (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor)
                                    else np.asarray(v, dtype=np.float32))
        return out

    def report_pseudo_labels(self, labels: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Tell the opt-in pseudo-label diagnostic (``--set pseudo_diagnostic=true``) the pseudo labels this
        step learns from: ``labels`` (B, *spatial) class indices for the unlabeled batch's patches, in the
        order and geometry of ``unlabeled["data"]``; ``keep`` (same shape, bool) the voxels the loss uses
        (a confidence mask), None for all. A no-op unless the diagnostic is on; never changes training."""
        if self.hp.pseudo_diagnostic:
            self._reported_pseudo = (labels.detach(), None if keep is None else keep.detach())

    @torch.no_grad()
    def _pseudo_label_diagnostic(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Accuracy, foreground Dice and coverage of the reported pseudo labels against the hidden labels
        (voxels without a hidden label, ``-1``, left out); NaN when nothing was reported or comparable."""
        nan = torch.tensor(float("nan"))
        reported = getattr(self, "_reported_pseudo", None)
        if reported is None:
            return {"_pseudo_accuracy": nan, "_pseudo_dice": nan, "_pseudo_coverage": nan}
        labels, keep = reported
        truth = hidden.to(labels.device).long()[:, 0]  # (B, 1, *spatial) → (B, *spatial)
        labels = labels[:, 0] if labels.ndim == truth.ndim + 1 else labels
        keep = keep[:, 0] if keep is not None and keep.ndim == truth.ndim + 1 else keep
        n = min(labels.shape[0], truth.shape[0])  # a method may report a part of the batch
        labels, truth = labels[:n].long(), truth[:n]
        known = truth >= 0
        if self.label_manager.has_ignore_label:
            known &= truth != self.label_manager.ignore_label
        used = known if keep is None else known & keep[:n].bool()
        out = {"_pseudo_coverage": (used.sum() / known.sum().clamp_min(1)).float().cpu() if known.any() else nan}
        if not used.any():
            return {**out, "_pseudo_accuracy": nan, "_pseudo_dice": nan}
        right = (labels == truth) & used
        fg_p, fg_t = (labels > 0) & used, (truth > 0) & used
        denom = fg_p.sum() + fg_t.sum()
        dice = (2 * (fg_p & fg_t).sum() / denom).float().cpu() if denom > 0 else nan
        return {**out, "_pseudo_accuracy": (right.sum() / used.sum()).float().cpu(), "_pseudo_dice": dice}

    def _check_finite(self, loss: np.ndarray, terms: dict) -> None:
        """Count consecutive non-finite losses; past ``max_nonfinite_steps`` end the run with one sentence
        naming the terms, instead of training on NaN weights until the last epoch. Under DDP the ranks
        agree (a rank's non-finite loss counts for all), so they stop together instead of one waiting
        for the others forever."""
        finite = bool(np.isfinite(loss).all())
        if self.is_ddp:
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag.item() == 0.0
        if finite:
            self._nonfinite_steps = 0
            return
        self._nonfinite_steps += 1
        if self._nonfinite_steps >= self.max_nonfinite_steps:
            bad = [k for k, v in terms.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all()]
            raise SemidiffError(
                f"Training diverged: the loss was NaN or infinite for {self._nonfinite_steps} steps in a row (up "
                f"to iteration {self.iteration}; non-finite terms: {', '.join(bad) or 'the total'}). Lower the "
                f"learning rate or the method's loss weights with --set, or check the data.")  # api.train
            # adds the run folder and its last checkpoint (it knows whether one was saved)

    def autocast(self):
        """nnU-Net's mixed-precision rule as a context: autocast on CUDA, nothing elsewhere (for
        forward passes outside the declared steps, e.g. in ``after_step``)."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def backward_and_step(self, loss: torch.Tensor, optimizers: list, modules: list[nn.Module]) -> None:
        """nnU-Net's update: backward (through the AMP grad scaler on CUDA), clip each module's
        gradient norm at 12, step every optimizer."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)
            for module in modules:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
            for opt in optimizers:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            for module in modules:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
            for opt in optimizers:
                opt.step()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end([{"loss": o["loss"]} for o in train_outputs])
        # every term seen so far gets one value per epoch: the mean over the iterations that computed
        # it (a step that did not run this epoch logs NaN)
        keys = sorted({k for o in train_outputs for k in o if k.startswith("term/")}
                      | {k for k in self.logger.local_logger.my_fantastic_logging if k.startswith("term/")})
        for k in keys:
            values = np.array([o[k] for o in train_outputs if k in o], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            self.logger.log(k, float(np.mean(values)) if values.size else float("nan"), self.current_epoch)
        if keys:
            self.print_to_log_file("loss terms: " + ", ".join(
                f"{k[5:].lstrip('_')} {self.logger.get_value(k, step=-1):.4g}" for k in keys))

    def run_training(self):
        try:
            self.on_train_start()
            if self.progress is not None and self.local_rank == 0:
                self.progress.start(total=self.total_iterations,
                                    completed=self.current_epoch * self.num_iterations_per_epoch,
                                    description=self.method_name)
            for _ in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    train_outputs.append(self.train_step(next(self.dataloader_train)))
                    if self.progress is not None and self.local_rank == 0:
                        self.progress.step(loss=float(np.mean(train_outputs[-1]["loss"])), epoch=self.current_epoch,
                                           num_epochs=self.num_epochs,
                                           phase=self.current_phase.name if self.phases else "")
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    if val_outputs:
                        self.on_validation_epoch_end(val_outputs)
                    else:
                        self._log_no_validation()
                self.on_epoch_end()
            self.on_train_end()
        finally:
            if self.progress is not None and self.local_rank == 0:
                self.progress.close()
            self._shutdown_loaders()

    def phase_best(self, name: str) -> PhaseBest:
        """What phase ``name`` (declared with ``select_best=True``) kept: ``weights`` (a state dict of the
        main network, None when no validation score was seen), ``score`` and ``epoch``."""
        return self.method_states[f"phase_best/{name}"]

    def on_epoch_end(self):
        # before nnU-Net's on_epoch_end, which writes the checkpoints: they then hold the phase's best
        span = self.current_phase
        if span.phase.select_best:
            score = float(self.logger.get_value("ema_fg_dice", step=-1))
            if self.phase_best(span.name).offer(score, self.current_epoch, unwrap(self.network).state_dict):
                self.print_to_log_file(f"phase {span.name!r}: best so far at epoch {self.current_epoch} "
                                       f"(EMA pseudo Dice {score:.4f})", also_print_to_console=False)
        self._report_epoch()
        super().on_epoch_end()

    def _report_epoch(self) -> None:
        """The epoch's summary to the progress callback's ``epoch_end``, if it has one (rank 0)."""
        report = getattr(self.progress, "epoch_end", None)
        if report is None or self.local_rank != 0:
            return
        log = self.logger.local_logger.my_fantastic_logging
        terms = {k[5:].lstrip("_"): float(v[-1]) for k, v in sorted(log.items())
                 if k.startswith("term/") and v and np.isfinite(v[-1])}
        start = self.logger.get_value("epoch_start_timestamps", step=-1)
        report(epoch=self.current_epoch, num_epochs=self.num_epochs,
               phase=self.current_phase.name if self.phases else "",
               loss=float(self.logger.get_value("train_losses", step=-1)), terms=terms,
               seconds=time.time() - start, pseudo_dice=float(self.logger.get_value("mean_fg_dice", step=-1)))

    def _log_no_validation(self):
        # num_val_iterations_per_epoch=0 (tests): keep the logger's one-value-per-epoch invariant
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float("nan")] * len(self.label_manager.foreground_labels),
                        self.current_epoch)
        self.logger.log("val_losses", float("nan"), self.current_epoch)

    def _shutdown_unlabeled_loader(self):
        gen, self.dataloader_unlabeled = self.dataloader_unlabeled, None
        if gen is not None and hasattr(gen, "_finish"):
            gen._finish()

    def _shutdown_loaders(self):
        for gen in (self.dataloader_train, self.dataloader_val):
            if isinstance(gen, EpochSeededAugmenter):
                gen._finish()  # nnU-Net's on_train_end only knows its own augmenter classes
        self._shutdown_unlabeled_loader()

    def on_train_end(self):
        super().on_train_end()  # writes checkpoint_final.pth and removes checkpoint_latest.pth
        if self.local_rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.output_folder, ckpt.PREVIOUS))
        self._shutdown_loaders()

    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net's validation asks its predictor for perform_everything_on_device=True on every device and
        # prints a warning on CPU each time; the fallback it announces is the right behaviour there
        with _drop_printed("perform_everything_on_device=True is only supported for cuda"):
            return super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ checkpoints
    def _restore_rng(self, state: dict) -> None:
        ckpt.set_rng_state(state["global"])
        for gen, rs in zip(self._augmenters(), state.get("loaders", [])):
            if rs is not None and isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs.set_state(rs)

    def _rng_snapshot(self) -> dict:
        loaders = [gen.data_loader.rs.get_state() if isinstance(gen, SingleThreadedAugmenter) else None
                   for gen in self._augmenters()]
        return {"global": ckpt.rng_state(), "loaders": loaders}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = ckpt.nnunet_checkpoint(self)
        checkpoint["network_weights"] = unwrap(self.inference_network()).state_dict()
        checkpoint[ckpt.SEMIDIFF_KEY] = {
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
        latest = os.path.basename(filename) == ckpt.LATEST
        # the checkpoint_latest.pth being replaced stays as checkpoint_previous.pth (the resume point when the
        # new one turns out damaged), unless it is the damaged one this run resumed around
        keep = os.path.join(os.path.dirname(filename), ckpt.PREVIOUS) if latest and self._latest_intact else None
        ckpt.save_atomic(checkpoint, filename, keep_previous=keep)
        if latest:
            self._latest_intact = True

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            self._latest_intact = os.path.basename(checkpoint) == ckpt.LATEST
            self.print_to_log_file(f"resuming from {checkpoint}", also_print_to_console=False)
            checkpoint = ckpt.safe_load(checkpoint, map_location=self.device)
        semi = checkpoint.get(ckpt.SEMIDIFF_KEY)
        if semi is None:
            raise SemidiffError("This checkpoint was not written by a semidiff trainer and cannot be resumed here.")
        # the phase first: an optimiser it rebuilds must exist before its saved state is loaded
        self.current_epoch = int(checkpoint["current_epoch"])
        self._enter_phase_of_current_epoch()
        # a checkpoint written at the last epoch of the previous phase holds that phase's optimiser states:
        # an optimiser this phase rebuilt (restart_optimizer) starts fresh, as in an uninterrupted run
        fresh = self._restarted if semi.get("phase") not in (None, self.current_phase.name) else set()
        if "network" in fresh:
            checkpoint = {**checkpoint, "optimizer_state": self.optimizer.state_dict()}
        # nnU-Net restores its part (main network, optimizer, grad scaler, logger, epoch, ...)
        ckpt.nnunet_load(self, {**checkpoint, "network_weights": semi["networks"]["network"]})
        for name, module in self.extra_networks.items():
            unwrap(module).load_state_dict(semi["networks"][name])
        for name, (opt, _) in self.extra_optimizers.items():
            if name not in fresh:
                opt.load_state_dict(semi["optimizers"][name])
        for name, state in self.method_states.items():
            state.load_state_dict(semi["states"][name])
        self.iteration = int(semi.get("iteration", 0))
        self._pending_rng = semi.get("rng")
