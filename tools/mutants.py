"""Plant realistic bugs one at a time and check that the test suite kills each (``make mutants``).

Each mutant replaces one exact snippet (it must occur exactly once) in a copy of the repository,
then runs the tests that should catch it; a mutant survives when they all pass. The copy shadows
the editable installs through PYTHONPATH, so the working tree is never touched. Ends with the line
``N of N mutants killed``; exits 1 when any survives (a surviving mutant is a missing test). The
tests of every mutant first run on the unmutated copy: a red baseline stops the run (exit 2).

    python tools/mutants.py                 # every mutant, two at a time
    python tools/mutants.py --only NAME     # one mutant (repeatable)
    python tools/mutants.py --list          # names and descriptions
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("src", "plugins", "tests", "conftest.py", "pyproject.toml", "ruff.toml", "README.md", "LICENSE", "CHANGELOG.md")
PYTHONPATHS = ("src", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("plugins/*/src")))
TIMEOUT = 600


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``find`` (exactly once in ``path``) becomes ``replace``; ``tests`` must fail."""

    name: str
    description: str
    path: str
    find: str
    replace: str
    tests: tuple[tuple[str, ...], ...]  # each: (working directory relative to the copy, *pytest args)
    env: tuple[tuple[str, str], ...] = ()


CORE = "."
TORCH = "plugins/normkit-torch"
KERAS = "plugins/normkit-keras"

CORE_MATRIX = (CORE, "tests/test_batch_norm.py", "tests/test_family.py", "tests/test_moments.py",
               "tests/test_preprocessing.py", "tests/test_backward.py")

# the catalogue: realistic bugs of the kinds that slipped through before (issue #10), core first
MUTANTS: list[Mutant] = [
    Mutant("core-weight-bias-swapped", "batch norm training uses the bias as scale and the weight as shift",
           "src/normkit/_batch_norm.py",
           'w = as_param(xp, weight, "weight", feat, dtype, x)\n    b = as_param(xp, bias, "bias", feat, dtype, x)\n    rm = rv = None',
           'w = as_param(xp, bias, "bias", feat, dtype, x)\n    b = as_param(xp, weight, "weight", feat, dtype, x)\n    rm = rv = None',
           (CORE_MATRIX,)),
    Mutant("core-eps-outside-sqrt", "1 / (sqrt(var) + eps) instead of 1 / sqrt(var + eps)",
           "src/normkit/_batch_norm.py", "scale = 1.0 / xp.sqrt(var + eps)", "scale = 1.0 / (xp.sqrt(var) + eps)",
           (CORE_MATRIX,)),
    Mutant("core-momentum-direction", "momentum weighs the old running value instead of the new batch",
           "src/normkit/_running.py", "running_mean * (1.0 - momentum) + mean * momentum",
           "running_mean * momentum + mean * (1.0 - momentum)", (CORE_MATRIX,)),
    Mutant("core-bessel-dropped", "the running variance folds the biased batch variance whatever the correction",
           "src/normkit/_running.py", "return m2 / max(count - correction, 1)", "return m2 / max(count, 1)",
           (CORE_MATRIX,)),
    Mutant("core-mask-ignored", "the mask is accepted and ignored", "src/normkit/_batch_norm.py",
           "weights = None if mask is None else mask_weights(xp, mask, x, f)\n    fast",
           "weights = None\n    fast", (CORE_MATRIX,)),
    Mutant("core-group-order", "group norm groups channels with a stride instead of consecutively",
           "src/normkit/_family.py", "(num_groups, channels // num_groups)", "(channels // num_groups, num_groups)",
           (CORE_MATRIX,)),
    Mutant("core-inference-uncentred", "inference computes x * scale - mean * scale (cancellation at mean 1e4)",
           "src/normkit/_batch_norm.py", "y = (xc - m) * scale\n", "y = xc * scale - m * scale\n", (CORE_MATRIX,)),
    Mutant("core-chan-merge", "Chan's merge term divided by n**2 instead of n", "src/normkit/_moments.py",
           "delta * delta * _safe_ratio(xp, na * nb, n)", "delta * delta * _safe_ratio(xp, na * nb, n * n)",
           (CORE_MATRIX,)),
    Mutant("core-backward-term", "the input gradient's xhat term misses one invstd", "src/normkit/_backward.py",
           "b = -(k * invstd * invstd * dot) / n", "b = -(k * invstd * dot) / n", (CORE_MATRIX,)),
    Mutant("core-feature-axis", "batch norm always normalizes along axis 1", "src/normkit/_batch_norm.py",
           "    two_or_more_values(x, \"batch_norm\")\n    f = feature_axis(axis, x.ndim)",
           "    two_or_more_values(x, \"batch_norm\")\n    f = feature_axis(1, x.ndim)", (CORE_MATRIX,)),
    Mutant("core-ghost-mean-of-variances", "ghost batch norm's running variance drops the spread of the virtual means",
           "src/normkit/_ghost.py", "m2 = xp.sum(var + dev * dev, axis=0, keepdims=True) * count",
           "m2 = xp.sum(var, axis=0, keepdims=True) * count", ((CORE, "tests/test_ghost.py"),)),
    Mutant("core-running-stats-keep-history", "running statistics keep autograd history", "src/normkit/_running.py",
           "mean = cut(batch.mean)", "mean = batch.mean", (CORE_MATRIX,)),
]

# normkit-torch: the core path of the modules, the functional API's kernels, sync, tools
TORCH_CONF = (CORE, "tests/test_conformance.py", "--frameworks=torch", "--backends=none")
TORCH_UNIT = (TORCH, "tests/test_modules.py", "tests/test_kernels.py")
MUTANTS += [
    Mutant("torch-core-stats-not-updated", "the core path forgets to write the running statistics back",
           "plugins/normkit-torch/src/normkit_torch/_functional.py",
           "            running_mean.copy_(out.running_mean)\n            running_var.copy_(out.running_var)\n",
           "            pass\n", (TORCH_CONF, TORCH_UNIT)),
    Mutant("torch-core-weight-bias-swapped", "the core path passes bias as weight and weight as bias",
           "plugins/normkit-torch/src/normkit_torch/_functional.py",
           "input, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps, axis=1,\n",
           "input, running_mean, running_var, bias, weight, training=training, momentum=momentum, eps=eps, axis=1,\n",
           (TORCH_CONF, TORCH_UNIT)),
    Mutant("torch-kernel-impure", "normkit.batch_norm on torch tensors updates the caller's running statistics in place",
           "plugins/normkit-torch/src/normkit_torch/_kernels.py",
           "            stats = (running_mean.clone(), running_var.clone())\n    elif dtype",
           "            stats = (running_mean, running_var)\n    elif dtype", ((TORCH, "tests/test_kernels.py"),)),
    Mutant("torch-sync-equal-weights", "SyncBatchNorm weighs every rank equally (detectron2's naive merge)",
           "plugins/normkit-torch/src/normkit_torch/distributed.py",
           "        parts = top.merge(low)\n",
           "        parts = Moments(count=top.count + low.count, mean=(top.mean + low.mean) / 2, m2=top.m2 + low.m2)\n",
           ((TORCH, "tests/test_sync.py"),)),
    Mutant("torch-ghost-ignored", "the batch-norm modules accept virtual_batch_size and normalize the whole batch",
           "plugins/normkit-torch/src/normkit_torch/_batchnorm.py",
           "            self.virtual_batch_size if self.training else None,\n        )", "            None,\n        )",
           ((TORCH, "tests/test_ghost.py"),)),
    Mutant("torch-sync-backward-local", "SyncBatchNorm's backward uses this rank's gradients of the statistics only",
           "plugins/normkit-torch/src/normkit_torch/distributed.py",
           "        return _AllReduce.apply(grad, ctx.group, ctx.layer)[ctx.rank], None, None, None",
           "        return grad[ctx.rank], None, None, None",
           ((TORCH, "tests/test_sync.py"),)),
    Mutant("torch-fold-eps-outside", "fold_batch_norm puts eps outside the square root", "plugins/normkit-torch/src/normkit_torch/_fold.py",
           "scale = gamma * torch.rsqrt(rv + bn.eps)", "scale = gamma / (torch.sqrt(rv) + bn.eps)",
           ((TORCH, "tests/test_tools.py", "-k", "fold"),)),
    Mutant("torch-recalibrate-biased", "recalibrate stores the biased variance in torch's unbiased running_var",
           "plugins/normkit-torch/src/normkit_torch/_recalibrate.py",
           "var = total.var if renorm else total.unbiased_var(1)", "var = total.var",
           ((TORCH, "tests/test_tools.py", "-k", "recalibrate"),)),
]

# normkit-keras: conventions at the edge, the TensorFlow and JAX kernels
KERAS_CONF = (CORE, "tests/test_conformance.py", "--frameworks=keras", "--backends=none")
KERAS_TF_KERNELS = (KERAS, "tests/test_kernels.py")
MUTANTS += [
    Mutant("keras-ln-beta-inside", "layer norm computes (xhat + beta) * gamma in the TensorFlow kernel",
           "plugins/normkit-keras/src/normkit_keras/_kernels.py",
           "        y = xhat if g is None else xhat * g\n        if b is not None:\n            y = tf.nn.bias_add(y, b)",
           "        y = xhat if b is None else tf.nn.bias_add(xhat, b)\n        if g is not None:\n            y = y * g",
           (KERAS_CONF,)),
    Mutant("keras-momentum-direction", "Keras's momentum passed to the core unconverted",
           "plugins/normkit-keras/src/normkit_keras/_batch_normalization.py",
           "momentum=1.0 - layer.momentum", "momentum=layer.momentum", (KERAS_CONF,)),
    Mutant("keras-unbiased-variance", "the moving variance folds the unbiased batch variance",
           "plugins/normkit-keras/src/normkit_keras/_batch_normalization.py",
           "axis=layer.axis, correction=0,", "axis=layer.axis, correction=1,", (KERAS_CONF,)),
    Mutant("keras-features-last", "the layer assumes features last whatever its axis",
           "plugins/normkit-keras/src/normkit_keras/_batch_normalization.py",
           "eps=layer.epsilon, axis=layer.axis,", "eps=layer.epsilon, axis=-1,", (KERAS_CONF,)),
    Mutant("keras-fused-unshifted", "TensorFlow's fused kernel runs on x itself, not shifted (1e-2 off at mean 1e4)",
           "plugins/normkit-keras/src/normkit_keras/_kernels.py", "x=x4 - shift, scale=", "x=x4, scale=",
           (KERAS_CONF, KERAS_TF_KERNELS)),
    Mutant("keras-fused-variance-biased-twice", "the fused kernel's unbiased batch variance taken as biased",
           "plugins/normkit-keras/src/normkit_keras/_kernels.py",
           "m2 = var * (n - 1.0) if isinstance(n, float) else var * tf.maximum(n - 1.0, 0.0)", "m2 = var * n",
           (KERAS_CONF, KERAS_TF_KERNELS)),
    Mutant("keras-gn-gamma-gradient", "the TensorFlow group-norm kernel's gamma gradient misses a term",
           "plugins/normkit-keras/src/normkit_keras/_kernels.py", "h4 = inv * (a4 + e * b4)", "h4 = inv * a4",
           (KERAS_CONF,)),
    Mutant("keras-jax-gn-shift", "the JAX group-norm kernel drops the shift's residual from the mean",
           "plugins/normkit-keras/src/normkit_keras/_jax_kernels.py",
           "y = c * per_channel(p4) + per_channel(jnp.reshape(b, (1, 1, groups, cg)) - d4 * p4)",
           "y = c * per_channel(p4) + per_channel(jnp.reshape(b, (1, 1, groups, cg)))",
           ((CORE, "tests/test_conformance.py", "--frameworks=keras", "--backends=none", "-k", "GroupNormalization"),),
           (("KERAS_BACKEND", "jax"),)),
    Mutant("keras-sync-equal-weights", "synchronized replicas weighted equally whatever their batch sizes",
           "plugins/normkit-keras/src/normkit_keras/_synchronized.py", "        parts = top.merge(low)\n",
           "        parts = normkit.Moments(count=top.count + low.count, mean=(top.mean + low.mean) / 2, m2=top.m2 + low.m2)\n",
           ((KERAS, "tests/test_synchronized.py"),)),
    Mutant("keras-ghost-ignored", "virtual_batch_size accepted and ignored in training",
           "plugins/normkit-keras/src/normkit_keras/_batch_normalization.py",
           'extra["virtual_batch_size"] = self.virtual_batch_size', "pass",
           ((KERAS, "tests/test_ghost.py"),)),
    Mutant("keras-jax-shard-map-local", "inside shard_map each device merges its own statistics with zero rows (no psum)",
           "plugins/normkit-keras/src/normkit_keras/_synchronized.py",
           "return jax.lax.psum(onehot[:, None, None] * packed[None], axes)", "return onehot[:, None, None] * packed[None]",
           ((KERAS, "tests/test_synchronized.py", "-k", "jax"),), (("KERAS_BACKEND", "jax"),)),
    Mutant("keras-freeze-not-permanent", "a frozen BatchNormalization becomes trainable again with model.trainable = True",
           "plugins/normkit-keras/src/normkit_keras/_batch_normalization.py",
           'trainable.fset(self, False if getattr(self, "_frozen", False) else value)', "trainable.fset(self, value)",
           ((KERAS, "tests/test_freeze.py"),)),
    Mutant("keras-integer-inputs", "integer inputs reach the core uncast", "plugins/normkit-keras/src/normkit_keras/_backend.py",
           '    return cast(xp, x, keras.backend.result_type(name, "float32"))', "    return x",
           ((KERAS, "tests/test_layers.py", "-k", "integer"),)),
]


# more catalogues, one file per area (tools/mutant_catalogue/*.py): each defines MUTANTS with the names above
CATALOGUE = ROOT / "tools" / "mutant_catalogue"
for _file in sorted(CATALOGUE.glob("*.py")):
    _names = {k: v for k, v in globals().items() if k.isupper() or k == "Mutant"}
    MUTANTS += runpy.run_path(str(_file), init_globals=_names)["MUTANTS"]


def _copy(dest: Path) -> None:
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"))
        else:
            shutil.copy2(src, dest / name)


def _apply(copy: Path, m: Mutant) -> None:
    path = copy / m.path
    text = path.read_text()
    count = text.count(m.find)
    if count != 1:
        raise RuntimeError(f"mutant {m.name}: the snippet occurs {count} times in {m.path} (must be exactly once)")
    path.write_text(text.replace(m.find, m.replace))


def _run(m: Mutant) -> tuple[Mutant, bool, str, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        copy = Path(tmp)
        _copy(copy)
        if m.find:
            _apply(copy, m)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(str(copy / p) for p in PYTHONPATHS)
        env.setdefault("KERAS_BACKEND", "tensorflow")
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        env["NORMKIT_STRICT_PLUGINS"] = "1"
        env.update(dict(m.env))
        for cwd, *args in m.tests:
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
            try:
                run = subprocess.run(cmd, cwd=copy / cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                return m, True, f"{' '.join(args)}: timed out (counted as killed)", time.perf_counter() - start
            if run.returncode != 0:
                failed = [ln for ln in run.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
                return m, True, (failed[0] if failed else run.stdout.strip().splitlines()[-1]), time.perf_counter() - start
    return m, False, "every test passed", time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.path}: {m.description}")
        return 0
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}")
    stale = [f"{m.name}: the snippet occurs {(ROOT / m.path).read_text().count(m.find)} times in {m.path}"
             for m in mutants if (ROOT / m.path).read_text().count(m.find) != 1]
    if stale:  # before any test runs: a snippet the code no longer has is a catalogue to update
        print("\n".join(["MUTANT SNIPPETS OUT OF DATE (each must occur exactly once):", *stale]))
        return 2
    # the same tests on the unmutated copy first: a kill only counts when they pass without the bug
    baselines = {(m.tests, m.env): Mutant(f"baseline-{i}", "no bug", "", "", "", m.tests, m.env)
                 for i, m in enumerate(mutants)}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        broken = [(b, detail) for b, failed, detail, _ in pool.map(_run, baselines.values()) if failed]
    for b, detail in broken:
        print(f"BASELINE FAILS without any mutant: {' '.join(' '.join(t) for t in b.tests)}: {detail}")
    if broken:
        return 2
    killed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for m, dead, detail, seconds in pool.map(_run, mutants):
            killed += dead
            print(f"{'killed  ' if dead else 'SURVIVED'} {m.name:32s} {seconds:5.0f} s  {detail}", flush=True)
    print(f"{killed} of {len(mutants)} mutants killed")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
