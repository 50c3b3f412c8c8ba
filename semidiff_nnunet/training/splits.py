"""Which training cases of a fold are labeled, which are unlabeled (labels hidden).

The unit is the case (patient / volume / image), also for the ``2d`` configuration of 3D
data. Cases are drawn from the fold's *training* cases only, so validation cases never train.
For a fixed seed the labeled set of a smaller fraction is a subset of a larger one (both are
prefixes of the same seeded permutation), which keeps benchmark curves monotone in data.
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

    def to_json(self) -> dict:
        return {"labeled": self.labeled, "unlabeled": self.unlabeled, "validation": self.validation,
                "extra_unlabeled": self.extra_unlabeled, "pseudo": self.pseudo}


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
                    extra_unlabeled: list[str] | None = None, pseudo_available: list[str] | None = None) -> SemiSplit:
    """Draw the labeled cases of one fold.

    ``train_keys``/``val_keys`` come from nnU-Net's ``splits_final.json`` for the fold. The
    result never puts a validation case into ``labeled`` or ``unlabeled``.
    """
    train = sorted(set(train_keys))
    val = sorted(set(val_keys))
    if not train:
        raise SemidiffError("The fold has no training cases; check splits_final.json of the dataset.")
    if spec.ids is not None:
        ids = set(spec.ids)
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
    pool = set(unlabeled) | set(extra)
    pseudo = sorted(k for k in (pseudo_available or []) if k in pool)
    return SemiSplit(labeled=labeled, unlabeled=unlabeled, validation=val, extra_unlabeled=extra, pseudo=pseudo)
