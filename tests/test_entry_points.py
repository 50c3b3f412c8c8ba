"""Every built-in method and converter is reachable through the *installed* ``semidiff`` entry
points: a fresh :class:`~semidiff_nnunet.registry.Registry` (entry points only, nothing registered
by hand) lists each of them as provided by the ``semidiff-nnunet`` distribution.

The built-in methods have one home, the ``semidiff`` entry points of ``pyproject.toml``: the tests read
them through the registry (``Registry.builtin_names``, also ``helpers.builtin_methods``) and check that
pyproject.toml, the installed metadata and the registered methods agree, so that a method missing from
any of them (or a stale install) fails a test. The converters are written out here.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import re
from pathlib import Path

import pytest

from semidiff_nnunet.registry import Registry

DIST = "semidiff-nnunet"
BUILTIN_METHODS = Registry().builtin_names("method")
BUILTIN_CONVERTERS = ["acdc", "bcss", "brats2019", "busi", "cvc-clinicdb", "endoscapes2023", "generic", "glas", "hmeps",
                      "isic2018", "kvasir-seg", "la2018", "mosxav", "mscmrseg2019", "msd-prostate", "pancreas-ct",
                      "ph2", "polyp-pranet"]
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _canonical(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def declared_entry_points() -> dict[str, str]:
    """``[project.entry-points.semidiff]`` of the source tree's pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    if not PYPROJECT.is_file():
        pytest.skip("the tests run outside the source tree (no pyproject.toml)")
    with PYPROJECT.open("rb") as f:
        return dict(tomllib.load(f)["project"]["entry-points"]["semidiff"])


def installed_entry_points() -> dict[str, str]:
    """The ``semidiff`` entry points the installed semidiff-nnunet distribution advertises."""
    return {ep.name: ep.value for ep in md.entry_points(group="semidiff")
            if ep.dist is not None and _canonical(ep.dist.name) == DIST}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()  # loads the installed entry points, nothing else


def test_pyproject_declares_every_builtin():
    declared = declared_entry_points()
    assert BUILTIN_METHODS and sorted(declared) == sorted([*BUILTIN_METHODS, "converters"])
    assert all(v.startswith("semidiff_nnunet.plugins.") for v in declared.values()), declared


def test_installed_metadata_matches_pyproject():
    assert installed_entry_points() == declared_entry_points(), (
        "the installed entry points differ from pyproject.toml; reinstall with pip install -e .")


def test_builtin_plugins_load_without_failures(registry):
    failures = [f"{f.name}: {f.error}" for f in registry.failures if _canonical(f.distribution) == DIST]
    assert not failures, failures
    assert sorted(n for n, p in registry.plugins.items() if _canonical(p.distribution) == DIST) == sorted(
        [*BUILTIN_METHODS, "converters"])


def test_each_method_entry_point_registers_the_method_of_its_name(registry):
    methods = {n: e.provider for n, e in registry.entries("method").items() if _canonical(e.distribution) == DIST}
    assert methods == {n: n for n in declared_entry_points() if n != "converters"}


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_builtin_method_is_reachable_through_its_entry_point(registry, name):
    from semidiff_nnunet.training import SemiSupervisedTrainer

    entry = registry.entry("method", name)
    assert _canonical(entry.distribution) == DIST
    assert entry.provider == name and name in installed_entry_points()  # its own entry point, not a hand registration
    assert "semidiff_register_methods" in registry.plugins[name].hooks
    trainer = entry.spec.load_trainer()
    assert inspect.isclass(trainer) and issubclass(trainer, SemiSupervisedTrainer), trainer


def test_builtin_converters_are_reachable_through_the_converters_entry_point(registry):
    entries = {n: e for n, e in registry.entries("converter").items() if _canonical(e.distribution) == DIST}
    assert sorted(entries) == BUILTIN_CONVERTERS
    for name, entry in entries.items():
        assert entry.provider == "converters" and "converters" in installed_entry_points(), name
        params = list(inspect.signature(entry.spec.convert).parameters)
        assert params[:2] == ["source", "target"] and "num_processes" in params, (name, params)
        function = entry.spec.convert.resolve()
        assert function.__module__.startswith("semidiff_nnunet.dataset_conversion."), (name, function.__module__)
