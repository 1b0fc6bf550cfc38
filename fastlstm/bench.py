"""Compare fastlstm with other LSTM implementations on this machine: ``fastlstm bench``.

Dimension letters: L layers, I input width, H hidden units, B batch, T steps, C classes of the head.

Configurations (``CONFIGS``) are named ``L<layers>-H<hidden>-B<batch>-T<steps>``; the streaming one has
no T because it advances one step per call. Each configuration runs some of these tasks:

``train``
    Forward with the tape, backward and an Adagrad update of the LSTM's parameters. The loss is
    ``sum(y * G) / B`` for a fixed random G [B, T, H], so the output gradient is G / B and no head
    is involved.
``train-head``
    The same with a dense layer and softmax cross-entropy over C classes on every step's output
    (the mean over T * B), as in the original TensorFlow program. The head's parameters are updated too.
``infer``
    Forward over T steps from the carried state, without a tape.
``step``
    One time step through every layer (streaming), from the carried state.

Every implementation ("peer") carries the final state of one call into the next call, as truncated
BPTT does, and starts from the same weights, so all peers compute the same function
(``bench/test_peers_bench.py`` checks that they agree). A peer whose library is not installed is
skipped with the reason.

``run_bench(argv)`` is the command line. It starts one worker process per thread setting, because
BLAS, OpenMP, TensorFlow and PyTorch size their pools when a process starts. It also starts one process
per implementation and configuration to measure the peak resident set size. It prints a Markdown report
and can write it to a file with a PNG chart.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

import fastlstm
from fastlstm._backends import resolve_backend
from fastlstm._layout import GATE_F, GATE_I, GATE_J, GATE_O, layer_input_size

# ---------------------------------------------------------------------------------------------------
# Configurations and their arithmetic.

TASKS = ("train", "train-head", "infer", "step")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark shape and the tasks it runs; ``classes`` is C of the ``train-head`` task."""

    name: str
    layers: int
    input_size: int
    hidden_size: int
    batch_size: int
    steps: int
    tasks: tuple
    classes: int = 0
    learning_rate: float = 1e-3

    @property
    def label(self):
        if self.tasks == ("step",):
            return f"L{self.layers}-H{self.hidden_size}-B{self.batch_size}"
        return f"L{self.layers}-H{self.hidden_size}-B{self.batch_size}-T{self.steps}"


CONFIGS = {
    # The original program's echo task: 1 input bit, 2 classes, Adagrad at 0.3.
    "echo": Config("echo", 3, 1, 4, 5, 15, ("train-head", "infer"), classes=2, learning_rate=0.3),
    # Word-level language models: the input is an embedding of width H (random here, no embedding
    # lookup is timed) and the head is a softmax over a 10000-word vocabulary.
    "ptb-small": Config("ptb-small", 2, 200, 200, 20, 20, ("train", "train-head", "infer"), classes=10000),
    "ptb-medium": Config("ptb-medium", 2, 650, 650, 20, 35, ("train", "train-head", "infer"), classes=10000),
    "wide-inference": Config("wide-inference", 2, 512, 512, 64, 100, ("infer",)),
    "streaming": Config("streaming", 2, 256, 256, 1, 1, ("step",)),
}


def cases(config_names=None):
    """Return ``[(config, task), ...]`` for the named configurations (default all), in table order."""
    names = list(CONFIGS) if config_names is None else config_names
    return [(CONFIGS[name], task) for name in names for task in CONFIGS[name].tasks]


def case_id(config, task):
    """Return the case's name, e.g. ``L2-H200-B20-T20-train-head``."""
    return f"{config.label}-{task}"


def gemm_shapes(config, task):
    """Return ``[(m, k, n, count), ...]``: the matrix products ``[m, k] @ [k, n]`` of one call.

    They follow the kernel structure. Forward, each layer has one input projection for all T steps and
    one recurrent product per step. Backward, it has one recurrent product per step, then the two weight
    gradients and the input gradient as single products over all steps. The head adds its dense layer
    and that layer's two gradients. The list is both the FLOP count and the workload of the sgemm ceiling.
    """
    layers, hidden, batch = config.layers, config.hidden_size, config.batch_size
    steps = 1 if task == "step" else config.steps
    gates = 4 * hidden
    rows = steps * batch
    shapes = []
    for layer in range(layers):
        inputs = layer_input_size(layer, config.input_size, hidden)
        # Z = X @ W_x for all steps; z_t += h_{t-1} @ W_h per step.
        shapes += [(rows, inputs, gates, 1), (batch, hidden, gates, steps)]
        if task in ("train", "train-head"):
            # dh_{t-1} = dz_t @ W_h^T per step; dW_x = X^T dZ; dW_h = H_prev^T dZ; dX = dZ @ W_x^T.
            shapes += [(batch, gates, hidden, steps), (inputs, rows, gates, 1), (hidden, rows, gates, 1),
                       (rows, gates, inputs, 1)]
    if task == "train-head":
        classes = config.classes
        # logits = Y @ K; dK = Y^T dlogits; dY = dlogits @ K^T.
        shapes += [(rows, hidden, classes, 1), (hidden, rows, classes, 1), (rows, classes, hidden, 1)]
    return shapes


def case_flops(config, task):
    """Return the floating-point operations of one call.

    The LSTM's forward counts 2 * B * (I_l + H) * 4H per layer and step, its backward twice that, and
    the head 2 * T * B * H * C forward and twice that backward. Pointwise work is not counted.
    """
    return sum(2 * m * k * n * count for m, k, n, count in gemm_shapes(config, task))


def sgemm_seconds(config, task, min_time=0.05):
    """Time numpy's float32 matmul on the products of ``gemm_shapes``; return seconds per call.

    Each distinct shape is timed as the fastest of several repeats, each at least ``min_time`` / 5
    long. The fastest, because a ceiling is the best the BLAS achieves and other processes only slow it
    down. The total is the sum over shapes times their counts. That is the time one call would take if it did nothing but
    these products through the BLAS that numpy uses, with the current thread settings.
    """
    rng = np.random.default_rng(0)
    total = 0.0
    measured = {}
    for m, k, n, count in gemm_shapes(config, task):
        if (m, k, n) not in measured:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            out = np.empty((m, n), dtype=np.float32)
            np.matmul(a, b, out=out)
            repeats = _calibrate(lambda: np.matmul(a, b, out=out), min_time / 5)
            samples = []
            deadline = time.perf_counter() + min_time
            while len(samples) < 5 or time.perf_counter() < deadline:
                start = time.perf_counter()
                for _ in range(repeats):
                    np.matmul(a, b, out=out)
                samples.append((time.perf_counter() - start) / repeats)
            measured[(m, k, n)] = float(np.min(samples))
        total += count * measured[(m, k, n)]
    return total


def fastlstm_memory(config, task):
    """Return ``{name: bytes}`` of what fastlstm keeps for one training call of the case.

    ``tape`` is ``Tape.nbytes``: gate activations [L, T, B, 4H], cell and hidden states [L, T + 1, B, H].
    ``optimizer`` is Adagrad's accumulator, one value per parameter (the head's included for
    ``train-head``). ``probs`` is the head's softmax output [T, B, C] that the trainer keeps.
    """
    model = fastlstm.LSTM(config.input_size, config.hidden_size, config.layers)
    itemsize = model.params.itemsize
    memory = {"params": model.params.nbytes}
    if task in ("train", "train-head"):
        memory["gradients"] = model.params.nbytes
        tape = fastlstm.Tape(config.layers, config.steps, config.batch_size, config.input_size,
                             config.hidden_size, model.dtype)
        memory["tape"] = tape.nbytes
        memory["optimizer"] = model.params.nbytes
        if task == "train-head":
            head = (config.hidden_size + 1) * config.classes * itemsize
            memory["head params"] = head
            memory["optimizer"] += head
            memory["probs"] = config.steps * config.batch_size * config.classes * itemsize
    return memory


# ---------------------------------------------------------------------------------------------------
# The problem every peer solves: weights, inputs, labels, output-gradient weights.


class Problem:
    """Weights and data of one case, shared by every peer so that they compute the same function.

    ``kernels[l]`` [I_l + H, 4H] and ``biases[l]`` [4H] are in fastlstm's layout (gate blocks i, j, f, o;
    ``forget_bias`` is added at run time). ``x`` [B, T, I] float32, ``labels`` [B, T] int64 (for
    ``train-head``), ``weights`` G [B, T, H] of the ``train`` loss ``sum(y * G) / B``. The head is
    ``head_kernel`` [H, C] and ``head_bias`` [C]. Biases are nonzero so that a wrong gate order shows.
    """

    forget_bias = 1.0

    def __init__(self, config, task, seed=0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.config = config
        self.task = task
        rng = np.random.default_rng(seed)
        layers, inputs, hidden = config.layers, config.input_size, config.hidden_size
        batch, steps = config.batch_size, (1 if task == "step" else config.steps)
        self.steps = steps
        model = fastlstm.LSTM(inputs, hidden, layers, forget_bias=self.forget_bias, seed=rng)
        for layer in range(layers):
            model.bias(layer)[...] = rng.uniform(-0.1, 0.1, size=4 * hidden)
        self.params = model.params.copy()
        self.kernels = [model.kernel(layer).copy() for layer in range(layers)]
        self.biases = [model.bias(layer).copy() for layer in range(layers)]

        if config.name == "echo":
            bits = rng.integers(0, 2, size=(batch, steps + 3))
            self.x = bits[:, 3:, None].astype(np.float32)
            self.labels = bits[:, :steps].astype(np.int64)
        else:
            self.x = rng.standard_normal((batch, steps, inputs), dtype=np.float32)
            self.labels = rng.integers(0, max(config.classes, 1), size=(batch, steps), dtype=np.int64)
        self.weights = rng.standard_normal((batch, steps, hidden), dtype=np.float32)
        classes = max(config.classes, 1)
        limit = math.sqrt(6.0 / (hidden + classes))
        self.head_kernel = rng.uniform(-limit, limit, size=(hidden, classes)).astype(np.float32)
        self.head_bias = rng.uniform(-0.1, 0.1, size=classes).astype(np.float32)
        self.learning_rate = config.learning_rate

    @property
    def x_time_major(self):
        return np.ascontiguousarray(self.x.transpose(1, 0, 2))

    def zero_state(self):
        """Return a zero packed state [L, 2, B, H] float32 (index 0 = c, 1 = h)."""
        config = self.config
        return np.zeros((config.layers, 2, config.batch_size, config.hidden_size), dtype=np.float32)

    def gate_columns(self, order):
        """Return the column indices that reorder a [..., 4H] array into ``order`` (fastlstm gate ids)."""
        hidden = self.config.hidden_size
        return np.concatenate([np.arange(gate * hidden, (gate + 1) * hidden) for gate in order])

    def folded_bias(self, layer, order):
        """Return layer's bias in ``order`` with ``forget_bias`` added to the forget block."""
        hidden = self.config.hidden_size
        bias = self.biases[layer].copy()
        bias[GATE_F * hidden:(GATE_F + 1) * hidden] += np.float32(self.forget_bias)
        return bias[self.gate_columns(order)]


# ---------------------------------------------------------------------------------------------------
# Peers. A peer builds a runner for one problem, and calling the runner runs one iteration of the task.
# The runner's ``output()`` returns the last result: outputs [B, T, H] for ``infer``, [B, H] for ``step``
# and the loss (before the update) for the training tasks.


class Peer:
    """One implementation. Subclasses set ``name``, ``title`` and ``tasks`` and implement ``build``."""

    name = ""
    title = ""
    tasks = ()

    def unavailable(self):
        """Return why this peer cannot run here, or None when it can."""
        return None

    def version(self):
        return ""

    def configure_threads(self, threads):
        """Size this peer's thread pools; called once per process, before anything is built."""

    def notes(self):
        """Return a list of facts to print with the results (which code path the library took)."""
        return []

    def build(self, problem, threads=None):
        raise NotImplementedError


class _Runner:
    def __init__(self, run, output, close=None):
        self._run = run
        self._output = output
        self._close = close

    def __call__(self):
        self._run()

    def output(self):
        return self._output()

    def close(self):
        if self._close is not None:
            self._close()


def _module_missing(*modules):
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    return f"{', '.join(missing)} not installed" if missing else None


class FastlstmPeer(Peer):
    """fastlstm on one backend: ``Trainer.train_window`` (fused) for train-head, else the model's API."""

    tasks = TASKS

    def __init__(self, backend):
        self.backend = backend
        self._fused = []
        self.name = f"fastlstm-{backend}"
        self.title = f"fastlstm {'C' if backend == 'c' else 'Numba'}"

    def unavailable(self):
        info = fastlstm.backends()[self.backend]
        return None if info["available"] else info["reason"]

    def version(self):
        if self.backend == "numba":
            import numba

            return f"{fastlstm.__version__} (numba {numba.__version__})"
        return fastlstm.__version__

    def notes(self):
        notes = []
        if self.backend == "c":
            kernel = ("its AVX-512 row kernel" if fastlstm.backends()["c"]["row_kernel"]
                      else "its portable kernel (this CPU lacks AVX-512F)")
            notes.append(f"{self.title} multiplied weights of 4096 elements or more by {kernel}, on "
                         f"{fastlstm.get_num_threads()} thread(s) of its own pool")
        if self._fused:
            path = ("the fused train_window" if all(self._fused)
                    else "forward, head, backward and update as separate calls")
            notes.append(f"{self.title} trained with a head through Trainer.train_window, which took {path}")
        return notes

    def configure_threads(self, threads):
        if self.backend == "numba":
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        else:
            fastlstm.set_num_threads(threads)

    def build(self, problem, threads=None):
        config = problem.config
        model = fastlstm.LSTM(config.input_size, config.hidden_size, config.layers,
                              forget_bias=problem.forget_bias, backend=self.backend)
        model.params[...] = problem.params
        state = model.zero_state(config.batch_size)
        task = problem.task
        if task == "infer":
            return self._build_infer(model, state, problem)
        if task == "step":
            return self._build_step(model, state, problem)
        if task == "train":
            return self._build_train(model, state, problem)
        return self._build_train_head(model, problem)

    @staticmethod
    def _build_infer(model, state, problem):
        x = problem.x_time_major
        result = {}

        def run():
            result["y"] = model.forward(x, state, time_major=True)

        return _Runner(run, lambda: result["y"].transpose(1, 0, 2))

    @staticmethod
    def _build_step(model, state, problem):
        x_t = np.ascontiguousarray(problem.x[:, 0])
        out = np.empty((problem.config.batch_size, problem.config.hidden_size), dtype=np.float32)

        def run():
            model.step(x_t, state, out=out)

        return _Runner(run, lambda: out)

    @staticmethod
    def _build_train(model, state, problem):
        from fastlstm.optim import Adagrad

        x = problem.x_time_major
        weights = np.ascontiguousarray(problem.weights.transpose(1, 0, 2))
        d_y = weights / np.float32(problem.config.batch_size)
        optimizer = Adagrad(problem.learning_rate)
        _, tape = model.forward(x, state.copy(), time_major=True, keep_tape=True)
        grads = model.backward(tape, d_y)
        result = {}

        def run():
            y, _ = model.forward(x, state, time_major=True, keep_tape=True, tape=tape)
            # An elementwise product and sum, not np.vdot: a BLAS call would leave OpenBLAS's
            # threads spinning next to the kernel's own ones.
            result["loss"] = float(np.sum(y * d_y, dtype=np.float64))
            grads.params[...] = 0.0
            model.backward(tape, d_y, grads=grads)
            optimizer.update(model.params, grads.params)

        return _Runner(run, lambda: result["loss"])

    def _build_train_head(self, model, problem):
        from fastlstm.heads import SoftmaxHead
        from fastlstm.optim import Adagrad

        config = problem.config
        head = SoftmaxHead(config.hidden_size, config.classes, backend=self.backend)
        head.kernel[...] = problem.head_kernel
        head.bias[...] = problem.head_bias
        trainer_class = getattr(fastlstm, "Trainer", None)
        if trainer_class is None:
            from fastlstm.train import Trainer as trainer_class
        trainer = trainer_class(model, head, Adagrad(problem.learning_rate), window=problem.steps,
                                fused="auto", progress=False)
        self._fused.append(trainer.fused)
        x, labels = problem.x, problem.labels
        result = {}

        def run():
            result["loss"] = trainer.train_window(x, labels)

        return _Runner(run, lambda: result["loss"])


def _import_tensorflow(threads=None):
    # tf.compat.v1.nn.rnn_cell resolves through tf.keras, and only tf-keras (selected by this variable)
    # still has BasicLSTMCell. `import keras` keeps returning Keras 3 with it set.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _session_config(tf, threads):
    if threads is None:
        return None
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)


class _GraphRunner:
    """Feeds x and the carried packed state into a tf.compat.v1 session and fetches the final state."""

    def __init__(self, tf, graph, problem, threads, feeds, fetches, values):
        self.session = tf.compat.v1.Session(graph=graph, config=_session_config(tf, threads))
        with graph.as_default():
            self.session.run(tf.compat.v1.global_variables_initializer())
            for variable in tf.compat.v1.trainable_variables():
                variable.load(values[variable.op.name], self.session)
        self.state = problem.zero_state()
        self.feeds = feeds
        self.fetches = fetches
        self.result = None

    def __call__(self):
        feed = dict(self.feeds)
        feed[self.fetches["state_input"]] = self.state
        self.state, self.result = self.session.run([self.fetches["final_state"], self.fetches["result"]]
                                                   + self.fetches["extra"], feed_dict=feed)[:2]

    def output(self):
        return self.result

    def close(self):
        self.session.close()


class TensorFlowGraphPeer(Peer):
    """The original program's graph: BasicLSTMCell, MultiRNNCell, static_rnn, Session.run.

    With ``block=True`` the recurrence is TensorFlow's fused ``BlockLSTM`` op per layer (gate order
    i, c, f, o like BasicLSTMCell, ``forget_bias`` as an attribute, no peepholes, no cell clipping)
    and everything else, including the session and the optimizer, stays the same.
    """

    tasks = TASKS

    def __init__(self, block=False):
        self.block = block
        self.name = "tf-blocklstm" if block else "tf-graph"
        self.title = "TF BlockLSTM" if block else "TF graph (static_rnn)"

    def unavailable(self):
        return _module_missing("tensorflow", "tf_keras")

    def version(self):
        return _import_tensorflow().__version__

    def configure_threads(self, threads):
        # Sessions get their own thread counts; this sizes the eager runtime shared with Keras.
        tf = _import_tensorflow()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # the runtime was already initialized with these settings by another peer

    def notes(self):
        if not self.block:
            return []
        tf = _import_tensorflow()
        ops = [name for name in ("BlockLSTM", "BlockLSTMV2") if hasattr(tf.raw_ops, name)]
        return [f"TensorFlow {tf.__version__} has {' and '.join(ops)} with registered gradients; the "
                f"benchmark uses BlockLSTM (gate order i, c, f, o and forget_bias as in BasicLSTMCell)"]

    def build(self, problem, threads=None):
        tf = _import_tensorflow()
        tf1 = tf.compat.v1
        config, task = problem.config, problem.task
        layers, hidden, batch, steps = config.layers, config.hidden_size, config.batch_size, problem.steps
        graph = tf.Graph()
        values = {}
        with graph.as_default():
            x_input = tf1.placeholder(tf.float32, (batch, steps, config.input_size), name="x")
            state_input = tf1.placeholder(tf.float32, (layers, 2, batch, hidden), name="state")
            if self.block:
                outputs, final_state = self._block_stack(tf, problem, x_input, state_input, values)
            else:
                outputs, final_state = self._static_rnn_stack(tf, problem, x_input, state_input, values)
            feeds = {x_input: problem.x}
            extra = []
            if task in ("infer", "step"):
                result = outputs if task == "infer" else outputs[:, -1]
            else:
                if task == "train-head":
                    with tf1.variable_scope("dense"):
                        kernel = tf1.get_variable("kernel", (hidden, config.classes), tf.float32)
                        bias = tf1.get_variable("bias", (config.classes,), tf.float32)
                    values["dense/kernel"] = problem.head_kernel
                    values["dense/bias"] = problem.head_bias
                    logits = tf.reshape(outputs, (batch * steps, hidden)) @ kernel + bias
                    labels = tf1.placeholder(tf.int64, (batch, steps), name="labels")
                    feeds[labels] = problem.labels
                    result = tf.reduce_mean(tf1.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=tf.reshape(labels, (-1,)), logits=logits))
                else:
                    result = tf.reduce_sum(outputs * tf.constant(problem.weights)) / batch
                extra = [tf1.train.AdagradOptimizer(problem.learning_rate).minimize(result)]
            fetches = {"state_input": state_input, "final_state": final_state, "result": result, "extra": extra}
            return _GraphRunner(tf, graph, problem, threads, feeds, fetches, values)

    @staticmethod
    def _static_rnn_stack(tf, problem, x_input, state_input, values):
        tf1 = tf.compat.v1
        layers = problem.config.layers
        per_layer = tf.unstack(state_input, axis=0)
        initial = tuple(tf1.nn.rnn_cell.LSTMStateTuple(per_layer[layer][0], per_layer[layer][1])
                        for layer in range(layers))
        with warnings.catch_warnings():
            # BasicLSTMCell's deprecation notice: the benchmark measures this very class on purpose.
            warnings.simplefilter("ignore", UserWarning)
            cells = [tf1.nn.rnn_cell.BasicLSTMCell(problem.config.hidden_size, forget_bias=problem.forget_bias)
                     for _ in range(layers)]
        stack = tf1.nn.rnn_cell.MultiRNNCell(cells)
        outputs, final = tf1.nn.static_rnn(stack, tf.unstack(x_input, axis=1), initial_state=initial)
        for layer in range(layers):
            prefix = f"rnn/multi_rnn_cell/cell_{layer}/basic_lstm_cell"
            values[f"{prefix}/kernel"] = problem.kernels[layer]
            values[f"{prefix}/bias"] = problem.biases[layer]
        final_state = tf.stack([tf.stack([cell_state.c, cell_state.h]) for cell_state in final])
        return tf.stack(outputs, axis=1), final_state

    @staticmethod
    def _block_stack(tf, problem, x_input, state_input, values):
        tf1 = tf.compat.v1
        config = problem.config
        hidden = config.hidden_size
        peephole = tf.zeros((hidden,), tf.float32)
        inputs = tf.transpose(x_input, (1, 0, 2))
        finals = []
        for layer in range(config.layers):
            with tf1.variable_scope(f"block_lstm_{layer}"):
                kernel = tf1.get_variable("kernel", problem.kernels[layer].shape, tf.float32)
                bias = tf1.get_variable("bias", problem.biases[layer].shape, tf.float32)
            values[f"block_lstm_{layer}/kernel"] = problem.kernels[layer]
            values[f"block_lstm_{layer}/bias"] = problem.biases[layer]
            # cell_clip < 0 turns clipping off; the default 3 would clip c.
            _, cs, _, _, _, _, h = tf.raw_ops.BlockLSTM(
                seq_len_max=tf.constant(problem.steps, tf.int64), x=inputs, cs_prev=state_input[layer, 0],
                h_prev=state_input[layer, 1], w=kernel, wci=peephole, wcf=peephole, wco=peephole, b=bias,
                forget_bias=problem.forget_bias, cell_clip=-1.0, use_peephole=False)
            finals.append(tf.stack([cs[-1], h[-1]]))
            inputs = h
        return tf.transpose(inputs, (1, 0, 2)), tf.stack(finals)


class KerasPeer(Peer):
    """Keras 3 ``LSTM`` layers (stateful, so the state carries between calls) on the TensorFlow backend.

    Training is ``Model.train_on_batch``, Keras's compiled train step (``jit_compile`` left at Keras's
    default "auto"); inference calls the model inside one ``tf.function``. Keras's Adagrad adds an
    epsilon that TensorFlow 1.x's lacks; the cost is the same.
    """

    name = "keras"
    title = "Keras 3 LSTM"
    tasks = TASKS

    def __init__(self):
        self._jit = []

    def unavailable(self):
        missing = _module_missing("tensorflow", "keras")
        if missing:
            return missing
        keras = self._keras()
        if not keras.__version__.startswith("3"):
            return f"keras {keras.__version__} is not Keras 3"
        if keras.backend.backend() != "tensorflow":
            return f"Keras backend is {keras.backend.backend()}, not tensorflow (set KERAS_BACKEND=tensorflow)"
        return None

    @staticmethod
    def _keras():
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        _import_tensorflow()
        import keras

        return keras

    def version(self):
        return self._keras().__version__

    def configure_threads(self, threads):
        TensorFlowGraphPeer.configure_threads(self, threads)

    def notes(self):
        if not self._jit:
            return []
        modes = " and ".join(f"jit_compile={value}" for value in sorted(set(self._jit)))
        return [f"Keras 3 resolved jit_compile='auto' of its compiled train step to {modes} (True would mean XLA)"]

    def build(self, problem, threads=None):
        keras = self._keras()
        tf = _import_tensorflow()
        config, task = problem.config, problem.task
        batch, steps, hidden = config.batch_size, problem.steps, config.hidden_size
        keras.utils.clear_session(free_memory=False)
        inputs = keras.Input(batch_shape=(batch, steps, config.input_size))
        lstm_layers = [keras.layers.LSTM(hidden, return_sequences=True, stateful=True)
                       for _ in range(config.layers)]
        outputs = inputs
        for layer in lstm_layers:
            outputs = layer(outputs)
        order = (GATE_I, GATE_F, GATE_J, GATE_O)
        columns = problem.gate_columns(order)
        for index, layer in enumerate(lstm_layers):
            kernel = problem.kernels[index][:, columns]
            rows = kernel.shape[0] - hidden
            layer.set_weights([kernel[:rows], kernel[rows:], problem.folded_bias(index, order)])
        result = {}
        if task in ("infer", "step"):
            model = keras.Model(inputs, outputs)
            call = tf.function(lambda x: model(x, training=False))
            x = tf.constant(problem.x)

            def run():
                result["y"] = call(x).numpy()

            output = (lambda: result["y"]) if task == "infer" else (lambda: result["y"][:, -1])
            return _Runner(run, output, lambda: keras.utils.clear_session(free_memory=False))

        if task == "train-head":
            dense = keras.layers.Dense(config.classes)
            model = keras.Model(inputs, dense(outputs))
            dense.set_weights([problem.head_kernel, problem.head_bias])
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            target = problem.labels
        else:
            model = keras.Model(inputs, outputs)

            def loss(weights, y):
                # Per-sample sum(y * G); Keras takes the mean over the batch, so this is sum(y * G) / B.
                return keras.ops.sum(y * weights, axis=(1, 2))

            target = problem.weights
        model.compile(optimizer=keras.optimizers.Adagrad(problem.learning_rate), loss=loss)
        # compile() resolves jit_compile="auto" to True (XLA) or False.
        self._jit.append(bool(model.jit_compile))
        x = problem.x

        def run():
            result["loss"] = float(model.train_on_batch(x, target))

        return _Runner(run, lambda: result["loss"], lambda: keras.utils.clear_session(free_memory=False))


class TorchPeer(Peer):
    """PyTorch ``nn.LSTM`` on the CPU (time-major), ``nn.Linear`` + ``cross_entropy`` head, Adagrad."""

    name = "torch"
    title = "PyTorch nn.LSTM"
    tasks = TASKS

    def unavailable(self):
        return _module_missing("torch")

    def version(self):
        import torch

        return torch.__version__

    def configure_threads(self, threads):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass  # only settable before the first parallel work; the worker calls this first

    def notes(self):
        import torch

        notes = [f"torch.backends.mkldnn.is_available() = {torch.backends.mkldnn.is_available()}, "
                 f"enabled = {torch.backends.mkldnn.enabled}"]
        lstm = torch.nn.LSTM(8, 8, 2)
        x = torch.zeros(3, 2, 8)
        for label, grad in (("training", True), ("inference", False)):
            with torch.set_grad_enabled(grad), torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                lstm(x)[0].sum()
            names = sorted({event.key for event in profile.key_averages() if "rnn" in event.key
                            or "lstm" in event.key.lower()})
            via = "oneDNN (mkldnn)" if any("mkldnn" in name for name in names) else "not oneDNN"
            notes.append(f"PyTorch nn.LSTM {label} forward ran {', '.join(names)}: {via}")
        return notes

    def build(self, problem, threads=None):
        import torch

        config, task = problem.config, problem.task
        hidden = config.hidden_size
        lstm = torch.nn.LSTM(config.input_size, hidden, config.layers)
        order = (GATE_I, GATE_F, GATE_J, GATE_O)
        columns = problem.gate_columns(order)
        with torch.no_grad():
            for layer in range(config.layers):
                kernel = problem.kernels[layer][:, columns]
                rows = kernel.shape[0] - hidden
                getattr(lstm, f"weight_ih_l{layer}").copy_(torch.from_numpy(kernel[:rows].T.copy()))
                getattr(lstm, f"weight_hh_l{layer}").copy_(torch.from_numpy(kernel[rows:].T.copy()))
                getattr(lstm, f"bias_ih_l{layer}").copy_(torch.from_numpy(problem.folded_bias(layer, order)))
                getattr(lstm, f"bias_hh_l{layer}").zero_()
        x = torch.from_numpy(problem.x_time_major)
        state = {"h": torch.zeros(config.layers, config.batch_size, hidden),
                 "c": torch.zeros(config.layers, config.batch_size, hidden)}
        result = {}
        if task in ("infer", "step"):
            def run():
                with torch.inference_mode():
                    y, (state["h"], state["c"]) = lstm(x, (state["h"], state["c"]))
                result["y"] = y

            output = (lambda: result["y"].numpy().transpose(1, 0, 2)) if task == "infer" \
                else (lambda: result["y"][-1].numpy())
            return _Runner(run, output)

        parameters = list(lstm.parameters())
        if task == "train-head":
            dense = torch.nn.Linear(hidden, config.classes)
            with torch.no_grad():
                dense.weight.copy_(torch.from_numpy(problem.head_kernel.T.copy()))
                dense.bias.copy_(torch.from_numpy(problem.head_bias))
            parameters += list(dense.parameters())
            labels = torch.from_numpy(np.ascontiguousarray(problem.labels.T).reshape(-1))

            def loss_of(y):
                return torch.nn.functional.cross_entropy(dense(y.reshape(-1, hidden)), labels)
        else:
            weights = torch.from_numpy(np.ascontiguousarray(problem.weights.transpose(1, 0, 2)))

            def loss_of(y):
                return (y * weights).sum() / config.batch_size
        optimizer = torch.optim.Adagrad(parameters, lr=problem.learning_rate, initial_accumulator_value=0.1)

        def run():
            optimizer.zero_grad()
            y, (h, c) = lstm(x, (state["h"], state["c"]))
            loss = loss_of(y)
            loss.backward()
            optimizer.step()
            state["h"], state["c"] = h.detach(), c.detach()
            result["loss"] = loss.item()

        return _Runner(run, lambda: result["loss"])


class OnnxRuntimePeer(Peer):
    """ONNX Runtime running a graph of one ONNX ``LSTM`` node per layer (inference only).

    The graph is built with the ``onnx`` helper API: ONNX orders the gates i, o, f, c, keeps W [4H, I]
    and R [4H, H] apart and has two biases, of which the second is left at zero here.
    """

    name = "onnxruntime"
    title = "ONNX Runtime LSTM"
    tasks = ("infer", "step")

    def unavailable(self):
        return _module_missing("onnxruntime", "onnx")

    def version(self):
        import onnxruntime

        return onnxruntime.__version__

    def build(self, problem, threads=None):
        import onnxruntime

        config = problem.config
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = threads
        session = onnxruntime.InferenceSession(_onnx_lstm_model(problem).SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        zeros = np.zeros((1, config.batch_size, config.hidden_size), dtype=np.float32)
        feed = {"x": problem.x_time_major}
        for layer in range(config.layers):
            feed[f"h0_{layer}"] = zeros
            feed[f"c0_{layer}"] = zeros
        result = {}

        def run():
            outputs = session.run(None, feed)
            result["y"] = outputs[0]
            for layer in range(config.layers):
                feed[f"h0_{layer}"] = outputs[1 + 2 * layer]
                feed[f"c0_{layer}"] = outputs[2 + 2 * layer]

        output = (lambda: result["y"].transpose(1, 0, 2)) if problem.task == "infer" \
            else (lambda: result["y"][-1])
        return _Runner(run, output)


def _onnx_lstm_model(problem):
    from onnx import TensorProto, helper, numpy_helper

    config = problem.config
    hidden, batch, steps = config.hidden_size, config.batch_size, problem.steps
    order = (GATE_I, GATE_O, GATE_F, GATE_J)
    columns = problem.gate_columns(order)
    state_shape = (1, batch, hidden)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (steps, batch, config.input_size))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, (steps, batch, hidden))]
    initializers = [numpy_helper.from_array(np.array([1], dtype=np.int64), "squeeze_axes")]
    nodes = []
    layer_input = "x"
    for layer in range(config.layers):
        kernel = problem.kernels[layer][:, columns]
        rows = kernel.shape[0] - hidden
        bias = np.concatenate([problem.folded_bias(layer, order), np.zeros(4 * hidden, np.float32)])
        initializers += [numpy_helper.from_array(np.ascontiguousarray(kernel[:rows].T[None]), f"w_{layer}"),
                         numpy_helper.from_array(np.ascontiguousarray(kernel[rows:].T[None]), f"r_{layer}"),
                         numpy_helper.from_array(bias[None], f"b_{layer}")]
        inputs += [helper.make_tensor_value_info(f"h0_{layer}", TensorProto.FLOAT, state_shape),
                   helper.make_tensor_value_info(f"c0_{layer}", TensorProto.FLOAT, state_shape)]
        outputs += [helper.make_tensor_value_info(f"h_{layer}", TensorProto.FLOAT, state_shape),
                    helper.make_tensor_value_info(f"c_{layer}", TensorProto.FLOAT, state_shape)]
        nodes.append(helper.make_node(
            "LSTM", [layer_input, f"w_{layer}", f"r_{layer}", f"b_{layer}", "", f"h0_{layer}", f"c0_{layer}"],
            [f"y4_{layer}", f"h_{layer}", f"c_{layer}"], hidden_size=hidden))
        # Y is [T, num_directions = 1, B, H].
        layer_output = "y" if layer == config.layers - 1 else f"y_{layer}"
        nodes.append(helper.make_node("Squeeze", [f"y4_{layer}", "squeeze_axes"], [layer_output]))
        layer_input = layer_output
    graph = helper.make_graph(nodes, "fastlstm_bench_lstm", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # An IR version that ONNX Runtime releases of the last years all read.
    model.ir_version = 8
    return model


def default_peers():
    """Return the peers that need only installed packages, fastlstm C first (the baseline)."""
    return [FastlstmPeer("c"), FastlstmPeer("numba"), TensorFlowGraphPeer(), TensorFlowGraphPeer(block=True),
            KerasPeer(), TorchPeer(), OnnxRuntimePeer()]


def load_peer_module(path):
    """Import the Python file at ``path`` and return its ``PEERS`` list (extra peers, e.g. the numpy reference)."""
    spec = importlib.util.spec_from_file_location(f"fastlstm_bench_peers_{abs(hash(path))}", path)
    if spec is None:
        raise ValueError(f"--peer-module must be a Python file, got {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    peers = getattr(module, "PEERS", None)
    if not isinstance(peers, list) or not all(isinstance(peer, Peer) for peer in peers):
        raise ValueError(f"{path} must define PEERS, a list of fastlstm.bench.Peer instances")
    return peers


# ---------------------------------------------------------------------------------------------------
# Timing.


def _calibrate(function, target):
    # Return how many calls take about `target` seconds (at least 1).
    count = 1
    while True:
        start = time.perf_counter()
        for _ in range(count):
            function()
        elapsed = time.perf_counter() - start
        if elapsed >= target or count >= 1 << 20:
            return count
        count = max(count * 2, int(count * target / max(elapsed, 1e-9)) + 1) if elapsed > target / 20 \
            else count * 10


def measure_interleaved(runners, *, budget, min_rounds, max_rounds, batch_time, warmup_time,
                        settle_time=0.0):
    """Time ``{name: runner}`` in interleaved rounds; return ``{name: {"times": [...], "calls": n}}``.

    Each runner is warmed up (at least 1 call and ``warmup_time`` seconds), then given a batch size n
    so that n calls take about ``batch_time``. A round times one batch of every runner, in an order
    rotated by one each round, so that slow drifts of the machine hit every runner alike. Before each
    batch the process sleeps ``settle_time`` seconds and makes one untimed call: thread pools that
    spin after a call (OpenMP, ONNX Runtime, Eigen, OpenBLAS, fastlstm's own) would otherwise take
    cores from the runner that follows them, which a program using one library never meets. The
    number of rounds fits ``budget`` seconds, within [min_rounds, max_rounds]. ``times`` are seconds
    per call, one per round.
    """
    names = list(runners)
    batches, per_call = {}, {}
    for name in names:
        runner = runners[name]
        start = time.perf_counter()
        calls = 0
        while calls < 1 or time.perf_counter() - start < warmup_time:
            runner()
            calls += 1
        start = time.perf_counter()
        batches[name] = _calibrate(runner, batch_time)
        per_call[name] = time.perf_counter() - start
    # A runner slower than batch_time runs one call per round; the last calibration pass took about one batch.
    round_time = sum(max(batch_time, per_call[name] / max(batches[name], 1)) + settle_time for name in names)
    rounds = int(min(max_rounds, max(min_rounds, budget / max(round_time, 1e-9))))
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runner, count = runners[name], batches[name]
            if settle_time > 0:
                time.sleep(settle_time)
                runner()
            start = time.perf_counter()
            for _ in range(count):
                runner()
            times[name].append((time.perf_counter() - start) / count)
    return {name: {"times": times[name], "calls": batches[name]} for name in names}


# ---------------------------------------------------------------------------------------------------
# Worker processes.

SETTINGS = {
    # budget: seconds of timed rounds per case and thread setting.
    "full": {"budget": 15.0, "min_rounds": 5, "max_rounds": 15, "batch_time": 0.05, "warmup_time": 0.3,
             "settle_time": 0.2},
    "quick": {"budget": 2.0, "min_rounds": 3, "max_rounds": 5, "batch_time": 0.02, "warmup_time": 0.05,
              "settle_time": 0.05},
}

THREAD_VARIABLES = ("FASTLSTM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
REPORTED_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") + THREAD_VARIABLES + (
    "FASTLSTM_BACKEND", "TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND")


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _select_peers(peers, names):
    if names is None:
        return peers
    known = {peer.name for peer in peers}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--peers must name known implementations {sorted(known)}, got {unknown}")
    return [peer for peer in peers if peer.name in names]


def _available(peers):
    available, skipped = [], {}
    for peer in peers:
        reason = peer.unavailable()
        if reason is None:
            available.append(peer)
        else:
            skipped[peer.name] = reason
    return available, skipped


def _fastlstm_build():
    # Fingerprints of the kernels this process loaded, so that a report can show a rebuild between passes.
    import hashlib

    files = {}
    for name in ("c", "numba"):
        if fastlstm.backends()[name]["available"]:
            _, module = resolve_backend(name)
            with open(module.__file__, "rb") as source:
                files[name] = f"{os.path.basename(module.__file__)} sha256 {hashlib.sha256(source.read()).hexdigest()[:12]}"
    return files


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{key: pool.get(key) for key in ("user_api", "internal_api", "version", "num_threads",
                                              "threading_layer", "architecture")}
            | {"library": os.path.basename(pool.get("filepath", ""))} for pool in threadpool_info()]


def run_worker(args, peers):
    """Measure every case with one thread setting; return the results as a JSON-ready dict."""
    threads = args.threads_value
    available, skipped = _available(peers)
    for peer in available:
        peer.configure_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        # NOTE: without threadpoolctl only the *_NUM_THREADS variables of the worker size the BLAS pools.
        limits = None
    else:
        limits = threadpool_limits(limits=threads)
    settings = SETTINGS["quick" if args.quick else "full"]

    results = {"threads": threads, "skipped": skipped, "cases": [], "notes": [], "versions": {},
               "load_start": _load()}
    for config, task in cases(args.configs):
        problem = Problem(config, task)
        label = case_id(config, task)
        runners, failures = {}, {}
        for peer in available:
            if task not in peer.tasks:
                continue
            try:
                start = time.perf_counter()
                runners[peer.name] = peer.build(problem, threads)
                _log(f"  [{threads} thread(s)] {label}: built {peer.name} in {time.perf_counter() - start:.1f} s")
            except Exception as error:  # one peer's failure must not stop the others' measurements
                failures[peer.name] = f"{type(error).__name__}: {error}"
                _log(f"  [{threads} thread(s)] {label}: {peer.name} failed to build: {failures[peer.name]}")

        measured = measure_interleaved(runners, **settings) if runners else {}
        for runner in runners.values():
            runner.close()
        ceiling = sgemm_seconds(config, task, min_time=0.02 if args.quick else 0.1)
        results["cases"].append({"config": config.name, "task": task, "label": label,
                                 "flops": case_flops(config, task), "sgemm_seconds": ceiling,
                                 "results": measured, "failures": failures})
        summary = ", ".join(f"{name} {np.median(value['times']) * 1e3:.3g} ms" for name, value in measured.items())
        _log(f"  [{threads} thread(s)] {label}: {summary}")

    for peer in available:
        results["versions"][peer.name] = peer.version()
        try:
            results["notes"] += peer.notes()
        except Exception as error:
            results["notes"].append(f"{peer.name}: could not determine its code path ({error})")
    results["blas"] = _blas_info()
    results["build"] = _fastlstm_build()
    results["load_end"] = _load()
    if limits is not None:
        limits.restore_original_limits()
    return results


def run_rss_worker(args, peers):
    """Build one peer for one case, run it a few times and return its resident set sizes in KiB.

    ``baseline`` is the peak after importing the peer's libraries and before building, ``peak`` the
    peak after the runs (both ``getrusage(RUSAGE_SELF).ru_maxrss`` of this process).
    """
    peer = {peer.name: peer for peer in peers}[args.rss_peer]
    config = CONFIGS[args.configs[0]]
    problem = Problem(config, args.rss_task)
    peer.configure_threads(args.threads_value)  # also imports the peer's libraries
    peer.version()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = peer.build(problem, args.threads_value)
    for _ in range(2):
        runner()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"baseline_kib": baseline, "peak_kib": peak}


def _worker_environment(threads):
    env = dict(os.environ)
    for variable in THREAD_VARIABLES:
        env[variable] = str(threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    return env


def _run_child(argv, threads, timeout, quiet=False):
    # Run `python -m fastlstm.bench argv` with the thread setting; return (result, None) or (None, why).
    command = [sys.executable, "-m", "fastlstm.bench"] + argv
    with tempfile.NamedTemporaryFile("r", suffix=".json") as output:
        completed = subprocess.run(command + ["--result-file", output.name], env=_worker_environment(threads),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if quiet else None,
                                   text=True, timeout=timeout, check=False)
        if completed.returncode != 0:
            detail = completed.stderr.strip().splitlines()[-1:] if quiet and completed.stderr else []
            return None, "; ".join([f"exit status {completed.returncode}"] + detail)
        return json.load(output), None


# ---------------------------------------------------------------------------------------------------
# The report.


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _format_seconds(seconds):
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _summaries(case):
    # {peer: (median, min, max)} in seconds per call.
    return {name: (float(np.median(value["times"])), float(np.min(value["times"])), float(np.max(value["times"])))
            for name, value in case["results"].items()}


def _ratio(case, name, baseline="fastlstm-c"):
    summaries = _summaries(case)
    if baseline not in summaries or name not in summaries:
        return None
    return summaries[name][0] / summaries[baseline][0]


# The speed targets of the C backend: (configuration, task, peers, ratio). The implementation must be
# at least `ratio` times faster than each peer (peer median / fastlstm median >= ratio); a ratio of
# 1.0 means strictly faster. The Numba backend's targets are half of these ratios.
TARGETS = (
    ("echo", "train-head", ("tf-blocklstm", "torch", "tf-graph"), 100.0),
    ("echo", "infer", ("onnxruntime",), 10.0),
    ("ptb-small", "train", ("torch",), 1.5),
    ("ptb-medium", "train", ("torch",), 1.25),
    ("wide-inference", "infer", ("torch",), 1.0),
    ("wide-inference", "infer", ("onnxruntime",), 1.2),
    ("streaming", "step", ("torch", "onnxruntime"), 1.0),
)


def _target_met(measured, required):
    return measured > required if required == 1.0 else measured >= required


def _targets_section(run):
    """Return the Markdown lines of the Targets section: per thread setting, each target, its
    required ratio and the measured one."""
    titles = run["titles"]
    lines = ["## Targets", "",
             "fastlstm's speed targets as ratios of a peer's median time to fastlstm's, measured in this "
             "run (C: at least the ratio shown; a ratio of 1 means faster; Numba: half of C's ratio). A "
             "blank cell is a peer or case that did not run.", ""]
    for threads, worker in run["workers"].items():
        by_case = {(case["config"], case["task"]): case for case in worker["cases"]}
        lines += [f"{_threads_label(threads)}:", "",
                  "| case | peer | C needs | C measured | met | Numba needs | Numba measured | met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for config, task, peers, required in TARGETS:
            case = by_case.get((config, task))
            if case is None:
                continue
            for peer in peers:
                c_ratio = _ratio(case, peer)
                numba_ratio = _ratio(case, peer, baseline="fastlstm-numba")
                cells = []
                for measured, needed in ((c_ratio, required), (numba_ratio, required / 2)):
                    if measured is None:
                        cells += [f"{needed:g}", "", ""]
                    else:
                        cells += [f"{needed:g}", f"{measured:.2f}", "yes" if _target_met(measured, needed) else "no"]
                lines.append(f"| {case['label']} | {titles.get(peer, peer)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_report(run):
    """Return the Markdown report of a finished run (the dict ``run_bench`` assembles)."""
    titles = run["titles"]
    lines = ["# Benchmarks", "",
             "fastlstm against other LSTM implementations on one CPU. Every figure from here to the Memory "
             "section was written by the command below; none is edited by hand. Times are per call: one training step (forward, "
             "backward, Adagrad update), one inference over the window, or one streaming step. The ratio is "
             "the implementation's median time over fastlstm C's (above 1: slower than fastlstm C).", "",
             "```", run["command"], "```", ""]
    lines += ["## Machine and settings", "",
              f"- Date: {run['date']}",
              f"- CPU: {run['cpu']}, {run['cores']} logical cores",
              f"- Load average (1, 5, 15 min) at the start: {run['load_start']}, at the end: {run['load_end']}. "
              "A load above the number of cores means that other processes competed for them; the min–max "
              "ranges show how much that moved the figures, and multithreaded BLAS and OpenMP pools suffer "
              "most from it.",
              f"- Python {run['python']}, numpy {run['numpy']}; thread settings: {', '.join(map(str, run['threads']))} "
              "(each in its own process; fastlstm C's pool through `fastlstm.set_num_threads`, BLAS and OpenMP "
              "pools through threadpoolctl and the *_NUM_THREADS "
              "variables, `torch.set_num_threads` and `set_num_interop_threads`, TensorFlow intra- and "
              "inter-op threads for sessions and the eager runtime, ONNX Runtime intra- and inter-op threads)",
              f"- Mode: {run['mode']}: per case and thread setting, a warm-up, then interleaved rounds "
              "(rotating order), each timing a batch of calls per implementation after a pause and one untimed "
              "call (so that thread pools still spinning from the previous implementation do not take its "
              "cores); medians over rounds, with "
              "min–max", ""]

    lines += ["Environment variables of the run (workers override the *_NUM_THREADS ones with the thread setting):", ""]
    lines += [f"- `{name}` = {run['environment'].get(name, '(unset)')}" for name in REPORTED_VARIABLES]
    builds = {json.dumps(worker.get("build"), sort_keys=True) for worker in run["workers"].values()}
    lines += ["", "fastlstm kernels loaded by the workers:", ""]
    for threads, worker in run["workers"].items():
        lines += [f"- {_threads_label(threads)}: " + "; ".join(f"{name}: {text}" for name, text in
                                                              worker.get("build", {}).items())]
    if len(builds) > 1:
        lines += ["", "WARNING: the workers loaded different fastlstm builds (the source changed during the "
                      "run), so the thread settings are not comparable."]
    lines += ["", "Versions:", ""]
    lines += [f"- {titles.get(name, name)}: {version}" for name, version in run["versions"].items()]
    for name, reason in run["skipped"].items():
        lines.append(f"- {titles.get(name, name)}: skipped ({reason})")
    lines += ["", "BLAS and OpenMP pools loaded in the worker (threadpoolctl, all-threads worker; empty without "
              "threadpoolctl):", ""]
    lines += [f"- {pool['user_api']}: {pool['internal_api']} {pool['version'] or ''} ({pool['library']}, "
              f"{pool['num_threads']} threads{', ' + pool['architecture'] if pool.get('architecture') else ''})"
              for pool in run["blas"]]
    if run["notes"]:
        lines += ["", "Code paths:", ""] + [f"- {note}" for note in run["notes"]]

    lines += ["", "## Headline: time relative to fastlstm C", "",
              "Median time of each implementation divided by fastlstm C's median for the same case and "
              "thread setting. A blank cell is a task the implementation does not run.", ""]
    lines += _ratio_tables(run)
    lines += _targets_section(run)
    lines += ["", "## Per case", "",
              "GFLOP/s counts the LSTM's forward as 2·B·(I+H)·4H per layer and step, its backward twice that, "
              "and the head's dense layer as 2·T·B·H·C forward and twice that backward. \"% sgemm\" is the "
              "time numpy's float32 matmul needs for the same products, at the same shapes and thread "
              "setting, divided by the implementation's time: the share of the BLAS ceiling reached. At tiny "
              "shapes numpy's ceiling is mostly its per-call overhead, which code without BLAS calls can beat "
              "(above 100 %).", ""]
    for threads, worker in run["workers"].items():
        for case in worker["cases"]:
            lines += _case_table(case, threads, titles)
    lines += _memory_section(run)
    return "\n".join(lines) + "\n"


def _peer_order(run):
    return [name for name in run["titles"] if name not in run["skipped"]]


def _ratio_tables(run):
    lines = []
    names = [name for name in _peer_order(run) if name != "fastlstm-c"]
    for threads, worker in run["workers"].items():
        lines += [f"{_threads_label(threads)} (load average {worker['load_start']} at the start of this pass, "
                  f"{worker['load_end']} at its end):", "",
                  "| case | fastlstm C median | " + " | ".join(run["titles"][n] for n in names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for case in worker["cases"]:
            summaries = _summaries(case)
            base = summaries.get("fastlstm-c")
            cells = []
            for name in names:
                ratio = _ratio(case, name)
                if ratio is not None:
                    cells.append(f"{ratio:.2f}")
                elif name in case["failures"]:
                    cells.append("failed")
                else:
                    cells.append("")
            base_text = _format_seconds(base[0]) if base else "n/a"
            lines.append(f"| {case['label']} | {base_text} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _threads_label(threads):
    return f"{threads} thread" + ("" if int(threads) == 1 else "s")


def _case_table(case, threads, titles):
    lines = [f"### {case['label']} ({case['config']}), {_threads_label(threads)}", "",
             f"{case['flops'] / 1e9:.4g} GFLOP per call; numpy sgemm ceiling {_format_seconds(case['sgemm_seconds'])} "
             f"per call.", "",
             "| implementation | median | min–max | ratio to fastlstm C | GFLOP/s | % sgemm | rounds × calls |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    summaries = _summaries(case)
    for name, (median, low, high) in sorted(summaries.items(), key=lambda item: item[1][0]):
        ratio = _ratio(case, name)
        rounds = len(case["results"][name]["times"])
        lines.append(f"| {titles.get(name, name)} | {_format_seconds(median)} | {_format_seconds(low)}–"
                     f"{_format_seconds(high)} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{case['flops'] / median / 1e9:.3g} | {100 * case['sgemm_seconds'] / median:.3g} | "
                     f"{rounds} × {case['results'][name]['calls']} |")
    for name, failure in case["failures"].items():
        lines.append(f"| {titles.get(name, name)} | failed: {failure} | | | | | |")
    return lines + [""]


def _memory_section(run):
    lines = ["## Memory", "",
             "What fastlstm keeps per training call (float32): the tape is `Tape.nbytes` (gate activations "
             "[L, T, B, 4H], cell and hidden states [L, T + 1, B, H]); the optimizer is Adagrad's accumulator; "
             "probs is the head's softmax output [T, B, C] that the trainer keeps.", "",
             "| case | params | gradients | tape | optimizer | head params | probs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for config, task in cases(run["configs"]):
        memory = fastlstm_memory(config, task)
        cells = [_format_bytes(memory[key]) if key in memory else "" for key in
                 ("params", "gradients", "tape", "optimizer", "head params", "probs")]
        lines.append(f"| {case_id(config, task)} | " + " | ".join(cells) + " |")
    lines.append("")
    if not run["rss"]:
        lines += ["Peak RSS was not measured (it is off with `--quick` and `--no-rss`).", ""]
        return lines
    names = _peer_order(run)
    lines += ["Peak resident set size in MiB of a fresh process per implementation and case (all threads): the "
              "process imports the implementation's libraries (baseline, in parentheses), builds it and runs "
              "2 calls; both are `getrusage(RUSAGE_SELF).ru_maxrss` of that process. Most of a baseline is the "
              "libraries themselves.", "",
              "| case | " + " | ".join(run["titles"][n] for n in names) + " |",
              "| --- | " + " | ".join("---" for _ in names) + " |"]
    for label, per_peer in run["rss"].items():
        cells = []
        for name in names:
            value = per_peer.get(name)
            if value is None:
                cells.append("")
            elif "error" in value:
                cells.append("failed")
            else:
                cells.append(f"{value['peak_kib'] / 1024:.0f} ({value['baseline_kib'] / 1024:.0f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _format_bytes(count):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def write_chart(run, path):
    """Write a PNG bar chart of the ratios to fastlstm C, one panel per thread setting (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in _peer_order(run) if name != "fastlstm-c"]
    panels = list(run["workers"].items())
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 4.5 * len(panels)), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for axis, (threads, worker) in zip(axes[:, 0], panels):
        labels = [case["label"] for case in worker["cases"]]
        for index, name in enumerate(names):
            ratios = [_ratio(case, name) for case in worker["cases"]]
            positions = [position + (index - (len(names) - 1) / 2) * width for position in range(len(labels))]
            heights = [ratio if ratio is not None else np.nan for ratio in ratios]
            axis.bar(positions, heights, width, label=run["titles"][name])
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("time / fastlstm C time")
        axis.set_title(f"Median time relative to fastlstm C, {_threads_label(threads)} (lower is faster)")
        axis.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=4)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# The command line.


def build_parser(prog="fastlstm bench"):
    """Return the argument parser of ``run_bench``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Time fastlstm against the other LSTM implementations installed here "
                               "(TensorFlow, Keras 3, PyTorch, ONNX Runtime) and print a Markdown report.")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: few rounds, all threads only, no peak-RSS processes (about 1-3 "
                             "minutes, mostly building the TensorFlow and Keras models)")
    parser.add_argument("--configs", type=_name_list(CONFIGS), default=None,
                        help=f"comma-separated configurations (default all: {','.join(CONFIGS)})")
    parser.add_argument("--threads", type=_thread_list, default=None,
                        help="comma-separated thread counts, 'all' for every logical core (default '1,all', "
                             "'all' with --quick)")
    parser.add_argument("--peers", type=lambda text: text.split(","), default=None,
                        help="comma-separated implementations to run (default all that are installed)")
    parser.add_argument("--peer-module", action="append", default=[], metavar="PATH",
                        help="a Python file whose PEERS list adds implementations (repeatable)")
    parser.add_argument("--output", metavar="PATH", help="also write the Markdown report to PATH")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart of the ratios to PATH")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each implementation's peak RSS in its own process (default on, off "
                             "with --quick)")
    parser.add_argument("--command", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-peer", help=argparse.SUPPRESS)
    parser.add_argument("--rss-task", help=argparse.SUPPRESS)
    parser.add_argument("--threads-value", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def _name_list(known):
    def parse(text):
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in known]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected names from {', '.join(known)}, got {text!r}")
        return names

    return parse


def _thread_list(text):
    values = []
    for item in text.split(","):
        if item == "all":
            values.append(os.cpu_count() or 1)
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected positive integers or 'all', got {item!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers or 'all', got {value}")
        values.append(value)
    return list(dict.fromkeys(values))


def run_bench(argv=None):
    """Run the comparison with the command-line arguments ``argv``; return the exit status (0 on success).

    Prints the Markdown report on stdout and progress on stderr; writes the report and the chart when
    ``--output`` and ``--chart`` are given.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    peers = default_peers()
    try:
        for path in args.peer_module:
            peers += load_peer_module(path)
        peers = _select_peers(peers, args.peers)
    except ValueError as error:
        parser.error(str(error))

    if args.worker or args.rss_peer:
        result = run_worker(args, peers) if args.worker else run_rss_worker(args, peers)
        with open(args.result_file, "w", encoding="utf-8") as output:
            json.dump(result, output)
        return 0

    threads = args.threads or ([os.cpu_count() or 1] if args.quick else [1, os.cpu_count() or 1])
    configs = args.configs or list(CONFIGS)
    measure_rss = (not args.quick) if args.rss is None else args.rss
    forwarded = ["--configs", ",".join(configs)]
    for path in args.peer_module:
        forwarded += ["--peer-module", os.path.abspath(path)]
    if args.peers:
        forwarded += ["--peers", ",".join(args.peers)]
    if args.quick:
        forwarded.append("--quick")

    run = {"command": args.command or shlex.join(["fastlstm", "bench"] + list(argv if argv is not None
                                                                             else sys.argv[1:])),
           "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
           "cpu": _cpu_model(), "cores": os.cpu_count(), "load_start": _load(), "python": platform.python_version(),
           "numpy": np.__version__, "threads": threads, "configs": configs,
           "mode": "quick" if args.quick else "full",
           "environment": {name: os.environ[name] for name in REPORTED_VARIABLES if name in os.environ},
           "titles": {peer.name: peer.title for peer in peers}, "workers": {}, "rss": {}}
    started = time.perf_counter()
    for count in threads:
        _log(f"measuring with {_threads_label(count)}")
        result, failure = _run_child(["--worker", "--threads-value", str(count)] + forwarded, count, timeout=3600)
        if result is None:
            _log(f"the worker with {_threads_label(count)} failed ({failure}); see the messages above")
            return 1
        run["workers"][str(count)] = result
    last = run["workers"][str(threads[-1])]
    run["versions"], run["skipped"], run["notes"], run["blas"] = (last["versions"], last["skipped"],
                                                                  last["notes"], last["blas"])
    if measure_rss:
        run["rss"] = _measure_rss(peers, configs, forwarded, threads[-1], run["skipped"])
    run["load_end"] = _load()
    _log(f"finished in {time.perf_counter() - started:.0f} s")

    report = render_report(run)
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write(report)
    if args.chart:
        write_chart(run, args.chart)
    return 0


def _measure_rss(peers, configs, forwarded, threads, skipped):
    rss = {}
    base = [item for item in forwarded if item != "--quick"]
    base = base[2:]  # drop --configs; each child gets its own
    for name in configs:
        config = CONFIGS[name]
        task = config.tasks[0]
        label = case_id(config, task)
        rss[label] = {}
        for peer in peers:
            if peer.name in skipped or task not in peer.tasks:
                continue
            argv = ["--rss-peer", peer.name, "--rss-task", task, "--configs", name,
                    "--threads-value", str(threads)] + base
            result, failure = _run_child(argv, threads, timeout=900, quiet=True)
            rss[label][peer.name] = result if result is not None else {"error": failure}
            _log(f"  peak RSS {label} {peer.name}: "
                 + (f"{result['peak_kib'] / 1024:.0f} MiB" if result else f"failed ({failure})"))
    return rss


def _load():
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so that peer modules subclass the same Peer class.
    from fastlstm.bench import run_bench as _run_bench

    sys.exit(_run_bench())
