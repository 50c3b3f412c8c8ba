"""``semidiff benchmark``'s runs: every (method, labeled fraction, seed) on one dataset, one table
(:func:`semidiff_nnunet.api.benchmarking.benchmark` checks the options and plans the dataset first).

Runs that finished are skipped, interrupted ones resumed. Each run is scored on held-out cases that no
selection ever looked at:

* ``imagesTs``/``labelsTs`` when the dataset has both;
* else a share (``held_out``, default 0.5) of the fold's validation cases, drawn once per dataset and fold
  with a fixed seed (:func:`~semidiff_nnunet.training.splits.carve_held_out`). The runs are trained with
  ``train(held_out=share)``: they neither train nor validate on those cases, so nnU-Net's per-epoch
  pseudo Dice, ``checkpoint_best.pth`` and a method's own selection (SuperDiffusion's teacher or student, a
  phase's best checkpoint) see only the rest of the validation cases (the *selection* part). These runs
  live in their own folders (``<method>__lab0.1_ho0.5__seed0``), apart from runs that validate on every
  validation case. Both parts are listed in ``held_out.json`` beside the tables and in each run's
  ``semidiff_run.json`` (``split.validation``, ``split.held_out``).

Each run is scored twice: with ``checkpoint_final.pth`` (the end of training, columns ``Dice`` ...) and
with ``checkpoint_best.pth`` (nnU-Net's best EMA pseudo Dice on the selection part, as the papers' code
reports; columns ``Dice (best ckpt)`` ..., NaN when the run never validated). Both checkpoints hold the
method's inference network. Metrics per run: foreground-mean Dice, Jaccard, HD95 and ASD over cases, and
the dataset-level ``mIoU`` (background included, ProtoDiff's metric; see
:mod:`semidiff_nnunet.evaluation.metrics`).

Writes ``benchmark.csv`` (one row per run), ``benchmark.md`` (mean ± std over seeds, one row per method,
one column group per fraction, best in bold), ``benchmark.png`` (Dice vs labeled fraction, one line per
method, error bars), ``benchmark_cases.png`` (held-out cases — supervised's best, median and worst — with
the image, the reference and every method's final prediction, at the first labeled fraction and seed) and
``held_out.json``.

``from_checkpoint`` (``--from-checkpoint``) runs a two-stage protocol instead, one group of runs per (labeled
spec, seed):

1. the *first stage*: ``supervised`` on the labeled cases, ``first_epochs`` epochs (``auto``; folder tag
   ``first-e<N>``, e.g. ``supervised__lab0.1_ho0.5_first-e4__seed0``), or an existing checkpoint per labeled
   spec and seed (a path with ``{labeled}`` and ``{seed}``; tag ``ck<hash of the path>``). Whether it converged
   is judged on its logged per-epoch validation pseudo Dice (:func:`convergence`), its curve drawn;
2. the *second stage*: every method, and ``supervised`` again as the *control* (the restart of the learning
   rate alone), ``epochs`` more epochs from that checkpoint (``--pretrained-weights``; a trained start skips
   the burn-in and BCP's pre-training), each in its own folder (``<method>__lab0.1_ho0.5_from-first-e4__seed0``).

Both stages hold out the same cases. A run's ``gain`` is its Dice minus the control's of the same labeled
spec and seed; its ``cost`` its training seconds per iteration over the control's. The tables go to the
subfolder ``from-<tag>`` of the default output folder, with ``first_stage.json`` and one
``first_stage_<labeled>_seed<s>.png`` per first stage.

Every stage of every run is skipped when finished and resumed when interrupted; the tables are rewritten after
each run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path

from semidiff_nnunet import paths, planning
from semidiff_nnunet.api import evaluation, installed, options, prediction, run_folders, splits, training
from semidiff_nnunet.api.run_folders import RunInfo
from semidiff_nnunet.errors import SemidiffError

METRICS = ("Dice", "Jaccard", "HD95", "ASD", "mIoU")
#: column suffix of the scores of checkpoint_best.pth
BEST = " (best ckpt)"
#: (column suffix, checkpoint file, prediction folder in the run's fold folder)
CHECKPOINTS = (("", "checkpoint_final.pth", "benchmark_predictions"),
               (BEST, "checkpoint_best.pth", "benchmark_predictions_best"))
#: the metrics of benchmark.md, per labeled spec
TABLE_METRICS = ("Dice", "Dice" + BEST, "mIoU", "HD95")
#: share of the fold's validation cases held out for scoring when the dataset has no imagesTs/labelsTs
DEFAULT_HELD_OUT = 0.5
#: ``--from-checkpoint auto``: the benchmark trains the first stage itself
AUTO = "auto"
#: the method of the first stage, and of the control of the second
CONTROL = "supervised"
FIRST, SECOND = "first", "second"
#: the first stage has converged when its validation pseudo Dice gains less than this over its last quarter
CONVERGED_GAIN = 0.005


@dataclass
class PlannedRun:
    method: str
    labeled: str
    seed: int
    info: RunInfo
    role: str = ""  # "": from scratch; FIRST or SECOND stage of the --from-checkpoint protocol
    stage_tag: str = ""  # the stage's part of the folder name (``run_info``'s ``stage``)
    pretrained: Path | None = None  # the checkpoint a second-stage run starts from

    @property
    def status(self) -> str:
        if self.info.finished:
            return "done"
        return "resume" if self.info.resumable_checkpoint() else "train"

    @property
    def label(self) -> str:
        """The run's row in benchmark.md: the method, or which stage of ``supervised`` it is."""
        return run_label(self.method, self.role)


def run_label(method: str, role: str) -> str:
    if role == FIRST:
        return f"{method} (first stage)"
    return f"{method} (control)" if role == SECOND and method == CONTROL else method


def plan_runs(dataset, methods, labeled, seeds, configuration, fold, plans_name,
              held_out: float | None = None) -> list[PlannedRun]:
    """``held_out``: the share of validation cases the runs keep apart (None: the dataset's imagesTs)."""
    runs = []
    for m in methods:
        for lab in labeled:
            for s in seeds:
                runs.append(PlannedRun(m, lab, s, run_folders.run_info(dataset, m, lab, s, configuration, fold, plans_name,
                                                                held_out)))
    return runs


def check_from_checkpoint(value: str, first_epochs: int | None = None) -> None:
    """``--from-checkpoint``: ``auto``, or a checkpoint path whose only placeholders are ``{labeled}`` and
    ``{seed}``; ``--first-epochs`` only with ``auto``."""
    if value == AUTO:
        return
    if first_epochs is not None:
        raise SemidiffError("--first-epochs sets the first stage that --from-checkpoint auto trains; drop it when "
                            "--from-checkpoint names checkpoints.")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError:
        fields = {"?"}
    if fields - {"labeled", "seed"}:
        raise SemidiffError(f"--from-checkpoint {value}: give auto, or a checkpoint path with {{labeled}} and "
                            f"{{seed}} as its only placeholders (e.g. runs/lab{{labeled}}_seed{{seed}}/"
                            f"checkpoint_final.pth).")


def protocol_methods(methods: list[str], from_checkpoint: str, first_epochs: int | None = None) -> list[str]:
    """The second stage's methods: ``supervised`` (the control) first, then the others."""
    check_from_checkpoint(from_checkpoint, first_epochs)
    return [CONTROL] + [m for m in methods if m != CONTROL]


def first_stage_tag(from_checkpoint: str, first_epochs: int | None) -> str:
    """``first-e<N>`` for ``auto`` (``first`` when nnU-Net's default length), else ``ck`` + a hash of the
    checkpoint path."""
    if from_checkpoint == AUTO:
        return "first" + (f"-e{first_epochs}" if first_epochs else "")
    return "ck" + hashlib.sha1(os.path.abspath(os.path.expanduser(from_checkpoint)).encode()).hexdigest()[:8]


def plan_protocol(dataset, methods, labeled, seeds, configuration, fold, plans_name, held_out: float | None,
                  from_checkpoint: str, first_epochs: int | None) -> list[PlannedRun]:
    """Per (labeled spec, seed): the first stage (``auto`` only), then the control and every other method
    from its checkpoint."""
    tag = first_stage_tag(from_checkpoint, first_epochs)
    runs = []
    for lab in labeled:
        for s in seeds:
            if from_checkpoint == AUTO:
                first = PlannedRun(CONTROL, lab, s, run_folders.run_info(dataset, CONTROL, lab, s, configuration,
                                                                         fold, plans_name, held_out, tag), FIRST, tag)
                runs.append(first)
                checkpoint = first.info.fold_folder / "checkpoint_final.pth"
            else:
                checkpoint = Path(from_checkpoint.format(labeled=lab, seed=s)).expanduser()
            for m in protocol_methods(methods, from_checkpoint):
                runs.append(PlannedRun(m, lab, s, run_folders.run_info(dataset, m, lab, s, configuration, fold,
                                                                       plans_name, held_out, f"from-{tag}"),
                                       SECOND, f"from-{tag}", checkpoint.resolve()))
    return runs


def different_settings(run: PlannedRun, epochs: int | None, iters_per_epoch: int | None, overrides: dict) -> str:
    """How an existing (finished or resumable) run's stored settings differ from what this benchmark asks
    for ("" when they agree or nothing exists): a table must never mix budgets, hyperparameters or (second
    stage) starting checkpoints."""
    stored_file = run.info.fold_folder / "semidiff_run.json"
    if not stored_file.is_file():
        return ""
    stored = json.loads(stored_file.read_text(encoding="utf-8"))
    if run.pretrained is not None and stored.get("pretrained_weights") != str(run.pretrained):
        return f"pretrained_weights={stored.get('pretrained_weights')}, not {run.pretrained}"
    for key, wanted in (("num_epochs", epochs), ("num_iterations_per_epoch", iters_per_epoch)):
        if wanted is not None and stored.get(key) not in (None, wanted):
            return f"{key}={stored[key]}, not {wanted}"
    from semidiff_nnunet.training.hparams import hparams_to_dict, legacy_values

    opts = options.check_train_options(run.method, run.labeled, overrides=overrides, device="cpu")
    given = json.loads(json.dumps(hparams_to_dict(opts.hparams)))
    old = stored.get("hparams") or {}
    before = legacy_values(type(opts.hparams))  # a run from before a setting existed behaved as its "before"
    for key in sorted(given):
        if key in old and old[key] != given[key]:
            return f"{key}={old[key]!r}, not {given[key]!r}"
        if key not in old and key in before and before[key] != given[key]:
            return f"{key}={before[key]!r} (trained before the setting existed), not {given[key]!r}"
    if (stored.get("phase_overrides") or {}) != dict(opts.phases):
        return f"phase lengths {stored.get('phase_overrides') or {}}, not {dict(opts.phases)}"
    return ""


def has_test_set(name: str) -> bool:
    raw = planning.raw_folder(name)
    return (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir() and any((raw / "labelsTs").iterdir())


def held_out_share(name: str, share: float = DEFAULT_HELD_OUT) -> float | None:
    """The share of the fold's validation cases the runs hold out: None when the dataset has its own test
    cases (imagesTs/labelsTs), else ``share`` (checked)."""
    from semidiff_nnunet.training.splits import check_held_out_share

    share = check_held_out_share(share)
    return None if has_test_set(name) else share


@dataclass
class HeldOut:
    """The cases every run is scored on, and the validation cases that select checkpoints instead."""

    images: Path
    labels: Path
    description: str
    cases: list[str]
    share: float | None = None  # None: the dataset's imagesTs/labelsTs
    selection: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"description": self.description, "source": "imagesTs/labelsTs" if self.share is None else
                "validation cases of the fold", "held_out_share": self.share, "held_out": self.cases,
                "selection": self.selection}


def held_out_set(name: str, fold, share: float | None = DEFAULT_HELD_OUT, configuration: str = "2d",
                 plans_name: str = "nnUNetPlans") -> HeldOut:
    """The held-out cases of the benchmark: the dataset's imagesTs/labelsTs, else ``share`` of the fold's
    validation cases (those of :func:`~semidiff_nnunet.api.splits.held_out_cases`, which runs trained with
    ``held_out=share`` never see), linked into ``<runs>/heldout/<dataset>/fold_<f>_ho<share>``."""
    raw = planning.raw_folder(name)
    if has_test_set(name):
        fe = planning.dataset_json(raw)["file_ending"]
        cases = sorted(f.name[: -len(fe)] for f in (raw / "labelsTs").iterdir() if f.name.endswith(fe))
        return HeldOut(raw / "imagesTs", raw / "labelsTs", "imagesTs/labelsTs", cases)
    if share is None:
        raise SemidiffError(f"{name} has no imagesTs/labelsTs; give the share of the fold's validation cases to "
                            f"hold out for scoring (--held-out 0.5).")
    selection, cases = splits.held_out_cases(name, fold, share, configuration, plans_name)
    fe = planning.dataset_json(raw)["file_ending"]
    folder = paths.runs_root() / "heldout" / name / f"fold_{fold}_ho{share:g}"
    listing = "\n".join(cases) + "\n"
    done = folder / "done"
    if not done.is_file() or done.read_text(encoding="utf-8") != listing:
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        for case in cases:
            for f in (raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{fe}"):
                os.symlink(f, tmp / "images" / f.name)
            os.symlink(raw / "labelsTr" / f"{case}{fe}", tmp / "labels" / f"{case}{fe}")
        (tmp / "done").write_text(listing, encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    description = (f"{len(cases)} of the {len(cases) + len(selection)} validation cases of fold {fold} "
                   f"(the other {len(selection)} select checkpoints)")
    return HeldOut(folder / "images", folder / "labels", description, cases, share, selection)


def held_out(name: str, fold, share: float | None = DEFAULT_HELD_OUT, configuration: str = "2d",
             plans_name: str = "nnUNetPlans") -> tuple[Path, Path, str]:
    """(images folder, labels folder, description) of :func:`held_out_set`."""
    h = held_out_set(name, fold, share, configuration, plans_name)
    return h.images, h.labels, h.description


def score_run(name: str, run: PlannedRun, images: Path, labels: Path, configuration: str, fold, device: str,
              plans_name: str, held_out: float | None, show_progress: bool = True) -> dict:
    """Predict the held-out cases with the run's final and best checkpoints (each once: redone only when its
    checkpoint is newer than its summary) and evaluate; return the run's row of benchmark.csv."""
    row: dict = {"method": run.method, "labeled": run.labeled, "seed": run.seed}
    for suffix, checkpoint, folder in CHECKPOINTS:
        ck = run.info.fold_folder / checkpoint
        pred = run.info.fold_folder / folder
        summary_file = pred / "summary.json"
        fields = _checkpoint_fields(ck) if suffix == BEST and ck.is_file() else {}
        if suffix == BEST:
            row["best_epoch"] = fields["epoch"] if _selected_on_validation(fields) else None
        if not ck.is_file() or (suffix == BEST and row["best_epoch"] is None):
            summary = None  # no checkpoint_best chosen on a validation score: the run never validated
        else:
            if not summary_file.is_file() or summary_file.stat().st_mtime < ck.stat().st_mtime:
                shutil.rmtree(pred, ignore_errors=True)  # no stale case of an earlier checkpoint survives
                prediction.predict(name, run.method, images, pred, labeled=run.labeled, seed=run.seed,
                                   configuration=configuration, folds=(fold,), device=device, plans_name=plans_name,
                                   checkpoint=checkpoint, show_progress=show_progress, held_out=held_out,
                                   stage=run.stage_tag)
                evaluation.evaluate(name, pred, labels, summary_file)
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            if "mIoU" not in summary:  # evaluated before mIoU existed
                summary = evaluation.evaluate(name, pred, labels, summary_file)
        if suffix == "":
            row["n_cases"] = len(summary["metric_per_case"])
            row["distance_unit"] = summary.get("distance_unit", "mm")
        for metric in METRICS:
            if summary is None:
                row[metric + suffix] = float("nan")
            elif metric == "mIoU":
                row[metric + suffix] = summary["mIoU"]
            else:
                row[metric + suffix] = summary["foreground_mean"].get(metric, float("nan"))
        if suffix == "":
            for label, values in sorted(summary["mean"].items()):
                row[f"Dice_{label}"] = values["Dice"]
    return row


def _checkpoint_fields(path: Path) -> dict:
    """``epoch`` (the epoch whose end wrote the checkpoint; nnU-Net stores the next one) and ``best_ema``
    (nnU-Net's best EMA pseudo Dice when it was written)."""
    from semidiff_nnunet.training.checkpoint import safe_load

    ck = safe_load(path)
    return {"epoch": int(ck.get("current_epoch", 0)) - 1, "best_ema": ck.get("_best_ema")}


def _selected_on_validation(fields: dict) -> bool:
    """Whether nnU-Net chose a checkpoint_best on a validation score (a run trained without validation
    iterations writes one at its first epoch, with a NaN score)."""
    best = fields.get("best_ema")
    return best is not None and not math.isnan(float(best))


def run_benchmark(dataset, methods: list[str], labeled: list[str], seeds: list[int], configuration: str = "2d",
                  fold=0, device: str = "auto", plans_name: str = "nnUNetPlans", epochs: int | None = None,
                  iters_per_epoch: int | None = None, overrides: dict | None = None, output: Path | None = None,
                  dry_run: bool = False, log=print, show_progress: bool = True,
                  val_iters_per_epoch: int = 10, make_progress=None, held_out: float = DEFAULT_HELD_OUT,
                  from_checkpoint: str | None = None, first_epochs: int | None = None) -> dict:
    """Run the benchmark (the CLI goes through :func:`semidiff_nnunet.api.benchmarking.benchmark`, which checks every
    option first). ``overrides``: ``{method: {key: value}}``; ``make_progress``: a factory of
    :class:`~semidiff_nnunet.training.progress.TrainingProgress`, one per training run; ``held_out``: the
    share of the fold's validation cases kept apart for scoring when the dataset has no imagesTs/labelsTs;
    ``from_checkpoint``/``first_epochs``: the two-stage protocol (``first_epochs`` defaults to ``epochs``;
    see the module docstring)."""
    from semidiff_nnunet.training.splits import LabeledSpec

    name = planning.dataset_name(dataset)
    overrides = overrides or {}
    for m in methods:
        installed.method_trainer(m)
    share = held_out_share(name, held_out)
    if from_checkpoint is not None:
        methods = protocol_methods(methods, from_checkpoint, first_epochs)
        first_epochs = first_epochs or epochs
        runs = plan_protocol(name, methods, labeled, seeds, configuration, fold, plans_name, share, from_checkpoint,
                             first_epochs)
    else:
        runs = plan_runs(name, methods, labeled, seeds, configuration, fold, plans_name, share)
    for r in runs:
        reason = different_settings(r, first_epochs if r.role == FIRST else epochs, iters_per_epoch,
                                    overrides.get(r.method, {}))
        if reason:
            raise SemidiffError(f"{r.label} labeled {r.labeled} seed {r.seed} already has a run in "
                                f"{r.info.fold_folder} trained with {reason}; delete that folder or point "
                                f"SEMIDIFF_HOME elsewhere to benchmark these settings.")
    if dry_run:
        return {"runs": runs, "held_out_share": share}
    held = held_out_set(name, fold, share, configuration, plans_name)
    for r in runs:
        stored = _stored_held_out(r)  # imagesTs: the runs hold out no validation case
        if stored is not None and stored != (held.cases if share is not None else []):
            raise SemidiffError(f"The run in {r.info.fold_folder} held out other cases than the benchmark scores on "
                                f"(splits_final.json changed since it was trained); delete that folder to train "
                                f"it again.")
    if from_checkpoint not in (None, AUTO):
        for r in {(r.labeled, r.seed): r for r in runs}.values():
            _check_given_first_stage(name, r, fold, share, held.cases, log)
    out = Path(output) if output else paths.runs_root() / "benchmarks" / name / configuration
    if output is None and from_checkpoint is not None:
        out = out / f"from-{first_stage_tag(from_checkpoint, first_epochs)}"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{name}, {configuration}, fold {fold}, held out: {held.description}"
    if from_checkpoint is not None:
        title += "; " + _protocol_summary(from_checkpoint, first_epochs, epochs, iters_per_epoch)
    labels = list(dict.fromkeys(r.label for r in runs))
    rows: list[dict] = []
    first_stage: dict[tuple[str, int], dict] = {}
    for i, r in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {r.label} labeled {r.labeled} seed {r.seed}: {r.status}")
        if not r.info.finished:
            training.train(name, r.method, labeled=r.labeled, seed=r.seed, configuration=configuration, fold=fold,
                           device=device, epochs=first_epochs if r.role == FIRST else epochs,
                           iters_per_epoch=iters_per_epoch, overrides=overrides.get(r.method, {}),
                           plans_name=plans_name, continue_training=r.info.resumable_checkpoint() is not None,
                           final_validation=False, val_iters_per_epoch=val_iters_per_epoch,
                           show_progress=show_progress, progress=make_progress() if make_progress else None,
                           held_out=share, pretrained_weights=r.pretrained, stage=r.stage_tag,
                           save_every=1)  # a table built over several sessions loses at most one epoch per run
        row = score_run(name, r, held.images, held.labels, configuration, fold, device, plans_name, share,
                        show_progress)
        row["s_per_it"] = seconds_per_iteration(r.info.fold_folder)
        row["cpu_s_per_it"] = seconds_per_iteration(r.info.fold_folder, cpu=True)
        row["peak_memory"] = peak_memory(r.info.fold_folder)
        if from_checkpoint is not None:
            first_ck = r.info.fold_folder / "checkpoint_final.pth" if r.role == FIRST else r.pretrained
            key = (r.labeled, r.seed)
            if key not in first_stage:
                png = out / f"first_stage_{LabeledSpec.parse(r.labeled).tag}_seed{r.seed}.png"
                first_stage[key] = judge_first_stage(first_ck, png, f"first stage, labeled {r.labeled}, seed {r.seed}")
            row.update({"stage": r.role, "from": str(r.pretrained or "")})
            if r.role == FIRST:
                row.update({"converged": first_stage[key]["converged"], "last_quarter_gain": first_stage[key]["gain"]})
        rows.append(row)
        add_gains(rows)
        _write_tables(rows, labels, labeled, out, title, first_stage if from_checkpoint is not None else None)
    _write_text(out / "held_out.json", json.dumps({"dataset": name, "fold": fold, **held.to_json()}, indent=2) + "\n")
    shown = _display_rows(rows)
    plot(shown, labels, labeled, out / "benchmark.png", title=f"{name} ({configuration})")
    if from_checkpoint is not None:
        plot_gains(rows, labeled, out / "gains.png", title=f"{name} ({configuration})")
    _case_figure(name, runs, labeled[0], seeds[0], held.images, held.labels, out / "benchmark_cases.png")
    return {"runs": runs, "rows": rows, "output": out, "markdown": (out / "benchmark.md").read_text(encoding="utf-8"),
            "held_out": held.description, "held_out_cases": held.cases, "selection_cases": held.selection,
            "first_stage": first_stage}


def _protocol_summary(from_checkpoint: str, first_epochs, epochs, iters_per_epoch) -> str:
    def budget(n):
        return (f"{n} epoch{'' if n == 1 else 's'}" if n else "nnU-Net's default epochs") + (
            f" × {iters_per_epoch} it" if iters_per_epoch else "")

    start = (f"supervised's first stage ({budget(first_epochs)})" if from_checkpoint == AUTO else
             f"the checkpoints {from_checkpoint}")
    return f"second stage: {budget(epochs)} from {start}"


def _display_rows(rows: list[dict]) -> list[dict]:
    """The rows with ``method`` as benchmark.md shows it (the stage of ``supervised`` named)."""
    return [{**r, "method": run_label(r["method"], r.get("stage", ""))} for r in rows]


def _write_tables(rows, labels, labeled, out: Path, title: str, first_stage: dict | None) -> None:
    """benchmark.csv and benchmark.md (and, for the protocol, first_stage.json) as far as the runs have come."""
    write_csv(rows, out / "benchmark.csv")
    metrics = TABLE_METRICS + (("gain", "cost", "memory") if first_stage is not None else ())
    md = markdown_table(_display_rows(rows), labels, labeled, title=title, metrics=metrics)
    if first_stage is not None:
        md += "\n" + gains_markdown(rows) + "\n" + first_stage_markdown(first_stage)
        _write_text(out / "first_stage.json", json.dumps(
            {"rule": f"converged: the validation pseudo Dice gains < {CONVERGED_GAIN} over the last quarter of the "
                     f"epochs (least-squares fit)", "threshold": CONVERGED_GAIN,
             "runs": [{"labeled": lab, "seed": s, **v} for (lab, s), v in first_stage.items()]}, indent=2) + "\n")
    _write_text(out / "benchmark.md", md)


def add_gains(rows: list[dict]) -> None:
    """Second-stage rows: ``gain`` = Dice − the control's Dice (same labeled spec and seed), ``cost`` = CPU
    seconds per iteration ÷ the control's (wall-clock seconds where either run has no CPU log: trained
    before it was logged), ``memory`` = peak memory ÷ the control's; NaN elsewhere, while the control has no
    row yet and where either run has no measurement."""
    control = {(r["labeled"], r["seed"]): r for r in rows if r.get("stage") == SECOND and r["method"] == CONTROL}
    for r in rows:
        c = control.get((r["labeled"], r["seed"])) if r.get("stage") == SECOND else None
        r["gain"] = r["Dice"] - c["Dice"] if c else float("nan")
        key = "cpu_s_per_it" if c is not None and all(x.get("cpu_s_per_it", 0) > 0 for x in (r, c)) else "s_per_it"
        ok = c is not None and c.get(key, 0) > 0
        r["cost"] = r.get(key, float("nan")) / c[key] if ok else float("nan")
        ok = c is not None and c.get("peak_memory", 0) > 0
        r["memory"] = r.get("peak_memory", float("nan")) / c["peak_memory"] if ok else float("nan")


def _check_given_first_stage(name: str, run: PlannedRun, fold, share: float | None, held_out_cases: list[str],
                             log) -> None:
    """A given first-stage checkpoint exists, and (when a semidiff run wrote it) trained on exactly the labeled
    cases of its labeled spec and seed and saw no held-out case."""
    ck = run.pretrained
    if not ck.is_file():
        raise SemidiffError(f"--from-checkpoint: no checkpoint {ck} for labeled {run.labeled} seed {run.seed}; "
                            f"give a path that exists for every labeled spec and seed, or auto.")
    run_json = ck.parent / "semidiff_run.json"
    if not run_json.is_file():
        log(f"note: {ck} has no semidiff_run.json beside it, so whether it trained only on the labeled cases of "
            f"labeled {run.labeled} seed {run.seed} (and on no held-out case) is not checked.")
        return
    split = json.loads(run_json.read_text(encoding="utf-8")).get("split") or {}
    want = splits.split(name, run.labeled, run.seed, fold, held_out=share)
    seen = set(split.get("labeled") or []) | set(split.get("unlabeled") or [])
    if sorted(split.get("labeled") or []) != sorted(want.labeled) or seen & set(held_out_cases):
        raise SemidiffError(f"--from-checkpoint: {ck} was trained on other cases than labeled {run.labeled} seed "
                            f"{run.seed} labels (or on held-out cases); give the checkpoint of that labeled spec "
                            f"and seed, or auto.")


# ---------------------------------------------------------------------------------------------- first stage
def convergence(dice, threshold: float = CONVERGED_GAIN) -> dict:
    """Whether a run's per-epoch validation pseudo Dice (nnU-Net's ``mean_fg_dice``) has levelled off: its
    gain over the last quarter of the ``n`` epochs (``q = ceil(n / 4)``, at most ``n - 1``) is below
    ``threshold``. The gain is the least-squares slope over the ``q + 1`` values ending at the last one, times
    ``q`` — the difference of the two end values on a straight curve, but one noisy epoch at either end does
    not decide it.

    Returns ``{"epochs": n, "window": q, "start_epoch": n - 1 - q, "from": value there, "to": the last
    value, "gain": g, "converged": g < threshold}``; ``gain`` NaN and ``converged`` None with fewer than two
    epochs or an epoch without a validation score (NaN) in the window."""
    values = [float(v) for v in dice]
    n = len(values)
    q = min(n - 1, math.ceil(n / 4))
    result = {"epochs": n, "window": max(q, 0), "start_epoch": n - 1 - q if q > 0 else None,
              "from": values[n - 1 - q] if q > 0 else float("nan"), "to": values[-1] if n else float("nan"),
              "gain": float("nan"), "converged": None}
    window = values[n - 1 - q:] if q > 0 else []
    if not window or any(math.isnan(v) for v in window):
        return result
    xs = range(len(window))
    mx, my = sum(xs) / len(window), sum(window) / len(window)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, window)) / sum((x - mx) ** 2 for x in xs)
    result["gain"] = slope * q
    result["converged"] = bool(result["gain"] < threshold)
    return result


def _logging(checkpoint: Path) -> dict:
    """nnU-Net's per-epoch log stored in a checkpoint (``mean_fg_dice``, ``ema_fg_dice``, timestamps ...)."""
    from semidiff_nnunet.training.checkpoint import safe_load

    ck = safe_load(checkpoint)
    return (ck.get("logging") if isinstance(ck, dict) else None) or {}


def judge_first_stage(checkpoint: Path, png: Path, title: str) -> dict:
    """:func:`convergence` of the first stage's logged pseudo Dice, and its curve drawn to ``png``."""
    log = _logging(checkpoint)
    verdict = {**convergence(log.get("mean_fg_dice") or []), "checkpoint": str(checkpoint), "curve": None}
    if log.get("mean_fg_dice"):
        plot_first_stage(log, verdict, png, title)
        verdict["curve"] = png.name
    return verdict


def gains_markdown(rows: list[dict]) -> str:
    """Each method's gain over the control seed by seed (the table's mean ± std hides a seed below zero)."""
    lines = ["Gain over the control, per seed (Dice of the final checkpoint minus the control's):", ""]
    second = [r for r in rows if r.get("stage") == SECOND and r["method"] != CONTROL]
    for m in dict.fromkeys(r["method"] for r in second):
        for lab in dict.fromkeys(r["labeled"] for r in second if r["method"] == m):
            mine = sorted((r for r in second if r["method"] == m and r["labeled"] == lab), key=lambda r: r["seed"])
            cells = ", ".join(f"{r['gain']:+.4f} (seed {r['seed']})" for r in mine if not math.isnan(r["gain"]))
            above = sum(r["gain"] > 0 for r in mine if not math.isnan(r["gain"]))
            n = sum(not math.isnan(r["gain"]) for r in mine)
            if n:
                lines.append(f"- {m} @ {lab}: {cells}; above the control on {above} of {n}")
    return "\n".join(lines) + "\n"


def first_stage_markdown(first_stage: dict) -> str:
    lines = [f"First stage: converged when its validation pseudo Dice (nnU-Net's per-epoch mean_fg_dice, on the "
             f"selection cases) gains < {CONVERGED_GAIN} over the last quarter of its epochs (least-squares fit "
             f"over that quarter; curves in first_stage_*.png):", ""]
    for (lab, seed), v in first_stage.items():
        if v["converged"] is None:
            lines.append(f"- labeled {lab}, seed {seed}: n/a ({v['epochs']} epoch(s) with a validation score; "
                         f"needs 2 or more, each validated)")
            continue
        lines.append(f"- labeled {lab}, seed {seed}: converged {'yes' if v['converged'] else '**no**'} — pseudo Dice "
                     f"{v['from']:.4f} → {v['to']:.4f} over epochs {v['start_epoch']}–{v['epochs'] - 1} of "
                     f"{v['epochs']}, fitted gain {v['gain']:+.4f}")
    return "\n".join(lines) + "\n"


def plot_first_stage(log: dict, verdict: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = [float(v) for v in log.get("mean_fg_dice") or []]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(dice)), dice, marker=".", label="pseudo Dice (mean_fg_dice)")
    ema = [float(v) for v in log.get("ema_fg_dice") or []]
    if ema:
        ax.plot(range(len(ema)), ema, alpha=0.6, label="EMA pseudo Dice")
    if verdict["converged"] is not None:
        start, n, q = verdict["start_epoch"], verdict["epochs"], verdict["window"]
        ax.axvspan(start, n - 1, color="grey", alpha=0.15, label="last quarter")
        window = dice[start:]
        mid = sum(window) / len(window)
        slope = verdict["gain"] / q
        half = (len(window) - 1) / 2
        ax.plot([start, n - 1], [mid - slope * half, mid + slope * half], "k--",
                label=f"fit: gain {verdict['gain']:+.4f}")
        title += f": {'converged' if verdict['converged'] else 'not converged'}"
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation pseudo Dice")
    _save_figure(fig, ax, title, path)


def _save_figure(fig, ax, title: str, path: Path) -> None:
    """Title, grid and legend on ``ax``, then ``fig`` written to ``path`` (a temporary name, then moved)."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def seconds_per_iteration(fold_folder: Path, cpu: bool = False) -> float:
    """Training seconds per iteration of a finished run: the median epoch (its logged start to end time,
    validation included) over its iterations per epoch; with ``cpu``, the median epoch's CPU seconds over its
    training iterations (the trainer's ``cpu_seconds`` log: the process's threads and its reaped augmentation
    workers). NaN without the log (a run trained before it was logged)."""
    ck, run_json = fold_folder / "checkpoint_final.pth", fold_folder / "semidiff_run.json"
    if not ck.is_file() or not run_json.is_file():
        return float("nan")
    log = _logging(ck)
    its = json.loads(run_json.read_text(encoding="utf-8")).get("num_iterations_per_epoch")
    if cpu:
        from semidiff_nnunet.training.curves import CPU_SECONDS_KEY

        spans = sorted(float(v) for v in log.get(CPU_SECONDS_KEY) or [] if v == v)
    else:
        spans = sorted(e - s for s, e in zip(log.get("epoch_start_timestamps") or [], log.get("epoch_end_timestamps") or []))
    if not spans or not its:
        return float("nan")
    return float(spans[len(spans) // 2]) / its


def peak_memory(fold_folder: Path) -> float:
    """Peak memory of a finished run in bytes: the median over its epochs of each epoch's peak over its
    training iterations (the trainer's ``peak_memory`` log: on the CPU the training process's resident set,
    on CUDA the allocator's tensors); NaN without the log (a run trained before it was logged)."""
    from semidiff_nnunet.training.memory import PEAK_MEMORY_KEY

    ck = fold_folder / "checkpoint_final.pth"
    if not ck.is_file():
        return float("nan")
    values = [float(v) for v in _logging(ck).get(PEAK_MEMORY_KEY) or [] if v == v]
    return float(sorted(values)[len(values) // 2]) if values else float("nan")


def _stored_held_out(run: PlannedRun) -> list[str] | None:
    """The held-out cases a trained run recorded (None when it has not started)."""
    f = run.info.fold_folder / "semidiff_run.json"
    if not f.is_file():
        return None
    return sorted((json.loads(f.read_text(encoding="utf-8")).get("split") or {}).get("held_out") or [])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _case_figure(name, runs, labeled, seed, images, labels, path: Path) -> None:
    from semidiff_nnunet.evaluation.figures import case_grid

    chosen = {r.label: r.info.fold_folder / "benchmark_predictions" for r in runs
              if r.labeled == labeled and r.seed == seed}
    summaries = {m: json.loads((folder / "summary.json").read_text(encoding="utf-8")) for m, folder in chosen.items()}
    ds = planning.dataset_json(planning.raw_folder(name))
    control = run_label(CONTROL, SECOND)  # the protocol: cases picked by the control's scores
    case_grid(images, labels, chosen, summaries, path, ds["file_ending"], ds,
              reference_method=control if control in chosen else None,
              title=f"{name}: held-out cases, labeled {labeled}, seed {seed}")


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _stats(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return mean, std


def aggregate(rows, methods, labeled, metric):
    return {(m, lab): _stats([r[metric] for r in rows if r["method"] == m and r["labeled"] == lab])
            for m in methods for lab in labeled}


def higher_is_better(metric: str) -> bool:
    """Overlap scores (Dice, Jaccard, mIoU, also of the best checkpoint) rise, distances (HD95, ASD) fall."""
    return not metric.startswith(("HD95", "ASD"))


NOTES = {
    "Dice": "Dice: foreground mean over the held-out cases, with checkpoint_final.pth",
    "Dice" + BEST: "Dice (best ckpt): the same with checkpoint_best.pth (nnU-Net's best EMA pseudo Dice on the "
                   "validation cases that select, never on the held-out ones; n/a when a run never validated)",
    "mIoU": "mIoU: per class the IoU of all held-out voxels pooled, averaged over the classes, background "
            "included (ProtoDiff's metric), with checkpoint_final.pth",
    "gain": "gain over control: Dice minus the Dice of the control (supervised trained on from the same "
            "checkpoint for the same iterations: what restarting the learning rate alone gives), per seed",
    "cost": "cost × control: CPU seconds per training iteration (median epoch; the training process's threads "
            "and its augmentation workers) over the control's, which other programs on the machine hardly change; "
            "for runs trained before that was logged, wall-clock seconds per iteration (validation included), "
            "as noisy as the machine's load",
    "memory": "memory × control: peak memory of the training iterations (median epoch; on the CPU the training "
              "process's resident set, workers not included; on a GPU the allocated tensors) over the control's; "
              "n/a for runs trained before it was logged",
}
#: column names and number formats of benchmark.md that differ from the metric's own
HEADERS = {"gain": "gain over control", "cost": "cost × control", "memory": "memory × control"}
FORMATS = {"gain": "+.4f", "cost": ".2f", "memory": ".2f"}
#: columns without a best (bold) cell
UNRANKED = {"cost", "memory"}


def markdown_table(rows, methods, labeled, title: str = "", metrics=("Dice", "HD95")) -> str:
    """Mean ± sample std over seeds (the mean alone for one seed); best mean per column in bold (highest
    Dice, Jaccard or mIoU, lowest distance). A cell whose metric is undefined for some runs (HD95 of an empty
    prediction) says over how many runs it is taken, e.g. ``3.50 (1/2)``."""
    lines = [f"**{title}**", ""] if title else []
    header = ["method"] + [f"{HEADERS.get(metric, metric)} @ {lab}" for lab in labeled for metric in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    agg = {metric: aggregate(rows, methods, labeled, metric) for metric in metrics}
    best = {}
    for metric in metrics:
        for lab in labeled:
            if metric in UNRANKED:
                continue
            means = [(agg[metric][(m, lab)][0], m) for m in methods if not math.isnan(agg[metric][(m, lab)][0])]
            if means:
                best[(metric, lab)] = (max if higher_is_better(metric) else min)(means)[1]
    for m in methods:
        cells = [m]
        for lab in labeled:
            for metric in metrics:
                mean, std = agg[metric][(m, lab)]
                values = [r[metric] for r in rows if r["method"] == m and r["labeled"] == lab]
                n = sum(not math.isnan(x) for x in values)
                fmt = FORMATS.get(metric, ".4f" if higher_is_better(metric) else ".2f")
                text = "n/a" if math.isnan(mean) else f"{mean:{fmt}}" + ("" if math.isnan(std) else f" ± {std:{fmt}}")
                if 0 < n < len(values):
                    text += f" ({n}/{len(values)})"
                cells.append(f"**{text}**" if best.get((metric, lab)) == m else text)
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = sorted({r["seed"] for r in rows})
    unit = "px" if rows and all(r.get("distance_unit") == "px" for r in rows) else "mm"
    lines += ["", f"Foreground-mean metrics over {len(n_seeds)} seed(s) {n_seeds}; HD95 in {unit}"
              + (" (the images carry no physical spacing)." if unit == "px" else ".")]
    lines += [f"{NOTES[m]}." for m in metrics if m in NOTES]
    return "\n".join(lines) + "\n"


def plot(rows, methods, labeled, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x_of(lab: str) -> float:
        try:
            return float(lab)
        except ValueError:
            return float("nan")

    numeric = all(not math.isnan(x_of(lab)) for lab in labeled)
    xs = [x_of(lab) for lab in labeled] if numeric else list(range(len(labeled)))
    agg = aggregate(rows, methods, labeled, "Dice")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        means = [agg[(m, lab)][0] for lab in labeled]
        stds = [0.0 if math.isnan(agg[(m, lab)][1]) else agg[(m, lab)][1] for lab in labeled]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=m)
    ax.set_xticks(xs)
    ax.set_xticklabels(labeled)
    ax.set_xlabel("labeled (fraction or cases)")
    ax.set_ylabel("foreground mean Dice")
    _save_figure(fig, ax, title, path)


def plot_gains(rows, labeled, path: Path, title: str = "") -> None:
    """The protocol's answer as a picture: per method (control excluded) its gain over the control, one dot
    per seed and a bar at their mean, a line at zero; one panel per labeled spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    second = [r for r in rows if r.get("stage") == SECOND and r["method"] != CONTROL and not math.isnan(r["gain"])]
    methods = list(dict.fromkeys(r["method"] for r in second))
    if not methods:
        return
    fig, axes = plt.subplots(1, len(labeled), figsize=(5.5 * len(labeled), 1.2 + 0.45 * max(1, len(methods))),
                             squeeze=False)
    for ax, lab in zip(axes[0], labeled):
        for y, m in enumerate(methods):
            gains = [r["gain"] for r in second if r["method"] == m and r["labeled"] == lab]
            if not gains:
                continue
            mean = sum(gains) / len(gains)
            ax.barh(y, mean, color="tab:green" if mean > 0 else "tab:red", alpha=0.35, height=0.6)
            ax.plot(gains, [y] * len(gains), "ko", markersize=4, label="a seed (bar: their mean)" if y == 0 else None)
        ax.axvline(0, color="k", linewidth=1)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods)
        ax.invert_yaxis()
        ax.set_xlabel("Dice gain over the control (supervised continued)")
        ax.set_title(f"{title}, labeled {lab}")
        ax.grid(alpha=0.3)
    last = axes[0][-1]
    _save_figure(fig, last, last.get_title(), path)


def parse_list(text: str, what: str) -> list[str]:
    return options.parse_list(text, what)
