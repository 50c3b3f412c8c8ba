"""``mean-teacher``: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017.

An EMA copy of the student (the teacher) sees the unlabeled patch plus clipped Gaussian noise;
the student is pulled towards the teacher's softmax with a mean-squared error whose weight
ramps up with a sigmoid schedule.

Defaults (SSL4MIS ``train_mean_teacher_2D.py``/``_3D.py``, the implementation the papers in
this project compare against; the paper is silent on segmentation):

* ``consistency = 0.1`` (SSL4MIS ``--consistency``), ``ema_decay = 0.99`` (``--ema_decay``),
  α = min(1 − 1/(step + 1), 0.99);
* sigmoid ramp-up ``exp(-5(1 - t/L)^2)``; SSL4MIS ramps over ``consistency_rampup = 200``
  "epochs" of 150 iterations = 30 000 iterations = its whole ACDC schedule (see "Schedule" below);
* teacher input noise ``clamp(N(0, 0.1²), -0.2, 0.2)`` (SSL4MIS ``noise``);
* the student predicts on the unlabeled patch without noise, the consistency is the MSE of
  softmax probabilities averaged over all voxels and classes (SSL4MIS ``softmax_mse_loss``).

Deviations: nnU-Net's network, augmentation, Dice+CE with deep supervision and poly LR are
used for the supervised part; the consistency uses the full-resolution output only.
The student predicts at inference (as SSL4MIS evaluates ``model``, not ``ema_model``).

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
The EMA teacher follows the student from the first iteration (also during the burn-in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semidiff_nnunet.training import EMA, BaseHParams, SemiSupervisedTrainer


@dataclass
class MeanTeacherHParams(BaseHParams):
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    ema_decay: float = 0.99
    noise_std: float = 0.1
    noise_clip: float = 0.2


class MeanTeacherTrainer(SemiSupervisedTrainer):
    """Mean teacher. ``--pretrained-weights`` initialises the student and the EMA teacher alike."""

    hparams_class = MeanTeacherHParams

    def build_method(self):
        self.teacher = self.register_state("teacher", EMA(self.network, self.hp.ema_decay).to(self.device))

    def consistency_weight(self) -> float:
        return self.ramp(self.hp.consistency, self.hp.rampup_fraction)

    def compute_losses(self, labeled, unlabeled):
        hp = self.hp
        x_u = unlabeled["data"]
        out_l, out_u = self.joint_forward(self.network, labeled["data"], x_u)
        student_u = self.highest_resolution(out_u)
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(x_u) * hp.noise_std, -hp.noise_clip, hp.noise_clip)
            teacher_u = self.highest_resolution(self.teacher.module(x_u + noise))
        self.report_pseudo_labels(teacher_u.argmax(1))  # the teacher's target, for the opt-in diagnostic
        consistency = torch.mean((torch.softmax(student_u, 1) - torch.softmax(teacher_u, 1)) ** 2)
        w = self.consistency_weight()
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "consistency": w * consistency,
                "_consistency_weight": torch.tensor(w)}

    def after_step(self):
        self.teacher.update(self.network, self.iteration)
