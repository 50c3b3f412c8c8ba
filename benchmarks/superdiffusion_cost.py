"""Cost of ``superdiffusion``: each phase's training step ÷ the summed forward+backward of its networks,
and its inference forward ÷ the plain planned network's.

1. **Phase 1 (pretrain)**: one step runs the teacher's mask pathway f_m and image pathway f_i once each
   on the labeled + unlabeled patches; ratio = step ÷ (f_m + f_i fwd+bwd).
2. **Phase 2 (cotrain)**: teacher f_m and student f_m once, then R rounds of (f_i, f_m); ratio =
   step ÷ (2·f_m + R·(f_i + f_m)) fwd+bwd. The ratios measure what the method adds around its networks
   (noise, eq. 3, losses, optimiser steps); goal ≤ 1.10. Batches are fetched once and reused.
3. **Inference**: the exported module (one f_m forward from seeded noise) ÷ the plain planned network,
   forward only, no gradient.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/superdiffusion_cost.py --device cpu --steps 5 [--dim 3] [--set rounds=5]

4. **Peak memory** (``--memory``, CPU): the resident memory one training step adds (peak RSS during the
   step − RSS before it, the larger of two steps) for ``supervised``'s step and superdiffusion's phase-1
   and phase-2 steps under each ``checkpointing`` setting, on the same plans. Every measurement runs in
   a fresh process with glibc's mmap threshold fixed (freed tensors go back to the system, so RSS
   before a step holds no freed heap); the peak is Linux's VmHWM, reset before each step. The 3D demo
   dataset's ``nnUNetPlans`` (nnU-Net's default features 32–256, four stages, strides 1, 2, 2, 2) at a
   chosen patch and batch size:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/superdiffusion_cost.py --memory --dim 3 --plans nnUNetPlans \\
        --patch 24,40,48 --batch 2
"""

from __future__ import annotations

import argparse

from _demo_trainer import fixed_batches, ms, save_json


def _fwd_bwd(module, *inputs):
    out = module(*inputs)
    out = out if isinstance(out, (list, tuple)) else [out]
    sum(o.float().sum() for o in out).backward()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--plans", default="semidiffDemoPlans", help="semidiffDemoPlans (small) or nnUNetPlans")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="superdiffusion hyperparameter key=value")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory", action="store_true", help="measure peak step memory instead (CPU)")
    parser.add_argument("--patch", default=None, help="with --memory: patch size, e.g. 24,40,48")
    parser.add_argument("--batch", type=int, default=None, help="with --memory: batch size")
    parser.add_argument("--runs", default=None, help="with --memory: comma-separated subset of "
                        "METHOD/PHASE/CHECKPOINTING (default: all six)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child of --memory
    args = parser.parse_args()
    if args.one:
        return memory_one(args)
    if args.memory:
        return memory_main(args)

    from _demo_trainer import demo_dataset, median_timer, started_trainer

    name, configuration, device, dataset_json = demo_dataset(args.dim, args.device, "superdiffusion_cost_")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet.plugins.superdiffusion import SuperDiffusionTrainer
    from semidiff_nnunet.training import unwrap
    from semidiff_nnunet.training.hparams import hparams_to_dict, parse_overrides, resolve_hparams
    from semidiff_nnunet.training.splits import LabeledSpec

    hp = resolve_hparams(SuperDiffusionTrainer.hparams_class, parse_overrides(args.set))
    t = started_trainer(SuperDiffusionTrainer, name, args.plans, configuration, dataset_json, device,
                        {"labeled": LabeledSpec(fraction=0.5).to_json(), "hparams": hparams_to_dict(hp),
                         "phases": {"pretrain": "1"}, "num_epochs": 2})
    labeled, unlabeled = fixed_batches(t)
    timed = median_timer(device)

    lab, unl = t._to_device(labeled), t._to_device(unlabeled)
    x = torch.cat([lab["data"], unl["data"]])
    n, k, c = x.shape[0], t.num_classes, x.shape[1]
    f_m, f_i, student = unwrap(t.network), unwrap(t.image), unwrap(t.student)
    tt = torch.randint(0, hp.num_timesteps, (n,), device=device)
    mask_in = torch.cat([x, torch.randn(n, k, *x.shape[2:], device=device)], 1)
    image_in = torch.cat([torch.randn_like(x), torch.rand(n, k, *x.shape[2:], device=device)], 1)
    fm = timed(lambda: _fwd_bwd(f_m.net, mask_in, tt), args.steps, args.warmup)
    fi = timed(lambda: _fwd_bwd(f_i, image_in, tt), args.steps, args.warmup)

    result: dict = {"device": str(device), "configuration": configuration, "plans": args.plans, "rounds": hp.rounds,
                    "batch": [int(labeled["data"].shape[0]), int(unlabeled["data"].shape[0])],
                    "patch": list(t.configuration_manager.patch_size), "torch_threads": torch.get_num_threads(),
                    "f_m_fwd_bwd_s": fm, "f_i_fwd_bwd_s": fi}
    t.iteration = 0
    step1 = timed(lambda: t.train_step(labeled), args.steps, args.warmup)
    t.current_epoch = 1
    t._enter_phase_of_current_epoch()
    step2 = timed(lambda: t.train_step(labeled), args.steps, args.warmup)
    networks2 = 2 * fm + hp.rounds * (fi + fm)
    result.update({"pretrain_step_s": step1, "pretrain_over_networks": step1 / (fm + fi),
                   "cotrain_step_s": step2, "cotrain_networks_s": networks2, "cotrain_over_networks": step2 / networks2})
    for module in (f_m, f_i, student):
        module.zero_grad(set_to_none=True)

    plain = nnUNetTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, c, k, False).to(device)
    inference = SuperDiffusionTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, c, k,
                                                                 False).to(device)
    plain.eval()
    inference.eval()
    with torch.no_grad():
        inf = timed(lambda: inference(x), args.steps, args.warmup)
        base = timed(lambda: plain(x), args.steps, args.warmup)
    result.update({"inference_s": inf, "plain_inference_s": base, "inference_over_plain": inf / base})
    t.on_train_end = None

    print(f"device {device}, {configuration}, plans {args.plans}, batch {result['batch']} (labeled, unlabeled), "
          f"patch {result['patch']}, R = {hp.rounds}, torch threads {result['torch_threads']}")
    print(f"f_m fwd+bwd {ms(fm)}   f_i fwd+bwd {ms(fi)}")
    print(f"pretrain step {ms(step1)}   step / (f_m + f_i)            {step1 / (fm + fi):7.3f}  (goal <= 1.10)")
    print(f"cotrain step  {ms(step2)}   step / (2 f_m + R (f_i + f_m)) {step2 / networks2:7.3f}  (goal <= 1.10)")
    print(f"inference     {ms(inf)}   / plain planned network {ms(base)} = {inf / base:.3f}")
    save_json(args.json, result)
    return result


MEMORY_RUNS = (("supervised", "step", "none"), ("superdiffusion", "pretrain", "none"),
               ("superdiffusion", "pretrain", "all"), ("superdiffusion", "cotrain", "none"),
               ("superdiffusion", "cotrain", "rounds"), ("superdiffusion", "cotrain", "all"))


def _memory_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status", encoding="ascii"))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:  # "5": VmHWM := VmRSS
        f.write("5")


def memory_main(args) -> list:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    rows = []
    wanted = args.runs.split(",") if args.runs else ["/".join(r) for r in MEMORY_RUNS]
    for method, phase, ck in (r.split("/") for r in wanted):
        cmd = [sys.executable, __file__, "--one", f"{method}:{phase}:{ck}", "--dim", str(args.dim),
               "--plans", args.plans, "--device", "cpu"] + [f"--set={kv}" for kv in args.set]
        cmd += ["--patch", args.patch] if args.patch else []
        cmd += ["--batch", str(args.batch)] if args.batch else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{method:15s} {phase:9s} checkpointing={ck:7s} step adds {row['step_mb']:8.0f} MB "
              f"(RSS before {row['rss_before_mb']:.0f} MB, step {row['step_s']:.2f} s)", flush=True)
    base = next((r["step_mb"] for r in rows if r["run"].startswith("supervised")), None)
    for row in rows:
        row["over_supervised"] = row["step_mb"] / base if base else None
    print(f"patch {rows[0]['patch']}, batch {rows[0]['batch']}, features {rows[0]['features']}, "
          f"R = {rows[-1]['rounds']}" + ("; ratios to supervised: " + ", ".join(
              f"{r['run']} {r['over_supervised']:.1f}" for r in rows) if base else ""))
    save_json(args.json, rows)
    return rows


def memory_one(args) -> dict:
    """One measurement (a child process of ``--memory``): build the trainer, fetch one batch, and report
    the memory the next two training steps add."""
    import gc
    import json
    import time

    from _demo_trainer import demo_dataset

    method, phase, ck = args.one.split(":")
    name, configuration, device, dataset_json = demo_dataset(args.dim, "cpu", "superdiffusion_mem_")
    from semidiff_nnunet import api, planning
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.hparams import hparams_to_dict, parse_overrides, resolve_hparams
    from semidiff_nnunet.training.splits import LabeledSpec

    cls = api.method_trainer(method)
    sets = parse_overrides(args.set + ([f"checkpointing={ck}"] if method == "superdiffusion" else []))
    hp = resolve_hparams(cls.hparams_class, sets)
    plans = planning.load_plans(name, args.plans)
    plans["continue_training"] = False
    c = plans["configurations"][configuration]
    if args.patch:
        c["patch_size"] = [int(v) for v in args.patch.split(",")]
        kw = c["architecture"]["arch_kwargs"]
        kw["kernel_sizes"] = [[3] * len(c["patch_size"])] * kw["n_stages"]
        kw["strides"] = [[1] * len(c["patch_size"])] + [[2] * len(c["patch_size"])] * (kw["n_stages"] - 1)
    if args.batch:
        c["batch_size"] = args.batch
    run = {"labeled": LabeledSpec(fraction=0.5).to_json(), "hparams": hparams_to_dict(hp), "num_epochs": 2}
    if method == "superdiffusion":
        run["phases"] = {"pretrain": "1"}
    RunConfig.from_json(run).write(plans)
    t = cls(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json, device=device)
    t.print_to_log_file = lambda *a, **k: None
    t.on_train_start()
    t.current_epoch = 1 if method == "superdiffusion" and phase == "cotrain" else 0
    t.on_train_epoch_start()  # enters the epoch's phase
    t.iteration = getattr(t, "burnin_iterations", 0)
    labeled, _ = fixed_batches(t)
    extra, times = [], []
    for _ in range(2):
        gc.collect()
        _reset_peak()
        before, _ = _memory_kb()
        start = time.perf_counter()
        t.train_step(labeled)
        times.append(time.perf_counter() - start)
        _, peak = _memory_kb()
        extra.append((peak - before, before))
    t.on_train_end = None
    step_kb, before_kb = max(extra)
    row = {"run": f"{method}/{phase}/{ck}", "patch": c["patch_size"], "batch": c["batch_size"],
           "features": c["architecture"]["arch_kwargs"]["features_per_stage"],
           "rounds": getattr(hp, "rounds", None), "step_mb": step_kb / 1024, "rss_before_mb": before_kb / 1024,
           "step_s": min(times)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
