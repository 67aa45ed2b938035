/* Device materialize of the GPTQ layout (optq.c's materialize on the GPU):
 * float(scale) * (code - zero), each product rounded on its own, bit for
 * bit the CPU reference, for 2, 3, 4 and 8 bits and any g_idx.
 *
 * The codes of output row r's chunk of 32 input columns are `bits` 32-bit
 * words of qweight, at (chunk * bits + j) * rows + r: consecutive rows are
 * consecutive words, as are their scales and zeros ([groups, rows]); the
 * output is row-major, so a shared tile turns one order into the other. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "optq_cuda.h"
#include "qlp_cuda.cuh"

namespace {

using qlp::f32_to_bf16;

/* Code k (0..31) of a chunk held in registers w[0..BITS-1]. */
template <int BITS> __device__ __forceinline__ uint32_t field(const uint32_t *w, int k)
{
    const int bit = k * BITS, i = bit >> 5, sh = bit & 31;
    uint32_t v = w[i] >> sh;
    if (sh + BITS > 32) v |= w[i + 1] << (32 - sh);
    return v & ((1u << BITS) - 1);
}

/* A block: 32 output rows (its lanes) by 8 chunks of 32 columns (its
 * warps).  Each thread decodes its row's chunk into a shared tile, whose
 * rows the block then writes out whole, 16 bytes a thread, so that both
 * the reads (consecutive rows are consecutive words) and the writes
 * (consecutive columns) are coalesced. */
constexpr int kRows = 32, kChunks = 8, kCols = kChunks * 32;

template <int BITS, bool BF16>
__global__ void __launch_bounds__(256) materialize_tiles(const uint32_t *__restrict__ qweight, const int32_t *__restrict__ g_idx,
                                                         const float *__restrict__ scale, const int32_t *__restrict__ zero,
                                                         void *__restrict__ out, int64_t ld, int64_t rows, int64_t cols,
                                                         int64_t row0, int64_t nrows, bool vec)
{
    using T = typename std::conditional<BF16, uint16_t, float>::type;
    constexpr int kPad = 16 / sizeof(T); /* one 16-byte step of padding a row: no bank conflicts */
    __shared__ __align__(16) T tile[kRows][kCols + kPad];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t chunks = (cols + 31) / 32, c_tile = (int64_t)blockIdx.x * kCols;
    for (int64_t r_tile = (int64_t)blockIdx.y * kRows; r_tile < nrows; r_tile += (int64_t)gridDim.y * kRows) {
        /* decode: thread (lane, warp) takes row r_tile + lane, chunk c_tile / 32 + warp */
        const int64_t rr = r_tile + lane, chunk = c_tile / 32 + warp, c0 = chunk * 32;
        if (rr < nrows && chunk < chunks) {
            const int64_t r = row0 + rr;
            uint32_t w[BITS];
#pragma unroll
            for (int j = 0; j < BITS; j++) w[j] = __ldg(qweight + (chunk * BITS + j) * rows + r);
            const int n = cols - c0 < 32 ? (int)(cols - c0) : 32;
            int32_t gprev = -1, z = 0;
            float sc = 0.0f;
            T v[32];
#pragma unroll
            for (int k = 0; k < 32; k++) {
                if (k < n) {
                    const int32_t g = __ldg(g_idx + c0 + k);
                    if (g != gprev) {
                        sc = __ldg(scale + (int64_t)g * rows + r);
                        z = __ldg(zero + (int64_t)g * rows + r);
                        gprev = g;
                    }
                    const float x = __fmul_rn(sc, (float)((int32_t)field<BITS>(w, k) - z));
                    if (BF16) v[k] = f32_to_bf16(x);
                    else v[k] = x;
                } else {
                    v[k] = 0;
                }
            }
            uint4 *dst = reinterpret_cast<uint4 *>(&tile[lane][warp * 32]);
            if (BF16) {
#pragma unroll
                for (int q = 0; q < 4; q++)
                    dst[q] = make_uint4((uint32_t)v[8 * q] | ((uint32_t)v[8 * q + 1] << 16),
                                        (uint32_t)v[8 * q + 2] | ((uint32_t)v[8 * q + 3] << 16),
                                        (uint32_t)v[8 * q + 4] | ((uint32_t)v[8 * q + 5] << 16),
                                        (uint32_t)v[8 * q + 6] | ((uint32_t)v[8 * q + 7] << 16));
            } else {
#pragma unroll
                for (int q = 0; q < 8; q++)
                    dst[q] = make_uint4(__float_as_uint(v[4 * q]), __float_as_uint(v[4 * q + 1]),
                                        __float_as_uint(v[4 * q + 2]), __float_as_uint(v[4 * q + 3]));
            }
        }
        __syncthreads();
        /* write: the tile's rows, 16 bytes a thread */
        const int per_row = kCols * (int)sizeof(T) / 16; /* 16-byte pieces of a tile row */
        const int64_t tile_cols = cols - c_tile < kCols ? cols - c_tile : kCols;
        const int64_t tile_rows = nrows - r_tile < kRows ? nrows - r_tile : kRows;
        constexpr int kPer = 16 / sizeof(T); /* elements a piece */
        for (int i = threadIdx.x; i < kRows * per_row; i += blockDim.x) {
            const int tr = i / per_row, tc = (i % per_row) * kPer;
            if (tr >= tile_rows || tc >= tile_cols) continue;
            T *o = static_cast<T *>(out) + (r_tile + tr) * ld + c_tile + tc;
            if (vec && tc + kPer <= tile_cols) {
                *reinterpret_cast<uint4 *>(o) = *reinterpret_cast<const uint4 *>(&tile[tr][tc]);
            } else {
                for (int e = 0; e < kPer && tc + e < tile_cols; e++) o[e] = tile[tr][tc + e];
            }
        }
        __syncthreads();
    }
}

template <int BITS>
void launch(const uint32_t *qweight, const int32_t *g_idx, const float *scale, const int32_t *zero, int bf16, void *out,
            int64_t ld, int64_t rows, int64_t cols, int64_t row0, int64_t nrows, bool vec, cudaStream_t st)
{
    const int64_t row_tiles = (nrows + kRows - 1) / kRows;
    dim3 grid((unsigned)((cols + kCols - 1) / kCols), (unsigned)(row_tiles < 65535 ? row_tiles : 65535));
    if (bf16)
        materialize_tiles<BITS, true><<<grid, 256, 0, st>>>(qweight, g_idx, scale, zero, out, ld, rows, cols, row0, nrows,
                                                            vec);
    else
        materialize_tiles<BITS, false><<<grid, 256, 0, st>>>(qweight, g_idx, scale, zero, out, ld, rows, cols, row0,
                                                             nrows, vec);
}

} // namespace

extern "C" int qlp_optq_cuda_materialize(const uint32_t *qweight, const int32_t *g_idx, const float *scale,
                                         const int32_t *zero, int bits, int64_t rows, int64_t cols, int bf16, void *out,
                                         int64_t ld, int64_t row0, int64_t nrows, void *stream, char *err, size_t errcap)
{
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const size_t esize = bf16 ? 2 : 4;
    const bool vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && (ld * (int64_t)esize) % 16 == 0;
    if (nrows > 0 && cols > 0) {
        switch (bits) {
        case 2: launch<2>(qweight, g_idx, scale, zero, bf16, out, ld, rows, cols, row0, nrows, vec, st); break;
        case 3: launch<3>(qweight, g_idx, scale, zero, bf16, out, ld, rows, cols, row0, nrows, vec, st); break;
        case 4: launch<4>(qweight, g_idx, scale, zero, bf16, out, ld, rows, cols, row0, nrows, vec, st); break;
        case 8: launch<8>(qweight, g_idx, scale, zero, bf16, out, ld, rows, cols, row0, nrows, vec, st); break;
        default: snprintf(err, errcap, "%d bits: not 2, 3, 4 or 8", bits); return -1;
        }
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        snprintf(err, errcap, "%s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}
