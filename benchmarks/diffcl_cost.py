"""Cost of a ``diffcl`` training step, of HF-Mamba inside the CS network, and of the scan backends.

1. **Step ÷ networks.** A Diff-CL step runs the CS network (planned network + HF-Mamba) and the DS
   network (planned network on image ⊕ Y_t, time-conditioned) forward+backward on the labeled +
   unlabeled patches. Each is timed alone on the same tensors (forward, ``sum`` of the outputs,
   backward); the ratio full step ÷ (CS + DS) measures what the method adds around them (pseudo
   labels, label noise, losses, memory bank, projection head, contrastive loss, three optimiser
   steps; goal ≤ 1.10). Batches are fetched once and reused, so data augmentation is not timed.
2. **HF-Mamba ÷ CS.** CS forward+backward with and without the module (the plain planned network),
   and the module alone on its input.
3. **Scan backends.** The pure-PyTorch selective scan (sequential, and chunked) against mamba-ssm's
   fused kernel at the bottleneck's sizes, on CUDA with mamba-ssm installed (skipped otherwise).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/diffcl_cost.py --device cpu --steps 10 [--dim 2]
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
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="diffcl hyperparameter key=value")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from _demo_trainer import demo_dataset, median_timer, started_trainer

    name, configuration, device, dataset_json = demo_dataset(args.dim, args.device, "diffcl_cost_")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet.plugins.diffcl import DiffCLTrainer
    from semidiff_nnunet.plugins.diffcl.hf_mamba import find_hf_mamba
    from semidiff_nnunet.plugins.diffcl.mamba import fused_scan_available, selective_scan
    from semidiff_nnunet.training import unwrap
    from semidiff_nnunet.training.hparams import hparams_to_dict, parse_overrides, resolve_hparams
    from semidiff_nnunet.training.splits import LabeledSpec

    hp = resolve_hparams(DiffCLTrainer.hparams_class, parse_overrides(args.set))
    t = started_trainer(DiffCLTrainer, name, args.plans, configuration, dataset_json, device,
                        {"labeled": LabeledSpec(fraction=0.5).to_json(), "hparams": hparams_to_dict(hp)})
    labeled, unlabeled = fixed_batches(t)
    timed = median_timer(device)

    result: dict = {"device": str(device), "configuration": configuration, "plans": args.plans,
                    "batch": [int(labeled["data"].shape[0]), int(unlabeled["data"].shape[0])],
                    "patch": list(t.configuration_manager.patch_size), "torch_threads": torch.get_num_threads()}
    step = timed(lambda: t.train_step(labeled), args.steps, args.warmup)

    lab, unl = t._to_device(labeled), t._to_device(unlabeled)
    x = torch.cat([lab["data"], unl["data"]])
    n_cls = t.num_classes
    y0 = torch.nn.functional.one_hot(torch.randint(0, n_cls, (x.shape[0], *x.shape[2:]), device=device),
                                     n_cls).movedim(-1, 1).float()
    tt = torch.rand(x.shape[0], device=device)
    ds_net = unwrap(t.ds).network
    ds_in = torch.cat([x, y0], 1)
    cs = timed(lambda: _fwd_bwd(t.network, x), args.steps, args.warmup)
    ds = timed(lambda: _fwd_bwd(ds_net, ds_in, tt * 1000), args.steps, args.warmup)
    for opt in [t.optimizer, *(o for o, _ in t.extra_optimizers.values())]:
        opt.zero_grad(set_to_none=True)

    plain = nnUNetTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                                     n_cls, t.enable_deep_supervision).to(device)
    plain_t = timed(lambda: _fwd_bwd(plain, x), args.steps, args.warmup)
    (hfm,) = find_hf_mamba(unwrap(t.network))
    feats = {}
    handle = hfm.register_forward_hook(lambda _m, inp, _o: feats.__setitem__("x", inp[0].detach()))
    with torch.no_grad():
        t.network(x)
    handle.remove()
    f_in = feats["x"].requires_grad_()
    hfm_t = timed(lambda: _fwd_bwd(hfm, f_in), args.steps, args.warmup)
    n_params = sum(p.numel() for p in hfm.parameters())
    result.update({
        "step_s": step, "cs_fwd_bwd_s": cs, "ds_fwd_bwd_s": ds, "step_over_networks": step / (cs + ds),
        "plain_cs_fwd_bwd_s": plain_t, "hfm_fwd_bwd_s": hfm_t, "cs_over_plain": cs / plain_t,
        "hfm_share_of_cs": hfm_t / cs, "hfm_input_shape": list(f_in.shape), "hfm_params": n_params,
        "cs_params": sum(p.numel() for p in t.network.parameters()),
    })

    # scan backends at the bottleneck's sizes
    b, c = f_in.shape[:2]
    length = int(torch.tensor(f_in.shape[2:]).prod())
    d_inner, n = hp.expand * c, hp.d_state
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    u, delta, z = r(b, d_inner, length), r(b, d_inner, length), r(b, d_inner, length)
    A = -torch.rand(d_inner, n, generator=g).to(device) - 0.5
    B, C, D, bias = r(b, n, length), r(b, n, length), r(d_inner), r(d_inner)
    scans = {}
    for label, kw in (("torch_sequential", {"backend": "torch"}), ("torch_chunk16", {"backend": "torch", "chunk_size": 16}),
                      ("fused", {"backend": "fused"})):
        if label == "fused" and not (device.type == "cuda" and fused_scan_available()):
            scans[label] = None
            continue
        scans[label] = timed(lambda kw=kw: selective_scan(u, delta, A, B, C, D, z, bias, True, **kw),
                             args.steps, args.warmup)
    result["scan_shape"] = {"batch": b, "d_inner": d_inner, "d_state": n, "length": length}
    result["scan_forward_s"] = scans
    t.on_train_end = None

    print(f"device {device}, {configuration}, plans {args.plans}, batch {result['batch']} (labeled, unlabeled), "
          f"patch {result['patch']}, torch threads {result['torch_threads']}")
    print(f"full diffcl step       {ms(step)}")
    print(f"CS fwd+bwd             {ms(cs)}   (plain planned network {ms(plain_t)}: CS/plain = {cs / plain_t:.3f})")
    print(f"DS fwd+bwd             {ms(ds)}")
    print(f"step / (CS + DS)       {step / (cs + ds):8.3f}   (goal <= 1.10)")
    print(f"HF-Mamba fwd+bwd alone {ms(hfm_t)}   = {hfm_t / cs:.1%} of CS; input {list(f_in.shape)}, "
          f"{n_params} of {result['cs_params']} CS parameters")
    for label, v in scans.items():
        print(f"scan {label:18s} {'skipped (needs CUDA + mamba-ssm)' if v is None else ms(v)}   "
              f"(B={b}, D={d_inner}, N={n}, L={length})")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
