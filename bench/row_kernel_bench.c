/*
 * GFLOP/s of the C core's row kernel on one float32 product C[M, N] = A[M, K] @ W[K, N], with W
 * packed once beforehand, as the time loop does. Build and run from the repository root:
 *
 *     gcc -O3 -fno-math-errno -ffp-contract=off -pthread -Icsrc bench/row_kernel_bench.c \
 *         csrc/fastlstm_pool.c -o /tmp/row_kernel_bench -lm
 *     /tmp/row_kernel_bench M K N [threads]
 *
 * It includes csrc/fastlstm.c to reach the kernel's internal functions. The best of 7 repeats, each
 * about 2 GFLOP of products, is reported: the same product again and again keeps A and as much of W as
 * fits in the caches, as in the time loop, step after step.
 */
#include "fastlstm.c"

#include <stdio.h>
#include <time.h>

static double seconds_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s M K N [threads]\n", argv[0]);
        return 2;
    }
    const int64_t m = atoll(argv[1]), k = atoll(argv[2]), n = atoll(argv[3]);
    const int threads = argc > 4 ? atoi(argv[4]) : 1;
    if (m < 1 || k < 1 || n < 1 || fl_set_num_threads(threads) != 0) {
        fprintf(stderr, "M, K and N must be at least 1 and threads in [1, %d]\n", FL_MAX_THREADS);
        return 2;
    }
    if (!fl_row_kernel_available()) {
        fprintf(stderr, "this CPU lacks AVX-512F: there is no row kernel to time\n");
        return 1;
    }

    float *a = malloc((size_t)(m * k) * sizeof(float));
    float *w = malloc((size_t)(k * n) * sizeof(float));
    float *c = malloc((size_t)(m * n) * sizeof(float));
    float *packed = NULL;
    if (posix_memalign((void **)&packed, 64, (size_t)packed_size_f32(k, n) * sizeof(float)) != 0) {
        packed = NULL;
    }
    if (a == NULL || w == NULL || c == NULL || packed == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (int64_t i = 0; i < m * k; i++) {
        a[i] = (float)(i % 7) * 0.1f;
    }
    for (int64_t i = 0; i < k * n; i++) {
        w[i] = (float)(i % 5) * 0.1f;
    }
    pack_f32(k, n, w, n, 0, packed);

    const double flops = 2.0 * (double)m * (double)k * (double)n;
    const int calls = (int)(2e9 / flops) + 1;
    double best = 1e30;
    for (int repeat = 0; repeat < 7; repeat++) {
        const double start = seconds_now();
        for (int call = 0; call < calls; call++) {
            gemm_packed_f32(0, m, n, k, a, k, packed, 0, c, n);
        }
        const double per_call = (seconds_now() - start) / calls;
        best = per_call < best ? per_call : best;
    }
    printf("[%lld, %lld] @ [%lld, %lld], %d thread(s): %.1f GFLOP/s, %.1f us per product\n",
           (long long)m, (long long)k, (long long)k, (long long)n, threads, flops / best * 1e-9,
           best * 1e6);
    free(a);
    free(w);
    free(c);
    free(packed);
    return 0;
}
