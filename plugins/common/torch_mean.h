/* Bit-exact CPU emulation of PyTorch's CUDA `x.mean()` for a contiguous 1-D
 * float32 tensor (the reduction order of ATen's generic GPU reduction kernel,
 * as configured for one output on an H100: 132 SMs, 2048 threads per SM).
 * bitsandbytes uses it for the double-quantization offset (absmax.mean()).
 *
 * The launch plan and the value of one lane are QLP_HD functions, shared by
 * the CPU emulation (torch_mean.c) and the plugins' device quantize kernel,
 * which computes the same mean in the same order on the GPU. */
#ifndef QLP_TORCH_MEAN_H
#define QLP_TORCH_MEAN_H

#include <stdint.h>

#include "qlp_hd.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Mean of x[0..n-1], n >= 1, assuming the device buffer is 16-byte aligned
 * (true of a fresh CUDA allocation). Returns NaN for n <= 0, like torch. */
float qlp_torch_cuda_mean_f32(const float *x, int64_t n);

enum {
    QLP_TORCH_MEAN_SMS = 132,            /* H100 SXM */
    QLP_TORCH_MEAN_THREADS_PER_SM = 2048,
    QLP_TORCH_MEAN_WARP = 32,
    QLP_TORCH_MEAN_BLOCK_MAX = 512,      /* thread cap of the reduction for float */
    QLP_TORCH_MEAN_VEC = 4,              /* floats per 16-byte vector load */
    QLP_TORCH_MEAN_ACC = 4,              /* accumulators per thread (unroll) */
    QLP_TORCH_MEAN_VEC_MIN_WIDTH = 128,  /* vectorize when n is at least this */
    QLP_TORCH_MEAN_SPLIT_WARPS_MIN = 16, /* minimum values per thread ... */
    QLP_TORCH_MEAN_SPLIT_BLOCKS_MIN = 256 /* ... and threshold for multi-block */
};

/* The launch configuration torch derives from n (torch_mean.c explains it). */
typedef struct qlp_torch_mean_plan {
    int vectorized; /* n >= 128: 16-byte vectors of 4 floats */
    int threads;    /* W: lanes of a block, a power of two <= 512 */
    int64_t blocks; /* G: blocks along grid.y */
    int64_t stride; /* W * G, in vectors (vectorized) or elements */
    float factor;   /* 1.0f / (float)n */
} qlp_torch_mean_plan;

/* One float add, rounded to float. */
QLP_HD float qlp_torch_mean_add(float a, float b)
{
    float r = a + b;
    return r;
}

static inline void qlp_torch_mean_plan_for(int64_t n, qlp_torch_mean_plan *p)
{
    p->vectorized = n >= QLP_TORCH_MEAN_VEC_MIN_WIDTH;
    const int64_t span = p->vectorized ? n / QLP_TORCH_MEAN_VEC : n;
    int w = 1;
    if (span >= QLP_TORCH_MEAN_BLOCK_MAX) w = QLP_TORCH_MEAN_BLOCK_MAX;
    else
        while ((int64_t)w * 2 <= span) w *= 2; /* largest power of two <= span */
    p->threads = w;
    /* Split across blocks? */
    int64_t g = 1;
    const int64_t vpt = (n + w - 1) / w;
    if (vpt >= QLP_TORCH_MEAN_SPLIT_WARPS_MIN && vpt >= QLP_TORCH_MEAN_SPLIT_BLOCKS_MIN) {
        const int64_t target = (int64_t)QLP_TORCH_MEAN_SMS * (QLP_TORCH_MEAN_THREADS_PER_SM / w);
        int64_t g1 = target; /* one output -> grid.x = 1 */
        int64_t g2 = (vpt + QLP_TORCH_MEAN_SPLIT_WARPS_MIN - 1) / QLP_TORCH_MEAN_SPLIT_WARPS_MIN;
        int64_t g3 = (vpt + QLP_TORCH_MEAN_SPLIT_BLOCKS_MIN - 1) / QLP_TORCH_MEAN_SPLIT_BLOCKS_MIN;
        g = g1 < g2 ? g1 : g2;
        if (g3 > g) g = g3;
    }
    p->blocks = g;
    p->stride = (int64_t)w * g;
    p->factor = 1.0f / (float)n;
}

/* The value lane t of block c contributes to its block's sum: its four
 * accumulators combined as ((a0 + a1) + a2) + a3.  `mis` = (device address
 * % 16) / 4, how many floats the buffer start lies past a 16-byte boundary
 * (0 for a fresh allocation). */
QLP_HD float qlp_torch_mean_lane(const float *x, int64_t n, const qlp_torch_mean_plan *p, int mis, int64_t c, int t)
{
    const int V = QLP_TORCH_MEAN_VEC;
    const int64_t w = p->threads, stride = p->stride;
    float acc[QLP_TORCH_MEAN_ACC] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p->vectorized) {
        const float *d = x;
        int64_t end = n;
        if (mis > 0) {
            /* Head: the elements before the first aligned vector seed
             * accumulator 0 of lanes mis..3 of block 0. */
            if (c == 0 && t >= mis && t < V) acc[0] = qlp_torch_mean_add(0.0f, x[t - mis]);
            d = x + (V - mis);
            end = n - (V - mis);
        }
        /* This lane's vectors, in increasing order. */
        for (int64_t j = c * w + t; j * V + (V - 1) < end; j += stride)
            for (int k = 0; k < V; k++) acc[k] = qlp_torch_mean_add(acc[k], d[j * V + k]);
        /* Tail elements that do not fill a vector: lanes 0.. of block 0. */
        if (c == 0) {
            int64_t tail = end - end % V;
            if (tail + t < end) acc[0] = qlp_torch_mean_add(acc[0], d[tail + t]);
        }
    } else {
        int64_t i = t + c * w;
        while (i + (QLP_TORCH_MEAN_ACC - 1) * stride < n) {
            for (int k = 0; k < QLP_TORCH_MEAN_ACC; k++) acc[k] = qlp_torch_mean_add(acc[k], x[i + k * stride]);
            i += QLP_TORCH_MEAN_ACC * stride;
        }
        for (int k = 0; k < QLP_TORCH_MEAN_ACC && i < n; k++, i += stride) acc[k] = qlp_torch_mean_add(acc[k], x[i]);
    }
    float s = acc[0];
    for (int k = 1; k < QLP_TORCH_MEAN_ACC; k++) s = qlp_torch_mean_add(s, acc[k]);
    return s;
}

/* Sum of v[0..w-1] in the order a w x 1 thread block reduces it (w a power of
 * two <= 512): halving through shared memory down to an offset of 32, then
 * warp shuffle-down steps with decreasing offsets.  Destroys v.  (The device
 * runs the same steps in parallel: within one step no lane reads a value
 * another lane writes.) */
static inline float qlp_torch_mean_block_sum(float *v, int w)
{
    int width = w;
    if (width > QLP_TORCH_MEAN_WARP) {
        for (int off = width / 2; off >= QLP_TORCH_MEAN_WARP; off /= 2)
            for (int t = 0; t < off; t++) v[t] = qlp_torch_mean_add(v[t], v[t + off]);
        width = QLP_TORCH_MEAN_WARP;
    }
    /* Shuffle-down steps, largest offset first.  Only lanes below the
     * offset can still feed lane 0, and their partners (l + off) are not
     * overwritten in the same step, so an in-place sweep is exact. */
    for (int off = width / 2; off > 0; off /= 2)
        for (int l = 0; l < off; l++) v[l] = qlp_torch_mean_add(v[l], v[l + off]);
    return v[0];
}

#ifdef __cplusplus
}
#endif
#endif
