"""Cost of a ``diffrect`` training step: step time ÷ the summed forward+backward time of its networks,
and peak memory next to ``supervised``.

A DiffRect step (with the rectification step on, i.e. past ``refine_start``) runs: the
segmentation network forward+backward on labeled + weak + strong patches; the rectification
network forward+backward twice (W2G on labeled + weak, S2W on strong); a DDIM sample of the
rectification network (forward only) on the weak patches; the segmentation network again
forward+backward on the weak patches. Each is timed alone on the same tensors ("networks"); the
ratio step ÷ networks measures what the method adds around them (colouring, pseudo labels,
guidance, losses, optimiser steps; goal ≤ 1.10). Batches are fetched once and reused, so data
augmentation is not timed. Each method runs in its own subprocess so that its peak memory is its
own: CUDA ``max_memory_allocated``; CPU peak RSS (``ru_maxrss``) and its growth during the timed
steps.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/diffrect_cost.py --device cpu --steps 10 [--dim 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _demo_trainer import save_json


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    os.environ["nnUNet_compile"] = "false"
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch
    from _demo_trainer import demo_dataset, started_trainer

    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.diffrect.losses import colorize
    from semidiff_nnunet.training.splits import LabeledSpec

    name, configuration, device, dataset_json = demo_dataset(args.dim, args.device, "diffrect_cost_")
    t = started_trainer(api.method_trainer(args.worker), name, args.plans, configuration, dataset_json, device,
                        {"labeled": LabeledSpec(fraction=0.5).to_json(),
                         "hparams": {"refine_start": 0.0, "refine_min_updates": 0, "rect_gate": False}
                         if args.worker == "diffrect" else {}})
    batch = next(t.dataloader_train)
    if t.dataloader_unlabeled is not None:
        unl = next(t.dataloader_unlabeled)
        t._shutdown_unlabeled_loader()
        t.dataloader_unlabeled = itertools.repeat(unl)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        t.train_step(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    for _ in range(2):
        t.train_step(batch)
    memory = ({"peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20} if device.type == "cuda" else
              {"peak_rss_mb": _peak_rss_mb(), "rss_growth_during_steps_mb": max(0.0, _peak_rss_mb() - rss_before)})

    # the networks alone, on the tensors of the step
    to = t._to_device
    lab = to(batch)
    x_l = lab["data"]

    def fwd_bwd(net, *inputs):
        def run():
            out = net(*inputs)
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.float().mean() if o.ndim else o.float() for o in outs).backward()
        return run

    parts = {}
    if args.worker == "diffrect":
        u = to(unl)
        x_u, x_s = u["data"], u["data_strong"]
        n = t.num_classes
        lab_u = torch.randint(0, n, (x_u.shape[0], *x_u.shape[2:]), device=device)
        col_u = colorize(lab_u, n)
        col_w = torch.cat([colorize(lab["target"][0][:, 0].long(), n), col_u])
        x_w = torch.cat([x_l, x_u])
        tau_w = torch.full((x_w.shape[0],), 100.0, device=device)
        tau_u = tau_w[: x_u.shape[0]]
        parts["segmentation fwd+bwd (labeled+weak+strong)"] = fwd_bwd(t.network, torch.cat([x_l, x_u, x_s]))
        parts["rectifier W2G fwd+bwd"] = fwd_bwd(
            lambda *a: t.lfr.loss_and_logits(t.rectifier, *a), x_w, col_w, tau_w, col_w)
        parts["rectifier S2W fwd+bwd"] = fwd_bwd(
            lambda *a: t.lfr.loss_and_logits(t.rectifier, *a), x_s, col_u, tau_u, col_u)

        def sample():
            t.lfr.sample(t.rectifier, x_u, col_u, tau_u)
        parts["rectifier DDIM sample fwd"] = sample
        parts["segmentation fwd+bwd (weak, rectified)"] = fwd_bwd(t.network, x_u)
    else:
        parts["segmentation fwd+bwd (labeled)"] = fwd_bwd(t.network, x_l)
    # interleaved rounds (one step, then each network once) so that load from other processes
    # hits the step and its networks alike; medians over rounds
    for fn in parts.values():
        fn()
    samples = {k: [] for k in ["step", *parts]}
    for _ in range(args.steps):
        for k, fn in [("step", lambda: t.train_step(batch)), *parts.items()]:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[k].append(time.perf_counter() - start)
    step = statistics.median(samples.pop("step"))
    times = {k: statistics.median(v) for k, v in samples.items()}
    nets = sum(times.values())
    return {"method": args.worker, "device": str(device), "batch_size": t.batch_size,
            "patch_size": list(t.configuration_manager.patch_size), "step_s": step, "networks_s": nets,
            "ratio": step / nets, "parts_s": times, **memory}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--plans", default="semidiffDemoPlans", help="semidiffDemoPlans (small) or nnUNetPlans")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("SEMIDIFF_HOME", os.path.join(tempfile.gettempdir(), "semidiff_bench"))
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = []
    for method in ("supervised", "diffrect"):
        cmd = [sys.executable, __file__, "--worker", method, "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dim", str(args.dim), "--plans", args.plans]
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    mem_key = "peak_allocated_mb" if "peak_allocated_mb" in results[0] else "peak_rss_mb"
    print(f"device {results[0]['device']}, {args.dim}D, plans {args.plans}, batch {results[0]['batch_size']}, "
          f"patch {results[0]['patch_size']}")
    for r in results:
        extra = f", RSS growth {r['rss_growth_during_steps_mb']:.0f} MB" if "rss_growth_during_steps_mb" in r else ""
        print(f"{r['method']:>10}: step {r['step_s'] * 1000:8.1f} ms, networks {r['networks_s'] * 1000:8.1f} ms, "
              f"ratio {r['ratio']:.3f}, {mem_key} {r[mem_key]:.0f} MB{extra}")
        for k, v in r["parts_s"].items():
            print(f"{'':>12}{k}: {v * 1000:.1f} ms")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
