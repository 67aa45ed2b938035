/* Shared pieces of the engine's kernels: block reductions and grid sizing. */
#ifndef QL_CUDA_COMMON_CUH
#define QL_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

/* blocks of `threads` covering n items, capped at the grid's x limit (kernels loop) */
static inline unsigned qlk_blocks(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    if (b < 1) b = 1;
    return (unsigned)(b > 0x7fffffff ? 0x7fffffff : b);
}

/* blocks for a grid-stride loop over n elements 4 at a time: enough to fill
 * the device several times over (132 SMs), each thread looping past that */
static inline unsigned qlk_vec_blocks(int64_t n)
{
    const int64_t b = (n / 4 + 255) / 256;
    return (unsigned)(b < 1 ? 1 : b > 132 * 16 ? 132 * 16 : b);
}

static inline int qlk_status(void) { return (int)cudaGetLastError(); }

/* bfloat16 bits of x, nearest even (NaN stays a quiet NaN): ql_be_bf16 of core/backend.h */
__device__ inline uint16_t to_bf16(float x)
{
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ inline float from_bf16(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

template <typename T> __device__ inline T qlk_warp_sum(T v)
{
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T> __device__ inline T qlk_warp_max(T v)
{
    for (int o = 16; o; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

/* Sum (or max) over the block of one value per thread, returned to every
 * thread.  blockDim.x is a multiple of 32, at most 1024; every thread calls. */
template <typename T> __device__ inline T qlk_block_sum(T v)
{
    __shared__ T sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = qlk_warp_sum(v);
    __syncthreads(); /* an earlier call's readers are done with sh */
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : (T)0;
        v = qlk_warp_sum(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

template <typename T> __device__ inline T qlk_block_max(T v, T lowest)
{
    __shared__ T sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = qlk_warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : lowest;
        v = qlk_warp_max(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

#endif
