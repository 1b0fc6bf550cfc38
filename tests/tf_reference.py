"""The original TensorFlow 1.x program's graph, built from TensorFlow's own classes, for tests and benchmarks.

One ``ReferenceGraph`` is one shape (L, I, H, B, T, C) and one ``forget_bias``. It has its own
``tf.Graph`` and session, so building it once and reusing it for many runs is cheap, and other code
in the same process may keep eager mode (Keras 3 needs it).

The graph takes a batch-major input x [B, T, I] and a packed initial state placeholder [L, 2, B, H],
which it unstacks into one ``LSTMStateTuple(c, h)`` per layer. L distinct ``BasicLSTMCell`` objects in
a ``MultiRNNCell`` are unrolled by ``static_rnn``. A dense layer ``logits_t = h_t @ W + b`` (W [H, C],
b [C]) runs on every step, and ``sparse_softmax_cross_entropy_with_logits`` is averaged over steps and
batch into the loss, which ``AdagradOptimizer(learning_rate)`` minimizes.

Import this module only after ``import_tensorflow()``, or after setting ``TF_USE_LEGACY_KERAS=1``:
TensorFlow 2.16 and later resolve ``tf.compat.v1.nn.rnn_cell`` through ``tf.keras``, and only the
``tf-keras`` package (selected by that variable) still has the legacy cells.
"""

import os
import warnings

import numpy as np


def import_tensorflow():
    """Select tf-keras for the legacy RNN cells, import TensorFlow and return the module.

    TensorFlow 2.21 reads ``TF_USE_LEGACY_KERAS`` when ``tf.keras`` is first resolved, not when it is
    imported, so this also works after another module imported TensorFlow. A bare ``import keras``
    still returns Keras 3 with the variable set.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf

    return tf


tf = import_tensorflow()
tf1 = tf.compat.v1

DENSE_KERNEL = "dense/kernel"
DENSE_BIAS = "dense/bias"


def lstm_variable_names(num_layers, scope="rnn"):
    """Return ``[(kernel_name, bias_name), ...]``, the names MultiRNNCell gives each layer's variables."""
    return [(f"{scope}/multi_rnn_cell/cell_{layer}/basic_lstm_cell/kernel",
             f"{scope}/multi_rnn_cell/cell_{layer}/basic_lstm_cell/bias")
            for layer in range(num_layers)]


class ReferenceGraph:
    """The original program's training graph for one shape, with a session and weight setters.

    Every method takes and returns numpy arrays: x [B, T, I] float32, labels [B, T] int, state
    [L, 2, B, H] (index 0 = c, 1 = h) and a dict of variable values keyed by name without ``:0``.
    """

    def __init__(self, num_layers, input_size, hidden_size, batch_size, steps, num_classes, *,
                 forget_bias=1.0, learning_rate=0.3):
        self.num_layers = num_layers
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.batch_size = batch_size
        self.steps = steps
        self.num_classes = num_classes
        self.forget_bias = forget_bias
        self.graph = tf.Graph()
        with self.graph.as_default():
            self._build(learning_rate)
        self.session = tf1.Session(graph=self.graph)
        self.session.run(self._initializer)

    def _build(self, learning_rate):
        shape = (self.num_layers, 2, self.batch_size, self.hidden_size)
        self.x = tf1.placeholder(tf.float32, (self.batch_size, self.steps, self.input_size), name="x")
        self.labels = tf1.placeholder(tf.int32, (self.batch_size, self.steps), name="labels")
        self.init_state = tf1.placeholder(tf.float32, shape, name="init_state")

        per_layer = tf.unstack(self.init_state, axis=0)
        initial_state = tuple(tf1.nn.rnn_cell.LSTMStateTuple(per_layer[layer][0], per_layer[layer][1])
                              for layer in range(self.num_layers))
        # One cell object per layer: [cell] * L would share one kernel between all layers.
        with warnings.catch_warnings():
            # The legacy cells warn that they are deprecated, which is known: they are the reference.
            warnings.filterwarnings("ignore", message=".*BasicLSTMCell.* is deprecated", category=UserWarning)
            cells = [tf1.nn.rnn_cell.BasicLSTMCell(self.hidden_size, forget_bias=self.forget_bias,
                                                   state_is_tuple=True)
                     for _ in range(self.num_layers)]
        stack = tf1.nn.rnn_cell.MultiRNNCell(cells, state_is_tuple=True)
        inputs = tf.unstack(self.x, axis=1)
        outputs, final_state = tf1.nn.static_rnn(stack, inputs, initial_state=initial_state)
        self.outputs = tf.stack(outputs, axis=1)
        self.final_state = tf.stack([tf.stack([layer.c, layer.h]) for layer in final_state])

        with tf1.variable_scope("dense"):
            kernel = tf1.get_variable("kernel", (self.hidden_size, self.num_classes), tf.float32)
            bias = tf1.get_variable("bias", (self.num_classes,), tf.float32,
                                    initializer=tf1.zeros_initializer())
        labels = tf.unstack(self.labels, axis=1)
        losses = [tf1.nn.sparse_softmax_cross_entropy_with_logits(labels=label, logits=h @ kernel + bias)
                  for h, label in zip(outputs, labels)]
        self.loss = tf.reduce_mean(losses)

        self.variables = {variable.op.name: variable for variable in tf1.trainable_variables()}
        names = [name for pair in lstm_variable_names(self.num_layers) for name in pair]
        names += [DENSE_KERNEL, DENSE_BIAS]
        if sorted(names) != sorted(self.variables):
            raise RuntimeError(f"unexpected variable names {sorted(self.variables)}, expected {sorted(names)}")
        self.variable_names = names

        wrt = [self.variables[name] for name in names] + [self.init_state]
        self.gradients = dict(zip(names + ["init_state"], tf.gradients(self.loss, wrt)))
        self.train_op = tf1.train.AdagradOptimizer(learning_rate).minimize(self.loss)

        self._feeds = {}
        self._assigns = []
        for name in names:
            variable = self.variables[name]
            feed = tf1.placeholder(tf.float32, variable.shape, name=f"assign_{len(self._assigns)}")
            self._feeds[name] = feed
            self._assigns.append(variable.assign(feed))
        self._initializer = tf1.global_variables_initializer()
        self.saver = tf1.train.Saver()

    def set_weights(self, values, *, reset_optimizer=True):
        """Assign every trainable variable from ``values``; also reset Adagrad's accumulators by default."""
        if set(values) != set(self.variable_names):
            raise ValueError(f"values must have the keys {sorted(self.variable_names)}, got {sorted(values)}")
        if reset_optimizer:
            self.session.run(self._initializer)
        feed = {self._feeds[name]: np.asarray(values[name], dtype=np.float32) for name in self.variable_names}
        self.session.run(self._assigns, feed_dict=feed)

    def get_weights(self):
        """Return the current value of every trainable variable."""
        fetched = self.session.run([self.variables[name] for name in self.variable_names])
        return dict(zip(self.variable_names, fetched))

    def _feed(self, x, labels, state):
        return {self.x: x, self.labels: labels, self.init_state: state}

    def run(self, x, labels, state):
        """Return (outputs [B, T, H], final_state [L, 2, B, H], loss, gradients) without training.

        ``gradients`` maps each variable name and ``"init_state"`` to d loss / d that tensor.
        """
        outputs, final_state, loss, gradients = self.session.run(
            [self.outputs, self.final_state, self.loss, self.gradients], feed_dict=self._feed(x, labels, state))
        return outputs, final_state, float(loss), gradients

    def train_window(self, x, labels, state):
        """Run one Adagrad step on a window; return (loss before the update, final_state)."""
        loss, final_state, _ = self.session.run([self.loss, self.final_state, self.train_op],
                                                feed_dict=self._feed(x, labels, state))
        return float(loss), final_state

    def save(self, path):
        """Write a TensorFlow checkpoint of every variable (Adagrad's accumulators included); return its prefix."""
        with self.graph.as_default():
            return self.saver.save(self.session, path)

    def close(self):
        self.session.close()

