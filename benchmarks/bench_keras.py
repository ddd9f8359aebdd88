"""normkit_keras benchmarks: every layer against its keras.layers twin, and the functional API on TF tensors.

    python benchmarks/bench_keras.py [--quick] [--parts tf,jax,functional]   # prints the markdown tables
    make bench                                                              # through benchmarks/run.py

Each part runs in its own subprocess (Keras fixes its backend per process), pinned to one CPU with
one thread per library. Ratios are normkit / Keras, the median of interleaved per-round ratios
(``run.interleaved``): below 1.0 normkit is faster. "core" rows force the generic core
(``normkit_keras.set_kernel_policy("core")``), the others use the kernels the plugin chose.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import THREAD_ENV, interleaved, ratio  # noqa: E402

# (layer, shape, constructor arguments); features last, as Keras's defaults
LAYERS = [
    ("BatchNormalization", (8, 28, 28, 256), {}),
    ("BatchNormalization", (32, 56, 56, 64), {}),
    ("BatchNormalization", (256, 1024), {}),
    ("BatchNormalization", (32, 128, 64), {}),
    ("BatchNormalization", (16, 8, 8, 16), {}),
    ("LayerNormalization", (16, 128, 768), {}),
    ("LayerNormalization", (256, 1024), {}),
    ("GroupNormalization", (8, 28, 28, 256), {"groups": 32}),
    ("GroupNormalization", (8, 56, 56, 64), {"groups": 8}),
    ("RMSNormalization", (16, 128, 768), {}),
]
QUICK_LAYERS = [LAYERS[i] for i in (0, 2, 5, 7, 9)]


def _label(name: str, shape: tuple, kwargs: dict) -> str:
    extra = "".join(f" {k}={v}" for k, v in kwargs.items())
    return f"{name}{extra} {'x'.join(map(str, shape))}"


# ---------------------------------------------------------------- Keras on TensorFlow


def part_tf(rounds: int, quick: bool) -> list[dict]:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import normkit_keras

    rows = []
    for name, shape, kwargs in QUICK_LAYERS if quick else LAYERS:
        x = tf.random.normal(shape) * 2 + 1
        dy = tf.random.normal(shape)
        layers = {"native": getattr(keras.layers, name)(**kwargs), "normkit": getattr(normkit_keras, name)(**kwargs),
                  "core": getattr(normkit_keras, name)(**kwargs)}
        fns = {}
        for k, layer in layers.items():
            layer.build(shape)
            policy = "core" if k == "core" else "auto"

            def call(training, layer=layer, policy=policy):
                previous = normkit_keras.set_kernel_policy(policy)  # read while tracing
                try:
                    return layer(x, training=training)
                finally:
                    normkit_keras.set_kernel_policy(previous)

            fwd = tf.function(lambda call=call: call(True))
            ev = tf.function(lambda call=call: call(False))

            @tf.function
            def fb(layer=layer, call=call):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = call(True)
                return tape.gradient(y, [x, *[v.value for v in layer.trainable_variables]], output_gradients=dy)

            fns[f"{k}/fwd"] = lambda f=fwd: f().numpy()
            fns[f"{k}/eval"] = lambda f=ev: f().numpy()
            fns[f"{k}/fb"] = lambda f=fb: [g.numpy() for g in f()]
        res = interleaved(fns, rounds)
        for k, impl in (("normkit", "normkit_keras"), ("core", "normkit_keras, core policy")):
            rows.append(_row("keras-tf", _label(name, shape, kwargs), impl, res, k, ("fwd", "eval", "fb")))
    return rows


def _row(part: str, config: str, impl: str, res: dict, k: str, kinds: tuple) -> dict:
    return dict(part=part, config=config, impl=impl,
                **{kind: ratio(res, f"{k}/{kind}", f"native/{kind}") for kind in kinds},
                ms={kind: res[f"{k}/{kind}"][0] * 1e3 for kind in kinds},
                native_ms={kind: res[f"native/{kind}"][0] * 1e3 for kind in kinds})


# ---------------------------------------------------------------- Keras on JAX


def part_jax(rounds: int, quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import keras

    import normkit_keras

    rows = []
    for name, shape, kwargs in QUICK_LAYERS if quick else LAYERS:
        x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32) * 2 + 1
        dy = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
        fns = {}
        for k, module in (("native", keras.layers), ("normkit", normkit_keras)):
            layer = getattr(module, name)(**kwargs)
            layer.build(shape)
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]

            takes_training = name == "BatchNormalization"

            def run(tv, ntv, x, training, layer=layer, takes_training=takes_training):
                kw = {"training": training} if takes_training else {}
                return layer.stateless_call(tv, ntv, x, **kw)

            fwd = jax.jit(lambda tv, ntv, x, run=run: run(tv, ntv, x, True))
            ev = jax.jit(lambda tv, ntv, x, run=run: run(tv, ntv, x, False)[0])
            fb = jax.jit(jax.grad(lambda tv, x, ntv, run=run: jnp.sum(run(tv, ntv, x, True)[0] * dy), argnums=(0, 1)))
            fns[f"{k}/fwd"] = lambda f=fwd, t=trainable, n=non_trainable: jax.block_until_ready(f(t, n, x))
            fns[f"{k}/eval"] = lambda f=ev, t=trainable, n=non_trainable: jax.block_until_ready(f(t, n, x))
            fns[f"{k}/fb"] = lambda f=fb, t=trainable, n=non_trainable: jax.block_until_ready(f(t, x, n))
        res = interleaved(fns, rounds)
        rows.append(_row("keras-jax", _label(name, shape, kwargs), "normkit_keras (jit)", res, "normkit", ("fwd", "eval", "fb")))
    return rows


# ---------------------------------------------------------------- the functional API on TF tensors


def part_functional(rounds: int, quick: bool) -> list[dict]:
    """``normkit.<op>`` on tf.Tensor inside tf.function against the same op written with keras.ops / tf.nn."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras import ops

    import normkit
    import normkit_keras

    def bn_native(x, w, b):
        mean, var = tf.nn.moments(x, axes=list(range(x.ndim - 1)))
        return tf.nn.batch_normalization(x, mean, var, b, w, 1e-3)

    def gn_native(x, w, b, groups=32):
        n, h, wd, c = x.shape
        g = tf.reshape(x, (n, h, wd, groups, c // groups))
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        y = tf.reshape((g - mean) * tf.math.rsqrt(var + 1e-3), x.shape)
        return y * w + b

    ops_table = {
        "batch_norm": (lambda x, w, b: normkit.batch_norm(x, None, None, w, b, training=True, eps=1e-3, axis=-1).output,
                       bn_native, "tf.nn.moments + tf.nn.batch_normalization"),
        "layer_norm": (lambda x, w, b: normkit.layer_norm(x, w, b, axis=-1, eps=1e-3),
                       lambda x, w, b: ops.layer_normalization(x, w, b, axis=-1, epsilon=1e-3), "keras.ops.layer_normalization"),
        "group_norm": (lambda x, w, b: normkit.group_norm(x, 32, w, b, axis=-1, eps=1e-3), gn_native,
                       "tf.nn.moments over groups"),
        "rms_norm": (lambda x, w, b: normkit.rms_norm(x, w, axis=-1, eps=1e-6),
                     lambda x, w, b: ops.rms_normalization(x, w, axis=-1, epsilon=1e-6), "keras.ops.rms_normalization"),
    }
    shapes = {"batch_norm": (8, 28, 28, 256), "layer_norm": (16, 128, 768), "group_norm": (8, 28, 28, 256),
              "rms_norm": (16, 128, 768)}
    rows = []
    for op, (ours, native, native_name) in ops_table.items():
        shape = shapes[op]
        x = tf.random.normal(shape) * 2 + 1
        dy = tf.random.normal(shape)
        w, b = tf.random.normal(shape[-1:]), tf.random.normal(shape[-1:])
        fns = {}
        for k, fn, policy in (("native", native, "auto"), ("normkit", ours, "auto"), ("core", ours, "core")):
            def call(fn=fn, policy=policy):
                previous = normkit_keras.set_kernel_policy(policy)
                try:
                    return fn(x, w, b)
                finally:
                    normkit_keras.set_kernel_policy(previous)

            @tf.function
            def fb(call=call):
                with tf.GradientTape() as tape:
                    tape.watch([x, w, b])
                    y = call()
                return tape.gradient(y, [x, w, b], output_gradients=dy)

            fwd = tf.function(call)
            fns[f"{k}/fwd"] = lambda f=fwd: f().numpy()
            fns[f"{k}/fb"] = lambda f=fb: [g.numpy() for g in f() if g is not None]
        res = interleaved(fns, rounds)
        config = f"normkit.{op} {'x'.join(map(str, shape))} vs {native_name}"
        rows.append(_row("functional-tf", config, "normkit (auto)", res, "normkit", ("fwd", "fb")))
        rows.append(_row("functional-tf", config, "normkit (core policy)", res, "core", ("fwd", "fb")))
    return rows


# ---------------------------------------------------------------- accuracy at offset 1e4


def part_accuracy(rounds: int, quick: bool) -> list[dict]:
    """Max |error| against float64 NumPy of each kernel on float32 data at mean 1e4, std 1 (not timed)."""
    import jax.numpy as jnp
    import keras
    import numpy as np
    import tensorflow as tf

    import normkit
    from normkit.plugin.kernels import use_policy
    from normkit.testing import reference

    rng = np.random.default_rng(0)
    cases = {"batch_norm": (4096, 64), "layer_norm": (512, 768), "group_norm": (8, 28, 28, 256)}
    rows = []
    for op, shape in cases.items():
        x = (rng.standard_normal(shape) + 1e4).astype("float32")
        c = shape[-1]
        w, b = rng.uniform(0.5, 2.0, c).astype("float32"), rng.standard_normal(c).astype("float32")
        x64 = x.astype("float64")
        if op == "batch_norm":
            want = reference.batch_norm(x64, None, None, w, b, training=True, eps=1e-3, axis=-1)[0]
            ours = lambda t, a, o: normkit.batch_norm(t, None, None, a, o, training=True, eps=1e-3, axis=-1).output  # noqa: E731
            natives = {
                "keras.layers.BatchNormalization": lambda: _keras_layer(keras.layers.BatchNormalization(), x, w, b, True),
                "tf.raw_ops.FusedBatchNormV3, unshifted": lambda: tf.reshape(tf.raw_ops.FusedBatchNormV3(
                    x=tf.reshape(x, [-1, 1, 1, c]), scale=w, offset=b, mean=tf.zeros(0), variance=tf.zeros(0),
                    epsilon=1e-3, exponential_avg_factor=1.0, data_format="NHWC", is_training=True).y, shape),
            }
        elif op == "layer_norm":
            want = reference.layer_norm(x64, w, b, axis=-1, eps=1e-3)
            ours = lambda t, a, o: normkit.layer_norm(t, a, o, axis=-1, eps=1e-3)  # noqa: E731
            natives = {"keras.layers.LayerNormalization": lambda: _keras_layer(keras.layers.LayerNormalization(), x, w, b)}
        else:
            want = reference.group_norm(x64, 32, w, b, axis=-1, eps=1e-3)
            ours = lambda t, a, o: normkit.group_norm(t, 32, a, o, axis=-1, eps=1e-3)  # noqa: E731
            natives = {"keras.layers.GroupNormalization": lambda: _keras_layer(keras.layers.GroupNormalization(32), x, w, b)}
        results = {}
        for policy in ("auto", "core"):
            with use_policy(policy):
                results[f"normkit.{op} on tf.Tensor, {policy}"] = ours(tf.constant(x), tf.constant(w), tf.constant(b))
                results[f"normkit.{op} on jax.Array, {policy}"] = ours(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
        for name, fn in natives.items():
            results[name] = fn()
        for name, y in results.items():
            rows.append(dict(part="accuracy-1e4", config=f"{op} {'x'.join(map(str, shape))}", impl=name,
                             error=float(np.max(np.abs(np.asarray(y, dtype=np.float64) - want)))))
    # inference with running statistics at the data's offset
    x = (rng.standard_normal((4096, 64)) + 1e4).astype("float32")
    rm, rv = (x.mean(0) + 0.1).astype("float32"), (x.var(0) + 0.5).astype("float32")
    w, b = rng.uniform(0.5, 2.0, 64).astype("float32"), rng.standard_normal(64).astype("float32")
    want = reference.batch_norm(x.astype("float64"), rm, rv, w, b, training=False, eps=1e-3, axis=-1)[0]
    evals = {}
    for policy in ("auto", "core"):
        with use_policy(policy):
            evals[f"normkit.batch_norm eval on tf.Tensor, {policy}"] = normkit.batch_norm(
                tf.constant(x), tf.constant(rm), tf.constant(rv), tf.constant(w), tf.constant(b), training=False,
                eps=1e-3, axis=-1).output
    layer = keras.layers.BatchNormalization()
    layer.build(x.shape)
    layer.set_weights([w, b, rm, rv])
    evals["keras.layers.BatchNormalization eval"] = layer(x, training=False)
    for name, y in evals.items():
        rows.append(dict(part="accuracy-1e4", config="batch_norm eval 4096x64, statistics at 1e4", impl=name,
                         error=float(np.max(np.abs(np.asarray(y, dtype=np.float64) - want)))))
    return rows


def _keras_layer(layer, x, w, b, training=None):
    layer.build(x.shape)
    layer.gamma.assign(w)
    layer.beta.assign(b)
    return layer(x, training=training) if training is not None else layer(x)


# part -> (Keras backend, function, the rows' part name)
PARTS = {"tf": ("tensorflow", part_tf, "keras-tf"), "jax": ("jax", part_jax, "keras-jax"),
         "functional": ("tensorflow", part_functional, "functional-tf"),
         "accuracy": ("tensorflow", part_accuracy, "accuracy-1e4")}


# ---------------------------------------------------------------- driver and report


def run_part(part: str, rounds: int, quick: bool) -> list[dict]:
    """One part in a fresh process on its Keras backend, one CPU, one thread."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--rounds", str(rounds)] + (["--quick"] if quick else [])
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    env = {**os.environ, **THREAD_ENV, "KERAS_BACKEND": PARTS[part][0]}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return [dict(part=PARTS[part][2], config="all", impl="failed", error=last)]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def collect(rounds: int, quick: bool = False, parts: str = "tf,jax,functional,accuracy") -> list[dict]:
    rows = []
    for part in parts.split(","):
        rows += run_part(part, rounds, quick)
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def table(rows: list[dict]) -> str:
    """The Keras sections of RESULTS.md."""
    sections = [
        ("keras-tf", "Keras 3 on TensorFlow (tf.function, one thread): normkit_keras / keras.layers", ("fwd", "eval", "fb")),
        ("keras-jax", "Keras 3 on JAX (jax.jit of stateless_call / jax.grad): normkit_keras / keras.layers", ("fwd", "eval", "fb")),
        ("functional-tf", "The functional API on tf.Tensor (tf.function, one thread): normkit / TensorFlow", ("fwd", "fb")),
    ]
    names = {"fwd": "fwd train", "eval": "eval fwd", "fb": "fwd+bwd"}
    out = []
    accuracy = [r for r in rows if r["part"] == "accuracy-1e4"]
    if accuracy:
        out += ["", "### float32 at mean 1e4, std 1: max |output - float64 reference| (normkit's kernels and the native ops)", "",
                "| op and shape | implementation | max abs error |", "|---|---|---|"]
        out += [f"| {r['config']} | {r['impl']} | {r['error']:.1e} |" if isinstance(r.get("error"), float)
                else f"| {r['config']} | {r['impl']}: {r.get('error')} | |" for r in accuracy]
    for part, title, kinds in sections:
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        out += ["", f"### {title}", "",
                "| layer and shape | implementation | " + " | ".join(names[k] for k in kinds) + " | normkit ms | native ms |",
                "|---|---|" + "---|" * len(kinds) + "---|---|"]
        for r in mine:
            if "error" in r:
                out.append(f"| {r['config']} | {r['impl']}: {r['error'][:160]} |" + " |" * (len(kinds) + 2))
                continue
            ms = " / ".join(f"{r['ms'][k]:.2f}" for k in kinds)
            nms = " / ".join(f"{r['native_ms'][k]:.2f}" for k in kinds)
            out.append(f"| {r['config']} | {r['impl']} | " + " | ".join(_fmt(r.get(k)) for k in kinds) + f" | {ms} | {nms} |")
    return "\n".join(out)


def goals(rows: list[dict]) -> list[tuple[str, tuple[float, str] | None, float]]:
    """(goal, worst (ratio, config) or None, limit) for the issue's Keras targets."""
    def worst(part, key, impl):
        vals = [(r[key], r["config"]) for r in rows if r["part"] == part and r.get("impl") == impl and key in r]
        return max(vals) if vals else None

    return [
        ("normkit_keras layers on TF fwd+bwd <= 1.0x keras.layers", worst("keras-tf", "fb", "normkit_keras"), 1.0),
        ("normkit_keras layers on JAX fwd+bwd <= 1.1x keras.layers", worst("keras-jax", "fb", "normkit_keras (jit)"), 1.1),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and 5 rounds")
    ap.add_argument("--part", choices=sorted(PARTS), help="run one part in this process and print JSON")
    ap.add_argument("--parts", default="tf,jax,functional,accuracy")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    if args.part:
        print(json.dumps(PARTS[args.part][1](rounds, args.quick)))
        return
    rows = collect(rounds, args.quick, args.parts)
    lines = ["| goal | worst measured (shape) | met |", "|---|---|---|"]
    for name, w, limit in goals(rows):
        lines.append(f"| {name} | not measured | - |" if w is None else
                     f"| {name} | {w[0]:.2f}x ({w[1]}) | {'yes' if w[0] <= limit else 'no'} |")
    print("\n".join(lines) + "\n" + table(rows))


if __name__ == "__main__":
    main()
