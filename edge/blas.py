"""Matrix products that stay on the calling thread.

numpy's BLAS (OpenBLAS in the wheels, on x86 and on a Jetson alike) computes a product of up to 4 * 65536
multiply-adds on the calling thread and a larger one on a thread per core, which then spin-wait for the next product.
The front end's products (the resampler's band matrix, the fbank's mel matrix) are small and come right before the
encoder and llama.cpp, which have their own thread pools: BLAS threads spinning beside them take the cores they run
on, and on a loaded machine the threads wait on each other. Measured on a loaded 2-core machine before products were
cut (benchmarks/bench_resample.py): one 48 kHz window's resampling 77 ms with BLAS's threads against 13 ms with
OPENBLAS_NUM_THREADS=1, its whole front end 101 against 32 ms. Cutting each product into row chunks under the
threshold keeps BLAS on this thread without changing any process-wide setting (after: 5.2 against 5.5 ms, front end
11 against 14 ms, the machine quieter); the per-call overhead, a few microseconds a chunk, is small against that.
"""

from __future__ import annotations

import numpy as np

#: OpenBLAS's threshold (interface/gemm.c: SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD).
SINGLE_THREAD_MACS = 4 * 65536


def rows_per_product(inner: int, cols: int) -> int:
    """Rows of an (rows x inner) @ (inner x cols) product that keep it on the calling thread."""
    return max(1, SINGLE_THREAD_MACS // max(1, inner * cols))


def matmul_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for a 2-D `a`, computed in row chunks that BLAS runs on the calling thread."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    step = rows_per_product(a.shape[1], b.shape[1])
    for i in range(0, a.shape[0], step):
        np.matmul(a[i:i + step], b, out=out[i:i + step])
    return out
