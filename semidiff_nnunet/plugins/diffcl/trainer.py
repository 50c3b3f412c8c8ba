"""``diffcl``: Guo, Yu, Shi, Lei, Wang, "Diff-CL: A Novel Cross Pseudo-Supervision Method for
Semi-supervised Medical Image Segmentation", arXiv 2503.09408 (2025). No public code.

Two networks on nnU-Net's planned architecture (Algorithm 1):

* **CS** (convolutional segmentation, predicts at inference): the planned network with the
  HF-Mamba module (eq. 10, :mod:`.hf_mamba`) after one encoder stage. It is this trainer's
  ``build_network_architecture``, so stock nnU-Net (``nnUNetv2_predict``) rebuilds and loads it;
  the HF-Mamba settings it needs come from the run's configuration (``run_hparams``).
* **DS** (diffusion segmentation, training only, ``ds`` in the checkpoint): the planned network
  whose input is the image concatenated with the noisy one-hot label Y_t (eq. 5), conditioned on t,
  predicting the segmentation. Y_0 is the label on labeled patches and CS's argmax on unlabeled ones.
* A **projection head** (``projector``) maps the decoders' last feature maps to d-dimensional
  pixel features: DS features of correctly predicted labeled pixels fill a per-class memory bank,
  CS features of unlabeled pixels are contrasted against it (eq. 11–15).

Losses (one backward; the networks share no parameter and every cross target is detached, so this
equals Algorithm 1's two updates): L^d = L_s^d + μ₁ L_p^d (eq. 16), L^c = L_s^c + μ₂ (L_p^c + η L_cl)
(eq. 17, 22), L_s = Dice + β·λ(t)·CE (eq. 18–21) with nnU-Net's Dice+CE and deep supervision,
L_p = Dice + λ·CE against the other network's hard labels (eq. 6–9), λ(t) = 2·exp(−5(1 − t/t_max)²).

Defaults from the paper (Table 2; its rows are all 3D: Pancreas, LA, BraTS — we use the same values
for 2D): μ₁ = μ₂ = 1, λ₁ = λ₂ = 1 (every row); β₁ = β₂ = 0.1 (Pancreas and BraTS; LA: 0.01, set
``--set beta_1=0.01 --set beta_2=0.01``); η = 0.007 (Pancreas 6/56 and BraTS 25/225, the ~10 %
labeled rows; LA 4/76: 0.7); HF = 0.5 (three of six rows; LA 4/76: 0.6). λ(t) ramps over the whole
run (t_max = the run's iterations; the paper counts 300 epochs = its whole run). Mamba sizes
d_state 16, d_conv 4, expand 2 (SegMamba).

Our choices where the paper is silent (all exposed as hyperparameters):

* HF-Mamba placement ``hfm_stage = -1`` (the bottleneck: fewest tokens for the O(L) scan, see
  :mod:`.hf_mamba`), a residual around it (``hfm_residual``), the 2D inter-slice scan runs
  over rows (``slice_scan_2d``), the HPF stop band is a disk/ball of normalised radius HF;
* label diffusion: continuous time t ~ U(0, 1) with the cosine γ(t) of DDP (``noise_schedule``),
  Y_0 the one-hot label in {0, 1} as eq. 5 writes it (``label_scale`` multiplies it), the DS
  network sees t·1000 through a sinusoidal embedding + MLP added to every encoder stage (zero-
  initialised projections, so DS starts as the planned network); T is not needed (continuous t);
* memory bank ``bank_size = 512`` features per class (FIFO), at most ``bank_per_step = 64`` new
  ones per class, step and rank; p = ``cl_anchors = 4`` bank features per class, q =
  ``cl_samples = 256`` unlabeled CS features per step, k = ``cl_topk = 8``, τ = ``cl_temperature
  = 0.1``; eq. 15 is a sum (``cl_reduction = "sum"``) over C·p·k terms, so p and k set its scale:
  with η = 0.007 it contributes ≈ η·C·p·k·log(k+1) ≈ 0.5 per class at initialisation, the size
  of the other terms; classes include background;
* projection head: Linear(F, F)-ReLU-Linear(F, ``proj_dim = 32``) per pixel on the decoders'
  last feature maps (F = the plans' first-stage width), shared by DS and CS (Table 1 has one F);
  the memory bank is filled after the DS forward of the same step, before the anchors are drawn;
* CPS Dice is the batch soft Dice over foreground classes (as nnU-Net's, background left out).

Where we depart from a literal reading, because the literal one trains CS on its own labels from
step 0 (measured on PH2: Diff-CL 0.66 vs supervised 0.77 Dice), all ``--set``-able:

* Table 2 is ambiguous on what λ(t) multiplies (β in eq. 18-19; the text speaks of the
  unsupervised terms). We ramp μ₁, μ₂ — and with μ₂ the contrastive η — with the engine's policy
  (``unsup_rampup = True``, ``rampup_fraction = 1.0``: after the supervised burn-in, a sigmoid
  ramp; ``unsup_rampup = False`` gives the unramped μ's), and keep λ(t) on β;
* the supervised CE weight is ``max(ce_floor, β·λ(t))`` with ``ce_floor = 1`` (nnU-Net's CE
  weight): β·λ(t) alone is ≈ 0.001 at the start and ≈ 0.08 on average, leaving CS almost without
  CE supervision (``ce_floor = 0`` is the paper-literal β·λ(t));
* DS's pseudo labels Ỹ (CS's cross target, and the memory bank's "correctly predicted" test): from
  scratch they come from one DS prediction from the image and pure noise at t = 1 (``"noise"``): at
  low t the training forward sees Y_0 almost noise-free, and on unlabeled patches Y_0 is CS's own
  argmax, so its argmax would hand CS's label back; at a trained start (``--pretrained-weights``)
  they are the paper's, the argmax of DS's training forward (``"forward"``). The default
  ``ds_pseudo_label = "auto"`` chooses between the two that way, from measurements from a converged
  ``supervised`` checkpoint (400 iterations, two seeds, gain over the restart control, docs/results.md):
  Left Atrium ``noise`` −0.062 / −0.024 (DS learns to read Y_t and its prediction from pure noise,
  the input it meets only at t ≈ 1, gets worse while CS learns from it), ``forward`` −0.001 / +0.004;
  PH2 ``noise`` +0.020 / −0.005, ``forward`` +0.014 / −0.013 (level against each other). No
  from-scratch pair is measured, so from scratch the earlier choice stays (``"noise"`` /
  ``"forward"`` force one everywhere; runs before ``auto`` recorded ``"noise"``);
* optional confidence masking of both cross targets (``cps_confidence``, 0 = off);
* from ``--pretrained-weights`` (a trained start: outside the paper, which trains both branches from
  scratch) DS starts from the checkpoint too (``ds_from_pretrained = True``): its U-Net takes the
  checkpoint's weights, zeros for the Y_t input channels and (as always) zero time projections, so DS
  starts predicting as the checkpoint and learns to read Y_t. ``False`` (DS as built, the behaviour before
  the setting) lets an untrained DS's pseudo labels teach the trained CS: measured on PH2 from a converged
  ``supervised`` checkpoint (400 iterations, two seeds, docs/results.md 2026-12-07), gain over the
  restart control −0.015 / −0.053 with DS as built, +0.020 / −0.005 with DS from the checkpoint.

Deviations forced by nnU-Net: planned U-Net instead of V-Net, nnU-Net's augmentation, SGD (0.99
Nesterov, poly LR) for both networks and the head, patch-based training; deep supervision on the
supervised terms, the CPS and contrastive terms use full-resolution outputs only. Regions-based
datasets are not supported (CPS needs mutually exclusive labels).

Schedule, mapped onto the engine's policy (``BaseHParams``): Diff-CL has no burn-in; the engine's
supervised burn-in (3 % of the run, 100–1000 iterations, at most a quarter) trains CS and DS on the
labels only (DS denoising the noisy ground truth) before CPS and the contrastive term start, then
μ₁, μ₂ (and η) ramp in as above; λ(t) keeps its Gaussian shape over the whole run (t_max = the
run), as the paper states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from semidiff_nnunet.diffusion import labels_to_onehot
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.networks.hooks import captured_output
from semidiff_nnunet.plugins.diffcl.losses import MemoryBank, cross_pseudo_supervision, label_propagation_loss
from semidiff_nnunet.plugins.diffcl.networks import (
    LabelDiffusion,
    ProjectionHead,
    TimestepConditionedUNet,
    build_cs_network,
)
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, run_hparams, unwrap
from semidiff_nnunet.training.hparams import BEFORE, LogSnrSchedule
from semidiff_nnunet.training.ramps import gaussian_rampup


@dataclass
class DiffCLHParams(BaseHParams):
    # Table 2
    mu_1: float = 1.0
    mu_2: float = 1.0
    beta_1: float = 0.1
    beta_2: float = 0.1
    lambda_1: float = 1.0
    lambda_2: float = 1.0
    eta: float = 0.007
    hf_threshold: float = 0.5
    # ours (see the module docstring)
    unsup_rampup: bool = True
    rampup_fraction: float = 1.0
    ce_floor: float = 1.0
    ds_pseudo_label: Literal["auto", "noise", "forward"] = "auto"
    cps_confidence: float = 0.0
    hfm_stage: int = -1
    hfm_residual: bool = True
    slice_scan_2d: bool = True
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_backend: Literal["auto", "torch", "fused"] = "auto"
    scan_chunk: int = 0
    noise_schedule: LogSnrSchedule = "cosine"
    label_scale: float = 1.0
    time_embedding_dim: int = 128
    proj_dim: int = 32
    bank_size: int = 512
    bank_per_step: int = 64
    cl_anchors: int = 4
    cl_samples: int = 256
    cl_topk: int = 8
    cl_temperature: float = 0.1
    cl_reduction: Literal["sum", "mean"] = "sum"
    # a trained start (not in the paper, which trains from scratch); runs before it started DS as built
    ds_from_pretrained: bool = field(default=True, metadata={BEFORE: False})


def cs_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
               enable_deep_supervision: bool = True, hp: DiffCLHParams | None = None) -> nn.Module:
    """The CS network with ``hp`` (default: the run's hyperparameters found in the plans)."""
    hp = hp or run_hparams(plans_manager, DiffCLHParams)
    return build_cs_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision, hf_threshold=hp.hf_threshold, stage=hp.hfm_stage,
                            d_state=hp.d_state, d_conv=hp.d_conv, expand=hp.expand, slice_scan_2d=hp.slice_scan_2d,
                            scan_backend=hp.scan_backend, chunk_size=hp.scan_chunk, residual=hp.hfm_residual)


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """(B, F, *spatial) → (B·prod(spatial), F) in the order of ``labels.reshape(-1)``."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


class DiffCLTrainer(SemiSupervisedTrainer):
    """Diff-CL. ``--pretrained-weights`` initialises CS (the planned U-Net, plain or residual) from a
    U-Net checkpoint, and DS's U-Net too (``ds_from_pretrained``, its Y_t input channels at zero); the
    HF-Mamba block, the time embedding and the projection head start as built."""

    hparams_class = DiffCLHParams

    def pretrained_key(self, key):
        """CS's ``encoder.stages.i.stage.*`` is the U-Net's ``encoder.stages.i.*``; ``.hfm.*`` is Diff-CL's own."""
        parts = key.split(".")
        j = 1 if parts[:1] == ["decoder"] else 0  # nnU-Net's decoder holds the encoder too (decoder.encoder.*)
        if parts[j:j + 2] == ["encoder", "stages"] and len(parts) > j + 3 and parts[j + 3] in ("stage", "hfm"):
            return None if parts[j + 3] == "hfm" else ".".join(parts[:j + 3] + parts[j + 4:])
        return key

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return cs_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                          enable_deep_supervision)

    def build_method(self):
        hp, lm = self.hp, self.label_manager
        if lm.has_regions:
            raise SemidiffError("diffcl needs mutually exclusive labels; region-based datasets are not supported.")
        self.num_classes = lm.num_segmentation_heads
        unet = self.build_planned_network(num_input_channels=self.num_input_channels + self.num_classes)
        ds = LabelDiffusion(TimestepConditionedUNet(unet, hp.time_embedding_dim), hp.noise_schedule, hp.label_scale)
        self.ds = self.register_network("ds", ds)
        if hp.ds_from_pretrained:  # DS's U-Net from the checkpoint, the Y_t channels and the time embedding new
            prefix = "network.unet."
            self.initialise_from_pretrained(ds, lambda k: k[len(prefix):] if k.startswith(prefix) else None,
                                            extra_inputs=True)
        self.print_to_log_file(f"Diff-CL: DS's pseudo labels from {self.ds_label_source()} "
                               f"(ds_pseudo_label={hp.ds_pseudo_label})")
        width = unwrap(self.network).encoder.output_channels[0]  # the last decoder stage's width
        self.projector = self.register_network("projector", ProjectionHead(width, hp.proj_dim))
        self.memory_bank = self.register_state(
            "memory_bank", MemoryBank(self.num_classes, hp.proj_dim, hp.bank_size, hp.bank_per_step, self.device))

    def ce_weights(self) -> tuple[float, float]:
        """(CS, DS) weights of the supervised CE: β·λ(t) (eq. 18-19) with ``ce_floor`` under it."""
        hp, lam = self.hp, gaussian_rampup(self.iteration, self.total_iterations, scale=2.0)
        return max(hp.ce_floor, hp.beta_2 * lam), max(hp.ce_floor, hp.beta_1 * lam)

    def burnin_losses(self, labeled):
        """Burn-in: CS and DS learn from the labels only (DS denoises the noisy ground truth)."""
        ce_c, ce_d = self.ce_weights()
        y0 = labels_to_onehot(self.labels_of(labeled), self.num_classes, ignore_index=self.label_manager.ignore_label)
        return {"supervised_cs": self.supervised_loss(self.network(labeled["data"]), labeled["target"], ce_weight=ce_c),
                "supervised_ds": self.supervised_loss(self.ds(labeled["data"], y0=y0), labeled["target"],
                                                      ce_weight=ce_d)}

    def ds_label_source(self) -> str:
        """``"forward"`` or ``"noise"``: ``ds_pseudo_label``, with ``"auto"`` resolved (``"forward"`` at a
        trained start, ``"noise"`` from scratch; the module docstring has the measurements)."""
        if self.hp.ds_pseudo_label != "auto":
            return self.hp.ds_pseudo_label
        return "forward" if self.run_config.pretrained_weights else "noise"

    def ds_labels(self, x: torch.Tensor, ds_logits: torch.Tensor, ds_features: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """DS's hard labels Ỹ (B, *spatial) and the decoder features they come from.

        ``"noise"``: one DS prediction from the image and pure noise (t = 1), without gradient, so DS
        cannot hand CS's own pseudo label back (at low t the training forward sees it almost noise-free).
        ``"forward"``: the training forward's argmax (paper-literal). Which one: :meth:`ds_label_source`."""
        if self.ds_label_source() == "forward":
            return ds_logits.detach().argmax(1), ds_features
        ds = unwrap(self.ds)
        with torch.no_grad(), captured_output(ds.network.decoder.stages[-1]) as feat:
            logits = self.highest_resolution(ds.from_noise(x, self.num_classes))
        return logits.argmax(1), feat["out"]

    def compute_losses(self, labeled, unlabeled):
        hp = self.hp
        y_l = self.labels_of(labeled)
        x_l, x_u = labeled["data"], unlabeled["data"]
        with captured_output(unwrap(self.network).decoder.stages[-1]) as cs_feat:
            out_cl, out_cu = self.joint_forward(self.network, x_l, x_u)  # CS forward (Algorithm 1, line 4)
        pseudo_c = self.highest_resolution(out_cu).detach().argmax(1)  # Ŷ^u (line 5)
        y0_l = labels_to_onehot(y_l, self.num_classes, ignore_index=self.label_manager.ignore_label)
        y0_u = labels_to_onehot(pseudo_c, self.num_classes)
        with captured_output(unwrap(self.ds).network.decoder.stages[-1]) as ds_feat:
            out_dl, out_du = self.joint_forward(self.ds, x_l, x_u, y0=torch.cat([y0_l, y0_u]))  # eq. 5, lines 6-7
        n_l = x_l.shape[0]

        ce_c, ce_d = self.ce_weights()
        sup_c = self.supervised_loss(out_cl, labeled["target"], ce_weight=ce_c)  # eq. 19
        sup_d = self.supervised_loss(out_dl, labeled["target"], ce_weight=ce_d)  # eq. 18
        logits_d = torch.cat([self.highest_resolution(out_dl), self.highest_resolution(out_du)])
        pred_d, feat_d = self.ds_labels(torch.cat([x_l, x_u]), logits_d, ds_feat["out"])
        pred_dl, pred_du = pred_d[:n_l], pred_d[n_l:]  # Ỹ (DS labels)
        self.report_pseudo_labels(pred_du)  # the opt-in diagnostic: the DS labels CS's cross term learns from
        masks = (None, None)
        if hp.cps_confidence > 0:  # optional: only confident pixels of each cross target
            masks = tuple((torch.softmax(o.detach().float(), 1).amax(1) >= hp.cps_confidence)
                          for o in (self.highest_resolution(out_cu), self.highest_resolution(out_du)))
        cps_c, cps_d = cross_pseudo_supervision(self.highest_resolution(out_cu), self.highest_resolution(out_du),
                                                hp.lambda_2, hp.lambda_1, pseudo_c, pred_du, *masks)

        # label propagation (eq. 11-15): bank of correct DS labeled pixels, CS unlabeled pixels
        self.memory_bank.update(_pixels(feat_d[:n_l]), y_l.reshape(-1), pred_dl.reshape(-1), project=self.projector)
        cs_u = _pixels(cs_feat["out"][n_l:])
        pick = torch.randperm(cs_u.shape[0], device=cs_u.device)[: hp.cl_samples]
        anchors = self.memory_bank.sample(hp.cl_anchors)
        l_cl = label_propagation_loss(anchors, self.projector(cs_u[pick]), hp.cl_topk, hp.cl_temperature,
                                      hp.cl_reduction)

        ramp = self.ramp(1.0, hp.rampup_fraction) if hp.unsup_rampup else 1.0  # μ₁, μ₂ and η ramp in
        mu_1, mu_2 = hp.mu_1 * ramp, hp.mu_2 * ramp
        return {"supervised_cs": sup_c, "supervised_ds": sup_d,
                "cps_cs": mu_2 * cps_c, "cps_ds": mu_1 * cps_d,  # eq. 16, 17, 22
                "contrastive": mu_2 * hp.eta * l_cl,
                "_lambda": torch.tensor(gaussian_rampup(self.iteration, self.total_iterations, scale=2.0)),
                "_unsup_ramp": torch.tensor(ramp), "_contrastive_raw": l_cl.detach(),
                "_bank_fill": self.memory_bank.count.float().mean().detach()}
