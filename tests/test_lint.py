"""``ruff check`` (the repo's ruff.toml: pyflakes, pycodestyle errors, isort) reports nothing on the code we ship
and test: src, plugins, tests, tools, examples, benchmarks and the root conftest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "plugins", "tests", "tools", "examples", "benchmarks", "conftest.py"]


def ruff() -> str:
    """The ruff next to this interpreter (the venv's pinned one), else the one on PATH; a missing ruff fails."""
    here = Path(sys.executable).with_name("ruff")
    found = str(here) if here.is_file() else shutil.which("ruff")
    assert found, "ruff is not installed (requirements/test.txt pins it): install it, this check is never skipped"
    return found


def test_ruff_check_finds_nothing():
    config = ROOT / "ruff.toml"
    assert config.is_file(), config
    run = subprocess.run([ruff(), "check", "--config", str(config), "--no-cache", "--output-format", "concise",
                          *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"ruff check found problems (fix them or `ruff check --fix`):\n{run.stdout}{run.stderr}"
