/* The CPU operators' matrix products through OpenBLAS (internal).
 *
 * Row-major C = alpha * op(A) op(B) + (accumulate ? C : 0).  OpenBLAS is the
 * OpenMP build (meson refuses another): its threads are the OpenMP team of
 * our own loops, and before each call its thread count is set to
 * omp_get_max_threads(), so OMP_NUM_THREADS (or omp_set_num_threads) is the
 * one knob for both.  OpenBLAS splits a product over the rows and columns of C
 * only, never over the summed dimension, in a partition fixed by the sizes and
 * the thread count: the same inputs and thread count give the same bits.
 * Another thread count (or another CPU, whose kernels OpenBLAS picks at run
 * time) may round differently. */
#ifndef QL_OPS_BLAS_H
#define QL_OPS_BLAS_H

#include <cblas.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline void ql_blas_sync_threads(void)
{
#ifdef _OPENMP
    const int n = omp_get_max_threads();
    if (openblas_get_num_threads() != n) openblas_set_num_threads(n);
#endif
}

/* Whether every size fits OpenBLAS' 32-bit integers (else the caller runs
 * its reference loop). */
static inline int ql_blas_fits(int64_t a, int64_t b, int64_t c)
{
    return a >= 0 && b >= 0 && c >= 0 && a <= INT_MAX && b <= INT_MAX && c <= INT_MAX;
}

/* C[M, N] (+)= alpha * op(A) op(B), row-major, op(A) [M, K], op(B) [K, N].
 * K == 0 leaves C (accumulate) or zeroes it. */
static inline void ql_sgemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                            int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate)
{
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++) memset(C + i * ldc, 0, (size_t)N * sizeof *C);
        return;
    }
    ql_blas_sync_threads();
    if (M == 1 && !trans_a) {
        /* one row of C: y[N] = alpha * op(B)^T a[K] (a gemv; T = 1 in generation) */
        if (!accumulate) memset(C, 0, (size_t)N * sizeof *C);
        if (trans_b) /* op(B) = B^T, B [N, K]: y = B a */
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, alpha, B, (int)ldb, A, 1, 1.0f, C, 1);
        else /* B [K, N]: y = B^T a */
            cblas_sgemv(CblasRowMajor, CblasTrans, (int)K, (int)N, alpha, B, (int)ldb, A, 1, 1.0f, C, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (int)M,
                (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, accumulate ? 1.0f : 0.0f, C, (int)ldc);
}

#endif
