"""Shared set-up of the cost benchmarks: a demo dataset in a scratch workspace and trainers started on it.

The benchmark scripts run as ``python benchmarks/NAME.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import tempfile


def demo_dataset(dim: int, device: str, results_prefix: str):
    """Prepare the built-in demo dataset; return ``(dataset name, configuration, torch device, dataset_json)``.

    Uses ``$SEMIDIFF_HOME`` (default: a ``semidiff_bench`` folder in the temp dir), disables
    ``torch.compile`` and points ``nnUNet_results`` at a fresh scratch folder so no run is touched.
    """
    os.environ.setdefault("SEMIDIFF_HOME", os.path.join(tempfile.gettempdir(), "semidiff_bench"))
    os.environ["nnUNet_compile"] = "false"
    from semidiff_nnunet import api, paths, planning

    paths.ensure_nnunet_env()
    name = api.prepare_demo_dataset(dim=dim, show_progress=False)
    dataset_json = json.loads((planning.preprocessed_folder(name) / "dataset.json").read_text(encoding="utf-8"))
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix=results_prefix)
    return name, "2d" if dim == 2 else "3d_fullres", api.resolve_device(device), dataset_json


def started_trainer(cls, name: str, plans_name: str, configuration: str, dataset_json: dict, device,
                    semidiff: dict | None = None):
    """Build ``cls`` on the dataset's plans (``semidiff`` = the run config, None for stock trainers) and run
    nnU-Net's start-of-training and start-of-epoch hooks, with its log file silenced."""
    from semidiff_nnunet import planning
    from semidiff_nnunet.training import RunConfig

    plans = planning.load_plans(name, plans_name)
    plans["continue_training"] = False
    if semidiff is not None:
        RunConfig.from_json(semidiff).write(plans)
    t = cls(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json, device=device)
    t.print_to_log_file = lambda *a, **k: None
    t.on_train_start()
    t.on_train_epoch_start()
    t.iteration = getattr(t, "burnin_iterations", 0)  # measure the method's full step, not the burn-in
    return t


def fixed_batches(trainer) -> tuple[dict, dict | None]:
    """Fetch one labeled and one unlabeled batch, stop the unlabeled loader's workers and make every later
    step reuse that unlabeled batch (no augmentation timed); returns ``(labeled, unlabeled)``."""
    import itertools

    labeled = next(trainer.dataloader_train)
    if trainer.dataloader_unlabeled is None:
        return labeled, None
    unlabeled = next(trainer.dataloader_unlabeled)
    trainer._shutdown_unlabeled_loader()
    trainer.dataloader_unlabeled = itertools.repeat(unlabeled)
    return labeled, unlabeled


def median_timer(device):
    """``timed(fn, steps, warmup)``: the median wall time of ``fn`` over ``steps`` calls after ``warmup``
    calls (CUDA synchronised around each call)."""
    import statistics
    import time

    import torch

    def timed(fn, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timed


def ms(seconds: float) -> str:
    """A duration as the cost scripts print it: ``  1234.5 ms``."""
    return f"{seconds * 1000:8.1f} ms"


def save_json(path: str | None, result) -> None:
    """Write ``result`` to ``path`` (the scripts' ``--json``) when one is given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
