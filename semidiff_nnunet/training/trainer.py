"""SemiSupervisedTrainer: nnU-Net's trainer plus an unlabeled stream, several networks and one loss hook.

A method subclasses it and overrides little (see ``plugins/mean_teacher.py``):

* ``hparams_class`` — a dataclass of hyperparameters with the paper's defaults;
* ``build_method()`` — create EMA copies, extra networks (``register_network``), state;
* ``compute_losses(labeled, unlabeled) -> dict[str, Tensor]`` — the whole training step's
  losses. Their sum is back-propagated (keys starting with ``_`` are logged, not summed);
* optionally ``after_step()``, ``inference_network()``, ``get_strong_transforms()`` and the
  static ``build_network_architecture`` (whatever it returns is the whole inference model).

The run configuration (labeled spec, seed, hyperparameters, epochs) arrives in
``plans["semidiff"]`` because nnU-Net fixes the constructor's five arguments; it is written
back into the run folder's ``plans.json`` and ``semidiff_run.json``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any, ClassVar

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import ramps
from semidiff_nnunet.training.curves import SemiLocalLogger
from semidiff_nnunet.training.ema import _unwrap
from semidiff_nnunet.training.hparams import BaseHParams, hparams_to_dict, resolve_hparams
from semidiff_nnunet.training.splits import LabeledSpec, SemiSplit, make_semi_split
from semidiff_nnunet.training.unlabeled import (
    UnlabeledDataLoader,
    UnlabeledDataset,
    list_cases,
    split_transforms,
    unlabeled_preprocessed_folder,
)

PSEUDO_SUFFIX = "__pseudo"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SemiSupervisedTrainer(nnUNetTrainer):
    #: registered method name (informational; the registry maps names to classes)
    method_name: ClassVar[str] = "semi"
    #: dataclass of hyperparameters; subclasses extend BaseHParams
    hparams_class: ClassVar[type] = BaseHParams
    #: False for methods that never look at unlabeled data (``supervised``): no loader is built
    uses_unlabeled: ClassVar[bool] = True
    #: stop with a clear error after this many consecutive steps whose loss is NaN or infinite (a
    #: diverged run; a single overflowing AMP step does not count as divergence)
    max_nonfinite_steps: ClassVar[int] = 20

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        run = dict(plans.get("semidiff") or {})
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.run_config = run
        self.seed = int(run.get("seed", 0))
        self.labeled_spec = LabeledSpec.from_json(run["labeled"]) if run.get("labeled") else LabeledSpec(fraction=1.0)
        self.hp = resolve_hparams(self.hparams_class, run.get("hparams") or {})
        if run.get("num_epochs"):
            self.num_epochs = int(run["num_epochs"])
        if run.get("num_iterations_per_epoch"):
            self.num_iterations_per_epoch = int(run["num_iterations_per_epoch"])
        if run.get("num_val_iterations_per_epoch") is not None:
            self.num_val_iterations_per_epoch = int(run["num_val_iterations_per_epoch"])
        if run.get("save_every"):
            self.save_every = int(run["save_every"])
        self.show_progress = bool(run.get("progress", sys.stderr.isatty()))

        self.extra_networks: dict[str, nn.Module] = {}
        self.extra_optimizers: dict[str, tuple[torch.optim.Optimizer, Any]] = {}
        self.method_states: dict[str, Any] = {}
        self.iteration = 0
        self._nonfinite_steps = 0
        self.semi_split: SemiSplit | None = None
        self.dataloader_unlabeled = None
        self._pending_rng: dict | None = None

        # per-term loss curves live in nnU-Net's logger (so they are checkpointed with it)
        self.logger.local_logger = SemiLocalLogger()
        seed_everything(self.seed)  # network initialisation is reproducible

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        # with a progress bar on screen, nnU-Net's chatter goes to the log file only
        quiet = getattr(self, "show_progress", False)
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and not quiet,
                                  add_timestamp=add_timestamp)

    # ------------------------------------------------------------------ method hooks
    def build_method(self) -> None:
        """Create EMA copies, extra networks and method state. Called once after the main network."""

    def compute_losses(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """Return named loss terms of one step; their sum (keys without a leading ``_``) is minimised.

        ``labeled``: nnU-Net's batch on the device, ``data`` (B, C, *spatial) and ``target`` (a list
        of (B, 1, *spatial) maps per deep-supervision scale when deep supervision is on).
        ``unlabeled``: ``data`` (B_u, C, *spatial), optionally ``data_strong``; never a label.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after the optimisers stepped (EMA updates and the like)."""

    def inference_network(self) -> nn.Module:
        """The network whose weights go into ``network_weights`` (what stock nnU-Net predicts with)."""
        return self.network

    def get_strong_transforms(self):
        """Return a batchgeneratorsv2 transform for a strong view of unlabeled patches, or None."""
        return None

    # ------------------------------------------------------------------ helpers for methods
    def supervised_loss(self, output, target) -> torch.Tensor:
        """nnU-Net's Dice+CE (with deep supervision weights) on labeled data."""
        return self.loss(output, target)

    @staticmethod
    def highest_resolution(output):
        return output[0] if isinstance(output, (list, tuple)) else output

    @staticmethod
    def batch_part(output, part: slice):
        """Select samples ``part`` of a network output (a deep-supervision list or one tensor)."""
        return [o[part] for o in output] if isinstance(output, (list, tuple)) else output[part]

    def ramp(self, max_weight: float, fraction: float = 1.0, kind: str = "sigmoid") -> float:
        """``max_weight`` × ramp-up over the first ``fraction`` of all iterations (``ramps.rampup``)."""
        return max_weight * ramps.rampup(kind, self.iteration, fraction * self.total_iterations)

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
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(module), device_ids=[self.local_rank])
        self.extra_networks[name] = module
        if trainable:
            if optimizer is None:
                optimizer = torch.optim.SGD(module.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                            momentum=0.99, nesterov=True)
            scheduler = PolyLRScheduler(optimizer, optimizer.param_groups[0]["lr"], self.num_epochs) if poly_lr else None
            self.extra_optimizers[name] = (optimizer, scheduler)
        return module

    def register_state(self, name: str, obj: Any) -> Any:
        """Checkpoint ``obj`` (anything with ``state_dict``/``load_state_dict``: EMA, memory bank, ...)."""
        self.method_states[name] = obj
        return obj

    def build_planned_network(self, deep_supervision: bool | None = None) -> nn.Module:
        """A fresh network from the plans (like ``self.network``), e.g. the second network of CPS."""
        ds = self.enable_deep_supervision if deep_supervision is None else deep_supervision
        return self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                               self.num_input_channels, self.label_manager.num_segmentation_heads, ds)

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def _all_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + [opt for opt, _ in self.extra_optimizers.values()]

    def _trainable_modules(self) -> list[nn.Module]:
        return [self.network] + [self.extra_networks[n] for n in self.extra_optimizers]

    # ------------------------------------------------------------------ setup
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        super().initialize()
        self.build_method()
        self.logger.update_config({"semidiff": {"method": self.method_name, "hparams": hparams_to_dict(self.hp),
                                                "labeled": self.labeled_spec.to_json(), "seed": self.seed}})

    def make_semi_split(self) -> SemiSplit:
        tr_keys, val_keys = self.do_split()
        extra = list_cases(unlabeled_preprocessed_folder(self.preprocessed_dataset_folder))
        pseudo = list_cases(self.preprocessed_dataset_folder + PSEUDO_SUFFIX)
        return make_semi_split(tr_keys, val_keys, self.labeled_spec, self.seed, extra, pseudo)

    def get_tr_and_val_datasets(self):
        # the labeled stream sees only the labeled cases of the fold
        self.semi_split = self.make_semi_split()
        _, dataset_val = super().get_tr_and_val_datasets()
        dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, list(self.semi_split.labeled),
                                        folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
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
        batch_size = self.hp.unlabeled_batch_size or self.batch_size
        loader = UnlabeledDataLoader(UnlabeledDataset(sources), batch_size, initial_patch_size,
                                     self.configuration_manager.patch_size, self.label_manager,
                                     geometric, intensity, self.get_strong_transforms())
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_processes=max(1, n_proc // 2),
                                            num_cached=max(3, n_proc // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_start(self):
        super().on_train_start()
        # deterministic from here on (bit-exact with nnUNet_n_proc_DA=0; worker pools are not)
        seed_everything(self.seed + 1)
        for i, gen in enumerate(self._augmenters()):
            if isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs = np.random.RandomState(self.seed + 17 * (i + 1))
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
            "num_epochs": self.num_epochs,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "batch_size": self.batch_size,
            "unlabeled_batch_size": (self.hp.unlabeled_batch_size or self.batch_size) if self.uses_unlabeled else 0,
            "split": self.semi_split.to_json(),
        }
        tmp = os.path.join(self.output_folder, "semidiff_run.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(self.output_folder, "semidiff_run.json"))

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
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

    def train_step(self, batch: dict) -> dict:
        labeled = self._to_device(batch)
        unlabeled = self._to_device(next(self.dataloader_unlabeled)) if self.dataloader_unlabeled is not None else None
        optimizers = self._all_optimizers()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            terms = self.compute_losses(labeled, unlabeled)
            summed = [v for k, v in terms.items() if not k.startswith("_")]
            total = summed[0] if len(summed) == 1 else torch.stack([v.float() for v in summed]).sum()
        self.backward_and_step(total, optimizers, self._trainable_modules())
        self.iteration += 1
        self.after_step()
        out = {"loss": total.detach().cpu().numpy()}
        self._check_finite(out["loss"], terms)
        if len(terms) > 1 or next(iter(terms)) != "loss":
            for k, v in terms.items():
                out["term/" + k] = (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor)
                                                else np.asarray(v, dtype=np.float32))
        return out

    def _check_finite(self, loss: np.ndarray, terms: dict) -> None:
        """Count consecutive non-finite losses; past ``max_nonfinite_steps`` end the run with one sentence
        naming the terms, instead of training on NaN weights until the last epoch."""
        if np.isfinite(loss).all():
            self._nonfinite_steps = 0
            return
        self._nonfinite_steps += 1
        if self._nonfinite_steps >= self.max_nonfinite_steps:
            bad = [k for k, v in terms.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all()]
            raise SemidiffError(
                f"Training diverged: the loss was NaN or infinite for {self._nonfinite_steps} steps in a row (up "
                f"to iteration {self.iteration}; non-finite terms: {', '.join(bad) or 'the total'}). Lower the "
                f"learning rate or the method's loss weights with --set, or check the data; the last saved "
                f"checkpoint is in {self.output_folder}.")

    def autocast(self):
        """nnU-Net's mixed-precision rule as a context: autocast on CUDA, nothing elsewhere. For methods
        with an extra forward pass outside ``compute_losses``."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def backward_and_step(self, loss: torch.Tensor, optimizers: list, modules: list[nn.Module]) -> None:
        """nnU-Net's update: backward (through the AMP grad scaler on CUDA), clip each module's
        gradient norm at 12, step every optimizer. For methods with an extra optimisation step."""
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
        keys = [k for k in train_outputs[0] if k.startswith("term/")] if train_outputs else []
        for k in keys:
            values = np.array([o[k] for o in train_outputs], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            self.logger.log(k, float(np.mean(values)), self.current_epoch)
        if keys:
            self.print_to_log_file("loss terms: " + ", ".join(
                f"{k[5:].lstrip('_')} {self.logger.get_value(k, step=-1):.4g}" for k in keys))

    def run_training(self):
        try:
            self.on_train_start()
            progress = _EpochProgress(self) if self.show_progress and self.local_rank == 0 else None
            for _ in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    train_outputs.append(self.train_step(next(self.dataloader_train)))
                    if progress:
                        progress.advance(train_outputs[-1]["loss"])
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
            if progress:
                progress.close()
            self.on_train_end()
        finally:
            self._shutdown_unlabeled_loader()

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

    def on_train_end(self):
        super().on_train_end()
        self._shutdown_unlabeled_loader()

    # ------------------------------------------------------------------ checkpoints
    def _restore_rng(self, state: dict) -> None:
        set_rng_state(state["global"])
        for gen, rs in zip(self._augmenters(), state.get("loaders", [])):
            if rs is not None and isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs.set_state(rs)

    def _rng_snapshot(self) -> dict:
        loaders = [gen.data_loader.rs.get_state() if isinstance(gen, SingleThreadedAugmenter) else None
                   for gen in self._augmenters()]
        return {"global": rng_state(), "loaders": loaders}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": _unwrap(self.inference_network()).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "semidiff": {
                "method": self.method_name,
                "run": self.run_config,
                "iteration": self.iteration,
                "networks": {"network": _unwrap(self.network).state_dict(),
                             **{n: _unwrap(m).state_dict() for n, m in self.extra_networks.items()}},
                "optimizers": {n: opt.state_dict() for n, (opt, _) in self.extra_optimizers.items()},
                "states": {n: s.state_dict() for n, s in self.method_states.items()},
                "rng": self._rng_snapshot(),
            },
        }
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # never leave a half-written checkpoint

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        semi = checkpoint.get("semidiff")
        if semi is None:
            raise RuntimeError("This checkpoint was not written by a semidiff trainer and cannot be resumed here.")
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        _unwrap(self.network).load_state_dict(semi["networks"]["network"])
        for name, module in self.extra_networks.items():
            _unwrap(module).load_state_dict(semi["networks"][name])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        for name, (opt, _) in self.extra_optimizers.items():
            opt.load_state_dict(semi["optimizers"][name])
        for name, state in self.method_states.items():
            state.load_state_dict(semi["states"][name])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.iteration = int(semi.get("iteration", 0))
        self._pending_rng = semi.get("rng")


class _EpochProgress:
    """A rich progress bar over all training iterations (epochs × iterations)."""

    def __init__(self, trainer: SemiSupervisedTrainer):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.trainer = trainer
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), redirect_stdout=True, redirect_stderr=True,
                                 transient=False)
        total = trainer.num_epochs * trainer.num_iterations_per_epoch
        done = trainer.current_epoch * trainer.num_iterations_per_epoch
        self.task = self.progress.add_task(f"{trainer.method_name} training", total=total, completed=done,
                                           loss=float("nan"))
        self.progress.start()

    def advance(self, loss) -> None:
        t = self.trainer
        self.progress.update(self.task, advance=1, loss=float(np.mean(loss)),
                             description=f"{t.method_name} epoch {t.current_epoch + 1}/{t.num_epochs}")

    def close(self) -> None:
        self.progress.stop()
