"""Mutants of normkit-flax's state transfer and tools (issue 23): each a convention crossed or a precision
lost the way a port gets it wrong; the tests named kill it. Mutant comes from tools/mutants.py."""

FLAX = "plugins/normkit-flax"
_F = FLAX + "/src/normkit_flax/"


def _flax(path: str, k: str) -> tuple:
    return ((FLAX, path, "-k", k),)


MUTANTS = [
    Mutant("flax-state-momentum-untranslated", "get_state records Flax's momentum (weight of the old value) as is",
           _F + "_state.py", "momentum=NormState.complement(float(layer.momentum))", "momentum=float(layer.momentum)",
           _flax("tests/test_state.py", "flax_to_torch")),
    Mutant("flax-state-float64-stats-rounded", "set_state stores a float64 state's statistics in Flax's float32",
           _F + "_state.py", "copies.append((variable, value, statistic_dtype(layer, variable)))",
           "copies.append((variable, value, variable.dtype))", _flax("tests/test_state.py", "batchnorm2d_state")),
    Mutant("flax-recalibrate-float32", "recalibrate takes each batch's moments (and their merge) in float32",
           _F + "_tools.py", "x64 = np.asarray(x, dtype=np.float64)", "x64 = np.asarray(x, dtype=np.float32)",
           _flax("tests/test_tools.py", "float32_model")),
    Mutant("flax-freeze-follows-mode", "FrozenBatchNorm passes the call's use_running_average through",
           _F + "_tools.py", "return super().__call__(x, True, mask=mask)",
           "return super().__call__(x, use_running_average, mask=mask)", _flax("tests/test_tools.py", "freeze")),
    Mutant("flax-fold-mean-dropped", "fold_batch_norm forgets to subtract the running mean from the bias",
           _F + "_tools.py", "folded = (b - np.asarray(bn.mean[...], np.float64)) * s + shift", "folded = b * s + shift",
           _flax("tests/test_tools.py", "fold")),
]
