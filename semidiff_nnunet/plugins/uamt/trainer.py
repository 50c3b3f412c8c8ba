"""``uamt``: uncertainty-aware mean teacher, Yu et al., "Uncertainty-aware Self-ensembling Model
for Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019.

A mean teacher (EMA of the student) whose consistency target is trusted only where it is
certain. The teacher sees the unlabeled patch T times with input noise; the entropy u of the
mean softmax is the uncertainty; the softmax-MSE consistency counts only voxels with
u < H(t), where H rises from 0.75·U_max to U_max over training (paper Eq. 2–3).

Defaults (paper; SSL4MIS ``train_uncertainty_aware_mean_teacher_2D.py``/``_3D.py`` where the
paper leaves it open):

* ``T = 8`` stochastic teacher passes (paper), each with input noise
  ``clamp(N(0, 0.1²), −0.2, 0.2)`` (SSL4MIS);
* threshold H = (0.75 + 0.25·r(t))·U_max with r the sigmoid ramp over the whole run
  (SSL4MIS ramps over ``max_iterations``: ``threshold_rampup_fraction = 1.0``); U_max = ln C,
  the largest entropy of C classes (paper: "U_max is the maximum uncertainty"; ln 2 for its
  binary task; SSL4MIS keeps ln 2 also for 4-class ACDC, i.e. a stricter threshold there);
* consistency Σ 𝟙(u < H)·‖p_s − p_t‖² / (2·Σ 𝟙(u < H)) (SSL4MIS), with the teacher target
  from one more noisy pass;
* ``consistency = 0.1``, sigmoid ramp over the whole run (SSL4MIS ``--consistency 0.1``,
  ``--consistency_rampup 200`` × 150 iterations = 30 000 = its whole run; ``rampup_fraction
  = 1.0``), ``ema_decay = 0.99`` with α = min(1 − 1/(step + 1), 0.99) (paper and SSL4MIS);
* the student predicts at inference (SSL4MIS evaluates ``model``).

Deviations: the paper's teacher also uses Monte-Carlo dropout; nnU-Net's planned network has
no dropout layers, so the T passes differ by input noise only (as in SSL4MIS's U-Net runs,
whose U-Net has dropout). nnU-Net's network, augmentation, Dice+CE with deep supervision and
poly LR for the supervised part; consistency on the full-resolution output only.

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
The uncertainty threshold's ramp uses the same policy (``threshold_rampup_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semidiff_nnunet.losses.consistency import entropy_map, uamt_threshold, uncertainty_masked_mse
from semidiff_nnunet.training import EMA, BaseHParams, SemiSupervisedTrainer


@dataclass
class UAMTHParams(BaseHParams):
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    ema_decay: float = 0.99
    mc_passes: int = 8
    noise_std: float = 0.1
    noise_clip: float = 0.2
    threshold_start: float = 0.75
    threshold_rampup_fraction: float = 1.0


class UAMTTrainer(SemiSupervisedTrainer):
    """UA-MT. ``--pretrained-weights`` initialises the student and the EMA teacher alike."""

    hparams_class = UAMTHParams

    def build_method(self):
        self.teacher = self.register_state("teacher", EMA(self.network, self.hp.ema_decay).to(self.device))

    def _noisy(self, x):
        return x + torch.clamp(torch.randn_like(x) * self.hp.noise_std, -self.hp.noise_clip, self.hp.noise_clip)

    @torch.no_grad()
    def teacher_uncertainty(self, x_u):
        """(teacher softmax of one noisy pass, entropy of the mean softmax over T noisy passes (B, 1, *spatial))."""
        teacher = self.teacher.module
        target = torch.softmax(self.highest_resolution(teacher(self._noisy(x_u))).float(), 1)
        mean = sum(torch.softmax(self.highest_resolution(teacher(self._noisy(x_u))).float(), 1)
                   for _ in range(self.hp.mc_passes)) / self.hp.mc_passes
        return target, entropy_map(mean, normalize=False, eps=1e-6)

    def compute_losses(self, labeled, unlabeled):
        hp = self.hp
        n_l = labeled["data"].shape[0]
        out = self.network(torch.cat([labeled["data"], unlabeled["data"]]))
        out_l = self.batch_part(out, slice(None, n_l))
        student_u = self.highest_resolution(out)[n_l:]
        target, uncertainty = self.teacher_uncertainty(unlabeled["data"])
        r = self.ramp(1.0, hp.threshold_rampup_fraction)
        threshold = uamt_threshold(r, target.shape[1], hp.threshold_start)
        consistency, mask = uncertainty_masked_mse(student_u, target, uncertainty, threshold)
        w = self.ramp(hp.consistency, hp.rampup_fraction)
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "consistency": w * consistency,
                "_consistency_weight": torch.tensor(w),
                "_threshold": torch.tensor(threshold),
                "_certain_fraction": mask.mean()}

    def after_step(self):
        self.teacher.update(self.network, self.iteration)
