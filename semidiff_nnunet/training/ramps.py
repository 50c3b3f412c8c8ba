"""Ramp-up schedules for unsupervised loss weights, as functions of progress ``t`` in iterations.

All return a float in [0, 1]; multiply by the method's maximal weight.
"""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t/L)^2) (Laine & Aila 2017; SSL4MIS ``ramps.sigmoid_rampup``); 1 after ``length``."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def gaussian_rampup(current: float, length: float, scale: float = 1.0) -> float:
    """``scale`` · exp(-5 (1 - t/L)^2); Diff-CL's λ(t) = 2·exp(-5(1 - t/t_max)^2) is ``scale=2``."""
    return scale * sigmoid_rampup(current, length)


def linear_rampup(current: float, length: float) -> float:
    """t / L clipped to [0, 1] (SSL4MIS ``ramps.linear_rampup``)."""
    if length <= 0:
        return 1.0
    return float(min(max(current, 0.0), length) / length)


def cosine_rampdown(current: float, length: float) -> float:
    """0.5 (cos(π t / L) + 1) (SSL4MIS ``ramps.cosine_rampdown``)."""
    current = min(max(current, 0.0), length)
    return float(0.5 * (math.cos(math.pi * current / length) + 1))


RAMPS = {"sigmoid": sigmoid_rampup, "gaussian": gaussian_rampup, "linear": linear_rampup}


def rampup(kind: str, current: float, length: float) -> float:
    try:
        return RAMPS[kind](current, length)
    except KeyError:
        raise ValueError(f"unknown ramp {kind!r}; choose one of {', '.join(RAMPS)}") from None
