"""``fixmatch``: FixMatch, Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS 2020, applied per voxel.

Each unlabeled patch comes in two views that share their geometry (crop, rotation, scaling,
mirroring): the weak view — geometry only (``weak_view = "geometry"``), as the paper's weak
augmentation (flip and translate, §2.3) and UniMatch's medical code — and the strong view, the weak
view plus a photometric perturbation (``strong_view = "authors"``,
:func:`semidiff_nnunet.networks.strong_views.authors_strong_view`: brightness and contrast with
p = 0.8, blur σ ∈ [0.1, 2] with p = 0.5; UniMatch's medical strong view, the FixMatch lineage's
only medical one). ``--set weak_view=nnunet strong_view=medical`` gives the earlier views (nnU-Net's
intensity augmentation in the weak view; brightness, contrast, gamma, blur and noise in the strong).
The prediction on the weak view, where its confidence is ≥ τ, becomes a
hard pseudo label for the prediction on the strong view:
ℓ_u = 1/N Σ_x 𝟙(max q_x ≥ τ)·CE(argmax q_x, p_x(strong))  (paper Eq. 4), L = L_sup + λ_u·ℓ_u.

Defaults (paper, §3 and §4): τ = 0.95, λ_u = 1 with no ramp-up, pseudo labels from the
model being trained (no EMA teacher), weak and strong predictions in one forward pass,
gradient stopped through the pseudo labels.

Deviations:

* the strong augmentation is photometric only (no RandAugment colour/posterize/solarize ops,
  which do not apply to z-scored medical intensities, and no Cutout): UniMatch's medical strong view,
  see ``strong_views``; the weak view's geometry is nnU-Net's spatial augmentation (rotation, scaling,
  mirroring) rather than the paper's flip-and-translate;
* unlabeled batch = labeled batch (``unlabeled_batch_size``, default the plans' batch size)
  instead of the paper's μ = 7, which would not fit 3D patches in memory; set it with
  ``--set unlabeled_batch_size=...``;
* SSL4MIS's ``train_fixmatch_*`` scripts implement a different variant (min-max normalised
  confidence with τ = 0.8, CE + Dice on pseudo labels, a complementary loss, ramped weight
  0.1); we follow the paper;
* nnU-Net's network, Dice+CE with deep supervision and poly LR for the supervised part; the
  unlabeled loss uses the full-resolution output only.

Schedule, mapped onto the engine's policy (``BaseHParams``): the paper uses λ_u from the first
step with no ramp; here the unlabeled term starts after the engine's supervised burn-in (3 % of the
run, 100–1000 iterations, at most a quarter) and then has its full weight (no ramp, as the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from semidiff_nnunet.losses.consistency import fixmatch_loss
from semidiff_nnunet.networks.strong_views import authors_strong_view, medical_strong_view
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer


@dataclass
class FixMatchHParams(BaseHParams):
    threshold: float = 0.95
    weight: float = 1.0
    #: the weak view: nnU-Net's spatial transforms only (the paper's flip-and-translate)
    weak_view: Literal["nnunet", "geometry"] = "geometry"
    #: ``authors``: UniMatch's medical strong view (brightness and contrast with p = 0.8, blur σ ∈ [0.1, 2]
    #: with p = 0.5); ``medical``: the wider ``medical_strong_view`` (adds gamma and noise; the earlier default)
    strong_view: Literal["authors", "medical"] = "authors"
    #: ``authors`` view only: probabilities of gamma and of Gaussian noise (off, as the authors)
    strong_gamma_p: float = 0.0
    strong_noise_p: float = 0.0
    #: probability of the brightness/contrast ops (both views; the authors' 0.8)
    strong_probability: float = 0.8
    #: ``medical`` view only: scale of its ranges
    strong_strength: float = 1.0


class FixMatchTrainer(SemiSupervisedTrainer):
    hparams_class = FixMatchHParams

    def get_strong_transforms(self):
        hp = self.hp
        if hp.strong_view == "medical":
            return medical_strong_view(hp.strong_strength, hp.strong_probability)
        return authors_strong_view(p=hp.strong_probability, p_gamma=hp.strong_gamma_p, p_noise=hp.strong_noise_p)

    def compute_losses(self, labeled, unlabeled):
        n_l, n_u = labeled["data"].shape[0], unlabeled["data"].shape[0]
        out = self.network(torch.cat([labeled["data"], unlabeled["data"], unlabeled["data_strong"]]))
        out_l = self.batch_part(out, slice(None, n_l))
        full = self.highest_resolution(out)
        unsup, mask = fixmatch_loss(full[n_l + n_u:], full[n_l:n_l + n_u], self.hp.threshold)
        self.report_pseudo_labels(full[n_l:n_l + n_u].argmax(1), mask.bool())  # the opt-in diagnostic
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "unsupervised": self.hp.weight * unsup,
                "_mask_fraction": mask.mean()}
