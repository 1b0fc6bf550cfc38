# cython: language_level=3, boundscheck=False, wraparound=False
"""Binding of the C core (csrc/) for the ``c`` backend.

Each function implements one entry point of the backend contract in ``fastlstm._backends``. Before a
kernel runs, every buffer is checked: a numpy array of the kind's dtype, C-contiguous, of the exact
shape, writeable where written, and not overlapping any other buffer of the call that is written.
Failures raise TypeError (dtype, type) or ValueError (shape, layout, overlap, C status codes). The GIL
is released around every kernel call.

``forward``, ``backward``, ``step`` and ``train_window`` take an optional ``ids`` argument (int64 token
ids [T, B], or [B] for ``step``) that replaces x for layer 0; then x (and d_x) must be None, the input
size I is read from the length of params, and every id is checked to lie in [0, I) before the kernel
runs.
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, intptr_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

cnp.import_array()

cdef extern from "fastlstm.h" nogil:
    ctypedef struct fl_dims:
        int64_t layers
        int64_t steps
        int64_t batch
        int64_t input
        int64_t hidden

    ctypedef struct fl_optimizer:
        int kind
        double learning_rate
        double beta_1
        double beta_2
        double epsilon
        double clip_norm
        int64_t step

    ctypedef void (*fl_sgemm_fn)(char *, char *, int *, int *, int *, float *, float *, int *,
                                 float *, int *, float *, float *, int *)
    ctypedef void (*fl_dgemm_fn)(char *, char *, int *, int *, int *, double *, double *, int *,
                                 double *, int *, double *, double *, int *)

    int FL_OK
    int FL_BLAS_MIN_WEIGHTS
    const char *fl_status_message(int status)
    void fl_set_blas(fl_sgemm_fn sgemm, fl_dgemm_fn dgemm)
    int fl_row_kernel_available()
    int fl_set_row_kernel(int enable)
    int fl_set_num_threads(int threads)
    int fl_get_num_threads()
    int FL_MAX_THREADS
    int fl_optimizer_slots(int kind)
    int64_t fl_num_params(const fl_dims *dims)
    void fl_tanh_array_f32(int64_t n, const float *x, float *out)
    void fl_sigmoid_array_f32(int64_t n, const float *x, float *out)
    int fl_set_flush_subnormals(int enable)
    void fl_exp_negative_array_f32(int64_t n, const float *x, float *out)

    int fl_forward_f32(const fl_dims *dims, const float *params, const float *x, const int64_t *ids,
                       float *state, float *gates, float *cs, float *hs, double forget_bias,
                       int keep_tape)
    int fl_backward_f32(const fl_dims *dims, const float *params, const float *x,
                        const int64_t *ids, const float *gates, const float *cs, const float *hs,
                        const float *d_y, const float *d_final_state, float *grad, float *d_state,
                        float *d_x, float *dz, float *d_hidden)
    int fl_step_f32(const fl_dims *dims, const float *params, const float *x_t, const int64_t *ids,
                    float *state, float *gates, double forget_bias)
    int fl_softmax_xent_f32(int64_t rows, int64_t hidden, int64_t classes, const float *inputs,
                            const float *head_params, const int64_t *labels, float *probs,
                            float *d_inputs, float *head_grad, double *loss)
    int fl_train_window_f32(const fl_dims *dims, int64_t classes, float *params,
                            float *head_params, const float *x, const int64_t *ids,
                            const int64_t *labels, float *state, float *gates, float *cs,
                            float *hs, float *probs, float *d_y, float *grad, float *head_grad,
                            float *d_state, float *d_x, float *dz, float *d_hidden,
                            double forget_bias, const fl_optimizer *optimizer, float *slots,
                            float *head_slots, double *loss)

    int fl_forward_f64(const fl_dims *dims, const double *params, const double *x,
                       const int64_t *ids, double *state, double *gates, double *cs, double *hs,
                       double forget_bias, int keep_tape)
    int fl_backward_f64(const fl_dims *dims, const double *params, const double *x,
                        const int64_t *ids, const double *gates, const double *cs,
                        const double *hs, const double *d_y, const double *d_final_state,
                        double *grad, double *d_state, double *d_x, double *dz, double *d_hidden)
    int fl_step_f64(const fl_dims *dims, const double *params, const double *x_t,
                    const int64_t *ids, double *state, double *gates, double forget_bias)
    int fl_softmax_xent_f64(int64_t rows, int64_t hidden, int64_t classes, const double *inputs,
                            const double *head_params, const int64_t *labels, double *probs,
                            double *d_inputs, double *head_grad, double *loss)
    int fl_train_window_f64(const fl_dims *dims, int64_t classes, double *params,
                            double *head_params, const double *x, const int64_t *ids,
                            const int64_t *labels, double *state, double *gates, double *cs,
                            double *hs, double *probs, double *d_y, double *grad,
                            double *head_grad, double *d_state, double *d_x, double *dz,
                            double *d_hidden, double forget_bias, const fl_optimizer *optimizer,
                            double *slots, double *head_slots, double *loss)

# scipy's BLAS (the library numpy and Numba users already have) for the large weight matrices.
fl_set_blas(<fl_sgemm_fn>sgemm, <fl_dgemm_fn>dgemm)

BLAS_MIN_WEIGHTS = FL_BLAS_MIN_WEIGHTS


def row_kernel_available():
    """True when this CPU runs the row kernel (AVX-512F) for large weight matrices."""
    return bool(fl_row_kernel_available())


def set_row_kernel(bint enable):
    """Turn the row kernel on (where available) or off, for comparisons; returns the new setting."""
    return bool(fl_set_row_kernel(enable))


MAX_THREADS = FL_MAX_THREADS


def set_num_threads(int threads):
    """Set the row kernel's thread count, the calling thread included (checked by the caller)."""
    if fl_set_num_threads(threads) != 0:
        raise ValueError(f"threads must be in [1, {FL_MAX_THREADS}], got {threads}")


def get_num_threads():
    return fl_get_num_threads()

cdef enum:
    MAX_BUFFERS = 24

# Address ranges of the buffers of one call, for the overlap check.
cdef struct _Span:
    intptr_t start
    intptr_t end
    bint written


cdef class _Buffers:
    """The buffers of one call, collected by ``check`` and then tested for overlap."""
    cdef _Span spans[MAX_BUFFERS]
    cdef list names
    cdef int count
    cdef int typenum

    def __cinit__(self, int typenum):
        self.count = 0
        self.typenum = typenum
        self.names = []

    cdef cnp.ndarray check(self, str name, object array, int typenum, int ndim, int64_t d0,
                           int64_t d1=-1, int64_t d2=-1, int64_t d3=-1):
        """Check a buffer that the kernel reads."""
        return self._check(name, array, typenum, False, ndim, d0, d1, d2, d3)

    cdef cnp.ndarray check_out(self, str name, object array, int typenum, int ndim, int64_t d0,
                               int64_t d1=-1, int64_t d2=-1, int64_t d3=-1):
        """Check a buffer that the kernel writes."""
        return self._check(name, array, typenum, True, ndim, d0, d1, d2, d3)

    cdef cnp.ndarray _check(self, str name, object array, int typenum, bint written, int ndim,
                            int64_t d0, int64_t d1, int64_t d2, int64_t d3):
        """Check one buffer and record its address range; dimensions of -1 are not checked."""
        cdef cnp.ndarray arr
        cdef int64_t expected[4]
        cdef int axis
        if not isinstance(array, cnp.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
        arr = <cnp.ndarray>array
        if cnp.PyArray_TYPE(arr) != typenum:
            raise TypeError(f"{name} must have dtype {cnp.PyArray_DescrFromType(typenum)}, "
                            f"got {array.dtype}")
        expected[0] = d0
        expected[1] = d1
        expected[2] = d2
        expected[3] = d3
        if cnp.PyArray_NDIM(arr) != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
        for axis in range(ndim):
            if expected[axis] >= 0 and cnp.PyArray_DIM(arr, axis) != expected[axis]:
                shape = tuple(int(expected[k]) if expected[k] >= 0 else "any" for k in range(ndim))
                raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            raise ValueError(f"{name} must be C-contiguous, got strides {array.strides}")
        if written and not cnp.PyArray_ISWRITEABLE(arr):
            raise ValueError(f"{name} must be writeable, got a read-only array")
        if self.count >= MAX_BUFFERS:
            raise RuntimeError("too many buffers in one call")
        self.spans[self.count].start = <intptr_t>cnp.PyArray_DATA(arr)
        self.spans[self.count].end = self.spans[self.count].start + cnp.PyArray_NBYTES(arr)
        self.spans[self.count].written = written
        self.names.append(name)
        self.count += 1
        return arr

    cdef int check_overlap(self) except -1:
        """Raise ValueError if a written buffer overlaps any other buffer of the call."""
        cdef int a, b
        for a in range(self.count):
            for b in range(a + 1, self.count):
                if not (self.spans[a].written or self.spans[b].written):
                    continue
                if self.spans[a].start == self.spans[a].end or self.spans[b].start == self.spans[b].end:
                    continue
                if self.spans[a].start < self.spans[b].end and self.spans[b].start < self.spans[a].end:
                    raise ValueError(f"{self.names[a]} and {self.names[b]} must not share memory")
        return 0


cdef int _input_is_none(str name, object value) except -1:
    if value is not None:
        raise ValueError(f"{name} must be None when ids are given (the ids replace it), got "
                         f"{type(value).__name__}")
    return 0


cdef int _raise_status(int status) except -1:
    if status != FL_OK:
        raise ValueError(f"fastlstm C core: {fl_status_message(status).decode()}")
    return 0


cdef int _float_typenum(object params) except -1:
    if not isinstance(params, cnp.ndarray):
        raise TypeError(f"params must be a numpy.ndarray, got {type(params).__name__}")
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>params)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"params must have dtype float32 or float64, got {params.dtype}")
    return typenum


cdef int _fill_dims(fl_dims *dims, object x, object state) except -1:
    """Read L, B, H from state [L, 2, B, H] and T, I from x [T, B, I]; check the two agree."""
    if not isinstance(state, cnp.ndarray) or (<cnp.ndarray>state).ndim != 4:
        raise ValueError(f"state must be a 4-dimensional numpy.ndarray [L, 2, B, H], got "
                         f"{getattr(state, 'shape', type(state).__name__)}")
    if not isinstance(x, cnp.ndarray) or (<cnp.ndarray>x).ndim != 3:
        raise ValueError(f"x must be a 3-dimensional numpy.ndarray [T, B, I], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    dims.layers = state.shape[0]
    dims.batch = state.shape[2]
    dims.hidden = state.shape[3]
    dims.steps = x.shape[0]
    dims.input = x.shape[2]
    if dims.layers < 1 or dims.batch < 1 or dims.hidden < 1 or dims.steps < 1 or dims.input < 1:
        raise ValueError(f"every dimension must be at least 1, got x {x.shape} and state {state.shape}")
    return 0


cdef int _fill_dims_ids(fl_dims *dims, object ids, object state, object params) except -1:
    """Read T, B from ids [T, B], L, H from state [L, 2, B, H] and I from the length of params.

    With token ids there is no x to read I from; the flat vector of P elements holds
    (I + H) G + G elements for layer 0 and 2 H G + G for each layer above, which fixes I.
    """
    cdef int64_t g, rest, size
    if not isinstance(state, cnp.ndarray) or (<cnp.ndarray>state).ndim != 4:
        raise ValueError(f"state must be a 4-dimensional numpy.ndarray [L, 2, B, H], got "
                         f"{getattr(state, 'shape', type(state).__name__)}")
    if not isinstance(ids, cnp.ndarray) or (<cnp.ndarray>ids).ndim != 2:
        raise ValueError(f"ids must be a 2-dimensional numpy.ndarray [T, B], got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    dims.layers = state.shape[0]
    dims.batch = state.shape[2]
    dims.hidden = state.shape[3]
    dims.steps = ids.shape[0]
    if dims.layers < 1 or dims.batch < 1 or dims.hidden < 1 or dims.steps < 1:
        raise ValueError(f"every dimension must be at least 1, got ids {ids.shape} and state {state.shape}")
    if ids.shape[1] != dims.batch:
        raise ValueError(f"ids must have shape (T, {dims.batch}) to match state's batch, got {ids.shape}")
    g = 4 * dims.hidden
    size = params.shape[0]
    rest = size - g - (dims.layers - 1) * (2 * dims.hidden * g + g)
    if rest < (1 + dims.hidden) * g or rest % g != 0:
        raise ValueError(f"params of length {size} does not fit any input size for {dims.layers} layers "
                         f"of {dims.hidden} units")
    dims.input = rest // g - dims.hidden
    return 0


cdef cnp.ndarray _check_ids(_Buffers buffers, object ids, int64_t input_size, int ndim, int64_t d0,
                            int64_t d1=-1):
    """Check token ids: int64, C-contiguous, of the shape given, every value in [0, input_size)."""
    cdef cnp.ndarray ia = buffers.check("ids", ids, cnp.NPY_INT64, ndim, d0, d1)
    cdef int64_t *values = <int64_t *>cnp.PyArray_DATA(ia)
    cdef int64_t n = cnp.PyArray_SIZE(ia), k, bad = -1
    with nogil:
        for k in range(n):
            if values[k] < 0 or values[k] >= input_size:
                bad = k
                break
    if bad >= 0:
        raise ValueError(f"ids must be in [0, {input_size}) (the model's input size), got {values[bad]}")
    return ia


ctypedef void (*_ArrayFunctionF32)(int64_t n, const float *x, float *out) noexcept nogil


cdef cnp.ndarray _apply_f32(object x, _ArrayFunctionF32 function):
    """Return function applied to a 1-dimensional float32 array, into a new array."""
    cdef _Buffers buffers = _Buffers(cnp.NPY_FLOAT32)
    cdef cnp.ndarray xa = buffers.check("x", x, cnp.NPY_FLOAT32, 1, -1)
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, cnp.PyArray_DIMS(xa), cnp.NPY_FLOAT32, 0)
    with nogil:
        function(cnp.PyArray_DIM(xa, 0), <float *>cnp.PyArray_DATA(xa), <float *>cnp.PyArray_DATA(out))
    return out


def tanh_f32(x):
    """Return tanh of a float32 array with the kernels' own tanh (for accuracy tests)."""
    return _apply_f32(x, fl_tanh_array_f32)


def _set_flush_subnormals(bint enable):
    """Set or clear the calling thread's flush-to-zero flags (for tests); return the previous state,
    or -1 where the CPU has none."""
    return fl_set_flush_subnormals(enable)


def sigmoid_f32(x):
    """Return the sigmoid of a float32 array with the kernels' own sigmoid (for accuracy tests)."""
    return _apply_f32(x, fl_sigmoid_array_f32)


def exp_negative_f32(x):
    """Return exp of a float32 array of values <= 0 with the softmax's own exp (for accuracy tests)."""
    return _apply_f32(x, fl_exp_negative_array_f32)


def forward(params, x, state, gates, cs, hs, double forget_bias, bint keep_tape, ids=None):
    """Run all layers over x [T, B, I] (or ids [T, B]) and update state [L, 2, B, H].

    See ``fastlstm._backends``; with ``ids``, x must be None.
    """
    cdef fl_dims dims
    cdef int typenum = _float_typenum(params)
    cdef int status
    if ids is None:
        _fill_dims(&dims, x, state)
    else:
        _input_is_none("x", x)
        _fill_dims_ids(&dims, ids, state, params)
    cdef int64_t slots = dims.layers if keep_tape else 1
    cdef int64_t g = 4 * dims.hidden
    cdef _Buffers buffers = _Buffers(typenum)
    cdef cnp.ndarray p = buffers.check("params", params, typenum, 1, fl_num_params(&dims))
    cdef cnp.ndarray xa = None
    cdef cnp.ndarray ia = None
    if ids is None:
        xa = buffers.check("x", x, typenum, 3, dims.steps, dims.batch, dims.input)
    else:
        ia = _check_ids(buffers, ids, dims.input, 2, dims.steps, dims.batch)
    cdef void *x_data = NULL if xa is None else cnp.PyArray_DATA(xa)
    cdef int64_t *id_data = NULL if ia is None else <int64_t *>cnp.PyArray_DATA(ia)
    cdef cnp.ndarray s = buffers.check_out("state", state, typenum, 4, dims.layers, 2, dims.batch,
                                       dims.hidden)
    cdef cnp.ndarray ga = buffers.check_out("gates", gates, typenum, 4, slots, dims.steps, dims.batch, g)
    cdef cnp.ndarray ca = buffers.check_out("cs", cs, typenum, 4, slots, dims.steps + 1, dims.batch,
                                        dims.hidden)
    cdef cnp.ndarray ha = buffers.check_out("hs", hs, typenum, 4, slots, dims.steps + 1, dims.batch,
                                        dims.hidden)
    buffers.check_overlap()
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = fl_forward_f32(&dims, <float *>cnp.PyArray_DATA(p), <float *>x_data, id_data,
                                    <float *>cnp.PyArray_DATA(s), <float *>cnp.PyArray_DATA(ga),
                                    <float *>cnp.PyArray_DATA(ca), <float *>cnp.PyArray_DATA(ha),
                                    forget_bias, keep_tape)
    else:
        with nogil:
            status = fl_forward_f64(&dims, <double *>cnp.PyArray_DATA(p), <double *>x_data, id_data,
                                    <double *>cnp.PyArray_DATA(s), <double *>cnp.PyArray_DATA(ga),
                                    <double *>cnp.PyArray_DATA(ca), <double *>cnp.PyArray_DATA(ha),
                                    forget_bias, keep_tape)
    _raise_status(status)


def backward(params, x, gates, cs, hs, d_y, d_final_state, grad, d_state, d_x, dz, d_hidden, ids=None):
    """Back-propagate through a keep_tape forward's tape; see ``fastlstm._backends``.

    With ``ids`` [T, B], x and d_x must be None: token ids have no gradient.
    """
    cdef fl_dims dims
    cdef int typenum = _float_typenum(params)
    cdef int status
    if ids is None:
        _fill_dims(&dims, x, d_state)
    else:
        _input_is_none("x", x)
        _input_is_none("d_x", d_x)
        _fill_dims_ids(&dims, ids, d_state, params)
    cdef int64_t g = 4 * dims.hidden
    cdef _Buffers buffers = _Buffers(typenum)
    cdef cnp.ndarray p = buffers.check("params", params, typenum, 1, fl_num_params(&dims))
    cdef cnp.ndarray xa = None
    cdef cnp.ndarray ia = None
    if ids is None:
        xa = buffers.check("x", x, typenum, 3, dims.steps, dims.batch, dims.input)
    else:
        ia = _check_ids(buffers, ids, dims.input, 2, dims.steps, dims.batch)
    cdef void *x_data = NULL if xa is None else cnp.PyArray_DATA(xa)
    cdef int64_t *id_data = NULL if ia is None else <int64_t *>cnp.PyArray_DATA(ia)
    cdef cnp.ndarray ga = buffers.check("gates", gates, typenum, 4, dims.layers, dims.steps, dims.batch, g)
    cdef cnp.ndarray ca = buffers.check("cs", cs, typenum, 4, dims.layers, dims.steps + 1, dims.batch,
                                        dims.hidden)
    cdef cnp.ndarray ha = buffers.check("hs", hs, typenum, 4, dims.layers, dims.steps + 1, dims.batch,
                                        dims.hidden)
    cdef cnp.ndarray dya = buffers.check("d_y", d_y, typenum, 3, dims.steps, dims.batch, dims.hidden)
    cdef cnp.ndarray dfa = None
    if d_final_state is not None:
        dfa = buffers.check("d_final_state", d_final_state, typenum, 4, dims.layers, 2, dims.batch,
                            dims.hidden)
    cdef cnp.ndarray gr = buffers.check_out("grad", grad, typenum, 1, fl_num_params(&dims))
    cdef cnp.ndarray dsa = buffers.check_out("d_state", d_state, typenum, 4, dims.layers, 2, dims.batch,
                                         dims.hidden)
    cdef cnp.ndarray dxa = None
    if ids is None:
        dxa = buffers.check_out("d_x", d_x, typenum, 3, dims.steps, dims.batch, dims.input)
    cdef void *d_x_data = NULL if dxa is None else cnp.PyArray_DATA(dxa)
    cdef cnp.ndarray dza = buffers.check_out("dz", dz, typenum, 3, dims.steps, dims.batch, g)
    cdef cnp.ndarray dha = buffers.check_out("d_hidden", d_hidden, typenum, 3, dims.steps, dims.batch,
                                         dims.hidden)
    buffers.check_overlap()
    cdef void *d_final = NULL if dfa is None else cnp.PyArray_DATA(dfa)
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = fl_backward_f32(&dims, <float *>cnp.PyArray_DATA(p), <float *>x_data, id_data,
                                     <float *>cnp.PyArray_DATA(ga), <float *>cnp.PyArray_DATA(ca),
                                     <float *>cnp.PyArray_DATA(ha), <float *>cnp.PyArray_DATA(dya),
                                     <float *>d_final, <float *>cnp.PyArray_DATA(gr),
                                     <float *>cnp.PyArray_DATA(dsa), <float *>d_x_data,
                                     <float *>cnp.PyArray_DATA(dza), <float *>cnp.PyArray_DATA(dha))
    else:
        with nogil:
            status = fl_backward_f64(&dims, <double *>cnp.PyArray_DATA(p), <double *>x_data, id_data,
                                     <double *>cnp.PyArray_DATA(ga), <double *>cnp.PyArray_DATA(ca),
                                     <double *>cnp.PyArray_DATA(ha), <double *>cnp.PyArray_DATA(dya),
                                     <double *>d_final, <double *>cnp.PyArray_DATA(gr),
                                     <double *>cnp.PyArray_DATA(dsa), <double *>d_x_data,
                                     <double *>cnp.PyArray_DATA(dza), <double *>cnp.PyArray_DATA(dha))
    _raise_status(status)


def step(params, x_t, state, gates, double forget_bias, ids=None):
    """Advance all layers by one step from x_t [B, I] (or ids [B]); see ``fastlstm._backends``."""
    cdef fl_dims dims
    cdef int typenum = _float_typenum(params)
    cdef int status
    if ids is None:
        if not isinstance(x_t, cnp.ndarray) or (<cnp.ndarray>x_t).ndim != 2:
            raise ValueError(f"x_t must be a 2-dimensional numpy.ndarray [B, I], got "
                             f"{getattr(x_t, 'shape', type(x_t).__name__)}")
        _fill_dims(&dims, x_t[None], state)
    else:
        _input_is_none("x_t", x_t)
        if not isinstance(ids, cnp.ndarray) or (<cnp.ndarray>ids).ndim != 1:
            raise ValueError(f"ids must be a 1-dimensional numpy.ndarray [B], got "
                             f"{getattr(ids, 'shape', type(ids).__name__)}")
        _fill_dims_ids(&dims, ids[None], state, params)
    cdef _Buffers buffers = _Buffers(typenum)
    cdef cnp.ndarray p = buffers.check("params", params, typenum, 1, fl_num_params(&dims))
    cdef cnp.ndarray xa = None
    cdef cnp.ndarray ia = None
    if ids is None:
        xa = buffers.check("x_t", x_t, typenum, 2, dims.batch, dims.input)
    else:
        ia = _check_ids(buffers, ids, dims.input, 1, dims.batch)
    cdef void *x_data = NULL if xa is None else cnp.PyArray_DATA(xa)
    cdef int64_t *id_data = NULL if ia is None else <int64_t *>cnp.PyArray_DATA(ia)
    cdef cnp.ndarray s = buffers.check_out("state", state, typenum, 4, dims.layers, 2, dims.batch,
                                       dims.hidden)
    cdef cnp.ndarray ga = buffers.check_out("gates", gates, typenum, 2, dims.batch, 4 * dims.hidden)
    buffers.check_overlap()
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = fl_step_f32(&dims, <float *>cnp.PyArray_DATA(p), <float *>x_data, id_data,
                                 <float *>cnp.PyArray_DATA(s), <float *>cnp.PyArray_DATA(ga),
                                 forget_bias)
    else:
        with nogil:
            status = fl_step_f64(&dims, <double *>cnp.PyArray_DATA(p), <double *>x_data, id_data,
                                 <double *>cnp.PyArray_DATA(s), <double *>cnp.PyArray_DATA(ga),
                                 forget_bias)
    _raise_status(status)


def softmax_xent(hidden, head_params, labels, probs, d_hidden, head_grad):
    """Dense layer plus mean softmax cross-entropy over N rows; see ``fastlstm._backends``."""
    cdef int typenum = _float_typenum(head_params)
    cdef int status
    cdef double loss = 0.0
    if not isinstance(hidden, cnp.ndarray) or (<cnp.ndarray>hidden).ndim != 2:
        raise ValueError(f"hidden must be a 2-dimensional numpy.ndarray [N, H], got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if not isinstance(probs, cnp.ndarray) or (<cnp.ndarray>probs).ndim != 2:
        raise ValueError(f"probs must be a 2-dimensional numpy.ndarray [N, C], got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    cdef int64_t rows = hidden.shape[0], width = hidden.shape[1], classes = probs.shape[1]
    if rows < 1 or width < 1 or classes < 1:
        raise ValueError(f"every dimension must be at least 1, got hidden {hidden.shape} and "
                         f"probs {probs.shape}")
    cdef _Buffers buffers = _Buffers(typenum)
    cdef cnp.ndarray ha = buffers.check("hidden", hidden, typenum, 2, rows, width)
    cdef cnp.ndarray hp = buffers.check("head_params", head_params, typenum, 1,
                                        width * classes + classes)
    cdef cnp.ndarray la = buffers.check("labels", labels, cnp.NPY_INT64, 1, rows)
    cdef cnp.ndarray pa = buffers.check_out("probs", probs, typenum, 2, rows, classes)
    cdef cnp.ndarray da = buffers.check_out("d_hidden", d_hidden, typenum, 2, rows, width)
    cdef cnp.ndarray hg = buffers.check_out("head_grad", head_grad, typenum, 1, width * classes + classes)
    buffers.check_overlap()
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = fl_softmax_xent_f32(rows, width, classes, <float *>cnp.PyArray_DATA(ha),
                                         <float *>cnp.PyArray_DATA(hp), <int64_t *>cnp.PyArray_DATA(la),
                                         <float *>cnp.PyArray_DATA(pa), <float *>cnp.PyArray_DATA(da),
                                         <float *>cnp.PyArray_DATA(hg), &loss)
    else:
        with nogil:
            status = fl_softmax_xent_f64(rows, width, classes, <double *>cnp.PyArray_DATA(ha),
                                         <double *>cnp.PyArray_DATA(hp), <int64_t *>cnp.PyArray_DATA(la),
                                         <double *>cnp.PyArray_DATA(pa), <double *>cnp.PyArray_DATA(da),
                                         <double *>cnp.PyArray_DATA(hg), &loss)
    _raise_status(status)
    return loss


def train_window(params, head_params, x, labels, state, gates, cs, hs, probs, d_y, grad, head_grad,
                 d_state, d_x, dz, d_hidden, double forget_bias, int optimizer, hyper, slots,
                 head_slots, int64_t step, ids=None):
    """One fused training step: forward, head, backward, update; see ``fastlstm._backends``.

    With ``ids`` [T, B], x and d_x must be None.
    """
    cdef fl_dims dims
    cdef fl_optimizer opt
    cdef int typenum = _float_typenum(params)
    cdef int status
    cdef double loss = 0.0
    if ids is None:
        _fill_dims(&dims, x, state)
    else:
        _input_is_none("x", x)
        _input_is_none("d_x", d_x)
        _fill_dims_ids(&dims, ids, state, params)
    if not isinstance(probs, cnp.ndarray) or (<cnp.ndarray>probs).ndim != 3:
        raise ValueError(f"probs must be a 3-dimensional numpy.ndarray [T, B, C], got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    cdef int64_t classes = probs.shape[2]
    cdef int n_slots = fl_optimizer_slots(optimizer)
    if n_slots < 0:
        raise ValueError(f"optimizer must be 0 (SGD), 1 (Adagrad) or 2 (Adam), got {optimizer}")
    if optimizer == 2 and step < 1:
        raise ValueError(f"step must be at least 1 for Adam, got {step}")
    cdef int64_t g = 4 * dims.hidden
    cdef int64_t n_params = fl_num_params(&dims)
    cdef int64_t n_head = dims.hidden * classes + classes
    cdef _Buffers buffers = _Buffers(typenum)
    cdef cnp.ndarray ha_ = buffers.check("hyper", hyper, cnp.NPY_FLOAT64, 1, 5)
    cdef cnp.ndarray pa = buffers.check_out("params", params, typenum, 1, n_params)
    cdef cnp.ndarray hp = buffers.check_out("head_params", head_params, typenum, 1, n_head)
    cdef cnp.ndarray xa = None
    cdef cnp.ndarray ia = None
    if ids is None:
        xa = buffers.check("x", x, typenum, 3, dims.steps, dims.batch, dims.input)
    else:
        ia = _check_ids(buffers, ids, dims.input, 2, dims.steps, dims.batch)
    cdef void *x_data = NULL if xa is None else cnp.PyArray_DATA(xa)
    cdef int64_t *id_data = NULL if ia is None else <int64_t *>cnp.PyArray_DATA(ia)
    cdef cnp.ndarray la = buffers.check("labels", labels, cnp.NPY_INT64, 2, dims.steps, dims.batch)
    cdef cnp.ndarray sa = buffers.check_out("state", state, typenum, 4, dims.layers, 2, dims.batch,
                                        dims.hidden)
    cdef cnp.ndarray ga = buffers.check_out("gates", gates, typenum, 4, dims.layers, dims.steps, dims.batch, g)
    cdef cnp.ndarray ca = buffers.check_out("cs", cs, typenum, 4, dims.layers, dims.steps + 1, dims.batch,
                                        dims.hidden)
    cdef cnp.ndarray hsa = buffers.check_out("hs", hs, typenum, 4, dims.layers, dims.steps + 1, dims.batch,
                                         dims.hidden)
    cdef cnp.ndarray pra = buffers.check_out("probs", probs, typenum, 3, dims.steps, dims.batch, classes)
    cdef cnp.ndarray dya = buffers.check_out("d_y", d_y, typenum, 3, dims.steps, dims.batch, dims.hidden)
    cdef cnp.ndarray gr = buffers.check_out("grad", grad, typenum, 1, n_params)
    cdef cnp.ndarray hg = buffers.check_out("head_grad", head_grad, typenum, 1, n_head)
    cdef cnp.ndarray dsa = buffers.check_out("d_state", d_state, typenum, 4, dims.layers, 2, dims.batch,
                                         dims.hidden)
    cdef cnp.ndarray dxa = None
    if ids is None:
        dxa = buffers.check_out("d_x", d_x, typenum, 3, dims.steps, dims.batch, dims.input)
    cdef void *d_x_data = NULL if dxa is None else cnp.PyArray_DATA(dxa)
    cdef cnp.ndarray dza = buffers.check_out("dz", dz, typenum, 3, dims.steps, dims.batch, g)
    cdef cnp.ndarray dha = buffers.check_out("d_hidden", d_hidden, typenum, 3, dims.steps, dims.batch,
                                         dims.hidden)
    cdef cnp.ndarray sl = buffers.check_out("slots", slots, typenum, 2, n_slots, n_params)
    cdef cnp.ndarray hsl = buffers.check_out("head_slots", head_slots, typenum, 2, n_slots, n_head)
    buffers.check_overlap()
    cdef double *hyper_values = <double *>cnp.PyArray_DATA(ha_)
    opt.kind = optimizer
    opt.learning_rate = hyper_values[0]
    opt.beta_1 = hyper_values[1]
    opt.beta_2 = hyper_values[2]
    opt.epsilon = hyper_values[3]
    opt.clip_norm = hyper_values[4]
    opt.step = step
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = fl_train_window_f32(
                &dims, classes, <float *>cnp.PyArray_DATA(pa), <float *>cnp.PyArray_DATA(hp),
                <float *>x_data, id_data, <int64_t *>cnp.PyArray_DATA(la),
                <float *>cnp.PyArray_DATA(sa), <float *>cnp.PyArray_DATA(ga),
                <float *>cnp.PyArray_DATA(ca), <float *>cnp.PyArray_DATA(hsa),
                <float *>cnp.PyArray_DATA(pra), <float *>cnp.PyArray_DATA(dya),
                <float *>cnp.PyArray_DATA(gr), <float *>cnp.PyArray_DATA(hg),
                <float *>cnp.PyArray_DATA(dsa), <float *>d_x_data,
                <float *>cnp.PyArray_DATA(dza), <float *>cnp.PyArray_DATA(dha), forget_bias, &opt,
                <float *>cnp.PyArray_DATA(sl), <float *>cnp.PyArray_DATA(hsl), &loss)
    else:
        with nogil:
            status = fl_train_window_f64(
                &dims, classes, <double *>cnp.PyArray_DATA(pa), <double *>cnp.PyArray_DATA(hp),
                <double *>x_data, id_data, <int64_t *>cnp.PyArray_DATA(la),
                <double *>cnp.PyArray_DATA(sa), <double *>cnp.PyArray_DATA(ga),
                <double *>cnp.PyArray_DATA(ca), <double *>cnp.PyArray_DATA(hsa),
                <double *>cnp.PyArray_DATA(pra), <double *>cnp.PyArray_DATA(dya),
                <double *>cnp.PyArray_DATA(gr), <double *>cnp.PyArray_DATA(hg),
                <double *>cnp.PyArray_DATA(dsa), <double *>d_x_data,
                <double *>cnp.PyArray_DATA(dza), <double *>cnp.PyArray_DATA(dha), forget_bias, &opt,
                <double *>cnp.PyArray_DATA(sl), <double *>cnp.PyArray_DATA(hsl), &loss)
    _raise_status(status)
    return loss
