"""Benchmarks of the echo task: one fused training window, and the whole default run.

Run with ``pytest bench/test_echo_bench.py`` (the per-window sweep) and add ``-m slow`` for the whole
default run (100 epochs, one round). The times are reported, not asserted.
"""

import json

import numpy as np
import pytest

import fastlstm
from fastlstm.cli import main
from fastlstm.heads import SoftmaxHead
from fastlstm.optim import Adagrad
from fastlstm.tasks import EchoTask
from fastlstm.train import Trainer

BACKENDS = [pytest.param(name, marks=() if info["available"] else
                         pytest.mark.skip(reason=f"backend {name} not available: {info['reason']}"))
            for name, info in fastlstm.backends().items()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_window_L3_H4_B5_T15(benchmark, backend):
    task = EchoTask(seed=0)
    model = fastlstm.LSTM(1, 4, 3, backend=backend, seed=0)
    head = SoftmaxHead(4, 2, backend=backend, seed=0, kernel_init="uniform")
    trainer = Trainer(model, head, Adagrad(0.3), window=15, fused=True, progress=False)
    # The time-major series, cut into windows the way Trainer.fit does.
    x_series, labels = trainer._prepare_series(*task.series())
    windows = labels.shape[0] // 15
    trainer.reset_state(5)
    position = [0]

    def train_one_window():
        begin = (position[0] % windows) * 15
        position[0] += 1
        return trainer._train_window(x_series[begin:begin + 15], labels[begin:begin + 15])

    for _ in range(50):
        train_one_window()
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["tape_bytes"] = int(trainer._buffers.gates.nbytes + trainer._buffers.cs.nbytes
                                             + trainer._buffers.hs.nbytes)
    loss = benchmark(train_one_window)
    assert np.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_default_run(benchmark, backend, capsys):
    def run():
        assert main(["echo", "--seed", "0", "--backend", backend, "--quiet", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    summary = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(summary)
