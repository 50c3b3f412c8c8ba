"""Throughput of one rank against N ranks (``--nproc N``) on the demo dataset, same global batch.

Each run trains ``--epochs`` epochs of ``--iters`` iterations from scratch (no validation) for one
method; the first epoch is warm-up (loader start, first allocations) and left out. Reported: seconds
per iteration (median epoch time ÷ iterations) and the speed-up of N ranks over one. nnU-Net splits
the batch across ranks (global batch kept), so on GPUs the ideal is N×; on a CPU the ranks share the
cores: each of N CPU ranks gets ``cores / N`` torch threads, against all cores for the single rank.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddp_scaling.py --methods supervised,mean-teacher --nproc 2 \\
        --device cpu --epochs 3 --iters 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path


def epoch_times(fold_folder: Path) -> list[float]:
    logs = sorted(fold_folder.glob("training_log_*.txt"))
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in logs)
    return [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", text)]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="supervised,mean-teacher")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    os.environ.setdefault("SEMIDIFF_HOME", os.path.join(tempfile.gettempdir(), "semidiff_bench"))
    os.environ["nnUNet_compile"] = "false"
    from semidiff_nnunet import api, paths

    paths.ensure_nnunet_env()
    name = api.prepare_demo_dataset(dim=args.dim, show_progress=False)
    configuration = "2d" if args.dim == 2 else "3d_fullres"
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="ddp_scaling_")
    cores = os.cpu_count() or 1
    result: dict = {"device": args.device, "configuration": configuration, "cores": cores, "runs": {}}
    for method in args.methods.split(","):
        per = {}
        for seed, nproc in enumerate((1, args.nproc)):
            t0 = time.perf_counter()
            info = api.train(name, method, labeled="0.4", seed=seed, configuration=configuration, device=args.device,
                             epochs=args.epochs, iters_per_epoch=args.iters, plans_name="semidiffDemoPlans",
                             val_iters_per_epoch=0, final_validation=False, show_progress=False, nproc=nproc)
            wall = time.perf_counter() - t0
            times = epoch_times(info.fold_folder)[1:]
            per[nproc] = {"s_per_iter": statistics.median(times) / args.iters, "wall_s": wall,
                          "epoch_times_s": times}
        one, many = per[1]["s_per_iter"], per[args.nproc]["s_per_iter"]
        result["runs"][method] = {"1": per[1], str(args.nproc): per[args.nproc], "speedup": one / many}
        print(f"{method:14s} 1 rank {one:6.3f} s/it   {args.nproc} ranks {many:6.3f} s/it   "
              f"speed-up {one / many:4.2f}x  (ideal {args.nproc}x on {args.nproc} devices; {cores} CPU cores here)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
