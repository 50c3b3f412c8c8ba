"""BCP (bidirectional copy-paste): the mixing on toy tensors (image and target agree voxel for voxel,
2D and 3D, at every deep-supervision scale), the largest-component filter, then the real trainer on
the tiny demo plans: the α weighting of the pseudo-labeled regions against nnU-Net's own loss, the
labeled-only pre-training phase, the teacher starting as the pre-trained student (also on
``--continue`` at the phase boundary), and CLI runs in 2D and 3D that stock nnU-Net predicts.
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

from semidiff_nnunet.losses.consistency import largest_components
from semidiff_nnunet.networks.mixing import paste, random_box_mask
from semidiff_nnunet.plugins.bcp.trainer import (
    bidirectional_copy_paste,
    halves,
    resize_nearest,
)

PLANS = "semidiffDemoPlans"


# ---------------------------------------------------------------------------------------------- mixing
def _ds_labels(full: torch.Tensor, n_scales: int) -> list[torch.Tensor]:
    """Labels per deep-supervision scale as nnU-Net makes them: nearest-exact to half, quarter, ... size."""
    out = [full]
    for s in range(1, n_scales):
        size = [round(d / 2 ** s) for d in full.shape[2:]]
        out.append(F.interpolate(full.float(), size=size, mode="nearest-exact").to(full.dtype))
    return out


def _coded(n: int, spatial, sign: int) -> torch.Tensor:
    """(n, 2, *spatial) images whose voxels say where they come from: sign · (10⁵ (sample + 1) + voxel
    index) in channel 0, the same negated in channel 1 (so the channels must move together)."""
    index = torch.arange(math.prod(spatial), dtype=torch.float32).reshape(spatial)
    ch0 = torch.stack([sign * (1e5 * (i + 1) + index) for i in range(n)])[:, None]
    return torch.cat([ch0, -ch0], 1)


@pytest.mark.parametrize("spatial", [(20, 24), (8, 12, 16)])
def test_mixed_images_and_targets_agree_voxel_for_voxel(spatial):
    """In both mixed batches every voxel's image comes from one patch at the same position, and its
    target is that patch's ground truth (labeled) or pseudo label (unlabeled), at every scale."""
    torch.manual_seed(0)
    n = 4
    x_l, x_u = _coded(n, spatial, +1), _coded(n, spatial, -1)
    y_l = torch.randint(0, 3, (n, 1, *spatial))
    y_u = torch.randint(3, 6, (n, 1, *spatial))  # pseudo labels: other values, so a swap would show
    t_l, t_u = _ds_labels(y_l, 3), _ds_labels(y_u, 3)
    a, b = halves(n)
    box = random_box_mask(2, spatial, 2 / 3, shared=True)
    into_u, into_l = bidirectional_copy_paste(x_l, t_l, x_u, t_u, box, a, b)

    sides = [round(2 / 3 * s) for s in spatial]
    idx = box[0, 0].nonzero()
    assert (idx.max(0).values - idx.min(0).values + 1).tolist() == sides and int(box[0].sum()) == math.prod(sides)
    flat = torch.arange(math.prod(spatial)).reshape(spatial)
    for mixed, pairs, labeled_region in ((into_u, a, box), (into_l, b, ~box)):
        img = mixed.image
        assert img.shape == (2, 2, *spatial) and torch.equal(img[:, 1], -img[:, 0])
        code = img[:, 0]
        from_labeled = code > 0
        sample = (code.abs() // 1e5).long() - 1
        position = (code.abs() % 1e5).long()
        assert torch.equal(position, flat.expand_as(position))  # pasted in place, nothing shifted
        assert torch.equal(sample, torch.arange(pairs.start, pairs.stop).view(-1, *[1] * len(spatial)).expand_as(sample))
        assert torch.equal(from_labeled[:, None], labeled_region)  # the labeled patch shows exactly where said
        assert torch.equal(mixed.from_labeled[0], labeled_region)
        source = torch.where(from_labeled, y_l[pairs, 0], y_u[pairs, 0])
        assert torch.equal(mixed.targets[0][:, 0], source)
        # lower scales: nnU-Net's downsampling of the full-resolution mix; the labeled part is its own target
        for s in (1, 2):
            size = t_l[s].shape[2:]
            assert torch.equal(mixed.targets[s], resize_nearest(mixed.targets[0], size))
            region = mixed.from_labeled[s]
            assert torch.equal(region, resize_nearest(labeled_region, size))
            assert torch.equal(mixed.targets[s][region], t_l[s][pairs][region])
            assert torch.equal(mixed.targets[s][~region], t_u[s][pairs][~region])


def test_halves_of_a_batch():
    assert halves(4) == (slice(0, 2), slice(2, 4))
    assert halves(5) == (slice(0, 2), slice(2, 4))  # the authors' int(bs / 2): the odd last one unused
    assert halves(2) == (slice(0, 1), slice(1, 2))
    assert halves(1) == (slice(0, 1), slice(0, 1))
    with pytest.raises(ValueError):
        halves(0)


def test_largest_component_per_class_2d_and_3d():
    seg = torch.zeros(2, 6, 7, dtype=torch.long)
    seg[0, 0, 0:2] = 1            # class 1: 2 voxels
    seg[0, 2, 2], seg[0, 3, 3], seg[0, 4, 4] = 1, 1, 1  # class 1: 3 voxels touching by corners (one component)
    seg[0, 5, 6] = 2              # class 2: its only component stays
    seg[1, 0, 0] = 1              # sample 2 is filtered on its own
    seg[1, 5, 5:7] = 1
    out = largest_components(seg, 3)
    expected = torch.zeros_like(seg)
    expected[0, 2, 2], expected[0, 3, 3], expected[0, 4, 4] = 1, 1, 1
    expected[0, 5, 6] = 2
    expected[1, 5, 5:7] = 1
    assert torch.equal(out, expected)
    vol = torch.zeros(1, 4, 5, 5, dtype=torch.long)
    vol[0, 0, 0, 4] = 2
    vol[0, 1, 1, 1], vol[0, 2, 2, 2] = 2, 2   # touching by a corner: one component of 2 (26-connectivity)
    vol[0, 3, 4, 0] = 1
    out = largest_components(vol, 3)
    assert out[0, 0, 0, 4] == 0 and out[0, 1, 1, 1] == 2 and out[0, 2, 2, 2] == 2
    assert out.eq(2).sum() == 2 and out.eq(1).sum() == 1


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    # these tests record the method's calls during training; the engine's memory check runs one (undone)
    # step before the first one, which they would record too (tests/test_memory_check.py covers it)
    monkeypatch.setenv("SEMIDIFF_MEMORY_CHECK", "0")
    return tmp_path / "results"


def _trainer(dataset: str, configuration: str = "2d", epochs: int = 2, iters: int = 2, phases=None, initialize=True,
             **hparams):
    """A real BCPTrainer on the tiny plans (labeled 0.5, seed 0), the pre-training phase 1 epoch unless
    ``phases`` says otherwise."""
    from semidiff_nnunet import planning
    from semidiff_nnunet.plugins.bcp import BCPTrainer
    from semidiff_nnunet.training import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans = copy.deepcopy(planning.load_plans(dataset, PLANS))
    plans["continue_training"] = False
    pretrained = hparams.pop("pretrained_weights", None)
    RunConfig(method="bcp", labeled=LabeledSpec.parse("0.5"), seed=0, hparams=hparams, num_epochs=epochs,
              num_iterations_per_epoch=iters, num_val_iterations_per_epoch=0, save_every=1,
              phases=phases if phases is not None else {"pretrain": "1"}, pretrained_weights=pretrained).write(plans)
    dataset_json = json.loads((planning.preprocessed_folder(dataset) / "dataset.json").read_text(encoding="utf-8"))
    t = BCPTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    if initialize:
        t.initialize()
    return t


def _batches(t, n_l: int = 2, n_u: int = 2, seed: int = 1):
    """Fixed batches shaped as the loaders give them (labels at every deep-supervision scale)."""
    g = torch.Generator().manual_seed(seed)
    patch = tuple(t.configuration_manager.patch_size)
    x_l = torch.randn(n_l, 1, *patch, generator=g)
    lab = torch.randint(0, t.label_manager.num_segmentation_heads, (n_l, 1, *patch), generator=g).float()
    with torch.no_grad():
        sizes = [o.shape[2:] for o in t.network(x_l)]
    labeled = {"data": x_l, "target": [F.interpolate(lab, size=s, mode="nearest-exact") for s in sizes]}
    return labeled, {"data": torch.randn(n_u, 1, *patch, generator=g)}


def _fixed_box(t, seed: int = 5) -> torch.Tensor:
    patch = tuple(t.configuration_manager.patch_size)
    box = random_box_mask(1, patch, t.hp.box_fraction, generator=torch.Generator().manual_seed(seed))
    t.draw_box = lambda n, spatial: box.expand(n, *box.shape[1:])
    return box


def _nnunet_region_loss(t, output, targets, regions):
    """Oracle: nnU-Net's own DC_and_CE_loss with deep supervision, on targets whose voxels outside the
    region carry an ignore label (nnU-Net then leaves them out of Dice and CE)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    ignore = t.label_manager.num_segmentation_heads
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": t.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                        "ddp": False}, {}, weight_ce=1, weight_dice=1, ignore_label=ignore,
                       dice_class=MemoryEfficientSoftDiceLoss), t.loss.weight_factors)
    masked = [torch.where(r, tg, torch.full_like(tg, ignore)) for tg, r in zip(targets, regions)]
    return loss(list(output), masked)


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
def test_self_training_loss_weights_pseudo_labeled_regions_by_alpha(demo2d, results):
    """mixed_labeled = nnU-Net's Dice+CE on the labeled regions of both mixed images; mixed_unlabeled =
    α × the same on their pseudo-labeled regions (outside the box of labeled→unlabeled, inside the box
    of unlabeled→labeled); with α = 0 the loss and its gradient do not depend on the pseudo labels."""
    t = _trainer(demo2d, alpha=0.3)  # not the default 0.5
    box = _fixed_box(t)
    labeled, unlabeled = _batches(t)
    heads = t.label_manager.num_segmentation_heads
    patch = tuple(t.configuration_manager.patch_size)
    pseudo = torch.randint(0, heads, (2, 1, *patch), generator=torch.Generator().manual_seed(7))
    t.pseudo_labels = lambda x_u: pseudo[: x_u.shape[0]]
    terms = t.compute_losses(labeled, unlabeled)
    assert set(terms) == {"mixed_labeled", "mixed_unlabeled", "_pseudo_foreground"}

    # by hand: pair 0 labeled→unlabeled, pair 1 unlabeled→labeled, one box
    x_l, x_u, t_l = labeled["data"], unlabeled["data"], labeled["target"]
    sizes = [tg.shape[2:] for tg in t_l]
    boxes = [F.interpolate(box.float(), size=s, mode="nearest-exact").bool() for s in sizes]
    p = [F.interpolate(pseudo.float(), size=s, mode="nearest-exact") for s in sizes]
    with torch.no_grad():
        out_1 = t.network(paste(x_u[:1], x_l[:1], box))
        out_2 = t.network(paste(x_l[1:], x_u[1:], box))
        target_1 = [paste(pi[:1], ti[:1], bi) for pi, ti, bi in zip(p, t_l, boxes)]
        target_2 = [paste(ti[1:], pi[1:], bi) for pi, ti, bi in zip(p, t_l, boxes)]
        lab = (_nnunet_region_loss(t, out_1, target_1, boxes)
               + _nnunet_region_loss(t, out_2, target_2, [~b for b in boxes]))
        unl = (_nnunet_region_loss(t, out_1, target_1, [~b for b in boxes])
               + _nnunet_region_loss(t, out_2, target_2, boxes))
    assert terms["mixed_labeled"].item() == pytest.approx(lab.item(), rel=1e-5, abs=1e-6)
    assert terms["mixed_unlabeled"].item() == pytest.approx(0.3 * unl.item(), rel=1e-5, abs=1e-6)
    assert abs(unl.item()) > 1e-3 and abs(lab.item() - unl.item()) > 1e-3  # the check can tell them apart
    assert terms["_pseudo_foreground"].item() == pytest.approx((pseudo > 0).float().mean().item())

    # α = 0: other pseudo labels, the same loss and the same gradient
    t.hp.alpha = 0.0

    def loss_and_grad(labels):
        t.pseudo_labels = lambda x_u: labels[: x_u.shape[0]]
        t.network.zero_grad(set_to_none=True)
        total = sum(v for k, v in t.compute_losses(labeled, unlabeled).items() if not k.startswith("_"))
        total.backward()
        return total.item(), torch.cat([q.grad.flatten() for q in t.network.parameters() if q.grad is not None])

    other = (pseudo + 1) % heads
    loss_a, grad_a = loss_and_grad(pseudo)
    loss_b, grad_b = loss_and_grad(other)
    assert loss_a == loss_b and torch.equal(grad_a, grad_b)
    t.hp.alpha = 0.5
    assert loss_and_grad(pseudo)[0] != loss_and_grad(other)[0]  # with α > 0 they matter


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
def test_pseudo_labels_are_the_teachers_argmax_with_largest_components(demo2d, results):
    t = _trainer(demo2d)
    with torch.no_grad():
        for q in t.teacher.module.parameters():  # a teacher unlike the student
            q.add_(0.3 * torch.randn_like(q))
    _, unlabeled = _batches(t)
    x_u = unlabeled["data"]
    with torch.no_grad():
        teacher = t.teacher.module(x_u)[0].argmax(1)
        student = t.network(x_u)[0].argmax(1)
    assert not torch.equal(teacher, student)
    t.hp.largest_component = False
    assert torch.equal(t.pseudo_labels(x_u), teacher[:, None])
    t.hp.largest_component = True
    filtered = largest_components(teacher, t.label_manager.num_segmentation_heads)
    assert not torch.equal(filtered, teacher)  # the filter does something on this prediction
    assert torch.equal(t.pseudo_labels(x_u), filtered[:, None])


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
def test_pretraining_uses_labeled_data_only_then_self_training_moves_the_teacher(demo2d, results):
    """Pre-training iterations draw no unlabeled batch, never ask the teacher, and minimise nnU-Net's
    Dice+CE of half b's box pasted into half a; the first self-training step starts the teacher as
    the student and moves it by θ' ← 0.99 θ' + 0.01 θ after the student's step."""
    t = _trainer(demo2d, epochs=2, iters=2)
    assert [(s.name, s.start, s.end) for s in t.phase_spans] == [("pretrain", 0, 1), ("selftrain", 1, 2)]
    assert t.burnin_iterations == 2
    box = _fixed_box(t)
    labeled, unlabeled = _batches(t)

    def no_unlabeled():
        raise AssertionError("an unlabeled batch was drawn in pre-training")
        yield

    def no_teacher(x_u):
        raise AssertionError("the teacher was asked in pre-training")

    t.dataloader_unlabeled = no_unlabeled()
    t.pseudo_labels = no_teacher
    with torch.no_grad():
        x, tg = labeled["data"], labeled["target"]
        boxes = [F.interpolate(box.float(), size=s.shape[2:], mode="nearest-exact").bool() for s in tg]
        expected = t.loss(t.network(paste(x[:1], x[1:], box)), [paste(a[:1], a[1:], b) for a, b in zip(tg, boxes)])
    teacher_before = _params(t.teacher.module)
    out = t.train_step(labeled)
    assert {k for k in out if k.startswith("term/")} == {"term/pretrain"}
    assert float(out["term/pretrain"]) == pytest.approx(expected.item(), rel=1e-5)
    assert _same(teacher_before, _params(t.teacher.module)) and t.teacher.num_updates == 0

    # self-training: iteration 2 is the first of the phase
    del t.pseudo_labels
    t.iteration, t.current_epoch = 2, 1
    t.dataloader_unlabeled = iter(lambda: unlabeled, None)
    student_before = _params(t.network)
    assert not _same(student_before, _params(t.teacher.module))  # the student has trained, the teacher not
    seen = []
    original = t.pseudo_labels

    def recording(x_u):
        seen.append(_params(t.teacher.module))
        return original(x_u)

    t.pseudo_labels = recording
    out = t.train_step(labeled)
    assert {k[5:] for k in out if k.startswith("term/")} == {"mixed_labeled", "mixed_unlabeled", "_pseudo_foreground"}
    assert _same(seen[0], student_before)  # the teacher labelled with the pre-trained student's weights
    student_after = _params(t.network)
    for k, v in t.teacher.module.state_dict().items():
        if v.is_floating_point() and k in dict(t.teacher.module.named_parameters()):
            assert torch.allclose(v, 0.99 * student_before[k] + 0.01 * student_after[k], rtol=0, atol=1e-6), k


@pytest.mark.slow  # short trainings on the demo dataset
def test_teacher_starts_as_the_pretrained_student_also_on_continue(demo2d, results, monkeypatch):
    """A run of 1 pre-training and 2 self-training epochs: at the first self-training step the teacher
    is the student after pre-training (not its initialisation). A run interrupted after the
    pre-training epoch and resumed does the same with the restored student."""
    from semidiff_nnunet.plugins.bcp import BCPTrainer

    def record(t):
        calls = []
        original = t.pseudo_labels

        def recording(x_u):
            calls.append((t.iteration, _params(t.teacher.module), _params(t.network)))
            return original(x_u)

        t.pseudo_labels = recording
        return calls

    straight = _trainer(demo2d, epochs=3)
    initial = _params(straight.network)
    calls = record(straight)
    straight.run_training()
    assert [c[0] for c in calls] == [2, 3, 4, 5]
    _, teacher, student = calls[0]
    assert _same(teacher, student) and not _same(teacher, initial)
    assert not _same(calls[1][1], calls[1][2])  # from then on an EMA, not a copy
    log = straight.logger.local_logger.my_fantastic_logging
    assert log["phase"] == ["pretrain", "selftrain", "selftrain"]
    assert np.isfinite(log["term/pretrain"][0]) and np.isnan(log["term/pretrain"][1:]).all()
    assert np.isnan(log["term/mixed_unlabeled"][0]) and np.isfinite(log["term/mixed_unlabeled"][1:]).all()

    import shutil

    shutil.rmtree(results)
    crashing = _trainer(demo2d, epochs=3)
    original = BCPTrainer.on_epoch_end

    def crash_after_pretraining(self):
        original(self)  # checkpoint_latest: the end of the pre-training epoch
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(BCPTrainer, "on_epoch_end", crash_after_pretraining)
    with pytest.raises(KeyboardInterrupt):
        crashing.run_training()
    monkeypatch.setattr(BCPTrainer, "on_epoch_end", original)
    pretrained = _params(crashing.network)

    resumed = _trainer(demo2d, epochs=3, initialize=False)
    resumed.load_checkpoint(str(crashing.output_folder + "/checkpoint_latest.pth"))
    assert resumed.current_epoch == 1 and resumed.iteration == 2
    resumed_calls = record(resumed)
    resumed.run_training()
    _, teacher, student = resumed_calls[0]
    assert _same(teacher, pretrained) and _same(student, pretrained)
    assert _same(pretrained, calls[0][2])  # the same pre-training as the straight run
    assert _same(resumed_calls[-1][1], calls[-1][1])  # and the same teacher at the end


def _scored(t, scores):
    """Validation off, but epoch e logs the pseudo Dice ``scores[e]`` (nnU-Net's logger turns it into the
    EMA that selects checkpoints), and the student's weights at the end of every epoch are recorded."""
    ends = {}
    original_end = t.on_epoch_end

    def log_score():
        t.logger.log("mean_fg_dice", scores[t.current_epoch], t.current_epoch)
        t.logger.log("dice_per_class_or_region", [scores[t.current_epoch]], t.current_epoch)
        t.logger.log("val_losses", 0.0, t.current_epoch)

    def end():
        ends[t.current_epoch] = _params(t.network)
        original_end()

    t._log_no_validation, t.on_epoch_end = log_score, end
    return ends


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
@pytest.mark.parametrize("start", ["best", "last"])
def test_self_training_starts_from_the_best_pretraining_epoch_on_validation(demo2d, results, start):
    """Pre-training 3 epochs whose validation scores make epoch 0 the best (EMA 0.9, 0.81, 0.73): with
    ``selftrain_start=best`` student and teacher start self-training from epoch 0's weights, with
    ``last`` from epoch 2's; a run resumed at the phase boundary starts the same way (the best weights
    are checkpointed)."""

    def first_step(t):
        seen = []
        original = t.pseudo_labels

        def recording(x_u):
            if not seen:
                seen.append((_params(t.teacher.module), _params(t.network)))
            return original(x_u)

        t.pseudo_labels = recording
        return seen

    scores = [0.9, 0.0, 0.0, 0.0]
    t = _trainer(demo2d, epochs=4, phases={"pretrain": "3"}, selftrain_start=start)
    ends = _scored(t, scores)
    seen = first_step(t)
    t.run_training()
    want = ends[0] if start == "best" else ends[2]
    teacher, student = seen[0]
    assert _same(teacher, want) and _same(student, want)
    assert not _same(ends[0], ends[2])
    if start == "last":
        return
    assert t.phase_best("pretrain").epoch == 0

    import shutil

    shutil.rmtree(results)
    crashing = _trainer(demo2d, epochs=4, phases={"pretrain": "3"}, selftrain_start=start)
    _scored(crashing, scores)
    scored_end = crashing.on_epoch_end

    def crash_after_pretraining():
        scored_end()  # checkpoint_latest: the end of the last pre-training epoch
        if crashing.current_epoch == 3:
            raise KeyboardInterrupt

    crashing.on_epoch_end = crash_after_pretraining
    with pytest.raises(KeyboardInterrupt):
        crashing.run_training()
    resumed = _trainer(demo2d, epochs=4, phases={"pretrain": "3"}, selftrain_start=start, initialize=False)
    resumed.load_checkpoint(str(crashing.output_folder + "/checkpoint_latest.pth"))
    _scored(resumed, scores)
    seen_resumed = first_step(resumed)
    resumed.run_training()
    assert _same(seen_resumed[0][0], want) and _same(seen_resumed[0][1], want)


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
def test_each_phase_runs_its_own_poly_schedule_from_the_initial_rate(demo2d, results):
    """``phase_lr=phase`` (default): the learning rate restarts at nnU-Net's initial rate when
    self-training begins and decays over that phase; ``run``: one poly schedule over the whole run."""
    rates = {}
    for mode in ("phase", "run"):
        t = _trainer(demo2d, epochs=4, phases={"pretrain": "2"}, phase_lr=mode)
        seen = rates[mode] = []
        original = t.on_train_epoch_start

        def start(t=t, seen=seen, original=original):
            original()
            seen.append(t.optimizer.param_groups[0]["lr"])

        t.on_train_epoch_start = start
        t.run_training()
    lr0 = 1e-2
    assert rates["phase"][0] == pytest.approx(lr0) and rates["phase"][2] == pytest.approx(lr0)
    assert rates["phase"][1] == pytest.approx(lr0 * 0.5 ** 0.9) and rates["phase"][3] == pytest.approx(lr0 * 0.5 ** 0.9)
    assert rates["run"] == pytest.approx([lr0 * (1 - e / 4) ** 0.9 for e in range(4)])


@pytest.mark.slow  # the demo dataset, planned with nnU-Net
def test_a_trained_start_skips_the_pretraining_phase(demo2d, results, tmp_path):
    """From ``--pretrained-weights`` the supervised pre-training (a warm-up of what the checkpoint holds)
    is skipped: every epoch self-trains, and the first step's student and teacher are the checkpoint's
    network; ``warmup_from_pretrained=true`` runs it as before."""
    source = _trainer(demo2d, epochs=1, phases={})
    source.run_training()
    weights = str(tmp_path / "trained.pth")
    import shutil

    shutil.copyfile(source.output_folder + "/checkpoint_final.pth", weights)
    trained = _params(source.network)
    shutil.rmtree(results)

    t = _trainer(demo2d, epochs=2, phases={}, pretrained_weights=weights)
    assert [(s.name, s.start, s.end) for s in t.phase_spans] == [("pretrain", 0, 0), ("selftrain", 0, 2)]
    assert t.burnin_iterations == 0
    seen = []
    original = t.pseudo_labels

    def recording(x_u):
        seen.append((_params(t.teacher.module), _params(t.network)))
        return original(x_u)

    t.pseudo_labels = recording
    t.run_training()
    assert len(seen) == 4 and _same(seen[0][0], trained) and _same(seen[0][1], trained)
    assert t.logger.local_logger.my_fantastic_logging["phase"] == ["selftrain", "selftrain"]
    shutil.rmtree(results)

    again = _trainer(demo2d, epochs=4, phases={}, pretrained_weights=weights, warmup_from_pretrained=True)
    assert [(s.name, s.start, s.end) for s in again.phase_spans] == [("pretrain", 0, 1), ("selftrain", 1, 4)]
    assert again.burnin_iterations == 2


# ---------------------------------------------------------------------------------------------- CLI
def _train_and_predict(run_cli, tmp_path, dataset, config, labeled, epochs):
    code, _, err = run_cli("plan-and-train", dataset, "-m", "bcp", "--labeled", labeled, "-c", config,
                           "--epochs", str(epochs), "--iters-per-epoch", "2", "--no-val",
                           "--set", "phase.pretrain=1", *TINY)
    assert code == 0, err
    from semidiff_nnunet import api

    info = api.run_info(dataset, "bcp", labeled, 0, config, 0, PLANS)
    assert info.fold_folder.parts[-2] == f"BCPTrainer__{PLANS}__{config}"
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == epochs and ck["trainer_name"] == "BCPTrainer"
    semi = ck["semidiff"]
    assert set(semi["states"]) == {"teacher", "phase_best/pretrain"} and set(semi["networks"]) == {"network"} and not semi["optimizers"]
    assert semi["states"]["teacher"]["num_updates"] == 2 * (epochs - 1)  # after every self-training step
    assert ck["network_weights"].keys() == semi["networks"]["network"].keys()  # the student is exported
    log = ck["logging"]
    assert log["phase"] == ["pretrain"] + ["selftrain"] * (epochs - 1)
    assert np.isfinite(log["term/pretrain"][0]) and np.isfinite(log["term/mixed_labeled"][1:]).all()
    assert np.isfinite(log["term/mixed_unlabeled"][1:]).all() and np.isfinite(log["train_losses"]).all()

    pred = tmp_path / f"bcp_{config}"
    api.predict(dataset, "bcp", raw(dataset) / "imagesTs", pred, labeled=labeled, configuration=config,
                device="cpu", plans_name=PLANS, use_mirroring=False, show_progress=False)
    return pred


@pytest.mark.slow
def test_bcp_2d_cli_and_stock_prediction(demo2d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo2d, "2d", "0.2", 3)
    files = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert files == ["demots_000.nii.gz", "demots_001.nii.gz", "demots_002.nii.gz"]
    seg = load_image(pred / files[0])
    assert seg.shape == load_image(raw(demo2d) / "labelsTs" / files[0]).shape and set(np.unique(seg)) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo2d, "bcp", "0.2", pred, tmp_path)


@pytest.mark.slow
def test_bcp_3d_cli_and_stock_prediction(demo3d, run_cli, tmp_path):
    pred = _train_and_predict(run_cli, tmp_path, demo3d, "3d_fullres", "2", 2)
    seg = load_image(pred / "demots_000.nii.gz")
    assert seg.shape == load_image(raw(demo3d) / "labelsTs" / "demots_000.nii.gz").shape
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo3d, "bcp", "2", pred, tmp_path, configuration="3d_fullres")
