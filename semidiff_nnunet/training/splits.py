"""Which training cases of a fold are labeled, which are unlabeled (labels hidden).

The unit is the case (patient / volume / image), also for the ``2d`` configuration of 3D
data. Cases are drawn from the fold's *training* cases only, so validation cases never train.
For a fixed seed the labeled set of a smaller fraction is a subset of a larger one (both are
prefixes of the same seeded permutation), which keeps benchmark curves monotone in data.

Held-out cases (:func:`carve_held_out`): when a dataset has no test cases of its own, ``semidiff benchmark``
splits the fold's validation cases into a *selection* part (the trainer's validation: nnU-Net's per-epoch
pseudo Dice, ``checkpoint_best.pth``, a method's teacher/student or phase selection) and a *held-out*
part that is only scored. The held-out cases neither train nor are validated on (:func:`drop_held_out`,
applied to nnU-Net's fold split, and ``make_semi_split(held_out=...)``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semidiff_nnunet.errors import SemidiffError


@dataclass(frozen=True)
class LabeledSpec:
    """``--labeled``: a fraction in (0, 1], an integer count >= 1, or a file of case ids."""

    fraction: float | None = None
    count: int | None = None
    ids: tuple[str, ...] | None = None
    source: str = ""

    @classmethod
    def parse(cls, value: str | float | int | Path) -> LabeledSpec:
        text = str(value).strip()
        path = Path(text).expanduser()
        if path.suffix in (".txt", ".json", ".list", ".csv") or path.is_file():
            if not path.is_file():
                raise SemidiffError(f"--labeled {text}: no such file; give a fraction (0.1), a count (8) "
                                    f"or an existing file with one case id per line.")
            if path.suffix == ".json":
                import json

                ids = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(ids, dict):
                    ids = ids.get("labeled", [])
            else:
                ids = [t.strip() for line in path.read_text(encoding="utf-8").splitlines() for t in line.replace(",", " ").split()]
            ids = tuple(sorted(set(i for i in ids if i)))
            if not ids:
                raise SemidiffError(f"--labeled {text}: the file lists no case ids; put one case id per line.")
            return cls(ids=ids, source=str(path.resolve()))
        try:
            number = float(text)
        except ValueError:
            raise SemidiffError(f"--labeled {text!r} is not understood; give a fraction in (0, 1] like 0.1, "
                                f"a case count like 8, or a file of case ids.") from None
        if text.isdigit():  # an integer is a case count ("1" is one case; write 1.0 for all cases)
            if int(text) < 1:
                raise SemidiffError("--labeled 0 leaves no labeled case; give a count >= 1 or a fraction in (0, 1].")
            return cls(count=int(text), source=text)
        if not (0 < number <= 1):
            raise SemidiffError(f"--labeled {text}: a fraction must be in (0, 1] (or give an integer count "
                                f"like 8).")
        return cls(fraction=number, source=text)

    @property
    def tag(self) -> str:
        """Short, filesystem-safe name used in run folders."""
        if self.fraction is not None:
            return f"lab{self.fraction:g}"
        if self.count is not None:
            return f"lab{self.count}cases"
        digest = hashlib.sha1("\n".join(self.ids or ()).encode()).hexdigest()[:8]
        return f"labfile{len(self.ids or ())}-{digest}"

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "count": self.count, "ids": list(self.ids) if self.ids else None,
                "source": self.source, "tag": self.tag}

    @classmethod
    def from_json(cls, d: dict) -> LabeledSpec:
        return cls(fraction=d.get("fraction"), count=d.get("count"),
                   ids=tuple(d["ids"]) if d.get("ids") else None, source=d.get("source", ""))


@dataclass
class SemiSplit:
    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]
    extra_unlabeled: list[str] = field(default_factory=list)  # from imagesUnlabeled/
    pseudo: list[str] = field(default_factory=list)  # unlabeled cases with a labelsPseudo/ file
    held_out: list[str] = field(default_factory=list)  # scored by the benchmark only: never trained nor validated on

    def to_json(self) -> dict:
        return {"labeled": self.labeled, "unlabeled": self.unlabeled, "validation": self.validation,
                "extra_unlabeled": self.extra_unlabeled, "pseudo": self.pseudo, "held_out": self.held_out}


#: Seed of the held-out draw: fixed, so every method, labeled spec and seed of a benchmark is scored on the
#: same cases (the draw depends on the dataset and fold through their validation cases only).
HELD_OUT_SEED = 12345


def check_held_out_share(share: float) -> float:
    """``--held-out``: the share of the fold's validation cases set apart for scoring, in (0, 1)."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise SemidiffError(f"--held-out {share}: give the share of the fold's validation cases kept apart for "
                            f"scoring, strictly between 0 and 1 (like 0.5); the rest selects checkpoints.")
    return value


def held_out_tag(share: float | None) -> str:
    """The run folder's suffix for a held-out spec (``"_ho0.5"``; ``""`` without held-out cases)."""
    return "" if share is None else f"_ho{check_held_out_share(share):g}"


def carve_held_out(val_keys: list[str], share: float) -> tuple[list[str], list[str]]:
    """Split a fold's validation cases into ``(selection, held_out)``, both sorted.

    ``round(share * n)`` cases (at least one, at most ``n - 1``) are held out, drawn with the fixed
    :data:`HELD_OUT_SEED` from the sorted cases: the same for every run on a dataset and fold."""
    share = check_held_out_share(share)
    val = sorted(set(val_keys))
    if len(val) < 2:
        raise SemidiffError(f"The fold has {len(val)} validation case(s): too few to keep cases for scoring apart "
                            f"from those that select checkpoints; add imagesTs/labelsTs to the dataset or pick a "
                            f"fold with at least 2 validation cases.")
    n = min(len(val) - 1, max(1, math.floor(share * len(val) + 0.5)))
    order = np.random.RandomState(HELD_OUT_SEED).permutation(len(val))
    held = sorted(val[i] for i in order[:n])
    return sorted(set(val) - set(held)), held


def drop_held_out(train_keys: list[str], val_keys: list[str], held_out) -> tuple[list[str], list[str]]:
    """nnU-Net's fold split ``(train, val)`` without the held-out cases (in either list: with ``fold all``
    the validation cases are the training cases); the order of the rest is kept."""
    held = set(held_out or ())
    if not held:
        return list(train_keys), list(val_keys)
    val = [k for k in val_keys if k not in held]
    if not val:
        raise SemidiffError("Every validation case of the fold is held out; nothing is left to select checkpoints "
                            "on. Hold out a smaller share (--held-out).")
    return [k for k in train_keys if k not in held], val


def number_labeled(spec: LabeledSpec, n_train: int) -> int:
    if spec.fraction is not None:
        # round half up, at least one case
        return max(1, min(n_train, math.floor(spec.fraction * n_train + 0.5)))
    assert spec.count is not None
    if spec.count > n_train:
        raise SemidiffError(f"--labeled {spec.count} asks for more labeled cases than the fold has training "
                            f"cases ({n_train}); give at most {n_train} or a fraction.")
    return spec.count


def make_semi_split(train_keys: list[str], val_keys: list[str], spec: LabeledSpec, seed: int,
                    extra_unlabeled: list[str] | None = None, pseudo_available: list[str] | None = None,
                    held_out=()) -> SemiSplit:
    """Draw the labeled cases of one fold.

    ``train_keys``/``val_keys`` come from nnU-Net's ``splits_final.json`` for the fold. The
    result never puts a validation case into ``labeled`` or ``unlabeled``, nor a ``held_out`` case
    anywhere but ``held_out`` (:func:`drop_held_out`).
    """
    held = sorted(set(held_out or ()))
    train_keys, val_keys = drop_held_out(train_keys, val_keys, held)
    train = sorted(set(train_keys))
    val = sorted(set(val_keys))
    if not train:
        raise SemidiffError("The fold has no training cases; check splits_final.json of the dataset.")
    if spec.ids is not None:
        ids = set(spec.ids)
        in_held = sorted(ids & set(held))
        if in_held:
            raise SemidiffError(f"The labeled-case file names held-out case(s) of this fold ({', '.join(in_held[:3])}), "
                                f"which are kept for scoring only; remove them from the file.")
        in_val = sorted(ids & set(val))
        if in_val:
            raise SemidiffError(f"The labeled-case file names validation case(s) of this fold ({', '.join(in_val[:3])}); "
                                f"remove them or pick another fold.")
        unknown = sorted(ids - set(train))
        if unknown:
            raise SemidiffError(f"The labeled-case file names case(s) that are not training cases of this fold "
                                f"({', '.join(unknown[:3])}); check the ids against labelsTr.")
        labeled = sorted(ids)
    else:
        n = number_labeled(spec, len(train))
        order = np.random.RandomState(seed).permutation(len(train))
        labeled = sorted(train[i] for i in order[:n])
    unlabeled = sorted(set(train) - set(labeled))
    extra = sorted(extra_unlabeled or [])
    in_extra = sorted(set(extra) & set(held))
    if in_extra:
        raise SemidiffError(f"Held-out case(s) {', '.join(in_extra[:3])} are also in imagesUnlabeled/; rename or "
                            f"remove them there.")
    pool = set(unlabeled) | set(extra)
    pseudo = sorted(k for k in (pseudo_available or []) if k in pool)
    return SemiSplit(labeled=labeled, unlabeled=unlabeled, validation=val, extra_unlabeled=extra, pseudo=pseudo,
                     held_out=held)
