"""``pseudo=DIR`` of the ``mosxav`` and ``endoscapes2023`` converters: the user's noisy pseudo masks of
the un-annotated frames become ``labelsPseudo/`` (never of an annotated, validation or test frame),
and the converted MOSXAV fixture feeds ``protodiff``'s pseudo-label stream end to end.

The fixtures are the converter tests' replicas of the downloads (``make_mosxav``/``make_endoscapes``
from ``test_converters``) plus a folder of pseudo masks laid out like the dataset's own masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import names
from PIL import Image
from test_converters import MOSXAV_PALETTE, blob, convert, make_endoscapes, make_mosxav, rgb, save

from semidiff_nnunet.dataset_conversion.api import convert_dataset
from semidiff_nnunet.dataset_conversion.common import ConversionError, verify_dataset

VIDEOS = ("v01", "v02", "v03")  # make_mosxav: v01, v02 train, v03 val; frames 0 and 5 annotated
UNLABELED = (1, 2, 3, 4)


# ----------------------------------------------------------------------------- fixtures
def pseudo_label(f: int, video: str) -> np.ndarray:
    """The pseudo mask of one frame (16x20): a different class layout per frame and video."""
    m = blob(value=1 + f % 4, y=f, x=2 * int(video[1:]))
    m[15, 0:3] = 1 + (f + 1) % 4
    return m


def save_mosxav_mask(m: np.ndarray, path: Path, rgb_masks: bool) -> None:
    if rgb_masks:
        save(np.array(MOSXAV_PALETTE, np.uint8).reshape(-1, 3)[m], path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(m, mode="P")
        im.putpalette(MOSXAV_PALETTE)
        im.save(path)


def make_mosxav_pseudo(pdir: Path, rgb_masks=False, frames=UNLABELED, annotated=(0, 5)) -> Path:
    """Pseudo masks ``pdir/vNN/0000F.png`` for ``frames`` (and ``annotated`` frames) of every trainval video."""
    for v in VIDEOS:
        for f in (*frames, *annotated):
            save_mosxav_mask(pseudo_label(f, v), pdir / v / f"{f:05d}.png", rgb_masks)
    return pdir


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def semidiff_info(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["semidiff"]


# ----------------------------------------------------------------------------- MOSXAV
@pytest.mark.parametrize("rgb_masks", [False, True], ids=["palette", "rgb"])
def test_mosxav_pseudo_masks_of_unlabeled_training_frames_only(tmp_path, rgb_masks):
    src = make_mosxav(tmp_path / "mosxav", rgb_masks=rgb_masks)
    pdir = make_mosxav_pseudo(tmp_path / "medsam", rgb_masks=rgb_masks)
    out = convert("mosxav", src, tmp_path, pseudo=str(pdir))
    # exactly the un-annotated frames of the training videos; v03 is the validation video (val.txt)
    want = [f"{v}_{f:05d}" for v in ("v01", "v02") for f in UNLABELED]
    assert names(out / "labelsPseudo") == [f"{c}.png" for c in want]
    unl = {n[: -len("_0000.png")] for n in names(out / "imagesUnlabeled")}
    assert len(unl) == 12 and set(want) <= unl
    for case in want:
        v, f = case.split("_")
        got = read(out / "labelsPseudo" / f"{case}.png")
        assert got.ndim == 2 and got.dtype == np.uint8
        np.testing.assert_array_equal(got, pseudo_label(int(f), v))  # palette indices / colour table -> ids
    # the annotated frames keep their ground truth, and no pseudo mask is on a validation or test case
    assert read(out / "labelsTr" / "v01_00000.png").max() == 4
    val = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))[0]["val"]
    pseudo_cases = {n[:-4] for n in names(out / "labelsPseudo")}
    assert not pseudo_cases & (set(val) | {n[:-4] for n in names(out / "labelsTs")} | {n[:-4] for n in
                                                                                      names(out / "labelsTr")})
    notes = " | ".join(semidiff_info(out)["notes"])
    assert "8 pseudo masks" in notes
    assert "6 of annotated frames" in notes and "4 of frames of validation videos" in notes, notes
    verify_dataset(out, num_processes=1)


def test_mosxav_pseudo_trainval_test_layout_ignores_test_frames(tmp_path):
    src = make_mosxav(tmp_path / "mosxav")
    pdir = tmp_path / "medsam"
    save_mosxav_mask(pseudo_label(3, "v02"), pdir / "trainval" / "v02" / "00003.png", False)
    for f in (2, 3):  # test v01 frames 2 and 3: same names as trainval v01 frames, but test frames
        save_mosxav_mask(pseudo_label(f, "v01"), pdir / "test" / "v01" / f"{f:05d}.png", False)
    out = convert("mosxav", src, tmp_path, pseudo=str(pdir))
    assert names(out / "labelsPseudo") == ["v02_00003.png"]
    assert "2 of test frames" in " | ".join(semidiff_info(out)["notes"])


def test_mosxav_pseudo_user_mistakes_are_one_sentence(tmp_path):
    src = make_mosxav(tmp_path / "mosxav")
    raw = tmp_path / "raw"

    def fails(match: str, **kw):
        with pytest.raises(ConversionError, match=match) as e:
            convert_dataset("mosxav", src, raw_root=raw, num_processes=1, **kw)
        assert e.value.args[0].count(". ") == 0 and e.value.args[0].endswith("."), e.value.args[0]
        assert not raw.exists() or not list(raw.iterdir())

    fails("is not a folder", pseudo=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    fails("holds no pseudo masks", pseudo=str(tmp_path / "empty"))
    only_annotated = make_mosxav_pseudo(tmp_path / "ann", frames=())
    fails("belongs to a frame in imagesUnlabeled", pseudo=str(only_annotated))
    fails("drop unlabeled=false", pseudo=str(make_mosxav_pseudo(tmp_path / "ok")), unlabeled="false")
    stray = make_mosxav_pseudo(tmp_path / "stray")
    save_mosxav_mask(pseudo_label(1, "v07"), stray / "v07" / "00001.png", False)
    fails("v07.00001.png matches no frame", pseudo=str(stray))
    small = make_mosxav_pseudo(tmp_path / "small")
    save_mosxav_mask(np.zeros((8, 20), np.uint8), small / "v02" / "00002.png", False)
    fails("expected masks of the image's size", pseudo=str(small))
    colour = make_mosxav_pseudo(tmp_path / "colour", rgb_masks=True)
    save(np.full((16, 20, 3), 7, np.uint8), colour / "v01" / "00004.png")
    fails("not in the dataset's colour table", pseudo=str(colour))


# ----------------------------------------------------------------------------- Endoscapes2023
def endoscapes_pseudo(seed: int) -> np.ndarray:
    """A semseg-like pseudo mask: class ids, 255 (unlabeled) and the stray 7."""
    m = blob(value=1 + seed % 6, y=seed % 8)
    m[0, :] = 255
    m[15, 19] = 7
    return m


def test_endoscapes_pseudo_masks_of_train_frames_only(tmp_path):
    src = make_endoscapes(tmp_path / "e")
    base = src / "endoscapes"
    save(rgb(seed=5), base / "val" / "2_25.jpg")  # 1 fps frames of a validation and a test video
    save(rgb(seed=6), base / "test" / "3_50.jpg")
    pdir = tmp_path / "medsam"
    keys = {"1_150": 1, "1_175": 2, "4_25": 3,  # the un-annotated train/ frames
            "1_100": 4, "2_50": 5,  # annotated (Seg50 train, val)
            "3_75": 6, "3_50": 7, "2_25": 8}  # Seg50 test frame, test video, validation video
    for key, seed in keys.items():
        save(np.stack([endoscapes_pseudo(seed)] * 3, -1), pdir / f"{key}.png")
    out = convert("endoscapes2023", src, tmp_path, pseudo=str(pdir))
    assert names(out / "labelsPseudo") == ["1_150.png", "1_175.png", "4_25.png"]
    for key in ("1_150", "1_175", "4_25"):
        want = endoscapes_pseudo(keys[key])
        want[want == 255] = 7  # the real masks' conversion: 255 -> ignore 7
        got = read(out / "labelsPseudo" / f"{key}.png")
        assert got.ndim == 2
        np.testing.assert_array_equal(got, want)
    assert set(np.unique(read(out / "labelsTr" / "1_100.png")).tolist()) == {0, 5, 6, 7}  # ground truth kept
    notes = " | ".join(semidiff_info(out)["notes"])
    assert "3 pseudo masks" in notes
    assert "2 of annotated frames" in notes and "1 of frames of validation videos" in notes, notes
    assert "2 of test frames" in notes, notes
    verify_dataset(out, num_processes=1)
    # a value outside the label set (other than 255) is refused, as in the real masks
    bad = endoscapes_pseudo(1)
    bad[5, 5] = 9
    save(np.stack([bad] * 3, -1), pdir / "1_150.png")
    with pytest.raises(ConversionError, match=r"label values \[9\]"):
        convert_dataset("endoscapes2023", src, raw_root=tmp_path / "raw2", num_processes=1, pseudo=str(pdir))
    save(np.stack([endoscapes_pseudo(1)] * 3, -1), pdir / "1_150.png")
    save(np.stack([endoscapes_pseudo(1)] * 3, -1), pdir / "9_999.png")  # no such frame
    with pytest.raises(ConversionError, match="9_999.png matches no frame"):
        convert_dataset("endoscapes2023", src, raw_root=tmp_path / "raw3", num_processes=1, pseudo=str(pdir))


# ----------------------------------------------------------------------------- end to end
def _convert_plan_train(run_cli, src: Path, dataset_id: int, pseudo: Path | None):
    from semidiff_nnunet import api, planning

    args = ["convert", "mosxav", src, "--id", str(dataset_id), "--name", f"MosPseudo{dataset_id}", "-p", "1"]
    if pseudo is not None:
        args += ["-o", f"pseudo={pseudo}"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    name = f"Dataset{dataset_id:03d}_MosPseudo{dataset_id}"
    # nnU-Net's integrity check of a converted dataset with labelsPseudo/ runs once (the other is the same data)
    api.plan_and_preprocess(dataset_id, ["2d"], fingerprint_voxels=1e4, num_processes=1, show_progress=False,
                            verify=pseudo is not None)
    planning.shrink_plans(name, "nnUNetPlans", TINY[1], max_features=8, batch_size=2)
    code, _, err = run_cli("plan-and-train", name, "-m", "protodiff", "--labeled", "2", "-c", "2d", "--epochs", "1",
                           "--iters-per-epoch", "2", "--val-iters", "0", "--no-val", "--set", "sampling_steps=1",
                           "-np", "1", *TINY)
    assert code == 0, err
    info = api.run_info(name, "protodiff", "2", 0, "2d", 0, TINY[1])
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = "".join(p.read_text(encoding="utf-8") for p in info.fold_folder.glob("training_log_*.txt"))
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text(encoding="utf-8"))
    return name, ck, log, run


@pytest.mark.slow
def test_converted_mosxav_pseudo_masks_feed_protodiff(workspace, run_cli, tmp_path):
    src = make_mosxav(tmp_path / "mosxav")
    pdir = make_mosxav_pseudo(tmp_path / "medsam")
    name, ck, log, run = _convert_plan_train(run_cli, src, 971, pdir)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    pseudo_pp = sorted(p.name for p in pre.glob("nnUNetPlans_2d__pseudo/*_seg.b2nd"))
    assert len(pseudo_pp) == 8, pseudo_pp
    assert sorted(run["split"]["pseudo"]) == [f"{v}_{f:05d}" for v in ("v01", "v02") for f in UNLABELED]
    assert not set(run["split"]["pseudo"]) & set(run["split"]["validation"])
    assert "protodiff: 8 case(s) with labelsPseudo/ masks" in log
    pseudo_ce = np.asarray(ck["logging"]["term/pseudo_ce"], dtype=float)
    assert pseudo_ce.size and np.isfinite(pseudo_ce).all() and (pseudo_ce > 0).all()
    # the same download converted without pseudo=: no labelsPseudo/, no pseudo stream, no pseudo term
    name, ck, log, run = _convert_plan_train(run_cli, src, 972, None)
    assert not (Path(os.environ["nnUNet_raw"]) / name / "labelsPseudo").exists()
    assert not run["split"]["pseudo"]
    assert "labelsPseudo/ masks" not in log
    assert "term/ce" in ck["logging"] and not any(k.startswith("term/pseudo") for k in ck["logging"])
