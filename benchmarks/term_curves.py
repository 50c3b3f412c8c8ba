"""Per-term curves of finished runs, side by side: what each loss term (and each logged-only value, such as a
ramp's weight or a mask's fraction) did epoch by epoch, next to the validation pseudo Dice. For the analysis
of a method that scores below its control (the per-term curves the evidence protocol asks for).

    python benchmarks/term_curves.py "$nnUNet_results/semidiff/*__lab0.1_ho0.5_from-first-e24__seed0" \\
        -o term_curves_seed0.png

Each argument is a run folder (``<method>__<tag>__seed<N>``) or a glob of them; the script prints one Markdown
table per run (a row per term, a column per epoch) and, with ``-o``, draws one panel per run.
"""

from __future__ import annotations

import argparse
import glob
import math
from pathlib import Path

SHOWN = ("mean_fg_dice", "train_losses")


def final_checkpoint(run_root: Path) -> Path | None:
    found = sorted(run_root.glob("*/*/fold_*/checkpoint_final.pth"))
    return found[0] if found else None


def curves(checkpoint: Path) -> dict[str, list[float]]:
    from semidiff_nnunet.training.checkpoint import safe_load
    from semidiff_nnunet.training.curves import TERM_PREFIX

    log = safe_load(checkpoint)["logging"]
    return {k: [float(x) for x in v] for k, v in log.items() if k in SHOWN or k.startswith(TERM_PREFIX)}


def markdown(name: str, table: dict[str, list[float]]) -> str:
    n = max(len(v) for v in table.values())
    lines = [f"**{name}**", "", "| curve | " + " | ".join(f"e{i}" for i in range(n)) + " |",
             "|---|" + "---|" * n]
    for k, v in table.items():
        cells = ["" if math.isnan(x) else f"{x:.3f}" for x in v]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Per run, left: the summed loss terms; right: the logged-only values (each ÷ its largest magnitude, which
    the legend gives) and the validation pseudo Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.0 * len(runs)), squeeze=False)
    for (left, right), (name, table) in zip(axes, runs.items()):
        for k, v in table.items():
            if k in SHOWN:
                continue
            label = k.split("/", 1)[1]
            if label.startswith("_"):
                top = max((abs(x) for x in v if not math.isnan(x)), default=0.0) or 1.0
                right.plot([x / top for x in v], "--", label=f"{label.lstrip('_')} ÷ {top:.3g}")
            else:
                left.plot(v, "-", label=label)
        if not any(k.startswith("term/") and not k.split("/", 1)[1].startswith("_") for k in table):
            left.plot(table.get("train_losses", []), "-", label="train loss (no terms logged: supervised)")
        right.plot(table.get("mean_fg_dice", []), "k:", label="validation pseudo Dice")
        left.set_title(f"{name}: loss terms", fontsize=9)
        right.set_title(f"{name}: logged values, pseudo Dice", fontsize=9)
        for ax in (left, right):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or globs of them")
    p.add_argument("-o", "--output", type=Path, default=None, help="a PNG with one panel per run")
    args = p.parse_args()
    roots = sorted({Path(f) for pattern in args.runs for f in (glob.glob(pattern) or [pattern])})
    runs = {}
    for root in roots:
        ck = final_checkpoint(root)
        if ck is None:
            print(f"{root}: no checkpoint_final.pth (not finished), skipped")
            continue
        runs[root.name] = curves(ck)
        print(markdown(root.name, runs[root.name]))
    if args.output and runs:
        draw(runs, args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
