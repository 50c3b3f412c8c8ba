"""Training layer: the semi-supervised nnU-Net trainer and what methods build on."""

from semidiff_nnunet.training import ramps
from semidiff_nnunet.training.ema import EMA, unwrap
from semidiff_nnunet.training.hparams import BaseHParams
from semidiff_nnunet.training.splits import LabeledSpec, SemiSplit, make_semi_split
from semidiff_nnunet.training.trainer import SemiSupervisedTrainer

__all__ = ["EMA", "BaseHParams", "LabeledSpec", "SemiSplit", "SemiSupervisedTrainer", "make_semi_split", "ramps", "unwrap"]
