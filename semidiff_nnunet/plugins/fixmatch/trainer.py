"""``fixmatch``: FixMatch, Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS 2020, applied per voxel.

Each unlabeled patch comes in two views that share their geometry (crop, rotation, scaling,
mirroring): the weak view (nnU-Net's usual intensity augmentation) and the strong view
(:func:`semidiff_nnunet.networks.strong_views.medical_strong_view`: brightness, contrast,
gamma, blur, noise). The prediction on the weak view, where its confidence is ≥ τ, becomes a
hard pseudo label for the prediction on the strong view:
ℓ_u = 1/N Σ_x 𝟙(max q_x ≥ τ)·CE(argmax q_x, p_x(strong))  (paper Eq. 4), L = L_sup + λ_u·ℓ_u.

Defaults (paper, §3 and §4): τ = 0.95, λ_u = 1 with no ramp-up, pseudo labels from the
model being trained (no EMA teacher), weak and strong predictions in one forward pass,
gradient stopped through the pseudo labels.

Deviations:

* the strong augmentation is photometric only (no RandAugment colour/posterize/solarize ops,
  which do not apply to z-scored medical intensities, and no Cutout), see ``strong_views``;
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

import torch

from semidiff_nnunet.losses.consistency import fixmatch_loss
from semidiff_nnunet.networks.strong_views import medical_strong_view
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer


@dataclass
class FixMatchHParams(BaseHParams):
    threshold: float = 0.95
    weight: float = 1.0
    strong_strength: float = 1.0
    strong_probability: float = 0.8


class FixMatchTrainer(SemiSupervisedTrainer):
    method_name = "fixmatch"
    hparams_class = FixMatchHParams

    def get_strong_transforms(self):
        return medical_strong_view(self.hp.strong_strength, self.hp.strong_probability)

    def compute_losses(self, labeled, unlabeled):
        n_l, n_u = labeled["data"].shape[0], unlabeled["data"].shape[0]
        out = self.network(torch.cat([labeled["data"], unlabeled["data"], unlabeled["data_strong"]]))
        out_l = self.batch_part(out, slice(None, n_l))
        full = self.highest_resolution(out)
        unsup, mask = fixmatch_loss(full[n_l + n_u:], full[n_l:n_l + n_u], self.hp.threshold)
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "unsupervised": self.hp.weight * unsup,
                "_mask_fraction": mask.mean()}
