/* The optimizer on the device: AdamW (ql_adamw_apply, core/lora.c, operation
 * for operation; built with --fmad=false, so the same bits), and the squared
 * norm and scaling of gradient clipping (kernels/cuda_ops.h). */
#include <math.h>

#include "cuda_common.cuh"
#include "cuda_ops.h"

#define ST(s) ((cudaStream_t)(s))

__global__ void k_adamw(float *params, float *m, float *v, const float *grads, int64_t n, float beta1, float beta2,
                        float eps, float decay, float step_size, float bc2_sqrt)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float p = params[i] * decay;
        float g = grads[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        params[i] = p - step_size * mi / denom;
    }
}

extern "C" int qlk_adamw(void *stream, float *params, float *m, float *v, const float *grads, int64_t n, float beta1,
                         float beta2, float eps, float decay, float step_size, float bc2_sqrt)
{
    if (n > 0)
        k_adamw<<<qlk_blocks(n, 256), 256, 0, ST(stream)>>>(params, m, v, grads, n, beta1, beta2, eps, decay,
                                                            step_size, bc2_sqrt);
    return qlk_status();
}

__global__ void k_scale(float *x, float c, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= c;
}

extern "C" int qlk_scale(void *stream, float *x, float c, int64_t n)
{
    if (n > 0) k_scale<<<qlk_blocks(n, 256), 256, 0, ST(stream)>>>(x, c, n);
    return qlk_status();
}

/* partial sums of squares per block, in double, then one block over them */
enum { SS_BLOCKS = 1024, SS_THREADS = 256 };

__global__ void k_sumsq_part(double *part, const float *x, int64_t n)
{
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = qlk_block_sum(s);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void k_sumsq_final(double *out, const double *part, int nparts)
{
    double s = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
    s = qlk_block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

extern "C" int qlk_sum_squares(void *stream, double *out, double *partials, const float *x, int64_t n)
{
    k_sumsq_part<<<SS_BLOCKS, SS_THREADS, 0, ST(stream)>>>(partials, x, n);
    k_sumsq_final<<<1, SS_THREADS, 0, ST(stream)>>>(out, partials, SS_BLOCKS);
    return qlk_status();
}

/* one thread an element of w: its rank terms in order, as the CPU's loop adds them */
__global__ void k_lora_merge(float *w, const float *a, const float *b, int64_t out, int64_t in, int64_t rank,
                             float scale)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < out * in; i += stride) {
        const int64_t o = i / in, j = i % in;
        float acc = w[i];
        for (int64_t r = 0; r < rank; r++) {
            const float c = b[o * rank + r] * scale;
            if (c == 0.0f) continue;
            acc += c * a[r * in + j];
        }
        w[i] = acc;
    }
}

extern "C" int qlk_lora_merge(void *stream, float *w, const float *a, const float *b, int64_t out, int64_t in,
                              int64_t rank, float scale)
{
    if (out * in > 0)
        k_lora_merge<<<qlk_blocks(out * in, 256) < 132 * 64 ? qlk_blocks(out * in, 256) : 132 * 64, 256, 0,
                       (cudaStream_t)stream>>>(w, a, b, out, in, rank, scale);
    return qlk_status();
}
