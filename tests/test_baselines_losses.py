"""Losses of the classic baselines: the loss functions on small tensors with hand-computed answers,
then each method's real trainer (built on nnU-Net's plans of the tiny demo datasets) on fixed
batches: its loss terms recomputed by hand from its networks' outputs, gradient flow, EMA updates.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semidiff_nnunet.losses.consistency import (
    cross_pseudo_supervision,
    entropy_loss,
    entropy_map,
    fixmatch_loss,
    uamt_threshold,
    uncertainty_masked_mse,
    urpc_loss,
)
from semidiff_nnunet.networks.perturbations import (
    channel_dropout,
    feature_dropout,
    feature_noise,
    get_perturbation,
)
from semidiff_nnunet.training import ramps


def _logits(*pixels) -> torch.Tensor:
    """(1, C, 1, P) logits from per-pixel class logits."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels)).contiguous()


# ---------------------------------------------------------------------------------------------- CPS
def test_cps_equals_ce_with_the_other_networks_argmax_and_is_symmetric():
    a = _logits((2, 0), (0, 1)).requires_grad_()   # argmax a = [0, 1]
    b = _logits((0, 3), (1, 0)).requires_grad_()   # argmax b = [1, 0]
    loss_a, loss_b = cross_pseudo_supervision(a, b)
    assert loss_a.item() == pytest.approx((math.log(math.e ** 2 + 1) + math.log(1 + math.e)) / 2, rel=1e-6)
    assert loss_b.item() == pytest.approx((math.log(1 + math.e ** 3) + math.log(math.e + 1)) / 2, rel=1e-6)
    swapped = cross_pseudo_supervision(b, a)
    assert swapped[0].item() == pytest.approx(loss_b.item()) and swapped[1].item() == pytest.approx(loss_a.item())
    # each loss trains only its own network: the pseudo labels are constants
    loss_a.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is None


# ---------------------------------------------------------------------------------------------- FixMatch
def test_fixmatch_masks_exactly_the_confident_pixels():
    conf1 = [0.99, 0.90, 0.96, 0.02]  # p(class 1) on the weak view: confidences .99 .90 .96 .98
    weak = _logits(*[(0.0, math.log(p / (1 - p))) for p in conf1]).requires_grad_()
    strong = _logits((0, 0), (1, 0), (0, 2), (3, 0)).requires_grad_()
    loss, mask = fixmatch_loss(strong, weak, 0.95)
    assert mask.flatten().tolist() == [1, 0, 1, 1]
    expected = (math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 4  # mean over all 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert weak.grad is None                                  # pseudo labels carry no gradient
    assert strong.grad[..., 1].abs().sum() == 0               # the unconfident pixel contributes nothing
    assert strong.grad[..., [0, 2, 3]].abs().sum() > 0
    assert fixmatch_loss(strong, weak, 0.999)[1].sum() == 0   # nothing passes a stricter threshold


def test_medical_strong_view_keeps_shape_and_changes_intensities_2d_and_3d():
    from semidiff_nnunet.networks.strong_views import medical_strong_view

    torch.manual_seed(0)
    np.random.seed(0)
    view = medical_strong_view()
    for shape in [(1, 16, 16), (2, 6, 12, 12)]:
        img = torch.randn(shape)
        changed = 0
        for _ in range(5):
            out = view(image=img.clone())["image"]
            assert out.shape == img.shape and torch.isfinite(out).all()
            changed += int(not torch.allclose(out, img))
        assert changed >= 4  # brightness and contrast each fire with p = 0.8


# ---------------------------------------------------------------------------------------------- entropy
def test_entropy_loss_matches_hand_computed_normalised_entropy():
    p = [(0.5, 0.25, 0.25), (1 / 3, 1 / 3, 1 / 3)]
    logits = _logits(*[tuple(math.log(v) for v in px) for px in p]).requires_grad_()
    expected = (1.5 * math.log(2) / math.log(3) + 1.0) / 2
    assert entropy_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    probs = torch.softmax(logits, 1)
    assert entropy_map(probs).flatten().tolist() == pytest.approx([1.5 * math.log(2) / math.log(3), 1.0], rel=1e-6)
    assert entropy_map(probs, normalize=False).flatten()[1].item() == pytest.approx(math.log(3), rel=1e-6)
    entropy_loss(logits).backward()
    assert logits.grad[..., 1].abs().max() < 1e-6 and logits.grad[..., 0].abs().sum() > 0  # uniform = stationary


# ---------------------------------------------------------------------------------------------- UA-MT
def test_uamt_threshold_ramps_from_three_quarters_to_max_entropy():
    assert uamt_threshold(0.0, 2) == pytest.approx(0.75 * math.log(2))
    assert uamt_threshold(1.0, 2) == pytest.approx(math.log(2))
    assert uamt_threshold(0.5, 4) == pytest.approx(0.875 * math.log(4))
    r = ramps.sigmoid_rampup(50, 100)  # SSL4MIS: (0.75 + 0.25 * sigmoid_rampup(iter, max_iter)) * ln 2
    assert uamt_threshold(r, 2) == pytest.approx((0.75 + 0.25 * math.exp(-5 * 0.25)) * math.log(2))


def test_uamt_masked_mse_counts_only_certain_pixels():
    student = _logits((0, 0), (0, math.log(3))).requires_grad_()        # probs (.5,.5), (.25,.75)
    teacher = _logits((0.9, 0.1), (0.2, 0.8)).requires_grad_()          # already probabilities
    uncertainty = torch.tensor([0.1, 0.9]).view(1, 1, 1, 2)
    loss, mask = uncertainty_masked_mse(student, teacher, uncertainty, 0.5)
    assert mask.flatten().tolist() == [1, 0]
    assert loss.item() == pytest.approx((0.4 ** 2 + 0.4 ** 2) / 2, rel=1e-6)
    loss_all, _ = uncertainty_masked_mse(student, teacher, uncertainty, 1.0)
    assert loss_all.item() == pytest.approx((0.32 + 2 * 0.05 ** 2) / 4, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad[..., 1].abs().sum() == 0 and student.grad[..., 0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- URPC
def test_urpc_loss_matches_hand_computed_kl_weighted_terms():
    # pixel A: the scales disagree, p1 = (.5, .5), p2 = (.9, .1); pixel B: both (.5, .5)
    s1 = _logits((0, 0), (0, 0)).requires_grad_()
    s2 = _logits((math.log(9), 0), (0, 0)).requires_grad_()
    mean_a = (0.7, 0.3)
    kl1 = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    kl2 = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    expected = 0.0
    for kl in (kl1, kl2):
        w = math.exp(-kl)
        # mean over (class, pixel) of d²·w: only pixel A, d² = 0.04 for both classes -> 0.08 w / 4
        expected += (0.08 * w / 4) / ((w + 1) / 2 + 1e-8) + kl / 2
    expected /= 2
    assert sum(mean_a) == pytest.approx(1)
    loss = urpc_loss([s1, s2])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0  # p̄ is not detached (SSL4MIS)
    same = _logits((1.0, -1.0), (0.3, 0.2))
    assert urpc_loss([same, same.clone(), same.clone()]).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- perturbations
def test_feature_perturbations_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(1, 1, 1, 4)
    assert feature_dropout(x).flatten().tolist() == [1, 2, 3, 0]  # only the peak exceeds γ·max, γ ∈ [.7, .9]
    y = torch.rand(1, 3, 4, 5) + 1
    noisy = feature_noise(torch.cat([y, y]))
    assert torch.equal(noisy[0], noisy[1])                       # one noise field for the batch
    assert ((noisy[0] - y[0]).abs() <= 0.3 * y[0].abs() + 1e-6).all() and not torch.equal(noisy[0], y[0])
    torch.manual_seed(0)
    z = torch.ones(4, 8, 3, 3, 3)
    dropped = channel_dropout(z, 0.5)
    per_channel = dropped.flatten(2)
    assert ((per_channel == 0).all(2) | (per_channel == 2).all(2)).all()  # whole channels, rescaled 1/(1-p)
    assert 0 < (per_channel == 0).all(2).sum() < 32
    assert get_perturbation("dropout:0.5").keywords == {"p": 0.5}
    with pytest.raises(ValueError, match="unknown perturbation"):
        get_perturbation("vat")


# ---------------------------------------------------------------------------------------------- real trainers
# Every method trainer below is the real one: built by its constructor on nnU-Net's plans of the tiny
# demo datasets (conftest ``demo2d``/``demo3d``) with the run configuration in the plans, then
# ``initialize()``d (network, Dice+CE with deep supervision, SGD, ``build_method``). No training
# runs: ``compute_losses`` / ``train_step`` on fixed batches. The runs are 2 epochs × 10
# iterations, so ramps are mid-way at the iterations used here.
EPOCHS, ITERS = 2, 10
TOTAL = EPOCHS * ITERS
# The engine's schedule policy (``BaseHParams``: supervised burn-in, bounds on ramp lengths) set to
# neutral values, so that a weight ramps from iteration 0 over exactly rampup_fraction × the run and
# every iteration here computes the unlabeled losses.
NEUTRAL_SCHEDULE = {"burnin": 0.0, "burnin_min": 0, "rampup_min": 0}


def _setup(dataset: str, configuration: str):
    from semidiff_nnunet import planning

    plans = planning.load_plans(dataset, "semidiffDemoPlans")
    dataset_json = json.loads((planning.preprocessed_folder(dataset) / "dataset.json").read_text(encoding="utf-8"))
    return plans, configuration, dataset_json


@pytest.fixture(scope="module")
def tiny2d(demo2d):
    return _setup(demo2d, "2d")


@pytest.fixture(scope="module")
def tiny3d(demo3d):
    return _setup(demo3d, "3d_fullres")


@pytest.fixture
def tiny(request):
    """``tiny2d`` or ``tiny3d``, chosen by ``@pytest.mark.parametrize("tiny", [...], indirect=True)``."""
    return request.getfixturevalue(request.param)


BOTH_DIMS = pytest.mark.parametrize("tiny", ["tiny2d", "tiny3d"], indirect=True)


def _trainer(setup, cls, **hparams):
    """A real ``cls`` on the tiny plans, labeled 0.5, seed 0, with ``hparams`` in the run configuration."""
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans, configuration, dataset_json = setup
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False  # nnU-Net's trainer reads it (nnUNetv2_train puts it there)
    RunConfig(labeled=LabeledSpec.parse("0.5"), seed=0, hparams={**NEUTRAL_SCHEDULE, **hparams},
              num_epochs=EPOCHS, num_iterations_per_epoch=ITERS).write(plans)
    t = cls(plans, configuration, 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    t.initialize()
    assert t.total_iterations == TOTAL and t.enable_deep_supervision
    return t


def _batches(t, n_l: int = 2, n_u: int = 3, strong: bool = False):
    """Fixed batches shaped as the loaders deliver them: labels at every deep-supervision scale
    (nearest-downsampled to each head's size), unlabeled patches (and a strong view) without labels."""
    g = torch.Generator().manual_seed(1)
    patch = tuple(t.configuration_manager.patch_size)
    x_l = torch.randn(n_l, 1, *patch, generator=g)
    lab = torch.randint(0, t.label_manager.num_segmentation_heads, (n_l, 1, *patch), generator=g).float()
    with torch.no_grad():
        sizes = [o.shape[2:] for o in t.network(x_l)]
    labeled = {"data": x_l, "target": [F.interpolate(lab, size=s, mode="nearest") for s in sizes]}
    x_u = torch.randn(n_u, 1, *patch, generator=g)
    unlabeled = {"data": x_u}
    if strong:
        # photometrically different (instance norm would undo an affine change), same geometry
        unlabeled["data_strong"] = x_u.sign() * x_u.abs().sqrt() + 0.3 * torch.randn(x_u.shape, generator=g)
    return labeled, unlabeled


def _grads(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _full(output) -> torch.Tensor:
    return output[0] if isinstance(output, (list, tuple)) else output


def _supervised(t, net, labeled) -> torch.Tensor:
    """nnU-Net's own loss (the trainer's Dice+CE with deep supervision) of ``net`` on the labeled batch alone."""
    return t.loss(net(labeled["data"]), labeled["target"])


def _sigmoid_ramp(iteration: float, length: float) -> float:
    return math.exp(-5 * (1 - min(iteration, length) / length) ** 2)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------- mean teacher
def _shift_teacher(t, seed: int = 3) -> None:
    """Make the EMA teacher differ from the student (a fresh trainer's teacher is an exact copy), so a
    loss that used the student in the teacher's place would give another value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.teacher.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_mean_teacher_losses_by_hand(tiny2d):
    """The documented example, value by value: Dice+CE on the labeled patches; w(t)·mean over voxels and
    classes of (softmax(student(x_u)) − softmax(teacher(x_u + clamp(N(0, σ²), −c, c))))² with
    w(t) = consistency · exp(−5 (1 − t/L)²), L = rampup_fraction · iterations of the run."""
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    hp = {"consistency": 0.3, "rampup_fraction": 0.5, "noise_std": 0.15, "noise_clip": 0.2}  # none is the default
    t = _trainer(tiny2d, MeanTeacherTrainer, **hp)
    _shift_teacher(t)
    t.iteration = 7
    labeled, unlabeled = _batches(t)
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    terms = t.compute_losses(labeled, unlabeled)
    assert set(terms) == {"supervised", "consistency", "_consistency_weight"}

    torch.set_rng_state(rng)  # the student's forward draws nothing: the noise is the first draw
    x_u = unlabeled["data"]
    noise = torch.randn_like(x_u) * hp["noise_std"]
    assert (noise.abs() > hp["noise_clip"]).any()  # the clip matters for this draw
    noise = noise.clamp(-hp["noise_clip"], hp["noise_clip"])
    with torch.no_grad():
        student = _full(t.network(x_u))
        teacher = _full(t.teacher.module(x_u + noise))
        mse = ((torch.softmax(student, 1) - torch.softmax(teacher, 1)) ** 2).mean()
        supervised = _supervised(t, t.network, labeled)
    w = 0.3 * _sigmoid_ramp(7, 0.5 * TOTAL)
    assert 0.01 < w < 0.29
    assert terms["_consistency_weight"].item() == pytest.approx(w, rel=1e-6)
    assert terms["consistency"].item() == pytest.approx(w * mse.item(), rel=1e-5)
    assert terms["supervised"].item() == pytest.approx(supervised.item(), rel=1e-5)
    # the teacher is a constant target: the consistency trains the student only
    terms["consistency"].backward()
    assert _grads(t.network) > 0 and all(p.grad is None for p in t.teacher.module.parameters())


@pytest.mark.parametrize("iteration, alpha, burnin", [
    (7, 1 - 1 / 8, 0.0),  # the EMA's warm-up
    (300, 0.97, 0.0),  # then the decay
    (2, 1 - 1 / 3, 0.2),  # inside a 4-iteration supervised burn-in the teacher follows the student all the same
])
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_mean_teacher_train_step_moves_the_teacher_by_the_ema_rule(tiny2d, iteration, alpha, burnin):
    """After the optimiser step of iteration i: θ' ← α θ' + (1 − α) θ, α = min(1 − 1/(i + 1), ema_decay)."""
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    t = _trainer(tiny2d, MeanTeacherTrainer, ema_decay=0.97, burnin=burnin)  # not the default decay 0.99
    assert t.burnin_iterations == round(burnin * TOTAL)
    _shift_teacher(t)
    labeled, unlabeled = _batches(t)
    t.dataloader_unlabeled = iter(lambda: unlabeled, None)
    t.iteration = iteration
    teacher_before, student_before = _params(t.teacher.module), _params(t.network)
    out = t.train_step(labeled)
    assert t.iteration == iteration + 1
    terms = {k[len("term/"):] for k in out if k.startswith("term/")}
    assert terms == ({"supervised"} if burnin else {"supervised", "consistency", "_consistency_weight"})
    assert out["loss"] == pytest.approx(sum(float(out["term/" + k]) for k in terms if k[0] != "_"), rel=1e-5)
    student_after = _params(t.network)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student_after))  # the student stepped
    for before, p, s in zip(teacher_before, t.teacher.module.parameters(), student_after):
        assert torch.allclose(p, alpha * before + (1 - alpha) * s, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- UA-MT
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_uamt_losses_by_hand_and_threshold_follows_its_ramp(tiny2d):
    from semidiff_nnunet.plugins.uamt import UAMTTrainer

    hp = {"mc_passes": 3, "consistency": 0.5, "rampup_fraction": 0.5, "threshold_start": 0.6,
          "threshold_rampup_fraction": 0.75, "noise_std": 0.1, "noise_clip": 0.2}
    t = _trainer(tiny2d, UAMTTrainer, **hp)
    _shift_teacher(t)
    t.iteration = 5
    labeled, unlabeled = _batches(t)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    terms = t.compute_losses(labeled, unlabeled)

    r = _sigmoid_ramp(5, 0.75 * TOTAL)
    threshold = (0.6 + 0.4 * r) * math.log(3)  # U_max = ln C, C = 3 classes
    assert terms["_threshold"].item() == pytest.approx(threshold, rel=1e-6)
    # by hand: T + 1 noisy teacher passes (the first is the target), entropy of the mean of the T others
    torch.set_rng_state(rng)
    x_u = unlabeled["data"]

    def teacher_probs():
        noise = torch.clamp(torch.randn_like(x_u) * 0.1, -0.2, 0.2)
        return torch.softmax(_full(t.teacher.module(x_u + noise)), 1)

    with torch.no_grad():
        target = teacher_probs()
        mean = sum(teacher_probs() for _ in range(3)) / 3
        uncertainty = -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)
        mask = (uncertainty < threshold).float()
        dist = (torch.softmax(_full(t.network(x_u)), 1) - target) ** 2
        consistency = (mask * dist).sum() / (2 * mask.sum())
    assert 0.05 < mask.mean().item() < 0.95  # the mask selects: the test would see a wrong one
    assert terms["_certain_fraction"].item() == pytest.approx(mask.mean().item(), rel=1e-6)
    w = 0.5 * _sigmoid_ramp(5, 0.5 * TOTAL)
    assert terms["_consistency_weight"].item() == pytest.approx(w, rel=1e-6)
    assert terms["consistency"].item() == pytest.approx(w * consistency.item(), rel=1e-5)
    with torch.no_grad():
        assert terms["supervised"].item() == pytest.approx(_supervised(t, t.network, labeled).item(), rel=1e-5)
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert all(p.grad is None for p in t.teacher.module.parameters()) and _grads(t.network) > 0


@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_uamt_after_step_moves_the_teacher_by_the_ema_rule(tiny2d):
    from semidiff_nnunet.plugins.uamt import UAMTTrainer

    t = _trainer(tiny2d, UAMTTrainer)
    _shift_teacher(t)
    before = _params(t.teacher.module)
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.iteration = 6  # the step that just ran: α = min(1 − 1/7, 0.99)
    t.after_step()
    for b, p, s in zip(before, t.teacher.module.parameters(), t.network.parameters()):
        assert torch.allclose(p, 6 / 7 * b + 1 / 7 * s, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- CPS
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_cps_trainer_terms_match_cross_entropy_of_each_others_argmax(tiny2d):
    from semidiff_nnunet.plugins.cps import CPSTrainer

    t = _trainer(tiny2d, CPSTrainer, weight=0.5, rampup_fraction=0.0)  # no ramp: w = 0.5
    net1, net2 = t.network, t.network_2
    assert t.extra_optimizers["network_2"][0] is not t.optimizer
    # different initialisations (SSL4MIS): nnU-Net's He for the first network, Xavier-normal for the second
    convs = [(c1.weight, c2.weight) for c1, c2 in zip(net1.modules(), net2.modules())
             if isinstance(c1, (nn.Conv2d, nn.Conv3d)) and c1.weight.numel() >= 500]
    assert len(convs) >= 5
    for w1, w2 in convs:
        receptive = w1[0, 0].numel()
        fan_in, fan_out = w1.shape[1] * receptive, w1.shape[0] * receptive
        he, xavier = math.sqrt(2 / (1 + 1e-4) / fan_in), math.sqrt(2 / (fan_in + fan_out))
        nearer_he = [abs(math.log(w.std().item() / he)) < abs(math.log(w.std().item() / xavier)) for w in (w1, w2)]
        assert nearer_he == [True, False], (tuple(w1.shape), w1.std().item(), w2.std().item(), he, xavier)
    labeled, unlabeled = _batches(t)
    terms = t.compute_losses(labeled, unlabeled)
    assert set(terms) == {"supervised", "supervised_2", "cps", "_cps_weight"}
    n_l = labeled["data"].shape[0]
    x = torch.cat([labeled["data"], unlabeled["data"]])  # the trainer's joint batch: bit-identical argmax
    with torch.no_grad():
        g1, g2 = _full(net1(x)), _full(net2(x))
        f1, f2 = g1[n_l:], g2[n_l:]
        expected = F.cross_entropy(f1, f2.argmax(1)) + F.cross_entropy(f2, f1.argmax(1))
        assert terms["supervised"].item() == pytest.approx(_supervised(t, net1, labeled).item(), rel=1e-5)
        assert terms["supervised_2"].item() == pytest.approx(_supervised(t, net2, labeled).item(), rel=1e-5)
    assert terms["_cps_weight"].item() == 0.5
    assert terms["cps"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    # each network is trained by the CE against the other's (constant) pseudo labels
    terms["cps"].backward()
    assert _grads(net1) > 0 and _grads(net2) > 0
    # on_labeled: the CPS term covers the labeled patches too
    t.hp.on_labeled = True
    both = t.compute_losses(labeled, unlabeled)["cps"]
    assert both.item() == pytest.approx(0.5 * (F.cross_entropy(g1, g2.argmax(1))
                                               + F.cross_entropy(g2, g1.argmax(1))).item(), rel=1e-5)


@pytest.mark.slow  # the demo datasets, planned with nnU-Net
@pytest.mark.parametrize("burnin", [0.0, 0.2])  # after / inside a supervised burn-in: both learn from the labels
def test_cps_train_step_trains_both_networks(tiny2d, burnin):
    from semidiff_nnunet.plugins.cps import CPSTrainer

    t = _trainer(tiny2d, CPSTrainer, burnin=burnin)
    assert t.in_burnin == bool(burnin)
    labeled, unlabeled = _batches(t)
    t.dataloader_unlabeled = iter(lambda: unlabeled, None)
    before_1, before_2 = _params(t.network), _params(t.network_2)
    out = t.train_step(labeled)
    terms = {"term/supervised", "term/supervised_2"} | (set() if burnin else {"term/cps", "term/_cps_weight"})
    assert set(out) == {"loss"} | terms
    for before, net in ((before_1, t.network), (before_2, t.network_2)):
        assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


# ---------------------------------------------------------------------------------------------- FixMatch
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_fixmatch_trainer_pseudo_labels_confident_weak_pixels_for_the_strong_view(tiny2d):
    from semidiff_nnunet.plugins.fixmatch import FixMatchTrainer

    t = _trainer(tiny2d, FixMatchTrainer, weight=2.0, strong_probability=0.6)
    labeled, unlabeled = _batches(t, strong=True)
    n_l, n_u = labeled["data"].shape[0], unlabeled["data"].shape[0]
    with torch.no_grad():  # the trainer's joint batch (labeled ⊕ weak ⊕ strong): bit-identical confidences
        full = _full(t.network(torch.cat([labeled["data"], unlabeled["data"], unlabeled["data_strong"]])))
    weak, strong = full[n_l:n_l + n_u], full[n_l + n_u:]
    conf, pseudo = torch.softmax(weak, 1).max(1)
    ce = F.cross_entropy(strong, pseudo, reduction="none")
    # τ = 0: every pixel confident, ℓ_u = CE(strong, argmax weak)
    t.hp.threshold = 0.0
    terms = t.compute_losses(labeled, unlabeled)
    assert set(terms) == {"supervised", "unsupervised", "_mask_fraction"}
    assert terms["_mask_fraction"].item() == 1.0
    assert terms["unsupervised"].item() == pytest.approx(2.0 * ce.mean().item(), rel=1e-5)
    # τ = the median weak confidence: about half the pixels pass, the others count zero in the mean
    tau = conf.flatten().median().item()
    t.hp.threshold = tau
    terms = t.compute_losses(labeled, unlabeled)
    mask = (conf >= tau).float()
    assert 0.3 < mask.mean().item() < 0.7
    assert terms["_mask_fraction"].item() == pytest.approx(mask.mean().item(), rel=1e-6)
    assert terms["unsupervised"].item() == pytest.approx(2.0 * (ce * mask).mean().item(), rel=1e-5)
    with torch.no_grad():
        assert terms["supervised"].item() == pytest.approx(_supervised(t, t.network, labeled).item(), rel=1e-5)
    # the strong view the unlabeled loader applies is built from the run's hyperparameters
    view = t.get_strong_transforms()
    assert view is not None and view.transforms[0].apply_probability == 0.6


# ---------------------------------------------------------------------------------------------- entropy min
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
def test_entropy_min_trainer_uses_unlabeled_patches_only_by_default(tiny2d):
    from semidiff_nnunet.plugins.entropy_min import EntropyMinTrainer

    w = 0.1 * _sigmoid_ramp(5, TOTAL)
    for include in (False, True):
        t = _trainer(tiny2d, EntropyMinTrainer, include_labeled=include)
        t.iteration = 5
        labeled, unlabeled = _batches(t)
        data = torch.cat([labeled["data"], unlabeled["data"]]) if include else unlabeled["data"]
        terms = t.compute_losses(labeled, unlabeled)
        with torch.no_grad():
            expected = entropy_loss(_full(t.network(data)))
        assert terms["_entropy_raw"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert terms["_entropy_weight"].item() == pytest.approx(w, rel=1e-6)
        assert terms["entropy"].item() == pytest.approx(w * expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- CCT
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
@BOTH_DIMS
def test_cct_aux_decoders_see_perturbed_features_and_do_not_train_the_main_decoder(tiny):
    from semidiff_nnunet.plugins.cct import AuxiliaryDecoders, CCTTrainer

    t = _trainer(tiny, CCTTrainer)
    aux = t.aux_decoders
    assert t.extra_networks["aux_decoders"] is aux and "aux_decoders" in t.extra_optimizers
    assert len(aux.decoders) == 3
    assert not any(n.startswith("encoder") for n, _ in aux.decoders[0].named_parameters())  # no encoder copy
    seen = []
    for dec in aux.decoders:
        dec.register_forward_pre_hook(lambda _m, args: seen.append([s.detach().clone() for s in args[0]]))
    labeled, unlabeled = _batches(t)
    with torch.no_grad():
        clean = t.network.encoder(unlabeled["data"])
        main = torch.softmax(_full(t.network(unlabeled["data"])), 1)
    t.iteration = 5
    terms = t.compute_losses(labeled, unlabeled)
    assert len(seen) == 3
    for skips in seen:  # unlabeled part only, every stage perturbed (SSL4MIS), same shapes
        assert [s.shape for s in skips] == [c.shape for c in clean]
        assert all(not torch.allclose(s, c) for s, c in zip(skips, clean))
    # decoder k sees its own perturbation (defaults: feature_noise:0.3, dropout:0.3, feature_dropout)
    for s, c in zip(seen[0], clean):  # x + x ⊙ N, N ~ U(−0.3, 0.3) shared by the batch
        big = (c.abs() > 1e-2).all(0)
        ratio = ((s - c) / c)[:, big]
        assert ratio.abs().max() <= 0.3 + 1e-4 and torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-4)
    for s, c in zip(seen[1], clean):  # whole channels dropped, the others rescaled by 1/(1 − 0.3)
        kept = torch.isclose(s, c / 0.7, rtol=1e-5, atol=1e-6).flatten(2).all(2)
        assert (kept | (s == 0).flatten(2).all(2)).all()
    assert any(not torch.isclose(s, c / 0.7).flatten(2).all(2).all() for s, c in zip(seen[1], clean))
    for s, c in zip(seen[2], clean):  # whole voxels (all channels) zeroed where the attention peaks
        keep = (s == c).all(1, keepdim=True)
        assert torch.equal(s, c * keep) and not keep.all()
    # L_c = 1/K Σ_k mean (softmax(g_k(π_k(z))) − softmax(g(z)))², weight 0.1 · sigmoid ramp
    with torch.no_grad():
        expected = sum(((torch.softmax(dec(s), 1) - main) ** 2).mean() for dec, s in zip(aux.decoders, seen)) / 3
        assert terms["supervised"].item() == pytest.approx(_supervised(t, t.network, labeled).item(), rel=1e-5)
    w = 0.1 * _sigmoid_ramp(5, TOTAL)
    assert terms["_consistency_weight"].item() == pytest.approx(w, rel=1e-6)
    assert terms["consistency"].item() == pytest.approx(w * expected.item(), rel=1e-5)
    t.network.zero_grad()
    terms["consistency"].backward()
    dec = t.network.decoder  # (its .encoder attribute is the shared encoder: leave it out)
    assert _grads(nn.ModuleList([dec.stages, dec.transpconvs, dec.seg_layers])) == 0  # main target is constant
    assert _grads(t.network.encoder) > 0 and _grads(aux) > 0
    # bottleneck-only variant (the paper's "encoder output z")
    only_z = AuxiliaryDecoders(t.network.decoder, ["feature_noise"], perturb_skips=False)
    got = only_z.perturb(0, clean)
    assert all(torch.equal(a, b) for a, b in zip(got[:-1], clean[:-1])) and not torch.equal(got[-1], clean[-1])


# ---------------------------------------------------------------------------------------------- URPC
@pytest.mark.slow  # the demo datasets, planned with nnU-Net
@BOTH_DIMS
def test_urpc_perturbs_only_the_lower_heads_and_matches_its_loss(tiny):
    from semidiff_nnunet.networks.perturbations import perturbed_inputs
    from semidiff_nnunet.plugins.urpc import URPCTrainer, pyramid_to_full_resolution

    t = _trainer(tiny, URPCTrainer)
    heads = t.network.decoder.seg_layers  # lowest resolution first; 2D plans: 3 heads, 3D plans: 2
    labeled, unlabeled = _batches(t)
    x = unlabeled["data"]
    with torch.no_grad():
        ref = t.network(x)
        with perturbed_inputs(t.head_hooks()):
            pert = t.network(x)
        after = t.network(x)
    assert len(ref) == len(heads) >= 2
    assert torch.equal(pert[0], ref[0])                                  # full resolution stays clean
    assert all(not torch.allclose(p, r) for p, r in zip(pert[1:], ref[1:]))  # every lower head is perturbed
    assert all(torch.equal(a, b) for a, b in zip(after, ref))             # hooks removed afterwards
    pyramid = pyramid_to_full_resolution(list(ref), 4)
    assert len(pyramid) == len(heads) and all(p.shape == ref[0].shape for p in pyramid)
    # the loss by hand: the pyramid of the unlabeled part, (bi/tri)linearly resized, under the same draws
    t.iteration = 5
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    terms = t.compute_losses(labeled, unlabeled)
    torch.set_rng_state(rng)
    n_l, size = labeled["data"].shape[0], ref[0].shape[2:]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    with torch.no_grad(), perturbed_inputs(t.head_hooks()):
        out = t.network(torch.cat([labeled["data"], x]))
    levels = [o[n_l:] if o.shape[2:] == size else F.interpolate(o[n_l:], size=size, mode=mode, align_corners=False)
              for o in out[:4]]
    w = 0.1 * _sigmoid_ramp(5, TOTAL)
    assert terms["_consistency_weight"].item() == pytest.approx(w, rel=1e-6)
    assert terms["consistency"].item() == pytest.approx(w * urpc_loss(levels).item(), rel=1e-5)
    assert terms["supervised"].item() == pytest.approx(t.loss([o[:n_l] for o in out], labeled["target"]).item(),
                                                       rel=1e-5)
    t.network.zero_grad()
    terms["consistency"].backward()
    assert _grads(heads[-1]) > 0 and _grads(heads[-2]) > 0  # the pyramid levels are pulled together
