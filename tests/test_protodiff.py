"""ProtoDiff (Xi et al. 2025): prototypes, losses, sampling, supervision sources, CLI runs.

Mutants run against this file (each broke the named test, then was restored) are listed in the
plugin's report; the unit tests come first, the slow CLI / training runs last."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import assert_stock_predictor_matches, load_image, raw

from semidiff_nnunet.plugins.protodiff.networks import ProtoDiffNet, ddim_sample
from semidiff_nnunet.plugins.protodiff.prototypes import (
    PrototypeBank,
    assign_prototypes,
    inter_loss,
    intra_loss,
    momentum_update,
)


# ----------------------------------------------------------------------------------------- prototypes
def test_prototypes_stay_unit_norm_after_every_update():
    torch.manual_seed(0)
    bank = PrototypeBank(3, 4, 8, momentum=0.5)
    assert torch.allclose(bank.prototypes.norm(dim=-1), torch.ones(3, 4))
    for step in range(6):
        z = torch.randn(50, 8) * (step + 1) * 3  # unnormalised embeddings of any scale
        labels = torch.randint(0, 3, (50,))
        before = bank.prototypes.clone()
        bank.update(z, labels)
        assert torch.allclose(bank.prototypes.norm(dim=-1), torch.ones(3, 4), atol=1e-6)
        assert not torch.equal(before, bank.prototypes)
    assert bank.num_updates == 6


def test_update_is_protoseg_momentum_rule_and_leaves_unhit_prototypes():
    protos = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]]), dim=-1)
    z = torch.tensor([[2.0, 2.0], [0.0, 3.0]])  # both class 0; update as if both were assigned to prototype 1
    labels = torch.tensor([0, 0])
    a = assign_prototypes(z, labels, protos)
    assert a.tolist() == [0, 1]  # (2, 2) is 45° from both: the first wins the tie; (0, 3) goes to (0, 1)
    a = torch.tensor([1, 1])
    new = momentum_update(protos, z, labels, a, momentum=0.9)
    mean_dir = torch.nn.functional.normalize(torch.nn.functional.normalize(z, dim=1).sum(0), dim=0)
    expect = torch.nn.functional.normalize(0.9 * protos[0, 1] + 0.1 * mean_dir, dim=0)
    assert torch.allclose(new[0, 1], expect, atol=1e-6)
    assert torch.equal(new[0, 0], protos[0, 0]) and torch.equal(new[1], protos[1])


def test_assignment_is_cosine_argmax_within_the_class():
    # class 0 prototypes point along x and y; class 1 has a prototype *exactly* along the pixel, which
    # must not be chosen for a class-0 pixel; scale of z must not matter (cosine, not dot product)
    protos = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]])
    z = torch.tensor([[0.6, 0.8, 0.0], [100.0, 1.0, 0.0], [0.0, 0.1, 5.0], [0.6, 0.8, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert assign_prototypes(z, labels, protos).tolist() == [1, 0, 1, 0]
    # against a brute-force reference on random data
    g = torch.Generator().manual_seed(1)
    protos = torch.nn.functional.normalize(torch.randn(4, 5, 6, generator=g), dim=-1)
    z = torch.randn(200, 6, generator=g) * torch.rand(200, 1, generator=g) * 10
    labels = torch.randint(0, 4, (200,), generator=g)
    ref = [max(range(5), key=lambda k: float(torch.nn.functional.cosine_similarity(z[n], protos[labels[n], k], dim=0)))
           for n in range(200)]
    assert assign_prototypes(z, labels, protos).tolist() == ref


def test_inter_and_intra_losses_equal_hand_computed_values():
    # 2 classes × 2 prototypes in 2D; τ = 0.5
    s = 2 ** -0.5
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [s, s]]])
    z = torch.tensor([[3.0, 0.0], [0.0, -2.0]])  # pixel 0: class 0 → p00; pixel 1: class 1 → its best prototype
    labels = torch.tensor([0, 1])
    a = assign_prototypes(z, labels, protos)
    # pixel 1 = (0, −1): ⟨·, p10⟩ = 0, ⟨·, p11⟩ = −s → p10
    assert a.tolist() == [0, 0]
    tau = 0.5
    # pixel 0, i = (1, 0): positive p00 → 1; negatives: class 1's p10 → −1, p11 → s (p01 is left out)
    l0 = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + np.exp(-1 / tau) + np.exp(s / tau)))
    # pixel 1, i = (0, −1): positive p10 → 0; negatives: class 0's p00 → 0, p01 → −1
    l1 = -np.log(np.exp(0) / (np.exp(0) + np.exp(0) + np.exp(-1 / tau)))
    assert inter_loss(z, labels, a, protos, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # intra: (1 − 1)² and (1 − 0)²
    assert intra_loss(z, labels, a, protos).item() == pytest.approx(0.5, rel=1e-6)
    # a pixel assigned to a prototype it is far from pays for it
    assert intra_loss(z, labels, torch.tensor([1, 1]), protos).item() == pytest.approx(((1 - 0) ** 2 + (1 + s) ** 2) / 2)


def test_prototype_bank_state_round_trips():
    bank = PrototypeBank(2, 3, 4)
    bank.update(torch.randn(10, 4), torch.randint(0, 2, (10,)))
    other = PrototypeBank(2, 3, 4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.prototypes, bank.prototypes) and other.num_updates == 1


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from semidiff_nnunet.plugins.protodiff.prototypes import PrototypeBank
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
torch.manual_seed(0)  # the engine seeds every rank alike: identical initial prototypes
bank = PrototypeBank(2, 3, 4, momentum=0.5)
torch.manual_seed(100 + rank)  # different pixels on each rank
bank.update(torch.randn(20, 4), torch.randint(0, 2, (20,)))
torch.save(bank.state_dict(), sys.argv[2] + f"/{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_prototypes_identical_on_two_gloo_ranks(tmp_path):
    """Real torch.distributed (gloo, 2 CPU processes) with different pixels per rank: the update
    all-reduces, so both ranks end with the same prototypes, which differ from a rank-local update."""
    import subprocess
    import sys

    script = tmp_path / "ddp_protos.py"
    script.write_text(_DDP_SCRIPT, encoding="utf-8")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "rendezvous"), str(tmp_path)],
                              env={**os.environ, "RANK": str(r), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    s0, s1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert torch.equal(s0["prototypes"], s1["prototypes"])
    torch.manual_seed(0)
    local = PrototypeBank(2, 3, 4, momentum=0.5)
    torch.manual_seed(100)
    local.update(torch.randn(20, 4), torch.randint(0, 2, (20,)))
    assert not torch.allclose(local.prototypes, s0["prototypes"])


# ----------------------------------------------------------------------------------------- network
def _arch(dim: int, n_stages: int = 3):
    from torch import nn

    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    return {"n_stages": n_stages, "features_per_stage": [4, 8, 8][:n_stages], "conv_op": conv,
            "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "n_conv_per_stage": [1] * n_stages, "n_conv_per_stage_decoder": [1] * (n_stages - 1), "conv_bias": True,
            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


def _net(dim: int, num_classes: int = 3, **kw) -> ProtoDiffNet:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    arch = _arch(dim)
    planned = PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=False, **arch)
    return ProtoDiffNet.from_plans(planned, arch, num_classes, label_channels=4, proj_dim=5, **kw)


@pytest.mark.parametrize("dim", [2, 3])
def test_network_training_forward_and_sampling_shapes(dim):
    net = _net(dim)
    shape = (2, 1, *([16] * dim))
    x = torch.randn(shape)
    y = torch.randint(0, 3, (2, *([16] * dim)))
    y0 = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float()
    pix = torch.tensor([0, 5, 500])
    out = net(x, y0=y0, pixels=pix)
    assert out["logits"].shape == (2, 3, *([16] * dim))
    assert [a.shape[2:] for a in out["aux"]] == [torch.Size([16 // 2**i] * dim) for i in range(3)]
    assert out["latent"].shape == (3, 5)
    (out["logits"].sum() + sum(a.sum() for a in out["aux"]) + out["latent"].sum()).backward()
    # every non-encoder part learns from the training forward
    for name in ("branches", "aux_heads", "label_encoder", "projector", "decoder", "time_embedding"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters()
                   if n.startswith(name)), name
    net.eval()
    a, b = net(x), net(x)
    assert a.shape == (2, 3, *([16] * dim)) and torch.equal(a, b)  # deterministic: stock == semidiff predict


def test_encoder_runs_once_and_decoder_once_per_step():
    net = _net(2, sampling_steps=4).eval()
    calls = {"enc": 0, "dec": 0}
    net.encoder.register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
    net.decoder.register_forward_hook(lambda *a: calls.__setitem__("dec", calls["dec"] + 1))
    net(torch.randn(1, 1, 16, 16))
    assert calls == {"enc": 1, "dec": 4}


def test_ddim_with_the_true_x0_returns_it():
    from semidiff_nnunet.diffusion import ContinuousScheduler

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    true_logits = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 10
    x0 = torch.randn(2, 4, 8, 8, generator=g)  # the true label embedding
    seen = []

    def decode(m, t):
        seen.append(float(t))
        return true_logits

    eps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))  # the sampler's m_T
    g0 = float(ContinuousScheduler("cosine").alpha_bar(0.0))  # γ(0) = 1/(1 + 1e-5) (DDP's clamp)
    for steps in (1, 3, 10):
        for t_diff in (0.0, 1.0):
            seen.clear()
            logits, m = ddim_sample(decode, lambda _logits: x0, (2, 4, 8, 8), ContinuousScheduler("cosine"), steps,
                                    t_diff, torch.Generator().manual_seed(1))
            assert torch.equal(logits.argmax(1), labels)
            # the last step lands at t = 0: m = x0 up to sqrt(1 − γ(0)) ≈ 0.3 % of the noise
            assert (m - x0).abs().max() < 0.02, (steps, t_diff)
            if t_diff == 0:  # symmetric DDIM (η = 0) with the exact x0 keeps m_T as ε̂ all the way
                assert torch.allclose(m, g0 ** 0.5 * x0 + (1 - g0) ** 0.5 * eps, atol=2e-5), steps
            assert seen[0] == 1.0 and len(seen) == steps


def test_asymmetric_steps_are_used(monkeypatch):
    """Algorithm 2 with t_diff = 1, 4 steps: the decoder is told t_now = 1, .75, .5, .25 and DDIM
    lands at t_next = max(1 − (step + 2)/4, 0) = .5, .25, 0, 0."""
    from semidiff_nnunet.diffusion import ContinuousScheduler
    from semidiff_nnunet.plugins.protodiff import networks

    net = _net(2, sampling_steps=4, t_diff=1.0).eval()
    times, targets = [], []
    orig, orig_step = net.decode, networks.ddim_step
    net.decode = lambda m, xs, fs, t: (times.append(float(t)), orig(m, xs, fs, t))[1]
    monkeypatch.setattr(networks, "ddim_step", lambda m, z0, eps, a, b: (targets.append(float(b)),
                                                                         orig_step(m, z0, eps, a, b))[1])
    net(torch.randn(1, 1, 16, 16))
    sched = ContinuousScheduler("cosine")
    assert times == [1.0, 0.75, 0.5, 0.25]
    assert targets == pytest.approx([float(sched.alpha_bar(t)) for t in (0.5, 0.25, 0.0, 0.0)])
    assert sched.alpha_bar(0.0) > 0.999


# ----------------------------------------------------------------------------------------- training runs
PLANS = "semidiffDemoPlans"
SHORT = ["--epochs", "2", "--iters-per-epoch", "2"]


def _preprocessed(name: str) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / name


def _pseudo_dataset(workspace, dataset_id: int, name: str, with_pseudo: bool, corrupt: float = 0.0) -> str:
    """A MOSXAV-shaped tiny 2D set: a few labeled frames, unlabeled training frames, extra un-annotated
    frames (imagesUnlabeled/) and, optionally, noisy pseudo masks (labelsPseudo/) for some of them:
    shifted ground truth of every other training case and masks for two of the three extra frames, with ``corrupt``
    of their pixels set to random classes."""
    import SimpleITK as sitk

    from semidiff_nnunet import api, planning
    from semidiff_nnunet.synthetic import generate_demo_dataset

    folder = generate_demo_dataset(workspace / "nnUNet_raw", dim=2, num_train=10, num_test=2, num_unlabeled=3,
                                   shape=(32, 32), dataset_id=dataset_id, name=name, seed=3)
    if with_pseudo:
        rng = np.random.RandomState(0)
        (folder / "labelsPseudo").mkdir()
        cases = sorted(p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").iterdir())
        sources = {c: folder / "labelsTr" / f"{c}.nii.gz" for c in cases}
        targets = {c: sources[c] for c in cases[::2]}  # every other training case: the rest get teacher labels
        unl = sorted({p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesUnlabeled").iterdir()})
        targets.update({u: sources[cases[i]] for i, u in enumerate(unl[:2])})
        for case, src in targets.items():
            img = sitk.ReadImage(str(src))
            arr = np.roll(sitk.GetArrayFromImage(img), 2, axis=-1)  # shifted: a noisy pseudo mask
            flip = rng.rand(*arr.shape) < corrupt
            arr[flip] = rng.randint(0, 3, size=int(flip.sum()))
            out = sitk.GetImageFromArray(arr.astype(np.uint8))
            out.CopyInformation(img)
            sitk.WriteImage(out, str(folder / "labelsPseudo" / f"{case}.nii.gz"))
    full = api.plan_and_preprocess(dataset_id, ["2d"], fingerprint_voxels=1e4, show_progress=False)
    assert full
    ds = folder.name
    planning.shrink_plans(ds, "nnUNetPlans", PLANS, max_features=8, batch_size=2)
    return ds


@pytest.fixture(scope="module")
def pseudo_sets(workspace):
    return {"with": _pseudo_dataset(workspace, 961, "ProtoPseudo", True),
            "without": _pseudo_dataset(workspace, 962, "ProtoNoPseudo", False)}


def _train(name, labeled="3", epochs=2, overrides=None, **kw):
    from semidiff_nnunet import api

    base = {"burnin_min": "1", "rampup_min": "1"}  # so the teacher term runs inside a 4-iteration run
    return api.train(name, "protodiff", labeled=labeled, seed=0, configuration="2d", fold=0, device="cpu",
                     epochs=epochs, iters_per_epoch=2, plans_name=PLANS, val_iters_per_epoch=0,
                     final_validation=False, show_progress=False, overrides={**base, **(overrides or {})}, **kw)


def _ck(info) -> dict:
    return torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def _same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def _weights(ck):
    return {"networks": ck["semidiff"]["networks"], "states": ck["semidiff"]["states"]}


@pytest.mark.slow
def test_pseudo_labels_train_and_weight_zero_equals_no_pseudo_labels(pseudo_sets):
    from semidiff_nnunet import api

    with_p, without = pseudo_sets["with"], pseudo_sets["without"]
    split = api.split(with_p, "3", seed=0, fold=0)
    assert split.unlabeled == api.split(without, "3", seed=0, fold=0).unlabeled
    info = _train(with_p)
    ck = _ck(info)
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["split"]["pseudo"] and not set(run["split"]["pseudo"]) & set(run["split"]["validation"])
    terms = {k for k in ck["logging"] if k.startswith("term/")}
    assert {"term/ce", "term/aux", "term/pseudo_ce", "term/pseudo_aux", "term/inter", "term/intra",
            "term/teacher_ce"} <= terms, terms
    assert all(np.isfinite(np.asarray(ck["logging"][k], dtype=float)).all() for k in terms if "teacher" not in k)
    assert set(ck["semidiff"]["states"]) == {"prototypes", "teacher"}
    protos = ck["semidiff"]["states"]["prototypes"]["prototypes"]
    assert protos.shape == (3, 10, 32) and torch.allclose(protos.norm(dim=-1), torch.ones(3, 10), atol=1e-5)
    # weight 0 on the set with labelsPseudo/ == the same images without labelsPseudo/
    shutil.rmtree(info.run_root)
    zero = _ck(_train(with_p, overrides={"pseudo_weight": "0"}))
    none = _ck(_train(without))
    _same(_weights(zero), _weights(none))
    assert "term/pseudo_ce" not in zero["logging"]
    # control: the pseudo labels do change the run
    with pytest.raises(AssertionError):
        _same(_weights(ck), _weights(none))


@pytest.mark.slow
def test_noisy_pseudo_labels_run(workspace):
    name = _pseudo_dataset(workspace, 963, "ProtoNoisy", True, corrupt=0.3)
    ck = _ck(_train(name, overrides={"pseudo_prototypes": "false", "teacher_weight": "0"}))
    assert np.isfinite(np.asarray(ck["logging"]["term/pseudo_ce"], dtype=float)).all()
    assert "term/teacher_ce" not in ck["logging"]


def _scramble(name: str, cases: list[str], seed: int) -> None:
    import blosc2

    folder = _preprocessed(name) / "nnUNetPlans_2d"
    rng = np.random.RandomState(seed)
    for case in cases:
        seg_file = folder / f"{case}_seg.b2nd"
        seg = blosc2.open(str(seg_file), mode="r")[:]
        scrambled = rng.randint(0, 3, size=seg.shape).astype(seg.dtype)
        seg_file.unlink()
        blosc2.asarray(np.ascontiguousarray(scrambled), urlpath=str(seg_file))
        with open(folder / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        props["class_locations"] = {k: (rng.randint(0, 32, size=(20, 4)) if len(v) else v)
                                    for k, v in props["class_locations"].items()}
        with open(folder / f"{case}.pkl", "wb") as f:
            pickle.dump(props, f)


@pytest.mark.slow
def test_scrambled_hidden_labels_give_an_identical_run(workspace):
    """Hidden ground truth of unlabeled cases — with pseudo masks and without — never reaches a loss."""
    from semidiff_nnunet import api

    name = _pseudo_dataset(workspace, 964, "ProtoLeak", True)
    split = api.split(name, "3", seed=0, fold=0)
    first = _train(name)
    reference = _ck(first)
    shutil.rmtree(first.run_root)
    _scramble(name, split.unlabeled, seed=1)
    second = _train(name)
    _same(_weights(reference), _weights(_ck(second)))
    shutil.rmtree(second.run_root)
    _scramble(name, split.labeled[:1], seed=2)  # control: a labeled case's label does matter
    with pytest.raises(AssertionError):
        _same(_weights(reference), _weights(_ck(_train(name))))


@pytest.mark.slow
def test_prototypes_and_teacher_are_restored_on_continue(workspace):
    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.protodiff import ProtoDiffTrainer

    name = _pseudo_dataset(workspace, 965, "ProtoResume", True)
    straight = _train(name, epochs=3, save_every=1)
    reference = _ck(straight)
    shutil.rmtree(straight.run_root)
    original = ProtoDiffTrainer.on_epoch_end

    def crash(self):
        original(self)
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    ProtoDiffTrainer.on_epoch_end = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(name, epochs=3, save_every=1)
    finally:
        ProtoDiffTrainer.on_epoch_end = original
    resumed = _ck(_train(name, epochs=3, save_every=1, continue_training=True))
    _same(_weights(reference), _weights(resumed))
    assert api  # noqa


@pytest.mark.slow
def test_2d_protodiff_cli_train_predict_and_stock_nnunet(demo2d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "protodiff", "--labeled", "0.2", "-c", "2d", *SHORT,
                           "--no-val", "--set", "sampling_steps=2", "--set", "burnin_min=1", *TINY)
    assert code == 0, err
    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", "-d", demo2d, "-m", "protodiff", "--labeled", "0.2", "-c", "2d",
                           "-i", raw(demo2d) / "imagesTs", "-o", pred, "--plans", PLANS, "--device", "cpu",
                           "--disable-tta")
    assert code == 0, err
    env = assert_stock_predictor_matches(run_cli, demo2d, "protodiff", "0.2", pred, tmp_path)
    shim = Path(env["nnUNet_extTrainer"])
    assert "ProtoDiffTrainer" in "".join(p.read_text(encoding="utf-8") for p in shim.glob("*.py"))
    # the exported module is built with the run's --set value
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.protodiff import ProtoDiffTrainer

    info = api.run_info(demo2d, "protodiff", "0.2", 0, "2d", 0, PLANS)
    pm = PlansManager(str(info.model_folder / "plans.json"))
    net = ProtoDiffTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    assert net.sampling_steps == 2
    net.load_state_dict(_ck(info)["network_weights"])


@pytest.mark.slow
def test_3d_protodiff_cli_train_predict_and_stock_nnunet(demo3d, run_cli, tmp_path):
    code, _, err = run_cli("plan-and-train", demo3d, "-m", "protodiff", "--labeled", "2", "-c", "3d_fullres", *SHORT,
                           "--no-val", "--set", "burnin_min=1", *TINY)
    assert code == 0, err
    pred = tmp_path / "pred3d"
    code, _, err = run_cli("predict", "-d", demo3d, "-m", "protodiff", "--labeled", "2", "-c", "3d_fullres",
                           "-i", raw(demo3d) / "imagesTs", "-o", pred, "--plans", PLANS, "--device", "cpu",
                           "--disable-tta")
    assert code == 0, err
    ref = load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo3d, "protodiff", "2", pred, tmp_path, configuration="3d_fullres")
