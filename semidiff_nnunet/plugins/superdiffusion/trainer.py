"""``superdiffusion``: Ciampi, Lagani, Amato, Falchi, "Semi-Supervised Biomedical Image Segmentation via
Diffusion Models and Teacher-Student Co-Training" (2025). The paper's repository is empty; the working
code is the authors' ``hebbian-bootstraping-semi-supervised-medical-imaging`` at ``191fa2a^`` ("code"
below: ``models/networks_2d/unet_ddpm.py``, ``pretrain_superdiff_unsup_2d.py``,
``train_semi_superdiff_2d.py``).

Networks (:mod:`.networks`), all nnU-Net's planned U-Net for the run's configuration (2D or 3D, one
code path: everything comes from the plans) made timestep-conditioned with the shared
:class:`~semidiff_nnunet.networks.timestep_unet.TimestepConditionedUNet`:

* **teacher mask pathway** f_m (``network``): image ⊕ noisy K-channel mask → clean-mask logits x0;
* **teacher image pathway** f_i (``image``): noisy image ⊕ mask (2·p − 1) → ε, the image recovered
  by eq. 3 (the paper prints "+ sqrt(1/A_t − 1)·v̂"; the inversion of eq. 1 — DDPM's, and the
  code's library — has a minus, which we use);
* **student mask pathway** (``student``): same architecture as f_m, fresh initialisation (the
  code's "twin"; the student's image pathway is never used in the code, so we do not build it);
  from ``--pretrained-weights`` it starts as the teacher (``student_from_pretrained = True``; measured
  on Left Atrium from a converged checkpoint, gain over the restart control, docs/results.md: as built
  −0.089 / −0.071, as the teacher −0.028 / −0.027:
  better on both seeds, still below the control; PH2 not measured with it).

Two phases (:class:`~semidiff_nnunet.training.Phase`):

1. ``pretrain`` (eq. 5–7), **no label at all**: on the images of every training patch — the
   labeled stream's ``data`` and the unlabeled stream's, never ``target`` — m̂ = f_m(i, q(0|t), t),
   then v̂ = f_i(ĩ, 2·softmax(m̂) − 1, t') with the image input ĩ of ``cycle`` (below) and the cycle
   loss; gradients reach f_m through the mask (as in the code). Only ``network`` and ``image`` are
   updated.
   *Class identity*: nothing in phase 1 says which channel means which class, and we do not train
   the code's 3×3 read-out on ground truth. The phase-2 supervised loss on the labeled cases (on
   the teacher's mask pathway itself) fixes it, while λ is still near 0 (linear ramp from 0).
2. ``cotrain`` (eq. 8–16): teacher (from phase 1) and student, both trained, on labeled ⊕
   unlabeled patches, one optimisation step over the three networks:
   L = L_sup + λ·[L_semi + (1/R)·Σ_r L_align,r + (1/R)·Σ_r L_reconstr,r] with
   L_sup = nnU-Net's Dice+CE with deep supervision for teacher and student (eq. 10 is CE only;
   the issue asks for nnU-Net's loss); L_semi = CE(S, argmax T) + CE(T, argmax S) on all patches
   (eq. 9, 16; full resolution); rounds r = 1..R (eq. 11–14): î_r = eq. 3 of f_i(q(i|t'),
   m_{r−1}, t'), m_r = f_m(î_r, q(0|t''), t''), L_align,r = CE(m_r, l̂) with l̂ the label on
   labeled patches and argmax(student) on unlabeled ones, L_reconstr,r the reconstruction loss.
   **Chained rounds** (paper, default): m_{r−1} is the previous round's mask (m_0 = the teacher's
   first mask); ``chained_rounds = False`` gives the code's behaviour, every round re-drawn from
   m_0 (its loop resets ``pj = p2``). As in the code, the mask fed to f_i and î fed to f_m are
   detached, so L_align trains f_m and L_reconstr trains f_i.

The label-free cycle, two forms (``cycle``):

* ``"code"`` (default; the code's ``pretrain_superdiff_unsup_2d.py``: ``diffusion(img, pseudo)``
  noises the image at a random t and its loss is lucidrains' ``pred_noise`` MSE): ĩ = q(i | t') =
  sqrt(ᾱ_t')·i + sqrt(1 − ᾱ_t')·v, target v. The image pathway sees a noisy copy of the image, so at
  small t' it can reconstruct the image without reading the mask.
* ``"paper"`` (eq. 6, §3.1: m̂ "is then fed back to the teacher via the image pathway f_i, in its clean
  form, alongside a pure noise tensor serving as the input image": î' = f_i(v_i, m̂, t'), loss eq. 7
  (i − î')²): ĩ = v_i = q(0 | t') = sqrt(1 − ᾱ_t')·v, built as the paper builds v_m (eq. 5, "adding
  noise to a zero tensor"); it does not depend on the image, so everything f_i learns about the
  image comes through m̂. Target of ``recon_loss = "eps"``: the noise for which eq. 3 returns i,
  (v_i − sqrt(ᾱ_t')·i) / sqrt(1 − ᾱ_t') (same minimiser as eq. 7, weight ᾱ/(1 − ᾱ) apart);
  ``"image"`` is eq. 7 literally. Both are badly scaled at one end of t' (the ε target grows as
  sqrt(ᾱ/(1 − ᾱ))·i ≈ 100·i at t' = 0; î' amplifies ε̂ by sqrt((1 − ᾱ)/ᾱ) ≈ 158 at t' = T − 1): the
  paper says t' is drawn like t, and so do we. Measured (docs/results.md, 2026-12-08): Left Atrium
  from a converged checkpoint, two seeds, gain over the restart control: ``paper`` −0.128 / −0.069,
  ``code`` −0.028 / −0.027. With pure noise as its image the cycle loss is 3–56 (the ε target's
  blow-up at small t') against 0.2–0.8, and its gradient, which reaches the image only through m̂,
  wrecks the trained mask pathway (the teacher's supervised Dice+CE −0.25 / −0.20 at the start of
  co-training against −0.79 / −0.65). From scratch not measured (≈ 80 min per seed on PH2 here).
  Deviation from the paper kept by the default: the code's form, which is what produced the
  authors' numbers and measures better; ``--set cycle=paper`` gives eq. 6. Phase 1 only: the rounds of phase 2 feed
  f_i the noise-corrupted image in both forms (eq. 11's text: "along with the noise-corrupted
  image ĩ"; its formula prints i).

Memory (``checkpointing``; not in paper or code, which run one backward through every pass): a
co-training step runs 2 + 2R network passes on labeled ⊕ unlabeled patches (teacher, student, and
f_i + f_m per round); one backward through all of them keeps every pass's activations until the end.
``"all"`` (default) wraps every training pass in non-reentrant activation checkpointing
(``torch.utils.checkpoint``, :func:`network_pass`): a pass keeps its inputs and outputs, and the
backward recomputes its activations one pass at a time; ``"rounds"`` does it for the rounds only,
``"none"`` for nothing. Every random draw is an input of its pass, so the recomputation is the same
function: losses and gradients are bit-identical to ``"none"`` (tests: function level in 2D and 3D,
the trainer's step in both phases; two gloo ranks under DDP by a one-off script). The price is one
more forward per pass: step ÷ its networks' forward+backward 0.98–1.02 → 1.11–1.31 in phase 2 (2D
demo plans, loaded 2-core VM, two runs). Peak memory one step adds (3D, nnU-Net's default features 32–256 in four
stages, batch 2 + 2, R = 5; 2-core CPU VM, torch 2.14.1 CPU; ``benchmarks/superdiffusion_cost.py
--memory``): at patch 16×32×48, ``none`` 2209 MB, ``rounds`` 697 MB, ``all`` 347 MB, ``supervised``'s
step 129 MB; at 24×40×48, ``rounds`` 1224 MB, ``all`` 570 MB, supervised 218 MB (``none`` ≈ 4.1 GB by
its linear scaling, 88 KB per voxel, not run). At nnU-Net's 48×80×112 ``none`` would add ≈ 38 GB
(the OOM on Left Atrium), ``all`` ≈ 4.6 GB (extrapolated, not measured).

Inference (``build_network_architecture`` returns it, so stock ``nnUNetv2_predict`` and ``semidiff
predict`` run the same module on the image alone): one mask-pathway forward from pure noise at the
fixed time ``infer_t`` (default T − 1: v_m at full noise, eq. 5; the code draws a random t). The
noise is deterministic: ``infer_noise = "fixed"`` draws it from a generator seeded with
``infer_seed`` on every call (every tile of the sliding window sees the same field; ``"zeros"``
uses v_m = 0); ``infer_draws = K`` > 1 averages the softmax of K seeded draws. The predicting
network is whichever of teacher and student has the higher mean foreground Dice on
``select_batches`` validation batches of the fold at the end of the run (``predictor = "auto"``,
code: best val Jaccard of the two); recorded in the checkpoint (state ``selection``) and in
``superdiffusion_selection.json`` in the fold folder. Without validation cases the teacher is
kept. ``predictor = "teacher" | "student"`` fixes it.

Defaults and their sources:

* T = ``num_timesteps = 1000`` (paper App. A, code); ``beta_schedule = "linear"`` (paper App. A:
  β from 1e-4 to 0.02; the code passes no schedule, so lucidrains' default applies — ``sigmoid``
  in 2.x, ``--set beta_schedule=sigmoid``); t ~ U{0..T−1} in training (eq. 5, code);
* ``cycle = "code"`` (the code; ``"paper"`` is eq. 6, see "The label-free cycle");
  ``checkpointing = "all"`` (ours, neither paper nor code has it; same numbers, see "Memory");
* ``rounds = 5`` (paper §4.3: R = 5 "a reasonable trade-off"; the code's scripts use 3, 5, 10);
* ``lambda_max = 5`` (paper App. A), all three λ's equal (paper §3.3, code), ramped linearly from 0
  to λ_max over phase 2 (paper: λ_max·epoch/max_epochs; code (epoch+1)/num_epochs), per iteration
  here (``rampup_fraction = 1.0`` of phase 2, see "Schedule");
* ``lr = 0.01`` in phase 2 (paper App. A and code) and ``lr_pretrain = 0.01`` (nnU-Net's; the
  code pretrains with Adam 1e-3), with nnU-Net's SGD (``optimizer = "sgd"``: momentum 0.99,
  Nesterov, weight decay 3e-5) and nnU-Net's poly LR restarted at each phase.
  ``optimizer = "adam"`` is the paper's Adam (β 0.9/0.99, weight decay 5e-5) at the same LRs;
* ``time_embedding_dim = 64`` (code: SinusoidalPosEmb(64)); hidden 128 (ours; code 256 → 64);
* phase shares: ``pretrain`` 0.5 of the run, ``cotrain`` the rest (code: 200 pretraining epochs,
  then 200 co-training epochs); ``--set phase.pretrain=0.3`` or ``=40`` (epochs) changes it;
* ``recon_loss = "eps"``: MSE(v̂, v) (code: lucidrains' ``pred_noise`` loss). ``"image"`` is the
  paper's literal (i − î)² of eq. 7/14, which equals the ε-MSE weighted by (1 − ᾱ_t)/ᾱ_t and
  explodes at large t (≈ 2.5·10⁴ at t = T − 1 with the linear schedule);
* CPS and alignment use CE (paper eq. 9, 13; the code uses softmax Dice).

Our choices where paper and code are silent or unusable here, all ``--set``-able:

* the mask pathway's input is q(0 | t) = sqrt(1 − ᾱ_t)·v_m, the paper's "noise added to a zero
  tensor" (the code one-hot encodes an all-background mask there);
* the "clean mask" handed to f_i is softmax(m̂) mapped to [−1, 1] (the code passes the raw x0
  output, unbounded); nnU-Net's normalised image is f_i's x0 (the code rescales to [−1, 1]);
* the time embedding is added to every encoder stage (zero-initialised, the shared
  TimestepConditionedUNet) rather than once after the first convolution (code);
* independent t and noise per network and per pathway call (code);
* î is clamped to the batch's intensity range before f_m sees it (lucidrains clips x̂0 to its data
  range; at large t eq. 3 amplifies ε̂'s error by 1/sqrt(ᾱ_t));
* inference time, noise and draws as above; teacher wins ties in the selection.

Deviations forced by nnU-Net: planned U-Net (instance norm, nnU-Net depth and widths, deep
supervision on the supervised term) instead of the code's DDPM U-Net; patches with nnU-Net's
augmentation instead of 128×128 resized images; a truly 3D network in 3D (the code's "3D" is a 2D
net on the central slice); poly LR per phase instead of warm-up + step decay; the unlabeled batch
is not truncated to the labeled batch size. Region-based datasets are not supported (CPS needs
mutually exclusive labels). Under DDP every training pass goes through the wrappers' forward (two-rank
test: every network bit-identical across ranks); a checkpointed pass is recomputed in the backward
through the wrapped network, since a DDP forward there would re-arm the reducer mid-backward.
Phase 1 reads no label, also not through the crops: it is declared ``label_free``, so the engine's
labeled loader cuts its patches uniformly at random during it (no foreground oversampling, which
would look at label maps to choose *where* a patch is cut); phase 2 has nnU-Net's oversampling.

Schedule, mapped onto the engine's policy (``BaseHParams``): the supervised burn-in is off
(``burnin = 0``, ``burnin_min = 0``): it would train on labels during the label-free phase 1, and
a run that sets it is refused. The λ ramp is this method's own: linear over ``rampup_fraction`` ×
the phase-2 iterations within [``rampup_min``, ``rampup_max``], capped by phase 2's length, starting
at phase 2's first iteration; phase 1 has no unlabeled weight to ramp.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from semidiff_nnunet.diffusion import eps_from_x0, onehot_to_signed, q_sample
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.networks.timestep_unet import TimestepConditionedUNet
from semidiff_nnunet.plugins.superdiffusion.networks import MaskPathway, mask_noise_input, reconstruct_image
from semidiff_nnunet.training import (
    BaseHParams,
    OptimStep,
    Phase,
    SemiSupervisedTrainer,
    ramps,
    run_hparams,
    unwrap,
)
from semidiff_nnunet.training.hparams import BEFORE, BetaSchedule

PRETRAIN, COTRAIN = "pretrain", "cotrain"
SELECTION_FILE = "superdiffusion_selection.json"


@dataclass
class SuperDiffusionHParams(BaseHParams):
    # the engine's burn-in is off: phase 1 is label-free (see "Schedule")
    burnin: float = 0.0
    burnin_min: int = 0
    # diffusion (paper App. A)
    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    time_embedding_dim: int = 64
    # phase 1: the image pathway's image input (see "The label-free cycle")
    cycle: Literal["code", "paper"] = "code"
    # co-training (paper §3.3, §4.3, App. A)
    rounds: int = 5
    chained_rounds: bool = True
    lambda_max: float = 5.0
    rampup_fraction: float = 1.0
    recon_loss: Literal["eps", "image"] = "eps"
    # memory (see "Memory"): recompute network passes in the backward instead of storing them
    checkpointing: Literal["all", "rounds", "none"] = "all"
    # optimisation
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr_pretrain: float = 0.01
    lr: float = 0.01
    # inference
    infer_t: int = -1
    infer_noise: Literal["fixed", "zeros"] = "fixed"
    infer_seed: int = 0
    infer_draws: int = 1
    predictor: Literal["auto", "teacher", "student"] = "auto"
    select_batches: int = 10
    # a trained start (not in the paper, which trains from scratch): the student as the teacher; runs before
    # the setting started it as built
    student_from_pretrained: bool = field(default=True, metadata={BEFORE: False})


def mask_pathway(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                 enable_deep_supervision: bool = True, hp: SuperDiffusionHParams | None = None) -> MaskPathway:
    """f_m on image ⊕ K-channel mask from the plans, with the run's hyperparameters (default: read from the plans)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    hp = hp or run_hparams(plans_manager, SuperDiffusionHParams)
    unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                    num_input_channels + num_output_channels, num_output_channels,
                                                    enable_deep_supervision)
    return MaskPathway(TimestepConditionedUNet(unet, hp.time_embedding_dim), num_output_channels, hp.beta_schedule,
                       hp.num_timesteps, hp.infer_t, hp.infer_noise, hp.infer_seed, hp.infer_draws)


def _full(output) -> Tensor:
    return output[0] if isinstance(output, (list, tuple)) else output


def _core(f_m) -> MaskPathway:
    """The MaskPathway inside a DDP wrapper (for its attributes; passes go through the wrapper)."""
    return getattr(f_m, "module", f_m)


def _touch_all_scales(loss: Tensor, output) -> Tensor:
    """``loss`` plus 0 × the lower deep-supervision outputs: their heads then take part in the backward
    (zero gradients), which DDP needs from every parameter of a wrapped network."""
    if isinstance(output, (list, tuple)) and len(output) > 1:
        loss = loss + sum(o.sum() for o in output[1:]) * 0.0
    return loss


def _sample_t(n: int, num_timesteps: int, device, generator: torch.Generator | None = None) -> Tensor:
    return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)


def _randn(shape, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return torch.randn(tuple(shape), device=like.device, dtype=torch.float32, generator=generator)


def network_pass(module: nn.Module, *inputs: Tensor, recompute: bool = False):
    """``module(*inputs)``; with ``recompute`` (and autograd on), through non-reentrant activation
    checkpointing (``torch.utils.checkpoint``): the pass keeps only its inputs and outputs, and the
    backward recomputes its activations. The values are the same: every random draw of a pass is one of
    its inputs, and the RNG state is replayed too. The forward goes through ``module`` (under DDP the
    wrapper, which arms the reducer), the recomputation through the wrapped network (a DDP forward
    inside the backward would re-arm the reducer halfway); both compute the same function."""
    if not recompute or not torch.is_grad_enabled():
        return module(*inputs)
    core = getattr(module, "module", module)
    calls = []

    def run(*args):
        net = core if calls else module
        calls.append(None)
        return net(*args)

    return checkpoint(run, *inputs, use_reentrant=False)


def recon_loss(x: Tensor, noise: Tensor, eps_hat: Tensor, noisy: Tensor, alpha_bar: Tensor, kind: str) -> Tensor:
    """L_reconstr: ``"eps"`` MSE(v̂, v) (code), ``"image"`` MSE(î, i) with î from eq. 3 (paper eq. 7, 14).
    ``noise`` is the noise for which eq. 3 of ``noisy`` returns ``x`` (the drawn noise when ``noisy`` = q(x|t))."""
    if kind == "eps":
        return F.mse_loss(eps_hat.float(), noise)
    return F.mse_loss(reconstruct_image(noisy.float(), eps_hat.float(), alpha_bar), x.float())


def image_pathway(image_net: nn.Module, x: Tensor, mask_probs: Tensor, alpha_bars: Tensor, num_timesteps: int,
                  generator: torch.Generator | None = None, pure_noise: bool = False, recompute: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """f_i at t' ~ U{0..T−1} on image input ĩ ⊕ mask 2·p − 1: (ε̂, v, ĩ, ᾱ_t'), all (B, C_img, *s) but ᾱ (B,).

    ``pure_noise=False`` (eq. 11; the code's eq. 6): ĩ = q(x | t') with noise v. ``pure_noise=True``
    (paper eq. 6, "a pure noise tensor serving as the input image"): ĩ = v_i = q(0 | t') =
    sqrt(1 − ᾱ_t')·n, built like the mask pathway's v_m (eq. 5) and independent of x; v = (ĩ −
    sqrt(ᾱ_t')·x) / sqrt(1 − ᾱ_t') is then the noise for which eq. 3 returns x, so MSE(ε̂, v) and eq. 7's
    image MSE have the same minimiser (weights ᾱ/(1 − ᾱ) apart)."""
    t = _sample_t(x.shape[0], num_timesteps, x.device, generator)
    ab = alpha_bars[t]
    noise = _randn(x.shape, x, generator)
    if pure_noise:
        noisy = mask_noise_input(ab, noise).to(x.dtype)
        noise = eps_from_x0(noisy.float(), x.float(), ab)
    else:
        noisy = q_sample(x.float(), ab, noise).to(x.dtype)
    eps_hat = network_pass(image_net, torch.cat([noisy, onehot_to_signed(mask_probs).to(x.dtype)], 1), t,
                           recompute=recompute)
    return eps_hat, noise, noisy, ab


def cycle_loss(f_m: MaskPathway, f_i: nn.Module, x: Tensor, kind: str = "eps",
               generator: torch.Generator | None = None, form: str = "code", recompute: bool = False) -> Tensor:
    """Phase 1 (eq. 5–7) on images ``x`` (B, C_img, *s) only: m̂ = f_m(x, q(0|t), t), then f_i(ĩ, m̂, t')
    reconstructs x. ``form="code"``: ĩ = q(x | t'), a noisy copy of the image; ``"paper"`` (eq. 6): ĩ =
    q(0 | t'), pure noise, so the image reaches the reconstruction only through m̂."""
    core = _core(f_m)
    n, k, T = x.shape[0], core.num_classes, core.num_timesteps
    t = _sample_t(n, T, x.device, generator)
    out = network_pass(f_m, x, _randn((n, k, *x.shape[2:]), x, generator), t, recompute=recompute)
    logits = _full(out)
    eps_hat, noise, noisy, ab = image_pathway(f_i, x, logits.float().softmax(1), core.alphas_cumprod, T, generator,
                                              pure_noise=form == "paper", recompute=recompute)
    return _touch_all_scales(recon_loss(x, noise, eps_hat, noisy, ab, kind), out)


def diffusion_rounds(f_m: MaskPathway, f_i: nn.Module, x: Tensor, first_mask_logits: Tensor, rounds: int,
                     chained: bool, kind: str = "eps", generator: torch.Generator | None = None,
                     recompute: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Multiple rounds of diffusion (eq. 11–14): per round (m_r logits, L_reconstr,r, the mask f_i was
    conditioned on). Chained (paper): round r is conditioned on m_{r−1}; independent (code): every
    round on the first mask m_0. Conditions and î are detached (code), so no round's graph reaches
    another's; ``recompute`` checkpoints each network pass (:func:`network_pass`)."""
    first = first_mask_logits.detach().float().softmax(1)
    lo, hi = x.detach().min(), x.detach().max()
    cond, out = first, []
    core = _core(f_m)
    n, k, T = x.shape[0], core.num_classes, core.num_timesteps
    for _ in range(rounds):
        eps_hat, noise, noisy, ab = image_pathway(f_i, x, cond, core.alphas_cumprod, T, generator,
                                                  recompute=recompute)
        loss = recon_loss(x, noise, eps_hat, noisy, ab, kind)
        x_hat = reconstruct_image(noisy.float(), eps_hat.detach().float(), ab).clamp(lo, hi).to(x.dtype)
        t = _sample_t(n, T, x.device, generator)
        m_r = _full(network_pass(f_m, x_hat, _randn((n, k, *x.shape[2:]), x, generator), t,
                                 recompute=recompute)).float()
        out.append((m_r, loss, cond))
        cond = m_r.detach().softmax(1) if chained else first
    return out


def cross_pseudo_supervision(teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 9: (CE(student, argmax teacher), CE(teacher, argmax student)); targets detached."""
    t, s = teacher_logits.float(), student_logits.float()
    return F.cross_entropy(s, t.detach().argmax(1)), F.cross_entropy(t, s.detach().argmax(1))


class _Selection:
    """Which network predicts (checkpointed): ``choice`` and the validation scores it came from."""

    def __init__(self, choice: str):
        self.choice, self.scores = choice, {}

    def state_dict(self) -> dict:
        return {"choice": self.choice, "scores": dict(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.choice, self.scores = state["choice"], dict(state.get("scores", {}))


class SuperDiffusionTrainer(SemiSupervisedTrainer):
    """SuperDiffusion. ``--pretrained-weights`` initialises the mask pathway (teacher) from a checkpoint of a
    superdiffusion run, or its U-Net from a U-Net checkpoint of the same plans: the pathway reads image ⊕ noisy
    mask, so its input convolution takes the checkpoint's weights for the image channels and zeros for the K
    mask channels; with the time projections zero-initialised, the pathway then starts predicting exactly as
    the checkpoint (the label-free and co-training phases teach it to read the mask). Its time embedding, the
    image pathway starts as built. The student starts as the teacher (the checkpoint; ``student_from_pretrained``,
    default True; ``False`` builds it fresh, as the authors' twin, a second, differently initialised network:
    at a trained start CPS then weighs a new network's labels up to λ_max = 5 against the trained teacher's
    own). Not in the paper (it trains from scratch): the starting point of
    ``semidiff benchmark --from-checkpoint``."""

    pretrained_extra_inputs = True

    hparams_class = SuperDiffusionHParams

    phases = (Phase(PRETRAIN, share=0.5, summary="label-free two-pathway cycle consistency (teacher)",
                    label_free=True),
              Phase(COTRAIN, summary="teacher-student CPS, supervised loss, rounds of diffusion"))

    def pretrained_key(self, key):
        """The mask pathway's U-Net (``net.unet.*``) from a U-Net checkpoint; the rest stays as built."""
        return key[len("net.unet."):] if key.startswith("net.unet.") else None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return mask_pathway(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision)

    # ------------------------------------------------------------------ setup
    @classmethod
    def check_options(cls, hp: SuperDiffusionHParams, configuration: str | None, dim: int | None) -> None:
        """The string choices are ``Literal`` fields (checked by the parser); the number of rounds here."""
        if hp.rounds < 0:
            raise SemidiffError(f"--set rounds={hp.rounds}: give a number of rounds >= 0.")

    def build_method(self):
        hp, lm = self.hp, self.label_manager
        if lm.has_regions:
            raise SemidiffError("superdiffusion needs mutually exclusive labels; region-based datasets are not "
                                "supported (cross pseudo supervision takes an argmax).")
        self.check_options(hp, None, None)
        if self.burnin_iterations > 0:
            raise SemidiffError("superdiffusion's first phase is label-free, and the supervised burn-in would train "
                                "on labels in it; keep burnin=0 and burnin_min=0.")
        self.num_classes = lm.num_segmentation_heads
        self.student = self.register_network("student", self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels, self.num_classes,
            self.enable_deep_supervision))
        if hp.student_from_pretrained and self.starts_from_pretrained:
            # the teacher already holds --pretrained-weights (loaded before build_method): the student starts as it
            unwrap(self.student).load_state_dict(unwrap(self.network).state_dict())
            self.print_to_log_file("SuperDiffusion: the student starts as the teacher (student_from_pretrained)",
                                   also_print_to_console=False)
        c_img = self.num_input_channels
        image_unet = self.build_planned_network(deep_supervision=False, num_input_channels=c_img + self.num_classes,
                                                num_output_channels=c_img)
        # f_i predicts at full resolution only: its lower-resolution heads would be parameters that never
        # receive a gradient (DDP refuses those), so they are dropped
        heads = image_unet.decoder.seg_layers
        image_unet.decoder.seg_layers = nn.ModuleList([nn.Identity() for _ in range(len(heads) - 1)] + [heads[-1]])
        self.image = self.register_network("image", TimestepConditionedUNet(image_unet, hp.time_embedding_dim))
        self.selection = self.register_state("selection", _Selection("teacher" if hp.predictor == "auto"
                                                                     else hp.predictor))

    def _optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.hp.optimizer == "adam":  # paper App. A
            return torch.optim.Adam(module.parameters(), lr, betas=(0.9, 0.99), weight_decay=5e-5)
        return torch.optim.SGD(module.parameters(), lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True)

    def on_phase_start(self, phase):
        pretrain = phase.name == PRETRAIN
        lr = self.hp.lr_pretrain if pretrain else self.hp.lr
        for name in ("network", "image") if pretrain else ("network", "image", "student"):
            module = self.network if name == "network" else self.extra_networks[name]
            self.restart_optimizer(name, self._optimizer(module, lr))

    def optimisation_steps(self):
        return (OptimStep("cycle", self.pretrain_losses, networks=("network", "image"), phases=(PRETRAIN,)),
                OptimStep("co-training", self.cotrain_losses, networks=("network", "image", "student"),
                          phases=(COTRAIN,)))

    def compute_losses(self, labeled, unlabeled):
        step = self.pretrain_losses if self.current_phase.name == PRETRAIN else self.cotrain_losses
        return step(labeled, unlabeled, {})

    # ------------------------------------------------------------------ phase 1
    @staticmethod
    def images_only(labeled: dict, unlabeled: dict | None) -> Tensor:
        """The images of every training patch of the iteration (labeled ⊕ unlabeled), never a label."""
        parts = [labeled["data"]] + ([unlabeled["data"]] if unlabeled is not None else [])
        return torch.cat(parts)

    def pretrain_losses(self, labeled, unlabeled, carry):
        x = self.images_only(labeled, unlabeled)
        # the wrappers, not unwrap(...): under DDP every pass goes through the wrapper's forward (a
        # checkpointed pass's recomputation in the backward runs the wrapped network: see network_pass)
        hp = self.hp
        return {"cycle": cycle_loss(self.network, self.image, x, hp.recon_loss, form=hp.cycle,
                                    recompute=hp.checkpointing == "all")}

    # ------------------------------------------------------------------ phase 2
    def lambda_weight(self) -> float:
        """λ: linear from 0 to λ_max over ``rampup_fraction`` × phase 2 (within the policy's bounds)."""
        hp = self.hp
        span = next(s for s in self.phase_spans if s.name == COTRAIN)
        start, n = span.start * self.num_iterations_per_epoch, len(span) * self.num_iterations_per_epoch
        length = min(max(int(round(hp.rampup_fraction * n)), hp.rampup_min), hp.rampup_max, n)
        return hp.lambda_max * ramps.linear_rampup(self.iteration - start + 1, length)

    def cotrain_losses(self, labeled, unlabeled, carry):
        hp, k = self.hp, self.num_classes
        teacher, student, f_i = self.network, self.student, self.image  # DDP wrappers under DDP
        x_l = labeled["data"]
        x = self.images_only(labeled, unlabeled)
        n, n_l, T = x.shape[0], x_l.shape[0], hp.num_timesteps
        noise_shape = (n, k, *x.shape[2:])
        outer = hp.checkpointing == "all"
        out_t = network_pass(teacher, x, _randn(noise_shape, x), _sample_t(n, T, x.device), recompute=outer)  # eq. 8
        out_s = network_pass(student, x, _randn(noise_shape, x), _sample_t(n, T, x.device), recompute=outer)
        lab = slice(0, n_l)
        sup_t = self.supervised_loss(self.batch_part(out_t, lab), labeled["target"])  # eq. 10 (Dice+CE, DS)
        sup_s = self.supervised_loss(self.batch_part(out_s, lab), labeled["target"])
        logits_t, logits_s = _full(out_t).float(), _full(out_s).float()
        cps_s, cps_t = cross_pseudo_supervision(logits_t, logits_s)  # eq. 9, on labeled and unlabeled (eq. 15-16)

        # l̂ (eq. 13): the label where there is one, the student's argmax elsewhere
        target = logits_s.detach().argmax(1)
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else -100
        target[:n_l] = self.labels_of(labeled)
        align, recon = [], []
        for m_r, rec, _ in diffusion_rounds(teacher, f_i, x, logits_t, hp.rounds, hp.chained_rounds, hp.recon_loss,
                                            recompute=hp.checkpointing != "none"):
            align.append(F.cross_entropy(m_r, target, ignore_index=ignore))
            recon.append(rec)
        zero = logits_t.sum() * 0
        l_align = torch.stack(align).mean() if align else zero
        l_recon = torch.stack(recon).mean() if recon else zero
        lam = self.lambda_weight()
        return {"supervised_teacher": sup_t, "supervised_student": sup_s,
                "cps": lam * (cps_s + cps_t), "align": lam * l_align, "reconstruction": lam * l_recon,
                "_lambda": torch.tensor(lam), "_align_raw": l_align.detach(), "_reconstruction_raw": l_recon.detach()}

    # ------------------------------------------------------------------ which network predicts
    def inference_network(self) -> nn.Module:
        return self.student if self.selection.choice == "student" else self.network

    def validation_scores(self, num_batches: int) -> dict[str, float]:
        """Mean foreground Dice of teacher and student (one deterministic inference forward each) on
        ``num_batches`` validation batches of the fold (nnU-Net's validation patches)."""
        lm = self.label_manager
        fg = [c for c in range(self.num_classes) if c != 0]
        counts = {name: np.zeros((len(fg), 3)) for name in ("teacher", "student")}
        nets = {"teacher": unwrap(self.network), "student": unwrap(self.student)}
        modes = {name: net.training for name, net in nets.items()}
        try:
            with torch.no_grad():
                for _ in range(num_batches):
                    batch = self._to_device(next(self.dataloader_val))
                    y = self.labels_of(batch)
                    valid = y != lm.ignore_label if lm.has_ignore_label else torch.ones_like(y, dtype=torch.bool)
                    for name, net in nets.items():
                        net.eval()
                        with self.autocast():
                            pred = _full(net(batch["data"])).argmax(1)
                        for i, c in enumerate(fg):
                            p, g = (pred == c) & valid, (y == c) & valid
                            counts[name][i] += [(p & g).sum().item(), (p & ~g).sum().item(), (~p & g).sum().item()]
        finally:
            for name, net in nets.items():
                net.train(modes[name])
        scores = {}
        for name, c in counts.items():
            denom = 2 * c[:, 0] + c[:, 1] + c[:, 2]
            dice = [2 * tp / d for (tp, _, _), d in zip(c, denom) if d > 0]
            scores[name] = float(np.mean(dice)) if dice else float("nan")
        return scores

    def select_predictor(self) -> None:
        """``predictor = "auto"``: keep the network with the higher validation Dice (teacher on ties or
        without validation cases); record the choice."""
        if self.hp.predictor == "auto":
            has_val = self.semi_split is not None and len(self.semi_split.validation) > 0
            if has_val and self.hp.select_batches > 0 and self.dataloader_val is not None:
                scores = self.validation_scores(self.hp.select_batches)
                self.selection.scores = scores
                student_better = np.isfinite(scores["student"]) and (
                    not np.isfinite(scores["teacher"]) or scores["student"] > scores["teacher"])
                self.selection.choice = "student" if student_better else "teacher"
            else:
                self.selection.choice = "teacher"
        if self.local_rank == 0:
            self.print_to_log_file(f"superdiffusion: predicting with the {self.selection.choice} "
                                   f"(validation Dice {self.selection.scores or 'not measured'})")
            with open(os.path.join(self.output_folder, SELECTION_FILE), "w", encoding="utf-8") as f:
                json.dump({"predictor": self.selection.choice, "rule": self.hp.predictor,
                           "validation_dice": self.selection.scores}, f, indent=2)

    def on_train_end(self):
        self.select_predictor()  # before checkpoint_final is written (its network_weights are the chosen net)
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net validates self.network; validate the network that was exported
        chosen, teacher = self.inference_network(), self.network
        self.network = chosen
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.network = teacher
