"""The engine's loaders: which cases each stream reads, how its batches are seeded, and when it stops.

Every stream of batches a run draws goes through :meth:`LoadersMixin.register_loader`, the engine's
labeled (``train``), validation (``val``) and unlabeled (``unlabeled``) ones as well as a method's own
(ProtoDiff's ``pseudo``). Registering a loader gives it

* a **stream number**, from which each rank's worker seeds are drawn (:func:`worker_stream`): with
  augmentation workers (``nnUNet_n_proc_DA > 0``) an :class:`~.augmenters.EpochSeededAugmenter` seeds its
  workers from ``(seed, worker_stream(stream, rank), epoch)``, so the batches of an epoch are the same in
  every run and after ``--continue``, and no two loaders of any two ranks share their workers' seeds;
* a **position** (the order of registration): without workers the loader's ``RandomState`` is seeded
  from it when training starts and saved with every checkpoint (:meth:`LoadersMixin._rng_snapshot`), so a
  resumed run draws the batches an uninterrupted one would have;
* the attribute ``dataloader_<name>`` (nnU-Net's ``dataloader_train``/``dataloader_val`` among them), a
  worker restart per epoch (:meth:`LoadersMixin.start_loader_epoch`) and a shutdown with the run.

The labeled stream sees only the labeled cases of the fold; the unlabeled stream the others (and
``imagesUnlabeled/``) without their labels (:mod:`~.unlabeled`); validation never trains.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from semidiff_nnunet.paths import PSEUDO_SUFFIX
from semidiff_nnunet.training import checkpoint as ckpt
from semidiff_nnunet.training.augmenters import EpochSeededAugmenter, WorkerLoader, pin_blur_algorithm
from semidiff_nnunet.training.nnunet_compat import set_foreground_oversampling, single_threaded_nnunet_loaders
from semidiff_nnunet.training.splits import SemiSplit, drop_held_out, make_semi_split
from semidiff_nnunet.training.unlabeled import (
    UnlabeledDataLoader,
    UnlabeledDataset,
    list_cases,
    split_transforms,
    unlabeled_preprocessed_folder,
)

#: the engine's stream numbers; a loader registered without one gets the first free number from
#: ``FIRST_FREE_STREAM`` on
LABELED_STREAM, UNLABELED_STREAM, VALIDATION_STREAM = 0, 1, 2
FIRST_FREE_STREAM = 3
#: ranks are told apart up to this world size (far beyond any run: 500 000 processes)
MAX_WORLD_SIZE = 500_000


def worker_stream(stream: int, rank: int) -> int:
    """The worker-seed stream of loader stream ``stream`` on rank ``rank``, distinct for every (stream, rank)
    with rank < :data:`MAX_WORLD_SIZE`: the labeled and unlabeled streams interleave as 2·rank and
    2·rank + 1 (all below 1 000 002), every other stream s has its own block, 1 000 000·(s − 1) + 3 + rank
    (validation: 1 000 003 + rank)."""
    if not 0 <= rank < MAX_WORLD_SIZE:
        raise ValueError(f"rank {rank} is outside 0..{MAX_WORLD_SIZE - 1}")
    if stream in (LABELED_STREAM, UNLABELED_STREAM):
        return 2 * rank + stream
    if stream < 0:
        raise ValueError(f"stream numbers are >= 0, not {stream}")
    return 1_000_000 * (stream - 1) + 3 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LoadersMixin:
    """The trainer's loaders: registration, seeding, the RNG snapshot, per-epoch starts and shutdown; the
    engine's three streams and the data split behind them."""

    # ------------------------------------------------------------------ the registry
    @property
    def loader_streams(self) -> dict[str, int]:
        """Stream number of every registered loader, by name, in registration order."""
        return self.__dict__.setdefault("_loader_streams", {})

    def register_loader(self, name: str, source, stream: int | None = None, workers: int | None = None,
                        num_cached: int = 2, ordered: bool = True):
        """Serve the batches of ``source`` (a batchgenerators ``DataLoader``, e.g. nnU-Net's
        ``nnUNetDataLoader``) as ``self.dataloader_<name>`` and return that iterator: the loader itself
        without augmentation workers (``nnUNet_n_proc_DA=0``), else ``workers`` processes (default: half the
        allowed ones) seeded per epoch from stream ``stream`` (default: the first free number); ``ordered=False``
        (a stream whose order changes nothing a run keeps) hands out batches as its workers finish them.
        Call it from ``get_dataloaders`` (after ``super().get_dataloaders()``); the engine starts the loader's
        workers every epoch, checkpoints its random state and stops it with the run. Registering a name again
        replaces its loader (same stream unless given)."""
        streams = self.loader_streams
        if name in streams:
            self.shutdown_loader(name)
            stream = streams[name] if stream is None else stream
        elif stream is None:
            stream = max([FIRST_FREE_STREAM - 1, *streams.values()]) + 1
        taken = {s: n for n, s in streams.items() if n != name}
        if stream in taken:
            raise ValueError(f"loader {name!r} asks for stream {stream}, which loader {taken[stream]!r} has")
        worker_stream(stream, 0)  # a valid number
        streams[name] = stream
        pin_blur_algorithm(source)  # the same floats in every worker and run (see augmenters)
        n_proc = get_allowed_n_proc_DA()
        pin = self.device.type == "cuda"
        workers = max(1, n_proc // 2) if workers is None else workers
        if n_proc == 0:
            gen = SingleThreadedAugmenter(source, None)
        elif ordered:
            gen = EpochSeededAugmenter(source, workers, self.seed, stream=worker_stream(stream, self.local_rank),
                                       num_cached=num_cached, pin_memory=pin)
        else:  # WorkerLoader: its workers end with this process, also after a kill -9
            gen = NonDetMultiThreadedAugmenter(WorkerLoader(source), None, num_processes=workers,
                                               num_cached=num_cached, seeds=None, pin_memory=pin, wait_time=0.002)
            _ = next(gen)  # start its workers now, before this process's thread pool has run (fork safety)
        setattr(self, f"dataloader_{name}", gen)
        return gen

    def registered_loaders(self) -> list[tuple[str, object]]:
        """``(name, iterator)`` of every registered loader, in registration order (None once shut down)."""
        return [(name, getattr(self, f"dataloader_{name}", None)) for name in self.loader_streams]

    def next_batch(self, name: str) -> dict | None:
        """The next batch of loader ``name``, on the device; None where no such loader runs."""
        gen = getattr(self, f"dataloader_{name}", None)
        return None if gen is None else self._to_device(next(gen))

    def start_loader_epoch(self, epoch: int) -> None:
        """(Re)start the workers of every loader for ``epoch`` (their seeds depend on it)."""
        for _, gen in self.registered_loaders():
            if isinstance(gen, EpochSeededAugmenter):
                gen.start_epoch(epoch)

    def shutdown_loader(self, name: str) -> None:
        """Stop loader ``name``'s workers (nnU-Net's ``on_train_end`` knows only its own augmenter classes)."""
        gen = getattr(self, f"dataloader_{name}", None)
        if gen is not None and hasattr(gen, "_finish"):
            gen._finish()
        if name not in ("train", "val"):  # nnU-Net's own attributes stay (its on_train_end reads them)
            setattr(self, f"dataloader_{name}", None)

    def _shutdown_loaders(self) -> None:
        for name in self.loader_streams:
            self.shutdown_loader(name)

    def _shutdown_unlabeled_loader(self) -> None:
        self.shutdown_loader("unlabeled")

    # ------------------------------------------------------------------ random state
    def seed_loaders(self) -> None:
        """Deterministic from here on: the main process's RNG here, each single-process loader's by its
        position, workers by (seed, stream, epoch); each rank its own streams (different patches and noise
        per rank, rank 0 as a single process). A resumed run then restores the checkpoint's state."""
        seed_everything(self.seed + 1 + 7919 * self.local_rank)
        for i, (_, gen) in enumerate(self.registered_loaders()):
            if isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs = np.random.RandomState(self.seed + 17 * (i + 1) + 7919 * self.local_rank)
        if getattr(self, "_pending_rng", None) is not None:
            self._restore_rng(self._pending_rng)
            self._pending_rng = None

    def _rng_snapshot(self) -> dict:
        loaders = [gen.data_loader.rs.get_state() if isinstance(gen, SingleThreadedAugmenter) else None
                   for _, gen in self.registered_loaders()]
        return {"global": ckpt.rng_state(), "loaders": loaders}

    def _restore_rng(self, state: dict) -> None:
        ckpt.set_rng_state(state["global"])
        for (_, gen), rs in zip(self.registered_loaders(), state.get("loaders", [])):
            if rs is not None and isinstance(gen, SingleThreadedAugmenter):
                gen.data_loader.rs.set_state(rs)

    # ------------------------------------------------------------------ the engine's streams
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
        with single_threaded_nnunet_loaders():  # nnU-Net's loaders and transforms, without its workers
            dl_tr, dl_val = super().get_dataloaders()
        train = self.register_loader("train", dl_tr.data_loader, LABELED_STREAM, workers=n_proc,
                                     num_cached=max(2, n_proc // 4))
        # the validation batches are the same in every run and after --continue, as the training batches:
        # checkpoint_best.pth, a phase's best weights and a method's choice between its networks come from them
        val = self.register_loader("val", dl_val.data_loader, VALIDATION_STREAM, workers=max(1, n_proc // 2),
                                   num_cached=max(3, n_proc // 4))
        split = self.semi_split
        self.print_to_log_file(f"semidiff split (seed {self.seed}, labeled {self.labeled_spec.source or 'all'}): "
                               f"{len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled training cases, "
                               f"{len(split.extra_unlabeled)} extra unlabeled images, {len(split.validation)} "
                               f"validation cases")
        self.print_to_log_file("labeled cases:", ", ".join(split.labeled), also_print_to_console=False)
        if self.uses_unlabeled:
            self.register_loader("unlabeled", self._unlabeled_data_loader(split), UNLABELED_STREAM)
        return train, val

    def _unlabeled_data_loader(self, split: SemiSplit) -> UnlabeledDataLoader:
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
        return UnlabeledDataLoader(UnlabeledDataset(sources, oracle=bool(self.hp.pseudo_diagnostic)), batch_size,
                                   initial_patch_size, self.configuration_manager.patch_size, self.label_manager,
                                   geometric, intensity, self.get_strong_transforms(), self.strong_views)

    def set_crop_policy(self) -> None:
        """Labeled crops: nnU-Net's foreground oversampling, or uniform in a ``label_free`` phase (set
        before the epoch's loader workers start, which copy the loader)."""
        loader = getattr(self.dataloader_train, "data_loader", None)
        if loader is None or not hasattr(loader, "oversample_foreground_percent"):
            return
        if not hasattr(self, "_oversample_foreground"):
            self._oversample_foreground = set_foreground_oversampling(loader, None)
        set_foreground_oversampling(loader, 0.0 if self.current_phase.phase.label_free else self._oversample_foreground)
