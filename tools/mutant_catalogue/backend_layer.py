"""Mutants of the backend layer (issue 25): a framework fact back in an algorithm module, or lost from the layer.

Run by tools/mutants.py, which predefines Mutant and CORE.
"""

NO_FRAMEWORK = (CORE, "tests/test_core_knows_no_framework.py")  # noqa: F821 - predefined by tools/mutants.py

MUTANTS = [
    Mutant(  # noqa: F821
        "backend-framework-name-replanted", "update_running_stats tests for torch itself instead of asking the backend",
        "src/normkit/_running.py", "    cut = backend(xp).stop_gradient\n",
        '    cut = (lambda a: a.detach()) if type(batch.mean).__module__.startswith("torch") else backend(xp).stop_gradient\n',
        (NO_FRAMEWORK,)),
    Mutant(  # noqa: F821
        "backend-torch-keeps-history", "the torch backend's stop_gradient is the identity: running statistics keep autograd history",
        "src/normkit/_backend.py", '"array_api_compat.torch": Backend("array_api_compat.torch", stop_gradient=_detach),',
        '"array_api_compat.torch": Backend("array_api_compat.torch"),',
        ((CORE, "tests/test_batch_norm.py", "-k", "running_statistics_carry_no_gradient_torch"),)),  # noqa: F821
]
