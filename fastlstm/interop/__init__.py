"""Weight converters between fastlstm and other frameworks.

``fastlstm.interop.tensorflow``
    The variables of a TensorFlow 1.x graph built from ``BasicLSTMCell`` layers in a ``MultiRNNCell``
    and a dense layer, as dicts of arrays or from a TensorFlow checkpoint.
``fastlstm.interop.keras``
    Keras ``LSTM`` layers (gate order i, f, c, o, a separate recurrent kernel, the forget bias folded
    into the bias) and a ``Dense`` head.

Importing these modules never imports TensorFlow or Keras. Only the functions that read a checkpoint
or write into framework objects touch them, and only through the objects they are given or a lazy
import. Only the converters contain another framework's gate order and bias convention. fastlstm's own
is TensorFlow BasicLSTMCell's (see ``fastlstm._layout``).

A head is the dense output layer ``logits = h @ kernel + bias`` with kernel [H, C] and bias [C]. The
converters accept it as a ``(kernel, bias)`` pair of arrays or as any object with ``kernel`` and
``bias`` array attributes, such as ``fastlstm.SoftmaxHead``, whose arrays are views written in place.
"""

import numpy as np

from fastlstm import _checks

__all__ = []


def _head_arrays(head, hidden_size, name="head"):
    """Return ``(kernel [H, C], bias [C])`` of ``head``, the arrays themselves (not copies).

    ``head`` is a pair of numpy arrays or an object with ``kernel`` and ``bias`` attributes.
    """
    if isinstance(head, (tuple, list)):
        if len(head) != 2:
            raise ValueError(f"{name} must be a (kernel, bias) pair, got a sequence of length {len(head)}")
        kernel, bias = head
    elif hasattr(head, "kernel") and hasattr(head, "bias"):
        kernel, bias = head.kernel, head.bias
    else:
        raise TypeError(
            f"{name} must be a (kernel, bias) pair of arrays or an object with kernel and bias "
            f"attributes (such as fastlstm.SoftmaxHead), got {type(head).__name__}"
        )
    _checks.check_ndarray(f"{name} kernel", kernel)
    _checks.check_ndarray(f"{name} bias", bias)
    if kernel.ndim != 2 or kernel.shape[0] != hidden_size:
        raise ValueError(f"{name} kernel must have shape ({hidden_size}, num_classes), got {kernel.shape}")
    if bias.shape != (kernel.shape[1],):
        raise ValueError(f"{name} bias must have shape ({kernel.shape[1]},) to match its kernel, got {bias.shape}")
    return kernel, bias


def _write_head(head, kernel, bias, name="head"):
    """Copy ``kernel`` and ``bias`` into ``head``'s arrays in place, after checking their shapes."""
    target_kernel, target_bias = _head_arrays(head, kernel.shape[0], name)
    if target_kernel.shape != kernel.shape:
        raise ValueError(f"{name} kernel must have shape {kernel.shape} to receive the weights, "
                         f"got {target_kernel.shape}")
    if not target_kernel.flags.writeable or not target_bias.flags.writeable:
        raise ValueError(f"{name} kernel and bias must be writeable arrays, because they are filled in place")
    target_kernel[...] = kernel
    target_bias[...] = bias
    return head


def _check_model(model, name="model"):
    """Raise TypeError unless ``model`` looks like a ``fastlstm.LSTM``."""
    for attribute in ("input_size", "hidden_size", "num_layers", "forget_bias", "kernel", "bias", "dtype"):
        if not hasattr(model, attribute):
            raise TypeError(f"{name} must be a fastlstm.LSTM, got {type(model).__name__} without {attribute!r}")


def _new_model(input_size, hidden_size, num_layers, forget_bias, dtype, backend):
    """Create a ``fastlstm.LSTM`` of the given shape (its weights are overwritten by the caller)."""
    from fastlstm.model import LSTM

    return LSTM(input_size, hidden_size, num_layers, forget_bias=forget_bias, dtype=dtype, backend=backend,
                seed=0)


def _as_float_array(name, value):
    """Return ``value`` as a numpy float array (a view when it already is one)."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    return array
