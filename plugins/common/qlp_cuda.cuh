/* Device helpers shared by the plugins' CUDA kernels (bnb4bit_cuda.cu,
 * int8/int8_cuda.cu; internal, nvcc only). */
#ifndef QLP_CUDA_CUH
#define QLP_CUDA_CUH

#include <cuda_runtime.h>
#include <stdint.h>

namespace qlp {

/* qlp_f32_to_bf16 (fastmath.h) on the device: round to nearest even, NaN
 * kept quiet with its payload's top bits, bit for bit the CPU reference. */
__device__ __forceinline__ uint16_t f32_to_bf16(float f)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* Blocks for a grid-stride kernel over `work` threads' worth of items:
 * enough to cover them, at most 16 per multiprocessor. */
inline int grid_for(int64_t work, int threads)
{
    static int sms = 0;
    if (!sms) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
            sms = 132;
    }
    int64_t blocks = (work + threads - 1) / threads, cap = (int64_t)sms * 16;
    return (int)(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

} // namespace qlp

#endif
