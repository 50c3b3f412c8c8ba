"""``semidiff``: the command line. Parses options, calls :mod:`semidiff_nnunet.api`, prints with rich.

It imports only the api (light at import time), typer and rich: ``semidiff methods``, ``semidiff
plugins`` and ``--help`` import neither torch nor nnU-Net. Every user mistake, including the ones
typer/click catch (unknown option, bad value, missing argument, unknown command), ends in one
sentence on stderr, never a traceback; Ctrl-C ends with exit code 130 and says how to resume.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from semidiff_nnunet import api
from semidiff_nnunet.cli.progress import RichTrainingProgress
from semidiff_nnunet.errors import SemidiffError

app = typer.Typer(
    name="semidiff",
    help="Semi-supervised segmentation methods on nnU-Net v2.\n\n"
         "Example: semidiff plan-and-train Dataset990_Demo2D -m mean-teacher --labeled 0.1 -c 2d --device cpu",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

Method = Annotated[str, typer.Option("-m", "--method", help="Method name (see `semidiff methods`).")]
Labeled = Annotated[str, typer.Option("--labeled", help="Labeled cases: a fraction in (0,1] (0.1; 1.0 is all), a "
                                                        "count (8; 1 is one case), or a file of case ids.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the labeled subset and training.")]
Config = Annotated[str, typer.Option("-c", "--configuration", help="nnU-Net configuration (2d, 3d_fullres, ...).")]
Fold = Annotated[str, typer.Option("-f", "--fold", help="Fold of splits_final.json: 0-4 or all.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, else mps, else cpu), cpu, cuda or mps.")]
Plans = Annotated[str | None, typer.Option("--plans", help="Plans name (default nnUNetPlans, or the "
                                                          "--gpu-memory-target plans).")]
GpuTarget = Annotated[float | None, typer.Option("--gpu-memory-target", help="GPU memory in GB to plan for (nnU-Net's "
                                                 "planner target; plans named nnUNetPlans_<GB>GB).")]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Training epochs (nnU-Net: 1000).")]
Iters = Annotated[int | None, typer.Option("--iters-per-epoch", help="Training iterations per epoch (nnU-Net: 250).")]
ValIters = Annotated[int | None, typer.Option("--val-iters", help="Validation iterations per epoch (nnU-Net: 50, "
                                              "where a short CPU run spends most of its time; 0 skips them).")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a hyperparameter (key=value) or a training phase's length (phase.NAME=0.3 for a share "
                  "of the run, phase.NAME=40 for epochs); repeatable.")]
Continue = Annotated[bool, typer.Option("--continue", help="Resume an interrupted run from its last checkpoint.")]
SaveEvery = Annotated[int | None, typer.Option("--save-every", help="Write checkpoint_latest every N epochs "
                                                                    "(nnU-Net: 50).")]
NoVal = Annotated[bool, typer.Option("--no-val", help="Skip the final validation of the fold.")]
Nproc = Annotated[int, typer.Option("--nproc", "--num-gpus", metavar="N",
                                     help="Train with N processes on this node (torch.distributed DDP): one per "
                                          "GPU on CUDA, N CPU ranks with gloo under --device cpu; the global batch "
                                          "is split over them. Under torchrun leave it at 1.")]
Planner = Annotated[str | None, typer.Option(
    "-pl", "--planner", help="nnU-Net experiment planner class (nnUNetv2_plan_and_preprocess -pl): ExperimentPlanner "
                             "(default), nnUNetPlannerResEncM / L / XL (residual encoder presets) or any planner nnU-Net "
                             "finds; plans are named after it (nnUNetResEncUNetMPlans).")]
Pretrained = Annotated[Path | None, typer.Option(
    "--pretrained-weights", help="Checkpoint (stock nnU-Net's or a semidiff run's checkpoint_final.pth) that "
                                 "initialises the network of a new run (nnU-Net's -pretrained_weights); EMA "
                                 "teachers start from it too.")]
Processes = Annotated[int, typer.Option("-np", "--num-processes", help="Worker processes for planning and "
                                                                     "preprocessing.")]
Wait = Annotated[bool, typer.Option("--wait", help="If another semidiff command is training this run (or writing "
                                                  "the dataset's preprocessed data), wait for it to end instead of "
                                                  "refusing; then go on from what it left.")]
HeldOutRun = Annotated[float | None, typer.Option(
    "--held-out", help="The run's held-out share of the fold's validation cases (a semidiff benchmark run on a "
                       "dataset without imagesTs), e.g. 0.5.")]

StageRun = Annotated[str, typer.Option(
    "--stage", help="The run's stage of semidiff benchmark --from-checkpoint (its folder suffix, e.g. first-e24 or "
                    "from-first-e24; see the benchmark's table).")]

# What Ctrl-C leaves behind, said by the command that is running (see main()).
_INTERRUPTED = {
    "train": "Interrupted: the run's last checkpoint (checkpoint_latest.pth, written every --save-every epochs) "
             "is kept; run the same command with --continue to resume it.",
    "benchmark": "Interrupted: finished runs and the current run's last checkpoint are kept; run the same "
                 "command again to resume.",
    "demo": "Interrupted: finished runs and the current run's last checkpoint are kept; run semidiff demo "
            "again to resume.",
}
_running = {"command": "", "sigint": False, "active": False, "at_fork": False}


def _progress_bar() -> RichTrainingProgress:
    return RichTrainingProgress(stop_requested=lambda: _running["sigint"])


def _announce_workspace() -> None:
    filled, workspace = api.ensure_workspace()
    if filled:
        console.print(f"[dim]{escape(', '.join(filled))} not set; using the workspace {escape(str(workspace))} "
                      f"(set SEMIDIFF_HOME or nnU-Net's variables to change it).[/dim]", soft_wrap=True)


def _say(message: str) -> None:
    console.print(escape(message), soft_wrap=True, highlight=False)


def _report_run(info, t0: float) -> None:
    console.print(f"[green]Done[/green] ({time.time() - t0:.0f} s): {escape(str(info.fold_folder))}", soft_wrap=True)
    summary = info.fold_folder / "validation" / "summary.json"
    if summary.is_file():
        fg = json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["Dice"]
        console.print(f"validation mean foreground Dice: {fg:.4f}")


@app.command("plan-and-train")
def plan_and_train(
    dataset: Annotated[str, typer.Argument(help="Dataset id (990) or name (Dataset990_Demo2D) in nnUNet_raw.")],
    method: Method = "mean-teacher",
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    configuration: Config = "2d",
    fold: Fold = "0",
    device: Device = "auto",
    epochs: Epochs = None,
    iters_per_epoch: Iters = None,
    val_iters: ValIters = None,
    sets: Sets = None,
    cont: Continue = False,
    plans: Plans = None,
    gpu_memory_target: GpuTarget = None,
    save_every: SaveEvery = None,
    no_val: NoVal = False,
    num_processes: Processes = 2,
    nproc: Nproc = 1,
    planner: Planner = None,
    pretrained_weights: Pretrained = None,
    wait: Wait = False,
):
    """Plan and preprocess DATASET with nnU-Net (once), then train METHOD on a labeled fraction.

    Example: semidiff plan-and-train 990 -m mean-teacher --labeled 0.1 -c 2d --device cpu --epochs 20

    Residual-encoder presets as in nnU-Net: semidiff plan-and-train 990 -m diffcl --labeled 0.1 -pl nnUNetPlannerResEncM
    """
    _running["command"] = "train"
    _announce_workspace()
    t0 = time.time()
    bar = _progress_bar()
    try:
        info = api.plan_and_train(dataset, method, labeled=labeled, seed=seed, configuration=configuration, fold=fold,
                                  device=device, epochs=epochs, iters_per_epoch=iters_per_epoch, overrides=sets,
                                  continue_training=cont, plans_name=plans, gpu_memory_target=gpu_memory_target,
                                  num_processes=num_processes, val_iters_per_epoch=val_iters, save_every=save_every,
                                  final_validation=not no_val, show_progress=True, progress=bar, nproc=nproc,
                                  planner=planner, pretrained_weights=pretrained_weights, wait=wait, log=_say)
    finally:
        bar.close()
    _report_run(info, t0)


@app.command()
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name (already preprocessed).")],
    method: Method = "mean-teacher",
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    configuration: Config = "2d",
    fold: Fold = "0",
    device: Device = "auto",
    epochs: Epochs = None,
    iters_per_epoch: Iters = None,
    val_iters: ValIters = None,
    sets: Sets = None,
    cont: Continue = False,
    plans: Plans = None,
    save_every: SaveEvery = None,
    no_val: NoVal = False,
    nproc: Nproc = 1,
    pretrained_weights: Pretrained = None,
    wait: Wait = False,
    held_out: HeldOutRun = None,
):
    """Train METHOD on an already preprocessed dataset.

    Example: semidiff train 990 -m diffrect --labeled 0.1 --set refine_start=40 --epochs 20 --val-iters 5
    """
    _running["command"] = "train"
    _announce_workspace()
    t0 = time.time()
    bar = _progress_bar()
    try:
        info = api.train(dataset, method, labeled=labeled, seed=seed, configuration=configuration, fold=fold,
                         device=device, epochs=epochs, iters_per_epoch=iters_per_epoch, overrides=sets,
                         continue_training=cont, plans_name=plans or "nnUNetPlans", val_iters_per_epoch=val_iters,
                         save_every=save_every, final_validation=not no_val, show_progress=True, progress=bar,
                         nproc=nproc, pretrained_weights=pretrained_weights, wait=wait, log=_say,
                         held_out=held_out)
    finally:
        bar.close()
    _report_run(info, t0)


@app.command()
def predict(
    dataset: Annotated[str, typer.Option("-d", "--dataset", help="Dataset id or name the model was trained on.")],
    input: Annotated[Path, typer.Option("-i", "--input", help="Folder of images (CASE_0000.ext).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder for segmentations.")],
    method: Method = "mean-teacher",
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    configuration: Config = "2d",
    fold: Annotated[list[str], typer.Option("-f", "--fold", help="Fold(s) to ensemble: 0-4 or all; "
                                                                 "repeatable.")] = ["0"],  # noqa: B006
    device: Device = "auto",
    plans: Plans = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint file in the fold folder: "
                                                                 "checkpoint_final.pth (end of training), "
                                                                 "checkpoint_best.pth (best validation pseudo "
                                                                 "Dice) or checkpoint_latest.pth.")]
    = "checkpoint_final.pth",
    no_mirroring: Annotated[bool, typer.Option("--disable-tta", help="No mirroring test-time augmentation.")] = False,
    save_probabilities: Annotated[bool, typer.Option(
        "--save-probabilities", help="Also write the softmax probabilities (nnU-Net's CASE.npz + CASE.pkl, what "
                                     "nnUNetv2_ensemble reads).")] = False,
    step_size: Annotated[float, typer.Option(
        "--step-size", help="Sliding-window step as a share of the patch size, in (0, 1] (nnU-Net's -step_size; "
                            "smaller is slower and slightly better).")] = 0.5,
    held_out: HeldOutRun = None,
    stage: StageRun = "",
):
    """Segment a folder of images with a trained run (nnU-Net's sliding window); several -f are ensembled."""
    _announce_workspace()
    folder = api.predict(dataset, method, input, output, labeled=labeled, seed=seed, configuration=configuration,
                         folds=tuple(fold), device=device, plans_name=plans or "nnUNetPlans",
                         checkpoint=checkpoint, use_mirroring=not no_mirroring, tile_step_size=step_size,
                         save_probabilities=save_probabilities, held_out=held_out, stage=stage,
                         log=lambda message: console.print(f"[yellow]Warning:[/yellow] {escape(message)}."))
    folds = api.unique_folds(fold)
    console.print(f"[green]Predictions written to[/green] {escape(str(folder))} ("
                  f"{'an ensemble of ' + str(len(folds)) + ' folds' if len(folds) > 1 else 'one fold'}: "
                  f"{', '.join(map(str, folds))}"
                  f"{'; probabilities in CASE.npz + CASE.pkl' if save_probabilities else ''})")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted segmentations.")],
    ref: Annotated[Path, typer.Option("--ref", help="Folder of reference segmentations.")],
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Dataset (for labels and file ending).")] = None,
    output_file: Annotated[Path | None, typer.Option("-o", "--output", help="summary.json path "
                                                                            "(default PRED/summary.json).")] = None,
    num_processes: Annotated[int, typer.Option("-np", "--num-processes", help="Worker processes computing the "
                                                                              "metrics.")] = 2,
):
    """Dice, Jaccard, HD95 and ASD per class, and the dataset-level mIoU; writes summary.json (nnU-Net's fields
    plus ours)."""
    _announce_workspace()
    summary = api.evaluate(dataset, pred, ref, output_file, num_processes)
    unit = summary.get("distance_unit", "mm")
    table = Table(title=f"Evaluation of {escape(str(pred))}")
    for col in ("label", "Dice", "Jaccard", f"HD95 ({unit})", f"ASD ({unit})"):
        table.add_column(col, justify="right")
    for row in api.summary_table_rows(summary):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else escape(str(v)) for v in row])
    out.print(table)
    per_class = ", ".join(f"{k}: {v:.4f}" for k, v in summary["dataset_iou"].items())
    out.print(f"Dataset-level mIoU (background included; per class {escape(per_class)}): {summary['mIoU']:.4f}")
    for note in api.summary_notes(summary):
        out.print(f"Note: {escape(note)}.")


@app.command()
def methods():
    """Registered methods: name, summary, paper, provider."""
    table = Table(title="semidiff methods")
    for col in ("name", "summary", "paper", "provider"):
        table.add_column(col)
    for m in api.list_methods():
        table.add_row(*(escape(str(v)) for v in (m["name"], m["summary"], m["reference"],
                                                 f"{m['provider']} ({m['distribution']})")))
    out.print(table)


@app.command()
def plugins():
    """Installed plugins, their distribution and the hooks they implement; broken plugins too."""
    infos, failures = api.list_plugins()
    table = Table(title="semidiff plugins")
    for col in ("plugin", "distribution", "module", "hooks"):
        table.add_column(col)
    for p in infos:
        table.add_row(*(escape(v) for v in (p.name, f"{p.distribution} {p.version}", p.module, ", ".join(p.hooks))))
    out.print(table)
    for f in failures:
        out.print(f"[red]plugin {escape(repr(f.name))} ({escape(f.distribution)}):[/red] "
                  f"{escape(f.error)}", soft_wrap=True)
    skipped = api.skipped_plugins()
    if skipped:
        out.print(f"{len(skipped)} third-party plugin(s) not loaded ({escape(', '.join(skipped))}): "
                  "SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD is set.", soft_wrap=True)


@app.command()
def split(
    dataset: Annotated[str, typer.Option("-d", "--dataset", help="Dataset id or name.")],
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    fold: Fold = "0",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    held_out: Annotated[float | None, typer.Option(
        "--held-out", help="Also keep this share of the validation cases apart for scoring, as semidiff benchmark "
                           "does on a dataset without imagesTs (e.g. 0.5).")] = None,
):
    """Which cases are labeled / unlabeled / validation (/ held out) for a run."""
    _announce_workspace()
    s = api.split(dataset, labeled, seed, fold, held_out=held_out)
    if as_json:
        out.print_json(json.dumps(s.to_json()))
        return
    table = Table(title=escape(f"split: labeled {labeled}, seed {seed}, fold {fold}"))
    table.add_column("kind")
    table.add_column("n", justify="right")
    table.add_column("cases")
    kinds = [("labeled", s.labeled), ("unlabeled", s.unlabeled), ("unlabeled (imagesUnlabeled)", s.extra_unlabeled),
             ("validation", s.validation)]
    if held_out is not None:
        kinds.append(("held out (scored only)", s.held_out))
    for kind, cases in kinds:
        table.add_row(kind, str(len(cases)), escape(", ".join(cases)))
    out.print(table)


@app.command()
def env(
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Unused; kept for older scripts.",
                                                hidden=True)] = None,
    method: Annotated[str | None, typer.Option("-m", "--method", help="Point nnUNet_results at this method's runs "
                                                                      "(with --labeled and --seed).")] = None,
    labeled: Labeled = "0.1",
    seed: Seed = 0,
):
    """Print the export lines stock nnU-Net commands need: eval "$(semidiff env)"."""
    run_dir = api.run_root(method, labeled, seed) if method else None
    for line in api.env_lines(run_dir):
        print(line)


@app.command()
def demo(
    dim: Annotated[int, typer.Option("--dim", help="Dimensionality of the synthetic dataset: 2 or 3.")] = 2,
    device: Device = "cpu",
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs per method (default 20 in 2D, "
                                                                "10 in 3D).")] = None,
    methods_: Annotated[str, typer.Option("-m", "--methods", help="Comma-separated methods.")] = "supervised,mean-teacher",
    labeled: Labeled = "0.2",
):
    """Generate a synthetic dataset, plan it, train supervised and mean-teacher briefly, predict, print Dice."""
    _running["command"] = "demo"
    _announce_workspace()
    t0 = time.time()
    result = api.run_demo(dim=dim, device=device, methods=api.parse_list(methods_, "--methods"), labeled=labeled,
                          epochs=epochs, log=console.print, make_progress=_progress_bar)
    table = Table(title=escape(f"semidiff demo ({dim}D, labeled {labeled}, test cases {result['num_test']})"))
    table.add_column("method")
    for label in result["labels"]:
        table.add_column(escape(f"Dice {label}"), justify="right")
    table.add_column("mean Dice", justify="right")
    for method, row in result["dice"].items():
        table.add_row(method, *[f"{row[label]:.4f}" for label in result["labels"]], f"{row['mean']:.4f}")
    out.print(table)
    console.print(f"demo finished in {time.time() - t0:.0f} s; runs under {escape(str(result['runs_root']))}")


@app.command()
def benchmark(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name.")],
    methods_: Annotated[str, typer.Option("-m", "--methods", help=(
        "Comma-separated methods; METHOD@LABEL is a variant with its own --set METHOD@LABEL:key=value "
        "(an ablation beside the method)."))] = "supervised,mean-teacher",
    labeled: Annotated[str, typer.Option("--labeled", help="Comma-separated labeled specs, e.g. 0.05,0.1,0.2.")] = "0.1",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0",
    configuration: Config = "2d",
    fold: Fold = "0",
    device: Device = "auto",
    epochs: Epochs = None,
    iters_per_epoch: Iters = None,
    val_iters: Annotated[int | None, typer.Option("--val-iters", help="Validation iterations per epoch "
                                                                      "(default 10).")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value for every method that has the key, METHOD:key=value for one method "
                      "(phase.NAME=... for phase lengths); repeatable.")] = None,
    plans: Plans = None,
    gpu_memory_target: GpuTarget = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for benchmark.csv/.md/.png.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their state, then exit.")] = False,
    num_processes: Processes = 2,
    planner: Planner = None,
    held_out: Annotated[float | None, typer.Option(
        "--held-out", help="Without imagesTs/labelsTs: the share of the fold's validation cases kept apart for "
                           "scoring (default 0.5); the runs never train nor validate on them, the rest selects "
                           "checkpoints.")] = None,
    from_checkpoint: Annotated[str | None, typer.Option(
        "--from-checkpoint", help="Two stages: auto trains supervised first (--first-epochs), or give its "
                                  "checkpoint per labeled spec and seed as a path with {labeled} and {seed}; then "
                                  "every method, and supervised as the control, trains --epochs more from it. "
                                  "Adds the gain over the control, per seed.")] = None,
    first_epochs: Annotated[int | None, typer.Option(
        "--first-epochs", help="With --from-checkpoint auto: epochs of the supervised first stage (default "
                               "--epochs).")] = None,
):
    """Train, predict and evaluate every (method, labeled, seed); write benchmark.csv, .md and .png.

    Runs are scored on imagesTs/labelsTs, else on a held-out share of the fold's validation cases that no
    selection sees; with the final and with the best checkpoint (columns Dice and Dice (best ckpt)).

    Example: semidiff benchmark 990 -m supervised,mean-teacher --labeled 0.05,0.1,0.2 --seeds 0,1,2 -c 2d

    From a trained start: semidiff benchmark 990 -m all --from-checkpoint auto --first-epochs 100 --epochs 50
    """
    _running["command"] = "benchmark"
    _announce_workspace()
    result = api.benchmark(dataset, methods_, labeled, seeds, configuration=configuration, fold=fold, device=device,
                           epochs=epochs, iters_per_epoch=iters_per_epoch, val_iters_per_epoch=val_iters,
                           overrides=sets, plans_name=plans, gpu_memory_target=gpu_memory_target, output=output,
                           dry_run=dry_run, num_processes=num_processes, log=console.print,
                           make_progress=_progress_bar, planner=planner, held_out=held_out,
                           from_checkpoint=from_checkpoint, first_epochs=first_epochs)
    if dry_run:
        runs = result["runs"]
        table = Table(title=f"{len(runs)} run(s)")
        for col in ("method", "labeled", "seed", "--set", "status", "folder"):
            table.add_column(col)
        for r in runs:
            sets = " ".join(f"{k}={v}" for k, v in result["overrides"][r.method].items())
            table.add_row(*(escape(str(v)) for v in (r.label, r.labeled, r.seed, sets, r.status, r.info.fold_folder)))
        out.print(table)
        share = result.get("held_out_share")
        out.print("held out: imagesTs/labelsTs" if share is None else
                  f"held out: {share:g} of the fold's validation cases (never trained nor validated on)")
        return
    out.print(result["markdown"], markup=False)
    console.print(f"[green]Wrote[/green] {escape(str(result['output']))}/benchmark.csv, benchmark.md, benchmark.png, "
                  f"held_out.json" + (", first_stage.json, first_stage_*.png" if from_checkpoint else ""))


def _register_convert() -> None:
    from semidiff_nnunet.cli.convert import ConvertCommand, convert_command

    app.command("convert", cls=ConvertCommand)(convert_command)


_register_convert()


# ---------------------------------------------------------------------------------------------- errors
def _typer_exception_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage/click errors, Abort, Exit) classes of the click that typer runs on.

    typer >= 0.2x ships its own copy of click (``typer._click``, errors derived from
    ``typer.exceptions``); older typer uses the real ``click``. Both are collected, so that the CLI
    answers in one sentence whichever typer the dependency range resolves to.
    """
    import importlib

    errors, aborts, exits = [], [], []
    modules = []
    for name in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    for mod in modules:
        for cls_name, found in (("ClickException", errors), ("TyperException", errors), ("Abort", aborts),
                                ("Exit", exits)):
            cls = getattr(mod, cls_name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(errors), tuple(aborts), tuple(exits)


def _usage_sentence(e: BaseException) -> str:
    """click's message plus where to look, as one sentence: "No such option: --epoch (see semidiff train --help)."."""
    import re

    message = " ".join(str(e.format_message() if hasattr(e, "format_message") else e).split())
    parts = re.split(r"(?<=[.?!]) ", message)  # typer 0.20-0.24 on click >= 8.3 says "Did you mean" twice
    message = " ".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])
    ctx = getattr(e, "ctx", None)
    where = getattr(ctx, "command_path", "") or "semidiff"
    return f"{message.rstrip('.')} (see {where} --help)."


def _error(message: str, code: int):
    console.print(f"[bold red]Error:[/bold red] {escape(message)}", soft_wrap=True, highlight=False)
    sys.exit(code)


def _interrupted():
    console.print(escape(_INTERRUPTED.get(_running["command"], "Interrupted.")), soft_wrap=True, highlight=False)
    sys.exit(130)


def _tolerant_streams() -> None:
    """Under a non-UTF-8 locale (LANG unset, ``C`` without coercion), print "?" for characters the
    terminal cannot encode (rich's ellipsis, progress bars) instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _on_sigint(signum, frame):
    _running["sigint"] = True
    raise KeyboardInterrupt


def _quiet_swallowed_interrupt(hook):
    """A Ctrl-C that lands in a finaliser or weakref callback is swallowed by Python, which prints
    "Exception ignored in ... KeyboardInterrupt" with a traceback; the progress bar raises it again at the
    next iteration (``stop_requested``), so nothing needs printing."""

    def unraisable(info):
        if not (isinstance(info.exc_type, type) and issubclass(info.exc_type, KeyboardInterrupt)):
            hook(info)

    return unraisable


def _quiet_threads_after_interrupt(hook):
    """After Ctrl-C, nnU-Net's augmentation threads may fail on a batch their stopped workers never
    finished (batchgenerators' ``results_loop``: a shared-memory handle that is gone); Python prints such a
    thread's traceback. Once the interruption is under way that is noise: only the one sentence is said."""

    def excepthook(args):
        if not _running.get("sigint"):
            hook(args)

    return excepthook


def _forked_children_ignore_ctrl_c() -> None:
    """Ctrl-C in a terminal signals every process of the foreground group. nnU-Net's augmentation workers
    (forked) would die mid-batch, print their own KeyboardInterrupt tracebacks and make the training fail
    with "background workers are no longer alive"; instead, while the CLI runs, forked children ignore
    SIGINT and the CLI process stops and shuts them down. SIGINT is blocked across the fork, so no child
    runs Python's handler before it ignores the signal (a pending one is then discarded)."""
    import signal

    if _running.get("at_fork") or not hasattr(os, "register_at_fork") or not hasattr(signal, "pthread_sigmask"):
        return

    def before():
        if _running["active"]:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def after_in_parent():
        if _running["active"]:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def after_in_child():
        if _running["active"]:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)
    _running["at_fork"] = True


def main(args: list[str] | None = None) -> None:
    import signal

    _tolerant_streams()
    click_errors, aborts, exits = _typer_exception_classes()
    # Ctrl-C in a terminal also stops nnU-Net's augmentation workers; the training may then fail with
    # "background workers are no longer alive" before it sees the KeyboardInterrupt, or Python may swallow
    # the KeyboardInterrupt in a finaliser: remember the signal (unless SIGINT is ignored, as for a
    # background job) and report an interruption either way.
    _running["sigint"] = False
    previous = signal.getsignal(signal.SIGINT)
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _quiet_swallowed_interrupt(unraisable_hook)
        threading.excepthook = _quiet_threads_after_interrupt(thread_hook)
        _forked_children_ignore_ctrl_c()
        _running["active"] = True
    try:
        rv = app(args=args, prog_name="semidiff", standalone_mode=False)
    except SemidiffError as e:
        _error(str(e), 1)
    except KeyboardInterrupt:
        _interrupted()
    except aborts:  # click turns Ctrl-C (and EOF at a prompt) into Abort
        _interrupted()
    except exits as e:
        sys.exit(getattr(e, "exit_code", 0))
    except click_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `semidiff` alone: the help
            out.print(e.format_message(), markup=False, highlight=False)
            sys.exit(0)
        _error(_usage_sentence(e), getattr(e, "exit_code", 2))
    except Exception:
        if _running["sigint"]:
            _interrupted()
        raise
    finally:
        _running["active"] = False
        sys.unraisablehook = unraisable_hook
        if not _running["sigint"]:  # after Ctrl-C the process is ending: dying loader threads stay quiet
            threading.excepthook = thread_hook
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    # typer >= 0.2x returns 130 for Ctrl-C (its KeyboardInterrupt -> Exit(130)) when not standalone
    if rv == 130 or _running["sigint"]:
        _interrupted()
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
