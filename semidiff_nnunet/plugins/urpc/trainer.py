"""``urpc``: uncertainty rectified pyramid consistency, Luo et al., "Semi-supervised medical image
segmentation via uncertainty rectified pyramid consistency", Medical Image Analysis 2022.

The pyramid is nnU-Net's deep-supervision heads: the decoder's S highest-resolution outputs,
resized to the patch size. Their mean p̄ is the target; each scale's distance to it is
down-weighted where that scale disagrees with p̄ (KL divergence D_s), and D_s itself is
minimised (paper Eq. 5–7, :func:`semidiff_nnunet.losses.consistency.urpc_loss`).

Defaults (paper; SSL4MIS ``train_uncertainty_rectified_pyramid_consistency_2D.py``/``_3D.py``
and ``UNet_URPC`` where the paper leaves it open):

* S = 4 scales (paper and SSL4MIS), logits resized to the full resolution;
* during training, the input of the 2nd/3rd/4th head is perturbed with feature noise
  U(−0.3, 0.3), feature dropout (γ ~ U(0.7, 0.9)) and dropout p = 0.5 respectively (SSL4MIS
  ``UNet_URPC`` decoder ``dp1``/``dp2``/``dp3``), for the whole batch;
* ``consistency = 0.1`` with a sigmoid ramp over the whole run (SSL4MIS ``--consistency
  0.1``, ``--consistency_rampup 200`` × 150 iterations = its whole run; ``rampup_fraction
  = 1.0``); p̄ is not detached (SSL4MIS).

Deviations:

* the supervised loss is nnU-Net's deep-supervision Dice+CE with downsampled targets and
  nnU-Net's scale weights, instead of SSL4MIS's equal average of CE + Dice of the four
  upsampled outputs;
* the outputs are resized with (bi/tri)linear interpolation (SSL4MIS: nearest);
* dropout drops whole channels (n-D ``Dropout2d``); with fewer than 4 decoder heads in the
  plans, all heads are used.

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.losses.consistency import urpc_loss
from semidiff_nnunet.networks.perturbations import get_perturbation, parse_perturbations, perturbed_inputs
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, unwrap

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass
class URPCHParams(BaseHParams):
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    num_scales: int = 4
    #: perturbation of the 2nd, 3rd, 4th, ... head's input (empty string: none)
    head_perturbations: str = "feature_noise:0.3,feature_dropout,dropout:0.5"

    def __post_init__(self):  # checked with the other settings, before planning
        try:
            parse_perturbations(self.head_perturbations)
        except ValueError as e:
            raise SemidiffError(f"--set head_perturbations={self.head_perturbations}: {e}.") from None


def pyramid_to_full_resolution(outputs: list[torch.Tensor], num_scales: int) -> list[torch.Tensor]:
    """The ``num_scales`` highest-resolution logits (B, C, *spatial_s), each resized to outputs[0]'s size."""
    size = outputs[0].shape[2:]
    mode = _MODES[len(size)]
    return [o if o.shape[2:] == size else F.interpolate(o, size=size, mode=mode, align_corners=False)
            for o in outputs[:num_scales]]


class URPCTrainer(SemiSupervisedTrainer):
    hparams_class = URPCHParams

    def head_hooks(self):
        """(seg head, perturbation) for pyramid levels 1, 2, ... (level 0 = full resolution stays clean)."""
        heads = unwrap(self.network).decoder.seg_layers  # lowest resolution first
        return [(heads[len(heads) - 1 - level], get_perturbation(spec))
                for level, spec in enumerate(parse_perturbations(self.hp.head_perturbations), start=1)
                if level < len(heads)]

    def compute_losses(self, labeled, unlabeled):
        n_l = labeled["data"].shape[0]
        with perturbed_inputs(self.head_hooks()):
            out = self.network(torch.cat([labeled["data"], unlabeled["data"]]))
        if not isinstance(out, (list, tuple)):
            out = [out]
        pyramid = [o[n_l:] for o in pyramid_to_full_resolution(list(out), self.hp.num_scales)]
        consistency = urpc_loss(pyramid)
        w = self.ramp(self.hp.consistency, self.hp.rampup_fraction)
        out_l = [o[:n_l] for o in out] if len(out) > 1 else out[0][:n_l]
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "consistency": w * consistency,
                "_consistency_weight": torch.tensor(w)}
