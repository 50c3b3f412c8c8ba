"""Pseudo-Label (Lee, "Pseudo-Label: the simple and efficient semi-supervised learning method", ICML-W 2013).

The network's own confident predictions on unlabeled patches become hard targets for a
cross-entropy term whose weight ramps up. Lee (2013) ramps α(t) linearly from 0 to α_f = 3
between T1 = 100 and T2 = 600 epochs of a 1000-epoch run; we keep α_f = 3 scaled to nnU-Net's
Dice+CE magnitude as ``weight = 1.0`` (deviation: 3 with nnU-Net's loss is unstable early) and
the ramp between 10% and 60% of training. Voxels whose confidence is below ``threshold`` are
ignored (a common segmentation variant; Lee uses every sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, ramps


@dataclass
class PseudoLabelHParams(BaseHParams):
    weight: float = 1.0
    threshold: float = 0.9
    ramp_start: float = 0.1
    ramp_end: float = 0.6


class PseudoLabelTrainer(SemiSupervisedTrainer):
    hparams_class = PseudoLabelHParams

    def compute_losses(self, labeled, unlabeled):
        n_l = labeled["data"].shape[0]
        out = self.network(torch.cat([labeled["data"], unlabeled["data"]]))
        out_l = self.batch_part(out, slice(None, n_l))
        logits_u = self.highest_resolution(out)[n_l:]
        with torch.no_grad():
            confidence, pseudo = torch.softmax(logits_u, 1).max(1)
            mask = (confidence >= self.hp.threshold).float()
        ce = F.cross_entropy(logits_u, pseudo, reduction="none")
        unsup = (ce * mask).sum() / mask.sum().clamp_min(1.0)
        start, end = self.hp.ramp_start * self.total_iterations, self.hp.ramp_end * self.total_iterations
        w = self.hp.weight * ramps.linear_rampup(self.iteration - start, end - start)
        return {"supervised": self.supervised_loss(out_l, labeled["target"]), "pseudo_label": w * unsup,
                "_confident_fraction": mask.mean()}


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="pseudo-label", trainer=PseudoLabelTrainer,
                       summary="confident self-predictions as hard targets (example plugin)",
                       reference="Lee, ICML Workshop 2013")]
