"""Diff-CL: high-pass filter, selective scan vs the recurrence, HF-Mamba, memory bank, losses, CLI runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from helpers import assert_stock_predictor_matches, load_image, raw

from semidiff_nnunet.plugins.diffcl import losses as L
from semidiff_nnunet.plugins.diffcl.hf_mamba import HFMamba, find_hf_mamba, high_pass_filter, insert_hf_mamba
from semidiff_nnunet.plugins.diffcl.mamba import (
    MambaScanBranch,
    TriOrientedMamba,
    fused_scan_available,
    selective_scan,
    selective_scan_torch,
)


def _unet(dim: int, in_ch: int = 1, classes: int = 3) -> PlainConvUNet:
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    return PlainConvUNet(in_ch, 3, [4, 8, 8], conv, 3, [1, 2, 2], 1, classes, 1, True, norm, {"affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


# ----------------------------------------------------------------------------------------- high-pass
@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 8)])
def test_high_pass_removes_constant_and_keeps_checkerboard(shape):
    const = torch.full((2, 3, *shape), 3.7)
    assert high_pass_filter(const, 0.5).abs().max() < 1e-5
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")).sum(0)
    checker = ((grid % 2) * 2.0 - 1).expand(2, 3, *shape)
    for thr in (0.3, 0.5, 0.8, 0.99):
        assert torch.allclose(high_pass_filter(checker, thr), checker, atol=1e-5)
    # the lowest non-zero frequency along the first axis (|ν| = 2/n ≤ 0.5) is removed, and gradients pass
    wave = torch.cos(2 * math.pi * torch.arange(shape[0]) / shape[0]).view(-1, *[1] * (len(shape) - 1))
    wave = wave.expand(*shape).clone()[None, None].requires_grad_()
    assert high_pass_filter(wave, 0.6).abs().max() < 1e-5
    assert torch.allclose(high_pass_filter(wave, 0.0), wave, atol=1e-5)  # threshold 0 keeps all
    high_pass_filter(wave + checker[:1, :1], 0.5).sum().backward()
    assert wave.grad is not None


# ----------------------------------------------------------------------------------------- scans
def naive_scan(u, delta, A, B, C, D, z, bias):
    """Step-by-step recurrence, one batch element, channel and state entry at a time."""
    bt, dm, length = u.shape
    n = A.shape[1]
    y = torch.zeros(bt, dm, length, dtype=torch.float64)
    for b in range(bt):
        for d in range(dm):
            h = [0.0] * n
            for t in range(length):
                dt = math.log1p(math.exp(float(delta[b, d, t] + bias[d])))  # softplus
                out = 0.0
                for s in range(n):
                    h[s] = math.exp(dt * float(A[d, s])) * h[s] + dt * float(B[b, s, t]) * float(u[b, d, t])
                    out += float(C[b, s, t]) * h[s]
                out += float(D[d]) * float(u[b, d, t])
                zz = float(z[b, d, t])
                y[b, d, t] = out * zz / (1 + math.exp(-zz))
    return y


def _scan_inputs(bt=2, dm=3, n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (r(bt, dm, length), r(bt, dm, length), -torch.rand(dm, n, generator=g, dtype=torch.float64) * 2 - 0.1,
            r(bt, n, length), r(bt, n, length), r(dm), r(bt, dm, length), r(dm))


@pytest.mark.parametrize("chunk", [0, 4])
def test_selective_scan_matches_recurrence(chunk):
    u, delta, A, B, C, D, z, bias = _scan_inputs()
    expected = naive_scan(u, delta, A, B, C, D, z, bias)
    got = selective_scan_torch(u, delta, A, B, C, D, z, bias, True, chunk_size=chunk)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(selective_scan(u, delta, A, B, C, D, z, bias, True, backend="torch"), got, atol=1e-6)


def test_grouped_scan_equals_separate_scans():
    """Channel groups with their own B and C (how the three directions run as one scan)."""
    first, second = _scan_inputs(seed=1), _scan_inputs(seed=2)  # 3 channels each
    (u1, d1, A1, B1, C1, D1, z1, b1), (u2, d2, A2, B2, C2, D2, z2, b2) = first, second
    u, delta, z = torch.cat([u1, u2], 1), torch.cat([d1, d2], 1), torch.cat([z1, z2], 1)
    A, D, bias = torch.cat([A1, A2]), torch.cat([D1, D2]), torch.cat([b1, b2])
    B, C = torch.stack([B1, B2], 1), torch.stack([C1, C2], 1)  # (Bt, G=2, N, L)
    got = selective_scan_torch(u, delta, A, B, C, D, z, bias, True)
    for g, chunk in enumerate((0, 3)):
        got_c = selective_scan_torch(u, delta, A, B, C, D, z, bias, True, chunk_size=chunk)
        assert torch.allclose(got_c, got, atol=1e-6)
        ref = selective_scan_torch(*(first if g == 0 else second), True)
        assert torch.allclose(got[:, 3 * g:3 * g + 3], ref, atol=1e-6)


def _naive_branch(branch: MambaScanBranch, x, z):
    u, delta, B, C = branch.ssm_inputs(x)
    A = -torch.exp(branch.A_log.float())
    return naive_scan(u.detach(), delta.detach(), A.detach(), B.detach(), C.detach(), branch.D.detach(),
                      z.detach(), branch.dt_proj.bias.detach()).float()


def _orders(shape):
    """Token visiting orders built independently of ``scan_order``: C-order index lists."""
    index = torch.arange(math.prod(shape)).view(shape)
    fwd = index.reshape(-1)
    if len(shape) == 2:  # rows are the slices: down each column
        sl = torch.tensor([index[h, w] for w in range(shape[1]) for h in range(shape[0])])
    else:
        sl = torch.tensor([index[d, h, w] for h in range(shape[1]) for w in range(shape[2]) for d in range(shape[0])])
    return {"forward": fwd, "backward": fwd.flip(0), "slice": sl}


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2)])
@pytest.mark.parametrize("direction", ["forward", "backward", "slice"])
def test_tri_oriented_scans_match_recurrence(shape, direction):
    torch.manual_seed(0)
    m = TriOrientedMamba(4, d_state=3, d_conv=2, expand=1, directions=(direction,), backend="torch")
    length = math.prod(shape)
    x = torch.randn(2, length, 4)
    got = m(x, shape)
    order = _orders(shape)[direction]
    xz = m.in_proj(x).transpose(1, 2)[..., order]
    xs, zs = xz.chunk(2, dim=1)
    y = _naive_branch(m.branches[f"{direction}_scan"], xs, zs)
    back = torch.empty_like(y)
    back[..., order] = y  # token order[i] got output y[i]
    expected = m.out_proj(back.transpose(1, 2))
    assert torch.allclose(got, expected, atol=1e-4)


def test_tri_oriented_mamba_sums_directions_and_is_causal():
    torch.manual_seed(1)
    shape = (2, 3, 4)
    full = TriOrientedMamba(6, backend="torch")
    x = torch.randn(1, 24, 6, requires_grad=True)
    total = full(x, shape)
    parts = []
    for d in ("forward", "backward", "slice"):
        single = TriOrientedMamba(6, directions=(d,), backend="torch")
        single.in_proj, single.out_proj = full.in_proj, full.out_proj
        single.branches[f"{d}_scan"] = full.branches[f"{d}_scan"]
        parts.append(single(x, shape))
    assert torch.allclose(total, sum(parts), atol=1e-5)  # out_proj is linear without bias
    # the forward scan alone: output at token 0 does not depend on later tokens
    fwd = TriOrientedMamba(6, directions=("forward",), backend="torch")
    fwd(x, shape)[0, 0].sum().backward()
    assert x.grad[0, 1:].abs().max() == 0 and x.grad[0, 0].abs().max() > 0
    total.sum().backward()
    assert all(p.grad is not None for p in full.parameters())


def test_fused_backend_errors_clearly_without_mamba_ssm():
    u, delta, A, B, C, D, z, bias = (t.float() for t in _scan_inputs())
    if fused_scan_available():
        pytest.skip("mamba-ssm is installed; see test_fused_scan_matches_torch")
    from semidiff_nnunet.errors import SemidiffError

    with pytest.raises(SemidiffError, match="scan_backend"):
        selective_scan(u, delta, A, B, C, D, z, bias, True, backend="fused")
    # auto falls back to the PyTorch scan
    assert torch.allclose(selective_scan(u, delta, A, B, C, D, z, bias, True, backend="auto"),
                          selective_scan_torch(u, delta, A, B, C, D, z, bias, True))


@pytest.mark.skipif(not fused_scan_available(), reason="needs mamba-ssm and a CUDA GPU")
def test_fused_scan_matches_torch():
    u, delta, A, B, C, D, z, bias = (t.float().cuda() for t in _scan_inputs(bt=2, dm=16, n=16, length=64))
    fused = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="fused")
    ref = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="torch")
    assert torch.allclose(fused, ref, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------- HF-Mamba
@pytest.mark.parametrize("dim", [2, 3])
def test_hf_mamba_in_planned_network_shapes_and_gradients(dim):
    torch.manual_seed(0)
    net = insert_hf_mamba(_unet(dim), stage=-1, hf_threshold=0.5, scan_backend="torch")
    (hfm,) = find_hf_mamba(net)
    assert hfm.mamba.directions == ("forward", "backward", "slice")
    x = torch.randn(2, 1, *([8] * dim))
    out = net(x)
    assert [tuple(o.shape) for o in out] == [(2, 3, *[8] * dim), (2, 3, *[4] * dim)]
    out[0].sum().backward()
    assert hfm.mamba.branches["slice_scan"].A_log.grad is not None and hfm.sa.fuse[0].weight.grad is not None
    # placement is a hyperparameter; residual=False returns F_o only (high frequencies + MLP)
    net2 = insert_hf_mamba(_unet(dim), stage=0, residual=False, slice_scan=False)
    (h2,) = find_hf_mamba(net2)
    assert h2.mamba.directions == ("forward", "backward") and net2(x)[0].shape == out[0].shape
    with pytest.raises(ValueError, match="outside"):
        insert_hf_mamba(_unet(dim), stage=3)


def test_hf_mamba_passes_no_low_frequency_without_residual():
    torch.manual_seed(0)
    h = HFMamba(4, torch.nn.Conv2d, torch.nn.InstanceNorm2d, {"affine": True}, hf_threshold=0.5, residual=False)
    torch.nn.init.zeros_(h.mamba.out_proj.weight)
    torch.nn.init.zeros_(h.mlp[2].weight)
    torch.nn.init.zeros_(h.mlp[2].bias)
    x = torch.randn(1, 4, 8, 8)
    out = h(x)  # = F_h: zero mean per channel (the DC term is filtered out)
    assert out.mean((2, 3)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------- losses
def test_cps_losses_are_symmetric_and_detach_targets():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 5, 5, requires_grad=True)
    b = torch.randn(2, 3, 5, 5, requires_grad=True)
    l_a, l_b = L.cross_pseudo_supervision(a, b, 0.7, 0.7)
    m_b, m_a = L.cross_pseudo_supervision(b, a, 0.7, 0.7)
    assert torch.allclose(l_a, m_a) and torch.allclose(l_b, m_b) and not torch.allclose(l_a, l_b)
    # L_p^c (first) trains only its own network
    l_a.backward()
    assert a.grad.abs().sum() > 0 and b.grad is None
    # eq. 6: Dice(DS, argmax CS) + λ1·CE
    expected = L.soft_dice_loss(b, a.argmax(1)) + 0.7 * torch.nn.functional.cross_entropy(b, a.argmax(1))
    assert torch.allclose(l_b, expected)
    # perfect agreement: Dice of a confident prediction ≈ 0
    sharp = torch.nn.functional.one_hot(a.argmax(1), 3).movedim(-1, 1) * 50.0
    c_loss, d_loss = L.cross_pseudo_supervision(sharp, sharp, 0.0, 0.0)
    assert c_loss < 1e-4 and d_loss < 1e-4


def test_contrastive_loss_matches_hand_computation():
    # 2-d features; class 0 anchors point along x, class 1 along y; τ = 0.5, k = 1
    a0 = torch.tensor([[1.0, 0.0]])
    a1 = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = L.label_propagation_loss([a0, a1, None], b, top_k=1, temperature=0.5)
    # class 0: cos(a0, b) = (1, 0, 1/√2): positive b_0, negative b_1
    #   -log(e^{1/0.5} / (e^{1/0.5} + e^{0/0.5})) = log(1 + e^{-2})
    # class 1: Σ_i cos = (0, 2, √2): positive b_1 (cos 1 for each anchor), negative b_0 (cos 0)
    #   2 anchors × log(1 + e^{-2})
    expected = 3 * math.log(1 + math.exp(-2))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert L.label_propagation_loss([a0, a1], b, 1, 0.5, "mean").item() == pytest.approx(expected / 3, rel=1e-6)
    # k = 2, class 0 only: positives b_0 and b_2 (cos 1, 1/√2), negatives b_1 and b_2 (cos 0, 1/√2)
    s = math.exp(0) + math.exp(2 ** -0.5 / 0.5)
    exp2 = -math.log(math.exp(2) / (math.exp(2) + s)) - math.log(math.exp(2 ** 0.5) / (math.exp(2 ** 0.5) + s))
    assert L.label_propagation_loss([a0], b, 2, 0.5).item() == pytest.approx(exp2, rel=1e-6)
    # gradients reach the unlabeled features; no anchors: zero, still attached
    bb = b.clone().requires_grad_()
    L.label_propagation_loss([a0, a1], bb, 1, 0.5).backward()
    assert bb.grad.abs().sum() > 0
    empty = L.label_propagation_loss([None, None], bb, 1, 0.5)
    assert empty.item() == 0 and empty.requires_grad


def test_memory_bank_admits_only_correct_labeled_pixels_and_is_bounded():
    bank = L.MemoryBank(num_classes=2, dim=3, size=4, per_step=3)
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [5.0, 0, 0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    preds = torch.tensor([0, 1, 1, 0, 0])  # pixels 0, 2, 4 are correct
    assert bank.update(feats, labels, preds) == 3
    assert bank.count.tolist() == [2, 1]
    stored0 = bank.features[0, :2]
    assert torch.allclose(stored0, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))  # normalised, pixel 1 never
    assert torch.allclose(bank.features[1, 0], torch.tensor([0, 0, 1.0]))
    # per_step caps admissions; FIFO keeps the newest `size` entries
    for step in range(3):
        many = torch.eye(3)[None].expand(10, 3, 3).reshape(30, 3) * (step + 1)
        bank.update(many, torch.zeros(30, dtype=torch.long), torch.zeros(30, dtype=torch.long))
    assert bank.count.tolist() == [4, 1] and bank.ptr[0] == (2 + 9) % 4
    # a direct push of 6 ordered entries into a size-4 queue keeps the last 4
    fifo = L.MemoryBank(1, 2, size=4, per_step=100)
    entries = torch.stack([torch.ones(6), torch.arange(1, 7).float()], 1)
    fifo.push(entries[:1], torch.zeros(1, dtype=torch.long))
    fifo.push(entries[1:], torch.zeros(5, dtype=torch.long))
    kept = torch.nn.functional.normalize(entries[2:], dim=1)
    assert fifo.count.item() == 4 and fifo.ptr.item() == 1  # the next slot to overwrite holds the oldest
    assert torch.allclose(fifo.features[0][torch.tensor([1, 2, 3, 0])], kept)  # the two oldest are gone
    anchors = bank.sample(per_class=3)
    assert anchors[0].shape == (3, 3) and anchors[1].shape == (1, 3)
    state = bank.state_dict()
    other = L.MemoryBank(2, 3, 4, 3)
    other.load_state_dict(state)
    assert torch.equal(other.features, bank.features) and torch.equal(other.ptr, bank.ptr)
    # labels outside [0, C) (nnU-Net's ignore label) are never admitted
    assert L.MemoryBank(2, 3, 4, 3).update(feats[:2], torch.tensor([2, 2]), torch.tensor([2, 2])) == 0


def test_memory_bank_gathers_across_fake_ranks(monkeypatch):
    """Two ranks with different numbers of admitted pixels: both push rank 0's then rank 1's."""
    other_rank = {"feats": torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), "labels": torch.tensor([1, 1, 0])}
    dist = L.dist
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    calls = []

    def fake_all_gather(out, tensor):
        calls.append(tuple(tensor.shape))
        if tensor.ndim == 1 and tensor.numel() == 1:  # sizes
            mine = other_rank["feats"].shape[0] if len(calls) == 1 else other_rank["labels"].shape[0]
            out[0].copy_(tensor)
            out[1].fill_(mine)
            return
        theirs = other_rank["feats"] if tensor.ndim == 2 else other_rank["labels"]
        padded = torch.zeros_like(tensor)
        padded[: theirs.shape[0]] = theirs
        out[0].copy_(tensor)
        out[1].copy_(padded)

    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    bank = L.MemoryBank(2, 2, size=8, per_step=8)
    mine = torch.tensor([[1.0, 0.0]])
    assert bank.update(mine, torch.tensor([0]), torch.tensor([0])) == 4
    assert calls[1] == (3, 2)  # padded to the longest rank
    assert bank.count.tolist() == [2, 2]
    assert torch.allclose(bank.features[0, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # rank 0, then rank 1
    assert torch.allclose(bank.features[1, :2], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


# ----------------------------------------------------------------------------------------- CLI runs
SHORT = ["--epochs", "2", "--iters-per-epoch", "2"]


def _check_run(dataset, configuration, labeled):
    from semidiff_nnunet import api

    info = api.run_info(dataset, "diffcl", labeled, 0, configuration, 0, "semidiffDemoPlans")
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    semi = ck["semidiff"]
    assert set(semi["networks"]) == {"network", "ds", "projector"} and set(semi["states"]) == {"memory_bank"}
    assert semi["states"]["memory_bank"]["count"].sum() > 0  # correct DS pixels reached the bank
    assert any(".hfm.mamba." in k for k in ck["network_weights"])  # the CS network is what is exported
    terms = {k for k in ck["logging"] if k.startswith("term/")}
    assert {"term/supervised_cs", "term/supervised_ds", "term/cps_cs", "term/cps_ds", "term/contrastive"} <= terms
    assert all(np.isfinite(ck["logging"][k]).all() for k in terms)
    return info


@pytest.mark.slow
def test_2d_diffcl_cli_train_predict_and_stock_nnunet(demo2d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "diffcl", "--labeled", "0.2", "-c", "2d", *SHORT,
                           "--no-val", "--set", "hf_threshold=0.6", *TINY)
    assert code == 0, err
    info = _check_run(demo2d, "2d", "0.2")
    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", "-d", demo2d, "-m", "diffcl", "--labeled", "0.2", "-c", "2d",
                           "-i", raw(demo2d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    # stock nnU-Net rebuilds the CS network (HF-Mamba settings from the plans) in a clean interpreter
    env = assert_stock_predictor_matches(run_cli, demo2d, "diffcl", "0.2", pred, tmp_path)
    shim = Path(env["nnUNet_extTrainer"])
    assert "DiffCLTrainer" in "".join(p.read_text(encoding="utf-8") for p in shim.glob("*.py"))
    # the network that trained and the one stock nnU-Net rebuilds from the run folder use --set's 0.6
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from semidiff_nnunet.plugins.diffcl import DiffCLTrainer

    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    pm = PlansManager(str(info.model_folder / "plans.json"))
    net = DiffCLTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    assert [m.hf_threshold for m in find_hf_mamba(net)] == [0.6]
    net.load_state_dict(ck["network_weights"])


@pytest.mark.slow  # plans the demo dataset
def test_cs_network_takes_its_hyperparameters_from_the_run(demo2d):
    """build_network_architecture (what stock nnU-Net calls with the plans only) builds the CS network
    with the run's --set values, and with the paper's defaults when the plans hold no run."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from semidiff_nnunet import planning
    from semidiff_nnunet.plugins.diffcl import DiffCLTrainer
    from semidiff_nnunet.training import RunConfig

    plans = planning.load_plans(demo2d, "semidiffDemoPlans")
    stock = PlansManager(dict(plans))
    assert [m.hf_threshold for m in find_hf_mamba(DiffCLTrainer.build_network_architecture(
        stock, stock.get_configuration("2d"), 1, 3, False))] == [0.5]
    RunConfig(method="diffcl", hparams={"hf_threshold": 0.6, "d_state": 8}).write(plans)
    pm = PlansManager(plans)
    net = DiffCLTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    (hfm,) = find_hf_mamba(net)
    assert hfm.hf_threshold == 0.6
    assert {b.d_state for b in hfm.mamba.branches.values()} == {8}


@pytest.mark.slow
def test_3d_diffcl_cli_train_and_predict(demo3d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo3d, "-m", "diffcl", "--labeled", "2", "-c", "3d_fullres", *SHORT,
                           "--no-val", *TINY)
    assert code == 0, err
    _check_run(demo3d, "3d_fullres", "2")
    pred = tmp_path / "pred3d"
    code, _, err = run_cli("predict", "-d", demo3d, "-m", "diffcl", "--labeled", "2", "-c", "3d_fullres",
                           "-i", raw(demo3d) / "imagesTs", "-o", pred, "--plans", "semidiffDemoPlans",
                           "--device", "cpu", "--disable-tta")
    assert code == 0, err
    ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from semidiff_nnunet.plugins.diffcl.losses import MemoryBank
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
bank = MemoryBank(2, 2, size=4, per_step=8)
feats = torch.tensor([[1.0, 0.0]] * (rank + 1)) + rank * torch.tensor([0.0, 1.0])
labels = torch.full((rank + 1,), rank)
preds = labels.clone()
preds[0] = 1 - rank if rank == 1 else preds[0]  # rank 1's first pixel is wrong
n = bank.update(feats, labels, preds)
torch.save({"n": n, **bank.state_dict()}, sys.argv[2] + f"/{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_memory_bank_identical_on_two_gloo_ranks(tmp_path):
    """Real torch.distributed (gloo, 2 CPU processes): every rank ends with the same bank."""
    script = tmp_path / "ddp_bank.py"
    script.write_text(_DDP_SCRIPT, encoding="utf-8")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "rendezvous"), str(tmp_path)],
                              env={**os.environ, "RANK": str(r), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace") for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    s0, s1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert s0["n"] == s1["n"] == 2  # rank 0: 1 correct pixel, rank 1: 1 of 2
    for key in ("features", "count", "ptr"):
        assert torch.equal(s0[key], s1[key]), key
    assert s0["count"].tolist() == [1, 1]
    assert torch.allclose(s0["features"][1, 0], torch.tensor([1.0, 1.0]) / 2 ** 0.5)


class _CopyingDS(torch.nn.Module):
    """A DS that has learnt to copy: its logits are its noisy label input channels (× 10)."""

    def forward(self, x, t):
        return x[:, 1:] * 10


@pytest.mark.parametrize("dim", [2, 3])
def test_ds_pseudo_labels_from_noise_cannot_copy_the_input_label(dim):
    """Under the training forward a copying DS returns CS's own pseudo label (the literal rule's
    fault); its prediction from pure noise carries nothing of it (chance agreement, 1/K)."""
    from semidiff_nnunet.diffusion import labels_to_onehot
    from semidiff_nnunet.plugins.diffcl.networks import LabelDiffusion

    torch.manual_seed(0)
    k, shape = 3, (16, 16) if dim == 2 else (6, 8, 8)
    ds = LabelDiffusion(_CopyingDS())
    x = torch.randn(8, 1, *shape)
    pseudo_cs = torch.randint(0, k, (8, *shape))
    copied = ds(x, labels_to_onehot(pseudo_cs, k), t=torch.full((8,), 0.1)).argmax(1)  # low t: almost clean
    assert (copied == pseudo_cs).float().mean() > 0.95
    agree = (ds.from_noise(x, k).argmax(1) == pseudo_cs).float().mean().item()
    assert abs(agree - 1 / k) < 0.05


def test_confidence_mask_leaves_out_unconfident_pixels():
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    masked = L.dice_ce(logits, labels, 1.0, mask=mask)
    assert masked.item() == pytest.approx(L.dice_ce(logits[:, :, :4], labels[:, :4], 1.0).item(), rel=1e-5)
    assert masked.item() != pytest.approx(L.dice_ce(logits, labels, 1.0).item(), rel=1e-3)


def test_ds_pseudo_labels_are_the_papers_at_a_trained_start_only():
    """``ds_pseudo_label="auto"`` (default): the training forward's argmax (the paper's) from
    ``--pretrained-weights``, DS's prediction from pure noise from scratch; an explicit value wins."""
    from types import SimpleNamespace

    from semidiff_nnunet.plugins.diffcl.trainer import DiffCLHParams, DiffCLTrainer
    from semidiff_nnunet.training.run_config import RunConfig

    def source(pretrained, **hp):
        t = SimpleNamespace(hp=DiffCLHParams(**hp), run_config=RunConfig(pretrained_weights=pretrained))
        return DiffCLTrainer.ds_label_source(t), t

    assert DiffCLHParams().ds_pseudo_label == "auto"
    assert source("/runs/supervised/checkpoint_final.pth")[0] == "forward"
    assert source(None)[0] == "noise"
    assert source(None, ds_pseudo_label="forward")[0] == "forward"
    assert source("/ck.pth", ds_pseudo_label="noise")[0] == "noise"
    # the forward's argmax is what CS learns from at a trained start (no DS call from noise)
    _, t = source("/ck.pth")
    t.ds_label_source = lambda: DiffCLTrainer.ds_label_source(t)
    logits, feats = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    labels, f = DiffCLTrainer.ds_labels(t, torch.randn(2, 1, 8, 8), logits, feats)
    assert torch.equal(labels, logits.argmax(1)) and f is feats
