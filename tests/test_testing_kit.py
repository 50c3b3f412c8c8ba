"""The plugin authors' test kit (:mod:`semidiff_nnunet.testing`) catches what it promises to catch: each
check fails on a method with the bug it is about (a mutant), and the 3D dataset fixture trains. The
checks passing on a correct method are exercised by the example plugin's own tests
(``test_example_plugin.py``) and, for the built-in methods, by the tests the kit was taken from."""

from __future__ import annotations

import pytest
import torch

from semidiff_nnunet import testing
from semidiff_nnunet.plugins.mean_teacher.trainer import MeanTeacherTrainer

pytestmark = pytest.mark.slow
METHOD = "mean-teacher"


def test_a_method_trains_on_the_3d_dataset(semidiff_dataset3d):
    ck = testing.assert_trains(semidiff_dataset3d, METHOD, epochs=1, iterations=2)
    assert testing.configuration_of(semidiff_dataset3d) == "3d_fullres" and ck["semidiff"]["iteration"] == 2


def test_trains_fails_on_a_network_no_loss_reaches(semidiff_dataset2d, monkeypatch):
    original = MeanTeacherTrainer.build_method

    def build_method(self):
        original(self)
        self.register_network("idle", torch.nn.Linear(2, 2))  # trainable, checkpointed, never in a loss

    monkeypatch.setattr(MeanTeacherTrainer, "build_method", build_method)
    with pytest.raises(AssertionError, match="the network 'idle' did not change"):
        testing.assert_trains(semidiff_dataset2d, METHOD, epochs=1, iterations=2)


def test_resumes_exactly_fails_on_state_the_checkpoint_misses(semidiff_dataset2d, monkeypatch):
    original = MeanTeacherTrainer.compute_losses

    def compute_losses(self, labeled, unlabeled):
        self.steps_seen = getattr(self, "steps_seen", 0) + 1  # counts from 0 again after --continue
        terms = original(self, labeled, unlabeled)
        return {**terms, "supervised": terms["supervised"] * (1 + 0.01 * self.steps_seen)}

    monkeypatch.setattr(MeanTeacherTrainer, "compute_losses", compute_losses)
    with pytest.raises(AssertionError, match="differs"):
        testing.assert_resumes_exactly(semidiff_dataset2d, METHOD)


def test_exports_fails_when_the_inference_network_needs_more_than_the_plans(semidiff_dataset2d, tmp_path,
                                                                            monkeypatch):
    original = MeanTeacherTrainer.build_network_architecture

    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):  # a parameter stock nnU-Net does not build
        net = original(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                       enable_deep_supervision)
        net.register_parameter("only_in_this_process", torch.nn.Parameter(torch.zeros(1)))
        return net

    monkeypatch.setattr(MeanTeacherTrainer, "build_network_architecture", staticmethod(build_network_architecture))
    with pytest.raises(AssertionError, match="stock nnUNetv2_predict failed"):
        testing.assert_exports_to_stock_nnunet(semidiff_dataset2d, METHOD, tmp_path)


def test_hidden_labels_fails_on_a_method_that_reads_them(semidiff_dataset2d, monkeypatch):
    import blosc2

    original = MeanTeacherTrainer.compute_losses
    folder = testing.preprocessed_folder(semidiff_dataset2d, "2d")

    def compute_losses(self, labeled, unlabeled):  # reads every label map on disk, the hidden ones included
        seen = sum(float(blosc2.open(str(f), mode="r")[:].sum()) for f in sorted(folder.glob("*_seg.b2nd")))
        terms = original(self, labeled, unlabeled)
        return {**terms, "supervised": terms["supervised"] * (1 + 1e-6 * seen)}

    monkeypatch.setattr(MeanTeacherTrainer, "compute_losses", compute_losses)
    with pytest.raises(AssertionError, match="differs"):
        testing.assert_hidden_labels_never_reach_a_loss(semidiff_dataset2d, METHOD)
    assert not list(folder.parent.glob("*.kit-pristine"))  # the dataset was restored
