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

Prints each table and the mean Dice of the noisy masks against the truth (how noisy they are).

    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/ph2_cpu.py --plan-only
    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/protodiff_noisy_ph2.py \\
        --seeds 0 --epochs 8 --iters-per-epoch 50
"""

from __future__ import annotations

import json
import os
import shutil
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
    pp_src, pp_dst = planning.preprocessed_folder(src), planning.preprocessed_folder(dst)
    report = raw_dst / "pseudo_noise.json"
    if report.is_file() and (pp_dst / f"{plans}.json").is_file():
        return json.loads(report.read_text(encoding="utf-8"))["mean_dice"]
    tmp = raw_dst.with_name(raw_dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "labelsPseudo").mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        os.symlink(raw_src / sub, tmp / sub)
    ds = json.loads((raw_src / "dataset.json").read_text(encoding="utf-8"))
    ds["name"] = dst.split("_", 1)[1]
    ds["description"] += "; labelsPseudo/ = seeded erosion/dilation/shift of the ground truth (a benchmark)"
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

    shutil.rmtree(pp_dst, ignore_errors=True)
    pp_dst.mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
        shutil.copyfile(pp_src / name, pp_dst / name)
    p = json.loads((pp_src / f"{plans}.json").read_text(encoding="utf-8"))
    p["dataset_name"] = dst
    (pp_dst / f"{plans}.json").write_text(json.dumps(p, indent=2), encoding="utf-8")
    planning.preprocess(dst, plans, ["2d"], num_processes=2)
    return mean


if __name__ == "__main__":
    from _real_data import parse_args, run, workspace

    args = parse_args(__doc__, "supervised,protodiff", "0.1", 8, 50, 5, "protodiff:pseudo_weight=0.5")
    workspace("ph2", "semidiff_ph2")
    from semidiff_nnunet import paths, planning

    paths.ensure_nnunet_env()
    src, dst, cpu = "Dataset512_PH2", "Dataset514_PH2noisy", "ph2CPUPlans"
    if not (planning.preprocessed_folder(src) / f"{cpu}.json").is_file():
        raise SystemExit("Run benchmarks/ph2_cpu.py --plan-only first (it plans the PH2 subset).")
    mean = derive(src, dst, cpu)
    print(f"noisy pseudo labels: mean Dice {mean:.4f} against the ground truth (all training cases)")
    if args.plan_only:
        raise SystemExit(0)
    output = args.output
    if output:
        args.output = str(Path(output) / "clean")
    run(args, src, "2d", cpu)
    args.methods = "protodiff"
    args.set = [s for s in args.set if s.startswith("protodiff:")]
    if output:
        args.output = str(Path(output) / "noisy")
    run(args, dst, "2d", cpu)
