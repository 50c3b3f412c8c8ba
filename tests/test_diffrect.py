"""DiffRect: colouring, calibration guidance, rectification network, gradient flow, CLI runs (2D, 3D)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import assert_stock_predictor_matches, load_image, raw

from semidiff_nnunet.plugins.diffrect.losses import (
    PAPER_COLORS,
    calibration_guidance,
    ce_dice,
    colorize,
    complementary_loss,
    confident_mask,
    confident_pseudo_label,
    semantic_colors,
)
from semidiff_nnunet.plugins.diffrect.networks import latent_strides, rectification_net_from_plans
from semidiff_nnunet.plugins.diffrect.rectification import LatentRectification, latent_diffusion_head

ARCH_2D = {"n_stages": 4, "features_per_stage": [8, 16, 16, 16], "conv_op": "torch.nn.modules.conv.Conv2d",
           "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]], "conv_bias": True,
           "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
           "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
           "nonlin_kwargs": {"inplace": True}}
ARCH_3D = dict(ARCH_2D, conv_op="torch.nn.Conv3d", norm_op="torch.nn.InstanceNorm3d",
               kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
               strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])


# ----------------------------------------------------------------------------- LCC
def test_colours_paper_values_injective_and_stable():
    for c, cols in PAPER_COLORS.items():
        assert torch.equal(semantic_colors(c), torch.tensor(cols, dtype=torch.float32) / 255)
    for c in (1, 2, 3, 4, 5, 9, 27, 130):
        cols = semantic_colors(c)
        assert cols.shape == (c, 3) and cols.min() >= 0 and cols.max() <= 1
        assert len({tuple(r.tolist()) for r in cols}) == c, c  # injective
        assert torch.equal(cols, semantic_colors(c))  # deterministic
    assert torch.equal(semantic_colors(5)[4], torch.ones(3))  # farthest from black/R/G/B: white
    assert torch.equal(semantic_colors(12)[:9], semantic_colors(9))  # adding classes keeps colours
    # colour maps in 2D and 3D: each voxel gets its class colour, and the map is invertible
    for shape in ((2, 5, 6), (2, 3, 4, 5)):
        lab = torch.randint(0, 6, shape)
        m = colorize(lab, 6)
        assert m.shape == (shape[0], 3, *shape[1:])
        back = torch.cdist(m.movedim(1, -1).reshape(-1, 3), semantic_colors(6)).argmin(1).reshape(shape)
        assert torch.equal(back, lab)


def test_calibration_guidance_is_hand_computed_dice():
    a = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    b = torch.tensor([[[0, 1, 0], [2, 1, 0]]])
    # class 0: |A|=2 |B|=3 |A∩B|=2; class 1: 2, 2, 1; class 2: 2, 1, 1
    dice = [2 * 2 / 5, 2 * 1 / 4, 2 * 1 / 3]
    expected = 999 * (1 - sum(dice) / 3)
    assert calibration_guidance(a, b, 3).item() == pytest.approx(expected, rel=1e-5)
    assert calibration_guidance(a, a, 3).item() == pytest.approx(0, abs=1e-3)


def test_confidence_rule_and_complementary_loss():
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.3, 0.4, 0.3], [0.02, 0.03, 0.95]]).T.reshape(1, 3, 3, 1)
    # (p - min)/max: pixel 0 → 0.944 (> 0.8, class 1); pixel 1 → 0.25 (< 0.8 → background); pixel 2 → class 2
    assert confident_pseudo_label(probs, 0.8).flatten().tolist() == [1, 0, 2]
    weak = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    strong_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, a = complementary_loss(weak, torch.softmax(strong_logits, 1))
    assert 0 <= a.item() <= 1 and loss.item() > 0
    loss.backward()
    assert strong_logits.grad.abs().sum() > 0



def test_low_confidence_ignore_leaves_those_voxels_out_of_ce_dice():
    """``low_confidence=ignore``: the mask is exactly the voxels the code's rule labels by argmax, and the
    masked CE + Dice equals the loss on the kept voxels alone (whatever the others' labels are)."""
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.3, 0.4, 0.3], [0.02, 0.03, 0.95]]).T.reshape(1, 3, 3, 1)
    assert confident_mask(probs, 0.8).flatten().tolist() == [True, False, True]
    logits = torch.randn(1, 3, 3, 1)
    labels = confident_pseudo_label(probs, 0.8)
    keep = confident_mask(probs, 0.8)
    other = labels.clone()
    other[~keep] = 2  # what an ignored voxel is labelled must not matter
    masked = ce_dice(logits, labels, keep)
    assert masked == pytest.approx(ce_dice(logits, other, keep).item())
    kept_only = ce_dice(logits[..., [0, 2], :], labels[..., [0, 2], :])
    assert masked == pytest.approx(kept_only.item(), rel=1e-5)
    assert ce_dice(logits, labels) != pytest.approx(masked.item())  # the code's rule counts the background voxel


def test_complementary_loss_is_finite_when_probabilities_underflow():
    """A confident network's float32 softmax holds exact zeros; the entropy weight a must keep a finite
    gradient there (an xlogy(p, p) entropy gives 0/0 = NaN, which diverged a PH2 run)."""
    logits = torch.zeros(2, 3, 4, 4)  # each class wins some rows with p = 1.0, elsewhere p = 0.0 exactly
    logits[:, 0, 0] = 200.0
    logits[:, 1, 1:3] = 200.0
    logits[:, 2, 3] = 200.0
    logits[1, 2, 3, :2] = 5.0
    logits.requires_grad_(True)
    probs = torch.softmax(logits, 1)
    assert (probs == 0).any()
    loss, a = complementary_loss(probs.detach(), probs)
    (a * loss).backward()
    assert torch.isfinite(loss) and torch.isfinite(a) and torch.isfinite(logits.grad).all()
    # the weight is Categorical's entropy of each class map over the voxels, as in the authors' code
    flat = probs.detach().reshape(2, 3, -1)
    expected = 1 - torch.distributions.Categorical(probs=flat).entropy() / math.log(16)
    assert a.item() == pytest.approx(expected.mean().item(), abs=1e-5)


# ----------------------------------------------------------------------------- networks
@pytest.mark.parametrize("arch, patch", [(ARCH_2D, (32, 32)), (ARCH_3D, (8, 24, 24))])
def test_rectification_net_shapes_2d_3d(arch, patch):
    torch.manual_seed(0)
    net = rectification_net_from_plans(arch, patch, 2, 4, width_factor=0.5)
    assert [s.block.conv0.out_channels for s in net.encoder.stages[1:]] == [8, 8, 8]
    x = torch.randn(2, 2, *patch)
    colour = colorize(torch.randint(0, 4, (2, *patch)), 4)
    lfr = LatentRectification()  # the authors' T = 10, cosine, DDIM [9, 0]
    lat, logits = lfr.loss_and_logits(net, x, colour, torch.tensor([0.0, 999.0]), colour)
    assert logits.shape == (2, 4, *patch) and lat.ndim == 0
    sampled = lfr.sample(net, x, colour, torch.tensor([10.0, 10.0]))
    assert sampled.shape == (2, 4, *patch) and torch.isfinite(sampled).all() and not sampled.requires_grad
    assert lfr.scheduler.timesteps.tolist() == [9, 0]


def test_latent_strides_keep_odd_and_small_axes():
    assert latent_strides([16, 16]) == [[2, 2], [2, 2]]
    assert latent_strides([4, 6, 3]) == [[2, 2, 1], [1, 1, 1]]


def test_latent_denoiser_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    denoiser, sched = latent_diffusion_head(8, (8, 8))
    x0 = torch.nn.functional.leaky_relu(torch.randn(4, 8, 8, 8))  # like the encoder's bottleneck features
    cond = x0 + 0.3 * torch.randn_like(x0)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 6, 9])
    x_t = sched.q_sample(x0, t, noise)
    opt = torch.optim.Adam(denoiser.parameters(), 3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(denoiser(x_t, t, cond), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- gradient flow in the trainer
@pytest.fixture(scope="module")
def trainer2d(demo2d):
    from semidiff_nnunet import planning
    from semidiff_nnunet.plugins.diffrect import DiffRectTrainer
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans = planning.load_plans(demo2d, "semidiffDemoPlans")
    plans["continue_training"] = False
    RunConfig(labeled=LabeledSpec.parse("0.5"), hparams={"refine_start": 0.0, "refine_min_updates": 0}).write(plans)
    dataset_json = json.loads((planning.preprocessed_folder(demo2d) / "dataset.json").read_text(encoding="utf-8"))
    t = DiffRectTrainer(plans, "2d", 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    t.initialize()
    return t


def _batches(trainer, n_l=2, n_u=2):
    g = torch.Generator().manual_seed(0)
    p = trainer.configuration_manager.patch_size
    lab = torch.randint(0, 3, (n_l, 1, *p), generator=g).float()
    labeled = {"data": torch.randn(n_l, 1, *p, generator=g), "target": [lab, lab[:, :, ::2, ::2]]}
    x_u = torch.randn(n_u, 1, *p, generator=g)
    return labeled, {"data": x_u, "data_strong": 1.05 * x_u}


def _grad_norms(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.slow  # plans the demo dataset
def test_gradients_reach_rectifier_not_through_rectified_labels(trainer2d):
    t = trainer2d
    t.network.train()
    t.rectifier.train()
    labeled, unlabeled = _batches(t)
    t.network.zero_grad(set_to_none=True)
    t.rectifier.zero_grad(set_to_none=True)
    carry = {}
    terms = t.compute_step_losses(labeled, unlabeled, carry)
    assert {"supervised", "unsupervised", "rect_supervised", "rect_unsupervised"} <= set(terms)
    # the rectification losses train the rectifier and nothing else (pseudo labels are constants)
    (terms["rect_supervised"] + terms["rect_unsupervised"]).backward(retain_graph=True)
    assert _grad_norms(t.rectifier) > 0 and _grad_norms(t.network) == 0
    t.rectifier.zero_grad(set_to_none=True)
    (terms["supervised"] + terms["unsupervised"]).backward()
    assert _grad_norms(t.network) > 0 and _grad_norms(t.rectifier) == 0
    # step 3: the rectified labels come from the rectifier without a graph; the loss trains only the segmenter
    x_u, cond, tau = carry["x_w"][2:], carry["cond_colour"][2:], carry["guidance"][2:]
    y_r = t.rectified_pseudo_labels(x_u, cond, tau)
    assert not y_r.requires_grad and y_r.shape == (2, *t.configuration_manager.patch_size)
    assert t.rectifier.training  # sampled in eval mode, then back to training mode
    t.network.zero_grad(set_to_none=True)
    ce_dice(t.highest_resolution(t.network(x_u)), y_r).backward()
    assert _grad_norms(t.network) > 0 and _grad_norms(t.rectifier) == 0


def _snapshot(t):
    return {"network": copy.deepcopy(t.network.state_dict()), "opt": copy.deepcopy(t.optimizer.state_dict()),
            "rect": copy.deepcopy(t.rectifier.state_dict()),
            "rect_opt": copy.deepcopy(t.extra_optimizers["rectifier"][0].state_dict()),
            "rng": torch.get_rng_state()}


def _restore(t, snap):
    t.network.load_state_dict(snap["network"])
    t.optimizer.load_state_dict(snap["opt"])
    t.rectifier.load_state_dict(snap["rect"])
    t.extra_optimizers["rectifier"][0].load_state_dict(snap["rect_opt"])
    torch.set_rng_state(snap["rng"])


@pytest.mark.slow  # plans the demo dataset
def test_train_step_takes_the_rectification_step(trainer2d):
    """After refine_start the iteration takes a second optimiser step of the segmentation network on
    the rectified labels: from the same state, the network ends elsewhere than without that step,
    while the rectifier (not part of that step) ends at the same place."""
    t = trainer2d
    labeled, unlabeled = _batches(t)
    t.dataloader_unlabeled = iter(lambda: unlabeled, None)
    t.hp.rect_gate = False
    start = _snapshot(t)
    it = t.burnin_iterations + 10
    t.iteration, t.hp.refine_start = it, 0.9  # starts at half the run: not yet
    out = t.train_step(labeled)
    assert "term/rectified" not in out and t.iteration == it + 1
    without = _snapshot(t)
    _restore(t, start)
    t.iteration, t.hp.refine_start = it, 0.0  # started
    out = t.train_step(labeled)
    assert out["term/rectified"] > 0 and t.iteration == it + 1
    with_rect = _snapshot(t)
    assert out["loss"] == pytest.approx(sum(float(out[k]) for k in out if k.startswith("term/") and "/_" not in k),
                                        rel=1e-5)
    for k in without["rect"]:
        assert torch.equal(without["rect"][k], with_rect["rect"][k]), k
    assert any(not torch.equal(without["network"][k], with_rect["network"][k]) for k in without["network"])
    t.dataloader_unlabeled = None
    t.hp.rect_gate = True


@pytest.mark.slow  # plans the demo dataset
def test_low_confidence_setting_reaches_the_unsupervised_term(trainer2d):
    from semidiff_nnunet import api
    from semidiff_nnunet.errors import SemidiffError

    t = trainer2d
    labeled, unlabeled = _batches(t)
    terms, it = {}, t.iteration
    t.iteration = t.burnin_iterations + 500  # the unlabeled weight is on
    for rule in ("background", "ignore"):
        t.hp.low_confidence = rule
        torch.manual_seed(0)
        with torch.no_grad():
            terms[rule] = t.compute_step_losses(labeled, unlabeled, {})["unsupervised"].item()
    t.hp.low_confidence, t.iteration = "background", it
    assert terms["background"] > 0 and terms["background"] != pytest.approx(terms["ignore"])
    with pytest.raises(SemidiffError, match="low_confidence=drop: choose one of background, ignore"):
        api.check_train_options("diffrect", overrides={"low_confidence": "drop"})


@pytest.mark.slow  # plans the demo dataset
def test_rectified_supervision_is_off_while_the_rectifier_loses_on_labeled_patches(trainer2d, monkeypatch):
    t = trainer2d
    labeled, unlabeled = _batches(t)
    carry = {}
    t.compute_step_losses(labeled, unlabeled, carry)
    y_l = t.labels_of(labeled)
    t.iteration = t.rect_start + 5

    def rectifier_labels(labeled_part):
        def sample(x, cond, tau):
            out = torch.zeros((x.shape[0], *x.shape[2:]), dtype=torch.long)
            out[:2] = labeled_part
            return out
        return sample

    monkeypatch.setattr(t, "rectified_pseudo_labels", rectifier_labels((y_l + 1) % 3))  # wrong everywhere
    terms = t.rectified_supervision(labeled, unlabeled, carry)
    assert terms["_rect_dice_labeled"] < terms["_seg_dice_labeled"]
    assert terms["_rect_weight"] == 0 and terms["rectified"] == 0 and not terms["rectified"].requires_grad
    monkeypatch.setattr(t, "rectified_pseudo_labels", rectifier_labels(y_l))  # the ground truth
    terms = t.rectified_supervision(labeled, unlabeled, carry)
    assert terms["_rect_dice_labeled"] > terms["_seg_dice_labeled"]
    assert terms["_rect_weight"] > 0 and terms["rectified"].requires_grad


# ----------------------------------------------------------------------------- end to end
SHORT = ["--epochs", "2", "--iters-per-epoch", "2", "--no-val", "--set", "refine_start=1", "--set", "rect_gate=false"]


@pytest.mark.slow
def test_2d_cli_train_and_stock_predict(demo2d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "diffrect", "--labeled", "0.2", "-c", "2d", *SHORT, *TINY)
    assert code == 0, err
    from semidiff_nnunet import api

    info = api.run_info(demo2d, "diffrect", "0.2", 0, "2d", 0, "semidiffDemoPlans")
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(ck["semidiff"]["networks"]) == {"network", "rectifier"} and "rectifier" in ck["semidiff"]["optimizers"]
    assert ck["semidiff"]["iteration"] == 4
    # rectified supervision starts at half the run (iteration 2): not in epoch 0, in epoch 1
    assert math.isnan(ck["logging"]["term/rectified"][0]) and ck["logging"]["term/rectified"][1] > 0
    assert ck["network_weights"].keys() == ck["semidiff"]["networks"]["network"].keys()
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["hparams"]["refine_start"] == 1.0 and run["hparams"]["num_timesteps"] == 10

    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", "-d", demo2d, "-m", "diffrect", "--labeled", "0.2", "-c", "2d",
                           "-i", raw(demo2d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    files = sorted(pred.glob("*.nii.gz"))
    assert len(files) == 3

    assert_stock_predictor_matches(run_cli, demo2d, "diffrect", "0.2", pred, tmp_path)


@pytest.mark.slow
def test_3d_cli_train_and_predict(demo3d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo3d, "-m", "diffrect", "--labeled", "2", "-c", "3d_fullres",
                           *SHORT, *TINY)
    assert code == 0, err
    pred = tmp_path / "pred3d"
    code, _, err = run_cli("predict", "-d", demo3d, "-m", "diffrect", "--labeled", "2", "-c", "3d_fullres",
                           "-i", raw(demo3d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
