import importlib.metadata as md
import sys
import types

import pytest

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.errors import DuplicateNameError, UnknownNameError
from semidiff_nnunet.registry import PluginFailure, Registry


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
