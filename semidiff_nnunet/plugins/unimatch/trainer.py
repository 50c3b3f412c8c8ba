"""``unimatch``: UniMatch, Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation", CVPR 2023, as the authors run it on medical images (their code
``LiheYoung/UniMatch``, folder ``more-scenarios/medical``: ``unimatch.py``, ``model/unet.py``,
``dataset/acdc.py``, ``dataset/transform.py``, ``util/utils.py``, ``configs/acdc.yaml``).

The prediction on the weak view of an unlabeled patch, where its confidence is ≥ τ, is a hard
pseudo label for three predictions (paper Eq. 5–6, the "dual-stream perturbations"):

* two strong views (independent draws of the strong photometric augmentation on the same weak
  view, ``data_strong`` and ``data_strong_2``), each CutMixed with another unlabeled patch inside a
  random box (``networks.mixing.cutmix_box_mask``); inside the box the pseudo label and the
  confidence are those of the mixed-in patch's weak prediction, so label and image agree voxel
  for voxel;
* a feature-perturbation (FP) stream: the decoder reads the encoder's features of the weak view
  after channel dropout (``nn.Dropout2d(0.5)``, n-D here), and learns from the unmixed pseudo label.

One forward gives everything: the encoder runs on labeled ⊕ weak ⊕ strong 1 ⊕ strong 2, and a
forward hook on the planned network's encoder (``networks.hooks.replaced_output``; no copy of
nnU-Net's forward) appends channel-dropped copies of the weak patches' skips, so the decoder
returns the clean predictions followed by the FP predictions (the authors' ``model(x, need_fp=True)``,
which decodes ``cat(feat, Dropout2d(0.5)(feat))``). The hook exists only during that call:
nnU-Net's inference and the exported network are the plain planned network
(``build_network_architecture`` is nnU-Net's), so stock ``nnUNetv2_predict`` loads the run.

Unlabeled loss (authors' ``DiceLoss`` with ``ignore``): soft Dice of softmax(prediction) against the
one-hot pseudo label, per class over all kept voxels of the batch,
1 − (2Σpt + 10⁻⁵)/(Σp² + Σt² + 10⁻⁵), averaged over all classes including the background;
voxels whose (mixed) weak confidence is below τ are left out of every sum, so they get no loss
and no gradient. Total (authors): L = (L_x + 0.25·L_s1 + 0.25·L_s2 + 0.5·L_fp)/2 with
L_x = (CE + Dice)/2.

Defaults (authors' medical code):

* τ = 0.95 (``configs/acdc.yaml`` ``conf_thresh``); weights 0.25, 0.25, 0.5 for the two strong
  streams and the FP stream (``unimatch.py``, paper §3.3 λ = 0.5 between the image- and the
  feature-level stream);
* FP dropout: channel dropout p = 0.5 (``model/unet.py``: ``nn.Dropout2d(0.5)``) on *every*
  encoder feature the decoder reads (all skips, bottleneck included), as the authors' UNet does;
  ``Dropout3d``-like (whole channels) in 3D;
* CutMix per strong view with probability 0.5, box area share U(0.02, 0.4) of the patch, aspect
  ratio in (0.3, 1/0.3) (``dataset/transform.py`` ``obtain_cutmix_box``; 3D: a box in three axes,
  see ``networks/mixing.py``); one box per strong view and sample, drawn independently;
* weak view (``weak_view = "geometry"``): nnU-Net's spatial transforms only (random crop, rotation,
  scaling, mirroring), no intensity change, as the authors' weak view (``dataset/acdc.py``:
  ``random_rot_flip``, ``random_rotate`` ±20°, resize to the patch); the pseudo labels and the τ mask
  come from it. ``--set weak_view=nnunet`` adds nnU-Net's intensity augmentation (the earlier default);
* strong view (``strong_view = "authors"``, :func:`~semidiff_nnunet.networks.strong_views.authors_strong_view`),
  drawn twice on the weak view: with p = 0.8 ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` — on grey images
  brightness and contrast ×[0.5, 1.5], together — then with p = 0.5 a Gaussian blur σ ∈ [0.1, 2]
  (``dataset/acdc.py``, ``dataset/transform.py`` ``blur``); no gamma, no noise (``strong_gamma_p``,
  ``strong_noise_p`` switch them on). ``--set strong_view=medical`` is the wider
  ``medical_strong_view`` (the earlier default: gamma, blur σ ∈ [0.5, 1.5] and noise with p = 0.5);
* no EMA teacher: the model being trained predicts the pseudo labels, gradient stopped through them.

Deviations:

* supervised part: nnU-Net's Dice+CE with deep supervision, weights 1 and 1 (the ``supervised``
  baseline's loss), instead of the authors' (CE + their Dice)/2 at one resolution. nnU-Net's CE + Dice
  is twice the authors' mean, so the unlabeled terms are multiplied by ``unlabeled_scale = 2``: the
  ratio of every unlabeled term to the supervised one is the authors' (0.5 : 0.5 : 1 against CE + Dice).
  The authors' global /2 only rescales the learning rate and is dropped (nnU-Net's SGD settings apply);
* the mixed-in patches are the other patches of the same unlabeled batch (sample i takes sample
  (i + k) mod B, k ~ U{1, …, B−1} drawn once per iteration, the same for both strong views) instead of
  a second unlabeled loader: no extra loading, and their weak predictions are the ones the joint
  forward computes anyway. The authors predict the mixed-in batch separately with ``model.eval()``;
  nnU-Net's networks use instance norm and no dropout, so train and eval mode give the same
  prediction. With an unlabeled batch of 1 a patch is mixed with itself (CutMix has no effect);
* one forward for all views instead of the authors' two (labeled ⊕ weak with FP, then the two strong
  views): the same predictions for instance-normalised networks, one pass through DDP;
* the unlabeled terms use the full-resolution output only (no deep supervision);
* the weak view's geometry is nnU-Net's (its rotation and scaling ranges and probabilities, mirroring
  along every axis) rather than the authors' rot90/flip and ±20° rotation; on images the brightness and
  contrast of the strong view act on z-scored intensities (contrast clipped to the patch's range), where
  the authors' act on [0, 255] grey values.

Schedule, mapped onto the engine's policy (``BaseHParams``): the authors train 300 epochs with SGD
(lr 0.01, momentum 0.9, poly decay per iteration) and the unlabeled terms at full weight from the
first iteration, with no ramp. Here nnU-Net's SGD and poly schedule run the training; the unlabeled
terms start after the engine's supervised burn-in (3 % of the run, 100–1000 iterations, at most a
quarter) and then have their full weight at once (no ramp, as the authors: the confidence threshold
already keeps the early, unconfident pseudo labels out).

Under ``torch.compile`` (nnU-Net's default on CUDA) Dynamo ignores a hook added after a module was
traced unless it guards on hooks; the engine switches those guards on for a compiled network,
and ``forward_with_fp`` fails loudly if the perturbed stream is missing from the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.networks.hooks import replaced_output
from semidiff_nnunet.networks.mixing import cutmix_box_mask, paste
from semidiff_nnunet.networks.perturbations import channel_dropout
from semidiff_nnunet.networks.strong_views import authors_strong_view, medical_strong_view
from semidiff_nnunet.training import BaseHParams, SemiSupervisedTrainer, unwrap


@dataclass
class UniMatchHParams(BaseHParams):
    #: confidence threshold τ of the weak pseudo labels (``conf_thresh``)
    threshold: float = 0.95
    #: weights of the two CutMix strong streams and of the feature-perturbation stream
    weight_s1: float = 0.25
    weight_s2: float = 0.25
    weight_fp: float = 0.5
    #: multiplies the three unlabeled weights: 2 keeps the authors' ratio to (CE + Dice)/2 with nnU-Net's CE + Dice
    unlabeled_scale: float = 2.0
    #: channel-dropout probability of the feature perturbation (``nn.Dropout2d(0.5)``)
    fp_dropout: float = 0.5
    #: probability of a CutMix box per strong view and sample
    cutmix_p: float = 0.5
    #: the weak view: nnU-Net's spatial transforms only (the authors': rotation, flips, resize)
    weak_view: Literal["nnunet", "geometry"] = "geometry"
    #: ``authors``: UniMatch's medical strong view (brightness and contrast with p = 0.8, blur σ ∈ [0.1, 2]
    #: with p = 0.5); ``medical``: the wider ``medical_strong_view`` (adds gamma and noise; the earlier default)
    strong_view: Literal["authors", "medical"] = "authors"
    #: ``authors`` view only: probabilities of gamma and of Gaussian noise (off, as the authors)
    strong_gamma_p: float = 0.0
    strong_noise_p: float = 0.0
    #: probability of the brightness/contrast ops (both views; the authors' 0.8)
    strong_probability: float = 0.8
    #: ``medical`` view only: scale of its ranges
    strong_strength: float = 1.0


def masked_dice_loss(logits: Tensor, labels: Tensor, keep: Tensor, smooth: float = 1e-5) -> Tensor:
    """The authors' unlabeled Dice loss (``util/utils.py`` ``DiceLoss`` with ``ignore``), 2D or 3D.

    ``logits`` (B, C, *spatial), ``labels`` (B, *spatial) integer pseudo labels, ``keep`` (B, *spatial)
    bool: the voxels that count. Per class c over the kept voxels of the whole batch,
    1 − (2 Σ p_c t_c + s)/(Σ p_c² + Σ t_c² + s), averaged over all C classes (background included).
    Voxels outside ``keep`` enter no sum: their loss and gradient are zero.
    """
    probs = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(labels.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    k = keep.unsqueeze(1).to(probs.dtype)
    dims = [0, *range(2, probs.dim())]
    intersect = (probs * onehot * k).sum(dims)
    z_sum = (probs * probs * k).sum(dims)
    y_sum = (onehot * k).sum(dims)
    return (1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)).mean()


def perturb_features(features, part: slice, p: float):
    """The encoder's output with channel-dropped copies of samples ``part`` appended to the batch of
    every feature map (a list of skips, or one tensor)."""
    if isinstance(features, (list, tuple)):
        return type(features)(torch.cat([f, channel_dropout(f[part], p)]) for f in features)
    return torch.cat([features, channel_dropout(features[part], p)])


class UniMatchTrainer(SemiSupervisedTrainer):
    hparams_class = UniMatchHParams
    strong_views = 2

    def get_strong_transforms(self):
        hp = self.hp
        if hp.strong_view == "medical":
            return medical_strong_view(hp.strong_strength, hp.strong_probability)
        return authors_strong_view(p=hp.strong_probability, p_gamma=hp.strong_gamma_p, p_noise=hp.strong_noise_p)

    # ------------------------------------------------------------------ the method's pieces
    def forward_with_fp(self, x: Tensor, part: slice):
        """``self.network(x)`` with the feature-perturbed predictions of samples ``part`` appended to
        the batch of the output (every deep-supervision scale): one forward, the FP hook on the
        encoder only during this call."""
        n_fp = len(range(*part.indices(x.shape[0])))
        p = self.hp.fp_dropout
        with replaced_output(unwrap(self.network).encoder, lambda out: perturb_features(out, part, p)):
            out = self.network(x)
        if self.highest_resolution(out).shape[0] != x.shape[0] + n_fp:
            raise SemidiffError(
                "unimatch: the feature-perturbation hook on the network's encoder did not run (a network "
                "compiled before this trainer enabled hook guards?); set nnUNet_compile=false.")
        return out

    @staticmethod
    def mix_source(n: int, device: torch.device | str = "cpu") -> Tensor:
        """For each of ``n`` unlabeled samples, the index of the sample mixed into it: (i + k) mod n
        with one k ~ U{1, …, n−1} (a patch never mixes with itself unless n = 1)."""
        shift = int(torch.randint(1, n, (1,)).item()) if n > 1 else 0
        return ((torch.arange(n) + shift) % n).to(device)

    @staticmethod
    def cutmix(values: Tensor, source: Tensor, box: Tensor) -> Tensor:
        """``values`` (images (B, C, ...) or per-voxel maps (B, ...)) with ``values[source]`` inside ``box``."""
        return paste(values, values[source], box)

    def compute_losses(self, labeled, unlabeled):
        hp = self.hp
        x_l, x_w = labeled["data"], unlabeled["data"]
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        source = self.mix_source(n_u, x_w.device)
        boxes = [cutmix_box_mask(n_u, x_w.shape[2:], hp.cutmix_p, device=x_w.device) for _ in range(2)]
        strong = [self.cutmix(unlabeled[key], source, box)
                  for key, box in zip(("data_strong", "data_strong_2"), boxes)]

        out = self.forward_with_fp(torch.cat([x_l, x_w, *strong]), slice(n_l, n_l + n_u))
        out_l = self.batch_part(out, slice(None, n_l))
        pred_w, pred_s1, pred_s2, pred_fp = self.highest_resolution(out)[n_l:].split(n_u)

        with torch.no_grad():
            conf, label = torch.softmax(pred_w.detach().float(), 1).max(1)
        keep = conf >= hp.threshold
        self.report_pseudo_labels(label, keep)  # the opt-in diagnostic (no effect on training)
        # inside each box: the pseudo label and confidence of the patch pasted there
        mixed = [(self.cutmix(label, source, box), self.cutmix(conf, source, box) >= hp.threshold)
                 for box in boxes]
        w = hp.unlabeled_scale
        return {"supervised": self.supervised_loss(out_l, labeled["target"]),
                "strong_1": w * hp.weight_s1 * masked_dice_loss(pred_s1, *mixed[0]),
                "strong_2": w * hp.weight_s2 * masked_dice_loss(pred_s2, *mixed[1]),
                "feature_perturbation": w * hp.weight_fp * masked_dice_loss(pred_fp, label, keep),
                "_mask_fraction": keep.float().mean(),
                "_cutmix_fraction": torch.cat(boxes).float().mean()}
