"""The CLI's training progress: a live bar on a terminal, one plain line per epoch when the output is a
file (nohup, SLURM, CI), so a batch job's log shows the run while it trains."""

from __future__ import annotations

import io
import re

from rich.console import Console

from semidiff_nnunet.cli.progress import RichTrainingProgress


def _run(console: Console) -> None:
    bar = RichTrainingProgress(console=console)
    bar.start(total=4, completed=0, description="bcp")
    for epoch in range(2):
        for _ in range(2):
            bar.step(loss=-0.5, epoch=epoch, num_epochs=2, phase="selftrain")
        bar.epoch_end(epoch=epoch, num_epochs=2, phase="selftrain", loss=-0.5 - epoch,
                      terms={"mixed_labeled": -1.25, "mixed_unlabeled": 0.5}, seconds=3.21, pseudo_dice=0.8)
    bar.close()


def test_not_a_terminal_one_plain_line_per_epoch():
    file = io.StringIO()
    _run(Console(file=file, force_terminal=False, width=200))
    lines = file.getvalue().splitlines()
    assert lines == [
        "bcp training: 4 iterations (0 done)",
        "bcp epoch 1/2, phase selftrain, loss -0.5000 (mixed_labeled -1.25, mixed_unlabeled 0.5), pseudo Dice 0.8000, "
        "3.2 s",
        "bcp epoch 2/2, phase selftrain, loss -1.5000 (mixed_labeled -1.25, mixed_unlabeled 0.5), pseudo Dice 0.8000, "
        "3.2 s"]


def test_a_terminal_gets_the_bar_and_no_epoch_lines():
    file = io.StringIO()
    _run(Console(file=file, force_terminal=True, width=200))
    text = file.getvalue()
    assert "bcp selftrain epoch 2/2" in text and "4/4" in text
    assert "pseudo Dice" not in text and "(mixed_labeled" not in text


def test_the_final_validation_shows_each_case_on_the_console(demo2d, tmp_path, monkeypatch, capfd):
    """With a progress display nnU-Net's chatter goes to the log file only; its final validation (minutes per
    image on a CPU, no bar) still says what it does and which case it predicts, so it does not look hung."""
    from semidiff_nnunet import api

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")

    class Silent:
        def start(self, total, completed, description):
            pass

        def step(self, loss, epoch, num_epochs, phase):
            pass

        def close(self):
            pass

    api.train(demo2d, "supervised", labeled="0.5", seed=3, configuration="2d", device="cpu", epochs=1,
              iters_per_epoch=1, plans_name="semidiffDemoPlans", val_iters_per_epoch=0, final_validation=True,
              show_progress=False, progress=Silent())
    out = capfd.readouterr().out
    assert "final validation: predicting the fold's 3 validation cases" in out, out[-2000:]
    cases = [ln for ln in out.splitlines() if re.search(r"predicting \S+$", ln)]  # nnU-Net's line per case
    assert len(cases) == 3, out[-2000:]
    assert "Epoch 0" not in out  # the training chatter stays in the log file
