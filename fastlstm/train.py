"""Truncated backpropagation through time over long batch-major series.

A series is x [B, N] (input width 1) or [B, N, I] with labels y [B, N]: B independent streams of N
steps. Training cuts it into N // T windows of T steps (a remainder shorter than T is not trained
on). The packed state [L, 2, B, H] carries the final state of one window into the next and is zeroed
at the start of each series, and gradients stop at window boundaries.
"""

import collections.abc
import logging
import signal
import threading
import time

import numpy as np

from fastlstm import _checks
from fastlstm._layout import aligned_empty, aligned_zeros
from fastlstm.heads import SoftmaxHead
from fastlstm.model import LSTM, Gradients
from fastlstm.optim import SGD, Adagrad, Adam, Optimizer

logger = logging.getLogger(__name__)

# Optimizers whose update the backends' fused train_window implements (exact types: a subclass may
# change the update).
FUSED_OPTIMIZERS = (SGD, Adagrad, Adam)


class Callback:
    """Base class for training callbacks; every method does nothing by default.

    ``Trainer.fit`` calls ``on_train_begin``, then per epoch ``on_epoch_begin``, ``on_window_end``
    after every window (``loss`` is that window's mean loss), ``on_epoch_end`` (with the epoch's mean
    window loss), and finally ``on_train_end``, which also runs when training stops with an exception.
    ``epoch`` counts from 0. An exception raised by a callback stops training after the current window,
    with the trainer's counters and state consistent, so a checkpoint saved then can be resumed.
    """

    def on_train_begin(self, trainer):
        pass

    def on_epoch_begin(self, trainer, epoch):
        pass

    def on_window_end(self, trainer, loss):
        pass

    def on_epoch_end(self, trainer, epoch, mean_loss):
        pass

    def on_train_end(self, trainer):
        pass


class _Buffers:
    """Everything one training window of shape (T, B) writes, allocated once and reused."""

    def __init__(self, model, head, steps, batch_size):
        dtype = model.dtype
        layers, hidden, inputs = model.num_layers, model.hidden_size, model.input_size
        gates = 4 * hidden
        self.key = (steps, batch_size)
        self.x = aligned_empty((steps, batch_size, inputs), dtype)
        self.labels = aligned_empty((steps, batch_size), np.int64)
        self.probs = aligned_empty((steps, batch_size, head.num_classes), dtype)
        self.grad = aligned_zeros(model.params.shape, model.params.dtype)
        self.head_grad = aligned_zeros(head.params.shape, head.params.dtype)
        # Fused path: the tape and the backward scratch, as the backend contract lists them.
        self.gates = aligned_empty((layers, steps, batch_size, gates), dtype)
        self.cs = aligned_empty((layers, steps + 1, batch_size, hidden), dtype)
        self.hs = aligned_empty((layers, steps + 1, batch_size, hidden), dtype)
        self.d_y = aligned_empty((steps, batch_size, hidden), dtype)
        self.d_state = aligned_empty((layers, 2, batch_size, hidden), dtype)
        self.d_x = aligned_empty((steps, batch_size, inputs), dtype)
        self.dz = aligned_empty((steps, batch_size, gates), dtype)
        self.d_hidden = aligned_empty((steps, batch_size, hidden), dtype)
        # Composed path: the model's Tape and Gradients, reused between windows.
        self.tape = None
        self.grads = Gradients(self.grad, aligned_empty((layers, 2, batch_size, hidden), dtype),
                               aligned_empty((steps, batch_size, inputs), dtype))


class _DeferredInterrupt:
    """Turn SIGINT into a flag while a window runs, so that training stops between windows.

    A second SIGINT while the flag is set raises KeyboardInterrupt at once. Outside the main thread
    signal handlers cannot be installed, and SIGINT keeps its default behaviour.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.info("interrupt received: stopping after the current window")


class Trainer:
    """Truncated-BPTT training of an ``LSTM`` with a head and an optimizer.

    Parameters
    ----------
    model : LSTM
    head : SoftmaxHead
        Reads the top layer's outputs; its hidden size, dtype and backend must match the model's.
    optimizer : Optimizer
        Updates ``model.params`` and ``head.params`` (in that order) after every window.
    window : int
        T, the number of steps per window.
    fused : "auto", True or False
        Whether to train each window with the backend's single ``train_window`` call. "auto" uses it
        when the head is a ``SoftmaxHead`` and the optimizer an SGD, Adagrad or Adam, and otherwise
        composes ``model.forward``, ``head.backward``, ``model.backward`` and ``optimizer.update``.
        Both give the same result up to floating-point rounding.
    progress : bool
        Show a tqdm progress bar (on stderr) during ``fit``.
    callbacks : sequence of Callback
    log_every : int
        Log the window loss at DEBUG level every ``log_every`` windows (the ``fastlstm.train`` logger);
        epoch summaries are logged at INFO level.

    Attributes
    ----------
    state : ndarray [L, 2, B, H] or None
        The packed state carried between windows; created on the first window.
    epoch : int
        Number of completed epochs (series).
    window_in_epoch : int
        Index of the next window in the current series; 0 at a series start.
    windows : int
        Number of windows trained in total.
    """

    def __init__(self, model, head, optimizer, window=15, *, fused="auto", progress=True, callbacks=(),
                 log_every=100):
        if not isinstance(model, LSTM):
            raise TypeError(f"model must be a fastlstm.LSTM, got {type(model).__name__}")
        if not isinstance(head, SoftmaxHead):
            raise TypeError(f"head must be a fastlstm.SoftmaxHead, got {type(head).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastlstm optimizer (SGD, Adagrad, Adam), "
                            f"got {type(optimizer).__name__}")
        if head.hidden_size != model.hidden_size:
            raise ValueError(f"head.hidden_size must equal model.hidden_size = {model.hidden_size}, "
                             f"got {head.hidden_size}")
        if head.dtype != model.dtype:
            raise TypeError(f"head must have the model's dtype {model.dtype.name}, got {head.dtype.name}")
        self.model = model
        self.head = head
        self.optimizer = optimizer
        self.window = _checks.check_positive_int("window", window)
        self.fused = self._resolve_fused(fused)
        self.progress = bool(progress)
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(callback).__name__}")
        self.log_every = _checks.check_positive_int("log_every", log_every)
        optimizer.init([model.params, head.params])

        self.state = None
        self.epoch = 0
        self.window_in_epoch = 0
        self.windows = 0
        self.epoch_losses = []
        self._losses = np.empty(1024, dtype=np.float64)
        self._buffers = None
        self._series = None
        self._last_window = None
        self._interrupt = None

    def __repr__(self):
        return (f"Trainer({self.model!r}, {self.head!r}, {self.optimizer!r}, window={self.window}, "
                f"fused={self.fused})")

    def _resolve_fused(self, fused):
        possible = type(self.optimizer) in FUSED_OPTIMIZERS and self.head.backend == self.model.backend \
            and hasattr(self.model._kernels, "train_window")
        if fused == "auto":
            return possible
        if fused is True:
            if not possible:
                raise ValueError(
                    "fused=True needs an SGD, Adagrad or Adam optimizer and a head on the model's backend "
                    f"{self.model.backend!r}, got {type(self.optimizer).__name__} and a head on "
                    f"{self.head.backend!r}"
                )
            return True
        if fused is False:
            return False
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")

    # Results.

    @property
    def losses(self):
        """Mean loss of every window trained so far, in order: a float64 [windows] view."""
        return self._losses[:self.windows]

    def last_window(self):
        """Return ``(x [B, T, I], y [B, T], probs [B, T, C])`` of the last trained window, as copies.

        ``probs`` are the head's probabilities computed before that window's update.
        """
        if self._last_window is None:
            raise ValueError("no window has been trained yet")
        x, labels = self._last_window
        probs = self._buffers.probs
        return (np.ascontiguousarray(x.transpose(1, 0, 2)), np.ascontiguousarray(labels.T),
                np.ascontiguousarray(probs.transpose(1, 0, 2)))

    # State.

    def reset_state(self, batch_size=None):
        """Zero the state buffer (in place); with ``batch_size``, first reallocate it for that batch."""
        if batch_size is not None:
            batch_size = _checks.check_positive_int("batch_size", batch_size)
            if self.state is None or self.state.shape[2] != batch_size:
                self.state = self.model.zero_state(batch_size)
                return self.state
        if self.state is None:
            raise ValueError("the state buffer does not exist yet; pass batch_size")
        self.state[...] = 0.0
        return self.state

    def _buffers_for(self, steps, batch_size):
        if self._buffers is None or self._buffers.key != (steps, batch_size):
            self._buffers = _Buffers(self.model, self.head, steps, batch_size)
        return self._buffers

    # Input conversion.

    def _prepare_series(self, x, y, name_x="x", name_y="y"):
        # Return time-major copies: x [N, B, I] of the model's dtype and labels [N, B] int64.
        _checks.check_ndarray(name_x, x)
        if x.ndim == 2:
            if self.model.input_size != 1:
                raise ValueError(f"{name_x} must be [B, N, {self.model.input_size}] for a model with input "
                                 f"width {self.model.input_size}, got shape {x.shape}")
            x = x[:, :, None]
        elif x.ndim != 3 or x.shape[2] != self.model.input_size:
            raise ValueError(f"{name_x} must have shape (B, N) or (B, N, {self.model.input_size}), "
                             f"got {x.shape}")
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name_x} must have dtype float32 or float64, got {x.dtype}; "
                            f"convert it with {name_x}.astype(numpy.{self.model.dtype.name})")
        _checks.check_ndarray(name_y, y)
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{name_y} must have an integer dtype, got {y.dtype}")
        if y.shape != x.shape[:2]:
            raise ValueError(f"{name_y} must have shape (B, N) = {x.shape[:2]} to match {name_x}, "
                             f"got {y.shape}")
        if x.shape[0] < 1:
            raise ValueError(f"{name_x} must have a batch of at least 1, got shape {x.shape}")
        if y.size and (y.min() < 0 or y.max() >= self.head.num_classes):
            raise ValueError(f"{name_y} must contain class indices in [0, {self.head.num_classes}), "
                             f"got values from {y.min()} to {y.max()}")
        x_series = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=self.model.dtype)
        labels = np.ascontiguousarray(y.T, dtype=np.int64)
        return x_series, labels

    # One window.

    def train_window(self, x, y):
        """Train on one window and return its mean loss (computed before the update).

        x is [B, T] or [B, T, I] and y [B, T] int. The state buffer is read as the initial state and
        receives the final state; it is created zeroed on the first call. Use ``reset_state`` at the
        start of a new series.
        """
        x_series, labels = self._prepare_series(x, y)
        batch_size = x_series.shape[1]
        if self.state is None:
            self.reset_state(batch_size)
        elif self.state.shape[2] != batch_size:
            raise ValueError(
                f"x must have the batch size {self.state.shape[2]} of the trainer's state, got {batch_size}; "
                f"call reset_state({batch_size}) to start a new series with that batch"
            )
        return self._train_window(x_series, labels)

    def _train_window(self, x, labels):
        # x [T, B, I] and labels [T, B], C-contiguous, already validated.
        steps, batch_size = labels.shape
        buffers = self._buffers_for(steps, batch_size)
        if self.fused:
            loss = self._train_window_fused(x, labels, buffers)
        else:
            loss = self._train_window_composed(x, labels, buffers)
        self._record(loss)
        self._last_window = (x, labels)
        return loss

    def _train_window_fused(self, x, labels, buffers):
        optimizer = self.optimizer
        model_slots, head_slots = optimizer.slots
        loss = self.model._kernels.train_window(
            self.model.params, self.head.params, x, labels, self.state, buffers.gates, buffers.cs,
            buffers.hs, buffers.probs, buffers.d_y, buffers.grad, buffers.head_grad, buffers.d_state,
            buffers.d_x, buffers.dz, buffers.d_hidden, self.model.forget_bias, optimizer.code,
            optimizer.hyper, model_slots, head_slots, optimizer.iterations + 1)
        optimizer.iterations += 1
        return float(loss)

    def _train_window_composed(self, x, labels, buffers):
        steps, batch_size = labels.shape
        hidden = self.model.hidden_size
        outputs, buffers.tape = self.model.forward(x, self.state, time_major=True, keep_tape=True,
                                                   tape=buffers.tape)
        buffers.head_grad[...] = 0.0
        result = self.head.backward(outputs.reshape(steps * batch_size, hidden), labels.reshape(-1),
                                    grad=buffers.head_grad,
                                    d_hidden=buffers.d_y.reshape(steps * batch_size, hidden),
                                    probs=buffers.probs.reshape(steps * batch_size, -1))
        buffers.grad[...] = 0.0
        self.model.backward(buffers.tape, buffers.d_y, grads=buffers.grads)
        self.optimizer.update([self.model.params, self.head.params], [buffers.grad, buffers.head_grad])
        return result.loss

    def _record(self, loss):
        if self.windows == self._losses.size:
            grown = np.empty(2 * self._losses.size, dtype=np.float64)
            grown[:self.windows] = self._losses[:self.windows]
            self._losses = grown
        self._losses[self.windows] = loss
        self.windows += 1

    # Whole series.

    def fit(self, x, y=None, *, epochs=1):
        """Train for ``epochs`` passes over a series and return the per-epoch mean losses.

        ``x, y`` is one series (x [B, N] or [B, N, I], y [B, N] int) used for every epoch. Instead, pass
        a callable that returns a fresh ``(x, y)`` on each call, or an iterator of such pairs, as ``x``
        with ``y=None``: it is called once per epoch. The state is zeroed at the start of each series.

        When the trainer stopped in the middle of a series (after a KeyboardInterrupt, or after loading a
        checkpoint), the first epoch completes that series: it continues from ``window_in_epoch`` with
        the carried state. With a callable or an iterator, a series still held from the interrupted
        ``fit`` is reused, and otherwise the data source must return the same series again (as a
        generator restored to its state before that series does).

        SIGINT (Ctrl-C) in the main thread stops training after the current window and then raises
        KeyboardInterrupt, so that the counters, state, parameters and optimizer slots are consistent.
        """
        epochs = _checks.check_positive_int("epochs", epochs)
        next_series = self._series_source(x, y)

        self._interrupt = _DeferredInterrupt()
        bar = None
        started = time.perf_counter()
        first_window = self.windows
        epoch_means = []
        try:
            with self._interrupt:
                for callback in self.callbacks:
                    callback.on_train_begin(self)
                for _ in range(epochs):
                    x_series, labels = self._begin_series(next_series)
                    windows_per_epoch = labels.shape[0] // self.window
                    if bar is None and self.progress:
                        bar = self._progress_bar(epochs * windows_per_epoch - self.window_in_epoch)
                    epoch_means.append(self._run_series(x_series, labels, windows_per_epoch, bar))
                if self._interrupt.requested:
                    # SIGINT arrived after the last window: report it rather than drop it.
                    raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()
            self._interrupt = None
            elapsed = time.perf_counter() - started
            trained = self.windows - first_window
            logger.info("trained %d windows in %.2f s (%.0f windows/s)", trained, elapsed,
                        trained / elapsed if elapsed > 0 else 0.0)
            for callback in self.callbacks:
                callback.on_train_end(self)
        return epoch_means

    def _series_source(self, x, y):
        # Return a function that returns the next series, already time-major: (x [N, B, I], labels [N, B]).
        if y is not None:
            prepared = self._prepare_series(x, y)
            return lambda: prepared
        if callable(x):
            draw = x
        elif isinstance(x, collections.abc.Iterator):
            def draw():
                try:
                    return next(x)
                except StopIteration:
                    raise ValueError("the iterator of series ran out before the last epoch") from None
        else:
            raise TypeError("x must be a callable or an iterator of (x, y) series when y is None, "
                            f"got {type(x).__name__}")

        def next_series():
            series = draw()
            if not isinstance(series, tuple) or len(series) != 2:
                raise TypeError(f"the data source must return an (x, y) tuple, got {type(series).__name__}")
            return self._prepare_series(*series)
        return next_series

    def _begin_series(self, next_series):
        if self.window_in_epoch > 0 and self._series is not None and self.state is not None:
            return self._series
        x_series, labels = next_series()
        windows_per_epoch = labels.shape[0] // self.window
        if windows_per_epoch == 0:
            raise ValueError(f"a series must have at least window = {self.window} steps, got "
                             f"{labels.shape[0]}")
        batch_size = labels.shape[1]
        if self.window_in_epoch > windows_per_epoch:
            raise ValueError(f"the trainer is at window {self.window_in_epoch} of a series, but this series "
                             f"has only {windows_per_epoch} windows")
        if self.window_in_epoch == 0:
            self.reset_state(batch_size)
        elif self.state is None or self.state.shape[2] != batch_size:
            raise ValueError(f"resuming at window {self.window_in_epoch} needs the carried state for a batch "
                             f"of {batch_size}, got {None if self.state is None else self.state.shape}")
        self._series = (x_series, labels)
        return self._series

    def _run_series(self, x_series, labels, windows_per_epoch, bar):
        # Train the windows of one series from window_in_epoch on; return the series' mean window loss.
        epoch = self.epoch
        for callback in self.callbacks:
            callback.on_epoch_begin(self, epoch)
        steps = self.window
        series_start = self.windows - self.window_in_epoch
        started = time.perf_counter()
        for index in range(self.window_in_epoch, windows_per_epoch):
            begin = index * steps
            loss = self._train_window(x_series[begin:begin + steps], labels[begin:begin + steps])
            self.window_in_epoch = index + 1
            if self.windows % self.log_every == 0:
                logger.debug("epoch %d window %d: loss %.6f", epoch, index, loss)
            if bar is not None:
                bar.update(1)
                if index % 16 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            for callback in self.callbacks:
                callback.on_window_end(self, loss)
            if self._interrupt is not None and self._interrupt.requested:
                raise KeyboardInterrupt

        mean_loss = float(self._losses[series_start:self.windows].mean())
        elapsed = time.perf_counter() - started
        self.epoch += 1
        self.window_in_epoch = 0
        self._series = None
        self.epoch_losses.append(mean_loss)
        logger.info("epoch %d: mean loss %.6f over %d windows (%.0f windows/s)", epoch, mean_loss,
                    windows_per_epoch, (windows_per_epoch / elapsed) if elapsed > 0 else 0.0)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, mean_loss)
        return mean_loss

    def _progress_bar(self, total):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="window", dynamic_ncols=True, leave=False)

    # Evaluation.

    def evaluate(self, x, y, *, mask=None, chunk=1024):
        """Return ``{"loss": float, "accuracy": float}`` of the model on a whole series.

        The series runs from a zero state in chunks of ``chunk`` steps with the state carried, which
        gives the outputs of one uninterrupted forward. The loss is the mean cross-entropy and the
        accuracy the fraction of argmax predictions equal to y, both over the positions where ``mask``
        (bool [B, N]) is true, or over all positions without a mask. Parameters and the training state
        are not changed.
        """
        x_series, labels = self._prepare_series(x, y)
        chunk = _checks.check_positive_int("chunk", chunk)
        steps, batch_size = labels.shape
        if mask is None:
            mask = np.ones((batch_size, steps), dtype=bool)
        else:
            _checks.check_ndarray("mask", mask)
            if mask.shape != (batch_size, steps) or mask.dtype != np.bool_:
                raise ValueError(f"mask must be a bool array of shape {(batch_size, steps)}, got "
                                 f"{mask.dtype} {mask.shape}")
        mask = mask.T
        count = int(mask.sum())
        if count == 0:
            raise ValueError("mask must select at least one position, got none")

        state = self.model.zero_state(batch_size)
        total_loss = 0.0
        correct = 0
        for begin in range(0, steps, chunk):
            end = min(begin + chunk, steps)
            outputs = self.model.forward(x_series[begin:end], state, time_major=True)
            probs = self.head.predict(outputs)
            chunk_labels = labels[begin:end]
            chunk_mask = mask[begin:end]
            picked = np.take_along_axis(probs, chunk_labels[..., None], axis=-1)[..., 0]
            with np.errstate(divide="ignore"):
                total_loss -= float(np.log(picked.astype(np.float64))[chunk_mask].sum())
            correct += int((probs.argmax(axis=-1) == chunk_labels)[chunk_mask].sum())
        return {"loss": total_loss / count, "accuracy": correct / count}

    # Checkpoint support (see fastlstm.io).

    def state_dict(self):
        """Return the training state as a dict of arrays and ints (references, not copies)."""
        return trainer_state_dict(self)

    def load_state_dict(self, values):
        """Copy a ``state_dict`` (for example from a checkpoint) into this trainer.

        Shapes and dtypes must match this trainer's model, head and optimizer; the state buffer may
        have any batch size. Raises ValueError naming the first entry that does not match.
        """
        optimizer = self.optimizer
        state, counters, losses = check_state_dict(self, values)
        if counters["window_in_epoch"] > 0 and state is None:
            raise ValueError("state is missing, but a checkpoint in the middle of a series needs it")

        self.model.params[...] = values["model_params"]
        self.head.params[...] = values["head_params"]
        optimizer.slots[0][...] = values["model_slots"]
        optimizer.slots[1][...] = values["head_slots"]
        optimizer.iterations = counters["optimizer_iterations"]
        if state is None:
            self.state = None
        else:
            self.reset_state(state.shape[2])
            self.state[...] = state
        self.epoch = counters["epoch"]
        self.window_in_epoch = counters["window_in_epoch"]
        self.windows = 0
        for loss in losses:
            self._record(float(loss))
        self.epoch_losses = [float(loss) for loss in values["epoch_losses"]]
        self._series = None
        self._last_window = None


def trainer_state_dict(trainer):
    """Return the training state of ``trainer`` (``Trainer`` or ``CharLMTrainer``) as a dict.

    The values are references to the trainer's arrays, not copies; ``fastlstm.io`` writes them.
    """
    optimizer = trainer.optimizer
    return {
        "model_params": trainer.model.params,
        "head_params": trainer.head.params,
        "model_slots": optimizer.slots[0],
        "head_slots": optimizer.slots[1],
        "state": trainer.state,
        "losses": trainer.losses,
        "epoch_losses": np.asarray(trainer.epoch_losses, dtype=np.float64),
        "optimizer_iterations": optimizer.iterations,
        "epoch": trainer.epoch,
        "window_in_epoch": trainer.window_in_epoch,
        "windows": trainer.windows,
    }


def check_state_dict(trainer, values):
    """Check a state dict against ``trainer``'s model, head and optimizer before anything is copied.

    Returns ``(state, counters, losses)``: the state buffer or None (any batch size is accepted),
    the four counters as ints, and the loss history as float64 with one entry per window. Raises
    ValueError naming the first entry that does not match.
    """
    optimizer = trainer.optimizer
    expected = {
        "model_params": (trainer.model.params.shape, trainer.model.dtype),
        "head_params": (trainer.head.params.shape, trainer.head.dtype),
        "model_slots": (optimizer.slots[0].shape, optimizer.slots[0].dtype),
        "head_slots": (optimizer.slots[1].shape, optimizer.slots[1].dtype),
    }
    for name, (shape, dtype) in expected.items():
        array = values[name]
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got shape {array.shape} "
                             f"and dtype {array.dtype}")

    state = values.get("state")
    if state is not None:
        state_shape = (trainer.model.num_layers, 2, state.shape[2] if state.ndim == 4 else -1,
                       trainer.model.hidden_size)
        if state.ndim != 4 or state.shape != state_shape or state.dtype != trainer.model.dtype:
            raise ValueError(f"state must have shape (L, 2, B, H) = {state_shape} and dtype "
                             f"{trainer.model.dtype}, got shape {state.shape} and dtype {state.dtype}")

    counters = {}
    for name in ("optimizer_iterations", "epoch", "window_in_epoch", "windows"):
        value = values[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        counters[name] = int(value)

    losses = np.asarray(values["losses"], dtype=np.float64)
    if losses.shape != (counters["windows"],):
        raise ValueError(f"losses must have one entry per window ({counters['windows']}), "
                         f"got shape {losses.shape}")
    return state, counters, losses
