/* Causal grouped-query attention of the CUDA backend, fp32, the reference
 * the fast kernels are checked against: one block per (query row, head,
 * sequence), a warp per key for the dot products.  The training forward
 * keeps the probabilities in backend.h's layout (sequence b's block holds
 * [nh, len, len]); the backward reads them and recomputes nothing.  Query t
 * sees keys band_start(t) .. t (kernels/cuda_ops.h). */
#include <math.h>

#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "ops.h"

#define ST(s) ((cudaStream_t)(s))
enum { ATT_THREADS = 128, ATT_WARPS = ATT_THREADS / 32, MAX_HD = 256 };

__device__ inline int64_t band_start(int64_t t, int window) { return window > 0 && t >= window ? t - window + 1 : 0; }

/* the dot product of a[hd] and b[hd] by one warp, returned to every lane */
__device__ inline float warp_dot(const float *a, const float *b, int hd)
{
    float acc = 0.0f;
    for (int d = threadIdx.x & 31; d < hd; d += 32) acc += a[d] * b[d];
    return qlk_warp_sum(acc);
}

/* Generation: query t of this call is at position past + t and sees the
 * cached keys band_start(past + t) .. past + t.  Two passes over the keys (the
 * maximum, then the exponentials and the weighted values), each warp keeping
 * a partial output for its keys, combined at the end. */
__global__ void k_att_fwd(float *out, const float *q, const float *k, const float *v, int64_t past, int nh, int nkv,
                          int hd, int window, float scale)
{
    const int64_t t = blockIdx.x, i = past + t;
    const int h = blockIdx.y, kvh = h / (nh / nkv), lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t kvd = (int64_t)nkv * hd, s0 = band_start(i, window);
    const float *qt = q + (t * nh + h) * hd;
    float mx = -INFINITY;
    for (int64_t s = s0 + w; s <= i; s += ATT_WARPS) mx = fmaxf(mx, warp_dot(qt, k + s * kvd + kvh * hd, hd) * scale);
    mx = qlk_block_max(mx, -INFINITY);
    float acc[MAX_HD / 32];
    for (int j = 0; j < MAX_HD / 32; j++) acc[j] = 0.0f;
    double sum = 0;
    for (int64_t s = s0 + w; s <= i; s += ATT_WARPS) {
        const float e = ql_expf(warp_dot(qt, k + s * kvd + kvh * hd, hd) * scale - mx);
        if (lane == 0) sum += e;
        const float *vs = v + s * kvd + kvh * hd;
        for (int j = 0; j * 32 + lane < hd; j++) acc[j] += e * vs[j * 32 + lane];
    }
    sum = qlk_block_sum(sum);
    __shared__ float part[ATT_WARPS][MAX_HD];
    for (int j = 0; j * 32 + lane < hd; j++) part[w][j * 32 + lane] = acc[j];
    __syncthreads();
    const float inv = (float)(1.0 / sum);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int ww = 0; ww < ATT_WARPS; ww++) o += part[ww][d];
        out[(t * nh + h) * hd + d] = o * inv;
    }
}

extern "C" int qlk_attention_forward(void *stream, float *out, const float *q, const float *k, const float *v,
                                     int64_t T, int64_t past, int nh, int nkv, int hd, int window)
{
    if (hd > MAX_HD || hd < 1 || nkv < 1 || nh % nkv) return (int)cudaErrorInvalidValue;
    if (T > 0)
        k_att_fwd<<<dim3((unsigned)T, (unsigned)nh), ATT_THREADS, 0, ST(stream)>>>(out, q, k, v, past, nh, nkv, hd,
                                                                                  window, 1.0f / sqrtf((float)hd));
    return qlk_status();
}

__global__ void k_att_fwd_train(float *out, float *probs, const float *q, const float *k, const float *v,
                                const int32_t *len, int64_t T, int nh, int nkv, int hd, int window, float scale)
{
    const int64_t t = blockIdx.x, b = blockIdx.z, n = len[b];
    const int h = blockIdx.y, kvh = h / (nh / nkv), lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    float *o = out + (b * T + t) * qd + h * hd;
    if (t >= n) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    float *p = probs + b * nh * T * T + ((int64_t)h * n + t) * n;
    const int64_t s0 = band_start(t, window);
    const float *qt = q + (b * T + t) * qd + h * hd, *kb = k + b * T * kvd + kvh * hd, *vb = v + b * T * kvd + kvh * hd;
    for (int64_t s = s0 + w; s <= t; s += ATT_WARPS) {
        const float sc = warp_dot(qt, kb + s * kvd, hd) * scale;
        if (lane == 0) p[s] = sc;
    }
    for (int64_t s = threadIdx.x; s < n; s += blockDim.x)
        if (s < s0 || s > t) p[s] = 0.0f;
    __syncthreads();
    float mx = -INFINITY;
    for (int64_t s = s0 + threadIdx.x; s <= t; s += blockDim.x) mx = fmaxf(mx, p[s]);
    mx = qlk_block_max(mx, -INFINITY);
    double sum = 0;
    for (int64_t s = s0 + threadIdx.x; s <= t; s += blockDim.x) {
        const float e = ql_expf(p[s] - mx);
        p[s] = e;
        sum += e;
    }
    sum = qlk_block_sum(sum);
    const float inv = (float)(1.0 / sum);
    for (int64_t s = s0 + threadIdx.x; s <= t; s += blockDim.x) p[s] *= inv;
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int64_t s = s0; s <= t; s++) acc += p[s] * vb[s * kvd + d];
        o[d] = acc;
    }
}

extern "C" int qlk_attention_forward_train(void *stream, float *out, float *probs, const float *q, const float *k,
                                           const float *v, const int32_t *len, int64_t B, int64_t T, int nh, int nkv,
                                           int hd, int window)
{
    if (hd < 1 || nkv < 1 || nh % nkv) return (int)cudaErrorInvalidValue;
    if (B * T > 0)
        k_att_fwd_train<<<dim3((unsigned)T, (unsigned)nh, (unsigned)B), ATT_THREADS, 0, ST(stream)>>>(
            out, probs, q, k, v, len, T, nh, nkv, hd, window, 1.0f / sqrtf((float)hd));
    return qlk_status();
}

/* Query rows: dP = dO V^T, dS = P (dP - rowsum(P dP)) into dscores, dQ = scale dS K. */
__global__ void k_att_bwd_q(float *dq, float *dscores, const float *dout, const float *k, const float *v,
                            const float *probs, const int32_t *len, int64_t T, int nh, int nkv, int hd, int window,
                            float scale)
{
    const int64_t t = blockIdx.x, b = blockIdx.z, n = len[b];
    const int h = blockIdx.y, kvh = h / (nh / nkv), lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    float *dqt = dq + (b * T + t) * qd + h * hd;
    if (t >= n) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dqt[d] = 0.0f;
        return;
    }
    const int64_t off = b * nh * T * T + ((int64_t)h * n + t) * n, s0 = band_start(t, window);
    const float *p = probs + off, *dot = dout + (b * T + t) * qd + h * hd;
    const float *kb = k + b * T * kvd + kvh * hd, *vb = v + b * T * kvd + kvh * hd;
    float *ds = dscores + off;
    double pdp = 0;
    for (int64_t s = s0 + w; s <= t; s += ATT_WARPS) {
        const float dp = warp_dot(dot, vb + s * kvd, hd);
        if (lane == 0) {
            ds[s] = dp;
            pdp += (double)p[s] * dp;
        }
    }
    pdp = qlk_block_sum(pdp);
    for (int64_t s = threadIdx.x; s < n; s += blockDim.x)
        ds[s] = s < s0 || s > t ? 0.0f : p[s] * (float)((double)ds[s] - pdp);
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int64_t s = s0; s <= t; s++) acc += ds[s] * scale * kb[s * kvd + d];
        dqt[d] = acc;
    }
}

/* Key rows: over the group's query heads and the queries that see key s,
 * dK = scale dS^T Q, dV = P^T dO. */
__global__ void k_att_bwd_kv(float *dk, float *dv, const float *dscores, const float *dout, const float *q,
                             const float *probs, const int32_t *len, int64_t T, int nh, int nkv, int hd, int window,
                             float scale)
{
    const int64_t s = blockIdx.x, b = blockIdx.z, n = len[b];
    const int kvh = blockIdx.y, group = nh / nkv;
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    float *dks = dk + (b * T + s) * kvd + kvh * hd, *dvs = dv + (b * T + s) * kvd + kvh * hd;
    if (s >= n) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dks[d] = dvs[d] = 0.0f;
        return;
    }
    const int64_t t1 = window > 0 && s + window < n ? s + window : n;
    const float *pb = probs + b * nh * T * T, *dsb = dscores + b * nh * T * T;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int h = kvh * group; h < (kvh + 1) * group; h++)
            for (int64_t t = s; t < t1; t++) {
                const int64_t row = ((int64_t)h * n + t) * n + s, qrow = (b * T + t) * qd + h * hd;
                ak += dsb[row] * scale * q[qrow + d];
                av += pb[row] * dout[qrow + d];
            }
        dks[d] = ak;
        dvs[d] = av;
    }
}

extern "C" int qlk_attention_backward(void *stream, float *dq, float *dk, float *dv, float *dscores,
                                      const float *dout, const float *q, const float *k, const float *v,
                                      const float *probs, const int32_t *len, int64_t B, int64_t T, int nh, int nkv,
                                      int hd, int window)
{
    if (hd < 1 || nkv < 1 || nh % nkv) return (int)cudaErrorInvalidValue;
    if (B * T <= 0) return qlk_status();
    const float scale = 1.0f / sqrtf((float)hd);
    k_att_bwd_q<<<dim3((unsigned)T, (unsigned)nh, (unsigned)B), ATT_THREADS, 0, ST(stream)>>>(
        dq, dscores, dout, k, v, probs, len, T, nh, nkv, hd, window, scale);
    k_att_bwd_kv<<<dim3((unsigned)T, (unsigned)nkv, (unsigned)B), ATT_THREADS, 0, ST(stream)>>>(
        dk, dv, dscores, dout, q, probs, len, T, nh, nkv, hd, window, scale);
    return qlk_status();
}

/* ---- pieces of the bf16 attention (products through cuBLAS, backend_cuda.c) ---- */

__global__ void k_f32_to_bf16(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = to_bf16(src[i]);
}

__global__ void k_bf16_to_f32(float *dst, const uint16_t *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

extern "C" int qlk_f32_to_bf16(void *stream, uint16_t *dst, const float *src, int64_t n)
{
    if (n > 0) k_f32_to_bf16<<<qlk_blocks(n, 256), 256, 0, ST(stream)>>>(dst, src, n);
    return qlk_status();
}

extern "C" int qlk_bf16_to_f32(void *stream, float *dst, const uint16_t *src, int64_t n)
{
    if (n > 0) k_bf16_to_f32<<<qlk_blocks(n, 256), 256, 0, ST(stream)>>>(dst, src, n);
    return qlk_status();
}

/* ---- one query tile of the bf16 attention (log-sum-exp kept, backward recomputes) ---- */

/* row i (query t0 + i) of head h: its keys in tile coordinates [lo, hi] */
__device__ inline void tile_band(int64_t t0, int64_t i, int64_t k0, int window, int64_t *lo, int64_t *hi)
{
    const int64_t t = t0 + i;
    *lo = band_start(t, window) - k0;
    *hi = t - k0;
}

__global__ void k_tile_softmax(const float *s, uint16_t *p16, float *lse, int64_t ld_lse, int64_t t0, int64_t m,
                               int64_t k0, int64_t kn, int window)
{
    const int64_t i = blockIdx.x, h = blockIdx.y;
    const float *row = s + (h * m + i) * kn;
    uint16_t *r16 = p16 + (h * m + i) * kn;
    int64_t lo, hi;
    tile_band(t0, i, k0, window, &lo, &hi);
    float mx = -INFINITY;
    for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = qlk_block_max(mx, -INFINITY);
    double sum = 0;
    for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) sum += ql_expf(row[j] - mx);
    sum = qlk_block_sum(sum);
    const float inv = (float)(1.0 / sum);
    for (int64_t j = threadIdx.x; j < kn; j += blockDim.x)
        r16[j] = to_bf16(j < lo || j > hi ? 0.0f : ql_expf(row[j] - mx) * inv);
    if (threadIdx.x == 0) lse[h * ld_lse + t0 + i] = (float)((double)mx + log(sum));
}

extern "C" int qlk_tile_softmax(void *stream, const float *s, uint16_t *p16, float *lse, int64_t ld_lse, int nh,
                                int64_t t0, int64_t m, int64_t k0, int64_t kn, int window)
{
    if (m > 0)
        k_tile_softmax<<<dim3((unsigned)m, (unsigned)nh), ATT_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0,
                                                                                     kn, window);
    return qlk_status();
}

__global__ void k_tile_softmax_bwd(const float *s, const float *dp, uint16_t *p16, uint16_t *ds16, const float *lse,
                                   int64_t ld_lse, int64_t t0, int64_t m, int64_t k0, int64_t kn, int window)
{
    const int64_t i = blockIdx.x, h = blockIdx.y, off = (h * m + i) * kn;
    const float *row = s + off, *dpr = dp + off;
    int64_t lo, hi;
    tile_band(t0, i, k0, window, &lo, &hi);
    const float l = lse[h * ld_lse + t0 + i];
    double pdp = 0;
    for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) pdp += (double)ql_expf(row[j] - l) * dpr[j];
    pdp = qlk_block_sum(pdp);
    for (int64_t j = threadIdx.x; j < kn; j += blockDim.x) {
        const float p = j < lo || j > hi ? 0.0f : ql_expf(row[j] - l);
        p16[off + j] = to_bf16(p);
        ds16[off + j] = to_bf16(p * (float)((double)dpr[j] - pdp));
    }
}

extern "C" int qlk_tile_softmax_backward(void *stream, const float *s, const float *dp, uint16_t *p16, uint16_t *ds16,
                                         const float *lse, int64_t ld_lse, int nh, int64_t t0, int64_t m, int64_t k0,
                                         int64_t kn, int window)
{
    if (m > 0)
        k_tile_softmax_bwd<<<dim3((unsigned)m, (unsigned)nh), ATT_THREADS, 0, ST(stream)>>>(s, dp, p16, ds16, lse, ld_lse,
                                                                                          t0, m, k0, kn, window);
    return qlk_status();
}
