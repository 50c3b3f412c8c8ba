import importlib.metadata as md
import re
import sys
import types
from pathlib import Path

import pytest

from semidiff_nnunet import MethodSpec, hookimpl, hookspecs
from semidiff_nnunet.errors import DuplicateNameError, UnknownNameError
from semidiff_nnunet.registry import KINDS, PluginFailure, Registry


def _plugin(name, method_names):
    mod = types.ModuleType(name)

    @hookimpl
    def semidiff_register_methods():
        return [MethodSpec(name=n, trainer=object, summary=f"{n} summary") for n in method_names]

    mod.semidiff_register_methods = semidiff_register_methods
    return mod


def test_builtins_register_through_entry_points():
    reg = Registry()
    assert {"supervised", "mean-teacher"} <= set(reg.names("method"))
    entry = reg.entry("method", "mean-teacher")
    assert entry.distribution == "semidiff-nnunet" and entry.provider == "mean-teacher"
    assert "semidiff_register_methods" in reg.plugins["mean-teacher"].hooks


def test_unknown_name_suggests_closest():
    reg = Registry(load_entry_points=False)
    reg.register(_plugin("p", ["mean-teacher", "cps"]), "p")
    with pytest.raises(UnknownNameError) as e:
        reg.method("mean-techer")
    assert "Did you mean 'mean-teacher'" in str(e.value) and "Registered: cps, mean-teacher" in str(e.value)


def test_duplicate_name_names_both_providers_and_listing_still_works():
    reg = Registry(load_entry_points=False)
    reg.register(_plugin("a", ["x", "y"]), "plugin-a", "dist-a")
    reg.register(_plugin("b", ["x"]), "plugin-b", "dist-b")
    assert reg.names("method") == ["x", "y"]  # the diagnostic commands still list what is installed
    assert any("plugin-a" in f.error and "plugin-b" in f.error for f in reg.failures)
    assert reg.method("y")  # other names stay usable
    with pytest.raises(DuplicateNameError) as e:
        reg.method("x")  # using the clashing name is refused, naming both providers
    assert "plugin-a" in str(e.value) and "plugin-b" in str(e.value)


def test_method_of_a_plugin_that_failed_to_load_says_so():
    reg = Registry(load_entry_points=False)
    reg.register(_plugin("ok", ["fine"]), "ok")
    reg.failures.append(PluginFailure("my-method", "my-dist", "ImportError: no module named 'mamba_ssm'", ""))
    with pytest.raises(UnknownNameError, match=r"'my-method' is unavailable: its plugin 'my-method' \(my-dist\) "
                                               r"failed to load \(ImportError: no module named 'mamba_ssm'\)"):
        reg.method("my-method")
    with pytest.raises(UnknownNameError, match="1 plugin\\(s\\) failed to load"):
        reg.method("other")


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch, tmp_path):
    (tmp_path / "good_semidiff_plugin.py").write_text(
        "from semidiff_nnunet import MethodSpec, hookimpl\n"
        "@hookimpl\n"
        "def semidiff_register_methods():\n"
        "    return [MethodSpec(name='good-method', trainer=object)]\n", encoding="utf-8")
    (tmp_path / "bad_semidiff_plugin.py").write_text("raise ImportError('needs a missing CUDA library')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = [md.EntryPoint(name="good", value="good_semidiff_plugin", group="semidiff"),
            md.EntryPoint(name="bad", value="bad_semidiff_plugin", group="semidiff")]
    real = md.entry_points

    def entry_points(**kw):
        return list(real(**kw)) + fake if kw.get("group") == "semidiff" else real(**kw)

    monkeypatch.setattr(md, "entry_points", entry_points)
    reg = Registry()
    assert "good-method" in reg.names("method") and "supervised" in reg.names("method")
    failed = [f.name for f in reg.failures]
    assert "bad" in failed and "good" not in failed
    assert "missing CUDA library" in reg.failures[failed.index("bad")].error
    sys.modules.pop("good_semidiff_plugin", None)


def test_hook_that_raises_is_reported():
    reg = Registry(load_entry_points=False)
    mod = types.ModuleType("raiser")

    @hookimpl
    def semidiff_register_methods():
        raise RuntimeError("boom")

    mod.semidiff_register_methods = semidiff_register_methods
    reg.register(mod, "raiser")
    reg.register(_plugin("ok", ["fine"]), "ok")
    assert reg.names("method") == ["fine"]
    assert "boom" in reg.failures[0].error


@pytest.mark.slow  # a subprocess of the CLI
@pytest.mark.parametrize("command", [["methods"], ["plugins"], ["split", "-d", "424242", "--labeled", "0.1"]])
def test_cli_under_a_non_utf8_locale(command, tmp_path):
    """With LANG unset (an ASCII locale, as on some CI runners) the CLI prints its tables and errors
    without a UnicodeEncodeError traceback."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", SEMIDIFF_HOME=str(tmp_path))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "semidiff_nnunet.cli.main", *command], env=env,
                         capture_output=True, timeout=120)
    err = res.stderr.decode("ascii", "replace")
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err
    if command[0] == "split":
        assert res.returncode == 1 and "Error:" in err and "not found" in err
    else:
        assert res.returncode == 0, err
        assert b"supervised" in res.stdout


# ------------------------------------------------------------------ isolation of third-party plugins
@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, {entry_point: source})``: a distribution on sys.path (a ``.dist-info`` folder, found by
    ``importlib.metadata`` as pip's would be) whose ``semidiff`` entry points are modules with these sources."""
    modules = []

    def make(dist, plugins):
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
        lines = ["[semidiff]"]
        for ep, source in plugins.items():
            module = f"{dist}_{ep}".replace("-", "_")
            (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
            lines.append(f"{ep} = {module}")
            modules.append(module)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        monkeypatch.syspath_prepend(str(tmp_path))

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def _methods_source(*names):
    return ("from semidiff_nnunet import MethodSpec, hookimpl\n"
            "@hookimpl\n"
            "def semidiff_register_methods():\n"
            f"    return [MethodSpec(name=n, trainer=object) for n in {list(names)!r}]\n")


def _failure(reg, name):
    found = [f for f in reg.failures if f.name == name]
    assert len(found) == 1, reg.failures
    return found[0]


def test_plugin_calling_sys_exit_on_import_is_a_reported_failure(install):
    install("exiting-dist", {"exiter": "import sys\nsys.exit(3)\n", "fine": _methods_source("fine-method")})
    reg = Registry()
    f = _failure(reg, "exiter")
    assert f.distribution == "exiting-dist" and f.error == "SystemExit: 3" and "sys.exit(3)" in f.traceback
    assert {"fine-method", "mean-teacher"} <= set(reg.names("method"))


def test_ctrl_c_while_a_plugin_imports_still_interrupts(install):
    install("slow-dist", {"slow": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        Registry()


def test_cli_plugins_reports_a_plugin_calling_sys_exit(install, run_cli, monkeypatch):
    from semidiff_nnunet import registry

    install("exiting-dist", {"exiter": "import sys\nsys.exit(3)\n"})
    monkeypatch.setattr(registry, "_REGISTRY", None)
    code, out, err = run_cli("plugins")
    assert code == 0, err
    assert "mean-teacher" in out and "'exiter' (exiting-dist): " in " ".join(out.split())
    assert "SystemExit" in out


def test_cli_plugins_names_the_plugins_the_switch_left_out(install, run_cli, monkeypatch):
    from semidiff_nnunet import registry

    install("third-dist", {"third": _methods_source("third-method")})
    monkeypatch.setattr(registry, "_REGISTRY", None)
    monkeypatch.setenv("SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD", "1")
    code, out, err = run_cli("plugins")
    assert code == 0, err
    assert "1 third-party plugin(s) not loaded (third (third-dist)): SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD" in " ".join(
        out.split())


def test_hook_calling_sys_exit_is_a_reported_failure():
    reg = Registry(load_entry_points=False)
    mod = types.ModuleType("exiter")
    mod.semidiff_register_methods = hookimpl(lambda: sys.exit(4))
    reg.register(mod, "exiter", "exiting-dist")
    reg.register(_plugin("ok", ["fine"]), "ok")
    assert reg.names("method") == ["fine"]
    assert _failure(reg, "exiter").error == "semidiff_register_methods raised SystemExit: 4"


@pytest.mark.parametrize("returned, said", [
    (3, "semidiff_register_methods returned 3 (an int) instead of a list of MethodSpec"),
    ("mean", "semidiff_register_methods returned 'mean' (a str) instead of a list of MethodSpec"),
    (["cps"], "semidiff_register_methods returned a list whose item 0 is 'cps' (a str), not a MethodSpec"),
    ("converter", "semidiff_register_methods returned a list whose item 1 is ConverterSpec("),
    ("unnamed", "semidiff_register_methods returned a MethodSpec whose name is 7 (an int), not a non-empty string"),
])
def test_hook_returning_the_wrong_type_is_a_reported_failure(returned, said):
    from semidiff_nnunet import ConverterSpec

    if returned == "converter":
        returned = [MethodSpec(name="ok-part", trainer=object), ConverterSpec(name="conv", convert=object)]
    elif returned == "unnamed":
        returned = [MethodSpec(name=7, trainer=object)]
    mod = types.ModuleType("wrong")
    mod.semidiff_register_methods = hookimpl(lambda: returned)
    reg = Registry(load_entry_points=False)
    reg.register(mod, "wrong", "wrong-dist")
    reg.register(_plugin("ok", ["fine"]), "ok", "ok-dist")
    assert reg.names("method") == ["fine"]  # the failing plugin's results are dropped, the rest keep working
    f = _failure(reg, "wrong")
    assert f.distribution == "wrong-dist" and f.error.startswith(said) and "results are ignored" in f.error
    with pytest.raises(UnknownNameError, match="1 plugin\\(s\\) failed to load"):
        reg.method("ok-part")


@pytest.mark.parametrize("entry_point", ["aaa-thief", "zzz-thief"])  # registered before and after the built-in
def test_third_party_cannot_take_over_a_builtin_name(install, entry_point):
    install("thief-dist", {entry_point: _methods_source("mean-teacher", "own-method")})
    reg = Registry()
    entry = reg.entry("method", "mean-teacher")  # still usable, still the built-in
    assert entry.distribution == "semidiff-nnunet" and entry.provider == "mean-teacher"
    assert reg.entry("method", "own-method").distribution == "thief-dist"  # the thief's other names work
    f = _failure(reg, entry_point)
    assert f.distribution == "thief-dist" and "'mean-teacher' is built into semidiff-nnunet" in f.error
    assert not [f for f in reg.failures if f.distribution == "semidiff-nnunet"]


def test_third_party_entry_point_named_like_a_builtin_is_refused(install):
    install("thief-dist", {"mean-teacher": _methods_source("mean-teacher", "own-method")})
    reg = Registry()  # no DuplicateNameError: every command keeps working
    assert reg.entry("method", "mean-teacher").distribution == "semidiff-nnunet"
    assert reg.plugins["mean-teacher"].distribution == "semidiff-nnunet"
    assert "own-method" not in reg.names("method")
    f = _failure(reg, "mean-teacher")
    assert f.distribution == "thief-dist" and "a built-in plugin of semidiff-nnunet" in f.error


def test_clash_between_two_third_party_plugins_names_both(install):
    install("dist-a", {"plugin-a": _methods_source("shared")})
    install("dist-b", {"plugin-b": _methods_source("shared")})
    reg = Registry()
    with pytest.raises(DuplicateNameError) as e:  # unchanged: neither third party wins
        reg.method("shared")
    assert "plugin 'plugin-a' (dist-a)" in str(e.value) and "plugin 'plugin-b' (dist-b)" in str(e.value)


@pytest.mark.parametrize("value, loaded", [("1", False), ("true", False), ("0", True), ("", True)])
def test_disable_plugin_autoload_loads_only_builtins(install, monkeypatch, value, loaded):
    install("third-dist", {"third": _methods_source("third-method")})
    monkeypatch.setenv("SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD", value)
    reg = Registry()
    assert "mean-teacher" in reg.names("method") and "converters" in reg.plugins
    assert ("third-method" in reg.names("method")) is loaded
    assert ("third_dist_third" in sys.modules) is loaded  # a switched-off plugin is not even imported
    if not loaded:
        assert reg.skipped == [("third", "third-dist")] and not reg.failures
        with pytest.raises(UnknownNameError, match="1 third-party plugin\\(s\\) were not loaded because "
                                                   "SEMIDIFF_DISABLE_PLUGIN_AUTOLOAD is set"):
            reg.method("third-method")


@pytest.mark.parametrize("hook, said", [
    ("semidiff_register_method", "'semidiff_register_method' (did you mean 'semidiff_register_methods'?)"),
    ("semidiff_register_losses", "'semidiff_register_losses', which is no semidiff hook"),  # a removed kind
])
def test_misspelled_hook_is_a_reported_failure(install, hook, said):
    install("typo-dist", {"typo": _methods_source("typo-method") + (
        "@hookimpl\n"
        f"def {hook}():\n"
        "    return []\n")})
    reg = Registry()
    f = _failure(reg, "typo")
    assert f.distribution == "typo-dist"
    assert said in f.error
    assert "typo" not in reg.plugins and "typo-method" not in reg.names("method")
    assert "mean-teacher" in reg.names("method")


# ------------------------------------------------------------------ every hook is used and shown
PACKAGE = Path(__file__).resolve().parents[1] / "semidiff_nnunet"
DOCS = [Path(__file__).resolve().parents[1] / "README.md",
        *sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.py"))]


def _hookspec_names(module) -> list[str]:
    return sorted(n for n, f in vars(module).items() if hasattr(f, f"{hookspecs.PROJECT_NAME}_spec"))


def _unused_hooks(names) -> list[str]:
    """Hooks of ``names`` with no consumer in the package: neither a ``pm.hook.NAME`` call site nor a call
    of the registry function that reads their kind (``get_registry().KIND(...)``, ``.get("KIND", ...)``,
    ``.entry("KIND", ...)``) outside the registry and the hook specifications themselves."""
    sources = "\n".join(p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))
                        if p.name not in ("registry.py", "hookspecs.py"))
    kinds = {hook: kind for kind, hook in KINDS.items()}
    unused = []
    for name in names:
        kind = kinds.get(name)
        used = re.search(rf"\.hook\.{name}\b", sources) or (kind and re.search(
            rf"get_registry\(\)\s*\.\s*(?:{kind}\(|(?:get|entry)\(\s*[\"']{kind}[\"'])", sources))
        if not used:
            unused.append(name)
    return unused


def _undocumented_hooks(names) -> list[str]:
    """Hooks of ``names`` that no example implements (``def NAME(`` in the README or under examples/)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    return [n for n in names if not re.search(rf"def {n}\(", text)]


def test_every_hook_has_a_consumer_and_a_documented_example():
    names = _hookspec_names(hookspecs)
    assert names == sorted(KINDS.values())  # the registry collects every hook
    assert _unused_hooks(names) == []
    assert _undocumented_hooks(names) == []
    # control: a hook that nothing calls and nothing shows is caught, so the checks above can fail
    assert _unused_hooks(["semidiff_register_networks"]) == ["semidiff_register_networks"]
    assert _undocumented_hooks(["semidiff_register_networks"]) == ["semidiff_register_networks"]


# ------------------------------------------------------------------ a method's name has one home
def test_a_builtin_trainer_takes_its_name_from_its_method_spec():
    reg = Registry()
    for name in reg.builtin_names("method"):
        trainer = reg.method(name).load_trainer()
        assert "method_name" not in vars(trainer), f"{trainer.__name__} repeats its name; its MethodSpec holds it"
        assert trainer.method_name == name


def test_an_unregistered_trainer_has_no_name_to_leak_into_checkpoints():
    from types import SimpleNamespace

    from semidiff_nnunet.training import SemiSupervisedTrainer

    class Unregistered(SemiSupervisedTrainer):
        pass

    with pytest.raises(UnknownNameError, match="Unregistered is registered as no method"):
        getattr(Unregistered, "method_name")  # noqa: B009
    with pytest.raises(UnknownNameError):
        getattr(SemiSupervisedTrainer, "method_name")  # noqa: B009
    descriptor = vars(SemiSupervisedTrainer)["method_name"]
    run = SimpleNamespace(run_config=SimpleNamespace(method="started-as"))  # a trainer of a run started by semidiff
    assert descriptor.__get__(run, Unregistered) == "started-as"
