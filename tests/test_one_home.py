"""One home per fact: the folder suffixes of preprocessed extra data are written once, in ``paths``."""

from __future__ import annotations

import ast
from pathlib import Path

from semidiff_nnunet import paths

PACKAGE = Path(paths.__file__).resolve().parent


def _string_constants(path: Path, values: set[str]) -> list[str]:
    """Where ``path`` writes one of ``values`` as a string literal (f-string parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in values]


def test_unlabeled_and_pseudo_folder_suffixes_are_written_only_in_paths():
    suffixes = {paths.UNLABELED_SUFFIX, paths.PSEUDO_SUFFIX}
    assert suffixes == {"__unlabeled", "__pseudo"}
    elsewhere = [hit for p in sorted(PACKAGE.rglob("*.py")) if p != Path(paths.__file__).resolve()
                 for hit in _string_constants(p, suffixes)]
    assert not elsewhere, f"use paths.UNLABELED_SUFFIX / paths.PSEUDO_SUFFIX instead of the literal: {elsewhere}"
