"""Every built-in method's loss terms and weights after a short real run, against a recorded reference.

The guard for engine refactors (the trainer split, engine-owned loaders, the api package): behaviour
must not change, so each method trains 4 epochs × 2 iterations on the same tiny 2D dataset (no
augmentation workers, one validation iteration per epoch so selections run) and its per-epoch loss
terms, learning rates and per-network weight statistics must equal those recorded in
``tests/data/golden_losses.json``.

Floating-point kernels differ between CPUs and torch builds, so the reference holds only where it was
recorded: the test skips (saying why) on another torch version or CPU capability. On the recording
machine it compares to ``rel=1e-4`` (SEMIDIFF_GOLDEN_EXACT=1: bit for bit, what a refactor must keep).

    python tests/test_golden_losses.py           # rewrite the reference (after a deliberate change)
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import builtin_methods

from semidiff_nnunet.training.curves import MEASURED_LOG_KEYS

pytestmark = pytest.mark.slow
REFERENCE = Path(__file__).parent / "data" / "golden_losses.json"
PLANS = "semidiffDemoPlans"
#: per method, what makes a 8-iteration run reach every step it has (defaults otherwise)
OVERRIDES = {"diffrect": {"refine_start": "2"}}
SKIP_LOG = set(MEASURED_LOG_KEYS)


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _stats(state: dict) -> dict:
    """Sum and sum of squares of every floating tensor of a state dict, per tensor (float64)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            d = v.detach().double()
            out[k] = [float(d.sum()), float((d * d).sum())]
    return out


def _numbers(values) -> list | None:
    """A logged curve as floats (nested lists flattened), None for anything else."""
    if not isinstance(values, list):
        return None
    flat = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in flat):
        return [float(v) for v in flat]
    return None


def _tensor_dicts(obj, prefix: str = "") -> dict:
    """Every dict of tensors inside ``obj`` (the EMA teachers and other registered states), by path."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensor_dicts(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def record(name: str, method: str, vae: Path | None) -> dict:
    """Train ``method`` on ``name`` and return its logged terms and weight statistics."""
    from semidiff_nnunet import api
    from semidiff_nnunet.training.checkpoint import safe_load

    overrides = dict(OVERRIDES.get(method, {}))
    if method == "semigda":
        overrides["vae"] = str(vae)
    info = api.train(name, method, labeled="0.5", seed=0, configuration="2d", fold=0, device="cpu", epochs=4,
                     iters_per_epoch=2, plans_name=PLANS, val_iters_per_epoch=1, final_validation=False,
                     show_progress=False, overrides=overrides)
    ck = safe_load(info.fold_folder / "checkpoint_final.pth")
    log = {k: _numbers(v) for k, v in ck["logging"].items() if k not in SKIP_LOG}
    nets = {"network": _stats(ck["network_weights"])}
    for net_name, state in ck["semidiff"]["networks"].items():
        nets[net_name] = _stats(state)
    for path, state in _tensor_dicts(ck["semidiff"]["states"]).items():
        nets[f"state:{path}"] = _stats(state)
    return {"log": {k: v for k, v in log.items() if v is not None}, "weights": nets}


def _close(a: float, b: float, exact: bool) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if exact else a == pytest.approx(b, rel=1e-4, abs=1e-6)


def compare(got: dict, want: dict, exact: bool) -> list[str]:
    bad = []
    for section in ("log", "weights"):
        if got[section].keys() != want[section].keys():
            bad.append(f"{section} keys {sorted(got[section])} != {sorted(want[section])}")
            continue
        for k in want[section]:
            g, w = got[section][k], want[section][k]
            if section == "weights":
                if g.keys() != w.keys():
                    bad.append(f"weights of {k}: other tensors")
                    continue
                pairs = [(f"{k}.{t}", a, b) for t in w for a, b in zip(g[t], w[t])]
            else:
                if len(g) != len(w):
                    bad.append(f"{k}: {len(g)} values, want {len(w)}")
                    continue
                pairs = [(f"{k}[{i}]", a, b) for i, (a, b) in enumerate(zip(g, w))]
            bad += [f"{where}: {a!r} != {b!r}" for where, a, b in pairs if not _close(a, b, exact)]
    return bad


@pytest.fixture(scope="module")
def golden2d(workspace):
    from semidiff_nnunet import api

    return api.prepare_demo_dataset(dim=2, show_progress=False, dataset_id=987, name="Golden2D", num_train=8,
                                    num_test=0, num_unlabeled=2, shape=(32, 32), max_features=8, batch_size=2,
                                    seed=11)


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    if ref["machine"] != machine():
        pytest.skip(f"the reference was recorded with {ref['machine']}, this is {machine()}: other kernels")
    return ref


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_semigda import tiny_vae

    folder = tmp_path_factory.mktemp("golden_vae")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", builtin_methods())
def test_loss_terms_and_weights_match_the_reference(method, golden2d, reference, tiny_vae_folder, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    assert method in reference["methods"], f"no reference for {method}: rerun python {__file__}"
    got = record(golden2d, method, tiny_vae_folder)
    bad = compare(got, reference["methods"][method], os.environ.get("SEMIDIFF_GOLDEN_EXACT") == "1")
    assert not bad, f"{method}: {len(bad)} differences, first: " + "; ".join(bad[:5])


def test_a_changed_term_is_reported():
    want = {"log": {"train_loss": [0.5, 0.25]}, "weights": {"network": {"w": [1.0, 2.0]}}}
    assert compare(json.loads(json.dumps(want)), want, exact=True) == []
    assert compare({"log": {"train_loss": [0.5, 0.2501]}, "weights": want["weights"]}, want, exact=False)
    assert compare({"log": {"train_loss": [0.5, 0.25]}, "weights": {"network": {"w": [1.0, 2.0 + 1e-12]}}},
                   want, exact=True)


if __name__ == "__main__":  # rewrite the reference in a throwaway workspace
    import tempfile

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["nnUNet_compile"] = "false"
    root = Path(tempfile.mkdtemp(prefix="golden_ws_"))
    os.environ["SEMIDIFF_HOME"] = str(root)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        os.environ[var] = str(root / var)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_semigda import tiny_vae

    from semidiff_nnunet import api

    name = api.prepare_demo_dataset(dim=2, show_progress=False, dataset_id=987, name="Golden2D", num_train=8,
                                    num_test=0, num_unlabeled=2, shape=(32, 32), max_features=8, batch_size=2,
                                    seed=11)
    vae = root / "vae"
    tiny_vae().save_pretrained(vae)
    os.environ["nnUNet_n_proc_DA"] = "0"
    only = sys.argv[1:] or builtin_methods()
    ref = json.loads(REFERENCE.read_text(encoding="utf-8")) if REFERENCE.is_file() and sys.argv[1:] else \
        {"machine": machine(), "methods": {}}
    for m in only:
        print(m, flush=True)
        ref["methods"][m] = record(name, m, vae)
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n", encoding="utf-8")
