"""What a method declares and the engine runs: training phases and optimisation steps.

A method never overrides the training loop. It says, as class attributes or small methods of
its trainer (see ``SemiSupervisedTrainer``):

* ``phases = (Phase("pretrain", share=0.3), Phase("co-training"))``: ordered stages of one run.
  The engine runs them in order, calls ``on_phase_start(phase)`` when a phase begins (also when a
  resumed run continues inside it), shows the phase in the progress bar and in ``progress.png``;
  ``--set phase.pretrain=0.2`` (a share) or ``--set phase.pretrain=40`` (epochs) overrides a length.
* ``optimisation_steps()``: one or more :class:`OptimStep` per iteration, each with its own losses
  and networks; the engine does zero-grad, AMP, backward through the grad scaler, clipping and the
  optimiser steps. The default is one step, ``compute_losses``, over every trainable network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.run_config import parse_phase_length


@dataclass(frozen=True)
class Phase:
    """One stage of a run. Length: ``share`` of the run's epochs, or ``epochs``; a phase with
    neither takes what the others leave (at most one such phase, usually the last)."""

    name: str
    share: float | None = None
    epochs: int | None = None
    summary: str = ""
    #: the phase reads no label (e.g. SuperDiffusion's pretraining): the labeled loader then crops
    #: uniformly at random instead of nnU-Net's foreground oversampling, so not even where its
    #: patches are cut depends on a label
    label_free: bool = False
    #: keep the main network's weights at this phase's best validation score (nnU-Net's EMA pseudo
    #: Dice, the value that selects ``checkpoint_best.pth``, compared within the phase only) for a later
    #: phase to start from: ``SemiSupervisedTrainer.phase_best(name)`` (BCP's self-training starts from
    #: its best pre-training checkpoint); checkpointed, so a resumed run selects the same weights
    select_best: bool = False
    #: the phase only warms up what a trained network already holds (BCP's supervised pre-training): a
    #: run that starts from ``--pretrained-weights`` skips it (0 epochs) unless its length is set with
    #: ``--set phase.NAME=...`` or ``warmup_from_pretrained`` is on
    warmup: bool = False


@dataclass(frozen=True)
class PhaseSpan:
    phase: Phase
    start: int  # first epoch (inclusive)
    end: int  # last epoch (exclusive)

    @property
    def name(self) -> str:
        return self.phase.name

    def __len__(self) -> int:
        return self.end - self.start


def resolve_phases(declared: Sequence[Phase], overrides: dict[str, str], num_epochs: int,
                   skip_warmup: bool = False) -> list[PhaseSpan]:
    """Epoch spans of the declared phases for a run of ``num_epochs`` epochs (overrides applied).

    Shares are rounded to whole epochs; the phase without a length takes the rest. A run too short
    for its fixed phases is an error naming the phase, not a silently empty phase. With
    ``skip_warmup`` (a trained start) every ``warmup`` phase whose length is not overridden gets 0
    epochs (an empty span: it never becomes active).
    """
    if not declared:
        return [PhaseSpan(Phase("training"), 0, num_epochs)]
    phases = []
    for p in declared:
        if p.name in overrides:
            share, epochs = parse_phase_length(p.name, overrides[p.name])
            p = dataclasses.replace(p, share=share, epochs=epochs)
        elif skip_warmup and p.warmup:
            p = dataclasses.replace(p, share=None, epochs=0)
        phases.append(p)
    open_ended = [p.name for p in phases if p.share is None and p.epochs is None]
    if len(open_ended) > 1:
        raise SemidiffError(f"Phases {', '.join(open_ended)} all have no length; give all but one a length "
                            f"with --set phase.NAME=share or epochs.")
    fixed = {p.name: (p.epochs if p.epochs is not None else int(round(p.share * num_epochs)))
             for p in phases if p.name not in open_ended}
    rest = num_epochs - sum(fixed.values())
    if rest < 0 or (open_ended and rest == 0 and num_epochs > 0):
        raise SemidiffError(f"The run has {num_epochs} epochs, too few for its phases ("
                            + ", ".join(f"{k}: {v}" for k, v in fixed.items())
                            + (f", {open_ended[0]}: the rest" if open_ended else "")
                            + "); train longer with --epochs or shorten a phase with --set phase.NAME=...")
    spans, start = [], 0
    for p in phases:
        n = rest if p.name in open_ended else fixed[p.name]
        spans.append(PhaseSpan(p, start, start + n))
        start += n
    if start != num_epochs:  # shares that do not add up to the run: the last phase absorbs the rounding
        last = spans[-1]
        spans[-1] = PhaseSpan(last.phase, last.start, num_epochs)
    return spans


class PhaseBest:
    """The best weights of one phase (``Phase.select_best``): the network's ``state_dict`` (on the CPU) at
    the epoch whose validation score was the highest of the phase so far. Non-finite scores (no
    validation ran) never count, so with validation off nothing is kept and ``weights`` stays None."""

    def __init__(self):
        self.score: float | None = None
        self.epoch: int | None = None
        self.weights: dict | None = None

    def offer(self, score: float, epoch: int, state_dict: Callable[[], dict]) -> bool:
        """Keep ``state_dict()`` if ``score`` beats the phase's best; whether it did."""
        if score != score or score in (float("inf"), float("-inf")):
            return False
        if self.score is not None and score <= self.score:
            return False
        self.score, self.epoch = float(score), int(epoch)
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.epoch, self.weights = state["score"], state["epoch"], state["weights"]


@dataclass(frozen=True)
class OptimStep:
    """One optimisation step of an iteration.

    ``compute(labeled, unlabeled, carry) -> dict[str, Tensor]``: the step's loss terms (keys with a
    leading ``_`` are logged, not minimised). ``carry`` is a dict that lives for one iteration: an
    earlier step may leave tensors in it for a later one (DiffRect's rectified supervision uses
    the pseudo labels of the main step). ``networks``: names of the networks this step updates
    (``"network"`` is nnU-Net's; others come from ``register_network``); ``None`` = every trainable
    network. ``active() -> bool``: whether the step runs in this iteration (default: always);
    ``phases``: the phases in which it runs (default: all).
    """

    name: str
    compute: Callable[..., dict]
    networks: tuple[str, ...] | None = None
    active: Callable[[], bool] | None = None
    phases: tuple[str, ...] | None = None
