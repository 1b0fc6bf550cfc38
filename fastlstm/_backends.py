"""Backend selection and the contract that every backend module implements.

A backend is a module with the kernel entry points below. The Python layer validates every argument
before it calls one, so a kernel may assume: every array is C-contiguous, writeable where written, and
of one floating dtype (float32 or float64) shared with ``params``; the shapes agree as listed; outputs
do not alias inputs. Shapes are time-major and use the letters of ``fastlstm._layout``.

Token ids. ``forward``, ``backward``, ``step`` and ``train_window`` take an optional last argument
``ids``: None (the default) means layer 0 reads x; otherwise ids is int64 token ids [T, B] ([B] for
``step``), x (and ``d_x`` in ``backward`` and ``train_window``) must be None, and the input size I is
the one implied by the length of params. An id k stands for the one-hot input e_k of width I, whose
product with layer 0's input kernel W[:I] is row k of it, so no one-hot matrix is formed: the input
projection is ``z = b + W[id]`` and backward adds ``dW[id] += dz`` (rows in order) and computes no
input gradient. An id outside [0, I) raises ValueError before any buffer is written (the C core
returns FL_EINVAL_ID, and the binding checks the ids before it calls the core).

``forward(params, x, state, gates, cs, hs, forget_bias, keep_tape, ids=None)``
    params [P] read; x [T, B, I] read; state [L, 2, B, H] read as the initial state and overwritten
    with the final state. With ``keep_tape`` true the tape is gates [L, T, B, G] (activations i, j, f, o
    after their nonlinearities), cs and hs [L, T + 1, B, H] (index 0 on the time axis is the initial
    state); all three are written. With ``keep_tape`` false the layers share one slot, so the leading
    dimension of gates, cs and hs is 1: layer l > 0 reads its input from hs[0, 1:] through the input
    projection before its time loop overwrites hs. After the call the top layer's outputs are
    hs[-1, 1:].

``backward(params, x, gates, cs, hs, d_y, d_final_state, grad, d_state, d_x, dz, d_hidden, ids=None)``
    Reads the tape of a ``keep_tape`` forward over the same params and x. d_y [T, B, H] read;
    d_final_state [L, 2, B, H] read, or None for zeros; grad [P] accumulated (+=, the caller zeroes
    it); d_state [L, 2, B, H] written with the gradient of the initial state; d_x [T, B, I] written;
    dz [T, B, G] and d_hidden [T, B, H] are scratch.

``step(params, x_t, state, gates, forget_bias, ids=None)``
    One time step through all layers: x_t [B, I] read; state [L, 2, B, H] updated in place; gates
    [B, G] scratch. The top layer's output is state[L - 1, 1] afterwards.

``softmax_xent(hidden, head_params, labels, probs, d_hidden, head_grad)``
    Dense layer plus softmax cross-entropy over N rows: hidden [N, H] read; head_params [H * C + C]
    read (a row-major kernel [H, C], then a bias [C]); labels [N] int64 in [0, C) read; probs [N, C]
    written with the softmax probabilities; d_hidden [N, H] written with the gradient of the mean loss;
    head_grad [H * C + C] accumulated (+=). Returns the mean loss over the N rows as a float.

``train_window(params, head_params, x, labels, state, gates, cs, hs, probs, d_y, grad, head_grad,
d_state, d_x, dz, d_hidden, forget_bias, optimizer, hyper, slots, head_slots, step, ids=None)``
    One fused truncated-BPTT training step: forward with the tape, ``softmax_xent`` on the top
    outputs, backward, optional clipping and the optimizer update of params and head_params in place.
    x [T, B, I] and labels [T, B] int64; state [L, 2, B, H] in place (final state, as in forward);
    probs [T, B, C] written; grad [P] and head_grad [H * C + C] are overwritten with this window's
    gradients (before clipping); d_y [T, B, H], d_state, d_x, dz and d_hidden are scratch of the
    shapes above. ``optimizer`` is 0 for SGD, 1 for Adagrad, 2 for Adam; ``hyper`` is float64
    [learning_rate, beta_1, beta_2, epsilon, clip_norm] where clip_norm <= 0 means no clipping, and
    clipping scales both gradients by clip_norm / max(global_norm, clip_norm) as TensorFlow's
    clip_by_global_norm does. ``slots`` [S, P] and ``head_slots`` [S, H * C + C] are the optimizer's
    state, S = 0 for SGD, 1 for Adagrad (the accumulator) and 2 for Adam (m, then v). ``step`` is
    Adam's update count including this one (1 on the first update). The updates are
    SGD ``w -= lr * g``; Adagrad (TensorFlow 1.x) ``acc += g * g; w -= lr * g / sqrt(acc)``; Adam
    (Keras) ``m += (g - m) * (1 - beta_1); v += (g * g - v) * (1 - beta_2);
    w -= lr * sqrt(1 - beta_2**step) / (1 - beta_1**step) * m / (sqrt(v) + epsilon)``.
    Returns the window's mean loss, computed before the update.
"""

import operator
import os
import re

BACKEND_NAMES = ("c", "numba")
_ENV_VARIABLE = "FASTLSTM_BACKEND"
_modules = {}
_failures = {}


def _load(name):
    if name in _modules:
        return _modules[name]
    if name in _failures:
        return None
    try:
        if name == "c":
            from fastlstm import _cext as module

            module.set_num_threads(_default_threads())
        else:
            from fastlstm import _numba_kernels as module
    except ImportError as error:
        _failures[name] = f"{type(error).__name__}: {error}"
        return None
    _modules[name] = module
    return module


def backends():
    """Report which backends can run here.

    Returns a dict mapping each backend name to ``{"available": bool, "reason": str, "row_kernel":
    bool}``. The reason is empty for an available backend and otherwise gives the error that
    stopped the import. ``row_kernel`` is True when the backend multiplies large weight matrices by
    its own AVX-512 row kernel (only C, and only on CPUs with AVX-512F); the C backend uses its slower
    portable kernel otherwise.
    """
    report = {}
    for name in BACKEND_NAMES:
        module = _load(name)
        available = module is not None
        row_kernel = bool(available and getattr(module, "row_kernel_available", lambda: False)())
        report[name] = {"available": available, "reason": "" if available else _failures[name],
                        "row_kernel": row_kernel}
    return report


def resolve_backend(name="auto"):
    """Return ``(name, module)`` for ``name``, ``FASTLSTM_BACKEND`` or the default, in that order.

    ``"auto"`` means the C extension when it imports, else Numba.
    """
    if name is None or name == "auto":
        name = os.environ.get(_ENV_VARIABLE, "auto") or "auto"
        source = f"environment variable {_ENV_VARIABLE}"
    else:
        source = "backend"
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(
            f"{source} must be one of 'auto', 'c', 'numba', got {name!r}"
        )
    if name == "auto":
        for candidate in BACKEND_NAMES:
            module = _load(candidate)
            if module is not None:
                return candidate, module
        raise ImportError(
            "no fastlstm backend can be loaded: "
            + "; ".join(f"{n}: {_failures[n]}" for n in BACKEND_NAMES)
        )
    module = _load(name)
    if module is None:
        raise ImportError(f"fastlstm backend {name!r} is not available: {_failures[name]}")
    return name, module


def _check_threads(threads, name):
    from fastlstm._cext import MAX_THREADS

    if isinstance(threads, bool):
        raise TypeError(f"{name} must be an int, got {threads!r}")
    try:
        value = operator.index(threads)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(threads).__name__} {threads!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{name} must be in [1, {MAX_THREADS}], got {value}")
    return value


def _default_threads():
    """Return FASTLSTM_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may run on.

    FASTLSTM_NUM_THREADS must be a whole number in [1, MAX_THREADS]. OMP_NUM_THREADS belongs to
    OpenMP, where "4,2" (one count per nesting level) and counts above fastlstm's limit are valid, so
    fastlstm takes its first count, caps it, and ignores a value it cannot read.
    """
    from fastlstm._cext import MAX_THREADS

    text = os.environ.get("FASTLSTM_NUM_THREADS", "").strip()
    if text:
        if not re.fullmatch(r"\+?[0-9]+", text) or not 1 <= int(text) <= MAX_THREADS:
            raise ValueError(f"environment variable FASTLSTM_NUM_THREADS must be a whole number in "
                             f"[1, {MAX_THREADS}], got {text!r}")
        return int(text)
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if re.fullmatch(r"\+?[0-9]+", first) and int(first) >= 1:
        return min(int(first), MAX_THREADS)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


def set_num_threads(threads):
    """Set how many threads the C backend's row kernel uses, the calling thread included.

    The threads split each large product and the cell by columns or rows, so the results are bitwise
    the same for every count. The default is ``FASTLSTM_NUM_THREADS``, else the first count of
    ``OMP_NUM_THREADS`` (at most 64), else the number of CPUs this process may run on. The setting is process-wide; a call made while
    another thread is inside a kernel runs on its calling thread alone. It has no effect on the Numba
    backend or on BLAS, whose threads ``threadpoolctl`` sets.
    """
    module = _load("c")
    if module is None:
        raise ImportError(f"fastlstm backend 'c' is not available: {_failures['c']}")
    module.set_num_threads(_check_threads(threads, "threads"))


def get_num_threads():
    """Return the C backend's thread count (see ``set_num_threads``), or 1 without the C backend."""
    module = _load("c")
    return 1 if module is None else module.get_num_threads()
