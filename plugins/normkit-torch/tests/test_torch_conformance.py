"""The shared conformance suite over every case of normkit_torch's harness (CHECKS x cases)."""

from __future__ import annotations

import pytest
from normkit.testing.conformance import CHECKS

from normkit_torch.testing import TorchHarness

HARNESS = TorchHarness()
CASES = HARNESS.cases()


@pytest.mark.parametrize("check", list(CHECKS), ids=list(CHECKS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case, check):
    CHECKS[check](HARNESS, case)
