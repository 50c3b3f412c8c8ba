"""``cps``: cross pseudo supervision, Chen et al., "Semi-Supervised Semantic Segmentation with
Cross Pseudo Supervision", CVPR 2021.

Two networks of the same (planned nnU-Net) architecture, initialised differently, see the
same batch. Each is supervised on the labeled patches and, on the unlabeled ones, by the
other's hard pseudo labels (argmax, no gradient):
L = L_sup(f₁) + L_sup(f₂) + λ(t)·[CE(f₁, argmax f₂) + CE(f₂, argmax f₁)]  (paper Eq. 1–3).

Defaults:

* the second network is re-initialised with Xavier-normal conv weights while the first keeps
  nnU-Net's He (Kaiming) initialisation (SSL4MIS ``train_cross_pseudo_supervision_2D.py``:
  ``kaiming_normal_init_weight`` / ``xavier_normal_init_weight``; the paper only asks for
  "different initialisations");
* ``weight = 0.1`` with a sigmoid ramp-up over the whole run (SSL4MIS ``--consistency 0.1``,
  ``--consistency_rampup 200`` × 150 iterations = its whole run; ``rampup_fraction = 1.0``).
  The paper's λ = 1.5 (VOC) / 6 (Cityscapes) was tuned for DeepLabv3+ on natural images
  without a ramp;
* the CPS loss is applied to the unlabeled patches only (SSL4MIS); the paper applies it to
  labeled patches too: ``on_labeled=True``;
* the first network predicts at inference (SSL4MIS evaluates ``model1``); the second is
  checkpointed as ``network_2`` with its own SGD + poly LR (nnU-Net's).

Deviations: nnU-Net's network, augmentation, Dice+CE with deep supervision and poly LR for the
supervised part (SSL4MIS: 0.5·(CE + Dice) at full resolution); the CPS term uses the
full-resolution outputs only.

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
During the burn-in both networks learn from the labels (``burnin_losses``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semidiff_nnunet.losses.consistency import cross_pseudo_supervision
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer


@dataclass
class CPSHParams(BaseHParams):
    weight: float = 0.1
    rampup_fraction: float = 1.0
    on_labeled: bool = False


def xavier_normal_init(module: nn.Module) -> None:
    """Xavier-normal conv / transposed-conv weights, zero biases (SSL4MIS ``xavier_normal_init_weight``)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class CPSTrainer(SemiSupervisedTrainer):
    """CPS. ``--pretrained-weights`` initialises the first network; the second keeps its own Xavier
    initialisation (cross pseudo supervision needs two differently initialised networks)."""

    hparams_class = CPSHParams

    def build_method(self):
        net = self.build_planned_network()
        net.apply(xavier_normal_init)
        self.network_2 = self.register_network("network_2", net)

    def burnin_losses(self, labeled):  # burn-in: both networks learn from the labels
        x, target = labeled["data"], labeled["target"]
        return {"supervised": self.supervised_loss(self.network(x), target),
                "supervised_2": self.supervised_loss(self.network_2(x), target)}

    def compute_losses(self, labeled, unlabeled):
        n_l = labeled["data"].shape[0]
        x = torch.cat([labeled["data"], unlabeled["data"]])
        out_1, out_2 = self.network(x), self.network_2(x)
        sup_1 = self.supervised_loss(self.batch_part(out_1, slice(None, n_l)), labeled["target"])
        sup_2 = self.supervised_loss(self.batch_part(out_2, slice(None, n_l)), labeled["target"])
        start = 0 if self.hp.on_labeled else n_l
        cps_1, cps_2 = cross_pseudo_supervision(self.highest_resolution(out_1)[start:],
                                                self.highest_resolution(out_2)[start:])
        w = self.ramp(self.hp.weight, self.hp.rampup_fraction)
        return {"supervised": sup_1, "supervised_2": sup_2, "cps": w * (cps_1 + cps_2),
                "_cps_weight": torch.tensor(w)}
