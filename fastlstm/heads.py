"""Output heads: a dense layer followed by softmax cross-entropy.

Dimension letters: N rows (any leading shape, flattened), H hidden units, C classes.
"""

import threading

import numpy as np

from fastlstm import _checks
from fastlstm._layout import aligned_empty, aligned_zeros
from fastlstm._backends import resolve_backend

KERNEL_INITS = ("glorot_uniform", "uniform")


class HeadGradients:
    """Result of ``SoftmaxHead.backward``.

    ``loss`` is the mean cross-entropy (a float) and ``probs`` [..., C] are the softmax probabilities.
    ``hidden`` [..., H] is the gradient of the mean loss with respect to the head's input, overwritten.
    ``params`` [H * C + C] is the gradient with respect to the head's parameters, accumulated (+=).
    """

    def __init__(self, loss, probs, hidden, params):
        self.loss = loss
        self.probs = probs
        self.hidden = hidden
        self.params = params


class SoftmaxHead:
    """Dense layer ``logits = hidden @ kernel + bias`` then softmax, trained with cross-entropy.

    Parameters
    ----------
    hidden_size, num_classes : int
        H and C, both at least 1.
    dtype : "float32" or "float64"
        Must match the model whose outputs the head reads.
    backend : "auto", "c" or "numba"
        Chosen like ``LSTM``'s; the head calls that backend's ``softmax_xent``.
    seed : int, numpy.random.Generator or None
        Source of the initial kernel.
    kernel_init : "glorot_uniform" or "uniform"
        Glorot-uniform over [H, C] (Keras' Dense default), or uniform in [0, 1) (what
        ``numpy.random.rand`` gives, as in the echo task's original program). The bias starts at zero.

    The parameters are one flat vector ``params`` [H * C + C]: the kernel [H, C] in row-major order,
    then the bias [C]. ``kernel`` and ``bias`` are writable views into it.
    """

    def __init__(self, hidden_size, num_classes, *, dtype="float32", backend="auto", seed=None,
                 kernel_init="glorot_uniform"):
        self.hidden_size = _checks.check_positive_int("hidden_size", hidden_size)
        self.num_classes = _checks.check_positive_int("num_classes", num_classes)
        self.dtype = _checks.check_dtype_name(dtype)
        self.backend, self._kernels = resolve_backend(backend)
        self._params = aligned_zeros(self.hidden_size * self.num_classes + self.num_classes, self.dtype)
        self._scratch = threading.local()
        self.reset_parameters(seed, kernel_init=kernel_init)

    def __repr__(self):
        return (f"SoftmaxHead(hidden_size={self.hidden_size}, num_classes={self.num_classes}, "
                f"dtype='{self.dtype.name}', backend='{self.backend}')")

    # Parameters.

    def reset_parameters(self, seed=None, *, kernel_init="glorot_uniform"):
        """Draw the kernel with ``kernel_init`` (see the class docstring) and set the bias to zero."""
        if kernel_init not in KERNEL_INITS:
            raise ValueError(f"kernel_init must be one of {KERNEL_INITS}, got {kernel_init!r}")
        rng = np.random.default_rng(seed)
        if kernel_init == "uniform":
            self.kernel[...] = rng.random(self.kernel.shape)
        else:
            limit = np.sqrt(6.0 / (self.hidden_size + self.num_classes))
            self.kernel[...] = rng.uniform(-limit, limit, size=self.kernel.shape)
        self.bias[...] = 0.0

    @property
    def params(self):
        """The flat parameter vector [H * C + C]: kernel [H, C] row-major, then bias [C]."""
        return self._params

    @params.setter
    def params(self, values):
        values = _checks.check_float_input("params", np.asarray(values), self.dtype, 1)
        if values.shape != self._params.shape:
            raise ValueError(f"params must have shape {self._params.shape}, got {values.shape}")
        self._params[...] = values

    @property
    def kernel(self):
        """Writable view [H, C] of the dense kernel."""
        return self._params[:self.hidden_size * self.num_classes].reshape(self.hidden_size, self.num_classes)

    @property
    def bias(self):
        """Writable view [C] of the dense bias."""
        return self._params[self.hidden_size * self.num_classes:]

    # Forward and backward.

    def forward(self, hidden, labels):
        """Return ``(loss, probs)``: the mean cross-entropy over all rows and the probabilities [..., C].

        ``hidden`` is [..., H] of float32 or float64 and ``labels`` an integer array of the leading
        shape [...] with values in [0, C).
        """
        result = self.backward(hidden, labels, grad=self._scratch_array("grad", self._params.shape))
        return result.loss, result.probs

    def backward(self, hidden, labels, *, grad=None, d_hidden=None, probs=None):
        """Compute the loss, the probabilities and both gradients in one pass; return ``HeadGradients``.

        ``grad`` [H * C + C], if given, must be a C-contiguous array of the head's dtype and receives
        the parameter gradient added to it (+=); otherwise a zeroed one is allocated. ``d_hidden``
        [..., H] and ``probs`` [..., C], if given, are C-contiguous arrays of the head's dtype that
        are overwritten, so that a caller can reuse its memory.
        """
        hidden_rows, label_rows, leading = self._check_inputs(hidden, labels)
        rows = hidden_rows.shape[0]
        if grad is None:
            grad = aligned_zeros(self._params.shape, self._params.dtype)
        else:
            _checks.check_buffer("grad", grad, self.dtype, self._params.shape)
        if d_hidden is None:
            d_hidden = aligned_empty(leading + (self.hidden_size,), self.dtype)
        else:
            _checks.check_buffer("d_hidden", d_hidden, self.dtype, leading + (self.hidden_size,))
        if probs is None:
            probs = aligned_empty(leading + (self.num_classes,), self.dtype)
        else:
            _checks.check_buffer("probs", probs, self.dtype, leading + (self.num_classes,))
        _checks.check_no_overlap("grad", grad, [("params", self._params), ("d_hidden", d_hidden),
                                                ("probs", probs), ("hidden", hidden)])
        _checks.check_no_overlap("d_hidden", d_hidden, [("params", self._params), ("probs", probs),
                                                        ("hidden", hidden)])
        _checks.check_no_overlap("probs", probs, [("params", self._params), ("hidden", hidden)])

        loss = self._kernels.softmax_xent(hidden_rows, self._params, label_rows,
                                          probs.reshape(rows, self.num_classes),
                                          d_hidden.reshape(rows, self.hidden_size), grad)
        return HeadGradients(float(loss), probs, d_hidden, grad)

    def predict(self, hidden):
        """Return the softmax probabilities [..., C] for ``hidden`` [..., H]."""
        _checks.check_ndarray("hidden", hidden)
        labels = np.zeros(hidden.shape[:-1], dtype=np.int64)
        return self.forward(hidden, labels)[1]

    def _check_inputs(self, hidden, labels):
        _checks.check_ndarray("hidden", hidden)
        if hidden.ndim < 1 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (..., {self.hidden_size}), got {hidden.shape}")
        hidden = _checks.check_float_input("hidden", hidden, self.dtype, hidden.ndim)
        leading = hidden.shape[:-1]

        _checks.check_ndarray("labels", labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.shape != leading:
            raise ValueError(f"labels must have hidden's leading shape {leading}, got {labels.shape}")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {bad}")
        rows = int(np.prod(leading, dtype=np.int64))
        if rows == 0:
            raise ValueError(f"hidden must have at least one row, got shape {hidden.shape}")
        return hidden.reshape(rows, self.hidden_size), labels.reshape(rows), leading

    def _scratch_array(self, name, shape):
        # Per-thread scratch, as in LSTM, so that threads sharing one head never share buffers.
        arrays = self._scratch.__dict__
        array = arrays.get(name)
        if array is None or array.shape != shape:
            array = aligned_empty(shape, self.dtype)
            arrays[name] = array
        array[...] = 0.0
        return array
