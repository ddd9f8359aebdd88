"""Shared plumbing of the example scripts: command line, results folder, figures, threads.

Every example is ``python examples/NAME.py [--fast] [--out DIR]`` and has ``main(argv=None) -> dict``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "results"


def parse_args(argv, description: str, add_arguments=None) -> argparse.Namespace:
    """``--fast`` (few steps, for the tests) and ``--out DIR`` (created; default ``results/``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fast", action="store_true", help="few steps: a smoke run for the tests")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the figures (default: results/ at the repo root)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def save(fig, out: Path, name: str) -> str:
    """Write ``fig`` to ``out/name`` as PNG, close it, print and return the path."""
    import matplotlib.pyplot as plt

    path = Path(out) / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"figure: {path}")
    return str(path)


def torch_threads() -> None:
    """One intra-op thread: these models are tiny, and on a busy machine torch's spinning OpenMP
    threads made a small BatchNorm CNN epoch 5-20x slower with 2 threads than with 1."""
    import torch

    torch.set_num_threads(1)


def heading(text: str) -> None:
    print()
    print(text)
    print("-" * len(text))


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


def load_digits_arrays():
    """scikit-learn's bundled 8x8 digits (no download): images (N, 8, 8) in [0, 1] float32, labels (N,)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


def split(n: int, test_fraction: float = 0.2, seed: int = 0):
    """A fixed shuffled train/test split of ``range(n)``."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]
