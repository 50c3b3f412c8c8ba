"""The layers import downward only (``cli`` → ``api`` → ``training``/``registry`` → ``diffusion``, ``networks``,
``losses``), and a method plugin uses only the public API, as a third-party plugin would: never another
plugin's module, never the CLI or the api. Checked on the source (every ``import``, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import semidiff_nnunet

PACKAGE = Path(semidiff_nnunet.__file__).parent

# a module under the first key may not import any module under the listed prefixes
FORBIDDEN = {
    "semidiff_nnunet.networks": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                                 "semidiff_nnunet.plugins", "semidiff_nnunet.benchmark"],
    "semidiff_nnunet.losses": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                               "semidiff_nnunet.plugins", "semidiff_nnunet.benchmark"],
    "semidiff_nnunet.diffusion": ["semidiff_nnunet.training", "semidiff_nnunet.api", "semidiff_nnunet.cli",
                                  "semidiff_nnunet.plugins", "semidiff_nnunet.benchmark"],
    "semidiff_nnunet.training": ["semidiff_nnunet.api", "semidiff_nnunet.cli", "semidiff_nnunet.plugins",
                                 "semidiff_nnunet.benchmark"],
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
            rules.append(["semidiff_nnunet.api", "semidiff_nnunet.cli", "semidiff_nnunet.benchmark"])
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
