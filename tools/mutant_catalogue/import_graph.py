"""Mutants of the import graph (issue 25): each puts back one import cycle that tests/test_import_graph.py must catch.

Run by tools/mutants.py, which predefines Mutant and CORE. Each mutant changes no behaviour (the import runs in a
function, after every module is loaded): only the import-graph test can kill it.
"""

GRAPH = ((CORE, "tests/test_import_graph.py", "-k", "no_import_cycle"),)  # noqa: F821 - predefined by tools/mutants.py

MUTANTS = [
    Mutant(  # noqa: F821
        "import-cycle-package-from-submodule", "torch's unfreeze reaches BatchNorm*d through the package it is "
        "re-exported from (normkit_torch -> _frozen -> normkit_torch), not the defining module",
        "plugins/normkit-torch/src/normkit_torch/_frozen.py",
        '    target = getattr(_batchnorm, cls.get(type(module), "BatchNorm"))\n',
        '    import normkit_torch\n\n    target = getattr(normkit_torch, cls.get(type(module), "BatchNorm"))\n',
        GRAPH),
    Mutant(  # noqa: F821
        "import-cycle-host-imports-its-callers", "the plugin host clears the namespace cache by importing the "
        "namespace lookup in a function (normkit._namespace -> plugin.manager -> normkit._namespace)",
        "src/normkit/plugin/manager.py",
        "    for forget in list(_ON_CHANGE):\n        forget()\n",
        "    from normkit._namespace import clear_cache\n\n    for forget in list(_ON_CHANGE):\n        forget()\n"
        "    clear_cache()\n",
        GRAPH),
]
