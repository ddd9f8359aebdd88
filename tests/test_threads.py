"""First use from many threads: calls never see a library that another thread is still importing.

Each round is a fresh interpreter (imports happen once per process) in which 8 threads start
together: three import torch, TensorFlow or jax and call normkit on their arrays at once, the
other five call normkit on numpy, dask and array-api-strict arrays in a loop until the importers
are done. Before the fix, a numpy call made while torch was half imported failed with
``AttributeError: partially initialized module 'torch' has no attribute 'Tensor'`` (20 of 20
processes, so one round finds it). The round is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROUND_SCRIPT = textwrap.dedent(
    """
    import json, threading, time, traceback
    import numpy as np
    import normkit as nk

    errors = []
    importers_done = threading.Event()
    start = threading.Barrier(8)

    def record(fn):
        def run():
            start.wait()
            try:
                fn()
            except BaseException:  # noqa: BLE001 - every failure is the finding
                errors.append(traceback.format_exc(limit=3))
        return run

    def use_torch():
        import torch
        y = nk.batch_norm(torch.ones(4, 3) + torch.arange(3.0), training=True).output
        assert torch.isfinite(y).all()

    def use_tensorflow():
        import tensorflow as tf
        assert np.isfinite(nk.standardize(tf.constant([[1.0, 2.0], [3.0, 5.0]])).numpy()).all()

    def use_jax():
        import jax.numpy as jnp
        assert np.isfinite(np.asarray(nk.layer_norm(jnp.ones((2, 3)) * jnp.arange(3.0)))).all()

    def loop(make):
        def run():
            x = make()
            while not importers_done.is_set():
                nk.batch_norm(x, training=True)
                nk.standardize(x)
                time.sleep(0.01)
        return run

    def dask_array():
        import dask.array as da
        return da.from_array(np.arange(12.0).reshape(4, 3), chunks=2)

    def strict_array():
        import array_api_strict as xs
        return xs.reshape(xs.arange(12.0), (4, 3))

    importers = [threading.Thread(target=record(f)) for f in (use_torch, use_tensorflow, use_jax)]
    makers = (lambda: np.arange(12.0).reshape(4, 3), lambda: np.ones((5, 2), np.float32), dask_array,
              strict_array, lambda: np.arange(12.0).reshape(3, 4))
    loopers = [threading.Thread(target=record(loop(m))) for m in makers]
    for t in importers + loopers:
        t.start()
    for t in importers:
        t.join()
    importers_done.set()
    for t in loopers:
        t.join()
    print(json.dumps(errors))
    """
)


def _start_round() -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-c", ROUND_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(proc: subprocess.Popen) -> list[str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a first-use round did not finish in 120 s (deadlock?)")
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_first_use_from_eight_threads_in_a_fresh_process():
    failures = _finish(_start_round())
    assert not failures, f"{len(failures)} thread(s) failed; the first:\n{failures[0]}"
