"""User mistakes in dataset files, answered by the installed CLI in one sentence naming the file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _semidiff(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(SEMIDIFF_HOME=str(tmp_path), nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"), nnUNet_results=str(tmp_path / "res"))
    res = subprocess.run([sys.executable, "-m", "semidiff_nnunet.cli.main", *map(str, args)], env=env,
                         capture_output=True, timeout=300)
    return res.returncode, res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("content, message", [
    ("{not json", r"dataset.json is not valid JSON (line 1, column 2"),
    ('{"labels": {"background": 0}}', "dataset.json has no 'file_ending' entry"),
], ids=["invalid-json", "missing-key"])
@pytest.mark.parametrize("command", ["split", "evaluate"])
def test_bad_dataset_json_is_one_sentence_naming_the_file(tmp_path, content, message, command):
    folder = tmp_path / "raw" / "Dataset777_Bad"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(content, encoding="utf-8")
    for d in ("pred", "ref"):
        (tmp_path / d).mkdir()
    if command == "split":
        code, out = _semidiff(tmp_path, "split", "-d", "777", "--labeled", "0.1")
    else:
        code, out = _semidiff(tmp_path, "evaluate", "-d", "777", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref")
        if "file_ending" in message:  # evaluation needs only the labels from dataset.json
            message = "no segmentation files"
    assert code != 0 and "Traceback" not in out, out
    assert message in out.replace("\n", " ") or message.lower() in out.lower().replace("\n", " "), out
    if "JSON" in message:
        assert str(folder / "dataset.json") in out.replace("\n", "")


def test_predict_names_the_files_it_skips(tmp_path):
    from semidiff_nnunet import api

    for name in ("IMD002_0000.png", "IMD003_0000.png", "IMD006.png", "notes.txt", "IMD007_000a.png"):
        (tmp_path / name).write_bytes(b"")
    cases, skipped = api.input_cases(tmp_path, ".png")
    assert sorted(cases) == ["IMD002", "IMD003"]
    assert skipped == ["IMD006.png", "IMD007_000a.png", "notes.txt"]


def _png(path, array):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_evaluate_says_what_the_table_does_not_show(tmp_path):
    """Label names and px (PNG) in the table; NaN counts, prediction values that are not labels and
    predictions without a reference as notes."""
    import json

    import numpy as np

    folder = tmp_path / "raw" / "Dataset778_Png"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}, "file_ending": ".png",
                                                     "channel_names": {"0": "R", "1": "G", "2": "B"},
                                                     "numTraining": 2}), encoding="utf-8")
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    lesion = np.zeros((16, 16), np.uint8)
    lesion[4:10, 4:10] = 1
    _png(ref / "a.png", lesion)
    _png(ref / "b.png", np.zeros((16, 16)))  # no lesion: Dice and HD95 NaN when the prediction is empty too
    stray = lesion.copy()
    stray[0, 0] = 255
    _png(pred / "a.png", stray)
    _png(pred / "b.png", np.zeros((16, 16)))
    _png(pred / "c.png", lesion)  # no reference
    code, out = _semidiff(tmp_path, "evaluate", "-d", "778", "--pred", pred, "--ref", ref)
    text = " ".join(out.split())
    assert code == 0, out
    assert "1 (lesion)" in text and "HD95 (px)" in text
    assert "Dice NaN in 1 of 2 cases" in text
    assert "the value 255, which is not a label, in 1 case(s) (e.g. a.png)" in text
    assert "1 prediction file(s) have no reference and were not evaluated (e.g. c.png)" in text
