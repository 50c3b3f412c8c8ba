"""``transfer_weights`` (``--pretrained-weights`` into a method's networks) and its one-line log report."""

from __future__ import annotations

import torch
from torch import nn

from semidiff_nnunet.training.checkpoint import describe_transfer, transfer_weights


class _Net(nn.Module):
    """A stem that reads the image and 1 channel of its own, a head, and a tensor the method adds."""

    def __init__(self, in_ch: int, classes: int, own: bool):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 4, 3)
        self.decoder = nn.Module()
        self.decoder.seg_layers = nn.ModuleList([nn.Conv2d(4, classes, 1)])
        if own:
            self.time_proj = nn.Linear(2, 4)


def test_widened_input_new_tensors_and_other_class_count_are_reported():
    torch.manual_seed(0)
    checkpoint = _Net(1, 2, own=False).state_dict()
    net = _Net(2, 3, own=True)
    report = transfer_weights(net, checkpoint, lambda k: None if k.startswith("time_proj") else k, "ckpt.pth",
                              extra_inputs=True)
    state = net.state_dict()
    assert report["loaded"] == 2 and report["widened"] == ["stem.weight"]
    assert report["new"] == ["time_proj.weight", "time_proj.bias"]
    assert report["skipped_heads"] == ["decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"]
    assert torch.equal(state["stem.weight"][:, :1], checkpoint["stem.weight"])
    assert not state["stem.weight"][:, 1:].any()  # the network's own channel starts at zero
    line = describe_transfer(report, "ckpt.pth", "diffcl's own")
    assert line.startswith("pretrained weights from ckpt.pth: 2 tensors loaded")
    assert "2 tensors of diffcl's own left as built" in line
    assert "(another class count): decoder.seg_layers.0.weight, decoder.seg_layers.0.bias" in line
    assert "start at zero in stem.weight" in line


def test_a_plain_transfer_reports_only_what_loaded():
    checkpoint = _Net(1, 2, own=False).state_dict()
    net = _Net(1, 2, own=False)
    report = transfer_weights(net, checkpoint, lambda k: k, "ckpt.pth")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in checkpoint.items())
    assert describe_transfer(report, "ckpt.pth", "x") == "pretrained weights from ckpt.pth: 4 tensors loaded"


def test_only_a_new_run_starts_from_pretrained_weights():
    """A run that continues holds its networks in its own checkpoint: --pretrained-weights must not
    overwrite them (nor a method's second network copied from them, e.g. SuperDiffusion's student)."""
    from types import SimpleNamespace

    from semidiff_nnunet.training.checkpoint import CheckpointMixin

    def starts(weights, continuing):
        t = SimpleNamespace(run_config=SimpleNamespace(pretrained_weights=weights),
                            plans_manager=SimpleNamespace(plans={"continue_training": continuing}))
        return CheckpointMixin.starts_from_pretrained.fget(t)

    assert starts("/runs/supervised/checkpoint_final.pth", False)
    assert not starts("/runs/supervised/checkpoint_final.pth", True)
    assert not starts(None, False)
