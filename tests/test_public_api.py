"""The public API is what users call: every runtime namespace's ``__all__`` is the documented set written here, each
name resolves to runtime code (nothing defined in, or re-exported from, a ``testing`` module or a test file), every
public function and class says what it does, and importing the packages and resolving every name loads no
``testing`` module.

The test helpers live in ``normkit.testing``, ``normkit_torch.testing``, ``normkit_keras.testing`` and
``normkit_flax.testing`` (the conformance harnesses, the gloo launcher ``run_gloo_workers``, ``CountCollectives``).
Adding a public name is a decision: add it here and to the README. One fresh process (the test session has the
testing modules loaded by normkit's pytest plugin) imports everything and reports what it found; Keras's and
Flax's names are checked through their packages' lazy tables, without importing keras, jax or flax.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.xdist_group("public_api")  # one worker: the fresh-process probe runs once

PUBLIC = {
    "normkit": {
        "batch_norm", "check_virtual_batch_size", "BatchNormResult", "batch_moments", "update_running_stats",
        "normalize", "batch_norm_backward", "BatchNormGrads", "layer_norm", "group_norm", "instance_norm", "rms_norm",
        "moments", "MomentsResult", "Moments", "standardize", "min_max_scale", "array_namespace", "hookimpl",
        "NormState", "StateCopyReport", "norm_states",
    },
    "normkit.plugin": {"hookimpl", "hookspec", "plugin_manager", "frameworks"},
    "normkit.plugin.kernels": {
        "KERNEL_POLICIES", "KernelPolicy", "KernelTable", "load", "generation", "use_policy", "current_override",
        "lookup", "device_type", "dtype_name", "namespace_name",
    },
    "normkit.plugin.manager": {
        "plugin_manager", "frameworks", "framework", "strict", "register", "unregister", "failures",
        "imported_module", "PluginLoadWarning", "PluginError",
    },
    "normkit_torch": {
        "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm",
        "Float32RMSNorm", "Standardize", "MinMaxScale", "convert", "ConversionReport", "UnconvertedNormWarning",
        "to_torch", "register_conversion", "accumulate_statistics", "set_kernel_policy", "get_kernel_policy",
        "fold_batch_norm", "UnfoldedBatchNormWarning", "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d",
        "FrozenBatchNorm3d", "freeze", "unfreeze", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "recalibrate",
        "get_state", "set_state", "from_state", "norm_states", "copy_norm_states",
    },
    "normkit_torch.functional": {
        "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "set_kernel_policy", "get_kernel_policy",
    },
    "normkit_torch.distributed": {
        "is_synchronized", "local_moments", "all_gather_moments", "all_reduce_sums", "merge_rows", "agreed_moments",
        "SyncMismatchError", "SyncTimeoutError", "SIGNATURE_FIELDS",
    },
    "normkit_keras": {
        "BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization",
        "Standardize", "MinMaxScale", "set_kernel_policy", "get_kernel_policy", "get_state", "set_state", "from_state",
        "norm_states", "copy_norm_states", "fold_batch_norm", "UnfoldedBatchNormWarning", "freeze", "recalibrate",
        "convert", "ConversionReport", "UnconvertedNormWarning", "accumulate_statistics",
    },
    "normkit_flax": {
        "BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "set_kernel_policy", "get_kernel_policy",
        "get_state", "set_state", "from_state", "norm_states", "copy_norm_states", "recalibrate", "freeze",
        "fold_batch_norm", "FrozenBatchNorm",
    },
}
# importing these needs keras / flax and jax: their names are checked through the package's lazy table
LAZY_TABLES = {"normkit_keras": ("_LAYERS", "_FUNCTIONS"), "normkit_flax": ("_NAMES",)}
TESTING = ["normkit.testing", "normkit.testing.backends", "normkit.testing.conformance", "normkit.testing.portability",
           "normkit.testing.reference", "normkit_torch.testing", "normkit_keras.testing", "normkit_flax.testing"]
TEST_CODE = re.compile(r"(^|\.)(testing|tests?|conftest)(\.|$)|(^|\.)(test_\w+|\w+_worker)$")

_PROBE = textwrap.dedent("""
    import importlib, inspect, json, sys

    public, lazy, testing = json.loads(sys.argv[1])
    found = {}
    for name in public:
        module = importlib.import_module(name)
        entry = found[name] = {"all": list(module.__all__), "names": {}}
        if name in lazy:
            for table in lazy[name]:
                entry["names"].update({n: {"module": m} for n, m in getattr(module, table).items()})
            continue
        for n in module.__all__:
            obj = getattr(module, n)
            definition = inspect.isfunction(obj) or inspect.isclass(obj)
            doc = (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__) if definition else "-"
            generated = inspect.isclass(obj) and (doc or "").startswith(obj.__name__ + "(")  # dataclass, NamedTuple
            entry["names"][n] = {"module": getattr(obj, "__module__", None) if definition else None, "id": id(obj),
                                 "doc": bool((doc or "").strip()) and not generated}
    ours = ("normkit", "normkit_torch", "normkit_keras", "normkit_flax")  # torch imports its own torch.testing
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ours and (m.endswith(".testing") or ".testing." in m))
    helpers = {}
    for name in testing:
        if name.startswith(("normkit_keras", "normkit_flax")):
            continue  # their runtime names are not resolved here (no keras, flax): compared by name below
        module = importlib.import_module(name)
        helpers[name] = {n: id(getattr(module, n)) for n in module.__all__}
    print(json.dumps({"found": found, "loaded": loaded, "helpers": helpers}))
""")


@pytest.fixture(scope="module")
def probe() -> dict:
    """What a fresh process sees: each namespace's ``__all__``, where every name comes from, what it loaded."""
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([sorted(PUBLIC), LAZY_TABLES, TESTING])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("namespace", sorted(PUBLIC))
def test_all_is_the_documented_public_api(probe, namespace):
    names = probe["found"][namespace]["all"]
    assert len(names) == len(set(names)), f"{namespace}.__all__ names a name twice: {sorted(names)}"
    assert set(names) == PUBLIC[namespace], (
        f"{namespace}.__all__ differs from the documented API: new {sorted(set(names) - PUBLIC[namespace])}, "
        f"missing {sorted(PUBLIC[namespace] - set(names))}")


@pytest.mark.parametrize("namespace", sorted(PUBLIC))
def test_no_public_name_is_a_test_helper(probe, namespace):
    names = probe["found"][namespace]["names"]
    assert set(names) == set(probe["found"][namespace]["all"]), "every name in __all__ resolves"
    from_tests = {n: v["module"] for n, v in names.items() if v["module"] and TEST_CODE.search(v["module"])}
    assert not from_tests, f"{namespace} exports test code (move it to the package's testing module): {from_tests}"
    helper_ids = {i: f"{t}.{n}" for t, helpers in probe["helpers"].items() for n, i in helpers.items()}
    reexported = {n: helper_ids[v["id"]] for n, v in names.items() if v.get("id") in helper_ids}
    assert not reexported, f"{namespace} re-exports test helpers: {reexported}"
    # by name too: Keras's and Flax's testing modules are not imported (the reference's names are the API's own)
    helper_names = {n for t in TESTING if t != "normkit.testing.reference" for n in _testing_all(t)}
    clash = sorted(set(names) & helper_names)
    assert not clash, f"{namespace} exports names of a testing module: {clash}"


@pytest.mark.parametrize("namespace", sorted(set(PUBLIC) - set(LAZY_TABLES)))
def test_every_public_function_and_class_has_a_docstring(probe, namespace):
    undocumented = sorted(n for n, v in probe["found"][namespace]["names"].items() if not v["doc"])
    assert not undocumented, f"{namespace}: public names without a docstring: {undocumented}"


def test_the_runtime_imports_no_testing_module(probe):
    """Importing every runtime namespace and resolving each of its names (normkit_torch's lazy ones included) loads
    no normkit ``testing`` module: the harnesses are imported only when the test matrix asks the plugins for them."""
    assert probe["loaded"] == [], f"the runtime namespaces import test helpers: {probe['loaded']}"


def _testing_all(name: str) -> list[str]:
    """A testing module's ``__all__``, read from its source (Keras's and Flax's are not imported here)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"{name} is missing"
    tree = ast.parse(open(spec.origin).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{name} has no literal __all__")
