"""The conformance suite every adapter's layers run through: normkit layer vs native layer vs float64 NumPy.

A plugin contributes a ``Harness`` (hook ``normkit_test_harnesses``); ``tests/test_conformance.py``
runs ``CHECKS`` over every ``LayerCase`` of every harness, once per kernel policy of the case
("auto": the plugin's fused kernels where offered; "core": normkit's own math). Every check judges
normkit by the float64 reference, and by the native layer unless the case marks it wrong. A harness
speaks NumPy at its edges so the checks stay framework-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

__all__ = ["LayerCase", "Harness", "CHECKS", "tolerance", "native_known_wrong"]

State = dict[str, np.ndarray]


@dataclass
class LayerCase:
    """One layer configuration: how to build both twins, what input it takes, and its reference math.

    ``reference(x, state, training)`` returns ``(y, new_state)`` computed in float64 NumPy from the
    state names of the native layer (only the entries that change need to be in ``new_state``).
    """

    id: str
    make_normkit: Callable[[], Any]
    make_native: Callable[[], Any]
    input_shape: tuple[int, ...]
    reference: Callable[[np.ndarray, State, bool], tuple[np.ndarray, State]]
    dtype: str = "float64"
    data_offset: float = 0.0  # mean of the generated input (tests shifted data when large)
    extra: dict[str, Any] = field(default_factory=dict)
    # (x, upstream, state) -> (dx, {weight name: gradient}) in float64; every case should have them:
    # the gradients are then judged by the reference as well as by the native layer
    reference_gradients: Callable[[np.ndarray, np.ndarray, State], tuple[np.ndarray, State]] | None = None
    # kernel policies the case runs under (normkit.plugin.kernels.use_policy): "auto" is what a user
    # gets (a plugin's fused kernel where one is offered), "core" is normkit's own math
    policies: tuple[str, ...] = ("auto", "core")


def native_known_wrong(case: LayerCase, check: str) -> str | None:
    """Why the native layer is no judge for ``check`` on ``case`` (``extra["native_known_wrong"]``), or None.

    A harness sets it where the native layer is measurably off the float64 reference (Keras's
    one-pass variance on torch, its float64 downcast on jax/torch, torch's float32 rounding at
    mean 1e4). Those checks then hold normkit to the reference alone, and, where
    ``extra["native_wrong_strict"]`` is true (the default), also assert the native layer really is
    off, so a fixed native layer shows up as a failure that asks for the mark to go.
    """
    reason = case.extra.get("native_known_wrong")
    if reason and check in case.extra.get("native_wrong_checks", ()):
        return reason
    return None


class Harness(Protocol):
    """What the suite needs from a framework; every array in or out is a NumPy array."""

    name: str

    def cases(self) -> list[LayerCase]: ...

    def copy_state(self, src: Any, dst: Any) -> None:
        """Make ``dst``'s weights and statistics equal to ``src``'s (native -> normkit or back)."""

    def forward(self, layer: Any, x: np.ndarray, training: bool) -> np.ndarray:
        """Output of one call; in training mode the layer's statistics are updated as a user's step would."""

    def gradients(self, layer: Any, x: np.ndarray, upstream: np.ndarray) -> tuple[np.ndarray, State]:
        """Training-mode gradients of ``sum(output * upstream)``: w.r.t. the input and each trainable weight by name."""

    def state(self, layer: Any) -> State:
        """Every weight and statistic, by the native layer's names, in its order."""

    def roundtrip(self, layer: Any) -> Any:
        """The layer after the framework's own save and load (state_dict / .keras file)."""


def _eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


def _terms(case: LayerCase) -> int:
    """An upper bound on the number of terms in any sum of the case: the input's size."""
    n = 1
    for d in case.input_shape:
        n *= int(d)
    return n


def tolerance(case: LayerCase, scale: float, *, uncentred: bool = False, parties: int = 1) -> dict[str, float]:
    """Tolerance for a quantity of magnitude ``scale`` (max |reference|) computed in ``case.dtype``.

    The formula, from float round-off: every sum of n terms is off by at most about sqrt(n) * eps of
    its terms' scale (random-sign rounding), and a few more operations follow, so

        rtol = atol / scale = 4 * sqrt(n) * eps                         (n: the input's size)

    ``uncentred`` adds the error of implementations that form ``x * scale + shift`` instead of
    ``(x - mean) * scale`` (torch's and Keras's own kernels): the cancellation costs about
    ``|offset| / std * eps`` per element, times the output's scale, with a factor 4. ``parties``
    is the number of float32 implementations whose errors add (2 when normkit meets the native layer).
    """
    eps = _eps(case.dtype)
    unit = 4.0 * float(np.sqrt(_terms(case))) * eps
    atol = unit * max(scale, 1.0)
    if uncentred and case.data_offset:
        atol += 4.0 * eps * abs(case.data_offset) / _DATA_STD * max(scale, 1.0)
    return dict(rtol=parties * unit, atol=parties * atol)


_DATA_STD = 2.0  # the generated input is offset + 0.5 + 2 * N(0, 1)


def _scale(*arrays: np.ndarray) -> float:
    return max(float(np.max(np.abs(a))) if np.size(a) else 0.0 for a in arrays)


def _input(case: LayerCase, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.input_shape) * _DATA_STD + 0.5 + case.data_offset
    return x.astype(case.dtype)


def _assert_states_close(got: State, want: State, what: str, tol_of: Callable[[np.ndarray], dict]) -> None:
    assert list(got) == list(want), f"{what}: state names {list(got)} != {list(want)}"
    for name in want:
        np.testing.assert_allclose(got[name], want[name], err_msg=f"{what}: {name}", **tol_of(want[name]))


def check_state_names(h: Harness, case: LayerCase, policy: str = "auto") -> None:
    """Same weight/statistic names, shapes and dtypes as the native layer, in the same order."""
    ours, native = h.state(case.make_normkit()), h.state(case.make_native())
    assert list(ours) == list(native)
    for name in native:
        assert ours[name].shape == native[name].shape, name
        assert ours[name].dtype == native[name].dtype, name
        np.testing.assert_array_equal(ours[name], native[name], err_msg=f"initial value of {name}")


def _native_forward(h: Harness, native: Any, x: np.ndarray, training: bool, judged: bool,
                    case: LayerCase) -> np.ndarray | None:
    """The native layer's output. Where the case is marked native-wrong and names the error the native
    layer raises (``extra["native_error"]``, a regex), that error means "wrong"; any other error fails."""
    pattern = case.extra.get("native_error")
    if judged or not pattern:
        return h.forward(native, x, training=training)
    try:
        return h.forward(native, x, training=training)
    except Exception as exc:  # noqa: BLE001 - only the declared error passes
        if re.search(pattern, f"{type(exc).__name__}: {exc}"):
            return None
        raise


def _uncentred(policy: str) -> bool:
    """Whether normkit may compute through a native kernel that scales before centring (policy auto)."""
    return policy == "auto"


def check_train_steps(h: Harness, case: LayerCase, policy: str = "auto") -> None:
    """Several training steps: outputs and statistics equal the float64 reference and the native layer."""
    ours, native = case.make_normkit(), case.make_native()
    h.copy_state(native, ours)
    reason = native_known_wrong(case, "train_steps")
    judged = reason is None
    native_off = False
    ref_state = {k: v.astype(np.float64) for k, v in h.state(native).items()}
    for step in range(3):
        x = _input(case, seed=step)
        y_native = _native_forward(h, native, x, True, judged, case)
        y_ours = h.forward(ours, x, training=True)
        y_ref, updates = case.reference(x.astype(np.float64), ref_state, True)
        ref_state = {**ref_state, **updates}
        tol = tolerance(case, _scale(y_ref), uncentred=_uncentred(policy))
        np.testing.assert_allclose(y_ours, y_ref, err_msg=f"step {step} output vs float64 reference", **tol)
        state = h.state(ours)
        for name, value in updates.items():
            np.testing.assert_allclose(state[name], value, err_msg=f"step {step} {name} vs reference",
                                       **tolerance(case, _scale(value)))
        if judged:
            np.testing.assert_allclose(y_ours, y_native, err_msg=f"step {step} output vs native",
                                       **tolerance(case, _scale(y_ref), uncentred=True, parties=2))
            _assert_states_close(state, h.state(native), f"step {step} vs native",
                                 lambda want: tolerance(case, _scale(want), parties=2))
        else:
            native_off = native_off or y_native is None or not np.allclose(
                y_native, y_ref, **tolerance(case, _scale(y_ref), uncentred=True))
    if not judged and case.extra.get("native_wrong_strict", True) and not native_off:
        raise AssertionError(f"the native layer matched the float64 reference although marked wrong ({reason}): drop the mark")


def check_eval(h: Harness, case: LayerCase, policy: str = "auto") -> None:
    """Inference after a training step uses the running statistics, as the native layer does.

    The float64 reference trains on the same batch from the same state: normkit's statistics must
    equal the reference's own (never fed back into their judge). The inference output is then judged
    by the reference evaluated with normkit's statistics as stored (a float32 running mean at 1e4 is
    one storage rounding, 5e-4, from the float64 one), which tests the inference math itself, centring
    included, to round-off.
    """
    ours, native = case.make_normkit(), case.make_native()
    h.copy_state(native, ours)
    judged = native_known_wrong(case, "eval") is None
    ref_state = {k: v.astype(np.float64) for k, v in h.state(native).items()}
    x = _input(case, seed=10)
    _native_forward(h, native, x, True, judged, case)
    h.forward(ours, x, training=True)
    _, updates = case.reference(x.astype(np.float64), ref_state, True)
    state = h.state(ours)
    for name, value in updates.items():
        np.testing.assert_allclose(state[name], value, err_msg=f"{name} after a training step vs reference",
                                   **tolerance(case, _scale(value)))
    x2 = _input(case, seed=11)
    y_ours = h.forward(ours, x2, training=False)
    y_ref, _ = case.reference(x2.astype(np.float64), {k: v.astype(np.float64) for k, v in state.items()}, False)
    np.testing.assert_allclose(y_ours, y_ref, err_msg="eval output vs float64 reference on the layer's statistics",
                               **tolerance(case, _scale(y_ref), uncentred=_uncentred(policy)))
    if judged:
        y_native = h.forward(native, x2, training=False)
        np.testing.assert_allclose(y_ours, y_native, err_msg="eval output vs native",
                                   **tolerance(case, _scale(y_ref), uncentred=True, parties=2))
        _assert_states_close(h.state(ours), h.state(native), "eval leaves statistics",
                             lambda want: tolerance(case, _scale(want), parties=2))


def _assert_gradients_close(got: tuple[np.ndarray, State], want: tuple[np.ndarray, State], what: str,
                            tol_of: Callable[[np.ndarray], dict]) -> None:
    np.testing.assert_allclose(got[0], want[0], err_msg=f"input gradient vs {what}", **tol_of(want[0]))
    assert sorted(got[1]) == sorted(want[1]), f"weights with gradients {sorted(got[1])} vs {what} {sorted(want[1])}"
    for name in want[1]:
        np.testing.assert_allclose(got[1][name], want[1][name], err_msg=f"gradient of {name} vs {what}",
                                   **tol_of(want[1][name]))


def check_gradients(h: Harness, case: LayerCase, policy: str = "auto") -> None:
    """Training-mode input and weight gradients equal the float64 reference's and the native layer's."""
    ours, native = case.make_normkit(), case.make_native()
    h.copy_state(native, ours)
    x = _input(case, seed=20)
    upstream = np.random.default_rng(21).standard_normal(x.shape).astype(case.dtype)
    got = h.gradients(ours, x, upstream)
    reason = native_known_wrong(case, "gradients")
    if case.reference_gradients is None and reason is not None:
        raise AssertionError(f"the native layer is no judge here ({reason}) and the case has no float64 reference gradients")
    if case.reference_gradients is not None:
        state = {k: v.astype(np.float64) for k, v in h.state(ours).items()}
        want = case.reference_gradients(x.astype(np.float64), upstream.astype(np.float64), state)
        _assert_gradients_close(got, want, "float64 reference",
                                lambda w: tolerance(case, _scale(w), uncentred=_uncentred(policy)))
    if reason is None:
        _assert_gradients_close(got, h.gradients(native, x, upstream), "native",
                                lambda w: tolerance(case, _scale(w), uncentred=True, parties=2))


def check_roundtrip(h: Harness, case: LayerCase, policy: str = "auto") -> None:
    """After a training step, the framework's save/load gives back the same statistics and outputs."""
    ours = case.make_normkit()
    x = _input(case, seed=30)
    h.forward(ours, x, training=True)
    again = h.roundtrip(ours)
    assert type(again) is type(ours), f"round trip gave {type(again).__name__}, not {type(ours).__name__}"
    _assert_states_close(h.state(again), h.state(ours), "after round trip", lambda want: dict(rtol=0, atol=0))
    np.testing.assert_allclose(h.forward(again, x, training=False), h.forward(ours, x, training=False), rtol=0, atol=0)


CHECKS: dict[str, Callable[[Harness, LayerCase, str], None]] = {
    "state_names": check_state_names,
    "train_steps": check_train_steps,
    "eval": check_eval,
    "gradients": check_gradients,
    "roundtrip": check_roundtrip,
}
