"""Mutants of the batch-norm tools and the scalers (issue 20): fold, freeze, renorm, recalibrate, Standardize.

Each one is a bug that survived the whole suite before issue 20 (or was the silent defect the issue
reported); the tests named kill it. Mutant, TORCH and KERAS come from tools/mutants.py.
"""

_T = "plugins/normkit-torch/src/normkit_torch/"
_K = "plugins/normkit-keras/src/normkit_keras/"
ADV = "tests/test_tools_adversarial.py"


def _torch(k: str) -> tuple:
    return ((TORCH, ADV, "-k", k),)


def _keras(k: str) -> tuple:
    return ((KERAS, ADV, "-k", k),)


MUTANTS = [
    Mutant("torch-freeze-shared-first-only", "freeze/unfreeze convert only the first name of a module registered twice",
           _T + "_frozen.py",
           "    for name, child in list(model._modules.items()):  # not named_children(): it yields a shared child once\n"
           "        if child is None:\n            continue\n",
           "    for name, child in list(model.named_children()):\n", _torch("shared")),
    Mutant("torch-freeze-drops-eps", "freeze builds the frozen twin with the default eps 1e-5", _T + "_frozen.py",
           "_FROZEN[_dims_of(module)](module.num_features, eps=module.eps,", "_FROZEN[_dims_of(module)](module.num_features,",
           _torch("eps")),
    Mutant("torch-fold-linear-any-axis", "fold folds a Linear into any batch norm after it, whatever the axes",
           _T + "_fold.py", "    kind, bn_kind = type(layer).__name__, type(bn).__name__\n",
           "    return None\n    kind, bn_kind = type(layer).__name__, type(bn).__name__\n", _torch("linear or unbatched")),
    Mutant("torch-fold-linear-unknown-rank", "fold folds Linear + BatchNorm1d when it cannot know the input is 2-D",
           _T + "_fold.py", "        if flat:\n            return None\n", "        if True:\n            return None\n",
           _torch("linear")),
    Mutant("torch-fold-transpose-as-conv", "fold scales a ConvTranspose weight along axis 0 as for a Conv",
           _T + "_fold.py", "    if isinstance(layer, _TRANSPOSED):\n        g = layer.groups",
           "    if False:\n        g = layer.groups", _torch("transpose")),
    Mutant("torch-recalibrate-first-call-only", "recalibrate keeps only the first call of a batch norm called twice",
           _T + "_recalibrate.py", "        if seen[0] == calls:\n            raise _Stop",
           "        if seen[0] == 1:\n            raise _Stop", _torch("twice")),
    Mutant("torch-recalibrate-nbt-added", "recalibrate adds the batches to num_batches_tracked instead of resetting it",
           _T + "_recalibrate.py", "tracked.fill_(num_batches)", "tracked.add_(num_batches)", _torch("num_batches_tracked")),
    Mutant("torch-recalibrate-float32-merge", "recalibrate computes and merges a float32 model's moments in float32",
           _T + "_recalibrate.py", "part = normkit.batch_moments(_wide(args[0].detach()), axis=1, xp=xp)",
           "part = normkit.batch_moments(args[0].detach(), axis=1, xp=xp)", _torch("recalibrate_float32")),
    Mutant("torch-recalibrate-nan-stored", "recalibrate stores NaN statistics from NaN activations",
           _T + "_recalibrate.py", "    if not bool(finite.all()):\n        bad = torch.nonzero",
           "    if False:\n        bad = torch.nonzero", _torch("refusals")),
    Mutant("torch-scaler-all-nan-passthrough", "an all-NaN feature fits mean 0 / std 0: new data passes through unscaled",
           _T + "_preprocessing.py", "    if not bool(empty.any()):\n        return list(stats)",
           "    if True:\n        return list(stats)", _torch("all_nan")),
    Mutant("torch-scaler-float32-batch-merge", "Standardize merges float32 batches in float32",
           _T + "_preprocessing.py", "                x = x.detach().to(torch.float32 if x.device.type == \"mps\" else torch.float64)",
           "                x = x.detach()", _torch("scalers_float32")),
    Mutant("torch-renorm-rmax-below-one", "BatchRenorm accepts rmax < 1 (r = 1 clipped away)", _T + "_renorm.py",
           '_check_bound("rmax", rmax, 1.0, math.inf,', '_check_bound("rmax", rmax, 0.0, math.inf,', _torch("clipping")),
    Mutant("keras-recalibrate-first-call-only", "Keras recalibrate keeps only the first call of a layer called twice",
           _K + "_recalibrate.py", "        if seen[0] == calls:\n            raise _Stop",
           "        if seen[0] == 1:\n            raise _Stop", _keras("twice")),
    Mutant("keras-recalibrate-float32-merge", "Keras recalibrate computes and merges in float32",
           _K + "_recalibrate.py", "return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)",
           "return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float32)", _keras("float32")),
    Mutant("keras-recalibrate-nan-stored", "Keras recalibrate stores NaN statistics from NaN activations",
           _K + "_recalibrate.py", "    if not finite.all():\n", "    if False:\n", _keras("refusals")),
]
