"""Time the Numba backend's packed tile product against numpy's OpenBLAS on the products of the benchmarks.

    OPENBLAS_NUM_THREADS=1 python bench/numba_tiles.py

Prints the best of 7 runs of out += x @ w for each shape and dtype, in GFLOP/s, with the weights
packed beforehand (the forward pass packs them once per call and reuses them for every step).
"""

import os
import time

import numpy as np

from fastlstm import _numba_kernels as kernels

# (M, K, N): the recurrent products of ptb-small (B = 20, H = 200), ptb-medium (H = 650) and the wide
# case (B = 64, H = 512), and the input projections of ptb-medium (T * B = 700) and the wide case.
SHAPES = [(20, 200, 800), (20, 650, 2600), (64, 512, 2048), (700, 650, 2600), (6400, 512, 2048)]
RUNS = 7


def best_time(run):
    run()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")
    print("| dtype | M x K x N | Numba tiles GFLOP/s | OpenBLAS GFLOP/s |")
    print("| --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for rows, inner, cols in SHAPES:
            x = rng.normal(size=(rows, inner)).astype(dtype)
            w = rng.normal(size=(inner, cols)).astype(dtype)
            out = np.zeros((rows, cols), dtype=dtype)
            packed = np.empty(kernels._packed_shape(inner, cols), dtype=dtype)
            kernels._pack(w, packed)
            flops = 2.0 * rows * inner * cols
            tiles = flops / best_time(lambda: kernels._packed_add(x, packed, out)) / 1e9
            blas = flops / best_time(lambda: np.dot(x, w, out)) / 1e9
            print(f"| {np.dtype(dtype).name} | {rows} x {inner} x {cols} | {tiles:.0f} | {blas:.0f} |")


if __name__ == "__main__":
    main()
