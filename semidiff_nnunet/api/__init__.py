"""The Python API behind the ``semidiff`` command line (the CLI only parses and prints).

    from semidiff_nnunet import api
    api.plan_and_preprocess("Dataset990_Demo2D", ["2d"])
    run = api.train("Dataset990_Demo2D", "mean-teacher", labeled="0.1", configuration="2d", device="cpu")
    api.predict("Dataset990_Demo2D", "mean-teacher", labeled="0.1", configuration="2d", input=..., output=...)
    api.evaluate("Dataset990_Demo2D", pred=..., ref=...)

Importing the api is light (no torch, no nnU-Net): listing methods and plugins must answer at once.
Functions that train, plan or predict import what they need when called.

``--set`` items (``overrides``) are ``{"key": "value"}`` or a list of ``"key=value"`` strings:
``key`` is a hyperparameter of the method, ``phase.NAME`` the length of one of its training
phases (a share of the run like ``0.3`` or a number of epochs like ``40``), and
``method:key`` restricts an item to one method (for :func:`benchmark`, where ``key`` alone
applies to every method that has it).

One module per command, the names below re-exported here:

=================  ==========================================================================================
``options``        option checks shared by the commands (fold, ``--set``, counts, device, folders, plans)
``installed``      installed methods and plugins, a method's trainer class, the trainer shim for nnU-Net
``environment``    the workspace and ``semidiff env``
``preprocessing``  nnU-Net's fingerprint, plans and preprocessing (``plan-and-train``'s first half)
``run_folders``    where a run lives (:class:`RunInfo`)
``splits``         ``semidiff split``: labeled / unlabeled / validation / held-out cases
``training``       ``semidiff train`` and ``plan-and-train``
``prediction``     ``semidiff predict``
``evaluation``     ``semidiff evaluate``
``demo``           ``semidiff demo``
``benchmarking``   ``semidiff benchmark``: its options, then :mod:`~semidiff_nnunet.api.benchmark_runs`
``benchmark_runs`` the benchmark's runs, scores, tables and figures
=================  ==========================================================================================

Inside the package a module calls another through the module (``installed.method_trainer(...)``), so that a
test replaces a function in one place: ``monkeypatch.setattr(installed, "method_trainer", fake)`` (replacing
the name re-exported here changes only what callers of ``api.method_trainer`` get).
"""

from semidiff_nnunet import paths, planning
from semidiff_nnunet.api.benchmarking import benchmark
from semidiff_nnunet.api.demo import DEMO_PLANS, prepare_demo_dataset, run_demo
from semidiff_nnunet.api.environment import ensure_workspace, env_lines
from semidiff_nnunet.api.evaluation import evaluate, summary_notes, summary_table_rows
from semidiff_nnunet.api.installed import (
    SHIM_MODULE,
    activate_trainer_shim,
    list_methods,
    list_plugins,
    method_trainer,
    skipped_plugins,
    write_trainer_shim,
)
from semidiff_nnunet.api.options import (
    TrainOptions,
    check_fold,
    check_pretrained_weights,
    check_train_options,
    configuration_dim,
    method_overrides,
    parse_fold,
    parse_list,
    parse_overrides,
    resolve_device,
    unique_folds,
)
from semidiff_nnunet.api.prediction import input_cases, predict, trained_variants
from semidiff_nnunet.api.preprocessing import plan_and_preprocess
from semidiff_nnunet.api.run_folders import RunInfo, results_root, run_info, run_root
from semidiff_nnunet.api.splits import check_split, fold_keys, held_out_cases, split
from semidiff_nnunet.api.training import (
    _check_resumed_world_size,  # noqa: F401 (tests/test_distributed.py)
    plan_and_train,
    run_trainer,
    train,
)

_results_root = results_root  # the older name (tests/test_presets.py)

__all__ = [
    "DEMO_PLANS", "SHIM_MODULE", "RunInfo", "TrainOptions", "activate_trainer_shim", "benchmark", "check_fold",
    "check_pretrained_weights", "check_split", "check_train_options", "configuration_dim", "ensure_workspace",
    "env_lines", "evaluate", "fold_keys", "held_out_cases", "input_cases", "list_methods", "list_plugins",
    "method_overrides", "method_trainer", "parse_fold", "parse_list", "parse_overrides", "paths", "plan_and_preprocess",
    "plan_and_train", "planning", "predict", "prepare_demo_dataset", "resolve_device", "results_root", "run_demo",
    "run_info", "run_root", "run_trainer", "skipped_plugins", "split", "summary_notes", "summary_table_rows", "train",
    "trained_variants", "unique_folds", "write_trainer_shim",
]
