/* Device quantize of the NF4 / FP4 blockwise format (bnb4bit.c's
 * qlp_4bit_quantize on the GPU), double quantization included: bit for bit
 * the CPU reference.  The per-block work is bnb_block.h's qlp_4bit_block and
 * qlp_8bit_block and the offset's summation order is torch_mean.h's, the
 * same code the CPU runs (QLP_HD), so the kernels here only decide which
 * thread does which block; the reciprocal is the sm_90 rcp.approx.ftz.f32
 * instruction that the CPU emulates.  Plain float operations are IEEE here
 * as on the CPU: nvcc keeps subnormals by default and the plugin is built
 * with --fmad=false (no contraction into fused multiply-adds).
 *
 * Steps, on the caller's stream:
 *   1. bf16 input only: widen to float32 (exact);
 *   2. the first NaN or Inf (the CPU checks before quantizing);
 *   3. one thread per block: absmax, codes, packed bytes;
 *   with double quant:
 *   4. the offset, absmax.mean() in torch's order (one thread block);
 *   5. absmax - offset;
 *   6. one thread per block of 256: nested absmax and 8-bit codes;
 * then the state's pieces are copied to the host. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "bnb4bit_cuda.h"
#include "bnb_block.h"
#include "qlp_cuda.cuh"
#include "torch_mean.h"

namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) quantize_4bit(qlp_4bit_type type, const float *__restrict__ x, int64_t n,
                                                          int blocksize, int64_t nblocks, uint8_t *__restrict__ packed,
                                                          float *__restrict__ absmax)
{
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x) {
        /* blocksize is even, so a block starts on a byte */
        int64_t begin = b * blocksize;
        int64_t count = n - begin < blocksize ? n - begin : blocksize;
        qlp_4bit_block(type, x + begin, count, packed + begin / 2, &absmax[b]);
    }
}

/* Sum of v[0..w-1] by the steps of qlp_torch_mean_block_sum, each step's
 * adds in parallel (lane t < off reads v[t + off], which no lane writes in
 * that step).  Every thread of the block calls it. */
__device__ void block_sum(float *v, int w, int t)
{
    int width = w;
    if (width > QLP_TORCH_MEAN_WARP) {
        for (int off = width / 2; off >= QLP_TORCH_MEAN_WARP; off /= 2) {
            if (t < off) v[t] = qlp_torch_mean_add(v[t], v[t + off]);
            __syncthreads();
        }
        width = QLP_TORCH_MEAN_WARP;
    }
    for (int off = width / 2; off > 0; off /= 2) {
        if (t < off) v[t] = qlp_torch_mean_add(v[t], v[t + off]);
        __syncthreads();
    }
}

/* qlp_torch_cuda_mean_f32 with one thread per lane: one block of
 * plan.threads threads walks the plan's blocks in order, as the CPU does. */
__global__ void __launch_bounds__(QLP_TORCH_MEAN_BLOCK_MAX) torch_mean(const float *__restrict__ x, int64_t n,
                                                                      qlp_torch_mean_plan plan, float *out)
{
    __shared__ float part[QLP_TORCH_MEAN_BLOCK_MAX]; /* per-lane value within the current block */
    __shared__ float last[QLP_TORCH_MEAN_BLOCK_MAX]; /* last block's per-lane sums of block sums */
    const qlp_torch_mean_plan p = plan;
    const int t = threadIdx.x, w = p.threads;
    last[t] = 0.0f;
    for (int64_t c = 0; c < p.blocks; c++) {
        part[t] = qlp_torch_mean_lane(x, n, &p, 0, c, t);
        __syncthreads();
        block_sum(part, w, t);
        if (t == 0) {
            if (p.blocks == 1) {
                last[0] = part[0];
            } else {
                int l = (int)(c % w);
                last[l] = qlp_torch_mean_add(last[l], part[0]);
            }
        }
        __syncthreads();
    }
    if (p.blocks > 1) block_sum(last, w, t);
    if (t == 0) {
        float sum = last[0];
        float mean = sum * p.factor;
        *out = mean;
    }
}

/* absmax[b] - offset, as the CPU centres the statistics in place. */
__global__ void centre(float *__restrict__ absmax, int64_t nblocks, const float *__restrict__ offset)
{
    const float o = *offset;
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x)
        absmax[b] = __fsub_rn(absmax[b], o);
}

struct Map {
    float v[256];
};

__global__ void __launch_bounds__(kThreads) quantize_nested(Map map, const float *__restrict__ x, int64_t n,
                                                            int blocksize, int64_t nblocks, uint8_t *__restrict__ codes,
                                                            float *__restrict__ absmax)
{
    __shared__ float m[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) m[i] = map.v[i];
    __syncthreads();
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x) {
        int64_t begin = b * blocksize;
        int64_t count = n - begin < blocksize ? n - begin : blocksize;
        qlp_8bit_block(m, x + begin, count, codes + begin, &absmax[b]);
    }
}

/* The device pieces of one call, carved from one allocation. */
struct Scratch {
    float *wide;               /* n, bf16 input only */
    uint8_t *packed;           /* (n+1)/2 */
    float *absmax;             /* nblocks */
    uint8_t *codes;            /* nblocks, double quant */
    float *nested;             /* nnested, double quant */
    float *offset;             /* 1, double quant */
    unsigned long long *first; /* the first non-finite index */
};

Scratch layout(qlp::Carve &c, const qlp_4bit_cuda_quant_args *a, int64_t nblocks, int64_t nnested)
{
    Scratch s;
    s.wide = c.take<float>(a->bf16 ? (size_t)a->n * 4 : 0);
    s.packed = c.take<uint8_t>((size_t)(a->n + 1) / 2);
    s.absmax = c.take<float>((size_t)nblocks * 4);
    s.codes = c.take<uint8_t>(a->double_quant ? (size_t)nblocks : 0);
    s.nested = c.take<float>(a->double_quant ? (size_t)nnested * 4 : 0);
    s.offset = c.take<float>(a->double_quant ? 4 : 0);
    s.first = c.take<unsigned long long>(8);
    return s;
}

#define STEP(what, call)                              \
    do {                                              \
        *failed = (what);                             \
        if ((e = (call)) != cudaSuccess) return e;    \
    } while (0)

cudaError_t run(const qlp_4bit_cuda_quant_args *a, const Scratch &s, int64_t nblocks, int64_t nnested, int64_t *bad_index,
                float *bad_value, const char **failed)
{
    cudaStream_t st = static_cast<cudaStream_t>(a->stream);
    cudaError_t e;
    const int64_t n = a->n;
    const int threads = 256;
    STEP("clearing the scratch", cudaMemsetAsync(s.first, 0xff, sizeof *s.first, st));
    const float *x = static_cast<const float *>(a->w);
    if (a->bf16) {
        qlp::widen_bf16<<<qlp::grid_for(n, threads), threads, 0, st>>>(static_cast<const uint16_t *>(a->w), n, s.wide);
        STEP("widening bfloat16 input", cudaGetLastError());
        x = s.wide;
    }
    qlp::first_magnitude_at_least<<<qlp::grid_for(n, threads), threads, 0, st>>>(x, n, 0x7f800000u, s.first);
    STEP("checking for NaN and Inf", cudaGetLastError());
    quantize_4bit<<<qlp::grid_for(nblocks, kThreads), kThreads, 0, st>>>((qlp_4bit_type)a->type, x, n, a->blocksize,
                                                                         nblocks, s.packed, s.absmax);
    STEP("quantizing blocks", cudaGetLastError());
    if (a->double_quant) {
        qlp_torch_mean_plan plan;
        qlp_torch_mean_plan_for(nblocks, &plan);
        torch_mean<<<1, plan.threads, 0, st>>>(s.absmax, nblocks, plan, s.offset);
        STEP("the absmax mean", cudaGetLastError());
        centre<<<qlp::grid_for(nblocks, threads), threads, 0, st>>>(s.absmax, nblocks, s.offset);
        STEP("centring the absmax", cudaGetLastError());
        Map map;
        for (int i = 0; i < 256; i++) map.v[i] = a->map[i];
        quantize_nested<<<qlp::grid_for(nnested, kThreads), kThreads, 0, st>>>(map, s.absmax, nblocks,
                                                                                a->nested_blocksize, nnested, s.codes,
                                                                                s.nested);
        STEP("quantizing the absmax", cudaGetLastError());
    }
    const cudaMemcpyKind d2h = cudaMemcpyDeviceToHost;
    STEP("copying the codes", cudaMemcpyAsync(a->packed, s.packed, (size_t)(n + 1) / 2, d2h, st));
    if (a->double_quant) {
        STEP("copying the absmax codes", cudaMemcpyAsync(a->absmax_codes, s.codes, (size_t)nblocks, d2h, st));
        STEP("copying the nested absmax", cudaMemcpyAsync(a->nested, s.nested, (size_t)nnested * 4, d2h, st));
        STEP("copying the offset", cudaMemcpyAsync(a->offset, s.offset, 4, d2h, st));
    } else {
        STEP("copying the absmax", cudaMemcpyAsync(a->absmax, s.absmax, (size_t)nblocks * 4, d2h, st));
    }
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

extern "C" int qlp_4bit_cuda_quantize(const qlp_4bit_cuda_quant_args *a, int64_t *bad_index, float *bad_value, char *err,
                                      size_t errcap)
{
    *bad_index = -1;
    if (qlp::require_sm90(err, errcap)) return 1;
    const int64_t nblocks = (a->n + a->blocksize - 1) / a->blocksize;
    const int64_t nnested = (nblocks + a->nested_blocksize - 1) / a->nested_blocksize;
    qlp::Carve carve = {nullptr, 0};
    layout(carve, a, nblocks, nnested);
    const char *failed = "allocating device scratch";
    void *base = nullptr;
    cudaError_t e = cudaMalloc(&base, carve.used);
    if (e == cudaSuccess) {
        carve = {static_cast<char *>(base), 0};
        Scratch s = layout(carve, a, nblocks, nnested);
        e = run(a, s, nblocks, nnested, bad_index, bad_value, &failed);
        cudaError_t f = cudaFree(base);
        if (e == cudaSuccess && f != cudaSuccess) {
            e = f;
            failed = "freeing device scratch";
        }
    }
    if (e != cudaSuccess) {
        snprintf(err, errcap, "%s (%zu bytes of scratch for %lld weights): %s", failed, carve.used, (long long)a->n,
                 cudaGetErrorString(e));
        cudaGetLastError(); /* clear a non-sticky error for the next call */
        return -1;
    }
    return 0;
}
