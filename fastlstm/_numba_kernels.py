"""Numba backend: the kernel entry points of the contract in ``fastlstm._backends``.

Dimension letters: L layers, T steps, B batch, I input width of layer 0, H hidden units, G = 4H gates,
C classes, N rows of the softmax head (T * B in a training window). Arrays are C-contiguous and
time-major; the Python layer has checked shapes, dtypes and aliasing before any call.

The entry points ``forward``, ``backward``, ``step``, ``softmax_xent`` and ``train_window`` are the
jitted functions themselves, so a call pays only Numba's dispatch and no Python wrapper. Each one
compiles once per dtype (float32, float64) and argument layout, and ``cache=True`` stores the machine
code in ``__pycache__``.

Products whose output rows are samples (inputs and states times the weights, gradients times the
transposed weights, the head's logits) run in this module's own loops, never in BLAS. Every output
element is one chain of multiply-adds in a fixed order, so a sample's result is bitwise independent
of the batch size and of its position in the batch. Large weights are packed once per call into column
panels and multiplied by register tiles (see ``_packed_add``). Only the weight gradients, sums over
all samples, go through BLAS (``np.dot`` with ``out=``, which Numba maps to scipy's OpenBLAS) when the
weight block is large. Their last bits can change with the number of BLAS threads.
"""

import llvmlite.ir
import numpy as np
from numba import config, njit, types
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from fastlstm._layout import GATE_F, GATE_I, GATE_J, GATE_O

# LLVM may fuse multiply-adds ('contract'), which keeps NaN and Inf semantics, unlike fastmath=True,
# which also assumes that no NaN or Inf ever occurs. 'reassoc' is left out on purpose: it would let
# LLVM regroup the products in _cell_backward, whose order keeps a huge c_prev from making inf * 0.
FASTMATH = {"contract"}

# A weight gradient [K, N] with at least this many elements is summed through BLAS, a smaller one by
# direct loops. Measured for [B, K] @ [K, 4K] on a Skylake-X core with scipy's OpenBLAS 0.3.30: a BLAS
# call from Numba costs about 0.1 us; at B = 5, BLAS took 80% of the loops' time at 512 weights and a
# third of it from 1024 to 4096.
BLAS_MIN_WEIGHTS = 1024

# A weight block of at least TILE_MIN_WEIGHTS elements is packed and multiplied in register tiles of
# _TILE_ROWS x _TILE_COLUMNS outputs, a smaller one row by row on the unpacked weights. Both compute
# each element by the same chain, so the choice changes no bit. Of the tile shapes tried (4 x 16,
# 6 x 16, 8 x 16, 3 x 32, 4 x 32, 6 x 32), 6 x 16 was the fastest. On products of 24 and 72 rows with
# K from 200 to 656 on a Skylake-X core it reached 82 to 94 GFLOP/s in float32 and 46 to 50 in
# float64.
# bench/numba_tiles.py compares them with OpenBLAS.
#
# Rows decide too, because packing costs about as much as multiplying one or two rows, and fewer than
# 6 rows fill a tile padded with zero rows (H = 256 and 512, float32):
# - products through the transposed weights use tiles at any row count: their row path is a dot
#   product, which LLVM cannot vectorize without reordering the sum, and took 8 to 37 times longer;
# - the time loops, which pack once for all T steps, use tiles from _LOOP_TILE_MIN_ROWS rows: at 2 to 5
#   rows a padded tile took 15 to 75 % less time than the row loops, at 1 row about twice as long;
# - a single product, which packs for itself, uses tiles from _TILE_ROWS rows.
TILE_MIN_WEIGHTS = 1024
_TILE_ROWS = 6
_TILE_COLUMNS = 16
_TILE_SIZE = _TILE_ROWS * _TILE_COLUMNS
_LOOP_TILE_MIN_ROWS = 2
# _packed_add runs all panels over chunks of this many rows, whose piece of x ([192, K], 384 KiB for
# K = 512 in float32) stays in the L2 cache while the weights stream past.
_CHUNK_ROWS = 32 * _TILE_ROWS

# error_model="numpy": a float division by zero gives Inf or NaN as in numpy instead of raising
# ZeroDivisionError. Numba's default ("python") tests every divisor, and that branch also keeps loops
# from vectorizing.
_JIT_OPTIONS = {"cache": True, "nogil": True, "fastmath": FASTMATH, "error_model": "numpy"}

_OPTIMIZER_SGD = 0
_OPTIMIZER_ADAGRAD = 1
_OPTIMIZER_ADAM = 2


@njit(**_JIT_OPTIONS)
def _use_blas(rows, cols):
    return rows * cols >= BLAS_MIN_WEIGHTS


@njit(**_JIT_OPTIONS)
def _large_weights(inner, cols):
    return inner * cols >= TILE_MIN_WEIGHTS


@njit(**_JIT_OPTIONS)
def _use_tiles(rows, inner, cols):
    return rows >= _TILE_ROWS and _large_weights(inner, cols)


# Rows of the per-column coefficients of the gate activations, see _gate_coefficients.
_PRE_SCALE = 0
_PRE_SHIFT = 1
_POST_SCALE = 2
_POST_SHIFT = 3


# A float32 tanh that LLVM can vectorize, because libm's tanhf is an opaque call made one element at
# a time. Below _TANH_SMALL it is the Taylor series of tanh up to x**17, whose first omitted term is
# below 6e-9 relative there. Above it, tanh(|x|) = 1 - 2 / (exp(2|x|) + 1), with exp(y) = 2**n * exp(r),
# n = round(y / ln 2), r reduced in two parts (Cody and Waite) and exp(r) by its Taylor series up to
# r**7. Against float64 tanh on 6e7 float32 inputs in [-10, 10] and a log grid down to 1e-40, the
# error was at most 1.6 ulp (test_numba_kernels.py checks 2 ulp).
_F32 = np.float32
_TANH_SMALL = _F32(0.55)
_TANH_T3 = _F32(-1 / 3)
_TANH_T5 = _F32(2 / 15)
_TANH_T7 = _F32(-17 / 315)
_TANH_T9 = _F32(62 / 2835)
_TANH_T11 = _F32(-1382 / 155925)
_TANH_T13 = _F32(21844 / 6081075)
_TANH_T15 = _F32(-929569 / 638512875)
_TANH_T17 = _F32(6404582 / 10854718875)
# exp(2|x|) is only needed up to 2|x| = 40, where 2 / (exp(40) + 1) is far below float32's epsilon.
_EXP_MAX_ARGUMENT = _F32(40.0)
_LOG2_E = _F32(1.4426950408889634)
# ln 2 = _LN2_HIGH + _LN2_LOW, where _LN2_HIGH has 9 significant bits so n * _LN2_HIGH is exact.
_LN2_HIGH = _F32(0.693359375)
_LN2_LOW = _F32(-2.12194440e-4)
_EXP_C2 = _F32(1 / 2)
_EXP_C3 = _F32(1 / 6)
_EXP_C4 = _F32(1 / 24)
_EXP_C5 = _F32(1 / 120)
_EXP_C6 = _F32(1 / 720)
_EXP_C7 = _F32(1 / 5040)


@njit(**_JIT_OPTIONS)
def _tanh_float32(x):
    zero = _F32(0.0)
    one = _F32(1.0)
    two = _F32(2.0)
    half = _F32(0.5)
    magnitude = np.abs(x)

    # Small |x|: odd Taylor polynomial. Large inputs are replaced by 0 so that x * x cannot overflow.
    small_x = x if magnitude < _TANH_SMALL else zero
    x2 = small_x * small_x
    series = _TANH_T15 + x2 * _TANH_T17
    series = _TANH_T13 + x2 * series
    series = _TANH_T11 + x2 * series
    series = _TANH_T9 + x2 * series
    series = _TANH_T7 + x2 * series
    series = _TANH_T5 + x2 * series
    series = _TANH_T3 + x2 * series
    small = small_x + small_x * x2 * series

    # Large |x|: 1 - 2 / (exp(y) + 1) with y = 2|x|. NaN and Inf are clamped here and fixed below.
    y = two * magnitude
    y = y if y <= _EXP_MAX_ARGUMENT else _EXP_MAX_ARGUMENT
    n = np.floor(y * _LOG2_E + half)
    r = (y - n * _LN2_HIGH) - n * _LN2_LOW
    poly = _EXP_C6 + r * _EXP_C7
    poly = _EXP_C5 + r * poly
    poly = _EXP_C4 + r * poly
    poly = _EXP_C3 + r * poly
    poly = _EXP_C2 + r * poly
    poly = one + r * poly
    poly = one + r * poly
    exp_y = poly * _F32(np.int64(1) << np.int64(n))
    large = one - two / (exp_y + one)
    large = large if x >= zero else -large

    result = small if magnitude < _TANH_SMALL else large
    return result if x == x else x


def _tanh(x):
    """Return tanh(x): _tanh_float32 for float32, libm's tanh for float64.

    Jitted code gets the overload below, which picks the function by type at compile time. This
    Python body runs only with NUMBA_DISABLE_JIT=1.
    """
    if isinstance(x, np.float32):
        return _tanh_float32(x)
    return np.tanh(x)


@overload(_tanh, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _overload_tanh(x):
    if x == types.float32:
        return lambda x: _tanh_float32(x)
    return lambda x: np.tanh(x)


@njit(**_JIT_OPTIONS)
def _tanh_array(values, out):
    """out = tanh(values), elementwise. values and out [M] (may be the same array)."""
    for e in range(values.shape[0]):
        out[e] = _tanh(values[e])


@njit(**_JIT_OPTIONS)
def _gate_coefficients(hidden, forget_bias, dtype_like):
    """Return [4, G] coefficients with activation = tanh(z * pre_scale + pre_shift) * post_scale + post_shift.

    sigmoid(v) = 0.5 * tanh(0.5 * v) + 0.5 for the gates i, f and o (f with v = z + forget_bias),
    and plain tanh for j. Halving is exact, so 0.5 * z + 0.5 * forget_bias rounds like
    0.5 * (z + forget_bias). The sigmoid stays in [0, 1] and cannot overflow. dtype_like is any
    array of the result's dtype.
    """
    num_gates = 4 * hidden
    half = dtype_like.dtype.type(0.5)
    coefficients = np.empty((4, num_gates), dtype=dtype_like.dtype)
    for g in range(num_gates):
        coefficients[_PRE_SCALE, g] = half
        coefficients[_PRE_SHIFT, g] = 0.0
        coefficients[_POST_SCALE, g] = half
        coefficients[_POST_SHIFT, g] = half
    for k in range(hidden):
        coefficients[_PRE_SHIFT, GATE_F * hidden + k] = half * dtype_like.dtype.type(forget_bias)
        coefficients[_PRE_SCALE, GATE_J * hidden + k] = 1.0
        coefficients[_POST_SCALE, GATE_J * hidden + k] = 1.0
        coefficients[_POST_SHIFT, GATE_J * hidden + k] = 0.0
    return coefficients


# Matrix products. The ones with a row per sample compute out[r, n] = start + x[r, 0] * w[0, n] +
# x[r, 1] * w[1, n] + ... in that order, one multiply-add at a time, on the tile path and on the row
# path alike.


if config.DISABLE_JIT:
    def _stack_array(like, size):
        return np.empty(size, dtype=like.dtype)
else:
    @intrinsic(prefer_literal=True)
    def _stack_array(typingctx, like, size):
        """Return an array of ``size`` (a constant) elements of like's dtype in the caller's stack frame.

        A tile's sums live there rather than in a heap array, because LLVM keeps a fixed-size stack
        array indexed by constants in vector registers. With a heap array every multiply-add went
        through memory, at a third of the speed. The array must not outlive the calling function.
        """
        if not isinstance(size, types.IntegerLiteral):
            return None
        array_type = types.Array(like.dtype, 1, "C")
        count = size.literal_value

        def codegen(context, builder, signature, args):
            element = context.get_value_type(like.dtype)
            with builder.goto_entry_block():
                data = builder.alloca(llvmlite.ir.ArrayType(element, count))
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
            array = make_array(array_type)(context, builder)
            populate_array(array, data=builder.bitcast(data, element.as_pointer()),
                           shape=[context.get_constant(types.intp, count)], strides=[itemsize],
                           itemsize=itemsize, meminfo=None)
            return array._getvalue()

        return array_type(like, size), codegen


@njit(**_JIT_OPTIONS)
def _packed_shape(inner, cols):
    return ((cols + _TILE_COLUMNS - 1) // _TILE_COLUMNS, inner, _TILE_COLUMNS)


@njit(**_JIT_OPTIONS)
def _pack(w, packed):
    """packed[p, k, j] = w[k, p * _TILE_COLUMNS + j], and 0 past w's last column.

    w [K, N] read, any strides (a transposed view packs the transpose); packed [ceil(N / 16), K, 16]
    written.
    """
    inner, cols = w.shape
    zero = packed.dtype.type(0.0)
    for panel in range(packed.shape[0]):
        first = panel * _TILE_COLUMNS
        width = min(_TILE_COLUMNS, cols - first)
        for k in range(inner):
            for j in range(width):
                packed[panel, k, j] = w[k, first + j]
            for j in range(width, _TILE_COLUMNS):
                packed[panel, k, j] = zero


@njit(**_JIT_OPTIONS)
def _packed_add(x, packed, out):
    """out += x @ w, with w given as packed by ``_pack``.

    x [M, K] read; packed [ceil(N / 16), K, 16] read; out [M, N] read and written.

    Rows go in tiles of 6, and the M % 6 rows left over in a zero-padded copy of 6 rows, because
    tiles of fewer rows compiled to scalar code. Full panels of 16 columns run through ``_tile``, a
    partial last panel row by row. Each sum starts from out and adds x[r, k] * w[k, n] for
    k = 0, 1, ... in every case.
    """
    rows, inner = x.shape
    cols = out.shape[1]
    tiled = rows - rows % _TILE_ROWS
    rest = rows - tiled
    x_rest = np.zeros((_TILE_ROWS if rest > 0 else 0, inner), dtype=out.dtype)
    out_rest = np.zeros((_TILE_ROWS if rest > 0 else 0, cols), dtype=out.dtype)
    x_rest[:rest] = x[tiled:]
    out_rest[:rest] = out[tiled:]

    # The last chunk takes the padded rows along, so that the weights stream past once per chunk.
    chunk_start = 0
    while True:
        chunk_end = min(chunk_start + _CHUNK_ROWS, tiled)
        if chunk_end < tiled:
            _packed_add_rows(x[chunk_start:chunk_end], packed, out[chunk_start:chunk_end],
                             x_rest[:0], out_rest[:0])
        else:
            _packed_add_rows(x[chunk_start:chunk_end], packed, out[chunk_start:chunk_end], x_rest,
                             out_rest)
            break
        chunk_start = chunk_end
    out[tiled:] = out_rest[:rest]


@njit(**_JIT_OPTIONS)
def _packed_add_rows(x, packed, out, x_rest, out_rest):
    # One chunk of _packed_add, whose rows stay in cache while the panels of w stream past.
    # x [M, K] with M a multiple of 6, x_rest [6, K] or [0, K]; out [M, N] and out_rest [6 or 0, N].
    cols = out.shape[1]
    for panel in range(cols // _TILE_COLUMNS):
        weights = packed[panel]
        for r in range(0, x.shape[0], _TILE_ROWS):
            _tile(x, r, weights, out, panel * _TILE_COLUMNS)
        if x_rest.shape[0] > 0:
            _tile(x_rest, 0, weights, out_rest, panel * _TILE_COLUMNS)

    # A partial last panel, row by row on its zero-padded weights.
    first = cols - cols % _TILE_COLUMNS
    if first < cols:
        weights = packed[first // _TILE_COLUMNS, :, :cols - first]
        _rows_add(x, weights, out[:, first:])
        _rows_add(x_rest, weights, out_rest[:, first:])


@njit(**_JIT_OPTIONS)
def _tile(x, r, weights, out, first):
    """out[r:r + 6, first:first + 16] += x[r:r + 6] @ weights, the 96 sums held in registers.

    x [M, K] read; weights [K, 16] read (one packed panel); out [M, N] read and written.
    """
    tile = _stack_array(x, _TILE_SIZE)
    for q in range(_TILE_SIZE):
        tile[q] = out[r + q // _TILE_COLUMNS, first + q % _TILE_COLUMNS]
    for k in range(x.shape[1]):
        x_0 = x[r, k]
        x_1 = x[r + 1, k]
        x_2 = x[r + 2, k]
        x_3 = x[r + 3, k]
        x_4 = x[r + 4, k]
        x_5 = x[r + 5, k]
        for j in range(_TILE_COLUMNS):
            w_kj = weights[k, j]
            tile[j] += x_0 * w_kj
            tile[_TILE_COLUMNS + j] += x_1 * w_kj
            tile[2 * _TILE_COLUMNS + j] += x_2 * w_kj
            tile[3 * _TILE_COLUMNS + j] += x_3 * w_kj
            tile[4 * _TILE_COLUMNS + j] += x_4 * w_kj
            tile[5 * _TILE_COLUMNS + j] += x_5 * w_kj
    for q in range(_TILE_SIZE):
        out[r + q // _TILE_COLUMNS, first + q % _TILE_COLUMNS] = tile[q]


@njit(**_JIT_OPTIONS)
def _rows_add(x, w, out):
    """out += x @ w row by row on the unpacked weights.

    x [M, K] read; w [K, N] read; out [M, N] read and written.
    """
    rows, inner = x.shape
    cols = w.shape[1]
    for r in range(rows):
        for k in range(inner):
            x_rk = x[r, k]
            for n in range(cols):
                out[r, n] += x_rk * w[k, n]


@njit(**_JIT_OPTIONS)
def _product_add(x, w, out):
    """out += x @ w, packing w first when the product is large enough to repay it.

    x [M, K] read; w [K, N] read, any strides; out [M, N] read and written.
    """
    rows, inner = x.shape
    cols = w.shape[1]
    if _use_tiles(rows, inner, cols):
        packed = np.empty(_packed_shape(inner, cols), dtype=out.dtype)
        _pack(w, packed)
        _packed_add(x, packed, out)
    else:
        _rows_add(x, w, out)


@njit(**_JIT_OPTIONS)
def _matmul_bias(x, w, bias, out):
    """out = bias + x @ w.

    x [M, K] read; w [K, N] read; bias [N] read; out [M, N] written.
    """
    rows = x.shape[0]
    for r in range(rows):
        out[r] = bias
    _product_add(x, w, out)


@njit(**_JIT_OPTIONS)
def _matmul_transposed(dz, w, out):
    """out = dz @ w.T.

    dz [M, N] read; w [K, N] read; out [M, K] written.
    """
    rows, cols = dz.shape
    inner = w.shape[0]
    if _large_weights(cols, inner):
        packed = np.empty(_packed_shape(cols, inner), dtype=out.dtype)
        _pack(w.T, packed)
        out[:] = 0.0
        _packed_add(dz, packed, out)
    else:
        # The same chain as the tile path, 0 + dz[r, 0] * w[k, 0] + dz[r, 1] * w[k, 1] + ..., as a
        # sum over the contiguous rows of w.
        zero = out.dtype.type(0.0)
        for r in range(rows):
            for k in range(inner):
                total = zero
                for n in range(cols):
                    total += dz[r, n] * w[k, n]
                out[r, k] = total


@njit(**_JIT_OPTIONS)
def _add_weight_gradient(x, dz, d_w):
    """d_w += x.T @ dz.

    x [M, K] read; dz [M, N] read; d_w [K, N] accumulated.
    """
    rows, inner = x.shape
    cols = dz.shape[1]
    if _use_blas(inner, cols):
        product = np.empty_like(d_w)
        # product = x.T @ dz
        np.dot(x.T, dz, product)
        for k in range(inner):
            for n in range(cols):
                d_w[k, n] += product[k, n]
    else:
        for r in range(rows):
            for k in range(inner):
                x_rk = x[r, k]
                for n in range(cols):
                    d_w[k, n] += x_rk * dz[r, n]


@njit(**_JIT_OPTIONS)
def _add_column_sums(dz, d_b):
    """d_b += dz.sum(axis=0).

    dz [M, N] read; d_b [N] accumulated.
    """
    rows, cols = dz.shape
    for r in range(rows):
        for n in range(cols):
            d_b[n] += dz[r, n]


# The cell, forward and backward.


@njit(**_JIT_OPTIONS)
def _cell_forward(z, c_prev, c, h, coefficients):
    """One pointwise LSTM step for B rows.

    z [B, G] read as the pre-activations and overwritten with the activations i, j, f, o (saved for
    backward); c_prev [B, H] read; c and h [B, H] written, where c may be c_prev (updated in place);
    coefficients [4, G] read, from _gate_coefficients.
    """
    batch, hidden = c.shape
    num_gates = 4 * hidden
    pre_scale = coefficients[_PRE_SCALE]
    pre_shift = coefficients[_PRE_SHIFT]
    post_scale = coefficients[_POST_SCALE]
    post_shift = coefficients[_POST_SHIFT]
    offset_i = GATE_I * hidden
    offset_j = GATE_J * hidden
    offset_f = GATE_F * hidden
    offset_o = GATE_O * hidden

    # i, f, o = sigmoid(z_i), sigmoid(z_f + forget_bias), sigmoid(z_o); j = tanh(z_j). The loop runs
    # over all G columns of a row, so it vectorizes even for a small H.
    for b in range(batch):
        for g in range(num_gates):
            z[b, g] = _tanh(z[b, g] * pre_scale[g] + pre_shift[g]) * post_scale[g] + post_shift[g]

    # c = c_prev * f + i * j
    for b in range(batch):
        for k in range(hidden):
            c[b, k] = c_prev[b, k] * z[b, offset_f + k] + z[b, offset_i + k] * z[b, offset_j + k]

    # h = tanh(c) * o, with tanh over the B * H contiguous elements.
    _tanh_array(c.reshape(batch * hidden), h.reshape(batch * hidden))
    for b in range(batch):
        for k in range(hidden):
            h[b, k] *= z[b, offset_o + k]


@njit(**_JIT_OPTIONS)
def _cell_backward(acts, c_prev, c, d_out, d_c, d_h, dz, tanh_c):
    """Gate gradients of one step for B rows.

    acts [B, G] read (i, j, f, o from the forward); c_prev and c [B, H] read (cell state before and
    after the step); d_out [B, H] read (gradient of this step's output from above); d_c [B, H] read as
    the gradient of c and overwritten with that of c_prev; d_h [B, H] read (gradient of h from step
    t + 1); dz [B, G] written with the gradient of the pre-activations; tanh_c [B, H] scratch.
    """
    batch, hidden = c.shape
    one = c.dtype.type(1.0)
    offset_i = GATE_I * hidden
    offset_j = GATE_J * hidden
    offset_f = GATE_F * hidden
    offset_o = GATE_O * hidden
    _tanh_array(c.reshape(batch * hidden), tanh_c.reshape(batch * hidden))
    for b in range(batch):
        for k in range(hidden):
            gate_i = acts[b, offset_i + k]
            gate_j = acts[b, offset_j + k]
            gate_f = acts[b, offset_f + k]
            gate_o = acts[b, offset_o + k]
            tanh_ck = tanh_c[b, k]
            # h = tanh(c) * o and c = c_prev * f + i * j. Each sigmoid derivative s * (1 - s) is
            # formed first: it is exactly 0 where the gate saturates, so a huge c_prev or dc
            # cannot make inf * 0 in float32.
            dh = d_out[b, k] + d_h[b, k]
            dc = d_c[b, k] + dh * gate_o * (one - tanh_ck * tanh_ck)
            dz[b, offset_i + k] = dc * gate_j * (gate_i * (one - gate_i))
            dz[b, offset_j + k] = dc * gate_i * (one - gate_j * gate_j)
            dz[b, offset_f + k] = dc * (c_prev[b, k] * (gate_f * (one - gate_f)))
            dz[b, offset_o + k] = dh * tanh_ck * (gate_o * (one - gate_o))
            d_c[b, k] = dc * gate_f


@njit(**_JIT_OPTIONS)
def _layer_start(layer, input_size, hidden_size):
    # Offset of a layer's kernel in the flat parameter vector (see fastlstm._layout).
    gates = 4 * hidden_size
    first = (input_size + hidden_size) * gates + gates
    if layer == 0:
        return 0
    return first + (layer - 1) * (2 * hidden_size * gates + gates)


@njit(**_JIT_OPTIONS)
def _input_size_from_params(num_params, num_layers, hidden_size):
    # I from the length of the flat vector: (I + H) G + G for layer 0, 2 H G + G per layer above.
    gates = 4 * hidden_size
    rest = num_params - gates - (num_layers - 1) * (2 * hidden_size * gates + gates)
    return rest // gates - hidden_size


@njit(**_JIT_OPTIONS)
def _check_ids(ids, input_size):
    # Raise ValueError unless every id lies in [0, I), before any buffer is written.
    flat = ids.reshape(ids.size)
    for k in range(flat.shape[0]):
        if flat[k] < 0 or flat[k] >= input_size:
            raise ValueError("ids must be in [0, I), where I is the model's input size")


@njit(**_JIT_OPTIONS)
def _gather_rows(ids, w, bias, out):
    """out = w[ids] + bias, the product onehot(ids) @ w + bias without the one-hot matrix.

    ids [M] int64 read (in [0, K)); w [K, N] read; bias [N] read; out [M, N] written.
    """
    rows = ids.shape[0]
    cols = w.shape[1]
    for r in range(rows):
        row = ids[r]
        for n in range(cols):
            out[r, n] = bias[n] + w[row, n]


@njit(**_JIT_OPTIONS)
def _scatter_add_rows(ids, dz, d_w):
    """d_w[ids] += dz row by row, in row order: onehot(ids).T @ dz.

    ids [M] int64 read; dz [M, N] read; d_w [K, N] accumulated.
    """
    rows, cols = dz.shape
    for r in range(rows):
        row = ids[r]
        for n in range(cols):
            d_w[row, n] += dz[r, n]


# Entry points. Each takes an optional ``ids`` argument: int64 token ids [T, B] ([B] for ``step``) that
# replace x for layer 0, in which case x (and d_x) are None and I is read from the length of params.
# Numba compiles the ids and the x variant separately. It prunes a branch only when its test compares
# an argument that is None (or omitted) with None, so the two variants sit in separate
# ``if x is not None`` and ``if ids is not None`` blocks rather than in one if/else, and the sizes are
# read from arrays that both variants have.


@njit(**_JIT_OPTIONS)
def forward(params, x, state, gates, cs, hs, forget_bias, keep_tape, ids=None):
    """Run all layers over x and leave the final state in ``state``.

    params [P] read; x [T, B, I] read, or None with ids [T, B] int64 read (z = W[ids] + b for layer 0;
    ValueError for an id outside [0, I) before anything is written); state [L, 2, B, H] read as the
    initial state, then overwritten with the final state. gates [S, T, B, G], cs and hs [S, T + 1, B, H]
    written, where S = L with ``keep_tape`` (the tape for backward) and S = 1 without, in which case
    every layer uses slot 0. The top layer's outputs end up in hs[-1, 1:].
    """
    num_layers = state.shape[0]
    hidden = state.shape[3]
    num_gates = 4 * hidden
    steps, batch = gates.shape[1], gates.shape[2]
    input_size = _input_size_from_params(params.shape[0], num_layers, hidden)
    if ids is not None:
        _check_ids(ids, input_size)
    coefficients = _gate_coefficients(hidden, forget_bias, params)
    recurrent_tiles = batch >= _LOOP_TILE_MIN_ROWS and _large_weights(hidden, num_gates)
    recurrent_packed = np.empty(_packed_shape(hidden, num_gates) if recurrent_tiles else (0, 0, 0),
                                dtype=params.dtype)

    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else hidden
        start = _layer_start(layer, input_size, hidden)
        bias_start = start + (layer_input + hidden) * num_gates
        kernel = params[start:bias_start].reshape((layer_input + hidden, num_gates))
        recurrent = kernel[layer_input:]
        bias = params[bias_start:bias_start + num_gates]
        slot = layer if keep_tape else 0
        below = layer - 1 if keep_tape else 0
        z = gates[slot]

        # Input projection for all T steps: z = X @ W[:I_l] + b. Without the tape, layer l > 0
        # reads its input from slot 0 here, before the time loop overwrites it.
        z_rows = z.reshape((steps * batch, num_gates))
        if layer == 0:
            if x is not None:
                _matmul_bias(x.reshape((steps * batch, input_size)), kernel[:layer_input], bias, z_rows)
            if ids is not None:
                _gather_rows(ids.reshape(steps * batch), kernel[:layer_input], bias, z_rows)
        else:
            _matmul_bias(hs[below, 1:].reshape((steps * batch, hidden)), kernel[:layer_input], bias,
                         z_rows)

        # Time loop: z_t += h_{t-1} @ W[I_l:], then the pointwise cell. Large recurrent weights are
        # packed once for all T steps.
        if recurrent_tiles:
            _pack(recurrent, recurrent_packed)
        cs[slot, 0] = state[layer, 0]
        hs[slot, 0] = state[layer, 1]
        for t in range(steps):
            if recurrent_tiles:
                _packed_add(hs[slot, t], recurrent_packed, z[t])
            else:
                _rows_add(hs[slot, t], recurrent, z[t])
            _cell_forward(z[t], cs[slot, t], cs[slot, t + 1], hs[slot, t + 1], coefficients)

        state[layer, 0] = cs[slot, steps]
        state[layer, 1] = hs[slot, steps]


@njit(**_JIT_OPTIONS)
def backward(params, x, gates, cs, hs, d_y, d_final_state, grad, d_state, d_x, dz, d_hidden, ids=None):
    """Back-propagate through the tape of ``forward(..., keep_tape=True)``, top layer first.

    params [P] read; x [T, B, I] read, or None with ids [T, B] int64 read (then dW[ids] += dz for
    layer 0's input rows, and d_x is None because ids have no gradient); gates [L, T, B, G], cs and
    hs [L, T + 1, B, H] read (the tape); d_y [T, B, H] read (gradient of the top outputs);
    d_final_state [L, 2, B, H] read, or None for zeros; grad [P] accumulated (+=, the caller zeroes
    it); d_state [L, 2, B, H] written with the gradient of the initial state, and used as the running
    (dc, dh) carry; d_x [T, B, I] written; dz [T, B, G] scratch (one layer's pre-activation
    gradients); d_hidden [T, B, H] scratch (the output gradient handed from a layer to the one below).
    """
    num_layers = gates.shape[0]
    hidden = hs.shape[3]
    num_gates = 4 * hidden
    steps, batch = gates.shape[1], gates.shape[2]
    input_size = _input_size_from_params(params.shape[0], num_layers, hidden)
    if ids is not None:
        _check_ids(ids, input_size)
    dz_rows = dz.reshape((steps * batch, num_gates))
    tanh_c = np.empty((batch, hidden), dtype=params.dtype)
    recurrent_tiles = _large_weights(num_gates, hidden)
    recurrent_packed = np.empty(_packed_shape(num_gates, hidden) if recurrent_tiles else (0, 0, 0),
                                dtype=params.dtype)

    for layer in range(num_layers - 1, -1, -1):
        layer_input = input_size if layer == 0 else hidden
        start = _layer_start(layer, input_size, hidden)
        bias_start = start + (layer_input + hidden) * num_gates
        kernel = params[start:bias_start].reshape((layer_input + hidden, num_gates))
        recurrent = kernel[layer_input:]
        d_kernel = grad[start:bias_start].reshape((layer_input + hidden, num_gates))
        d_bias = grad[bias_start:bias_start + num_gates]
        d_c = d_state[layer, 0]
        d_h = d_state[layer, 1]
        if d_final_state is None:
            d_c[:] = 0.0
            d_h[:] = 0.0
        else:
            d_c[:] = d_final_state[layer, 0]
            d_h[:] = d_final_state[layer, 1]

        # Time loop, reversed: dz_t from the cell, then dh_{t-1} = dz_t @ W[I_l:].T, with large
        # recurrent weights packed transposed once for all T steps.
        if recurrent_tiles:
            _pack(recurrent.T, recurrent_packed)
        for t in range(steps - 1, -1, -1):
            if layer == num_layers - 1:
                _cell_backward(gates[layer, t], cs[layer, t], cs[layer, t + 1], d_y[t], d_c, d_h, dz[t],
                               tanh_c)
            else:
                _cell_backward(gates[layer, t], cs[layer, t], cs[layer, t + 1], d_hidden[t], d_c, d_h,
                               dz[t], tanh_c)
            if recurrent_tiles:
                d_h[:] = 0.0
                _packed_add(dz[t], recurrent_packed, d_h)
            else:
                _matmul_transposed(dz[t], recurrent, d_h)

        # Weight gradients for all steps: dW[:I_l] += X.T @ dZ, dW[I_l:] += H_prev.T @ dZ,
        # db += dZ summed over rows.
        if layer == 0:
            if x is not None:
                _add_weight_gradient(x.reshape((steps * batch, input_size)), dz_rows, d_kernel[:layer_input])
            if ids is not None:
                _scatter_add_rows(ids.reshape(steps * batch), dz_rows, d_kernel[:layer_input])
        else:
            _add_weight_gradient(hs[layer - 1, 1:].reshape((steps * batch, hidden)), dz_rows,
                                 d_kernel[:layer_input])
        _add_weight_gradient(hs[layer, 0:steps].reshape((steps * batch, hidden)), dz_rows,
                             d_kernel[layer_input:])
        _add_column_sums(dz_rows, d_bias)

        # Input gradient dX = dZ @ W[:I_l].T: the output gradient of the layer below, or d_x. Token
        # ids have none.
        if layer == 0:
            if d_x is not None:
                _matmul_transposed(dz_rows, kernel[:layer_input], d_x.reshape((steps * batch, input_size)))
        else:
            _matmul_transposed(dz_rows, kernel[:layer_input], d_hidden.reshape((steps * batch, hidden)))


@njit(**_JIT_OPTIONS)
def step(params, x_t, state, gates, forget_bias, ids=None):
    """Advance every layer by one time step, updating ``state`` in place.

    params [P] read; x_t [B, I] read, or None with ids [B] int64 read; state [L, 2, B, H] read and
    overwritten; gates [B, G] scratch. The top layer's output is state[L - 1, 1] afterwards.
    """
    num_layers = state.shape[0]
    hidden = state.shape[3]
    num_gates = 4 * hidden
    batch = state.shape[2]
    input_size = _input_size_from_params(params.shape[0], num_layers, hidden)
    if ids is not None:
        _check_ids(ids, input_size)
    coefficients = _gate_coefficients(hidden, forget_bias, params)

    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else hidden
        start = _layer_start(layer, input_size, hidden)
        bias_start = start + (layer_input + hidden) * num_gates
        kernel = params[start:bias_start].reshape((layer_input + hidden, num_gates))
        bias = params[bias_start:bias_start + num_gates]
        # z = [x_t, h_{t-1}] @ W + b, where x_t of layer l > 0 is the new h of layer l - 1.
        if layer == 0:
            if x_t is not None:
                _matmul_bias(x_t, kernel[:layer_input], bias, gates)
            if ids is not None:
                _gather_rows(ids, kernel[:layer_input], bias, gates)
        else:
            _matmul_bias(state[layer - 1, 1], kernel[:layer_input], bias, gates)
        _product_add(state[layer, 1], kernel[layer_input:], gates)
        _cell_forward(gates, state[layer, 0], state[layer, 0], state[layer, 1], coefficients)


@njit(**_JIT_OPTIONS)
def softmax_xent(hidden, head_params, labels, probs, d_hidden, head_grad):
    """Apply a dense layer and softmax cross-entropy to N rows; return the mean loss.

    hidden [N, H] read; head_params [H * C + C] read (kernel [H, C], then bias [C]); labels [N] int64
    read; probs [N, C] written with the softmax probabilities; d_hidden [N, H] written with the
    gradient of the mean loss; head_grad [H * C + C] accumulated (+=).
    Raises ValueError if a label is outside [0, C).
    """
    rows, hidden_size = hidden.shape
    classes = probs.shape[1]
    kernel = head_params[:hidden_size * classes].reshape((hidden_size, classes))
    bias = head_params[hidden_size * classes:]
    d_kernel = head_grad[:hidden_size * classes].reshape((hidden_size, classes))
    d_bias = head_grad[hidden_size * classes:]
    one = probs.dtype.type(1.0)
    row_count = probs.dtype.type(rows)
    d_logits = np.empty_like(probs)

    # logits = hidden @ kernel + bias, computed in probs.
    _matmul_bias(hidden, kernel, bias, probs)

    # Row-wise stable softmax; loss = logsumexp(logits) - logits[label]; d_logits = (p - onehot) / N.
    loss_sum = np.float64(0.0)
    for r in range(rows):
        label = labels[r]
        if label < 0 or label >= classes:
            raise ValueError("labels must be in [0, C), where C is the number of classes")
        row_max = probs[r, 0]
        for n in range(1, classes):
            if probs[r, n] > row_max:
                row_max = probs[r, n]
        label_logit = probs[r, label]
        total = probs.dtype.type(0.0)
        for n in range(classes):
            e = np.exp(probs[r, n] - row_max)
            probs[r, n] = e
            total += e
        loss_sum += np.log(total) - (label_logit - row_max)
        for n in range(classes):
            p = probs[r, n] / total
            probs[r, n] = p
            d_logits[r, n] = p / row_count
        d_logits[r, label] = (probs[r, label] - one) / row_count

    # d_hidden = d_logits @ kernel.T; d_kernel += hidden.T @ d_logits; d_bias += d_logits summed.
    _matmul_transposed(d_logits, kernel, d_hidden)
    _add_weight_gradient(hidden, d_logits, d_kernel)
    _add_column_sums(d_logits, d_bias)
    return loss_sum / rows


@njit(**_JIT_OPTIONS)
def _sum_of_squares(values):
    total = 0.0
    for p in range(values.shape[0]):
        total += float(values[p]) * float(values[p])
    return total


@njit(**_JIT_OPTIONS)
def _apply_update(weights, grad, slots, optimizer, hyper, update_count, scale):
    """Update ``weights`` in place with ``grad * scale``.

    weights [P] read and written; grad [P] read; slots [S, P] read and written (the optimizer's
    state); hyper float64 [learning_rate, beta_1, beta_2, epsilon, clip_norm]. Raises ValueError for
    an unknown optimizer code.
    """
    dtype = weights.dtype.type
    learning_rate = dtype(hyper[0])
    factor = dtype(scale)
    if optimizer == _OPTIMIZER_SGD:
        for p in range(weights.shape[0]):
            weights[p] -= learning_rate * (grad[p] * factor)
    elif optimizer == _OPTIMIZER_ADAGRAD:
        # TensorFlow 1.x Adagrad: acc += g * g; w -= lr * g / sqrt(acc).
        accumulator = slots[0]
        for p in range(weights.shape[0]):
            g = grad[p] * factor
            accumulator[p] += g * g
            weights[p] -= learning_rate * g / np.sqrt(accumulator[p])
    elif optimizer == _OPTIMIZER_ADAM:
        # Keras Adam, with the bias corrections folded into the step size.
        beta_1 = hyper[1]
        beta_2 = hyper[2]
        step_size = dtype(hyper[0] * np.sqrt(1.0 - beta_2 ** update_count)
                          / (1.0 - beta_1 ** update_count))
        keep_1 = dtype(1.0 - beta_1)
        keep_2 = dtype(1.0 - beta_2)
        epsilon = dtype(hyper[3])
        mean = slots[0]
        second = slots[1]
        for p in range(weights.shape[0]):
            g = grad[p] * factor
            mean[p] += (g - mean[p]) * keep_1
            second[p] += (g * g - second[p]) * keep_2
            weights[p] -= step_size * mean[p] / (np.sqrt(second[p]) + epsilon)
    else:
        raise ValueError("optimizer must be 0 (SGD), 1 (Adagrad) or 2 (Adam)")


@njit(**_JIT_OPTIONS)
def train_window(params, head_params, x, labels, state, gates, cs, hs, probs, d_y, grad, head_grad,
                 d_state, d_x, dz, d_hidden, forget_bias, optimizer, hyper, slots, head_slots, step,
                 ids=None):
    """Run one truncated-BPTT training step in place; return the window's mean loss.

    With ids [T, B] int64 instead of x (x and d_x None), layer 0 reads token ids as in ``forward``.

    Forward with the tape, ``softmax_xent`` on the top outputs, backward, optional clipping by global
    norm, and the optimizer update of params and head_params. x [T, B, I] and labels [T, B] int64
    read; state [L, 2, B, H] read and overwritten with the final state; gates, cs, hs the tape as in
    ``forward``; probs [T, B, C] written; grad [P] and head_grad [H * C + C] overwritten with this
    window's gradients before clipping; d_y [T, B, H], d_state, d_x, dz and d_hidden scratch;
    optimizer 0 (SGD), 1 (Adagrad) or 2 (Adam); hyper float64 [learning_rate, beta_1, beta_2,
    epsilon, clip_norm], no clipping when clip_norm <= 0; slots [S, P] and head_slots
    [S, H * C + C] read and written; step is Adam's update count including this one.
    """
    steps, batch = labels.shape
    num_layers = state.shape[0]
    hidden = state.shape[3]
    classes = probs.shape[2]
    rows = steps * batch

    if x is not None:
        forward(params, x, state, gates, cs, hs, forget_bias, True)
    if ids is not None:
        forward(params, None, state, gates, cs, hs, forget_bias, True, ids)

    head_grad[:] = 0.0
    loss = softmax_xent(hs[num_layers - 1, 1:].reshape((rows, hidden)), head_params, labels.reshape(rows),
                        probs.reshape((rows, classes)), d_y.reshape((rows, hidden)), head_grad)

    grad[:] = 0.0
    if x is not None:
        backward(params, x, gates, cs, hs, d_y, None, grad, d_state, d_x, dz, d_hidden)
    if ids is not None:
        backward(params, None, gates, cs, hs, d_y, None, grad, d_state, None, dz, d_hidden, ids)

    # TensorFlow's clip_by_global_norm: scale = clip_norm / max(global_norm, clip_norm).
    scale = 1.0
    clip_norm = hyper[4]
    if clip_norm > 0.0:
        global_norm = np.sqrt(_sum_of_squares(grad) + _sum_of_squares(head_grad))
        if global_norm > clip_norm:
            scale = clip_norm / global_norm

    _apply_update(params, grad, slots, optimizer, hyper, step, scale)
    _apply_update(head_params, head_grad, head_slots, optimizer, hyper, step, scale)
    return loss
