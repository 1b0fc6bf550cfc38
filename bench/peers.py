"""Benchmark peers that live only in the source tree: the plain numpy reference of ``tests/reference.py``.

``fastlstm.bench`` contains the peers that need only installed packages. This file adds the numpy
reference, the executable specification, timed like the others; ``bench/compare.py`` passes it with
``--peer-module`` and the pytest benchmarks import ``PEERS`` directly.
"""

import os
import sys

import numpy as np

from fastlstm.bench import Peer

TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _reference():
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import reference

    return reference


class NumpyReferencePeer(Peer):
    """``tests/reference.py`` in float32, with a numpy softmax head and numpy Adagrad (TensorFlow 1.x's)."""

    name = "numpy-reference"
    title = "numpy reference"
    tasks = ("train", "train-head", "infer", "step")

    def unavailable(self):
        if not os.path.exists(os.path.join(TESTS_DIR, "reference.py")):
            return f"{TESTS_DIR}/reference.py not found"
        return None

    def version(self):
        return f"numpy {np.__version__}"

    def build(self, problem, threads=None):
        reference = _reference()
        config, task = problem.config, problem.task
        params = problem.params.copy()
        state = {"value": problem.zero_state()}
        x = problem.x_time_major
        forget_bias = problem.forget_bias
        result = {}

        if task in ("infer", "step"):
            def run():
                y, state["value"], _ = reference.forward(params, x, state["value"], forget_bias)
                result["y"] = y

            if task == "infer":
                return _Runner(run, lambda: result["y"].transpose(1, 0, 2))
            return _Runner(run, lambda: result["y"][-1])

        rate = np.float32(problem.learning_rate)
        head = np.concatenate([problem.head_kernel.ravel(), problem.head_bias])
        accumulators = [np.full_like(params, 0.1), np.full_like(head, 0.1)]
        hidden, classes = config.hidden_size, max(config.classes, 1)
        labels = np.ascontiguousarray(problem.labels.T).reshape(-1)
        d_y_train = np.ascontiguousarray(problem.weights.transpose(1, 0, 2)) / np.float32(config.batch_size)

        def adagrad(values, grad, accumulator):
            # acc += g * g; w -= lr * g / sqrt(acc)
            accumulator += grad * grad
            values -= rate * grad / np.sqrt(accumulator)

        def run():
            y, final, tape = reference.forward(params, x, state["value"], forget_bias)
            state["value"] = final
            if task == "train":
                result["loss"] = float(np.vdot(y, d_y_train))
                d_params, _, _ = reference.backward(params, tape, d_y_train)
            else:
                rows = y.reshape(-1, hidden)
                kernel = head[:hidden * classes].reshape(hidden, classes)
                logits = rows @ kernel + head[hidden * classes:]
                logits -= logits.max(axis=1, keepdims=True)
                probs = np.exp(logits)
                probs /= probs.sum(axis=1, keepdims=True)
                picked = probs[np.arange(rows.shape[0]), labels]
                result["loss"] = float(-np.mean(np.log(picked)))
                d_logits = probs
                d_logits[np.arange(rows.shape[0]), labels] -= 1.0
                d_logits /= np.float32(rows.shape[0])
                d_head = np.concatenate([(rows.T @ d_logits).ravel(), d_logits.sum(axis=0)])
                d_params, _, _ = reference.backward(params, tape, (d_logits @ kernel.T).reshape(y.shape))
                adagrad(head, d_head, accumulators[1])
            adagrad(params, d_params, accumulators[0])

        return _Runner(run, lambda: result["loss"])


class _Runner:
    def __init__(self, run, output):
        self._run = run
        self._output = output

    def __call__(self):
        self._run()

    def output(self):
        return self._output()

    def close(self):
        pass


PEERS = [NumpyReferencePeer()]
