"""UniMatch (``plugins/unimatch``): the masked Dice on hand-computed cases, the feature perturbation
(only through the encoder's features, gone after the call, also under ``torch.compile``), CutMix
pseudo labels that agree voxel for voxel with the mixed image (2D and 3D, through the real
``compute_losses``), and CLI end-to-end runs 2D and 3D that stock nnU-Net predicts.

The unit tests build the real trainer on nnU-Net's plans of the tiny demo datasets (as
``test_baselines_losses.py``) and run no training; where a prediction must be a known function of
the input voxels, a toy network with ``encoder``/``decoder`` replaces the planned one.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from helpers import assert_stock_predictor_matches, load_image, raw
from torch import nn

from semidiff_nnunet.networks.perturbations import channel_dropout
from semidiff_nnunet.plugins.unimatch import trainer as um
from semidiff_nnunet.training import unwrap

NEUTRAL_SCHEDULE = {"burnin": 0.0, "burnin_min": 0, "rampup_min": 0}


# ---------------------------------------------------------------------------------------------- fixtures
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
    return request.getfixturevalue(request.param)


BOTH_DIMS = pytest.mark.parametrize("tiny", ["tiny2d", "tiny3d"], indirect=True)


def _trainer(setup, **hparams) -> um.UniMatchTrainer:
    """The real UniMatchTrainer on the tiny plans (labeled 0.5, seed 0), initialised, no training."""
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans, configuration, dataset_json = setup
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    RunConfig(labeled=LabeledSpec.parse("0.5"), seed=0, hparams={**NEUTRAL_SCHEDULE, **hparams},
              num_epochs=2, num_iterations_per_epoch=10).write(plans)
    t = um.UniMatchTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    t.initialize()
    assert t.enable_deep_supervision and t.strong_views == 2
    return t


def _labeled(t, n_l: int, g: torch.Generator, values: torch.Tensor | None = None) -> dict:
    patch = tuple(t.configuration_manager.patch_size)
    x_l = torch.randn(n_l, 1, *patch, generator=g) if values is None else values
    lab = torch.randint(0, t.label_manager.num_segmentation_heads, (n_l, 1, *patch), generator=g).float()
    with torch.no_grad():
        sizes = [o.shape[2:] for o in unwrap(t.network)(torch.zeros(1, 1, *patch))]
    return {"data": x_l, "target": [F.interpolate(lab, size=s, mode="nearest") for s in sizes]}


def _no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------- masked Dice
def test_masked_dice_matches_the_authors_formula_and_ignores_unconfident_voxels():
    # 1 image, 2 classes, 4 pixels; pixel 1 is ignored
    logits = torch.tensor([[[[0.0, 3.0, -1.0, 2.0]], [[1.0, -2.0, 0.5, 0.0]]]], requires_grad=True)
    labels = torch.tensor([[[1, 0, 0, 0]]])
    keep = torch.tensor([[[True, False, True, True]]])
    loss = um.masked_dice_loss(logits, labels, keep)
    p = torch.softmax(logits.detach(), 1)[0, :, 0]            # (2, 4)
    t = F.one_hot(labels[0, 0], 2).T.float()                  # (2, 4)
    kept = [0, 2, 3]
    expected = 0.0
    for c in range(2):
        inter = float((p[c, kept] * t[c, kept]).sum())
        z, y = float((p[c, kept] ** 2).sum()), float(t[c, kept].sum())
        expected += 1 - (2 * inter + 1e-5) / (z + y + 1e-5)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[..., 1].abs().sum() == 0               # the ignored pixel gets no gradient
    assert (logits.grad[..., kept].abs().sum(1) > 0).all()
    # whatever the network predicts there, the loss does not change
    other = logits.detach().clone()
    other[..., 1] = torch.tensor([-5.0, 7.0]).view(2, 1)
    assert um.masked_dice_loss(other, labels, keep).item() == pytest.approx(loss.item(), rel=1e-7)
    # nothing kept: zero loss, zero gradient; a perfect prediction: zero loss
    none = um.masked_dice_loss(logits, labels, torch.zeros_like(keep))
    assert none.item() == pytest.approx(0.0, abs=1e-6)
    perfect = F.one_hot(torch.tensor([[[0, 1, 1]]]), 2).movedim(-1, 1).float() * 100
    all_kept = torch.ones(1, 1, 3, dtype=torch.bool)
    assert um.masked_dice_loss(perfect, torch.tensor([[[0, 1, 1]]]), all_kept).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_dice_3d_gradient_is_zero_exactly_where_the_mask_is_off():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    keep = torch.rand(2, 4, 5, 6, generator=g) > 0.4
    um.masked_dice_loss(logits, labels, keep).backward()
    per_voxel = logits.grad.abs().sum(1)
    assert (per_voxel[~keep] == 0).all() and (per_voxel[keep] > 0).all()


# ------------------------------------------------------------------------------------ feature perturbation
@BOTH_DIMS
def test_feature_perturbation_acts_only_through_the_encoder_features_and_is_gone_afterwards(tiny):
    t = _trainer(tiny)
    net = unwrap(t.network)
    patch = tuple(t.configuration_manager.patch_size)
    x = torch.randn(4, 1, *patch, generator=torch.Generator().manual_seed(0))
    part = slice(1, 3)
    with torch.no_grad():
        clean = net(x)
        torch.manual_seed(7)
        out = t.forward_with_fp(x, part)
        # the hook existed only during the call: the network is the plain planned one again
        assert _no_hooks(net)
        # the same dropout masks (same RNG draws, in the same order) applied by hand to the skips
        torch.manual_seed(7)
        skips = net.encoder(x)
        manual = net.decoder([channel_dropout(s[part], t.hp.fp_dropout) for s in skips])
    assert len(out) == len(clean) > 1                         # every deep-supervision scale
    for o, c, m in zip(out, clean, manual):
        assert o.shape[0] == 6
        assert torch.allclose(o[:4], c, atol=1e-5)           # the clean predictions are untouched
        assert torch.allclose(o[4:], m, atol=1e-5)           # FP = decoder(dropout(encoder features))
        assert not torch.allclose(o[4:], c[part], atol=1e-3)  # and the perturbation changes something
    with torch.no_grad():
        again = net(x)
    assert all(torch.equal(a, c) for a, c in zip(again, clean))


def test_compute_losses_leaves_no_hook_and_trains_through_every_term(tiny2d):
    t = _trainer(tiny2d, cutmix_p=1.0, threshold=0.0)
    g = torch.Generator().manual_seed(2)
    patch = tuple(t.configuration_manager.patch_size)
    labeled = _labeled(t, 2, g)
    x_u = torch.randn(3, 1, *patch, generator=g)
    unlabeled = {"data": x_u, "data_strong": x_u + 0.3 * torch.randn(x_u.shape, generator=g),
                 "data_strong_2": x_u.sign() * x_u.abs().sqrt()}
    terms = t.compute_losses(labeled, unlabeled)
    assert set(terms) == {"supervised", "strong_1", "strong_2", "feature_perturbation", "_mask_fraction",
                          "_cutmix_fraction"}
    assert _no_hooks(unwrap(t.network))
    assert terms["_mask_fraction"].item() == 1.0 and 0 < terms["_cutmix_fraction"].item() < 1
    for name in ("strong_1", "strong_2", "feature_perturbation"):
        t.network.zero_grad(set_to_none=True)
        terms = t.compute_losses(labeled, unlabeled)
        assert torch.isfinite(terms[name]) and terms[name].item() > 0
        terms[name].backward()
        grads = [p.grad for p in unwrap(t.network).encoder.parameters()]
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), name


def test_feature_perturbation_survives_torch_compile(tiny2d, monkeypatch):
    """nnU-Net compiles the network on CUDA; a hook added after the first trace is ignored unless
    Dynamo guards on hooks (the trainer switches them on for a compiled network)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # torch's default
    t = _trainer(tiny2d)
    t.network = torch.compile(t.network, backend="eager")
    t.enable_hook_guards_if_compiled()  # what build_method does after nnU-Net's initialize compiled it
    patch = tuple(t.configuration_manager.patch_size)
    x = torch.randn(3, 1, *patch)
    try:
        with torch.no_grad():
            t.network(x)                  # traced first without the hook (a burn-in iteration)
            out = t.forward_with_fp(x, slice(0, 2))
        assert out[0].shape[0] == 5
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- CutMix
class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return [x * self.scale, x * self.scale]


class _Decoder(nn.Module):
    """Logit of class c = −K (v − c)²: the prediction is the class nearest to the voxel's value,
    confident at integers, a tie (confidence 1/2) half-way between two classes."""

    def __init__(self, num_classes: int, sizes):
        super().__init__()
        self.num_classes, self.sizes = num_classes, sizes

    def forward(self, skips):
        v = skips[-1]
        logits = torch.cat([-20.0 * (v - c) ** 2 for c in range(self.num_classes)], 1)
        return [logits if tuple(s) == tuple(v.shape[2:]) else F.interpolate(logits, size=s) for s in self.sizes]


class _VoxelNet(nn.Module):
    def __init__(self, num_classes, sizes):
        super().__init__()
        self.encoder, self.decoder = _Encoder(), _Decoder(num_classes, sizes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@BOTH_DIMS
def test_cutmix_pseudo_labels_agree_voxel_for_voxel_with_the_mixed_images(tiny, monkeypatch):
    t = _trainer(tiny, cutmix_p=1.0)
    num_classes = t.label_manager.num_segmentation_heads
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(3)
    labeled = _labeled(t, 2, g)
    t.network = _VoxelNet(num_classes, [s.shape[2:] for s in labeled["target"]])
    n_u = 4
    # each patch a different mosaic of class values; some voxels half-way between classes (unconfident)
    x_u = torch.randint(0, num_classes, (n_u, 1, *patch), generator=g).float()
    x_u[torch.rand(x_u.shape, generator=g) < 0.2] += 0.5
    # strong views = the weak view: the network's prediction on a mixed image is then exactly what
    # the CutMix pseudo label must be
    unlabeled = {"data": x_u, "data_strong": x_u.clone(), "data_strong_2": x_u.clone()}
    inputs, dice_calls = {}, []
    t.network.register_forward_pre_hook(lambda _m, args: inputs.__setitem__("x", args[0].detach().clone()))
    real_dice = um.masked_dice_loss

    def recording_dice(pred, label, keep):
        dice_calls.append((pred, label, keep))
        return real_dice(pred, label, keep)

    monkeypatch.setattr(um, "masked_dice_loss", recording_dice)
    torch.manual_seed(11)
    t.compute_losses(labeled, unlabeled)

    x = inputs["x"]
    assert x.shape[0] == 2 + 3 * n_u
    weak_conf, weak_label = torch.softmax(t.network.decoder([x[2:2 + n_u]])[0], 1).max(1)
    on_class = x_u[:, 0] == x_u[:, 0].round()
    assert torch.equal(weak_label[on_class], x_u[:, 0][on_class].long())  # the toy network's prediction
    for view, (_pred, label, keep) in enumerate(dice_calls[:2]):
        mixed = x[2 + n_u * (view + 1):2 + n_u * (view + 2)]
        conf, own = torch.softmax(t.network.decoder([mixed])[0], 1).max(1)
        assert torch.equal(label, own)                                    # label = prediction on the mixed image
        assert torch.equal(keep, conf >= t.hp.threshold)                  # confidence mask too
        changed = (mixed != x_u).any(1)
        assert changed.any(), "no box was pasted"
        box = changed.flatten(1).any(1)
        for i in torch.nonzero(box).flatten().tolist():                   # the pasted region is a box
            idx = torch.nonzero(changed[i])
            lo, hi = idx.min(0).values, idx.max(0).values
            region = changed[i][tuple(slice(a, b + 1) for a, b in zip(lo.tolist(), hi.tolist()))]
            assert region.float().mean() > 0.3                           # (equal voxels inside may not change)
            # and the pasted voxels come from another patch of the batch, with that patch's pseudo label
            others = [j for j in range(n_u) if j != i]
            assert any(torch.equal(mixed[i][:, changed[i]], x_u[j][:, changed[i]]) for j in others)
    # the FP stream learns from the unmixed weak pseudo label and confidence
    _pred, label, keep = dice_calls[2]
    assert torch.equal(label, weak_label) and torch.equal(keep, weak_conf >= t.hp.threshold)
    assert (~keep).any() and keep.any()


def test_mix_source_never_mixes_a_patch_with_itself():
    torch.manual_seed(0)
    for n in (2, 3, 5):
        for _ in range(10):
            src = um.UniMatchTrainer.mix_source(n)
            assert sorted(src.tolist()) == list(range(n)) and (src != torch.arange(n)).all()
    assert um.UniMatchTrainer.mix_source(1).tolist() == [0]


def test_defaults_are_the_authors_medical_config():
    hp = um.UniMatchHParams()
    assert (hp.threshold, hp.weight_s1, hp.weight_s2, hp.weight_fp, hp.fp_dropout, hp.cutmix_p) == \
        (0.95, 0.25, 0.25, 0.5, 0.5, 0.5)
    assert math.isclose(hp.unlabeled_scale, 2.0)
    assert (hp.weak_view, hp.strong_view, hp.strong_gamma_p, hp.strong_noise_p) == ("geometry", "authors", 0.0, 0.0)


@pytest.mark.parametrize("weak_view", ["geometry", "nnunet"])
def test_weak_view_is_geometry_only_by_default_as_the_authors(tiny2d, weak_view, monkeypatch, tmp_path):
    """The unlabeled stream on constant images with its geometry switched off: the geometry-only weak view
    (the default) leaves every patch's intensities as they are, nnU-Net's full weak view changes some;
    the strong views always change some (the authors' brightness/contrast with p = 0.8)."""
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    t = _trainer(tiny2d, **({} if weak_view == "geometry" else {"weak_view": weak_view}))
    assert t.hp.weak_view == weak_view
    t.get_dataloaders()
    try:
        loader = t.dataloader_unlabeled.data_loader
        loader.geometric = ComposeTransforms([])
        real = loader._data.load_case
        loader._data.load_case = lambda key: (np.ones_like(np.asarray(real(key)[0])), None, None, {})
        np.random.seed(0)
        torch.manual_seed(0)
        weak, strong = [], []
        for _ in range(6):
            batch = loader.generate_train_batch()
            weak.append(batch["data"])
            strong += [batch["data_strong"], batch["data_strong_2"]]
        weak, strong = torch.cat(weak), torch.cat(strong)
        unchanged = [bool(((w == 1) | (w == 0)).all()) for w in weak]  # 0: padding beyond the image
        assert all(unchanged) if weak_view == "geometry" else not all(unchanged)
        assert not all(bool(((s == 1) | (s == 0)).all()) for s in strong)
    finally:
        t._shutdown_loaders()


def test_authors_strong_view_is_brightness_and_contrast_together_then_blur():
    """UniMatch's medical strong view: one p = 0.8 draw applies brightness and contrast (both ×[0.5, 1.5]),
    then blur σ ∈ [0.1, 2] with p = 0.5; gamma and noise only when asked for."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    from semidiff_nnunet.networks.strong_views import authors_strong_view

    ops = authors_strong_view().transforms
    assert [op.apply_probability for op in ops] == [0.8, 0.5]
    jitter = [type(t) for t in ops[0].transform.transforms]
    assert jitter == [MultiplicativeBrightnessTransform, ContrastTransform]
    assert isinstance(ops[1].transform, GaussianBlurTransform) and ops[1].transform.blur_sigma == (0.1, 2.0)
    more = [type(op.transform) for op in authors_strong_view(p_gamma=0.3, p_noise=0.2).transforms]
    assert GammaTransform in more and GaussianNoiseTransform in more
    torch.manual_seed(0)
    np.random.seed(0)
    img = torch.randn(1, 6, 12, 12)
    outs = [authors_strong_view()(image=img.clone())["image"] for _ in range(20)]
    assert all(o.shape == img.shape and torch.isfinite(o).all() for o in outs)
    assert sum(not torch.allclose(o, img) for o in outs) >= 12


def test_weak_and_strong_view_choices_are_checked_before_training():
    from semidiff_nnunet.errors import SemidiffError
    from semidiff_nnunet.training.hparams import resolve_hparams

    assert resolve_hparams(um.UniMatchHParams, {"weak_view": "nnunet"}).weak_view == "nnunet"
    with pytest.raises(SemidiffError, match="choose one of nnunet, geometry"):
        resolve_hparams(um.UniMatchHParams, {"weak_view": "geom"})
    with pytest.raises(SemidiffError, match="choose one of authors, medical"):
        resolve_hparams(um.UniMatchHParams, {"strong_view": "strong"})


# ---------------------------------------------------------------------------------------------- CLI end to end
def _train_and_predict(run_cli, tmp_path, dataset, config, labeled):
    epochs = 2
    code, _, err = run_cli("plan-and-train", dataset, "-m", "unimatch", "--labeled", labeled, "-c", config,
                           "--epochs", str(epochs), "--iters-per-epoch", "2", "--no-val", *TINY)
    assert code == 0, err
    from semidiff_nnunet import api

    info = api.run_info(dataset, "unimatch", labeled, 0, config, 0, "semidiffDemoPlans")
    assert info.fold_folder.parts[-2] == f"UniMatchTrainer__semidiffDemoPlans__{config}"
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == epochs and ck["trainer_name"] == "UniMatchTrainer"
    assert set(ck["semidiff"]["networks"]) == {"network"} and not ck["semidiff"]["states"]
    assert ck["network_weights"].keys() == ck["semidiff"]["networks"]["network"].keys()
    for term in ("strong_1", "strong_2", "feature_perturbation", "_mask_fraction"):
        values = ck["logging"][f"term/{term}"]
        assert len(values) == epochs and np.isfinite(values).all(), term
    assert all(np.isfinite(ck["logging"]["train_losses"]))
    pred = tmp_path / f"unimatch_{config}"
    api.predict(dataset, "unimatch", raw(dataset) / "imagesTs", pred, labeled=labeled, configuration=config,
                device="cpu", plans_name="semidiffDemoPlans", use_mirroring=False, show_progress=False)
    return pred


@pytest.mark.slow
def test_unimatch_2d_cli_and_stock_prediction(demo2d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo2d, "2d", "0.2")
    files = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert files == ["demots_000.nii.gz", "demots_001.nii.gz", "demots_002.nii.gz"]
    assert set(np.unique(load_image(pred / files[0]))) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo2d, "unimatch", "0.2", pred, tmp_path)


@pytest.mark.slow
def test_unimatch_3d_cli_and_stock_prediction(demo3d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo3d, "3d_fullres", "2")
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz").shape
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo3d, "unimatch", "2", pred, tmp_path, configuration="3d_fullres")
