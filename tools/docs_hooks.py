"""mkdocs hooks (mkdocs.yml): the guide page is the README itself, and each API page documents its package's
``__all__``, so neither is written twice.

``docs/index.md`` holds a marker that becomes README.md (its ``docs/NAME`` figure links made relative to the
page). ``docs/api/PKG.md`` holds a marker that becomes the package docstring and one mkdocstrings block per
public name (the plugins load their names lazily, so a static reader sees no members of their own).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

README = "<!-- README.md goes here"
API = re.compile(r"<!-- API of (?P<package>[a-z_]+) -->")


def _api(package: str) -> str:
    names = importlib.import_module(package).__all__  # the plugins' packages import no framework for this
    blocks = [f"::: {package}\n    options:\n      members: false\n      show_root_heading: false"]
    blocks += [f"::: {package}.{name}\n    options:\n      heading_level: 2" for name in sorted(names, key=str.lower)]
    return "\n\n".join(blocks) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, **_: Any) -> str:
    if markdown.startswith(README):
        readme = Path(config["config_file_path"]).parent / "README.md"
        return readme.read_text(encoding="utf-8").replace("](docs/", "](")
    return API.sub(lambda m: _api(m["package"]), markdown)
