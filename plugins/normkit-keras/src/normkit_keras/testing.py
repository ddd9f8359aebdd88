"""normkit_keras's contributions to normkit's shared test matrix.

- ``tensorflow_backends()``: the array-matrix backends "tensorflow" (eager) and "tensorflow-function"
  (each call traced by ``tf.function`` with an unknown batch dimension);
- ``KerasHarness``: the conformance harness of the Keras layers against ``keras.layers``, on the
  Keras backend of this process (``KERAS_BACKEND``). Every array in or out is NumPy.

On the JAX backend the harness turns on ``jax_enable_x64`` (its float64 cases need it, as the
core's jax backends do).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from typing import Any, Callable

import numpy as np

__all__ = ["tensorflow_backends", "KerasHarness", "gradients", "weight_name", "randomize_weights"]


# --------------------------------------------------------------------------- array matrix backends


def _tf_to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.numpy())


def _tensorflow() -> Any:
    import tensorflow as tf

    from normkit.testing.backends import Backend
    from normkit_keras._namespaces import tensorflow_namespace

    return Backend(
        "tensorflow", tensorflow_namespace(), lambda a: tf.constant(a), _tf_to_numpy,
        half_dtypes=("float16", "bfloat16"),
    )


def _function_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Trace ``fn`` with ``tf.function``: tensor arguments get a signature whose first dimension is unknown."""
    import tensorflow as tf

    def spec(a: Any) -> Any:
        shape = list(a.shape)
        if shape:
            shape[0] = None
        return tf.TensorSpec(shape=shape, dtype=a.dtype)

    tensor_args = [i for i, a in enumerate(args) if isinstance(a, tf.Tensor)]
    tensor_kwargs = [k for k, v in kwargs.items() if isinstance(v, tf.Tensor)]
    signature = [spec(args[i]) for i in tensor_args] + [spec(kwargs[k]) for k in tensor_kwargs]

    @tf.function(input_signature=signature)
    def traced(*tensors: Any) -> Any:
        full_args = list(args)
        for i, t in zip(tensor_args, tensors):
            full_args[i] = t
        full_kwargs = dict(kwargs)
        for k, t in zip(tensor_kwargs, tensors[len(tensor_args):]):
            full_kwargs[k] = t
        return fn(*full_args, **full_kwargs)

    return traced(*([args[i] for i in tensor_args] + [kwargs[k] for k in tensor_kwargs]))


def _tensorflow_function() -> Any:
    b = _tensorflow()
    b.name, b.call = "tensorflow-function", _function_call
    b.notes = "tf.function with input_signature TensorSpec([None, *rest]) for every tensor argument"
    return b


def tensorflow_backends() -> list[Any]:
    """``BackendSpec``s (built on first use, so listing the matrix does not import TensorFlow)."""
    from normkit.testing.backends import BackendSpec

    return [
        BackendSpec("tensorflow", _tensorflow),
        BackendSpec("tensorflow-function", _tensorflow_function),
    ]


# --------------------------------------------------------------------------- Keras harness helpers


def weight_name(variable: Any) -> str:
    """A Keras weight's own name: the last component of ``.path`` (``"batch_normalization/gamma"`` -> ``gamma``)."""
    path = getattr(variable, "path", None) or variable.name
    return path.split("/")[-1]


def randomize_weights(layer: Any, seed: int, data_offset: float = 0.0) -> None:
    """Give ``layer`` random, non-trivial weights (the same for the same seed and weight names).

    gamma / scale in [0.5, 2], beta ~ N(0, 1); moving statistics near those of the conformance
    input (mean ``data_offset + 0.5``, variance 4), so inference at a large offset is centred on
    statistics at that offset.
    """
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        name, shape = weight_name(v), tuple(v.shape)
        if name in ("gamma", "scale"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "beta":
            value = rng.standard_normal(shape)
        elif name == "moving_mean":
            value = data_offset + 0.5 + 0.5 * rng.standard_normal(shape)
        elif name == "moving_variance":
            value = rng.uniform(2.0, 6.0, shape)
        else:
            continue
        v.assign(value.astype(np.dtype(v.dtype)))


def _to_numpy(a: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(a))


def _tensor(x: np.ndarray) -> Any:
    import keras

    return keras.ops.convert_to_tensor(x, dtype=str(x.dtype))


def gradients(layer: Any, x: np.ndarray, upstream: np.ndarray, **call_kwargs: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gradients of ``sum(layer(x, training=True) * upstream)`` w.r.t. ``x`` and each trainable weight, by the
    backend's own autodiff (tf.GradientTape, jax.grad over ``stateless_call``, torch autograd)."""
    import keras

    backend = keras.backend.backend()
    names = [weight_name(v) for v in layer.trainable_weights]
    if backend == "tensorflow":
        import tensorflow as tf

        xt, up = tf.constant(x), tf.constant(upstream)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt, training=True, **call_kwargs) * up)
        grads = tape.gradient(loss, [xt] + [v.value for v in layer.trainable_weights])
        return _to_numpy(grads[0]), {n: _to_numpy(g) for n, g in zip(names, grads[1:])}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_weights]
        non_trainable = [v.value for v in layer.non_trainable_weights]
        up = jnp.asarray(upstream)

        import inspect

        if "training" in inspect.signature(layer.call).parameters:
            call_kwargs = {**call_kwargs, "training": True}

        def loss(trainable: list, xj: Any) -> Any:
            y, _ = layer.stateless_call(trainable, non_trainable, xj, **call_kwargs)
            return jnp.sum(y * up)

        dw, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, jnp.asarray(x))
        return np.asarray(dx), {n: np.asarray(g) for n, g in zip(names, dw)}
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        params = [v.value for v in layer.trainable_weights]
        for p in params:
            p.grad = None
        loss = torch.sum(layer(xt, training=True, **call_kwargs) * torch.tensor(upstream))
        grads = torch.autograd.grad(loss, [xt] + params)
        return grads[0].numpy(), {n: g.detach().numpy() for n, g in zip(names, grads[1:])}
    raise NotImplementedError(f"no gradient helper for the Keras backend {backend!r}")


# --------------------------------------------------------------------------- cases


def _bn_reference(axis: int, eps: float, momentum: float, center: bool, scale: bool, dtype: str):
    """Float64 batch norm. The moving statistics follow Keras's definition in the variables' ``dtype``:
    ``moving * momentum + batch * (1 - momentum)`` evaluated and stored in float32 for a float32 layer (at
    mean 1e4 one float32 rounding of the moving mean is up to 4.9e-4, more than the output tolerance)."""
    from normkit.testing import reference

    def ref(x: np.ndarray, state: dict, training: bool) -> tuple[np.ndarray, dict]:
        y, mean, var = reference.batch_norm(
            x, state["moving_mean"], state["moving_variance"], state.get("gamma") if scale else None,
            state.get("beta") if center else None, training=training, momentum=1.0, eps=eps, axis=axis,
            correction=0,
        )
        if not training:
            return y, {}
        m = np.asarray(momentum, dtype)

        def ema(old: np.ndarray, batch: np.ndarray) -> np.ndarray:
            return (old.astype(dtype) * m + batch.astype(dtype) * (np.asarray(1, dtype) - m)).astype(np.float64)

        return y, {"moving_mean": ema(state["moving_mean"], mean), "moving_variance": ema(state["moving_variance"], var)}

    return ref


def _bn_reference_gradients(axis: int, eps: float, center: bool, scale: bool):
    """Float64 training-mode gradients under Keras's weight names (gamma, beta)."""
    from normkit.testing import reference

    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        dx, dgamma, dbeta = reference.batch_norm_grad(x, upstream, state.get("gamma") if scale else None, axis=axis, eps=eps)
        return dx, {**({"gamma": dgamma} if scale else {}), **({"beta": dbeta} if center else {})}

    return ref


def _affine_reference_gradients(fn: Callable[..., tuple], *, weight: str | None = "gamma", bias: str | None = "beta", **kw):
    """Float64 gradients (dx, {weight: dw, bias: db}) for the weights the layer has, by Keras's names."""

    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        out = fn(x, upstream, state.get(weight) if weight else None, **kw)
        grads = {}
        if weight and weight in state:
            grads[weight] = out[1]
        if bias and bias in state:
            grads[bias] = out[2]
        return out[0], grads

    return ref


def _group_norm_grad(groups: int) -> Callable[..., tuple]:
    from normkit.testing import reference

    def fn(x: np.ndarray, upstream: np.ndarray, w: Any, **kw: Any) -> tuple:
        return reference.group_norm_grad(x, upstream, groups, w, **kw)

    return fn


def _affine_reference(fn: Callable[..., np.ndarray], *, weight: str | None = "gamma", bias: str | None = "beta", **kw):
    def ref(x: np.ndarray, state: dict, training: bool) -> tuple[np.ndarray, dict]:
        w = state.get(weight) if weight else None
        b = state.get(bias) if bias else None
        return (fn(x, w, b, **kw) if bias is not None else fn(x, w, **kw)), {}

    return ref


_ONE_PASS = (
    "keras.ops.moments on the torch backend is the one-pass E[x^2] - E[x]^2 in float32: NaN or wrong "
    "statistics at mean 1e4 in BatchNormalization and GroupNormalization (normkit's two-pass stays exact)"
)
_TORCH_LN_AXES = (
    "keras.layers.LayerNormalization(axis=[1, 2]) on the torch backend calls F.layer_norm with "
    "normalized_shape (5, 6) on input (2, 5, 6, 3) and raises: F.layer_norm only normalizes trailing axes"
)
_DOWNCAST = (
    "Keras on the jax and torch backends computes float64 normalization layers in float32 "
    "(keras.src.backend.result_type('float64', 'float32') == 'float32'); normkit keeps float64"
)


class KerasHarness:
    """normkit_keras's layers against ``keras.layers`` on this process's Keras backend."""

    name = "keras"

    def __init__(self) -> None:
        import keras

        self.backend = keras.backend.backend()
        if self.backend == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)

    # the layers --------------------------------------------------------------------------------
    def _pair(self, cls_name: str, input_shape: tuple, dtype: str, data_offset: float = 0.0,
              **kwargs: Any) -> tuple[Callable, Callable]:
        """Builders of the normkit layer and its Keras twin, with the same random non-trivial weights."""
        import keras

        import normkit_keras

        seed = zlib.crc32(f"{cls_name}{input_shape}{dtype}{sorted(kwargs.items())}".encode())

        def make(module: Any) -> Callable[[], Any]:
            def build() -> Any:
                layer = getattr(module, cls_name)(dtype=dtype, **kwargs)
                layer.build((None,) + tuple(input_shape[1:]))
                randomize_weights(layer, seed, data_offset)
                return layer

            return build

        return make(normkit_keras), make(keras.layers)

    def cases(self) -> list[Any]:
        from normkit.testing import LayerCase, reference

        cases: list[LayerCase] = []
        downcasts = self.backend in ("jax", "torch")

        def native_wrong(cls_name: str, dtype: str, data_offset: float, axis: Any = -1) -> dict[str, Any]:
            """Where keras.layers itself is off on this backend: the reason and the checks that compare with it."""
            if self.backend == "torch" and cls_name == "LayerNormalization" and axis == [1, 2]:
                return {"native_known_wrong": _TORCH_LN_AXES, "native_wrong_checks": ("train_steps", "eval", "gradients"),
                        "native_error": r"normalized_shape"}
            if data_offset and self.backend == "torch" and cls_name in ("BatchNormalization", "GroupNormalization"):
                return {"native_known_wrong": _ONE_PASS, "native_wrong_checks": ("train_steps", "eval", "gradients")}
            if downcasts and dtype == "float64":
                return {"native_known_wrong": _DOWNCAST, "native_wrong_checks": ("train_steps", "eval", "gradients")}
            return {}

        def bn(id: str, shape: tuple, dtype: str = "float64", axis: int = -1, center: bool = True,
               scale: bool = True, momentum: float = 0.99, data_offset: float = 0.0) -> None:
            ours, native = self._pair(
                "BatchNormalization", shape, dtype, data_offset, axis=axis, center=center, scale=scale,
                momentum=momentum,
            )
            cases.append(LayerCase(
                id=f"BatchNormalization-{id}-{dtype}", make_normkit=ours, make_native=native, input_shape=shape,
                reference=_bn_reference(axis, 1e-3, momentum, center, scale, dtype), dtype=dtype,
                data_offset=data_offset, extra=native_wrong("BatchNormalization", dtype, data_offset),
                reference_gradients=_bn_reference_gradients(axis, 1e-3, center, scale),
            ))

        for dtype in ("float64", "float32"):
            bn("dense", (8, 5), dtype)
            bn("sequence", (4, 6, 5), dtype)
            bn("image", (2, 5, 6, 3), dtype)
            bn("axis1", (4, 3, 5), dtype, axis=1)
        bn("dense-momentum0.9", (8, 5), momentum=0.9)
        bn("no-center", (8, 5), center=False)
        bn("no-scale", (8, 5), scale=False)
        bn("no-affine", (4, 6, 5), center=False, scale=False)
        bn("dense-offset1e4", (16, 5), "float32", data_offset=1e4)

        def family(id: str, cls_name: str, shape: tuple, ref: Callable, grads: Callable, dtype: str = "float64",
                   data_offset: float = 0.0, **kwargs: Any) -> None:
            ours, native = self._pair(cls_name, shape, dtype, data_offset, **kwargs)
            cases.append(LayerCase(
                id=f"{cls_name}-{id}-{dtype}", make_normkit=ours, make_native=native, input_shape=shape,
                reference=ref, dtype=dtype, reference_gradients=grads, data_offset=data_offset,
                extra=native_wrong(cls_name, dtype, data_offset, kwargs.get("axis", -1)),
            ))

        def ln(axis: Any) -> tuple[Callable, Callable]:
            return (_affine_reference(reference.layer_norm, axis=axis, eps=1e-3),
                    _affine_reference_gradients(reference.layer_norm_grad, axis=axis, eps=1e-3))

        def gn(groups: int, axis: int) -> tuple[Callable, Callable]:
            return (_affine_reference(_group_norm(groups), axis=axis, eps=1e-3),
                    _affine_reference_gradients(_group_norm_grad(groups), axis=axis, eps=1e-3))

        rms = (_affine_reference(reference.rms_norm, weight="scale", bias=None, axis=-1, eps=1e-6),
               _affine_reference_gradients(reference.rms_norm_grad, weight="scale", bias=None, axis=-1, eps=1e-6))
        for dtype in ("float64", "float32"):
            family("last", "LayerNormalization", (4, 6, 5), *ln(-1), dtype)
            family("axes12", "LayerNormalization", (2, 5, 6, 3), *ln((1, 2)), dtype, axis=[1, 2])
            family("groups2", "GroupNormalization", (2, 5, 6, 4), *gn(2, -1), dtype, groups=2)
            family("rms", "RMSNormalization", (4, 6, 5), *rms, dtype)
        family("no-center", "LayerNormalization", (4, 6, 5), *ln(-1), center=False)
        family("instance", "GroupNormalization", (2, 5, 6, 4), *gn(4, -1), groups=-1)
        family("axis1", "GroupNormalization", (2, 6, 5), *gn(3, 1), groups=3, axis=1)
        family("offset1e4", "LayerNormalization", (4, 6, 16), *ln(-1), "float32", data_offset=1e4)
        family("offset1e4", "GroupNormalization", (2, 5, 6, 8), *gn(2, -1), "float32", data_offset=1e4, groups=2)
        return cases

    # the protocol -----------------------------------------------------------------------------
    def copy_state(self, src: Any, dst: Any) -> None:
        dst.set_weights(src.get_weights())

    def forward(self, layer: Any, x: np.ndarray, training: bool) -> np.ndarray:
        return _to_numpy(layer(_tensor(x), training=training))

    def gradients(self, layer: Any, x: np.ndarray, upstream: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return gradients(layer, x, upstream)

    def state(self, layer: Any) -> dict[str, np.ndarray]:
        return {weight_name(v): _to_numpy(v.value) for v in layer.weights}

    def roundtrip(self, layer: Any) -> Any:
        import keras

        shape = layer.get_build_config()["input_shape"]
        model = keras.Sequential([keras.Input(shape=tuple(shape[1:]), dtype=layer.dtype), layer])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "layer.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
        return loaded.layers[0]


def _group_norm(groups: int) -> Callable[..., np.ndarray]:
    from normkit.testing import reference

    def fn(x: np.ndarray, w: Any, b: Any, **kw: Any) -> np.ndarray:
        return reference.group_norm(x, groups, w, b, **kw)

    return fn
