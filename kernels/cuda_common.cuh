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

static inline int qlk_status(void) { return (int)cudaGetLastError(); }

/* Sum (or max) over the block of one value per thread, returned to every
 * thread.  blockDim.x is a multiple of 32, at most 1024; every thread calls. */
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
