"""SemiSupervisedTrainer: nnU-Net's trainer plus an unlabeled stream, several networks and declared steps.

The engine owns the loop, loaders, AMP, clipping, logging, phases and checkpoints. A method
subclasses it and declares what is new in its paper (see ``plugins/mean_teacher/trainer.py``):

* ``hparams_class`` — a dataclass of hyperparameters with the paper's defaults;
* ``build_method()`` — EMA copies, extra networks (``register_network``), state (``register_state``);
* ``compute_losses(labeled, unlabeled) -> dict[str, Tensor]`` — the loss terms of one step; their
  sum is minimised (keys starting with ``_`` are logged, not summed);
* optionally ``burnin_losses(labeled)`` (the supervised burn-in's losses); ``phases`` (ordered stages of
  the run, :class:`~.declarations.Phase`) with ``on_phase_start(phase)``; ``optimisation_steps()`` for
  more than one optimiser step per iteration (:class:`~.declarations.OptimStep`); ``after_step()`` (EMA
  updates; ``self.iteration`` is the step that just ran); ``inference_network()``;
  ``get_strong_transforms()``; the static ``build_network_architecture`` (whatever it returns is the
  whole inference model; it reads the run's hyperparameters with :func:`~.run_config.run_hparams`).

Helpers for methods: ``joint_forward`` (one forward over labeled ⊕ unlabeled, split back),
``supervised_loss`` (nnU-Net's Dice+CE with deep supervision, CE/Dice weights per call),
``highest_resolution``, ``labels_of``, and from the concerns this class is assembled of:

* :mod:`~.schedule` — ``ramp``, ``burnin_iterations``, ``in_burnin``, ``current_phase``, ``phase_best``;
* :mod:`~.optimisation` — ``register_network``, ``register_state``, ``restart_optimizer``,
  ``build_planned_network``, ``autocast``, ``rank_share``;
* :mod:`~.loaders` — ``register_loader`` (a method's own stream of batches), ``next_batch``;
* :mod:`~.diagnostic` — ``report_pseudo_labels``;
* :mod:`~.checkpoint` (save, resume, ``--pretrained-weights``), :mod:`~.curves` (per-term logging) and
  :mod:`~.nnunet_compat` (every patch of nnU-Net's internals, pinned to one nnU-Net version).

The run configuration (:class:`~.run_config.RunConfig`) arrives in the plans because nnU-Net fixes
the constructor's five arguments; it is written back into the run folder's ``plans.json`` and
``semidiff_run.json``. Progress goes to ``self.progress`` (a callback the caller supplies); the
trainer never draws on a terminal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.registry import RegisteredName
from semidiff_nnunet.training import checkpoint as ckpt
from semidiff_nnunet.training import nnunet_compat as compat
from semidiff_nnunet.training.checkpoint import CheckpointMixin
from semidiff_nnunet.training.curves import EpochLogMixin, SemiLocalLogger, cpu_seconds
from semidiff_nnunet.training.declarations import OptimStep, Phase, PhaseBest, PhaseSpan, resolve_phases
from semidiff_nnunet.training.diagnostic import DiagnosticMixin
from semidiff_nnunet.training.hparams import BaseHParams, hparams_to_dict
from semidiff_nnunet.training.loaders import LoadersMixin, seed_everything
from semidiff_nnunet.training.memory import check_step_memory, reset_epoch_peak
from semidiff_nnunet.training.optimisation import OptimisationMixin
from semidiff_nnunet.training.progress import TrainingProgress
from semidiff_nnunet.training.run_config import RunConfig, write_run_info
from semidiff_nnunet.training.schedule import ScheduleMixin
from semidiff_nnunet.training.splits import SemiSplit


class SemiSupervisedTrainer(LoadersMixin, CheckpointMixin, ScheduleMixin, OptimisationMixin, DiagnosticMixin,
                            EpochLogMixin, nnUNetTrainer):
    #: registered method name (informational; the registry maps names to classes)
    method_name: ClassVar[str] = RegisteredName()  # its MethodSpec's name, never a default (registry.py)
    #: dataclass of hyperparameters; subclasses extend BaseHParams
    hparams_class: ClassVar[type] = BaseHParams
    #: False for methods that never look at unlabeled data (``supervised``): no loader is built
    uses_unlabeled: ClassVar[bool] = True
    #: independent strong views of each unlabeled patch when ``get_strong_transforms`` gives transforms
    strong_views: ClassVar[int] = 1
    #: ordered stages of a run (empty: one phase, the whole run)
    phases: ClassVar[tuple[Phase, ...]] = ()
    #: stop with a clear error after this many consecutive steps whose loss is NaN or infinite (a
    #: diverged run; a single overflowing AMP step does not count as divergence)
    max_nonfinite_steps: ClassVar[int] = 20

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "supervised_losses" in vars(cls):  # the hook's name before 2026-12-07: it would be ignored silently
            raise TypeError(f"{cls.__qualname__} defines supervised_losses(labeled), the burn-in hook's old name; "
                            f"rename it to burnin_losses(labeled).")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        cfg = RunConfig.read(plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            compat.place_ddp_rank(self, device)  # CPU ranks (gloo) too; on CUDA the node-local rank's GPU
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
        self._pending_rng: dict | None = None  # a resumed run's random state, restored when training starts
        self._latest_intact = False  # the run folder's checkpoint_latest.pth is known to load (written/resumed)

        for span in self.phase_spans:  # Phase.select_best: the phase's best weights, checkpointed
            if span.phase.select_best:
                self.register_state(f"phase_best/{span.name}", PhaseBest())

        compat.use_local_logger(self, SemiLocalLogger())  # per-term curves, checkpointed with nnU-Net's logger
        seed_everything(self.seed)  # network initialisation is reproducible

    # ------------------------------------------------------------------ method hooks
    @classmethod
    def check_options(cls, hp: Any, configuration: str | None, dim: int | None) -> None:
        """Refuse options this method cannot use, before any planning or run folder (``semidiff`` calls it
        when the options are checked, and again with the planned configuration): raise
        :class:`~semidiff_nnunet.errors.SemidiffError` with one sentence naming the fix. It may normalise
        ``hp`` in place (a relative path made absolute), so that a resumed run compares like with like.

        ``configuration`` is the nnU-Net configuration name (None when not known yet); ``dim`` its number
        of spatial dimensions (2 or 3; None when it cannot be known before planning: a custom name)."""

    #: ``--pretrained-weights``: ``self.network`` reads the planned inputs followed by channels of its own
    #: (e.g. a noisy mask); a U-Net checkpoint's input convolutions then fill the leading channels and the
    #: others start at zero (see :func:`~.checkpoint.transfer_weights`)
    pretrained_extra_inputs: bool = False

    def pretrained_key(self, key: str) -> str | None:
        """``--pretrained-weights``: the key of a stock nnU-Net checkpoint (the planned U-Net, plain or
        residual) that initialises tensor ``key`` of ``self.network``; None for a tensor this method adds
        (left as built). The default: the same key (``self.network`` is the planned U-Net). A method whose
        network wraps or changes the planned one maps its keys here; a checkpoint of a run of the same
        method is always loaded key for key."""
        return key

    def build_method(self) -> None:
        """Create EMA copies, extra networks and method state. Called once after the main network."""

    def compute_losses(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """Return named loss terms of one step; their sum (keys without a leading ``_``) is minimised.

        ``labeled``: nnU-Net's batch on the device, ``data`` (B, C, *spatial) and ``target`` (a list
        of (B, 1, *spatial) maps per deep-supervision scale when deep supervision is on).
        ``unlabeled``: ``data`` (B_u, C, *spatial), optionally ``data_strong``; never a label.
        """
        raise NotImplementedError

    def burnin_losses(self, labeled: dict) -> dict[str, torch.Tensor]:
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
        with compat.loss_weights(self.loss, ce_weight, dice_weight):
            return self.loss(output, target)

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

    # ------------------------------------------------------------------ setup
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        with compat.initialize_without_nnunet_ddp(self) as ddp:
            super().initialize()
        if self.starts_from_pretrained:
            self.load_pretrained_weights(self.run_config.pretrained_weights)  # every rank reads the same file
        if ddp:
            self._set_batch_size_and_oversample()  # this rank's share of the global batch
            self.network = self.wrap_ddp(self.network)
            self.loss = self._build_loss()  # nnU-Net's batch Dice over all ranks
        self.enable_hook_guards_if_compiled()
        self.build_method()
        self.logger.update_config({"semidiff": {"method": self.method_name, "hparams": hparams_to_dict(self.hp),
                                                "labeled": self.labeled_spec.to_json(), "seed": self.seed}})

    def on_train_start(self):
        super().on_train_start()  # nnU-Net's set-up; it builds the loaders (get_dataloaders)
        self.seed_loaders()  # deterministic from here on (a resumed run: the checkpoint's random state)
        check_step_memory(self)  # a step that cannot fit: refused in one sentence (the run itself is unchanged)
        if self.local_rank == 0:
            write_run_info(self)

    # ------------------------------------------------------------------ the loop
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

    def on_train_epoch_start(self):
        # logged by on_train_epoch_end (the cost column); taken before the last epoch's workers are reaped, so
        # that their CPU time counts (one epoch late)
        self._cpu_seconds_at_epoch_start = cpu_seconds()
        self.set_crop_policy()  # before the epoch's workers start: they copy the loader
        self.start_loader_epoch(self.current_epoch)
        self._enter_phase_of_current_epoch()
        super().on_train_epoch_start()
        self.logger.log("phase", self.current_phase.name, self.current_epoch)
        reset_epoch_peak(torch.device(self.device))  # logged by on_train_epoch_end (the memory column)
        for name, module in self.extra_networks.items():
            module.train(name in self.extra_optimizers)
        self.step_learning_rates(self.current_epoch)

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
            steps = (OptimStep("burn-in", lambda lab, _unl, _carry: self.burnin_losses(lab)),)
        else:
            unlabeled = (self._to_device(next(self.dataloader_unlabeled)) if self.dataloader_unlabeled is not None
                         else None)
            steps = self.optimisation_steps()
        hidden = self.take_hidden_labels(unlabeled)  # the diagnostic's, before any method code sees the batch
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

    def on_epoch_end(self):
        self._offer_phase_best()  # before nnU-Net's on_epoch_end, which writes the checkpoints
        self._report_epoch()
        # nnU-Net writes checkpoint_latest.pth before it takes this epoch's best: a run resumed from it would
        # hold the best EMA pseudo Dice of the epoch before (and could replace checkpoint_best.pth with a worse
        # epoch). So nnU-Net's periodic save is held back and written here once the best is taken.
        epoch = self.current_epoch
        periodic = (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1
        save_every, self.save_every = self.save_every, self.num_epochs + 1
        try:
            super().on_epoch_end()  # best checkpoint, progress plot, current_epoch + 1
        finally:
            self.save_every = save_every
        if periodic:
            self.current_epoch -= 1  # nnU-Net's checkpoint records current_epoch + 1 epochs done
            try:
                self.save_checkpoint(os.path.join(self.output_folder, ckpt.LATEST))
            finally:
                self.current_epoch += 1

    def on_train_end(self):
        super().on_train_end()  # writes checkpoint_final.pth and removes checkpoint_latest.pth
        if self.local_rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.output_folder, ckpt.PREVIOUS))
        self._shutdown_loaders()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.in_final_validation = True  # nnU-Net's "predicting CASE" lines reach the console, bar or not
        try:
            cases = f"{len(self.semi_split.validation)} " if self.semi_split is not None else ""
            self.print_to_log_file(f"final validation: predicting the fold's {cases}validation cases with nnU-Net's "
                                   f"sliding window (--no-val skips it)")
            with compat.without_cpu_device_warning():  # printed for every case on CPU, where the fallback is right
                return super().perform_actual_validation(save_probabilities)
        finally:
            self.in_final_validation = False
