"""SuperDiffusion: eq. 3, the label-free cycle loss, CPS, rounds of diffusion, the inference module, CLI runs."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import TINY
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from helpers import assert_stock_predictor_matches, load_image, raw

from semidiff_nnunet.diffusion import alphas_cumprod_from_betas, get_beta_schedule, q_sample
from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.networks.timestep_unet import TimestepConditionedUNet
from semidiff_nnunet.plugins.superdiffusion.networks import MaskPathway, reconstruct_image
from semidiff_nnunet.plugins.superdiffusion.trainer import (
    SuperDiffusionHParams,
    SuperDiffusionTrainer,
    cross_pseudo_supervision,
    cycle_loss,
    diffusion_rounds,
    image_pathway,
    network_pass,
)
from semidiff_nnunet.training.hparams import resolve_hparams

K = 3  # classes of the toy problems


def _unet(dim: int, in_ch: int, out_ch: int, ds: bool = False) -> PlainConvUNet:
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    return PlainConvUNet(in_ch, 3, [4, 8, 8], conv, 3, [1, 2, 2], 1, out_ch, 1, True, norm, {"affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=ds)


def _pathways(dim: int = 2, c_img: int = 1, ds: bool = False, **kw):
    f_m = MaskPathway(TimestepConditionedUNet(_unet(dim, c_img + K, K, ds), 16), K, **kw)
    f_i = TimestepConditionedUNet(_unet(dim, c_img + K, c_img), 16)
    return f_m, f_i


# ----------------------------------------------------------------------------------------- eq. 3
@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_eq3_recovers_the_image_exactly_from_the_true_noise(schedule):
    ab = alphas_cumprod_from_betas(get_beta_schedule(schedule, 1000))  # float64
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    t = torch.tensor([0, 10, 500, 900])
    noisy = q_sample(x, ab[t], v)
    assert torch.allclose(reconstruct_image(noisy, v, ab[t]), x, atol=1e-9, rtol=0)
    # any other noise estimate gives another image (the sign of eq. 3's second term matters)
    assert not torch.allclose(reconstruct_image(noisy, -v, ab[t]), x, atol=1e-3)


# ----------------------------------------------------------------------------------------- phase 1
def test_cycle_loss_decreases_and_trains_both_pathways():
    """A few Adam steps on one toy batch: the cycle loss falls below what predicting ε = 0 gives (1.0),
    which needs the image pathway to read its noisy image; the mask pathway receives gradient."""
    torch.manual_seed(0)
    f_m, f_i = _pathways()
    x = torch.randn(4, 1, 8, 8)
    opt = torch.optim.Adam([*f_m.parameters(), *f_i.parameters()], 1e-2)
    losses = []
    for step in range(25):
        opt.zero_grad()
        loss = cycle_loss(f_m, f_i, x)
        loss.backward()
        if step == 0:
            grads = [p.grad for p in f_m.net.unet.parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads)  # gradient reaches f_m through the mask
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first and last < 0.8, (first, last)


class _SeeingImage(torch.nn.Module):
    """An image pathway that records its input (image part ⊕ mask part) and returns a function of it."""

    def __init__(self, c_img: int = 1):
        super().__init__()
        self.c_img, self.seen = c_img, []
        self.conv = torch.nn.Conv2d(c_img + K, c_img, 3, padding=1)

    def forward(self, x, t):
        self.seen.append(x.detach().clone())
        return self.conv(x)


class _ConstantMask(torch.nn.Module):
    """A 'mask pathway' whose logits do not depend on the image: nothing about it reaches f_i's mask input."""

    num_classes, num_timesteps = K, 1000

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_betas(get_beta_schedule("linear", 1000)).float())
        self.logits = torch.nn.Parameter(torch.randn(1, K, 1, 1))

    def forward(self, image, noise=None, t=None):
        return self.logits.expand(image.shape[0], K, *image.shape[2:])


def _cycle_inputs(f_m, x, form, seed=3):
    f_i = _SeeingImage()
    torch.manual_seed(seed)
    loss = cycle_loss(f_m, f_i, x, form=form)
    (seen,) = f_i.seen
    return seen[:, :1], seen[:, 1:], loss


def test_paper_cycle_feeds_pure_noise_and_the_mask_carries_the_image():
    """Eq. 6 (``cycle="paper"``): f_i's image input is pure noise q(0 | t'), the same for any image given the
    seed, so only the mask (from f_m, which reads the image) can tell f_i about the image; with an f_m
    that ignores its image, f_i sees exactly the same input for two different images. The code's form
    feeds a noisy copy of the image instead."""
    torch.manual_seed(0)
    f_m, _ = _pathways()
    x, other = torch.randn(2, 1, 16, 16), 3 * torch.randn(2, 1, 16, 16)
    img_a, mask_a, loss_a = _cycle_inputs(f_m, x, "paper")
    img_b, mask_b, loss_b = _cycle_inputs(f_m, other, "paper")
    assert torch.equal(img_a, img_b)  # the image input does not depend on the image
    assert not torch.allclose(mask_a, mask_b, atol=1e-4)  # the mask does
    assert loss_a != loss_b  # and the loss still reconstructs the image (eq. 7)
    # it is q(0 | t') = sqrt(1 − ᾱ_t')·n: the seed's draws in cycle_loss's order (t, v_m, t', n)
    torch.manual_seed(3)
    torch.randint(0, 1000, (2,)), torch.randn(2, K, 16, 16)
    t2, n = torch.randint(0, 1000, (2,)), torch.randn(2, 1, 16, 16)
    expect = (1 - f_m.alphas_cumprod[t2]).sqrt().view(2, 1, 1, 1) * n
    assert torch.allclose(img_a, expect, atol=1e-6)
    # an f_m that ignores the image: f_i's whole input is the same for both images
    const = _ConstantMask()
    ia, ma, _ = _cycle_inputs(const, x, "paper")
    ib, mb, _ = _cycle_inputs(const, other, "paper")
    assert torch.equal(ia, ib) and torch.equal(ma, mb)
    # the code's form: a noisy copy of the image (what differs between the two settings)
    ca, _, _ = _cycle_inputs(const, x, "code")
    cb, _, _ = _cycle_inputs(const, other, "code")
    assert not torch.allclose(ca, cb, atol=1e-3)


@pytest.mark.parametrize("pure_noise", [False, True])
def test_the_reconstruction_target_is_the_noise_that_eq3_turns_into_the_image(pure_noise):
    """Both forms' ε target: eq. 3 of f_i's image input with it returns the image, so MSE(ε̂, v) and eq. 7's
    (i − î)² have the same minimiser; with pure noise it is not the drawn noise."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    ab = alphas_cumprod_from_betas(get_beta_schedule("linear", 1000)).float()
    probs, f_i = torch.rand(4, K, 8, 8), _SeeingImage()
    torch.manual_seed(1)
    _, v, noisy, a = image_pathway(f_i, x, probs, ab, 1000, pure_noise=pure_noise)
    assert torch.allclose(reconstruct_image(noisy, v, a), x, atol=1e-3)
    torch.manual_seed(1)
    torch.randint(0, 1000, (4,))
    drawn = torch.randn(4, 1, 8, 8)
    assert torch.equal(v, drawn) != pure_noise


def test_cycle_and_checkpointing_choices_are_checked():
    hp = resolve_hparams(SuperDiffusionHParams, {"cycle": "paper", "checkpointing": "rounds"})
    assert (hp.cycle, hp.checkpointing) == ("paper", "rounds")
    assert (SuperDiffusionHParams().cycle, SuperDiffusionHParams().checkpointing) == ("code", "all")
    with pytest.raises(SemidiffError, match="cycle=eq6: choose one of code, paper"):
        resolve_hparams(SuperDiffusionHParams, {"cycle": "eq6"})
    with pytest.raises(SemidiffError, match="checkpointing=yes: choose one of all, rounds, none"):
        resolve_hparams(SuperDiffusionHParams, {"checkpointing": "yes"})
    with pytest.raises(SemidiffError, match="recon_loss=x0: choose one of eps, image"):
        resolve_hparams(SuperDiffusionHParams, {"recon_loss": "x0"})


class _NoLabels(dict):
    """A labeled batch whose ``target`` must not be read."""

    def __getitem__(self, key):
        if key == "target":
            raise AssertionError("phase 1 read labeled['target']")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "target":
            raise AssertionError("phase 1 read labeled['target']")
        return super().get(key, default)


def test_phase1_step_reads_no_label_and_ignores_label_values():
    f_m, f_i = _pathways()
    fake = types.SimpleNamespace(network=f_m, image=f_i, hp=SuperDiffusionHParams(),
                                 images_only=SuperDiffusionTrainer.images_only)
    x_l, x_u = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    labeled = _NoLabels(data=x_l, target=[torch.zeros(2, 1, 16, 16)])
    torch.manual_seed(1)
    a = SuperDiffusionTrainer.pretrain_losses(fake, labeled, {"data": x_u}, {})["cycle"]
    # the same step with other label values in an ordinary dict gives the bit-identical loss
    other = {"data": x_l, "target": [torch.randint(0, K, (2, 1, 16, 16)).float()]}
    torch.manual_seed(1)
    b = SuperDiffusionTrainer.pretrain_losses(fake, other, {"data": x_u}, {})["cycle"]
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- phase 2
def test_cps_is_symmetric_and_detaches_its_targets():
    torch.manual_seed(0)
    t = torch.randn(2, K, 6, 6, requires_grad=True)
    s = torch.randn(2, K, 6, 6, requires_grad=True)
    to_s, to_t = cross_pseudo_supervision(t, s)
    swapped_to_s, swapped_to_t = cross_pseudo_supervision(s, t)
    assert torch.equal(to_s, swapped_to_t) and torch.equal(to_t, swapped_to_s)
    assert to_s.item() == pytest.approx(torch.nn.functional.cross_entropy(s, t.argmax(1)).item())
    (g_t,) = torch.autograd.grad(to_s, t, allow_unused=True)  # the student's term moves only the student
    assert g_t is None or g_t.abs().sum() == 0
    (g_t,) = torch.autograd.grad(to_t, t)
    assert g_t.abs().sum() > 0


class _RecordingMask(torch.nn.Module):
    """A deterministic 'mask pathway': logits depend on the image only."""

    num_classes, num_timesteps = K, 1000

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_betas(get_beta_schedule("linear", 1000)).float())
        self.conv = torch.nn.Conv2d(1, K, 3, padding=1)

    def from_noise(self, image, noise, t):
        return self.conv(image)

    def forward(self, image, noise=None, t=None):  # MaskPathway's training pass
        return self.from_noise(image, noise, t)


class _RecordingImage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conditions = []
        self.conv = torch.nn.Conv2d(1 + K, 1, 3, padding=1)

    def forward(self, x, t):
        self.conditions.append(x[:, 1:].detach().clone())
        return self.conv(x)


@pytest.mark.parametrize("chained", [True, False])
def test_rounds_chained_vs_independent(chained):
    """Chained (paper): round r is conditioned on round r−1's mask; independent (code): every round
    on the teacher's first mask. Conditions are detached probabilities."""
    torch.manual_seed(0)
    f_m, f_i = _RecordingMask(), _RecordingImage()
    x = torch.randn(2, 1, 8, 8)
    first = torch.randn(2, K, 8, 8, requires_grad=True)
    out = diffusion_rounds(f_m, f_i, x, first, 4, chained)
    assert len(out) == 4
    p0 = first.detach().softmax(1)
    assert torch.allclose(out[0][2], p0)
    for r in range(1, 4):
        cond = out[r][2]
        assert not cond.requires_grad
        if chained:
            assert torch.allclose(cond, out[r - 1][0].detach().softmax(1))
            assert not torch.allclose(cond, p0)
        else:
            assert torch.equal(cond, p0)
    # what f_i saw is 2·cond − 1
    assert all(torch.allclose(seen, 2 * o[2] - 1) for seen, o in zip(f_i.conditions, out))
    # alignment gradients reach the mask pathway, reconstruction gradients the image pathway
    m_r, rec, _ = out[-1]
    assert torch.autograd.grad(m_r.sum(), f_m.conv.weight)[0].abs().sum() > 0
    assert torch.autograd.grad(rec, f_i.conv.weight)[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------- memory
def _cotrain_like(f_m, f_i, x, recompute, rounds=3):
    """The co-training step's network passes: the teacher's first pass, then R chained rounds; one loss."""
    torch.manual_seed(11)
    n, shape = x.shape[0], x.shape[2:]
    out = network_pass(f_m, x, torch.randn(n, K, *shape), torch.randint(0, 1000, (n,)), recompute=recompute)
    first = out[0]
    target = first.detach().argmax(1)
    loss = torch.nn.functional.cross_entropy(first, target) + sum(o.sum() for o in out[1:]) * 1e-3
    for m_r, rec, _ in diffusion_rounds(f_m, f_i, x, first, rounds, True, recompute=recompute):
        loss = loss + torch.nn.functional.cross_entropy(m_r, target) / rounds + rec / rounds
    return loss + cycle_loss(f_m, f_i, x, recompute=recompute)


def _saved_bytes_and_grads(dim, recompute):
    torch.manual_seed(0)
    f_m, f_i = _pathways(dim, ds=True)
    x = torch.randn(2, 1, *((16, 16) if dim == 2 else (8, 8, 8)))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _cotrain_like(f_m, f_i, x, recompute)
    loss.backward()
    grads = {f"{i}.{k}": p.grad for i, m in enumerate((f_m, f_i)) for k, p in m.named_parameters()
             if p.grad is not None}
    return loss.detach(), sum(saved), grads


@pytest.mark.parametrize("dim", [2, 3])
def test_checkpointing_keeps_the_gradients_and_stores_far_less(dim):
    """Activation checkpointing of the network passes (``checkpointing``): the same loss and the same
    gradients as one backward through the stored graph of every round (to 1e-5; in practice bit-identical),
    while the forward stores a small fraction of the activations (what the backward would hold)."""
    loss_a, bytes_a, grads_a = _saved_bytes_and_grads(dim, recompute=False)
    loss_b, bytes_b, grads_b = _saved_bytes_and_grads(dim, recompute=True)
    assert torch.equal(loss_a, loss_b)
    assert set(grads_a) == set(grads_b) and len(grads_a) > 0
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5, rtol=1e-5) for k in grads_a)
    assert sum(int(g.abs().sum() > 0) for g in grads_b.values()) > len(grads_b) // 2
    assert bytes_b < 0.25 * bytes_a, (bytes_a, bytes_b)


def test_network_pass_without_grad_is_the_plain_call():
    f_m, _ = _pathways()
    x, v, t = torch.randn(1, 1, 16, 16), torch.randn(1, K, 16, 16), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(network_pass(f_m, x, v, t, recompute=True), f_m(x, v, t))


# ----------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("dim", [2, 3])
def test_inference_module_is_deterministic_and_is_one_forward_from_noise(dim):
    torch.manual_seed(0)
    f_m, _ = _pathways(dim, ds=True, infer_t=-1)
    f_m.eval()
    shape = (16, 16) if dim == 2 else (8, 8, 8)
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        a, b = f_m(x), f_m(x)
        assert isinstance(a, list) and all(torch.equal(p, q) for p, q in zip(a, b))
        t = torch.full((2,), 999)
        gen = torch.Generator().manual_seed(0)
        v = torch.randn((2, K, *shape), generator=gen)
        assert torch.equal(a[0], f_m.from_noise(x, v, t)[0])  # eq. 5 at T − 1 with the seeded noise
        f_m.infer_noise = "zeros"
        z = f_m(x)[0]
        assert torch.equal(z, f_m(x)[0]) and not torch.equal(z, a[0])
        f_m.infer_noise, f_m.infer_draws = "fixed", 3
        probs = torch.stack([f_m.from_noise(x, torch.randn((2, K, *shape), generator=torch.Generator().manual_seed(k)),
                                            t)[0].softmax(1) for k in range(3)]).mean(0)
        assert torch.allclose(f_m(x)[0].softmax(1), probs, atol=1e-5)


def test_mask_pathway_rejects_bad_settings():
    with pytest.raises(ValueError, match="infer_t"):
        _pathways(infer_t=1000)
    with pytest.raises(ValueError, match="infer_noise"):
        _pathways(infer_noise="random")


# ----------------------------------------------------------------------------------------- CLI runs
SHORT = ["--epochs", "3", "--iters-per-epoch", "2", "--set", "phase.pretrain=1", "--set", "rounds=2"]


def _check_run(dataset, configuration, labeled):
    from semidiff_nnunet import api

    info = api.run_info(dataset, "superdiffusion", labeled, 0, configuration, 0, "semidiffDemoPlans")
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    semi = ck["semidiff"]
    assert set(semi["networks"]) == {"network", "student", "image"} and set(semi["states"]) == {"selection"}
    log = ck["logging"]
    assert log["phase"] == ["pretrain", "cotrain", "cotrain"]
    assert np.isfinite(log["term/cycle"][0]) and np.isnan(log["term/cycle"][1:]).all()
    for term in ("supervised_teacher", "supervised_student", "cps", "align", "reconstruction"):
        assert np.isnan(log[f"term/{term}"][0]) and np.isfinite(log[f"term/{term}"][1:]).all(), term
    choice = semi["states"]["selection"]["choice"]
    assert choice in ("teacher", "student")
    exported = semi["networks"]["network" if choice == "teacher" else "student"]
    assert all(torch.equal(ck["network_weights"][k], v) for k, v in exported.items())
    recorded = json.loads((info.fold_folder / "superdiffusion_selection.json").read_text(encoding="utf-8"))
    assert recorded["predictor"] == choice
    return info


@pytest.mark.slow
def test_2d_superdiffusion_cli_both_phases_predict_and_stock_nnunet(demo2d, run_cli, tmp_path):
    # with the final validation (the path a user takes): the predictor is chosen on validation batches,
    # and nnU-Net's validation then scores the chosen network
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "superdiffusion", "--labeled", "0.2", "-c", "2d", *SHORT,
                           "--val-iters", "1", "--set", "select_batches=2", "--set", "infer_t=500", *TINY)
    assert code == 0, err
    info = _check_run(demo2d, "2d", "0.2")
    recorded = json.loads((info.fold_folder / "superdiffusion_selection.json").read_text(encoding="utf-8"))
    assert recorded["rule"] == "auto" and set(recorded["validation_dice"]) == {"teacher", "student"}
    summary = json.loads((info.fold_folder / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["foreground_mean"]["Dice"] >= 0 and len(summary["metric_per_case"]) > 0
    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", "-d", demo2d, "-m", "superdiffusion", "--labeled", "0.2", "-c", "2d",
                           "-i", raw(demo2d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    assert_stock_predictor_matches(run_cli, demo2d, "superdiffusion", "0.2", pred, tmp_path)
    # the inference module stock nnU-Net rebuilds from the run folder uses the run's --set infer_t
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(info.model_folder / "plans.json"))
    net = SuperDiffusionTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    assert isinstance(net, MaskPathway) and net.infer_t == 500


@pytest.mark.slow
def test_3d_superdiffusion_cli_both_phases_and_predict(demo3d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo3d, "-m", "superdiffusion", "--labeled", "2", "-c", "3d_fullres",
                           *SHORT, "--no-val", *TINY)
    assert code == 0, err
    _check_run(demo3d, "3d_fullres", "2")
    pred = tmp_path / "pred3d"
    code, _, err = run_cli("predict", "-d", demo3d, "-m", "superdiffusion", "--labeled", "2", "-c", "3d_fullres",
                           "-i", raw(demo3d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------- the trainer
PLANS = "semidiffDemoPlans"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return tmp_path / "results"


def _trainer(dataset: str, epochs: int = 4, **config) -> SuperDiffusionTrainer:
    from semidiff_nnunet import planning
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans = planning.load_plans(dataset, PLANS)
    plans["continue_training"] = False
    config.setdefault("phases", {"pretrain": "1"})
    config.setdefault("hparams", {"rounds": 2})
    RunConfig(method="superdiffusion", labeled=LabeledSpec.parse("0.5"), num_epochs=epochs,
              num_iterations_per_epoch=2, num_val_iterations_per_epoch=0, **config).write(plans)
    dataset_json = json.loads((planning.preprocessed_folder(dataset) / "dataset.json").read_text(encoding="utf-8"))
    t = SuperDiffusionTrainer(plans, "2d", 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    return t


def _params(*modules) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _one_step(dataset: str, epoch: int, target_seed: int, **hparams) -> dict:
    """One train_step of a fresh trainer at ``epoch`` on a fixed batch whose labels are drawn with ``target_seed``."""
    import itertools

    t = _trainer(dataset, hparams={"rounds": 2, **hparams})
    t.initialize()
    t.current_epoch = epoch
    t._enter_phase_of_current_epoch()
    g = torch.Generator().manual_seed(123)
    x_l, x_u = torch.randn(2, 1, 32, 32, generator=g), torch.randn(2, 1, 32, 32, generator=g)
    y = torch.randint(0, 3, (2, 1, 32, 32), generator=torch.Generator().manual_seed(target_seed)).float()
    with torch.no_grad():  # one target per deep-supervision output (the inference forward draws no global RNG)
        target = [torch.nn.functional.interpolate(y, size=o.shape[2:], mode="nearest") for o in t.network(x_l)]
    t.dataloader_unlabeled = itertools.repeat({"data": x_u})
    torch.manual_seed(7)
    t.train_step({"data": x_l, "target": target})
    return _params(t.network, t.image, t.student)


@pytest.mark.slow  # plans the demo dataset
@pytest.mark.parametrize("rule, scores, expect", [
    ("auto", {"teacher": 0.5, "student": 0.7}, "student"),
    ("auto", {"teacher": 0.7, "student": 0.7}, "teacher"),  # ties: the teacher
    ("auto", {"teacher": float("nan"), "student": 0.2}, "student"),
    ("auto", {"teacher": 0.3, "student": float("nan")}, "teacher"),
    ("student", None, "student"),
    ("teacher", None, "teacher"),
])
def test_predictor_selection_rule(demo2d, results, tmp_path, monkeypatch, rule, scores, expect):
    """The network that predicts is the one with the higher validation Dice (teacher on ties or when the
    student's is not measurable); a fixed ``predictor`` is used without measuring; the choice is recorded,
    and it is what nnU-Net's final validation and the exported weights use."""
    from types import SimpleNamespace

    t = _trainer(demo2d, hparams={"rounds": 2, "predictor": rule})
    t.initialize()
    t.output_folder = str(tmp_path)
    t.semi_split = SimpleNamespace(validation=["demo_000"])
    t.dataloader_val = object()
    asked = []
    monkeypatch.setattr(t, "validation_scores", lambda n: asked.append(n) or dict(scores))
    t.select_predictor()
    assert t.selection.choice == expect and (asked == [t.hp.select_batches]) == (rule == "auto")
    assert t.inference_network() is (t.student if expect == "student" else t.network)
    recorded = json.loads((tmp_path / "superdiffusion_selection.json").read_text(encoding="utf-8"))
    assert recorded["predictor"] == expect and recorded["rule"] == rule


@pytest.mark.slow  # plans the demo dataset
def test_phase1_weights_are_bit_identical_under_scrambled_labels(demo2d, results):
    """The trainer's phase-1 step on a batch with scrambled labels gives bit-identical weights; the same
    experiment in phase 2 (which learns from labels) does not — so the comparison can see label use."""
    a, b = _one_step(demo2d, 0, target_seed=1), _one_step(demo2d, 0, target_seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = _one_step(demo2d, 1, target_seed=1), _one_step(demo2d, 1, target_seed=2)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # plans the demo dataset
def test_resume_inside_the_cotraining_phase_is_exact(demo2d, results, monkeypatch):
    import shutil

    straight = _trainer(demo2d, save_every=1)
    straight.initialize()
    straight.run_training()
    reference = _params(straight.network, straight.image, straight.student)
    shutil.rmtree(results)

    crashing = _trainer(demo2d, save_every=1)
    original = SuperDiffusionTrainer.on_epoch_end

    def crash_after_epoch_2(self):
        original(self)  # checkpoint_latest holds epochs 0-2
        if self.current_epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(SuperDiffusionTrainer, "on_epoch_end", crash_after_epoch_2)
    crashing.initialize()
    with pytest.raises(KeyboardInterrupt):
        crashing.run_training()
    monkeypatch.setattr(SuperDiffusionTrainer, "on_epoch_end", original)

    resumed = _trainer(demo2d, save_every=1)
    resumed.load_checkpoint(str(crashing.output_folder + "/checkpoint_latest.pth"))
    assert resumed.current_epoch == 3 and resumed.current_phase.name == "cotrain"
    assert resumed.extra_optimizers["student"][0].state  # restored, not fresh
    resumed.run_training()
    got = _params(resumed.network, resumed.image, resumed.student)
    assert all(torch.equal(reference[k], got[k]) for k in got)


@pytest.mark.slow  # plans the demo dataset
@pytest.mark.parametrize("epoch", [0, 1])  # phase 1 (cycle), phase 2 (co-training)
def test_checkpointing_settings_give_the_same_training_step(demo2d, results, epoch):
    """The trainer's step (engine backward, clipping, SGD) with every network pass checkpointed, with the
    rounds only, and with nothing: bit-identical weights afterwards."""
    ref = _one_step(demo2d, epoch, 1, checkpointing="none")
    for setting in ("rounds", "all"):
        got = _one_step(demo2d, epoch, 1, checkpointing=setting)
        assert all(torch.equal(ref[k], got[k]) for k in ref), setting
