"""fastlstm against Keras LSTM layers, and the Keras weight converter.

Keras orders the gates i, f, c, o, keeps the recurrent kernel apart and adds no forget bias at run
time, so ``fastlstm.interop.keras`` permutes columns, splits the kernel and folds ``forget_bias`` into
the bias. The tests at the top run without Keras. The ``tensorflow``-marked tests compare with Keras 3
(``import keras``, on the TensorFlow backend), and one with tf.keras 2.x (the ``tf_keras`` package).
With ``TF_USE_LEGACY_KERAS=1``, which the TensorFlow reference graph needs, ``tf.keras`` is tf-keras
but ``import keras`` still returns Keras 3, so both run in one process.
"""

import numpy as np
import pytest

from fastlstm import LSTM
from fastlstm._layout import GATE_F, GATE_I, GATE_J, GATE_O
from fastlstm.heads import SoftmaxHead
from fastlstm.interop import keras as keras_interop

# Keras and fastlstm both run float32 with differently ordered sums; the bounds are those of the
# TensorFlow comparison.
FORWARD_RTOL, FORWARD_ATOL = 1e-5, 1e-6
GRADIENT_RTOL, GRADIENT_ATOL = 1e-4, 1e-6


def random_model(input_size, hidden_size, num_layers, forget_bias, backend="auto", seed=0):
    """Return a float32 model with Glorot kernels and nonzero biases."""
    rng = np.random.default_rng(seed)
    model = LSTM(input_size, hidden_size, num_layers, forget_bias=forget_bias, backend=backend, seed=rng)
    for layer in range(num_layers):
        model.bias(layer)[...] = rng.uniform(-0.5, 0.5, size=4 * hidden_size)
    return model


# Converter tests that need no Keras.


def test_gate_blocks_are_permuted():
    model = LSTM(2, 3, 1, forget_bias=0.0, seed=0)
    for gate in (GATE_I, GATE_J, GATE_F, GATE_O):
        model.kernel(0)[:, gate * 3:(gate + 1) * 3] = 10 + gate
        model.bias(0)[gate * 3:(gate + 1) * 3] = 20 + gate
    kernel, recurrent, bias = keras_interop.to_keras_weights(model)[0]
    assert kernel.shape == (2, 12)
    assert recurrent.shape == (3, 12)
    # Keras's blocks are i, f, c, o, and its c is fastlstm's j.
    for block, gate in enumerate((GATE_I, GATE_F, GATE_J, GATE_O)):
        assert np.all(kernel[:, block * 3:(block + 1) * 3] == 10 + gate)
        assert np.all(recurrent[:, block * 3:(block + 1) * 3] == 10 + gate)
        assert np.all(bias[block * 3:(block + 1) * 3] == 20 + gate)


def test_kernel_is_split_into_input_and_recurrent_rows():
    model = random_model(4, 3, 2, 0.0)
    weights = keras_interop.to_keras_weights(model)
    columns = np.concatenate([np.arange(gate * 3, gate * 3 + 3) for gate in keras_interop.KERAS_GATE_ORDER])
    np.testing.assert_array_equal(weights[0][0], model.kernel(0)[:4, columns])
    np.testing.assert_array_equal(weights[0][1], model.kernel(0)[4:, columns])
    np.testing.assert_array_equal(weights[1][0], model.kernel(1)[:3, columns])
    np.testing.assert_array_equal(weights[1][1], model.kernel(1)[3:, columns])


def test_forget_bias_is_folded_into_keras_bias():
    model = random_model(2, 3, 2, 1.5)
    weights = keras_interop.to_keras_weights(model)
    for layer in range(2):
        bias = model.bias(layer)
        keras_bias = weights[layer][2]
        np.testing.assert_array_equal(keras_bias[3:6], bias[GATE_F * 3:GATE_F * 3 + 3] + np.float32(1.5))
        np.testing.assert_array_equal(keras_bias[0:3], bias[GATE_I * 3:GATE_I * 3 + 3])
        np.testing.assert_array_equal(keras_bias[6:9], bias[GATE_J * 3:GATE_J * 3 + 3])


def test_round_trip_bitwise_without_forget_bias():
    model = random_model(3, 5, 3, 0.0, seed=1)
    # Negative zero survives only because a zero forget_bias is not added at all.
    model.bias(0)[GATE_F * 5] = -0.0
    loaded = keras_interop.from_keras_weights(keras_interop.to_keras_weights(model))
    assert loaded.forget_bias == 0.0
    assert loaded.params.tobytes() == model.params.tobytes()


def test_round_trip_bitwise_when_fold_is_exact():
    # b + 1.0 is exact in float32 for multiples of 2**-10 in [-4, 4], and for the zero bias that LSTM
    # starts with.
    model = random_model(3, 5, 2, 1.0, seed=2)
    rng = np.random.default_rng(3)
    model.bias(0)[...] = rng.integers(-4096, 4096, size=20) / 1024.0
    model.bias(1)[...] = 0.0
    loaded = keras_interop.from_keras_weights(keras_interop.to_keras_weights(model), forget_bias=1.0)
    assert loaded.forget_bias == 1.0
    assert loaded.params.tobytes() == model.params.tobytes()


def test_round_trip_within_one_ulp_otherwise():
    model = random_model(3, 5, 2, 1.0, seed=4)
    loaded = keras_interop.from_keras_weights(keras_interop.to_keras_weights(model), forget_bias=1.0)
    forget = np.arange(GATE_F * 5, GATE_F * 5 + 5)
    for layer in range(2):
        error = np.abs(loaded.bias(layer)[forget] - model.bias(layer)[forget])
        assert np.all(error <= np.spacing(np.abs(model.bias(layer)[forget]) + np.float32(1.0)))
        np.testing.assert_array_equal(np.delete(loaded.bias(layer), forget), np.delete(model.bias(layer), forget))
    np.testing.assert_array_equal(loaded.kernel(0), model.kernel(0))
    np.testing.assert_array_equal(loaded.kernel(1), model.kernel(1))


def test_state_conversion_round_trip():
    state = np.random.default_rng(5).normal(size=(3, 2, 4, 6)).astype(np.float32)
    pairs = keras_interop.state_to_keras(state)
    assert len(pairs) == 3
    np.testing.assert_array_equal(pairs[1][0], state[1, 1])  # Keras's h first
    np.testing.assert_array_equal(pairs[1][1], state[1, 0])
    np.testing.assert_array_equal(keras_interop.state_from_keras(pairs), state)
    out = np.empty_like(state)
    assert keras_interop.state_from_keras(pairs, out=out) is out
    np.testing.assert_array_equal(out, state)


def test_from_keras_weights_rejects_bad_input():
    weights = keras_interop.to_keras_weights(random_model(2, 3, 2, 1.0))
    with pytest.raises(ValueError, match="recurrent_kernel"):
        keras_interop.from_keras_weights([[weights[0][0], weights[0][1][:, :8], weights[0][2]]])
    with pytest.raises(ValueError, match=r"weights\[1\]\[0\] \(kernel\) must have shape \(3, 12\)"):
        keras_interop.from_keras_weights([weights[0], [weights[0][0], weights[1][1], weights[1][2]]])
    with pytest.raises(ValueError, match="non-empty list"):
        keras_interop.from_keras_weights([])
    with pytest.raises(ValueError, match="forget_bias must equal model.forget_bias"):
        keras_interop.from_keras_weights(weights, random_model(2, 3, 2, 1.0), forget_bias=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        keras_interop.from_keras_weights([[weights[0][0].astype(np.int32), weights[0][1], weights[0][2]]])


# Comparisons with Keras.


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed; pip install tensorflow-cpu")
    return pytest.importorskip("keras", minversion="3", reason="Keras 3 is not installed")


def keras_stack(keras_module, hidden_size, num_layers):
    return [keras_module.layers.LSTM(hidden_size, return_sequences=True, return_state=True)
            for _ in range(num_layers)]


def keras_forward(keras_module, layers, x, state):
    """Return (outputs [B, T, H], final packed state) of the stacked Keras layers."""
    inputs = x
    finals = []
    for layer, (h, c) in zip(layers, keras_interop.state_to_keras(state)):
        inputs, h, c = layer(inputs, initial_state=[h, c])
        finals.append([keras_module.ops.convert_to_numpy(h), keras_module.ops.convert_to_numpy(c)])
    return keras_module.ops.convert_to_numpy(inputs), keras_interop.state_from_keras(finals)


def case_inputs(num_layers, input_size, hidden_size, batch_size, steps, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, steps, input_size)).astype(np.float32)
    state = rng.uniform(-1.0, 1.0, size=(num_layers, 2, batch_size, hidden_size)).astype(np.float32)
    return x, state


# (L, I, H, B, T, forget_bias): L = 1 .. 4, I != H, B = 1 and T = 1, H = 256, and forget biases other
# than 1.0 with the nonzero initial c that every case starts from.
CASES = [
    (3, 1, 4, 5, 15, 1.0),
    (1, 3, 5, 2, 7, 0.3),
    (2, 7, 6, 1, 1, -0.5),
    (4, 16, 32, 3, 6, 2.5),
    (2, 64, 256, 2, 4, 0.0),
    (1, 300, 256, 1, 1, 0.75),
]
CASE_IDS = ["L{}-I{}-H{}-B{}-T{}-fb{}".format(*case) for case in CASES]


@pytest.mark.tensorflow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converted_model_matches_keras(case, backend, keras):
    num_layers, input_size, hidden_size, batch_size, steps, forget_bias = case
    model = random_model(input_size, hidden_size, num_layers, forget_bias, backend, seed=11)
    layers = keras_interop.to_keras(model, keras_stack(keras, hidden_size, num_layers))
    x, initial_state = case_inputs(num_layers, input_size, hidden_size, batch_size, steps, seed=12)

    keras_outputs, keras_state = keras_forward(keras, layers, x, initial_state)
    state = initial_state.copy()
    outputs = model.forward(x, state)
    np.testing.assert_allclose(outputs, keras_outputs, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
    np.testing.assert_allclose(state, keras_state, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)


@pytest.mark.tensorflow
@pytest.mark.parametrize("forget_bias", [0.0, 1.0, -0.75])
def test_keras_initialized_layers_load(forget_bias, backend, keras):
    # Keras's own initialization: orthogonal recurrent kernels and unit_forget_bias=True.
    num_layers, input_size, hidden_size, batch_size, steps = 2, 5, 8, 3, 6
    layers = keras_stack(keras, hidden_size, num_layers)
    x, initial_state = case_inputs(num_layers, input_size, hidden_size, batch_size, steps, seed=13)
    keras_outputs, keras_state = keras_forward(keras, layers, x, initial_state)

    model, head = keras_interop.from_keras(layers, forget_bias=forget_bias, backend=backend)
    assert head is None
    assert model.forget_bias == forget_bias
    state = initial_state.copy()
    outputs = model.forward(x, state)
    np.testing.assert_allclose(outputs, keras_outputs, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
    np.testing.assert_allclose(state, keras_state, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)

    # Keras -> fastlstm -> Keras reproduces Keras's arrays bitwise when no forget bias is moved.
    if forget_bias == 0.0:
        for layer, arrays in zip(layers, keras_interop.to_keras_weights(model)):
            for original, converted in zip(layer.get_weights(), arrays):
                assert original.tobytes() == converted.tobytes()


@pytest.mark.tensorflow
@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_round_trip_through_keras_layers(forget_bias, keras):
    model = random_model(4, 6, 3, forget_bias, seed=14)
    if forget_bias != 0.0:
        # Biases on a 2**-10 grid, so that adding and subtracting 1.0 is exact in float32.
        for layer in range(3):
            model.bias(layer)[...] = np.round(model.bias(layer) * 1024.0) / 1024.0
    layers = keras_interop.to_keras(model, keras_stack(keras, 6, 3))
    loaded, _ = keras_interop.from_keras(layers, forget_bias=forget_bias)
    assert loaded.params.tobytes() == model.params.tobytes()


@pytest.mark.tensorflow
def test_dense_head_round_trip(keras):
    model = random_model(3, 4, 1, 1.0, seed=15)
    head = SoftmaxHead(4, 6, seed=16)
    head.bias[...] = np.linspace(-1.0, 1.0, 6)
    dense = keras.layers.Dense(6)
    layers = keras_interop.to_keras(model, keras_stack(keras, 4, 1), head, dense)
    target = SoftmaxHead(4, 6, seed=17)
    loaded, loaded_head = keras_interop.from_keras(layers, head=target, dense=dense, forget_bias=1.0)
    assert loaded_head is target
    assert target.params.tobytes() == head.params.tobytes()
    _, (kernel, bias) = keras_interop.from_keras(layers, dense=dense, forget_bias=1.0)
    np.testing.assert_array_equal(kernel, head.kernel)
    np.testing.assert_array_equal(bias, head.bias)


@pytest.mark.tensorflow
def test_keras_layer_checks(keras):
    model = random_model(3, 4, 2, 1.0)
    with pytest.raises(ValueError, match="one Keras LSTM layer per model layer"):
        keras_interop.to_keras(model, keras_stack(keras, 4, 1))
    with pytest.raises(ValueError, match="units = hidden_size = 4"):
        keras_interop.to_keras(model, keras_stack(keras, 5, 2))
    hard = [keras.layers.LSTM(4, recurrent_activation="hard_sigmoid", return_sequences=True) for _ in range(2)]
    with pytest.raises(ValueError, match="hard_sigmoid"):
        keras_interop.to_keras(model, hard)
    no_bias = [keras.layers.LSTM(4, use_bias=False, return_sequences=True) for _ in range(2)]
    with pytest.raises(ValueError, match="use_bias=False"):
        keras_interop.to_keras(model, no_bias)
    with pytest.raises(ValueError, match="build it first"):
        keras_interop.from_keras(keras_stack(keras, 4, 1))


@pytest.mark.tensorflow
def test_gradients_match_keras(backend, keras):
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"needs Keras's TensorFlow backend for GradientTape, got {keras.backend.backend()}")
    import tensorflow as tf

    num_layers, input_size, hidden_size, batch_size, steps, num_classes = 3, 5, 7, 2, 6, 4
    model = random_model(input_size, hidden_size, num_layers, 0.8, backend, seed=18)
    head = SoftmaxHead(hidden_size, num_classes, backend=backend, seed=19)
    head.bias[...] = np.linspace(-0.5, 0.5, num_classes)
    dense = keras.layers.Dense(num_classes)
    layers = keras_interop.to_keras(model, keras_stack(keras, hidden_size, num_layers), head, dense)
    x, initial_state = case_inputs(num_layers, input_size, hidden_size, batch_size, steps, seed=20)
    labels = np.random.default_rng(21).integers(0, num_classes, size=(batch_size, steps))

    state_pairs = [[tf.constant(h), tf.constant(c)] for h, c in keras_interop.state_to_keras(initial_state)]
    with tf.GradientTape() as tape:
        tape.watch(state_pairs)
        inputs = tf.constant(x)
        for layer, pair in zip(layers, state_pairs):
            inputs, _, _ = layer(inputs, initial_state=pair)
        logits = dense(inputs)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    variables = [[w for w in layer.trainable_weights] for layer in layers]
    keras_gradients = tape.gradient(loss, (variables, dense.trainable_weights, state_pairs))
    lstm_gradients, dense_gradients, state_gradients = keras_gradients

    state = initial_state.copy()
    outputs, model_tape = model.forward(x, state, keep_tape=True)
    head_result = head.backward(outputs, labels)
    gradients = model.backward(model_tape, head_result.hidden)
    np.testing.assert_allclose(head_result.loss, float(loss), rtol=FORWARD_RTOL)

    # A bias gradient does not depend on where the constant forget bias sits, so it converts with 0.
    expected = keras_interop.from_keras_weights([[g.numpy() for g in layer] for layer in lstm_gradients],
                                                forget_bias=0.0)
    np.testing.assert_allclose(gradients.params, expected.params, rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL)
    head_kernel_gradient = head_result.params[:hidden_size * num_classes].reshape(hidden_size, num_classes)
    np.testing.assert_allclose(head_kernel_gradient, dense_gradients[0].numpy(), rtol=GRADIENT_RTOL,
                               atol=GRADIENT_ATOL)
    np.testing.assert_allclose(head_result.params[hidden_size * num_classes:], dense_gradients[1].numpy(),
                               rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL)
    expected_state = keras_interop.state_from_keras([[h.numpy(), c.numpy()] for h, c in state_gradients])
    np.testing.assert_allclose(gradients.initial_state, expected_state, rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL)


@pytest.mark.tensorflow
def test_tf_keras_layers_match(backend, keras):
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (tf.keras 2.x) is not installed")
    num_layers, input_size, hidden_size, batch_size, steps = 2, 3, 5, 2, 4
    model = random_model(input_size, hidden_size, num_layers, 1.0, backend, seed=22)
    layers = [tf_keras.layers.LSTM(hidden_size, return_sequences=True, return_state=True)
              for _ in range(num_layers)]
    keras_interop.to_keras(model, layers)
    x, initial_state = case_inputs(num_layers, input_size, hidden_size, batch_size, steps, seed=23)
    import tensorflow as tf

    inputs = tf.constant(x)
    finals = []
    for layer, (h, c) in zip(layers, keras_interop.state_to_keras(initial_state)):
        # tf.keras 2.x takes a tensor initial state, not numpy arrays.
        inputs, h, c = layer(inputs, initial_state=[tf.constant(h), tf.constant(c)])
        finals.append([h.numpy(), c.numpy()])
    state = initial_state.copy()
    outputs = model.forward(x, state)
    np.testing.assert_allclose(outputs, inputs.numpy(), rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
    np.testing.assert_allclose(state, keras_interop.state_from_keras(finals), rtol=FORWARD_RTOL,
                               atol=FORWARD_ATOL)
