import math
from dataclasses import dataclass

import pytest
import torch

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import EMA, BaseHParams, ramps
from semidiff_nnunet.training.hparams import parse_overrides, resolve_hparams


def test_ramps_closed_forms():
    assert ramps.sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert ramps.sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert ramps.sigmoid_rampup(100, 100) == 1.0 and ramps.sigmoid_rampup(500, 100) == 1.0
    assert ramps.gaussian_rampup(50, 100, scale=2) == pytest.approx(2 * math.exp(-1.25))
    assert ramps.linear_rampup(25, 100) == 0.25 and ramps.linear_rampup(-3, 100) == 0.0
    assert ramps.cosine_rampdown(0, 10) == 1.0 and ramps.cosine_rampdown(10, 10) == pytest.approx(0.0)
    assert ramps.rampup("linear", 5, 10) == 0.5
    with pytest.raises(ValueError):
        ramps.rampup("cubic", 1, 2)


def test_ema_update_matches_formula_and_round_trips():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(student, decay=0.9)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(7.0)
    ema.update(student, step=0)  # alpha = min(1 - 1/1, 0.9) = 0: copy
    for e, s in zip(ema.module.parameters(), student.parameters()):
        assert torch.equal(e, s)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(student, step=100)  # alpha = 0.9
    for e, s, b in zip(ema.module.parameters(), student.parameters(), before):
        expected = 0.9 * (b + 1.0) + 0.1 * s
        assert torch.allclose(e, expected)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 7.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
    other = EMA(student, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 2
    for a, b in zip(other.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)


@dataclass
class _HP(BaseHParams):
    weight: float = 0.1
    steps: int = 3
    flag: bool = False
    name: str = "x"


def test_hparams_overrides_typed_and_checked():
    hp = resolve_hparams(_HP, parse_overrides(["weight=0.5", "steps=7", "flag=true", "name=abc"]))
    assert (hp.weight, hp.steps, hp.flag, hp.name) == (0.5, 7, True, "abc")
    assert resolve_hparams(_HP).weight == 0.1
    with pytest.raises(SemidiffError, match="Did you mean weight"):
        resolve_hparams(_HP, {"wieght": "1"})
    with pytest.raises(SemidiffError, match="int"):
        resolve_hparams(_HP, {"steps": "many"})
    with pytest.raises(SemidiffError, match="key=value"):
        parse_overrides(["weight"])
