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


# ---- a plugin that fails at call time, or at import in strict mode (issue 11)


class BrokenNamespacePlugin:
    """A namespace hook that raises for every array, as a buggy third-party plugin would."""

    @nk.hookimpl
    def normkit_array_namespace(self, array):
        raise KeyError("shape")


@pytest.fixture
def isolated_failures(monkeypatch):
    """Fresh failure records and caches: a plugin's failure in one test must not leak into another."""
    from normkit._namespace import clear_cache
    from normkit.plugin.kernels import invalidate

    monkeypatch.setattr(manager, "_DISABLED", set())
    monkeypatch.setattr(manager, "_FAILURES", [])
    clear_cache()
    invalidate()
    yield
    clear_cache()
    invalidate()


def _with_broken_plugin_after(healthy):
    """Register ``healthy`` then a broken plugin: pluggy asks the later one first."""
    broken = BrokenNamespacePlugin()
    manager.register(healthy, name="test-healthy")
    manager.register(broken, name="test-broken")
    return broken


def test_hook_that_raises_is_named_and_skipped(monkeypatch, isolated_failures):
    """3431f07: the raw KeyError('shape') propagated, naming no plugin, and the healthy plugin was never asked."""
    monkeypatch.delenv("NORMKIT_STRICT_PLUGINS", raising=False)
    healthy = WrappedPlugin()
    broken = _with_broken_plugin_after(healthy)
    try:
        with pytest.warns(manager.PluginLoadWarning,
                          match=r"normkit plugin 'test-broken': its hook normkit_array_namespace\(\) raised KeyError\('shape'\); skipped"):
            xp = nk.array_namespace(("x", Wrapped([1.0, 2.0])))
        assert xp.__name__ == "array_api_compat.numpy"  # the healthy plugin answered
        assert [(p, h) for p, h, _ in manager.failures()] == [("test-broken", "normkit_array_namespace")]
    finally:
        manager.unregister(broken)
        manager.unregister(healthy)


def test_strict_mode_fails_once_with_the_plugin_name_then_the_healthy_plugin_serves(monkeypatch, isolated_failures):
    """3431f07 with NORMKIT_STRICT_PLUGINS=1: every later call reaching the hook failed, a healthy plugin's included."""
    monkeypatch.setenv("NORMKIT_STRICT_PLUGINS", "1")
    healthy = WrappedPlugin()
    broken = _with_broken_plugin_after(healthy)
    try:
        with pytest.raises(manager.PluginError, match=r"normkit plugin 'test-broken': its hook normkit_array_namespace"):
            nk.array_namespace(("x", Wrapped([1.0])))
        assert nk.array_namespace(("x", Wrapped([1.0]))).__name__ == "array_api_compat.numpy"
        y = nk.standardize(np.array([[1.0], [3.0]]))
        np.testing.assert_array_equal(y, [[-1.0], [1.0]])
    finally:
        manager.unregister(broken)
        manager.unregister(healthy)


def test_failing_frameworks_hook_does_not_hide_the_others(monkeypatch, isolated_failures):
    monkeypatch.delenv("NORMKIT_STRICT_PLUGINS", raising=False)

    class BrokenFrameworks:
        @nk.hookimpl
        def normkit_frameworks(self):
            raise RuntimeError("registry unavailable")

    broken = BrokenFrameworks()
    manager.register(broken, name="test-broken-frameworks")
    try:
        with pytest.warns(manager.PluginLoadWarning, match="'test-broken-frameworks': its hook normkit_frameworks"):
            names = manager.frameworks()
        assert {"torch", "keras"} <= set(names)
    finally:
        manager.unregister(broken)


def test_strict_load_failure_is_raised_once_and_healthy_plugins_keep_working(monkeypatch, isolated_failures):
    """3431f07 with NORMKIT_STRICT_PLUGINS=1 and a plugin that fails to import: numpy passed, then every dask,
    array-api-strict and TensorFlow call failed (the manager was never built). Now: one PluginError naming it,
    then every healthy plugin, TensorFlow's included, serves."""
    import sys
    import types
    from importlib.metadata import entry_points

    import tensorflow as tf

    healthy = types.ModuleType("normkit_test_healthy_plugin")
    healthy.normkit_array_namespace = WrappedPlugin().normkit_array_namespace
    monkeypatch.setitem(sys.modules, "normkit_test_healthy_plugin", healthy)
    installed = list(entry_points(group="normkit"))
    eps = installed + [_failing_entry_point(),
                       EntryPoint(name="healthy", value="normkit_test_healthy_plugin", group="normkit")]
    monkeypatch.setenv("NORMKIT_STRICT_PLUGINS", "1")
    _fresh_manager(monkeypatch, eps)
    with pytest.raises(manager.PluginError, match=r"normkit plugin 'broken' \(normkit_no_such_module_xyz\) failed to load"):
        nk.batch_norm(np.ones((2, 2)), training=True)
    pm = manager.plugin_manager()  # no second error
    assert pm.get_plugin("healthy") is healthy and pm.get_plugin("broken") is None
    assert nk.array_namespace(("x", Wrapped([1.0]))).__name__ == "array_api_compat.numpy"
    np.testing.assert_allclose(nk.standardize(tf.constant([[1.0], [3.0]])).numpy(), [[-1.0], [1.0]])
    import dask.array as da

    np.testing.assert_allclose(nk.standardize(da.from_array(np.array([[1.0], [3.0]]))).compute(), [[-1.0], [1.0]])
