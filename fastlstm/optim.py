"""Optimizers and gradient clipping, in place on flat parameter vectors.

An optimizer updates one or more flat vectors (for example an LSTM's ``params`` and a head's
``params``) from gradients of the same shapes. Its state for vector k is ``slots[k]``, an array
[S, P_k] of the vector's dtype: S = 0 for SGD, 1 for Adagrad (the accumulator) and 2 for Adam (m, then
v). This is the layout that the backends' fused ``train_window`` reads and writes, and the one that
checkpoints store. Updates allocate nothing after the first one: the slots and two scratch vectors per
parameter vector are created on the first ``update`` (or by ``init``).
"""

import math

import numpy as np

from fastlstm import _checks
from fastlstm._layout import aligned_empty

SGD_CODE = 0
ADAGRAD_CODE = 1
ADAM_CODE = 2


def global_norm(grads):
    """Return sqrt(sum of squares over all arrays in ``grads``) as a Python float.

    Squares are summed in float64 whatever the arrays' dtype.
    """
    grads = _as_vector_list("grads", grads)
    return math.sqrt(sum(_sum_of_squares(g, np.empty(g.shape, dtype=g.dtype)) for g in grads))


def _sum_of_squares(g, scratch):
    # sum(g * g) accumulated in float64, using scratch (g's shape and dtype) for the squares.
    np.multiply(g, g, out=scratch)
    return float(scratch.sum(dtype=np.float64))


def clip_by_global_norm(grads, clip_norm):
    """Scale every array in ``grads`` in place by ``clip_norm / max(global_norm, clip_norm)``.

    Returns the global norm before clipping. This is TensorFlow's ``tf.clip_by_global_norm``: nothing
    changes when the norm is at most ``clip_norm``, and a norm that is inf or NaN makes every gradient
    NaN, so that a diverged step cannot pass unnoticed.
    """
    clip_norm = _check_clip_norm(clip_norm)
    grads = _as_vector_list("grads", grads)
    norm = global_norm(grads)
    scale = _clip_scale(norm, clip_norm)
    if scale != 1.0:
        for g in grads:
            g *= scale
    return norm


def _clip_scale(norm, clip_norm):
    if not math.isfinite(norm):
        return math.nan
    return clip_norm / max(norm, clip_norm)


def _check_clip_norm(clip_norm):
    clip_norm = _checks.check_finite_float("clip_norm", clip_norm)
    if clip_norm <= 0.0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    return clip_norm


def _check_positive(name, value):
    value = _checks.check_finite_float(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _as_vector_list(name, vectors):
    if isinstance(vectors, np.ndarray):
        vectors = [vectors]
    elif not isinstance(vectors, (list, tuple)):
        raise TypeError(f"{name} must be a numpy array or a list of them, got {type(vectors).__name__}")
    for index, vector in enumerate(vectors):
        _checks.check_ndarray(f"{name}[{index}]", vector)
        if vector.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name}[{index}] must have dtype float32 or float64, got {vector.dtype}")
    return list(vectors)


class Optimizer:
    """Base class: per-vector slots, the update count, optional clipping by global norm.

    Subclasses set ``num_slots``, ``code`` (the fused ``train_window`` optimizer code) and implement
    ``_apply(params, grad, slots, scratch, scale)``, which updates one vector in place using
    ``scale * grad`` as the gradient (``scale`` comes from clipping and is 1.0 without it).
    """

    num_slots = 0
    code = None

    def __init__(self, learning_rate, *, clip_norm=None):
        self.learning_rate = _check_positive("learning_rate", learning_rate)
        self.clip_norm = None if clip_norm is None else _check_clip_norm(clip_norm)
        self.iterations = 0
        self.slots = None
        self._scratch = None
        self._hyper = np.zeros(5, dtype=np.float64)

    def __repr__(self):
        clip = "" if self.clip_norm is None else f", clip_norm={self.clip_norm}"
        return f"{type(self).__name__}(learning_rate={self.learning_rate}{clip})"

    def init(self, params):
        """Create the slots for the vectors in ``params`` (an array or a list of arrays).

        ``update`` calls it on first use. Calling it again with vectors of other sizes or dtypes
        raises, because the slots would no longer describe them; ``reset`` drops the state first.
        """
        params = _as_vector_list("params", params)
        if self.slots is not None:
            self._check_matches(params)
            return self.slots
        self.slots = []
        self._scratch = []
        for vector in params:
            slots = aligned_empty((self.num_slots, vector.size), vector.dtype)
            self._init_slots(slots)
            self.slots.append(slots)
            self._scratch.append(aligned_empty((2, vector.size), vector.dtype))
        return self.slots

    def reset(self):
        """Forget the slots and the update count."""
        self.slots = None
        self._scratch = None
        self.iterations = 0

    def _init_slots(self, slots):
        slots[...] = 0.0

    def _check_matches(self, params):
        if len(params) != len(self.slots):
            raise ValueError(
                f"params must be the {len(self.slots)} vectors this optimizer was initialised with, "
                f"got {len(params)}; call reset() to start over with other vectors"
            )
        for index, (vector, slots) in enumerate(zip(params, self.slots)):
            if vector.size != slots.shape[1] or vector.dtype != slots.dtype:
                raise ValueError(
                    f"params[{index}] must have size {slots.shape[1]} and dtype {slots.dtype} like the "
                    f"vector this optimizer was initialised with, got size {vector.size} and dtype "
                    f"{vector.dtype}; call reset() to start over with other vectors"
                )

    def update(self, params, grads):
        """Apply one update to ``params`` in place from ``grads`` (arrays or lists of arrays).

        Every parameter vector must be C-contiguous and writeable, and each gradient must have the shape
        and dtype of its vector. The gradients are read only: clipping scales them on the fly.
        """
        params = _as_vector_list("params", params)
        grads = _as_vector_list("grads", grads)
        if len(params) != len(grads):
            raise ValueError(f"grads must have one array per parameter vector ({len(params)}), got {len(grads)}")
        for index, (vector, grad) in enumerate(zip(params, grads)):
            _checks.check_buffer(f"params[{index}]", vector, vector.dtype, vector.shape)
            if grad.shape != vector.shape or grad.dtype != vector.dtype:
                raise ValueError(
                    f"grads[{index}] must have the shape {vector.shape} and dtype {vector.dtype} of "
                    f"params[{index}], got shape {grad.shape} and dtype {grad.dtype}"
                )
        self.init(params)

        scale = 1.0
        if self.clip_norm is not None:
            total = 0.0
            for grad, scratch in zip(grads, self._scratch):
                total += _sum_of_squares(grad.reshape(-1), scratch[1])
            scale = _clip_scale(math.sqrt(total), self.clip_norm)
        self.iterations += 1
        for vector, grad, slots, scratch in zip(params, grads, self.slots, self._scratch):
            self._apply(vector.reshape(-1), grad.reshape(-1), slots, scratch, scale)

    @staticmethod
    def _scaled_gradient(grad, out, scale):
        # Return grad itself when no clipping applies, else scale * grad written to out.
        if scale == 1.0:
            return grad
        np.multiply(grad, scale, out=out)
        return out

    @property
    def hyper(self):
        """float64 [learning_rate, beta_1, beta_2, epsilon, clip_norm] for the fused ``train_window``.

        clip_norm is 0 when clipping is off. The array is reused between calls.
        """
        self._hyper[0] = self.learning_rate
        self._hyper[1:4] = self._betas_epsilon()
        self._hyper[4] = 0.0 if self.clip_norm is None else self.clip_norm
        return self._hyper

    def _betas_epsilon(self):
        return (0.0, 0.0, 0.0)

    def config(self):
        """Return the hyperparameters as a JSON-serialisable dict (``name`` is the class name)."""
        return {"name": type(self).__name__, "learning_rate": self.learning_rate, "clip_norm": self.clip_norm}


class SGD(Optimizer):
    """Plain gradient descent: ``w -= learning_rate * g``. It has no slots."""

    num_slots = 0
    code = SGD_CODE

    def __init__(self, learning_rate=0.01, *, clip_norm=None):
        super().__init__(learning_rate, clip_norm=clip_norm)

    def _apply(self, params, grad, slots, scratch, scale):
        g = self._scaled_gradient(grad, scratch[0], scale)
        # w -= lr * g
        np.multiply(g, self.learning_rate, out=scratch[0])
        params -= scratch[0]


class Adagrad(Optimizer):
    """Adagrad as TensorFlow 1.x's ``tf.train.AdagradOptimizer`` defines it.

    ``acc += g * g; w -= learning_rate * g / sqrt(acc)``, with the accumulator (slot 0) starting at
    ``initial_accumulator_value``. There is no epsilon: the accumulator's positive start keeps the
    division finite, which is why ``initial_accumulator_value`` must be > 0 (ValueError otherwise).
    Keras' Adagrad differs: it adds epsilon to sqrt(acc).
    """

    num_slots = 1
    code = ADAGRAD_CODE

    def __init__(self, learning_rate=0.001, *, initial_accumulator_value=0.1, clip_norm=None):
        super().__init__(learning_rate, clip_norm=clip_norm)
        value = _checks.check_finite_float("initial_accumulator_value", initial_accumulator_value)
        if value <= 0.0:
            raise ValueError(
                f"initial_accumulator_value must be > 0 because Adagrad divides by sqrt(accumulator), "
                f"got {value}"
            )
        self.initial_accumulator_value = value

    def _init_slots(self, slots):
        slots[...] = self.initial_accumulator_value

    def _apply(self, params, grad, slots, scratch, scale):
        g = self._scaled_gradient(grad, scratch[0], scale)
        accumulator = slots[0]
        # acc += g * g
        np.multiply(g, g, out=scratch[1])
        accumulator += scratch[1]
        # w -= lr * g / sqrt(acc)
        np.sqrt(accumulator, out=scratch[1])
        np.multiply(g, self.learning_rate, out=scratch[0])
        np.divide(scratch[0], scratch[1], out=scratch[0])
        params -= scratch[0]

    def config(self):
        config = super().config()
        config["initial_accumulator_value"] = self.initial_accumulator_value
        return config


class Adam(Optimizer):
    """Adam as Keras defines it, with Keras' defaults.

    ``m += (g - m) * (1 - beta_1); v += (g * g - v) * (1 - beta_2);
    w -= learning_rate * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)``, where t
    counts updates from 1. Slot 0 is m and slot 1 is v, both starting at zero.
    """

    num_slots = 2
    code = ADAM_CODE

    def __init__(self, learning_rate=0.001, *, beta_1=0.9, beta_2=0.999, epsilon=1e-7, clip_norm=None):
        super().__init__(learning_rate, clip_norm=clip_norm)
        for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            value = _checks.check_finite_float(name, value)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = _check_positive("epsilon", epsilon)

    def _betas_epsilon(self):
        return (self.beta_1, self.beta_2, self.epsilon)

    def _apply(self, params, grad, slots, scratch, scale):
        g = self._scaled_gradient(grad, scratch[0], scale)
        m, v = slots[0], slots[1]
        # m += (g - m) * (1 - beta_1)
        np.subtract(g, m, out=scratch[1])
        scratch[1] *= 1.0 - self.beta_1
        m += scratch[1]
        # v += (g * g - v) * (1 - beta_2)
        np.multiply(g, g, out=scratch[1])
        scratch[1] -= v
        scratch[1] *= 1.0 - self.beta_2
        v += scratch[1]
        # w -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)
        t = self.iterations
        alpha = self.learning_rate * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        np.sqrt(v, out=scratch[1])
        scratch[1] += self.epsilon
        np.divide(m, scratch[1], out=scratch[1])
        scratch[1] *= alpha
        params -= scratch[1]

    def config(self):
        config = super().config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


class StepDecay:
    """Learning-rate decay by epochs, as in Zaremba, Sutskever and Vinyals, "Recurrent Neural Network
    Regularization" (2014).

    ``StepDecay(initial, factor, constant_epochs)(epoch)`` is ``initial`` for the first
    ``constant_epochs`` epochs (``epoch`` counts from 0) and is multiplied by ``factor`` at the start of
    each later epoch: ``initial * factor ** max(0, epoch + 1 - constant_epochs)``. ``apply(optimizer,
    epoch)`` sets ``optimizer.learning_rate`` to that value, which the next ``update`` (or fused
    training step) uses. A factor of 1 keeps the rate constant.
    """

    def __init__(self, initial, factor=1.0, constant_epochs=0):
        self.initial = _check_positive("initial", initial)
        factor = _checks.check_finite_float("factor", factor)
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        self.factor = factor
        if isinstance(constant_epochs, (bool, np.bool_)) or not isinstance(constant_epochs, (int, np.integer)) \
                or constant_epochs < 0:
            raise ValueError(f"constant_epochs must be a non-negative integer, got {constant_epochs!r}")
        self.constant_epochs = int(constant_epochs)

    def __repr__(self):
        return (f"StepDecay(initial={self.initial}, factor={self.factor}, "
                f"constant_epochs={self.constant_epochs})")

    def __call__(self, epoch):
        """Return the learning rate of ``epoch`` (from 0)."""
        if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        return self.initial * self.factor ** max(0, int(epoch) + 1 - self.constant_epochs)

    def apply(self, optimizer, epoch):
        """Set ``optimizer.learning_rate`` to the rate of ``epoch`` and return it."""
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastlstm optimizer, got {type(optimizer).__name__}")
        optimizer.learning_rate = self(epoch)
        return optimizer.learning_rate
