"""The echo task: reproduce a random bit series delayed by ``echo_step`` steps.

A series of ``length`` bits, each 1 with probability 0.5, is the input. The target is the input shifted
right by ``echo_step`` positions with its first ``echo_step`` targets set to 0. Both are reshaped
row-major to ``[B, length // B]``, so row b is the b-th contiguous fifth (for B = 5) of the series and
the rows are independent streams for truncated BPTT. A model that carries its state across windows
can predict every target of a row except the first ``echo_step``, whose input bits are in the row above.
"""

import copy

import numpy as np

from fastlstm import _checks

DEFAULT_LENGTH = 50000
DEFAULT_ECHO_STEP = 3
DEFAULT_BATCH_SIZE = 5


def _check_sizes(length, echo_step, batch_size):
    length = _checks.check_positive_int("length", length)
    if isinstance(echo_step, (bool, np.bool_)) or not isinstance(echo_step, (int, np.integer)):
        raise TypeError(f"echo_step must be a non-negative integer, got {echo_step!r}")
    echo_step = int(echo_step)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    if length % batch_size != 0:
        raise ValueError(
            f"length must be a multiple of batch_size = {batch_size} so that the series reshapes into "
            f"rows, got length = {length}"
        )
    if not 0 <= echo_step < length:
        raise ValueError(f"echo_step must be in [0, length = {length}), got {echo_step}")
    return length, echo_step, batch_size


def generate_series(rng, length=DEFAULT_LENGTH, echo_step=DEFAULT_ECHO_STEP, batch_size=DEFAULT_BATCH_SIZE,
                    dtype="float32"):
    """Draw one echo series from ``rng`` (a ``numpy.random.Generator``).

    Returns ``(x, y)``: x [B, length // B] of ``dtype`` with values 0 and 1, and y [B, length // B]
    int64 with ``y.ravel()[k] = x.ravel()[k - echo_step]`` for k >= echo_step and 0 before.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    length, echo_step, batch_size = _check_sizes(length, echo_step, batch_size)
    dtype = _checks.check_dtype_name(dtype)

    bits = rng.integers(0, 2, size=length, dtype=np.int64)
    targets = np.zeros(length, dtype=np.int64)
    targets[echo_step:] = bits[:length - echo_step]
    return bits.astype(dtype).reshape(batch_size, -1), targets.reshape(batch_size, -1)


class EchoTask:
    """A seeded stream of echo series, one per epoch.

    ``seed`` (an int, a ``numpy.random.SeedSequence`` or None for fresh entropy) is split into two
    independent generators. ``rng`` draws the training series in order. ``held_out_series()`` draws
    from the other, so the held-out data does not depend on how long training ran.
    """

    def __init__(self, length=DEFAULT_LENGTH, echo_step=DEFAULT_ECHO_STEP, batch_size=DEFAULT_BATCH_SIZE, *,
                 seed=None, dtype="float32"):
        self.length, self.echo_step, self.batch_size = _check_sizes(length, echo_step, batch_size)
        self.dtype = _checks.check_dtype_name(dtype)
        if isinstance(seed, np.random.SeedSequence):
            sequence = seed
        else:
            if seed is not None and (isinstance(seed, (bool, np.bool_))
                                     or not isinstance(seed, (int, np.integer)) or seed < 0):
                raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
            sequence = np.random.SeedSequence(seed)
        self.seed = sequence.entropy
        train_sequence, held_out_sequence = sequence.spawn(2)
        self.rng = np.random.Generator(np.random.PCG64(train_sequence))
        self._held_out_rng = np.random.Generator(np.random.PCG64(held_out_sequence))
        self._state_before_last_series = None

    def __repr__(self):
        return (f"EchoTask(length={self.length}, echo_step={self.echo_step}, batch_size={self.batch_size}, "
                f"seed={self.seed})")

    @property
    def columns(self):
        """Number of time steps in one row, length // B."""
        return self.length // self.batch_size

    def series(self):
        """Draw the next training series ``(x [B, N], y [B, N])`` from ``rng``."""
        self._state_before_last_series = copy.deepcopy(self.rng.bit_generator.state)
        return generate_series(self.rng, self.length, self.echo_step, self.batch_size, self.dtype)

    def held_out_series(self):
        """Draw a series from the held-out generator, which training never reads."""
        return generate_series(self._held_out_rng, self.length, self.echo_step, self.batch_size, self.dtype)

    def rng_state(self, repeat_last_series=False):
        """Return the generator state to save in a checkpoint.

        With ``repeat_last_series`` the state is the one before the last ``series()`` call, so that after
        ``set_rng_state`` the next ``series()`` returns that series again: use it when training stopped
        in the middle of a series. Otherwise the state is the current one.
        """
        if repeat_last_series:
            if self._state_before_last_series is None:
                raise ValueError("repeat_last_series=True needs an earlier series() call, but none was made")
            return copy.deepcopy(self._state_before_last_series)
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_rng_state(self, state):
        """Restore the training generator from a state returned by ``rng_state``."""
        if not isinstance(state, dict) or state.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise ValueError(
                f"state must be a {type(self.rng.bit_generator).__name__} state dict from rng_state(), "
                f"got {state!r:.200}"
            )
        self.rng.bit_generator.state = state
        self._state_before_last_series = None

    def accuracy_mask(self):
        """Return a bool [B, N] mask of the targets that a model can predict: column >= echo_step."""
        mask = np.ones((self.batch_size, self.columns), dtype=bool)
        mask[:, :self.echo_step] = False
        return mask
