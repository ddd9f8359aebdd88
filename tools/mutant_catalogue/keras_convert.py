"""Mutants of normkit_keras.convert (issue 24): a layer left unreported, nested layers not reached, the user's model
converted in place. Mutant and KERAS come from tools/mutants.py; the tests named kill each."""

_K = KERAS + "/src/normkit_keras/"  # noqa: F821 - predefined by tools/mutants.py
_ECO = (KERAS, "tests/test_convert_ecosystem.py", "-k")  # noqa: F821

MUTANTS = [
    Mutant(  # noqa: F821
        "keras-convert-left-unreported",
        "a norm-looking layer convert cannot convert is left without a word",
        _K + "_convert.py",
        "            summary.skipped.append((name, type(layer).__name__, reason))",
        "            pass",
        (_ECO + ("left_layers_are_named",),),
    ),
    Mutant(  # noqa: F821
        "keras-convert-top-level-only",
        "convert walks the model's own layers only, not the layers inside them "
        "(a subclassed model's nested Sequential, a keras-hub encoder layer's norms)",
        _K + "_convert.py",
        '        yield from _walk(child, f"{path}/{child.name}" if path else child.name)',
        '        yield (f"{path}/{child.name}" if path else child.name), child',
        (_ECO + ("every_norm_converted and subclassed",),),
    ),
    Mutant(  # noqa: F821
        "keras-convert-in-place",
        "convert swaps the classes of the user's own model instead of a copy's",
        _K + "_convert.py",
        "    out = copy.deepcopy(model)",
        "    out = model",
        (_ECO + ("every_norm_converted and sequential",),),
    ),
]
