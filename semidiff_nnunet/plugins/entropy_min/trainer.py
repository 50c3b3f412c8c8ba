"""``entropy-min``: entropy minimisation, Vu et al., "ADVENT", CVPR 2019 (the MinEnt variant).

The network's predictions on unlabeled patches are pushed towards confident (low-entropy)
outputs: L = L_sup + λ(t) · mean_x[−Σ_c p_x,c log p_x,c / log C]  (paper Eq. 2–3).

Defaults:

* normalised entropy with log C (paper Eq. 2, SSL4MIS ``losses.entropy_loss``);
* the entropy is taken on the unlabeled patches only (paper: target domain only;
  ``include_labeled=True`` gives SSL4MIS ``train_entropy_minimization_2D.py``, which applies it
  to the whole batch);
* ``weight = 0.1`` with a sigmoid ramp-up over the whole run (SSL4MIS ``--consistency 0.1``,
  ``--consistency_rampup 200`` "epochs" of 150 iterations = its whole 30 000 iterations;
  ``rampup_fraction = 1.0``). The paper's λ_ent = 0.001 was tuned for GTA5→Cityscapes domain
  adaptation with DeepLab-v2, not for semi-supervised medical segmentation.

Deviations: nnU-Net's network, augmentation, Dice+CE with deep supervision and poly LR for the
supervised part; the entropy uses the full-resolution output only.

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semidiff_nnunet.losses.consistency import entropy_loss
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer


@dataclass
class EntropyMinHParams(BaseHParams):
    weight: float = 0.1
    rampup_fraction: float = 1.0
    include_labeled: bool = False


class EntropyMinTrainer(SemiSupervisedTrainer):
    hparams_class = EntropyMinHParams

    def compute_losses(self, labeled, unlabeled):
        n_l = labeled["data"].shape[0]
        out = self.network(torch.cat([labeled["data"], unlabeled["data"]]))
        out_l = self.batch_part(out, slice(None, n_l))
        full = self.highest_resolution(out)
        ent = entropy_loss(full if self.hp.include_labeled else full[n_l:])
        w = self.ramp(self.hp.weight, self.hp.rampup_fraction)
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "entropy": w * ent,
                "_entropy_raw": ent.detach(),
                "_entropy_weight": torch.tensor(w)}
