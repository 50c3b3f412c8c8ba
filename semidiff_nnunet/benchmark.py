"""``semidiff benchmark``: every (method, labeled fraction, seed) on one dataset, one table.

Runs that finished are skipped, interrupted ones resumed. Each run predicts the held-out cases
(``imagesTs``/``labelsTs`` when the dataset has both, else the fold's validation cases) and is
evaluated with :mod:`semidiff_nnunet.evaluation`. Writes ``benchmark.csv`` (one row per run),
``benchmark.md`` (mean ± std over seeds, one row per method, one column group per fraction,
best in bold), ``benchmark.png`` (Dice vs labeled fraction, one line per method, error bars) and
``benchmark_cases.png`` (held-out cases — supervised's best, median and worst — with the image, the
reference and every method's prediction, at the first labeled fraction and seed).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from semidiff_nnunet import api, paths, planning
from semidiff_nnunet.errors import SemidiffError

METRICS = ("Dice", "Jaccard", "HD95", "ASD")


@dataclass
class PlannedRun:
    method: str
    labeled: str
    seed: int
    info: api.RunInfo

    @property
    def status(self) -> str:
        if self.info.finished:
            return "done"
        return "resume" if self.info.resumable_checkpoint() else "train"


def plan_runs(dataset, methods, labeled, seeds, configuration, fold, plans_name) -> list[PlannedRun]:
    runs = []
    for m in methods:
        for lab in labeled:
            for s in seeds:
                runs.append(PlannedRun(m, lab, s, api.run_info(dataset, m, lab, s, configuration, fold, plans_name)))
    return runs


def different_settings(run: PlannedRun, epochs: int | None, iters_per_epoch: int | None, overrides: dict) -> str:
    """How an existing (finished or resumable) run's stored settings differ from what this benchmark asks
    for ("" when they agree or nothing exists): a table must never mix budgets or hyperparameters."""
    stored_file = run.info.fold_folder / "semidiff_run.json"
    if not stored_file.is_file():
        return ""
    stored = json.loads(stored_file.read_text(encoding="utf-8"))
    for key, wanted in (("num_epochs", epochs), ("num_iterations_per_epoch", iters_per_epoch)):
        if wanted is not None and stored.get(key) not in (None, wanted):
            return f"{key}={stored[key]}, not {wanted}"
    from semidiff_nnunet.training.hparams import hparams_to_dict

    opts = api.check_train_options(run.method, run.labeled, overrides=overrides, device="cpu")
    given = json.loads(json.dumps(hparams_to_dict(opts.hparams)))
    old = stored.get("hparams") or {}
    for key in sorted(given):
        if key in old and old[key] != given[key]:
            return f"{key}={old[key]!r}, not {given[key]!r}"
    if (stored.get("phase_overrides") or {}) != dict(opts.phases):
        return f"phase lengths {stored.get('phase_overrides') or {}}, not {dict(opts.phases)}"
    return ""


def held_out(name: str, fold, seed_for_split: int = 0) -> tuple[Path, Path, str]:
    """(images folder, labels folder, description) of the cases every run is scored on."""
    raw = planning.raw_folder(name)
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir() and any((raw / "labelsTs").iterdir()):
        return raw / "imagesTs", raw / "labelsTs", "imagesTs/labelsTs"
    split = api.split(name, "1.0", seed_for_split, fold)
    ds = planning.dataset_json(raw)
    fe = ds["file_ending"]
    folder = paths.runs_root() / "heldout" / name / f"fold_{fold}"
    images, labels = folder / "images", folder / "labels"
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for case in split.validation:
            for f in (raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{fe}"):
                os.symlink(f, images / f.name)
            os.symlink(raw / "labelsTr" / f"{case}{fe}", labels / f"{case}{fe}")
        (folder / "done").write_text("", encoding="utf-8")
    return images, labels, f"validation cases of fold {fold}"


def run_benchmark(dataset, methods: list[str], labeled: list[str], seeds: list[int], configuration: str = "2d",
                  fold=0, device: str = "auto", plans_name: str = "nnUNetPlans", epochs: int | None = None,
                  iters_per_epoch: int | None = None, overrides: dict | None = None, output: Path | None = None,
                  dry_run: bool = False, log=print, show_progress: bool = True,
                  val_iters_per_epoch: int = 10, make_progress=None) -> dict:
    """Run the benchmark (the CLI goes through :func:`semidiff_nnunet.api.benchmark`, which checks every
    option first). ``overrides``: ``{method: {key: value}}``; ``make_progress``: a factory of
    :class:`~semidiff_nnunet.training.progress.TrainingProgress`, one per training run."""
    name = planning.dataset_name(dataset)
    for m in methods:
        api.method_trainer(m)
    runs = plan_runs(name, methods, labeled, seeds, configuration, fold, plans_name)
    for r in runs:
        reason = different_settings(r, epochs, iters_per_epoch, (overrides or {}).get(r.method, {}))
        if reason:
            raise SemidiffError(f"{r.method} labeled {r.labeled} seed {r.seed} already has a run in "
                                f"{r.info.fold_folder} trained with {reason}; delete that folder or point "
                                f"SEMIDIFF_HOME elsewhere to benchmark these settings.")
    if dry_run:
        return {"runs": runs}
    images, labels, held_desc = held_out(name, fold)
    rows = []
    for i, r in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {r.method} labeled {r.labeled} seed {r.seed}: {r.status}")
        if not r.info.finished:
            api.train(name, r.method, labeled=r.labeled, seed=r.seed, configuration=configuration, fold=fold,
                      device=device, epochs=epochs, iters_per_epoch=iters_per_epoch,
                      overrides=(overrides or {}).get(r.method, {}), plans_name=plans_name,
                      continue_training=r.info.resumable_checkpoint() is not None, final_validation=False,
                      val_iters_per_epoch=val_iters_per_epoch, show_progress=show_progress,
                      progress=make_progress() if make_progress else None)
        pred = r.info.fold_folder / "benchmark_predictions"
        summary_file = pred / "summary.json"
        ck = r.info.fold_folder / "checkpoint_final.pth"
        if not summary_file.is_file() or summary_file.stat().st_mtime < ck.stat().st_mtime:
            api.predict(name, r.method, images, pred, labeled=r.labeled, seed=r.seed, configuration=configuration,
                        folds=(fold,), device=device, plans_name=plans_name, show_progress=show_progress)
            api.evaluate(name, pred, labels, summary_file)
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        row = {"method": r.method, "labeled": r.labeled, "seed": r.seed, "n_cases": len(summary["metric_per_case"]),
               "distance_unit": summary.get("distance_unit", "mm")}
        for metric in METRICS:
            row[metric] = summary["foreground_mean"].get(metric, float("nan"))
        for label, values in sorted(summary["mean"].items()):
            row[f"Dice_{label}"] = values["Dice"]
        rows.append(row)
    out = Path(output) if output else paths.runs_root() / "benchmarks" / name / configuration
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "benchmark.csv")
    md = markdown_table(rows, methods, labeled, title=f"{name}, {configuration}, fold {fold}, held out: {held_desc}")
    (out / "benchmark.md").write_text(md, encoding="utf-8")
    plot(rows, methods, labeled, out / "benchmark.png", title=f"{name} ({configuration})")
    _case_figure(name, runs, labeled[0], seeds[0], images, labels, out / "benchmark_cases.png")
    return {"runs": runs, "rows": rows, "output": out, "markdown": md, "held_out": held_desc}


def _case_figure(name, runs, labeled, seed, images, labels, path: Path) -> None:
    from semidiff_nnunet.evaluation.figures import case_grid

    chosen = {r.method: r.info.fold_folder / "benchmark_predictions" for r in runs
              if r.labeled == labeled and r.seed == seed}
    summaries = {m: json.loads((folder / "summary.json").read_text(encoding="utf-8")) for m, folder in chosen.items()}
    ds = planning.dataset_json(planning.raw_folder(name))
    case_grid(images, labels, chosen, summaries, path, ds["file_ending"], ds,
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


def markdown_table(rows, methods, labeled, title: str = "", metrics=("Dice", "HD95")) -> str:
    """Mean ± sample std over seeds (the mean alone for one seed); best mean per column in bold (highest
    Dice, lowest distance). A cell whose metric is undefined for some runs (HD95 of an empty prediction)
    says over how many runs it is taken, e.g. ``3.50 (1/2)``."""
    lines = [f"**{title}**", ""] if title else []
    header = ["method"] + [f"{metric} @ {lab}" for lab in labeled for metric in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    agg = {metric: aggregate(rows, methods, labeled, metric) for metric in metrics}
    best = {}
    for metric in metrics:
        for lab in labeled:
            means = [(agg[metric][(m, lab)][0], m) for m in methods if not math.isnan(agg[metric][(m, lab)][0])]
            if means:
                best[(metric, lab)] = (max if metric in ("Dice", "Jaccard") else min)(means)[1]
    for m in methods:
        cells = [m]
        for lab in labeled:
            for metric in metrics:
                mean, std = agg[metric][(m, lab)]
                values = [r[metric] for r in rows if r["method"] == m and r["labeled"] == lab]
                n = sum(not math.isnan(x) for x in values)
                fmt = ".4f" if metric in ("Dice", "Jaccard") else ".2f"
                text = "n/a" if math.isnan(mean) else f"{mean:{fmt}}" + ("" if math.isnan(std) else f" ± {std:{fmt}}")
                if 0 < n < len(values):
                    text += f" ({n}/{len(values)})"
                cells.append(f"**{text}**" if best.get((metric, lab)) == m else text)
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = sorted({r["seed"] for r in rows})
    unit = "px" if rows and all(r.get("distance_unit") == "px" for r in rows) else "mm"
    lines += ["", f"Foreground-mean metrics over {len(n_seeds)} seed(s) {n_seeds}; HD95 in {unit}"
              + (" (the images carry no physical spacing)." if unit == "px" else ".")]
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def parse_list(text: str, what: str) -> list[str]:
    return api.parse_list(text, what)
