"""Forward and forward+backward time of the LSTM alone (no head, no optimizer), per backend.

Run with ``python -m pytest bench/test_core_bench.py``; the figures are reported, not asserted.
"""

import numpy as np
import pytest

import fastlstm

# name: (L, I, H, B, T)
CONFIGS = {
    "L3-H4-B5-T15": (3, 1, 4, 5, 15),
    "L2-H650-B20-T35": (2, 650, 650, 20, 35),
}


def setup_model(backend, config):
    num_layers, input_size, hidden_size, batch_size, steps = CONFIGS[config]
    model = fastlstm.LSTM(input_size, hidden_size, num_layers, backend=backend, seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, batch_size, input_size)).astype(np.float32)
    state = model.zero_state(batch_size)
    return model, x, state


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward(benchmark, backend, config):
    model, x, state = setup_model(backend, config)
    benchmark.group = f"{config} forward"
    y = benchmark(model.forward, x, state, time_major=True)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_backward(benchmark, backend, config):
    model, x, state = setup_model(backend, config)
    benchmark.group = f"{config} forward+backward"
    _, tape = model.forward(x, state, time_major=True, keep_tape=True)
    d_y = np.ones((x.shape[0], x.shape[1], model.hidden_size), dtype=np.float32)
    grads = model.backward(tape, d_y)

    def train_step():
        _, filled = model.forward(x, state, time_major=True, keep_tape=True, tape=tape)
        grads.params[...] = 0.0
        model.backward(filled, d_y, grads=grads)

    benchmark(train_step)
    assert np.all(np.isfinite(grads.params))
