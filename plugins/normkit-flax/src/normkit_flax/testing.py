"""normkit_flax's contribution to normkit's shared test matrix: ``FlaxHarness``, its layers against ``flax.nnx``'s.

Every array in or out is NumPy. The harness turns on ``jax_enable_x64`` (its float64 cases need it,
as the core's jax backends and Keras's JAX harness do). Flax keeps ``mean``/``var`` in float32
whatever the parameters' dtype; a float64 case's BatchNorms (ours and flax.nnx's alike) hold float64
statistics instead, as ``normkit_flax.from_state`` builds them, so the float64 cases are judged against
the float64 reference (float32 storage would put both one float32 ulp, 6e-8, from it, and a float64
sum may round either way). The reference's moving statistics ``momentum * old + (1 - momentum) * batch``
are evaluated in float64 and stored in the layer's statistics dtype.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import numpy as np

__all__ = ["FlaxHarness", "randomize"]

_NAMES = {"scale", "bias", "mean", "var"}


def _variables(layer: Any) -> dict[str, Any]:
    """``{name: nnx.Variable}`` of a normalization layer, in Flax's attribute order (mean, var, scale, bias)."""
    from flax import nnx

    return {name: v for name, v in vars(layer).items() if isinstance(v, nnx.Variable) and name in _NAMES}


def randomize(layer: Any, seed: int, data_offset: float = 0.0) -> None:
    """Non-trivial values: scale in [0.5, 2], bias ~ N(0, 1), mean near the conformance data's, var in [2, 6]."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    for name, v in _variables(layer).items():
        shape = tuple(v.shape)
        value = {"scale": lambda: rng.uniform(0.5, 2.0, shape), "bias": lambda: rng.standard_normal(shape),
                 "mean": lambda: data_offset + 0.5 + 0.5 * rng.standard_normal(shape),
                 "var": lambda: rng.uniform(2.0, 6.0, shape)}[name]()
        v[...] = jnp.asarray(value.astype(np.dtype(v.dtype)))


def _bn_reference(eps: float, momentum: float, stats_dtype: str = "float32") -> Callable:
    from normkit.testing import reference

    def ref(x: np.ndarray, state: dict, training: bool) -> tuple[np.ndarray, dict]:
        y, mean, var = reference.batch_norm(x, state["mean"], state["var"], state.get("scale"), state.get("bias"),
                                            training=training, momentum=1.0, eps=eps, axis=-1, correction=0)
        if not training:
            return y, {}
        def ema(old: np.ndarray, batch: np.ndarray) -> np.ndarray:  # computed in float64, stored in the stats dtype
            return (old * momentum + batch * (1 - momentum)).astype(stats_dtype).astype(np.float64)

        return y, {"mean": ema(state["mean"], mean), "var": ema(state["var"], var)}

    return ref


def _family_reference(kind: str, eps: float, groups: int = 0) -> tuple[Callable, Callable]:
    """(forward reference, gradient reference) of a per-sample layer whose features are the last axis."""
    from normkit.testing import reference

    def forward(x: np.ndarray, state: dict, training: bool) -> tuple[np.ndarray, dict]:
        w, b = state.get("scale"), state.get("bias")
        if kind == "layer":
            return reference.layer_norm(x, w, b, axis=-1, eps=eps), {}
        if kind == "rms":
            return reference.rms_norm(x, w, axis=-1, eps=eps), {}
        g = groups if kind == "group" else x.shape[-1]
        return reference.group_norm(x, g, w, b, axis=-1, eps=eps), {}

    def grads(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        w = state.get("scale")
        if kind == "layer":
            out = reference.layer_norm_grad(x, upstream, w, axis=-1, eps=eps)
        elif kind == "rms":
            out = reference.rms_norm_grad(x, upstream, w, axis=-1, eps=eps)
        else:
            g = groups if kind == "group" else x.shape[-1]
            out = reference.group_norm_grad(x, upstream, g, w, axis=-1, eps=eps)
        names = [n for n in ("scale", "bias") if n in state]
        return out[0], {n: out[1 + i] for i, n in enumerate(("scale", "bias")) if n in names}

    return forward, grads


def _bn_grads(eps: float) -> Callable:
    from normkit.testing import reference

    def grads(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        dx, dw, db = reference.batch_norm_grad(x, upstream, state.get("scale"), axis=-1, eps=eps)
        return dx, {**({"scale": dw} if "scale" in state else {}), **({"bias": db} if "bias" in state else {})}

    return grads


_FAST = ("flax.nnx's use_fast_variance=True computes E[x^2] - E[x]^2 in float32: at mean 1e4 the variance is "
         "off by orders of magnitude (normkit's statistics stay exact)")


class FlaxHarness:
    """normkit_flax's layers against ``flax.nnx``'s (``use_fast_variance`` False and True; policies auto and core)."""

    name = "flax"

    def __init__(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)

    def _pair(self, cls_name: str, features: int, dtype: str, data_offset: float, **kwargs: Any) -> tuple:
        from flax import nnx

        import normkit_flax

        seed = zlib.crc32(f"{cls_name}{features}{dtype}{sorted(kwargs.items())}".encode())

        def make(module: Any) -> Callable[[], Any]:
            def build() -> Any:
                layer = getattr(module, cls_name)(features, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
                if isinstance(layer, nnx.BatchNorm) and dtype == "float64":  # float64 statistics (module docstring)
                    for v in (layer.mean, layer.var):
                        v.set_value(v[...].astype(dtype))
                randomize(layer, seed, data_offset)
                return layer

            return build

        return make(normkit_flax), make(nnx)

    def cases(self) -> list[Any]:
        from normkit.testing import LayerCase

        cases: list[Any] = []

        def add(id: str, cls_name: str, shape: tuple, ref: Callable, grads: Callable, dtype: str, fast: bool,
                data_offset: float = 0.0, **kwargs: Any) -> None:
            ours, native = self._pair(cls_name, shape[-1], dtype, data_offset, use_fast_variance=fast, **kwargs)
            extra: dict[str, Any] = {}
            if fast and data_offset:
                extra = {"native_known_wrong": _FAST, "native_wrong_checks": ("train_steps", "eval", "gradients")}
            cases.append(LayerCase(
                id=f"{cls_name}-{id}-{dtype}-{'fast' if fast else 'exact'}", make_normkit=ours, make_native=native,
                input_shape=shape, reference=ref, dtype=dtype, data_offset=data_offset, extra=extra,
                reference_gradients=grads,
            ))

        for dtype in ("float64", "float32"):
            for fast in (False, True):
                add("dense", "BatchNorm", (8, 5), _bn_reference(1e-5, 0.99, dtype), _bn_grads(1e-5), dtype, fast)
                add("last", "LayerNorm", (4, 6, 5), *_family_reference("layer", 1e-6), dtype, fast)
            add("image", "BatchNorm", (2, 5, 6, 3), _bn_reference(1e-5, 0.99, dtype), _bn_grads(1e-5), dtype, False)
            add("rms", "RMSNorm", (4, 6, 5), *_family_reference("rms", 1e-6), dtype, False)
            add("groups2", "GroupNorm", (2, 5, 6, 4), *_family_reference("group", 1e-6, 2), dtype, False, num_groups=2)
            add("image", "InstanceNorm", (2, 5, 6, 3), *_family_reference("instance", 1e-6), dtype, False)
        for fast in (False, True):
            add("offset1e4", "BatchNorm", (16, 5), _bn_reference(1e-5, 0.99), _bn_grads(1e-5), "float32", fast,
                data_offset=1e4)
            add("offset1e4", "LayerNorm", (4, 6, 16), *_family_reference("layer", 1e-6), "float32", fast,
                data_offset=1e4)
        return [c for c in cases if not (c.extra and "fast" in c.id)] + [
            _core_only(c) for c in cases if c.extra and "fast" in c.id]

    # the protocol -----------------------------------------------------------------------------
    def copy_state(self, src: Any, dst: Any) -> None:
        import jax.numpy as jnp

        theirs = _variables(src)
        for name, v in _variables(dst).items():
            v[...] = jnp.asarray(theirs[name][...])

    def forward(self, layer: Any, x: np.ndarray, training: bool) -> np.ndarray:
        import jax.numpy as jnp
        from flax import nnx

        if isinstance(layer, nnx.BatchNorm):
            return np.asarray(layer(jnp.asarray(x), use_running_average=not training))
        return np.asarray(layer(jnp.asarray(x)))

    def gradients(self, layer: Any, x: np.ndarray, upstream: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        import jax.numpy as jnp
        from flax import nnx

        up = jnp.asarray(upstream)
        train = {"use_running_average": False} if isinstance(layer, nnx.BatchNorm) else {}

        def loss(model: Any, xj: Any) -> Any:
            return jnp.sum(model(xj, **train) * up)

        grads, dx = nnx.grad(loss, argnums=(0, 1))(layer, jnp.asarray(x))
        flat = {name: np.asarray(getattr(grads, name)[...]) for name in ("scale", "bias")
                if name in _variables(layer) and isinstance(_variables(layer)[name], nnx.Param)}
        return np.asarray(dx), flat

    def state(self, layer: Any) -> dict[str, np.ndarray]:
        found = _variables(layer)
        return {name: np.asarray(found[name][...]) for name in ("mean", "var", "scale", "bias") if name in found}

    def roundtrip(self, layer: Any) -> Any:
        """``nnx.split`` to a pure state of NumPy arrays (what a checkpoint holds) and ``nnx.merge`` back."""
        import jax
        from flax import nnx

        graphdef, state = nnx.split(layer)
        saved = jax.tree.map(lambda a: np.array(a, copy=True), nnx.to_pure_dict(state))
        fresh = nnx.merge(graphdef, state)
        restored = nnx.state(fresh)
        nnx.replace_by_pure_dict(restored, saved)
        nnx.update(fresh, restored)
        return fresh


def _core_only(case: Any) -> Any:
    """A fast-variance case at mean 1e4: under policy auto normkit IS Flax (wrong there), so only policy core runs."""
    case.policies = ("core",)
    return case
