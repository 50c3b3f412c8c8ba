"""``semigda``: Huang et al., "SemiGDA: Generative Dual-distribution Alignment for Semi-supervised
Medical Image Segmentation", CVPR 2026 (arXiv 2604.23274; code taozh2017/SemiGDA, partial: its
``model/latent_mapping_model.py`` and ``model/distributions.py`` are missing and come from GMS,
King-HAW/GMS ``networks/``; the mapping model is GMS's ``ResAttnUNet_DS``).

The model (:mod:`.networks`, one module, :class:`~.networks.SemiGDANet`):

* generative branch: frozen SD VAE encoder → latent mean × ``scaling_factor`` (0.18215 for SD,
  read from the VAE's config) → latent mapping model (GMS ``ResAttnUNet_DS``, ``out`` head) → frozen
  VAE decoder with trainable skip adapters (CDSA) → ACR reversion → class probabilities;
* discriminative branch: the paper's modified ResNet-34 (not nnU-Net's planned encoder: the VAE's
  ``quant_conv`` and decoder adapters need the VAE encoder's widths and its 2^(L−1) down-sampling,
  which the planned encoder does not have) → the VAE's frozen ``quant_conv`` → mean × scale → the
  same frozen decoder with its own adapters;
* every width (mapping model, ResNet, adapters) follows the VAE's config (``block_out_channels``,
  ``latent_channels``, ``norm_num_groups``), so a tiny random VAE works in tests.

Two phases (the engine's :class:`~semidiff_nnunet.training.Phase`):

* ``align`` (stage 1, DAM, eq. 1–6): z̃_v = mapping(z_v), z_r = quant_conv(ResNet(x)), z_g = the
  frozen encoder's latent of the ACR-encoded mask. Terms ``latent_sup`` = MSE(z̃_v^l, z_g) +
  MSE(z_r^l, z_g) (eq. 5) and ``latent_unsup`` = w(t)·[MSE(z̃_v^u, sg(z_r^u)) + MSE(z_r^u, sg(z̃_v^u))]
  (eq. 6 in the authors' form: the gradient of MSE(z̃_v^u, z_r^u), twice its value);
  optimisers: AdamW lr 2e-3 (mapping model) and SGD lr 0.01, momentum 0.9, weight decay 1e-4
  (ResNet; the adapters get no gradient in this stage), poly 0.9 over the phase (authors' code).
* ``segment`` (stage 2, eq. 7–10 and 12–14): with probability ``latent_noise_p`` = 0.5 per iteration
  the mapping model sees z = μ + σ·ε (latent noise augmentation, **authors' code, absent from the
  paper**; ``latent_noise_p=0`` switches it off); decoded probabilities of both branches.
  ``dice_sup`` = Dice(p_v^l, y) + Dice(p_r^l, y) (eq. 9). The unlabeled segmentation term
  (``unsup_seg``):

  - ``cross_pseudo`` (default, authors' code): pseudo labels of each branch on the unlabeled patches
    = p^(1/T) ≥ 0.5 (T = 0.1, sharpening) then the largest connected component (``largest_component``);
    ``cps`` = w(t)·[Dice(p_v^u, PL_r) + Dice(p_r^u, PL_v)] (cross pseudo supervision);
  - ``soft_dice`` (the paper's eq. 10): ``dice_unsup`` = w(t)·[Dice(p_v^u, p_r^u) + Dice(p_r^u, p_v^u)],
    soft Dice (eq. 8) between the two branches' probabilities, no stop-gradient (the paper writes
    none), so each term trains both branches (Dice is symmetric: the sum is 2·Dice(p_v^u, p_r^u)).

  ``segment_latent_terms`` (default off, authors' code: their stage 2 has no latent loss; on: the
  paper's eq. 12–13, L_sup = L_sup^p + L_sup^s and L_unsup = L_unsup^p + L_unsup^s): adds
  ``latent_sup`` = MSE(z̃_v^l, z_g) + MSE(z_r^l, z_g) (eq. 5) and ``latent_unsup`` =
  w(t)·MSE(z̃_v^u, z_r^u) (eq. 6 as written: one MSE, gradient to both branches; z̃_v is the mapping
  of the noisy latent on latent-noise iterations).
  After a third of the stage (``copy_paste_start`` = 1/3), ``copy_paste`` = w(t)·BCP-style
  bidirectional copy-paste (**authors' code, absent from the paper**; ``copy_paste_start=1`` switches
  it off): one box of 2/3 × 2/3 of the patch (``box_fraction``) at a random position (the shared
  :func:`~semidiff_nnunet.networks.mixing.random_box_mask`), the unlabeled patch inside the labeled
  one and the labeled inside the unlabeled, labels GT ↔ pseudo label mixed by the same box, each
  branch supervised by the mixed label built from the *other* branch's hard pseudo label (above,
  also under ``unsup_seg=soft_dice``). One SGD (lr 0.01, momentum 0.9, weight decay 1e-4) on every
  trainable part (mapping, ResNet, both adapter sets), poly 0.9 over the phase (authors' code; the
  paper gives no optimiser).

w(t) = λ_u of eq. 14 (``lambda_schedule``):

- ``authors`` (default, authors' code): ``consistency`` (0.3) × sigmoid ramp-up exp(−5(1 − t/L)²)
  over ``rampup_fraction`` (1) of each phase, t counting the phase's iterations (authors:
  ``0.3·sigmoid_rampup(iter // (max_iter/200), 200)``, the ramp restarting with each stage);
- ``paper`` (§3.4): λ_u(t) = β·exp(−5(1 − t/t_max)²), β = ``beta`` (0.1), t the run's iteration and
  t_max the run's iterations (both phases, no restart, so stage 1's ``latent_unsup`` weighs at most
  0.1·exp(−5·0.91²) ≈ 0.0016 with the default 9 % stage; the engine's ``rampup_min``/``rampup_max``
  are not applied: the paper's t_max is the whole run).

No supervised burn-in (``burnin = 0``): the authors have none; their warm-up is w(t).

``unsup_seg``, ``segment_latent_terms``, ``lambda_schedule``: default: the authors' code; the paper's
form not measured: no pretrained VAE available (a random VAE says nothing about which segments better).

Dice = soft Dice per sample and foreground class, averaged (monai ``DiceLoss`` on the authors'
single [0, 1] map is exactly this with two classes).

Any number of classes — ACR (eq. 11), our generalisation: class k ↦ grey level
v_k = 2k/(K−1) − 1 in all three VAE channels; reversion: y = mean of the decoded channels clamped
to [−1, 1], p_k = max(0, 1 − |y − v_k|/Δ) with Δ = 2/(K−1) (hat functions; they sum to 1 and the
round trip class → level → probabilities is exact). For K = 2 this is the authors' code:
p_fg = clamp((y + 1)/2, 0, 1) and the mask 2·label − 1 (their stage-1 validation and GMS). The
paper's eq. 11 writes G/K (background −1, foreground 0), which their decoding would not invert, and
their stage-1 training uses label/(C−1) ∈ [0, 1]; we keep one encoding for both stages. The levels
are ordinal: neighbouring classes share a boundary in grey level (a limit of a scalar encoding).

Any number of input channels → the VAE's 3 (:func:`~.networks.to_rgb`): RGB slot k is the mean of
the channels c with c mod 3 = k (all channels if none): 1 channel is repeated (the authors'
grayscale rule), 3 stay. Intensities: nnU-Net's ``rgb_to_0_1`` data → 2x − 1 (the authors'
/255·2 − 1); any other normalisation (z-score) → clamp(x/3, −1, 1) (``input_range``).

Inference: the mean of the two branches' probabilities (no latent noise), returned as log
probabilities; nnU-Net's softmax and argmax give the class (two classes: p_fg > 0.5, the authors').
``build_network_architecture`` returns this module, so stock ``nnUNetv2_predict`` rebuilds it from
the plans; the frozen VAE is not stored in the checkpoints (it is loaded again from ``vae``, the
absolute path recorded in the run's plans), so **the VAE path must still exist at prediction**;
if it is gone, prediction stops with one sentence naming it.

Deviations from the paper (the defaults are the authors' code; the setting that gives the paper's
form, where there is one, in brackets): (1) stage 2 has no latent terms, L_sup^p and L_unsup^p of
eq. 12–13 (``segment_latent_terms=true``); (2) L_unsup^s is cross supervision by hard, sharpened,
largest-component pseudo labels, not eq. 10's soft Dice between the branches
(``unsup_seg=soft_dice``); (3) λ_u is 0.3 × a sigmoid ramp restarting with each phase, not
0.1·exp(−5(1 − t/t_max)²) over the run (``lambda_schedule=paper``); (4) latent noise augmentation
(``latent_noise_p=0`` removes it) and (5) bidirectional copy-paste with its own term
(``copy_paste_start=1`` removes it) are not in the paper; (6) ACR encodes two classes as ±1
(authors' code), not eq. 11's 2G/K − 1 (−1 and 0), and K classes as grey levels 2k/(K−1) − 1;
(7) stage 1's eq. 6 is the sum of two MSEs, each towards the other's detached latent (same
gradient, twice the value); (8) ‖·‖²₂ of eq. 5–6 is the mean over latent elements (MSE, as the
paper's text says and the authors compute); (9) the distributions of eq. 2–3 are represented by
their means (the mapping model outputs one latent, the ResNet's σ half after ``quant_conv`` is
dropped); σ of eq. 1 serves only the latent noise; (10) eq. 8's Dice is computed per sample and
foreground class, then averaged (monai's ``DiceLoss`` in the authors' code), where eq. 8 writes
one sum over a single foreground map; (11) stage 2 trains the mapping model, the ResNet and the adapters with the pretrained VAE
frozen (authors' code and Fig. 2), where §4.2 says the entire model is fine-tuned.

Deviations (nnU-Net framework): patches of nnU-Net's 2d configuration with its augmentation and
batch size (labeled = unlabeled batch; authors: whole images resized to 224², 12 + 12 in stage 1,
2 + 2 in stage 2); run length and the stage split in epochs (``phase.align`` default 0.09 of the
run ≈ the authors' 200·N/12 stage-1 against 350·N/2 stage-2 iterations); stage 2's poly LR runs
once over the phase (authors: restarted 3 times, ``PolyWarmRestartScheduler``); gradient norms
clipped at 12 per network (engine; the mapping model is registered as its own network for its
optimiser while staying inside the exported module, so its gradient also counts in the network's
norm, and its weights are stored twice in the checkpoint); no model selection between the stages on validation latent
MSE (the stage-2 weights are the stage-1 weights at its end); the ResNet's ``conv_out`` ConvBlock
is conv3×3-BN-ReLU-dropout(0.1)-conv1×1 (the authors' ``ConvBlock`` is not in the repository);
the copy-paste term is added to the plain CPS term (the notes do not say whether it replaces it).
3D configurations are refused (SemiGDA is 2D; 3D data trains slice-wise with ``-c 2d``).
Region-based and ignore-label datasets are refused, and so is multi-GPU (DDP) training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.losses.consistency import largest_components
from semidiff_nnunet.networks.mixing import paste, random_box_mask
from semidiff_nnunet.training import BaseHParams, Phase, SemiSupervisedTrainer, ramps, run_hparams, unwrap

ALIGN, SEGMENT = "align", "segment"


@dataclass
class SemiGDAHParams(BaseHParams):
    """SemiGDA's settings; the source of each default in brackets (details in the module docstring).

    vae: local path of the SD VAE weights (diffusers folder, .safetensors or LDM .ckpt); required.
    input_range: how images reach [−1, 1]: auto (rgb01 for nnU-Net's rgb_to_0_1 data, else zscore)
        [ours: the paper has RGB images only; rgb01 is the authors' /255·2 − 1].
    zscore_scale: z-scored intensities are divided by this and clamped [ours, 3].
    mapping_ch: first width of the mapping model (0: the VAE's first width / 4, GMS's 32 for SD)
        [authors' code, GMS].
    dropout: dropout of the ResNet's output block [authors' code, 0.1].
    consistency: maximal weight of the unlabeled terms under ``lambda_schedule=authors``
        [authors' code, 0.3].
    rampup_fraction: the sigmoid ramp-up of ``lambda_schedule=authors`` lasts this share of each
        phase [authors' code, 1].
    lambda_schedule: λ_u of eq. 14: ``authors`` = ``consistency`` × sigmoid ramp-up restarting with
        each phase [authors' code, the default]; ``paper`` = ``beta``·exp(−5(1 − t/t_max)²) over the
        whole run, t and t_max in the run's iterations [paper §3.4]. Default: the authors' code; the
        paper's form not measured: no pretrained VAE available.
    beta: β of ``lambda_schedule=paper`` [paper §3.4, 0.1].
    unsup_seg: L_unsup^s: ``cross_pseudo`` = Dice of each branch against the other's hard pseudo
        labels [authors' code, the default]; ``soft_dice`` = eq. 10, soft Dice between the two
        branches' probabilities, gradient to both [paper]. Default: the authors' code; the paper's
        form not measured: no pretrained VAE available.
    segment_latent_terms: add the latent terms L_sup^p (eq. 5) and λ_u·L_unsup^p (eq. 6) to stage 2,
        as eq. 12–14 write the total loss [paper]; off [authors' code, the default]. Default: the
        authors' code; the paper's form not measured: no pretrained VAE available.
    mapping_lr: stage-1 AdamW learning rate of the mapping model [authors' code, 2e-3].
    lr, momentum, weight_decay: SGD of the ResNet (stage 1) and of every trainable part (stage 2)
        [authors' code, 0.01, 0.9, 1e-4].
    latent_noise_p: probability per iteration of sampling the image latent in stage 2; 0: never
        [authors' code, 0.5; not in the paper].
    sharpen_temperature, pseudo_threshold: pseudo label = p^(1/T) >= threshold [authors' code, 0.1,
        0.5; ``unsup_seg=cross_pseudo`` and copy-paste].
    largest_component: keep the largest connected component per class of the pseudo labels
        [authors' code, true].
    copy_paste_start: share of stage 2 after which the copy-paste term is on; >= 1: never
        [authors' code, 1/3; not in the paper].
    box_fraction: side of the copy-paste box as a share of the patch side [authors' code, 2/3].
    burnin, burnin_min: no supervised burn-in [authors' code: none, their warm-up is λ_u].
    """

    vae: str = ""
    input_range: Literal["auto", "rgb01", "zscore"] = "auto"
    zscore_scale: float = 3.0
    mapping_ch: int = 0
    dropout: float = 0.1
    consistency: float = 0.3
    rampup_fraction: float = 1.0
    lambda_schedule: Literal["authors", "paper"] = "authors"
    beta: float = 0.1
    unsup_seg: Literal["cross_pseudo", "soft_dice"] = "cross_pseudo"
    segment_latent_terms: bool = False
    mapping_lr: float = 2e-3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    latent_noise_p: float = 0.5
    sharpen_temperature: float = 0.1
    pseudo_threshold: float = 0.5
    largest_component: bool = True
    copy_paste_start: float = 1 / 3
    box_fraction: float = 2 / 3
    burnin: float = 0.0
    burnin_min: int = 0


# ---------------------------------------------------------------------------------------------- pure ops
def soft_dice_between(prob: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Eq. 8, 1 − 2·Σ(ŷ ⊙ y)/(|ŷ|₁ + |y|₁), per sample and foreground class, averaged; ``prob`` and
    ``target`` (B, K, *spatial), channel 0 the background (left out)."""
    p, g = prob[:, 1:].flatten(2), target[:, 1:].flatten(2)
    dice = (2 * (p * g).sum(-1) + eps) / (p.sum(-1) + g.sum(-1) + eps)
    return 1 - dice.mean()


def soft_dice_loss(prob: Tensor, labels: Tensor, eps: float = 1e-5) -> Tensor:
    """Eq. 8 against integer labels: ``prob`` (B, K, *spatial), ``labels`` (B, *spatial)."""
    onehot = F.one_hot(labels.long(), prob.shape[1]).movedim(-1, 1).to(prob.dtype)
    return soft_dice_between(prob, onehot, eps)


def cross_branch_dice(prob_v: Tensor, prob_r: Tensor) -> Tensor:
    """Eq. 10, L_dice(ŷ_v^u, ŷ_r^u) + L_dice(ŷ_r^u, ŷ_v^u), soft Dice between the two branches'
    probabilities (B, K, *spatial) without stop-gradient (the paper writes none), so both branches
    learn from each term; Dice is symmetric, so the sum is 2·L_dice(ŷ_v^u, ŷ_r^u)."""
    return soft_dice_between(prob_v, prob_r) + soft_dice_between(prob_r, prob_v)


def sharpened_pseudo_labels(prob: Tensor, temperature: float = 0.1, threshold: float = 0.5) -> Tensor:
    """Class k >= 1 where p_k^(1/T) >= threshold, else background (two classes: the authors'
    ``p^(1/0.1) >= 0.5``); (B, H, W) long, no gradient."""
    with torch.no_grad():
        sharp = prob.float()[:, 1:] ** (1.0 / temperature)
        best, idx = sharp.max(1)
        return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))


def latent_alignment(vae_latent: Tensor, cnn_latent: Tensor, mask_latent: Tensor, n_l: int,
                     symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """Eq. 5–6 (MSE): (supervised term on the first ``n_l`` samples, unlabeled term on the rest).
    ``symmetric`` (authors' code): the unlabeled term is MSE(z̃_v^u, sg(z_r^u)) + MSE(z_r^u, sg(z̃_v^u)),
    each branch towards the other's detached latent; otherwise eq. 6 as written, MSE(z̃_v^u, z_r^u)
    (the same gradient, half the value)."""
    if mask_latent.shape != vae_latent[:n_l].shape:
        raise ValueError(f"mask latents {tuple(mask_latent.shape)} do not match the {n_l} labeled latents")
    sup = F.mse_loss(vae_latent[:n_l], mask_latent) + F.mse_loss(cnn_latent[:n_l], mask_latent)
    vu, cu = vae_latent[n_l:], cnn_latent[n_l:]
    unsup = F.mse_loss(vu, cu.detach()) + F.mse_loss(cu, vu.detach()) if symmetric else F.mse_loss(vu, cu)
    return sup, unsup


def copy_paste_batch(x_l: Tensor, y: Tensor, x_u: Tensor, pl_v: Tensor, pl_r: Tensor, box: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The two mixes of pairs (labeled i, unlabeled i) by ``box`` (B, 1, H, W): the unlabeled patch
    inside the box of the labeled one, then the labeled inside the unlabeled; the VAE branch's
    target mixes the ground truth ``y`` with the ResNet's pseudo labels ``pl_r``, the ResNet's with
    the VAE branch's ``pl_v`` (cross supervision). Returns (images, target_v, target_r)."""
    images = torch.cat([paste(x_l, x_u, box), paste(x_u, x_l, box)])
    target_v = torch.cat([paste(y, pl_r, box), paste(pl_r, y, box)])
    target_r = torch.cat([paste(y, pl_v, box), paste(pl_v, y, box)])
    return images, target_v, target_r


# ---------------------------------------------------------------------------------------------- building
def _input_range(hp: SemiGDAHParams, configuration_manager) -> str:
    if hp.input_range != "auto":
        return hp.input_range
    schemes = list(getattr(configuration_manager, "normalization_schemes", []) or [])
    return "rgb01" if schemes and all("RGBTo0_1" in s for s in schemes) else "zscore"


def semigda_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                    hp: SemiGDAHParams | None = None) -> nn.Module:
    """The SemiGDA model of a run, its VAE loaded from the run's ``vae`` path."""
    from semidiff_nnunet.plugins.semigda.networks import SemiGDANet
    from semidiff_nnunet.plugins.semigda.vae import load_vae

    hp = hp or run_hparams(plans_manager, SemiGDAHParams)
    if len(configuration_manager.patch_size) != 2:
        raise SemidiffError("semigda is a 2D method; train with -c 2d (3D datasets train slice-wise through "
                            "nnU-Net's 2d configuration).")
    vae = load_vae(hp.vae)
    if int(vae.config.in_channels) != 3:
        raise SemidiffError(f"The VAE at {hp.vae} takes {vae.config.in_channels} input channels, SemiGDA maps "
                            f"images and masks to 3; point vae= to Stable Diffusion's RGB VAE.")
    net = SemiGDANet(vae, num_output_channels, _input_range(hp, configuration_manager), hp.zscore_scale,
                     hp.mapping_ch, hp.dropout)
    down = net.downsampling
    if any(int(s) % down for s in configuration_manager.patch_size):
        raise SemidiffError(f"The 2d patch size {tuple(configuration_manager.patch_size)} is not divisible by the "
                            f"VAE's down-sampling {down}; plan patches with sides divisible by {down}.")
    return net


class SemiGDATrainer(SemiSupervisedTrainer):
    """SemiGDA. Its model is the frozen VAE with adapters, not the planned U-Net: ``--pretrained-weights``
    takes only a checkpoint of a semigda run (an nnU-Net U-Net checkpoint is refused)."""

    hparams_class = SemiGDAHParams
    phases = (Phase(ALIGN, share=0.09, summary="latent alignment of both branches to the mask latent (DAM)"),
              Phase(SEGMENT, summary="decoding with skip adapters: Dice, cross pseudo labels, copy-paste"))

    @classmethod
    def check_options(cls, hp: SemiGDAHParams, configuration: str | None, dim: int | None) -> None:
        """2D only; the diffusers extra and an existing ``vae`` path, made absolute here (so that
        ``--continue --set vae=./relative`` matches the path the run recorded). The string choices are
        ``Literal`` fields, checked by the option parser."""
        if dim is not None and dim != 2:
            raise SemidiffError(f"semigda is a 2D method and cannot train the {configuration!r} configuration; use "
                                f"-c 2d (3D datasets train slice-wise through nnU-Net's 2d configuration).")
        from semidiff_nnunet.plugins.semigda.vae import require_diffusers

        require_diffusers()
        if not hp.vae:
            raise SemidiffError("semigda needs the Stable Diffusion VAE weights; give their local path with --set "
                                "vae=PATH (a diffusers AutoencoderKL folder, a .safetensors file or an LDM .ckpt).")
        path = os.path.abspath(os.path.expanduser(hp.vae))
        if not os.path.exists(path):
            raise SemidiffError(f"The VAE weights path {path} does not exist; point --set vae=PATH to a diffusers "
                                f"AutoencoderKL folder, a .safetensors file or an LDM .ckpt.")
        hp.vae = path

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # the user's mistakes before anything is built or trained (``semidiff`` already asked before planning;
        # stock ``nnUNetv2_train`` reaches this first)
        vae = self.hp.vae
        self.check_options(self.hp, configuration, len(self.configuration_manager.patch_size))
        if self.hp.vae != vae:  # record the absolute path: stock prediction may run elsewhere
            self.run_config.hparams["vae"] = self.hp.vae
            self.run_config.write(self.plans_manager.plans)
        # SemiGDA's outputs are one full-resolution map: no deep supervision
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return semigda_network(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    def set_deep_supervision_enabled(self, enabled: bool):
        """The model has no deep supervision (nnU-Net toggles its decoder's flag around validation)."""

    # ------------------------------------------------------------------ setup
    def build_method(self):
        lm = self.label_manager
        if lm.has_regions or lm.has_ignore_label:
            raise SemidiffError("semigda needs label maps with one class per pixel and no ignore label (its masks are "
                                "encoded as grey levels); this dataset uses regions or an ignore label.")
        if self.is_ddp:
            raise SemidiffError("semigda trains on one device only (its branches run outside the DDP wrapper); "
                                "start it without torchrun / multi-GPU.")
        self.num_classes = lm.num_segmentation_heads
        net = unwrap(self.network)
        self.model = net
        # the mapping model keeps its own optimiser (AdamW in stage 1); it stays part of the network
        self.register_network("mapping", net.mapping, optimizer=self._mapping_optimizer(ALIGN))

    def _sgd(self, params) -> torch.optim.Optimizer:
        hp = self.hp
        return torch.optim.SGD(params, hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def _mapping_optimizer(self, phase: str) -> torch.optim.Optimizer:
        params = list(self.model.mapping.parameters())
        return torch.optim.AdamW(params, self.hp.mapping_lr) if phase == ALIGN else self._sgd(params)

    def _network_params(self) -> list[nn.Parameter]:
        """Trainable parameters of the network outside the mapping model (ResNet, adapters)."""
        mapping = {id(p) for p in self.model.mapping.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in mapping]

    def on_phase_start(self, phase):
        self.restart_optimizer("network", self._sgd(self._network_params()))
        self.restart_optimizer("mapping", self._mapping_optimizer(phase.name))

    # ------------------------------------------------------------------ schedule
    def _phase_iterations(self) -> tuple[int, int]:
        """(iterations into the current phase, its length in iterations)."""
        span = self.current_phase
        it = self.num_iterations_per_epoch
        return self.iteration - span.start * it, max(len(span) * it, 1)

    def consistency_weight(self) -> float:
        """w(t) = λ_u (eq. 14). ``lambda_schedule=authors``: ``consistency`` × sigmoid ramp-up over
        ``rampup_fraction`` of the current phase; ``paper``: β·exp(−5(1 − t/t_max)²), t the run's
        iteration, t_max the run's iterations."""
        if self.hp.lambda_schedule == "paper":
            return ramps.gaussian_rampup(self.iteration, self.total_iterations, self.hp.beta)
        done, length = self._phase_iterations()
        return self.hp.consistency * ramps.sigmoid_rampup(done, max(1.0, self.hp.rampup_fraction * length))

    def copy_paste_on(self) -> bool:
        done, length = self._phase_iterations()
        return self.current_phase.name == SEGMENT and done >= self.hp.copy_paste_start * length

    # ------------------------------------------------------------------ losses
    def burnin_losses(self, labeled):
        """A burn-in iteration (only if ``--set burnin=...`` asks for one): the labeled terms of the phase."""
        x, y = labeled["data"], self.labels_of(labeled)
        align = self.current_phase.name == ALIGN
        out = self.model.branches(x, decode=not align)
        terms = {}
        if align or self.hp.segment_latent_terms:  # eq. 5 (stage 2: eq. 12, L_sup = L_sup^p + L_sup^s)
            z_g = self.model.mask_latent(y)
            terms["latent_sup"] = F.mse_loss(out["vae_latent"], z_g) + F.mse_loss(out["cnn_latent"], z_g)
        if not align:
            terms["dice_sup"] = soft_dice_loss(out["vae_prob"], y) + soft_dice_loss(out["cnn_prob"], y)
        return terms

    def compute_losses(self, labeled, unlabeled):
        if self.current_phase.name == ALIGN:
            return self.align_losses(labeled, unlabeled)
        return self.segment_losses(labeled, unlabeled)

    def align_losses(self, labeled, unlabeled):
        """Stage 1 (DAM, eq. 5–6)."""
        x_l, x_u = labeled["data"], unlabeled["data"]
        y = self.labels_of(labeled)
        out = self.model.branches(torch.cat([x_l, x_u]), decode=False)
        z_g = self.model.mask_latent(y)
        sup, unsup = latent_alignment(out["vae_latent"].float(), out["cnn_latent"].float(), z_g.float(), x_l.shape[0])
        w = self.consistency_weight()
        return {"latent_sup": sup, "latent_unsup": w * unsup, "_consistency_weight": torch.tensor(w)}

    def pseudo_labels(self, prob: Tensor) -> Tensor:
        seg = sharpened_pseudo_labels(prob, self.hp.sharpen_temperature, self.hp.pseudo_threshold)
        return largest_components(seg, self.num_classes) if self.hp.largest_component else seg

    def segment_losses(self, labeled, unlabeled):
        """Stage 2 (eq. 9; eq. 10 or cross pseudo labels; eq. 5–6 with ``segment_latent_terms``;
        copy-paste)."""
        hp, model = self.hp, self.model
        x_l, x_u = labeled["data"], unlabeled["data"]
        y = self.labels_of(labeled)
        n_l = x_l.shape[0]
        noise = bool(torch.rand(()) < hp.latent_noise_p)
        out = model.branches(torch.cat([x_l, x_u]), latent_noise=noise)
        p_v, p_r = out["vae_prob"], out["cnn_prob"]
        w = self.consistency_weight()
        terms = {"dice_sup": soft_dice_loss(p_v[:n_l], y) + soft_dice_loss(p_r[:n_l], y)}
        copy_paste = self.copy_paste_on()
        if hp.unsup_seg == "cross_pseudo" or copy_paste:
            pl_v, pl_r = self.pseudo_labels(p_v[n_l:]), self.pseudo_labels(p_r[n_l:])
            terms["_pseudo_foreground"] = (pl_v > 0).float().mean()
        if hp.unsup_seg == "cross_pseudo":
            terms["cps"] = w * (soft_dice_loss(p_v[n_l:], pl_r) + soft_dice_loss(p_r[n_l:], pl_v))
        else:
            terms["dice_unsup"] = w * cross_branch_dice(p_v[n_l:], p_r[n_l:])
        if hp.segment_latent_terms:
            terms.update(self.latent_terms(out, y, n_l, w))
        terms.update({"_consistency_weight": torch.tensor(w), "_latent_noise": torch.tensor(float(noise))})
        if copy_paste:
            terms["copy_paste"] = w * self.copy_paste_loss(x_l, y, x_u, pl_v, pl_r, noise)
        else:
            terms["copy_paste"] = torch.zeros((), device=x_l.device)
        return terms

    def latent_terms(self, out: dict, y: Tensor, n_l: int, w: float) -> dict[str, Tensor]:
        """The latent terms of eq. 12–13 in stage 2 (``segment_latent_terms``): ``latent_sup`` = eq. 5
        on the first ``n_l`` samples, ``latent_unsup`` = w·eq. 6 as written (one MSE, gradient to both
        branches) on the rest."""
        z_g = self.model.mask_latent(y)
        sup, unsup = latent_alignment(out["vae_latent"].float(), out["cnn_latent"].float(), z_g.float(), n_l,
                                      symmetric=False)
        return {"latent_sup": sup, "latent_unsup": w * unsup}

    def copy_paste_loss(self, x_l: Tensor, y: Tensor, x_u: Tensor, pl_v: Tensor, pl_r: Tensor, noise: bool) -> Tensor:
        """Bidirectional copy-paste: pair i mixes labeled i and unlabeled i both ways with one box;
        the VAE branch learns the mix of GT and the ResNet's pseudo labels, the ResNet the mix of GT
        and the VAE branch's."""
        n = min(x_l.shape[0], x_u.shape[0])
        x_l, y, x_u, pl_v, pl_r = x_l[:n], y[:n], x_u[:n], pl_v[:n], pl_r[:n]
        box = random_box_mask(n, x_l.shape[2:], self.hp.box_fraction, shared=True, device=x_l.device)
        images, target_v, target_r = copy_paste_batch(x_l, y, x_u, pl_v, pl_r, box)
        out = self.model.branches(images, latent_noise=noise)
        return soft_dice_loss(out["vae_prob"], target_v) + soft_dice_loss(out["cnn_prob"], target_r)


__all__ = ["SemiGDATrainer", "SemiGDAHParams", "soft_dice_loss", "soft_dice_between", "cross_branch_dice",
           "sharpened_pseudo_labels", "latent_alignment", "copy_paste_batch", "semigda_network"]
