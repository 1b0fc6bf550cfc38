"""The echo task's data, and how well the default model learns it."""

import numpy as np
import pytest

import fastlstm
from fastlstm.heads import SoftmaxHead
from fastlstm.optim import Adagrad
from fastlstm.tasks import EchoTask, generate_series
from fastlstm.train import Trainer


def test_series_shapes_and_dtypes():
    x, y = generate_series(np.random.default_rng(0))
    assert x.shape == (5, 10000)
    assert y.shape == (5, 10000)
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert set(np.unique(x)) == {0.0, 1.0}


def test_series_target_is_input_shifted():
    x, y = generate_series(np.random.default_rng(1), length=600, echo_step=3, batch_size=5)
    flat_x, flat_y = x.ravel(), y.ravel()
    np.testing.assert_array_equal(flat_y[:3], 0)
    np.testing.assert_array_equal(flat_y[3:], flat_x[:-3].astype(np.int64))


def test_series_rows_are_contiguous_fifths():
    x, y = generate_series(np.random.default_rng(2), length=50, echo_step=3, batch_size=5)
    # Row b starts where row b - 1 ends, so its first targets are the last inputs of the row above.
    for row in range(1, 5):
        np.testing.assert_array_equal(y[row, :3], x[row - 1, -3:].astype(np.int64))
    # And the rows are the series in row-major order.
    bits = np.random.default_rng(2).integers(0, 2, size=50)
    np.testing.assert_array_equal(x, bits.reshape(5, 10))


def test_series_bits_are_fair():
    x, _ = generate_series(np.random.default_rng(3))
    # Five standard deviations of the mean of 50000 fair bits: 5 * sqrt(0.25 / 50000) = 0.0112.
    assert abs(float(x.mean()) - 0.5) < 0.0112


def test_series_other_sizes_and_dtype():
    x, y = generate_series(np.random.default_rng(4), length=36, echo_step=0, batch_size=4, dtype="float64")
    assert x.shape == (4, 9)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(y, x.astype(np.int64))


def test_series_rejects_bad_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        generate_series(rng, length=101, batch_size=5)
    with pytest.raises(ValueError, match="echo_step"):
        generate_series(rng, length=10, echo_step=10, batch_size=5)
    with pytest.raises(TypeError, match="rng"):
        generate_series(0)
    with pytest.raises(TypeError, match="echo_step"):
        generate_series(rng, echo_step=1.5)


def test_task_is_seeded():
    first, second = EchoTask(seed=7), EchoTask(seed=7)
    for _ in range(2):
        x1, y1 = first.series()
        x2, y2 = second.series()
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = EchoTask(seed=8).series()[0]
    assert not np.array_equal(other, EchoTask(seed=7).series()[0])


def test_task_draws_new_series_each_epoch():
    task = EchoTask(seed=0)
    x1, _ = task.series()
    x2, _ = task.series()
    held_out, _ = task.held_out_series()
    assert not np.array_equal(x1, x2)
    assert not np.array_equal(held_out, x1)
    assert not np.array_equal(held_out, x2)


def test_task_held_out_does_not_depend_on_training():
    trained = EchoTask(seed=5)
    for _ in range(3):
        trained.series()
    np.testing.assert_array_equal(trained.held_out_series()[0], EchoTask(seed=5).held_out_series()[0])


def test_task_rng_state_repeats_series():
    task = EchoTask(length=100, seed=9)
    task.series()
    x, _ = task.series()
    state = task.rng_state(repeat_last_series=True)
    task.series()
    task.set_rng_state(state)
    np.testing.assert_array_equal(task.series()[0], x)

    next_state = task.rng_state()
    expected = task.series()[0]
    task.set_rng_state(next_state)
    np.testing.assert_array_equal(task.series()[0], expected)


def test_task_rng_state_errors():
    task = EchoTask(length=100, seed=9)
    with pytest.raises(ValueError, match="series"):
        task.rng_state(repeat_last_series=True)
    with pytest.raises(ValueError, match="state"):
        task.set_rng_state({"bit_generator": "MT19937"})
    with pytest.raises(ValueError, match="seed"):
        EchoTask(seed=-1)


def test_task_accuracy_mask():
    task = EchoTask(length=50, echo_step=3, batch_size=5)
    mask = task.accuracy_mask()
    assert mask.shape == (5, 10)
    assert not mask[:, :3].any()
    assert mask[:, 3:].all()


def test_default_sizes_give_666_windows():
    task = EchoTask()
    assert task.columns == 10000
    assert task.columns // 15 == 666


def _default_run(backend, epochs, seed):
    task = EchoTask(seed=seed)
    init = np.random.default_rng(seed)
    model = fastlstm.LSTM(1, 4, 3, backend=backend, seed=init)
    head = SoftmaxHead(4, 2, backend=backend, seed=init, kernel_init="uniform")
    trainer = Trainer(model, head, Adagrad(0.3), window=15, progress=False)
    trainer.fit(task.series, epochs=epochs)
    return trainer, trainer.evaluate(*task.held_out_series(), mask=task.accuracy_mask())


def test_echo_learns_in_ten_epochs(backend):
    # Measured with seeds 0-9 on the c backend: the first epoch's mean loss was at least 0.34, the 10th
    # epoch's at most 0.0014, and the held-out accuracy at least 99.996%. The thresholds leave margins.
    trainer, held_out = _default_run(backend, epochs=10, seed=0)
    assert trainer.windows == 6660
    assert trainer.epoch_losses[0] > 0.3
    assert trainer.epoch_losses[-1] < 0.03
    assert held_out["accuracy"] > 0.995


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_echo_default_run_converges(backend, seed):
    trainer, held_out = _default_run(backend, epochs=100, seed=seed)
    assert trainer.epoch_losses[-1] < 0.01
    assert held_out["accuracy"] >= 0.999
