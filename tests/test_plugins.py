"""The plugin host: in-process registration, lazy thread-safe loading, failures reported by name."""

import threading
import warnings
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import normkit as nk
from normkit.plugin import manager


class Wrapped:
    """An array type no library knows: a thin box around a NumPy array."""

    def __init__(self, a):
        self.a = np.asarray(a)
        self.shape, self.dtype, self.ndim = self.a.shape, self.a.dtype, self.a.ndim


class WrappedPlugin:
    """The smallest namespace plugin: serve ``Wrapped`` by unwrapping to NumPy's namespace."""

    @nk.hookimpl
    def normkit_array_namespace(self, array):
        if isinstance(array, Wrapped):
            from array_api_compat import numpy as xp

            return xp
        return None


@pytest.fixture
def wrapped_plugin():
    plugin = WrappedPlugin()
    manager.register(plugin, name="test-wrapped")
    yield plugin
    manager.unregister(plugin)


def test_namespace_hook_serves_a_new_type(wrapped_plugin):
    assert nk.array_namespace(("x", Wrapped([1.0]))).__name__ == "array_api_compat.numpy"


def test_namespace_hook_unregistered_again():
    with pytest.raises(TypeError, match="no array namespace"):
        nk.array_namespace(("x", Wrapped([1.0])))


def _failing_entry_point():
    return EntryPoint(name="broken", value="normkit_no_such_module_xyz", group="normkit")


def _fresh_manager(monkeypatch, eps):
    monkeypatch.setattr(manager, "_MANAGER", None)
    monkeypatch.setattr(manager, "entry_points", lambda group: eps if group == "normkit" else [])


def test_failing_plugin_is_named_and_skipped(monkeypatch):
    monkeypatch.delenv("NORMKIT_STRICT_PLUGINS", raising=False)
    _fresh_manager(monkeypatch, [_failing_entry_point()])
    with pytest.warns(manager.PluginLoadWarning, match=r"'broken' \(normkit_no_such_module_xyz\) failed to load.*No module named"):
        pm = manager.plugin_manager()
    assert pm.get_plugin("broken") is None  # skipped; the core keeps working
    y = nk.batch_norm(np.ones((2, 2)), training=True).output
    assert np.isfinite(y).all()


def test_strict_mode_turns_failure_into_an_error(monkeypatch):
    monkeypatch.setenv("NORMKIT_STRICT_PLUGINS", "1")
    _fresh_manager(monkeypatch, [_failing_entry_point()])
    with pytest.raises(RuntimeError, match="normkit plugin 'broken'"):
        manager.plugin_manager()


def test_loading_is_lazy_and_happens_once_across_threads(monkeypatch):
    calls = []

    class Counting(list):
        def __iter__(self):
            calls.append(1)
            return super().__iter__()

    _fresh_manager(monkeypatch, Counting())
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(manager.plugin_manager())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(pm) for pm in seen}) == 1


def test_duplicate_framework_is_an_error():
    class A:
        @nk.hookimpl
        def normkit_frameworks(self):
            return {"dup": "module_a"}

    class B:
        @nk.hookimpl
        def normkit_frameworks(self):
            return {"dup": "module_b"}

    a, b = A(), B()
    manager.register(a, "a")
    manager.register(b, "b")
    try:
        with pytest.raises(RuntimeError, match="framework 'dup' is registered twice"):
            manager.frameworks()
    finally:
        manager.unregister(a)
        manager.unregister(b)


def test_installed_first_party_plugins_are_found():
    with warnings.catch_warnings():
        warnings.simplefilter("error", manager.PluginLoadWarning)
        names = manager.frameworks()
    assert {"torch", "keras"} <= set(names), names
    assert manager.framework("torch").__name__ == "normkit_torch"
    with pytest.raises(LookupError, match="no normkit plugin provides framework 'mxnet'"):
        manager.framework("mxnet")


def test_kernel_policy_reads_env_validates_and_switches(monkeypatch):
    from normkit.plugin.kernels import KernelPolicy

    monkeypatch.setenv("NORMKIT_TEST_KERNELS", "core")
    policy = KernelPolicy("NORMKIT_TEST_KERNELS")
    assert policy.get() == "core" and not policy.enabled()
    assert policy.set("auto") == "core" and policy.enabled()
    with pytest.raises(ValueError, match=r"kernel policy must be one of \('auto', 'core'\), got 'fast'"):
        policy.set("fast")
    monkeypatch.setenv("NORMKIT_TEST_KERNELS", "turbo")
    with pytest.raises(ValueError, match="NORMKIT_TEST_KERNELS must be one of"):
        KernelPolicy("NORMKIT_TEST_KERNELS")
