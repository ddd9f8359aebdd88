"""Mutants of issue 20's torch half: policy "core" keeps torch.nn.functional's contract on torch's own
module_db/op_db inputs, and the modules work under torch.func.

Run by tools/mutants.py, which predefines Mutant, CORE, TORCH, KERAS and the test selections.
"""

_FN = "plugins/normkit-torch/src/normkit_torch/_functional.py"
_DB = (TORCH, "tests/test_torch_databases.py", "-k")  # noqa: F821 - predefined by tools/mutants.py
_FUNC = (TORCH, "tests/test_func.py", "-k")  # noqa: F821

MUTANTS = [
    Mutant(  # noqa: F821
        "torch-core-refusal-raised", "under core an input the core refuses but torch takes (an empty batch, eps < 0, "
        "momentum outside [0, 1]) raises the core's error instead of getting torch's answer",
        _FN, "    except _CORE_REFUSALS:\n        pass\n", "    except _CORE_REFUSALS:\n        raise\n",
        (_DB + ("core and batch_norm",),)),
    Mutant(  # noqa: F821
        "torch-core-rms-empty-shape", "under core rms_norm with normalized_shape=() normalizes (returns +-1) where "
        "torch raises 'Expected normalized_shape to be at least 1-dimensional'",
        _FN, "    if not shape:  # torch's \"at least 1-dimensional\" error\n        return torch_call()\n",
        "    if False:\n        return torch_call()\n",
        (_DB + ("core and rms_norm",),)),
    Mutant(  # noqa: F821
        "torch-core-rank1-batch-norm", "under core batch_norm of a 1-D input (op_db's empty (0,)) reads input.shape[1]: "
        "IndexError where torch returns an empty tensor",
        _FN, "channels = input.shape[1] if input.dim() > 1 else 0", "channels = input.shape[1]",
        (_DB + ("op_db and core and batch_norm",),)),
    Mutant(  # noqa: F821
        "torch-core-buffers-under-transforms", "under core the running-buffer copy runs inside torch.func's transforms: "
        "InstanceNorm with running statistics fails under grad/jacrev/jvp in training",
        _FN, "        return _OutsideTransforms()\n", "        return torch.no_grad()\n",
        (_FUNC + ("instance_norm_running_stats",),)),
    Mutant(  # noqa: F821
        "torch-core-functionalize-unsynced", "under core the running buffers are copied from functionalize's wrapper "
        "(not synced and unwrapped): InstanceNorm with running statistics raises an INTERNAL ASSERT under "
        "torch.func.functionalize in training",
        _FN, "    while torch._is_functional_tensor(t):", "    while False:",
        (_FUNC + ("functionalize and core and Instance",),)),
    Mutant(  # noqa: F821
        "torch-core-mixed-dtypes", "under core a module left in float64 given float32 input (or the reverse) computes "
        "through the core (which casts) instead of raising torch's CPU 'mixed dtype' error",
        _FN, "    return bool(dtypes) and dtypes != {input.dtype} and not (",
        "    return False and dtypes != {input.dtype} and not (",
        ((TORCH, "tests/test_modules.py", "-k", "mixed_dtype and core"),)),  # noqa: F821
]
