"""Mutants of the packaging (issue 25): each puts back one defect tests/test_packaging.py must catch.

Run by tools/mutants.py, which predefines Mutant, CORE and the test selections. Needs README.md, LICENSE and
CHANGELOG.md in tools/mutants.py's SOURCES (the wheels are built from the copy's trees).
"""

PACKAGING = (CORE, "tests/test_packaging.py")  # noqa: F821 - predefined by tools/mutants.py

MUTANTS = [
    Mutant(  # noqa: F821
        "packaging-plugin-floor-dropped", "normkit-torch requires normkit with no lower bound (it uses the 0.3 API)",
        "plugins/normkit-torch/pyproject.toml", '"normkit>=0.3.0", "torch>=2.1"', '"normkit", "torch>=2.1"',
        ((*PACKAGING, "-k", "wheel_metadata and normkit-torch"),)),
    Mutant(  # noqa: F821
        "packaging-keras-torch-extra-dropped", "normkit-keras no longer offers the [torch] extra (normkit-torch)",
        "plugins/normkit-keras/pyproject.toml", 'torch = ["normkit-torch>=0.3.0"]\n', "",
        ((*PACKAGING, "-k", "wheel_metadata and normkit-keras"),)),
    Mutant(  # noqa: F821
        "packaging-undeclared-dependency", "normkit imports pluggy without declaring it",
        "pyproject.toml", '"pluggy>=1.3", ', "",
        ((*PACKAGING, "-k", "fresh_venv and core"),)),
    Mutant(  # noqa: F821
        "packaging-missing-plugin-unnamed", "asking for a framework whose plugin is missing does not name the distribution",
        "src/normkit/plugin/manager.py",
        'f"install the distribution {wanted!r} (pip install {wanted})" if wanted else', '"" if wanted else',
        ((*PACKAGING, "-k", "fresh_venv and core"),)),
]
