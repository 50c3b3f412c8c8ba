"""Losses of the classic baselines on small tensors with hand-computed answers, and gradient flow.

Trainer-level tests build a method trainer without nnU-Net's plans (``cls.__new__``) around a
tiny dynamic_network_architectures U-Net, so ``compute_losses`` runs exactly as in training.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
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


# ---------------------------------------------------------------------------------------------- trainers
def _unet(dim: int = 2, classes: int = 3) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    net = PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], 1, classes, 1, conv_bias=True, norm_op=norm,
                        norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                        deep_supervision=True)
    net.apply(lambda m: nn.init.normal_(m.weight, std=0.3) if isinstance(m, (nn.Conv2d, nn.Conv3d)) else None)
    return net


def _trainer(cls, dim: int = 2, **hp):
    torch.manual_seed(0)
    t = cls.__new__(cls)
    t.network, t.device, t.is_ddp = _unet(dim), torch.device("cpu"), False
    t.hp = cls.hparams_class(**hp)
    t.iteration, t.num_epochs, t.num_iterations_per_epoch = 0, 1, 10
    t.initial_lr, t.weight_decay = 0.01, 3e-5
    t.extra_networks, t.extra_optimizers, t.method_states = {}, {}, {}
    t.loss = lambda out, target: F.cross_entropy(out[0], target[0][:, 0].long())  # stands in for Dice+CE
    return t


def _batches(dim: int = 2, strong: bool = False):
    spatial = (8, 8) if dim == 2 else (4, 8, 8)
    lab = {"data": torch.randn(2, 1, *spatial), "target": [torch.randint(0, 3, (2, 1, *spatial)).float()]}
    unl = {"data": torch.randn(3, 1, *spatial)}
    if strong:
        unl["data_strong"] = unl["data"] * 1.3 + 0.1
    return lab, unl


def _grads(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("dim", [2, 3])
def test_cct_aux_decoders_see_perturbed_features_and_do_not_train_the_main_decoder(dim):
    from semidiff_nnunet.plugins.cct import AuxiliaryDecoders, CCTTrainer

    t = _trainer(CCTTrainer, dim)
    t.build_method()
    aux = t.aux_decoders
    assert len(aux.decoders) == 3
    assert not any(n.startswith("encoder") for n, _ in aux.decoders[0].named_parameters())  # no encoder copy
    seen = []
    for dec in aux.decoders:
        dec.register_forward_pre_hook(lambda _m, args: seen.append([s.detach().clone() for s in args[0]]))
    lab, unl = _batches(dim)
    with torch.no_grad():
        clean = t.network.encoder(unl["data"])
    terms = t.compute_losses(lab, unl)
    assert len(seen) == 3
    for skips in seen:  # unlabeled part only, every stage perturbed (SSL4MIS), same shapes
        assert [s.shape for s in skips] == [c.shape for c in clean]
        assert not torch.allclose(skips[-1], clean[-1])
    w = 0.1 * ramps.sigmoid_rampup(0, 10)
    assert terms["_consistency_weight"].item() == pytest.approx(w)
    t.network.zero_grad()
    terms["consistency"].backward()
    dec = t.network.decoder  # (its .encoder attribute is the shared encoder: leave it out)
    assert _grads(nn.ModuleList([dec.stages, dec.transpconvs, dec.seg_layers])) == 0  # main target is constant
    assert _grads(t.network.encoder) > 0 and _grads(aux) > 0
    # bottleneck-only variant (the paper's "encoder output z")
    only_z = AuxiliaryDecoders(t.network.decoder, ["feature_noise"], perturb_skips=False)
    got = only_z.perturb(0, clean)
    assert all(torch.equal(a, b) for a, b in zip(got[:-1], clean[:-1])) and not torch.equal(got[-1], clean[-1])


@pytest.mark.parametrize("dim", [2, 3])
def test_urpc_perturbs_only_the_lower_heads_and_cleans_up(dim):
    from semidiff_nnunet.networks.perturbations import perturbed_inputs
    from semidiff_nnunet.plugins.urpc import URPCTrainer, pyramid_to_full_resolution

    t = _trainer(URPCTrainer, dim)
    lab, unl = _batches(dim)
    x = unl["data"]
    ref = t.network(x)
    with perturbed_inputs(t.head_hooks()):
        pert = t.network(x)
    assert torch.equal(pert[0], ref[0]) and not torch.allclose(pert[1], ref[1])  # full resolution stays clean
    assert all(torch.equal(a, b) for a, b in zip(t.network(x), ref))             # hooks removed afterwards
    pyramid = pyramid_to_full_resolution(list(ref), 4)
    assert len(pyramid) == 2 and all(p.shape == ref[0].shape for p in pyramid)  # a 3-stage net has 2 heads
    terms = t.compute_losses(lab, unl)
    assert terms["consistency"].item() > 0
    terms["consistency"].backward()
    heads = t.network.decoder.seg_layers
    assert _grads(heads[-1]) > 0 and _grads(heads[-2]) > 0  # both pyramid levels are pulled together


def test_uamt_teacher_gets_no_gradient_and_threshold_follows_ramp():
    from semidiff_nnunet.plugins.uamt import UAMTTrainer

    t = _trainer(UAMTTrainer, mc_passes=3)
    t.build_method()
    t.iteration = 5
    lab, unl = _batches()
    terms = t.compute_losses(lab, unl)
    r = ramps.sigmoid_rampup(5, 10)
    assert terms["_threshold"].item() == pytest.approx((0.75 + 0.25 * r) * math.log(3), rel=1e-6)
    assert 0 <= terms["_certain_fraction"].item() <= 1
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert all(p.grad is None for p in t.teacher.module.parameters())
    assert _grads(t.network) > 0
    before = [p.detach().clone() for p in t.teacher.module.parameters()]
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.iteration = 6
    t.after_step()  # α = min(1 − 1/6, 0.99): the teacher moves 1/6 of the way
    for p, b in zip(t.teacher.module.parameters(), before):
        assert torch.allclose(p - b, torch.full_like(p, 1 / 6), atol=1e-5)


def test_cps_trainer_terms_match_cross_entropy_of_each_others_argmax():
    from semidiff_nnunet.plugins.cps import CPSTrainer, xavier_normal_init

    t = _trainer(CPSTrainer, weight=0.5, rampup_fraction=0.0)
    net2 = _unet()
    net2.apply(xavier_normal_init)
    t.network_2 = net2
    lab, unl = _batches()
    terms = t.compute_losses(lab, unl)
    with torch.no_grad():
        f1, f2 = t.network(unl["data"])[0], net2(unl["data"])[0]
    expected = F.cross_entropy(f1, f2.argmax(1)) + F.cross_entropy(f2, f1.argmax(1))
    assert terms["cps"].item() == pytest.approx(0.5 * expected.item(), rel=1e-4)  # InstanceNorm: per sample
    assert set(terms) == {"supervised", "supervised_2", "cps", "_cps_weight"}


def test_fixmatch_trainer_uses_shared_geometry_views_and_reports_mask():
    from semidiff_nnunet.plugins.fixmatch import FixMatchTrainer

    t = _trainer(FixMatchTrainer, threshold=0.0)  # every pixel confident: loss = CE(strong, argmax weak)
    lab, unl = _batches(strong=True)
    terms = t.compute_losses(lab, unl)
    with torch.no_grad():
        weak, strong = t.network(unl["data"])[0], t.network(unl["data_strong"])[0]
    assert terms["_mask_fraction"].item() == 1.0
    assert terms["unsupervised"].item() == pytest.approx(F.cross_entropy(strong, weak.argmax(1)).item(), rel=1e-4)
    assert t.get_strong_transforms() is not None


def test_entropy_min_trainer_uses_unlabeled_patches_only_by_default():
    from semidiff_nnunet.plugins.entropy_min import EntropyMinTrainer

    lab, unl = _batches()
    for include, data in ((False, unl["data"]), (True, torch.cat([lab["data"], unl["data"]]))):
        t = _trainer(EntropyMinTrainer, include_labeled=include)
        terms = t.compute_losses(lab, unl)
        with torch.no_grad():
            expected = entropy_loss(t.network(data)[0])
        assert terms["_entropy_raw"].item() == pytest.approx(expected.item(), rel=1e-4)
