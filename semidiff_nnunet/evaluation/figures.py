"""Figures a reader looks at: held-out cases with every method's prediction as an overlay.

:func:`case_grid` draws ``benchmark_cases.png``: a few held-out cases (the reference method's best,
median and worst by foreground Dice), one row each, with the image, the reference and every
method's prediction as coloured overlays; 3D cases are shown at the axial slice (first array axis)
where the reference has the most foreground. Images and segmentations are read with nnU-Net's
reader for the dataset, so 2D PNG, NIfTI and the rest work alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from semidiff_nnunet.evaluation.folder import _determine_reader

__all__ = ["case_dice", "pick_cases", "case_grid"]


def case_dice(summary: dict) -> dict[str, float]:
    """Case id → mean foreground Dice of one ``summary.json`` (NaN values skipped; NaN if all are)."""
    out = {}
    for entry in summary["metric_per_case"]:
        name = Path(entry["reference_file"]).name
        values = [m["Dice"] for m in entry["metrics"].values() if not math.isnan(m["Dice"])]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


def pick_cases(dice: dict[str, float], n: int = 3) -> list[tuple[str, str]]:
    """(label, case file) for the best, median and worst cases by ``dice`` (fewer when there are fewer
    cases; NaN cases last). With ``n`` > 3 the rest are spread evenly between them."""
    ranked = sorted(dice, key=lambda k: (math.isnan(dice[k]), -dice[k] if not math.isnan(dice[k]) else 0, k))
    if not ranked:
        return []
    if len(ranked) <= n:
        idx = list(range(len(ranked)))
    else:
        idx = sorted({int(round(i * (len(ranked) - 1) / (n - 1))) for i in range(n)}) if n > 1 else [0]
    names = ["best"] + (["median"] if len(idx) == 3 else [f"rank {i + 1}" for i in idx[1:-1]]) + ["worst"]
    return [(name, ranked[i]) for name, i in zip(names if len(idx) > 1 else ["best"], idx)]


def _slice(volume: np.ndarray, z: int | None) -> np.ndarray:
    """(C or 1, Z, Y, X) → (Y, X) at ``z`` (first channel; 2D data has Z = 1 and ``z`` None)."""
    v = volume[0]
    return v[z if z is not None else 0] if v.ndim == 3 else v


def _display(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    return np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)


def case_grid(images: Path, labels: Path, predictions: dict[str, Path], summaries: dict[str, dict], path: Path,
              file_ending: str, dataset_json: dict | None = None, reference_method: str | None = None,
              n_cases: int = 3, title: str = "") -> Path | None:
    """Draw the grid (see the module docstring) to ``path``; returns it, or None without cases.

    ``predictions``/``summaries``: per method, the prediction folder and its ``summary.json`` dict.
    ``reference_method`` picks the cases (default: ``supervised`` if present, else the first method).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    methods = list(predictions)
    if not methods:
        return None
    ref_method = reference_method or ("supervised" if "supervised" in predictions else methods[0])
    per_method = {m: case_dice(summaries[m]) for m in methods}
    chosen = pick_cases(per_method[ref_method], n_cases)
    if not chosen:
        return None
    example = next(iter(sorted(labels.glob(f"*{file_ending}"))))
    reader = _determine_reader(dataset_json, file_ending, str(example))()
    num_labels = max(2, len((dataset_json or {}).get("labels", {})))
    colours = ListedColormap(matplotlib.colormaps["tab10"].colors[1:num_labels])

    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.6 * cols, 2.6 * len(chosen)), squeeze=False)
    for row, (rank, case_file) in enumerate(chosen):
        case = case_file[: -len(file_ending)]
        ref, _ = reader.read_seg(str(labels / case_file))
        z = int(np.argmax((ref[0] > 0).reshape(ref.shape[1], -1).sum(1))) if ref.shape[1] > 1 else None
        image_files = sorted(str(f) for f in images.glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"))
        img, _ = reader.read_images(image_files[:1])
        if img.shape[0] == 3 and img.shape[1] == 1:  # an RGB picture (dermoscopy, endoscopy): show it in colour
            shown = np.stack([_display(img[c, 0].astype(np.float32)) for c in range(3)], -1)
        else:
            shown = _display(_slice(img, z if img.shape[1] > 1 else None).astype(np.float32))
        panels = [("image", None), ("reference", _slice(ref, z))]
        for m in methods:
            pred, _ = reader.read_seg(str(predictions[m] / case_file))
            panels.append((f"{m}\nDice {per_method[m].get(case_file, float('nan')):.3f}", _slice(pred, z)))
        for col, (name, seg) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(shown, cmap="gray", interpolation="nearest")
            if seg is not None:
                ax.imshow(np.ma.masked_where(seg <= 0, seg), cmap=colours, vmin=1, vmax=num_labels - 1, alpha=0.5,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=8)
        axes[row][0].set_ylabel(f"{case}\n({ref_method}'s {rank})" + (f"\nslice {z}" if z is not None else ""),
                                fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return Path(path)
