"""Argument checks for the Python boundary.

Every message names the argument, the expected value and the actual value. Shapes, sizes and values
raise ValueError; dtypes and types raise TypeError.
"""

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype_name(dtype):
    """Return the numpy dtype for ``dtype`` if it is float32 or float64, else raise TypeError."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved


def check_positive_int(name, value):
    """Return ``value`` as an int if it is an integer >= 1, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_finite_float(name, value):
    """Return ``value`` as a float if it is a finite real number, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_ndarray(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")


def check_float_input(name, array, dtype, ndim):
    """Return ``array`` converted to ``dtype`` if it is a float32/float64 array of rank ``ndim``.

    The result may be a copy: inputs are read only, so a copy changes nothing for the caller.
    """
    check_ndarray(name, array)
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32 or float64, got {array.dtype}; "
            f"convert it with {name}.astype(numpy.{dtype.name})"
        )
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=dtype)


def check_buffer(name, array, dtype, shape, writeable=True):
    """Check a buffer that a kernel writes in place: exact dtype and shape, C-contiguous, writeable.

    A buffer that fails is never copied, because the caller would keep a stale one.
    """
    check_ndarray(name, array)
    if array.dtype != dtype:
        hint = "; create it with model.zero_state(batch_size)" if name == "state" else ""
        raise TypeError(f"{name} must have the model's dtype {dtype.name}, got {array.dtype}{hint}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous because it is updated in place, got strides {array.strides}; "
            f"pass numpy.ascontiguousarray({name}) and keep that array"
        )
    if writeable and not array.flags.writeable:
        raise ValueError(f"{name} must be writeable because it is updated in place, got a read-only array")
    return array


def check_no_overlap(name, array, others):
    """Raise ValueError if ``array`` shares memory with any of the named arrays in ``others``."""
    for other_name, other in others:
        if other is not None and np.shares_memory(array, other):
            raise ValueError(f"{name} must not share memory with {other_name}")
