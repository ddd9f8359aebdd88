"""Every adapter layer against its native twin and the float64 reference, through one suite."""

import pytest

from normkit.testing.conformance import CHECKS


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(harness_case, check):
    harness, case = harness_case
    CHECKS[check](harness, case)
