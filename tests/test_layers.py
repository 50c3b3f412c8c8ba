"""The layers import downward only (``cli`` → ``api`` → ``training``/``registry`` → ``diffusion``, ``networks``,
``losses``), and a method plugin uses only the public API, as a third-party plugin would: never another
plugin's module, never the CLI or the api; and no two top-level units (``api``, ``training``, ``registry``,
``cli``, ...) import each other, directly or round a circle. Checked on the source (every ``import``, also
inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import semidiff_nnunet

PACKAGE = Path(semidiff_nnunet.__file__).parent

# a module under the first key may not import any module under the listed prefixes
FORBIDDEN = {
    "semidiff_nnunet.networks": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                                 "semidiff_nnunet.plugins"],
    "semidiff_nnunet.losses": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                               "semidiff_nnunet.plugins"],
    "semidiff_nnunet.diffusion": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                                  "semidiff_nnunet.plugins"],
    "semidiff_nnunet.training": ["semidiff_nnunet.api", "semidiff_nnunet.cli", "semidiff_nnunet.plugins"],
    "semidiff_nnunet.api": ["semidiff_nnunet.cli"],
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def violations(package_root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package_root.rglob("*.py")):
        name = module_name(path)
        imported = imports_of(path)
        rules = [forbidden for prefix, forbidden in FORBIDDEN.items() if name == prefix or name.startswith(prefix + ".")]
        parts = name.split(".")
        if len(parts) >= 3 and parts[1] == "plugins":  # semidiff_nnunet.plugins.<method>...
            own = ".".join(parts[:3])
            rules.append(["semidiff_nnunet.api", "semidiff_nnunet.cli"])
            bad += [f"{name} imports {m} (another plugin)" for m in sorted(imported)
                    if m.startswith("semidiff_nnunet.plugins.") and not (m == own or m.startswith(own + "."))]
        for forbidden in rules:
            bad += [f"{name} imports {m}" for m in sorted(imported)
                    if any(m == f or m.startswith(f + ".") for f in forbidden)]
    return bad


def test_layers_import_downward_and_plugins_use_the_public_api():
    assert violations() == []


@pytest.mark.parametrize("source, expect", [
    ("from semidiff_nnunet.plugins.bcp.trainer import largest_components\n", "another plugin"),
    ("def f():\n    from semidiff_nnunet import api\n", "imports semidiff_nnunet.api"),
    ("from ..mean_teacher import trainer\n", "another plugin"),
])
def test_a_plugin_reaching_into_another_is_caught(tmp_path, source, expect):
    root = tmp_path / "semidiff_nnunet"
    plugin = root / "plugins" / "semigda"
    plugin.mkdir(parents=True)
    for d in (root, root / "plugins", plugin):
        (d / "__init__.py").write_text("", encoding="utf-8")
    (plugin / "trainer.py").write_text(source, encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, root
    try:
        found = violations(root)
    finally:
        PACKAGE = saved
    assert found and all(expect in f for f in found)


# ---------------------------------------------------------------------------------------------- no import circle
def unit_of(module: str, package_root: Path = PACKAGE) -> str | None:
    """The top-level unit of a module name (``semidiff_nnunet.api.train`` → ``api``), ``semidiff_nnunet`` for
    a name the package root itself defines (``semidiff_nnunet.hookimpl``); None outside the package and for the
    bare package (importing ``semidiff_nnunet.api`` imports it anyway)."""
    parts = module.split(".")
    if parts[0] != package_root.name or len(parts) == 1:
        return None
    if (package_root / parts[1]).is_dir() or (package_root / f"{parts[1]}.py").is_file():
        return parts[1]
    return package_root.name


def unit_graph(package_root: Path = PACKAGE) -> dict[str, set[str]]:
    """Which top-level units each unit imports (every import, also inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package_root.rglob("*.py")):
        own = unit_of(module_name(path), package_root) or package_root.name
        units = {unit_of(m, package_root) for m in imports_of(path)}
        graph.setdefault(own, set()).update(u for u in units if u and u != own)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, a]``) through each group of units that import each other, found depth first."""
    cycles, done = [], set()
    for start in sorted(graph):
        stack, on_path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                cycle = on_path[on_path.index(child):] + [child]
                if not any(set(cycle) <= set(c) for c in cycles):
                    cycles.append(cycle)
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                on_path.append(child)
    return cycles


def test_no_import_circle_between_top_level_units():
    graph = unit_graph()
    assert {"api", "cli", "training", "registry"} <= set(graph)  # the walk found the units
    assert [" -> ".join(c) for c in import_cycles(graph)] == []


def test_an_import_circle_is_caught(tmp_path):
    root = tmp_path / "semidiff_nnunet"
    (root / "api").mkdir(parents=True)
    (root / "__init__.py").write_text("", encoding="utf-8")
    (root / "api" / "__init__.py").write_text("from semidiff_nnunet.api.run import go\n", encoding="utf-8")
    (root / "api" / "run.py").write_text("def go():\n    from semidiff_nnunet import report\n", encoding="utf-8")
    (root / "report.py").write_text("from semidiff_nnunet import errors\n\n\ndef f():\n    from .api import go\n",
                                    encoding="utf-8")
    (root / "errors.py").write_text("", encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, root
    try:
        cycles = import_cycles(unit_graph(root))
    finally:
        PACKAGE = saved
    assert cycles == [["api", "report", "api"]]
