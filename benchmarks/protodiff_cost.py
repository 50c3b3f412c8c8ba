"""Cost of a ``protodiff`` training step and of its DDIM inference against plain nnU-Net.

1. **Step ÷ networks.** A ProtoDiff step (after the burn-in, the EMA-teacher term at full weight)
   runs the model's training forward (planned encoder, branches, label encoder, decoder, projector)
   on labeled ⊕ teacher-labelled unlabeled patches forward+backward, and the EMA teacher's DDIM
   sampling (no gradient) on the unlabeled patches. Each is timed alone on the same tensors; the
   ratio full step ÷ (training fwd+bwd + teacher sampling) measures what the method adds around
   them (one-hot labels, pixel choice, prototype assignment and update, L_inter/L_intra, CE terms,
   optimiser step, EMA update; goal ≤ 1.10). Batches are fetched once and reused (no augmentation
   timed). No ``labelsPseudo/`` in the demo set: that stream only adds patches to the same forward.
2. **Inference ÷ plain nnU-Net** as a function of DDIM steps: ``ProtoDiffNet.sample`` on one batch of
   patches against the planned nnU-Net network's forward; the model for it is
   1 + steps × decoder share, where the shares are (encoder + branches) and one decoder call, each
   over the plain network's forward (goal: measured ≤ that model with the encoder share).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/protodiff_cost.py --device cpu --steps 5 [--dim 2]
"""

from __future__ import annotations

import argparse

from _demo_trainer import fixed_batches, ms, save_json


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--plans", default="semidiffDemoPlans", help="semidiffDemoPlans (small) or nnUNetPlans")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ddim", default="1,2,3,5,10", help="DDIM step counts for the inference curve")
    parser.add_argument("--set", action="append", default=[], help="protodiff hyperparameter key=value")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from _demo_trainer import demo_dataset, median_timer, started_trainer

    name, configuration, device, dataset_json = demo_dataset(args.dim, args.device, "protodiff_cost_")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet.diffusion import labels_to_onehot
    from semidiff_nnunet.plugins.protodiff import ProtoDiffTrainer
    from semidiff_nnunet.training import unwrap
    from semidiff_nnunet.training.hparams import hparams_to_dict, parse_overrides, resolve_hparams
    from semidiff_nnunet.training.splits import LabeledSpec

    overrides = {"teacher_confidence": "0", **parse_overrides(args.set)}  # every teacher pixel counts
    hp = resolve_hparams(ProtoDiffTrainer.hparams_class, overrides)
    t = started_trainer(ProtoDiffTrainer, name, args.plans, configuration, dataset_json, device,
                        {"labeled": LabeledSpec(fraction=0.5).to_json(), "hparams": hparams_to_dict(hp)})
    t.iteration = 10**7  # past the burn-in and the ramp: the teacher term at full weight
    labeled, unlabeled = fixed_batches(t)
    timed = median_timer(device)
    result: dict = {"device": str(device), "configuration": configuration, "plans": args.plans,
                    "batch": [int(labeled["data"].shape[0]), int(unlabeled["data"].shape[0])],
                    "patch": list(t.configuration_manager.patch_size), "torch_threads": torch.get_num_threads(),
                    "hparams": overrides}
    step = timed(lambda: t.train_step(labeled), args.steps, args.warmup)

    net = unwrap(t.network)
    lab, unl = t._to_device(labeled), t._to_device(unlabeled)
    x = torch.cat([lab["data"], unl["data"]])
    y = torch.randint(0, t.num_classes, (x.shape[0], *x.shape[2:]), device=device)
    y0 = labels_to_onehot(y, t.num_classes)
    pix = torch.randperm(y.numel(), device=device)[: hp.proto_pixels]

    def train_fwd_bwd():
        out = net(x, y0=y0, pixels=pix)
        (out["logits"].float().sum() + sum(a.float().sum() for a in out["aux"]) + out["latent"].sum()).backward()

    fwd_bwd = timed(train_fwd_bwd, args.steps, args.warmup)
    teacher = timed(lambda: t.teacher_labels(unl["data"]), args.steps, args.warmup)
    net.zero_grad(set_to_none=True)
    result.update({"step_s": step, "train_fwd_bwd_s": fwd_bwd, "teacher_sample_s": teacher,
                   "step_over_networks": step / (fwd_bwd + teacher)})

    # inference vs plain nnU-Net
    plain = nnUNetTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                                     t.num_classes, False).to(device).eval()
    net.eval()
    xi = lab["data"]
    with torch.no_grad():
        plain_t = timed(lambda: plain(xi), args.steps, args.warmup)
        enc_t = timed(lambda: net.encode(xi), args.steps, args.warmup)
        xs, fs = net.encode(xi)
        m = torch.randn((xi.shape[0], net.label_channels, *xi.shape[2:]), device=device)
        tt = torch.ones(1, device=device)
        dec_t = timed(lambda: net.decode(m, xs, fs, tt), args.steps, args.warmup)
        curve = {}
        for n in (int(s) for s in args.ddim.split(",")):
            s_t = timed(lambda n=n: net.sample(xi, steps=n), args.steps, args.warmup)
            curve[n] = {"sample_s": s_t, "over_plain": s_t / plain_t,
                        "model": (enc_t + n * dec_t) / plain_t, "goal": 1 + n * dec_t / plain_t}
    result.update({"plain_forward_s": plain_t, "encoder_branches_s": enc_t, "decoder_call_s": dec_t,
                   "encoder_share": enc_t / plain_t, "decoder_share": dec_t / plain_t, "inference": curve})
    t.on_train_end = None

    print(f"device {device}, {configuration}, plans {args.plans}, batch {result['batch']} (labeled, unlabeled), "
          f"patch {result['patch']}, torch threads {result['torch_threads']}")
    print(f"full protodiff step          {ms(step)}")
    print(f"training fwd+bwd             {ms(fwd_bwd)}")
    print(f"EMA teacher DDIM sampling    {ms(teacher)}")
    print(f"step / networks              {step / (fwd_bwd + teacher):8.3f}   (goal <= 1.10)")
    print(f"plain nnU-Net forward        {ms(plain_t)};  encoder+branches {enc_t / plain_t:.2f}x, one decoder "
          f"call {dec_t / plain_t:.2f}x of it")
    for n, c in curve.items():
        print(f"DDIM {n:2d} steps: {ms(c['sample_s'])} = {c['over_plain']:.2f}x plain   (model "
              f"{c['model']:.2f}x, goal 1 + steps x decoder share = {c['goal']:.2f}x)")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
