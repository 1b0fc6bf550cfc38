"""fastlstm against the original TensorFlow 1.x graph, and the TensorFlow weight converter.

The graph (``tf_reference.ReferenceGraph``) is built from TensorFlow's own BasicLSTMCell, MultiRNNCell,
static_rnn, sparse softmax cross-entropy and AdagradOptimizer. Both sides get the same weights through
``fastlstm.interop.tensorflow``, so these tests check the kernels and the converter together. Tests
that need TensorFlow are marked ``tensorflow`` and skip when it is not installed. The converter tests
above them run without it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm
from fastlstm import LSTM
from fastlstm._layout import layer_offsets
from fastlstm.heads import SoftmaxHead
from fastlstm.interop import tensorflow as tf_interop
from fastlstm.optim import Adagrad
from fastlstm.tasks import generate_series
from fastlstm.train import Trainer

# Tolerances of the comparison with TensorFlow in float32. Both sides round differently (TensorFlow
# may reorder sums with oneDNN), so forward values agree to a few float32 ulps per operation and
# gradients, one chain of products longer, to a few more.
FORWARD_RTOL, FORWARD_ATOL = 1e-5, 1e-6
GRADIENT_RTOL, GRADIENT_ATOL = 1e-4, 1e-6
TRAINING_LOSS_RTOL = 1e-4
TRAINING_WEIGHT_RTOL = 1e-3

SCOPE = "rnn"


def random_model(input_size, hidden_size, num_layers, num_classes, forget_bias, backend, seed):
    """Return (model, head) with Glorot kernels and nonzero random biases."""
    rng = np.random.default_rng(seed)
    model = LSTM(input_size, hidden_size, num_layers, forget_bias=forget_bias, backend=backend, seed=rng)
    for layer in range(num_layers):
        model.bias(layer)[...] = rng.uniform(-0.5, 0.5, size=4 * hidden_size)
    head = SoftmaxHead(hidden_size, num_classes, backend=backend, seed=rng)
    head.bias[...] = rng.uniform(-0.5, 0.5, size=num_classes)
    return model, head


# Converter tests that need no TensorFlow.


def test_import_does_not_load_tensorflow():
    code = ("import sys, fastlstm, fastlstm.interop, fastlstm.interop.tensorflow, fastlstm.interop.keras\n"
            "loaded = sorted(name for name in ('tensorflow', 'keras', 'tf_keras') if name in sys.modules)\n"
            "print(','.join(loaded))\n")
    # The child imports the same fastlstm as this process, installed or not.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastlstm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                                     os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == ""


def test_round_trip_is_bitwise():
    model, head = random_model(3, 5, 3, 4, 0.75, "auto", seed=1)
    values = tf_interop.to_tensorflow(model, head)
    loaded, (kernel, bias) = tf_interop.from_tensorflow(values, forget_bias=0.75)
    assert loaded.forget_bias == 0.75
    assert (loaded.input_size, loaded.hidden_size, loaded.num_layers) == (3, 5, 3)
    assert loaded.params.tobytes() == model.params.tobytes()
    assert kernel.tobytes() == head.kernel.tobytes()
    assert bias.tobytes() == head.bias.tobytes()


def test_to_tensorflow_names_and_shapes():
    model, head = random_model(3, 5, 2, 4, 1.0, "auto", seed=2)
    values = tf_interop.to_tensorflow(model, head)
    assert list(values) == tf_interop.variable_names(2)
    assert values["rnn/multi_rnn_cell/cell_0/basic_lstm_cell/kernel"].shape == (8, 20)
    assert values["rnn/multi_rnn_cell/cell_1/basic_lstm_cell/kernel"].shape == (10, 20)
    assert values["rnn/multi_rnn_cell/cell_1/basic_lstm_cell/bias"].shape == (20,)
    assert values["dense/kernel"].shape == (5, 4)
    assert not np.shares_memory(values["rnn/multi_rnn_cell/cell_0/basic_lstm_cell/kernel"], model.params)


def test_from_tensorflow_fills_given_objects():
    model, head = random_model(2, 3, 2, 5, 1.0, "auto", seed=3)
    values = tf_interop.to_tensorflow(model, head)
    target, target_head = random_model(2, 3, 2, 5, 1.0, "auto", seed=4)
    loaded, loaded_head = tf_interop.from_tensorflow(values, target, target_head)
    assert loaded is target
    assert loaded_head is target_head
    np.testing.assert_array_equal(target.params, model.params)
    np.testing.assert_array_equal(target_head.params, head.params)


@pytest.mark.parametrize("kernel_word, bias_word, template", [
    ("kernel", "bias", "rnn/multi_rnn_cell/cell_{layer}/basic_lstm_cell/{word}:0"),
    ("weights", "biases", "rnn/multi_rnn_cell/cell_{layer}/basic_lstm_cell/{word}"),
    ("Matrix", "Bias", "RNN/MultiRNNCell/Cell{layer}/BasicLSTMCell/Linear/{word}"),
    ("kernel", "bias", "model/encoder/rnn/multi_rnn_cell/cell_{layer}/basic_lstm_cell/{word}"),
])
def test_from_tensorflow_name_spellings(kernel_word, bias_word, template):
    model, _ = random_model(2, 3, 3, 2, 1.0, "auto", seed=5)
    values = {}
    for layer in range(3):
        values[template.format(layer=layer, word=kernel_word)] = model.kernel(layer)
        values[template.format(layer=layer, word=bias_word)] = model.bias(layer)
        # Optimizer slots and unrelated variables are ignored.
        values[template.format(layer=layer, word=kernel_word) + "/Adagrad"] = np.ones((5, 12))
    values["global_step"] = np.array(7)
    loaded, head = tf_interop.from_tensorflow(values)
    assert head is None
    np.testing.assert_array_equal(loaded.params, model.params)


def test_from_tensorflow_single_cell():
    model, _ = random_model(4, 3, 1, 2, 1.0, "auto", seed=6)
    values = {"rnn/basic_lstm_cell/kernel": model.kernel(0), "rnn/basic_lstm_cell/bias": model.bias(0),
              "W2": np.ones((3, 2), np.float32), "b2": np.zeros((1, 2), np.float32)}
    loaded, (kernel, bias) = tf_interop.from_tensorflow(values, dense_kernel="W2", dense_bias="b2")
    assert loaded.num_layers == 1
    np.testing.assert_array_equal(loaded.params, model.params)
    assert kernel.shape == (3, 2)
    assert bias.shape == (2,)


def test_from_tensorflow_rejects_bad_variables():
    model, head = random_model(2, 3, 2, 2, 1.0, "auto", seed=7)
    values = tf_interop.to_tensorflow(model, head)

    missing = dict(values)
    del missing["rnn/multi_rnn_cell/cell_1/basic_lstm_cell/bias"]
    with pytest.raises(ValueError, match="bias of layer 1"):
        tf_interop.from_tensorflow(missing)

    gap = {name.replace("cell_1", "cell_2"): value for name, value in values.items()}
    with pytest.raises(ValueError, match=r"cells \[0, 2\]"):
        tf_interop.from_tensorflow(gap)

    two_stacks = dict(values)
    two_stacks.update({name.replace("rnn/", "other/"): value for name, value in values.items()
                       if name.startswith("rnn/")})
    with pytest.raises(ValueError, match="several scopes"):
        tf_interop.from_tensorflow(two_stacks)
    loaded, _ = tf_interop.from_tensorflow(two_stacks, scope="other")
    np.testing.assert_array_equal(loaded.params, model.params)

    bad_shape = dict(values)
    bad_shape["rnn/multi_rnn_cell/cell_1/basic_lstm_cell/kernel"] = np.zeros((5, 12), np.float32)
    with pytest.raises(ValueError, match=r"must have shape \(6, 12\)"):
        tf_interop.from_tensorflow(bad_shape)

    with pytest.raises(ValueError, match="no BasicLSTMCell"):
        tf_interop.from_tensorflow({"dense/kernel": np.zeros((3, 2))})

    with pytest.raises(ValueError, match="forget_bias must equal model.forget_bias"):
        tf_interop.from_tensorflow(values, model, forget_bias=0.5)

    other_shape, _ = random_model(2, 4, 2, 2, 1.0, "auto", seed=8)
    with pytest.raises(ValueError, match="input_size, hidden_size, num_layers"):
        tf_interop.from_tensorflow(values, other_shape)

    without_dense = {name: value for name, value in values.items() if not name.startswith("dense/")}
    with pytest.raises(ValueError, match="head was given"):
        tf_interop.from_tensorflow(without_dense, head=head)


def test_load_checkpoint_without_tensorflow(monkeypatch):
    # A None entry in sys.modules makes `import tensorflow` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow, which is not installed"):
        tf_interop.load_checkpoint("/nonexistent/checkpoint")


# Comparisons with the TensorFlow graph.


class Case:
    """One shape of the comparison table; ``name`` reads L, I, H, B, T, C and forget_bias."""

    def __init__(self, num_layers, input_size, hidden_size, batch_size, steps, num_classes, forget_bias):
        self.shape = (num_layers, input_size, hidden_size, batch_size, steps, num_classes)
        self.forget_bias = forget_bias
        self.name = (f"L{num_layers}-I{input_size}-H{hidden_size}-B{batch_size}-T{steps}-C{num_classes}"
                     f"-fb{forget_bias}")


# Every case starts from a nonzero state, so a forget_bias other than 1.0 meets a nonzero c, which is
# what shows whether the bias is added inside the forget sigmoid. I != H everywhere, so a swap of
# the input and recurrent rows cannot pass.
CASES = [
    Case(3, 1, 4, 5, 15, 2, 1.0),      # the echo task's shape
    Case(1, 3, 5, 2, 7, 4, 0.3),
    Case(2, 7, 6, 1, 1, 3, -0.5),      # B = 1, T = 1
    Case(4, 16, 32, 3, 6, 10, 2.5),
    Case(3, 40, 24, 1, 5, 7, 0.0),
    Case(2, 64, 256, 2, 4, 8, 1.0),
    Case(1, 300, 256, 1, 1, 5, 0.75),  # B = 1, T = 1, H = 256
]


@pytest.fixture(scope="module")
def tf_reference():
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed; pip install tensorflow-cpu tf-keras")
    pytest.importorskip("tf_keras", reason="tf-keras (for BasicLSTMCell under TensorFlow 2.16+) is not installed")
    import tf_reference as module

    return module


@pytest.fixture(scope="module")
def reference_graph(tf_reference):
    """Return a function (case) -> ReferenceGraph that builds each graph once for the whole module."""
    graphs = {}

    def get(shape, forget_bias):
        key = shape + (forget_bias,)
        if key not in graphs:
            graphs[key] = tf_reference.ReferenceGraph(*shape, forget_bias=forget_bias)
        return graphs[key]

    yield get
    for graph in graphs.values():
        graph.close()


def case_inputs(case, seed):
    num_layers, input_size, hidden_size, batch_size, steps, num_classes = case.shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, steps, input_size)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(batch_size, steps)).astype(np.int32)
    state = rng.uniform(-1.0, 1.0, size=(num_layers, 2, batch_size, hidden_size)).astype(np.float32)
    return x, labels, state


@pytest.fixture(scope="module")
def tensorflow_results(reference_graph):
    """Return a function (case) -> (model, head, inputs, TensorFlow results), computed once per case."""
    results = {}

    def get(case):
        if case.name not in results:
            num_layers, input_size, hidden_size, _, _, num_classes = case.shape
            model, head = random_model(input_size, hidden_size, num_layers, num_classes, case.forget_bias,
                                       "auto", seed=11)
            graph = reference_graph(case.shape, case.forget_bias)
            graph.set_weights(tf_interop.to_tensorflow(model, head))
            inputs = case_inputs(case, seed=12)
            results[case.name] = (model, head, inputs, graph.run(*inputs))
        return results[case.name]

    return get


def copy_to_backend(model, head, backend):
    copy = LSTM(model.input_size, model.hidden_size, model.num_layers, forget_bias=model.forget_bias,
                backend=backend)
    copy.params = model.params
    head_copy = SoftmaxHead(head.hidden_size, head.num_classes, backend=backend)
    head_copy.params = head.params
    return copy, head_copy


@pytest.mark.tensorflow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_forward_matches_tensorflow(case, backend, tensorflow_results):
    model, head, (x, labels, initial_state), (tf_outputs, tf_final_state, tf_loss, _) = tensorflow_results(case)
    model, head = copy_to_backend(model, head, backend)
    state = initial_state.copy()
    outputs = model.forward(x, state)
    np.testing.assert_allclose(outputs, tf_outputs, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
    np.testing.assert_allclose(state[:, 0], tf_final_state[:, 0], rtol=FORWARD_RTOL, atol=FORWARD_ATOL,
                               err_msg="final c")
    np.testing.assert_allclose(state[:, 1], tf_final_state[:, 1], rtol=FORWARD_RTOL, atol=FORWARD_ATOL,
                               err_msg="final h")
    loss, _ = head.forward(outputs, labels)
    np.testing.assert_allclose(loss, tf_loss, rtol=FORWARD_RTOL)


@pytest.mark.tensorflow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_gradients_match_tensorflow(case, backend, tensorflow_results):
    model, head, (x, labels, initial_state), (_, _, _, tf_gradients) = tensorflow_results(case)
    model, head = copy_to_backend(model, head, backend)
    state = initial_state.copy()
    outputs, tape = model.forward(x, state, keep_tape=True)
    head_result = head.backward(outputs, labels)
    gradients = model.backward(tape, head_result.hidden)

    # Lay the gradients out as variables, with the converter that lays out the weights.
    gradient_model = LSTM(model.input_size, model.hidden_size, model.num_layers, backend=backend)
    gradient_model.params = gradients.params
    head_gradient = head_result.params
    head_kernel = head_gradient[:head.kernel.size].reshape(head.kernel.shape)
    head_bias = head_gradient[head.kernel.size:]
    ours = tf_interop.to_tensorflow(gradient_model, (head_kernel, head_bias))
    ours["init_state"] = gradients.initial_state
    assert sorted(ours) == sorted(tf_gradients)
    for name in ours:
        np.testing.assert_allclose(ours[name], tf_gradients[name], rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL,
                                   err_msg=name)


# The echo task: L = 3, H = 4, B = 5, T = 15, two classes, Adagrad(0.3), as in the original program.
ECHO = Case(3, 1, 4, 5, 15, 2, 1.0)
ECHO_WINDOWS_PER_SERIES = 100
ECHO_SERIES = 2
LEARNING_RATE = 0.3


def echo_start(backend="auto"):
    """Return (model, head, x [B, N], y [B, N]): the initial weights and one echo series."""
    num_layers, input_size, hidden_size, batch_size, steps, num_classes = ECHO.shape
    model = LSTM(input_size, hidden_size, num_layers, backend=backend, seed=21)
    head = SoftmaxHead(hidden_size, num_classes, backend=backend, seed=22, kernel_init="uniform")
    x, y = generate_series(np.random.default_rng(23), length=batch_size * steps * ECHO_WINDOWS_PER_SERIES,
                           batch_size=batch_size)
    return model, head, x, y


def train_tensorflow(graph, x, y, series, state=None):
    """Run every window of ``x, y`` ``series`` times, zeroing the state at each series start.

    Returns (losses, state). With ``state`` the first series continues from it instead.
    """
    _, _, _, batch_size, steps, _ = ECHO.shape
    windows = x.shape[1] // steps
    losses = []
    for index in range(series):
        if state is None or index > 0:
            state = np.zeros((ECHO.shape[0], 2, batch_size, ECHO.shape[2]), np.float32)
        for window in range(windows):
            columns = slice(window * steps, (window + 1) * steps)
            loss, state = graph.train_window(x[:, columns, None], y[:, columns].astype(np.int32), state)
            losses.append(loss)
    return np.array(losses), state


@pytest.fixture(scope="module")
def echo_training(reference_graph):
    """Return (TensorFlow's per-window losses, its final variables) for the echo run."""
    model, head, x, y = echo_start()
    graph = reference_graph(ECHO.shape, ECHO.forget_bias)
    graph.set_weights(tf_interop.to_tensorflow(model, head))
    losses, _ = train_tensorflow(graph, x, y, ECHO_SERIES)
    return losses, graph.get_weights()


@pytest.mark.tensorflow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_adagrad_training_matches_tensorflow(backend, fused, echo_training):
    tf_losses, tf_weights = echo_training
    model, head, x, y = echo_start(backend)
    trainer = Trainer(model, head, Adagrad(LEARNING_RATE), window=ECHO.shape[4], fused=fused, progress=False)
    trainer.fit(x, y, epochs=ECHO_SERIES)

    assert trainer.losses.shape == tf_losses.shape
    np.testing.assert_allclose(trainer.losses, tf_losses, rtol=TRAINING_LOSS_RTOL)
    ours = tf_interop.to_tensorflow(model, head)
    initial_model, initial_head, _, _ = echo_start(backend)
    initial = tf_interop.to_tensorflow(initial_model, initial_head)
    # Training must have moved the weights, or agreeing on them would prove nothing.
    assert tf_losses[-20:].mean() < tf_losses[:20].mean() - 0.05
    assert max(np.abs(tf_weights[name] - initial[name]).max() for name in initial) > 0.1
    for name, value in ours.items():
        np.testing.assert_allclose(value, tf_weights[name], rtol=TRAINING_WEIGHT_RTOL, atol=TRAINING_WEIGHT_RTOL,
                                   err_msg=name)


@pytest.mark.tensorflow
def test_checkpoint_resumes_training(backend, reference_graph, tmp_path):
    model, head, x, y = echo_start(backend)
    graph = reference_graph(ECHO.shape, ECHO.forget_bias)
    graph.set_weights(tf_interop.to_tensorflow(model, head))
    steps = ECHO.shape[4]
    half = x.shape[1] // 2
    _, state = train_tensorflow(graph, x[:, :half], y[:, :half], 1)
    prefix = graph.save(str(tmp_path / "echo"))

    # The checkpoint has the weights and Adagrad's accumulators, which resume training exactly.
    loaded, loaded_head = tf_interop.load_checkpoint(prefix, model, head)
    assert loaded is model
    assert loaded_head is head
    saved = graph.get_weights()
    for name, value in tf_interop.to_tensorflow(model, head).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    optimizer = Adagrad(LEARNING_RATE)
    optimizer.init([model.params, head.params])
    variables = tf_interop.checkpoint_variables(prefix)
    lstm_slot, head_slot = tf_interop.optimizer_slots(variables, model, head)
    assert lstm_slot.shape == model.params.shape
    assert head_slot.shape == head.params.shape
    kernel_start, bias_start, _ = layer_offsets(model.input_size, model.hidden_size, model.num_layers)[0]
    np.testing.assert_array_equal(lstm_slot[kernel_start:bias_start],
                                  variables["rnn/multi_rnn_cell/cell_0/basic_lstm_cell/kernel/Adagrad"].ravel())
    np.testing.assert_array_equal(head_slot[-ECHO.shape[5]:], variables["dense/bias/Adagrad"])
    assert lstm_slot.min() >= 0.1
    assert lstm_slot.max() > 0.1
    optimizer.slots[0][0] = lstm_slot
    optimizer.slots[1][0] = head_slot

    trainer = Trainer(model, head, optimizer, window=steps, fused=False, progress=False)
    trainer.reset_state(x.shape[0])[...] = state
    for window in range(half // steps, x.shape[1] // steps):
        columns = slice(window * steps, (window + 1) * steps)
        trainer.train_window(x[:, columns], y[:, columns])
    tf_losses, tf_state = train_tensorflow(graph, x[:, half:], y[:, half:], 1, state=state)
    np.testing.assert_allclose(trainer.losses, tf_losses, rtol=TRAINING_LOSS_RTOL)
    np.testing.assert_allclose(trainer.state, tf_state, rtol=TRAINING_WEIGHT_RTOL, atol=TRAINING_WEIGHT_RTOL)
