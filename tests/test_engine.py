"""The engine: declared phases and optimisation steps, progress callback, checkpoints on nnU-Net's dict."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import OptimStep, Phase, RunConfig, SemiSupervisedTrainer
from semidiff_nnunet.training.declarations import resolve_phases
from semidiff_nnunet.training.splits import LabeledSpec

PLANS = "semidiffDemoPlans"


class TwoPhaseTrainer(SemiSupervisedTrainer):
    """A test method: phase ``warmup`` trains only an auxiliary network, phase ``joint`` only the main
    network, with a fresh optimiser (SGD, lr 0.005, momentum 0.9) from the phase's first epoch."""

    method_name = "two-phase-test"
    uses_unlabeled = False
    phases = (Phase("warmup", share=0.5), Phase("joint"))

    def build_method(self):
        self.entered = []
        self.aux = self.register_network("aux", self.build_planned_network())

    def optimisation_steps(self):
        return (OptimStep("aux", self.aux_losses, networks=("aux",), phases=("warmup",)),
                OptimStep("main", self.main_losses, networks=("network",), phases=("joint",)))

    def aux_losses(self, labeled, unlabeled, carry):
        return {"aux": self.supervised_loss(self.aux(labeled["data"]), labeled["target"])}

    def main_losses(self, labeled, unlabeled, carry):
        return {"main": self.supervised_loss(self.network(labeled["data"]), labeled["target"], ce_weight=0.5)}

    def on_phase_start(self, phase):
        self.entered.append((phase.name, self.current_epoch))
        if phase.name == "joint":
            self.restart_optimizer("network", torch.optim.SGD(self.network.parameters(), 0.005, momentum=0.9))


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, total, completed, description):
        self.calls.append(("start", total, completed, description))

    def step(self, loss, epoch, num_epochs, phase):
        self.calls.append(("step", epoch, num_epochs, phase))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return tmp_path / "results"


def _trainer(dataset: str, cls=TwoPhaseTrainer, epochs: int = 4, **config) -> SemiSupervisedTrainer:
    from semidiff_nnunet import planning

    plans = planning.load_plans(dataset, PLANS)
    plans["continue_training"] = False
    RunConfig(method=cls.method_name, labeled=LabeledSpec.parse("0.5"), num_epochs=epochs,
              num_iterations_per_epoch=2, num_val_iterations_per_epoch=0, **config).write(plans)
    dataset_json = json.loads((planning.preprocessed_folder(dataset) / "dataset.json").read_text(encoding="utf-8"))
    t = cls(plans, "2d", 0, dataset_json, torch.device("cpu"))
    t.print_to_log_file = lambda *a, **k: None
    return t


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------- phases
def test_phase_spans_shares_epochs_overrides_and_errors():
    declared = (Phase("pretrain", share=0.3), Phase("co-training"))
    assert [(s.name, s.start, s.end) for s in resolve_phases(declared, {}, 10)] == [("pretrain", 0, 3),
                                                                                      ("co-training", 3, 10)]
    assert [(s.start, s.end) for s in resolve_phases(declared, {"pretrain": "4"}, 10)] == [(0, 4), (4, 10)]
    assert [(s.start, s.end) for s in resolve_phases(declared, {"pretrain": "0.5"}, 10)] == [(0, 5), (5, 10)]
    fixed = (Phase("a", epochs=2), Phase("b", share=0.5))
    assert [(s.start, s.end) for s in resolve_phases(fixed, {}, 6)] == [(0, 2), (2, 6)]  # rounding to the end
    assert [(s.name, s.start, s.end) for s in resolve_phases((), {}, 5)] == [("training", 0, 5)]
    with pytest.raises(SemidiffError, match="too few for its phases"):
        resolve_phases((Phase("a", epochs=8), Phase("b")), {}, 5)
    with pytest.raises(SemidiffError, match="phase.pretrain=abc"):
        resolve_phases(declared, {"pretrain": "abc"}, 10)


@pytest.mark.slow  # plans the demo dataset
def test_phases_steps_optimiser_restart_and_progress(demo2d, results):
    t = _trainer(demo2d)
    t.progress = Recorder()
    t.initialize()
    start_net, start_aux = _params(t.network), _params(t.aux)
    boundary = {}
    original = t.on_phase_start

    def on_phase_start(phase):
        if phase.name == "joint":
            boundary["network"], boundary["aux"] = _params(t.network), _params(t.aux)
        original(phase)

    t.on_phase_start = on_phase_start
    t.run_training()

    assert t.entered == [("warmup", 0), ("joint", 2)]
    log = t.logger.local_logger.my_fantastic_logging
    assert log["phase"] == ["warmup", "warmup", "joint", "joint"]
    # warmup trained only the auxiliary network, joint only the main network
    assert all(torch.equal(start_net[k], boundary["network"][k]) for k in start_net)
    assert any(not torch.equal(start_aux[k], boundary["aux"][k]) for k in start_aux)
    end_aux = _params(t.aux)
    assert all(torch.equal(boundary["aux"][k], end_aux[k]) for k in end_aux)
    assert any(not torch.equal(boundary["network"][k], v) for k, v in _params(t.network).items())
    # each step's terms are logged in its own phase and NaN elsewhere
    assert np.isfinite(log["term/aux"][:2]).all() and np.isnan(log["term/aux"][2:]).all()
    assert np.isnan(log["term/main"][:2]).all() and np.isfinite(log["term/main"][2:]).all()
    # the restarted optimiser's poly LR runs over the joint phase only: 0.005 at its start
    assert log["lrs"][2] == pytest.approx(0.005) and log["lrs"][3] == pytest.approx(0.005 * 0.5 ** 0.9)
    assert isinstance(t.optimizer, torch.optim.SGD) and t.optimizer.param_groups[0]["momentum"] == 0.9
    # the progress callback saw every iteration with its phase
    calls = t.progress.calls
    assert calls[0] == ("start", 8, 0, "two-phase-test") and calls[-1] == ("close",)
    assert [c[3] for c in calls[1:-1]] == ["warmup"] * 4 + ["joint"] * 4
    run = json.loads((results.parent / "results").joinpath(
        demo2d, f"TwoPhaseTrainer__{PLANS}__2d", "fold_0", "semidiff_run.json").read_text(encoding="utf-8"))
    assert run["phases"] == {"warmup": [0, 2], "joint": [2, 4]}
    assert (results / demo2d / f"TwoPhaseTrainer__{PLANS}__2d" / "fold_0" / "progress.png").is_file()


class LabelFreeFirstTrainer(TwoPhaseTrainer):
    method_name = "label-free-test"
    phases = (Phase("warmup", share=0.5, label_free=True), Phase("joint"))


@pytest.mark.slow  # plans the demo dataset
def test_a_label_free_phase_crops_without_looking_at_labels(demo2d, results, monkeypatch):
    """During a ``label_free`` phase the labeled loader's workers start with foreground oversampling off
    (crop positions independent of the labels); nnU-Net's oversampling is back in the next phase."""
    from semidiff_nnunet.training.augmenters import EpochSeededAugmenter

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # worker processes copy the loader when they start
    seen = []
    original = EpochSeededAugmenter.start_epoch

    def start_epoch(self, epoch):
        if hasattr(self.data_loader, "oversample_foreground_percent"):
            seen.append((self, epoch, self.data_loader.oversample_foreground_percent))
        original(self, epoch)

    monkeypatch.setattr(EpochSeededAugmenter, "start_epoch", start_epoch)
    t = _trainer(demo2d, LabelFreeFirstTrainer)
    t.initialize()
    t.run_training()
    nnunet = t.oversample_foreground_percent
    assert nnunet > 0
    # the labeled training stream only (the validation loader is epoch-seeded too and keeps nnU-Net's setting)
    train = [(epoch, p) for loader, epoch, p in seen if loader is t.dataloader_train]
    assert train == [(0, 0.0), (1, 0.0), (2, nnunet), (3, nnunet)]


@pytest.mark.slow  # plans the demo dataset
def test_phase_length_from_run_config(demo2d, results):
    t = _trainer(demo2d, phases={"warmup": "1"})
    assert [(s.name, s.start, s.end) for s in t.phase_spans] == [("warmup", 0, 1), ("joint", 1, 4)]


def _crashed_and_resumed(dataset, results, monkeypatch, epochs_done: int) -> TwoPhaseTrainer:
    """A fresh run killed after ``epochs_done`` epochs (checkpoint_latest written every epoch), then a new
    trainer loaded from that checkpoint, not yet trained further."""
    import shutil

    shutil.rmtree(results)
    crashing = _trainer(dataset, save_every=1)
    original = TwoPhaseTrainer.on_epoch_end

    def crash(self):
        original(self)
        if self.current_epoch == epochs_done:
            raise KeyboardInterrupt

    monkeypatch.setattr(TwoPhaseTrainer, "on_epoch_end", crash)
    crashing.initialize()
    with pytest.raises(KeyboardInterrupt):
        crashing.run_training()
    monkeypatch.setattr(TwoPhaseTrainer, "on_epoch_end", original)
    resumed = _trainer(dataset, save_every=1)
    resumed.load_checkpoint(str(crashing.output_folder + "/checkpoint_latest.pth"))
    return resumed


@pytest.mark.slow  # plans the demo dataset
def test_resume_continues_exactly_inside_the_second_phase(demo2d, results, monkeypatch):
    straight = _trainer(demo2d, save_every=1)
    straight.initialize()
    straight.run_training()
    reference = {"network": _params(straight.network), "aux": _params(straight.aux),
                 "lrs": list(straight.logger.local_logger.my_fantastic_logging["lrs"])}

    resumed = _crashed_and_resumed(demo2d, results, monkeypatch, epochs_done=3)  # checkpoint: epochs 0-2
    assert resumed.current_epoch == 3 and resumed.iteration == 6
    # the joint phase was entered before its optimiser state was restored: momentum buffers are there
    assert resumed.entered == [("joint", 3)] and resumed.optimizer.param_groups[0]["momentum"] == 0.9
    assert resumed.optimizer.state  # restored, not fresh
    resumed.run_training()
    for part in ("network", "aux"):
        got = _params(getattr(resumed, part))
        assert all(torch.equal(reference[part][k], got[k]) for k in got), part
    assert resumed.logger.local_logger.my_fantastic_logging["lrs"] == pytest.approx(reference["lrs"])


@pytest.mark.slow  # plans the demo dataset
def test_resume_at_the_phase_boundary_keeps_the_new_phases_fresh_optimiser(demo2d, results, monkeypatch):
    """checkpoint_latest written at the last warmup epoch holds warmup's optimiser states; the joint phase
    rebuilds the network's optimiser (SGD, momentum 0.9), which must not receive them on --continue."""
    straight = _trainer(demo2d, save_every=1)
    straight.initialize()
    straight.run_training()
    reference = _params(straight.network)

    resumed = _crashed_and_resumed(demo2d, results, monkeypatch, epochs_done=2)  # after the last warmup epoch
    assert resumed.entered == [("joint", 2)] and resumed.optimizer.param_groups[0]["momentum"] == 0.9
    resumed.run_training()
    got = _params(resumed.network)
    assert all(torch.equal(reference[k], got[k]) for k in got)


# ----------------------------------------------------------------------------------------- steps
@pytest.mark.slow  # plans the demo dataset
def test_step_naming_an_unknown_network_is_an_error(demo2d, results):
    class Broken(TwoPhaseTrainer):
        def optimisation_steps(self):
            return (OptimStep("x", self.aux_losses, networks=("teacher",)),)

    t = _trainer(demo2d, cls=Broken)
    t.initialize()
    batch = {"data": torch.randn(2, 1, 32, 32), "target": [torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 16, 16)]}
    with pytest.raises(ValueError, match="'teacher', which is not a trainable network"):
        t.train_step(batch)


@pytest.mark.slow  # plans the demo dataset
def test_joint_forward_splits_and_supervised_loss_weights(demo2d, results):
    t = _trainer(demo2d)
    t.initialize()
    t.network.eval()
    x_l, x_u = torch.randn(2, 1, 32, 32), torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out_l, out_u = t.joint_forward(t.network, x_l, x_u)
        whole = t.network(torch.cat([x_l, x_u]))
    assert [o.shape[0] for o in out_l] == [2] * len(whole) and [o.shape[0] for o in out_u] == [3] * len(whole)
    assert all(torch.equal(a, b[:2]) for a, b in zip(out_l, whole))
    target = [torch.randint(0, 3, (2, 1, *o.shape[2:])).float() for o in out_l]
    both = t.supervised_loss(out_l, target)
    ce_only = t.supervised_loss(out_l, target, ce_weight=1.0, dice_weight=0.0)
    dice_only = t.supervised_loss(out_l, target, ce_weight=0.0, dice_weight=1.0)
    assert both.item() == pytest.approx(ce_only.item() + dice_only.item(), rel=1e-5)
    assert t.supervised_loss(out_l, target, ce_weight=0.25).item() == pytest.approx(
        0.25 * ce_only.item() + dice_only.item(), rel=1e-5)
    assert t.supervised_loss(out_l, target).item() == pytest.approx(both.item())  # weights restored


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow  # plans the demo dataset
def test_checkpoint_keeps_keys_a_future_nnunet_adds(demo2d, results, monkeypatch):
    """Our checkpoint is nnU-Net's own dict plus ours: a key nnU-Net's save_checkpoint adds in a future
    version lands in it too (a hand copy of nnU-Net's keys would drop it)."""
    module = sys.modules[nnUNetTrainer.__module__]
    original = nnUNetTrainer.save_checkpoint

    def future_save_checkpoint(self, filename):
        outer = module.torch

        class AddsAKey:
            def __getattr__(self, name):
                return getattr(outer, name)

            def save(self, obj, f, *a, **k):
                outer.save({**obj, "future_nnunet_key": 42}, f, *a, **k)

        module.torch = AddsAKey()
        try:
            original(self, filename)
        finally:
            module.torch = outer

    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", future_save_checkpoint)
    t = _trainer(demo2d, epochs=1)
    t.initialize()
    t.run_training()
    ck = torch.load(t.output_folder + "/checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["future_nnunet_key"] == 42
    assert set(ck["semidiff"]["networks"]) == {"network", "aux"} and ck["semidiff"]["phase"] == "joint"
    assert ck["network_weights"].keys() == ck["semidiff"]["networks"]["network"].keys()
    assert ck["trainer_name"] == "TwoPhaseTrainer" and ck["current_epoch"] == 1


# ----------------------------------------------------------------------------------------- schedule policy
@pytest.mark.slow  # plans the demo dataset
@pytest.mark.parametrize("epochs, iters, burnin, ramp", [
    (2, 3, 1, 5),  # a test run: burn-in at most a quarter, ramp capped by what is left
    (4, 40, 40, 120),  # 160 steps: floor 100 capped at a quarter (40); ramp floor 200 capped by the rest
    (20, 100, 100, 1900),  # 2000 steps: burn-in floor 100, ramp over the rest of the run
    (1000, 250, 1000, 30000),  # nnU-Net's 250 000: burn-in ceiling 1000, ramp ceiling 30 000
])
def test_burnin_and_ramp_lengths_follow_the_policy(demo2d, results, epochs, iters, burnin, ramp):
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    t = _trainer(demo2d, cls=MeanTeacherTrainer, epochs=epochs)
    t.num_iterations_per_epoch = iters
    assert t.burnin_iterations == burnin and t.ramp_length(1.0) == ramp
    t.iteration = burnin - 1
    assert t.in_burnin and t.ramp(0.1) == 0.0
    t.iteration = burnin + ramp
    assert not t.in_burnin and t.ramp(0.1) == pytest.approx(0.1)
    t.iteration = burnin + ramp // 2
    assert t.ramp(0.1) == pytest.approx(0.1 * np.exp(-5 * (1 - (ramp // 2) / ramp) ** 2))


@pytest.mark.slow  # plans the demo dataset
def test_a_trained_start_ramps_in_full_unless_told_otherwise(demo2d, results):
    """From ``--pretrained-weights`` the burn-in is skipped; the ramp-up runs as the authors' (near zero at
    first) by default, and gives the full weight from the first iteration with ``rampup_from_pretrained``
    off (nothing is loaded before ``initialize``, so the path need not exist here)."""
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    default = _trainer(demo2d, cls=MeanTeacherTrainer, epochs=20, pretrained_weights="/x/checkpoint_final.pth")
    full = _trainer(demo2d, cls=MeanTeacherTrainer, epochs=20, pretrained_weights="/x/checkpoint_final.pth",
                    hparams={"rampup_from_pretrained": False})
    scratch = _trainer(demo2d, cls=MeanTeacherTrainer, epochs=20, hparams={"rampup_from_pretrained": False})
    for t in (default, full, scratch):
        t.num_iterations_per_epoch = 100
    assert default.trained_start and default.burnin_iterations == 0 and full.burnin_iterations == 0
    default.iteration = full.iteration = 0
    assert default.ramp(0.1) < 0.001 and full.ramp(0.1) == 0.1
    default.iteration = full.iteration = 1000
    assert default.ramp(0.1) < full.ramp(0.1) == 0.1
    # from scratch the setting changes nothing: burn-in, then the ramp
    scratch.iteration = scratch.burnin_iterations
    assert scratch.burnin_iterations == 100 and scratch.ramp(0.1) < 0.001


@pytest.mark.slow  # plans the demo dataset
def test_burnin_trains_on_labels_only_without_drawing_unlabeled_batches(demo2d, results):
    from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer

    t = _trainer(demo2d, cls=MeanTeacherTrainer, epochs=4)  # 8 iterations: burn-in 2
    t.initialize()
    assert t.burnin_iterations == 2
    x = torch.randn(2, 1, 32, 32)
    lab = torch.randint(0, 3, (2, 1, 32, 32)).float()
    batch = {"data": x, "target": [lab, lab[:, :, ::2, ::2], lab[:, :, ::4, ::4]][: len(t.loss.weight_factors)]}

    class Counting:
        drawn = 0

        def __next__(self):
            Counting.drawn += 1
            return {"data": torch.randn(2, 1, 32, 32)}

    t.dataloader_unlabeled = Counting()
    teacher_before = _params(t.teacher.module)
    out = t.train_step(batch)
    assert Counting.drawn == 0 and set(out) == {"loss", "term/supervised"}
    assert any(not torch.equal(teacher_before[k], v) for k, v in _params(t.teacher.module).items())  # EMA moves
    t.iteration = 2  # burn-in over: the unlabeled stream and the consistency term start, at weight 0 + ramp
    out = t.train_step(batch)
    assert Counting.drawn == 1 and {"term/consistency", "term/_consistency_weight"} <= set(out)
    assert out["term/_consistency_weight"] == pytest.approx(0.1 * np.exp(-5.0))
    t.dataloader_unlabeled = None


@pytest.mark.slow  # plans the demo dataset
def test_a_step_whose_loss_is_off_updates_nothing(demo2d, results):
    """A declared step that returns a loss without a graph (DiffRect's gated rectified supervision) is
    logged but takes no optimiser step: no momentum, no weight decay moves the network."""

    class OffStep(TwoPhaseTrainer):
        phases = ()

        def optimisation_steps(self):
            return (OptimStep("off", lambda lab, unl, carry: {"off": torch.zeros(())}, networks=("network",)),)

    t = _trainer(demo2d, cls=OffStep)
    t.initialize()
    t.optimizer.state.clear()
    before = _params(t.network)
    batch = {"data": torch.randn(2, 1, 32, 32),
             "target": [torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 8, 8)]}
    for p in t.network.parameters():  # a stale gradient that a step would apply
        p.grad = torch.ones_like(p)
    out = t.train_step(batch)
    assert out["term/off"] == 0 and not t.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in _params(t.network).items())


def test_the_burnin_hooks_old_name_is_refused_not_ignored():
    """``supervised_losses`` was the burn-in hook's name; a plugin still defining it would silently lose its
    burn-in losses, so defining it is an error naming the new name."""
    with pytest.raises(TypeError, match="rename it to burnin_losses"):
        class Old(SemiSupervisedTrainer):
            def supervised_losses(self, labeled):
                return {}

    class New(SemiSupervisedTrainer):
        def burnin_losses(self, labeled):
            return {}
