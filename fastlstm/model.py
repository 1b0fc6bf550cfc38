"""The multi-layer LSTM model: parameters, state buffers, forward, backward and streaming steps.

Inputs are either float vectors x [..., I] or integer token ids in [0, I). An id stands for the
one-hot vector of width I, and the one-hot row times layer 0's input kernel W[:I] is row id of that
kernel, so the kernels gather rows (z = b + W[id]) instead of multiplying a one-hot matrix, and
backward adds the gate gradients into those rows (dW[id] += dz). Ids have no input gradient.
"""

import threading

import numpy as np

from fastlstm import _checks
from fastlstm._backends import resolve_backend
from fastlstm._layout import aligned_empty, aligned_zeros, layer_input_size, layer_offsets, num_params


class Tape:
    """What a training forward keeps for backward, in time-major layout.

    gates [L, T, B, G] holds the gate activations i, j, f, o; cs and hs [L, T + 1, B, H] hold the cell
    and hidden states, with the initial state at time index 0. ``x`` is the time-major input [T, B, I].
    A tape is tied to one (T, B) and can be passed back to ``LSTM.forward(tape=...)`` to be reused.
    A tape of a forward over token ids (``ids=True``) holds ``ids`` [T, B] int64 and has ``x = None``;
    one over float inputs has ``ids = None``.
    """

    def __init__(self, num_layers, steps, batch_size, input_size, hidden_size, dtype, *, ids=False):
        gates = 4 * hidden_size
        if ids:
            self.x = None
            self.ids = np.empty((steps, batch_size), dtype=np.int64)
        else:
            self.x = aligned_empty((steps, batch_size, input_size), dtype)
            self.ids = None
        self.input_size = input_size
        self.gates = aligned_empty((num_layers, steps, batch_size, gates), dtype)
        self.cs = aligned_empty((num_layers, steps + 1, batch_size, hidden_size), dtype)
        self.hs = aligned_empty((num_layers, steps + 1, batch_size, hidden_size), dtype)
        self.time_major = True
        self.filled = False

    @property
    def steps(self):
        return self.gates.shape[1]

    @property
    def batch_size(self):
        return self.gates.shape[2]

    @property
    def nbytes(self):
        """Bytes held for backward: gates, cell and hidden states (the input copy excluded)."""
        return self.gates.nbytes + self.cs.nbytes + self.hs.nbytes


class Gradients:
    """Gradients from ``LSTM.backward``.

    ``params`` has the layout of ``LSTM.params`` and accumulates across calls that pass ``grads=``;
    ``initial_state`` [L, 2, B, H] and ``inputs`` (shaped like the forward's x) are overwritten.
    ``inputs`` is None after a forward over token ids, which have no gradient.
    """

    def __init__(self, params, initial_state, inputs):
        self.params = params
        self.initial_state = initial_state
        self.inputs = inputs


class LSTM:
    """A stack of TensorFlow BasicLSTMCell layers with one flat parameter vector.

    Parameters
    ----------
    input_size, hidden_size, num_layers : int
        I, H and L; all at least 1.
    forget_bias : float
        Added to the forget gate's pre-activation at run time; never stored in the biases.
    dtype : "float32" or "float64"
    backend : "auto", "c" or "numba"
        ``"auto"`` reads ``FASTLSTM_BACKEND`` and otherwise prefers the C extension.
    seed : int, numpy.random.Generator or None
        Source of the initial weights: kernels Glorot-uniform over [I_l + H, 4H], biases zero.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, forget_bias=1.0, dtype="float32",
                 backend="auto", seed=None):
        self.input_size = _checks.check_positive_int("input_size", input_size)
        self.hidden_size = _checks.check_positive_int("hidden_size", hidden_size)
        self.num_layers = _checks.check_positive_int("num_layers", num_layers)
        self.forget_bias = _checks.check_finite_float("forget_bias", forget_bias)
        self.dtype = _checks.check_dtype_name(dtype)
        self.backend, self._kernels = resolve_backend(backend)

        self._offsets = layer_offsets(self.input_size, self.hidden_size, self.num_layers)
        self._params = aligned_zeros(num_params(self.input_size, self.hidden_size, self.num_layers),
                                     self.dtype)
        self._scratch = threading.local()
        self.reset_parameters(seed)

    def __repr__(self):
        return (f"LSTM(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, forget_bias={self.forget_bias}, "
                f"dtype='{self.dtype.name}', backend='{self.backend}')")

    # Parameters.

    def reset_parameters(self, seed=None):
        """Draw kernels Glorot-uniform (TensorFlow's default) and set biases to zero."""
        rng = np.random.default_rng(seed)
        gates = 4 * self.hidden_size
        for layer in range(self.num_layers):
            kernel = self.kernel(layer)
            limit = np.sqrt(6.0 / (kernel.shape[0] + gates))
            kernel[...] = rng.uniform(-limit, limit, size=kernel.shape)
            self.bias(layer)[...] = 0.0

    @property
    def params(self):
        """The flat parameter vector [P]; see ``fastlstm._layout`` for its layout."""
        return self._params

    @params.setter
    def params(self, values):
        values = _checks.check_float_input("params", np.asarray(values), self.dtype, 1)
        if values.shape != self._params.shape:
            raise ValueError(f"params must have shape {self._params.shape}, got {values.shape}")
        self._params[...] = values

    def kernel(self, layer):
        """Writable view [I_l + H, 4H] of ``layer``'s kernel; rows 0..I_l-1 multiply x."""
        start, bias_start, _ = self._offsets[self._check_layer(layer)]
        return self._params[start:bias_start].reshape(-1, 4 * self.hidden_size)

    def bias(self, layer):
        """Writable view [4H] of ``layer``'s bias (gate blocks i, j, f, o)."""
        _, bias_start, end = self._offsets[self._check_layer(layer)]
        return self._params[bias_start:end]

    def layer_model(self, layer):
        """Return a one-layer ``LSTM`` whose parameters are a view of ``layer``'s part of ``params``.

        Its input size is I for layer 0 and H above. Writes through either model change both, so
        layers can be run one at a time (for example with dropout between them) while the
        parameters stay in this model's flat vector. The gradient of that layer is the same slice
        of a gradient vector of this model's layout: ``grad[start:end]`` with ``(start, end) =
        model.layer_slice(layer)``.
        """
        layer = self._check_layer(layer)
        single = LSTM.__new__(LSTM)
        single.input_size = layer_input_size(layer, self.input_size, self.hidden_size)
        single.hidden_size = self.hidden_size
        single.num_layers = 1
        single.forget_bias = self.forget_bias
        single.dtype = self.dtype
        single.backend, single._kernels = self.backend, self._kernels
        single._offsets = layer_offsets(single.input_size, self.hidden_size, 1)
        start, end = self.layer_slice(layer)
        single._params = self._params[start:end]
        single._scratch = threading.local()
        return single

    def layer_slice(self, layer):
        """Return ``(start, end)``: where ``layer``'s kernel and bias lie in the flat vector."""
        start, _, end = self._offsets[self._check_layer(layer)]
        return start, end

    def _check_layer(self, layer):
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an integer in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    # State.

    def zero_state(self, batch_size):
        """Return a new zeroed packed state buffer [L, 2, B, H] (index 0 = c, 1 = h)."""
        batch_size = _checks.check_positive_int("batch_size", batch_size)
        return aligned_zeros((self.num_layers, 2, batch_size, self.hidden_size), self.dtype)

    def _check_state(self, state, batch_size):
        shape = (self.num_layers, 2, batch_size, self.hidden_size)
        _checks.check_ndarray("state", state)
        if state.ndim == 4 and state.shape != shape:
            raise ValueError(
                f"state must have shape (num_layers, 2, batch, hidden) = {shape} to match the model "
                f"and x's batch of {batch_size}, got {state.shape}"
            )
        return _checks.check_buffer("state", state, self.dtype, shape)

    # Forward and backward.

    def _time_major_input(self, x, time_major):
        x = _checks.check_float_input("x", x, self.dtype, 3)
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have input width {self.input_size} on its last axis, got shape {x.shape}")
        batch_axis = 1 if time_major else 0
        if x.shape[batch_axis] < 1:
            raise ValueError(f"x must have a batch of at least 1 on axis {batch_axis}, got shape {x.shape}")
        if not time_major:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
        return x

    def _time_major_ids(self, ids, time_major):
        # Integer ids [B, T] (or [T, B]) -> C-contiguous int64 [T, B], every value in [0, I).
        if ids.ndim != 2:
            _reject_integer_rank("x", ids, "[T, B]" if time_major else "[B, T]")
        batch_axis = 1 if time_major else 0
        if ids.shape[batch_axis] < 1:
            raise ValueError(f"x must have a batch of at least 1 on axis {batch_axis}, got shape {ids.shape}")
        _check_id_range("x", ids, self.input_size)
        return np.ascontiguousarray(ids if time_major else ids.T, dtype=np.int64)

    def forward(self, x, state, *, time_major=False, keep_tape=False, tape=None):
        """Run all layers over x and update ``state`` in place with the final state.

        x is [B, T, I] (or [T, B, I] with ``time_major=True``) of float32 or float64, converted to the
        model's dtype; or token ids, an integer array [B, T] (or [T, B]) with values in [0, I) that
        stand for one-hot inputs of width I (see the module docstring). ``state`` is a C-contiguous,
        writeable [L, 2, B, H] buffer of the model's dtype, read as the initial state. Returns the top
        layer's outputs in x's major order, or ``(outputs, tape)`` with ``keep_tape=True``; pass an
        earlier tape of the same (T, B) as ``tape`` to reuse its memory. With T = 0 the outputs are
        empty and ``state`` is left unchanged.
        """
        is_ids = _is_integer_array(x)
        if is_ids:
            ids = self._time_major_ids(x, time_major)
            xt = None
            steps, batch_size = ids.shape
        else:
            ids = None
            xt = self._time_major_input(x, time_major)
            steps, batch_size = xt.shape[0], xt.shape[1]
        self._check_state(state, batch_size)
        _checks.check_no_overlap("state", state, [("x", x)])

        if keep_tape:
            if tape is None:
                tape = Tape(self.num_layers, steps, batch_size, self.input_size, self.hidden_size,
                            self.dtype, ids=is_ids)
            elif not isinstance(tape, Tape) or tape.gates.shape != (self.num_layers, steps, batch_size,
                                                                    4 * self.hidden_size) \
                    or tape.gates.dtype != self.dtype or (tape.ids is not None) != is_ids:
                raise ValueError("tape must be a Tape from this model's forward with the same T and B "
                                 "and the same kind of input (float x or token ids)")
            if is_ids:
                tape.ids[...] = ids
                ids = tape.ids
            else:
                tape.x[...] = xt
                xt = tape.x
            tape.time_major = time_major
            gates, cs, hs = tape.gates, tape.cs, tape.hs
        else:
            gates = aligned_empty((1, steps, batch_size, 4 * self.hidden_size), self.dtype)
            cs = aligned_empty((1, steps + 1, batch_size, self.hidden_size), self.dtype)
            hs = aligned_empty((1, steps + 1, batch_size, self.hidden_size), self.dtype)

        if steps > 0 and is_ids:
            self._kernels.forward(self._params, None, state, gates, cs, hs, self.forget_bias,
                                  bool(keep_tape), ids)
        elif steps > 0:
            self._kernels.forward(self._params, xt, state, gates, cs, hs, self.forget_bias,
                                  bool(keep_tape))
        else:
            cs[:, 0] = state[:, 0] if keep_tape else state[-1:, 0]
            hs[:, 0] = state[:, 1] if keep_tape else state[-1:, 1]

        outputs = hs[-1, 1:]
        outputs = outputs.copy() if time_major else np.ascontiguousarray(outputs.transpose(1, 0, 2))
        if keep_tape:
            tape.filled = True
            return outputs, tape
        return outputs

    def backward(self, tape, d_outputs, d_final_state=None, *, grads=None):
        """Back-propagate through a tape from ``forward(keep_tape=True)``.

        ``d_outputs`` is the gradient of the loss with respect to the outputs, in the tape's major
        order; ``d_final_state`` [L, 2, B, H] is that of the final state, or None for zero. Returns a
        ``Gradients``. With ``grads`` (an earlier result of the same shapes) the parameter gradient is
        added into ``grads.params`` and the other two are overwritten, so no memory is allocated.
        """
        if not isinstance(tape, Tape) or not tape.filled:
            raise ValueError("tape must be the Tape returned by forward(..., keep_tape=True)")
        if tape.gates.shape[0] != self.num_layers or tape.hs.shape[3] != self.hidden_size \
                or tape.input_size != self.input_size or tape.gates.dtype != self.dtype:
            raise ValueError("tape was recorded by a model of another shape or dtype")
        steps, batch_size = tape.steps, tape.batch_size
        d_y = _checks.check_float_input("d_outputs", d_outputs, self.dtype, 3)
        expected = (steps, batch_size, self.hidden_size) if tape.time_major \
            else (batch_size, steps, self.hidden_size)
        if d_y.shape != expected:
            raise ValueError(f"d_outputs must have the outputs' shape {expected}, got {d_y.shape}")
        if not tape.time_major:
            d_y = np.ascontiguousarray(d_y.transpose(1, 0, 2))
        state_shape = (self.num_layers, 2, batch_size, self.hidden_size)
        if d_final_state is not None:
            d_final_state = _checks.check_float_input("d_final_state", d_final_state, self.dtype, 4)
            if d_final_state.shape != state_shape:
                raise ValueError(f"d_final_state must have shape {state_shape}, got {d_final_state.shape}")

        if grads is None:
            grads = Gradients(aligned_zeros(self._params.shape, self._params.dtype),
                              aligned_empty(state_shape, self.dtype),
                              None if tape.ids is not None
                              else aligned_empty((steps, batch_size, self.input_size), self.dtype))
            d_x = grads.inputs
        else:
            if not isinstance(grads, Gradients):
                raise TypeError(f"grads must be a Gradients from backward, got {type(grads).__name__}")
            _checks.check_buffer("grads.params", grads.params, self.dtype, self._params.shape)
            _checks.check_buffer("grads.initial_state", grads.initial_state, self.dtype, state_shape)
            d_x = None

        if tape.ids is not None:
            # Token ids: dW[ids] += dZ for layer 0, and no input gradient.
            dz = self._scratch_array("dz", (steps, batch_size, 4 * self.hidden_size))
            d_hidden = self._scratch_array("d_hidden", (steps, batch_size, self.hidden_size))
            if steps > 0:
                self._kernels.backward(self._params, None, tape.gates, tape.cs, tape.hs, d_y,
                                       d_final_state, grads.params, grads.initial_state, None, dz,
                                       d_hidden, tape.ids)
            else:
                grads.initial_state[...] = 0.0 if d_final_state is None else d_final_state
            grads.inputs = None
            return grads

        if d_x is None or not tape.time_major:
            d_x = self._scratch_array("d_x", (steps, batch_size, self.input_size))
        dz = self._scratch_array("dz", (steps, batch_size, 4 * self.hidden_size))
        d_hidden = self._scratch_array("d_hidden", (steps, batch_size, self.hidden_size))

        if steps > 0:
            self._kernels.backward(self._params, tape.x, tape.gates, tape.cs, tape.hs, d_y, d_final_state,
                                   grads.params, grads.initial_state, d_x, dz, d_hidden)
        else:
            grads.initial_state[...] = 0.0 if d_final_state is None else d_final_state

        inputs_shape = d_x.shape if tape.time_major else (batch_size, steps, self.input_size)
        if grads.inputs is None or grads.inputs.shape != inputs_shape:
            grads.inputs = aligned_empty(inputs_shape, self.dtype)
        if grads.inputs is not d_x:
            grads.inputs[...] = d_x if tape.time_major else d_x.transpose(1, 0, 2)
        return grads

    def _scratch_array(self, name, shape):
        # Scratch memory is per thread, so that threads sharing one model never share buffers.
        arrays = self._scratch.__dict__
        array = arrays.get(name)
        if array is None or array.shape != shape:
            array = aligned_empty(shape, self.dtype)
            arrays[name] = array
        return array

    def step(self, x_t, state, out=None):
        """Advance every layer by one time step and update ``state`` in place.

        x_t is [B, I], or token ids: an integer array [B] with values in [0, I). Returns the top
        layer's h [B, H]; with ``out`` (a C-contiguous [B, H] array of the model's dtype) the result
        is written there and, after the first call on a thread, nothing is allocated (for ids, when
        they are already C-contiguous int64).
        """
        ids = None
        if _is_integer_array(x_t):
            if x_t.ndim != 1:
                raise ValueError(f"x_t of an integer dtype contains token ids and must have shape (batch,), "
                                 f"got {x_t.shape}")
            if x_t.shape[0] < 1:
                raise ValueError(f"x_t must have a batch of at least 1, got shape {x_t.shape}")
            _check_id_range("x_t", x_t, self.input_size)
            ids = np.ascontiguousarray(x_t, dtype=np.int64)
            batch_size = ids.shape[0]
        else:
            x_t = _checks.check_float_input("x_t", x_t, self.dtype, 2)
            if x_t.shape[1] != self.input_size:
                raise ValueError(f"x_t must have shape (batch, {self.input_size}), got {x_t.shape}")
            if x_t.shape[0] < 1:
                raise ValueError(f"x_t must have a batch of at least 1, got shape {x_t.shape}")
            batch_size = x_t.shape[0]
        self._check_state(state, batch_size)
        _checks.check_no_overlap("state", state, [("x_t", x_t if ids is None else ids)])
        if out is None:
            out = aligned_empty((batch_size, self.hidden_size), self.dtype)
        else:
            _checks.check_buffer("out", out, self.dtype, (batch_size, self.hidden_size))
            _checks.check_no_overlap("out", out, [("state", state), ("x_t", x_t)])
        gates = self._scratch_array("step_gates", (batch_size, 4 * self.hidden_size))
        if ids is None:
            self._kernels.step(self._params, x_t, state, gates, self.forget_bias)
        else:
            self._kernels.step(self._params, None, state, gates, self.forget_bias, ids)
        out[...] = state[-1, 1]
        return out


def _is_integer_array(x):
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)


def _reject_integer_rank(name, x, expected):
    # An integer array of another rank is neither token ids nor a float input, so the message names both.
    raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}; integer token ids must have "
                    f"2 dimensions ({expected}), got shape {x.shape}")


def _check_id_range(name, ids, input_size):
    # Token ids must index a row of the input kernel: ValueError naming the first bad value.
    if ids.size and (ids.min() < 0 or ids.max() >= input_size):
        bad = ids[(ids < 0) | (ids >= input_size)].flat[0]
        raise ValueError(f"{name} contains token ids, which must be in [0, {input_size}) (the model's "
                         f"input_size), got {bad}")
