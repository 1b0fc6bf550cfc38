"""The Numba kernels called directly, against the numpy reference in ``reference.py``.

Every array here is time-major, as the kernels take it. Float32 kernels are compared with the
float64 reference run on the same (float32-rounded) inputs.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
import reference
from conftest import ATOL, RTOL
from reference import backward as reference_backward
from reference import forward as reference_forward

from fastlstm import _numba_kernels as kernels
from fastlstm._layout import layer_offsets, num_params

DTYPES = [np.float32, np.float64]

# (L, I, H, B, T, forget_bias). H = 257 makes every weight block large enough for the packed tiles
# (and the weight gradients for BLAS); I = 300 with H = 8 makes only layer 0's input block that large.
# B = 7 with H = 65 puts a row past the last tile of 6 and columns in a partial panel of 16 (4H = 260
# and, backwards, H = 65); B = 12 with H = 48 fills whole tiles and panels.
SHAPES = [
    (1, 3, 5, 2, 4, 1.0),
    (3, 1, 4, 5, 15, 1.0),
    (2, 4, 4, 3, 6, 0.0),
    (4, 6, 3, 3, 5, 1.0),
    (2, 3, 1, 2, 3, 1.0),
    (2, 2, 3, 1, 6, 0.5),
    (2, 5, 3, 4, 1, 1.0),
    (1, 300, 8, 2, 3, 1.0),
    (2, 7, 257, 3, 3, 1.0),
    (2, 33, 65, 7, 4, 1.0),
    (1, 40, 48, 12, 3, 0.0),
]
SHAPE_IDS = [f"L{s[0]}-I{s[1]}-H{s[2]}-B{s[3]}-T{s[4]}" for s in SHAPES]


def assert_close(actual, expected, dtype, what):
    """Compare with the per-dtype tolerances, the absolute part scaled by max |expected|."""
    dtype = np.dtype(dtype)
    scale = max(1.0, float(np.max(np.abs(expected)))) if np.size(expected) else 1.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                               err_msg=what)


def make_problem(shape, dtype, seed=0):
    """Parameters with distinct per-gate biases, input x [T, B, I] and a nonzero state [L, 2, B, H]."""
    num_layers, input_size, hidden, batch, steps, _ = shape
    rng = np.random.default_rng(seed)
    params = np.empty(num_params(input_size, hidden, num_layers))
    for layer, (start, bias_start, end) in enumerate(layer_offsets(input_size, hidden, num_layers)):
        rows = (bias_start - start) // (4 * hidden)
        limit = np.sqrt(6.0 / (rows + 4 * hidden))
        params[start:bias_start] = rng.uniform(-limit, limit, size=bias_start - start)
        params[bias_start:end] = rng.uniform(-0.5, 0.5, size=end - bias_start)
    x = rng.normal(size=(steps, batch, input_size))
    state = rng.normal(scale=0.5, size=(num_layers, 2, batch, hidden))
    return params.astype(dtype), x.astype(dtype), state.astype(dtype)


def tape_buffers(shape, dtype, slots):
    num_layers, _, hidden, batch, steps, _ = shape
    gates = np.empty((slots, steps, batch, 4 * hidden), dtype=dtype)
    cs = np.empty((slots, steps + 1, batch, hidden), dtype=dtype)
    hs = np.empty((slots, steps + 1, batch, hidden), dtype=dtype)
    return gates, cs, hs


def run_forward(params, x, state, forget_bias, keep_tape):
    """Call kernels.forward on a copy of state; return (final_state, gates, cs, hs)."""
    num_layers, _, batch, hidden = state.shape
    shape = (num_layers, x.shape[2], hidden, batch, x.shape[0], forget_bias)
    gates, cs, hs = tape_buffers(shape, params.dtype, num_layers if keep_tape else 1)
    final = state.copy()
    kernels.forward(params, x, final, gates, cs, hs, forget_bias, keep_tape)
    return final, gates, cs, hs


def run_backward(params, x, gates, cs, hs, d_y, d_final_state, grad):
    """Call kernels.backward, accumulating into grad; return (d_state, d_x)."""
    steps, batch, input_size = x.shape
    num_layers, hidden = gates.shape[0], hs.shape[3]
    d_state = np.full((num_layers, 2, batch, hidden), np.nan, dtype=params.dtype)
    d_x = np.full((steps, batch, input_size), np.nan, dtype=params.dtype)
    dz = np.empty((steps, batch, 4 * hidden), dtype=params.dtype)
    d_hidden = np.empty((steps, batch, hidden), dtype=params.dtype)
    kernels.backward(params, x, gates, cs, hs, d_y, d_final_state, grad, d_state, d_x, dz, d_hidden)
    return d_state, d_x


def reference_run(params, x, state, forget_bias):
    return reference_forward(params.astype(np.float64), x.astype(np.float64), state.astype(np.float64),
                             forget_bias)


# Matrix products.

# (M, K, N): below and above 6 rows, row counts off the tile of 6 (7, 13) and past a chunk of 192 rows
# (197, 390), and column counts off the panel of 16 (260, 100, 37). In (13, 40, 16) K * N is below
# TILE_MIN_WEIGHTS, so every row runs in the row loops.
PRODUCT_SHAPES = [(1, 40, 260), (5, 40, 260), (6, 40, 260), (7, 33, 260), (13, 40, 16), (197, 48, 100),
                  (390, 33, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner,cols", PRODUCT_SHAPES)
def test_products_match_numpy_and_ignore_row_position(dtype, rows, inner, cols):
    rng = np.random.default_rng(rows + inner + cols)
    x = rng.normal(size=(rows, inner)).astype(dtype)
    w = rng.normal(size=(inner, cols)).astype(dtype)
    bias = rng.normal(size=cols).astype(dtype)
    dz = rng.normal(size=(rows, cols)).astype(dtype)

    out = np.full((rows, cols), np.nan, dtype=dtype)
    kernels._matmul_bias(x, w, bias, out)
    assert_close(out, x.astype(np.float64) @ w.astype(np.float64) + bias, dtype, "x @ w + bias")
    back = np.full((rows, inner), np.nan, dtype=dtype)
    kernels._matmul_transposed(dz, w, back)
    assert_close(back, dz.astype(np.float64) @ w.astype(np.float64).T, dtype, "dz @ w.T")

    # Each row alone takes the row loops, or a padded tile through the transposed weights. It must get
    # the bits that its tile in the batch gave.
    for r in range(rows):
        alone = np.empty((1, cols), dtype=dtype)
        kernels._matmul_bias(x[r:r + 1], w, bias, alone)
        np.testing.assert_array_equal(alone[0], out[r], err_msg=f"x @ w + bias, row {r}")
        alone_back = np.empty((1, inner), dtype=dtype)
        kernels._matmul_transposed(dz[r:r + 1], w, alone_back)
        np.testing.assert_array_equal(alone_back[0], back[r], err_msg=f"dz @ w.T, row {r}")


@st.composite
def tile_cases(draw):
    """Models around the tiles: weights below and above TILE_MIN_WEIGHTS elements, batches across
    the tile of 6 rows and its padding, column counts off the panel of 16."""
    return {"input": draw(st.integers(1, 70)), "hidden": draw(st.integers(8, 70)),
            "layers": draw(st.integers(1, 2)), "batch": draw(st.integers(1, 26)),
            "steps": draw(st.integers(1, 3)), "position": draw(st.integers(0, 25)),
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**16))}


def _check_tile_case(case):
    # The public API on the Numba backend against the float64 reference, and one sample alone
    # against the same sample at a drawn position in the batch, bit for bit.
    dtype = case["dtype"]
    model = helpers.make_model("numba", case["input"], case["hidden"], case["layers"], dtype,
                               seed=case["seed"])
    x, state = helpers.random_inputs(model, case["batch"], case["steps"], seed=case["seed"])
    expected_y, expected_state, tape_ref = helpers.reference_forward(model, x, state)
    d_y = np.random.default_rng(case["seed"]).normal(size=expected_y.shape).astype(dtype)
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                d_y.transpose(1, 0, 2).astype(np.float64))

    final = state.copy()
    y, tape = model.forward(x, final, keep_tape=True)
    grads = model.backward(tape, d_y)
    helpers.assert_close(y, expected_y, dtype, "outputs")
    helpers.assert_close(final, expected_state, dtype, "final state")
    helpers.assert_close(grads.params, d_params, dtype, "params gradient")
    helpers.assert_close(grads.initial_state, d_state, dtype, "state gradient")
    helpers.assert_close(grads.inputs, d_x.transpose(1, 0, 2), dtype, "input gradient")

    row = case["position"] % case["batch"]
    alone_final = state[:, :, row:row + 1].copy()
    alone_y, alone_tape = model.forward(x[row:row + 1].copy(), alone_final, keep_tape=True)
    alone = model.backward(alone_tape, d_y[row:row + 1].copy())
    np.testing.assert_array_equal(alone_y[0], y[row], err_msg="outputs")
    np.testing.assert_array_equal(alone_final[:, :, 0], final[:, :, row], err_msg="final state")
    np.testing.assert_array_equal(alone.initial_state[:, :, 0], grads.initial_state[:, :, row],
                                  err_msg="state gradient")
    np.testing.assert_array_equal(alone.inputs[0], grads.inputs[row], err_msg="input gradient")


TILE_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=30, **TILE_SETTINGS)
@given(case=tile_cases())
def test_fuzz_tiles(case):
    _check_tile_case(case)


@pytest.mark.slow
@settings(max_examples=2000, **TILE_SETTINGS)
@given(case=tile_cases())
def test_fuzz_tiles_long(case):
    _check_tile_case(case)


# Forward.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("keep_tape", [True, False])
def test_forward_matches_reference(dtype, shape, keep_tape):
    params, x, state = make_problem(shape, dtype)
    forget_bias = shape[5]
    y, final_ref, _ = reference_run(params, x, state, forget_bias)

    final, _, _, hs = run_forward(params, x, state, forget_bias, keep_tape)

    assert_close(hs[-1, 1:], y, dtype, "top layer outputs hs[-1, 1:]")
    assert_close(final, final_ref, dtype, "final state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_tape_matches_reference(dtype, shape):
    params, x, state = make_problem(shape, dtype)
    _, _, tape = reference_run(params, x, state, shape[5])

    _, gates, cs, hs = run_forward(params, x, state, shape[5], True)

    hidden = shape[2]
    for layer, (_, cs_ref, hs_ref, acts_ref) in enumerate(tape):
        assert_close(cs[layer], np.stack(cs_ref), dtype, f"cs of layer {layer}")
        assert_close(hs[layer], np.stack(hs_ref), dtype, f"hs of layer {layer}")
        for gate, name in enumerate("ijfo"):
            expected = np.stack([acts[gate] for acts in acts_ref])
            actual = gates[layer, :, :, gate * hidden:(gate + 1) * hidden]
            assert_close(actual, expected, dtype, f"gate {name} of layer {layer}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_leaves_inputs_unchanged(dtype):
    shape = SHAPES[1]
    params, x, state = make_problem(shape, dtype)
    params_before, x_before = params.copy(), x.copy()

    run_forward(params, x, state, shape[5], True)

    np.testing.assert_array_equal(params, params_before)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[-1]], ids=[SHAPE_IDS[1], SHAPE_IDS[-1]])
def test_forward_is_bitwise_repeatable(dtype, shape):
    params, x, state = make_problem(shape, dtype)
    first = run_forward(params, x, state, shape[5], True)
    second = run_forward(params, x, state, shape[5], True)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 4, 6, 7, 1.0), (2, 20, 33, 7, 4, 1.0)], ids=["loops", "tiles"])
def test_forward_sample_independent_of_batch(dtype, shape):
    # A sample's result must not depend on the batch around it. With H = 4 every product runs in the
    # row loops; with H = 33 and B = 7 the batch runs in packed tiles (one of them zero-padded) and
    # each sample alone in the row loops.
    params, x, state = make_problem(shape, dtype)
    final, _, _, hs = run_forward(params, x, state, 1.0, False)

    for b in range(shape[3]):
        final_b, _, _, hs_b = run_forward(params, x[:, b:b + 1].copy(), state[:, :, b:b + 1].copy(), 1.0,
                                          False)
        np.testing.assert_array_equal(hs_b[-1, 1:, 0], hs[-1, 1:, b])
        np.testing.assert_array_equal(final_b[:, :, 0], final[:, :, b])

    order = np.random.default_rng(1).permutation(shape[3])
    final_p, _, _, hs_p = run_forward(params, x[:, order].copy(), state[:, :, order].copy(), 1.0, False)
    np.testing.assert_array_equal(hs_p[-1, 1:], hs[-1, 1:][:, order])
    np.testing.assert_array_equal(final_p, final[:, :, order])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4, 257])
def test_forward_saturated_gates_stay_finite(dtype, hidden):
    # Pre-activations near the largest finite value must saturate the gates, not overflow.
    shape = (2, 3, hidden, 2, 3, 1.0)
    params, x, state = make_problem(shape, dtype)
    huge = np.finfo(dtype).max / 4
    x[...] = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, huge, -huge)
    params = np.clip(params * 10.0, -1.0, 1.0).astype(dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        final, gates, _, hs = run_forward(params, x, state, 1.0, True)

    assert np.all(np.isfinite(hs))
    assert np.all(np.isfinite(final))
    assert np.all((gates[:, :, :, :hidden] >= 0.0) & (gates[:, :, :, :hidden] <= 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_propagates_nan(dtype):
    shape = (2, 3, 4, 2, 3, 1.0)
    params, x, state = make_problem(shape, dtype)
    x[1, 0, 2] = np.nan

    final, _, _, hs = run_forward(params, x, state, 1.0, True)

    assert np.all(np.isfinite(hs[-1, 1:2]))
    assert np.all(np.isnan(hs[-1, 2:, 0]))
    assert np.all(np.isnan(final[:, :, 0]))
    assert np.all(np.isfinite(final[:, :, 1]))


# Backward.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_d_final_state", [True, False], ids=["d_final_state", "no_d_final_state"])
def test_backward_matches_reference(dtype, shape, with_d_final_state):
    params, x, state = make_problem(shape, dtype)
    num_layers, _, hidden, batch, steps, forget_bias = shape
    rng = np.random.default_rng(7)
    d_y = rng.normal(size=(steps, batch, hidden)).astype(dtype)
    d_final_state = rng.normal(size=state.shape).astype(dtype) if with_d_final_state else None
    _, _, tape = reference_run(params, x, state, forget_bias)
    d_params_ref, d_state_ref, d_x_ref = reference_backward(
        params.astype(np.float64), tape, d_y.astype(np.float64),
        None if d_final_state is None else d_final_state.astype(np.float64))

    _, gates, cs, hs = run_forward(params, x, state, forget_bias, True)
    grad_before = rng.normal(size=params.shape).astype(dtype)
    grad = grad_before.copy()
    d_state, d_x = run_backward(params, x, gates, cs, hs, d_y, d_final_state, grad)

    # grad is accumulated into, so subtracting its starting value leaves this call's gradient.
    assert_close(grad.astype(np.float64) - grad_before, d_params_ref, dtype, "parameter gradient")
    assert_close(d_state, d_state_ref, dtype, "initial state gradient")
    assert_close(d_x, d_x_ref, dtype, "input gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_huge_cell_state_stays_finite(dtype):
    # With c_prev = 1e30 and saturated gates, dc * c_prev overflows float32 unless the sigmoid
    # derivative (exactly 0) multiplies c_prev first.
    shape = (2, 2, 3, 3, 4, 1.0)
    params, x, state = make_problem(shape, dtype)
    x *= 1e4
    state[:, 0] = 1e30 * np.sign(state[:, 0])
    _, gates, cs, hs = run_forward(params, x, state, 1.0, True)
    grad = np.zeros_like(params)
    d_state, d_x = run_backward(params, x, gates, cs, hs, np.ones_like(hs[-1, 1:]), np.ones_like(state),
                                grad)

    assert np.all(np.isfinite(grad))
    assert np.all(np.isfinite(d_state))
    assert np.all(np.isfinite(d_x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_accumulates_across_calls(dtype):
    shape = SHAPES[2]
    params, x, state = make_problem(shape, dtype)
    d_y = np.random.default_rng(3).normal(size=(shape[4], shape[3], shape[2])).astype(dtype)
    _, gates, cs, hs = run_forward(params, x, state, shape[5], True)

    once = np.zeros_like(params)
    run_backward(params, x, gates, cs, hs, d_y, None, once)
    twice = np.zeros_like(params)
    run_backward(params, x, gates, cs, hs, d_y, None, twice)
    run_backward(params, x, gates, cs, hs, d_y, None, twice)

    assert_close(twice, 2.0 * once.astype(np.float64), dtype, "gradient after two calls")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[-1]], ids=[SHAPE_IDS[1], SHAPE_IDS[-1]])
def test_backward_is_bitwise_repeatable(dtype, shape):
    params, x, state = make_problem(shape, dtype)
    d_y = np.random.default_rng(3).normal(size=(shape[4], shape[3], shape[2])).astype(dtype)
    _, gates, cs, hs = run_forward(params, x, state, shape[5], True)
    results = []
    for _ in range(2):
        grad = np.zeros_like(params)
        d_state, d_x = run_backward(params, x, gates, cs, hs, d_y, None, grad)
        results.append((grad, d_state, d_x))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_sample_independent_of_batch(dtype):
    shape = (2, 3, 4, 5, 6, 1.0)
    params, x, state = make_problem(shape, dtype)
    d_y = np.random.default_rng(3).normal(size=(shape[4], shape[3], shape[2])).astype(dtype)
    _, gates, cs, hs = run_forward(params, x, state, 1.0, True)
    d_state, d_x = run_backward(params, x, gates, cs, hs, d_y, None, np.zeros_like(params))

    for b in range(shape[3]):
        x_b = x[:, b:b + 1].copy()
        _, gates_b, cs_b, hs_b = run_forward(params, x_b, state[:, :, b:b + 1].copy(), 1.0, True)
        d_state_b, d_x_b = run_backward(params, x_b, gates_b, cs_b, hs_b, d_y[:, b:b + 1].copy(), None,
                                        np.zeros_like(params))
        np.testing.assert_array_equal(d_state_b[:, :, 0], d_state[:, :, b])
        np.testing.assert_array_equal(d_x_b[:, 0], d_x[:, b])


# Step.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_step_matches_one_step_forward(dtype, shape):
    params, x, state = make_problem(shape, dtype)
    forget_bias = shape[5]
    x_t = x[0].copy()
    final_forward, _, _, hs = run_forward(params, x[:1].copy(), state, forget_bias, False)
    y_ref, final_ref, _ = reference_run(params, x[:1], state, forget_bias)

    stepped = state.copy()
    gates = np.empty((shape[3], 4 * shape[2]), dtype=dtype)
    kernels.step(params, x_t, stepped, gates, forget_bias)

    assert_close(stepped, final_forward.astype(np.float64), dtype, "state after step vs forward")
    assert_close(stepped, final_ref, dtype, "state after step vs reference")
    assert_close(stepped[-1, 1], y_ref[0], dtype, "top output after step")


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_repeated_matches_forward(dtype):
    shape = SHAPES[1]
    params, x, state = make_problem(shape, dtype)
    y_ref, final_ref, _ = reference_run(params, x, state, shape[5])

    stepped = state.copy()
    gates = np.empty((shape[3], 4 * shape[2]), dtype=dtype)
    for t in range(shape[4]):
        kernels.step(params, x[t].copy(), stepped, gates, shape[5])
        assert_close(stepped[-1, 1], y_ref[t], dtype, f"top output at step {t}")
    assert_close(stepped, final_ref, dtype, "final state")


# Softmax cross-entropy head.


def reference_head(hidden, head_params, labels):
    """Return (loss, probs, d_hidden, head_grad) of a dense layer and mean softmax cross-entropy."""
    rows, hidden_size = hidden.shape
    classes = head_params.size // (hidden_size + 1)
    kernel = head_params[:hidden_size * classes].reshape(hidden_size, classes)
    bias = head_params[hidden_size * classes:]
    logits = hidden @ kernel + bias
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    loss = -log_probs[np.arange(rows), labels].mean()
    d_logits = probs.copy()
    d_logits[np.arange(rows), labels] -= 1.0
    d_logits /= rows
    head_grad = np.concatenate([(hidden.T @ d_logits).ravel(), d_logits.sum(axis=0)])
    return loss, probs, d_logits @ kernel.T, head_grad


def make_head_problem(rows, hidden_size, classes, dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = (scale * rng.normal(size=(rows, hidden_size))).astype(dtype)
    head_params = rng.uniform(-0.5, 0.5, size=hidden_size * classes + classes).astype(dtype)
    labels = rng.integers(0, classes, size=rows).astype(np.int64)
    return hidden, head_params, labels


def run_head(hidden, head_params, labels, head_grad):
    rows, hidden_size = hidden.shape
    classes = head_params.size // (hidden_size + 1)
    probs = np.full((rows, classes), np.nan, dtype=hidden.dtype)
    d_hidden = np.full((rows, hidden_size), np.nan, dtype=hidden.dtype)
    loss = kernels.softmax_xent(hidden, head_params, labels, probs, d_hidden, head_grad)
    return loss, probs, d_hidden


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden_size, classes", [(75, 4, 2), (1, 3, 5), (12, 300, 65), (6, 257, 7)])
def test_softmax_xent_matches_numpy(dtype, rows, hidden_size, classes):
    hidden, head_params, labels = make_head_problem(rows, hidden_size, classes, dtype)
    loss_ref, probs_ref, d_hidden_ref, head_grad_ref = reference_head(
        hidden.astype(np.float64), head_params.astype(np.float64), labels)
    head_grad_before = np.random.default_rng(5).normal(size=head_params.shape).astype(dtype)
    head_grad = head_grad_before.copy()

    loss, probs, d_hidden = run_head(hidden, head_params, labels, head_grad)

    assert isinstance(loss, float)
    assert_close(loss, loss_ref, dtype, "mean loss")
    assert_close(probs, probs_ref, dtype, "probabilities")
    assert_close(d_hidden, d_hidden_ref, dtype, "hidden gradient")
    assert_close(head_grad.astype(np.float64) - head_grad_before, head_grad_ref, dtype,
                 "accumulated head gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_large_logits_stay_finite(dtype):
    # Logits in the thousands overflow a naive exp in both dtypes.
    hidden, head_params, labels = make_head_problem(8, 5, 4, dtype, scale=1e4)
    loss_ref, probs_ref, _, _ = reference_head(hidden.astype(np.float64), head_params.astype(np.float64),
                                               labels)
    loss, probs, d_hidden = run_head(hidden, head_params, labels, np.zeros_like(head_params))

    assert np.isfinite(loss)
    assert np.all(np.isfinite(probs))
    assert np.all(np.isfinite(d_hidden))
    assert_close(loss, loss_ref, dtype, "mean loss")
    assert_close(probs, probs_ref, dtype, "probabilities")


@pytest.mark.parametrize("label", [-1, 4])
def test_softmax_xent_rejects_label_out_of_range(label):
    hidden, head_params, labels = make_head_problem(3, 2, 4, np.float64)
    labels[1] = label
    with pytest.raises(ValueError, match="labels"):
        run_head(hidden, head_params, labels, np.zeros_like(head_params))


# Fused training window.

SGD, ADAGRAD, ADAM = 0, 1, 2
NUM_SLOTS = {SGD: 0, ADAGRAD: 1, ADAM: 2}


def reference_update(weights, grad, slots, optimizer, hyper, step):
    """Apply the contract's update to float64 copies; return (weights, slots)."""
    learning_rate, beta_1, beta_2, epsilon, _ = hyper
    weights, slots = weights.copy(), slots.copy()
    if optimizer == SGD:
        weights -= learning_rate * grad
    elif optimizer == ADAGRAD:
        slots[0] += grad * grad
        weights -= learning_rate * grad / np.sqrt(slots[0])
    else:
        slots[0] += (grad - slots[0]) * (1.0 - beta_1)
        slots[1] += (grad * grad - slots[1]) * (1.0 - beta_2)
        step_size = learning_rate * np.sqrt(1.0 - beta_2 ** step) / (1.0 - beta_1 ** step)
        weights -= step_size * slots[0] / (np.sqrt(slots[1]) + epsilon)
    return weights, slots


def reference_train_window(params, head_params, x, labels, state, forget_bias, optimizer, hyper, slots,
                           head_slots, step):
    """Compose reference forward, numpy head, reference backward, clipping and update in float64."""
    as64 = [a.astype(np.float64) for a in (params, head_params, x, state, slots, head_slots)]
    params, head_params, x, state, slots, head_slots = as64
    steps, batch, _ = x.shape
    hidden = state.shape[3]
    y, final, tape = reference_forward(params, x, state, forget_bias)
    loss, probs, d_hidden, head_grad = reference_head(y.reshape(steps * batch, hidden), head_params,
                                                      labels.reshape(-1))
    grad, _, _ = reference_backward(params, tape, d_hidden.reshape(steps, batch, hidden))

    clip_norm = hyper[4]
    global_norm = np.sqrt(np.sum(grad ** 2) + np.sum(head_grad ** 2))
    scale = clip_norm / max(global_norm, clip_norm) if clip_norm > 0 else 1.0
    new_params, new_slots = reference_update(params, grad * scale, slots, optimizer, hyper, step)
    new_head, new_head_slots = reference_update(head_params, head_grad * scale, head_slots, optimizer,
                                                hyper, step)
    return {
        "loss": loss, "probs": probs.reshape(steps, batch, -1), "final_state": final, "grad": grad,
        "head_grad": head_grad, "params": new_params, "head_params": new_head, "slots": new_slots,
        "head_slots": new_head_slots, "global_norm": global_norm,
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", [SGD, ADAGRAD, ADAM], ids=["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
@pytest.mark.parametrize("shape", [(3, 1, 4, 5, 15, 1.0), (2, 3, 257, 2, 3, 1.0)], ids=["echo", "H257"])
def test_train_window_matches_composition(dtype, optimizer, clip, shape):
    num_layers, input_size, hidden, batch, steps, forget_bias = shape
    classes = 3
    params, x, state = make_problem(shape, dtype)
    rng = np.random.default_rng(11)
    head_params = rng.uniform(-0.5, 0.5, size=hidden * classes + classes).astype(dtype)
    labels = rng.integers(0, classes, size=(steps, batch)).astype(np.int64)
    num_slots = NUM_SLOTS[optimizer]
    # Adagrad's accumulator starts positive (TensorFlow's default is 0.1); Adam resumes at step 3.
    slots = rng.uniform(0.05, 0.2, size=(num_slots, params.size)).astype(dtype)
    head_slots = rng.uniform(0.05, 0.2, size=(num_slots, head_params.size)).astype(dtype)
    step = 3
    # A clip_norm well below the gradient norm, so that clipping really scales the update.
    clip_norm = 0.05 if clip else 0.0
    hyper = np.array([0.1, 0.9, 0.999, 1e-7, clip_norm])
    expected = reference_train_window(params, head_params, x, labels, state, forget_bias, optimizer, hyper,
                                      slots, head_slots, step)
    if clip:
        assert expected["global_norm"] > 2 * clip_norm

    gates, cs, hs = tape_buffers(shape, dtype, num_layers)
    probs = np.empty((steps, batch, classes), dtype=dtype)
    d_y = np.empty((steps, batch, hidden), dtype=dtype)
    grad = np.full(params.shape, np.nan, dtype=dtype)
    head_grad = np.full(head_params.shape, np.nan, dtype=dtype)
    d_state = np.empty(state.shape, dtype=dtype)
    d_x = np.empty(x.shape, dtype=dtype)
    dz = np.empty((steps, batch, 4 * hidden), dtype=dtype)
    d_hidden = np.empty((steps, batch, hidden), dtype=dtype)
    loss = kernels.train_window(params, head_params, x, labels, state, gates, cs, hs, probs, d_y, grad,
                                head_grad, d_state, d_x, dz, d_hidden, forget_bias, optimizer, hyper, slots,
                                head_slots, step)

    assert_close(loss, expected["loss"], dtype, "loss")
    assert_close(probs, expected["probs"], dtype, "probabilities")
    assert_close(state, expected["final_state"], dtype, "final state")
    assert_close(grad, expected["grad"], dtype, "unclipped parameter gradient")
    assert_close(head_grad, expected["head_grad"], dtype, "unclipped head gradient")
    assert_close(params, expected["params"], dtype, "updated parameters")
    assert_close(head_params, expected["head_params"], dtype, "updated head parameters")
    assert_close(slots, expected["slots"], dtype, "optimizer slots")
    assert_close(head_slots, expected["head_slots"], dtype, "head optimizer slots")


def test_train_window_rejects_unknown_optimizer():
    shape = (1, 2, 3, 2, 2, 1.0)
    params, x, state = make_problem(shape, np.float64)
    head_params = np.zeros(3 * 2 + 2)
    gates, cs, hs = tape_buffers(shape, np.float64, 1)
    with pytest.raises(ValueError, match="optimizer"):
        kernels.train_window(params, head_params, x, np.zeros((2, 2), dtype=np.int64), state, gates, cs, hs,
                             np.empty((2, 2, 2)), np.empty((2, 2, 3)), np.empty_like(params),
                             np.empty_like(head_params), np.empty_like(state), np.empty_like(x),
                             np.empty((2, 2, 12)), np.empty((2, 2, 3)), 1.0, 7, np.zeros(5),
                             np.zeros((0, params.size)), np.zeros((0, head_params.size)), 1)


# The float32 tanh.


def test_tanh_float32_within_two_ulp():
    grid = np.concatenate([
        np.linspace(-12.0, 12.0, 2_000_001, dtype=np.float32),
        np.geomspace(1e-38, 20.0, 200_001).astype(np.float32),
        np.nextafter(np.float32(0.55), np.float32([-1.0, 2.0])),
    ])
    grid = np.concatenate([grid, -grid])
    out = np.empty_like(grid)
    kernels._tanh_array(grid, out)
    expected = np.tanh(grid.astype(np.float64))
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - expected) / ulp) <= 2.0


def test_tanh_float32_special_values():
    values = np.array([np.inf, -np.inf, np.nan, 0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                       np.finfo(np.float32).tiny / 8], dtype=np.float32)
    out = np.empty_like(values)
    kernels._tanh_array(values, out)
    np.testing.assert_array_equal(out, np.array([1.0, -1.0, np.nan, 0.0, 1.0, -1.0, values[-1]],
                                                dtype=np.float32))


# The Python bodies of the kernels (NUMBA_DISABLE_JIT=1).

DISABLED_JIT_SCRIPT = textwrap.dedent("""
    import types
    import numpy as np
    import test_numba_kernels as tests
    from fastlstm import _numba_kernels as kernels

    assert isinstance(kernels.forward, types.FunctionType), type(kernels.forward)
    for dtype in tests.DTYPES:
        # H = 16 puts the weight gradients on the BLAS branch, H = 3 on the loop branch; the product
        # test runs the packed tiles, a padded one and a partial panel.
        tests.test_products_match_numpy_and_ignore_row_position(dtype, 7, 33, 260)
        for shape in [(2, 3, 3, 2, 3, 1.0), (1, 2, 16, 2, 2, 1.0)]:
            for keep_tape in (True, False):
                tests.test_forward_matches_reference(dtype, shape, keep_tape)
            tests.test_backward_matches_reference(dtype, shape, True)
            tests.test_step_matches_one_step_forward(dtype, shape)
        tests.test_softmax_xent_matches_numpy(dtype, 5, 3, 4)
        tests.test_train_window_matches_composition(dtype, tests.ADAM, True, (2, 1, 4, 2, 3, 1.0))
    tests.test_tanh_float32_special_values()
    print("ok")
""")


def test_kernels_without_jit():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    package_dir = os.path.dirname(tests_dir)
    path = os.pathsep.join([tests_dir, package_dir, os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", DISABLED_JIT_SCRIPT], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": path}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
