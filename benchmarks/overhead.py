"""Overhead of SemiSupervisedTrainer over stock nnUNetTrainer for `supervised` (same plans, batch, device).

Times whole training iterations (next batch + train_step) of both trainers, interleaved in
blocks so that machine noise hits both alike, and reports the median seconds per step and the
ratio. Usage:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead.py --device cpu --steps 30 [--dim 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per trainer (median taken)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=5, help="steps per trainer before switching")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--plans", default="nnUNetPlans", help="nnUNetPlans (full network) or semidiffDemoPlans")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()

    from _demo_trainer import demo_dataset, started_trainer

    name, configuration, device, dataset_json = demo_dataset(args.dim, args.device, "overhead_")
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet.plugins.supervised import SupervisedTrainer
    from semidiff_nnunet.training.splits import LabeledSpec

    trainers = {
        "stock nnUNetTrainer": started_trainer(nnUNetTrainer, name, args.plans, configuration, dataset_json, device),
        "semidiff supervised": started_trainer(SupervisedTrainer, name, args.plans, configuration, dataset_json,
                                               device, {"labeled": LabeledSpec(fraction=1.0).to_json()}),
    }

    def step(t):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        t.train_step(next(t.dataloader_train))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for t in trainers.values():
        for _ in range(args.warmup):
            step(t)
    times = {k: [] for k in trainers}
    while min(len(v) for v in times.values()) < args.steps:
        for label, t in trainers.items():
            times[label].extend(step(t) for _ in range(args.block))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["semidiff supervised"] / medians["stock nnUNetTrainer"]
    batch = trainers["stock nnUNetTrainer"].batch_size
    patch = trainers["stock nnUNetTrainer"].configuration_manager.patch_size
    for label, m in medians.items():
        print(f"{label:22s} median {m * 1000:8.1f} ms/step over {len(times[label])} steps "
              f"(IQR {np.percentile(times[label], 25) * 1000:.1f}-{np.percentile(times[label], 75) * 1000:.1f} ms)")
    print(f"ratio semidiff/stock = {ratio:.3f}  (device {device}, {configuration}, plans {args.plans}, batch {batch}, "
          f"patch {list(patch)}, torch threads {torch.get_num_threads()})")
    for t in trainers.values():
        t.on_train_end = None
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"medians_s": medians, "ratio": ratio, "device": str(device), "configuration": configuration,
                       "plans": args.plans, "batch_size": batch, "patch_size": list(patch)}, f, indent=2)
