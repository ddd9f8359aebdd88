"""Mutants of the public API (issue 25): test helpers leaking into the runtime namespaces.

Run by tools/mutants.py, which predefines Mutant, CORE, TORCH, KERAS and the test selections.
"""

PUBLIC_API = (CORE, "tests/test_public_api.py")  # noqa: F821 - predefined by tools/mutants.py

MUTANTS = [
    Mutant(  # noqa: F821
        "api-torch-exports-test-helper", "normkit_torch exports the collective counter of its testing module",
        "plugins/normkit-torch/src/normkit_torch/__init__.py", '    "register_conversion": "_conversions",\n',
        '    "register_conversion": "_conversions",\n    "CountCollectives": "testing",\n', (PUBLIC_API,)),
    Mutant(  # noqa: F821
        "api-core-imports-testing", "importing normkit imports its test matrix (normkit.testing's reference)",
        "src/normkit/__init__.py", "from normkit.plugin.spec import hookimpl\n",
        "from normkit.plugin.spec import hookimpl\nfrom normkit.testing import reference as _reference  # noqa: F401\n",
        (PUBLIC_API,)),
]
