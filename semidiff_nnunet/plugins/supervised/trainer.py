"""``supervised``: nnU-Net trained on the labeled cases only — the baseline every table needs.

Identical to stock ``nnUNetTrainer`` except that the training stream holds only the labeled
cases drawn by ``--labeled``/``--seed``. No unlabeled loader is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer


@dataclass
class SupervisedHParams(BaseHParams):
    """No method hyperparameters; nnU-Net's own schedule (SGD 0.01, poly LR) applies."""


class SupervisedTrainer(SemiSupervisedTrainer):
    hparams_class = SupervisedHParams
    uses_unlabeled = False

    def compute_losses(self, labeled, unlabeled):
        return {"loss": self.supervised_loss(self.network(labeled["data"]), labeled["target"])}
