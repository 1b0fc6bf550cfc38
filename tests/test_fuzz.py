"""Fuzzing the public LSTM API with hypothesis.

Random sizes (zero and negative included), dtypes, memory layouts, NaN, Inf and huge values drive
``LSTM(...)``, ``forward``, ``backward`` and ``step``. Every call must either raise ValueError or
TypeError, or return results of the documented shapes that match the float64 numpy reference when
the inputs are finite and moderate. A crash of the interpreter fails the run. The default suite runs
50 examples per backend; ``-m slow`` runs 10,000.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference  # noqa: E402
from helpers import assert_close  # noqa: E402

import fastlstm  # noqa: E402

OTHER_DTYPES = [np.float16, np.int8, np.uint64, np.bool_, np.complex64, object]
LAYOUTS = ["contiguous", "fortran", "strided", "reversed"]
SPECIALS = ["nan", "inf", "-inf", "huge"]
STATE_KINDS = ["batch", "hidden", "dtype", "fortran", "read-only", "list"]


def _rarely(draw, value, usual):
    # value with probability 1/10, else a draw from the strategy usual.
    return value if draw(st.integers(0, 9)) == 0 else draw(usual)


@st.composite
def cases(draw):
    return {
        "sizes": (_rarely(draw, -1, st.integers(1, 5)), _rarely(draw, 0, st.integers(1, 6)),
                  _rarely(draw, 0, st.integers(1, 3))),
        "dtype": draw(st.sampled_from(["float32", "float64"])),
        "forget_bias": draw(st.sampled_from([0.0, 1.0, -2.5])),
        "batch": _rarely(draw, 0, st.integers(1, 4)),
        "steps": draw(st.integers(0, 5)),
        "input_dtype": _rarely(draw, "other", st.sampled_from([np.float32, np.float64, np.int64])),
        "other_input_dtype": draw(st.sampled_from(OTHER_DTYPES)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "special": _rarely(draw, "other", st.just("none")),
        "other_special": draw(st.sampled_from(SPECIALS)),
        "time_major": draw(st.booleans()),
        "state_kind": _rarely(draw, "other", st.just("ok")),
        "other_state_kind": draw(st.sampled_from(STATE_KINDS)),
        "with_final": draw(st.booleans()),
        "gradient_special": _rarely(draw, "other", st.just("none")),
        "other_gradient_special": draw(st.sampled_from(["nan", "huge"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _resolve(case):
    # Replace each "other" by the rare alternative drawn for it.
    for key in ("input_dtype", "special", "state_kind", "gradient_special"):
        if isinstance(case[key], str) and case[key] == "other":
            case[key] = case[f"other_{key}"]
    return case


def _layout(array, layout):
    if layout == "fortran" or array.ndim == 0:
        return np.asfortranarray(array)
    if layout == "strided":
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(array[::-1])[::-1]
    return array


def _make_input(case, rng, input_size):
    shape = (case["steps"], case["batch"]) if case["time_major"] else (case["batch"], case["steps"])
    dtype = np.dtype(case["input_dtype"])
    if np.issubdtype(dtype, np.integer):
        # Token ids [B, T]: in range, and sometimes one out of range.
        ids = rng.integers(0, max(input_size, 1), size=shape)
        if case["special"] == "huge" and ids.size:
            ids.flat[0] = input_size
        return _layout(ids.astype(dtype), case["layout"]) if ids.ndim else ids
    x = rng.normal(size=shape + (input_size,))
    if x.size:
        if case["special"] in ("nan", "inf", "-inf"):
            x.flat[rng.integers(x.size)] = float(case["special"])
        elif case["special"] == "huge":
            x *= 1e4
    return _layout(x.astype(dtype), case["layout"])


def _make_state(case, model, rng):
    shape = (model.num_layers, 2, case["batch"], model.hidden_size)
    state = (0.5 * rng.normal(size=shape)).astype(model.dtype)
    kind = case["state_kind"]
    if kind == "batch":
        return np.zeros(shape[:2] + (shape[2] + 1, shape[3]), dtype=model.dtype)
    if kind == "hidden":
        return np.zeros(shape[:3] + (shape[3] + 1,), dtype=model.dtype)
    if kind == "dtype":
        return state.astype(np.float64 if model.dtype == np.float32 else np.float32)
    if kind == "fortran":
        # A buffer that is C- and Fortran-contiguous at once (at most one row of length > 1) is valid.
        return np.asfortranarray(state)
    if kind == "read-only":
        state.flags.writeable = False
    if kind == "list":
        return state.tolist()
    return state


def _time_major_float(case, x, input_size):
    # The input as a float64 time-major array [T, B, I] (one-hot for token ids).
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        x = np.eye(input_size)[x]
    x = x.astype(np.float64)
    return x if case["time_major"] else x.transpose(1, 0, 2)


def _check_case(backend, case):
    case = _resolve(dict(case))
    rng = np.random.default_rng(case["seed"])
    input_size, hidden_size, num_layers = case["sizes"]
    try:
        model = fastlstm.LSTM(input_size, hidden_size, num_layers, forget_bias=case["forget_bias"],
                              dtype=case["dtype"], backend=backend, seed=case["seed"])
    except (ValueError, TypeError):
        assert min(case["sizes"]) < 1
        event("constructor rejected the sizes")
        return
    assert min(case["sizes"]) >= 1
    dtype = model.dtype
    model.params[...] += rng.uniform(-0.5, 0.5, size=model.params.size).astype(dtype)
    x = _make_input(case, rng, input_size)
    state = _make_state(case, model, rng)
    initial = None if isinstance(state, list) else np.array(state, dtype=np.float64)

    try:
        y, tape = model.forward(x, state, time_major=case["time_major"], keep_tape=True)
    except (ValueError, TypeError) as error:
        event(f"forward rejected the arguments ({type(error).__name__})")
        if initial is not None:
            np.testing.assert_array_equal(state, initial.astype(state.dtype), err_msg="state changed by a failed call")
        return
    # The call was accepted: every argument must have been valid.
    assert case["state_kind"] == "ok" or (case["state_kind"] == "fortran" and state.flags.c_contiguous)
    assert case["batch"] >= 1
    assert np.dtype(case["input_dtype"]) in (np.float32, np.float64) or np.issubdtype(case["input_dtype"], np.integer)
    expected_shape = ((case["steps"], case["batch"], hidden_size) if case["time_major"]
                      else (case["batch"], case["steps"], hidden_size))
    assert y.shape == expected_shape
    assert y.dtype == dtype

    xt = _time_major_float(case, x, input_size)
    finite = case["special"] in ("none", "huge") and np.all(np.isfinite(xt))
    moderate = finite and case["special"] == "none"
    if case["steps"] == 0:
        # No step: empty outputs, the state unchanged, and the final-state gradient passed through.
        np.testing.assert_array_equal(state, initial.astype(dtype))
        grads = model.backward(tape, np.zeros(y.shape, dtype=dtype), initial.astype(dtype))
        np.testing.assert_array_equal(grads.params, 0.0)
        np.testing.assert_array_equal(grads.initial_state, initial.astype(dtype))
        event("zero steps")
        return
    with np.errstate(all="ignore"):  # the reference warns on the NaN and Inf cases
        y_ref, final_ref, tape_ref = reference.forward(model.params.astype(np.float64), xt, initial,
                                                       model.forget_bias)
    y_ref = y_ref if case["time_major"] else y_ref.transpose(1, 0, 2)
    if finite:
        assert np.all(np.isfinite(y))
        assert np.all(np.isfinite(state))
    event("forward compared with the reference" if moderate else "forward checked for finiteness"
          if finite else "forward ran on NaN or Inf")
    if moderate:
        assert_close(y, y_ref, dtype, "outputs")
        assert_close(state, final_ref, dtype, "final state")

    d_y = rng.normal(size=y.shape)
    if case["gradient_special"] == "nan" and d_y.size:
        d_y.flat[0] = np.nan
    elif case["gradient_special"] == "huge":
        d_y *= 1e20
    d_final = rng.normal(size=state.shape) if case["with_final"] else None
    grads = model.backward(tape, d_y.astype(dtype), None if d_final is None else d_final.astype(dtype))
    assert grads.params.shape == model.params.shape
    assert grads.initial_state.shape == state.shape
    if moderate and case["gradient_special"] == "none":
        d_params, d_state, d_x = reference.backward(
            model.params.astype(np.float64), tape_ref,
            (d_y if case["time_major"] else d_y.transpose(1, 0, 2)).astype(dtype).astype(np.float64),
            None if d_final is None else d_final.astype(dtype).astype(np.float64))
        assert_close(grads.params, d_params, dtype, "params gradient")
        assert_close(grads.initial_state, d_state, dtype, "state gradient")
        if grads.inputs is not None:
            d_x = d_x if case["time_major"] else d_x.transpose(1, 0, 2)
            assert_close(grads.inputs, d_x, dtype, "input gradient")

    # One streaming step from the final state, on the first time step of x.
    x_t = x[0] if case["time_major"] else x[:, 0]
    before = state.astype(np.float64)
    out = model.step(x_t, state)
    assert out.shape == (case["batch"], hidden_size)
    if moderate:
        step_ref, step_final, _ = reference.forward(model.params.astype(np.float64), xt[:1], before,
                                                    model.forget_bias)
        assert_close(out, step_ref[0], dtype, "step output")
        assert_close(state, step_final, dtype, "state after step")


FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                             HealthCheck.too_slow])


@settings(max_examples=50, **FUZZ_SETTINGS)
@given(case=cases())
def test_fuzz_api(backend, case):
    _check_case(backend, case)


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ_SETTINGS)
@given(case=cases())
def test_fuzz_api_long(backend, case):
    _check_case(backend, case)
