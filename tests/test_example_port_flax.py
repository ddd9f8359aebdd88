"""examples/port_torch_to_flax.py runs in a fresh process and its claim holds: the Flax NNX port of a trained
torch CNN computes torch's logits to float32 round-off, with torch's momentum translated to Flax's, and
Flax -> torch gives the batch norm states back bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "port_torch_to_flax.py"
pytestmark = pytest.mark.slow  # an end-to-end run: a few seconds


def test_port_torch_to_flax():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["copied"] == [["1", "layers.1"], ["4", "layers.4"]]
    assert r["max_abs_diff"] < 1e-5 and r["argmax_agreement"] == 1.0
    assert r["torch_momentum"] == [0.1, 0.1] and r["flax_momentum"] == [0.9, 0.9]  # exact in decimal
    assert r["round_trip_exact"]
