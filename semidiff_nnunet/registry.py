"""Plugin registry: one pluggy PluginManager, typed lookups, closest-match errors.

``get_registry()`` loads every distribution advertising the ``semidiff`` entry-point group
(built-in plugins included). A plugin that fails to import is recorded in
``Registry.failures`` and does not break the others.
"""

from __future__ import annotations

import difflib
import importlib.metadata as importlib_metadata
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy

from semidiff_nnunet import hookspecs
from semidiff_nnunet.errors import DuplicateNameError, UnknownNameError

KINDS = {
    "method": "semidiff_register_methods",
    "network": "semidiff_register_networks",
    "diffusion_head": "semidiff_register_diffusion_heads",
    "loss": "semidiff_register_losses",
    "converter": "semidiff_register_converters",
}


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginFailure:
    name: str
    distribution: str
    error: str
    traceback: str


@dataclass
class Entry:
    spec: Any
    provider: str  # plugin name
    distribution: str


class Registry:
    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self._entries: dict[str, dict[str, Entry]] | None = None
        self.duplicates: dict[tuple[str, str], list[Entry]] = {}
        if load_entry_points:
            self._load_entry_points()

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in sorted(importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if (dist, ep.name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((dist, ep.name))
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break the others
                self.failures.append(PluginFailure(ep.name, dist, f"{type(e).__name__}: {e}", traceback.format_exc()))
                continue
            self.register(plugin, ep.name, dist, version)

    def register(self, plugin: Any, name: str, distribution: str = "(local)", version: str = "") -> None:
        """Register a plugin object/module by hand (tests, notebooks)."""
        if self.pm.get_plugin(name) is not None:
            raise DuplicateNameError(
                f"Two plugins are named {name!r} ({self.plugins[name].distribution} and {distribution}); "
                f"rename one entry point."
            )
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:  # noqa: BLE001 - e.g. a hookimpl with a misspelled hook name
            self.failures.append(PluginFailure(name, distribution, f"{type(e).__name__}: {e}", traceback.format_exc()))
            return
        hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self.plugins[name] = PluginInfo(name, distribution, version, getattr(plugin, "__name__", repr(plugin)), hooks)
        self._entries = None

    # ------------------------------------------------------------------ collection
    def _collect(self) -> dict[str, dict[str, Entry]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.duplicates: dict[tuple[str, str], list[Entry]] = {}
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                info = self.plugins.get(impl.plugin_name)
                dist = info.distribution if info else "?"
                try:
                    specs = impl.function() or []
                except Exception as e:  # noqa: BLE001
                    self.failures.append(
                        PluginFailure(impl.plugin_name, dist, f"{hook_name} raised {type(e).__name__}: {e}",
                                      traceback.format_exc()))
                    continue
                for spec in specs:
                    entry = Entry(spec, impl.plugin_name, dist)
                    if spec.name in entries[kind]:
                        # listing keeps working (the first provider is shown, the clash is a failure);
                        # using the name is refused (``entry``)
                        clash = self.duplicates.setdefault((kind, spec.name), [entries[kind][spec.name]])
                        clash.append(entry)
                        self.failures.append(PluginFailure(impl.plugin_name, dist, self._duplicate_message(
                            kind, spec.name, clash), ""))
                        continue
                    entries[kind][spec.name] = entry
        self._entries = entries
        return entries

    def entries(self, kind: str) -> dict[str, Entry]:
        return dict(sorted(self._collect()[kind].items()))

    def names(self, kind: str) -> list[str]:
        return sorted(self._collect()[kind])

    @staticmethod
    def _duplicate_message(kind: str, name: str, clash: list[Entry]) -> str:
        providers = " and by ".join(f"plugin {e.provider!r} ({e.distribution})" for e in clash)
        return (f"The {kind.replace('_', ' ')} name {name!r} is registered twice: by {providers}; "
                f"uninstall or rename one of them.")

    def entry(self, kind: str, name: str) -> Entry:
        found = self._collect()[kind]
        if (kind, name) in self.duplicates:
            raise DuplicateNameError(self._duplicate_message(kind, name, self.duplicates[(kind, name)]))
        if name in found:
            return found[name]
        label = kind.replace("_", " ")
        failed = [f for f in self.failures if f.name == name]
        if failed:
            f = failed[0]
            raise UnknownNameError(f"The {label} {name!r} is unavailable: its plugin {f.name!r} ({f.distribution}) "
                                   f"failed to load ({f.error}); fix or reinstall it (`semidiff plugins` shows "
                                   f"the details).")
        close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(found)) or "none"
        broken = f" {len(self.failures)} plugin(s) failed to load: see `semidiff plugins`." if self.failures else ""
        raise UnknownNameError(f"Unknown {label} {name!r}.{hint} Registered: {known}.{broken}")

    def get(self, kind: str, name: str):
        return self.entry(kind, name).spec

    # convenience
    def method(self, name: str):
        return self.get("method", name)

    def converter(self, name: str):
        return self.get("converter", name)


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
    return _REGISTRY
