"""Mutants of normkit-keras's accumulate_statistics (issue 24): the fold keeps one micro-batch instead of the
exact merge of all of them; the tests named kill it. Mutant and KERAS come from tools/mutants.py."""

_K = KERAS + "/src/normkit_keras/"

MUTANTS = [
    Mutant("keras-accumulate-last-micro-batch", "the fold on exit uses the last recorded micro-batch, not the merge",
           _K + "_accumulate.py", "merged = merged.merge(part)", "merged = part",
           ((KERAS, "tests/test_accumulate.py", "-k", "one_layer_cases"),)),
]
