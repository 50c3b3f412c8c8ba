"""``bcp``: bidirectional copy-paste, Bai, Chen, Li, Zhao, Shen, "Bidirectional Copy-Paste for
Semi-Supervised Medical Image Segmentation", CVPR 2023 (code: DeepMed-Lab-ECNU/BCP,
``code/ACDC_BCP_train.py`` for 2D, ``code/LA_BCP_train.py`` with ``code/LA&ACDC/utils/BCP_utils.py``
for 3D).

Two phases (the engine's :class:`~semidiff_nnunet.training.Phase`):

* ``pretrain`` — labeled patches only. The labeled batch is split in halves a and b; a box from
  b is pasted into a (one box, 2/3 of every side of the patch), the labels are mixed by the same
  box, and the student learns the mixed image with nnU-Net's Dice+CE (deep supervision included).
* ``selftrain`` — mean-teacher self-training. Student and teacher (an EMA of the student) start
  from the pre-training weights with the best validation score (see ``selftrain_start``). Each step the teacher labels the unlabeled
  patches (argmax of its softmax, then per class the largest connected component); the labeled
  and the unlabeled batches are split in halves and mixed both ways with one box:

  - *labeled into unlabeled*: the box from labeled patch a, the rest from unlabeled patch a;
  - *unlabeled into labeled*: the box from unlabeled patch b, the rest from labeled patch b
    (as the ACDC script; the LA script pairs the halves the other way round, which is the same);

  each mixed image's target is the ground truth where the labeled patch shows and the teacher's
  pseudo label where the unlabeled one shows. The loss of each mixed image is the authors'
  ``mix_loss``: Dice+CE restricted to the labeled region with weight 1 plus Dice+CE restricted to
  the unlabeled region with weight α. The teacher follows the student after every step,
  θ' ← 0.99 θ' + 0.01 θ.

Terms (curves): ``pretrain`` (phase 1); ``mixed_labeled`` (the labeled regions of both mixed
images) and ``mixed_unlabeled`` (α × their pseudo-labeled regions), logged ``_pseudo_foreground``
(share of foreground voxels in the pseudo labels) (phase 2). The loss never sees a hidden label:
only ``labeled["target"]`` and the teacher's predictions.

Defaults, from the authors' code (both scripts unless said):

* α = ``alpha = 0.5`` (``--u_weight 0.5``): in ``mix_loss(..., u_weight, unlab)`` the region that
  comes from the unlabeled image gets ``u_weight`` and the labeled region 1, in both directions
  (ACDC: ``mix_loss(out_unl, plab_a, lab_a, loss_mask, u_weight, unlab=True)`` weights the
  outside-the-box pseudo labels by α; ``mix_loss(out_l, lab_b, plab_b, loss_mask, u_weight)``
  weights the in-box pseudo labels by α);
* ``box_fraction = 2/3`` of every side (ACDC ``generate_mask``: ``int(img_x*2/3)``; LA
  ``--mask_ratio 2/3`` on each of the three axes); one box for the whole batch and both directions
  (``shared_box = True``: their ``img_mask`` is drawn once per iteration);
* ``ema_decay = 0.99`` without warm-up (``update_model_ema(model, ema_model, 0.99)``), updated after
  every student step of phase 2;
* ``largest_component = True``: the pseudo labels keep, per sample and per foreground class, the
  largest connected component (full connectivity, as ``skimage.measure.label``); voxels of other
  components become background (ACDC ``get_ACDC_masks(..., nms=1)``, LA ``get_cut_mask(...,
  nms=1)``); computed on the CPU with ``scipy.ndimage.label``; ``--set largest_component=false``
  uses the plain argmax;
* pre-training mixes the two labeled halves with weight 1 everywhere (ACDC ``u_weight=1.0``, LA a
  plain Dice+CE of the mixed image and mixed label — what nnU-Net's loss does here);
* unlabeled batch = labeled batch (``labeled_bs`` is half of ``batch_size`` in both scripts;
  ``unlabeled_batch_size = 0`` means the plans' batch size).

Deviations:

* nnU-Net's network, augmentation, SGD, poly LR and Dice+CE (its soft Dice without background and
  CE, weights 1 and 1) instead of the authors' U-Net/V-Net and their Dice (with background) + CE;
  the authors' overall factor 1/2, ``(Dice + CE) / 2``, is dropped so that a step has the loss
  scale of nnU-Net's supervised step. A region loss is nnU-Net's loss with a loss mask: the soft
  Dice with nnU-Net's ``loss_mask`` and the CE averaged over the region (exactly nnU-Net's Dice+CE
  on a target whose other region is its ignore label);
* deep supervision on the mixed images: the targets and regions at every scale are the
  full-resolution ones downsampled as nnU-Net downsamples labels (nearest-exact to the sizes of
  its target list), so the ground-truth part equals ``labeled["target"]`` at every scale;
* the box side is ``round(fraction · side)`` (theirs ``int``), its start uniform in
  [0, side − box] (theirs ``randint(0, side − box)``, never touching the far edge) — the shared
  :func:`~semidiff_nnunet.networks.mixing.random_box_mask`;
* halves of a batch: ``h = n // 2`` pairs per direction with n = min(labeled, unlabeled batch) (the
  authors' ``int(labeled_bs/2)``); with an odd n the last patch is not used; with n = 1 the one
  labeled and the one unlabeled patch are mixed in both directions (pre-training: the unmixed patch);
* selection between the phases (``selftrain_start = "best"``): the teacher and the student start
  from the pre-training weights with the best validation score, as the authors'
  ``*_best_model.pth`` — but the score is nnU-Net's EMA pseudo Dice on validation patches at the end
  of each epoch (what selects nnU-Net's ``checkpoint_best.pth``), not the authors' full-image Dice
  every 200 iterations; with validation off the last pre-training weights are used (logged);
* learning rate (``phase_lr = "phase"``): each phase gets a fresh SGD (nnU-Net's: momentum 0.99,
  Nesterov, weight decay 3·10⁻⁵) with nnU-Net's poly schedule from its initial rate 0.01 over that
  phase only (the engine's ``restart_optimizer``). The authors keep the rate at 0.01 throughout on
  ACDC (their SGD momentum 0.9, weight decay 10⁻⁴; the self-training optimiser loads the pre-training
  one's state) and decay it ×0.1 every 2 500 self-training iterations on LA (a fresh optimiser). Both
  their phases start at 0.01, as here; the poly decay inside each phase is nnU-Net's (a pre-training
  that ends converged, selected on validation, and a self-training whose final weights are
  converged), where theirs rely on selecting the best iteration;
* the teacher's parameters are averaged, its buffers copied (the ACDC code averages the whole
  ``state_dict``; nnU-Net's instance norms have no running statistics, so nothing differs);
* any number of classes (the authors hard-code 4 on ACDC, and threshold 0.5 on the foreground of
  2 on LA, which is the argmax); ignore-label voxels of the ground truth are left out of the loss;
  region-based training (nnU-Net ``regions_class_order``) is not supported (pseudo labels are an
  argmax).

The student predicts at inference (the authors evaluate ``model``); it is the plain planned
network, so stock ``nnUNetv2_predict`` loads the run.

Schedule, mapped onto the engine's policy: the authors pre-train ACDC for ``--pre_iterations
10000`` and self-train ``--max_iterations 30000`` (``pre_train`` loops to ``pre_iterations``; a
pre-training share of 0.25 of the total), LA ``--pre_max_iteration 2000`` and
``--self_max_iteration 15000`` (0.12). The
default is ``pretrain`` = 0.25 of the run (``--set phase.pretrain=0.12`` for LA's ratio, or a number
of epochs like ``--set phase.pretrain=40``), the rest ``selftrain``. The pre-training phase *is* the
engine's supervised burn-in: no unlabeled batch is drawn and the engine runs
``burnin_losses``, which here is the copy-paste pre-training loss. So BCP's defaults set the
engine's own burn-in to zero (``burnin = 0``, ``burnin_min = 0``): ``burnin_iterations`` is the
pre-training phase's iterations, or the engine's burn-in rule if a ``--set burnin=...`` asks for more.
BCP has no ramp-up (the authors compute a consistency weight but never use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.losses.consistency import largest_components
from semidiff_nnunet.networks.mixing import paste, random_box_mask
from semidiff_nnunet.training import EMA, BaseHParams, Phase, SemiSupervisedTrainer, unwrap

PRETRAIN, SELFTRAIN = "pretrain", "selftrain"


@dataclass
class BCPHParams(BaseHParams):
    """BCP's settings (see the module docstring for their sources).

    alpha: weight of the loss on the region of a mixed image that comes from the unlabeled patch
        (the authors' ``u_weight``); the labeled region has weight 1.
    box_fraction: side of the pasted box as a share of each side of the patch (2D and 3D).
    shared_box: one box for the whole batch (the authors') instead of one per pair.
    ema_decay: the teacher's EMA decay (no warm-up).
    largest_component: keep only the largest connected component per class in the pseudo labels.
    selftrain_start: ``best``, student and teacher start self-training from the pre-training phase's
        best weights on validation (the authors' ``*_best_model.pth``); ``last``, from the last
        pre-training step (the earlier default).
    phase_lr: ``phase``, each phase a fresh SGD with nnU-Net's poly schedule over the phase only;
        ``run``, one optimiser and one poly schedule over the whole run (the earlier default).
    """

    alpha: float = 0.5
    box_fraction: float = 2 / 3
    shared_box: bool = True
    ema_decay: float = 0.99
    largest_component: bool = True
    selftrain_start: Literal["best", "last"] = "best"
    phase_lr: Literal["phase", "run"] = "phase"
    # the pre-training phase is the burn-in (see "Schedule" above)
    burnin: float = 0.0
    burnin_min: int = 0


# ---------------------------------------------------------------------------------------------- pure ops
def as_list(x) -> list:
    """A deep-supervision list as is; one tensor as a one-element list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def resize_nearest(x: Tensor, size) -> Tensor:
    """``x`` (B, 1, *spatial) at ``size`` the way nnU-Net downsamples labels for deep supervision
    (``DownsampleSegForDSTransform``: nearest-exact interpolation), dtype kept."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="nearest-exact").to(x.dtype)


@dataclass
class MixedBatch:
    """One copy-paste mix: ``image`` (B, C, *spatial); ``targets`` and ``from_labeled`` (bool: the
    voxel comes from the labeled patch) per deep-supervision scale, (B, 1, *spatial_s)."""

    image: Tensor
    targets: list[Tensor]
    from_labeled: list[Tensor]


def copy_paste(x_bg: Tensor, t_bg: list[Tensor], x_fg: Tensor, t_fg: list[Tensor], box: Tensor,
               labeled_fg: bool) -> MixedBatch:
    """The box (B, 1, *spatial), bool) from the foreground patches pasted into the background
    patches, the targets mixed by the same box at every scale (the box resized as labels are).
    ``labeled_fg``: whether the foreground (else the background) patches are the labeled ones."""
    targets, from_labeled = [], []
    for bg, fg in zip(t_bg, t_fg):
        box_s = resize_nearest(box, bg.shape[2:])
        targets.append(paste(bg, fg, box_s))
        from_labeled.append(box_s if labeled_fg else ~box_s)
    return MixedBatch(paste(x_bg, x_fg, box), targets, from_labeled)


def bidirectional_copy_paste(x_l: Tensor, t_l: list[Tensor], x_u: Tensor, t_u: list[Tensor], box: Tensor,
                             a: slice, b: slice) -> tuple[MixedBatch, MixedBatch]:
    """BCP's two mixed batches: the labeled box into the unlabeled patches (pairs ``a``) and the
    unlabeled box into the labeled patches (pairs ``b``), one ``box`` for both. ``t_l`` the ground
    truth and ``t_u`` the pseudo labels, per deep-supervision scale."""
    into_unlabeled = copy_paste(x_u[a], [t[a] for t in t_u], x_l[a], [t[a] for t in t_l], box, labeled_fg=True)
    into_labeled = copy_paste(x_l[b], [t[b] for t in t_l], x_u[b], [t[b] for t in t_u], box, labeled_fg=False)
    return into_unlabeled, into_labeled


def halves(n: int) -> tuple[slice, slice]:
    """The pairs of the two halves of a batch of ``n``: the first ``n // 2`` and the next ``n // 2``
    patches (an odd last one unused); with n = 1 the one patch in both."""
    if n < 1:
        raise ValueError("BCP needs at least one patch per batch")
    if n == 1:
        return slice(0, 1), slice(0, 1)
    h = n // 2
    return slice(0, h), slice(h, 2 * h)


# ---------------------------------------------------------------------------------------------- trainer
class BCPTrainer(SemiSupervisedTrainer):
    """BCP. ``--pretrained-weights`` initialises the student, and so the teacher copied from it."""

    hparams_class = BCPHParams
    phases = (Phase(PRETRAIN, share=0.25, summary="copy-paste between labeled patches, labeled data only",
                    select_best=True, warmup=True),
              Phase(SELFTRAIN, summary="bidirectional copy-paste with the EMA teacher's pseudo labels"))

    def on_phase_start(self, phase):
        """``phase_lr = "phase"``: each phase its own SGD and poly schedule from nnU-Net's initial rate."""
        if self.hp.phase_lr == "phase":
            self.restart_optimizer("network")

    def build_method(self):
        if self.label_manager.has_regions:
            raise SemidiffError("bcp needs label maps with one class per voxel; this dataset trains regions "
                                "(regions_class_order in dataset.json), which BCP's argmax pseudo labels do not give.")
        # the teacher becomes the pre-trained student at the first self-training step (start_teacher)
        self.teacher = self.register_state("teacher", EMA(self.network, self.hp.ema_decay, warmup=False).to(self.device))

    # ------------------------------------------------------------------ schedule
    @property
    def burnin_iterations(self) -> int:
        """The pre-training phase (labeled data only, ``burnin_losses``), or the engine's burn-in
        rule if that asks for more."""
        span = next(s for s in self.phase_spans if s.name == PRETRAIN)
        return max(span.end * self.num_iterations_per_epoch, super().burnin_iterations)

    # ------------------------------------------------------------------ pieces
    def draw_box(self, n: int, spatial) -> Tensor:
        """The copy-paste box of one iteration, (n, 1, *spatial) bool, True where the pasted patch shows."""
        return random_box_mask(n, spatial, self.hp.box_fraction, shared=self.hp.shared_box, device=self.device)

    @torch.no_grad()
    def pseudo_labels(self, x_u: Tensor) -> Tensor:
        """The teacher's hard labels (B, 1, *spatial) for unlabeled patches."""
        logits = self.highest_resolution(self.teacher.module(x_u))
        seg = logits.argmax(1)
        if self.hp.largest_component:
            seg = largest_components(seg, logits.shape[1])
        return seg[:, None]

    def start_teacher(self) -> None:
        """Once, at the first self-training step: with ``selftrain_start = "best"`` load the pre-training
        phase's best weights on validation into the student, then make the teacher the student. Done
        here, not in ``on_phase_start``: a run resumed at the phase boundary enters the phase before the
        student's weights are restored; its teacher has had no update yet and starts the same way."""
        if self.teacher.num_updates != 0:
            return
        if self.hp.selftrain_start == "best":
            best = self.phase_best(PRETRAIN)
            if best.weights is None:
                self.print_to_log_file("bcp: self-training starts from the network as it is (pre-training "
                                       "skipped for --pretrained-weights, or no validation score in it)")
            else:
                unwrap(self.network).load_state_dict(best.weights)
                self.print_to_log_file(f"bcp: self-training starts from pre-training epoch {best.epoch} "
                                       f"(EMA pseudo Dice {best.score:.4f} on validation)")
        self.teacher.module.load_state_dict(unwrap(self.network).state_dict())

    def region_loss(self, output, targets: list[Tensor], regions: list[Tensor]) -> Tensor:
        """nnU-Net's Dice+CE (its weights, deep-supervision weights and soft Dice) restricted to
        ``regions`` (bool, per scale): soft Dice with nnU-Net's ``loss_mask``, CE averaged over the
        region; ground-truth voxels with the ignore label are left out."""
        inner = getattr(self.loss, "loss", self.loss)
        weights = getattr(self.loss, "weight_factors", None) or (1.0,)
        ignore = self.label_manager.ignore_label
        total = 0.0
        for w, out, target, region in zip(weights, as_list(output), targets, regions):
            if w == 0:
                continue
            if ignore is not None:
                region = region & (target != ignore)
                target = torch.where(target == ignore, torch.zeros_like(target), target)
            term = 0.0
            if inner.weight_dice != 0:
                term = term + inner.weight_dice * inner.dc(out, target, loss_mask=region)
            if inner.weight_ce != 0:
                ce = F.cross_entropy(out, target[:, 0].long(), reduction="none")
                term = term + inner.weight_ce * (ce * region[:, 0]).sum() / region.sum().clamp_min(1e-8)
            total = total + w * term
        return total

    # ------------------------------------------------------------------ losses
    def burnin_losses(self, labeled):
        """Pre-training (every burn-in iteration): a box of labeled half b pasted into labeled half a,
        nnU-Net's Dice+CE on the mixed image and mixed labels."""
        x, targets = labeled["data"], as_list(labeled["target"])
        a, b = halves(x.shape[0])
        box = self.draw_box(a.stop - a.start, x.shape[2:])
        mixed = copy_paste(x[a], [t[a] for t in targets], x[b], [t[b] for t in targets], box, labeled_fg=True)
        target = mixed.targets if isinstance(labeled["target"], (list, tuple)) else mixed.targets[0]
        return {PRETRAIN: self.supervised_loss(self.network(mixed.image), target)}

    def compute_losses(self, labeled, unlabeled):
        """Self-training: the two mixed batches, each with weight 1 on its labeled and α on its
        pseudo-labeled region."""
        self.start_teacher()
        x_l, x_u = labeled["data"], unlabeled["data"]
        t_l = as_list(labeled["target"])
        n = min(x_l.shape[0], x_u.shape[0])
        a, b = halves(n)
        used = slice(0, max(a.stop, b.stop))
        pseudo = self.pseudo_labels(x_u[used])
        self.report_pseudo_labels(pseudo)  # the opt-in diagnostic (no effect on training)
        t_u = [resize_nearest(pseudo, t.shape[2:]) for t in t_l]
        box = self.draw_box(a.stop - a.start, x_l.shape[2:])
        into_unlabeled, into_labeled = bidirectional_copy_paste(x_l, t_l, x_u[used], t_u, box, a, b)
        out_1, out_2 = self.joint_forward(self.network, into_unlabeled.image, into_labeled.image)
        labeled_part = (self.region_loss(out_1, into_unlabeled.targets, into_unlabeled.from_labeled)
                        + self.region_loss(out_2, into_labeled.targets, into_labeled.from_labeled))
        unlabeled_part = (self.region_loss(out_1, into_unlabeled.targets, [~m for m in into_unlabeled.from_labeled])
                          + self.region_loss(out_2, into_labeled.targets, [~m for m in into_labeled.from_labeled]))
        return {"mixed_labeled": labeled_part,
                "mixed_unlabeled": self.hp.alpha * unlabeled_part,
                "_pseudo_foreground": (pseudo > 0).float().mean()}

    def after_step(self):
        if not self.in_burnin:  # the teacher is used (and follows the student) in self-training only
            self.teacher.update(self.network)
