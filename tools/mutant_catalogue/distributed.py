"""Mutants of synchronized batch norm (normkit_torch.SyncBatchNorm, Keras synchronized on torch): issue 20's bugs.

Loaded by tools/mutants.py with Mutant, TORCH, KERAS predefined.
"""

_DIST = "plugins/normkit-torch/src/normkit_torch/distributed.py"
_SYNC = "plugins/normkit-torch/src/normkit_torch/_sync.py"
_SYNC_TESTS = ((TORCH, "tests/test_sync.py"),)  # noqa: F821 (predefined)

MUTANTS = [
    Mutant("torch-sync-agreement-skipped",  # noqa: F821
           "the signatures gathered with the statistics are never compared (a rank whose input needs no gradient, "
           "or whose dtype or width changed, goes on: a hang in backward or garbage statistics)", _DIST,
           "    _check_signatures(rows, layer)\n    if features != agreed:", "    if features != agreed:",
           _SYNC_TESTS),
    Mutant("torch-sync-first-agreement-skipped",  # noqa: F821
           "a module's first call gathers the signatures but does not check them (differing feature counts reach "
           "the statistics' all_gather with different sizes: gloo aborts)", _DIST,
           "        _check_signatures(_all_gather_flat_checked(head, process_group, world, layer), layer)\n",
           "        _all_gather_flat_checked(head, process_group, world, layer)\n", _SYNC_TESTS),
    Mutant("torch-sync-double-backward-local",  # noqa: F821
           "the backward's all_reduce is not differentiable across ranks (its adjoint is this rank's gradient): "
           "second derivatives and gradient penalties across ranks are wrong", _DIST,
           "        return _AllReduce.apply(grad, ctx.group, ctx.layer), None, None\n",
           "        return grad, None, None\n", _SYNC_TESTS),
    Mutant("torch-sync-variance-constant",  # noqa: F821
           "the batch variance is treated as a constant by autograd (first and second "
           "derivatives wrong): gradcheck, gradgradcheck and the gradient penalty fail", _SYNC,
           "        output = _normalize(x, total.mean, total.var, self.weight",
           "        output = _normalize(x, total.mean, total.var.detach(), self.weight",
           ((TORCH, "tests/test_sync_double_backward.py"),)),  # noqa: F821
    Mutant("torch-sync-one-value-total", "one value per channel over all ranks returns the bias instead of raising",  # noqa: F821
           _SYNC, "            _check_total_count(input, total.count, torch.distributed.get_world_size(group))\n",
           "", _SYNC_TESTS),
    Mutant("torch-sync-timeout-unnamed",  # noqa: F821
           "a collective's timeout reaches the user as gloo's bare error, not naming the layer or the cause", _DIST,
           "        return fn(*args, **kwargs)\n    except RuntimeError as error:",
           "        return fn(*args, **kwargs)\n    except KeyError as error:", _SYNC_TESTS),
    Mutant("torch-sync-half-rounded-twice",  # noqa: F821
           "float16 input normalized in float16 (each gradient path rounded to float16 before they cancel)", _SYNC,
           "        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input",
           "        x = input", _SYNC_TESTS),
    Mutant("keras-torch-sync-agreement-skipped",  # noqa: F821
           "Keras synchronized on torch gathers statistics without the ranks' agreement",
           "plugins/normkit-keras/src/normkit_keras/_synchronized_torch.py",
           "    total = distributed.agreed_moments(local, sig, state=_AGREEMENTS.setdefault(layer, {}), layer=layer)",
           "    total = distributed.all_gather_moments(local)",
           ((KERAS, "tests/test_synchronized_torch_agreement.py"),), (("KERAS_BACKEND", "torch"),)),  # noqa: F821
]
