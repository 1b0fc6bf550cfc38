"""A character-level language model: a stacked LSTM over characters with a softmax head.

Dimension letters: L layers, T steps per window, B parallel streams, H hidden units, V characters in
the vocabulary (the LSTM's input size I and the head's classes C are both V).

The input is a character id, which stands for a one-hot vector of width V. The LSTM reads ids
directly (see ``fastlstm.model``): layer 0's input projection is a row gather from its kernel and its
gradient a scatter-add, so no one-hot matrix is formed, forward or backward.

Dropout follows Zaremba, Sutskever and Vinyals, "Recurrent Neural Network Regularization" (2014):
it applies to the non-recurrent connections only, to each layer's output before it enters the layer
above, and to the top layer's output before the head. Each unit is kept with probability 1 - p
and scaled by 1 / (1 - p) (inverted dropout), so evaluation uses the weights
as they are and no dropout. The masks come from their own generator, seeded explicitly, so a run is
repeatable. With dropout the layers run one at a time from Python (``LSTM.layer_model`` gives each
layer as a one-layer LSTM whose parameters are a view into the stacked model's flat vector), with
numpy masks in between. Without dropout a window is one fused native call (the backend's
``train_window``) when the optimizer is SGD, Adagrad or Adam.

Pipelined training (``CharLMTrainer(pipeline_chunks=K)``) runs the layers in a wavefront on L
threads: the window is cut into K chunks of T / K steps, and layer l works on chunk c while layer
l + 1 works on chunk c - 1 (forward) or c + 1 (backward), carrying the state (and in backward its
gradient) from chunk to chunk. The kernels release the GIL, so on a machine with L free cores the
sequential time loops of the layers overlap. Each kernel call should then use one BLAS thread
(``OPENBLAS_NUM_THREADS=1``, or threadpoolctl, which the trainer uses when it is installed): BLAS
threads on top of the layer threads oversubscribe the cores. The result equals the other paths up
to rounding (the GEMMs see other row counts and the gradients add up in another order).

Losses are cross-entropies in nats internally; ``BITS_PER_NAT`` converts them to bits per character.
"""

import concurrent.futures
import contextlib
import math
import time

import numpy as np

from fastlstm import _checks
from fastlstm._layout import aligned_empty, aligned_zeros
from fastlstm.heads import SoftmaxHead
from fastlstm.model import LSTM, Gradients
from fastlstm.optim import Optimizer
from fastlstm.tasks import text as text_data
from fastlstm.train import FUSED_OPTIMIZERS, check_state_dict, trainer_state_dict

BITS_PER_NAT = 1.0 / math.log(2.0)


def _check_dropout(dropout):
    dropout = _checks.check_finite_float("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


class CharLM:
    """An LSTM over character ids plus a softmax head over the vocabulary.

    Parameters
    ----------
    vocab_size : int
        V: the LSTM's input size and the head's number of classes.
    hidden_size, num_layers : int
        H and L.
    dropout : float in [0, 1)
        Probability of dropping a unit of a non-recurrent connection during training.
    forget_bias, dtype, backend
        As for ``fastlstm.LSTM``.
    seed : int, numpy.random.Generator or None
        Source of the initial weights: the LSTM's kernels (Glorot-uniform), then the head's kernel
        (Glorot-uniform); biases start at zero.

    ``lstm`` (an ``LSTM`` with input size V) and ``head`` (a ``SoftmaxHead``) hold the parameters.
    """

    def __init__(self, vocab_size, hidden_size=256, num_layers=2, *, dropout=0.0, forget_bias=1.0,
                 dtype="float32", backend="auto", seed=None):
        rng = np.random.default_rng(seed)
        self.lstm = LSTM(vocab_size, hidden_size, num_layers, forget_bias=forget_bias, dtype=dtype,
                         backend=backend, seed=rng)
        self.head = SoftmaxHead(hidden_size, vocab_size, dtype=dtype, backend=self.lstm.backend, seed=rng)
        self.dropout = _check_dropout(dropout)

    def __repr__(self):
        return (f"CharLM(vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, dropout={self.dropout}, dtype='{self.dtype.name}', "
                f"backend='{self.backend}')")

    @property
    def vocab_size(self):
        return self.lstm.input_size

    @property
    def hidden_size(self):
        return self.lstm.hidden_size

    @property
    def num_layers(self):
        return self.lstm.num_layers

    @property
    def dtype(self):
        return self.lstm.dtype

    @property
    def backend(self):
        return self.lstm.backend

    def zero_state(self, batch_size):
        """A zeroed packed state [L, 2, B, H]."""
        return self.lstm.zero_state(batch_size)

    def _check_rows(self, name, rows):
        _checks.check_ndarray(name, rows)
        if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array [B, N] of character ids, got {rows.dtype} "
                             f"{rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.vocab_size):
            raise ValueError(f"{name} must hold ids in [0, {self.vocab_size}), got values from {rows.min()} "
                             f"to {rows.max()}")
        if rows.shape[1] < 2:
            raise ValueError(f"{name} must have at least 2 columns (an input and its target), got {rows.shape}")

    def evaluate(self, rows, *, chunk=256):
        """Return the mean cross-entropy in nats per character of predicting rows[:, 1:] from the rest.

        ``rows`` [B, N] holds B streams of character ids (see ``fastlstm.tasks.text.batchify``). Each
        stream runs from a zero state with the state carried over all N - 1 steps (in chunks of
        ``chunk`` steps, which does not change the result), without dropout.
        """
        self._check_rows("rows", rows)
        chunk = _checks.check_positive_int("chunk", chunk)
        batch_size, columns = rows.shape
        state = self.zero_state(batch_size)
        total = 0.0
        count = 0
        for begin in range(0, columns - 1, chunk):
            end = min(begin + chunk, columns - 1)
            inputs = np.ascontiguousarray(rows[:, begin:end].T, dtype=np.int64)
            targets = np.ascontiguousarray(rows[:, begin + 1:end + 1].T, dtype=np.int64)
            outputs = self.lstm.forward(inputs, state, time_major=True)
            loss, _ = self.head.forward(outputs, targets)
            total += loss * targets.size
            count += targets.size
        return total / count

    def next_distribution(self, hidden, temperature=1.0):
        """Return float64 probabilities [B, V] of the next character from top-layer outputs [B, H].

        The logits are divided by ``temperature`` (> 0) before the softmax: below 1 sharpens the
        distribution, above 1 flattens it.
        """
        temperature = _checks.check_finite_float("temperature", temperature)
        if temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = (hidden.astype(np.float64) @ self.head.kernel.astype(np.float64)
                  + self.head.bias.astype(np.float64)) / temperature
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        return probs

    def sample(self, prime_ids, length, *, temperature=1.0, seed=None):
        """Generate ``length`` character ids after the ids ``prime_ids`` (at least one); return them.

        Runs ``LSTM.step`` one character at a time from a zero state: the prime ids are read in, then
        each next character is drawn from the softmax of the logits divided by ``temperature``.
        """
        prime_ids = np.asarray(prime_ids, dtype=np.int64).reshape(-1)
        if prime_ids.size < 1:
            raise ValueError("prime_ids must hold at least one character id, got none")
        if prime_ids.min() < 0 or prime_ids.max() >= self.vocab_size:
            raise ValueError(f"prime_ids must be in [0, {self.vocab_size}), got values from {prime_ids.min()} "
                             f"to {prime_ids.max()}")
        length = int(length)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        rng = np.random.default_rng(seed)
        state = self.zero_state(1)
        hidden = np.empty((1, self.hidden_size), dtype=self.dtype)
        current = np.empty(1, dtype=np.int64)
        for char_id in prime_ids:
            current[0] = char_id
            self.lstm.step(current, state, out=hidden)
        generated = np.empty(length, dtype=np.int64)
        for position in range(length):
            probs = self.next_distribution(hidden, temperature)[0]
            current[0] = rng.choice(self.vocab_size, p=probs)
            generated[position] = current[0]
            self.lstm.step(current, state, out=hidden)
        return generated


class _Window:
    """The buffers of one training window of shape (T, B), allocated once and reused."""

    def __init__(self, model, steps, batch_size):
        lstm = model.lstm
        dtype, layers, hidden = lstm.dtype, lstm.num_layers, lstm.hidden_size
        self.key = (steps, batch_size)
        self.grad = aligned_zeros(lstm.params.shape, lstm.params.dtype)
        self.head_grad = aligned_zeros(model.head.params.shape, model.head.params.dtype)
        self.probs = aligned_empty((steps, batch_size, model.vocab_size), dtype)
        self.d_y = aligned_empty((steps, batch_size, hidden), dtype)
        # Fused path: the tape and scratch of the backend's train_window.
        self.gates = aligned_empty((layers, steps, batch_size, 4 * hidden), dtype)
        self.cs = aligned_empty((layers, steps + 1, batch_size, hidden), dtype)
        self.hs = aligned_empty((layers, steps + 1, batch_size, hidden), dtype)
        self.d_state = aligned_empty((layers, 2, batch_size, hidden), dtype)
        self.dz = aligned_empty((steps, batch_size, 4 * hidden), dtype)
        self.d_hidden = aligned_empty((steps, batch_size, hidden), dtype)
        # Layer-by-layer path: one tape, mask and gradient view per layer.
        self.tapes = [None] * layers
        self.masks = aligned_empty((layers, steps, batch_size, hidden), dtype)
        self.layer_grads = []
        for layer in range(layers):
            start, end = lstm.layer_slice(layer)
            self.layer_grads.append(Gradients(self.grad[start:end],
                                              aligned_empty((1, 2, batch_size, hidden), dtype), None))


class CharLMTrainer:
    """Truncated-BPTT training of a ``CharLM`` on B parallel streams of character ids.

    Parameters
    ----------
    model : CharLM
    optimizer : Optimizer
        Updates ``model.lstm.params`` and ``model.head.params``; its ``clip_norm`` clips by global
        norm over both. Its ``learning_rate`` may be changed between windows (``StepDecay.apply``).
    window : int
        T, steps per window.
    dropout_seed : int or None
        Seed of the generator of the dropout masks (fresh entropy when None).
    fused : "auto", True or False
        Train a window with the backend's single ``train_window`` call. Only possible without dropout
        and with an SGD, Adagrad or Adam optimizer; "auto" uses it then, unless ``pipeline_chunks``
        is set.
    pipeline_chunks : int
        0 (default) for no pipelining; K >= 1 to run the layers as a wavefront over K chunks of each
        window on L threads (see the module docstring). T must be a multiple of K.

    The attributes ``state`` (the carried [L, 2, B, H] buffer), ``epoch``, ``window_in_epoch``,
    ``windows``, ``losses`` (nats per window) and ``epoch_losses`` follow ``fastlstm.Trainer``, and
    ``state_dict``/``load_state_dict`` make it a trainer that ``fastlstm.io.save``/``load`` accept.
    """

    def __init__(self, model, optimizer, window=64, *, dropout_seed=None, fused="auto", pipeline_chunks=0):
        if not isinstance(model, CharLM):
            raise TypeError(f"model must be a CharLM, got {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastlstm optimizer, got {type(optimizer).__name__}")
        self.charlm = model
        self.model = model.lstm
        self.head = model.head
        self.optimizer = optimizer
        self.window = _checks.check_positive_int("window", window)
        if isinstance(pipeline_chunks, (bool, np.bool_)) or not isinstance(pipeline_chunks, (int, np.integer)) \
                or pipeline_chunks < 0:
            raise ValueError(f"pipeline_chunks must be a non-negative integer, got {pipeline_chunks!r}")
        if pipeline_chunks and self.window % pipeline_chunks:
            raise ValueError(f"window must be a multiple of pipeline_chunks = {pipeline_chunks}, got {self.window}")
        self.pipeline_chunks = int(pipeline_chunks)
        self._pool = None
        possible = (model.dropout == 0.0 and type(optimizer) in FUSED_OPTIMIZERS
                    and hasattr(model.lstm._kernels, "train_window"))
        if fused == "auto":
            self.fused = possible and not self.pipeline_chunks
        elif fused is True:
            if not possible:
                raise ValueError("fused=True needs dropout 0 and an SGD, Adagrad or Adam optimizer, got "
                                 f"dropout {model.dropout} and {type(optimizer).__name__}")
            self.fused = True
        elif fused is False:
            self.fused = False
        else:
            raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
        self.dropout_rng = np.random.Generator(np.random.PCG64(dropout_seed))
        self._layers = [model.lstm.layer_model(layer) for layer in range(model.num_layers)]
        optimizer.init([self.model.params, self.head.params])
        self.state = None
        self.epoch = 0
        self.window_in_epoch = 0
        self.windows = 0
        self._losses = []
        self.epoch_losses = []
        self._buffers = None

    @property
    def losses(self):
        """Mean loss (nats per character) of every window trained so far, float64 [windows]."""
        return np.asarray(self._losses, dtype=np.float64)

    def reset_state(self, batch_size):
        """Zero the carried state, reallocating it for ``batch_size`` streams if needed."""
        if self.state is None or self.state.shape[2] != batch_size:
            self.state = self.charlm.zero_state(batch_size)
        else:
            self.state[...] = 0.0
        return self.state

    def _buffers_for(self, steps, batch_size):
        if self._buffers is None or self._buffers.key != (steps, batch_size):
            self._buffers = _Window(self.charlm, steps, batch_size)
        return self._buffers

    def train_window(self, inputs, targets):
        """Train on one window and return its mean loss in nats per character (before the update).

        inputs and targets are int64 [T, B] (time-major, as ``fastlstm.tasks.text.window_pair``
        returns them). The carried state is read and updated; it is created zeroed when missing.
        """
        for name, array in (("inputs", inputs), ("targets", targets)):
            _checks.check_ndarray(name, array)
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must be an integer array [T, B], got {array.dtype} {array.shape}")
            if array.size and (array.min() < 0 or array.max() >= self.charlm.vocab_size):
                raise ValueError(f"{name} must hold ids in [0, {self.charlm.vocab_size}), got values from "
                                 f"{array.min()} to {array.max()}")
        if inputs.shape != targets.shape:
            raise ValueError(f"targets must have the shape of inputs {inputs.shape}, got {targets.shape}")
        steps, batch_size = inputs.shape
        if self.state is None or self.state.shape[2] != batch_size:
            self.reset_state(batch_size)
        inputs = np.ascontiguousarray(inputs, dtype=np.int64)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        buffers = self._buffers_for(steps, batch_size)
        if self.fused:
            loss = self._train_fused(inputs, targets, buffers)
        elif self.pipeline_chunks and steps % self.pipeline_chunks == 0:
            # One BLAS thread for the whole window: BLAS threads left spinning after the head's GEMMs
            # would compete with the layer threads.
            loss = self._with_one_blas_thread(lambda: self._train_pipelined(inputs, targets, buffers))
        else:
            loss = self._train_layers(inputs, targets, buffers)
        self._losses.append(loss)
        self.windows += 1
        return loss

    def _train_fused(self, inputs, targets, buffers):
        optimizer = self.optimizer
        model_slots, head_slots = optimizer.slots
        loss = self.model._kernels.train_window(
            self.model.params, self.head.params, None, targets, self.state, buffers.gates, buffers.cs,
            buffers.hs, buffers.probs, buffers.d_y, buffers.grad, buffers.head_grad, buffers.d_state,
            None, buffers.dz, buffers.d_hidden, self.model.forget_bias, optimizer.code, optimizer.hyper,
            model_slots, head_slots, optimizer.iterations + 1, inputs)
        optimizer.iterations += 1
        return float(loss)

    def _draw_masks(self, buffers):
        # Inverted dropout: keep with probability 1 - p and scale by 1 / (1 - p).
        keep = 1.0 - self.charlm.dropout
        draws = self.dropout_rng.random(buffers.masks.shape, dtype=np.float32)
        np.multiply(draws >= np.float32(self.charlm.dropout), buffers.masks.dtype.type(1.0 / keep),
                    out=buffers.masks)

    def _run_waves(self, waves):
        # Run each wave's tasks (callables) on the pool, waiting for a wave before the next one.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.charlm.num_layers,
                                                               thread_name_prefix="fastlstm-layer")
        for tasks in waves:
            if len(tasks) == 1:
                tasks[0]()
            else:
                for future in [self._pool.submit(task) for task in tasks]:
                    future.result()

    def close(self):
        """Stop the worker threads of pipelined training (they are also stopped at exit)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _train_pipelined(self, inputs, targets, buffers):
        # Wavefront over (layer, chunk): see the module docstring.
        steps, batch_size = inputs.shape
        layers, chunks = self.charlm.num_layers, self.pipeline_chunks
        size = steps // chunks
        hidden = self.charlm.hidden_size
        dropout = self.charlm.dropout > 0.0
        if dropout:
            self._draw_masks(buffers)
        if not hasattr(buffers, "chunk_tapes"):
            buffers.chunk_tapes = [[None] * chunks for _ in range(layers)]
            buffers.chunk_grads = []
            for layer in range(layers):
                start, end = self.model.layer_slice(layer)
                buffers.chunk_grads.append([
                    Gradients(buffers.grad[start:end], aligned_empty((1, 2, batch_size, hidden), self.model.dtype),
                              None) for _ in range(chunks)])
        outputs = [[None] * chunks for _ in range(layers)]
        d_inputs = [[None] * chunks for _ in range(layers)]

        def forward(layer, chunk):
            begin = chunk * size
            layer_input = inputs[begin:begin + size] if layer == 0 else outputs[layer - 1][chunk]
            out, buffers.chunk_tapes[layer][chunk] = self._layers[layer].forward(
                layer_input, self.state[layer:layer + 1], time_major=True, keep_tape=True,
                tape=buffers.chunk_tapes[layer][chunk])
            if dropout:
                out *= buffers.masks[layer, begin:begin + size]
            outputs[layer][chunk] = out

        def backward(layer, chunk):
            begin = chunk * size
            d_out = buffers.d_y[begin:begin + size] if layer == layers - 1 else d_inputs[layer + 1][chunk]
            if dropout:
                d_out = d_out * buffers.masks[layer, begin:begin + size]
            d_final = buffers.chunk_grads[layer][chunk + 1].initial_state if chunk + 1 < chunks else None
            grads = self._layers[layer].backward(buffers.chunk_tapes[layer][chunk], d_out, d_final,
                                                 grads=buffers.chunk_grads[layer][chunk])
            d_inputs[layer][chunk] = grads.inputs

        # Forward wave w runs (layer l, chunk w - l); backward wave w runs (layer L - 1 - l, chunk
        # K - 1 - (w - l)). Tasks of one wave touch different layers, hence different state slices,
        # tapes and gradient slices.
        waves = range(chunks + layers - 1)
        self._run_waves([[lambda l=l, c=w - l: forward(l, c) for l in range(layers) if 0 <= w - l < chunks]
                         for w in waves])

        top = np.concatenate(outputs[layers - 1], axis=0)
        buffers.head_grad[...] = 0.0
        rows = steps * batch_size
        result = self.head.backward(top.reshape(rows, hidden), targets.reshape(rows), grad=buffers.head_grad,
                                    d_hidden=buffers.d_y.reshape(rows, hidden),
                                    probs=buffers.probs.reshape(rows, -1))

        buffers.grad[...] = 0.0
        self._run_waves([[lambda l=layers - 1 - j, c=chunks - 1 - (w - j): backward(l, c)
                          for j in range(layers) if 0 <= w - j < chunks] for w in waves])
        self.optimizer.update([self.model.params, self.head.params], [buffers.grad, buffers.head_grad])
        return result.loss

    @staticmethod
    def _with_one_blas_thread(run):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(1, user_api="blas")
        with limits:
            return run()

    def _train_layers(self, inputs, targets, buffers):
        # Forward layer by layer with dropout masks between, the head, then backward in reverse.
        steps, batch_size = inputs.shape
        hidden = self.charlm.hidden_size
        if self.charlm.dropout > 0.0:
            self._draw_masks(buffers)

        layer_input = inputs
        for layer, single in enumerate(self._layers):
            outputs, buffers.tapes[layer] = single.forward(layer_input, self.state[layer:layer + 1],
                                                           time_major=True, keep_tape=True,
                                                           tape=buffers.tapes[layer])
            if self.charlm.dropout > 0.0:
                outputs *= buffers.masks[layer]
            layer_input = outputs

        buffers.head_grad[...] = 0.0
        rows = steps * batch_size
        result = self.head.backward(layer_input.reshape(rows, hidden), targets.reshape(rows),
                                    grad=buffers.head_grad, d_hidden=buffers.d_y.reshape(rows, hidden),
                                    probs=buffers.probs.reshape(rows, -1))

        buffers.grad[...] = 0.0
        d_outputs = buffers.d_y
        for layer in reversed(range(len(self._layers))):
            if self.charlm.dropout > 0.0:
                d_outputs = d_outputs * buffers.masks[layer]
            grads = self._layers[layer].backward(buffers.tapes[layer], d_outputs,
                                                 grads=buffers.layer_grads[layer])
            d_outputs = grads.inputs
        self.optimizer.update([self.model.params, self.head.params], [buffers.grad, buffers.head_grad])
        return result.loss

    def train_epoch(self, rows, *, on_window=None):
        """Train on every whole window of rows [B, N] in order, from ``window_in_epoch`` on.

        The state is zeroed at the start of the epoch (not when continuing an interrupted one).
        ``on_window(trainer, loss)`` is called after each window. Returns the epoch's mean window loss
        in nats per character.
        """
        self.charlm._check_rows("rows", rows)
        count = text_data.num_windows(rows, self.window)
        if count < 1:
            raise ValueError(f"rows must have at least window + 1 = {self.window + 1} columns, got {rows.shape}")
        if self.window_in_epoch == 0 or self.state is None or self.state.shape[2] != rows.shape[0]:
            self.window_in_epoch = 0
            self.reset_state(rows.shape[0])
        first = self.windows - self.window_in_epoch
        for index in range(self.window_in_epoch, count):
            inputs, targets = text_data.window_pair(rows, index, self.window)
            loss = self.train_window(inputs, targets)
            self.window_in_epoch = index + 1
            if on_window is not None:
                on_window(self, loss)
        mean = float(np.mean(self._losses[first:self.windows]))
        self.epoch_losses.append(mean)
        self.epoch += 1
        self.window_in_epoch = 0
        return mean

    # Checkpoint support (fastlstm.io).

    def state_dict(self):
        """Return the training state, with the keys of ``fastlstm.Trainer.state_dict``."""
        return trainer_state_dict(self)

    def load_state_dict(self, values):
        """Copy a ``state_dict`` (for example from a checkpoint) into this trainer."""
        optimizer = self.optimizer
        state, counters, losses = check_state_dict(self, values)
        if counters["window_in_epoch"] > 0 and state is None:
            raise ValueError("state is missing, but a checkpoint in the middle of an epoch needs it")

        self.model.params[...] = values["model_params"]
        self.head.params[...] = values["head_params"]
        optimizer.slots[0][...] = values["model_slots"]
        optimizer.slots[1][...] = values["head_slots"]
        optimizer.iterations = counters["optimizer_iterations"]
        self.epoch = counters["epoch"]
        self.window_in_epoch = counters["window_in_epoch"]
        self.windows = counters["windows"]
        self._losses = [float(loss) for loss in losses]
        self.epoch_losses = [float(loss) for loss in values["epoch_losses"]]
        if state is None:
            self.state = None
        else:
            self.reset_state(state.shape[2])
            self.state[...] = state


def characters_per_second(trainer, seconds, windows):
    """Training throughput: ``windows`` windows of T * B characters in ``seconds``."""
    if trainer._buffers is None or seconds <= 0:
        return 0.0
    steps, batch_size = trainer._buffers.key
    return windows * steps * batch_size / seconds


class Timer:
    """Wall-clock seconds spent inside ``with timer:`` blocks, summed."""

    def __init__(self):
        self.seconds = 0.0
        self._started = None

    def __enter__(self):
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        self.seconds += time.perf_counter() - self._started
        self._started = None
        return False
