"""The truncated-BPTT trainer: state carry and reset, fused against composed steps, callbacks."""

import logging
import os
import signal
import tracemalloc

import numpy as np
import pytest
from conftest import ATOL, RTOL

import fastlstm
from fastlstm.heads import SoftmaxHead
from fastlstm.optim import SGD, Adagrad, Adam
from fastlstm.train import Callback, Trainer

# I = 2 and H = 3, with C = 4 classes, so that no two sizes coincide.
INPUT, HIDDEN, LAYERS, CLASSES = 2, 3, 2, 4


def make_trainer(backend, optimizer, *, dtype="float32", fused="auto", window=5, seed=0, **kwargs):
    model = fastlstm.LSTM(INPUT, HIDDEN, LAYERS, dtype=dtype, backend=backend, seed=seed)
    head = SoftmaxHead(HIDDEN, CLASSES, dtype=dtype, backend=backend, seed=seed + 1)
    return Trainer(model, head, optimizer, window=window, fused=fused, progress=False, **kwargs)


def make_series(seed=0, batch=3, steps=23):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, steps, INPUT)).astype(np.float32), rng.integers(0, CLASSES, size=(batch, steps))


OPTIMIZERS = {
    "sgd": lambda: SGD(0.5),
    "adagrad": lambda: Adagrad(0.3),
    "adam": lambda: Adam(0.01),
    "adagrad-clipped": lambda: Adagrad(0.3, clip_norm=0.05),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_equals_composed(backend, name, dtype):
    fused = make_trainer(backend, OPTIMIZERS[name](), dtype=dtype, fused=True)
    composed = make_trainer(backend, OPTIMIZERS[name](), dtype=dtype, fused=False)
    assert fused.fused and not composed.fused
    x, y = make_series()
    fused.fit(x, y, epochs=3)
    composed.fit(x, y, epochs=3)
    dtype = np.dtype(dtype)
    assert fused.windows == composed.windows == 12
    np.testing.assert_allclose(fused.losses, composed.losses, rtol=RTOL[dtype], atol=ATOL[dtype])
    for ours, theirs in ((fused.model.params, composed.model.params), (fused.head.params, composed.head.params),
                         (fused.state, composed.state)):
        np.testing.assert_allclose(ours, theirs, rtol=RTOL[dtype], atol=ATOL[dtype])
    for ours, theirs in zip(fused.optimizer.slots, composed.optimizer.slots):
        np.testing.assert_allclose(ours, theirs, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert fused.optimizer.iterations == composed.optimizer.iterations == 12
    # The training changed the parameters, so the comparison above is not between two initial states.
    assert not np.allclose(fused.model.params, make_trainer(backend, SGD(0.1), dtype=dtype).model.params)


def reference_fit(model, head, optimizer, x, y, window, epochs):
    """Truncated BPTT written out with the public API: returns the window losses."""
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))
    labels = np.ascontiguousarray(y.T)
    losses = []
    for _ in range(epochs):
        state = model.zero_state(x.shape[0])
        for begin in range(0, (labels.shape[0] // window) * window, window):
            outputs, tape = model.forward(xt[begin:begin + window], state, time_major=True, keep_tape=True)
            result = head.backward(outputs, labels[begin:begin + window])
            grads = model.backward(tape, result.hidden)
            optimizer.update([model.params, head.params], [grads.params, result.params])
            losses.append(result.loss)
    return np.array(losses), state


def test_trainer_matches_written_out_loop(backend):
    x, y = make_series(seed=3)
    trainer = make_trainer(backend, Adagrad(0.3), dtype="float64")
    trainer.fit(x, y, epochs=2)
    reference = make_trainer(backend, Adagrad(0.3), dtype="float64")
    losses, state = reference_fit(reference.model, reference.head, reference.optimizer, x, y, 5, 2)
    np.testing.assert_allclose(trainer.losses, losses, rtol=1e-12)
    np.testing.assert_allclose(trainer.model.params, reference.model.params, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(trainer.state, state, rtol=1e-12, atol=1e-13)


class StateRecorder(Callback):
    def __init__(self):
        self.at_epoch_begin = []
        self.after_window = []
        self.params_after_window = []

    def on_epoch_begin(self, trainer, epoch):
        self.at_epoch_begin.append(trainer.state.copy())

    def on_window_end(self, trainer, loss):
        self.after_window.append(trainer.state.copy())
        self.params_after_window.append(trainer.model.params.copy())


def test_state_is_zeroed_at_series_start_and_carried_between_windows(backend):
    recorder = StateRecorder()
    trainer = make_trainer(backend, SGD(0.1), dtype="float64", callbacks=[recorder])
    x, y = make_series(seed=4)
    trainer.fit(x, y, epochs=2)
    assert len(recorder.at_epoch_begin) == 2
    for state in recorder.at_epoch_begin:
        np.testing.assert_array_equal(state, 0.0)
    # The first epoch ended with a state that was not zero, so the reset did something.
    assert np.abs(recorder.after_window[3]).max() > 0.01

    # Window 2 of the first series started from the final state of window 1. Rerunning it from that
    # state with the parameters in force then gives the recorded final state. Starting from zero does not.
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))
    model = trainer.model
    model.params[...] = recorder.params_after_window[0]
    carried = recorder.after_window[0].copy()
    model.forward(xt[5:10], carried, time_major=True)
    np.testing.assert_allclose(carried, recorder.after_window[1], rtol=1e-12, atol=1e-14)
    from_zero = model.zero_state(3)
    model.forward(xt[5:10], from_zero, time_major=True)
    assert not np.allclose(from_zero, recorder.after_window[1], rtol=1e-6)


def test_train_window_carries_state(backend):
    trainer = make_trainer(backend, SGD(0.1))
    x, y = make_series()
    assert trainer.state is None
    first = trainer.train_window(x[:, :5], y[:, :5])
    assert isinstance(first, float)
    assert trainer.state.shape == (LAYERS, 2, 3, HIDDEN)
    carried = trainer.state.copy()
    trainer.train_window(x[:, 5:10], y[:, 5:10])
    assert not np.array_equal(trainer.state, carried)
    trainer.reset_state()
    np.testing.assert_array_equal(trainer.state, 0.0)
    assert trainer.windows == 2
    np.testing.assert_array_equal(trainer.losses[0], first)


def test_fit_drops_the_remainder_and_keeps_losses(backend):
    trainer = make_trainer(backend, Adam(0.01))
    x, y = make_series(steps=23)
    means = trainer.fit(x, y, epochs=3)
    assert trainer.windows == 12
    assert trainer.epoch == 3
    assert trainer.window_in_epoch == 0
    assert len(means) == 3
    assert trainer.epoch_losses == means
    np.testing.assert_allclose(means, trainer.losses.reshape(3, 4).mean(axis=1), rtol=1e-15)


def test_fit_accepts_callable_and_iterator(backend):
    calls = []

    def source():
        calls.append(len(calls))
        return make_series(seed=len(calls))

    by_callable = make_trainer(backend, SGD(0.1))
    by_callable.fit(source, epochs=3)
    assert calls == [0, 1, 2]
    by_iterator = make_trainer(backend, SGD(0.1))
    by_iterator.fit((make_series(seed=k) for k in range(1, 4)), epochs=3)
    np.testing.assert_array_equal(by_callable.losses, by_iterator.losses)
    by_iterator_short = make_trainer(backend, SGD(0.1))
    with pytest.raises(ValueError, match="ran out"):
        by_iterator_short.fit(iter([make_series()]), epochs=2)


def test_fit_with_3d_and_2d_inputs(backend):
    model = fastlstm.LSTM(1, HIDDEN, 1, backend=backend, seed=0)
    head = SoftmaxHead(HIDDEN, 2, backend=backend, seed=0)
    trainer = Trainer(model, head, SGD(0.1), window=4, progress=False)
    rng = np.random.default_rng(0)
    x = rng.random((2, 12)).astype(np.float32)
    y = rng.integers(0, 2, size=(2, 12))
    trainer.fit(x, y)
    losses_2d = trainer.losses.copy()
    model.reset_parameters(0)
    head.reset_parameters(0)
    trainer2 = Trainer(model, head, SGD(0.1), window=4, progress=False)
    trainer2.fit(x[:, :, None], y)
    np.testing.assert_array_equal(trainer2.losses, losses_2d)


class EventLog(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.events.append(f"epoch_begin {epoch}")

    def on_window_end(self, trainer, loss):
        self.events.append(f"window {trainer.window_in_epoch - 1}")

    def on_epoch_end(self, trainer, epoch, mean_loss):
        self.events.append(f"epoch_end {epoch}")

    def on_train_end(self, trainer):
        self.events.append("train_end")


def test_callbacks_order(backend):
    log = EventLog()
    trainer = make_trainer(backend, SGD(0.1), callbacks=[log])
    trainer.fit(*make_series(steps=10), epochs=2)
    assert log.events == ["train_begin", "epoch_begin 0", "window 0", "window 1", "epoch_end 0",
                          "epoch_begin 1", "window 0", "window 1", "epoch_end 1", "train_end"]


class StopAt(Callback):
    def __init__(self, window, use_signal=False):
        self.window = window
        self.use_signal = use_signal

    def on_window_end(self, trainer, loss):
        if trainer.windows == self.window:
            if self.use_signal:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt


@pytest.mark.parametrize("use_signal", [False, True], ids=["exception", "sigint"])
def test_interrupted_fit_continues_bitwise(backend, use_signal):
    # The handler in place before fit, which is SIG_IGN when pytest runs as a background job.
    handler_before = signal.getsignal(signal.SIGINT)
    x, y = make_series(steps=23)
    straight = make_trainer(backend, Adam(0.01))
    straight.fit(x, y, epochs=3)

    stopper = StopAt(6, use_signal)
    interrupted = make_trainer(backend, Adam(0.01), callbacks=[stopper])
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(x, y, epochs=3)
    assert interrupted.windows == 6
    assert (interrupted.epoch, interrupted.window_in_epoch) == (1, 2)
    stopper.window = None
    interrupted.fit(x, y, epochs=2)
    assert interrupted.windows == 12
    np.testing.assert_array_equal(interrupted.model.params, straight.model.params)
    np.testing.assert_array_equal(interrupted.head.params, straight.head.params)
    np.testing.assert_array_equal(interrupted.losses, straight.losses)
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_evaluate_matches_forward_and_head(backend):
    trainer = make_trainer(backend, SGD(0.1), dtype="float64")
    x, y = make_series(steps=40)
    mask = np.ones(y.shape, dtype=bool)
    mask[:, :2] = False
    result = trainer.evaluate(x, y, mask=mask, chunk=7)
    outputs = trainer.model.forward(x, trainer.model.zero_state(3))
    probs = trainer.head.predict(outputs)
    picked = np.take_along_axis(probs, y[..., None], axis=-1)[..., 0]
    assert result["loss"] == pytest.approx(-np.log(picked[mask]).mean(), rel=1e-12)
    assert result["accuracy"] == pytest.approx((probs.argmax(-1) == y)[mask].mean(), rel=1e-15)
    assert trainer.state is None


def test_steady_state_windows_allocate_nothing(backend, request):
    if backend == "numba":
        # NOTE: the Numba kernels allocate scratch inside each call (backward's weight-gradient product,
        # softmax_xent's logit gradients), and tracemalloc records them.
        request.applymarker(pytest.mark.xfail(reason="the numba kernels allocate scratch per call"))
    # Large enough that one new tape or gradient buffer would be over 30 kB.
    model = fastlstm.LSTM(8, 32, 3, backend=backend, seed=0)
    head = SoftmaxHead(32, 10, backend=backend, seed=0)
    trainer = Trainer(model, head, Adam(0.001), window=50, progress=False)
    assert trainer.fused
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 50 * 12, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=(16, 50 * 12))
    trainer.fit(x, y)

    class Measure(Callback):
        def __init__(self):
            self.peaks = []

        def on_window_end(self, trainer, loss):
            if trainer.window_in_epoch == 2:
                tracemalloc.start()
                self.start = tracemalloc.get_traced_memory()[0]
            elif trainer.window_in_epoch == 12:
                current, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                self.peaks.append((current - self.start, peak - self.start))

    measure = Measure()
    trainer.callbacks.append(measure)
    trainer.fit(x, y)
    grown, peak = measure.peaks[0]
    assert grown < 16_000
    assert peak < 32_000


def test_progress_bar_and_logging(backend, capsys, caplog):
    trainer = make_trainer(backend, SGD(0.1))
    trainer.progress = True
    with caplog.at_level(logging.INFO, logger="fastlstm.train"):
        trainer.fit(*make_series(), epochs=2)
    assert "window" in capsys.readouterr().err
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("epoch 1: mean loss") for message in messages)

    quiet = make_trainer(backend, SGD(0.1))
    quiet.fit(*make_series(), epochs=1)
    assert capsys.readouterr().err == ""


def test_fused_auto_falls_back_for_other_optimizers(backend):
    class HalfSGD(SGD):
        def _apply(self, params, grad, slots, scratch, scale):
            super()._apply(params, grad, slots, scratch, 0.5 * scale)

    assert make_trainer(backend, SGD(0.1)).fused
    assert not make_trainer(backend, HalfSGD(0.1)).fused
    with pytest.raises(ValueError, match="fused=True needs"):
        make_trainer(backend, HalfSGD(0.1), fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        make_trainer(backend, SGD(0.1), fused="yes")


def test_rejects_bad_arguments(backend):
    model = fastlstm.LSTM(INPUT, HIDDEN, LAYERS, backend=backend)
    with pytest.raises(TypeError, match="model must be a fastlstm.LSTM"):
        Trainer(object(), SoftmaxHead(HIDDEN, 2, backend=backend), SGD(0.1))
    with pytest.raises(TypeError, match="head must be a fastlstm.SoftmaxHead"):
        Trainer(model, object(), SGD(0.1))
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(model, SoftmaxHead(HIDDEN, 2, backend=backend), object())
    with pytest.raises(ValueError, match="head.hidden_size must equal model.hidden_size = 3, got 4"):
        Trainer(model, SoftmaxHead(4, 2, backend=backend), SGD(0.1))
    with pytest.raises(TypeError, match="head must have the model's dtype float32"):
        Trainer(model, SoftmaxHead(HIDDEN, 2, dtype="float64", backend=backend), SGD(0.1))
    with pytest.raises(ValueError, match="window must be a positive integer"):
        Trainer(model, SoftmaxHead(HIDDEN, 2, backend=backend), SGD(0.1), window=0)

    trainer = make_trainer(backend, SGD(0.1))
    x, y = make_series()
    with pytest.raises(ValueError, match=r"x must have shape \(B, N\) or \(B, N, 2\)"):
        trainer.train_window(x[:, :, :1], y)
    with pytest.raises(ValueError, match="x must be"):
        trainer.train_window(x[:, :, 0], y)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        trainer.train_window(x.astype(np.int32), y)
    with pytest.raises(TypeError, match="y must have an integer dtype"):
        trainer.train_window(x, y.astype(np.float32))
    with pytest.raises(ValueError, match=r"y must have shape \(B, N\)"):
        trainer.train_window(x, y[:, :3])
    with pytest.raises(ValueError, match=r"y must contain class indices in \[0, 4\)"):
        trainer.train_window(x, y + 4)
    trainer.train_window(x[:, :5], y[:, :5])
    with pytest.raises(ValueError, match="reset_state"):
        trainer.train_window(x[:2, :5], y[:2, :5])
    with pytest.raises(ValueError, match="at least window = 5 steps"):
        make_trainer(backend, SGD(0.1)).fit(x[:, :4], y[:, :4])
    with pytest.raises(TypeError, match="callable or an iterator"):
        trainer.fit(x)
    with pytest.raises(TypeError, match=r"\(x, y\) tuple"):
        trainer.fit(lambda: x)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        trainer.fit(x, y, epochs=0)
