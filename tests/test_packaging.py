"""The four distributions as a user gets them: wheels built from copies of the source trees, installed into fresh
venvs that hold only what the wheels declare, each imported and used with ``python -W error``.

- each wheel's metadata: version 0.3.0 (its package's ``__version__``, the one source), plugins requiring
  ``normkit>=0.3.0``, the extras ``normkit[test]`` and ``normkit-keras[torch]``, ``License-Expression: MIT`` and
  the LICENSE file;
- core only (numpy, array-api-compat, pluggy): ``import normkit``, a batch norm on a numpy array, no plugin
  found, and asking for the torch plugin names the distribution to install;
- each plugin with its framework: the entry point is found, the layer computes what the native layer computes.

A fresh venv gets the frameworks without reinstalling them: a ``.pth`` file names one directory of symlinks to
the main venv's files of exactly the distributions the installed wheels require (their ``Requires-Dist``,
transitively, extras followed), so an import the wheels do not declare fails here as on a user's machine.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from filelock import FileLock
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.xdist_group("packaging")

VERSION = "0.3.0"
ROOT = Path(__file__).resolve().parents[1]
TREES = {
    "normkit": ROOT,
    "normkit-torch": ROOT / "plugins" / "normkit-torch",
    "normkit-keras": ROOT / "plugins" / "normkit-keras",
    "normkit-flax": ROOT / "plugins" / "normkit-flax",
}
OURS = set(TREES)
TIMEOUT = 240  # seconds, any one subprocess


# ---------------------------------------------------------------- wheels

def _copy_tree(source: Path, target: Path) -> Path:
    """What a source distribution holds: pyproject.toml, README.md, LICENSE and src (no build/, egg-info, tests)."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "src", target / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return target


def _build(base: Path) -> None:
    trees = [_copy_tree(source, base / "src" / name) for name, source in TREES.items()]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(base / "dist"), *map(str, trees)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (base / "built").touch()


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{distribution: wheel}``, built with the main venv's setuptools, offline, from copies (the repo is never written).

    Built once per run: under pytest-xdist the first worker builds in the workers' shared temporary directory
    while the others wait on a lock (this module's tests may land on either worker).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    base = shared / "normkit-wheels"
    with FileLock(str(shared / "normkit-wheels.lock"), timeout=2 * TIMEOUT):
        if not (base / "built").exists():
            shutil.rmtree(base, ignore_errors=True)
            _build(base)
    built = {canonicalize_name(p.name.split("-")[0]): p for p in (base / "dist").glob("*.whl")}
    assert set(built) == OURS, sorted(p.name for p in (base / "dist").iterdir())
    return built


def _metadata(wheel: Path) -> tuple[email.message.Message, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        text = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return email.parser.Parser().parsestr(text), names


def _source_version(distribution: str) -> str:
    package = distribution.replace("-", "_")
    text = (TREES[distribution] / "src" / package / "__init__.py").read_text()
    found = re.findall(r'^__version__ = "([^"]+)"$', text, flags=re.MULTILINE)
    assert len(found) == 1, f"{package}/__init__.py should assign __version__ once: {found}"
    return found[0]


def _requires(message: email.message.Message) -> dict[str, Requirement]:
    """``{"name" or "name[extra]": Requirement}`` of the Requires-Dist lines, keyed by the extra they belong to."""
    out = {}
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
        out[canonicalize_name(req.name) + (f"[{extra.group(1)}]" if extra else "")] = req
    return out


@pytest.mark.parametrize("distribution", sorted(OURS))
def test_wheel_metadata(wheels: dict[str, Path], distribution: str) -> None:
    message, names = _metadata(wheels[distribution])
    assert message["Name"] == distribution
    assert message["Version"] == VERSION == _source_version(distribution)
    assert message["License-Expression"] == "MIT"
    assert message.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert message["Requires-Python"] == ">=3.10"
    requires = _requires(message)
    if distribution == "normkit":
        assert set(message.get_all("Provides-Extra")) == {"test"}
        assert {"pytest[test]", "hypothesis[test]"} <= set(requires)
        assert {"numpy", "array-api-compat", "pluggy"} <= set(requires)
        assert not any(name.split("[")[0] in {"torch", "keras", "flax", "jax", "tensorflow"} for name in requires)
    else:
        assert str(requires["normkit"].specifier) == f">={VERSION}", requires["normkit"]
        framework = distribution.removeprefix("normkit-")
        assert framework in requires, sorted(requires)
        assert any(n == f"normkit_{framework}/py.typed" for n in names)
    if distribution == "normkit-keras":
        assert "torch" in message.get_all("Provides-Extra")
        assert str(requires["normkit-torch[torch]"].specifier) == f">={VERSION}"
    entry_points = {n for n in names if n.endswith(".dist-info/entry_points.txt")}
    assert bool(entry_points) == (distribution != "normkit")


def test_changelog_names_this_version() -> None:
    heading = re.search(r"^## \[?v?(\d[^\s\]]*)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert heading is not None and heading.group(1) == VERSION


# ---------------------------------------------------------------- fresh venvs

def _closure(requirements: list[Requirement]) -> list[metadata.Distribution]:
    """The main venv's distributions that ``requirements`` need, transitively (markers and extras evaluated)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        assert name not in OURS, f"{name} is installed from its wheel, not linked"
        try:
            dist = found.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} (needed by the wheels) is not installed in the main venv")
        assert dist.version in req.specifier or not req.specifier, f"{req}: the main venv has {dist.version}"
        first = name not in found
        found[name] = dist
        for wanted in ([""] if first else []) + sorted(req.extras):
            todo += [(Requirement(line), wanted) for line in dist.requires or []]
    return list(found.values())


def _link(distributions: list[metadata.Distribution], target: Path) -> Path:
    """A directory of symlinks to the top-level files (packages, modules, dist-info) of ``distributions``."""
    target.mkdir()
    for dist in distributions:
        site = Path(dist.locate_file(""))
        assert dist.files, f"{dist.metadata['Name']} has no RECORD"
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            if not top.endswith(".pth") and not (target / top).exists():
                (target / top).symlink_to(site / top)
    return target


def _venv(where: Path, wheels: list[Path], extra: list[str]) -> Path:
    """A fresh venv holding ``wheels`` (installed by pip) and, through a .pth, links to what they require."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    requirements = [Requirement(line) for wheel in wheels for line in _metadata(wheel)[0].get_all("Requires-Dist") or []]
    requirements = [r for r in requirements if canonicalize_name(r.name) not in OURS] + list(map(Requirement, extra))
    links = _link(_closure(requirements), where / "linked")
    site = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout.strip()
    Path(site, "linked.pth").write_text(f"{links}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index", "--no-deps",
         *map(str, wheels)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return python


PREAMBLE = """
import importlib.metadata, importlib.util, sys
import normkit
from normkit.plugin import manager
assert normkit.__file__.startswith(sys.prefix), normkit.__file__   # the wheel, not the source tree
assert normkit.__version__ == importlib.metadata.version("normkit") == "{version}"
"""

CHECKS = {
    # (wheels, extra requirements linked, environment, script)
    "core": (["normkit"], [], {}, """
        import numpy as np
        for name in ("torch", "keras", "jax", "normkit_torch"):
            assert importlib.util.find_spec(name) is None, name      # only what normkit declares is here
        x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
        out = normkit.batch_norm(x, training=True, axis=1, eps=1e-5).output
        assert np.allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-12, atol=1e-12), out
        assert manager.frameworks() == {{}}
        try:
            manager.framework("torch")
        except LookupError as error:
            assert "pip install normkit-torch" in str(error), error
        else:
            raise AssertionError("framework('torch') found a plugin that is not installed")
    """),
    "torch": (["normkit", "normkit-torch"], [], {}, """
        import torch, normkit_torch
        assert normkit_torch.__version__ == importlib.metadata.version("normkit-torch") == "{version}"
        assert set(manager.frameworks()) == {{"torch"}}
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        ours, theirs = normkit_torch.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    """),
    "keras": (["normkit", "normkit-keras"], ["jax"], {"KERAS_BACKEND": "jax"}, """
        import numpy as np, normkit_keras
        assert normkit_keras.__version__ == importlib.metadata.version("normkit-keras") == "{version}"
        assert importlib.util.find_spec("normkit_torch") is None     # normkit-keras[torch] is optional
        assert set(manager.frameworks()) == {{"keras"}}
        import keras
        x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
        ours, theirs = normkit_keras.BatchNormalization(), keras.layers.BatchNormalization()
        np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.moving_variance.value), np.asarray(theirs.moving_variance.value), rtol=1e-6)
    """),
    "flax": (["normkit", "normkit-flax"], [], {}, """
        import numpy as np, jax.numpy as jnp, normkit_flax
        from flax import nnx
        assert normkit_flax.__version__ == importlib.metadata.version("normkit-flax") == "{version}"
        assert set(manager.frameworks()) == {{"flax"}}
        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), dtype=jnp.float32)
        ours = normkit_flax.BatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0))
        theirs = nnx.BatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0))
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
    """),
}


def _check(python: Path, script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` under ``python -I -B -W error`` (isolated: no PYTHONPATH, no user site, not the cwd)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KERAS_"))}
    environment.update(env, NORMKIT_STRICT_PLUGINS="1")
    return subprocess.run([python, "-I", "-B", "-W", "error", "-c", script], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("name", list(CHECKS))
def test_fresh_venv(wheels: dict[str, Path], tmp_path: Path, name: str) -> None:
    distributions, extra, env, body = CHECKS[name]
    python = _venv(tmp_path / "venv", [wheels[d] for d in distributions], extra)
    script = (PREAMBLE + textwrap.dedent(body)).format(version=VERSION)
    done = _check(python, script, env, tmp_path)
    assert done.returncode == 0, f"{name}: rc {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
