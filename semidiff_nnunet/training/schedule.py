"""The engine's schedule: which phase an epoch belongs to, and when and how unlabeled losses start.

One policy for every method (see the README's "schedule policy"): a supervised burn-in (labeled data
only, no unlabeled batch is drawn: ``burnin`` × run within [``burnin_min``, ``burnin_max``], at most a
quarter of the run), then ramps in iterations (``rampup_min``..``rampup_max``) so a short run and a
nnU-Net-length run both behave. Phases (:class:`~.declarations.Phase`) split the run's epochs; a phase
declared ``select_best`` keeps its best weights by nnU-Net's EMA pseudo Dice.
"""

from __future__ import annotations

from semidiff_nnunet.training import ramps
from semidiff_nnunet.training.declarations import PhaseBest, PhaseSpan
from semidiff_nnunet.training.ema import unwrap


class ScheduleMixin:
    """Phases, the burn-in and the ramps of unlabeled loss weights, in iterations (``self.iteration``)."""

    # ------------------------------------------------------------------ phases
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    @property
    def current_phase(self) -> PhaseSpan:
        """The phase the current epoch belongs to."""
        for span in self.phase_spans:
            if span.start <= self.current_epoch < span.end:
                return span
        return self.phase_spans[-1]

    def _enter_phase_of_current_epoch(self) -> None:
        span = self.current_phase
        if span.name == self._active_phase:
            return
        self._active_phase = span.name
        if self.phases:
            self.print_to_log_file(f"phase {span.name!r}: epochs {span.start}-{span.end - 1}")
        self._restarted = set()
        self.on_phase_start(span)

    def phase_best(self, name: str) -> PhaseBest:
        """What phase ``name`` (declared with ``select_best=True``) kept: ``weights`` (a state dict of the
        main network, None when no validation score was seen), ``score`` and ``epoch``."""
        return self.method_states[f"phase_best/{name}"]

    def _offer_phase_best(self) -> None:
        """At the end of an epoch of a ``select_best`` phase: keep the main network if its EMA pseudo Dice
        is the phase's best so far (before nnU-Net writes the checkpoints, so they hold it)."""
        span = self.current_phase
        if span.phase.select_best:
            score = float(self.logger.get_value("ema_fg_dice", step=-1))
            if self.phase_best(span.name).offer(score, self.current_epoch, unwrap(self.network).state_dict):
                self.print_to_log_file(f"phase {span.name!r}: best so far at epoch {self.current_epoch} "
                                       f"(EMA pseudo Dice {score:.4f})", also_print_to_console=False)

    # ------------------------------------------------------------------ the burn-in and the ramps
    @property
    def burnin_iterations(self) -> int:
        """Iterations of supervised burn-in: ``burnin`` × run within [burnin_min, burnin_max], at most
        a quarter of the run (0 for methods that use no unlabeled data, and for a trained start: see
        :attr:`trained_start`)."""
        if not self.uses_unlabeled or self.trained_start:
            return 0
        hp = self.hp
        n = min(max(int(round(hp.burnin * self.total_iterations)), hp.burnin_min), hp.burnin_max)
        return max(0, min(n, self.total_iterations // 4))

    @property
    def trained_start(self) -> bool:
        """The run starts from ``--pretrained-weights`` and ``warmup_from_pretrained`` is off: what only warms
        up a network the checkpoint already holds trained — the supervised burn-in and the phases
        declared ``Phase(warmup=True)`` (BCP's pre-training) — is skipped. Phases that train what the
        checkpoint lacks (SuperDiffusion's diffusion pathways, SemiGDA's alignment) still run."""
        return bool(self.run_config.pretrained_weights) and not self.hp.warmup_from_pretrained

    @property
    def in_burnin(self) -> bool:
        return self.iteration < self.burnin_iterations

    def ramp_length(self, fraction: float = 1.0) -> int:
        """Iterations of a ramp-up of ``fraction`` × run: within [rampup_min, rampup_max], capped by
        the iterations left after the burn-in."""
        hp = self.hp
        n = min(max(int(round(fraction * self.total_iterations)), hp.rampup_min), hp.rampup_max)
        return max(0, min(n, self.total_iterations - self.burnin_iterations))

    def ramp(self, max_weight: float, fraction: float = 1.0, kind: str = "sigmoid") -> float:
        """An unlabeled loss weight: 0 during the burn-in, then ``max_weight`` × a ramp-up
        (``ramps.rampup``) over ``ramp_length(fraction)`` iterations, ``max_weight`` after; ``max_weight``
        throughout for a trained start with ``rampup_from_pretrained`` off."""
        if self.in_burnin:
            return 0.0
        if self.trained_start and not self.hp.rampup_from_pretrained:
            return max_weight
        return max_weight * ramps.rampup(kind, self.iteration - self.burnin_iterations, self.ramp_length(fraction))
