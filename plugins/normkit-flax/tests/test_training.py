"""A real Flax NNX training script with normkit_flax.BatchNorm in place of nnx.BatchNorm and nothing else changed:
nnx.Optimizer(wrt=nnx.Param), an nnx.jit train step, an Orbax checkpoint saved and restored, jax.checkpoint and
nnx.scan. The loss trajectory is nnx.BatchNorm's (use_fast_variance=True): bitwise under kernel policy "auto"
(Flax's own code), within float32 round-off under "core" (normkit's exact two-pass statistics)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import normkit_flax
from normkit.plugin.kernels import use_policy


class Net(nnx.Module):
    def __init__(self, bn, rngs):
        self.lin1 = nnx.Linear(6, 16, rngs=rngs)
        self.bn = bn(16, rngs=rngs)
        self.lin2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin2(nnx.relu(self.bn(self.lin1(x))))


def _data(steps=8):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((steps, 32, 6)) * 2 + 1, jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, (steps, 32)))
    return xs, ys


def _train(bn, tmp_path, policy):
    """The script: train, checkpoint with Orbax, restore into a fresh abstract model, train on; the losses."""
    with use_policy(policy):
        model = Net(bn, nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            def loss_fn(model):
                return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        xs, ys = _data()
        losses = [float(train_step(model, optimizer, xs[i], ys[i])) for i in range(4)]
        checkpointer = ocp.StandardCheckpointer()
        path = tmp_path / f"{bn.__module__}-{policy}"
        checkpointer.save(path, nnx.state(model))
        checkpointer.wait_until_finished()
        abstract = nnx.eval_shape(lambda: Net(bn, nnx.Rngs(1)))
        graphdef, abstract_state = nnx.split(abstract)
        restored = nnx.merge(graphdef, checkpointer.restore(path, abstract_state))
        assert type(restored.bn) is bn
        for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        optimizer = nnx.Optimizer(restored, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
        losses += [float(train_step(restored, optimizer, xs[i], ys[i])) for i in range(4, 8)]
        restored.eval()
        logits = np.asarray(restored(xs[0]))
    return np.asarray(losses), logits, np.asarray(restored.bn.var[...])


@pytest.mark.parametrize("policy", ["auto", "core"])
def test_drop_in_gives_flax_loss_trajectory(tmp_path, policy):
    ours, logits, var = _train(normkit_flax.BatchNorm, tmp_path, policy)
    theirs, native_logits, native_var = _train(nnx.BatchNorm, tmp_path, "auto")
    assert ours[-1] < ours[0]  # it trains
    if policy == "auto":  # Flax's own code: the same numbers
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(logits, native_logits)
    else:  # exact statistics vs Flax's E[x^2] - E[x]^2: float32 round-off over 8 steps
        np.testing.assert_allclose(ours, theirs, rtol=2e-5)
        np.testing.assert_allclose(logits, native_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(var, native_var, rtol=1e-4)
        assert not np.array_equal(var, native_var)  # normkit's own statistics ran, not Flax's



@pytest.mark.parametrize("policy", ["auto", "core"])
def test_jax_checkpoint_and_nnx_scan_match_flax(policy):
    xs, _ = _data(4)
    results = {}
    with use_policy(policy):
        for name, bn in (("ours", normkit_flax.BatchNorm), ("flax", nnx.BatchNorm)):
            model = Net(bn, nnx.Rngs(0))
            graphdef, state = nnx.split(model)

            def loss(state, x):
                m = nnx.merge(graphdef, state)
                return jnp.sum(m(x) ** 2), nnx.state(m)

            plain = jax.grad(loss, has_aux=True)(state, xs[0])
            remat = jax.grad(jax.checkpoint(loss), has_aux=True)(state, xs[0])
            for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def run(model, x):
                return model, model(x)

            scanned = Net(bn, nnx.Rngs(0))
            _, ys = run(scanned, xs)
            looped = Net(bn, nnx.Rngs(0))
            want = jnp.stack([looped(x) for x in xs])
            np.testing.assert_allclose(np.asarray(ys), np.asarray(want), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(scanned.bn.mean[...]), np.asarray(looped.bn.mean[...]), rtol=1e-6,
                                       atol=1e-7)
            results[name] = (plain, ys, np.asarray(scanned.bn.var[...]))
    (g1, y1, v1), (g2, y2, v2) = results["ours"], results["flax"]
    tol = dict(rtol=0, atol=0) if policy == "auto" else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), **tol)
    np.testing.assert_allclose(v1, v2, **tol)
