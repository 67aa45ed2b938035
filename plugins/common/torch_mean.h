/* Bit-exact CPU emulation of PyTorch's CUDA `x.mean()` for a contiguous 1-D
 * float32 tensor (the reduction order of ATen's generic GPU reduction kernel,
 * as configured for one output on an H100: 132 SMs, 2048 threads per SM).
 * bitsandbytes uses it for the double-quantization offset (absmax.mean()). */
#ifndef QLP_TORCH_MEAN_H
#define QLP_TORCH_MEAN_H

#include <stdint.h>

/* Mean of x[0..n-1], n >= 1, assuming the device buffer is 16-byte aligned
 * (true of a fresh CUDA allocation). Returns NaN for n <= 0, like torch. */
float qlp_torch_cuda_mean_f32(const float *x, int64_t n);

#endif
