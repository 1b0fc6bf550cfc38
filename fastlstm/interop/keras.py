"""Convert weights between a fastlstm ``LSTM`` and a stack of Keras ``LSTM`` layers.

Keras's LSTM cell (Keras 3, and ``tf.keras`` 2.x) differs from BasicLSTMCell in three ways that
matter here:

- Its weights are ``kernel`` [I_l, 4H] (x's rows), ``recurrent_kernel`` [H, 4H] (h's rows) and
  ``bias`` [4H], where fastlstm stacks the first two into one kernel [I_l + H, 4H].
- Its gate column blocks are i, f, c, o, where fastlstm's are i, j, f, o (Keras's c is fastlstm's j).
- It adds no forget bias at run time. ``unit_forget_bias=True`` only initializes the forget slice of
  the bias to 1. So ``to_keras`` adds ``model.forget_bias`` to the forget slice of each bias, and
  ``from_keras`` subtracts the ``forget_bias`` it is given.

The fold is the only arithmetic in the conversion, and it rounds. In floating point,
``(b + forget_bias) - forget_bias`` equals ``b`` when ``forget_bias`` is 0 (the fold is then skipped).
For other values it equals ``b`` only where the sum is exact, for example for a zero bias (as ``LSTM``
initializes it) or biases on a coarse binary grid. A round trip fastlstm -> Keras -> fastlstm with the
same ``forget_bias`` and dtype is therefore bitwise in those cases. Otherwise each forget-gate bias may
move by up to one unit in the last place of ``|b| + |forget_bias|``. ``from_keras`` defaults to
``forget_bias=0.0``: the model then keeps Keras's bias unchanged, computes what Keras computes, and a
round trip Keras -> fastlstm -> Keras is always bitwise.

Keras's default activations are tanh and ``recurrent_activation="sigmoid"`` (checked in Keras 3.15 and
tf-keras 2.21; some older standalone Keras 2 releases defaulted to ``hard_sigmoid``). The converters reject a layer with
any other activation, with ``go_backwards=True``, or with ``use_bias=False`` when the bias to write is
not zero.

Keras states are ``[h, c]`` per layer, where fastlstm's packed state has c first; ``state_to_keras``
and ``state_from_keras`` convert between them. Importing this module does not import Keras or
TensorFlow: the functions use only the layer objects they are given (``get_weights``, ``set_weights``,
``build``).
"""

import numpy as np

from fastlstm._layout import GATE_F, GATE_I, GATE_J, GATE_O
from fastlstm.interop import _as_float_array, _check_model, _head_arrays, _new_model, _write_head

__all__ = [
    "KERAS_GATE_ORDER",
    "to_keras_weights",
    "from_keras_weights",
    "to_keras",
    "from_keras",
    "state_to_keras",
    "state_from_keras",
]

# Keras's gate block k is fastlstm's block KERAS_GATE_ORDER[k]: Keras orders i, f, c, o and its c is j.
KERAS_GATE_ORDER = (GATE_I, GATE_F, GATE_J, GATE_O)


def _keras_columns(hidden_size):
    # Column indices that take a fastlstm [..., 4H] array to Keras's gate order.
    return np.concatenate([np.arange(gate * hidden_size, (gate + 1) * hidden_size) for gate in KERAS_GATE_ORDER])


def _fastlstm_columns(hidden_size):
    # The inverse permutation: Keras's [..., 4H] to fastlstm's gate order.
    return np.argsort(_keras_columns(hidden_size))


def _forget_slice(hidden_size):
    # Position of the forget gate's block in Keras's order.
    start = KERAS_GATE_ORDER.index(GATE_F) * hidden_size
    return slice(start, start + hidden_size)


def to_keras_weights(model):
    """Return ``[[kernel [I_l, 4H], recurrent_kernel [H, 4H], bias [4H]], ...]``, one list per layer.

    These are the arrays of ``keras.layers.LSTM.set_weights``, in the model's dtype, with Keras's gate
    order and with ``model.forget_bias`` added to each bias's forget slice (rounded in the model's
    dtype). Keras is not needed.
    """
    _check_model(model)
    hidden_size = model.hidden_size
    columns = _keras_columns(hidden_size)
    forget = _forget_slice(hidden_size)
    weights = []
    for layer in range(model.num_layers):
        kernel = model.kernel(layer)[:, columns]
        bias = model.bias(layer)[columns]
        if model.forget_bias != 0.0:
            # Skipped for 0, because -0.0 + 0.0 is +0.0 and the round trip would change a bit.
            bias[forget] += model.dtype.type(model.forget_bias)
        input_rows = kernel.shape[0] - hidden_size
        weights.append([np.ascontiguousarray(kernel[:input_rows]), np.ascontiguousarray(kernel[input_rows:]),
                        bias])
    return weights


def from_keras_weights(weights, model=None, *, forget_bias=0.0, dtype="float32", backend="auto"):
    """Load ``[[kernel, recurrent_kernel, bias], ...]`` (one list per Keras LSTM layer) into a model.

    Returns the model: ``model`` filled in place (its shape must match and its ``forget_bias`` must
    equal ``forget_bias``), or a new ``LSTM`` with ``forget_bias``, ``dtype`` and ``backend``.
    ``forget_bias`` is subtracted from each bias's forget slice (rounded in the model's dtype), so that
    the model computes what Keras computes. A layer list without a bias (``use_bias=False``) loads a
    zero Keras bias. The same function converts Keras gradients to the layout of ``LSTM.params`` with
    ``forget_bias=0.0``, because a constant shift of the bias does not change its gradient.
    """
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"weights must be a non-empty list with one [kernel, recurrent_kernel, bias] "
                         f"per layer, got {weights!r:.100}")
    layers = []
    for layer, arrays in enumerate(weights):
        if not isinstance(arrays, (list, tuple)) or len(arrays) not in (2, 3):
            raise ValueError(f"weights[{layer}] must be [kernel, recurrent_kernel, bias] (or the first two when "
                             f"the layer has no bias), got {type(arrays).__name__} of length "
                             f"{len(arrays) if isinstance(arrays, (list, tuple)) else '?'}")
        kernel = _as_float_array(f"weights[{layer}][0] (kernel)", arrays[0])
        recurrent = _as_float_array(f"weights[{layer}][1] (recurrent_kernel)", arrays[1])
        if len(arrays) == 3:
            bias = _as_float_array(f"weights[{layer}][2] (bias)", arrays[2])
        else:
            bias = np.zeros(recurrent.shape[-1:], dtype=recurrent.dtype)
        layers.append((kernel, recurrent, bias))
    input_size, hidden_size = _check_keras_shapes(layers)
    num_layers = len(layers)

    if model is None:
        model = _new_model(input_size, hidden_size, num_layers, forget_bias, dtype, backend)
    else:
        _check_model(model)
        expected = (model.input_size, model.hidden_size, model.num_layers)
        if expected != (input_size, hidden_size, num_layers):
            raise ValueError(
                f"model has (input_size, hidden_size, num_layers) = {expected} but the Keras weights describe "
                f"{(input_size, hidden_size, num_layers)}; pass model=None to create a matching model"
            )
        if float(forget_bias) != model.forget_bias:
            raise ValueError(
                f"forget_bias must equal model.forget_bias = {model.forget_bias} when a model is given, got "
                f"{forget_bias}; it is subtracted from Keras's forget bias, which the model adds back at run time"
            )

    columns = _fastlstm_columns(hidden_size)
    forget = _forget_slice(hidden_size)
    shift = model.dtype.type(model.forget_bias)
    for layer, (kernel, recurrent, bias) in enumerate(layers):
        keras_bias = bias.astype(model.dtype, copy=True)
        if shift != 0.0:
            keras_bias[forget] -= shift
        target = model.kernel(layer)
        target[:kernel.shape[0]] = kernel[:, columns]
        target[kernel.shape[0]:] = recurrent[:, columns]
        model.bias(layer)[...] = keras_bias[columns]
    return model


def to_keras(model, layers, head=None, dense=None):
    """Write ``model``'s weights into Keras ``LSTM`` layers (and ``head`` into a ``Dense`` layer).

    ``layers`` is a Keras LSTM layer (for a one-layer model) or a sequence of ``model.num_layers`` of
    them, bottom first, each with ``units = H``. Unbuilt layers are built for their input width.
    ``head`` is a ``(kernel [H, C], bias [C])`` pair or an object with those attributes (such as
    ``fastlstm.SoftmaxHead``) and ``dense`` a Keras ``Dense`` layer with C units. Returns ``layers``.
    """
    _check_model(model)
    layers = _layer_list(layers, model.num_layers)
    for layer, (keras_layer, arrays) in enumerate(zip(layers, to_keras_weights(model))):
        _check_keras_layer(keras_layer, f"layers[{layer}]", model.hidden_size)
        if not getattr(keras_layer, "built", True):
            keras_layer.build((None, None, arrays[0].shape[0]))
        if not _uses_bias(keras_layer):
            if np.any(arrays[2] != 0):
                raise ValueError(
                    f"layers[{layer}] has use_bias=False, but layer {layer}'s bias plus forget_bias "
                    f"{model.forget_bias} on the forget slice is not zero; use a layer with use_bias=True"
                )
            arrays = arrays[:2]
        _set_weights(keras_layer, arrays, f"layers[{layer}]")

    if (head is None) != (dense is None):
        raise ValueError("head and dense must be given together: head is the source of the dense layer's weights")
    if head is not None:
        kernel, bias = _head_arrays(head, model.hidden_size)
        if not getattr(dense, "built", True):
            dense.build((None, model.hidden_size))
        _set_weights(dense, [np.asarray(kernel), np.asarray(bias)], "dense")
    return layers


def from_keras(layers, model=None, head=None, dense=None, *, forget_bias=0.0, dtype="float32", backend="auto"):
    """Load built Keras ``LSTM`` layers (and a ``Dense`` layer) into fastlstm; return ``(model, head)``.

    ``layers`` is one Keras LSTM layer or a sequence of them, bottom first. ``model`` and
    ``forget_bias`` are as in ``from_keras_weights``; with the default ``forget_bias=0.0`` the biases
    are copied unchanged. When both ``head`` and ``dense`` are given, ``head`` is filled in place from
    ``dense``. With ``dense`` alone the returned head is a new ``(kernel [H, C], bias [C])`` pair in the
    model's dtype, and without ``dense`` it is None.
    """
    layers = _layer_list(layers, None)
    weights = []
    for index, keras_layer in enumerate(layers):
        _check_keras_layer(keras_layer, f"layers[{index}]", None)
        arrays = keras_layer.get_weights()
        if not arrays:
            raise ValueError(f"layers[{index}] has no weights yet; build it first, for example by calling it on "
                             "an input")
        weights.append(arrays)
    model = from_keras_weights(weights, model, forget_bias=forget_bias, dtype=dtype, backend=backend)

    if dense is None:
        if head is not None:
            raise ValueError("head was given without dense, the Keras layer to read its weights from")
        return model, None
    arrays = dense.get_weights()
    if len(arrays) != 2:
        raise ValueError(f"dense must be a built Dense layer with a kernel and a bias, got {len(arrays)} weights")
    kernel = _as_float_array("dense kernel", arrays[0])
    bias = _as_float_array("dense bias", arrays[1])
    if kernel.ndim != 2 or kernel.shape[0] != model.hidden_size or bias.shape != kernel.shape[1:]:
        raise ValueError(f"dense must have a kernel ({model.hidden_size}, C) and a bias (C,), got "
                         f"{kernel.shape} and {bias.shape}")
    if head is None:
        return model, (kernel.astype(model.dtype), bias.astype(model.dtype))
    return model, _write_head(head, kernel, bias)


def state_to_keras(state):
    """Return Keras's ``[[h [B, H], c [B, H]], ...]`` (one pair per layer) from a packed [L, 2, B, H] state.

    Each pair is the ``initial_state`` of that layer's Keras ``LSTM`` call. The arrays are copies.
    """
    state = _as_float_array("state", state)
    if state.ndim != 4 or state.shape[1] != 2:
        raise ValueError(f"state must have shape (num_layers, 2, batch, hidden), got {state.shape}")
    return [[state[layer, 1].copy(), state[layer, 0].copy()] for layer in range(state.shape[0])]


def state_from_keras(states, out=None):
    """Return the packed state [L, 2, B, H] from Keras's per-layer ``[h, c]`` pairs.

    With ``out`` (an [L, 2, B, H] array) the state is written there and ``out`` is returned.
    """
    if not isinstance(states, (list, tuple)) or not states:
        raise ValueError(f"states must be a non-empty list of [h, c] pairs, one per layer, got {states!r:.100}")
    pairs = []
    for layer, pair in enumerate(states):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"states[{layer}] must be an [h, c] pair, got {pair!r:.100}")
        h = _as_float_array(f"states[{layer}][0] (h)", pair[0])
        c = _as_float_array(f"states[{layer}][1] (c)", pair[1])
        if h.ndim != 2 or c.shape != h.shape:
            raise ValueError(f"states[{layer}] must hold h and c of one shape (batch, hidden), got {h.shape} "
                             f"and {c.shape}")
        pairs.append((c, h))
    shape = (len(pairs), 2) + pairs[0][0].shape
    if out is None:
        out = np.empty(shape, dtype=pairs[0][0].dtype)
    elif not isinstance(out, np.ndarray) or out.shape != shape:
        raise ValueError(f"out must be a numpy array of shape {shape}, got {getattr(out, 'shape', type(out))}")
    for layer, (c, h) in enumerate(pairs):
        if c.shape != shape[2:]:
            raise ValueError(f"states[{layer}] has shape {c.shape}, but layer 0's is {shape[2:]}")
        out[layer, 0] = c
        out[layer, 1] = h
    return out


def _layer_list(layers, num_layers):
    if isinstance(layers, (list, tuple)):
        layers = list(layers)
    else:
        layers = [layers]
    if not layers:
        raise ValueError("layers must contain at least one Keras LSTM layer")
    if num_layers is not None and len(layers) != num_layers:
        raise ValueError(f"layers must have one Keras LSTM layer per model layer ({num_layers}), got {len(layers)}")
    return layers


def _activation_name(function):
    # Keras 3 and tf.keras both pass plain functions named after the activation.
    return getattr(function, "__name__", repr(function))


def _check_keras_layer(layer, name, hidden_size):
    cell = getattr(layer, "cell", layer)
    for attribute in ("units", "activation", "recurrent_activation", "get_weights", "set_weights"):
        if not hasattr(cell, attribute) and not hasattr(layer, attribute):
            raise TypeError(f"{name} must be a Keras LSTM layer, got {type(layer).__name__} without {attribute!r}")
    if hidden_size is not None and cell.units != hidden_size:
        raise ValueError(f"{name} must have units = hidden_size = {hidden_size}, got {cell.units}")
    activation = _activation_name(cell.activation)
    recurrent_activation = _activation_name(cell.recurrent_activation)
    if activation != "tanh" or recurrent_activation != "sigmoid":
        raise ValueError(
            f"{name} must use activation='tanh' and recurrent_activation='sigmoid' like fastlstm's cell, got "
            f"{activation!r} and {recurrent_activation!r}"
        )
    if getattr(layer, "go_backwards", False):
        raise ValueError(f"{name} has go_backwards=True, which fastlstm does not implement")


def _uses_bias(layer):
    return bool(getattr(getattr(layer, "cell", layer), "use_bias", True))


def _set_weights(layer, arrays, name):
    current = layer.get_weights()
    if len(current) != len(arrays):
        raise ValueError(f"{name} has {len(current)} weight arrays, expected {len(arrays)}")
    for index, (old, new) in enumerate(zip(current, arrays)):
        if np.shape(old) != np.shape(new):
            raise ValueError(f"{name} weight {index} has shape {np.shape(old)}, but the converted array has "
                             f"shape {np.shape(new)}")
    layer.set_weights([np.asarray(array, dtype=np.asarray(old).dtype) for array, old in zip(arrays, current)])


def _check_keras_shapes(layers):
    # Return (I, H) after checking kernel [I_l, 4H], recurrent_kernel [H, 4H] and bias [4H] per layer.
    kernel, recurrent, _ = layers[0]
    if recurrent.ndim != 2 or recurrent.shape[1] != 4 * recurrent.shape[0] or recurrent.shape[0] == 0:
        raise ValueError(f"weights[0][1] (recurrent_kernel) must have shape (H, 4H), got {recurrent.shape}")
    hidden_size = recurrent.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 4 * hidden_size or kernel.shape[0] == 0:
        raise ValueError(f"weights[0][0] (kernel) must have shape (input_size, {4 * hidden_size}), got {kernel.shape}")
    input_size = kernel.shape[0]
    for layer, (kernel, recurrent, bias) in enumerate(layers):
        rows = input_size if layer == 0 else hidden_size
        if kernel.shape != (rows, 4 * hidden_size):
            raise ValueError(f"weights[{layer}][0] (kernel) must have shape {(rows, 4 * hidden_size)}, "
                             f"got {kernel.shape}")
        if recurrent.shape != (hidden_size, 4 * hidden_size):
            raise ValueError(f"weights[{layer}][1] (recurrent_kernel) must have shape "
                             f"{(hidden_size, 4 * hidden_size)}, got {recurrent.shape}")
        if bias.shape != (4 * hidden_size,):
            raise ValueError(f"weights[{layer}][2] (bias) must have shape {(4 * hidden_size,)}, got {bias.shape}")
    return input_size, hidden_size
