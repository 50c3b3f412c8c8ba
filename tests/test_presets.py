"""What an nnU-Net user types works here too: planner presets (``-pl nnUNetPlannerResEncM``), every
built-in method on residual-encoder plans (2D, and one method in 3D), ``--pretrained-weights`` from
stock nnU-Net and from our own runs, ``predict --save-probabilities/--step-size`` and fold ensembling.

One ResEnc M plan of the tiny 2D demo dataset is made through the CLI (``plan-and-train -pl``) and
shared by the module; the method runs use a shrunk copy of it (8 features, one block per stage,
batch 2: still ``ResidualEncoderUNet``), 1 epoch × 1 iteration, no validation.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import builtin_methods, load_image, raw

from semidiff_nnunet.errors import SemidiffError

RESENC = "semidiffResEncPlans"  # the shrunk copy of nnUNetResEncUNetMPlans
LAB = "0.5"
SHORT = ["--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "0", "--no-val", "--device", "cpu"]
ALL_METHODS = builtin_methods()
# CI trains the methods whose code reaches into the planned network (hooks on encoder stages, timestep
# conditioning, widths from the plans, the planned encoder) and the two plain references; every built-in
# method with SEMIDIFF_PRESETS_ALL=1 (all 15 passed on 2026-12-03)
METHODS = ALL_METHODS if os.environ.get("SEMIDIFF_PRESETS_ALL") == "1" else [
    "supervised", "mean-teacher", "cct", "unimatch", "diffrect", "diffcl", "superdiffusion", "protodiff"]
RESIDUAL_KEY = ".blocks.0.conv1.conv.weight"  # a tensor only a residual encoder stage has


def _plans(dataset: str, name: str) -> dict:
    return json.loads((Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{name}.json").read_text())


def _checkpoint(dataset, method, plans=RESENC, configuration="2d", fold=0, seed=0) -> Path:
    from semidiff_nnunet import api

    return api.run_info(dataset, method, LAB, seed, configuration, fold, plans).fold_folder / "checkpoint_final.pth"


def _stock_predict(dataset: str, runs: dict[str, Path], configuration: str, workdir: Path) -> dict[str, Path]:
    """Stock nnU-Net (``nnUNetPredictor``, what ``nnUNetv2_predict`` runs) in one clean interpreter whose
    nnU-Net variables are only the ones ``semidiff env`` prints: each model folder of ``runs`` predicts
    ``imagesTs`` without TTA. Returns method → output folder."""
    from semidiff_nnunet import api

    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    for line in api.env_lines():
        key, value = line[len("export "):].split("=", 1)
        env[key] = value.strip("'")
    outs = {m: workdir / f"stock_{m}_{configuration}" for m in runs}
    script = (
        "import sys, json, torch\n"
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
        "for model, out in json.loads(sys.argv[1]):\n"
        "    p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False,\n"
        "                        device=torch.device('cpu'), allow_tqdm=False)\n"
        "    p.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name='checkpoint_final.pth')\n"
        f"    p.predict_from_files({str(raw(dataset) / 'imagesTs')!r}, out, save_probabilities=False,\n"
        "                         num_processes_preprocessing=1, num_processes_segmentation_export=1)\n")
    pairs = [[str(runs[m]), str(outs[m])] for m in runs]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(pairs)], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outs


def _assert_same_segmentations(ours: Path, stock: Path) -> None:
    files = sorted(ours.glob("*.nii.gz"))
    assert files and sorted(p.name for p in stock.glob("*.nii.gz")) == [f.name for f in files]
    for f in files:
        assert np.array_equal(load_image(f), load_image(stock / f.name)), f.name


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def resenc2d(demo2d, tmp_path_factory):
    """``semidiff plan-and-train -pl nnUNetPlannerResEncM`` on the 2D demo (a supervised run on the M plans),
    then a shrunk copy of those plans (:data:`RESENC`) for the method runs."""
    from semidiff_nnunet import planning
    from semidiff_nnunet.cli.main import main

    argv = sys.argv
    sys.argv = ["semidiff", "plan-and-train", demo2d, "-m", "supervised", "--labeled", LAB, "-c", "2d",
                "-pl", "nnUNetPlannerResEncM", *SHORT]
    try:
        main()
    except SystemExit as e:
        assert not e.code, "plan-and-train -pl nnUNetPlannerResEncM failed"
    finally:
        sys.argv = argv
    planning.shrink_plans(demo2d, "nnUNetResEncUNetMPlans", RESENC, max_features=8, batch_size=2, n_conv_per_stage=1)
    return demo2d


@pytest.fixture(scope="module")
def trained(resenc2d, tmp_path_factory):
    """method → (its prediction folder of imagesTs, its model folder), filled by the method runs."""
    return {}


# ---------------------------------------------------------------------------------------------- planner
def test_plans_names_follow_nnunet():
    from semidiff_nnunet import planning

    assert planning.plans_name_for(None, None) == "nnUNetPlans"
    assert planning.plans_name_for(None, None, "nnUNetPlannerResEncM") == "nnUNetResEncUNetMPlans"
    assert planning.plans_name_for(None, None, "nnUNetPlannerResEncXL") == "nnUNetResEncUNetXLPlans"
    assert planning.plans_name_for(24, None, "nnUNetPlannerResEncL") == "nnUNetResEncUNetLPlans_24GB"
    assert planning.plans_name_for(0.5, "Mine", "nnUNetPlannerResEncL") == "Mine"  # -overwrite_plans_name


def test_unknown_planner_is_refused_before_any_work(run_cli, workspace):
    """Refused before the dataset is even looked up (this one does not exist), with the planners nnU-Net knows."""
    before = sorted(p.name for p in Path(os.environ["nnUNet_preprocessed"]).iterdir())
    for command in (["plan-and-train", "Dataset977_Nowhere", "-m", "supervised", *SHORT],
                    ["benchmark", "Dataset977_Nowhere", "-m", "supervised", "--dry-run"]):
        code, _, err = run_cli(*command, "-pl", "NoSuchPlanner")
        assert code == 1
        msg = " ".join(err.split())
        assert "NoSuchPlanner" in msg and "nnUNetPlannerResEncM" in msg and "ExperimentPlanner" in msg, msg
        assert "Dataset977" not in msg and "Traceback" not in err and msg.count(". ") <= 1
    assert sorted(p.name for p in Path(os.environ["nnUNet_preprocessed"]).iterdir()) == before


@pytest.mark.slow
def test_resenc_m_plans_through_plan_and_train(resenc2d):
    plans = _plans(resenc2d, "nnUNetResEncUNetMPlans")
    arch = plans["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    ident = plans["configurations"]["2d"]["data_identifier"]
    pre = Path(os.environ["nnUNet_preprocessed"]) / resenc2d
    assert sorted(p.name for p in (pre / f"{ident}__unlabeled").glob("*.pkl"))  # the unlabeled pool, same plans
    ck = _checkpoint(resenc2d, "supervised", plans="nnUNetResEncUNetMPlans")
    weights = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.endswith(RESIDUAL_KEY) for k in weights)
    run = json.loads((ck.parent / "semidiff_run.json").read_text())
    assert len(run["split"]["extra_unlabeled"]) == 3  # imagesUnlabeled/, preprocessed with the ResEnc plans
    assert _plans(resenc2d, RESENC)["configurations"]["2d"]["architecture"]["network_class_name"] == \
        arch["network_class_name"]


# ---------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_semigda import tiny_vae

    folder = tmp_path_factory.mktemp("tiny_vae_presets")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_predicts_on_resenc_2d(run_cli, resenc2d, trained, method, tmp_path_factory, request):
    extra = []
    if method == "semigda":
        extra = ["--set", f"vae={request.getfixturevalue('vae_dir')}"]
    code, _, err = run_cli("train", resenc2d, "-m", method, "--labeled", LAB, "-c", "2d", "--plans", RESENC,
                           *SHORT, *extra)
    assert code == 0, err
    ck = _checkpoint(resenc2d, method)
    weights = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
    if method != "semigda":  # SemiGDA's network is its VAE-based model, not the planned U-Net
        assert any(k.endswith(RESIDUAL_KEY) for k in weights), sorted(weights)[:5]
    out = tmp_path_factory.mktemp(f"pred_{method}")
    code, _, err = run_cli("predict", "-d", resenc2d, "-m", method, "--labeled", LAB, "-c", "2d", "--plans", RESENC,
                           "-i", raw(resenc2d) / "imagesTs", "-o", out, "--device", "cpu", "--disable-tta")
    assert code == 0, err
    assert len(list(out.glob("*.nii.gz"))) == 3
    trained[method] = (out, ck.parent.parent)


@pytest.mark.slow
def test_stock_nnunet_predicts_every_resenc_run(resenc2d, trained, tmp_path):
    missing = [m for m in METHODS if m not in trained]
    if missing:
        pytest.skip(f"the method runs did not all pass ({', '.join(missing)})")
    stock = _stock_predict(resenc2d, {m: model for m, (_, model) in trained.items()}, "2d", tmp_path)
    for m, (ours, _) in trained.items():
        _assert_same_segmentations(ours, stock[m])


@pytest.mark.slow
def test_diffcl_on_resenc_3d(run_cli, demo3d, tmp_path):
    from semidiff_nnunet import api, planning

    pname = api.plan_and_preprocess(demo3d, ["3d_fullres"], planner="nnUNetPlannerResEncM", show_progress=False)
    assert pname == "nnUNetResEncUNetMPlans"
    planning.shrink_plans(demo3d, pname, RESENC, max_features=8, batch_size=2, n_conv_per_stage=1)
    code, _, err = run_cli("train", demo3d, "-m", "diffcl", "--labeled", LAB, "-c", "3d_fullres", "--plans", RESENC,
                           *SHORT)
    assert code == 0, err
    ck = _checkpoint(demo3d, "diffcl", configuration="3d_fullres")
    weights = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.endswith(RESIDUAL_KEY) for k in weights) and any(".hfm." in k for k in weights)
    out = tmp_path / "ours"
    code, _, err = run_cli("predict", "-d", demo3d, "-m", "diffcl", "--labeled", LAB, "-c", "3d_fullres",
                           "--plans", RESENC, "-i", raw(demo3d) / "imagesTs", "-o", out, "--device", "cpu",
                           "--disable-tta")
    assert code == 0, err
    stock = _stock_predict(demo3d, {"diffcl": ck.parent.parent}, "3d_fullres", tmp_path)
    _assert_same_segmentations(out, stock["diffcl"])


# ---------------------------------------------------------------------------------------------- pretrained
def _stock_nnunet_checkpoint(dataset: str, plans_name: str, folder: Path) -> Path:
    """A checkpoint written by stock ``nnUNetTrainer.save_checkpoint`` (randomly initialised network)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet import api, planning

    plans = {**planning.load_plans(dataset, plans_name), "continue_training": False}  # (nnU-Net's run_training sets it)
    ds = planning.dataset_json(planning.preprocessed_folder(dataset))
    with api._results_root(folder):
        trainer = nnUNetTrainer(plans, "2d", 0, ds, torch.device("cpu"))
        trainer.initialize()
        torch.manual_seed(123)
        for p in trainer.network.parameters():  # far from any fresh initialisation
            p.data.normal_(0, 1)
        path = folder / "stock.pth"
        trainer.save_checkpoint(str(path))
    return path


def _initialized_trainer(dataset: str, method: str, pretrained: Path, folder: Path, **hparams):
    """A semidiff trainer of ``method`` on :data:`RESENC`, initialised (network, method state) as a new run."""
    from semidiff_nnunet import api, planning
    from semidiff_nnunet.training.run_config import RunConfig
    from semidiff_nnunet.training.splits import LabeledSpec

    plans = {**planning.load_plans(dataset, RESENC), "continue_training": False}  # a new run, as api.train says
    RunConfig(method=method, labeled=LabeledSpec.parse(LAB), pretrained_weights=str(pretrained),
              hparams=hparams).write(plans)
    ds = planning.dataset_json(planning.preprocessed_folder(dataset))
    with api._results_root(folder):
        trainer = api.method_trainer(method)(plans=plans, configuration="2d", fold=0, dataset_json=ds,
                                             device=torch.device("cpu"))
        trainer.initialize()
    return trainer


@pytest.mark.slow
def test_pretrained_from_stock_nnunet_checkpoint(resenc2d, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from semidiff_nnunet.training.ema import unwrap

    stock = _stock_nnunet_checkpoint(resenc2d, RESENC, tmp_path)
    weights = torch.load(stock, map_location="cpu", weights_only=False)["network_weights"]
    mt = _initialized_trainer(resenc2d, "mean-teacher", stock, tmp_path / "mt")
    for net in (unwrap(mt.network), mt.teacher.module):
        state = net.state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights), "network or EMA teacher not initialised"
    assert mt.trained_start and mt.burnin_iterations == 0  # a trained start skips the supervised burn-in
    # Diff-CL: CS is the planned U-Net with HF-Mamba inside an encoder stage (keys mapped), HF-Mamba as built
    dc = _initialized_trainer(resenc2d, "diffcl", stock, tmp_path / "dc")
    state = unwrap(dc.network).state_dict()
    mapped = {k: dc.pretrained_key(k) for k in state}
    assert sum(v is None for v in mapped.values()) > 0
    assert all(torch.equal(state[k], weights[v]) for k, v in mapped.items() if v is not None)
    # SuperDiffusion: the mask pathway reads image ⊕ noisy mask; the image channels of its input convolution
    # come from the checkpoint, the mask channels start at zero: it predicts exactly as the checkpoint
    sd = _initialized_trainer(resenc2d, "superdiffusion", stock, tmp_path / "sd")
    pathway = unwrap(sd.network)
    state = pathway.state_dict()
    widened = [k for k in state if k.startswith("net.unet.") and tuple(state[k].shape) != tuple(
        weights[k[len("net.unet."):]].shape)]
    assert widened, "the input convolution reads no mask channels"
    for k in widened:
        c = weights[k[len("net.unet."):]].shape[1]
        assert torch.equal(state[k][:, :c], weights[k[len("net.unet."):]]) and not state[k][:, c:].any()
    assert all(torch.equal(state[k], weights[k[len("net.unet."):]]) for k in state
               if k.startswith("net.unet.") and k not in widened)
    stock_net = nnUNetTrainer.build_network_architecture(sd.plans_manager, sd.configuration_manager,
                                                         sd.num_input_channels, sd.label_manager.num_segmentation_heads,
                                                         False)
    stock_net.load_state_dict({k: v for k, v in weights.items()})
    pathway.eval(), stock_net.eval()
    image = torch.randn(1, sd.num_input_channels, *sd.configuration_manager.patch_size)
    with torch.no_grad():
        predicted, expected = pathway(image), stock_net(image)
    predicted = predicted[0] if isinstance(predicted, (list, tuple)) else predicted
    assert torch.allclose(predicted, expected, atol=1e-4, rtol=1e-4)
    # its student starts as the teacher (the checkpoint), as built with student_from_pretrained=false
    assert all(torch.equal(v, state[k]) for k, v in unwrap(sd.student).state_dict().items())
    sd2 = _initialized_trainer(resenc2d, "superdiffusion", stock, tmp_path / "sd2", student_from_pretrained=False)
    teacher = unwrap(sd2.network).state_dict()
    assert not all(torch.equal(v, teacher[k]) for k, v in unwrap(sd2.student).state_dict().items())
    # Diff-CL's DS (image ⊕ Y_t) from the checkpoint too with ds_from_pretrained: it predicts as the checkpoint
    # whatever Y_t holds; by default it starts as built
    y0 = torch.nn.functional.one_hot(torch.randint(0, sd.label_manager.num_segmentation_heads, image.shape[:1]
                                                   + image.shape[2:]), sd.label_manager.num_segmentation_heads)
    y0 = y0.movedim(-1, 1).float()
    for ds_init in (True, False):
        dc = _initialized_trainer(resenc2d, "diffcl", stock, tmp_path / f"dc{ds_init}", ds_from_pretrained=ds_init)
        ds = unwrap(dc.ds).eval()
        with torch.no_grad():
            out = ds(image, y0=y0)
        out = out[0] if isinstance(out, (list, tuple)) else out
        assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4) == ds_init
    # another class count: the segmentation heads stay as built, everything else loads
    bigger = torch.load(stock, map_location="cpu", weights_only=False)
    for k in [k for k in bigger["network_weights"] if ".seg_layers." in k]:
        v = bigger["network_weights"][k]
        bigger["network_weights"][k] = torch.ones((5, *v.shape[1:]))
    torch.save(bigger, tmp_path / "five_classes.pth")
    sv = _initialized_trainer(resenc2d, "supervised", tmp_path / "five_classes.pth", tmp_path / "sv")
    state = unwrap(sv.network).state_dict()
    heads = [k for k in weights if ".seg_layers." in k]
    assert heads and all(not torch.equal(state[k][:1], torch.ones_like(state[k][:1])) for k in heads)
    assert all(torch.equal(state[k], weights[k]) for k in weights if k not in heads)


@pytest.mark.slow
def test_supervised_then_mean_teacher_recipe(run_cli, resenc2d, tmp_path):
    """The documented pair: train supervised, then mean-teacher from its checkpoint; recorded in the run;
    --continue with another file is refused; a checkpoint of other plans is refused naming keys and shapes."""
    code, _, err = run_cli("train", resenc2d, "-m", "supervised", "--labeled", LAB, "--seed", "1", "--plans", RESENC,
                           *SHORT)
    assert code == 0, err
    sup = _checkpoint(resenc2d, "supervised", seed=1)
    code, _, err = run_cli("train", resenc2d, "-m", "mean-teacher", "--labeled", LAB, "--seed", "1",
                           "--plans", RESENC, "--pretrained-weights", sup, *SHORT, "--save-every", "1")
    assert code == 0, err
    mt = _checkpoint(resenc2d, "mean-teacher", seed=1)
    run = json.loads((mt.parent / "semidiff_run.json").read_text())
    assert run["pretrained_weights"] == str(sup.resolve())
    log = "".join(p.read_text() for p in mt.parent.glob("training_log_*.txt"))
    assert f"pretrained weights from {sup.resolve()}" in log
    # --continue: the file the run started from is ignored (the run keeps its checkpoint), another is refused
    resume = ["train", resenc2d, "-m", "mean-teacher", "--labeled", LAB, "--seed", "1", "--plans", RESENC, "--continue",
              *SHORT]
    code, _, err = run_cli(*resume, "--pretrained-weights", sup)
    assert code == 0, err
    m_plans = _checkpoint(resenc2d, "supervised", plans="nnUNetResEncUNetMPlans")
    code, _, err = run_cli(*resume, "--pretrained-weights", m_plans)
    assert code == 1 and "only initialises a new run" in " ".join(err.split()), err
    # the M plans' checkpoint into the shrunk network: refused, naming a key and both shapes
    code, _, err = run_cli("train", resenc2d, "-m", "supervised", "--labeled", LAB, "--seed", "2", "--plans", RESENC,
                           "--pretrained-weights", m_plans, *SHORT)
    msg = " ".join(err.split())
    assert code == 1 and "does not fit" in msg and "encoder." in msg and "(32, " in msg and "(8, " in msg, msg
    assert "Traceback" not in err
    assert not _checkpoint(resenc2d, "supervised", seed=2).parent.exists()  # no half-made run folder left
    # a file that is no checkpoint: refused before any run folder is made
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    code, _, err = run_cli("train", resenc2d, "-m", "supervised", "--labeled", LAB, "--seed", "4", "--plans", RESENC,
                           "--pretrained-weights", tmp_path / "notes.pth", *SHORT)
    assert code == 1 and "not a readable PyTorch checkpoint" in " ".join(err.split()), err
    assert not _checkpoint(resenc2d, "supervised", seed=4).parents[3].exists()  # not even the run root


# ---------------------------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_probabilities_step_size_and_fold_ensemble(run_cli, resenc2d, tmp_path, monkeypatch):
    from nnunetv2.ensembling.ensemble import ensemble_folders
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from semidiff_nnunet import api

    for fold in ("0", "1"):
        code, _, err = run_cli("train", resenc2d, "-m", "supervised", "--labeled", LAB, "--seed", "3", "-f", fold,
                               "--plans", RESENC, *SHORT)
        assert code == 0, err
    common = ["-d", resenc2d, "-m", "supervised", "--labeled", LAB, "--seed", "3", "--plans", RESENC,
              "-i", raw(resenc2d) / "imagesTs", "--device", "cpu", "--disable-tta", "--save-probabilities"]
    for fold in ("0", "1"):
        code, out, err = run_cli("predict", *common, "-f", fold, "-o", tmp_path / f"f{fold}")
        assert code == 0 and "one fold" in err, err
    steps, init = [], nnUNetPredictor.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        steps.append(self.tile_step_size)

    monkeypatch.setattr(nnUNetPredictor, "__init__", recording_init)
    code, out, err = run_cli("predict", *common, "-f", "0", "-f", "1", "-o", tmp_path / "both", "--step-size", "0.75")
    assert code == 0, err
    assert "ensemble of 2 folds" in " ".join(err.split()), err
    assert steps == [0.75]  # nnU-Net's -step_size reached the predictor
    for case in ("f0", "f1", "both"):
        npz = sorted((tmp_path / case).glob("*.npz"))
        assert len(npz) == 3 and all(p.with_suffix(".pkl").is_file() for p in npz)
        probs = np.load(npz[0])["probabilities"]
        assert np.allclose(probs.sum(0), 1, atol=1e-3)
        with open(npz[0].with_suffix(".pkl"), "rb") as f:
            assert "spacing" in pickle.load(f)
    # nnU-Net's ensembling of the two folds' probabilities = our two-fold prediction
    ensemble_folders([str(tmp_path / "f0"), str(tmp_path / "f1")], str(tmp_path / "ens"), num_processes=1)
    _assert_same_segmentations(tmp_path / "both", tmp_path / "ens")
    with pytest.raises(SemidiffError, match="step-size"):
        api.predict(resenc2d, "supervised", raw(resenc2d) / "imagesTs", tmp_path / "x", labeled=LAB, seed=3,
                    plans_name=RESENC, tile_step_size=0)
