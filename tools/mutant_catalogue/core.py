"""Mutants of the core's hardening round 2 (issue 20): each puts back one defect the adversarial suite found.

Run by tools/mutants.py, which predefines Mutant, CORE, TORCH, KERAS and the test selections.
"""

ADV_STATS = (CORE, "tests/test_adversarial_stats.py")  # noqa: F821 - predefined by tools/mutants.py
ADV_STATE = (CORE, "tests/test_adversarial_state.py")  # noqa: F821
ADV_POLICY = (CORE, "tests/test_adversarial_policy.py", "-k", "interleaving or issue_sequence or lookups")  # noqa: F821

MUTANTS = [
    Mutant(  # noqa: F821
        "core-running-stats-broadcast", "update_running_stats broadcasts running statistics of the wrong shape",
        "src/normkit/_running.py", 'running_stats_shape(running_mean, running_var, features, "batch.mean")', "pass",
        ((CORE, "tests/test_adversarial_stats.py", "-k", "update_running_stats_refuses_wrong_shapes"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "core-running-update-in-half", "the running update of float16 statistics is computed in float16 (inf above 65504)",
        "src/normkit/_running.py",
        "old_mean, old_var = _in(xp, running_mean, dtype), _in(xp, running_var, compute_dtype(xp, var_dtype))",
        "old_mean, old_var = running_mean, running_var",
        ((CORE, "tests/test_adversarial_stats.py", "-k", "half_running_variance"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "core-momentum-array-unchecked", "a momentum given as a 0-d array or NumPy scalar is not range-checked",
        "src/normkit/_validate.py", "if found is not None and not 0.0 <= found <= 1.0:", "if False:",
        ((CORE, "tests/test_adversarial_stats.py", "-k", "momentum_out_of_range"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "core-num-batches-zero", "num_batches=0 reaches the division (a bare ZeroDivisionError)",
        "src/normkit/_validate.py", "    if not value >= 1:\n", "    if value < 0:\n",
        ((CORE, "tests/test_adversarial_stats.py", "-k", "num_batches_below_one"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "core-state-accepts-non-finite", "NormState accepts NaN and inf statistics and weights",
        "src/normkit/_state.py", "        if bad.any():\n", "        if False:\n", (ADV_STATE,)),
    Mutant(  # noqa: F821
        "core-state-fits-any-dtype", "require_fits lets a value above float16's 65504 through (stored as inf)",
        "src/normkit/_state.py", "            if big >= limit:\n", "            if big > float('inf'):\n",
        (ADV_STATE, (TORCH, "tests/test_state.py", "-k", "overflow"))),  # noqa: F821
    Mutant(  # noqa: F821
        "core-policy-process-wide", "use_policy's override is process-wide (the last thread's value wins everywhere)",
        "src/normkit/plugin/kernels.py", "    if _tracing():\n        return _LAST[0]\n",
        "    if True:\n        return _LAST[0]\n", (ADV_POLICY,)),
    Mutant(  # noqa: F821
        "torch-set-state-stores-inf", "normkit_torch.set_state writes a float32 state above 65504 into a float16 module",
        "plugins/normkit-torch/src/normkit_torch/_state.py",
        '        state.require_fits(str(dtype).replace("torch.", ""), name)\n', "        pass\n",
        ((TORCH, "tests/test_state.py", "-k", "overflow"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-set-state-stores-inf", "normkit_keras.set_state writes a float32 state above 65504 into a float16 layer",
        "plugins/normkit-keras/src/normkit_keras/_state.py",
        '        state.require_fits(dtype, f"{type(layer).__name__} {layer.name!r}")\n', "        pass\n",
        ((KERAS, "tests/test_state.py", "-k", "overflow"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "keras-from-state-needs-rank", "normkit_keras.from_state refuses a state without input rank instead of building on call",
        "plugins/normkit-keras/src/normkit_keras/_state.py",
        'if input_shape is None and rank is None and state.kind not in ("layer", "rms"):', "if False:",
        ((KERAS, "tests/test_state.py", "-k", "first_call"),)),  # noqa: F821
]
