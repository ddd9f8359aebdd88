"""Portability across every pair of installed frameworks (torch and Keras in CI): round trips and inference.

The frameworks are the conformance harnesses selected by ``--frameworks`` (default: all). Portability
needs two of them: fewer is a failure, not a skip. Keras runs on the process's backend
(``make test``: TensorFlow, the default).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from normkit.testing.portability import CASES, CHECKS, Framework, check_inference
from normkit.testing.pytest_plugin import selected_harnesses


def _frameworks(config: pytest.Config) -> list[Framework]:
    return [Framework.from_harness(h) for h in selected_harnesses(config)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pair" in metafunc.fixturenames:
        frameworks = _frameworks(metafunc.config)
        pairs = list(itertools.permutations(frameworks, 2))
        metafunc.parametrize("pair", pairs, ids=[f"{a.name}->{b.name}" for a, b in pairs])
        metafunc.parametrize("case", CASES, ids=[c.id for c in CASES])


def test_two_frameworks_are_installed(request):
    names = [f.name for f in _frameworks(request.config)]
    if request.config.getoption("--frameworks") == "all":
        missing = sorted({"torch", "keras"} - set(names))
        assert not missing, f"portability needs torch and keras; no installed plugin provides {missing}"
    assert len(names) >= 2, f"portability needs two frameworks, --frameworks selects {names}"


@pytest.mark.parametrize("check", list(CHECKS))
def test_portability(pair, case, check):
    CHECKS[check](*pair, case)


class _DroppedEps:
    """A framework whose from_state forgets the state's eps (uses its own default): the classic porting bug."""

    def __init__(self, fw: Framework, default: float) -> None:
        self.fw, self.default = fw, default

    def from_state(self, state, **kwargs):
        return self.fw.module.from_state(state.replace(eps=self.default), **kwargs)

    def __getattr__(self, name):
        return getattr(self.fw.module, name)


def test_inference_check_catches_a_dropped_eps(request):
    """The tolerance is tight enough to see eps replaced by a framework's default (1e-5 -> Keras's 1e-3)."""
    frameworks = {f.name: f for f in _frameworks(request.config)}
    if not {"torch", "keras"} <= set(frameworks):
        pytest.fail("needs torch and keras")
    torch_fw, keras_fw = frameworks["torch"], frameworks["keras"]
    broken = Framework("keras-default-eps", _DroppedEps(keras_fw, 1e-3), keras_fw.forward)
    case = next(c for c in CASES if c.id == "batch2d-channels_last")
    with pytest.raises(AssertionError, match="output vs float64 reference"):
        check_inference(torch_fw, broken, case)


def test_cases_cover_every_kind_and_layout():
    kinds = {c.state.kind for c in CASES}
    assert kinds == {"batch", "layer", "group", "instance", "rms"}
    for kind in ("batch", "group", "instance"):
        assert {c.layout for c in CASES if c.state.kind == kind} >= {"channels_first", "channels_last"}
    assert {c.state.dtype for c in CASES} == {"float32", "float64"}
    assert all(np.all(c.state.weight != 1) for c in CASES if c.state.weight is not None)
