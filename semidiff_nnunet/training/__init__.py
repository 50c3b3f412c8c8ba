"""Training layer: the semi-supervised nnU-Net trainer and what methods build on.

The public API for method authors::

    from semidiff_nnunet.training import (SemiSupervisedTrainer, BaseHParams, EMA, Phase, OptimStep,
                                          RunConfig, run_hparams, ramps, unwrap)
"""

from semidiff_nnunet.training import ramps
from semidiff_nnunet.training.declarations import OptimStep, Phase, PhaseSpan
from semidiff_nnunet.training.ema import EMA, unwrap
from semidiff_nnunet.training.hparams import BaseHParams
from semidiff_nnunet.training.run_config import RunConfig, run_hparams
from semidiff_nnunet.training.splits import LabeledSpec, SemiSplit, make_semi_split
from semidiff_nnunet.training.trainer import SemiSupervisedTrainer

__all__ = ["EMA", "BaseHParams", "LabeledSpec", "OptimStep", "Phase", "PhaseSpan", "RunConfig", "SemiSplit",
           "SemiSupervisedTrainer", "make_semi_split", "ramps", "run_hparams", "unwrap"]
