"""Convert weights between a fastlstm ``LSTM`` and a TensorFlow 1.x ``BasicLSTMCell`` graph.

The graph is L ``BasicLSTMCell`` layers in a ``MultiRNNCell`` (unrolled by ``static_rnn`` or
``dynamic_rnn``) and a dense layer ``logits = h @ W + b`` on the top layer's outputs. Its variables are:

    {scope}/multi_rnn_cell/cell_{l}/basic_lstm_cell/kernel   [I_l + H, 4H]   for l = 0 .. L-1
    {scope}/multi_rnn_cell/cell_{l}/basic_lstm_cell/bias     [4H]
    dense/kernel                                             [H, C]
    dense/bias                                               [C]

``scope`` is ``rnn`` for ``static_rnn`` and ``dynamic_rnn`` unless the graph set another one, and a
single cell without ``MultiRNNCell`` drops the ``multi_rnn_cell/cell_{l}/`` part. The dense names are
those of ``tf.compat.v1.layers.dense``. A graph that made its own dense variables (for example
``W2`` and ``b2``) passes those names as ``dense_kernel`` and ``dense_bias``, and a bias stored as
[1, C] is accepted.

BasicLSTMCell's kernel has x's rows above h's rows and the gate column blocks i, j, f, o, which is
exactly fastlstm's layout, so the conversion copies arrays and maps names. ``forget_bias`` is a
constructor argument of the cell on both sides, added at run time and stored in no variable. Give the
graph's value to ``from_tensorflow`` (its default 1.0 is BasicLSTMCell's).

Only ``checkpoint_variables`` and ``load_checkpoint`` use TensorFlow, which they import when called.
Importing this module does not import TensorFlow.
"""

import re

import numpy as np

from fastlstm._layout import layer_offsets, num_params
from fastlstm.interop import _as_float_array, _check_model, _head_arrays, _new_model, _write_head

__all__ = [
    "DENSE_KERNEL",
    "DENSE_BIAS",
    "variable_names",
    "to_tensorflow",
    "from_tensorflow",
    "optimizer_slots",
    "checkpoint_variables",
    "load_checkpoint",
]

DENSE_KERNEL = "dense/kernel"
DENSE_BIAS = "dense/bias"

# One LSTM variable of a BasicLSTMCell stack. The spellings are those of TensorFlow 1.2 and later
# (kernel, bias), TensorFlow 1.1 (weights, biases) and TensorFlow 1.0 (RNN/MultiRNNCell/Cell0/
# BasicLSTMCell/Linear/Matrix and Bias).
# NOTE: only the first spelling was checked against a real graph (TensorFlow 2.21 with tf-keras). The
# 1.0 and 1.1 spellings are tested on hand-written names, not on checkpoints written by those versions.
_LSTM_VARIABLE = re.compile(
    r"^(?:(?P<scope>.*?)/)?"
    r"(?:(?:multi_rnn_cell|MultiRNNCell)/(?:cell_|Cell)(?P<layer>\d+)/)?"
    r"(?:basic_lstm_cell|BasicLSTMCell)/(?:Linear/)?"
    r"(?P<kind>kernel|weights|Matrix|bias|biases|Bias)$"
)
_KINDS = {"kernel": "kernel", "weights": "kernel", "Matrix": "kernel",
          "bias": "bias", "biases": "bias", "Bias": "bias"}
_TENSOR_SUFFIX = re.compile(r":\d+$")


def variable_names(num_layers, *, scope="rnn", dense_kernel=DENSE_KERNEL, dense_bias=DENSE_BIAS):
    """Return the graph's variable names: per layer its kernel and bias, then the dense kernel and bias.

    These are the names ``to_tensorflow`` writes. Set ``dense_kernel`` and ``dense_bias`` to None to
    leave the dense layer out.
    """
    names = []
    for layer in range(num_layers):
        prefix = f"{scope}/multi_rnn_cell/cell_{layer}/basic_lstm_cell"
        names += [f"{prefix}/kernel", f"{prefix}/bias"]
    if dense_kernel is not None:
        names += [dense_kernel, dense_bias]
    return names


def to_tensorflow(model, head=None, *, scope="rnn", dense_kernel=DENSE_KERNEL, dense_bias=DENSE_BIAS):
    """Return ``{variable name: array}`` for ``model`` (and ``head``) in the graph's naming.

    The arrays are copies in the model's dtype. Assign them to a graph's variables by name, for example
    ``variable.load(values[variable.op.name], session)``. ``head`` is a ``(kernel [H, C], bias [C])``
    pair or an object with those attributes, such as ``fastlstm.SoftmaxHead``. The graph must use
    ``forget_bias = model.forget_bias`` in its cells to compute what the model computes.
    """
    _check_model(model)
    names = variable_names(model.num_layers, scope=scope, dense_kernel=None)
    values = {}
    for layer in range(model.num_layers):
        values[names[2 * layer]] = model.kernel(layer).copy()
        values[names[2 * layer + 1]] = model.bias(layer).copy()
    if head is not None:
        kernel, bias = _head_arrays(head, model.hidden_size)
        values[dense_kernel] = np.array(kernel, dtype=model.dtype)
        values[dense_bias] = np.array(bias, dtype=model.dtype)
    return values


def from_tensorflow(variables, model=None, head=None, *, forget_bias=None, dtype="float32", backend="auto",
                    scope=None, dense_kernel=DENSE_KERNEL, dense_bias=DENSE_BIAS):
    """Load a BasicLSTMCell stack and its dense layer from ``variables``; return ``(model, head)``.

    Parameters
    ----------
    variables : mapping of str to array
        Variable name (a trailing ``:0`` is ignored) to value, such as ``to_tensorflow``'s result, a
        session's ``{v.op.name: v for v in tf.compat.v1.global_variables()}`` after ``session.run``, or
        ``checkpoint_variables(path)``. Names that belong to neither the stack nor the dense layer,
        such as optimizer slots, are ignored.
    model : fastlstm.LSTM or None
        Filled in place when given, and its shape must match the variables. Otherwise a new ``LSTM``
        of the variables' shape is created with ``dtype`` and ``backend``.
    head : (kernel, bias) pair, object with kernel and bias attributes, or None
        Filled in place when given. When None, the returned head is a new ``(kernel, bias)`` pair in
        the model's dtype, or None if ``variables`` has no ``dense_kernel``.
    forget_bias : float or None
        The cells' ``forget_bias``, which no variable stores. A new model gets it (None means 1.0,
        BasicLSTMCell's default). A given model keeps its own, and a different value raises ValueError.
    scope : str or None
        The prefix before ``multi_rnn_cell``. None accepts any, provided only one stack is present.
    dense_kernel, dense_bias : str
        Names of the dense layer's variables.
    """
    names = {_TENSOR_SUFFIX.sub("", str(name)): name for name in variables}
    kernels, biases = _find_lstm_variables(names, scope)
    num_layers = len(kernels)
    layers = []
    for layer in range(num_layers):
        kernel = _as_float_array(kernels[layer], variables[names[kernels[layer]]])
        bias = _as_float_array(biases[layer], variables[names[biases[layer]]])
        layers.append((kernel, bias))
    input_size, hidden_size = _check_lstm_shapes(layers, kernels, biases)

    if model is None:
        model = _new_model(input_size, hidden_size, num_layers, 1.0 if forget_bias is None else forget_bias,
                           dtype, backend)
    else:
        _check_model(model)
        expected = (model.input_size, model.hidden_size, model.num_layers)
        if expected != (input_size, hidden_size, num_layers):
            raise ValueError(
                f"model has (input_size, hidden_size, num_layers) = {expected} but the variables describe "
                f"{(input_size, hidden_size, num_layers)}; pass model=None to create a matching model"
            )
        if forget_bias is not None and float(forget_bias) != model.forget_bias:
            raise ValueError(
                f"forget_bias must equal model.forget_bias = {model.forget_bias} when a model is given, "
                f"got {forget_bias}; a model's forget_bias is set when it is created"
            )
    for layer, (kernel, bias) in enumerate(layers):
        model.kernel(layer)[...] = kernel
        model.bias(layer)[...] = bias

    if dense_kernel not in names or dense_bias not in names:
        if head is not None:
            raise ValueError(
                f"head was given but the variables have no {dense_kernel!r} and {dense_bias!r}; pass "
                f"dense_kernel and dense_bias with the names of the dense layer's variables "
                f"(the variables are {sorted(names)})"
            )
        return model, None
    kernel = _as_float_array(dense_kernel, variables[names[dense_kernel]])
    bias = _as_float_array(dense_bias, variables[names[dense_bias]])
    kernel, bias = _check_dense_shapes(kernel, bias, hidden_size, dense_kernel, dense_bias)
    if head is None:
        return model, (np.array(kernel, dtype=model.dtype), np.array(bias, dtype=model.dtype))
    return model, _write_head(head, kernel, bias)


def optimizer_slots(variables, model, head=None, *, slot="Adagrad", scope=None, dense_kernel=DENSE_KERNEL,
                    dense_bias=DENSE_BIAS):
    """Return an optimizer's slot variables in fastlstm's flat layouts: ``(lstm_slot [P], head_slot)``.

    TensorFlow 1.x optimizers store one slot per variable as ``{variable name}/{slot}``; ``slot`` is
    ``Adagrad`` for AdagradOptimizer's accumulator (``Adam`` and ``Adam_1`` for Adam's m and v).
    ``lstm_slot`` has the layout of ``model.params`` and ``head_slot`` that of ``SoftmaxHead.params``
    (the kernel [H, C] row-major, then the bias [C]), or is None when ``head`` is None. ``head`` is
    only used for its shape. To resume TensorFlow's Adagrad in fastlstm, call
    ``optimizer.init([model.params, head.params])`` and copy these into ``optimizer.slots[k][0]``.
    """
    _check_model(model)
    names = {_TENSOR_SUFFIX.sub("", str(name)): name for name in variables}
    kernels, biases = _find_lstm_variables(names, scope)
    if len(kernels) != model.num_layers:
        raise ValueError(f"model has {model.num_layers} layers but the variables have {len(kernels)}")

    def read(name, shape):
        slot_name = f"{name}/{slot}"
        if slot_name not in names:
            raise ValueError(f"slot variable {slot_name!r} not found; the variables are {sorted(names)}")
        value = _as_float_array(slot_name, variables[names[slot_name]])
        if value.size != int(np.prod(shape)):
            raise ValueError(f"{slot_name} must have shape {shape}, got {value.shape}")
        return value.reshape(shape)

    lstm_slot = np.empty(num_params(model.input_size, model.hidden_size, model.num_layers), dtype=model.dtype)
    offsets = layer_offsets(model.input_size, model.hidden_size, model.num_layers)
    for layer, (kernel_start, bias_start, end) in enumerate(offsets):
        lstm_slot[kernel_start:bias_start] = read(kernels[layer], model.kernel(layer).shape).ravel()
        lstm_slot[bias_start:end] = read(biases[layer], model.bias(layer).shape)

    if head is None:
        return lstm_slot, None
    kernel_shape = _head_arrays(head, model.hidden_size)[0].shape
    kernel = read(dense_kernel, kernel_shape)
    bias = read(dense_bias, (kernel_shape[1],))
    return lstm_slot, np.concatenate([kernel.ravel(), bias.ravel()]).astype(model.dtype)


def checkpoint_variables(path):
    """Read every variable of a TensorFlow checkpoint into ``{name: numpy array}``.

    ``path`` is a checkpoint prefix (what ``Saver.save`` returns) or a directory with a ``checkpoint``
    file. Needs TensorFlow, imported here.
    """
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "reading a TensorFlow checkpoint needs TensorFlow, which is not installed; install it with "
            "`pip install tensorflow-cpu`, or pass the variables as arrays to from_tensorflow"
        ) from error
    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def load_checkpoint(path, model=None, head=None, *, forget_bias=None, dtype="float32", backend="auto",
                    scope=None, dense_kernel=DENSE_KERNEL, dense_bias=DENSE_BIAS):
    """Load a BasicLSTMCell stack and its dense layer from a TensorFlow checkpoint; return ``(model, head)``.

    The arguments are those of ``from_tensorflow``. Needs TensorFlow, imported here.
    """
    variables = checkpoint_variables(path)
    return from_tensorflow(variables, model, head, forget_bias=forget_bias, dtype=dtype, backend=backend,
                           scope=scope, dense_kernel=dense_kernel, dense_bias=dense_bias)


def _find_lstm_variables(names, scope):
    # Return ([kernel name per layer], [bias name per layer]) of the one BasicLSTMCell stack in names.
    stacks = {}
    for name in names:
        match = _LSTM_VARIABLE.match(name)
        if match is None:
            continue
        found_scope = match.group("scope") or ""
        layer = match.group("layer")
        key = (int(layer) if layer is not None else None, _KINDS[match.group("kind")])
        stack = stacks.setdefault(found_scope, {})
        if key in stack:
            raise ValueError(f"variables {stack[key]!r} and {name!r} are both the {key[1]} of one layer")
        stack[key] = name

    if scope is not None:
        scope = scope.rstrip("/")
        if scope not in stacks:
            raise ValueError(f"no BasicLSTMCell variables under scope {scope!r}; found scopes {sorted(stacks)}")
        stack = stacks[scope]
    elif len(stacks) == 1:
        scope, stack = next(iter(stacks.items()))
    elif not stacks:
        raise ValueError(
            "variables contain no BasicLSTMCell kernel and bias (names such as "
            f"'rnn/multi_rnn_cell/cell_0/basic_lstm_cell/kernel'); got {sorted(names)[:20]}"
        )
    else:
        raise ValueError(f"variables contain BasicLSTMCell stacks under several scopes {sorted(stacks)}; "
                         "pass scope to choose one")

    layers = sorted({layer for layer, _ in stack}, key=lambda layer: -1 if layer is None else layer)
    if None in layers and len(layers) > 1:
        raise ValueError(f"scope {scope!r} mixes a single cell with MultiRNNCell layers: {sorted(stack.values())}")
    if layers != [None] and layers != list(range(len(layers))):
        raise ValueError(f"scope {scope!r} has cells {layers}, expected cells 0 .. {len(layers) - 1}")
    kernels, biases = [], []
    for layer in layers:
        for kind, found in (("kernel", kernels), ("bias", biases)):
            if (layer, kind) not in stack:
                raise ValueError(f"the {kind} of layer {layer or 0} under scope {scope!r} is missing")
            found.append(stack[(layer, kind)])
    return kernels, biases


def _check_lstm_shapes(layers, kernel_names, bias_names):
    # Return (I, H) after checking every kernel [I_l + H, 4H] and bias [4H].
    first = layers[0][0]
    if first.ndim != 2 or first.shape[1] % 4 != 0 or first.shape[1] == 0:
        raise ValueError(f"{kernel_names[0]} must have shape (input_size + hidden_size, 4 * hidden_size), "
                         f"got {first.shape}")
    hidden_size = first.shape[1] // 4
    input_size = first.shape[0] - hidden_size
    if input_size < 1:
        raise ValueError(f"{kernel_names[0]} has {first.shape[0]} rows, which leaves no input rows above "
                         f"the {hidden_size} hidden rows")
    for layer, (kernel, bias) in enumerate(layers):
        rows = input_size + hidden_size if layer == 0 else 2 * hidden_size
        if kernel.shape != (rows, 4 * hidden_size):
            raise ValueError(f"{kernel_names[layer]} must have shape {(rows, 4 * hidden_size)}, got {kernel.shape}")
        if bias.shape != (4 * hidden_size,):
            raise ValueError(f"{bias_names[layer]} must have shape {(4 * hidden_size,)}, got {bias.shape}")
    return input_size, hidden_size


def _check_dense_shapes(kernel, bias, hidden_size, kernel_name, bias_name):
    # Return (kernel [H, C], bias [C]); a [1, C] bias, as some programs declare it, is flattened.
    if kernel.ndim != 2 or kernel.shape[0] != hidden_size:
        raise ValueError(f"{kernel_name} must have shape ({hidden_size}, num_classes), got {kernel.shape}")
    if bias.shape == (1, kernel.shape[1]):
        bias = bias.reshape(-1)
    if bias.shape != (kernel.shape[1],):
        raise ValueError(f"{bias_name} must have shape ({kernel.shape[1]},) or (1, {kernel.shape[1]}), "
                         f"got {bias.shape}")
    return kernel, bias

