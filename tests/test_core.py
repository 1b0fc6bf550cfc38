"""The LSTM model on each backend against the plain numpy reference and finite differences."""

import warnings

import numpy as np
import pytest

import reference
from helpers import assert_close, make_model, random_inputs, reference_forward

import fastlstm

# (L, I, H, B, T): L = 1..4, I != H, B = 1, T = 1, H = 1, an odd H large enough for the BLAS path,
# and the echo task's shape.
SHAPES = [
    (1, 3, 5, 2, 4),
    (2, 1, 4, 5, 15),
    (3, 1, 4, 5, 15),
    (4, 6, 3, 3, 5),
    (2, 5, 7, 1, 6),
    (2, 4, 6, 3, 1),
    (3, 2, 1, 4, 7),
    (2, 9, 257, 3, 4),
    (1, 70, 40, 2, 3),
]
DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-I{}-H{}-B{}-T{}".format(*s))
def test_forward_backward_match_reference(backend, shape, dtype):
    num_layers, input_size, hidden_size, batch_size, steps = shape
    model = make_model(backend, input_size, hidden_size, num_layers, dtype)
    x, state = random_inputs(model, batch_size, steps)
    expected_y, expected_final, tape_ref = reference_forward(model, x, state)

    y, tape = model.forward(x, state, keep_tape=True)
    assert y.shape == (batch_size, steps, hidden_size)
    assert y.dtype == np.dtype(dtype)
    assert_close(y, expected_y, dtype, "outputs")
    assert_close(state, expected_final, dtype, "final state")

    rng = np.random.default_rng(7)
    d_y = rng.normal(size=y.shape).astype(dtype)
    d_final = rng.normal(size=state.shape).astype(dtype)
    grads = model.backward(tape, d_y, d_final)
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                d_y.transpose(1, 0, 2).astype(np.float64),
                                                d_final.astype(np.float64))
    assert_close(grads.params, d_params, dtype, "parameter gradient")
    assert_close(grads.initial_state, d_state, dtype, "initial state gradient")
    assert_close(grads.inputs, d_x.transpose(1, 0, 2), dtype, "input gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_forward_equals_training_forward(backend, dtype):
    model = make_model(backend, 3, 6, 3, dtype)
    x, state = random_inputs(model, 4, 5)
    state_train = state.copy()
    y_infer = model.forward(x, state)
    y_train, _ = model.forward(x, state_train, keep_tape=True)
    np.testing.assert_array_equal(y_infer, y_train)
    np.testing.assert_array_equal(state, state_train)


def test_time_major_matches_batch_major(backend):
    model = make_model(backend, 3, 5, 2, np.float64)
    x, state = random_inputs(model, 4, 6)
    state_tm = state.copy()
    y = model.forward(x, state)
    y_tm = model.forward(np.ascontiguousarray(x.transpose(1, 0, 2)), state_tm, time_major=True)
    np.testing.assert_array_equal(y_tm, y.transpose(1, 0, 2))
    np.testing.assert_array_equal(state_tm, state)


def test_gradients_match_finite_differences(backend):
    """Central differences in float64 for every parameter, the initial state and the inputs.

    The loss uses every h and the final c (through random weights), and the initial state is
    nonzero, so every path through the cell is exercised.
    """
    model = make_model(backend, 2, 3, 2, np.float64, seed=3)
    x, state0 = random_inputs(model, 2, 4, seed=3)
    rng = np.random.default_rng(11)
    w_y = rng.normal(size=(2, 4, 3))
    w_final = rng.normal(size=state0.shape)
    w_final[:, 1] = 0.0  # the final c alone carries the state term, besides every h in y

    def loss(params, inputs, initial_state):
        probe = fastlstm.LSTM(2, 3, 2, dtype="float64", backend=backend)
        probe.params[...] = params
        state = initial_state.copy()
        y = probe.forward(inputs, state)
        return float(np.sum(w_y * y) + np.sum(w_final * state))

    state = state0.copy()
    _, tape = model.forward(x, state, keep_tape=True)
    grads = model.backward(tape, w_y, w_final)

    eps = 1e-6
    for name, value, analytic in [("params", model.params, grads.params),
                                  ("initial state", state0, grads.initial_state),
                                  ("inputs", x, grads.inputs)]:
        numeric = np.zeros(value.size)
        flat = value.reshape(-1)
        for k in range(value.size):
            saved = flat[k]
            flat[k] = saved + eps
            plus = loss(model.params, x, state0)
            flat[k] = saved - eps
            minus = loss(model.params, x, state0)
            flat[k] = saved
            numeric[k] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic.reshape(-1), numeric, rtol=1e-6, atol=1e-8, err_msg=name)
    assert np.any(grads.initial_state[:, 0] != 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_calls_equal_one_call(backend, dtype):
    model = make_model(backend, 3, 5, 3, dtype)
    x, state = random_inputs(model, 2, 9)
    state_split = state.copy()
    y = model.forward(x, state)
    y_first = model.forward(x[:, :4], state_split)
    y_second = model.forward(x[:, 4:], state_split)
    np.testing.assert_array_equal(np.concatenate([y_first, y_second], axis=1), y)
    np.testing.assert_array_equal(state_split, state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_steps_equal_forward(backend, dtype):
    model = make_model(backend, 3, 5, 3, dtype)
    x, state = random_inputs(model, 2, 6)
    state_steps = state.copy()
    y = model.forward(x, state)
    out = np.empty((2, 5), dtype=dtype)
    for t in range(6):
        result = model.step(x[:, t], state_steps, out=out)
        assert result is out
        np.testing.assert_array_equal(out, y[:, t])
    np.testing.assert_array_equal(state_steps, state)


def test_state_buffer_is_updated_in_place(backend):
    model = make_model(backend, 2, 3, 2, np.float32)
    x, state = random_inputs(model, 2, 3)
    before = state.copy()
    address = state.__array_interface__["data"][0]
    y, tape = model.forward(x, state, keep_tape=True)
    assert state.__array_interface__["data"][0] == address
    assert not np.array_equal(state, before)
    assert np.shares_memory(state, state)
    assert not np.shares_memory(y, state)
    assert not np.shares_memory(y, tape.hs)
    out = np.empty((2, 3), dtype=np.float32)
    model.step(x[:, 0], state, out=out)
    np.testing.assert_array_equal(out, state[-1, 1])
    assert not np.shares_memory(out, state)


def test_zero_steps_return_empty_and_keep_state(backend):
    model = make_model(backend, 2, 3, 2, np.float32)
    _, state = random_inputs(model, 4, 1)
    before = state.copy()
    y = model.forward(np.zeros((4, 0, 2), dtype=np.float32), state)
    assert y.shape == (4, 0, 3)
    np.testing.assert_array_equal(state, before)
    y, tape = model.forward(np.zeros((4, 0, 2), dtype=np.float32), state, keep_tape=True)
    d_final = np.ones_like(state)
    grads = model.backward(tape, np.zeros((4, 0, 3), dtype=np.float32), d_final)
    np.testing.assert_array_equal(grads.params, 0.0)
    np.testing.assert_array_equal(grads.initial_state, d_final)
    assert grads.inputs.shape == (4, 0, 2)


def test_backward_accumulates_into_grads(backend):
    model = make_model(backend, 2, 3, 2, np.float64)
    x, state = random_inputs(model, 2, 3)
    _, tape = model.forward(x, state, keep_tape=True)
    d_y = np.ones((2, 3, 3))
    once = model.backward(tape, d_y)
    twice = model.backward(tape, d_y)
    result = model.backward(tape, d_y, grads=twice)
    assert result is twice
    np.testing.assert_allclose(twice.params, 2 * once.params, rtol=1e-15)
    np.testing.assert_array_equal(twice.initial_state, once.initial_state)
    np.testing.assert_array_equal(twice.inputs, once.inputs)


# Numerical range.

@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_values_stay_finite_without_warnings(backend, dtype):
    model = make_model(backend, 2, 3, 2, dtype)
    x, state = random_inputs(model, 3, 4, scale=1e4)
    state[:, 0] = 1e30 * np.sign(state[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            y, tape = model.forward(x, state, keep_tape=True)
            grads = model.backward(tape, np.ones_like(y), np.ones_like(state))
    for name, value in [("outputs", y), ("state", state), ("params gradient", grads.params),
                        ("state gradient", grads.initial_state), ("input gradient", grads.inputs)]:
        assert np.all(np.isfinite(value)), name
    # The layer-0 gates see pre-activations around 1e4 and saturate exactly: h is 0 or +-1 times o.
    assert np.all(np.abs(y) <= 1.0)


def test_nan_input_propagates(backend):
    model = make_model(backend, 2, 3, 2, np.float64)
    x, state = random_inputs(model, 2, 3)
    x[1, 1, 0] = np.nan
    y = model.forward(x, state)
    assert np.all(np.isnan(y[1, 1:]))
    assert np.all(np.isfinite(y[0]))
    assert np.all(np.isfinite(y[1, 0]))
    assert np.all(np.isnan(state[:, :, 1]))
    assert np.all(np.isfinite(state[:, :, 0]))


# Bad input: each mistake gets its own clear error.

@pytest.fixture
def small_model(backend):
    return make_model(backend, 2, 3, 2, np.float32)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, object])
def test_input_of_wrong_dtype_is_rejected(small_model, dtype):
    state = small_model.zero_state(2)
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got"):
        small_model.forward(np.zeros((2, 3, 2), dtype=dtype), state)


def test_input_of_wrong_rank_is_rejected(small_model):
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(2, 2\)"):
        small_model.forward(np.zeros((2, 2), dtype=np.float32), small_model.zero_state(2))


def test_input_of_wrong_width_is_rejected(small_model):
    with pytest.raises(ValueError, match=r"x must have input width 2 on its last axis, got shape \(2, 3, 5\)"):
        small_model.forward(np.zeros((2, 3, 5), dtype=np.float32), small_model.zero_state(2))


def test_state_batch_mismatch_is_rejected(small_model):
    state = small_model.zero_state(3)
    before = state.copy()
    with pytest.raises(ValueError, match=r"state must have shape .* \(2, 2, 2, 3\) .* batch of 2, got \(2, 2, 3, 3\)"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)
    np.testing.assert_array_equal(state, before)


def test_state_hidden_mismatch_is_rejected(small_model):
    state = np.zeros((2, 2, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"state must have shape .*\(2, 2, 2, 3\).*got \(2, 2, 2, 4\)"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)


def test_state_of_wrong_dtype_is_rejected(small_model):
    state = np.zeros((2, 2, 2, 3), dtype=np.float64)
    with pytest.raises(TypeError, match=r"state must have the model's dtype float32, got float64"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)


def test_fortran_order_state_is_rejected(small_model):
    state = np.asfortranarray(small_model.zero_state(2))
    with pytest.raises(ValueError, match=r"state must be C-contiguous"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)


def test_strided_state_is_rejected(small_model):
    state = np.zeros((2, 2, 4, 3), dtype=np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match=r"state must be C-contiguous"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)


def test_read_only_state_is_rejected(small_model):
    state = small_model.zero_state(2)
    state.flags.writeable = False
    with pytest.raises(ValueError, match=r"state must be writeable"):
        small_model.forward(np.ones((2, 4, 2), dtype=np.float32), state)


def test_parameter_vector_of_wrong_length_is_rejected(small_model):
    size = small_model.params.size
    with pytest.raises(ValueError, match=rf"params must have shape \({size},\), got \({size + 1},\)"):
        small_model.params = np.zeros(size + 1, dtype=np.float32)


@pytest.mark.parametrize("argument", ["input_size", "hidden_size", "num_layers"])
@pytest.mark.parametrize("value", [0, -3])
def test_constructor_rejects_sizes_below_one(backend, argument, value):
    sizes = {"input_size": 2, "hidden_size": 3, "num_layers": 1, argument: value}
    with pytest.raises(ValueError, match=rf"{argument} must be a positive integer, got {value}"):
        fastlstm.LSTM(backend=backend, **sizes)


@pytest.mark.parametrize("value", [2.0, "3", True])
def test_constructor_rejects_non_integer_sizes(backend, value):
    with pytest.raises(TypeError, match=r"hidden_size must be a positive integer"):
        fastlstm.LSTM(2, value, backend=backend)


def test_constructor_rejects_unknown_dtype(backend):
    with pytest.raises(TypeError, match=r"dtype must be 'float32' or 'float64', got 'float16'"):
        fastlstm.LSTM(2, 3, dtype="float16", backend=backend)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'c', 'numba', got 'cuda'"):
        fastlstm.LSTM(2, 3, backend="cuda")


def test_step_out_buffer_is_checked(small_model):
    state = small_model.zero_state(2)
    x_t = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\), got \(3, 2\)"):
        small_model.step(x_t, state, out=np.empty((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"out must not share memory with state"):
        small_model.step(x_t, state, out=state[-1, 1])


def test_backward_rejects_mismatched_gradient(small_model):
    x, state = random_inputs(small_model, 2, 3)
    _, tape = small_model.forward(x, state, keep_tape=True)
    with pytest.raises(ValueError, match=r"d_outputs must have the outputs' shape \(2, 3, 3\), got \(2, 4, 3\)"):
        small_model.backward(tape, np.zeros((2, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"tape must be the Tape returned by forward"):
        small_model.backward(None, np.zeros((2, 3, 3), dtype=np.float32))


@pytest.mark.parametrize("shape, dtype", [((30, 50, 7), np.float32), ((0, 4), np.float64),
                                          ((4001,), np.float64), (5000, np.int64), ((3, 5), np.float32)])
def test_aligned_arrays_start_on_a_cache_line(shape, dtype):
    from fastlstm._layout import ALIGN_MIN_BYTES, aligned_empty, aligned_zeros

    for array in (aligned_empty(shape, dtype), aligned_zeros(shape, dtype)):
        assert array.shape == np.empty(shape).shape
        assert array.dtype == dtype
        assert array.flags.c_contiguous
        assert array.flags.writeable
        if array.nbytes >= ALIGN_MIN_BYTES:
            assert array.ctypes.data % 64 == 0
    assert not aligned_zeros(shape, dtype).any()


def test_kernel_buffers_start_on_cache_lines():
    """The large buffers that the kernels split between threads start on 64-byte lines (numpy's own
    start 16 or 32 bytes in), so that no vector access straddles two lines and no two threads share
    one."""
    from fastlstm import optim
    from fastlstm._layout import ALIGN_MIN_BYTES
    from fastlstm.charlm import CharLM, CharLMTrainer

    model = fastlstm.LSTM(5, 64, 2, seed=0)
    head = fastlstm.SoftmaxHead(64, 300, seed=0)
    x = np.zeros((16, 4, 5), dtype=np.float32)
    _, tape = model.forward(x, model.zero_state(16), keep_tape=True)
    grads = model.backward(tape, np.zeros((16, 4, 64), dtype=np.float32))
    trainer = fastlstm.Trainer(model, head, fastlstm.Adam(0.1), window=4, progress=False)
    trainer.train_window(x, np.zeros((16, 4), dtype=np.int64))
    charlm = CharLM(70, 64, 2, seed=0)
    lm_trainer = CharLMTrainer(charlm, optim.Adam(0.01), 4)
    lm_trainer.train_window(np.zeros((4, 16), dtype=np.int64), np.zeros((4, 16), dtype=np.int64))
    arrays = {"params": model.params, "head params": head.params, "zero state": model.zero_state(32),
              "tape gates": tape.gates, "tape cs": tape.cs, "tape hs": tape.hs,
              "gradient": grads.params}
    arrays.update({f"trainer {name}": value for name, value in vars(trainer._buffers).items()
                   if isinstance(value, np.ndarray)})
    arrays.update({f"charlm {name}": value for name, value in vars(lm_trainer._buffers).items()
                   if isinstance(value, np.ndarray)})
    large = {name: array for name, array in arrays.items() if array.nbytes >= ALIGN_MIN_BYTES}
    assert len(large) > 15
    for name, array in large.items():
        assert array.ctypes.data % 64 == 0, name


def test_backends_report():
    report = fastlstm.backends()
    assert set(report) == {"c", "numba"}
    for info in report.values():
        assert isinstance(info["available"], bool)
        assert (info["reason"] == "") == info["available"]


def test_c_float32_tanh_accuracy():
    """The C core's vectorizable float32 tanh stays within 2 ulp of the exactly rounded value."""
    cext = pytest.importorskip("fastlstm._cext", reason="the C extension is not built")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-10.0, 10.0, size=1_000_000),
        rng.uniform(-0.6, 0.6, size=200_000),                      # around the polynomial's edge
        np.float32(10.0) ** rng.uniform(-40, 38, size=200_000),    # subnormals to huge
    ]).astype(np.float32)
    x = np.concatenate([x, -x])
    expected = np.tanh(x.astype(np.float64)).astype(np.float32)
    got = cext.tanh_f32(x)
    ulps = np.abs(got.astype(np.float64) - expected) / np.spacing(np.abs(expected))
    assert ulps.max() <= 2.0
    np.testing.assert_array_equal(np.sign(got), np.sign(expected))


def test_c_float32_sigmoid_accuracy():
    """The C core's float32 sigmoid of the gates stays within 2 ulp of the exactly rounded value
    from -18.02 up, and is exactly 0 below, as the tanh form 0.5 * tanh(x / 2) + 0.5 is."""
    cext = pytest.importorskip("fastlstm._cext", reason="the C extension is not built")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-18.02, 18.02, size=1_000_000),
        rng.uniform(-1.0, 1.0, size=200_000),
        np.float32(10.0) ** rng.uniform(-40, 38, size=200_000),    # subnormals to huge
    ]).astype(np.float32)
    x = np.concatenate([x, -x])
    got = cext.sigmoid_f32(x)
    closed = x < np.float32(-18.02)
    np.testing.assert_array_equal(got[closed], 0.0)
    x, got = x[~closed], got[~closed]
    with np.errstate(over="ignore"):
        expected = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    ulps = np.abs(got.astype(np.float64) - expected) / np.spacing(expected)
    assert ulps.max() <= 2.0


def test_c_float32_sigmoid_special_values():
    cext = pytest.importorskip("fastlstm._cext", reason="the C extension is not built")
    x = np.array([0.0, -0.0, 16.7, 87.5, 1e30, np.inf, -18.03, -1e30, -np.inf, np.nan],
                 dtype=np.float32)
    got = cext.sigmoid_f32(x)
    np.testing.assert_array_equal(got[:9], [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert np.isnan(got[9])


def test_c_float32_softmax_exp_accuracy():
    """The softmax's vectorizable float32 exp stays within 2 ulp of the exactly rounded value down
    to -87, and returns exactly 0 below, where the exact value needs the subnormal range."""
    cext = pytest.importorskip("fastlstm._cext", reason="the C extension is not built")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        -rng.uniform(0.0, 87.0, size=1_000_000),
        -np.float32(10.0) ** rng.uniform(-40, 1, size=200_000),    # subnormals to -10
    ]).astype(np.float32)
    expected = np.exp(x.astype(np.float64)).astype(np.float32)
    got = cext.exp_negative_f32(x)
    ulps = np.abs(got.astype(np.float64) - expected) / np.spacing(expected)
    assert ulps.max() <= 2.0
    special = np.array([0.0, -0.0, -87.5, -200.0, -1e30, -np.inf, np.nan], dtype=np.float32)
    got = cext.exp_negative_f32(special)
    np.testing.assert_array_equal(got[:6], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert np.isnan(got[6])


def test_c_float32_tanh_special_values():
    cext = pytest.importorskip("fastlstm._cext", reason="the C extension is not built")
    x = np.array([0.0, -0.0, 9.02, -9.02, 1e4, -1e4, np.inf, -np.inf, np.nan], dtype=np.float32)
    got = cext.tanh_f32(x)
    np.testing.assert_array_equal(got[:8], [0.0, -0.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    assert np.signbit(got[1])
    assert np.isnan(got[8])
