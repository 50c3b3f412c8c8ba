"""A checkpoint cannot run code: every checkpoint semidiff reads is unpickled with ``weights_only=True`` and an
allowlist of plain data types (``training.checkpoint.safe_load``), and ``semidiff predict`` checks a run's
checkpoint that way before nnU-Net's predictor (which unpickles it unsafely) touches it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import raw

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training import checkpoint as ckpt


class _Touch:
    """Unpickling it creates ``path``: what a crafted checkpoint does with ``os.system`` or worse."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.touch, (self.path,)


class _System(_Touch):
    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


PAYLOADS = {"path-touch": (_Touch, "builtins.getattr"), "os-system": (_System, f"{os.system.__module__}.system")}


def _crafted(path: Path, marker: Path, payload=_Touch) -> Path:
    """A file shaped like an nnU-Net checkpoint whose unpickling runs ``payload``."""
    torch.save({"network_weights": {"encoder.w": torch.zeros(2)}, "current_epoch": 1, "init_args": payload(marker)},
               path)
    return path


def _one_sentence(message: str) -> str:
    message = " ".join(message.split())
    assert message.endswith(".") and not re.search(r"\.\s+[A-Z]", message), message
    return message


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_crafted_checkpoint_is_refused_before_it_runs(tmp_path, payload):
    cls, needs = PAYLOADS[payload]
    marker = tmp_path / "MARKER"
    crafted = _crafted(tmp_path / "crafted.pth", marker, cls)
    with pytest.raises(SemidiffError) as e:
        ckpt.safe_load(crafted)
    message = _one_sentence(str(e.value))
    assert str(crafted) in message and needs in message, message
    assert not marker.exists()
    # the payload is live: what nnU-Net's predictor does (weights_only=False) runs it
    torch.load(crafted, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_what_our_checkpoints_hold_loads(tmp_path):
    """The types a semidiff/nnU-Net checkpoint holds: tensors, torch.device, RNG states (numpy uint32 arrays,
    Python ints), nnU-Net's logger values (numpy float scalars), numpy str_ case ids; and arrays written
    with numpy 1 (``numpy.core.multiarray``), as old stock nnU-Net checkpoints are."""
    state = {"network_weights": {"w": torch.arange(3.0)}, "device": torch.device("cpu"), "rng": ckpt.rng_state(),
             "logging": {"ema_fg_dice": [np.float32(0.5), np.float64(0.25)]}, "_best_ema": np.float32(0.5),
             "held_out": [np.str_("case_001")], "counts": np.arange(4, dtype=np.int64), "mask": np.ones(2, bool)}
    torch.save(state, tmp_path / "ours.pth")
    loaded = ckpt.safe_load(tmp_path / "ours.pth")
    assert np.array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert loaded["rng"]["python"] == state["rng"]["python"] and torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["logging"] == state["logging"] and type(loaded["logging"]["ema_fg_dice"][1]) is np.float64
    assert loaded["held_out"] == ["case_001"] and loaded["counts"].dtype == np.int64 and loaded["mask"].all()
    # the same file as numpy 1 spells it
    with zipfile.ZipFile(tmp_path / "ours.pth") as zin, zipfile.ZipFile(tmp_path / "np1.pth", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert np.array_equal(ckpt.safe_load(tmp_path / "np1.pth")["counts"], state["counts"])
    # an object array (how arbitrary objects would ride along) is not plain data
    torch.save({"x": np.array([None], dtype=object)}, tmp_path / "objects.pth")
    with pytest.raises(SemidiffError, match="ObjectDType"):
        ckpt.safe_load(tmp_path / "objects.pth")


def test_pretrained_weights_refuses_a_crafted_checkpoint(workspace, run_cli, tmp_path):
    from semidiff_nnunet import api

    marker = tmp_path / "MARKER"
    crafted = _crafted(tmp_path / "crafted.pth", marker)
    with pytest.raises(SemidiffError, match="Refused to load"):
        api.check_pretrained_weights(crafted)
    code, _, err = run_cli("plan-and-train", "979", "-m", "supervised", "--pretrained-weights", crafted, *TINY)
    message = _one_sentence(err)
    assert code == 1 and "Traceback" not in err and "Refused to load" in message and "crafted.pth" in message, err
    assert not marker.exists()
    # a file that is no checkpoint at all keeps its own message
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(SemidiffError, match="not a readable PyTorch checkpoint"):
        api.check_pretrained_weights(tmp_path / "notes.pth")


@pytest.mark.slow
def test_real_run_resumes_and_predicts_a_crafted_one_is_refused(demo2d, run_cli, tmp_path):
    """A tiny real run: its checkpoint resumes (--continue) and predicts; a crafted file in its place is refused
    by --continue and by predict, before nnU-Net sees it."""
    from semidiff_nnunet import api

    run = ["-m", "supervised", "--labeled", "3", "--seed", "57", "-c", "2d"]
    train = ["train", demo2d, *run, "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--no-val", *TINY]
    code, _, err = run_cli(*train)
    assert code == 0, err
    folder = api.run_info(demo2d, "supervised", "3", 57, "2d", 0, "semidiffDemoPlans").fold_folder
    final, latest = folder / "checkpoint_final.pth", folder / "checkpoint_latest.pth"
    predict = ["predict", "-d", demo2d, *run, "-i", raw(demo2d) / "imagesTs", "--plans", "semidiffDemoPlans",
               "--device", "cpu", "--disable-tta"]
    code, _, err = run_cli(*predict, "-o", tmp_path / "pred")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3
    # killed after its last epoch's checkpoint: --continue loads checkpoint_latest and finishes the run
    os.replace(final, latest)
    code, _, err = run_cli(*train, "--continue")
    assert code == 0 and final.is_file() and not latest.exists(), err
    assert ckpt.safe_load(final)["current_epoch"] == 1
    real = tmp_path / "real.pth"
    shutil.copy(final, real)

    marker = tmp_path / "MARKER"
    final.unlink()
    _crafted(latest, marker, _System)
    code, _, err = run_cli(*train, "--continue")
    message = _one_sentence(err)
    assert code == 1 and "Traceback" not in err and "Refused to load" in message and "system" in message, err
    assert not marker.exists()

    latest.unlink()
    _crafted(final, marker)
    code, _, err = run_cli(*predict, "-o", tmp_path / "pred2")
    message = _one_sentence(err)
    assert code == 1 and "Traceback" not in err and "Refused to load" in message and "getattr" in message, err
    assert not marker.exists() and not (tmp_path / "pred2").exists()
    shutil.copy(real, final)  # the run as it was, for tests after this one
