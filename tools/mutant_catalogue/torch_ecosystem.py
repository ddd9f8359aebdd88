"""Mutants of issue 24's torch half: convert for the ecosystem's norm layers, accumulate_statistics, checkpoint.

Run by tools/mutants.py, which predefines Mutant, CORE, TORCH, KERAS and the test selections.
"""

_SRC = "plugins/normkit-torch/src/normkit_torch/"
_ECO = (TORCH, "tests/test_ecosystem.py", "-k")  # noqa: F821 - predefined by tools/mutants.py
_ACC = (TORCH, "tests/test_accumulate.py", "-k")  # noqa: F821

MUTANTS = [
    Mutant(  # noqa: F821
        "torch-checkpoint-recompute-updates", "the forward recomputed by torch.utils.checkpoint updates the running "
        "statistics again (num_batches_tracked 2 after one step)",
        _SRC + "_recording.py", "return torch._C._current_graph_task_id() != -1", "return False",
        ((TORCH, "tests/test_checkpoint.py", "-k", "once and auto and BatchNorm"),)),  # noqa: F821
    Mutant(  # noqa: F821
        "torch-accumulate-last-micro-batch", "accumulate_statistics folds the last micro-batch's statistics only",
        _SRC + "_accumulate.py", "merged = merged.merge(part)", "merged = part",
        (_ACC + ("concatenated and auto and BatchNorm2d",),)),
    Mutant(  # noqa: F821
        "torch-accumulate-sync-local", "SyncBatchNorm records this rank's statistics, not the merge across ranks",
        _SRC + "_sync.py", "and not skip_running_update(self, total)", "and not skip_running_update(self, local)",
        (_ACC + ("gloo",),)),
    Mutant(  # noqa: F821
        "torch-convert-rms-cast-after-weight", "the converted LlamaRMSNorm casts back after the weight (OLMo's form)",
        _SRC + "_conversions.py", "return self.weight * h.to(x.dtype)", "return (self.weight * h).to(x.dtype)",
        (_ECO + ("rms_family and auto and llama",),)),
    Mutant(  # noqa: F821
        "torch-convert-t5-float64-in-float32", "the converted T5LayerNorm multiplies float64 input in float32",
        _SRC + "_conversions.py", "if torch.finfo(x.dtype).bits > 32:", "if False:",
        (_ECO + ("rms_family and auto and t5",),)),
    Mutant(  # noqa: F821
        "torch-convert-layer-norm-2d-permute", "the converted LayerNorm2d permutes back to the wrong axis order",
        _SRC + "_conversions.py", "return x.permute(0, 3, 1, 2)", "return x.permute(0, 3, 2, 1)",
        (_ECO + ("layer_norm_2d and auto",),)),
    Mutant(  # noqa: F821
        "torch-convert-report-silent", "convert says nothing about a norm-looking module it cannot convert",
        _SRC + "_convert.py", "    elif _conversions.looks_like_norm(module):", "    elif False:",
        (_ECO + ("report_names",),)),
    Mutant(  # noqa: F821
        "torch-convert-rms-any-forward", "a module with weight and variance_epsilon converts whatever its forward",
        _SRC + "_conversions.py", 'form = _FORMS.get(_canonical(forward) or "")',
        'form = _FORMS.get(_canonical(forward) or "", "llama")',
        (_ECO + ("report_names",),)),
]
