"""``diffcl``: Guo, Yu, Shi, Lei, Wang, "Diff-CL: A Novel Cross Pseudo-Supervision Method for
Semi-supervised Medical Image Segmentation", arXiv 2503.09408 (2025). No public code.

Two networks on nnU-Net's planned architecture (Algorithm 1):

* **CS** (convolutional segmentation, predicts at inference): the planned network with the
  HF-Mamba module (eq. 10, ``networks/hf_mamba.py``) after one encoder stage. It is this trainer's
  ``build_network_architecture``, so stock nnU-Net (``nnUNetv2_predict``) rebuilds and loads it;
  the HF-Mamba settings it needs are read from the run's hyperparameters stored in the plans.
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
  ``networks/hf_mamba.py``), a residual around it (``hfm_residual``), the 2D inter-slice scan runs
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
* CPS Dice is the batch soft Dice over foreground classes (as nnU-Net's, background left out);
  the μ's are not ramped (Table 2 puts λ(t) on β only); ``unsup_rampup=True`` scales μ₁, μ₂
  by λ(t)/2.

Deviations forced by nnU-Net: planned U-Net instead of V-Net, nnU-Net's augmentation, SGD (0.99
Nesterov, poly LR) for both networks and the head, patch-based training; deep supervision on the
supervised terms, the CPS and contrastive terms use full-resolution outputs only. Regions-based
datasets are not supported (CPS needs mutually exclusive labels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import Tensor, nn

from semidiff_nnunet import DiffusionHeadSpec, LossSpec, MethodSpec, NetworkSpec, hookimpl
from semidiff_nnunet.diffusion import ContinuousScheduler, TimestepEmbedding, labels_to_onehot
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.losses.diffcl import (
    MemoryBank,
    cross_pseudo_supervision,
    dice_ce,
    label_propagation_loss,
)
from semidiff_nnunet.networks.hf_mamba import HFMamba, insert_hf_mamba
from semidiff_nnunet.networks.mamba import TriOrientedMamba
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, unwrap
from semidiff_nnunet.training.hparams import resolve_hparams
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
    unsup_rampup: bool = False
    hfm_stage: int = -1
    hfm_residual: bool = True
    slice_scan_2d: bool = True
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_backend: str = "auto"
    scan_chunk: int = 0
    noise_schedule: str = "cosine"
    label_scale: float = 1.0
    time_embedding_dim: int = 128
    proj_dim: int = 32
    bank_size: int = 512
    bank_per_step: int = 64
    cl_anchors: int = 4
    cl_samples: int = 256
    cl_topk: int = 8
    cl_temperature: float = 0.1
    cl_reduction: str = "sum"


def hparams_from_plans(plans: dict) -> DiffCLHParams:
    """The run's resolved hyperparameters stored in the plans (class defaults for missing keys)."""
    stored = (plans.get("semidiff") or {}).get("hparams") or {}
    known = {f.name for f in dataclasses.fields(DiffCLHParams)}
    return resolve_hparams(DiffCLHParams, {k: v for k, v in stored.items() if k in known})


def build_cs_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool = True, hp: DiffCLHParams | None = None) -> nn.Module:
    """The CS network: the planned network with HF-Mamba after encoder stage ``hp.hfm_stage``."""
    net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                   num_output_channels, enable_deep_supervision)
    hp = hp or hparams_from_plans(plans_manager.plans)
    is_2d = len(configuration_manager.patch_size) == 2
    return insert_hf_mamba(net, hp.hfm_stage, hf_threshold=hp.hf_threshold, d_state=hp.d_state, d_conv=hp.d_conv,
                           expand=hp.expand, slice_scan=hp.slice_scan_2d or not is_2d,
                           scan_backend=hp.scan_backend, chunk_size=hp.scan_chunk, residual=hp.hfm_residual)


class TimestepConditionedUNet(nn.Module):
    """DS: a planned U-Net whose encoder stages get ``Linear(SiLU(temb))`` added (per channel).

    forward(x, t): ``x`` (B, C_in, *spatial) (image ⊕ Y_t), ``t`` (B,) → the U-Net's output.
    """

    def __init__(self, unet: nn.Module, embedding_dim: int = 128):
        super().__init__()
        self.unet = unet
        hidden = 2 * embedding_dim
        self.time_embed = TimestepEmbedding(embedding_dim, hidden)
        self.time_proj = nn.ModuleList(nn.Linear(hidden, c) for c in unet.encoder.output_channels)
        for proj in self.time_proj:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    def forward(self, x: Tensor, t: Tensor) -> Tensor | list[Tensor]:
        emb = nn.functional.silu(self.time_embed(t))
        encoder = self.unet.encoder
        if getattr(encoder, "stem", None) is not None:
            x = encoder.stem(x)
        skips = []
        for stage, proj in zip(encoder.stages, self.time_proj):
            x = stage(x)
            shift = proj(emb).to(x.dtype)
            x = x + shift.view(*shift.shape, *([1] * (x.ndim - 2)))
            skips.append(x)
        return self.unet.decoder(skips)


class LabelDiffusion(nn.Module):
    """Diff-CL's diffusion head: the DS network plus its label noise (eq. 5).

    forward(x, y0): ``x`` image (B, C_img, *spatial), ``y0`` clean one-hot labels (B, K, *spatial);
    t ~ U(0, 1), Y_t = sqrt(γ(t))·scale·Y_0 + sqrt(1 − γ(t))·ε; returns DS(x ⊕ Y_t, 1000 t).
    """

    def __init__(self, network: TimestepConditionedUNet, schedule: str = "cosine", label_scale: float = 1.0):
        super().__init__()
        self.network, self.label_scale = network, label_scale
        self.scheduler = ContinuousScheduler(schedule)

    def forward(self, x: Tensor, y0: Tensor, t: Tensor | None = None):
        t = self.scheduler.sample_times(x.shape[0], device=x.device) if t is None else t
        y_t = self.scheduler.q_sample(y0.float() * self.label_scale, t).to(x.dtype)
        return self.network(torch.cat([x, y_t], 1), t * 1000)


class ProjectionHead(nn.Module):
    """Per-pixel MLP: (N, F) → (N, d) (a 1×1-conv head applied to the pixels actually used)."""

    def __init__(self, in_features: int, out_features: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


@contextlib.contextmanager
def last_decoder_features(network: nn.Module):
    """Capture the full-resolution decoder features (B, F, *spatial) of ``network`` in a dict ("f")."""
    store: dict = {}
    handle = unwrap(network).decoder.stages[-1].register_forward_hook(lambda _m, _i, out: store.__setitem__("f", out))
    try:
        yield store
    finally:
        handle.remove()


def _pixels(features: Tensor) -> Tensor:
    """(B, F, *spatial) → (B·prod(spatial), F) in the order of ``labels.reshape(-1)``."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def _set_ce_weight(loss: nn.Module, weight: float) -> None:
    getattr(loss, "loss", loss).weight_ce = weight  # inside nnU-Net's DeepSupervisionWrapper


class DiffCLTrainer(SemiSupervisedTrainer):
    method_name = "diffcl"
    hparams_class = DiffCLHParams

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_cs_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                enable_deep_supervision)

    def build_method(self):
        hp, lm = self.hp, self.label_manager
        if lm.has_regions:
            raise SemidiffError("diffcl needs mutually exclusive labels; region-based datasets are not supported.")
        if hp.cl_reduction not in ("sum", "mean"):
            raise SemidiffError(f"--set cl_reduction={hp.cl_reduction}: choose sum (eq. 15) or mean.")
        self.num_classes = lm.num_segmentation_heads
        unet = nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels + self.num_classes,
            self.num_classes, self.enable_deep_supervision)
        ds = LabelDiffusion(TimestepConditionedUNet(unet, hp.time_embedding_dim), hp.noise_schedule, hp.label_scale)
        self.ds = self.register_network("ds", ds)
        width = unwrap(self.network).encoder.output_channels[0]  # the last decoder stage's width
        self.projector = self.register_network("projector", ProjectionHead(width, hp.proj_dim))
        self.memory_bank = self.register_state(
            "memory_bank", MemoryBank(self.num_classes, hp.proj_dim, hp.bank_size, hp.bank_per_step, self.device))
        self.loss_cs, self.loss_ds = self._build_loss(), self._build_loss()  # own CE weights (β·λ(t))

    def compute_losses(self, labeled, unlabeled):
        hp, n_l = self.hp, labeled["data"].shape[0]
        target = labeled["target"]
        y_l = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        x = torch.cat([labeled["data"], unlabeled["data"]])
        with last_decoder_features(self.network) as cs_feat:
            out_c = self.network(x)  # CS forward (Algorithm 1, line 4)
        logits_c = self.highest_resolution(out_c)
        pseudo_c = logits_c[n_l:].detach().argmax(1)  # Ŷ^u (line 5)
        ignore = self.label_manager.ignore_label
        y0 = torch.cat([labels_to_onehot(y_l, self.num_classes, ignore_index=ignore),
                        labels_to_onehot(pseudo_c, self.num_classes)])
        with last_decoder_features(unwrap(self.ds).network) as ds_feat:
            out_d = self.ds(x, y0)  # noise (eq. 5) + DS forward (lines 6-7)
        logits_d = self.highest_resolution(out_d)

        lam = gaussian_rampup(self.iteration, self.total_iterations, scale=2.0)  # λ(t)
        _set_ce_weight(self.loss_cs, hp.beta_2 * lam)
        _set_ce_weight(self.loss_ds, hp.beta_1 * lam)
        sup_c = self.loss_cs(self.batch_part(out_c, slice(None, n_l)), target)  # eq. 19
        sup_d = self.loss_ds(self.batch_part(out_d, slice(None, n_l)), target)  # eq. 18
        pred_d = logits_d.detach().argmax(1)  # Ỹ (DS labels, labeled and unlabeled)
        cps_c, cps_d = cross_pseudo_supervision(logits_c[n_l:], logits_d[n_l:], hp.lambda_2, hp.lambda_1,
                                                pseudo_c, pred_d[n_l:])

        # label propagation (eq. 11-15): bank of correct DS labeled pixels, CS unlabeled pixels
        self.memory_bank.update(_pixels(ds_feat["f"][:n_l]), y_l.reshape(-1),
                                pred_d[:n_l].reshape(-1), project=self.projector)
        cs_u = _pixels(cs_feat["f"][n_l:])
        pick = torch.randperm(cs_u.shape[0], device=cs_u.device)[: hp.cl_samples]
        b = self.projector(cs_u[pick])
        anchors = self.memory_bank.sample(hp.cl_anchors)
        l_cl = label_propagation_loss(anchors, b, hp.cl_topk, hp.cl_temperature, hp.cl_reduction)

        ramp = lam / 2 if hp.unsup_rampup else 1.0
        mu_1, mu_2 = hp.mu_1 * ramp, hp.mu_2 * ramp
        return {"supervised_cs": sup_c, "supervised_ds": sup_d,
                "cps_cs": mu_2 * cps_c, "cps_ds": mu_1 * cps_d,  # eq. 16, 17, 22
                "contrastive": mu_2 * hp.eta * l_cl,
                "_lambda": torch.tensor(lam), "_contrastive_raw": l_cl.detach(),
                "_bank_fill": self.memory_bank.count.float().mean().detach()}


# ------------------------------------------------------------------------------------------ registration
def _cs_factory(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                enable_deep_supervision=False, **hparams):
    hp = resolve_hparams(DiffCLHParams, hparams) if hparams else None
    return build_cs_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision, hp)


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="diffcl", trainer=DiffCLTrainer,
                       summary="diffusion (DS) and HF-Mamba CNN (CS) teach each other; contrastive label propagation",
                       reference="Guo et al., arXiv 2503.09408 (2025)")]


@hookimpl
def semidiff_register_networks():
    ref = "Guo et al. 2025 (Diff-CL); Xing et al., MICCAI 2024 (SegMamba)"
    return [NetworkSpec("hf-mamba", HFMamba, "FFT high-pass, spatial attention, tri-orientated Mamba, MLP (eq. 10)", ref),
            NetworkSpec("tri-oriented-mamba", TriOrientedMamba,
                        "Mamba with forward, backward and inter-slice scans (pure PyTorch or mamba-ssm)", ref),
            NetworkSpec("diffcl-cs", _cs_factory, "the planned nnU-Net network with HF-Mamba inserted", ref),
            NetworkSpec("diffcl-ds", TimestepConditionedUNet, "a planned U-Net conditioned on the diffusion time", ref)]


@hookimpl
def semidiff_register_diffusion_heads():
    return [DiffusionHeadSpec("diffcl-label-diffusion", LabelDiffusion,
                              "DS network on image ⊕ noisy one-hot label (eq. 5), continuous cosine γ(t)",
                              "Guo et al. 2025 (Diff-CL)")]


@hookimpl
def semidiff_register_losses():
    ref = "Guo et al. 2025 (Diff-CL)"
    return [LossSpec("diffcl-cps", lambda **kw: functools.partial(cross_pseudo_supervision, **kw),
                     "DS-CS cross pseudo supervision, Dice + λ·CE (eq. 6-9)", ref),
            LossSpec("diffcl-dice-ce", lambda **kw: functools.partial(dice_ce, **kw), "Dice + w·CE (eq. 8-9)", ref),
            LossSpec("diffcl-label-propagation", lambda **kw: functools.partial(label_propagation_loss, **kw),
                     "top-k contrastive label propagation against a memory bank (eq. 11-15)", ref)]
