/* Device quantize of the row-wise int8 format (int8.c's quantize on the
 * GPU): bit for bit the CPU reference.  The element operations are
 * int8_ops.h's, the same code the CPU runs (QLP_HD); the reciprocal is the
 * sm_90 rcp.approx.ftz.f32 instruction that the CPU emulates.  One thread
 * block per row: the row absmax is a maximum of non-negative, non-NaN
 * values (fabsf of finite float16 values), which is the same float in any
 * order, so a tree reduction gives the CPU's sequential result.
 *
 * Steps, on the caller's stream: bf16 input widened to float32 (exact); the
 * first weight that is NaN, Inf or outside float16's range (the CPU checks
 * before quantizing); the rows; the state's pieces copied to the host. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "int8_cuda.h"
#include "int8_ops.h"
#include "qlp_cuda.cuh"

namespace {

constexpr int kRowThreads = 256;

__global__ void __launch_bounds__(kRowThreads) quantize_rows(const float *__restrict__ w, int64_t rows, int64_t cols,
                                                             int8_t *__restrict__ codes, float *__restrict__ scb)
{
    __shared__ float partial[kRowThreads];
    const int t = threadIdx.x;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = w + r * cols;
        float absmax = 0.0f;
        for (int64_t c = t; c < cols; c += kRowThreads) absmax = qlp_int8_absmax_step(absmax, row[c]);
        partial[t] = absmax;
        __syncthreads();
        for (int off = kRowThreads / 2; off > 0; off /= 2) {
            if (t < off) partial[t] = partial[t + off] > partial[t] ? partial[t + off] : partial[t];
            __syncthreads();
        }
        absmax = partial[0];
        if (t == 0) scb[r] = absmax;
        const float scale = qlp_int8_scale(absmax);
        for (int64_t c = t; c < cols; c += kRowThreads) codes[r * cols + c] = qlp_int8_code(row[c], scale);
        __syncthreads(); /* every thread has read partial[0] before the next row writes it */
    }
}

/* The device pieces of one call, carved from one allocation. */
struct Scratch {
    float *wide;               /* rows * cols, bf16 input only */
    int8_t *codes;             /* rows * cols */
    float *scb;                /* rows */
    unsigned long long *first; /* the first bad index */
};

Scratch layout(qlp::Carve &c, int bf16, int64_t rows, int64_t cols)
{
    Scratch s;
    s.wide = c.take<float>(bf16 ? (size_t)(rows * cols) * 4 : 0);
    s.codes = c.take<int8_t>((size_t)(rows * cols));
    s.scb = c.take<float>((size_t)rows * 4);
    s.first = c.take<unsigned long long>(8);
    return s;
}

#define STEP(what, call)                           \
    do {                                           \
        *failed = (what);                          \
        if ((e = (call)) != cudaSuccess) return e; \
    } while (0)

cudaError_t run(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *codes, float *scb, cudaStream_t st,
                const Scratch &s, int64_t *bad_index, float *bad_value, const char **failed)
{
    cudaError_t e;
    const int64_t n = rows * cols;
    const int threads = 256;
    STEP("clearing the scratch", cudaMemsetAsync(s.first, 0xff, sizeof *s.first, st));
    const float *x = static_cast<const float *>(w);
    if (bf16) {
        qlp::widen_bf16<<<qlp::grid_for(n, threads), threads, 0, st>>>(static_cast<const uint16_t *>(w), n, s.wide);
        STEP("widening bfloat16 input", cudaGetLastError());
        x = s.wide;
    }
    /* NaN and Inf have magnitudes above float16's overflow boundary too */
    qlp::first_magnitude_at_least<<<qlp::grid_for(n, threads), threads, 0, st>>>(x, n, QLP_HALF_OVERFLOW_BITS, s.first);
    STEP("checking for NaN, Inf and float16 overflow", cudaGetLastError());
    quantize_rows<<<qlp::grid_for(rows * kRowThreads, kRowThreads), kRowThreads, 0, st>>>(x, rows, cols, s.codes, s.scb);
    STEP("quantizing rows", cudaGetLastError());
    const cudaMemcpyKind d2h = cudaMemcpyDeviceToHost;
    STEP("copying the codes", cudaMemcpyAsync(codes, s.codes, (size_t)n, d2h, st));
    STEP("copying SCB", cudaMemcpyAsync(scb, s.scb, (size_t)rows * 4, d2h, st));
    unsigned long long first = 0;
    STEP("copying the check", cudaMemcpyAsync(&first, s.first, sizeof first, d2h, st));
    STEP("waiting for the stream", cudaStreamSynchronize(st));
    *bad_index = -1;
    if (first != ~0ull) {
        *bad_index = (int64_t)first;
        STEP("reading the bad weight", cudaMemcpy(bad_value, x + first, 4, d2h));
    }
    return cudaSuccess;
}

} // namespace

extern "C" int qlp_int8_cuda_quantize(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *codes, float *scb,
                                      void *stream, int64_t *bad_index, float *bad_value, char *err, size_t errcap)
{
    *bad_index = -1;
    if (qlp::require_sm90(err, errcap)) return 1;
    qlp::Carve carve = {nullptr, 0};
    layout(carve, bf16, rows, cols);
    const char *failed = "allocating device scratch";
    void *base = nullptr;
    cudaError_t e = cudaMalloc(&base, carve.used);
    if (e == cudaSuccess) {
        carve = {static_cast<char *>(base), 0};
        Scratch s = layout(carve, bf16, rows, cols);
        e = run(w, bf16, rows, cols, codes, scb, static_cast<cudaStream_t>(stream), s, bad_index, bad_value, &failed);
        cudaError_t f = cudaFree(base);
        if (e == cudaSuccess && f != cudaSuccess) {
            e = f;
            failed = "freeing device scratch";
        }
    }
    if (e != cudaSuccess) {
        snprintf(err, errcap, "%s (%zu bytes of scratch for [%lld, %lld]): %s", failed, carve.used, (long long)rows,
                 (long long)cols, cudaGetErrorString(e));
        cudaGetLastError(); /* clear a non-sticky error for the next call */
        return -1;
    }
    return 0;
}
