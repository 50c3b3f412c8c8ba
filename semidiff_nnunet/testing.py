"""A test kit for method plugins: the checks semidiff runs on its built-in methods, for yours.

Like pytest's ``pytester``, load it in your plugin's tests and call its checks::

    # tests/conftest.py of your plugin
    pytest_plugins = ["semidiff_nnunet.testing"]

    # tests/test_my_method.py
    from semidiff_nnunet import testing

    def test_trains(semidiff_dataset2d):
        testing.assert_trains(semidiff_dataset2d, "my-method")

    def test_resumes_exactly(semidiff_dataset2d):
        testing.assert_resumes_exactly(semidiff_dataset2d, "my-method")

    def test_exports_to_stock_nnunet(semidiff_dataset2d, tmp_path):
        testing.assert_exports_to_stock_nnunet(semidiff_dataset2d, "my-method", tmp_path)

    def test_hidden_labels_never_reach_a_loss(semidiff_dataset2d):
        testing.assert_hidden_labels_never_reach_a_loss(semidiff_dataset2d, "my-method")

Fixtures: ``semidiff_workspace`` (a fresh nnU-Net workspace for the session: ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` point into it; ``SEMIDIFF_TESTING_WORKSPACE=DIR`` keeps
it in ``DIR`` instead, so the planned datasets are reused by the next session), ``semidiff_dataset2d``
and ``semidiff_dataset3d`` (the names of tiny synthetic datasets, 2D 32x32 and 3D 16x24x24, with
extra unlabeled images, planned and preprocessed by nnU-Net and trained with :data:`TINY_PLANS`: 8
features per stage, batch 2).

Each check trains its own runs of the method (labeled fraction 0.5, seed 0, fold 0; an earlier run of
the same method, labeled spec and seed is deleted first) for a few iterations on the CPU, with one
validation batch per epoch and no final validation: seconds per run on an idle CPU. ``overrides`` are
the method's ``--set`` items (e.g. ``{"phase.pretrain": "1"}`` for a method whose first phase would
otherwise take the whole tiny run). Nothing here is imported by semidiff itself; torch and nnU-Net are
imported when a check runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

#: the shrunk CPU plans every kit dataset is trained with (``semidiff demo``'s)
TINY_PLANS = "semidiffDemoPlans"
#: ``SEMIDIFF_TESTING_WORKSPACE=DIR``: keep the kit's workspace (and its planned datasets) in ``DIR``
WORKSPACE_ENV = "SEMIDIFF_TESTING_WORKSPACE"
DATASETS = {  # dim -> prepare_demo_dataset arguments
    2: dict(dataset_id=956, name="KitTiny2D", num_train=10, num_test=2, num_unlabeled=2, shape=(32, 32)),
    3: dict(dataset_id=957, name="KitTiny3D", num_train=8, num_test=1, num_unlabeled=1, shape=(16, 24, 24)),
}
#: what the kit's runs share: few iterations, one validation batch, no final validation, one process
RUN = dict(labeled="0.5", seed=0, fold=0, device="cpu", plans_name=TINY_PLANS, val_iters_per_epoch=1,
           final_validation=False, show_progress=False)
#: no supervised burn-in, so that unlabeled losses run from the first iteration of a tiny run
NO_BURNIN = {"burnin": "0", "burnin_min": "0"}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def semidiff_workspace(tmp_path_factory) -> Path:
    """An nnU-Net workspace of its own for the session; the environment variables are restored after it."""
    kept = os.environ.get(WORKSPACE_ENV)
    root = Path(kept).expanduser() if kept else tmp_path_factory.mktemp("semidiff_kit")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEMIDIFF_HOME", str(root))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(root / var))
    mp.setenv("nnUNet_compile", "false")
    mp.delenv("nnUNet_extTrainer", raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def semidiff_dataset2d(semidiff_workspace) -> str:
    """10 training cases (32x32, labels 0-2), 2 test cases, 2 extra unlabeled images; planned: its name."""
    return tiny_dataset(2)


@pytest.fixture(scope="session")
def semidiff_dataset3d(semidiff_workspace) -> str:
    """8 training cases (16x24x24, labels 0-2), 1 test case, 1 extra unlabeled image; planned: its name."""
    return tiny_dataset(3)


def tiny_dataset(dim: int) -> str:
    """Generate, plan and preprocess the kit's tiny dataset of ``dim`` dimensions in the current nnU-Net
    folders (steps already done are skipped); return its name."""
    from semidiff_nnunet import api

    return api.prepare_demo_dataset(dim=dim, show_progress=False, max_features=8, batch_size=2, **DATASETS[dim])


# ---------------------------------------------------------------------------------------------- runs
def configuration_of(dataset: str, plans: str = TINY_PLANS) -> str:
    """``3d_fullres`` for a 3D dataset, else ``2d`` (what the kit trains)."""
    configurations = _plans(dataset, plans)["configurations"]
    return "3d_fullres" if "3d_fullres" in configurations else "2d"


def train_tiny(dataset: str, method: str, *, epochs: int = 2, iterations: int = 3,
               overrides: Mapping[str, str] | None = None, fresh: bool = True, workers: int = 0, **kwargs):
    """Train a tiny run (``epochs`` x ``iterations``) of ``method`` with the kit's settings (:data:`RUN`,
    overridden by ``kwargs``, e.g. ``labeled="4"``); ``fresh`` deletes an earlier run of the same method,
    labeled spec and seed; ``workers``: augmentation worker processes (``nnUNet_n_proc_DA``; 0, the
    fastest for tiny batches, unless a test is about the workers). Returns the run's
    :class:`~semidiff_nnunet.api.RunInfo`."""
    from semidiff_nnunet import api

    options = {**RUN, "configuration": configuration_of(dataset), **kwargs}
    if fresh:
        shutil.rmtree(api.run_root(method, options["labeled"], options["seed"]), ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_n_proc_DA", str(workers))
        return api.train(dataset, method, epochs=epochs, iters_per_epoch=iterations,
                         overrides=dict(overrides or {}), **options)


def final_checkpoint(info) -> dict:
    """The ``checkpoint_final.pth`` of a run, as a dict."""
    import torch

    return torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def trained_state(checkpoint: Mapping) -> dict:
    """What a method learnt: every network and method state (EMA copies, memory banks, prototypes)."""
    semi = checkpoint["semidiff"]
    return {"networks": semi["networks"], "states": semi["states"]}


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """``a`` and ``b`` (checkpoint parts: dicts, tensors, lists, numbers, NaN, arrays) are equal to the bit,
    naming the first path that differs."""
    import numpy as np
    import torch

    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), f"{path}: nan != {b}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True), f"{path} differs"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------- checks
def assert_trains(dataset: str, method: str, *, epochs: int = 2, iterations: int = 3,
                  overrides: Mapping[str, str] | None = None, **kwargs) -> dict:
    """``method`` trains ``epochs`` x ``iterations`` iterations: the run finishes with a final checkpoint
    recording the method's name and every iteration, every logged loss term is finite, and every
    network with trainable parameters changed. Returns the final checkpoint."""
    import numpy as np

    from semidiff_nnunet import api
    from semidiff_nnunet.training.ema import unwrap

    cls, start = api.method_trainer(method), {}
    original = cls.on_train_start

    def on_train_start(self):
        original(self)
        modules = {"network": self.network, **getattr(self, "extra_networks", {})}
        start.update({name: {k: v.detach().clone() for k, v in unwrap(m).state_dict().items()}
                      for name, m in modules.items() if any(p.requires_grad for p in m.parameters())})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "on_train_start", on_train_start)
        info = train_tiny(dataset, method, epochs=epochs, iterations=iterations, overrides=overrides, **kwargs)
    ck = final_checkpoint(info)
    semi = ck["semidiff"]
    assert semi["method"] == method, f"the checkpoint calls the method {semi['method']!r}, not {method!r}"
    assert semi["iteration"] == epochs * iterations, f"{semi['iteration']} iterations, not {epochs * iterations}"
    logged = {k: v for k, v in ck["logging"].items() if k == "train_losses" or k.startswith("term/")}
    assert len(logged["train_losses"]) == epochs, logged["train_losses"]
    for name, values in logged.items():
        if not name.startswith("term/_"):  # terms starting with _ are diagnostics (NaN where undefined)
            assert np.all(np.isfinite(np.asarray(values, dtype=float))), f"{name}: {values}"
    assert start.keys() <= semi["networks"].keys(), f"networks {sorted(start)} not all in the checkpoint"
    for name, before in start.items():
        after = semi["networks"][name]
        assert any(not _equal(before[k], after[k]) for k in before), f"the network {name!r} did not change"
    return ck


def assert_resumes_exactly(dataset: str, method: str, *, epochs: int = 3, iterations: int = 3,
                           overrides: Mapping[str, str] | None = None, **kwargs) -> None:
    """A run interrupted after its first epoch (``KeyboardInterrupt``) and continued with ``--continue`` ends
    bit-identical to the same run done in one go: every network, method state and optimiser, the logged
    losses, the iteration."""
    from semidiff_nnunet import api

    run = dict(epochs=epochs, iterations=iterations, overrides=overrides, save_every=1, **kwargs)
    reference = final_checkpoint(train_tiny(dataset, method, **run))

    cls = api.method_trainer(method)
    original = cls.on_epoch_end

    def interrupted_after_the_first_epoch(self):
        original(self)  # writes checkpoint_latest of the epoch that ended and counts it
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "on_epoch_end", interrupted_after_the_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_tiny(dataset, method, **run)
    info = train_tiny(dataset, method, fresh=False, continue_training=True, **run)
    resumed = final_checkpoint(info)
    assert_same_state(trained_state(reference), trained_state(resumed), "semidiff")
    assert_same_state(reference["optimizer_state"], resumed["optimizer_state"], "optimizer_state")
    assert_same_state(reference["semidiff"]["optimizers"], resumed["semidiff"]["optimizers"], "semidiff/optimizers")
    for key in reference["logging"]:
        if key == "train_losses" or key.startswith("term/"):
            assert_same_state(reference["logging"][key], resumed["logging"][key], f"logging/{key}")
    assert reference["semidiff"]["iteration"] == resumed["semidiff"]["iteration"] == epochs * iterations


def assert_exports_to_stock_nnunet(dataset: str, method: str, workdir: str | Path, *,
                                   overrides: Mapping[str, str] | None = None, **kwargs) -> dict[str, str]:
    """A tiny run of ``method`` predicts the dataset's ``imagesTs`` with stock ``nnUNetv2_predict`` (a clean
    interpreter whose nnU-Net variables are those ``semidiff env`` prints) exactly as with
    ``semidiff predict`` (no test-time augmentation). Returns that environment."""
    import numpy as np
    import SimpleITK as sitk

    from semidiff_nnunet import api, paths

    info = train_tiny(dataset, method, overrides=overrides, **kwargs)
    images = paths.raw_root() / dataset / "imagesTs"
    workdir = Path(workdir)
    labeled = kwargs.get("labeled", RUN["labeled"])
    ours = api.predict(dataset, method, images, workdir / f"ours_{method}", labeled=labeled,
                       seed=info.seed, configuration=info.configuration, folds=(info.fold,), device="cpu",
                       plans_name=info.plans_name, use_mirroring=False, show_progress=False)
    ours_files = sorted(Path(ours).glob("*.nii.gz"))
    assert ours_files, f"semidiff predict wrote nothing into {ours}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # a fresh shell + eval "$(semidiff env)"
    for line in api.env_lines(info.run_root):
        key, value = line[len("export "):].split("=", 1)
        env[key] = value.strip("'")
    stock = workdir / f"stock_{method}"
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(images), "-o", str(stock),
                           "-d", dataset, "-tr", info.trainer, "-p", info.plans_name, "-c", info.configuration,
                           "-f", str(info.fold), "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                          env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, f"stock nnUNetv2_predict failed:\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in stock.glob("*.nii.gz")) == [f.name for f in ours_files]
    for f in ours_files:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (f, stock / f.name))
        assert np.array_equal(a, b), f"{f.name}: stock nnU-Net segments it differently"
    return env


def assert_hidden_labels_never_reach_a_loss(dataset: str, method: str, *, epochs: int = 2, iterations: int = 3,
                                            overrides: Mapping[str, str] | None = None, control: bool = True,
                                            **kwargs) -> None:
    """Scrambling the hidden labels of the unlabeled training cases (their preprocessed label maps and the
    class locations nnU-Net samples foreground from) leaves the run bit-identical. With ``control``, a run
    with one *labeled* case scrambled differs, so the comparison could fail. The dataset's preprocessed
    folder is restored afterwards. The run has no burn-in (:data:`NO_BURNIN`), so unlabeled losses run."""
    from semidiff_nnunet import api

    run = dict(epochs=epochs, iterations=iterations, overrides={**NO_BURNIN, **(overrides or {})}, **kwargs)
    configuration = kwargs.get("configuration") or configuration_of(dataset)
    split = api.split(dataset, kwargs.get("labeled", RUN["labeled"]), seed=kwargs.get("seed", RUN["seed"]),
                      fold=kwargs.get("fold", RUN["fold"]))
    assert split.unlabeled and split.labeled, "the split has no unlabeled (or no labeled) training case"
    folder = preprocessed_folder(dataset, configuration)
    backup = folder.with_name(folder.name + ".kit-pristine")
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(folder, backup)
    try:
        reference = trained_state(final_checkpoint(train_tiny(dataset, method, **run)))
        scramble_labels(dataset, split.unlabeled, configuration, seed=1)
        assert_same_state(reference, trained_state(final_checkpoint(train_tiny(dataset, method, **run))), "semidiff")
        if control:
            scramble_labels(dataset, split.labeled[:1], configuration, seed=2)
            changed = trained_state(final_checkpoint(train_tiny(dataset, method, **run)))
            with pytest.raises(AssertionError):
                assert_same_state(reference, changed)
    finally:
        shutil.rmtree(folder)
        os.replace(backup, folder)


# ---------------------------------------------------------------------------------------------- data
def preprocessed_folder(dataset: str, configuration: str, plans: str = TINY_PLANS) -> Path:
    """``$nnUNet_preprocessed/<dataset>/<data_identifier>`` of ``configuration``."""
    identifier = _plans(dataset, plans)["configurations"][configuration]["data_identifier"]
    return Path(os.environ["nnUNet_preprocessed"]) / dataset / identifier


def scramble_labels(dataset: str, cases: list[str], configuration: str, seed: int) -> None:
    """Replace the preprocessed label maps of ``cases`` with random labels and their foreground class
    locations with random voxels (in place)."""
    import pickle

    import blosc2
    import numpy as np

    folder = preprocessed_folder(dataset, configuration)
    raw_json = json.loads((Path(os.environ["nnUNet_preprocessed"]) / dataset / "dataset.json").read_text("utf-8"))
    num_labels = len(raw_json["labels"])
    rng = np.random.RandomState(seed)
    for case in cases:
        seg_file = folder / f"{case}_seg.b2nd"
        seg = blosc2.open(str(seg_file), mode="r")[:]
        scrambled = rng.randint(0, num_labels, size=seg.shape).astype(seg.dtype)
        seg_file.unlink()
        blosc2.asarray(np.ascontiguousarray(scrambled), urlpath=str(seg_file))
        with open(folder / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        props["class_locations"] = {
            k: (np.stack([rng.randint(0, s, size=20) for s in seg.shape], 1) if len(v) else v)
            for k, v in props["class_locations"].items()}
        with open(folder / f"{case}.pkl", "wb") as f:
            pickle.dump(props, f)


def _plans(dataset: str, plans: str) -> dict:
    return json.loads((Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{plans}.json").read_text("utf-8"))


def _equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)
