"""fastlstm against the other LSTM implementations, one pytest-benchmark group per configuration and task.

Run with ``python -m pytest bench/test_peers_bench.py``. Test ids are ``<configuration>-<task>`` and the
implementation, e.g. ``test_peer[L2-H200-B20-T20-train-head-torch]``. An implementation that is not
installed is skipped with the reason, so the suite runs with fastlstm alone. Each test builds only its
own case (a TensorFlow graph or Keras model of that shape), so ``--benchmark-disable`` runs every
benchmarked function once.

``test_peers_agree`` first checks on a small shape that every implementation computes what fastlstm
computes, so the timings compare the same function. ``bench/compare.py`` is the interleaved
comparison with thread settings, ratios, GFLOP/s and memory.
"""

import numpy as np
import pytest

import fastlstm
from fastlstm import bench
from peers import PEERS as SOURCE_TREE_PEERS

ALL_PEERS = bench.default_peers() + SOURCE_TREE_PEERS
CASES = bench.cases()

# A small shape with every task: non-square (I != H), several layers and classes, a nonzero state
# after the first window, distinct biases per gate (set by Problem).
SMALL = bench.Config("small", 2, 3, 5, 4, 6, ("train", "train-head", "infer", "step"), classes=7,
                     learning_rate=0.1)

# The implementations are float32 with their own summation orders and their own sigmoid and tanh
# (ONNX Runtime and oneDNN use vectorized approximations), so agreement is checked to float32
# accuracy over a few steps, not to the bits.
RTOL, ATOL = 1e-4, 1e-5


def _require(peer, task):
    if task not in peer.tasks:
        pytest.skip(f"{peer.name} does not run the {task} task")
    reason = peer.unavailable()
    if reason is not None:
        pytest.skip(f"{peer.name} not available: {reason}")


def _expected(problem):
    """Return fastlstm's result of the first call (float64 where it is a loss)."""
    config = problem.config
    model = fastlstm.LSTM(config.input_size, config.hidden_size, config.layers, forget_bias=problem.forget_bias)
    model.params[...] = problem.params
    state = model.zero_state(config.batch_size)
    y = model.forward(problem.x, state).astype(np.float64)
    if problem.task == "infer":
        return y
    if problem.task == "step":
        return y[:, -1]
    if problem.task == "train":
        return float(np.vdot(y, problem.weights)) / config.batch_size
    logits = y.reshape(-1, config.hidden_size) @ problem.head_kernel + problem.head_bias
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(logits.shape[0]), problem.labels.reshape(-1)]))


@pytest.mark.parametrize("task", SMALL.tasks)
@pytest.mark.parametrize("peer", ALL_PEERS, ids=lambda peer: peer.name)
def test_peers_agree(peer, task):
    _require(peer, task)
    problem = bench.Problem(SMALL, task, seed=1)
    runner = peer.build(problem)
    try:
        runner()
        # Copies: a runner may return a buffer that its next call overwrites.
        first = np.array(runner.output(), dtype=np.float64)
        runner()
        second = np.array(runner.output(), dtype=np.float64)
    finally:
        runner.close()
    np.testing.assert_allclose(first, _expected(problem), rtol=RTOL, atol=ATOL)
    # The second call starts from the carried state (and, when training, the updated weights).
    assert not np.allclose(first, second, rtol=0, atol=1e-7)


def test_flops_formula():
    config = bench.CONFIGS["ptb-small"]
    per_step = 2 * config.batch_size * (config.input_size + config.hidden_size) * 4 * config.hidden_size
    forward = config.layers * config.steps * per_step
    assert bench.case_flops(config, "infer") == forward
    assert bench.case_flops(config, "train") == 3 * forward
    head = 2 * config.steps * config.batch_size * config.hidden_size * config.classes
    assert bench.case_flops(config, "train-head") == 3 * forward + 3 * head


@pytest.mark.parametrize("case", CASES, ids=lambda case: bench.case_id(*case))
@pytest.mark.parametrize("peer", ALL_PEERS, ids=lambda peer: peer.name)
def test_peer(benchmark, peer, case):
    config, task = case
    _require(peer, task)
    problem = bench.Problem(config, task)
    runner = peer.build(problem)
    benchmark.group = bench.case_id(config, task)
    try:
        benchmark(runner)
        result = np.asarray(runner.output())
    finally:
        runner.close()
    assert np.all(np.isfinite(result))
