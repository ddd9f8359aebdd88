"""The matrix itself: a backend or framework that is named but missing fails the run loudly."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_unknown_backend_is_a_usage_error():
    run = _pytest("tests/test_moments.py", "--backends=mxnet")
    assert run.returncode != 0
    assert "--backends names unknown backends ['mxnet']" in run.stdout + run.stderr


def test_named_backend_that_cannot_load_fails_not_skips():
    run = _pytest("tests/test_moments.py::test_from_batches_on_backend", "--backends=cupy")
    if importlib.util.find_spec("cupy") is not None:  # a GPU machine: the backend simply runs
        assert run.returncode == 0, run.stdout
        return
    assert run.returncode == 1, run.stdout
    assert "backend 'cupy' was requested but cannot be loaded" in run.stdout
    assert "skipped" not in run.stdout.strip().splitlines()[-1]


def test_unknown_framework_is_a_usage_error():
    run = _pytest("tests/test_conformance.py", "--frameworks=mxnet")
    assert run.returncode != 0
    assert "--frameworks names ['mxnet']" in run.stdout + run.stderr
