"""The "supervised first, then semi-supervised from its checkpoint" recipe on the PH2 subset, on a CPU.

For each seed: ``supervised`` for ``--first`` epochs on the labeled cases, then ``--method`` (default
``mean-teacher``) for ``--second`` epochs initialised from that run's ``checkpoint_final.pth``
(``--pretrained-weights``), both with ``--iters-per-epoch`` iterations, so the pair spends the same total
budget as one run of ``--first + --second`` epochs. Both are scored on the held-out cases that
``ph2_cpu.py`` uses; where ``ph2_cpu.py`` already trained ``supervised`` and ``--method`` from scratch at
that total budget in the same workspace, their Dice is printed beside it. ``--control`` also trains
``supervised`` for ``--second`` epochs from the same checkpoint: the gain of restarting the learning-rate
schedule alone, without any unlabeled data (in ``$SEMIDIFF_HOME/recipe_control_results``).

The recipe's runs live in their own results folder (``$SEMIDIFF_HOME/recipe_results``) so they never
collide with the from-scratch runs of the same method, fraction and seed. Run ``ph2_cpu.py --plan-only``
first (it converts and plans the dataset).

    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/recipe_ph2.py \\
        --seeds 0,1 --first 4 --second 4 --iters-per-epoch 50
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _dice(summary: Path) -> float | None:
    if not summary.is_file():
        return None
    return json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["Dice"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="mean-teacher")
    p.add_argument("--labeled", default="0.1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--first", type=int, default=4, help="epochs of supervised")
    p.add_argument("--second", type=int, default=4, help="epochs of --method from the supervised checkpoint")
    p.add_argument("--iters-per-epoch", type=int, default=50)
    p.add_argument("--val-iters", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--control", action="store_true",
                   help="also train supervised for --second epochs from the same checkpoint (what the restart of "
                        "the learning-rate schedule alone gives)")
    args = p.parse_args()

    from _real_data import workspace

    workspace("ph2", "semidiff_ph2")  # the same workspace as ph2_cpu.py
    home = Path(os.environ["SEMIDIFF_HOME"])
    scratch_results = Path(os.environ.get("nnUNet_results") or home / "nnUNet_results")
    recipe, control = home / "recipe_results", home / "recipe_control_results"
    os.environ["nnUNet_results"] = str(recipe)

    from semidiff_nnunet import api, paths, planning
    from semidiff_nnunet.api import benchmark_runs as benchmark

    paths.ensure_nnunet_env()
    name, plans, cfg = "Dataset512_PH2", "ph2CPUPlans", "2d"
    if not (planning.preprocessed_folder(name) / f"{plans}.json").is_file():
        raise SystemExit("Run benchmarks/ph2_cpu.py --plan-only first (it plans the PH2 subset).")
    images, labels, held = benchmark.held_out(name, 0)

    def sup_rel(seed: int) -> Path:
        return api.run_info(name, "supervised", args.labeled, seed, cfg, 0, plans).fold_folder.relative_to(
            paths.results_root())

    total = args.first + args.second
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.time()
        common = dict(labeled=args.labeled, seed=seed, configuration=cfg, fold=0, device=args.device,
                      plans_name=plans, iters_per_epoch=args.iters_per_epoch, val_iters_per_epoch=args.val_iters,
                      final_validation=False, show_progress=False)
        scores = {}
        stages = [("supervised", recipe, "supervised", args.first, False),
                  (args.method, recipe, args.method, args.second, True)]
        if args.control:
            stages.append(("control", control, "supervised", args.second, True))
        for key, results, method, epochs, from_sup in stages:
            os.environ["nnUNet_results"] = str(results)
            info = api.run_info(name, method, args.labeled, seed, cfg, 0, plans)
            if not info.finished:
                pretrained = None
                if from_sup:
                    pretrained = recipe / sup_rel(seed) / "checkpoint_final.pth"
                api.train(name, method, epochs=epochs, pretrained_weights=pretrained,
                          continue_training=info.resumable_checkpoint() is not None, **common)
            pred = info.fold_folder / "benchmark_predictions"
            if _dice(pred / "summary.json") is None:
                api.predict(name, method, images, pred, labeled=args.labeled, seed=seed, configuration=cfg,
                            folds=(0,), device=args.device, plans_name=plans, show_progress=False)
                api.evaluate(name, pred, labels, pred / "summary.json")
            scores[key] = _dice(pred / "summary.json")
        os.environ["nnUNet_results"] = str(recipe)
        scratch = {}
        for method in ("supervised", args.method):
            rel = api.run_info(name, method, args.labeled, seed, cfg, 0, plans).fold_folder.relative_to(
                paths.results_root())
            scratch[method] = _dice(scratch_results / rel / "benchmark_predictions" / "summary.json")
        rows.append((seed, scores["supervised"], scores[args.method], scores.get("control"), scratch["supervised"],
                     scratch[args.method]))
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)

    def f(v):
        return "—" if v is None else f"{v:.4f}"

    it = args.iters_per_epoch
    lines = [f"**{name}, {cfg}, labeled {args.labeled}, held out: {held}; Dice**", "",
             f"| seed | supervised {args.first * it} it | + {args.method} {args.second * it} it "
             f"(from the checkpoint) | + supervised {args.second * it} it (from the checkpoint) | "
             f"supervised {total * it} it | {args.method} {total * it} it (scratch) |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([str(r[0])] + [f(v) for v in r[1:]]) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = paths.runs_root() / "benchmarks" / "recipe.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
