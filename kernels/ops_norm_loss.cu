/* RMSNorm forward and backward and the token cross-entropy of the CUDA
 * backend: one block per row, sums in double as the CPU operators take them
 * (kernels/cuda_ops.h). */
#include <math.h>

#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "ops.h"

#define ST(s) ((cudaStream_t)(s))

__global__ void k_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *weight, int64_t C, float eps)
{
    const int64_t row = blockIdx.x;
    const float *xt = x + row * C;
    double ss = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) ss += (double)xt[c] * xt[c];
    ss = qlk_block_sum(ss);
    const float r = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[row * C + c] = weight[c] * (xt[c] * r);
}

extern "C" int qlk_rmsnorm_forward(void *stream, float *out, float *rstd, const float *x, const float *weight,
                                   int64_t rows, int64_t C, float eps)
{
    if (rows > 0) k_rmsnorm_fwd<<<(unsigned)rows, 256, 0, ST(stream)>>>(out, rstd, x, weight, C, eps);
    return qlk_status();
}

/* dx_c = r g_c - x_c r^3 / C sum_j g_j x_j, g = dy w (ql_rmsnorm_backward) */
__global__ void k_rmsnorm_bwd(float *dx, const float *dy, const float *x, const float *weight, const float *rstd,
                              int64_t C, int accumulate)
{
    const int64_t row = blockIdx.x;
    const float *xt = x + row * C, *dyt = dy + row * C;
    const float r = rstd[row];
    double gx = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) gx += (double)(dyt[c] * weight[c]) * xt[c];
    gx = qlk_block_sum(gx);
    const float coef = (float)(gx * r * r * r / (double)C);
    float *d = dx + row * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = r * (dyt[c] * weight[c]) - coef * xt[c];
        d[c] = accumulate ? d[c] + v : v;
    }
}

/* dweight[c] += sum over rows, in row order, in float (as the CPU strips) */
__global__ void k_rmsnorm_dweight(float *dweight, const float *dy, const float *x, const float *rstd, int64_t rows,
                                  int64_t C)
{
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int64_t t = 0; t < rows; t++) acc += dy[t * C + c] * (x[t * C + c] * rstd[t]);
    dweight[c] += acc;
}

extern "C" int qlk_rmsnorm_backward(void *stream, float *dx, float *dweight, const float *dy, const float *x,
                                    const float *weight, const float *rstd, int64_t rows, int64_t C, int accumulate)
{
    if (rows <= 0) return qlk_status();
    k_rmsnorm_bwd<<<(unsigned)rows, 256, 0, ST(stream)>>>(dx, dy, x, weight, rstd, C, accumulate);
    if (dweight) k_rmsnorm_dweight<<<qlk_blocks(C, 128), 128, 0, ST(stream)>>>(dweight, dy, x, rstd, rows, C);
    return qlk_status();
}

/* One row of ql_cross_entropy_forward_backward: loss = log sum exp - logit of
 * the target; dlogits = scale (softmax - onehot), written in place when it
 * aliases the logits (the target's logit is read first). */
__global__ void k_cross_entropy(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                                int64_t V, int32_t ignore_index, float scale)
{
    const int64_t row = blockIdx.x;
    const float *lg = logits + row * V;
    float *dl = dlogits ? dlogits + row * V : NULL;
    const int32_t target = targets[row];
    if (target == ignore_index) {
        if (dl)
            for (int64_t i = threadIdx.x; i < V; i += blockDim.x) dl[i] = 0.0f;
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const float lt = lg[target];
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, lg[i]);
    mx = qlk_block_max(mx, -INFINITY); /* its barriers also order every read of lt before the writes below */
    double sum = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) sum += (double)ql_expf(lg[i] - mx);
    sum = qlk_block_sum(sum);
    if (threadIdx.x == 0) losses[row] = (float)(((double)mx + log(sum)) - (double)lt);
    if (dl) {
        const float inv = (float)(1.0 / sum), si = scale * inv;
        const float pt = ql_expf(lt - mx) * inv;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            const float e = ql_expf(lg[i] - mx);
            dl[i] = i == target ? scale * (pt - 1.0f) : si * e;
        }
    }
}

extern "C" int qlk_cross_entropy(void *stream, float *losses, float *dlogits, const float *logits,
                                 const int32_t *targets, int64_t rows, int64_t V, int32_t ignore_index, float scale)
{
    if (rows > 0)
        k_cross_entropy<<<(unsigned)rows, 256, 0, ST(stream)>>>(losses, dlogits, logits, targets, V, ignore_index,
                                                                scale);
    return qlk_status();
}
