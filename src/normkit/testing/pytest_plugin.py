"""Opt-in pytest plugin: ``pytest_plugins = ["normkit.testing.pytest_plugin"]``.

Fixtures:
- ``backend``: parametrized over every selected array backend (``--backends=numpy,torch,...``);
- ``harness_case``: ``(harness, LayerCase, policy)`` over every selected framework (``--frameworks=torch,keras``)
  and every kernel policy of the case.
A named backend or framework that cannot be loaded fails the run instead of being skipped.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from normkit.testing.backends import Backend, BackendSpec

_BACKENDS: dict[str, Backend] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("normkit")
    group.addoption("--backends", default="default",
                    help="comma-separated array backends of the matrix; 'default' = every default backend, "
                         "'none' = no array-matrix tests (e.g. a Keras-only run)")
    group.addoption("--frameworks", default="all",
                    help="comma-separated frameworks whose layers run the conformance suite; 'all' or 'none'")


def _specs() -> dict[str, BackendSpec]:
    from normkit.plugin.manager import plugin_manager
    from normkit.testing.backends import builtin_backends

    specs: dict[str, BackendSpec] = {}
    for answer in [builtin_backends(), *plugin_manager().hook.normkit_test_backends()]:
        for item in answer:
            spec = item if isinstance(item, BackendSpec) else BackendSpec(item.name, (lambda b=item: b))
            if spec.name in specs:
                raise pytest.UsageError(f"two plugins contribute a test backend named {spec.name!r}")
            specs[spec.name] = spec
    return specs


def selected_backends(config: pytest.Config) -> list[str]:
    """Backend names chosen by ``--backends``; unknown names are a usage error."""
    value = config.getoption("--backends")
    specs = _specs()
    if value == "none":
        return []
    if value == "default":
        return [name for name, spec in specs.items() if spec.default]
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise pytest.UsageError(f"--backends names unknown backends {unknown}; known: {sorted(specs)}")
    return names


def load_backend(name: str) -> Backend:
    """Build (once) the backend ``name``; a missing library is a loud failure, never a skip."""
    if name not in _BACKENDS:
        spec = _specs()[name]
        try:
            _BACKENDS[name] = spec.make()
        except ImportError as exc:
            pytest.fail(f"backend {name!r} was requested but cannot be loaded: {exc}", pytrace=False)
    return _BACKENDS[name]


def selected_harnesses(config: pytest.Config) -> list[Any]:
    """Harnesses of the frameworks chosen by ``--frameworks``."""
    from normkit.plugin.manager import plugin_manager

    value = config.getoption("--frameworks")
    if value == "none":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()] if value != "all" else []
    # an unknown name is refused from the plugins' framework names, before any harness imports its framework
    known = {name for answer in plugin_manager().hook.normkit_frameworks() for name in answer}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise pytest.UsageError(
            f"--frameworks names {unknown}, but no installed plugin provides them; installed: {sorted(known)}"
        )
    harnesses = [h for answer in plugin_manager().hook.normkit_test_harnesses() for h in answer]
    by_name = {h.name: h for h in harnesses}
    if value == "all":
        return harnesses
    missing = [n for n in names if n not in by_name]
    if missing:
        raise pytest.UsageError(
            f"--frameworks names {missing}, but no installed plugin provides them; installed: {sorted(by_name)}"
        )
    return [by_name[n] for n in names]


def pytest_configure(config: pytest.Config) -> None:
    # validate early: unknown names stop the run before collection
    selected_backends(config)
    if config.getoption("--frameworks") not in ("all", "none"):
        selected_harnesses(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config), indirect=True)
    if "harness_case" in metafunc.fixturenames:
        params = []
        for harness in selected_harnesses(metafunc.config):
            # one framework's cases on one pytest-xdist worker (--dist loadgroup): eager JAX compiles each
            # primitive per shape and dtype once per process, so Flax's cases split over two workers compile twice
            group = pytest.mark.xdist_group(f"conformance-{harness.name}")
            for case in harness.cases():
                for policy in case.policies:
                    params.append(pytest.param((harness, case, policy), id=f"{harness.name}-{case.id}-{policy}",
                                               marks=group))
        metafunc.parametrize("harness_case", params)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The array backend of this test's parameter; the test runs under the backend's kernel policy."""
    from normkit.plugin.kernels import use_policy

    b = load_backend(request.param)
    with use_policy(b.policy):
        yield b
