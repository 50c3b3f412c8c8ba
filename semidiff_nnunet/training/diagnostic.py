"""The opt-in pseudo-label diagnostic (``--set pseudo_diagnostic=true``): how right are a method's pseudo labels?

With the diagnostic on, the unlabeled stream's dataset also opens the hidden label of each unlabeled
training case (``UnlabeledDataset(oracle=True)``) and its loader crops it with the image's geometry into
``hidden_target``. The engine takes it out of the batch before any method code sees it
(:meth:`DiagnosticMixin.take_hidden_labels`); a method tells the diagnostic what it learns from
(:meth:`DiagnosticMixin.report_pseudo_labels`), and the iteration logs ``_pseudo_accuracy``,
``_pseudo_dice`` and ``_pseudo_coverage`` (logged, never summed into a loss; ``tests/test_leakage_resume.py``
proves training is bit-identical with the hidden labels scrambled). The diagnostic has no stream of its
own: it rides the unlabeled stream.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def pseudo_label_scores(reported: tuple[torch.Tensor, torch.Tensor | None] | None, hidden: torch.Tensor,
                        label_manager) -> dict[str, torch.Tensor]:
    """Accuracy, foreground Dice and coverage of the reported ``(labels, keep)`` against ``hidden`` (B, 1,
    *spatial) labels (voxels without a hidden label, ``-1``, and the ignore label left out); NaN when nothing
    was reported or comparable. ``labels`` (B, *spatial) or (B, 1, *spatial); a method may report a part of
    the batch (the first samples)."""
    nan = torch.tensor(float("nan"))
    if reported is None:
        return {"_pseudo_accuracy": nan, "_pseudo_dice": nan, "_pseudo_coverage": nan}
    labels, keep = reported
    truth = hidden.to(labels.device).long()[:, 0]  # (B, 1, *spatial) → (B, *spatial)
    labels = labels[:, 0] if labels.ndim == truth.ndim + 1 else labels
    keep = keep[:, 0] if keep is not None and keep.ndim == truth.ndim + 1 else keep
    n = min(labels.shape[0], truth.shape[0])
    labels, truth = labels[:n].long(), truth[:n]
    known = truth >= 0
    if label_manager.has_ignore_label:
        known &= truth != label_manager.ignore_label
    used = known if keep is None else known & keep[:n].bool()
    out = {"_pseudo_coverage": (used.sum() / known.sum().clamp_min(1)).float().cpu() if known.any() else nan}
    if not used.any():
        return {**out, "_pseudo_accuracy": nan, "_pseudo_dice": nan}
    right = (labels == truth) & used
    fg_p, fg_t = (labels > 0) & used, (truth > 0) & used
    denom = fg_p.sum() + fg_t.sum()
    dice = (2 * (fg_p & fg_t).sum() / denom).float().cpu() if denom > 0 else nan
    return {**out, "_pseudo_accuracy": (right.sum() / used.sum()).float().cpu(), "_pseudo_dice": dice}


class DiagnosticMixin:
    """The trainer's side of the diagnostic: one report per iteration, scored after the iteration's steps."""

    _reported_pseudo: tuple | None = None

    def report_pseudo_labels(self, labels: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Tell the opt-in pseudo-label diagnostic (``--set pseudo_diagnostic=true``) the pseudo labels this
        step learns from: ``labels`` (B, *spatial) class indices for the unlabeled batch's patches, in the
        order and geometry of ``unlabeled["data"]``; ``keep`` (same shape, bool) the voxels the loss uses
        (a confidence mask), None for all. A no-op unless the diagnostic is on; never changes training."""
        if self.hp.pseudo_diagnostic:
            self._reported_pseudo = (labels.detach(), None if keep is None else keep.detach())

    def take_hidden_labels(self, unlabeled: dict | None) -> torch.Tensor | None:
        """Remove the diagnostic's hidden labels from the unlabeled batch (before any method code sees it)
        and forget the previous iteration's report; the hidden labels, or None."""
        self._reported_pseudo = None
        return unlabeled.pop("hidden_target", None) if unlabeled is not None else None

    def _pseudo_label_diagnostic(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The iteration's diagnostic terms (:func:`pseudo_label_scores` of this iteration's report)."""
        return pseudo_label_scores(getattr(self, "_reported_pseudo", None), hidden, self.label_manager)
