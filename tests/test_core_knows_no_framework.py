"""normkit's algorithm modules name no framework: every framework fact lives in the backend layer (``_backend``).

Read from the source with ``ast`` (nothing imported). Each module of ``src/normkit`` is either an algorithm
module (``ALGORITHMS``) or infrastructure (``INFRASTRUCTURE``: the backend layer, the namespace lookup, the kernel
dispatch, NumPy's fast path, the plugin host, the test helpers); a new module must be put in one of the two.

In an algorithm module, a *framework name* is one of ``FRAMEWORKS`` (torch, jax, jaxlib, tensorflow, tf, dask,
cupy, flax, keras, numpy, np, array_api_compat, array_api_strict) appearing as a word (separated by anything but
a letter or digit; ``_`` and ``.`` separate, so ``_torch_compiling``, ``numpy_fast`` and ``"jax.numpy"`` count,
``tfoo`` does not), case-insensitively, in:

- an identifier: a name read or bound, an attribute, a function, class or argument name, a keyword argument;
- an import: the module imported from and every name imported or bound (``from normkit import _numpy_fast``);
- a string constant that is not a docstring (f-string parts included): a namespace name compared or looked up
  (``"array_api_compat.numpy"``), a module-name test (``startswith("torch")``), a framework named in an error.

Docstrings (the first statement of a module, class or function) and comments do not count: they state a
convention ("torch's momentum"), they never choose a code path.

One exception, ``NUMPY_HOST``: ``_state`` keeps ``NormState``'s fields as NumPy arrays (the portable storage
format, on every framework), so there the names ``np``/``numpy`` may be used to compute on that storage; still no
comparison (``is``, ``==``, ``in``, ...) may have ``np``/``numpy`` as an operand (``xp is np`` branches on it),
no other framework word, and no numpy word in a string.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "normkit"
ALGORITHMS = (
    "_moments", "_batch_norm", "_family", "_preprocessing", "_running", "_backward", "_ghost", "_state",
    "_validate", "_moment_types", "_conversion",
)
INFRASTRUCTURE = ("__init__", "_backend", "_namespace", "_dispatch", "_numpy_fast", "_imports", "plugin", "testing")
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "tf", "dask", "cupy", "flax", "keras", "numpy", "np",
              "array_api_compat", "array_api_strict")
NUMPY_HOST = {"_state": "NormState stores NumPy arrays"}
_WORD = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(FRAMEWORKS, key=len, reverse=True)) + r")(?![a-z0-9])")
_NUMPY = {"numpy", "np"}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def _texts(node: ast.AST, docstrings: set[int]) -> list[tuple[str, str]]:
    """(kind, text) of every name-like text ``node`` carries."""
    if isinstance(node, ast.Name):
        return [("name", node.id)]
    if isinstance(node, ast.Attribute):
        return [("attribute", node.attr)]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [("definition", node.name)]
    if isinstance(node, ast.arg):
        return [("argument", node.arg)]
    if isinstance(node, ast.keyword) and node.arg:
        return [("keyword", node.arg)]
    if isinstance(node, ast.alias):
        return [("import", node.name)] + ([("import", node.asname)] if node.asname else [])
    if isinstance(node, ast.ImportFrom) and node.module:
        return [("import", node.module)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
        return [("string", node.value)]
    return []


def framework_names(source: str, filename: str, numpy_host: bool = False) -> list[str]:
    """Every framework name in ``source`` by the module docstring's rules, as ``file:line: kind 'text'``."""
    tree = ast.parse(source, filename)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        for kind, text in _texts(node, docstrings):
            words = set(_WORD.findall(text.lower()))
            if numpy_host and kind in ("name", "import") and text in _NUMPY:
                words -= _NUMPY
            if words:
                found.append(f"{filename}:{line}: {kind} {text!r} names {', '.join(sorted(words))}")
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Name) and operand.id in _NUMPY:
                    found.append(f"{filename}:{line}: comparison with {operand.id!r} branches on numpy")
    return found


def _modules() -> list[str]:
    return sorted(p.stem if p.is_file() else p.name for p in SRC.iterdir()
                  if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").is_file()))


def test_every_core_module_is_classified():
    unknown = [m for m in _modules() if m not in ALGORITHMS and m not in INFRASTRUCTURE]
    missing = [m for m in ALGORITHMS + INFRASTRUCTURE if m not in _modules()]
    assert not unknown, f"put each new module of src/normkit in ALGORITHMS or INFRASTRUCTURE: {unknown}"
    assert not missing, f"listed but not in src/normkit: {missing}"


@pytest.mark.parametrize("module", ALGORITHMS)
def test_algorithm_module_names_no_framework(module):
    path = SRC / f"{module}.py"
    found = framework_names(path.read_text(), f"src/normkit/{path.name}", numpy_host=module in NUMPY_HOST)
    assert not found, (
        "an algorithm module names a framework; move the fact into normkit._backend (a Backend property, "
        "or a namespace attribute a plugin sets):\n" + "\n".join(found))


PLANTED = textwrap.dedent('''
    """Docstring naming torch, jax and np.ndarray: not counted."""
    import numpy as np
    from normkit import _numpy_fast as fast
    from jax import lax

    _NAIVE = frozenset({"array_api_compat.numpy", "array_api_strict"})


    def _torch_compiling():
        """tf.function: not counted."""
        return None


    def f(xp, a, cupy_array=None):
        # torch in a comment: not counted
        if type(a).__module__.startswith("torch"):
            return a.detach()
        if xp is np:
            return fast.applies(a)
        g(a, keras_like=True)
        raise TypeError(f"not a {a!r} of dask")


    def clean(xp, x, tfoo=None, stop=None):
        """A function with no framework name: nothing found in it."""
        return xp.sum(x, axis=0) + len("contiguous")
''')


def test_self_test_finds_each_planted_name():
    found = framework_names(PLANTED, "planted.py")
    lines = "\n".join(found)
    for expected in ("import 'numpy'", "import 'np'", "import '_numpy_fast'", "import 'jax'",
                     "string 'array_api_compat.numpy'", "string 'array_api_strict'", "definition '_torch_compiling'",
                     "argument 'cupy_array'", "string 'torch'", "name 'np'", "keyword 'keras_like'",
                     "string ' of dask'", "comparison with 'np'"):
        assert expected in lines, f"{expected} not found in:\n{lines}"
    assert not any("'normkit'" in f for f in found), f"normkit itself counted:\n{lines}"
    assert not any(f.startswith(("planted.py:2:", "planted.py:11:")) for f in found), f"a docstring counted:\n{lines}"
    assert not any("clean" in f or "tfoo" in f or "contiguous" in f for f in found), lines


def test_self_test_numpy_host_may_compute_on_numpy_but_not_branch():
    host = textwrap.dedent('''
        import numpy as np

        def store(v):
            a = np.asarray(v, dtype=np.float64)
            return bool(np.all(a >= 0))

        def branch(xp, v):
            return xp is np or "numpy" in repr(v)
    ''')
    found = framework_names(host, "host.py", numpy_host=True)
    assert any("comparison with 'np'" in f for f in found), found
    assert any("string 'numpy'" in f for f in found), found
    assert not any(":5:" in f or ":6:" in f for f in found), found
    assert framework_names(host.replace("import numpy as np", "import torch as np"), "host.py", numpy_host=True)
