"""torch.compile(fullgraph=True), static and dynamic shapes: no graph break from the namespace lookup."""

import numpy as np
import pytest
import torch

import normkit as nk


@pytest.mark.parametrize("dynamic", [False, True])
def test_batch_norm_compiles_fullgraph(dynamic):
    torch._dynamo.reset()

    def step(x, rm, rv, w, b):
        return nk.batch_norm(x, rm, rv, w, b, training=True, axis=1)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="eager")
    for n in (4, 6):
        x = torch.randn(n, 3, 5, dtype=torch.float64)
        args = (x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
        got, want = compiled(*args), step(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        ref = torch.nn.functional.batch_norm(x, args[1].clone(), args[2].clone(), args[3], args[4], training=True)
        torch.testing.assert_close(got.output, ref, rtol=1e-10, atol=1e-10)


def test_standardize_and_layer_norm_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(5, 4, dtype=torch.float64)
    f = torch.compile(lambda x: (nk.standardize(x), nk.layer_norm(x), nk.rms_norm(x)), fullgraph=True, backend="eager")
    for got, want in zip(f(x), (nk.standardize(x), nk.layer_norm(x), nk.rms_norm(x))):
        torch.testing.assert_close(got, want)
    np.testing.assert_allclose(f(x)[0].numpy(), nk.standardize(x.numpy()), rtol=1e-12)
