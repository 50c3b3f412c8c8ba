"""nnU-Net's local logger, extended with one curve per loss term and a compact progress plot; the
trainer's per-epoch logging (:class:`EpochLogMixin`)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from semidiff_nnunet.training.memory import PEAK_MEMORY_KEY, epoch_peak

TERM_PREFIX = "term/"
#: the logger key of each epoch's CPU seconds over its training iterations (see :func:`cpu_seconds`)
CPU_SECONDS_KEY = "cpu_seconds"
#: logged per epoch but measured on the machine, so they differ between identical runs (tests skip them)
MEASURED_LOG_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps", PEAK_MEMORY_KEY, CPU_SECONDS_KEY)


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, all its threads, and by the child processes it
    has reaped (the augmentation workers of finished epochs). Unlike wall-clock time it hardly changes when
    other programs load the machine: the benchmark's cost column divides it, per iteration, by the control's."""
    try:
        import resource  # POSIX only: on Windows the workers' time is not counted
    except ImportError:
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class SemiLocalLogger(LocalLogger):
    """Accepts new per-epoch keys (``term/<name>``, ``phase``, ``peak_memory``) and draws them in ``progress.png``.

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


class EpochLogMixin:
    """The trainer's logging: one value per loss term and epoch (in nnU-Net's logger, so checkpointed and
    plotted), the epoch's summary to the progress callback, nnU-Net's chatter to the log file only while a
    progress display runs."""

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        # the final validation has no bar: its per-case lines are the console's only sign of life
        quiet = getattr(self, "progress", None) is not None and not getattr(self, "in_final_validation", False)
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and not quiet,
                                  add_timestamp=add_timestamp)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end([{"loss": o["loss"]} for o in train_outputs])
        # every term seen so far gets one value per epoch: the mean over the iterations that computed
        # it (a step that did not run this epoch logs NaN); under DDP over every rank's iterations
        keys = sorted({k for o in train_outputs for k in o if k.startswith(TERM_PREFIX)}
                      | {k for k in self.logger.local_logger.my_fantastic_logging if k.startswith(TERM_PREFIX)})
        for k in keys:
            values = np.array([o[k] for o in train_outputs if k in o], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            self.logger.log(k, float(np.mean(values)) if values.size else float("nan"), self.current_epoch)
        # this rank's peak over the epoch's training iterations (reset in on_train_epoch_start), and its CPU time
        self.logger.log(PEAK_MEMORY_KEY, epoch_peak(torch.device(self.device)), self.current_epoch)
        start = getattr(self, "_cpu_seconds_at_epoch_start", None)
        self.logger.log(CPU_SECONDS_KEY, cpu_seconds() - start if start is not None else float("nan"),
                        self.current_epoch)
        if keys:
            self.print_to_log_file("loss terms: " + ", ".join(
                f"{k[5:].lstrip('_')} {self.logger.get_value(k, step=-1):.4g}" for k in keys))

    def _report_epoch(self) -> None:
        """The epoch's summary to the progress callback's ``epoch_end``, if it has one (rank 0)."""
        report = getattr(self.progress, "epoch_end", None)
        if report is None or self.local_rank != 0:
            return
        log = self.logger.local_logger.my_fantastic_logging
        terms = {k[5:].lstrip("_"): float(v[-1]) for k, v in sorted(log.items())
                 if k.startswith(TERM_PREFIX) and v and np.isfinite(v[-1])}
        start = self.logger.get_value("epoch_start_timestamps", step=-1)
        report(epoch=self.current_epoch, num_epochs=self.num_epochs,
               phase=self.current_phase.name if self.phases else "",
               loss=float(self.logger.get_value("train_losses", step=-1)), terms=terms,
               seconds=time.time() - start, pseudo_dice=float(self.logger.get_value("mean_fg_dice", step=-1)))

    def _log_no_validation(self):
        # num_val_iterations_per_epoch=0 (tests): keep the logger's one-value-per-epoch invariant
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float("nan")] * len(self.label_manager.foreground_labels),
                        self.current_epoch)
        self.logger.log("val_losses", float("nan"), self.current_epoch)
