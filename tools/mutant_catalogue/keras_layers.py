"""Mutants of the Keras layers' hardening round 2 (issue 20): each puts back one defect that Keras's own tests
(tests/test_keras_suite.py) or the hostile cases (tests/test_hardening.py) found.

Run by tools/mutants.py, which predefines Mutant, KERAS and the test selections.
"""

HARD = "tests/test_hardening.py"
SRC = "plugins/normkit-keras/src/normkit_keras/"

MUTANTS = [
    Mutant(  # noqa: F821 - predefined by tools/mutants.py
        "keras-mask-feature-axis", "BatchNormalization passes Keras's mask (all axes but the last) as the core's (all "
        "but the feature axis): refused for axis=1 after Masking", SRC + "_batch_normalization.py",
        "            mask = xp.expand_dims(mask, axis=-1)  #", "            mask = mask  #",
        ((KERAS, HARD, "-k", "masking"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-unit-norm-float32-out", "UnitNormalization returns float32 under mixed_float16",
        SRC + "_family.py", "        return cast(xp, cast(xp, x * inv_norm, _out_dtype(self, inputs)), self.compute_dtype)",
        "        return x * inv_norm", ((KERAS, HARD, "-k", "mixed_float16 and Unit"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-standardize-tf-data-backend", "Standardize computes with the Keras backend's namespace inside tf.data",
        SRC + "_preprocessing.py", "        backend = self.backend.name  #", "        backend = keras.backend.backend()  #",
        ((KERAS, HARD, "-k", "tf_data"),), (("KERAS_BACKEND", "jax"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-standardize-first-kept-axis", "Standardize keeps only the first of a tuple of axes",
        SRC + "_preprocessing.py", "        return tuple(sorted(a % rank for a in self.axis))",
        "        return tuple(sorted(a % rank for a in self.axis))[:1]",
        ((KERAS, HARD, "-k", "tuple_axes"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-all-nan-pass-through", "an all-NaN feature keeps mean 0 / variance 1 (new data passes through unscaled)",
        SRC + "_preprocessing.py", "    empty = observed == 0\n", "    empty = observed < 0\n",
        ((KERAS, HARD, "-k", "all_nan"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-ghost-partial-batch-unchecked", "ghost batch norm's partial last batch in model.fit reaches the reshape",
        SRC + "_batch_normalization.py",
        "                x = _divisible_batch(x, self.virtual_batch_size, self._description())", "                pass",
        ((KERAS, HARD, "-k", "ghost"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-bad-env-disables-plugin", "a bad NORMKIT_KERAS_KERNELS raises at import: the plugin is disabled",
        SRC + "_policy.py", '        super().__init__(env_var if self.invalid is None else "")',
        "        super().__init__(env_var)", ((KERAS, HARD, "-k", "kernel_environment"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-sync-odd-replica-dropped", "the replica merge drops the last row instead of padding an odd count",
        SRC + "_synchronized.py",
        "            parts = normkit.Moments(*(collective.concat([t, pad]) for t in (parts.count, parts.mean, parts.m2)))\n"
        "            n += 1\n",
        "            parts = normkit.Moments(*(t[:-1] for t in (parts.count, parts.mean, parts.m2)))\n            n -= 1\n",
        ((KERAS, HARD, "-k", "replica"),)),  # noqa: F821
]
