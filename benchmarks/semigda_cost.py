"""Cost of ``semigda``: each stage's training step ÷ the forward+backward of the network passes it makes,
and its peak memory against ``supervised`` on the same plans and batch.

1. **Stage 1 (align)**: one pass of both branches to the latents (no decoding) over labeled + unlabeled
   patches, plus the frozen VAE encoding of the masks; ratio = step ÷ that pass's forward+backward.
2. **Stage 2 (segment)**, copy-paste on (``copy_paste_start=0``, the costlier case): both branches decoded
   over labeled + unlabeled, then once more over the copy-pasted pairs; ratio = step ÷ those two
   passes' forward+backward. The ratios measure what the method adds around its networks (pseudo
   labels, largest components, the copy-paste mixing, losses, two optimisers); goal ≤ 1.10.
3. **Peak memory** of stage-2 steps and of ``supervised`` steps (each in a fresh process, after the
   trainer is built and the batches fetched): on CUDA ``max_memory_allocated`` above what was allocated
   before the steps, on CPU the peak resident memory (sampled every millisecond) above the resident
   memory before the first step (activations, gradients and optimiser state).

The VAE is a tiny random ``AutoencoderKL`` (as in the tests) unless ``--vae`` points to real weights.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/semigda_cost.py --device cpu --steps 5 [--vae /path/to/sd-vae]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile

from _demo_trainer import fixed_batches, ms, save_json

TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def tiny_vae_folder() -> str:
    import torch
    from diffusers import AutoencoderKL

    n = len(TINY_VAE["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        **TINY_VAE)
    folder = tempfile.mkdtemp(prefix="semigda_cost_vae_")
    vae.save_pretrained(folder)
    return folder


def _trainer(method: str, args, vae: str, phases: dict | None = None):
    from _demo_trainer import demo_dataset, started_trainer

    from semidiff_nnunet import api
    from semidiff_nnunet.training.hparams import hparams_to_dict, resolve_hparams
    from semidiff_nnunet.training.splits import LabeledSpec

    name, configuration, device, dataset_json = demo_dataset(2, args.device, "semigda_cost_")
    cls = api.method_trainer(method)
    over = {"vae": vae, "copy_paste_start": 0.0} if method == "semigda" else {}
    hp = resolve_hparams(cls.hparams_class, over)
    run = {"labeled": LabeledSpec(fraction=0.5).to_json(), "hparams": hparams_to_dict(hp), "num_epochs": 2}
    if phases:
        run["phases"] = phases
    return started_trainer(cls, name, args.plans, configuration, dataset_json, device, run), device


def _peak_memory(method: str, args, vae: str, queue) -> None:
    """One process: a trainer of ``method``, ``args.steps`` steps; put the peak memory (MiB) on ``queue``."""
    import torch

    t, device = _trainer(method, args, vae, {"align": "1"} if method == "semigda" else None)
    if method == "semigda":
        t.current_epoch = 1
        t._enter_phase_of_current_epoch()
        t.iteration = t.num_iterations_per_epoch
    labeled, _ = fixed_batches(t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(args.steps):
            t.train_step(labeled)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:  # resident memory sampled every millisecond; the first step's allocations (optimiser state) count
        import os
        import threading
        import time

        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * page

        base, top, done = rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                top[0] = max(top[0], rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for _ in range(args.steps):
            t.train_step(labeled)
        done.set()
        sampler.join()
        peak = (top[0] - base) / 2**20
    t._shutdown_unlabeled_loader() if t.dataloader_unlabeled is not None else None
    queue.put(peak)


def _fwd_bwd(fn):
    out = fn()
    sum(v.float().sum() for v in out.values() if v.requires_grad).backward()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plans", default="semidiffDemoPlans", help="semidiffDemoPlans (small) or nnUNetPlans")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vae", default=None, help="SD VAE weights (default: a tiny random AutoencoderKL)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from _demo_trainer import median_timer

    from semidiff_nnunet.networks.mixing import random_box_mask
    from semidiff_nnunet.plugins.semigda.networks import to_rgb  # noqa: F401  (the extra is installed)
    from semidiff_nnunet.plugins.semigda.trainer import copy_paste_batch

    vae = args.vae or tiny_vae_folder()
    t, device = _trainer("semigda", args, vae, {"align": "1"})
    labeled, unlabeled = fixed_batches(t)
    timed = median_timer(device)
    lab, unl = t._to_device(labeled), t._to_device(unlabeled)
    x_l, x_u = lab["data"], unl["data"]
    x = torch.cat([x_l, x_u])
    y = t.labels_of(lab)
    model = t.model

    def align_pass():
        out = model.branches(x, decode=False)
        with torch.no_grad():
            model.mask_latent(y)
        return out

    n = min(x_l.shape[0], x_u.shape[0])
    box = random_box_mask(n, x_l.shape[2:], t.hp.box_fraction, shared=True, device=device)
    pl = torch.zeros_like(y[:n])
    mixed, _, _ = copy_paste_batch(x_l[:n], y[:n], x_u[:n], pl, pl, box)

    model.train()
    align_nets = timed(lambda: _fwd_bwd(align_pass), args.steps, args.warmup)
    seg_nets = timed(lambda: (_fwd_bwd(lambda: model.branches(x)), _fwd_bwd(lambda: model.branches(mixed))),
                     args.steps, args.warmup)
    model.zero_grad(set_to_none=True)
    step1 = timed(lambda: t.train_step(labeled), args.steps, args.warmup)
    t.current_epoch = 1
    t._enter_phase_of_current_epoch()
    t.iteration = t.num_iterations_per_epoch  # the first segment iteration: copy-paste on, weights ramping
    step2 = timed(lambda: t.train_step(labeled), args.steps, args.warmup)
    result = {"device": str(device), "plans": args.plans, "vae": "tiny random" if args.vae is None else args.vae,
              "batch": [int(x_l.shape[0]), int(x_u.shape[0])], "patch": list(t.configuration_manager.patch_size),
              "torch_threads": torch.get_num_threads(),
              "align_step_s": step1, "align_networks_s": align_nets, "align_over_networks": step1 / align_nets,
              "segment_step_s": step2, "segment_networks_s": seg_nets, "segment_over_networks": step2 / seg_nets}
    t.on_train_end = None

    ctx = mp.get_context("spawn")
    peaks = {}
    for method in ("supervised", "semigda"):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_memory, args=(method, args, vae, q))
        p.start()
        peaks[method] = q.get()
        p.join()
    result.update({"peak_memory_mib": peaks, "memory_over_supervised": peaks["semigda"] / max(peaks["supervised"], 1e-9)})

    print(f"device {device}, plans {args.plans}, VAE {result['vae']}, batch {result['batch']} (labeled, unlabeled), "
          f"patch {result['patch']}, torch threads {result['torch_threads']}")
    print(f"align step   {ms(step1)}   / branch pass fwd+bwd {ms(align_nets)} = {step1 / align_nets:6.3f}  (goal <= 1.10)")
    print(f"segment step {ms(step2)}   / two passes fwd+bwd  {ms(seg_nets)} = {step2 / seg_nets:6.3f}  (goal <= 1.10)")
    what = "CUDA, above allocated before" if device.type == "cuda" else "CPU, peak RSS above RSS before"
    print(f"peak memory ({what}): supervised {peaks['supervised']:.0f} MiB, semigda {peaks['semigda']:.0f} MiB "
          f"({result['memory_over_supervised']:.2f}x)")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
