"""The docs site builds with mkdocs --strict (any warning fails): the guide is the README, and each API page
documents every public name of its package from the docstrings."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["normkit", "normkit_torch", "normkit_keras", "normkit_flax"]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    run = _build(ROOT / "mkdocs.yml", site)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WARNING" not in run.stderr, run.stderr[-3000:]
    return site


def test_guide_is_the_readme(site):
    page = (site / "index.html").read_text()
    for heading in re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), flags=re.M):
        assert re.sub(r"`([^`]*)`", r"<code>\1</code>", heading).replace("&", "&amp;") in page, heading
    assert 'src="lr_sweep.png"' in page and (site / "lr_sweep.png").is_file()  # the README's figure, linked


@pytest.mark.parametrize("package", PACKAGES)
def test_api_page_documents_every_public_name(site, package):
    page = (site / "api" / f"{package}.html").read_text()
    names = importlib.import_module(package).__all__
    assert names
    missing = [name for name in names if f'id="{package}.{name}"' not in page]
    assert not missing, f"{package}: no entry for {missing}"


def test_a_broken_reference_fails_the_build(tmp_path):
    """--strict is in force: a page naming an object that does not exist aborts the build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# broken\n\n::: normkit.no_such_name\n")
    config = tmp_path / "mkdocs.yml"
    text = (ROOT / "mkdocs.yml").read_text()
    text = text.replace("docs_dir: docs", f"docs_dir: {docs}").replace("tools/docs_hooks.py",
                                                                     str(ROOT / "tools" / "docs_hooks.py"))
    text = re.sub(r"nav:\n(  .*\n)+", "", text)
    text = re.sub(r"paths: \[([^\]]*)\]", lambda m: "paths: [" + ", ".join(
        str(ROOT / p.strip()) for p in m[1].split(",")) + "]", text)
    config.write_text(text)
    run = _build(config, tmp_path / "site")
    assert run.returncode != 0
    assert "normkit.no_such_name" in run.stderr
