"""``semidiff``: the command line. Parses options, calls :mod:`semidiff_nnunet.api`, prints with rich."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

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
Labeled = Annotated[str, typer.Option("--labeled", help="Labeled cases: fraction in (0,1] (0.1), count (8), or a file of case ids.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the labeled subset and training.")]
Config = Annotated[str, typer.Option("-c", "--configuration", help="nnU-Net configuration (2d, 3d_fullres, ...).")]
Fold = Annotated[str, typer.Option("-f", "--fold", help="Fold of splits_final.json (0-4 or all).")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, else mps, else cpu), cpu, cuda or mps.")]
Plans = Annotated[str | None, typer.Option("--plans", help="Plans name (default nnUNetPlans, or the --gpu-memory-target plans).")]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Training epochs (nnU-Net: 1000).")]
Iters = Annotated[int | None, typer.Option("--iters-per-epoch", help="Iterations per epoch (nnU-Net: 250).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a hyperparameter: key=value (repeatable).")]
Continue = Annotated[bool, typer.Option("--continue", help="Resume an interrupted run.")]
SaveEvery = Annotated[int | None, typer.Option("--save-every", help="Write checkpoint_latest every N epochs (nnU-Net: 50).")]
NoVal = Annotated[bool, typer.Option("--no-val", help="Skip the final validation of the fold.")]


def _fold(value: str):
    return "all" if value == "all" else int(value)


def _announce_workspace() -> None:
    from semidiff_nnunet import paths

    filled = paths.ensure_nnunet_env()
    if filled:
        console.print(f"[dim]{', '.join(filled)} not set; using the workspace {paths.workspace()} "
                      f"(set SEMIDIFF_HOME or nnU-Net's variables to change it).[/dim]")


def _train_options(epochs, iters, sets):
    from semidiff_nnunet.training.hparams import parse_overrides

    if epochs is not None and epochs < 1:
        raise SemidiffError("--epochs must be at least 1.")
    if iters is not None and iters < 1:
        raise SemidiffError("--iters-per-epoch must be at least 1.")
    return parse_overrides(sets)


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
    sets: Sets = None,
    cont: Continue = False,
    plans: Plans = None,
    gpu_memory_target: Annotated[float | None, typer.Option("--gpu-memory-target", help="GB; plan for a smaller GPU/CPU (own plans name).")] = None,
    save_every: SaveEvery = None,
    no_val: NoVal = False,
    num_processes: Annotated[int, typer.Option("-np", "--num-processes", help="Processes for planning/preprocessing.")] = 2,
):
    """Plan and preprocess DATASET with nnU-Net (once), then train METHOD on a labeled fraction.

    Example: semidiff plan-and-train 990 -m mean-teacher --labeled 0.1 -c 2d --device cpu --epochs 20
    """
    from semidiff_nnunet import api

    _announce_workspace()
    overrides = _train_options(epochs, iters_per_epoch, sets)
    api.method_trainer(method)  # unknown method: fail before planning
    pname = api.plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target,
                                    plans_name=plans, num_processes=num_processes)
    _train(dataset, method, labeled, seed, configuration, fold, device, epochs, iters_per_epoch, overrides, cont,
           pname, save_every, no_val)


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
    sets: Sets = None,
    cont: Continue = False,
    plans: Plans = None,
    save_every: SaveEvery = None,
    no_val: NoVal = False,
):
    """Train METHOD on an already preprocessed dataset."""
    _announce_workspace()
    overrides = _train_options(epochs, iters_per_epoch, sets)
    _train(dataset, method, labeled, seed, configuration, fold, device, epochs, iters_per_epoch, overrides, cont,
           plans or "nnUNetPlans", save_every, no_val)


def _train(dataset, method, labeled, seed, configuration, fold, device, epochs, iters, overrides, cont, plans_name,
           save_every, no_val):
    from semidiff_nnunet import api

    t0 = time.time()
    info = api.train(dataset, method, labeled=labeled, seed=seed, configuration=configuration, fold=_fold(fold),
                     device=device, epochs=epochs, iters_per_epoch=iters, overrides=overrides,
                     continue_training=cont, plans_name=plans_name, save_every=save_every,
                     final_validation=not no_val, show_progress=True)
    console.print(f"[green]Done[/green] ({time.time() - t0:.0f} s): {info.fold_folder}")
    summary = info.fold_folder / "validation" / "summary.json"
    if summary.is_file():
        fg = json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["Dice"]
        console.print(f"validation mean foreground Dice: {fg:.4f}")


@app.command()
def predict(
    dataset: Annotated[str, typer.Option("-d", "--dataset", help="Dataset id or name the model was trained on.")],
    input: Annotated[Path, typer.Option("-i", "--input", help="Folder of images (CASE_0000.ext).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder for segmentations.")],
    method: Method = "mean-teacher",
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    configuration: Config = "2d",
    fold: Annotated[list[str], typer.Option("-f", "--fold", help="Fold(s) to ensemble.")] = ["0"],  # noqa: B006
    device: Device = "auto",
    plans: Plans = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint")] = "checkpoint_final.pth",
    no_mirroring: Annotated[bool, typer.Option("--disable-tta", help="No mirroring test-time augmentation.")] = False,
):
    """Segment a folder of images with a trained run (nnU-Net's sliding window)."""
    from semidiff_nnunet import api

    _announce_workspace()
    folder = api.predict(dataset, method, input, output, labeled=labeled, seed=seed, configuration=configuration,
                         folds=tuple(_fold(f) for f in fold), device=device, plans_name=plans or "nnUNetPlans",
                         checkpoint=checkpoint, use_mirroring=not no_mirroring)
    console.print(f"[green]Predictions written to[/green] {folder}")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted segmentations.")],
    ref: Annotated[Path, typer.Option("--ref", help="Folder of reference segmentations.")],
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Dataset (for labels and file ending).")] = None,
    output_file: Annotated[Path | None, typer.Option("-o", "--output", help="summary.json path (default PRED/summary.json).")] = None,
    num_processes: Annotated[int, typer.Option("-np", "--num-processes")] = 2,
):
    """Dice, Jaccard, HD95 and ASD per class; writes summary.json (nnU-Net's fields plus ours)."""
    from semidiff_nnunet import api
    from semidiff_nnunet.evaluation import summary_table_rows

    _announce_workspace()
    summary = api.evaluate(dataset, pred, ref, output_file, num_processes)
    table = Table(title=f"Evaluation of {pred}")
    for col in ("label", "Dice", "Jaccard", "HD95", "ASD"):
        table.add_column(col, justify="right")
    for row in summary_table_rows(summary):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    out.print(table)


@app.command()
def methods():
    """Registered methods: name, summary, paper, provider."""
    from semidiff_nnunet import api

    table = Table(title="semidiff methods")
    for col in ("name", "summary", "paper", "provider"):
        table.add_column(col)
    for m in api.list_methods():
        table.add_row(m["name"], m["summary"], m["reference"], f"{m['provider']} ({m['distribution']})")
    out.print(table)


@app.command()
def plugins():
    """Installed plugins, their distribution and the hooks they implement; broken plugins too."""
    from semidiff_nnunet import api

    infos, failures = api.list_plugins()
    table = Table(title="semidiff plugins")
    for col in ("plugin", "distribution", "module", "hooks"):
        table.add_column(col)
    for p in infos:
        table.add_row(p.name, f"{p.distribution} {p.version}", p.module, ", ".join(p.hooks))
    out.print(table)
    for f in failures:
        out.print(f"[red]plugin {f.name!r} ({f.distribution}) failed to load:[/red] {f.error}")


@app.command()
def split(
    dataset: Annotated[str, typer.Option("-d", "--dataset", help="Dataset id or name.")],
    labeled: Labeled = "0.1",
    seed: Seed = 0,
    fold: Fold = "0",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Which cases are labeled / unlabeled / validation for a run."""
    from semidiff_nnunet import api

    _announce_workspace()
    s = api.split(dataset, labeled, seed, _fold(fold))
    if as_json:
        out.print_json(json.dumps(s.to_json()))
        return
    table = Table(title=f"split: labeled {labeled}, seed {seed}, fold {fold}")
    table.add_column("kind")
    table.add_column("n", justify="right")
    table.add_column("cases")
    for kind, cases in (("labeled", s.labeled), ("unlabeled", s.unlabeled), ("unlabeled (imagesUnlabeled)",
                        s.extra_unlabeled), ("validation", s.validation)):
        table.add_row(kind, str(len(cases)), ", ".join(cases))
    out.print(table)


@app.command()
def env(
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="With -m: point nnUNet_results at that run.")] = None,
    method: Annotated[str | None, typer.Option("-m", "--method")] = None,
    labeled: Labeled = "0.1",
    seed: Seed = 0,
):
    """Print the export lines stock nnU-Net commands need: eval "$(semidiff env)"."""
    from semidiff_nnunet import api

    run_dir = None
    if method:
        from semidiff_nnunet import paths
        from semidiff_nnunet.training.splits import LabeledSpec

        api.method_trainer(method)
        run_dir = paths.run_root(method, LabeledSpec.parse(labeled).tag, seed)
    for line in api.env_lines(run_dir):
        print(line)


@app.command()
def demo(
    dim: Annotated[int, typer.Option("--dim", help="2 or 3.")] = 2,
    device: Device = "cpu",
    epochs: Annotated[int, typer.Option("--epochs")] = 0,
    methods_: Annotated[str, typer.Option("-m", "--methods", help="Comma-separated methods.")] = "supervised,mean-teacher",
    labeled: Labeled = "0.2",
):
    """Generate a synthetic dataset, plan it, train supervised and mean-teacher briefly, predict, print Dice."""
    from semidiff_nnunet import api

    if dim not in (2, 3):
        raise SemidiffError("--dim must be 2 or 3.")
    _announce_workspace()
    t0 = time.time()
    result = api.run_demo(dim=dim, device=device, methods=[m.strip() for m in methods_.split(",") if m.strip()],
                          labeled=labeled, epochs=epochs or None, log=console.print)
    table = Table(title=f"semidiff demo ({dim}D, labeled {labeled}, test cases {result['num_test']})")
    table.add_column("method")
    for label in result["labels"]:
        table.add_column(f"Dice {label}", justify="right")
    table.add_column("mean Dice", justify="right")
    for method, row in result["dice"].items():
        table.add_row(method, *[f"{row[label]:.4f}" for label in result["labels"]], f"{row['mean']:.4f}")
    out.print(table)
    console.print(f"demo finished in {time.time() - t0:.0f} s; runs under {result['runs_root']}")


@app.command()
def benchmark(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name.")],
    methods_: Annotated[str, typer.Option("-m", "--methods", help="Comma-separated methods.")] = "supervised,mean-teacher",
    labeled: Annotated[str, typer.Option("--labeled", help="Comma-separated labeled specs, e.g. 0.05,0.1,0.2.")] = "0.1",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0",
    configuration: Config = "2d",
    fold: Fold = "0",
    device: Device = "auto",
    epochs: Epochs = None,
    iters_per_epoch: Iters = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="key=value, applied to every method that has the key.")] = None,
    plans: Plans = None,
    gpu_memory_target: Annotated[float | None, typer.Option("--gpu-memory-target")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for benchmark.csv/.md/.png.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and exit.")] = False,
):
    """Train, predict and evaluate every (method, labeled, seed); write benchmark.csv, .md and .png.

    Example: semidiff benchmark 990 -m supervised,mean-teacher --labeled 0.05,0.1,0.2 --seeds 0,1,2 -c 2d
    """
    import dataclasses

    from semidiff_nnunet import api
    from semidiff_nnunet import benchmark as bench

    _announce_workspace()
    methods_list = bench.parse_list(methods_, "--methods")
    labeled_list = bench.parse_list(labeled, "--labeled")
    try:
        seed_list = [int(s) for s in bench.parse_list(seeds, "--seeds")]
    except ValueError:
        raise SemidiffError("--seeds must be comma-separated integers, e.g. 0,1,2.") from None
    overrides = _train_options(epochs, iters_per_epoch, sets)
    per_method, used = {}, set()
    for m in methods_list:
        fields = {f.name for f in dataclasses.fields(api.method_trainer(m).hparams_class)}
        per_method[m] = {k: v for k, v in overrides.items() if k in fields}
        used |= set(per_method[m])
    if set(overrides) - used:
        raise SemidiffError(f"--set {sorted(set(overrides) - used)[0]} is not a hyperparameter of any of "
                            f"{', '.join(methods_list)}.")
    if dry_run:
        from semidiff_nnunet.training.splits import LabeledSpec

        for lab in labeled_list:
            LabeledSpec.parse(lab)
        pname = planning_plans_name(gpu_memory_target, plans)
        runs = bench.plan_runs(dataset, methods_list, labeled_list, seed_list, configuration, _fold(fold), pname)
        table = Table(title=f"{len(runs)} run(s)")
        for col in ("method", "labeled", "seed", "status", "folder"):
            table.add_column(col)
        for r in runs:
            table.add_row(r.method, r.labeled, str(r.seed), r.status, str(r.info.fold_folder))
        out.print(table)
        return
    pname = api.plan_and_preprocess(dataset, [configuration], gpu_memory_target=gpu_memory_target, plans_name=plans)
    result = bench.run_benchmark(dataset, methods_list, labeled_list, seed_list, configuration, _fold(fold), device,
                                 pname, epochs, iters_per_epoch, per_method, output, log=console.print)
    out.print(result["markdown"])
    console.print(f"[green]Wrote[/green] {result['output']}/benchmark.csv, benchmark.md, benchmark.png")


def planning_plans_name(gpu_memory_target, plans):
    from semidiff_nnunet.planning import plans_name_for

    return plans_name_for(gpu_memory_target, plans)


def _register_optional_commands() -> None:
    try:
        from semidiff_nnunet.cli.convert import convert_command
    except ImportError:
        return
    app.command("convert")(convert_command)


_register_optional_commands()


def _tolerant_streams() -> None:
    """Under a non-UTF-8 locale (LANG unset, ``C`` without coercion), print "?" for characters the
    terminal cannot encode (rich's ellipsis, progress bars) instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main() -> None:
    _tolerant_streams()
    try:
        app(standalone_mode=False)
    except SemidiffError as e:
        console.print(f"[bold red]Error:[/bold red] {e}", soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        console.print("Aborted.")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("Interrupted; resume with --continue.")
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException:
        if os.environ.get("SEMIDIFF_DEBUG"):
            raise
        raise


if __name__ == "__main__":
    main()
