/*
 * Type-generic body of the fastlstm kernels. fastlstm.c includes it twice: once with REAL = float
 * and FL_SUFFIX = f32, once with REAL = double and FL_SUFFIX = f64. TANH, SIGMOID, SOFTMAX_EXP,
 * LOG and SQRT name the functions of that type (libm's, or for float32 the vectorizable ones of
 * fastlstm_math.h), and blas_gemm_<suffix> the Fortran gemm installed by fl_set_blas.
 *
 * Shapes use the letters of fastlstm.h. Gate column blocks are i, j, f, o at offsets 0, H, 2H, 3H.
 */

#define FL_CAT_(a, b) a##_##b
#define FL_CAT(a, b) FL_CAT_(a, b)
#define FN(name) FL_CAT(name, FL_SUFFIX)

/* ------------------------------------------------------------------------------------------------
 * Matrix products.
 */

typedef REAL FN(vector) __attribute__((vector_size(FL_VECTOR_BYTES)));

/* C[M, N] += A[M, K] @ B[K, N] in direct loops, where A[row, p] is a[row * a_row_stride +
 * p * a_p_stride], so that one loop serves A and A^T. Each block of output columns stays in a
 * vector register across the whole sum over p. Every output element, in a vector lane or in the
 * scalar tail, is summed in the same order (c, then p = 0, 1, ...), so its bits do not depend on the
 * column it sits in. */
static inline void FN(gemm_loops)(int64_t m, int64_t n, int64_t k, const REAL *restrict a,
                                  int64_t a_row_stride, int64_t a_p_stride,
                                  const REAL *restrict b, int64_t ldb, REAL *restrict c,
                                  int64_t ldc)
{
    const int64_t lanes = (int64_t)(FL_VECTOR_BYTES / sizeof(REAL));
    for (int64_t row = 0; row < m; row++) {
        const REAL *a_row = a + row * a_row_stride;
        REAL *c_row = c + row * ldc;
        int64_t col = 0;
        for (; col + lanes <= n; col += lanes) {
            FN(vector) sum, b_block;
            memcpy(&sum, c_row + col, sizeof sum);
            for (int64_t p = 0; p < k; p++) {
                memcpy(&b_block, b + p * ldb + col, sizeof b_block);
                sum += a_row[p * a_p_stride] * b_block;
            }
            memcpy(c_row + col, &sum, sizeof sum);
        }
        for (; col < n; col++) {
            REAL sum = c_row[col];
            for (int64_t p = 0; p < k; p++) {
                sum += a_row[p * a_p_stride] * b[p * ldb + col];
            }
            c_row[col] = sum;
        }
    }
}

/* The row kernel: C[M, N] = op(A)[M, K] @ W[K, N] + beta * C for the large products. Every output
 * element is one chain of fused multiply-adds, started from C (or 0) and taken over p = 0, 1, ...,
 * K - 1 in order, whatever tile, lane or thread computes it. So a sample's row never depends on the
 * rows around it, on M, on the column it sits in or on the thread count, which OpenBLAS does not
 * promise: it rounds the edge rows of its blocks differently. The weight gradients (op(A) = X^T,
 * with the batch along K) use the same kernel, so they too are the same for every thread count.
 *
 * W is read in column blocks of FL_BLOCK_COLS: either in place (block j starts at w + j * width,
 * rows ldw apart) or packed by FN(pack), where block j is one contiguous [K, width] array. Packing
 * costs one pass over W and pays when the product runs many times (every step of a window) or has
 * many rows: the kernel then reads each block as one stream instead of K rows on K pages. */

#define FL_BLOCK_COLS ((int64_t)(128 / sizeof(REAL)))   /* two 512-bit registers */

/* Elements of the packed copy of a [K, N] weight matrix: whole column blocks, zero-padded. */
static inline int64_t FN(packed_size)(int64_t k, int64_t n)
{
    return (n + FL_BLOCK_COLS - 1) / FL_BLOCK_COLS * FL_BLOCK_COLS * k;
}

/* What FN(pack) copies: W [K, N] with row stride ldw, or W stored [N, K] when transposed is set. */
typedef struct {
    int64_t k, n, ldw;
    const REAL *w;
    int transposed;
    REAL *packed;
} FN(pack_job);

/* Column blocks [block_begin, block_end) of FN(pack): the share of one thread. */
static void FN(pack_blocks)(void *context, int64_t block_begin, int64_t block_end)
{
    const FN(pack_job) *job = (const FN(pack_job) *)context;
    const int64_t width = FL_BLOCK_COLS, k = job->k, n = job->n, ldw = job->ldw;
    for (int64_t col0 = block_begin * width; col0 < n && col0 < block_end * width; col0 += width) {
        REAL *block = job->packed + (col0 / width) * k * width;     /* [K, width] */
        const int64_t cols = n - col0 < width ? n - col0 : width;
        if (job->transposed) {
            for (int64_t col = 0; col < width; col++) {
                const REAL *w_row = job->w + (col0 + col) * ldw;     /* column col0 + col of W */
                for (int64_t p = 0; p < k; p++) {
                    block[p * width + col] = col < cols ? w_row[p] : 0;
                }
            }
        } else {
            for (int64_t p = 0; p < k; p++) {
                memcpy(block + p * width, job->w + p * ldw + col0, (size_t)cols * sizeof(REAL));
                memset(block + p * width + cols, 0, (size_t)(width - cols) * sizeof(REAL));
            }
        }
    }
}

/* packed = W in column blocks, from W [K, N] with row stride ldw, or, with transposed set, from W
 * stored [N, K] (so that the product is A @ W^T). Columns past N are zero. The pool's threads copy
 * a share of the blocks each, because packing dZ for the weight gradients moves megabytes. */
static void FN(pack)(int64_t k, int64_t n, const REAL *w, int64_t ldw, int transposed, REAL *packed)
{
    const FN(pack_job) job = {k, n, ldw, w, transposed, packed};
    const int64_t blocks = (n + FL_BLOCK_COLS - 1) / FL_BLOCK_COLS;
    const int64_t block_elems = k * FL_BLOCK_COLS;
    fl_parallel_for(blocks, (FL_MIN_THREAD_ELEMS + block_elems - 1) / block_elems, FN(pack_blocks),
                    (void *)&job);
}

/* n elements of this thread's scratch slot (see fl_scratch), or NULL; not to be freed. */
static REAL *FN(scratch)(int slot, int64_t n)
{
    return n < 1 ? NULL : (REAL *)fl_scratch(slot, (size_t)n * sizeof(REAL));
}

#if FL_ROW_KERNEL

#define LANES ((int64_t)(64 / sizeof(REAL)))   /* elements in one 512-bit register */

/* One register tile: ROWS rows by one column block (two registers), over k steps of the sum.
 *
 * With packed set, A comes as a panel (a[p * ROWS + r]) and W as a packed block (two full
 * registers per p), so that every address in the loop is a constant offset from two pointers.
 * Otherwise A is read in place (a[r * a_row + p * a_step]) and W through the column masks.
 * mask_0 and mask_1 select the columns of C that exist, so that the last block reads and writes
 * nothing of C past N. */
static inline __attribute__((always_inline)) FL_AVX512 void FN(row_tile)(
    const int rows, const int packed, int64_t k, const REAL *restrict a, int64_t a_row,
    int64_t a_step, const REAL *restrict w, int64_t ldw, int beta_one, REAL *restrict c,
    int64_t ldc, VEC_MASK mask_0, VEC_MASK mask_1)
{
    VEC sum_0[FL_TILE_ROWS], sum_1[FL_TILE_ROWS];
    for (int r = 0; r < rows; r++) {
        sum_0[r] = beta_one ? VEC_LOAD_MASKED(mask_0, c + r * ldc) : VEC_ZERO();
        sum_1[r] = beta_one ? VEC_LOAD_MASKED(mask_1, c + r * ldc + LANES) : VEC_ZERO();
    }

    for (int64_t p = 0; p < k; p++) {
        const VEC w_0 = packed ? VEC_LOAD(w + p * FL_BLOCK_COLS)
                               : VEC_LOAD_MASKED(mask_0, w + p * ldw);
        const VEC w_1 = packed ? VEC_LOAD(w + p * FL_BLOCK_COLS + LANES)
                               : VEC_LOAD_MASKED(mask_1, w + p * ldw + LANES);
        for (int r = 0; r < rows; r++) {
            const VEC a_rp = VEC_SET1(packed ? a[p * rows + r] : a[r * a_row + p * a_step]);
            sum_0[r] = VEC_FMA(a_rp, w_0, sum_0[r]);
            sum_1[r] = VEC_FMA(a_rp, w_1, sum_1[r]);
        }
    }

    for (int r = 0; r < rows; r++) {
        VEC_STORE_MASKED(c + r * ldc, mask_0, sum_0[r]);
        VEC_STORE_MASKED(c + r * ldc + LANES, mask_1, sum_1[r]);
    }
}

/* panel[p * height + r] = A[r, p] for the height rows and depth steps of one tile, where A[r, p] is
 * a[r * a_row + p * a_step]. Row-major A (a_step 1) is transposed in registers, a block of LANES
 * rows by LANES steps at a time; A^T (a_row 1) already has each step's rows side by side. Both are
 * plain copies, so the panel contains the same values as a scalar loop would write. */
static inline __attribute__((always_inline)) FL_AVX512 void FN(copy_panel)(
    int64_t height, int64_t depth, const REAL *restrict a, int64_t a_row, int64_t a_step,
    REAL *restrict panel)
{
    int64_t p = 0;
    if (a_step == 1) {
        for (; p + LANES <= depth; p += LANES) {
            for (int64_t r0 = 0; r0 < height; r0 += LANES) {
                const int64_t rows = height - r0 < LANES ? height - r0 : LANES;
                const VEC_MASK mask = (VEC_MASK)((1ull << rows) - 1);
                VEC block[LANES];
                for (int r = 0; r < LANES; r++) {
                    block[r] = r < rows ? VEC_LOADU(a + (r0 + r) * a_row + p) : VEC_ZERO();
                }
                VEC_TRANSPOSE(block);
                for (int q = 0; q < LANES; q++) {
                    VEC_STORE_MASKED(panel + (p + q) * height + r0, mask, block[q]);
                }
            }
        }
    } else if (a_row == 1) {
        for (; p < depth; p++) {
            for (int64_t r0 = 0; r0 < height; r0 += LANES) {
                const int64_t rows = height - r0 < LANES ? height - r0 : LANES;
                const VEC_MASK mask = (VEC_MASK)((1ull << rows) - 1);
                VEC_STORE_MASKED(panel + p * height + r0, mask,
                                 VEC_LOAD_MASKED(mask, a + p * a_step + r0));
            }
        }
    }
    for (; p < depth; p++) {
        for (int64_t r = 0; r < height; r++) {
            panel[p * height + r] = a[r * a_row + p * a_step];
        }
    }
}

/* C = op(A) @ W + beta * C, where A[row, p] is a[row * a_row + p * a_step] and column block j of W
 * starts at w + j * block_stride: FL_BLOCK_COLS for W in place (rows ldw apart), K * FL_BLOCK_COLS
 * for W packed by FN(pack) (ldw = FL_BLOCK_COLS). */
typedef struct {
    int64_t m, n, k, a_row, a_step, ldw, block_stride, ldc;
    const REAL *a, *w;
    REAL *c;
    int beta_one;
    int w_packed;   /* W packed by FN(pack) rather than in place */
} FN(row_product);

/* Columns [col_begin, col_end) of a product with one row and W in place (the streaming step):
 * c += a[p] * W[p, :] for p = 0, 1, ..., K - 1, so W is read row by row, one contiguous stream, and
 * the row of C stays in L1. Each element gets the same chain of fused multiply-adds as in
 * FN(row_tile). */
static FL_AVX512 void FN(gemv_row)(const FN(row_product) *job, int64_t col_begin, int64_t col_end)
{
    const int64_t k = job->k, ldw = job->ldw;
    REAL *c = job->c;
    if (!job->beta_one) {
        memset(c + col_begin, 0, (size_t)(col_end - col_begin) * sizeof(REAL));
    }
    for (int64_t p = 0; p < k; p++) {
        const VEC a_p = VEC_SET1(job->a[p * job->a_step]);
        const REAL *w_row = job->w + p * ldw;
        for (int64_t col = col_begin; col < col_end; col += LANES) {
            const int64_t left = col_end - col;
            const VEC_MASK mask = (VEC_MASK)(left < LANES ? (1ull << left) - 1 : ~0ull);
            const VEC sum = VEC_FMA(a_p, VEC_LOAD_MASKED(mask, w_row + col),
                                    VEC_LOAD_MASKED(mask, c + col));
            VEC_STORE_MASKED(c + col, mask, sum);
        }
    }
}

/* Rows [row_begin, row_end) and column blocks [block_begin, block_end) of the product: the share
 * of one thread.
 *
 * Loops, outside in:
 *   1. chunks of FL_CHUNK_ROWS rows.
 *   2. slices of the sum: K is cut into equal slices of at most FL_DEPTH steps. A slice's piece of
 *      A is copied into tile panels once, and then it serves every column block.
 *   3. column blocks: a block's slice of W (up to FL_DEPTH rows of 128 bytes) stays in L1 while
 *      the tiles pass.
 *   4. tiles.
 * Splitting the sum into slices keeps each element's chain of multiply-adds in order, because a
 * slice starts from the C that the previous one stored. */
static FL_AVX512 void FN(gemm_rows)(const FN(row_product) *job, int64_t row_begin, int64_t row_end,
                                    int64_t block_begin, int64_t block_end)
{
    const int64_t n = job->n, k = job->k, a_row = job->a_row, a_step = job->a_step;
    const int64_t ldw = job->ldw, block_stride = job->block_stride, ldc = job->ldc;
    const REAL *a = job->a, *w = job->w;
    REAL *c = job->c;
    const int w_packed = job->w_packed;
    const int64_t col_end = block_end * FL_BLOCK_COLS < n ? block_end * FL_BLOCK_COLS : n;
    if (row_end - row_begin == 1 && !w_packed) {
        FN(gemv_row)(job, block_begin * FL_BLOCK_COLS, col_end);
        return;
    }

    /* Tile panels of A for one chunk and slice; without memory, A is read in place. */
    const int64_t rows = row_end - row_begin;
    const int64_t chunk_rows = rows < FL_CHUNK_ROWS ? rows : FL_CHUNK_ROWS;
    const int64_t slices = (k + FL_DEPTH - 1) / FL_DEPTH;
    const int64_t slice_depth = (k + slices - 1) / slices;
    REAL *panels = NULL;
    if (w_packed) {
        panels = FN(scratch)(FL_SCRATCH_PANELS, chunk_rows * slice_depth);
    }

    for (int64_t first = row_begin; first < row_end; first += FL_CHUNK_ROWS) {
        const int64_t end = first + FL_CHUNK_ROWS < row_end ? first + FL_CHUNK_ROWS : row_end;
        const int64_t tiles = (end - first + FL_TILE_ROWS - 1) / FL_TILE_ROWS;
        for (int64_t p0 = 0; p0 < k; p0 += slice_depth) {
            const int64_t depth = k - p0 < slice_depth ? k - p0 : slice_depth;
            const int start_from_c = job->beta_one || p0 > 0;
            if (panels != NULL) {
                /* panel of the tile at row: panels[(row - first) * depth + p * height + r] */
                for (int64_t tile = 0, row = first; tile < tiles; tile++) {
                    const int64_t height = (end - row) / (tiles - tile);
                    FN(copy_panel)(height, depth, a + row * a_row + p0 * a_step, a_row, a_step,
                                   panels + (row - first) * depth);
                    row += height;
                }
            }

            for (int64_t col = block_begin * FL_BLOCK_COLS; col < col_end; col += FL_BLOCK_COLS) {
                const int64_t left = n - col;
                const int64_t cols_0 = left < LANES ? left : LANES;
                const int64_t cols_1 = left - cols_0 < LANES ? left - cols_0 : LANES;
                const VEC_MASK mask_0 = (VEC_MASK)((1ull << cols_0) - 1);
                const VEC_MASK mask_1 = (VEC_MASK)((1ull << cols_1) - 1);
                const REAL *w_slice = w + (col / FL_BLOCK_COLS) * block_stride + p0 * ldw;
                for (int64_t tile = 0, row = first; tile < tiles; tile++) {
                    const int64_t height = (end - row) / (tiles - tile);
                    REAL *c_tile = c + row * ldc + col;
                    /* One unrolled copy per tile height and per way of reading A and W. */
#define FL_TILE(ROWS, PACKED, A, A_ROW, A_STEP, LDW)                                              \
    case ROWS:                                                                                    \
        FN(row_tile)(ROWS, PACKED, depth, A, A_ROW, A_STEP, w_slice, LDW, start_from_c, c_tile,  \
                     ldc, mask_0, mask_1);                                                        \
        break;
#define FL_TILES(PACKED, A, A_ROW, A_STEP, LDW)                                                   \
    switch (height) {                                                                             \
        FL_TILE(12, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(11, PACKED, A, A_ROW, A_STEP, LDW)     \
        FL_TILE(10, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(9, PACKED, A, A_ROW, A_STEP, LDW)      \
        FL_TILE(8, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(7, PACKED, A, A_ROW, A_STEP, LDW)       \
        FL_TILE(6, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(5, PACKED, A, A_ROW, A_STEP, LDW)       \
        FL_TILE(4, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(3, PACKED, A, A_ROW, A_STEP, LDW)       \
        FL_TILE(2, PACKED, A, A_ROW, A_STEP, LDW) FL_TILE(1, PACKED, A, A_ROW, A_STEP, LDW)       \
    }
                    if (panels != NULL) {
                        const REAL *panel = panels + (row - first) * depth;
                        FL_TILES(1, panel, 0, 0, FL_BLOCK_COLS)
                    } else {
                        const REAL *a_tile = a + row * a_row + p0 * a_step;
                        FL_TILES(0, a_tile, a_row, a_step, ldw)
                    }
#undef FL_TILES
#undef FL_TILE
                    row += height;
                }
            }
        }
    }
}

/* The pool's tasks: a share of the column blocks with all rows, or a share of the rows with all
 * column blocks. */
static FL_AVX512 void FN(gemm_rows_by_blocks)(void *context, int64_t block_begin, int64_t block_end)
{
    const FN(row_product) *job = (const FN(row_product) *)context;
    FN(gemm_rows)(job, 0, job->m, block_begin, block_end);
}

static FL_AVX512 void FN(gemm_rows_by_rows)(void *context, int64_t row_begin, int64_t row_end)
{
    const FN(row_product) *job = (const FN(row_product) *)context;
    FN(gemm_rows)(job, row_begin, row_end, 0, (job->n + FL_BLOCK_COLS - 1) / FL_BLOCK_COLS);
}

/* Runs the product on the pool's threads when there is enough work to pay for waking them. Each
 * thread copies the panels of A for the rows it multiplies. Split by column blocks, every thread
 * copies all of A; split by rows, each copies only its own rows, but every thread reads all of W.
 * So a product with a chunk of rows or more per thread is split by rows, the others by columns. */
static void FN(gemm_rows_parallel)(int64_t m, int64_t n, int64_t k, const REAL *a, int64_t a_row,
                                   int64_t a_step, const REAL *w, int w_packed, int64_t ldw,
                                   int64_t block_stride, int beta_one, REAL *c, int64_t ldc)
{
    const FN(row_product) job = {m, n, k, a_row, a_step, ldw, block_stride, ldc, a, w, c, beta_one,
                                 w_packed};
    const int64_t blocks = (n + FL_BLOCK_COLS - 1) / FL_BLOCK_COLS;
    if (w_packed && m >= (int64_t)fl_get_num_threads() * FL_CHUNK_ROWS) {
        const int64_t row_work = n * k;                        /* multiply-adds per row */
        fl_parallel_for(m, (FL_MIN_THREAD_WORK + row_work - 1) / row_work, FN(gemm_rows_by_rows),
                        (void *)&job);
        return;
    }
    const int64_t block_work = m * k * FL_BLOCK_COLS;          /* multiply-adds per block */
    fl_parallel_for(blocks, (FL_MIN_THREAD_WORK + block_work - 1) / block_work,
                    FN(gemm_rows_by_blocks), (void *)&job);
}

#undef LANES
#endif /* FL_ROW_KERNEL */

/* The portable kernel: the row kernel's product over the same packed W for CPUs without AVX-512F
 * (or with the row kernel switched off), in the baseline instruction set's 16-byte vectors. A tile
 * is up to 4 rows by two vectors of columns, taken from one packed column block. Each output element
 * is one chain, started from C (or 0) and taken over p = 0, 1, ..., K - 1 in order, of a multiply
 * and an add (no contraction, as in FN(gemm_loops)), whatever tile or thread computes it. So a
 * sample's row does not depend on the rows around it here either. It is slower than OpenBLAS. */
#define FL_PORTABLE_ROWS 4

static inline __attribute__((always_inline)) void FN(portable_tile)(
    const int rows, int64_t k, const REAL *restrict a, int64_t a_row, int64_t a_step,
    const REAL *restrict w, int beta_one, REAL *restrict c, int64_t ldc, int64_t cols)
{
    const int64_t lanes = (int64_t)(FL_VECTOR_BYTES / sizeof(REAL));
    FN(vector) sum_0[FL_PORTABLE_ROWS], sum_1[FL_PORTABLE_ROWS];
    REAL edge[2 * FL_VECTOR_BYTES / sizeof(REAL)];             /* a row of C past column N */
    for (int r = 0; r < rows; r++) {
        memset(edge, 0, sizeof edge);
        if (beta_one) {
            memcpy(edge, c + r * ldc, (size_t)cols * sizeof(REAL));
        }
        memcpy(&sum_0[r], edge, sizeof sum_0[r]);
        memcpy(&sum_1[r], edge + lanes, sizeof sum_1[r]);
    }

    for (int64_t p = 0; p < k; p++) {
        FN(vector) w_0, w_1;
        memcpy(&w_0, w + p * FL_BLOCK_COLS, sizeof w_0);
        memcpy(&w_1, w + p * FL_BLOCK_COLS + lanes, sizeof w_1);
        for (int r = 0; r < rows; r++) {
            const REAL a_rp = a[r * a_row + p * a_step];
            sum_0[r] += a_rp * w_0;
            sum_1[r] += a_rp * w_1;
        }
    }

    for (int r = 0; r < rows; r++) {
        memcpy(edge, &sum_0[r], sizeof sum_0[r]);
        memcpy(edge + lanes, &sum_1[r], sizeof sum_1[r]);
        memcpy(c + r * ldc, edge, (size_t)cols * sizeof(REAL));
    }
}

/* What FN(portable_blocks) computes: C = op(A) @ W + beta * C with W packed by FN(pack), where
 * A[row, p] is a[row * a_row + p * a_step]. */
typedef struct {
    int64_t m, n, k, a_row, a_step, ldc;
    const REAL *a, *packed;
    REAL *c;
    int beta_one;
} FN(portable_job);

/* Column blocks [block_begin, block_end) of the portable product: the share of one thread. A slice
 * of two vectors of a block (K rows of 32 bytes) stays in L1 while the row tiles pass. */
static void FN(portable_blocks)(void *context, int64_t block_begin, int64_t block_end)
{
    const FN(portable_job) *job = (const FN(portable_job) *)context;
    const int64_t width = 2 * (int64_t)(FL_VECTOR_BYTES / sizeof(REAL));
    for (int64_t block = block_begin; block < block_end; block++) {
        const REAL *w_block = job->packed + block * job->k * FL_BLOCK_COLS;
        for (int64_t sub = 0; sub < FL_BLOCK_COLS; sub += width) {
            const int64_t col = block * FL_BLOCK_COLS + sub;
            if (col >= job->n) {
                break;
            }
            const int64_t cols = job->n - col < width ? job->n - col : width;
            for (int64_t row = 0; row < job->m; row += FL_PORTABLE_ROWS) {
                const int64_t left = job->m - row;
                const REAL *a_tile = job->a + row * job->a_row;
                REAL *c_tile = job->c + row * job->ldc + col;
                /* One unrolled copy per tile height. */
#define FL_PORTABLE_TILE(ROWS)                                                                         case ROWS:                                                                                             FN(portable_tile)(ROWS, job->k, a_tile, job->a_row, job->a_step, w_block + sub,                                      job->beta_one, c_tile, job->ldc, cols);                                          break;
                switch (left < FL_PORTABLE_ROWS ? left : FL_PORTABLE_ROWS) {
                    FL_PORTABLE_TILE(4) FL_PORTABLE_TILE(3) FL_PORTABLE_TILE(2) FL_PORTABLE_TILE(1)
                }
#undef FL_PORTABLE_TILE
            }
        }
    }
}

/* True when products with this weight operand go to a packed kernel: the row kernel where it runs,
 * else the portable one. */
static inline int FN(uses_packed_kernel)(int64_t weight_elems)
{
    return weight_elems >= FL_BLAS_MIN_WEIGHTS;
}

/* C[M, N] = op(A)[M, K] @ W + beta * C, W packed by FN(pack), through the row kernel where it runs
 * and the portable kernel elsewhere. With trans_a set, A is stored [K, M]. */
static void FN(gemm_packed)(int trans_a, int64_t m, int64_t n, int64_t k, const REAL *a,
                            int64_t lda, const REAL *packed, int beta_one, REAL *c, int64_t ldc)
{
#if FL_ROW_KERNEL
    if (fl_row_kernel_on()) {
        FN(gemm_rows_parallel)(m, n, k, a, trans_a ? 1 : lda, trans_a ? lda : 1, packed, 1,
                               FL_BLOCK_COLS, k * FL_BLOCK_COLS, beta_one, c, ldc);
        return;
    }
#endif
    const FN(portable_job) job = {m, n, k, trans_a ? 1 : lda, trans_a ? lda : 1, ldc, a, packed, c,
                                  beta_one};
    const int64_t blocks = (n + FL_BLOCK_COLS - 1) / FL_BLOCK_COLS;
    const int64_t block_work = m * k * FL_BLOCK_COLS;
    fl_parallel_for(blocks, (FL_MIN_THREAD_WORK + block_work - 1) / block_work, FN(portable_blocks),
                    (void *)&job);
}

/* Row-major C[M, N] = op(A)[M, K] @ op(B)[K, N] + beta * C, with beta 0 or 1. op transposes when
 * its flag is set: then A is stored [K, M] and B is stored [N, K]. weight_elems is the size of the
 * weight operand and alone decides between the packed kernels and direct loops (see
 * FL_BLAS_MIN_WEIGHTS). */
static void FN(gemm)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                     const REAL *restrict a, int64_t lda, const REAL *restrict b, int64_t ldb,
                     int beta_one, REAL *restrict c, int64_t ldc, int64_t weight_elems)
{
    if (FN(uses_packed_kernel)(weight_elems)) {
#if FL_ROW_KERNEL
        if (fl_row_kernel_on() && !trans_b && m <= FL_TILE_ROWS) {
            /* One tile of rows reads W once: packing would only add a second pass. */
            FN(gemm_rows_parallel)(m, n, k, a, trans_a ? 1 : lda, trans_a ? lda : 1, b, 0, ldb,
                                   FL_BLOCK_COLS, beta_one, c, ldc);
            return;
        }
#endif
        if (!trans_b && m == 1) {
            /* One row, as in a streaming step: c += a[p] * W[p, :] for p = 0, 1, ..., the portable
             * kernel's chain for every element, reading W in place, row after row. */
            if (!beta_one) {
                memset(c, 0, (size_t)n * sizeof(REAL));
            }
            for (int64_t p = 0; p < k; p++) {
                const REAL a_p = a[trans_a ? p * lda : p];
                const REAL *restrict w_row = b + p * ldb;
                for (int64_t col = 0; col < n; col++) {
                    c[col] += a_p * w_row[col];
                }
            }
            return;
        }
        /* Callers that multiply by the same W many times pack it once themselves. Without memory
         * for the packed copy, BLAS takes over. */
        REAL *packed = FN(scratch)(FL_SCRATCH_PRODUCT, FN(packed_size)(k, n));
        if (packed != NULL) {
            FN(pack)(k, n, b, ldb, trans_b, packed);
            FN(gemm_packed)(trans_a, m, n, k, a, lda, packed, beta_one, c, ldc);
            return;
        }
    }
    int fits_int = m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX && ldb < INT_MAX
                   && ldc < INT_MAX;
    if (FN(blas_gemm) != NULL && weight_elems >= FL_BLAS_MIN_WEIGHTS && fits_int) {
        /* Fortran BLAS is column-major: C^T = op(B)^T @ op(A)^T, so the operands swap places. */
        char fortran_trans_a = trans_b ? 'T' : 'N';
        char fortran_trans_b = trans_a ? 'T' : 'N';
        int fm = (int)n, fn = (int)m, fk = (int)k;
        int flda = (int)ldb, fldb = (int)lda, fldc = (int)ldc;
        REAL alpha = 1, beta = beta_one ? 1 : 0;
        fl_pool_rest();
        FN(blas_gemm)(&fortran_trans_a, &fortran_trans_b, &fm, &fn, &fk, &alpha, (REAL *)b, &flda,
                      (REAL *)a, &fldb, &beta, c, &fldc);
        return;
    }

    if (!beta_one) {
        for (int64_t row = 0; row < m; row++) {
            memset(c + row * ldc, 0, (size_t)n * sizeof(REAL));
        }
    }
    if (!trans_a && !trans_b) {
        FN(gemm_loops)(m, n, k, a, lda, 1, b, ldb, c, ldc);
    } else if (trans_a && !trans_b) {
        /* C += A^T @ B with A stored [K, M]: the weight gradients, summed over the K = T * B rows. */
        FN(gemm_loops)(m, n, k, a, 1, lda, b, ldb, c, ldc);
    } else if (n * k <= FL_SMALL_TRANSPOSE) {
        /* C += A @ B^T with a small B stored [N, K]: transpose B once, then the contiguous
         * A @ B loop, which vectorizes where the dot products below cannot. */
        REAL b_transposed[FL_SMALL_TRANSPOSE];
        for (int64_t col = 0; col < n; col++) {
            for (int64_t p = 0; p < k; p++) {
                b_transposed[p * n + col] = b[col * ldb + p];
            }
        }
        FN(gemm_loops)(m, n, k, a, lda, 1, b_transposed, n, c, ldc);
    } else {
        /* C += A @ B^T with B stored [N, K]: one dot product per output. */
        for (int64_t row = 0; row < m; row++) {
            const REAL *a_row = a + row * lda;
            for (int64_t col = 0; col < n; col++) {
                const REAL *b_row = b + col * ldb;
                REAL sum = 0;
                for (int64_t p = 0; p < k; p++) {
                    sum += a_row[p] * b_row[p];
                }
                c[row * ldc + col] += sum;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Pointwise cell, forward and backward.
 */

/* The sigmoid of the cell's gates i, f and o: fl_sigmoid_f32 in float32, 0.5 * tanh(z / 2) + 0.5
 * in float64 (see fastlstm.c). Both are exactly 0 or 1 where they saturate. */
static inline __attribute__((always_inline)) REAL FN(sigmoid)(REAL z)
{
    return SIGMOID(z);
}

/* Forward of one step for B rows.
 *   gates  [B, G] read as pre-activations, overwritten with the activations i, j, f, o (tape)
 *   c_prev [B, H] read;  c_next, h_next [B, H] written. c_next may be c_prev (in-place update). */
/* One row of cell_forward. The gate blocks are restrict parameters, so the compiler may assume they
 * are disjoint and vectorizes the loop over units. c_prev and c_next may be the same row. */
static inline __attribute__((always_inline)) void FN(cell_forward_row)(int64_t hidden, REAL *restrict zi, REAL *restrict zj,
                                        REAL *restrict zf, REAL *restrict zo, const REAL *c_prev,
                                        REAL *c_next, REAL *restrict h_next, REAL forget_bias)
{
    for (int64_t u = 0; u < hidden; u++) {
        const REAL i = FN(sigmoid)(zi[u]);
        const REAL j = TANH(zj[u]);
        const REAL f = FN(sigmoid)(zf[u] + forget_bias);
        const REAL o = FN(sigmoid)(zo[u]);
        const REAL c = c_prev[u] * f + i * j;
        c_next[u] = c;
        h_next[u] = TANH(c) * o;
        zi[u] = i;
        zj[u] = j;
        zf[u] = f;
        zo[u] = o;
    }
}

/* The cell's rows [begin, end) as a task of the thread pool, compiled twice: for the baseline
 * instruction set and, for wide layers on AVX-512 CPUs, with 16 lanes. Both run the same IEEE
 * operations in the same order (no contraction), so their results are bitwise equal. */
typedef struct {
    int64_t hidden;
    REAL *gates;
    const REAL *c_prev;
    REAL *c_next, *h_next;
    REAL forget_bias;
} FN(cell_forward_job);

#define FL_CELL_FORWARD_ROWS                                                                      \
    {                                                                                             \
        const FN(cell_forward_job) *job = (const FN(cell_forward_job) *)context;                 \
        const int64_t hidden = job->hidden, g = 4 * hidden;                                       \
        for (int64_t row = begin; row < end; row++) {                                             \
            REAL *z = job->gates + row * g;                                                       \
            FN(cell_forward_row)(hidden, z, z + hidden, z + 2 * hidden, z + 3 * hidden,           \
                                 job->c_prev + row * hidden, job->c_next + row * hidden,          \
                                 job->h_next + row * hidden, job->forget_bias);                   \
        }                                                                                         \
    }

static void FN(cell_forward_rows)(void *context, int64_t begin, int64_t end)
FL_CELL_FORWARD_ROWS

#if FL_ROW_KERNEL
static FL_AVX512 void FN(cell_forward_rows_wide)(void *context, int64_t begin, int64_t end)
FL_CELL_FORWARD_ROWS
#endif
#undef FL_CELL_FORWARD_ROWS

static void FN(cell_forward)(int64_t batch, int64_t hidden, REAL *gates, const REAL *c_prev,
                             REAL *c_next, REAL *h_next, REAL forget_bias)
{
    const FN(cell_forward_job) job = {hidden, gates, c_prev, c_next, h_next, forget_bias};
    fl_task task = FN(cell_forward_rows);
#if FL_ROW_KERNEL
    if (hidden >= FL_WIDE_CELL && fl_row_kernel_on()) {
        task = FN(cell_forward_rows_wide);
    }
#endif
    if (hidden < FL_WIDE_CELL && batch * hidden < 2 * FL_MIN_CELL_WORK) {
        FN(cell_forward_rows)((void *)&job, 0, batch);   /* a direct call, inlined for small cells */
        return;
    }
    fl_parallel_for(batch, (FL_MIN_CELL_WORK + hidden - 1) / hidden, task, (void *)&job);
}

/* Backward of one step for B rows.
 *   acts   [B, G] read (i, j, f, o);  c_prev, c_next [B, H] read;  d_out [B, H] read
 *   d_h    [B, H] read: gradient flowing into h_t from step t + 1
 *   d_c    [B, H] read as the gradient of c_t from step t + 1, written with that of c_{t-1}
 *   dz     [B, G] written: gradient of the pre-activations */
/* One row of cell_backward; restrict for the same reason as in cell_forward_row. */
static inline __attribute__((always_inline)) void FN(cell_backward_row)(int64_t hidden, const REAL *restrict ai,
                                         const REAL *restrict aj, const REAL *restrict af,
                                         const REAL *restrict ao, const REAL *restrict c_prev,
                                         const REAL *restrict c_next, const REAL *restrict d_out,
                                         const REAL *restrict d_h, REAL *restrict d_c,
                                         REAL *restrict di, REAL *restrict dj, REAL *restrict df,
                                         REAL *restrict d_o)
{
    for (int64_t u = 0; u < hidden; u++) {
        const REAL i = ai[u], j = aj[u], f = af[u], o = ao[u];
        const REAL tanh_c = TANH(c_next[u]);
        const REAL dh = d_out[u] + d_h[u];
        /* h = tanh(c) * o */
        const REAL d_gate_o = dh * tanh_c;
        const REAL dc = d_c[u] + dh * o * (1 - tanh_c * tanh_c);
        /* c = c_prev * f + i * j. The sigmoid derivative f * (1 - f) multiplies c_prev first:
         * it is exactly 0 where f saturates, which keeps a huge c_prev from making inf * 0. */
        di[u] = dc * j * (i * (1 - i));
        dj[u] = dc * i * (1 - j * j);
        df[u] = dc * (c_prev[u] * (f * (1 - f)));
        d_o[u] = d_gate_o * (o * (1 - o));
        d_c[u] = dc * f;
    }
}

typedef struct {
    int64_t hidden;
    const REAL *acts, *c_prev, *c_next, *d_out, *d_h;
    REAL *d_c, *dz;
} FN(cell_backward_job);

#define FL_CELL_BACKWARD_ROWS                                                                     \
    {                                                                                             \
        const FN(cell_backward_job) *job = (const FN(cell_backward_job) *)context;               \
        const int64_t hidden = job->hidden, g = 4 * hidden;                                       \
        for (int64_t row = begin; row < end; row++) {                                             \
            const REAL *a = job->acts + row * g;                                                  \
            REAL *d = job->dz + row * g;                                                          \
            const int64_t at = row * hidden;                                                      \
            FN(cell_backward_row)(hidden, a, a + hidden, a + 2 * hidden, a + 3 * hidden,          \
                                  job->c_prev + at, job->c_next + at, job->d_out + at,            \
                                  job->d_h + at, job->d_c + at, d, d + hidden, d + 2 * hidden,    \
                                  d + 3 * hidden);                                                \
        }                                                                                         \
    }

static void FN(cell_backward_rows)(void *context, int64_t begin, int64_t end)
FL_CELL_BACKWARD_ROWS

#if FL_ROW_KERNEL
static FL_AVX512 void FN(cell_backward_rows_wide)(void *context, int64_t begin, int64_t end)
FL_CELL_BACKWARD_ROWS
#endif
#undef FL_CELL_BACKWARD_ROWS

static void FN(cell_backward)(int64_t batch, int64_t hidden, const REAL *acts, const REAL *c_prev,
                              const REAL *c_next, const REAL *d_out, const REAL *d_h, REAL *d_c,
                              REAL *dz)
{
    const FN(cell_backward_job) job = {hidden, acts, c_prev, c_next, d_out, d_h, d_c, dz};
    fl_task task = FN(cell_backward_rows);
#if FL_ROW_KERNEL
    if (hidden >= FL_WIDE_CELL && fl_row_kernel_on()) {
        task = FN(cell_backward_rows_wide);
    }
#endif
    if (hidden < FL_WIDE_CELL && batch * hidden < 2 * FL_MIN_CELL_WORK) {
        FN(cell_backward_rows)((void *)&job, 0, batch);
        return;
    }
    fl_parallel_for(batch, (FL_MIN_CELL_WORK + hidden - 1) / hidden, task, (void *)&job);
}

/* ------------------------------------------------------------------------------------------------
 * Layers over T steps.
 */

/* Arguments of the row-wise copies below; ids is NULL for FN(fill_rows). */
typedef struct {
    int64_t rows, g;
    const int64_t *ids;
    const REAL *w, *bias;
    REAL *out;
} FN(rows_job);

static void FN(fill_rows_range)(void *context, int64_t begin, int64_t end)
{
    const FN(rows_job) *job = (const FN(rows_job) *)context;
    for (int64_t row = begin; row < end; row++) {
        memcpy(job->out + row * job->g, job->bias, (size_t)job->g * sizeof(REAL));
    }
}

/* Sets each of rows rows of out [rows, G] to the bias [G], a share of the rows per thread. */
static void FN(fill_rows)(int64_t rows, int64_t g, const REAL *bias, REAL *out)
{
    const FN(rows_job) job = {rows, g, NULL, NULL, bias, out};
    fl_parallel_for(rows, (FL_MIN_THREAD_ELEMS + g - 1) / g, FN(fill_rows_range), (void *)&job);
}

static void FN(gather_rows_range)(void *context, int64_t begin, int64_t end)
{
    const FN(rows_job) *job = (const FN(rows_job) *)context;
    const int64_t g = job->g;
    for (int64_t row = begin; row < end; row++) {
        const REAL *restrict w_row = job->w + job->ids[row] * g;
        REAL *restrict out_row = job->out + row * g;
        for (int64_t col = 0; col < g; col++) {
            out_row[col] = job->bias[col] + w_row[col];
        }
    }
}

/* Input projection of layer 0 from token ids: out [rows, G] = b + W_x[ids[row]] for each row.
 * ids [rows] read (already checked to lie in [0, I)); w_x [I, G] and bias [G] read. This is
 * onehot(ids) @ W_x + b without the one-hot matrix: the product selects row id of W_x. */
static void FN(gather_rows)(int64_t rows, int64_t g, const int64_t *ids, const REAL *w_x,
                            const REAL *bias, REAL *out)
{
    const FN(rows_job) job = {rows, g, ids, w_x, bias, out};
    fl_parallel_for(rows, (FL_MIN_THREAD_ELEMS + g - 1) / g, FN(gather_rows_range), (void *)&job);
}

/* Columns [begin, end) of FN(scatter_add_rows) (ids set) or FN(add_column_sums) (ids NULL), over
 * all rows in row order: out is dW_x [I, G] or the bias gradient [G], w is dZ [rows, G]. */
static void FN(add_rows_range)(void *context, int64_t begin, int64_t end)
{
    const FN(rows_job) *job = (const FN(rows_job) *)context;
    const int64_t g = job->g;
    for (int64_t row = 0; row < job->rows; row++) {
        const REAL *restrict dz_row = job->w + row * g;
        REAL *restrict out_row = job->out + (job->ids != NULL ? job->ids[row] * g : 0);
        for (int64_t col = begin; col < end; col++) {
            out_row[col] += dz_row[col];
        }
    }
}

/* Backward of gather_rows for the weights: dW_x[ids[row]] += dz[row] for each row, in row order.
 * ids [rows] read; dz [rows, G] read; dw_x [I, G] accumulated. The threads split the columns, so
 * each element still gets its rows in order. */
static void FN(scatter_add_rows)(int64_t rows, int64_t g, const int64_t *ids, const REAL *dz,
                                 REAL *dw_x)
{
    const FN(rows_job) job = {rows, g, ids, dz, NULL, dw_x};
    fl_parallel_for(g, (FL_MIN_THREAD_ELEMS + rows - 1) / rows, FN(add_rows_range), (void *)&job);
}

/* d_bias [G] += the sum of the rows of dz [rows, G], in row order, the columns split as above. */
static void FN(add_column_sums)(int64_t rows, int64_t g, const REAL *dz, REAL *d_bias)
{
    const FN(rows_job) job = {rows, g, NULL, dz, NULL, d_bias};
    fl_parallel_for(g, (FL_MIN_THREAD_ELEMS + rows - 1) / rows, FN(add_rows_range), (void *)&job);
}

int FN(fl_forward)(const fl_dims *dims, const REAL *params, const REAL *x, const int64_t *ids,
                   REAL *state, REAL *gates, REAL *cs, REAL *hs, double forget_bias, int keep_tape)
{
    if (!fl_dims_valid(dims)) {
        return FL_EINVAL_SIZE;
    }
    if (ids != NULL && !fl_ids_valid(dims->steps * dims->batch, ids, dims->input)) {
        return FL_EINVAL_ID;
    }
    const int64_t layers = dims->layers, steps = dims->steps, batch = dims->batch;
    const int64_t hidden = dims->hidden, g = 4 * hidden;
    const int64_t rows = steps * batch;                 /* T * B rows of the input projection */
    const int64_t bh = batch * hidden, bg = batch * g;
    /* Tape slot sizes; without keep_tape every layer uses slot 0. */
    const int64_t gates_slot = keep_tape ? rows * g : 0;
    const int64_t state_slot = keep_tape ? (steps + 1) * bh : 0;

    /* The row kernel reads packed copies of W_x and W_h, made once per layer for all T steps.
     * They live in this thread's scratch, so a steady-state call allocates nothing. */
    const int64_t widest = dims->input > hidden ? dims->input : hidden;
    REAL *packed_x = NULL, *packed_h = NULL;                   /* [I_l, G] and [H, G], packed */
    if (FN(uses_packed_kernel)(hidden * g) || FN(uses_packed_kernel)(dims->input * g)) {
        packed_x = FN(scratch)(FL_SCRATCH_CALL, FN(packed_size)(widest, g) + FN(packed_size)(hidden, g));
        if (packed_x == NULL) {
            return FL_ENOMEM;
        }
        packed_h = packed_x + FN(packed_size)(widest, g);
    }

    const REAL *layer_params = params;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t in = l == 0 ? dims->input : hidden;      /* I_l */
        const REAL *w_x = layer_params;                        /* [I_l, G] */
        const REAL *w_h = w_x + in * g;                        /* [H, G] */
        const REAL *bias = w_h + hidden * g;                   /* [G] */
        REAL *z = gates + l * gates_slot;                      /* [T, B, G] */
        REAL *c = cs + l * state_slot;                         /* [T + 1, B, H] */
        REAL *h = hs + l * state_slot;                         /* [T + 1, B, H] */
        /* Layer 0 reads x; layer l > 0 reads the outputs of layer l - 1 at steps 1..T. Without
         * keep_tape that is h itself, which the projection reads before the time loop writes it. */
        const REAL *inputs = l == 0 ? x : hs + (l - 1) * state_slot + bh;   /* [T, B, I_l] */

        /* Input projection for all steps: Z = X @ W_x + b, or Z = W_x[ids] + b from token ids. */
        if (l == 0 && ids != NULL) {
            FN(gather_rows)(rows, g, ids, w_x, bias, z);
        } else {
            FN(fill_rows)(rows, g, bias, z);
            if (FN(uses_packed_kernel)(in * g)) {
                FN(pack)(in, g, w_x, g, 0, packed_x);
                FN(gemm_packed)(0, rows, g, in, inputs, in, packed_x, 1, z, g);
            } else {
                FN(gemm)(0, 0, rows, g, in, inputs, in, w_x, g, 1, z, g, in * g);
            }
        }

        memcpy(c, state + (2 * l) * bh, (size_t)bh * sizeof(REAL));
        memcpy(h, state + (2 * l + 1) * bh, (size_t)bh * sizeof(REAL));

        /* Time loop: Z_t += h_{t-1} @ W_h, then the cell. */
        const int packed_w_h = FN(uses_packed_kernel)(hidden * g);
        if (packed_w_h) {
            FN(pack)(hidden, g, w_h, g, 0, packed_h);
        }
        for (int64_t t = 0; t < steps; t++) {
            if (packed_w_h) {
                FN(gemm_packed)(0, batch, g, hidden, h + t * bh, hidden, packed_h, 1, z + t * bg, g);
            } else {
                FN(gemm)(0, 0, batch, g, hidden, h + t * bh, hidden, w_h, g, 1, z + t * bg, g,
                         hidden * g);
            }
            FN(cell_forward)(batch, hidden, z + t * bg, c + t * bh, c + (t + 1) * bh,
                             h + (t + 1) * bh, (REAL)forget_bias);
        }

        memcpy(state + (2 * l) * bh, c + steps * bh, (size_t)bh * sizeof(REAL));
        memcpy(state + (2 * l + 1) * bh, h + steps * bh, (size_t)bh * sizeof(REAL));
        layer_params = bias + g;
    }
    fl_pool_rest();
    return FL_OK;
}

int FN(fl_backward)(const fl_dims *dims, const REAL *params, const REAL *x, const int64_t *ids,
                    const REAL *gates, const REAL *cs, const REAL *hs, const REAL *d_y,
                    const REAL *d_final_state, REAL *grad, REAL *d_state, REAL *d_x, REAL *dz,
                    REAL *d_hidden)
{
    if (!fl_dims_valid(dims)) {
        return FL_EINVAL_SIZE;
    }
    if (ids != NULL && !fl_ids_valid(dims->steps * dims->batch, ids, dims->input)) {
        return FL_EINVAL_ID;
    }
    const int64_t layers = dims->layers, steps = dims->steps, batch = dims->batch;
    const int64_t hidden = dims->hidden, g = 4 * hidden;
    const int64_t rows = steps * batch;
    const int64_t bh = batch * hidden, bg = batch * g;
    const int64_t state_slot = (steps + 1) * bh;

    /* The row kernel multiplies by W^T from a packed transposed copy, one buffer for every
     * layer's W_h and W_x in turn, made once per call instead of once per step. */
    const int64_t widest = dims->input > hidden ? dims->input : hidden;
    REAL *packed_t = NULL;                                     /* W_h^T [G, H] or W_x^T [G, I_l] */
    REAL *packed_dz = NULL;                                    /* dZ [T * B, G], for dW_x and dW_h */
    if (FN(uses_packed_kernel)(hidden * g) || FN(uses_packed_kernel)(dims->input * g)) {
        packed_t = FN(scratch)(FL_SCRATCH_CALL, FN(packed_size)(g, widest) + FN(packed_size)(rows, g));
        if (packed_t == NULL) {
            return FL_ENOMEM;
        }
        packed_dz = packed_t + FN(packed_size)(g, widest);
    }

    /* Gradient of the outputs of the layer being processed: d_y for the top layer, then the input
     * gradient of the layer above, which that layer writes into d_hidden after its time loop. */
    const REAL *d_out = d_y;
    for (int64_t l = layers - 1; l >= 0; l--) {
        const int64_t in = l == 0 ? dims->input : hidden;
        const int64_t offset = fl_layer_offset(dims, l);
        const REAL *w_x = params + offset;                     /* [I_l, G] */
        const REAL *w_h = w_x + in * g;                        /* [H, G] */
        REAL *dw_x = grad + offset;                            /* [I_l, G] += */
        REAL *dw_h = dw_x + in * g;                            /* [H, G] += */
        REAL *d_bias = dw_h + hidden * g;                      /* [G] += */
        const REAL *acts = gates + l * rows * g;               /* [T, B, G] */
        const REAL *c = cs + l * state_slot;                   /* [T + 1, B, H] */
        const REAL *h = hs + l * state_slot;                   /* [T + 1, B, H] */
        const REAL *inputs = l == 0 ? x : hs + (l - 1) * state_slot + bh;   /* [T, B, I_l] */
        REAL *d_c = d_state + (2 * l) * bh;                    /* carry, then d c_0 */
        REAL *d_h = d_state + (2 * l + 1) * bh;                /* carry, then d h_0 */

        if (d_final_state != NULL) {
            memcpy(d_c, d_final_state + (2 * l) * bh, (size_t)bh * sizeof(REAL));
            memcpy(d_h, d_final_state + (2 * l + 1) * bh, (size_t)bh * sizeof(REAL));
        } else {
            memset(d_c, 0, (size_t)bh * sizeof(REAL));
            memset(d_h, 0, (size_t)bh * sizeof(REAL));
        }

        /* Reversed time loop: dZ_t from the cell, then dh_{t-1} = dZ_t @ W_h^T. */
        const int packed_w_h = FN(uses_packed_kernel)(hidden * g);
        if (packed_w_h) {
            FN(pack)(g, hidden, w_h, g, 1, packed_t);
        }
        for (int64_t t = steps - 1; t >= 0; t--) {
            FN(cell_backward)(batch, hidden, acts + t * bg, c + t * bh, c + (t + 1) * bh,
                              d_out + t * bh, d_h, d_c, dz + t * bg);
            if (packed_w_h) {
                FN(gemm_packed)(0, batch, hidden, g, dz + t * bg, g, packed_t, 0, d_h, hidden);
            } else {
                FN(gemm)(0, 1, batch, hidden, g, dz + t * bg, g, w_h, g, 0, d_h, hidden,
                         hidden * g);
            }
        }

        /* Weight gradients for all steps at once; the row kernel reads dZ packed, once for both. */
        if (packed_dz != NULL) {
            FN(pack)(rows, g, dz, g, 0, packed_dz);
        }
        if (l == 0 && ids != NULL) {
            /* dW_x[ids] += dZ, the one-hot X^T @ dZ */
            FN(scatter_add_rows)(rows, g, ids, dz, dw_x);
        } else if (FN(uses_packed_kernel)(in * g)) {
            /* dW_x += X^T @ dZ */
            FN(gemm_packed)(1, in, g, rows, inputs, in, packed_dz, 1, dw_x, g);
        } else {
            FN(gemm)(1, 0, in, g, rows, inputs, in, dz, g, 1, dw_x, g, in * g);
        }
        /* dW_h += H_prev^T @ dZ, where H_prev = h[0:T] */
        if (FN(uses_packed_kernel)(hidden * g)) {
            FN(gemm_packed)(1, hidden, g, rows, h, hidden, packed_dz, 1, dw_h, g);
        } else {
            FN(gemm)(1, 0, hidden, g, rows, h, hidden, dz, g, 1, dw_h, g, hidden * g);
        }
        /* db += sum over rows of dZ */
        FN(add_column_sums)(rows, g, dz, d_bias);
        /* dX = dZ @ W_x^T: the output gradient of the layer below, or d_x for layer 0. Token ids
         * have no gradient. */
        if (l > 0 || ids == NULL) {
            REAL *d_inputs = l == 0 ? d_x : d_hidden;
            if (FN(uses_packed_kernel)(in * g)) {
                FN(pack)(g, in, w_x, g, 1, packed_t);
                FN(gemm_packed)(0, rows, in, g, dz, g, packed_t, 0, d_inputs, in);
            } else {
                FN(gemm)(0, 1, rows, in, g, dz, g, w_x, g, 0, d_inputs, in, in * g);
            }
        }
        d_out = d_hidden;
    }
    fl_pool_rest();
    return FL_OK;
}

int FN(fl_step)(const fl_dims *dims, const REAL *params, const REAL *x_t, const int64_t *ids,
                REAL *state, REAL *gates, double forget_bias)
{
    fl_dims one_step = *dims;
    one_step.steps = 1;
    if (!fl_dims_valid(&one_step)) {
        return FL_EINVAL_SIZE;
    }
    if (ids != NULL && !fl_ids_valid(dims->batch, ids, dims->input)) {
        return FL_EINVAL_ID;
    }
    const int64_t batch = dims->batch, hidden = dims->hidden, g = 4 * hidden;
    const int64_t bh = batch * hidden;

    const REAL *inputs = x_t;
    for (int64_t l = 0; l < dims->layers; l++) {
        const int64_t in = l == 0 ? dims->input : hidden;
        const REAL *w_x = params + fl_layer_offset(dims, l);
        const REAL *w_h = w_x + in * g;
        const REAL *bias = w_h + hidden * g;
        REAL *c = state + (2 * l) * bh;
        REAL *h = state + (2 * l + 1) * bh;

        /* The same sequence of operations as fl_forward, so that T steps here equal one call there
         * bit for bit: z = b, z += x @ W_x (or z = b + W_x[ids]), z += h @ W_h, then the cell. */
        if (l == 0 && ids != NULL) {
            FN(gather_rows)(batch, g, ids, w_x, bias, gates);
        } else {
            FN(fill_rows)(batch, g, bias, gates);
            FN(gemm)(0, 0, batch, g, in, inputs, in, w_x, g, 1, gates, g, in * g);
        }
        FN(gemm)(0, 0, batch, g, hidden, h, hidden, w_h, g, 1, gates, g, hidden * g);
        FN(cell_forward)(batch, hidden, gates, c, c, h, (REAL)forget_bias);
        inputs = h;
    }
    fl_pool_rest();
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Softmax cross-entropy head.
 */

/* Softmax rows [begin, end) of probs [N, C] in place, with each row's loss -log p[label]. The sum
 * of a row runs in FL_SUM_LANES fixed partial sums combined in a fixed order, so that it vectorizes
 * and its bits do not depend on where the row is. */
#define FL_SUM_LANES 16
typedef struct {
    int64_t classes;
    REAL *probs;
    const int64_t *labels;
    double *row_losses;
} FN(softmax_job);

#define FL_SOFTMAX_ROWS                                                                           \
    {                                                                                             \
        const FN(softmax_job) *job = (const FN(softmax_job) *)context;                           \
        const int64_t classes = job->classes;                                                     \
        for (int64_t row = begin; row < end; row++) {                                             \
            REAL *p = job->probs + row * classes;                                                 \
            REAL max_logit = p[0];                                                                \
            for (int64_t k = 1; k < classes; k++) {                                               \
                max_logit = p[k] > max_logit ? p[k] : max_logit;                                  \
            }                                                                                     \
            const REAL label_logit = p[job->labels[row]] - max_logit;                             \
            for (int64_t k = 0; k < classes; k++) {                                               \
                p[k] = SOFTMAX_EXP(p[k] - max_logit);                                             \
            }                                                                                     \
            REAL partial[FL_SUM_LANES] = {0};                                                     \
            int64_t k = 0;                                                                        \
            for (; k + FL_SUM_LANES <= classes; k += FL_SUM_LANES) {                              \
                for (int lane = 0; lane < FL_SUM_LANES; lane++) {                                 \
                    partial[lane] += p[k + lane];                                                 \
                }                                                                                 \
            }                                                                                     \
            for (int lane = 0; k < classes; k++, lane++) {                                        \
                partial[lane] += p[k];                                                            \
            }                                                                                     \
            for (int width = FL_SUM_LANES / 2; width > 0; width /= 2) {                           \
                for (int lane = 0; lane < width; lane++) {                                        \
                    partial[lane] += partial[lane + width];                                       \
                }                                                                                 \
            }                                                                                     \
            const REAL sum = partial[0];                                                          \
            const REAL inverse = (REAL)1 / sum;                                                   \
            for (int64_t c = 0; c < classes; c++) {                                               \
                p[c] *= inverse;                                                                  \
            }                                                                                     \
            job->row_losses[row] = (double)LOG(sum) - (double)label_logit;                        \
        }                                                                                         \
    }

static void FN(softmax_rows)(void *context, int64_t begin, int64_t end)
FL_SOFTMAX_ROWS

#if FL_ROW_KERNEL
static FL_AVX512 void FN(softmax_rows_wide)(void *context, int64_t begin, int64_t end)
FL_SOFTMAX_ROWS
#endif
#undef FL_SOFTMAX_ROWS

int FN(fl_softmax_xent)(int64_t rows, int64_t hidden, int64_t classes, const REAL *inputs,
                        const REAL *head_params, const int64_t *labels, REAL *probs,
                        REAL *d_inputs, REAL *head_grad, double *loss)
{
    if (rows < 1 || hidden < 1 || classes < 1 || hidden > INT64_MAX / classes) {
        return FL_EINVAL_SIZE;
    }
    for (int64_t row = 0; row < rows; row++) {
        if (labels[row] < 0 || labels[row] >= classes) {
            return FL_EINVAL_LABEL;
        }
    }
    const REAL *w = head_params;                               /* [H, C] */
    const REAL *bias = head_params + hidden * classes;         /* [C] */
    REAL *d_w = head_grad;                                     /* [H, C] += */
    REAL *d_bias = head_grad + hidden * classes;               /* [C] += */
    const REAL scale = (REAL)1 / (REAL)rows;                   /* d(mean loss) / d(row loss) */

    /* Logits = X @ W + b, into probs. */
    FN(fill_rows)(rows, classes, bias, probs);
    FN(gemm)(0, 0, rows, classes, hidden, inputs, hidden, w, classes, 1, probs, classes,
             hidden * classes);

    /* Softmax with the row maximum subtracted, and the loss -log p[label], on the pool's threads
     * by rows. The row losses are summed in row order afterwards. */
    double *row_losses = (double *)fl_scratch(FL_SCRATCH_ROWS, (size_t)rows * sizeof(double));
    if (row_losses == NULL) {
        return FL_ENOMEM;
    }
    const FN(softmax_job) job = {classes, probs, labels, row_losses};
    fl_task task = FN(softmax_rows);
#if FL_ROW_KERNEL
    if (classes >= FL_WIDE_CELL && fl_row_kernel_on()) {
        task = FN(softmax_rows_wide);
    }
#endif
    fl_parallel_for(rows, (FL_MIN_CELL_WORK + classes - 1) / classes, task, (void *)&job);
    double loss_sum = 0.0;
    for (int64_t row = 0; row < rows; row++) {
        loss_sum += row_losses[row];
    }
    *loss = loss_sum / (double)rows;

    /* dLogits = (P - onehot(labels)) / N. Large heads get their own buffer for the packed
     * kernels to multiply; small ones compute it on the fly inside the loops. */
    if (FN(uses_packed_kernel)(hidden * classes)) {
        REAL *d_logits = FN(scratch)(FL_SCRATCH_HEAD, rows * classes);
        if (d_logits == NULL) {
            return FL_ENOMEM;
        }
        for (int64_t row = 0; row < rows; row++) {
            for (int64_t k = 0; k < classes; k++) {
                d_logits[row * classes + k] = probs[row * classes + k] * scale;
            }
            d_logits[row * classes + labels[row]] -= scale;
        }
        /* dW += X^T @ dLogits */
        FN(gemm)(1, 0, hidden, classes, rows, inputs, hidden, d_logits, classes, 1, d_w, classes,
                 hidden * classes);
        for (int64_t row = 0; row < rows; row++) {
            for (int64_t k = 0; k < classes; k++) {
                d_bias[k] += d_logits[row * classes + k];
            }
        }
        /* dX = dLogits @ W^T */
        FN(gemm)(0, 1, rows, hidden, classes, d_logits, classes, w, classes, 0, d_inputs, hidden,
                 hidden * classes);
        return FL_OK;
    }

    for (int64_t row = 0; row < rows; row++) {
        const REAL *p = probs + row * classes;
        const REAL *x_row = inputs + row * hidden;
        REAL *dx_row = d_inputs + row * hidden;
        const int64_t label = labels[row];
        for (int64_t u = 0; u < hidden; u++) {
            REAL sum = 0;
            for (int64_t k = 0; k < classes; k++) {
                const REAL d_logit = p[k] * scale - (k == label ? scale : 0);
                d_w[u * classes + k] += x_row[u] * d_logit;
                sum += d_logit * w[u * classes + k];
            }
            dx_row[u] = sum;
        }
        for (int64_t k = 0; k < classes; k++) {
            d_bias[k] += p[k] * scale - (k == label ? scale : 0);
        }
    }
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Optimizers and the fused training window.
 */

/* Arguments of FN(optimizer_update). */
typedef struct {
    const fl_optimizer *opt;
    REAL grad_scale;
    int64_t n;
    REAL *w;
    const REAL *grad;
    REAL *slots;
} FN(update_job);

/* Weights [begin, end) of FN(optimizer_update): the share of one thread. */
static void FN(update_range)(void *context, int64_t begin, int64_t end)
{
    const FN(update_job) *job = (const FN(update_job) *)context;
    const fl_optimizer *opt = job->opt;
    const REAL grad_scale = job->grad_scale;
    const REAL *grad = job->grad;
    REAL *w = job->w;
    const REAL lr = (REAL)opt->learning_rate;
    if (opt->kind == FL_SGD) {
        for (int64_t k = begin; k < end; k++) {
            w[k] -= lr * (grad[k] * grad_scale);
        }
    } else if (opt->kind == FL_ADAGRAD) {
        REAL *acc = job->slots;
        for (int64_t k = begin; k < end; k++) {
            const REAL gk = grad[k] * grad_scale;
            acc[k] += gk * gk;
            w[k] -= lr * gk / SQRT(acc[k]);
        }
    } else {
        REAL *m = job->slots, *v = job->slots + job->n;
        const double t = (double)opt->step;
        const REAL alpha = (REAL)(opt->learning_rate * sqrt(1.0 - pow(opt->beta_2, t))
                                  / (1.0 - pow(opt->beta_1, t)));
        const REAL one_minus_b1 = (REAL)(1.0 - opt->beta_1), one_minus_b2 = (REAL)(1.0 - opt->beta_2);
        const REAL eps = (REAL)opt->epsilon;
        for (int64_t k = begin; k < end; k++) {
            const REAL gk = grad[k] * grad_scale;
            m[k] += (gk - m[k]) * one_minus_b1;
            v[k] += (gk * gk - v[k]) * one_minus_b2;
            w[k] -= alpha * m[k] / (SQRT(v[k]) + eps);
        }
    }
}

/* Updates n weights w in place from the gradient g multiplied by grad_scale (clipping), a share
 * of the weights per thread. slots: none for SGD, the accumulator [n] for Adagrad, m [n] then
 * v [n] for Adam. */
static void FN(optimizer_update)(const fl_optimizer *opt, REAL grad_scale, int64_t n, REAL *w,
                                 const REAL *grad, REAL *slots)
{
    const FN(update_job) job = {opt, grad_scale, n, w, grad, slots};
    fl_parallel_for(n, FL_MIN_THREAD_ELEMS, FN(update_range), (void *)&job);
}

static double FN(sum_squares)(int64_t n, const REAL *values)
{
    double sum = 0.0;
    for (int64_t k = 0; k < n; k++) {
        sum += (double)values[k] * (double)values[k];
    }
    return sum;
}

int FN(fl_train_window)(const fl_dims *dims, int64_t classes, REAL *params, REAL *head_params,
                        const REAL *x, const int64_t *ids, const int64_t *labels, REAL *state,
                        REAL *gates, REAL *cs, REAL *hs, REAL *probs, REAL *d_y, REAL *grad,
                        REAL *head_grad, REAL *d_state, REAL *d_x, REAL *dz, REAL *d_hidden,
                        double forget_bias, const fl_optimizer *optimizer, REAL *slots,
                        REAL *head_slots, double *loss)
{
    if (!fl_dims_valid(dims) || classes < 1 || dims->hidden > INT64_MAX / classes) {
        return FL_EINVAL_SIZE;
    }
    if (fl_optimizer_slots(optimizer->kind) < 0 || (optimizer->kind == FL_ADAM && optimizer->step < 1)) {
        return FL_EINVAL_OPTIMIZER;
    }
    const int64_t rows = dims->steps * dims->batch;
    for (int64_t row = 0; row < rows; row++) {
        if (labels[row] < 0 || labels[row] >= classes) {
            return FL_EINVAL_LABEL;   /* checked before the state buffer is touched */
        }
    }
    const int64_t n_params = fl_num_params(dims);
    const int64_t n_head = dims->hidden * classes + classes;
    const int64_t state_slot = (dims->steps + 1) * dims->batch * dims->hidden;
    const REAL *top_outputs = hs + (dims->layers - 1) * state_slot + dims->batch * dims->hidden;
    int status;

    status = FN(fl_forward)(dims, params, x, ids, state, gates, cs, hs, forget_bias, 1);
    if (status != FL_OK) {
        return status;
    }

    memset(head_grad, 0, (size_t)n_head * sizeof(REAL));
    status = FN(fl_softmax_xent)(rows, dims->hidden, classes, top_outputs, head_params, labels,
                                 probs, d_y, head_grad, loss);
    if (status != FL_OK) {
        return status;
    }

    memset(grad, 0, (size_t)n_params * sizeof(REAL));
    status = FN(fl_backward)(dims, params, x, ids, gates, cs, hs, d_y, NULL, grad, d_state, d_x,
                             dz, d_hidden);
    if (status != FL_OK) {
        return status;
    }

    /* Clipping by global norm, as TensorFlow's clip_by_global_norm:
     * g *= clip_norm / max(global_norm, clip_norm). */
    REAL grad_scale = 1;
    if (optimizer->clip_norm > 0) {
        const double norm = sqrt(FN(sum_squares)(n_params, grad) + FN(sum_squares)(n_head, head_grad));
        grad_scale = (REAL)(optimizer->clip_norm / (norm > optimizer->clip_norm ? norm : optimizer->clip_norm));
    }
    FN(optimizer_update)(optimizer, grad_scale, n_params, params, grad, slots);
    FN(optimizer_update)(optimizer, grad_scale, n_head, head_params, head_grad, head_slots);
    return FL_OK;
}

#undef FN
#undef FL_CAT
#undef FL_CAT_
