"""Every patch of nnU-Net (``training/nnunet_compat.py``) against the installed nnU-Net.

An nnU-Net upgrade that moves or reshapes what a patch touches fails here, by name, instead of somewhere
in a training run. After checking every patch against a new release, update ``NNUNET_VERSION``.
"""

from __future__ import annotations

import inspect
import os
import sys
from importlib.metadata import version

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from semidiff_nnunet.training import nnunet_compat as compat

_module = sys.modules[nnUNetTrainer.__module__]


def _source(obj) -> str:
    return inspect.getsource(obj)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_patches_were_checked_against_the_installed_nnunet():
    assert version("nnunetv2") == compat.NNUNET_VERSION, (
        f"nnU-Net {version('nnunetv2')} is installed, the patches in training/nnunet_compat.py were checked against "
        f"{compat.NNUNET_VERSION}: check each one (this file) and update NNUNET_VERSION")


# ----------------------------------------------------------------------------------------- checkpoints
def test_nnunet_checkpoints_go_through_the_torch_name_of_its_trainer_module():
    assert _module.torch is torch
    assert _params(nnUNetTrainer.save_checkpoint) == ["self", "filename"]
    assert _params(nnUNetTrainer.load_checkpoint) == ["self", "filename_or_checkpoint"]
    assert "torch.save(checkpoint, filename)" in _source(nnUNetTrainer.save_checkpoint)
    assert "torch.load(filename_or_checkpoint" in _source(nnUNetTrainer.load_checkpoint)


def test_torch_io_is_put_back_also_after_an_error():
    with pytest.raises(RuntimeError), compat.nnunet_torch_io(loaded={"x": 1}) as io:
        assert _module.torch is io and _module.torch.load("f") == {"x": 1} and _module.torch.zeros is torch.zeros
        _module.torch.save({"y": 2}, "f")
        assert io.saved == {"y": 2}
        raise RuntimeError
    assert _module.torch is torch


# ----------------------------------------------------------------------------------------- environment, stdout
def test_single_threaded_loaders_set_and_restore_nnuneTs_worker_count(monkeypatch):
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    assert "get_allowed_n_proc_DA()" in _source(nnUNetTrainer.get_dataloaders)
    assert "nnUNet_n_proc_DA" in _source(get_allowed_n_proc_DA)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    with compat.single_threaded_nnunet_loaders():
        assert get_allowed_n_proc_DA() == 0
    assert os.environ["nnUNet_n_proc_DA"] == "1"
    monkeypatch.delenv("nnUNet_n_proc_DA")
    with compat.single_threaded_nnunet_loaders():
        pass
    assert "nnUNet_n_proc_DA" not in os.environ


def test_the_cpu_warning_is_nnunets_and_only_that_line_is_dropped(capsys):
    from nnunetv2.inference import predict_from_raw_data

    assert compat.CPU_DEVICE_WARNING in _source(predict_from_raw_data.nnUNetPredictor.__init__)
    assert "perform_everything_on_device=True" in _source(nnUNetTrainer.perform_actual_validation)
    stdout = sys.stdout
    with compat.without_cpu_device_warning():
        print("before")
        print(compat.CPU_DEVICE_WARNING + " devices! Setting this to False")
        print("after")
    assert sys.stdout is stdout
    assert capsys.readouterr().out == "before\nafter\n"


# ----------------------------------------------------------------------------------------- trainer state
def test_loss_weights_of_nnunets_dice_ce_inside_its_deep_supervision_wrapper():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    assert {"weight_ce", "weight_dice"} <= set(_params(DC_and_CE_loss.__init__))
    assert "DeepSupervisionWrapper(loss, weights)" in _source(nnUNetTrainer._build_loss)
    inner = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, weight_ce=1, weight_dice=1)
    wrapped = DeepSupervisionWrapper(inner, [1.0, 0.5])
    assert wrapped.loss is inner
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)).float()
    both = inner(logits, target)
    for loss in (inner, wrapped):
        with pytest.raises(KeyError), compat.loss_weights(loss, 0.25, 0.0):
            assert (inner.weight_ce, inner.weight_dice) == (0.25, 0.0)
            raise KeyError
        assert (inner.weight_ce, inner.weight_dice) == (1, 1)
    with compat.loss_weights(inner, 1.0, 0.0):
        ce_only = inner(logits, target)
    with compat.loss_weights(inner, 0.0, 1.0):
        dice_only = inner(logits, target)
    assert both.item() == pytest.approx(ce_only.item() + dice_only.item(), rel=1e-5)


def test_ddp_set_up_that_the_engine_replaces():
    init = _source(nnUNetTrainer.__init__)
    assert "self.is_ddp = " in init and "self.local_rank = " in init and "self.grad_scaler = " in init
    assert "torch.device(type='cuda', index=self.local_rank)" in init  # the GPU by global rank: replaced
    assert "if self.is_ddp:" in _source(nnUNetTrainer.initialize)  # its own DDP wrapping: switched off
    for name in ("_set_batch_size_and_oversample", "_build_loss", "_do_i_compile"):  # what the engine calls instead
        assert _params(getattr(nnUNetTrainer, name)) == ["self"], name

    class Fake:
        is_ddp, local_rank, grad_scaler, device = True, 3, object(), None

    t = Fake()
    with compat.initialize_without_nnunet_ddp(t) as ddp:
        assert ddp is True and t.is_ddp is False
    assert t.is_ddp is True
    compat.place_ddp_rank(t, torch.device("cpu"))
    assert t.device == torch.device("cpu") and t.grad_scaler is None


def test_the_local_logger_is_nnunets_reading_and_checkpointed_one():
    from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger

    from semidiff_nnunet.training.curves import SemiLocalLogger

    assert "self.logger = MetaLogger(" in _source(nnUNetTrainer.__init__)
    meta = MetaLogger("/nonexistent", resume=False)
    assert isinstance(meta.local_logger, LocalLogger) and issubclass(SemiLocalLogger, LocalLogger)
    for name in ("log", "get_value", "get_checkpoint", "load_checkpoint", "plot_progress_png"):
        assert "self.local_logger." in _source(getattr(MetaLogger, name)), name

    class Trainer:
        logger = meta

    compat.use_local_logger(Trainer, SemiLocalLogger())
    meta.log("term/x", 1.0, 0)
    assert meta.get_value("term/x", step=0) == 1.0


def test_foreground_oversampling_is_an_attribute_of_nnunets_loader():
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    assert "oversample_foreground_percent" in _params(nnUNetDataLoader.__init__)
    assert "self.oversample_foreground_percent" in _source(nnUNetDataLoader._oversample_last_XX_percent)

    class Loader:
        oversample_foreground_percent = 0.33

    loader = Loader()
    assert compat.set_foreground_oversampling(loader, None) == 0.33
    assert compat.set_foreground_oversampling(loader, 0.0) == 0.33 and loader.oversample_foreground_percent == 0.0
    assert compat.set_foreground_oversampling(object(), 0.5) is None


def test_dynamo_guards_module_hooks_of_a_compiled_network():
    import torch._dynamo

    assert hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards")
    assert "torch.compile(self.network)" in _source(nnUNetTrainer.initialize)
    # Dynamo's own patch: pytest's monkeypatch undo leaves this config module without the attribute
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        compat.guard_module_hooks_if_compiled(torch.nn.Linear(1, 1))  # not compiled: untouched
        assert torch._dynamo.config.skip_nnmodule_hook_guards is True
        compat.guard_module_hooks_if_compiled(torch.compile(torch.nn.Linear(1, 1), backend="eager"))
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    assert hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards")


def test_nnunet_builds_and_stops_the_loaders_the_engine_registers():
    """The engine's ``train``/``val`` are nnU-Net's ``dataloader_train``/``dataloader_val``, built by
    ``get_dataloaders`` in ``on_train_start`` and stopped (its own classes only) in ``on_train_end``."""
    assert "self.dataloader_train, self.dataloader_val = self.get_dataloaders()" in _source(nnUNetTrainer.on_train_start)
    assert "self.dataloader_train._finish()" in _source(nnUNetTrainer.on_train_end)
    assert "return mt_gen_train, mt_gen_val" in _source(nnUNetTrainer.get_dataloaders)
    assert _params(nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size) == ["self"]
