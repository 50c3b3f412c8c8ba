"""nnU-Net's local logger, extended with one curve per loss term and a compact progress plot."""

from __future__ import annotations

import math
import os

from nnunetv2.training.logging.nnunet_logger import LocalLogger

TERM_PREFIX = "term/"


class SemiLocalLogger(LocalLogger):
    """Accepts new per-epoch keys (``term/<name>``, ``phase``) and draws them in ``progress.png``.

    A key first logged at a later epoch (a loss term of a step that starts late) is padded with NaN
    for the epochs before, so every curve has one value per epoch.
    """

    def log(self, key, value, epoch: int):
        values = self.my_fantastic_logging.setdefault(key, [])
        if key != "phase" and len(values) < epoch:
            values.extend([float("nan")] * (epoch - len(values)))
        super().log(key, value, epoch)

    def plot_progress_png(self, output_folder):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        log = self.my_fantastic_logging
        base = ["train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs", "epoch_start_timestamps",
                "epoch_end_timestamps"]
        n = min(len(log[k]) for k in base)
        if n == 0:
            return
        x = list(range(n))
        terms = sorted(k for k in log if k.startswith(TERM_PREFIX))
        fig, axes = plt.subplots(4 if terms else 3, 1, figsize=(10, 14 if terms else 10.5))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:n], "b-", label="loss_tr")
        if not all(math.isnan(v) for v in log["val_losses"][:n]):
            ax.plot(x, log["val_losses"][:n], "r-", label="loss_val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(loc="upper left")
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:n], "g:", label="pseudo dice")
        ax2.plot(x, log["ema_fg_dice"][:n], "g-", label="pseudo dice (mov. avg.)")
        ax2.set_ylabel("pseudo dice")
        ax2.legend(loc="upper right")
        i = 1
        if terms:
            # summed loss terms on the left axis; logged-only values ("_" keys: weights, rates) on the right
            ax = axes[1]
            extra = ax.twinx() if any(k[len(TERM_PREFIX):].startswith("_") for k in terms) else None
            for k in terms:
                name = k[len(TERM_PREFIX):]
                values = log[k][:n]
                target, style = (extra, "--") if name.startswith("_") else (ax, "-")
                target.plot(list(range(len(values))), values, style, label=name.lstrip("_"))
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss term")
            ax.legend(loc="upper left")
            if extra is not None:
                extra.set_ylabel("logged value")
                extra.legend(loc="upper right")
            i = 2
        ax = axes[i]
        ax.plot(x, [e - s for e, s in zip(log["epoch_end_timestamps"][:n], log["epoch_start_timestamps"][:n])], "b-",
                label="epoch duration")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc="upper left")
        ax = axes[i + 1]
        ax.plot(x, log["lrs"][:n], "b-", label="learning rate")
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc="upper left")
        phases = log.get("phase", [])[:n]
        if len(set(phases)) > 1:  # mark where each training phase begins, on every panel
            starts = [e for e in range(len(phases)) if e == 0 or phases[e] != phases[e - 1]]
            for a in axes:
                for e in starts[1:]:
                    a.axvline(e - 0.5, color="grey", linestyle=":", linewidth=1)
            for e in starts:
                axes[0].annotate(phases[e], (e, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                                 va="bottom", color="grey")
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"), dpi=80)
        plt.close(fig)
