"""The engine's loader registry: stream ids, seeding, the RNG snapshot for exact resume, shutdown."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from semidiff_nnunet.training.augmenters import EpochSeededAugmenter
from semidiff_nnunet.training.loaders import (
    FIRST_FREE_STREAM,
    LABELED_STREAM,
    UNLABELED_STREAM,
    VALIDATION_STREAM,
    LoadersMixin,
    worker_stream,
)


# ----------------------------------------------------------------------------------------- stream ids
@pytest.mark.parametrize("world_size", [1, 2, 4, 64])
def test_worker_streams_are_distinct_for_every_loader_and_rank(world_size):
    streams = [LABELED_STREAM, UNLABELED_STREAM, VALIDATION_STREAM, *range(FIRST_FREE_STREAM, FIRST_FREE_STREAM + 4)]
    ids = [worker_stream(s, r) for s in streams for r in range(world_size)]
    assert len(set(ids)) == len(ids)


def test_the_engines_streams_keep_their_ids():
    """A run resumed across this code keeps its batches: the ids the engine used before the registry."""
    for rank in range(4):
        assert worker_stream(LABELED_STREAM, rank) == 2 * rank
        assert worker_stream(UNLABELED_STREAM, rank) == 2 * rank + 1
        assert worker_stream(VALIDATION_STREAM, rank) == 1_000_003 + rank
    with pytest.raises(ValueError):
        worker_stream(-1, 0)


# ----------------------------------------------------------------------------------------- the registry
class Counter(DataLoader):
    """Batches of random numbers from the loader's own ``rs`` (as nnU-Net's loaders crop)."""

    def __init__(self):
        super().__init__(None, 2, infinite=True)

    def generate_train_batch(self):
        return {"data": self.rs.rand(2)}


class Owner(LoadersMixin):
    """The part of a trainer the registry uses."""

    def __init__(self, rank: int = 0):
        self.device, self.seed, self.local_rank, self._pending_rng = torch.device("cpu"), 7, rank, None

    def _to_device(self, batch):
        return batch


def _draw(owner, name, n=3):
    return [next(getattr(owner, f"dataloader_{name}"))["data"].tolist() for _ in range(n)]


def test_register_numbers_streams_and_refuses_a_taken_one(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    o = Owner(rank=3)
    o.register_loader("train", Counter(), LABELED_STREAM, workers=2)
    first, second = o.register_loader("extra", Counter()), o.register_loader("more", Counter())
    assert isinstance(first, EpochSeededAugmenter) and o.dataloader_extra is first
    assert o.loader_streams == {"train": LABELED_STREAM, "extra": FIRST_FREE_STREAM, "more": FIRST_FREE_STREAM + 1}
    assert (o.dataloader_train.stream, first.stream, second.stream) == \
        (6, worker_stream(FIRST_FREE_STREAM, 3), worker_stream(FIRST_FREE_STREAM + 1, 3))
    with pytest.raises(ValueError, match="'train'"):
        o.register_loader("clash", Counter(), LABELED_STREAM)
    o.register_loader("extra", Counter())  # again: the same stream, the old one stopped
    assert o.loader_streams["extra"] == FIRST_FREE_STREAM and o.dataloader_extra is not first
    o._shutdown_loaders()
    assert o.dataloader_extra is None and o.dataloader_more is None and o.dataloader_train is not None


def test_snapshot_restores_every_loader_exactly(monkeypatch):
    """Without workers each loader's RandomState is seeded by its position and rank, saved and restored:
    a resumed run draws the batches the uninterrupted one drew."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    o = Owner()
    for name in ("train", "val", "unlabeled", "pseudo"):
        assert isinstance(o.register_loader(name, Counter()), SingleThreadedAugmenter)
    o.seed_loaders()
    assert o.dataloader_unlabeled.data_loader.rs.randint(1 << 30) == \
        np.random.RandomState(7 + 17 * 3).randint(1 << 30)  # position 2: seed + 17·3 (+ 7919·rank)
    _draw(o, "pseudo")
    snapshot = o._rng_snapshot()
    assert len(snapshot["loaders"]) == 4
    straight = {n: _draw(o, n) for n in o.loader_streams}
    straight_torch = torch.rand(2)

    resumed = Owner()
    for name in ("train", "val", "unlabeled", "pseudo"):
        resumed.register_loader(name, Counter())
    resumed._pending_rng = snapshot
    resumed.seed_loaders()
    assert {n: _draw(resumed, n) for n in resumed.loader_streams} == straight
    assert torch.equal(torch.rand(2), straight_torch)
    ranks = [Owner(rank=0), Owner(rank=1)]
    for owner in ranks:
        owner.register_loader("train", Counter())
        owner.seed_loaders()
    assert _draw(ranks[0], "train") != _draw(ranks[1], "train")  # each rank its own patches


def test_next_batch_is_none_without_the_loader(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    o = Owner()
    assert o.next_batch("pseudo") is None
    o.register_loader("pseudo", Counter())
    assert o.next_batch("pseudo")["data"].shape == (2,)


# ----------------------------------------------------------------------------------------- every loader of a real run
@pytest.fixture(scope="module")
def pseudo_set(workspace):
    from test_protodiff import _pseudo_dataset

    return _pseudo_dataset(workspace, 967, "LoaderStreams", True)


def _loaders(trainer) -> dict:
    """Every loader the trainer holds, by name (its ``dataloader_*`` attributes)."""
    return {k[len("dataloader_"):]: v for k, v in vars(trainer).items() if k.startswith("dataloader_") and v is not None}


@pytest.mark.slow  # plans a dataset with labelsPseudo/
@pytest.mark.parametrize("world_size", [2, 4])
def test_no_two_loaders_of_any_ranks_share_worker_seeds(pseudo_set, world_size, monkeypatch, tmp_path):
    """With augmentation workers every loader of every rank seeds its workers from its own stream: the
    labeled, validation and unlabeled streams and ProtoDiff's labelsPseudo/ stream
    (which used the labeled stream of rank 1 before the engine owned the stream ids)."""
    from semidiff_nnunet import planning
    from semidiff_nnunet.plugins.protodiff.trainer import ProtoDiffTrainer
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # no worker starts before start_epoch
    plans = planning.load_plans(pseudo_set, "semidiffDemoPlans")
    plans["continue_training"] = False
    RunConfig(labeled=LabeledSpec.parse("3"), seed=0, num_epochs=2, num_iterations_per_epoch=2).write(plans)
    dataset_json = json.loads((planning.preprocessed_folder(pseudo_set) / "dataset.json").read_text(encoding="utf-8"))
    t = ProtoDiffTrainer(plans, "2d", 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    t.initialize()
    streams = {}
    try:
        for rank in range(world_size):  # what each rank of a DDP run builds
            t.local_rank = rank
            train, val = t.get_dataloaders()  # nnU-Net's on_train_start keeps these two
            loaders = {**_loaders(t), "train": train, "val": val}
            assert set(loaders) == {"train", "val", "unlabeled", "pseudo"}
            for name, gen in loaders.items():
                assert isinstance(gen, EpochSeededAugmenter), name
                streams[(rank, name)] = gen.stream
    finally:
        t._shutdown_loaders()
    clashes = {s: [k for k, v in streams.items() if v == s] for s in streams.values()}
    assert not {s: ks for s, ks in clashes.items() if len(ks) > 1}
    assert len(streams) == 4 * world_size


@pytest.mark.slow
def test_validation_batches_are_the_same_in_every_run_with_workers(demo2d, monkeypatch):
    """checkpoint_best.pth and the benchmark's best-checkpoint column come from the validation pseudo Dice:
    with augmentation workers its batches must not depend on which worker finished first (nnU-Net's
    unseeded, unordered validation loader gave two identical runs different best epochs)."""
    import shutil

    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    logs = []
    for _ in range(2):
        info = api.train(demo2d, "supervised", labeled="0.5", seed=3, configuration="2d", fold=0, device="cpu",
                         epochs=2, iters_per_epoch=2, plans_name="semidiffDemoPlans", val_iters_per_epoch=4,
                         final_validation=False, show_progress=False)
        ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        logs.append({k: [float(x) for x in ck["logging"][k]] for k in ("mean_fg_dice", "val_losses")})
        shutil.rmtree(info.run_root)
    assert logs[0] == logs[1]


# ----------------------------------------------------------------------------------------- the same floats
def _blur_under_load(monkeypatch, fft_faster: bool):
    """A loader holding nnU-Net's training pipeline, registered with the engine, whose Gaussian blur (were it
    still timing itself) would find the FFT faster, or the direct convolution, as two workers under different
    load do; returns the blurred image."""
    from types import SimpleNamespace

    from batchgeneratorsv2.transforms.noise import gaussian_blur
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    real, state = gaussian_blur.blur_dimension, {"t": 0.0, "fft": None}

    def blur_dimension(img, sigma, dim, force_use_fft=None, **kw):
        state["fft"] = force_use_fft
        return real(img, sigma, dim, force_use_fft=force_use_fft, **kw)

    def clock():  # the duration of a timed call: short for the algorithm the loaded worker finds faster
        state["t"] += 0.1 if bool(state["fft"]) == fft_faster else 1.0
        return state["t"]

    monkeypatch.setattr(gaussian_blur, "blur_dimension", blur_dimension)
    monkeypatch.setattr(gaussian_blur, "time", clock)
    pipeline = nnUNetTrainer.get_training_transforms(
        (32, 32), (-np.pi, np.pi), None, (0, 1), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    blurs = [t.transform for t in pipeline.transforms
             if isinstance(getattr(t, "transform", None), gaussian_blur.GaussianBlurTransform)]
    assert len(blurs) == 1 and blurs[0].benchmark  # nnU-Net's blur times itself

    class Trainer(LoadersMixin):
        device, seed, local_rank = torch.device("cpu"), 0, 0

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    Trainer().register_loader("train", SimpleNamespace(transforms=pipeline))
    torch.manual_seed(0)
    np.random.seed(0)
    img = torch.linspace(-2, 3, 3 * 32 * 32).reshape(3, 32, 32).sin()
    return blurs[0](image=img.clone())["image"]


def test_the_blur_gives_the_same_floats_however_loaded_the_machine_is(monkeypatch):
    """nnU-Net's blur times an FFT against a direct convolution in each worker and keeps the faster: under load a
    worker chose the other one, its batches differed in the last bit, and a run resumed with workers drifted
    from the uninterrupted run (test_resume_fallback's flaky case). The engine pins the algorithm in every
    loader it registers."""
    with monkeypatch.context() as m:
        fft = _blur_under_load(m, fft_faster=True)
    direct = _blur_under_load(monkeypatch, fft_faster=False)
    assert torch.equal(fft, direct)
