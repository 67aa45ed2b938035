/* Device helpers shared by the plugins' CUDA kernels (bnb4bit_cuda.cu,
 * bnb4bit_quantize.cu, int8/int8_cuda.cu, int8/int8_quantize.cu; internal,
 * nvcc only). */
#ifndef QLP_CUDA_CUH
#define QLP_CUDA_CUH

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

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

/* ---- device quantize (ABI 1.2 quantize_device) ---- */

/* The CPU reference emulates the reciprocal of an sm_90 GPU (fastmath.c);
 * the device quantize uses the instruction itself, so its bytes equal the
 * CPU's only on sm_90.  0 when the current device is one; otherwise -1 with
 * why in err. */
inline int require_sm90(char *err, size_t errcap)
{
    int dev = 0, major = 0, minor = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (e != cudaSuccess) {
        snprintf(err, errcap, "cannot query the GPU: %s", cudaGetErrorString(e));
        return -1;
    }
    if (major != 9) {
        snprintf(err, errcap,
                 "this GPU is sm_%d%d, but the device quantize matches the CPU's output only on sm_90, whose "
                 "reciprocal the CPU reproduces (quantize with --device cpu)",
                 major, minor);
        return -1;
    }
    return 0;
}

/* The first index i < n whose magnitude bits (|x| as an unsigned integer)
 * are >= limit, into *first (atomicMin; start it at ~0): 0x7f800000 finds
 * the first NaN or Inf.  Each thread's indices increase, so its first hit is
 * its smallest. */
static __global__ void first_magnitude_at_least(const float *__restrict__ x, int64_t n, uint32_t limit,
                                                unsigned long long *first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        if ((__float_as_uint(x[i]) & 0x7fffffffu) >= limit) {
            atomicMin(first, (unsigned long long)i);
            return;
        }
}

/* bfloat16 -> float32, exactly (the bits shifted up), as the host's loader
 * widens a bf16 checkpoint. */
static __global__ void widen_bf16(const uint16_t *__restrict__ in, int64_t n, float *__restrict__ out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __uint_as_float((uint32_t)in[i] << 16);
}

/* Carves one device allocation into 256-byte aligned pieces: take() each
 * piece's size once to count (base == NULL), then again with the base. */
struct Carve {
    char *base;
    size_t used;
    template <typename T> T *take(size_t bytes)
    {
        size_t at = used;
        used += (bytes + 255) / 256 * 256;
        return base ? reinterpret_cast<T *>(base + at) : nullptr;
    }
};

} // namespace qlp

#endif
