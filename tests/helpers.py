"""Shared test helpers: model construction with distinct per-gate values and reference comparison."""

import numpy as np

import reference
from conftest import ATOL, RTOL

import fastlstm


def make_model(backend, input_size, hidden_size, num_layers, dtype, seed=0, forget_bias=1.0):
    """An LSTM whose biases differ per gate and per unit, so that a gate swap cannot hide."""
    model = fastlstm.LSTM(input_size, hidden_size, num_layers, dtype=dtype, backend=backend,
                          seed=seed, forget_bias=forget_bias)
    rng = np.random.default_rng(seed + 1)
    for layer in range(num_layers):
        model.bias(layer)[...] = rng.uniform(-0.5, 0.5, size=4 * hidden_size)
    return model


def random_inputs(model, batch_size, steps, seed=0, scale=1.0):
    """Batch-major x [B, T, I] and a nonzero initial state [L, 2, B, H] of the model's dtype."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(batch_size, steps, model.input_size))).astype(model.dtype)
    state = model.zero_state(batch_size)
    state[...] = rng.normal(scale=0.5, size=state.shape)
    return x, state


def reference_forward(model, x, state, time_major=False):
    """The float64 numpy reference on the model's parameters; returns (y, final_state, tape)."""
    xt = x if time_major else x.transpose(1, 0, 2)
    y, final, tape = reference.forward(model.params.astype(np.float64), xt.astype(np.float64),
                                       state.astype(np.float64), model.forget_bias)
    return (y if time_major else y.transpose(1, 0, 2)), final, tape


def assert_close(actual, expected, dtype, what):
    """Compare with the per-dtype tolerances of conftest, scaled to the tensor's magnitude.

    The absolute part grows with max |expected| because rounding errors in a sum scale with the
    size of its terms, so a near-zero element of a large tensor carries the tensor's absolute error.
    """
    dtype = np.dtype(dtype)
    scale = max(1.0, float(np.max(np.abs(expected)))) if np.size(expected) else 1.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                               err_msg=what)


def assert_matches_reference(model, x, state):
    """Run forward and backward on batch-major x and a copy of state, and compare the outputs, the
    final state and every gradient with the float64 numpy reference."""
    dtype = model.dtype
    state = state.copy()
    expected_y, expected_state, tape_ref = reference_forward(model, x, state)
    y, tape = model.forward(x, state, keep_tape=True)
    assert_close(y, expected_y, dtype, "outputs")
    assert_close(state, expected_state, dtype, "final state")
    d_y = np.random.default_rng(4).normal(size=y.shape).astype(dtype)
    grads = model.backward(tape, d_y)
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                d_y.transpose(1, 0, 2).astype(np.float64))
    assert_close(grads.params, d_params, dtype, "params gradient")
    assert_close(grads.initial_state, d_state, dtype, "state gradient")
    assert_close(grads.inputs, d_x.transpose(1, 0, 2), dtype, "input gradient")
