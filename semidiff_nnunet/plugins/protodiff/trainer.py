"""``protodiff``: Xi, Ma, Wang, Howell, Rinaldi, Rhode, "Robust Noisy Pseudo-label Learning for
Semi-supervised Medical Image Segmentation Using Diffusion Model", DGM4MICCAI 2025, arXiv 2507.16429.
No public code (the paper names none); built from the paper's §2 and its
Algorithms 1 and 2.

The model (:mod:`.networks`, one module that is also the exported inference model):

* **visual encoder**: nnU-Net's planned encoder (the paper: a ViT-L/B at stride 16). Its N stage
  outputs are the X_l, so every 2D/3D plan works and the conv op, kernels and norm follow the plans;
* **visual-specific branches** φ_i (two blocks of conv (3×3 in 2D, the plans' kernel of the level)
  → norm → GELU → 1×1 conv) give F_i with ``width`` channels; each has an **auxiliary head** (1×1
  conv) whose prediction is supervised by ground truth and pseudo labels (CE against the label
  map nearest-downsampled to the level);
* **label encoder** (1×1 then 3×3 conv on the one-hot label), sigmoid·2 − 1 ∈ [−1, 1], times the
  signal scale s (``label_scale``); continuous-time cosine γ(t) corruption
  z_t = sqrt(γ(t))·s·z + sqrt(1 − γ(t))·ε, t ~ U(0, 1) (shared ``ContinuousScheduler``);
* **latent projector** φ: Linear → GELU → Linear (1×1 convs) from z to D = ``proj_dim`` dims, ℓ2-normalised;
* **diffusion decoder**: per level, cat(z_t pooled to the level, X_i) → two time-conditioned
  blocks → 1×1 conv → sigmoid = mask map M_i; F' = Σ_i M_i·F_i (upsampled to the first level);
  prediction branch of three blocks and a 1×1 conv → logits; CE supervision (Algorithm 1).

Prototypes (:mod:`.prototypes`, checkpointed with ``register_state``): K = ``num_prototypes`` per
class (background included), ℓ2-normalised, assignment by cosine argmax within the pixel's class,
online update by ProtoSeg's momentum rule (named and justified in :mod:`.prototypes`; momentum
``proto_momentum``), updated before the losses as in Algorithm 1 (``p, l = online_cluster(...)``);
L_inter (eq. 2, temperature τ) and L_intra (eq. 3) on the projected label embeddings.

Loss of one step (every part of the batch goes through one joint forward):

    L = CE_gt + aux·CE_aux,gt                                     (ground truth, labeled patches)
      + w_p·(CE_p + aux·CE_aux,p)                                 (labelsPseudo/, pseudo-labelled cases)
      + ramp·w_t·(CE_t + aux·CE_aux,t)                            (EMA teacher, other unlabeled cases)
      + 1e-2·L_inter + 1e-3·L_intra                               (Algorithm 1)

Three kinds of supervision:

* **ground truth** on the labeled cases (the engine's labeled stream);
* **labelsPseudo/** (preprocessed into ``<data_identifier>__pseudo``) on the cases of
  ``semi_split.pseudo`` (unlabeled training cases and extra unlabeled images that have one; never a
  validation case): a stream of its own (:meth:`ProtoDiffTrainer._pseudo_data_loader`, nnU-Net's
  labeled loader and augmentation over that folder, foreground oversampling from the pseudo masks),
  weight ``pseudo_weight``; ``pseudo_prototypes`` decides whether their embeddings feed (and are
  pulled towards) the prototypes (default yes: Algorithm 1 treats pseudo masks as ``gts``).
  ``pseudo_weight = 0`` builds no such stream and treats those cases as having no pseudo label, so
  the run equals one without ``labelsPseudo/``;
* **EMA teacher** (our extension; the paper always has a pseudo mask): on unlabeled patches whose
  case has no pseudo label, the teacher (EMA of the whole model, decay ``ema_decay``) samples a
  prediction with ``teacher_steps`` DDIM steps; its argmax is the label (for the label encoder and
  the CE), pixels whose softmax confidence is below ``teacher_confidence`` are left out of the CE.
  It never feeds the prototypes.

Hidden labels never reach a loss: the unlabeled stream carries images only, the pseudo stream reads
only ``__pseudo`` (what the user supplied), and the teacher sees images only.

Inference (Algorithm 2): m_T ~ N(0, I); for each asymmetric pair (t_now, t_next) with ``t_diff``:
logits = decoder(m_t, X, F, t_now), z̃_0 = s·label_encoder(one-hot argmax(logits)) (DDP's
re-encoding of the prediction), m ← DDIM(η = 0) to t_next; the last logits are the output. The
encoder and branches run once per sliding-window patch, only the decoder per step. The noise comes
from a generator seeded with ``sample_seed`` at every call, so predictions are deterministic and
stock ``nnUNetv2_predict`` (which rebuilds the module with ``build_network_architecture`` and the
run's hyperparameters from the plans) gives exactly what ``semidiff predict`` gives.

Defaults and their sources:

* K = 10 prototypes per class (Table 2b); L_inter weight 1e-2, L_intra weight 1e-3 (Algorithm 1);
  CE supervision (§2.4, Algorithm 1); cosine γ(t) (§2.2, after DDP and IDDPM); DDIM with asymmetric
  intervals, t_diff = 1 (§2.4);
* τ = 0.1 and momentum 0.999: the paper is silent; ProtoSeg's values (its PPC/PPD losses are eq. 2/3);
* s = ``label_scale`` = 0.01: the paper is silent; DDP's ``bit_scale`` for segmentation (the paper's
  reference [9] for the label-embedding diffusion);
* ``sampling_steps = 3``: the paper is silent ("steps"); our choice, small as the issue asks — each
  step costs one decoder pass; ``--set sampling_steps=N`` for more;
* our choices for sizes the paper leaves open: ``label_channels = 16`` (C of z), ``proj_dim = 32``
  (D), ``width = 0`` (F_i channels = the plans' first-stage width, so cost scales with the plans),
  time conditioning by a sinusoidal embedding of 1000·t and an MLP, added per channel in every
  decoder block (the paper's f(z, t, x) does not say how); ``aux_weight = 1`` (the auxiliary CEs
  averaged over levels, as much weight as the main CE; the paper gives none);
  ``proto_pixels = 8192`` pixels per step for the prototype losses and update (a random subset of
  the eligible pixels; the label embeddings of a class's interior pixels are identical, so a subset
  loses little and keeps 3D patches affordable);
* pseudo labels: ``pseudo_weight = 1`` (the paper's "GT + Pseudo" trains on both alike),
  ``pseudo_prototypes = True``, ``pseudo_batch_size = 0`` (= the plans' batch size);
* EMA teacher (our extension): ``teacher_weight = 1``, ``ema_decay = 0.99`` (SSL4MIS mean teacher),
  ``teacher_confidence = 0.95`` (FixMatch/UniMatch's threshold), ``teacher_steps = 0`` (=
  ``sampling_steps``);
* ``dice_weight = 0``: the paper's CE only; ``> 0`` adds nnU-Net's soft Dice to the ground-truth and
  pseudo-label terms.

Deviations: the planned encoder instead of a ViT (above); the plans' normalisation (instance norm)
instead of batch norm in the blocks (nnU-Net trains with batches of 2 patches, too few for batch
statistics; the plans' choice is nnU-Net's answer to that); the decoder works at the first encoder
level's full resolution and computes each mask map M_i at its level's resolution (the ViT's levels
share one stride-16 grid; with a U-Net encoder this keeps the per-step cost to about two full-
resolution blocks plus the prediction branch); the projector reads the unscaled z ∈ [−1, 1] (s only
sets the diffusion's SNR); nnU-Net's SGD, poly LR, augmentation and patch sampling instead of Adam
(5e-4) for 40k iterations; no deep supervision (the auxiliary heads play that role); mutually
exclusive labels only (region-based datasets are rejected).

Schedule, mapped onto the engine's policy (``BaseHParams``): the paper has no schedule — it trains on
GT and pseudo masks from the first step. Ground truth, ``labelsPseudo/`` and the prototype losses
are label supervision, so they run from iteration 0, burn-in included (``burnin_losses``). The
EMA teacher's self-training is an unlabeled loss: off during the engine's supervised burn-in
(3 % of the run, 100–1000 iterations, at most a quarter), then its weight ramps in with the engine's
sigmoid ramp over ``rampup_fraction`` × the run (``ramp()``; default 1.0, bounded by
rampup_min/max). The teacher follows the student from the first step (EMA warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from semidiff_nnunet.diffusion import labels_to_onehot
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.paths import PSEUDO_SUFFIX
from semidiff_nnunet.plugins.protodiff.networks import ProtoDiffNet
from semidiff_nnunet.plugins.protodiff.prototypes import PrototypeBank, inter_loss, intra_loss
from semidiff_nnunet.training import EMA, BaseHParams, SemiSupervisedTrainer, run_hparams
from semidiff_nnunet.training.hparams import LogSnrSchedule


@dataclass
class ProtoDiffHParams(BaseHParams):
    # the paper (Table 2b, Algorithm 1, §2.2, §2.4)
    num_prototypes: int = 10
    inter_weight: float = 1e-2
    intra_weight: float = 1e-3
    noise_schedule: LogSnrSchedule = "cosine"
    t_diff: float = 1.0
    # ProtoSeg (the paper is silent)
    temperature: float = 0.1
    proto_momentum: float = 0.999
    # DDP (the paper is silent)
    label_scale: float = 0.01
    # ours (see the module docstring)
    sampling_steps: int = 3
    sample_seed: int = 0
    label_channels: int = 16
    proj_dim: int = 32
    width: int = 0
    time_embedding_dim: int = 64
    aux_weight: float = 1.0
    dice_weight: float = 0.0
    proto_pixels: int = 8192
    pseudo_weight: float = 1.0
    pseudo_prototypes: bool = True
    pseudo_batch_size: int = 0
    teacher_weight: float = 1.0
    teacher_confidence: float = 0.95
    teacher_steps: int = 0
    ema_decay: float = 0.99
    rampup_fraction: float = 1.0


def protodiff_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                      hp: ProtoDiffHParams | None = None) -> ProtoDiffNet:
    """The ProtoDiff model for a plan, with ``hp`` (default: the run's hyperparameters in the plans)."""
    hp = hp or run_hparams(plans_manager, ProtoDiffHParams)
    planned = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, num_output_channels, False)
    return ProtoDiffNet.from_plans(
        planned, configuration_manager.network_arch_init_kwargs, num_output_channels, width=hp.width,
        label_channels=hp.label_channels, proj_dim=hp.proj_dim, label_scale=hp.label_scale,
        noise_schedule=hp.noise_schedule, sampling_steps=hp.sampling_steps, t_diff=hp.t_diff,
        sample_seed=hp.sample_seed, time_embedding_dim=hp.time_embedding_dim)


class ProtoDiffTrainer(SemiSupervisedTrainer):
    """ProtoDiff. ``--pretrained-weights``: the visual encoder (the planned U-Net's encoder) comes from a
    U-Net checkpoint; branches, label encoder, projector and the diffusion decoder start as built."""

    hparams_class = ProtoDiffHParams

    def pretrained_key(self, key):
        return key if key.startswith("encoder.") else None

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # the auxiliary heads are ProtoDiff's intermediate supervision

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return protodiff_network(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    def set_deep_supervision_enabled(self, enabled: bool):
        """ProtoDiffNet has no deep-supervision outputs (nnU-Net toggles its decoder's flag here)."""

    # ------------------------------------------------------------------ setup
    def build_method(self):
        hp, lm = self.hp, self.label_manager
        if lm.has_regions:
            raise SemidiffError("protodiff needs mutually exclusive labels; region-based datasets are not supported.")
        if hp.sampling_steps < 1 or hp.teacher_steps < 0:
            raise SemidiffError("--set sampling_steps must be >= 1 and teacher_steps >= 0.")
        self.num_classes = lm.num_segmentation_heads
        self.prototypes = self.register_state(
            "prototypes", PrototypeBank(self.num_classes, hp.num_prototypes, hp.proj_dim, hp.proto_momentum, self.device))
        self.teacher = self.register_state("teacher", EMA(self.network, hp.ema_decay).to(self.device))

    @property
    def pseudo_cases(self) -> set[str]:
        """Cases supervised by their ``labelsPseudo/`` mask (none when ``pseudo_weight`` is 0)."""
        if self.hp.pseudo_weight <= 0 or self.semi_split is None:
            return set()
        return set(self.semi_split.pseudo)

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        if self.pseudo_cases:  # a stream of its own, seeded, checkpointed and stopped by the engine
            self.register_loader("pseudo", self._pseudo_data_loader(sorted(self.pseudo_cases)))
        return dl_tr, dl_val

    def _pseudo_data_loader(self, cases: list[str]) -> nnUNetDataLoader:
        """nnU-Net's labeled loader and training augmentation over ``<data_identifier>__pseudo`` for
        ``cases`` (unlabeled training cases and extra images with a pseudo mask; never validation)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        split = self.semi_split
        bad = set(cases) - set(split.unlabeled) - set(split.extra_unlabeled)
        if bad:  # make_semi_split guarantees this; a hard stop if that ever changes
            raise SemidiffError(f"pseudo-labelled case(s) {sorted(bad)[:3]} are not unlabeled training cases.")
        folder = self.preprocessed_dataset_folder + PSEUDO_SUFFIX
        dataset = infer_dataset_class(folder)(folder, cases)
        cm, lm = self.configuration_manager, self.label_manager
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            cm.patch_size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            is_cascaded=False, foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        loader = nnUNetDataLoader(dataset, self.hp.pseudo_batch_size or self.batch_size, initial_patch_size,
                                  cm.patch_size, lm, oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        self.print_to_log_file(f"protodiff: {len(cases)} case(s) with labelsPseudo/ masks (weight "
                               f"{self.hp.pseudo_weight:g})")
        return loader

    def after_step(self):
        self.teacher.update(self.network)

    # ------------------------------------------------------------------ losses
    def _pseudo_batch(self) -> dict | None:
        return self.next_batch("pseudo")

    def burnin_losses(self, labeled):
        """Burn-in: ground truth and labelsPseudo/ (label supervision; no unlabeled batch)."""
        return self._losses(labeled, self._pseudo_batch(), None)

    def compute_losses(self, labeled, unlabeled):
        return self._losses(labeled, self._pseudo_batch(), unlabeled)

    @torch.no_grad()
    def teacher_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA teacher's argmax labels (B, *spatial) and confidence mask, sampled with
        ``teacher_steps`` DDIM steps (0: ``sampling_steps``)."""
        teacher = self.teacher.module
        teacher.eval()
        with self.autocast():
            logits = teacher.sample(x, steps=self.hp.teacher_steps or None)
        probs = torch.softmax(logits.float(), 1)
        conf, labels = probs.max(1)
        return labels, conf >= self.hp.teacher_confidence

    def _losses(self, labeled: dict, pseudo: dict | None, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        hp, ignore = self.hp, self.label_manager.ignore_label
        # the parts of the joint batch: (name, images, labels, weight, feeds prototypes, loss mask)
        parts = [("gt", labeled["data"], self.labels_of(labeled), 1.0, True, None)]
        if pseudo is not None:
            parts.append(("pseudo", pseudo["data"], self.labels_of(pseudo), hp.pseudo_weight, hp.pseudo_prototypes,
                          None))
        ramp = 0.0
        if unlabeled is not None and hp.teacher_weight > 0:
            ramp = self.ramp(hp.teacher_weight, hp.rampup_fraction)
            have = self.pseudo_cases
            rows = [i for i, k in enumerate(unlabeled.get("keys", [])) if k not in have]
            if ramp > 0 and rows:
                x_u = unlabeled["data"][rows]
                y_u, mask = self.teacher_labels(x_u)
                parts.append(("teacher", x_u, y_u, ramp, False, mask))
        x = torch.cat([p[1] for p in parts])
        y = torch.cat([p[2] for p in parts])
        y0 = labels_to_onehot(y, self.num_classes, ignore_index=ignore)
        eligible = torch.cat([torch.full((p[1].shape[0],), p[4], device=x.device, dtype=torch.bool) for p in parts])
        pix = self._proto_pixels(y, eligible)
        out = self.network(x, y0=y0, pixels=pix)
        terms: dict[str, torch.Tensor] = {}
        start = 0
        for name, xp, yp, weight, _, mask in parts:
            sl = slice(start, start + xp.shape[0])
            start += xp.shape[0]
            target = yp if mask is None else yp.masked_fill(~mask, -100)
            if ignore is not None:
                target = target.masked_fill(yp == ignore, -100)
            main = _ce(out["logits"][sl], target)
            if hp.dice_weight > 0 and name != "teacher":
                main = main + hp.dice_weight * self.supervised_loss(out["logits"][sl], yp[:, None], ce_weight=0.0,
                                                                    dice_weight=1.0)
            aux = torch.stack([_ce(a[sl], _nearest(target, a.shape[2:])) for a in out["aux"]]).mean()
            prefix = "" if name == "gt" else f"{name}_"
            terms[f"{prefix}ce"] = weight * main
            terms[f"{prefix}aux"] = weight * hp.aux_weight * aux
            if name == "teacher":
                terms["_teacher_ramp"] = torch.tensor(ramp)
                terms["_teacher_mask"] = mask.float().mean()
        if pix is not None and pix.numel():
            z, lab = out["latent"], y.reshape(-1)[pix]
            assignment = self.prototypes.update(z.detach(), lab)  # online clustering (Algorithm 1), then the losses
            protos = self.prototypes.prototypes
            terms["inter"] = hp.inter_weight * inter_loss(z, lab, assignment, protos, hp.temperature)
            terms["intra"] = hp.intra_weight * intra_loss(z, lab, assignment, protos)
        return terms

    def _proto_pixels(self, y: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor | None:
        """Flat indices into y (B, *spatial) of at most ``proto_pixels`` random pixels of eligible
        samples (not the ignore label); None when the prototype losses are off."""
        hp = self.hp
        if hp.inter_weight <= 0 and hp.intra_weight <= 0 and hp.proto_momentum >= 1:
            return None
        ok = eligible.view(-1, *([1] * (y.ndim - 1))).expand_as(y)
        if self.label_manager.ignore_label is not None:
            ok = ok & (y != self.label_manager.ignore_label)
        idx = ok.reshape(-1).nonzero()[:, 0]
        if idx.numel() > hp.proto_pixels:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[: hp.proto_pixels]]
        return idx


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the pixels whose target is not −100 (0 when there is none, e.g.
    a teacher batch without a confident pixel, instead of NaN)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    return total / (target != -100).sum().clamp(min=1)


def _nearest(labels: torch.Tensor, size) -> torch.Tensor:
    """Integer labels (B, *spatial) nearest-resampled to ``size`` (deep-supervision style targets)."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=list(size), mode="nearest")[:, 0].long()


__all__ = ["ProtoDiffHParams", "ProtoDiffTrainer", "protodiff_network"]
