"""Plugin registry: one pluggy PluginManager, typed lookups, closest-match errors.

``get_registry()`` loads every distribution advertising the ``semidiff`` entry-point group
(built-in plugins included; only those when ``SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD`` is set). A
plugin is isolated from the others: one that fails to import (any exception, ``sys.exit``
included), implements a hook that does not exist (a misspelling), raises in a hook or returns
something other than a list of the hook's spec type is recorded in ``Registry.failures`` and
its results are dropped; the rest keep working. Built-in names cannot be taken over: a
third-party spec or entry point reusing one is refused, the built-in is kept.
"""

from __future__ import annotations

import difflib
import importlib.metadata as importlib_metadata
import os
import re
import reprlib
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy

from semidiff_nnunet import hookspecs
from semidiff_nnunet.errors import DuplicateNameError, UnknownNameError
from semidiff_nnunet.specs import ConverterSpec, MethodSpec

#: each kind of registered spec and the hook that provides it; every kind has a consumer (``-m NAME``,
#: ``semidiff convert NAME``), which a test checks
KINDS = {
    "method": "semidiff_register_methods",
    "converter": "semidiff_register_converters",
}
SPEC_TYPES = {"method": MethodSpec, "converter": ConverterSpec}
BUILTIN_DISTRIBUTION = "semidiff-nnunet"
DISABLE_AUTOLOAD_ENV = "SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD"

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def is_builtin(distribution: str) -> bool:
    return _canonical(distribution) == BUILTIN_DISTRIBUTION


def autoload_disabled() -> bool:
    """``SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD`` set to anything but empty/0/false/no/off (as pytest's switch)."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _closest_hook(name: str) -> str | None:
    """The hook a misspelled ``@hookimpl`` name means, if any; names sharing the ``semidiff_register_``
    prefix are compared by what follows it (``..._losses``, a kind that is no hook, means none)."""
    prefix = "semidiff_register_"
    hooks = list(KINDS.values())
    if name.startswith(prefix):
        close = difflib.get_close_matches(name[len(prefix):], [h[len(prefix):] for h in hooks], n=1, cutoff=0.6)
        return prefix + close[0] if close else None
    close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.6)
    return close[0] if close else None


def _returned(value: Any) -> str:
    kind = type(value).__name__
    return f"{_repr.repr(value)} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


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
        self.autoload_disabled = False
        self.skipped: list[tuple[str, str]] = []  # (entry point, distribution) left out by the autoload switch
        if load_entry_points:
            self._load_entry_points()

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        self.autoload_disabled = autoload_disabled()
        eps = []
        for ep in importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            eps.append((not is_builtin(dist), ep.name, _canonical(dist), ep, dist, version))
        seen: set[tuple[str, str]] = set()
        for third_party, name, canonical, ep, dist, version in sorted(eps, key=lambda t: t[:3]):  # built-ins first
            if (canonical, name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((canonical, name))
            if third_party and self.autoload_disabled:
                self.skipped.append((name, dist))
                continue
            if name in self.plugins:  # refused before importing it: the first one (a built-in, if any) stays
                owner = self.plugins[name].distribution
                taken = f"a built-in plugin of {owner}" if is_builtin(owner) else f"the plugin {name!r} of {owner}"
                self.failures.append(PluginFailure(name, dist, f"its entry-point name {name!r} is already taken by "
                                                               f"{taken}, so it is not loaded; rename the entry point",
                                                   ""))
                continue
            try:
                plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - a broken plugin (even one calling sys.exit) must not break the others
                self.failures.append(PluginFailure(name, dist, f"{type(e).__name__}: {e}", traceback.format_exc()))
                continue
            self.register(plugin, name, dist, version)

    def register(self, plugin: Any, name: str, distribution: str = "(local)", version: str = "") -> None:
        """Register a plugin object/module by hand (tests, notebooks)."""
        if self.pm.get_plugin(name) is not None:
            raise DuplicateNameError(
                f"Two plugins are named {name!r} ({self.plugins[name].distribution} and {distribution}); "
                f"rename one entry point."
            )
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:  # noqa: BLE001 - e.g. a hookimpl whose arguments the hookspec does not have
            self.failures.append(PluginFailure(name, distribution, f"{type(e).__name__}: {e}", traceback.format_exc()))
            return
        try:  # every plugin before this one passed, so what is pending is this plugin's
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            unknown = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [] if not h.has_spec())
            self.pm.unregister(plugin, name=name)
            hints = []
            for hook in unknown:
                close = _closest_hook(hook)
                hints.append(f"{hook!r}" + (f" (did you mean {close!r}?)" if close else ""))
            self.failures.append(PluginFailure(
                name, distribution, f"it implements {', '.join(hints)}, which is no semidiff hook, so it is not "
                                    f"loaded; fix the @hookimpl function name", ""))
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
        order = {name: i for i, name in enumerate(self.plugins)}  # registration order, built-ins first
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            impls = sorted(hook.get_hookimpls(), key=lambda impl: (
                not is_builtin(self._distribution(impl.plugin_name)), order.get(impl.plugin_name, len(order))))
            for impl in impls:
                dist = self._distribution(impl.plugin_name)
                try:
                    specs = impl.function()
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001
                    self.failures.append(
                        PluginFailure(impl.plugin_name, dist, f"{hook_name} raised {type(e).__name__}: {e}",
                                      traceback.format_exc()))
                    continue
                problem = self._check_result(kind, hook_name, specs)
                if problem:
                    self.failures.append(PluginFailure(impl.plugin_name, dist, problem, ""))
                    continue
                for spec in specs or []:
                    entry = Entry(spec, impl.plugin_name, dist)
                    taken = entries[kind].get(spec.name)
                    if taken is not None and is_builtin(taken.distribution) and not is_builtin(dist):
                        self.failures.append(PluginFailure(impl.plugin_name, dist, (
                            f"the {kind.replace('_', ' ')} name {spec.name!r} is built into {taken.distribution} "
                            f"and cannot be replaced, so this plugin's {spec.name!r} is ignored; rename it"), ""))
                        continue
                    if taken is not None:
                        # listing keeps working (the first provider is shown, the clash is a failure);
                        # using the name is refused (``entry``)
                        clash = self.duplicates.setdefault((kind, spec.name), [taken])
                        clash.append(entry)
                        self.failures.append(PluginFailure(impl.plugin_name, dist, self._duplicate_message(
                            kind, spec.name, clash), ""))
                        continue
                    entries[kind][spec.name] = entry
        self._entries = entries
        return entries

    def _distribution(self, plugin_name: str) -> str:
        info = self.plugins.get(plugin_name)
        return info.distribution if info else "?"

    @staticmethod
    def _check_result(kind: str, hook_name: str, specs: Any) -> str:
        """Why a hook's return value is unusable (one clause), or "" when it is a list of the kind's spec."""
        spec_type = SPEC_TYPES[kind].__name__
        if specs is None:  # a hook with nothing to register
            return ""
        if not isinstance(specs, (list, tuple)):
            return f"{hook_name} returned {_returned(specs)} instead of a list of {spec_type}, so its results are ignored"
        for i, spec in enumerate(specs):
            if not isinstance(spec, SPEC_TYPES[kind]):
                return (f"{hook_name} returned a list whose item {i} is {_returned(spec)}, not a {spec_type}, "
                        f"so its results are ignored")
            if not isinstance(spec.name, str) or not spec.name:
                return (f"{hook_name} returned a {spec_type} whose name is {_returned(spec.name)}, not a non-empty "
                        f"string, so its results are ignored")
        return ""

    def entries(self, kind: str) -> dict[str, Entry]:
        return dict(sorted(self._collect()[kind].items()))

    def names(self, kind: str) -> list[str]:
        return sorted(self._collect()[kind])

    def builtin_names(self, kind: str) -> list[str]:
        """The names of ``kind`` that semidiff-nnunet itself provides (its ``semidiff`` entry points in
        pyproject.toml): the one list of the built-in methods (or converters)."""
        return sorted(n for n, e in self._collect()[kind].items() if is_builtin(e.distribution))

    def method_name_of(self, trainer: type) -> str:
        """The name under which the trainer class ``trainer`` is registered (its :class:`MethodSpec`'s
        ``name``), found without importing other plugins' trainers; a class registered under no name, or
        under several, is an error naming the fix."""
        ref = f"{trainer.__module__}:{trainer.__qualname__}"
        found = [n for n, e in self._collect()["method"].items() if e.spec.trainer is trainer or e.spec.trainer == ref]
        if len(found) == 1:
            return found[0]
        if found:
            raise DuplicateNameError(f"{trainer.__qualname__} is registered as the methods {', '.join(found)}; "
                                     f"its run says which one only when started by semidiff.")
        raise UnknownNameError(f"{trainer.__qualname__} is registered as no method: return a MethodSpec naming it "
                               f"from a semidiff_register_methods hook (or, for a trainer used only in a test, "
                               f"set its class attribute method_name).")

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
        off = (f" {len(self.skipped)} third-party plugin(s) were not loaded because {DISABLE_AUTOLOAD_ENV} is set."
               if self.skipped else "")
        raise UnknownNameError(f"Unknown {label} {name!r}.{hint} Registered: {known}.{broken}{off}")

    def get(self, kind: str, name: str):
        return self.entry(kind, name).spec

    # convenience
    def method(self, name: str):
        """The method registered as ``name``; a variant (``NAME@LABEL``, :func:`split_variant`) is its method's."""
        return self.get("method", split_variant(name)[0])

    def converter(self, name: str):
        return self.get("converter", name)


#: ``METHOD@LABEL`` names a variant of a method: the same trainer, run with settings of its own (``--set
#: METHOD@LABEL:KEY=VALUE``) in run folders of its own, so that ablations sit beside the method in one benchmark
VARIANT_SEPARATOR = "@"
_VARIANT_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def split_variant(name: str) -> tuple[str, str]:
    """``("superdiffusion", "nopretrain")`` for ``superdiffusion@nopretrain``, ``(name, "")`` for a plain name;
    a label that could not be part of a folder name is refused in one sentence."""
    base, sep, label = name.partition(VARIANT_SEPARATOR)
    if sep and not _VARIANT_LABEL.fullmatch(label):
        raise UnknownNameError(f"{name!r}: after {VARIANT_SEPARATOR!r} comes a variant label of letters, digits, '.' "
                               f"and '-' (e.g. {base or 'superdiffusion'}{VARIANT_SEPARATOR}nopretrain).")
    return base, label


class RegisteredName:
    """The trainer's ``method_name`` (what run folders, ``semidiff_run.json``, checkpoints and the progress
    bar call the method), read from where it is declared: the :class:`MethodSpec` registering the class.

    On a trainer of a run, the run's method (``RunConfig.method``, the name it was started with) answers;
    otherwise the registry (:meth:`Registry.method_name_of`). A class registered under no name is an error,
    never a made-up default. A test trainer that is never registered may set a plain
    ``method_name = "..."``, which shadows this.
    """

    def __get__(self, trainer, owner: type) -> str:
        run = getattr(trainer, "run_config", None) if trainer is not None else None
        if getattr(run, "method", ""):
            return run.method
        return get_registry().method_name_of(owner)


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
    return _REGISTRY
