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
