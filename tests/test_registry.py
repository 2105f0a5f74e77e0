"""Tests of the generic Registry: every way to register and resolve, and its error messages."""

import importlib.metadata
import json
import sys
import textwrap

import pytest

from lightrft_mm.errors import RegistryError
from lightrft_mm.registry import Registry, normalize_name


def _ep(name, value, group="test.group"):
    return importlib.metadata.EntryPoint(name=name, value=value, group=group)


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replaces the installed entry points of any group by the ones a test sets."""
    eps = []

    def entry_points(*, group=None, **kwargs):
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return eps


@pytest.fixture
def tmp_module(tmp_path, monkeypatch):
    """Writes a module into a folder on sys.path and forgets it from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_normalize_name():
    assert normalize_name(" Math-Accuracy ") == "math_accuracy"


def test_decorator_registers_and_returns_object():
    reg = Registry("reward")

    @reg.register("math_accuracy")
    def f(inputs):
        return [1.0]

    assert f([]) == [1.0]  # the decorator gives the function back unchanged
    assert reg.get("math_accuracy") is f
    assert reg.names() == ["math_accuracy"]
    assert reg.origin("math_accuracy") == f"{__name__}:test_decorator_registers_and_returns_object.<locals>.f"


def test_bare_decorator_uses_dunder_name():
    reg = Registry("reward")

    @reg.register()
    def think_format(inputs):
        return []

    @reg.register
    def other_reward(inputs):
        return []

    assert reg.get("think_format") is think_format
    assert reg.get("other_reward") is other_reward


def test_direct_registration():
    reg = Registry("strategy")
    obj = object()
    assert reg.register("single", obj=obj) is obj
    assert reg.get("single") is obj


def test_names_are_case_and_dash_insensitive():
    reg = Registry("reward")
    reg.register("Math-Accuracy", obj=len)
    for spelling in ("math_accuracy", "MATH-ACCURACY", "math-Accuracy", " Math_accuracy "):
        assert reg.get(spelling) is len
        assert spelling in reg
    assert reg.names() == ["math_accuracy"]
    assert "math accuracy" not in reg
    assert 3 not in reg


def test_duplicate_names_both_origins():
    reg = Registry("reward")
    reg.register("acc", obj=json.dumps)
    with pytest.raises(RegistryError) as info:
        reg.register("ACC", obj=json.loads)
    message = str(info.value)
    assert "json:dumps" in message and "json:loads" in message and "'acc'" in message
    assert reg.get("acc") is json.dumps  # the first registration stays


def test_duplicate_of_lazy_names_both_origins():
    reg = Registry("engine")
    reg.register_lazy("vllm", "some.heavy.module:Engine")
    with pytest.raises(RegistryError, match=r"some\.heavy\.module:Engine.*json:dumps"):
        reg.register("vllm", obj=json.dumps)


def test_same_object_twice_is_not_a_duplicate():
    reg = Registry("reward")
    reg.register("acc", obj=json.dumps)
    reg.register("acc", obj=json.dumps)
    assert reg.names() == ["acc"]


def test_two_objects_with_one_origin_are_duplicates():
    reg = Registry("reward")
    reg.register("acc", obj=lambda inputs: [1.0])
    with pytest.raises(RegistryError, match="duplicate reward name 'acc'"):
        reg.register("acc", obj=lambda inputs: [0.0])


def test_same_lazy_target_twice_is_not_a_duplicate():
    reg = Registry("reward")
    reg.register_lazy("dumps", "json:dumps")
    reg.register_lazy("dumps", "json:dumps")
    assert reg.get("dumps") is json.dumps


def test_invalid_names_rejected():
    reg = Registry("reward")
    with pytest.raises(RegistryError, match="invalid reward name"):
        reg.register("a:b", obj=len)
    with pytest.raises(RegistryError, match="invalid reward name"):
        reg.register("  ", obj=len)
    with pytest.raises(RegistryError, match="package.module:attr"):
        reg.register_lazy("x", "no_colon_here")


def test_lazy_target_not_imported_before_get(tmp_module):
    name = tmp_module("lrmm_lazy_target", """
        IMPORTED = True
        def heavy(inputs):
            return ["heavy"]
    """)
    reg = Registry("reward")
    reg.register_lazy("heavy", f"{name}:heavy")
    assert name not in sys.modules
    assert "heavy" in reg
    assert list(reg.items()) == [("heavy", f"{name}:heavy")]
    assert reg.origin("heavy") == f"{name}:heavy"
    assert name not in sys.modules  # listing, membership and origin import nothing
    fn = reg.get("HEAVY")
    assert name in sys.modules
    assert fn([]) == ["heavy"]
    assert reg.get("heavy") is fn


def test_lazy_target_that_registers_itself(tmp_module):
    """The lazy target's module may register the same object with a decorator on import."""
    reg = Registry("engine")
    sys.modules["lrmm_test_registry_holder"] = type(sys)("lrmm_test_registry_holder")
    sys.modules["lrmm_test_registry_holder"].REG = reg
    try:
        name = tmp_module("lrmm_self_registering", """
            from lrmm_test_registry_holder import REG

            @REG.register("fast")
            def Engine():
                return "engine"
        """)
        reg.register_lazy("fast", f"{name}:Engine")
        assert reg.get("fast")() == "engine"
        assert reg.origin("fast") == f"{name}:Engine"
    finally:
        sys.modules.pop("lrmm_test_registry_holder")


def test_lazy_import_failure_names_target_and_cause(tmp_module):
    name = tmp_module("lrmm_broken_target", "import lrmm_this_module_does_not_exist\n")
    reg = Registry("engine")
    reg.register_lazy("broken", f"{name}:Engine")
    with pytest.raises(RegistryError) as info:
        reg.get("broken")
    message = str(info.value)
    assert f"{name}:Engine" in message and "lrmm_this_module_does_not_exist" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_module_attr_spec():
    reg = Registry("reward")
    assert reg.get("json:dumps") is json.dumps
    assert reg.get("json:JSONDecoder.decode") is json.JSONDecoder.decode


def test_module_attr_spec_missing_attr_lists_callables():
    reg = Registry("reward")
    with pytest.raises(RegistryError) as info:
        reg.get("json:dumpz")
    message = str(info.value)
    assert "'dumpz'" in message and "dumps" in message and "loads" in message


def test_module_attr_spec_missing_module():
    reg = Registry("reward")
    with pytest.raises(RegistryError, match="lrmm_no_such_module") as info:
        reg.get("lrmm_no_such_module:fn")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_file_spec(tmp_path, monkeypatch):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from math import sqrt  # imported callables are not "the file's" callables

        @dataclass
        class Config:  # dataclasses need the module in sys.modules while loading
            scale: float = 2.0

        def my_reward(inputs):
            return [Config().scale for _ in inputs]

        def _private():
            pass
    """))
    reg = Registry("reward")
    fn = reg.get(f"{plugin}:my_reward")
    assert fn([1, 2]) == [2.0, 2.0]
    assert reg.get(f"{plugin}:my_reward") is fn  # the file is imported once
    monkeypatch.chdir(tmp_path)
    assert reg.get("my_reward.py:my_reward") is fn  # relative to the working directory

    with pytest.raises(RegistryError) as info:
        reg.get(f"{plugin}:my_rewrd")
    message = str(info.value)
    assert "'my_rewrd'" in message and "Config, my_reward" in message
    assert "sqrt" not in message and "_private" not in message


def test_file_spec_missing_file_says_both_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = Registry("reward")
    with pytest.raises(RegistryError) as info:
        reg.get("plugins/missing.py:fn")
    message = str(info.value)
    assert "'plugins/missing.py'" in message
    assert str(tmp_path / "plugins" / "missing.py") in message


def test_file_spec_import_error(tmp_path):
    plugin = tmp_path / "bad.py"
    plugin.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RegistryError, match="boom") as info:
        Registry("reward").get(f"{plugin}:fn")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_file_registration_origin(tmp_path):
    """A file that registers its own function reports "file.py:fn" as the origin."""
    reg = Registry("reward")
    sys.modules["lrmm_test_registry_holder2"] = type(sys)("lrmm_test_registry_holder2")
    sys.modules["lrmm_test_registry_holder2"].REG = reg
    plugin = tmp_path / "plug.py"
    plugin.write_text(textwrap.dedent("""
        from lrmm_test_registry_holder2 import REG

        @REG.register("plugged")
        def fn(inputs):
            return []
    """))
    try:
        reg.get(f"{plugin}:fn")
    finally:
        sys.modules.pop("lrmm_test_registry_holder2")
    assert reg.origin("plugged") == f"{plugin}:fn"


def test_unknown_name_did_you_mean_and_how_to_register():
    reg = Registry("reward", entry_point_group="lightrft_mm.rewards")
    reg.register("math_accuracy", obj=len)
    reg.register("think_format", obj=len)
    with pytest.raises(RegistryError) as info:
        reg.get("math_acuracy")
    message = str(info.value)
    assert "unknown reward 'math_acuracy'" in message
    assert "did you mean 'math_accuracy'?" in message
    assert "math_accuracy, think_format" in message
    assert "register" in message and "module:attr" in message and "file.py:function" in message
    assert "lightrft_mm.rewards" in message


def test_unknown_name_without_close_match():
    reg = Registry("strategy")
    reg.register("single", obj=len)
    with pytest.raises(RegistryError) as info:
        reg.get("zzzzzz")
    message = str(info.value)
    assert "did you mean" not in message and "single" in message
    assert "entry point" not in message  # this registry has no entry point group
    with pytest.raises(RegistryError, match="unknown strategy 'nope'"):
        reg.origin("nope")
    with pytest.raises(RegistryError, match="none"):
        Registry("engine").get("vllm")


def test_registry_error_is_a_key_error_with_readable_text():
    with pytest.raises(KeyError) as info:
        Registry("reward").get("x")
    assert str(info.value).startswith("unknown reward 'x'")


def test_entry_points(fake_entry_points):
    fake_entry_points.append(_ep("Ext-Reward", "json:dumps"))
    fake_entry_points.append(_ep("other", "json:loads", group="another.group"))
    reg = Registry("reward", entry_point_group="test.group")
    reg.register("local", obj=len)
    assert reg.names() == ["ext_reward", "local"]
    assert "ext-reward" in reg
    assert "other" not in reg
    assert dict(reg.items())["ext_reward"].endswith("json:dumps")
    assert reg.origin("ext_reward").startswith("entry point ")
    assert reg.get("EXT_REWARD") is json.dumps


def test_entry_point_loaded_lazily(fake_entry_points, tmp_module):
    name = tmp_module("lrmm_ep_target", "def fn():\n    return 'ep'\n")
    fake_entry_points.append(_ep("plugin", f"{name}:fn"))
    reg = Registry("reward", entry_point_group="test.group")
    assert reg.names() == ["plugin"]
    assert name not in sys.modules
    assert reg.get("plugin")() == "ep"


def test_entry_point_failure_and_suggestion(fake_entry_points):
    fake_entry_points.append(_ep("broken", "lrmm_no_such_module:fn"))
    reg = Registry("reward", entry_point_group="test.group")
    with pytest.raises(RegistryError, match=r"entry point .*lrmm_no_such_module:fn.*failed") as info:
        reg.get("broken")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(RegistryError, match="did you mean 'broken'"):
        reg.get("brokn")


def test_registered_name_shadows_entry_point(fake_entry_points):
    fake_entry_points.append(_ep("acc", "json:loads"))
    reg = Registry("reward", entry_point_group="test.group")
    reg.register("acc", obj=json.dumps)
    assert reg.get("acc") is json.dumps
    assert reg.names() == ["acc"]


def test_ambiguous_entry_points(fake_entry_points):
    fake_entry_points.extend([_ep("acc", "json:loads"), _ep("ACC", "json:dumps")])
    reg = Registry("reward", entry_point_group="test.group")
    with pytest.raises(RegistryError, match=r"ambiguous.*json:loads.*json:dumps"):
        reg.get("acc")


# --- locate: what get() would resolve, checked without running plugin code ------------------------

def test_locate_reads_files_without_running_them(tmp_path):
    reg = Registry("reward")
    plugin = tmp_path / "plug.py"
    plugin.write_text(textwrap.dedent("""
        raise SystemExit("module code ran")
        try:
            import numpy as np
        except ImportError:
            np = None
        if True:
            def inside_if(inputs): ...
        CONST, (PAIR_A, PAIR_B) = 1, (2, 3)
        class Scorer: ...
        async def coro(x): ...
        something.attr = 1
    """))
    for name in ("inside_if", "np", "CONST", "PAIR_B", "Scorer", "coro", "Scorer.__call__"):
        assert reg.locate(f"{plugin}:{name}") == "file"
    with pytest.raises(RegistryError, match=r"defines no top-level .*'something'; it defines: CONST, PAIR_A"):
        reg.locate(f"{plugin}:something")  # an attribute set on another object binds nothing here
    (tmp_path / "star.py").write_text("from os.path import *\n")
    assert reg.locate(f"{tmp_path}/star.py:join") == "file"  # cannot be told from the source: accepted
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(RegistryError, match=r"broken\.py.*is not valid Python: line 1"):
        reg.locate(f"{tmp_path}/broken.py:f")
    with pytest.raises(RegistryError, match="reward file not found: 'nope.py'"):
        reg.locate("nope.py:f")


def test_locate_finds_modules_and_entry_points_without_importing(tmp_module, fake_entry_points, tmp_path):
    reg = Registry("reward", entry_point_group="test.group")
    reg.register("known", obj=len)
    assert reg.locate("KNOWN") == "registered"
    (tmp_path / "lrmm_lpkg").mkdir()
    (tmp_path / "lrmm_lpkg" / "__init__.py").write_text("raise SystemExit('package code ran')\n")
    (tmp_path / "lrmm_lpkg" / "mod.py").write_text("raise SystemExit('module code ran')\ndef fn(x): ...\n")
    tmp_module("lrmm_flat", "raise SystemExit('ran')\n")
    assert reg.locate("lrmm_lpkg.mod:fn") == "module" and "lrmm_lpkg" not in sys.modules
    with pytest.raises(RegistryError, match=r"'lrmm_lpkg.mod:gn'.*defines no top-level .*'gn'; it defines: fn"):
        reg.locate("lrmm_lpkg.mod:gn")
    with pytest.raises(RegistryError, match="no module named 'lrmm_lpkg.missing'"):
        reg.locate("lrmm_lpkg.missing:fn")
    with pytest.raises(RegistryError, match="'lrmm_flat' is a module, not a package"):
        reg.locate("lrmm_flat.sub:fn")
    fake_entry_points.append(_ep("ep_ok", "lrmm_lpkg.mod:fn"))
    fake_entry_points.append(_ep("ep_gone", "lrmm_not_installed:fn"))
    assert reg.locate("ep-ok") == "entry point"
    with pytest.raises(RegistryError, match="no module named 'lrmm_not_installed'"):
        reg.locate("ep_gone")
    with pytest.raises(RegistryError, match="unknown reward 'ep_okk'; did you mean 'ep_ok'"):
        reg.locate("ep_okk")
    assert "lrmm_lpkg" not in sys.modules and "lrmm_flat" not in sys.modules
