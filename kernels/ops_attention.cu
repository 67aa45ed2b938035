/* Causal grouped-query attention of the CUDA backend, fp32, the reference
 * the fast kernels are checked against: one block per (query row, head,
 * sequence), a warp per key for the dot products.  The training forward
 * keeps the probabilities in backend.h's layout (sequence b's block holds
 * [nh, len, len]); the backward reads them and recomputes nothing.  Query t
 * sees keys band_start(t) .. t (kernels/cuda_ops.h). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/* Generation of many rows at once (a prompt, MMLU's questions after their
 * cached prefix): a block per FT_Q = 32 query rows and head, keys and values
 * in tiles of FT_K = 32 rows through shared memory (read once for the 32
 * queries, not once a query as k_att_fwd does), the softmax online (the
 * running maximum, its sum and the output rescaled as it grows).  Four
 * threads a query, each holding every fourth float4 of the head's dims, sum
 * a score with two shuffles.  Float32 throughout; the order of the sums
 * differs from k_att_fwd's and the CPU's (tests/test_gpu_ops.c: 2e-5). */
enum { FT_Q = 32, FT_K = 32, FT_SPLIT = 4, FT_THREADS = FT_Q * FT_SPLIT };

template <int HD>
__global__ void __launch_bounds__(FT_THREADS)
    k_att_fwd_tiled(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past, int nh,
                    int nkv, int window, float scale)
{
    constexpr int NV = HD / 16; /* float4s a thread holds */
    extern __shared__ float4 ft_smem[];
    float4 *ks = ft_smem, *vs = ft_smem + FT_K * (HD / 4);
    const int h = blockIdx.y, kvh = h / (nh / nkv), part = threadIdx.x % FT_SPLIT;
    const int64_t t0 = (int64_t)blockIdx.x * FT_Q, t = t0 + threadIdx.x / FT_SPLIT, i = past + t;
    const int64_t qd = (int64_t)nh * HD, kvd = (int64_t)nkv * HD;
    const bool live = t < T;
    const int64_t last = past + (t0 + FT_Q < T ? t0 + FT_Q : T) - 1; /* the block's last query position */
    const int64_t lo = live ? band_start(i, window) : 0;
    float4 qr[NV], acc[NV];
    const float4 *qt = reinterpret_cast<const float4 *>(q + t * qd + (int64_t)h * HD);
#pragma unroll
    for (int e = 0; e < NV; e++) {
        qr[e] = live ? qt[part + FT_SPLIT * e] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        acc[e] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float m = -INFINITY, l = 0.0f;
    for (int64_t c = band_start(past + t0, window); c <= last; c += FT_K) {
        __syncthreads(); /* the previous tile is read */
        for (int idx = threadIdx.x; idx < FT_K * (HD / 4); idx += FT_THREADS) {
            const int64_t s = c + idx / (HD / 4);
            const int d4 = idx % (HD / 4);
            float4 kk = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kk;
            if (s <= last) {
                kk = reinterpret_cast<const float4 *>(k + s * kvd + (int64_t)kvh * HD)[d4];
                vv = reinterpret_cast<const float4 *>(v + s * kvd + (int64_t)kvh * HD)[d4];
            }
            ks[idx] = kk;
            vs[idx] = vv;
        }
        __syncthreads();
        float sc[FT_K], tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < FT_K; j++) {
            float p = 0.0f;
#pragma unroll
            for (int e = 0; e < NV; e++) {
                const float4 kk = ks[j * (HD / 4) + part + FT_SPLIT * e];
                p += qr[e].x * kk.x + qr[e].y * kk.y + qr[e].z * kk.z + qr[e].w * kk.w;
            }
            p += __shfl_xor_sync(0xffffffffu, p, 1);
            p += __shfl_xor_sync(0xffffffffu, p, 2);
            const int64_t s = c + j;
            sc[j] = live && s >= lo && s <= i ? p * scale : -INFINITY;
            tmax = fmaxf(tmax, sc[j]);
        }
        if (tmax != -INFINITY) {
            const float mn = fmaxf(m, tmax), corr = m == -INFINITY ? 0.0f : ql_expf(m - mn);
            l *= corr;
#pragma unroll
            for (int e = 0; e < NV; e++) acc[e].x *= corr, acc[e].y *= corr, acc[e].z *= corr, acc[e].w *= corr;
#pragma unroll
            for (int j = 0; j < FT_K; j++) {
                const float pj = sc[j] == -INFINITY ? 0.0f : ql_expf(sc[j] - mn);
                l += pj;
#pragma unroll
                for (int e = 0; e < NV; e++) {
                    const float4 vv = vs[j * (HD / 4) + part + FT_SPLIT * e];
                    acc[e].x += pj * vv.x, acc[e].y += pj * vv.y, acc[e].z += pj * vv.z, acc[e].w += pj * vv.w;
                }
            }
            m = mn;
        }
    }
    if (live) {
        const float inv = 1.0f / l;
        float4 *o = reinterpret_cast<float4 *>(out + t * qd + (int64_t)h * HD);
#pragma unroll
        for (int e = 0; e < NV; e++)
            o[part + FT_SPLIT * e] = make_float4(acc[e].x * inv, acc[e].y * inv, acc[e].z * inv, acc[e].w * inv);
    }
}

/* Whether generation calls of 8 rows or more take k_att_fwd_tiled: off by
 * default until it has been through the gpu suite on a GPU (it was written
 * in a session without one); QLK_ATT_GEN=1 turns it on, as does
 * qlk_att_gen_tiled_set(1) (the gpu suite runs both). */
static int att_gen_tiled = -1;

static int att_gen_tiled_allowed(void)
{
    if (att_gen_tiled < 0) {
        const char *e = getenv("QLK_ATT_GEN");
        att_gen_tiled = e && e[0] == '1' && !e[1];
    }
    return att_gen_tiled;
}

extern "C" void qlk_att_gen_tiled_set(int on) { att_gen_tiled = on < 0 ? -1 : on != 0; }

template <int HD>
static void launch_att_fwd_tiled(cudaStream_t st, float *out, const float *q, const float *k, const float *v,
                                 int64_t T, int64_t past, int nh, int nkv, int window, float scale)
{
    const size_t smem = 2 * (size_t)FT_K * HD * sizeof(float);
    k_att_fwd_tiled<HD><<<dim3((unsigned)((T + FT_Q - 1) / FT_Q), (unsigned)nh), FT_THREADS, smem, st>>>(
        out, q, k, v, T, past, nh, nkv, window, scale);
}

extern "C" int qlk_attention_forward(void *stream, float *out, const float *q, const float *k, const float *v,
                                     int64_t T, int64_t past, int nh, int nkv, int hd, int window)
{
    if (hd > MAX_HD || hd < 1 || nkv < 1 || nh % nkv) return (int)cudaErrorInvalidValue;
    if (T <= 0) return qlk_status();
    const float scale = 1.0f / sqrtf((float)hd);
    /* several rows, a head size of 32, 64, 96 or 128, float4-aligned rows: tiled */
    const int aligned = !(((uintptr_t)out | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16);
    if (T >= 8 && aligned && att_gen_tiled_allowed() && (hd == 32 || hd == 64 || hd == 96 || hd == 128)) {
        if (hd == 32) launch_att_fwd_tiled<32>(ST(stream), out, q, k, v, T, past, nh, nkv, window, scale);
        else if (hd == 64) launch_att_fwd_tiled<64>(ST(stream), out, q, k, v, T, past, nh, nkv, window, scale);
        else if (hd == 96) launch_att_fwd_tiled<96>(ST(stream), out, q, k, v, T, past, nh, nkv, window, scale);
        else launch_att_fwd_tiled<128>(ST(stream), out, q, k, v, T, past, nh, nkv, window, scale);
        return qlk_status();
    }
    k_att_fwd<<<dim3((unsigned)T, (unsigned)nh), ATT_THREADS, 0, ST(stream)>>>(out, q, k, v, past, nh, nkv, hd, window,
                                                                              scale);
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

/* 4 elements a thread (16-byte loads, 8-byte stores) where both pointers
 * allow it, the tail and unaligned arrays one at a time */
__global__ void k_f32_to_bf16(uint16_t *dst, const float *src, int64_t n, int vec)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, n4 = vec ? n / 4 : 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += stride) {
        const float4 v = reinterpret_cast<const float4 *>(src)[i];
        ushort4 o;
        o.x = to_bf16(v.x), o.y = to_bf16(v.y), o.z = to_bf16(v.z), o.w = to_bf16(v.w);
        reinterpret_cast<ushort4 *>(dst)[i] = o;
    }
    for (int64_t i = n4 * 4 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = to_bf16(src[i]);
}

__global__ void k_bf16_to_f32(float *dst, const uint16_t *src, int64_t n, int vec)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, n4 = vec ? n / 4 : 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += stride) {
        const ushort4 v = reinterpret_cast<const ushort4 *>(src)[i];
        reinterpret_cast<float4 *>(dst)[i] = make_float4(from_bf16(v.x), from_bf16(v.y), from_bf16(v.z),
                                                         from_bf16(v.w));
    }
    for (int64_t i = n4 * 4 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = from_bf16(src[i]);
}

static int aligned(const void *f32, const void *b16)
{
    return (uintptr_t)f32 % 16 == 0 && (uintptr_t)b16 % 8 == 0;
}

extern "C" int qlk_f32_to_bf16(void *stream, uint16_t *dst, const float *src, int64_t n)
{
    if (n > 0) k_f32_to_bf16<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(dst, src, n, aligned(src, dst));
    return qlk_status();
}

extern "C" int qlk_bf16_to_f32(void *stream, float *dst, const uint16_t *src, int64_t n)
{
    if (n > 0) k_bf16_to_f32<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(dst, src, n, aligned(dst, src));
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

/* The tile kernels, one block of SM_THREADS per (query row, head): the row's
 * scores are read once into registers (PER a thread: rows of up to
 * PER * SM_THREADS keys), exponentials by the hardware's exp2 (bf16 results
 * need no more), float sums.  Rows longer than 16 * SM_THREADS keys take
 * PER = 0: three passes over memory. */
enum { SM_THREADS = 256 };

template <int PER>
__global__ void k_tile_softmax(const float *s, uint16_t *p16, float *lse, int64_t ld_lse, int64_t t0, int64_t m,
                               int64_t k0, int64_t kn, int window)
{
    const int64_t i = blockIdx.x, h = blockIdx.y;
    const float *row = s + (h * m + i) * kn;
    uint16_t *r16 = p16 + (h * m + i) * kn;
    int64_t lo, hi;
    tile_band(t0, i, k0, window, &lo, &hi);
    const float L2E = 1.4426950408889634f;
    float mx = -INFINITY, sum = 0.0f;
    if (PER > 0) {
        float v[PER > 0 ? PER : 1];
#pragma unroll
        for (int u = 0; u < PER; u++) {
            const int64_t j = threadIdx.x + (int64_t)u * SM_THREADS;
            v[u] = j >= lo && j <= hi ? row[j] : -INFINITY;
            mx = fmaxf(mx, v[u]);
        }
        mx = qlk_block_max(mx, -INFINITY);
#pragma unroll
        for (int u = 0; u < PER; u++) {
            const int64_t j = threadIdx.x + (int64_t)u * SM_THREADS;
            v[u] = j >= lo && j <= hi ? exp2f((v[u] - mx) * L2E) : 0.0f;
            sum += v[u];
        }
        sum = qlk_block_sum(sum);
        const float inv = 1.0f / sum;
#pragma unroll
        for (int u = 0; u < PER; u++) {
            const int64_t j = threadIdx.x + (int64_t)u * SM_THREADS;
            if (j < kn) r16[j] = to_bf16(v[u] * inv);
        }
    } else {
        for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) mx = fmaxf(mx, row[j]);
        mx = qlk_block_max(mx, -INFINITY);
        for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) sum += exp2f((row[j] - mx) * L2E);
        sum = qlk_block_sum(sum);
        const float inv = 1.0f / sum;
        for (int64_t j = threadIdx.x; j < kn; j += blockDim.x)
            r16[j] = to_bf16(j < lo || j > hi ? 0.0f : exp2f((row[j] - mx) * L2E) * inv);
    }
    if (threadIdx.x == 0) lse[h * ld_lse + t0 + i] = mx + logf(sum);
}

/* keys a thread holds for rows of kn keys: 0 past 16 * SM_THREADS */
static int per_thread(int64_t kn)
{
    return kn <= 2 * SM_THREADS ? 2 : kn <= 4 * SM_THREADS ? 4 : kn <= 8 * SM_THREADS ? 8 : kn <= 16 * SM_THREADS ? 16 : 0;
}

extern "C" int qlk_tile_softmax(void *stream, const float *s, uint16_t *p16, float *lse, int64_t ld_lse, int nh,
                                int64_t t0, int64_t m, int64_t k0, int64_t kn, int window)
{
    if (m <= 0) return qlk_status();
    const dim3 grid((unsigned)m, (unsigned)nh);
    switch (per_thread(kn)) {
    case 2: k_tile_softmax<2><<<grid, SM_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0, kn, window); break;
    case 4: k_tile_softmax<4><<<grid, SM_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0, kn, window); break;
    case 8: k_tile_softmax<8><<<grid, SM_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0, kn, window); break;
    case 16: k_tile_softmax<16><<<grid, SM_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0, kn, window); break;
    default: k_tile_softmax<0><<<grid, SM_THREADS, 0, ST(stream)>>>(s, p16, lse, ld_lse, t0, m, k0, kn, window);
    }
    return qlk_status();
}

template <int PER>
__global__ void k_tile_softmax_bwd(const float *s, const float *dp, uint16_t *p16, uint16_t *ds16, const float *lse,
                                   int64_t ld_lse, int64_t t0, int64_t m, int64_t k0, int64_t kn, int window)
{
    const int64_t i = blockIdx.x, h = blockIdx.y, off = (h * m + i) * kn;
    const float *row = s + off, *dpr = dp + off;
    int64_t lo, hi;
    tile_band(t0, i, k0, window, &lo, &hi);
    const float L2E = 1.4426950408889634f, l = lse[h * ld_lse + t0 + i];
    float pdp = 0.0f;
    if (PER > 0) {
        float p[PER > 0 ? PER : 1], d[PER > 0 ? PER : 1];
#pragma unroll
        for (int u = 0; u < PER; u++) {
            const int64_t j = threadIdx.x + (int64_t)u * SM_THREADS;
            const int in = j >= lo && j <= hi;
            p[u] = in ? exp2f((row[j] - l) * L2E) : 0.0f;
            d[u] = in ? dpr[j] : 0.0f;
            pdp += p[u] * d[u];
        }
        pdp = qlk_block_sum(pdp);
#pragma unroll
        for (int u = 0; u < PER; u++) {
            const int64_t j = threadIdx.x + (int64_t)u * SM_THREADS;
            if (j < kn) {
                p16[off + j] = to_bf16(p[u]);
                ds16[off + j] = to_bf16(p[u] * (d[u] - pdp));
            }
        }
    } else {
        for (int64_t j = lo + threadIdx.x; j <= hi; j += blockDim.x) pdp += exp2f((row[j] - l) * L2E) * dpr[j];
        pdp = qlk_block_sum(pdp);
        for (int64_t j = threadIdx.x; j < kn; j += blockDim.x) {
            const float pj = j < lo || j > hi ? 0.0f : exp2f((row[j] - l) * L2E);
            p16[off + j] = to_bf16(pj);
            ds16[off + j] = to_bf16(pj * (dpr[j] - pdp));
        }
    }
}

extern "C" int qlk_tile_softmax_backward(void *stream, const float *s, const float *dp, uint16_t *p16, uint16_t *ds16,
                                         const float *lse, int64_t ld_lse, int nh, int64_t t0, int64_t m, int64_t k0,
                                         int64_t kn, int window)
{
    if (m <= 0) return qlk_status();
    const dim3 grid((unsigned)m, (unsigned)nh);
#define QLK_SMB(P) k_tile_softmax_bwd<P><<<grid, SM_THREADS, 0, ST(stream)>>>(s, dp, p16, ds16, lse, ld_lse, t0, m, k0, kn, window)
    switch (per_thread(kn)) {
    case 2: QLK_SMB(2); break;
    case 4: QLK_SMB(4); break;
    case 8: QLK_SMB(8); break;
    case 16: QLK_SMB(16); break;
    default: QLK_SMB(0);
    }
#undef QLK_SMB
    return qlk_status();
}
