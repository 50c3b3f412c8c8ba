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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
