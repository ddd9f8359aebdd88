"""Every adapter layer against its native twin and the float64 reference, through one suite, under each kernel policy."""

import pytest

from normkit.plugin.kernels import use_policy
from normkit.testing.conformance import CHECKS


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(harness_case, check):
    harness, case, policy = harness_case
    with use_policy(policy):
        CHECKS[check](harness, case, policy)
