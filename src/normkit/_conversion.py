"""``ConversionReport``: what a plugin's ``convert(model)`` did, and the warning for what it left.

Framework-neutral: a plugin walks its model, records each converted and each left normalization layer
by path, then hands the model to ``ConversionReport.finish``: the report is returned, or the layers left
are named in one ``UnconvertedNormWarning`` (never silent).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Union

__all__ = ["ConversionReport", "UnconvertedNormWarning"]


class UnconvertedNormWarning(UserWarning):
    """``convert`` left layers that look like normalization layers as they were; each is named with its path."""


class ConversionReport(NamedTuple):
    """What ``convert(model, report=True)`` did: ``(path, class name, normkit class name)`` per converted layer,
    ``(path, class name, reason)`` per normalization-like layer left as it was."""

    converted: list[tuple[str, str, str]]
    skipped: list[tuple[str, str, str]]

    def finish(self, model: Any, *, report: bool, noun: str = "layer") -> Union[Any, tuple[Any, "ConversionReport"]]:
        """``(model, self)`` when ``report``; else ``model``, after an ``UnconvertedNormWarning`` naming every
        skipped ``noun`` (path, class, reason) if there is one. The warning points at ``convert``'s caller."""
        if report:
            return model, self
        if self.skipped:
            listed = "; ".join(f"{path} ({cls}): {reason}" for path, cls, reason in self.skipped)
            warnings.warn(
                f"convert left {len(self.skipped)} normalization {noun}(s) as they were: {listed}",
                UnconvertedNormWarning,
                stacklevel=3,
            )
        return model
