"""``cct``: cross-consistency training, Ouali et al., "Semi-Supervised Semantic Segmentation with
Cross-Consistency Training", CVPR 2020.

The planned nnU-Net is the main encoder + decoder. Auxiliary decoders (copies of the planned
decoder, initialised afresh) read perturbed versions of the encoder's features of the
unlabeled patches and are trained to agree with the main decoder's prediction, which acts as
a fixed target: L = L_sup + λ(t)·1/K Σ_k mean‖softmax(g_k(π_k(z))) − sg(softmax(g(z)))‖²
(paper Eq. 4–5). Only the main network is exported (``build_network_architecture`` is
nnU-Net's), so stock nnU-Net predicts with it.

Defaults:

* K = 3 auxiliary decoders with feature noise (U(−0.3, 0.3)), feature dropout (γ ~ U(0.7, 0.9))
  and spatial dropout (p = 0.3) (SSL4MIS ``UNet_CCT`` / ``train_cross_consistency_training_2D.py``;
  values from the CCT code ``decoders.py``). The paper's 30 decoders (plus VAT, guided
  cutout and context/object masking) target DeepLab on VOC and would multiply the memory;
* the perturbations are applied to every encoder stage's output, bottleneck included, because
  a U-Net decoder reads all of them (SSL4MIS); ``perturb_skips=False`` perturbs only the
  bottleneck, the paper's "encoder output z";
* the main prediction is a constant target and the auxiliary decoders see unlabeled patches
  only (paper §3.1: the main decoder is trained on labels only);
* softmax-MSE consistency averaged over decoders, weight ``consistency = 0.1`` with a sigmoid
  ramp over the whole run (SSL4MIS ``--consistency 0.1``, ``--consistency_rampup 200`` × 150
  iterations = its whole run). The paper's w_u = 30 ramped over the first 10 % was tuned for
  VOC with its own loss scale.

Deviations: SSL4MIS also supervises the auxiliary decoders on labeled patches, averages the
four supervised losses and lets the consistency gradient reach the main decoder; we follow the
paper there. nnU-Net's network, augmentation, Dice+CE with deep supervision and poly LR for the
supervised part; the auxiliary decoders predict at full resolution only (no deep supervision).

Schedule, mapped onto the engine's policy (``BaseHParams``): SSL4MIS adds no unlabeled loss before
iteration 1000 of its 30 000 → the supervised burn-in (3 % of the run, 100–1000 iterations, at most
a quarter of the run); its sigmoid ramp over the whole 30 000 iterations → ``rampup_fraction = 1.0``
within [200, 30 000] iterations, starting after the burn-in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.losses.consistency import softmax_mse
from semidiff_nnunet.networks.hooks import captured_output
from semidiff_nnunet.networks.perturbations import get_perturbation, parse_perturbations
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, unwrap


@dataclass
class CCTHParams(BaseHParams):
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    #: one auxiliary decoder per entry
    perturbations: str = "feature_noise:0.3,dropout:0.3,feature_dropout"
    perturb_skips: bool = True

    def __post_init__(self):  # checked with the other settings, before planning
        try:
            specs = parse_perturbations(self.perturbations)
        except ValueError as e:
            raise SemidiffError(f"--set perturbations={self.perturbations}: {e}.") from None
        if not specs:
            raise SemidiffError("cct needs at least one auxiliary decoder: --set perturbations=feature_noise,dropout")


def fresh_decoder(decoder: nn.Module) -> nn.Module:
    """A re-initialised copy of a dynamic_network_architectures U-Net decoder, without its encoder.

    The copy predicts at full resolution only: deep supervision off, the unused lower-resolution
    heads replaced by ``Identity`` (no parameters that never receive a gradient).
    """
    encoder = decoder._modules.pop("encoder", None)  # the decoder keeps a reference it never calls
    try:
        new = copy.deepcopy(decoder)
    finally:
        if encoder is not None:
            decoder._modules["encoder"] = encoder
    new.deep_supervision = False
    heads = new.seg_layers
    new.seg_layers = nn.ModuleList([nn.Identity() for _ in range(len(heads) - 1)] + [heads[-1]])
    new.apply(InitWeights_He(1e-2))
    return new


class AuxiliaryDecoders(nn.Module):
    """K decoders; decoder k sees π_k(skips). forward(skips) -> list of K logits (B, C, *spatial)."""

    def __init__(self, decoder: nn.Module, perturbations: list[str], perturb_skips: bool = True):
        super().__init__()
        self.decoders = nn.ModuleList(fresh_decoder(decoder) for _ in perturbations)
        self.perturbations = [get_perturbation(p) for p in perturbations]
        self.perturb_skips = perturb_skips

    def perturb(self, k: int, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        f = self.perturbations[k]
        if self.perturb_skips:
            return [f(s) for s in skips]
        return [*skips[:-1], f(skips[-1])]

    def forward(self, skips):
        return [dec(self.perturb(k, skips)) for k, dec in enumerate(self.decoders)]


class CCTTrainer(SemiSupervisedTrainer):
    """CCT. ``--pretrained-weights`` initialises the shared encoder and main decoder; the auxiliary
    decoders start as built."""

    hparams_class = CCTHParams

    def build_method(self):
        aux = AuxiliaryDecoders(unwrap(self.network).decoder, parse_perturbations(self.hp.perturbations),
                                self.hp.perturb_skips)
        self.aux_decoders = self.register_network("aux_decoders", aux)

    def compute_losses(self, labeled, unlabeled):
        n_l = labeled["data"].shape[0]
        with captured_output(unwrap(self.network).encoder) as store:
            out_l, out_u = self.joint_forward(self.network, labeled["data"], unlabeled["data"])
        target = torch.softmax(self.highest_resolution(out_u).detach().float(), 1)
        aux = self.aux_decoders([s[n_l:] for s in store["out"]])
        consistency = sum(softmax_mse(a, target) for a in aux) / len(aux)
        w = self.ramp(self.hp.consistency, self.hp.rampup_fraction)
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "consistency": w * consistency,
                "_consistency_weight": torch.tensor(w)}
