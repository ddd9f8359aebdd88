"""Mutants of plugin discovery and the Keras layers' registration (issue 25): each puts back one defect
plugins/normkit-keras/tests/test_discovery.py must catch.

Run by tools/mutants.py, which predefines Mutant, KERAS and the test selections. The tests run in the JAX stage.
"""

DISCOVERY = (KERAS, "tests/test_discovery.py")  # noqa: F821 - predefined by tools/mutants.py
JAX = (("KERAS_BACKEND", "jax"),)

MUTANTS = [
    Mutant(  # noqa: F821
        "discovery-imports-the-package", "the entry module takes the kernel policy from normkit_keras at import, so "
        "discovering plugins runs normkit_keras's __init__ (its import hook at sys.meta_path[0])",
        "plugins/normkit-keras/src/_normkit_keras_plugin.py",
        "from normkit.plugin.manager import imported_module\n",
        "from normkit.plugin.manager import imported_module\nfrom normkit_keras._policy import POLICY  # noqa: F401\n",
        ((*DISCOVERY, "-k", "leaves_the_process_alone"),), JAX),
    Mutant(  # noqa: F821
        "discovery-hook-registers-nothing", "the import hook lets keras load but never imports the layer modules: "
        "a process that imports normkit_keras before keras cannot load its .keras files",
        "plugins/normkit-keras/src/normkit_keras/_registration.py",
        "            exec_module(module)\n            _import_layer_modules()\n",
        "            exec_module(module)\n",
        ((*DISCOVERY, "-k", "leaves_the_process_alone"),), JAX),
    Mutant(  # noqa: F821
        "discovery-keras-first-unregistered", "import normkit_keras with keras already imported registers nothing "
        "(it waits for an import of keras that never comes)",
        "plugins/normkit-keras/src/normkit_keras/_registration.py",
        "        _import_layer_modules()\n        return\n", "        return\n",
        ((*DISCOVERY, "-k", "imported_before"),), JAX),
]
