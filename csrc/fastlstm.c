/* fastlstm C core: shared helpers, then the float and double kernels from fastlstm_impl.h. */
#include "fastlstm.h"
#include "fastlstm_math.h"
#include "fastlstm_pool.h"

#include <limits.h>
#include <pthread.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>   /* _mm_getcsr and _mm_setcsr for fl_set_flush_subnormals */
#endif

/* Width of the vectors of the direct matrix loops: 16 bytes, one SSE register of baseline x86-64.
 * 32 bytes made the echo window slower, because without AVX the compiler splits such vectors. */
#define FL_VECTOR_BYTES 16

/* Largest B (in elements) that gemm transposes into a stack buffer for its A @ B^T loops. */
#define FL_SMALL_TRANSPOSE 1024

/* The row kernel: AVX-512 register tiles for the large matrix products (see fastlstm_impl.h). It
 * is compiled for AVX-512 through function attributes, so the rest of the library keeps the
 * baseline instruction set, and runs only where the CPU reports AVX-512F. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FL_ROW_KERNEL 1
#define FL_AVX512 __attribute__((target("avx512f")))
#else
#define FL_ROW_KERNEL 0
#endif

#if FL_ROW_KERNEL
/* Transposes in registers the 16 x 16 floats or 8 x 8 doubles of rows[], for the row kernel's
 * panels of A: after the call, rows[q] contains what was column q. Doubles take three rounds of
 * shuffles and floats four, each round pairing registers at twice the width of the last. */
static inline __attribute__((always_inline)) FL_AVX512 void fl_transpose_f32(__m512 rows[16])
{
    __m512 t[16];
    for (int r = 0; r < 16; r += 2) {   /* pairs of elements */
        t[r] = _mm512_unpacklo_ps(rows[r], rows[r + 1]);
        t[r + 1] = _mm512_unpackhi_ps(rows[r], rows[r + 1]);
    }
    for (int r = 0; r < 16; r += 4) {   /* pairs of pairs */
        for (int h = 0; h < 2; h++) {
            const __m512d a = _mm512_castps_pd(t[r + h]), b = _mm512_castps_pd(t[r + h + 2]);
            rows[r + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            rows[r + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for (int r = 0; r < 16; r += 8) {   /* 128-bit lanes, then 256-bit halves */
        for (int h = 0; h < 4; h++) {
            t[r + h] = _mm512_shuffle_f32x4(rows[r + h], rows[r + h + 4], 0x88);
            t[r + h + 4] = _mm512_shuffle_f32x4(rows[r + h], rows[r + h + 4], 0xdd);
        }
    }
    for (int h = 0; h < 8; h++) {
        rows[h] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0x88);
        rows[h + 8] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0xdd);
    }
}

static inline __attribute__((always_inline)) FL_AVX512 void fl_transpose_f64(__m512d rows[8])
{
    __m512d t[8];
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm512_unpacklo_pd(rows[r], rows[r + 1]);
        t[r + 1] = _mm512_unpackhi_pd(rows[r], rows[r + 1]);
    }
    for (int h = 0; h < 2; h++) {
        for (int r = 0; r < 8; r += 4) {
            rows[r + h] = _mm512_shuffle_f64x2(t[r + h], t[r + h + 2], 0x88);
            rows[r + h + 2] = _mm512_shuffle_f64x2(t[r + h], t[r + h + 2], 0xdd);
        }
    }
    for (int h = 0; h < 4; h++) {
        t[h] = _mm512_shuffle_f64x2(rows[h], rows[h + 4], 0x88);
        t[h + 4] = _mm512_shuffle_f64x2(rows[h], rows[h + 4], 0xdd);
    }
    for (int r = 0; r < 8; r++) {
        rows[r] = t[r];
    }
}
#endif

/* Rows of one register tile (24 of the 32 vector registers hold its sums); rows that share one pass
 * over the columns of the weights (A's chunk, 500 kB at K = 650 in float32, stays in L2); most
 * steps of the sum per slice (a slice of a column block, up to 32 kB, stays with a 12 kB tile panel
 * in the 48 kB L1 of the benchmark machine; a 32 kB L1 holds less). K is cut into
 * equal slices: at H = 256, one slice of 256 instead of 192 and 64 made the character model's
 * products 5 to 12 % faster on 2 threads. Tiles of 8 and chunks of 64 were slower. */
#define FL_TILE_ROWS 12
#define FL_CHUNK_ROWS 192
#define FL_DEPTH 256

/* Multiply-adds that one thread of a product must get before the pool wakes a second one. */
#define FL_MIN_THREAD_WORK (1 << 17)

/* Elements that one thread of a copy (packing, the bias rows) or of an elementwise pass (the
 * optimizer update, the bias gradient) must get before the pool wakes a second one. */
#define FL_MIN_THREAD_ELEMS (1 << 16)

/* Units (row elements) of the cell that one thread must get before the pool wakes a second one,
 * and the hidden size from which the cell runs in its AVX-512 copy. */
#define FL_MIN_CELL_WORK 2048
#define FL_WIDE_CELL 64

/* Scratch buffers that each thread keeps between calls, so that a steady-state call does not go
 * back to malloc (or to mmap and page faults, for buffers of megabytes). A slot keeps the largest
 * buffer its thread has needed so far and is freed when the thread exits. Calls on one thread use
 * each slot for one purpose at a time: the packed weights of a forward or backward call, the packed
 * weights of a single product, the A panels of the row kernel, and the softmax's per-row buffers. */
enum { FL_SCRATCH_CALL, FL_SCRATCH_PRODUCT, FL_SCRATCH_PANELS, FL_SCRATCH_ROWS, FL_SCRATCH_HEAD,
       FL_SCRATCH_SLOTS };

typedef struct {
    void *data;
    size_t bytes;
} fl_scratch_slot;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ready = 0;

static void scratch_release(void *slots)
{
    fl_scratch_slot *slot = (fl_scratch_slot *)slots;
    for (int k = 0; k < FL_SCRATCH_SLOTS; k++) {
        free(slot[k].data);
    }
    free(slots);
}

static void scratch_create_key(void)
{
    scratch_ready = pthread_key_create(&scratch_key, scratch_release) == 0;
}

/* Returns a 64-byte aligned buffer of at least `bytes` bytes, kept by this thread for its next
 * request of the same slot, or NULL when memory runs out. */
static void *fl_scratch(int slot, size_t bytes)
{
    pthread_once(&scratch_once, scratch_create_key);
    if (!scratch_ready) {
        return NULL;
    }
    fl_scratch_slot *slots = (fl_scratch_slot *)pthread_getspecific(scratch_key);
    if (slots == NULL) {
        slots = (fl_scratch_slot *)calloc(FL_SCRATCH_SLOTS, sizeof *slots);
        if (slots == NULL || pthread_setspecific(scratch_key, slots) != 0) {
            free(slots);
            return NULL;
        }
    }
    if (slots[slot].bytes < bytes) {
        void *data = NULL;
        free(slots[slot].data);
        slots[slot].data = NULL;
        slots[slot].bytes = 0;
        if (posix_memalign(&data, 64, bytes) != 0) {
            return NULL;
        }
        slots[slot].data = data;
        slots[slot].bytes = bytes;
    }
    return slots[slot].data;
}

static int row_kernel_enabled = -1;   /* -1: not decided yet, then 0 or 1 */

int fl_row_kernel_available(void)
{
#if FL_ROW_KERNEL
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

int fl_set_row_kernel(int enable)
{
    row_kernel_enabled = enable && fl_row_kernel_available();
    return row_kernel_enabled;
}

static int fl_row_kernel_on(void)
{
    if (row_kernel_enabled < 0) {
        row_kernel_enabled = fl_row_kernel_available();
    }
    return row_kernel_enabled;
}

static fl_sgemm_fn blas_gemm_f32 = NULL;
static fl_dgemm_fn blas_gemm_f64 = NULL;

void fl_set_blas(fl_sgemm_fn sgemm, fl_dgemm_fn dgemm)
{
    blas_gemm_f32 = sgemm;
    blas_gemm_f64 = dgemm;
}

const char *fl_status_message(int status)
{
    switch (status) {
    case FL_OK:
        return "success";
    case FL_EINVAL_SIZE:
        return "invalid size: every dimension must be at least 1 and their products must fit in 64 bits";
    case FL_EINVAL_LABEL:
        return "invalid label: every label must be in [0, classes)";
    case FL_EINVAL_OPTIMIZER:
        return "invalid optimizer: unknown kind, or an Adam step count below 1";
    case FL_ENOMEM:
        return "out of memory";
    case FL_EINVAL_ID:
        return "invalid input id: every id must be in [0, input size)";
    default:
        return "unknown fastlstm status";
    }
}

int fl_optimizer_slots(int kind)
{
    switch (kind) {
    case FL_SGD:
        return 0;
    case FL_ADAGRAD:
        return 1;
    case FL_ADAM:
        return 2;
    default:
        return -1;
    }
}

/* True when every dimension is at least 1 and the largest buffer, the gate tape of
 * L * (T + 1) * B * G elements, can be indexed with int64_t. */
static int fl_dims_valid(const fl_dims *dims)
{
    if (dims->layers < 1 || dims->steps < 1 || dims->batch < 1 || dims->input < 1
        || dims->hidden < 1) {
        return 0;
    }
    const int64_t limit = INT64_MAX / 16;
    int64_t product = dims->layers;
    const int64_t factors[3] = {dims->steps + 1, dims->batch, 4 * dims->hidden};
    if (dims->hidden > limit / 4 || dims->input > limit / (4 * dims->hidden)) {
        return 0;
    }
    for (int k = 0; k < 3; k++) {
        if (product > limit / factors[k]) {
            return 0;
        }
        product *= factors[k];
    }
    return 1;
}

/* Offset of layer l's kernel in the flat parameter vector. */
static int64_t fl_layer_offset(const fl_dims *dims, int64_t layer)
{
    const int64_t g = 4 * dims->hidden;
    if (layer == 0) {
        return 0;
    }
    const int64_t first = (dims->input + dims->hidden) * g + g;
    const int64_t later = (2 * dims->hidden) * g + g;
    return first + (layer - 1) * later;
}

/* True when each of the n ids lies in [0, input). */
static int fl_ids_valid(int64_t n, const int64_t *ids, int64_t input)
{
    for (int64_t k = 0; k < n; k++) {
        if (ids[k] < 0 || ids[k] >= input) {
            return 0;
        }
    }
    return 1;
}

int64_t fl_num_params(const fl_dims *dims)
{
    return fl_layer_offset(dims, dims->layers);
}

void fl_tanh_array_f32(int64_t n, const float *x, float *out)
{
    for (int64_t k = 0; k < n; k++) {
        out[k] = fl_tanh_f32(x[k]);
    }
}

int fl_set_flush_subnormals(int enable)
{
#if defined(__x86_64__) || defined(__i386__)
    const unsigned int flags = 0x8040u;   /* FTZ (bit 15) and DAZ (bit 6) */
    const unsigned int control = _mm_getcsr();
    _mm_setcsr(enable ? control | flags : control & ~flags);
    return (control & flags) == flags;
#else
    (void)enable;
    return -1;
#endif
}

void fl_sigmoid_array_f32(int64_t n, const float *x, float *out)
{
    for (int64_t k = 0; k < n; k++) {
        out[k] = fl_sigmoid_f32(x[k]);
    }
}

/* The float64 sigmoid through libm's tanh: no overflow and no exception flag for any finite z,
 * and exactly 0 or 1 where it saturates. */
static inline double fl_sigmoid_f64(double z)
{
    return 0.5 * tanh(0.5 * z) + 0.5;
}

void fl_exp_negative_array_f32(int64_t n, const float *x, float *out)
{
    for (int64_t k = 0; k < n; k++) {
        out[k] = fl_exp_negative_f32(x[k]);
    }
}

#define REAL float
#define FL_SUFFIX f32
#define TANH fl_tanh_f32
#define SIGMOID fl_sigmoid_f32
#define SOFTMAX_EXP fl_exp_negative_f32
#define LOG logf
#define SQRT sqrtf
#if FL_ROW_KERNEL
#define VEC __m512
#define VEC_MASK __mmask16
#define VEC_ZERO _mm512_setzero_ps
#define VEC_SET1 _mm512_set1_ps
#define VEC_LOAD_MASKED _mm512_maskz_loadu_ps
#define VEC_STORE_MASKED _mm512_mask_storeu_ps
#define VEC_FMA _mm512_fmadd_ps
#define VEC_LOAD _mm512_load_ps
#define VEC_LOADU _mm512_loadu_ps
#define VEC_TRANSPOSE fl_transpose_f32
#endif
#include "fastlstm_impl.h"
#undef REAL
#undef FL_SUFFIX
#undef TANH
#undef SIGMOID
#undef SOFTMAX_EXP
#undef LOG
#undef SQRT
#undef VEC
#undef VEC_MASK
#undef VEC_ZERO
#undef VEC_SET1
#undef VEC_LOAD_MASKED
#undef VEC_STORE_MASKED
#undef VEC_FMA
#undef VEC_LOAD
#undef VEC_LOADU
#undef VEC_TRANSPOSE

#define REAL double
#define FL_SUFFIX f64
#define TANH tanh
#define SIGMOID fl_sigmoid_f64
#define SOFTMAX_EXP exp
#define LOG log
#define SQRT sqrt
#if FL_ROW_KERNEL
#define VEC __m512d
#define VEC_MASK __mmask8
#define VEC_ZERO _mm512_setzero_pd
#define VEC_SET1 _mm512_set1_pd
#define VEC_LOAD_MASKED _mm512_maskz_loadu_pd
#define VEC_STORE_MASKED _mm512_mask_storeu_pd
#define VEC_FMA _mm512_fmadd_pd
#define VEC_LOAD _mm512_load_pd
#define VEC_LOADU _mm512_loadu_pd
#define VEC_TRANSPOSE fl_transpose_f64
#endif
#include "fastlstm_impl.h"
#undef REAL
#undef FL_SUFFIX
#undef TANH
#undef SIGMOID
#undef SOFTMAX_EXP
#undef LOG
#undef SQRT
#undef VEC
#undef VEC_MASK
#undef VEC_ZERO
#undef VEC_SET1
#undef VEC_LOAD_MASKED
#undef VEC_STORE_MASKED
#undef VEC_FMA
#undef VEC_LOAD
#undef VEC_LOADU
#undef VEC_TRANSPOSE
