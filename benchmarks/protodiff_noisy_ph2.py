"""ProtoDiff with and without noisy pseudo labels on the PH2 subset, on a CPU, against ``supervised``.

Derives ``Dataset514_PH2noisy`` from ``Dataset512_PH2`` (planned by ``ph2_cpu.py --plan-only``): the same
images, labels, split and CPU plans, plus ``labelsPseudo/`` made from the ground truth of every training
case by one seeded corruption per case (erosion, dilation or a shift; magnitudes in ``NOISE``). Only the
pseudo masks of the cases ``--labeled`` hides are ever offered to a method (the split keeps labeled and
validation cases' ones out), so the run sees: a few ground-truth masks, many noisy masks, no clean
label of a hidden case. Then ``semidiff benchmark`` trains, on the same held-out cases and budget:

* ``supervised`` and ``protodiff`` on ``Dataset512_PH2`` (no ``labelsPseudo/``: protodiff's EMA teacher
  supplies the pseudo labels of every unlabeled case), and
* ``protodiff`` on ``Dataset514_PH2noisy`` (the noisy masks on the hidden cases, weight 1).

``--controls`` then runs, for every seed, two controls that say how much of protodiff's gain is its own:

* (a) ``supervised`` with ``--labeled 1.0`` on ``Dataset<515+seed>_PH2noisyAsLabelsS<seed>``: labelsTr holds
  the noisy mask of each case that seed's split hides (``--labeled`` at that seed on fold 0) and the ground
  truth of every other case (the labeled cases, and the validation cases, which select checkpoints and
  are scored). Same images, CPU plans and ``splits_final.json`` (so the same held-out cases), preprocessed
  again. It sees exactly the masks protodiff sees, used as plain labels;
* (b) ``protodiff`` on ``Dataset514_PH2noisy`` with the prototype losses off (``inter_weight=0``,
  ``intra_weight=0``; ``pseudo_prototypes`` then changes nothing): noisy masks, EMA teacher, label
  diffusion kept. Run folders are keyed by method, labeled spec and seed, not by hyperparameters, so it
  runs under its own results tree, ``$nnUNet_results/protodiff_no_proto_losses/``.

Prints each table, the mean Dice of the noisy masks against the truth (how noisy they are) and, with
``--controls``, one table per seed (final-checkpoint Dice on the held-out cases and its difference to
``supervised`` on the ground truth of the labeled cases only) and their mean over seeds. Seeds 0-9 (ids
515-524).

    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/ph2_cpu.py --plan-only
    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/protodiff_noisy_ph2.py \\
        --seeds 0,1 --epochs 8 --iters-per-epoch 50 --controls
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

NOISE = {"erode": (15, 40), "dilate": (15, 40), "shift": (25, 60)}  # pixels at PH2's native resolution


def corrupt(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random corruption of a binary mask: erosion, dilation (a disc of radius r) or a shift."""
    from scipy import ndimage

    kind = ["erode", "dilate", "shift"][rng.integers(3)]
    lo, hi = NOISE[kind]
    r = int(rng.integers(lo, hi + 1))
    fg = mask > 0
    if kind == "shift":
        angle = rng.uniform(0, 2 * np.pi)
        out = ndimage.shift(fg.astype(np.uint8), (r * np.sin(angle), r * np.cos(angle)), order=0)
    else:
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = yy ** 2 + xx ** 2 <= r ** 2
        op = ndimage.binary_erosion if kind == "erode" else ndimage.binary_dilation
        out = op(fg, structure=disc)
    return out.astype(mask.dtype) * mask.max()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def derive(src: str, dst: str, plans: str) -> float:
    """Raw and preprocessed ``dst`` from ``src`` with noisy ``labelsPseudo/``; returns their mean Dice."""
    from PIL import Image

    from semidiff_nnunet import planning

    raw_src, raw_dst = planning.raw_folder(src), planning.raw_folder(dst)
    report = raw_dst / "pseudo_noise.json"
    if report.is_file() and (planning.preprocessed_folder(dst) / f"{plans}.json").is_file():
        return json.loads(report.read_text(encoding="utf-8"))["mean_dice"]
    tmp = raw_dst.with_name(raw_dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "labelsPseudo").mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        os.symlink(raw_src / sub, tmp / sub)
    ds = _dataset_json(src, dst, "labelsPseudo/ = seeded erosion/dilation/shift of the ground truth")
    (tmp / "dataset.json").write_text(json.dumps(ds, indent=2), encoding="utf-8")
    rng = np.random.default_rng(514)
    scores = {}
    for f in sorted((raw_src / "labelsTr").glob(f"*{ds['file_ending']}")):
        gt = np.asarray(Image.open(f))
        noisy = corrupt(gt, rng)
        Image.fromarray(noisy.astype(np.uint8)).save(tmp / "labelsPseudo" / f.name)
        scores[f.name] = dice(gt, noisy)
    mean = float(np.mean(list(scores.values())))
    (tmp / "pseudo_noise.json").write_text(json.dumps({"mean_dice": mean, "noise": NOISE, "per_case": scores},
                                                      indent=2), encoding="utf-8")
    shutil.rmtree(raw_dst, ignore_errors=True)
    tmp.rename(raw_dst)
    _preprocess_like(src, dst, plans)
    return mean


def _dataset_json(src: str, dst: str, what: str) -> dict:
    from semidiff_nnunet import planning

    ds = json.loads((planning.raw_folder(src) / "dataset.json").read_text(encoding="utf-8"))
    ds["name"] = dst.split("_", 1)[1]
    ds["description"] += f"; {what} (a benchmark)"
    return ds


def _preprocess_like(src: str, dst: str, plans: str) -> None:
    """Preprocess the raw ``dst`` with ``src``'s dataset.json, fingerprint, splits_final.json and ``plans``
    (``src``'s split is written first if no run has made it yet, as nnU-Net's first training would)."""
    from semidiff_nnunet import api, planning

    api.split(src, "1.0")
    pp_src, pp_dst = planning.preprocessed_folder(src), planning.preprocessed_folder(dst)
    shutil.rmtree(pp_dst, ignore_errors=True)
    pp_dst.mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
        shutil.copyfile(pp_src / name, pp_dst / name)
    p = json.loads((pp_src / f"{plans}.json").read_text(encoding="utf-8"))
    p["dataset_name"] = dst
    (pp_dst / f"{plans}.json").write_text(json.dumps(p, indent=2), encoding="utf-8")
    planning.preprocess(dst, plans, ["2d"], num_processes=2)


def hidden_cases(noisy: str, labeled: str, seed: int, plans: str) -> list[str]:
    """The training cases of fold 0 that ``--labeled`` at ``seed`` hides (those whose noisy mask is offered)."""
    from semidiff_nnunet import api
    from semidiff_nnunet.api import benchmark_runs as benchmark

    split = api.split(noisy, labeled, seed, 0, "2d", plans, held_out=benchmark.held_out_share(noisy))
    if split.extra_unlabeled:
        raise SystemExit(f"{noisy} has imagesUnlabeled/; control (a) expects the hidden training cases only.")
    return split.unlabeled


def derive_as_labels(src: str, noisy: str, dst: str, hidden: list[str], plans: str) -> float:
    """Raw and preprocessed ``dst``: ``src`` whose labelsTr holds ``noisy``'s labelsPseudo/ mask of every
    ``hidden`` case (the ground truth elsewhere); returns the mean Dice of those masks."""
    from semidiff_nnunet import planning

    raw_src, raw_dst = planning.raw_folder(src), planning.raw_folder(dst)
    report = raw_dst / "noisy_as_labels.json"
    noise = json.loads((planning.raw_folder(noisy) / "pseudo_noise.json").read_text(encoding="utf-8"))
    ds = _dataset_json(src, dst, f"labelsTr of the {len(hidden)} hidden cases = {noisy}'s labelsPseudo/")
    fe = ds["file_ending"]
    mean = float(np.mean([noise["per_case"][c + fe] for c in hidden]))
    if report.is_file():
        if json.loads(report.read_text(encoding="utf-8"))["hidden"] != hidden:
            raise SystemExit(f"{dst} was derived for another split (--labeled or the split changed); delete it "
                             f"from nnUNet_raw, nnUNet_preprocessed and its runs, or use another SEMIDIFF_HOME.")
        if (planning.preprocessed_folder(dst) / f"{plans}.json").is_file():
            return mean
    tmp = raw_dst.with_name(raw_dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "labelsTr").mkdir(parents=True)
    os.symlink(raw_src / "imagesTr", tmp / "imagesTr")
    for f in sorted((raw_src / "labelsTr").glob(f"*{fe}")):
        case = f.name[: -len(fe)]
        mask = planning.raw_folder(noisy) / "labelsPseudo" / f.name if case in hidden else f
        shutil.copyfile(mask, tmp / "labelsTr" / f.name)
    (tmp / "dataset.json").write_text(json.dumps(ds, indent=2), encoding="utf-8")
    (tmp / "noisy_as_labels.json").write_text(json.dumps({"source": noisy, "hidden": hidden, "mean_dice": mean},
                                                         indent=2), encoding="utf-8")
    shutil.rmtree(raw_dst, ignore_errors=True)
    tmp.rename(raw_dst)
    _preprocess_like(src, dst, plans)
    return mean


@contextlib.contextmanager
def results_tree(sub: str):
    """Runs (and their benchmark tables) under ``$nnUNet_results/<sub>/`` instead of ``$nnUNet_results``."""
    from semidiff_nnunet import paths

    old = os.environ["nnUNet_results"]
    new = paths.results_root() / sub
    new.mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_results"] = str(new)
    try:
        yield
    finally:
        os.environ["nnUNet_results"] = old


def stored_split(result: dict, method: str, seed: int) -> dict:
    """The split a run of a benchmark ``result`` trained on (its semidiff_run.json)."""
    run = next(r for r in result["runs"] if r.method == method and r.seed == seed)
    return json.loads((run.info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))["split"]


def dice_of(result: dict, method: str, seed: int) -> float:
    return next(float(r["Dice"]) for r in result["rows"] if r["method"] == method and r["seed"] == seed)


ARMS = ("supervised, ground truth of the labeled cases",
        "supervised, + noisy masks of the hidden cases as labels (a)",
        "protodiff, no labelsPseudo/",
        "protodiff, noisy labelsPseudo/",
        "protodiff, noisy labelsPseudo/, prototype losses off (b)")


def controls_table(title: str, dice: dict[str, float]) -> str:
    """Markdown: each arm's Dice and its difference to the first arm."""
    base = dice[ARMS[0]]
    lines = [f"### {title}", "", "| arm | Dice | Δ Dice vs supervised |", "|---|---|---|"]
    for arm in ARMS:
        delta = "—" if arm == ARMS[0] else f"{dice[arm] - base:+.4f}"
        lines.append(f"| {arm} | {dice[arm]:.4f} | {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from _real_data import parse_args, run, workspace

    args = parse_args(__doc__, "supervised,protodiff", "0.1", 8, 50, 5, "protodiff:pseudo_weight=0.5",
                      lambda p: p.add_argument("--controls", action="store_true",
                                               help="also run controls (a) and (b) for every seed (see above)"))
    workspace("ph2", "semidiff_ph2")
    from semidiff_nnunet import paths, planning
    from semidiff_nnunet.api.benchmark_runs import parse_list

    paths.ensure_nnunet_env()
    src, dst, cpu = "Dataset512_PH2", "Dataset514_PH2noisy", "ph2CPUPlans"
    seeds = [int(s) for s in parse_list(args.seeds, "--seeds")]
    if args.controls:
        if {"supervised", "protodiff"} - set(parse_list(args.methods, "--methods")):
            raise SystemExit("--controls compares with supervised and protodiff; keep both in --methods.")
        if len(parse_list(args.labeled, "--labeled")) != 1:
            raise SystemExit("--controls derives one dataset per seed from one split; give one --labeled.")
        if not all(0 <= s <= 9 for s in seeds):
            raise SystemExit("--controls gives seed s the dataset id 515+s; use seeds 0-9.")
    if not (planning.preprocessed_folder(src) / f"{cpu}.json").is_file():
        raise SystemExit("Run benchmarks/ph2_cpu.py --plan-only first (it plans the PH2 subset).")
    mean = derive(src, dst, cpu)
    print(f"noisy pseudo labels: mean Dice {mean:.4f} against the ground truth (all training cases)")
    as_labels = {}
    if args.controls:
        for s in seeds:
            t0 = time.time()
            name = f"Dataset{515 + s:03d}_PH2noisyAsLabelsS{s}"
            hidden = hidden_cases(dst, args.labeled, s, cpu)
            m = derive_as_labels(src, dst, name, hidden, cpu)
            as_labels[s] = (name, hidden)
            print(f"{name}: noisy labelsTr on the {len(hidden)} hidden cases of seed {s} (mean Dice {m:.4f}), "
                  f"ground truth elsewhere ({time.time() - t0:.0f} s)")
    if args.plan_only:
        raise SystemExit(0)
    # Cheapest and most telling arms first (a run a later call finds finished is reused, so an interrupted
    # script resumes): supervised on the ground truth, (a), protodiff on the noisy masks, (b), and protodiff
    # without them last.
    output, sets, methods, labeled = args.output, list(args.set), args.methods, args.labeled

    def sub(name: str) -> None:
        if output:
            args.output = str(Path(output) / name)

    def bench_arm(methods_: str, dataset: str, set_prefixes: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict:
        args.methods = methods_
        args.set = [s for s in sets if s.startswith(set_prefixes)] + list(extra)
        return run(args, dataset, "2d", cpu)

    def as_labels_arm(s: int) -> dict:
        args.labeled, args.seeds = "1.0", str(s)
        sub(f"noisy_as_labels_seed{s}")
        try:
            return bench_arm("supervised", as_labels[s][0], ("supervised:",))
        finally:
            args.labeled, args.seeds = labeled, ",".join(map(str, seeds))

    if args.controls:
        sub("clean_supervised")
        bench_arm("supervised", src, ("supervised:",))
        # (a) supervised on every training case, the hidden ones with their noisy masks, one dataset per seed
        plain_of = {s: as_labels_arm(s) for s in seeds}
    sub("noisy")
    noisy = bench_arm("protodiff", dst, ("protodiff:",))
    if args.controls:
        # (b) the prototype losses off, in a results tree of its own
        sub("noisy_no_proto_losses")
        with results_tree("protodiff_no_proto_losses"):
            no_proto = bench_arm("protodiff", dst, ("protodiff:",), ("protodiff:inter_weight=0", "protodiff:intra_weight=0"))
    sub("clean")
    clean = bench_arm(methods, src, ("supervised:", "protodiff:"))
    if not args.controls:
        raise SystemExit(0)

    per_seed = {}
    for s in seeds:
        name, hidden = as_labels[s]
        plain = plain_of[s]
        # the controls must see the masks protodiff saw and be scored on the same cases
        offered = stored_split(noisy, "protodiff", s)
        if offered["unlabeled"] != hidden:
            raise SystemExit(f"seed {s}: protodiff's hidden cases differ from those {name} was derived for.")
        trained = stored_split(plain, "supervised", s)
        if trained["labeled"] != sorted(offered["labeled"] + hidden) or trained["validation"] != offered["validation"]:
            raise SystemExit(f"seed {s}: supervised on {name} trained on other cases than protodiff's split.")
        for r in (noisy, no_proto, plain):
            if r["held_out_cases"] != clean["held_out_cases"]:
                raise SystemExit(f"seed {s}: the arms are scored on different held-out cases.")
        per_seed[s] = {ARMS[0]: dice_of(clean, "supervised", s), ARMS[1]: dice_of(plain, "supervised", s),
                       ARMS[2]: dice_of(clean, "protodiff", s), ARMS[3]: dice_of(noisy, "protodiff", s),
                       ARMS[4]: dice_of(no_proto, "protodiff", s)}
    held = f"held out: {clean['held_out']}"
    for s, d in per_seed.items():
        print(controls_table(f"seed {s} (labeled {labeled}, {held})", d))
    print(controls_table(f"mean over seeds {', '.join(map(str, per_seed))}",
                         {arm: float(np.mean([d[arm] for d in per_seed.values()])) for arm in ARMS}))
