"""normkit's conformance CHECKS over every case of the Keras harness, on this process's Keras backend.

A case whose native twin is known wrong on this backend (``extra["native_known_wrong"]``: Keras's
torch backend computes a one-pass variance) is a strict xfail for the checks that compare with the
native layer; the same case is checked against the float64 reference in test_layers.py.
"""

from __future__ import annotations

import pytest

from normkit.testing.conformance import CHECKS

from conftest import HARNESS

def _params():
    for case in HARNESS.cases():
        for check in CHECKS:
            marks = []
            reason = case.extra.get("native_known_wrong")
            if reason and check in case.extra.get("native_wrong_checks", ()):
                marks.append(pytest.mark.xfail(reason=reason, strict=case.extra.get("native_wrong_strict", True)))
            yield pytest.param(check, case, id=f"{check}-{case.id}", marks=marks)


@pytest.mark.parametrize(("check", "case"), list(_params()))
def test_conformance(check, case):
    CHECKS[check](HARNESS, case)
