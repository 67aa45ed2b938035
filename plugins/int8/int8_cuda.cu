/* Device materialize of the row-wise int8 format (int8.c's materialize on
 * the GPU): CB * SCB * (1/127), each product rounded on its own, bit for bit
 * the CPU reference. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "int8_cuda.h"
#include "qlp_cuda.cuh"

namespace {

using qlp::f32_to_bf16;
using qlp::grid_for;

__device__ __forceinline__ float dq(int8_t c, float scb) { return __fmul_rn(__fmul_rn((float)c, scb), 7.874015718698502e-3f); }

/* 16 elements a thread: one 16-byte load of codes (cols % 16 == 0). */
template <bool BF16>
__global__ void materialize_vec(const int8_t *codes, const float *scb, void *out, int64_t ld, int64_t cols, int64_t row0,
                                int64_t nrows)
{
    const int64_t per_row = cols / 16, total = nrows * per_row;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = g / per_row, c = (g - r * per_row) * 16;
        int4 p = *reinterpret_cast<const int4 *>(codes + (row0 + r) * cols + c);
        const int8_t *b = reinterpret_cast<const int8_t *>(&p);
        float s = scb[row0 + r];
        if (BF16) {
            uint32_t h[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                h[k] = (uint32_t)f32_to_bf16(dq(b[2 * k], s)) | ((uint32_t)f32_to_bf16(dq(b[2 * k + 1], s)) << 16);
            uint4 *dst = reinterpret_cast<uint4 *>(static_cast<uint16_t *>(out) + r * ld + c);
            dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
            dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
        } else {
            float4 *dst = reinterpret_cast<float4 *>(static_cast<float *>(out) + r * ld + c);
#pragma unroll
            for (int k = 0; k < 4; k++)
                dst[k] = make_float4(dq(b[4 * k], s), dq(b[4 * k + 1], s), dq(b[4 * k + 2], s), dq(b[4 * k + 3], s));
        }
    }
}

/* Variant 2: groups of 8 elements (an 8-byte load, one 16-byte bf16 store),
 * 4 a thread at warp-contiguous positions, loads first (cols % 8 == 0). */
template <bool BF16>
__global__ void __launch_bounds__(256) materialize_vec8(const int8_t *__restrict__ codes, const float *__restrict__ scb,
                                                        void *__restrict__ out, int64_t ld, int64_t cols, int64_t row0,
                                                        int64_t nrows)
{
    const int64_t per_row = cols / 8, groups = nrows * per_row;
    const int lane = threadIdx.x & 31;
    const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t base = warp * 128; base < groups; base += warps * 128) {
        uint2 p[4];
        float sc[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int64_t g = base + k * 32 + lane;
            if (g < groups) {
                int64_t r = g / per_row, c = (g - r * per_row) * 8;
                p[k] = __ldg(reinterpret_cast<const uint2 *>(codes + (row0 + r) * cols + c));
                sc[k] = __ldg(scb + row0 + r);
            }
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int64_t g = base + k * 32 + lane;
            if (g >= groups) continue;
            int64_t r = g / per_row, c = (g - r * per_row) * 8;
            const int8_t *b = reinterpret_cast<const int8_t *>(&p[k]);
            if (BF16) {
                uint4 h = make_uint4((uint32_t)f32_to_bf16(dq(b[0], sc[k])) | ((uint32_t)f32_to_bf16(dq(b[1], sc[k])) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[2], sc[k])) | ((uint32_t)f32_to_bf16(dq(b[3], sc[k])) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[4], sc[k])) | ((uint32_t)f32_to_bf16(dq(b[5], sc[k])) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[6], sc[k])) | ((uint32_t)f32_to_bf16(dq(b[7], sc[k])) << 16));
                *reinterpret_cast<uint4 *>(static_cast<uint16_t *>(out) + r * ld + c) = h;
            } else {
                float4 *dst = reinterpret_cast<float4 *>(static_cast<float *>(out) + r * ld + c);
                dst[0] = make_float4(dq(b[0], sc[k]), dq(b[1], sc[k]), dq(b[2], sc[k]), dq(b[3], sc[k]));
                dst[1] = make_float4(dq(b[4], sc[k]), dq(b[5], sc[k]), dq(b[6], sc[k]), dq(b[7], sc[k]));
            }
        }
    }
}

/* Variant 3: rows in a 2-D grid, no division (as bnb4bit_cuda.cu's
 * materialize_rows8): thread t takes groups of 8 at tile * 512 + k * 128 + t. */
constexpr int kV3Threads = 128, kV3Groups = 4;

template <bool BF16>
__global__ void __launch_bounds__(kV3Threads) materialize_rows8(const int8_t *__restrict__ codes, const float *__restrict__ scb,
                                                                void *__restrict__ out, int64_t ld, int64_t cols,
                                                                int64_t row0, int64_t nrows)
{
    const int per_row = (int)(cols / 8);
    for (int64_t r = blockIdx.y; r < nrows; r += gridDim.y) {
        const int8_t *src = codes + (row0 + r) * cols;
        const float sc = __ldg(scb + row0 + r);
        uint2 p[kV3Groups];
#pragma unroll
        for (int k = 0; k < kV3Groups; k++) {
            int g = (blockIdx.x * kV3Groups + k) * kV3Threads + threadIdx.x;
            if (g < per_row) p[k] = __ldg(reinterpret_cast<const uint2 *>(src) + g);
        }
#pragma unroll
        for (int k = 0; k < kV3Groups; k++) {
            int g = (blockIdx.x * kV3Groups + k) * kV3Threads + threadIdx.x;
            if (g >= per_row) continue;
            const int8_t *b = reinterpret_cast<const int8_t *>(&p[k]);
            int64_t o = r * ld + (int64_t)g * 8;
            if (BF16) {
                uint4 h = make_uint4((uint32_t)f32_to_bf16(dq(b[0], sc)) | ((uint32_t)f32_to_bf16(dq(b[1], sc)) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[2], sc)) | ((uint32_t)f32_to_bf16(dq(b[3], sc)) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[4], sc)) | ((uint32_t)f32_to_bf16(dq(b[5], sc)) << 16),
                                     (uint32_t)f32_to_bf16(dq(b[6], sc)) | ((uint32_t)f32_to_bf16(dq(b[7], sc)) << 16));
                *reinterpret_cast<uint4 *>(static_cast<uint16_t *>(out) + o) = h;
            } else {
                float4 *dst = reinterpret_cast<float4 *>(static_cast<float *>(out) + o);
                dst[0] = make_float4(dq(b[0], sc), dq(b[1], sc), dq(b[2], sc), dq(b[3], sc));
                dst[1] = make_float4(dq(b[4], sc), dq(b[5], sc), dq(b[6], sc), dq(b[7], sc));
            }
        }
    }
}

template <bool BF16>
__global__ void materialize_any(const int8_t *codes, const float *scb, void *out, int64_t ld, int64_t cols, int64_t row0,
                                int64_t nrows)
{
    const int64_t total = nrows * cols;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = g / cols, c = g - r * cols;
        float v = dq(codes[(row0 + r) * cols + c], scb[row0 + r]);
        if (BF16) static_cast<uint16_t *>(out)[r * ld + c] = f32_to_bf16(v);
        else static_cast<float *>(out)[r * ld + c] = v;
    }
}

} // namespace

extern "C" int qlp_int8_cuda_materialize(const int8_t *codes, const float *scb, int64_t cols, int bf16, void *out,
                                         int64_t ld, int64_t row0, int64_t nrows, void *stream, char *err, size_t errcap)
{
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int threads = 256;
    size_t esize = bf16 ? 2 : 4;
    static int variant = -1; /* QLP_MATERIALIZE_VARIANT as in bnb4bit_cuda.cu: 3 (default), 2, 1, 0 */
    if (variant < 0) {
        const char *v = getenv("QLP_MATERIALIZE_VARIANT");
        variant = v && *v >= '0' && *v <= '3' ? *v - '0' : 3;
    }
    bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0 && (ld * esize) % 16 == 0;
    bool vec16 = variant == 1 && aligned && cols % 16 == 0 && reinterpret_cast<uintptr_t>(codes) % 16 == 0;
    bool vec8 = variant == 2 && aligned && cols % 8 == 0 && reinterpret_cast<uintptr_t>(codes) % 8 == 0;
    bool rows8 = variant == 3 && aligned && cols % 8 == 0 && reinterpret_cast<uintptr_t>(codes) % 8 == 0 &&
                 cols / 8 < (1 << 30);
    if (nrows > 0 && cols > 0) {
        if (rows8) {
            int per_row = (int)(cols / 8);
            dim3 grid((unsigned)((per_row + kV3Threads * kV3Groups - 1) / (kV3Threads * kV3Groups)),
                      (unsigned)(nrows < 65535 ? nrows : 65535));
            if (bf16) materialize_rows8<true><<<grid, kV3Threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
            else materialize_rows8<false><<<grid, kV3Threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
        } else if (vec8) {
            int grid = grid_for((nrows * (cols / 8) + 127) / 128 * 32, threads);
            if (bf16) materialize_vec8<true><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
            else materialize_vec8<false><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
        } else if (vec16) {
            int grid = grid_for(nrows * (cols / 16), threads);
            if (bf16) materialize_vec<true><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
            else materialize_vec<false><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
        } else {
            int grid = grid_for(nrows * cols, threads);
            if (bf16) materialize_any<true><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
            else materialize_any<false><<<grid, threads, 0, st>>>(codes, scb, out, ld, cols, row0, nrows);
        }
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        snprintf(err, errcap, "%s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}
