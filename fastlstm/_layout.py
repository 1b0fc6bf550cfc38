"""Parameter layout shared by every backend and by the Python layer.

Dimension letters: L layers, T steps, B batch, I input width of layer 0, H hidden units, G = 4H gates.

Per layer l, in order, the flat parameter vector holds its kernel ``[I_l + H, G]`` (rows ``0..I_l-1``
multiply x, the next H rows multiply h) and then its bias ``[G]``, where ``I_0 = I`` and ``I_l = H`` for
l > 0. Gradients use the same layout.

Gate column blocks follow TensorFlow's BasicLSTMCell: i (input), j (candidate), f (forget), o (output).
"""

import math

import numpy as np

GATE_I = 0
GATE_J = 1
GATE_F = 2
GATE_O = 3


def layer_input_size(layer, input_size, hidden_size):
    """Return the input width of ``layer``: I for layer 0, H above it."""
    return input_size if layer == 0 else hidden_size


def layer_offsets(input_size, hidden_size, num_layers):
    """Return ``[(kernel_start, bias_start, layer_end), ...]``, one tuple per layer, in elements."""
    gates = 4 * hidden_size
    offsets = []
    start = 0
    for layer in range(num_layers):
        rows = layer_input_size(layer, input_size, hidden_size) + hidden_size
        bias_start = start + rows * gates
        end = bias_start + gates
        offsets.append((start, bias_start, end))
        start = end
    return offsets


def num_params(input_size, hidden_size, num_layers):
    """Return the length of the flat parameter vector."""
    return layer_offsets(input_size, hidden_size, num_layers)[-1][2]


CACHE_LINE = 64

# Arrays smaller than this come from np.empty unchanged. Aligning costs about 2 us per array, which
# a small model's call would feel (an echo-task call takes 20 to 45 us), and the kernels split only
# large arrays between threads.
ALIGN_MIN_BYTES = 16384


def aligned_empty(shape, dtype):
    """Return an uninitialised array of ``shape`` whose data starts on a 64-byte cache line.

    numpy aligns large arrays to 16 or 32 bytes only. The C kernels read and write rows in 64-byte
    vectors and split products between threads by rows or by column blocks. In an array that starts
    mid-line, with rows a multiple of 64 bytes long, every vector access straddles two lines and two
    threads write one line at each split. Arrays of fewer than ``ALIGN_MIN_BYTES`` bytes are plain
    ``np.empty`` arrays.
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < ALIGN_MIN_BYTES:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + CACHE_LINE, dtype=np.uint8)
    start = -raw.__array_interface__["data"][0] % CACHE_LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype):
    """Return a zeroed array like ``aligned_empty``'s."""
    array = aligned_empty(shape, dtype)
    array[...] = 0
    return array
