"""`make test` runs pytest-xdist with ``--dist loadgroup``; the tests that start processes (gloo ranks, a dask
cluster, Keras replicas) rely on ``xdist_group("processes")`` to run one at a time on one worker. pytest 9.2 with
pytest-xdist 3.8 silently ignores the group (the nodeid suffix xdist sets is no longer read), so the pinned pair
must honour it: a grouped module run under ``-n 2 --dist loadgroup`` lands on one worker."""

import os
import re
import subprocess
import sys

import pytest

GROUPED = r'''
import os, pytest
pytestmark = pytest.mark.xdist_group("processes")

@pytest.mark.parametrize("i", range(6))
def test_worker(i):
    with open("workers.txt", "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\n")
'''


@pytest.mark.xdist_group("processes")
def test_loadgroup_puts_a_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-q",
         "test_grouped.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    ran_on = (tmp_path / "workers.txt").read_text().split()
    assert len(ran_on) == 6 and all(re.fullmatch(r"gw\d+", w) for w in ran_on), ran_on
    workers = set(ran_on)
    assert len(workers) == 1, f"one xdist_group ran on {sorted(workers)}: --dist loadgroup is not honoured"
