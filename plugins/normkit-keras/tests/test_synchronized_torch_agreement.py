"""Keras BatchNormalization(synchronized=True) on the torch backend: ranks that call a layer differently.

Two gloo ranks (synchronized_torch_worker.py in its "agreement" mode, one launch): a layer built for 3
features on one rank and 4 on the other (gloo used to abort with an enforce failure and "connection
reset"), and an input that needs a gradient on one rank only (one rank would wait in the backward's
all_reduce until the process-group timeout): both ranks raise normkit_torch's SyncMismatchError naming
the field and each rank's value; the next call synchronizes normally.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from normkit.testing import reference

BACKEND = keras.backend.backend()
HERE = Path(__file__).parent
DEADLINE_S = 120.0  # about 10 s idle, 40 s on a loaded 2-core machine (two Keras imports)

pytestmark = [pytest.mark.skipif(BACKEND != "torch", reason="runs in the KERAS_BACKEND=torch run"),
              pytest.mark.xdist_group("processes")]  # starts processes: one such test at a time under xdist


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from normkit_torch.testing import run_gloo_workers

    return run_gloo_workers(HERE / "synchronized_torch_worker.py", tmp_path_factory.mktemp("agreement"),
                            deadline_s=DEADLINE_S, env={"KERAS_BACKEND": "torch", "NORMKIT_SYNC_WORKER": "agreement"},
                            cwd=HERE)


@pytest.mark.parametrize("key, needle", [("features", "features (rank 0: 3, rank 1: 4)"),
                                         ("grad", "backward follows (rank 0: True, rank 1: False)")])
def test_every_rank_raises_naming_the_difference(ranks, key, needle):
    for r, res in enumerate(ranks):
        got = res["agreement"][key]
        assert got["type"] == "SyncMismatchError" and needle in got["text"], (r, got)
        assert "agreement_" in got["text"], got["text"]  # the layer is named


def test_after_a_mismatch_the_ranks_synchronize_normally(ranks):
    """3 + 4 rows after the mismatch: the concatenated output is batch norm over the 7 rows (float64 NumPy)."""
    import synchronized_torch_worker as tw

    x = np.concatenate([tw.agreement_data(3), tw.agreement_data(4)])
    want, _, _ = reference.batch_norm(x, None, None, None, None, training=True, eps=1e-3, axis=-1)
    got = np.concatenate([res["agreement"]["after"].numpy() for res in ranks])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
