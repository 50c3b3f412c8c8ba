"""``semidiff demo``: the whole job on a synthetic dataset (plan, train, predict, evaluate) in minutes on a CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from semidiff_nnunet import paths, planning
from semidiff_nnunet.api import evaluation, options, prediction, preprocessing, run_folders, training
from semidiff_nnunet.errors import SemidiffError

if TYPE_CHECKING:
    from semidiff_nnunet.training.progress import TrainingProgress


DEMO_PLANS = "semidiffDemoPlans"


def prepare_demo_dataset(dim: int = 2, num_unlabeled: int = 0, show_progress: bool = True,
                         max_features: int | None = None, batch_size: int | None = None, **generator_kwargs) -> str:
    """Generate the synthetic dataset, plan and preprocess it, and write small CPU plans; return its name."""
    from semidiff_nnunet.synthetic import generate_demo_dataset

    paths.ensure_nnunet_env()
    folder = generate_demo_dataset(paths.raw_root(), dim=dim, num_unlabeled=num_unlabeled, **generator_kwargs)
    name = folder.name
    configuration = "2d" if dim == 2 else "3d_fullres"
    preprocessing.plan_and_preprocess(name, [configuration], num_processes=2, fingerprint_voxels=1e5,
                                      show_progress=show_progress)
    planning.shrink_plans(name, "nnUNetPlans", DEMO_PLANS, max_features=max_features or (32 if dim == 2 else 16),
                          batch_size=batch_size or (4 if dim == 2 else 2))
    return name


def run_demo(dim: int = 2, device: str = "cpu", methods: list[str] | None = None, labeled: str = "0.2",
             epochs: int | None = None, iters_per_epoch: int | None = None, seed: int = 0, log=print,
             make_progress: Callable[[], TrainingProgress] | None = None) -> dict:
    """The whole job on synthetic data: plan, train each method, predict imagesTs, evaluate; return Dice."""
    if dim not in (2, 3):
        raise SemidiffError(f"--dim {dim}: the demo dataset is 2 or 3 dimensional.")
    methods = methods or ["supervised", "mean-teacher"]
    for m in methods:
        options.check_train_options(m, labeled, 0, device, epochs=epochs, iters_per_epoch=iters_per_epoch,
                                    configuration="2d" if dim == 2 else "3d_fullres", dim=dim)
    name = prepare_demo_dataset(dim)
    configuration = "2d" if dim == 2 else "3d_fullres"
    epochs = epochs or (20 if dim == 2 else 10)
    iters_per_epoch = iters_per_epoch or (25 if dim == 2 else 10)
    raw = planning.raw_folder(name)
    result = {"dice": {}, "labels": [], "num_test": len(list((raw / "labelsTs").iterdir())),
              "runs_root": str(paths.runs_root())}
    for m in methods:
        info = run_folders.run_info(name, m, labeled, seed, configuration, 0, DEMO_PLANS)
        log(f"[bold]{m}[/bold]: training {epochs} epochs x {iters_per_epoch} iterations on {device}")
        if not info.finished:
            training.train(name, m, labeled=labeled, seed=seed, configuration=configuration, fold=0, device=device,
                           epochs=epochs, iters_per_epoch=iters_per_epoch, plans_name=DEMO_PLANS,
                           val_iters_per_epoch=5, save_every=max(1, epochs // 4), final_validation=False,
                           continue_training=info.resumable_checkpoint() is not None,
                           progress=make_progress() if make_progress else None)
        pred = info.fold_folder / "predictions_imagesTs"
        prediction.predict(name, m, raw / "imagesTs", pred, labeled=labeled, seed=seed, configuration=configuration,
                           device=device, plans_name=DEMO_PLANS)
        summary = evaluation.evaluate(name, pred, raw / "labelsTs")
        names = {str(v): k for k, v in planning.dataset_json(raw)["labels"].items()}
        labels = sorted(summary["mean"])
        result["labels"] = [names.get(k, k) for k in labels]
        result["dice"][m] = {**{names.get(k, k): summary["mean"][k]["Dice"] for k in labels},
                             "mean": summary["foreground_mean"]["Dice"]}
    return result
