"""The entry point: found by normkit's plugin host, thin (no torch import), serving framework and harness."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import normkit_torch
from normkit.plugin.manager import framework, frameworks, plugin_manager


def test_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="normkit")}
    assert eps.get("torch") == "normkit_torch._plugin"
    assert plugin_manager().get_plugin("torch") is not None


def test_framework_and_harness_hooks():
    assert frameworks()["torch"] == "normkit_torch"
    assert framework("torch") is normkit_torch
    harnesses = [h for answer in plugin_manager().hook.normkit_test_harnesses() for h in answer]
    torch_harnesses = [h for h in harnesses if h.name == "torch"]
    assert len(torch_harnesses) == 1 and len(torch_harnesses[0].cases()) > 20


def test_loading_the_entry_point_does_not_import_torch():
    code = (
        "import sys, normkit_torch._plugin as p, normkit_torch;"
        "assert p.normkit_frameworks() == {'torch': 'normkit_torch'};"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "normkit_torch.BatchNorm2d;"
        "assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_names():
    for name in normkit_torch.__all__:
        assert getattr(normkit_torch, name) is not None
