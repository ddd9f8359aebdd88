"""Kernel policies under hostile use: bad environment values, bad policy names, and ``use_policy`` from threads.

Before (issue 20), ``use_policy`` kept one process-wide override: thread A entering "core" and thread B entering
"auto", A leaving first and B last, restored B's saved value ("core"): the whole process stayed on "core" for
good. Now an override belongs to the thread that entered it (a contextvars variable), other threads see each
plugin's own policy, and any interleaving of enters and exits leaves the process as it was.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from normkit.plugin import kernels
from normkit.plugin.kernels import KernelPolicy, use_policy

VAR = "NORMKIT_TEST_ADVERSARIAL_KERNELS"


@pytest.fixture
def make_policy(monkeypatch):
    def make(value):
        if value is None:
            monkeypatch.delenv(VAR, raising=False)
        else:
            monkeypatch.setenv(VAR, value)
        return KernelPolicy(VAR)

    return make


@pytest.mark.parametrize("value", ["fast", "fused", "on", "1", "cor", "auto,core", "None"])
def test_bad_environment_values_name_the_variable(make_policy, value):
    with pytest.raises(ValueError, match=rf"{VAR} must be one of \('auto', 'core'\), got '{value.lower()}'"):
        make_policy(value)


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("", "auto"), ("  ", "auto"), (" CORE ", "core"),
                                            ("Auto", "auto"), ("core\n", "core")])
def test_environment_values_are_read_as_a_user_writes_them(make_policy, value, expected):
    assert make_policy(value).get() == expected


def test_bad_policy_names_are_refused(make_policy):
    p = make_policy(None)
    for bad in ("fast", "CORE", None, 1):
        with pytest.raises(ValueError, match=rf"kernel policy must be one of \('auto', 'core'\), got {bad!r}"):
            p.set(bad)
        with pytest.raises(ValueError, match=rf"kernel policy must be one of \('auto', 'core'\), got {bad!r}"):
            with use_policy(bad):
                pass
    assert p.get() == "auto" and kernels.current_override() is None


@pytest.mark.parametrize("var,plugin", [("NORMKIT_TORCH_KERNELS", "normkit_torch")])
def test_a_plugins_bad_environment_value_is_a_clear_error(var, plugin):
    """A fresh process with a bad value: importing the plugin fails naming the variable and the allowed values."""
    env = dict(os.environ, **{var: "fastest"}, NORMKIT_STRICT_PLUGINS="1")
    out = subprocess.run([sys.executable, "-c", f"import {plugin}; {plugin}.get_kernel_policy()"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"{var} must be one of ('auto', 'core'), got 'fastest'" in out.stderr, out.stderr[-2000:]


def test_nesting_and_exceptions_restore_the_enclosing_policy(make_policy):
    p = make_policy(None)
    with use_policy("core"):
        assert p.get() == "core"
        with use_policy("auto"):
            assert p.get() == "auto"
            with pytest.raises(RuntimeError):
                with use_policy("core"):
                    raise RuntimeError
            assert p.get() == "auto"
        assert p.get() == "core"
    assert p.get() == "auto" and kernels.current_override() is None


# --- threads -------------------------------------------------------------------------------------------

class Worker:
    """A thread that runs commands one at a time, when told: the test chooses the interleaving exactly."""

    def __init__(self, policy: KernelPolicy) -> None:
        self.policy, self.commands, self.answers = policy, queue.Queue(), queue.Queue()
        self.blocks: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            command = self.commands.get()
            if command is None:
                return
            try:
                if command == "exit":
                    self.blocks.pop().__exit__(None, None, None)
                elif command != "get":
                    block = use_policy(command)
                    block.__enter__()
                    self.blocks.append(block)
                self.answers.put(self.policy.get())
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.answers.put(exc)

    def do(self, command: str) -> str:
        self.commands.put(command)
        answer = self.answers.get(timeout=30)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def stop(self) -> None:
        self.commands.put(None)
        self.thread.join(timeout=30)


def _interleavings():
    """Two threads' programs (each a balanced sequence of enters and exits) and an order to run their steps in."""
    program = st.lists(st.sampled_from(["auto", "core"]), min_size=1, max_size=3).map(
        lambda ps: ps + ["exit"] * len(ps))
    return st.tuples(program, program, st.lists(st.booleans(), min_size=12, max_size=12))


@given(case=_interleavings(), default=st.sampled_from(["auto", "core"]))
@settings(max_examples=20, deadline=None, derandomize=True)
def test_use_policy_from_two_threads_in_any_interleaving(case, default):
    a_steps, b_steps, picks = case  # everything drawn first: a draw mid-way could abort with blocks open
    policy = KernelPolicy(VAR)
    policy.value = default  # the process default of this plugin
    workers = [Worker(policy), Worker(policy)]
    try:
        programs = [list(a_steps), list(b_steps)]
        stacks: list[list[str]] = [[], []]
        while programs[0] or programs[1]:
            i = (0 if picks.pop() else 1) if programs[0] and programs[1] else (0 if programs[0] else 1)
            step = programs[i].pop(0)
            if step == "exit":
                stacks[i].pop()
            else:
                stacks[i].append(step)
            assert workers[i].do(step) == (stacks[i][-1] if stacks[i] else default)
            other = 1 - i  # the other thread is untouched by this one's step
            assert workers[other].do("get") == (stacks[other][-1] if stacks[other] else default)
            assert policy.get() == default  # the main thread never entered a block
        for w in workers:
            assert w.do("get") == default
        assert kernels.current_override() is None and kernels._OPEN[0] == 0
    finally:
        for w in workers:
            while w.blocks:  # a failed example: leave no block open
                w.do("exit")
            w.stop()


def test_the_issue_sequence_leaves_the_process_on_its_default():
    """The report's case: A enters core, B enters core, A leaves, B leaves; then the process default holds."""
    import normkit_torch

    torch_policy = normkit_torch.get_kernel_policy if hasattr(normkit_torch, "get_kernel_policy") else None
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def a():
        try:
            with use_policy("core"):
                a_in.set()
                b_in.wait(10)
            a_out.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def b():
        try:
            a_in.wait(10)
            with use_policy("core"):
                b_in.set()
                a_out.wait(10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert kernels.current_override() is None
    if torch_policy is not None:
        assert torch_policy() == "auto"


def test_kernel_lookups_follow_each_threads_policy():
    """Thread A under "core" and thread B under "auto", at the same time: the core functional API on a torch
    tensor reaches torch's kernel in B only (the cached lookup is per policy, never shared across them)."""
    import torch

    import normkit as nk
    from normkit._dispatch import kernel_for
    from normkit._namespace import array_namespace

    x = torch.randn(4, 3)
    xp = array_namespace(("x", x))
    barrier = threading.Barrier(2, timeout=30)
    found: dict[str, list] = {"core": [], "auto": []}

    def run(policy):
        with use_policy(policy):
            for _ in range(3):
                barrier.wait()
                found[policy].append(kernel_for("batch_norm", xp, x))
                nk.batch_norm(x, training=True)
                barrier.wait()

    threads = [threading.Thread(target=run, args=(p,)) for p in ("core", "auto")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert found["core"] == [None] * 3
    assert all(k is not None for k in found["auto"]) and len(found["auto"]) == 3
    np.testing.assert_equal(kernels.current_override(), None)
