"""``diffrect``: Liu et al., "DiffRect: Latent Diffusion Label Rectification for Semi-supervised
Medical Image Segmentation", MICCAI 2024 (code: CUHK-AIM-Group/DiffRect).

The segmentation network is nnU-Net's planned network, the only one used at inference (the run
exports to stock nnU-Net). A separate rectification network (:mod:`.networks`, its diffusion in :mod:`.rectification`) learns to
turn pseudo labels into better ones; after a warm-up its DDIM samples supervise the segmentation
network. One training iteration (authors' ``train_diffrect_ACDC.py``):

1. segmentation network on the labeled patch, the unlabeled weak view and its strong view (same
   geometry): hard pseudo labels y_w (weak, labeled + unlabeled) and y_s (strong) by the authors'
   confidence rule; L_seg = DC+CE(labeled) + w(t)·[CE+Dice(strong, y_w) + a²·comp];
2. rectification network (LCC + LFR): branch W2G (eq. 10–11) on the weak views, conditioned on
   colour(y_w), x_start from colour(GT) (labeled) or colour(y_w) (unlabeled), guidance
   τ_l = 999·(1 − Dice(y_w, GT)); L = CE+Dice(ref[lab], GT) + L_Lat-L. Branch S2W (eq. 7–9) on the
   strong views, conditioned on colour(y_s), x_start from colour(y_w), τ_u = 999·(1 − Dice(y_s,
   y_ref)) where y_ref is the thresholded W2G output; L = CE+Dice(ref_s, y_ref) + a'²·comp' +
   L_Lat-U, weighted by w(t). Steps 1 and 2 share one backward: their graphs share no parameter
   and every target is detached, so this equals the authors' two separate optimiser steps;
3. rectified supervision (eq. 14), once it has started (see "Schedule"): DDIM-sample the
   rectification network (eval mode) on the weak views conditioned on colour(y_w), threshold → y_r
   (no gradient), forward the updated segmentation network again on the unlabeled views and take a
   separate optimiser step on w_r·CE+Dice(·, y_r) — only while the rectifier's labels beat the
   segmentation network's on the labeled patches (Dice against the ground truth, ``rect_gate``).
   This is a second declared optimisation step (:meth:`DiffRectTrainer.optimisation_steps`).

Defaults and their sources (code = authors' ``train_diffrect_ACDC.py`` / ``networks/unet_de.py``):

* ``conf_thresh = 0.8`` (``--conf_thresh``), normalised-confidence rule. The code labels every
  low-confidence voxel background; ours (``low_confidence = "ignore"``, a deviation) leaves those
  voxels out of the segmentation network's pseudo-label losses (the unsupervised term and the
  rectified supervision), while the rectifier's colour conditions keep the code's labels;
  ``low_confidence = "background"`` is the code. Why: for two classes the code's rule keeps a
  foreground voxel only when p > 0.83, so every uncertain lesion border teaches background. Measured
  on PH2 (CPU plans, 5 labeled, 400 iterations, 2026-12-03): the code's rule under-segments (median
  predicted/reference area 0.73 and 0.84 on seeds 0/1, Dice 0.7385/0.7399 vs supervised
  0.8128/0.8178); ``ignore`` on seed 0: Dice 0.8037, area ratio 0.92 (supervised 0.91); its pseudo
  labels on the kept voxels were 93–95 % right (foreground Dice 0.89–0.92), 91–97 % of voxels kept;
* ``consistency = 0.1`` with a sigmoid ramp-up over the whole run, ``rampup_fraction = 1.0``
  (code: ``0.1·sigmoid_rampup(iter // 150, 200)`` = 30 000 iterations = its whole run);
  ``ref_consistency_weight = -1`` means the rectification's S2W term uses the same w(t) (code);
* rectified supervision: code ``--refine_start 1000`` of 30 000 iterations, weight 1, no ramp →
  ``refine_start = 0.033`` of the run, but not before ``refine_min_updates = 500`` rectifier updates
  after the burn-in (and at the latest at half the run), then ``rect_weight = 1`` ramped in
  (sigmoid, ``rect_rampup_fraction = 0.1`` of the run within the policy's bounds) — ours: the code's
  absolute start and full weight trust a rectifier that may not be trained yet;
* LFR: ``num_timesteps = 10`` (``--ts``), ``beta_schedule = "cosine"`` (``--ldm_beta_sch``),
  x0-prediction, MSE latent loss, ``sample_steps = 2`` DDIM steps over [9, 0] with η = 0
  (``--ts_sample``), ``clip_sample = True`` (guided-diffusion ``clip_denoised`` default: the
  latent is clamped to [−1, 1] at sampling but not in training — a code quirk we keep);
  ``guidance_scale = 999`` (code: ``t = DiceLoss·999``);
* rectification widths ``width_factor = 0.5`` of the plans' features, ``rect_stages = 5`` stages
  (see ``networks/diffrect.py``: nnU-Net's 2D 32…512 → the authors' 16…256); encoder dropout
  0.05…0.5 (``rect_dropout``; PyMIC UNet); ``denoiser_condition = "skip"`` (code: the
  condition enters the denoiser only at its last skip connection);
* rectification optimiser SGD momentum 0.9, weight decay 1e-4 (code), initial LR = nnU-Net's 0.01
  (code 0.01);
* strong view (code ``WeakStrongAugment_Ours``): brightness and contrast factors 1 + U(0, 0.1)
  with p = 0.5 each, Gaussian blur σ ∈ U(0.1, 1) with p = 0.5 (``strong_enhance``, ``strong_blur``).

Where we follow the paper rather than the code, or the code rather than the paper:

* the guidance is (1 − Dice)·999 through the sinusoidal embedding (code); the paper writes
  τ = Dice. One scalar per branch over the labeled (W2G) or unlabeled (S2W) batch (code);
* the complementary term and its a² weight are in the code only (the paper cites FixMatch's
  loss); we keep them (code);
* the S2W branch and the complementary terms run on the unlabeled patches only, as the paper's
  eq. 7–9 state ("for each unlabeled data"); the code also feeds labeled images through them.
  Only unlabeled patches get a strong view in this framework;
* latent loss = mean squared error (code, guided-diffusion MSE), the paper writes ‖·‖₂;
* L_Lat-U is weighted by w(t) and L_Lat-L by 1 (code), i.e. λ₁ = w(t), λ₂ = 1 in eq. 13;
* rectified labels by DDIM (η = 0, code) rather than the ancestral update of eq. 12 (paper).

Deviations forced by nnU-Net: patch-based training with nnU-Net's augmentation (the code resizes
whole slices to 256² with nearest interpolation); deep supervision for the labeled DC+CE (nnU-Net's
loss; the code uses CE + SSL4MIS Dice at full resolution) while every pseudo-label term uses the
full-resolution output; the segmentation optimiser is nnU-Net's SGD (momentum 0.99, Nesterov,
weight decay 3e-5, poly LR per epoch) instead of momentum 0.9 / 1e-4 with poly per iteration;
the rectification optimiser keeps a constant LR of 0.01 as in the authors' code (a quirk we keep);
the run length is epochs × iterations per epoch (code: 30 000 iterations), ramp lengths are
fractions of it (see "Schedule"); nnU-Net's planned normalisation
(instance norm) replaces BatchNorm in the rectification network; unlabeled batch = labeled batch.
Region-based and ignore-label datasets are not supported (colours need mutually exclusive labels).

Schedule, mapped onto the engine's policy (``BaseHParams``): the authors' sigmoid ramp of the
consistency weight over their whole 30 000-iteration run → ``rampup_fraction = 1.0`` within
[200, 30 000] iterations after the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter; the authors have none); during the burn-in only the segmentation network trains (the
rectifier's losses need pseudo labels); rectified supervision (step 3) never runs during it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.plugins.diffrect.losses import (
    calibration_guidance,
    ce_dice,
    colorize,
    complementary_loss,
    confident_mask,
    confident_pseudo_label,
)
from semidiff_nnunet.plugins.diffrect.networks import AUTHORS_DROPOUT, rectification_net_from_plans
from semidiff_nnunet.plugins.diffrect.rectification import LatentRectification
from semidiff_nnunet.training import BaseHParams, OptimStep, SemiSupervisedTrainer, ramps
from semidiff_nnunet.training.hparams import BetaSchedule


@dataclass
class DiffRectHParams(BaseHParams):
    conf_thresh: float = 0.8
    low_confidence: Literal["background", "ignore"] = "ignore"
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    ref_consistency_weight: float = -1.0
    refine_start: float = 0.033
    refine_min_updates: int = 500
    rect_weight: float = 1.0
    rect_rampup_fraction: float = 0.1
    rect_gate: bool = True
    num_timesteps: int = 10
    sample_steps: int = 2
    beta_schedule: BetaSchedule = "cosine"
    clip_sample: bool = True
    guidance_scale: float = 999.0
    width_factor: float = 0.5
    rect_stages: int = 5
    rect_dropout: bool = True
    denoiser_condition: Literal["skip", "input"] = "skip"
    rect_momentum: float = 0.9
    rect_weight_decay: float = 1e-4
    strong_enhance: float = 0.1
    strong_blur: float = 1.0


def diffrect_strong_view(enhance: float = 0.1, blur: float = 1.0, p: float = 0.5) -> ComposeTransforms:
    """The authors' strong photometric view on (C, *spatial) tensors: brightness and contrast
    ×(1 + U(0, enhance)) and Gaussian blur σ ∈ U(0.1, blur), each with probability ``p``.
    (PIL's sharpness enhancement has no batchgeneratorsv2 counterpart and is left out.)"""
    ops = [
        RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast((1.0, 1.0 + enhance)), synchronize_channels=True, p_per_channel=1), p),
        RandomTransform(ContrastTransform(
            contrast_range=BGContrast((1.0, 1.0 + enhance)), preserve_range=True, synchronize_channels=True,
            p_per_channel=1), p),
    ]
    if blur > 0.1:
        ops.append(RandomTransform(GaussianBlurTransform(
            blur_sigma=(0.1, blur), synchronize_channels=True, synchronize_axes=True, p_per_channel=1,
            benchmark=False), p))
    return ComposeTransforms(ops)


class DiffRectTrainer(SemiSupervisedTrainer):
    """DiffRect. ``--pretrained-weights`` initialises the segmentation network; the rectification
    network (LGDD/LDM) starts as built."""

    hparams_class = DiffRectHParams

    def get_strong_transforms(self):
        return diffrect_strong_view(self.hp.strong_enhance, self.hp.strong_blur)

    def build_method(self):
        lm, cm, hp = self.label_manager, self.configuration_manager, self.hp
        if lm.has_regions or lm.has_ignore_label:
            raise SemidiffError("diffrect needs mutually exclusive labels: region-based training and ignore "
                                "labels are not supported (the colouring scheme maps one class per voxel).")
        self.num_classes = lm.num_segmentation_heads
        net = rectification_net_from_plans(
            cm.network_arch_init_kwargs, cm.patch_size, self.num_input_channels, self.num_classes,
            width_factor=hp.width_factor, num_stages=hp.rect_stages,
            dropout=AUTHORS_DROPOUT if hp.rect_dropout else (), condition=hp.denoiser_condition)
        opt = torch.optim.SGD(net.parameters(), self.initial_lr, momentum=hp.rect_momentum,
                              weight_decay=hp.rect_weight_decay)
        self.rectifier = self.register_network("rectifier", net, optimizer=opt, poly_lr=False)
        self.lfr = LatentRectification(hp.num_timesteps, hp.beta_schedule, hp.sample_steps, hp.clip_sample)
        self._rectified_keep = None

    def optimisation_steps(self):
        return (OptimStep("segmentation+rectifier", self.compute_step_losses),  # steps 1 and 2
                OptimStep("rectified", self.rectified_supervision, networks=("network",),  # step 3 (eq. 14)
                          active=lambda: self.iteration >= self.rect_start))

    @property
    def rect_start(self) -> int:
        """First iteration of rectified supervision: ``refine_start`` × run, not before
        ``refine_min_updates`` rectifier updates after the burn-in, at the latest at half the run."""
        hp = self.hp
        start = max(int(round(hp.refine_start * self.total_iterations)), self.burnin_iterations + hp.refine_min_updates)
        return min(start, self.total_iterations // 2)

    def consistency_weight(self) -> float:
        return self.ramp(self.hp.consistency, self.hp.rampup_fraction)

    def _guidance(self, a, b, batch: int, device) -> torch.Tensor:
        return calibration_guidance(a, b, self.num_classes, self.hp.guidance_scale).to(device).expand(batch)

    def compute_losses(self, labeled, unlabeled):
        return self.compute_step_losses(labeled, unlabeled, {})

    def compute_step_losses(self, labeled, unlabeled, carry: dict):
        hp, c = self.hp, self.num_classes
        x_l, x_u, x_s = labeled["data"], unlabeled["data"], unlabeled["data_strong"]
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        y_l = self.labels_of(labeled)

        # 1. segmentation network: supervised DC+CE + FixMatch-style term with the authors' rules
        out_l, out_w, out_s = self.joint_forward(self.network, x_l, x_u, x_s)
        full_w = torch.cat([self.highest_resolution(out_l), self.highest_resolution(out_w)]).float()
        full_s = self.highest_resolution(out_s).float()
        p_weak, p_strong = torch.softmax(full_w, 1), torch.softmax(full_s, 1)
        pl_w = confident_pseudo_label(p_weak, hp.conf_thresh)  # labeled + unlabeled
        pl_s = confident_pseudo_label(p_strong, hp.conf_thresh)  # unlabeled
        pl_wu = pl_w[n_l:]
        keep_u = confident_mask(p_weak[n_l:], hp.conf_thresh) if hp.low_confidence == "ignore" else None
        self.report_pseudo_labels(pl_wu, keep_u)  # the opt-in diagnostic (no effect on training)
        comp, a = complementary_loss(p_weak[n_l:], p_strong)
        w = self.consistency_weight()
        w_ref = w if hp.ref_consistency_weight < 0 else hp.ref_consistency_weight
        unsup = ce_dice(full_s, pl_wu, keep_u) + a * comp

        # 2a. W2G on the weak views (eq. 10-11): condition colour(y_w), x_start colour(GT | y_w)
        x_w = torch.cat([x_l, x_u])
        cond_w = colorize(pl_w, c)
        tau_l = self._guidance(pl_w[:n_l], y_l, n_l + n_u, x_l.device)
        lat_l, ref = self.lfr.loss_and_logits(self.rectifier, x_w, cond_w, tau_l,
                                              torch.cat([colorize(y_l, c), cond_w[n_l:]]))
        ref_sup = ce_dice(ref[:n_l], y_l) + lat_l
        p_ref = torch.softmax(ref[n_l:].float(), 1)
        pl_ref = confident_pseudo_label(p_ref, hp.conf_thresh)
        # 2b. S2W on the strong views (eq. 7-9): condition colour(y_s), x_start colour(y_w)
        tau_u = self._guidance(pl_s, pl_ref, n_u, x_l.device)
        lat_u, ref_s = self.lfr.loss_and_logits(self.rectifier, x_s, colorize(pl_s, c), tau_u, cond_w[n_l:])
        comp_r, a_r = complementary_loss(p_ref, torch.softmax(ref_s.float(), 1))
        ref_unsup = ce_dice(ref_s, pl_ref) + a_r * comp_r + lat_u

        # what step 3 rectifies (weak views, colour(y_w), guidance) and judges it by (labeled patches)
        carry.update(x_w=x_w, cond_colour=cond_w, guidance=tau_l, n_l=n_l, y_l=y_l, pl_l=pl_w[:n_l])
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "unsupervised": w * unsup,
                "rect_supervised": ref_sup,
                "rect_unsupervised": w_ref * ref_unsup,
                "_latent_l": lat_l.detach(), "_latent_u": lat_u.detach(),
                "_guidance_l": tau_l[0], "_guidance_u": tau_u[0],
                "_consistency_weight": torch.tensor(w)}

    def rectified_pseudo_labels(self, x, cond_colour, guidance) -> torch.Tensor:
        """y_r: DDIM sample of the rectification network (eval mode), thresholded; (B, *spatial), no gradient."""
        was_training = self.rectifier.training
        self.rectifier.eval()
        try:
            logits = self.lfr.sample(self.rectifier, x, cond_colour, guidance)
        finally:
            self.rectifier.train(was_training)
        probs = torch.softmax(logits.float(), 1)
        self._rectified_keep = (confident_mask(probs, self.hp.conf_thresh) if self.hp.low_confidence == "ignore"
                                else None)
        return confident_pseudo_label(probs, self.hp.conf_thresh)

    def rectified_supervision(self, labeled, unlabeled, carry: dict):
        """Step 3 (eq. 14): the updated segmentation network learns from the rectified labels y_r of the
        unlabeled views, while the rectifier's labels beat the network's own on the labeled patches."""
        hp, n_l, c = self.hp, carry["n_l"], self.num_classes
        y_r = self.rectified_pseudo_labels(carry["x_w"], carry["cond_colour"], carry["guidance"])
        rect_dice = 1 - calibration_guidance(y_r[:n_l], carry["y_l"], c, scale=1.0)
        seg_dice = 1 - calibration_guidance(carry["pl_l"], carry["y_l"], c, scale=1.0)
        ramp = ramps.sigmoid_rampup(self.iteration - self.rect_start, self.ramp_length(hp.rect_rampup_fraction))
        w = hp.rect_weight * ramp * float(not hp.rect_gate or bool(rect_dice > seg_dice))
        logged = {"_rect_weight": torch.tensor(w), "_rect_dice_labeled": rect_dice, "_seg_dice_labeled": seg_dice}
        if w == 0:  # no loss with a graph: the engine takes no optimiser step (no momentum, no decay)
            return {"rectified": torch.zeros(()), **logged}
        logits = self.highest_resolution(self.network(carry["x_w"][n_l:]))
        keep = None if self._rectified_keep is None else self._rectified_keep[n_l:]
        return {"rectified": w * ce_dice(logits, y_r[n_l:], keep), **logged}
