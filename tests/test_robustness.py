"""Robustness: numerical range, state across windows, layouts, shapes, input hygiene, determinism,
threads and checkpoints, each checked against a hand computation or the float64 numpy reference."""

import ctypes
import ctypes.util
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import reference
from helpers import assert_close, assert_matches_reference, make_model, random_inputs, reference_forward

import fastlstm
from fastlstm import io

DTYPES = [np.float32, np.float64]


def strict_numerics():
    """A context in which any numpy floating-point problem or any warning raises."""
    class _Strict:
        def __enter__(self):
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("error")
            self._errstate = np.errstate(all="raise")
            self._errstate.__enter__()

        def __exit__(self, *exc_info):
            self._errstate.__exit__(*exc_info)
            return self._warnings.__exit__(*exc_info)
    return _Strict()


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def one_unit_model(backend, dtype, gate_weights, forget_bias=0.0):
    """L = I = H = 1 with input weights (w_i, w_j, w_f, w_o), no recurrence and zero biases."""
    model = fastlstm.LSTM(1, 1, 1, dtype=dtype, backend=backend, forget_bias=forget_bias)
    model.params[...] = 0.0
    model.kernel(0)[0] = gate_weights
    return model


# Numerical range.

@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_output_gate_gives_exact_zero(backend, dtype):
    # z = 1e4 * (1, 1, 1, -1): i = j = f = 1 and o = 0 exactly, c stays at 1e30 (+1 is lost).
    model = one_unit_model(backend, dtype, [1.0, 1.0, 1.0, -1.0])
    x = np.full((1, 3, 1), 1e4, dtype=dtype)
    state = model.zero_state(1)
    state[0, 0] = 1e30
    with strict_numerics():
        y, tape = model.forward(x, state, keep_tape=True)
        grads = model.backward(tape, np.ones_like(y), np.ones_like(state))
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(state[0, 0], dtype(1e30) + dtype(3.0))
    np.testing.assert_array_equal(state[0, 1], 0.0)
    np.testing.assert_array_equal(tape.gates[0, :, 0], np.tile([1.0, 1.0, 1.0, 0.0], (3, 1)))
    # Every gate is saturated, so every pre-activation gradient is exactly 0; dc flows through f = 1.
    np.testing.assert_array_equal(grads.params, 0.0)
    np.testing.assert_array_equal(grads.inputs, 0.0)
    np.testing.assert_array_equal(grads.initial_state[0, 0], 1.0)
    np.testing.assert_array_equal(grads.initial_state[0, 1], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gates_with_huge_negative_cell(backend, dtype):
    # o = 1, i = 0, f = 1: c stays -1e30, h = tanh(c) * o = -1 exactly.
    model = one_unit_model(backend, dtype, [-1.0, 1.0, 1.0, 1.0])
    x = np.full((2, 4, 1), 1e4, dtype=dtype)
    state = model.zero_state(2)
    state[0, 0] = -1e30
    with strict_numerics():
        y, tape = model.forward(x, state, keep_tape=True)
        grads = model.backward(tape, np.ones_like(y), np.ones_like(state))
    np.testing.assert_array_equal(y, -1.0)
    np.testing.assert_array_equal(state[0, 0], dtype(-1e30))
    np.testing.assert_array_equal(grads.params, 0.0)
    np.testing.assert_array_equal(grads.initial_state[0, 0], 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_forget_gate_drops_huge_cell(backend, dtype):
    # f = 0 exactly wipes c_prev = 1e30; i = 1, j = 1 give c = 1 and h = tanh(1) * sigmoid(0).
    model = one_unit_model(backend, dtype, [1.0, 1.0, -1.0, 0.0])
    x = np.full((1, 1, 1), 1e4, dtype=dtype)
    state = model.zero_state(1)
    state[0, 0] = 1e30
    with strict_numerics():
        y, tape = model.forward(x, state, keep_tape=True)
        grads = model.backward(tape, np.ones_like(y), np.zeros_like(state))
    np.testing.assert_array_equal(state[0, 0], 1.0)
    assert_close(y[0, 0], [math.tanh(1.0) * 0.5], dtype, "h")
    # Gradient of h = tanh(c) * sigmoid(z_o) with respect to z_o = 1e4 * w_o, at w_o = 0:
    # d h / d w_o = tanh(1) * 0.25 * 1e4 and d h / d b_o = tanh(1) * 0.25; every other gate is
    # saturated, and h_prev = 0 leaves the recurrent row at 0. Layout: kernel [2, 4], then bias [4].
    expected = np.zeros(12)
    expected[3] = math.tanh(1.0) * 0.25 * 1e4
    expected[11] = math.tanh(1.0) * 0.25
    assert_close(grads.params, expected, dtype, "params gradient")
    np.testing.assert_array_equal(grads.initial_state, 0.0)


def _fenv():
    name = ctypes.util.find_library("m")
    if name is None or sys.platform != "linux":
        pytest.skip("reading the floating-point status flags needs glibc's libm")
    return ctypes.CDLL(name)


# x86-64 glibc values of FE_INVALID, FE_DIVBYZERO and FE_OVERFLOW.
FE_PROBLEMS = {"invalid": 0x01, "divide-by-zero": 0x04, "overflow": 0x08}


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_raise_no_fp_exception_flags(backend, dtype):
    """Finite inputs, however large, must not set the invalid, divide-by-zero or overflow flags.

    A flag that the kernels set is invisible to numpy's errstate, but it traps under
    feenableexcept and shows that an intermediate result overflowed. Small shapes keep BLAS threads out.
    """
    libm = _fenv()
    model = make_model(backend, 2, 3, 2, dtype)
    x, state = random_inputs(model, 3, 4, scale=1e4)
    state[:, 0] = 1e30 * np.sign(state[:, 0])
    model.forward(x, state.copy(), keep_tape=True)  # compile and allocate first
    mask = sum(FE_PROBLEMS.values())
    libm.feclearexcept(mask)
    y, tape = model.forward(x, state, keep_tape=True)
    forward_flags = libm.fetestexcept(mask)
    d_y, d_final = np.ones_like(y), np.ones_like(state)
    libm.feclearexcept(mask)
    model.backward(tape, d_y, d_final)
    backward_flags = libm.fetestexcept(mask)
    raised = {phase: [name for name, bit in FE_PROBLEMS.items() if flags & bit]
              for phase, flags in (("forward", forward_flags), ("backward", backward_flags))}
    assert raised == {"forward": [], "backward": []}


@pytest.mark.parametrize("value", [0.0, -0.1])
def test_adagrad_rejects_non_positive_accumulator(value):
    with pytest.raises(ValueError, match=rf"initial_accumulator_value must be > 0 .*got {value}"):
        fastlstm.Adagrad(0.1, initial_accumulator_value=value)


def test_adagrad_rejects_nan_accumulator():
    with pytest.raises(ValueError, match=r"initial_accumulator_value must be finite, got nan"):
        fastlstm.Adagrad(0.1, initial_accumulator_value=float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adagrad_zero_gradient_changes_nothing(dtype):
    params = np.array([0.5, -2.0, 3.0], dtype=dtype)
    before = params.copy()
    optimizer = fastlstm.Adagrad(0.3, initial_accumulator_value=1e-30)
    with strict_numerics():
        optimizer.update(params, np.zeros(3, dtype=dtype))
    np.testing.assert_array_equal(params, before)
    np.testing.assert_array_equal(optimizer.slots[0][0], dtype(1e-30))


# State across windows.

def _window_loss_gradients(model, x, state, weights):
    """Reference gradients of sum(weights * y) over the last window of x, truncated and full.

    x [B, 2T, I] is two windows of T steps; weights [B, T, H]. Returns (truncated, full) d_params.
    """
    steps = x.shape[1] // 2
    params = model.params.astype(np.float64)
    xt = x.transpose(1, 0, 2).astype(np.float64)
    _, middle, _ = reference.forward(params, xt[:steps], state.astype(np.float64), model.forget_bias)
    _, _, tape = reference.forward(params, xt[steps:], middle, model.forget_bias)
    truncated, _, _ = reference.backward(params, tape, weights.transpose(1, 0, 2))
    _, _, tape_full = reference.forward(params, xt, state.astype(np.float64), model.forget_bias)
    d_y = np.concatenate([np.zeros_like(weights), weights], axis=1).transpose(1, 0, 2)
    full, _, _ = reference.backward(params, tape_full, d_y)
    return truncated, full


def test_gradient_stops_at_window_boundary(backend):
    model = make_model(backend, 2, 3, 2, np.float64)
    x, state0 = random_inputs(model, 2, 8)
    weights = np.random.default_rng(5).normal(size=(2, 4, 3))
    truncated, full = _window_loss_gradients(model, x, state0, weights)
    state = state0.copy()
    model.forward(x[:, :4], state)
    _, tape = model.forward(x[:, 4:], state, keep_tape=True)
    grads = model.backward(tape, weights)
    assert_close(grads.params, truncated, np.float64, "truncated gradient")
    assert np.max(np.abs(full - truncated)) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_trainer_update_uses_truncated_gradient(backend, fused):
    # Two SGD windows: the second update is lr * (the gradient of window 2 alone).
    model = make_model(backend, 1, 3, 2, np.float64)
    head = fastlstm.SoftmaxHead(3, 2, dtype="float64", backend=backend, seed=1)
    trainer = fastlstm.Trainer(model, head, fastlstm.SGD(0.5), window=4, fused=fused, progress=False)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 1))
    y = rng.integers(0, 2, size=(2, 8))
    trainer.train_window(x[:, :4], y[:, :4])
    params, kernel, bias = model.params.copy(), head.kernel.copy(), head.bias.copy()
    state = trainer.state.copy()
    outputs, _, tape = reference.forward(params, x[:, 4:].transpose(1, 0, 2), state)
    logits = outputs @ kernel + bias
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    d_logits = probs - np.eye(2)[y[:, 4:].T]
    d_logits /= d_logits.shape[0] * d_logits.shape[1]
    d_params, _, _ = reference.backward(params, tape, d_logits @ kernel.T)
    trainer.train_window(x[:, 4:], y[:, 4:])
    assert_close(model.params, params - 0.5 * d_params, np.float64, "model params after window 2")
    assert_close(head.bias, bias - 0.5 * d_logits.sum(axis=(0, 1)), np.float64, "head bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_uneven_chunks_are_bitwise_identical(backend, dtype):
    model = make_model(backend, 3, 5, 3, dtype)
    x, state = random_inputs(model, 4, 12)
    y = model.forward(x, state_whole := state.copy())
    for chunks in ([1] * 12, [5, 2, 4, 1], [7, 0, 5]):
        chunk_state = state.copy()
        parts, start = [], 0
        for length in chunks:
            parts.append(model.forward(x[:, start:start + length], chunk_state))
            start += length
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), y, err_msg=str(chunks))
        np.testing.assert_array_equal(chunk_state, state_whole, err_msg=str(chunks))


@pytest.mark.parametrize("dtype", DTYPES)
def test_taped_chunks_equal_inference(backend, dtype):
    model = make_model(backend, 3, 5, 2, dtype)
    x, state = random_inputs(model, 3, 9)
    y = model.forward(x, state_whole := state.copy())
    first, _ = model.forward(x[:, :2], state, keep_tape=True)
    second, _ = model.forward(x[:, 2:], state, keep_tape=True)
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1), y)
    np.testing.assert_array_equal(state, state_whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_final_cell_loss_gradient(backend, dtype):
    # loss = sum(w * c_T) over every layer's final c; the outputs and final h carry no gradient.
    model = make_model(backend, 2, 3, 2, dtype)
    x, state = random_inputs(model, 2, 5)
    _, _, tape_ref = reference_forward(model, x, state)
    d_final = np.zeros(state.shape, dtype=dtype)
    d_final[:, 0] = np.random.default_rng(4).normal(size=d_final[:, 0].shape)
    y, tape = model.forward(x, state, keep_tape=True)
    grads = model.backward(tape, np.zeros_like(y), d_final)
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                np.zeros((5, 2, 3)), d_final.astype(np.float64))
    assert_close(grads.params, d_params, dtype, "params gradient")
    assert_close(grads.initial_state, d_state, dtype, "initial state gradient")
    assert_close(grads.inputs, d_x.transpose(1, 0, 2), dtype, "input gradient")
    for layer in range(2):
        assert np.count_nonzero(d_params[model._offsets[layer][0]:model._offsets[layer][2]]) > 0
    assert np.all(grads.initial_state[:, 0] != 0.0)


# Layouts.

def test_layer_views_partition_params(backend):
    model = fastlstm.LSTM(3, 4, 3, backend=backend)
    model.params[...] = np.arange(model.params.size)
    seen = np.concatenate([np.concatenate([model.kernel(layer).ravel(), model.bias(layer)])
                           for layer in range(3)])
    np.testing.assert_array_equal(seen, np.arange(model.params.size))
    assert [model.kernel(layer).shape for layer in range(3)] == [(7, 16), (8, 16), (8, 16)]


def test_layer_update_leaves_other_layer(backend):
    model = make_model(backend, 3, 4, 2, np.float32)
    kernel1, bias1 = model.kernel(1).copy(), model.bias(1).copy()
    model.kernel(0)[...] += 1.0
    model.bias(0)[...] -= 2.0
    np.testing.assert_array_equal(model.kernel(1), kernel1)
    np.testing.assert_array_equal(model.bias(1), bias1)
    x, state = random_inputs(model, 2, 3)
    expected_y, expected_state, _ = reference_forward(model, x, state)
    y = model.forward(x, state)
    assert_close(y, expected_y, np.float32, "outputs after a layer-0 update")
    assert_close(state, expected_state, np.float32, "state after a layer-0 update")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_bias_slices_one_step(backend, dtype):
    # Zero kernels: z = b, so one step is c = c0 * s(b_f + fb) + s(b_i) * tanh(b_j), h = tanh(c) * s(b_o).
    model = fastlstm.LSTM(1, 2, 1, dtype=dtype, backend=backend, forget_bias=1.5)
    model.params[...] = 0.0
    bias = [0.3, -0.8, 1.1, -0.4, -2.0, 0.6, 0.9, -1.3]   # i0 i1 j0 j1 f0 f1 o0 o1
    model.bias(0)[...] = bias
    state = model.zero_state(1)
    state[0, 0] = [0.7, -1.9]
    state[0, 1] = [5.0, -5.0]   # multiplied by zero recurrent weights
    y, tape = model.forward(np.full((1, 1, 1), 3.0, dtype=dtype), state, keep_tape=True)
    c, h, gates = [], [], []
    for u in range(2):
        i, j = sigmoid(bias[u]), math.tanh(bias[2 + u])
        f, o = sigmoid(bias[4 + u] + 1.5), sigmoid(bias[6 + u])
        c.append([0.7, -1.9][u] * f + i * j)
        h.append(math.tanh(c[u]) * o)
        gates.append((i, j, f, o))
    expected_gates = [gates[u][k] for k in range(4) for u in range(2)]
    assert_close(tape.gates[0, 0, 0], expected_gates, dtype, "gate activations")
    assert_close(state[0, 0, 0], c, dtype, "c")
    assert_close(state[0, 1, 0], h, dtype, "h")
    assert_close(y[0, 0], h, dtype, "output")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forget_bias_inside_sigmoid(backend, dtype):
    # i = 0 exactly (z_i = -1e4): c = c0 * sigmoid(b_f + forget_bias), not c0 * (sigmoid(b_f) + fb).
    model = one_unit_model(backend, dtype, [-1.0, 0.0, 0.0, 0.0], forget_bias=-3.0)
    model.bias(0)[2] = 0.5
    state = model.zero_state(1)
    state[0, 0] = 2.0
    model.forward(np.full((1, 1, 1), 1e4, dtype=dtype), state)
    assert_close(state[0, 0, 0], [2.0 * sigmoid(-2.5)], dtype, "c")
    assert_close(state[0, 1, 0], [math.tanh(2.0 * sigmoid(-2.5)) * 0.5], dtype, "h")


# Shapes.

@pytest.mark.parametrize("dtype", DTYPES)
def test_all_sizes_one(backend, dtype):
    model = make_model(backend, 1, 1, 1, dtype)
    x, state = random_inputs(model, 1, 1)
    step_state = state.copy()
    expected_y, expected_state, tape_ref = reference_forward(model, x, state)
    y, tape = model.forward(x, state, keep_tape=True)
    assert_close(y, expected_y, dtype, "outputs")
    assert_close(state, expected_state, dtype, "final state")
    grads = model.backward(tape, np.ones_like(y), np.ones_like(state))
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                np.ones((1, 1, 1)), np.ones((1, 2, 1, 1)))
    assert_close(grads.params, d_params, dtype, "params gradient")
    assert_close(grads.initial_state, d_state, dtype, "state gradient")
    assert_close(grads.inputs, d_x, dtype, "input gradient")
    np.testing.assert_array_equal(model.step(x[:, 0], step_state), y[:, 0])


@pytest.mark.parametrize("time_major", [False, True])
def test_zero_steps_time_major(backend, time_major):
    model = make_model(backend, 2, 3, 2, np.float32)
    _, state = random_inputs(model, 4, 1)
    before = state.copy()
    x = np.zeros((0, 4, 2) if time_major else (4, 0, 2), dtype=np.float32)
    y, tape = model.forward(x, state, time_major=time_major, keep_tape=True)
    assert y.shape == ((0, 4, 3) if time_major else (4, 0, 3))
    np.testing.assert_array_equal(state, before)
    np.testing.assert_array_equal(tape.cs[:, 0], before[:, 0])
    np.testing.assert_array_equal(tape.hs[:, 0], before[:, 1])
    grads = model.backward(tape, np.zeros(y.shape, dtype=np.float32))
    np.testing.assert_array_equal(grads.initial_state, 0.0)


STATE_MISMATCHES = {"batch": (2, 2, 5, 3), "hidden": (2, 2, 4, 4), "layers": (3, 2, 4, 3)}


@pytest.mark.parametrize("call", ["forward", "step"])
@pytest.mark.parametrize("which", sorted(STATE_MISMATCHES))
def test_mismatched_state_names_both_shapes(backend, call, which):
    model = make_model(backend, 2, 3, 2, np.float32)
    shape = STATE_MISMATCHES[which]
    state = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    before = state.copy()
    with pytest.raises(ValueError, match=rf"state must have shape .*\(2, 2, 4, 3\).*got \({', '.join(map(str, shape))}\)"):
        if call == "forward":
            model.forward(np.ones((4, 3, 2), dtype=np.float32), state)
        else:
            model.step(np.ones((4, 2), dtype=np.float32), state)
    np.testing.assert_array_equal(state, before)


# Input hygiene.

def _layouts(x):
    """Non-contiguous arrays equal to x [B, T, I]: strided, Fortran-order and transposed views."""
    wide = np.zeros((x.shape[0], 2 * x.shape[1], x.shape[2]), dtype=x.dtype)
    wide[:, ::2] = x
    transposed = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)
    return {"strided": wide[:, ::2], "fortran": np.asfortranarray(x), "transposed": transposed,
            "reversed": np.ascontiguousarray(x[::-1])[::-1]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_layouts_are_bitwise_equal(backend, dtype):
    model = make_model(backend, 3, 4, 2, dtype)
    x, state = random_inputs(model, 3, 5)
    y_ref, tape_ref = model.forward(x, state_ref := state.copy(), keep_tape=True)
    d_y = np.random.default_rng(1).normal(size=y_ref.shape).astype(dtype)
    grads_ref = model.backward(tape_ref, d_y)
    for name, view in _layouts(x).items():
        assert not view.flags.c_contiguous, name
        y, tape = model.forward(view, layout_state := state.copy(), keep_tape=True)
        np.testing.assert_array_equal(y, y_ref, err_msg=name)
        np.testing.assert_array_equal(layout_state, state_ref, err_msg=name)
        grads = model.backward(tape, _layouts(d_y)[name])
        np.testing.assert_array_equal(grads.params, grads_ref.params, err_msg=name)
        np.testing.assert_array_equal(grads.inputs, grads_ref.inputs, err_msg=name)


def test_step_input_layouts_are_bitwise_equal(backend):
    model = make_model(backend, 3, 4, 2, np.float32)
    x, state = random_inputs(model, 3, 1)
    x_t = x[:, 0]
    expected = model.step(x_t, state_ref := state.copy())
    for name, view in {"fortran": np.asfortranarray(x_t), "strided": np.repeat(x_t, 2, axis=1)[:, ::2],
                       "transposed": np.ascontiguousarray(x_t.T).T}.items():
        np.testing.assert_array_equal(model.step(view, view_state := state.copy()), expected, err_msg=name)
        np.testing.assert_array_equal(view_state, state_ref, err_msg=name)


@pytest.mark.parametrize("model_dtype, input_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_input_is_cast_to_model_dtype(backend, model_dtype, input_dtype):
    model = make_model(backend, 3, 4, 2, model_dtype)
    x, state = random_inputs(model, 2, 3)
    other = x.astype(input_dtype) if input_dtype == np.float64 else (x + 1e-3).astype(input_dtype)
    y = model.forward(other, other_state := state.copy())
    expected = model.forward(other.astype(model_dtype), state)
    assert y.dtype == model_dtype
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(other_state, state)


@pytest.mark.parametrize("make_state", [
    lambda s: np.asfortranarray(s),
    lambda s: np.repeat(s, 2, axis=3)[..., ::2],
    lambda s: s.astype(np.float64),
], ids=["fortran", "strided", "float64"])
def test_step_rejects_state_it_would_copy(backend, make_state):
    model = make_model(backend, 2, 3, 2, np.float32)
    state = make_state(np.ones((2, 2, 2, 3), dtype=np.float32))
    before = state.copy()
    with pytest.raises((ValueError, TypeError), match=r"state must (be C-contiguous|have the model's dtype)"):
        model.step(np.ones((2, 2), dtype=np.float32), state)
    np.testing.assert_array_equal(state, before)


def test_backward_rejects_grads_it_would_copy(backend):
    model = make_model(backend, 2, 3, 2, np.float32)
    x, state = random_inputs(model, 2, 3)
    y, tape = model.forward(x, state, keep_tape=True)
    grads = model.backward(tape, np.ones_like(y))
    grads.params = grads.params.astype(np.float64)
    with pytest.raises(TypeError, match=r"grads.params must have the model's dtype float32, got float64"):
        model.backward(tape, np.ones_like(y), grads=grads)


@pytest.mark.parametrize("dtype", [np.float16, object, np.complex64])
def test_step_wrong_dtype_names_x_t(backend, dtype):
    model = make_model(backend, 2, 3, 2, np.float32)
    with pytest.raises(TypeError, match=rf"x_t must have dtype float32 or float64, got {np.dtype(dtype)}"):
        model.step(np.zeros((2, 2), dtype=dtype), model.zero_state(2))


def test_step_integer_matrix_names_x_t(backend):
    # Integers are token ids [B]; an integer [B, I] matrix is a shape error that names x_t.
    model = make_model(backend, 2, 3, 2, np.float32)
    with pytest.raises(ValueError, match=r"x_t .*must have shape \(batch,\).*got \(2, 2\)"):
        model.step(np.zeros((2, 2), dtype=np.int64), model.zero_state(2))


@pytest.mark.parametrize("dtype", [np.int64, np.float16, object])
@pytest.mark.parametrize("argument", ["d_outputs", "d_final_state"])
def test_wrong_dtype_names_argument(backend, argument, dtype):
    model = make_model(backend, 2, 3, 2, np.float32)
    x, state = random_inputs(model, 2, 3)
    y, tape = model.forward(x, state, keep_tape=True)
    with pytest.raises(TypeError, match=rf"{argument} must have dtype float32 or float64, got {np.dtype(dtype)}"):
        if argument == "d_outputs":
            model.backward(tape, np.zeros(y.shape, dtype=dtype))
        else:
            model.backward(tape, np.ones_like(y), np.zeros(state.shape, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_ids_equal_one_hot_inputs(backend, dtype):
    model = make_model(backend, 5, 4, 2, dtype)
    ids = np.random.default_rng(3).integers(0, 5, size=(3, 6))
    one_hot = np.eye(5, dtype=dtype)[ids]
    _, state = random_inputs(model, 3, 1)
    expected_y, expected_state, tape_ref = reference_forward(model, one_hot, state)
    y, tape = model.forward(ids, state, keep_tape=True)
    assert_close(y, expected_y, dtype, "outputs")
    assert_close(state, expected_state, dtype, "final state")
    d_y = np.random.default_rng(4).normal(size=y.shape).astype(dtype)
    grads = model.backward(tape, d_y)
    d_params, d_state, _ = reference.backward(model.params.astype(np.float64), tape_ref,
                                              d_y.transpose(1, 0, 2).astype(np.float64))
    assert_close(grads.params, d_params, dtype, "params gradient")
    assert_close(grads.initial_state, d_state, dtype, "state gradient")


def test_step_input_sharing_state_is_rejected(backend):
    # forward rejects an x that shares memory with state; step must do the same on every backend.
    model = make_model(backend, 3, 3, 2, np.float32)
    state = model.zero_state(2)
    with pytest.raises(ValueError, match=r"must not share memory"):
        model.step(state[0, 0], state)


# Determinism.

def _run(model, x, state):
    state = state.copy()
    y, tape = model.forward(x, state, keep_tape=True)
    grads = model.backward(tape, np.full(y.shape, 0.1, dtype=model.dtype),
                           np.full(state.shape, 0.1, dtype=model.dtype))
    return {"outputs": y, "state": state, "params gradient": grads.params.copy(),
            "state gradient": grads.initial_state.copy(), "input gradient": grads.inputs.copy()}


def _assert_runs_equal(first, second, what):
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=f"{name}, {what}")


@pytest.mark.parametrize("hidden", [5, 64])
def test_same_call_twice_is_bitwise_identical(backend, hidden):
    model = make_model(backend, 20, hidden, 2, np.float32)
    x, state = random_inputs(model, 6, 7)
    _assert_runs_equal(_run(model, x, state), _run(model, x, state), "second call")


def _row_kernel_available():
    return fastlstm.backends()["c"]["row_kernel"]


# Shapes of the paths of the products. (3, 5) has weights below 4096 elements, which the C backend
# multiplies in direct loops. (33, 65) is above: the C row kernel on AVX-512 CPUs (the portable
# kernel otherwise), and Numba's packed tiles next to its row loops. 33 and 65 put rows and columns
# off every block boundary.
ROW_POSITION_SHAPES = [(3, 5), (33, 65)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_POSITION_SHAPES, ids=["loops", "large"])
def test_row_independent_of_batch(backend, dtype, shape):
    _check_row_independent(backend, dtype, shape)


def _check_row_independent(backend, dtype, shape):
    model = make_model(backend, shape[0], shape[1], 2, dtype)
    x1, s1 = random_inputs(model, 1, 6, seed=1)
    alone = _run(model, x1, s1)
    for batch_size in range(1, 18):
        for position in sorted({0, batch_size // 2, batch_size - 1}):
            x, state = random_inputs(model, batch_size, 6, seed=batch_size)
            x[position], state[:, :, position] = x1[0], s1[:, :, 0]
            result = _run(model, x, state)
            what = f"batch {batch_size}, position {position}"
            for name in ("outputs", "input gradient"):
                np.testing.assert_array_equal(result[name][position], alone[name][0], err_msg=f"{name}, {what}")
            for name in ("state", "state gradient"):
                np.testing.assert_array_equal(result[name][:, :, position], alone[name][:, :, 0],
                                              err_msg=f"{name}, {what}")


def _threads(count):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return threadpoolctl.threadpool_limits(limits=count)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(20, 64), (33, 65)], ids=["I20-H64", "I33-H65"])
def test_blas_path_repeatable(backend, threads, shape):
    model = make_model(backend, shape[0], shape[1], 2, np.float64)
    x, state = random_inputs(model, 9, 5)
    with _threads(threads):
        _assert_runs_equal(_run(model, x, state), _run(model, x, state), f"{threads} BLAS threads")


def test_row_kernel_results_ignore_blas_threads():
    # The row kernel runs every large product, the weight gradients included, without BLAS, so the
    # BLAS thread count cannot change any result.
    if not _row_kernel_available():
        pytest.skip("no row kernel here (no C extension or no AVX-512F)")
    model = make_model("c", 33, 65, 2, np.float32)
    x, state = random_inputs(model, 9, 5)
    with _threads(1):
        single = _run(model, x, state)
    with _threads(2):
        double = _run(model, x, state)
    _assert_runs_equal(single, double, "1 and 2 BLAS threads")


@pytest.fixture
def row_kernel_off():
    """The C backend's portable kernel for large products, as on CPUs without AVX-512F."""
    if not fastlstm.backends()["c"]["available"]:
        pytest.skip("the C backend is not available")
    from fastlstm import _cext
    _cext.set_row_kernel(False)
    yield
    _cext.set_row_kernel(True)   # the default: on where the CPU has AVX-512F


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_kernel_matches_reference(row_kernel_off, dtype):
    model = make_model("c", 33, 65, 2, dtype)
    assert_matches_reference(model, *random_inputs(model, 9, 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_kernel_row_independent_of_batch(row_kernel_off, dtype):
    _check_row_independent("c", dtype, (33, 65))


@pytest.mark.parametrize("count", [2, 3])
def test_portable_kernel_ignores_thread_count(row_kernel_off, count):
    model = make_model("c", 33, 65, 2, np.float32)
    x, state = random_inputs(model, 9, 5)
    before = fastlstm.get_num_threads()
    try:
        fastlstm.set_num_threads(1)
        single = _run(model, x, state)
        fastlstm.set_num_threads(count)
        many = _run(model, x, state)
    finally:
        fastlstm.set_num_threads(before)
    _assert_runs_equal(single, many, f"1 and {count} threads")


# Threads.

def _overlaps_main_thread(work):
    """Run work() on a thread; return True if the main thread ran Python during its middle half."""
    stamps, window, done = [], [], threading.Event()

    def worker():
        window.append(time.perf_counter())
        work()
        window.append(time.perf_counter())
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
        time.sleep(0.001)
    thread.join()
    start, end = window
    quarter = (end - start) / 4
    return any(start + quarter <= stamp <= end - quarter for stamp in stamps)


def test_forward_releases_the_gil(backend):
    model = fastlstm.LSTM(256, 512, 2, backend=backend, seed=0)
    x = np.random.default_rng(0).normal(size=(40, 64, 256)).astype(np.float32)
    model.forward(x[:1], model.zero_state(64), time_major=True)  # compile first
    state = model.zero_state(64)
    assert _overlaps_main_thread(lambda: model.forward(x, state, time_major=True))


def test_step_releases_the_gil(backend):
    model = fastlstm.LSTM(1024, 1024, 3, backend=backend, seed=0)
    x_t = np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)
    state, out = model.zero_state(256), np.empty((256, 1024), dtype=np.float32)
    model.step(x_t, state, out=out)  # compile first

    def steps():
        for _ in range(3):
            model.step(x_t, state, out=out)
    assert _overlaps_main_thread(steps)


def test_threads_streaming_through_one_model(backend):
    model = make_model(backend, 3, 6, 2, np.float32)
    streams = [random_inputs(model, 2, 40, seed=seed) for seed in range(8)]

    def stream(x, state):
        outputs = np.empty((2, 40, 6), dtype=np.float32)
        for t in range(0, 40, 4):
            y, tape = model.forward(x[:, t:t + 2], state, keep_tape=True)
            model.backward(tape, y)
            outputs[:, t:t + 2] = y
            for k in (2, 3):
                outputs[:, t + k] = model.step(x[:, t + k], state)
        return outputs, state

    expected = [stream(x, state.copy()) for x, state in streams]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def run(index):
        barrier.wait()
        x, state = streams[index]
        results[index] = stream(x, state.copy())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(8):
        np.testing.assert_array_equal(results[index][0], expected[index][0], err_msg=f"stream {index}")
        np.testing.assert_array_equal(results[index][1], expected[index][1], err_msg=f"stream {index}")


# Checkpoints.

def _trainer(backend, hidden=4, window=5, seed=0):
    model = fastlstm.LSTM(1, hidden, 2, backend=backend, seed=seed)
    head = fastlstm.SoftmaxHead(hidden, 2, backend=backend, seed=seed)
    return fastlstm.Trainer(model, head, fastlstm.Adagrad(0.3), window=window, progress=False)


def _train(trainer, windows, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(windows):
        trainer.train_window(rng.integers(0, 2, (3, trainer.window)).astype(np.float32),
                             rng.integers(0, 2, (3, trainer.window)))


def _same_checkpoint(a, b):
    return (a.metadata == b.metadata and set(a.arrays) == set(b.arrays)
            and all(a.arrays[k].dtype == b.arrays[k].dtype and np.array_equal(a.arrays[k], b.arrays[k])
                    for k in a.arrays))


def test_edited_bytes_are_rejected_or_harmless(backend, tmp_path):
    """Flip each byte of a checkpoint: the load raises ValueError or returns the original contents."""
    trainer = _trainer(backend)
    _train(trainer, 2)
    path = tmp_path / "run.npz"
    io.save(path, trainer, config={"note": "edit me"})
    original, data = io.load(path), path.read_bytes()
    other = tmp_path / "edited.npz"
    failures = []
    for position in range(len(data)):
        edited = bytearray(data)
        edited[position] ^= 0x81
        other.write_bytes(bytes(edited))
        try:
            loaded = io.load(other)
        except ValueError as error:
            assert "edited.npz" in str(error)
            continue
        except Exception as error:  # noqa: BLE001 - any other type is the failure being looked for
            failures.append((position, f"{type(error).__name__}: {error}"))
            continue
        if not _same_checkpoint(loaded, original):
            failures.append((position, "loaded different contents"))
    assert failures == []


def test_truncated_at_every_length_is_rejected(backend, tmp_path):
    trainer = _trainer(backend)
    _train(trainer, 1)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    data = path.read_bytes()
    short = tmp_path / "short.npz"
    for length in range(0, len(data), 7):
        short.write_bytes(data[:length])
        with pytest.raises(ValueError, match=r"short.npz"):
            io.load(short)


@pytest.mark.parametrize("change", ["hidden", "window"])
def test_load_into_other_shape_is_rejected(backend, tmp_path, change):
    trainer = _trainer(backend)
    _train(trainer, 1)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    other = _trainer(backend, hidden=5) if change == "hidden" else _trainer(backend, window=6)
    params = other.model.params.copy()
    with pytest.raises(ValueError, match=rf"run.npz does not match the trainer: .*{change}"):
        io.load(path, other)
    np.testing.assert_array_equal(other.model.params, params)


KILL_SCRIPT = r"""
import sys
import numpy as np
import fastlstm
from fastlstm import io

path, backend = sys.argv[1], sys.argv[2]
model = fastlstm.LSTM(64, 256, 2, backend=backend, seed=0)
head = fastlstm.SoftmaxHead(256, 2, backend=backend, seed=0)
trainer = fastlstm.Trainer(model, head, fastlstm.Adagrad(0.3), window=5, progress=False)
trainer.reset_state(3)
version = 0
while True:
    version += 1
    model.params[...] = version
    io.save(path, trainer, config={"version": version})
    print(version, flush=True)
"""


def test_sigkill_during_save_leaves_a_whole_checkpoint(backend, tmp_path):
    """Kill a process that saves in a loop at varied moments; the file is always one whole version."""
    path = tmp_path / "run.npz"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, str(script), str(path), backend], stdout=subprocess.PIPE,
                                   env=env, text=True)
        first = process.stdout.readline()
        assert first.strip().isdigit(), f"the saving process did not start: {first!r}"
        time.sleep(0.013 * (attempt + 1))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        checkpoint = io.load(path)
        version = checkpoint.config["version"]
        np.testing.assert_array_equal(checkpoint.arrays["model_params"], np.float32(version))
