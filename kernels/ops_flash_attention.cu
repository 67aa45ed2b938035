/* Fused causal grouped-query attention in bf16 on the tensor cores (the
 * training attention of backend_cuda.c under QL_PREC_BF16), flash style: no
 * score matrix exists in memory, not even a tile of one.
 *
 * Forward (k_flash_fwd): a block per 64 query rows of one head; four warps of
 * 16 rows each.  Key and value tiles of 64 rows stream through shared memory
 * (cp.async, double-buffered); S = Q K^T and O += P V with mma.sync
 * m16n8k16 (bf16 operands, float32 accumulators), the online softmax in
 * float32 between them (base-2 exponentials of scores pre-scaled by log2 e).
 * P enters the second product rounded to bf16, as the tiled path's does; the
 * row sums are of the float32 exponentials.  Writes O (float32) and each
 * row's log-sum-exp (natural units of the scaled scores, the tiled path's
 * definition, so either backward reads either forward's).
 *
 * Backward, deterministic (no atomics, every sum in a fixed order):
 *   k_flash_rowdot: D[t] = dO[t] . O[t] per row and head (= rowsum(P dP));
 *   k_flash_bwd_dq: a block per 64 query rows of one head: for each key
 *     tile, S and dP = dO V^T again, P = exp(S - lse), dS = P (dP - D),
 *     dQ += dS K;
 *   k_flash_bwd_dkdv: a block per 64 keys of one kv head: for each query
 *     head of its group and each tile of 64 (or 32) query rows that sees those keys,
 *     S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q.
 * Two more products than a backward that adds dQ atomically across key
 * blocks, for gradients that are the same bits on every run.
 *
 * Head size HD is a template argument (64 and 128 are built); the host
 * (backend_cuda.c) keeps the tiled cuBLAS path for others.  Operands are the
 * bf16 copies [B*T, heads, HD] the tiled path makes; rows past len[b] are
 * read as zeros and written as zeros.  Needs sm_80 or newer (mma.sync bf16,
 * cp.async, ldmatrix). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cuda_common.cuh"
#include "cuda_ops.h"

#define ST(s) ((cudaStream_t)(s))

namespace {

enum { FA_THREADS = 128, FA_ROWS = 64, FA_KEYS = 64 };
const float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

__device__ inline int64_t band_start(int64_t t, int window) { return window > 0 && t >= window ? t - window + 1 : 0; }

__device__ inline uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared; src_bytes 0 fills the 16 bytes with zeros */
__device__ inline void cp_async16(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
/* 4 bytes global -> shared, zeros when src_bytes is 0 */
__device__ inline void cp_async4(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ inline void ldsm4(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ inline void ldsm4t(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* c += a b: a 16x16 (row), b 16x8 (col), bf16; c float32 */
__device__ inline void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* two floats as bf16 (nearest even, one instruction) in one register, lo in
 * the low half */
__device__ inline uint32_t pack2(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* 2^x by the hardware's approximation (2 ulp; -inf gives 0): the
 * probabilities enter bf16 products, which keep 8 bits */
__device__ inline float ex2(float x)
{
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

/* A tile of ROWS x HD bf16 in shared memory, its 16-byte chunks swizzled
 * (chunk c of row r at c ^ (r & 7)) so that ldmatrix's eight rows hit
 * eight different banks. */
template <int HD> __device__ inline uint32_t tile_at(uint32_t base, int row, int chunk)
{
    return base + (uint32_t)(row * HD * 2 + ((chunk ^ (row & 7)) << 4));
}

/* rows r0 .. r0+ROWS-1 of src (row stride ld elements, HD wide) into the
 * tile; rows at or past `limit` become zeros */
template <int HD, int ROWS>
__device__ inline void load_tile(uint32_t dst, const uint16_t *src, int64_t ld, int64_t r0, int64_t limit)
{
    constexpr int CH = HD / 8, STEP = FA_THREADS / CH; /* chunks a row; rows a pass of the block */
    static_assert(ROWS % STEP == 0, "tile rows");
    const int c = threadIdx.x % CH, row0 = threadIdx.x / CH;
    const uint16_t *p = src + (r0 + row0) * ld + c * 8;
#pragma unroll
    for (int k = 0; k < ROWS / STEP; k++) {
        const int row = row0 + k * STEP;
        const bool ok = r0 + row < limit;
        cp_async16(tile_at<HD>(dst, row, c), ok ? p + (int64_t)k * STEP * ld : src, ok ? 16 : 0);
    }
}

/* A fragment (16x16, rows r0.., columns 16 ks ..) of a tile, for mma's a */
template <int HD> __device__ inline void frag_a(uint32_t r[4], uint32_t tile, int r0, int ks)
{
    const int lane = threadIdx.x & 31;
    ldsm4(r, tile_at<HD>(tile, r0 + (lane & 7) + ((lane >> 3) & 1) * 8, ks * 2 + (lane >> 4)));
}

/* B fragments of two n-tiles (rows n0 .. n0+15 of the tile as the n index,
 * columns 16 ks .. as k): r[0], r[1] for rows n0.., r[2], r[3] for n0+8.. */
template <int HD> __device__ inline void frag_b(uint32_t r[4], uint32_t tile, int n0, int ks)
{
    const int lane = threadIdx.x & 31;
    ldsm4(r, tile_at<HD>(tile, n0 + (lane & 7) + (lane >> 4) * 8, ks * 2 + ((lane >> 3) & 1)));
}

/* B fragments with the tile's rows as k (rows k0 .. k0+15) and columns as n
 * (two n-tiles of 8 from column 16 np): r[0], r[1] for columns 16 np ..,
 * r[2], r[3] for 16 np + 8 .. */
template <int HD> __device__ inline void frag_bt(uint32_t r[4], uint32_t tile, int k0, int np)
{
    const int lane = threadIdx.x & 31;
    ldsm4t(r, tile_at<HD>(tile, k0 + (lane & 7) + ((lane >> 3) & 1) * 8, np * 2 + (lane >> 4)));
}

/* Is (query t, key s) inside the causal band of a sequence of n rows? */
__device__ inline bool seen(int t, int s, int n, int window)
{
    return t < n && s <= t && (window <= 0 || s > t - window);
}

/* ---- forward ---- */

/* Each warp takes RB blocks of 16 query rows (4 * 16 * RB rows a block) and
 * tiles of KC keys.  RB 1 keeps the warp's Q fragments in registers; RB 2
 * reads them from shared memory at every step and uses each K and V fragment
 * for both row blocks (half the shared-memory reads per product). */
template <int HD, int RB, int KC, int MINB>
__global__ void __launch_bounds__(FA_THREADS, MINB) k_flash_fwd(float *out, float *lse, const uint16_t *q, const uint16_t *k,
                                                          const uint16_t *v, const int32_t *len, int64_t T, int nh,
                                                          int nkv, int window, float scale)
{
    constexpr int BR = 4 * 16 * RB;
    extern __shared__ uint4 smem[];
    const int qt = gridDim.x - 1 - blockIdx.x; /* the longest rows first */
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int64_t n = len[b], q0 = (int64_t)qt * BR, qd = (int64_t)nh * HD, kvd = (int64_t)nkv * HD;
    float *ob = out + b * T * qd + h * HD;
    float *lb = lse + ((int64_t)b * nh + h) * T;
    if (q0 >= n) { /* padded rows only */
        for (int64_t i = threadIdx.x; i < (int64_t)BR * HD; i += FA_THREADS) {
            const int64_t t = q0 + i / HD;
            if (t < T) ob[t * qd + i % HD] = 0.0f;
        }
        for (int64_t t = q0 + threadIdx.x; t < q0 + BR && t < T; t += FA_THREADS) lb[t] = 0.0f;
        return;
    }
    const uint32_t sQ = smem_addr(smem), sK = sQ + BR * HD * 2, sV = sK + 2 * KC * HD * 2;
    const uint16_t *qb = q + b * T * qd + h * HD, *kb = k + b * T * kvd + kvh * HD, *vb = v + b * T * kvd + kvh * HD;
    const int64_t last = (q0 + BR < n ? q0 + BR : n) - 1;
    const int kt0 = (int)(band_start(q0, window) / KC), kt1 = (int)(last / KC);
    load_tile<HD, BR>(sQ, qb, qd, q0, n);
    load_tile<HD, KC>(sK, kb, kvd, (int64_t)kt0 * KC, n);
    load_tile<HD, KC>(sV, vb, kvd, (int64_t)kt0 * KC, n);
    cp_async_commit();

    const float sl = scale * LOG2E;
    int tr[RB][2]; /* this thread's rows (int: T < 2^31) */
    float o[RB][HD / 8][4], m[RB][2], l[RB][2];
#pragma unroll
    for (int rb = 0; rb < RB; rb++) {
        tr[rb][0] = (int)q0 + warp * 16 * RB + rb * 16 + g, tr[rb][1] = tr[rb][0] + 8;
        m[rb][0] = m[rb][1] = -INFINITY, l[rb][0] = l[rb][1] = 0.0f;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) o[rb][j][0] = o[rb][j][1] = o[rb][j][2] = o[rb][j][3] = 0.0f;
    }
    uint32_t qa[RB == 1 ? HD / 16 : 1][4];
    for (int kt = kt0; kt <= kt1; kt++) {
        const int buf = (kt - kt0) & 1;
        if (kt < kt1) {
            load_tile<HD, KC>(sK + (buf ^ 1) * KC * HD * 2, kb, kvd, (int64_t)(kt + 1) * KC, n);
            load_tile<HD, KC>(sV + (buf ^ 1) * KC * HD * 2, vb, kvd, (int64_t)(kt + 1) * KC, n);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (RB == 1) {
            if (kt == kt0) {
#pragma unroll
                for (int ks = 0; ks < HD / 16; ks++) frag_a<HD>(qa[ks], sQ, warp * 16, ks);
            }
        }
        const uint32_t tK = sK + buf * KC * HD * 2, tV = sV + buf * KC * HD * 2;
        float s[RB][KC / 8][4];
#pragma unroll
        for (int rb = 0; rb < RB; rb++)
#pragma unroll
            for (int j = 0; j < KC / 8; j++) s[rb][j][0] = s[rb][j][1] = s[rb][j][2] = s[rb][j][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) { /* independent accumulators a step */
            uint32_t a[RB][4];
#pragma unroll
            for (int rb = 0; rb < RB; rb++) {
                if constexpr (RB == 1) {
#pragma unroll
                    for (int x = 0; x < 4; x++) a[rb][x] = qa[ks][x];
                } else {
                    frag_a<HD>(a[rb], sQ, warp * 16 * RB + rb * 16, ks);
                }
            }
#pragma unroll
            for (int np = 0; np < KC / 16; np++) {
                uint32_t bf[4];
                frag_b<HD>(bf, tK, np * 16, ks);
#pragma unroll
                for (int rb = 0; rb < RB; rb++) {
                    mma(s[rb][2 * np], a[rb], bf[0], bf[1]);
                    mma(s[rb][2 * np + 1], a[rb], bf[2], bf[3]);
                }
            }
        }
        /* mask, online softmax in base 2 of the scaled scores (s sl) */
        const int64_t k0 = (int64_t)kt * KC;
        /* a tile needs the mask where it reaches past the diagonal or before
         * some row's band; keys past n are past the diagonal of every valid row */
        const bool edge = k0 + KC - 1 > q0 || (window > 0 && k0 < band_start(q0 + BR - 1, window));
        uint32_t pa[RB][KC / 16][4];
#pragma unroll
        for (int rb = 0; rb < RB; rb++) {
            if (edge) {
#pragma unroll
                for (int j = 0; j < KC / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (!seen(tr[rb][e >> 1], (int)k0 + j * 8 + 2 * t4 + (e & 1), (int)n, window)) s[rb][j][e] = -INFINITY;
            }
            /* row maxima and sums as trees: without reassociation a running
             * max or sum is a chain of KC / 4 dependent instructions */
            float mt[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float t[KC / 8];
#pragma unroll
                for (int j = 0; j < KC / 8; j++) t[j] = fmaxf(s[rb][j][2 * r], s[rb][j][2 * r + 1]);
#pragma unroll
                for (int w = KC / 16; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; j++) t[j] = fmaxf(t[j], t[j + w]);
                mt[r] = t[0];
            }
            float alpha[2], base[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
                mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
                const float mn = fmaxf(m[rb][r], mt[r] * sl);
                base[r] = mn == -INFINITY ? 0.0f : mn;
                alpha[r] = ex2(m[rb][r] - base[r]);
                m[rb][r] = mn;
                l[rb][r] *= alpha[r];
            }
#pragma unroll
            for (int j = 0; j < HD / 8; j++) {
                o[rb][j][0] *= alpha[0], o[rb][j][1] *= alpha[0];
                o[rb][j][2] *= alpha[1], o[rb][j][3] *= alpha[1];
            }
#pragma unroll
            for (int j = 0; j < KC / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[rb][j][e] = ex2(fmaf(s[rb][j][e], sl, -base[e >> 1]));
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float t[KC / 8];
#pragma unroll
                for (int j = 0; j < KC / 8; j++) t[j] = s[rb][j][2 * r] + s[rb][j][2 * r + 1];
#pragma unroll
                for (int w = KC / 16; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; j++) t[j] += t[j + w];
                l[rb][r] += t[0];
            }
#pragma unroll
            for (int ks = 0; ks < KC / 16; ks++) {
                pa[rb][ks][0] = pack2(s[rb][2 * ks][0], s[rb][2 * ks][1]);
                pa[rb][ks][1] = pack2(s[rb][2 * ks][2], s[rb][2 * ks][3]);
                pa[rb][ks][2] = pack2(s[rb][2 * ks + 1][0], s[rb][2 * ks + 1][1]);
                pa[rb][ks][3] = pack2(s[rb][2 * ks + 1][2], s[rb][2 * ks + 1][3]);
            }
        }
#pragma unroll
        for (int ks = 0; ks < KC / 16; ks++)
#pragma unroll
            for (int np = 0; np < HD / 16; np++) {
                uint32_t bf[4];
                frag_bt<HD>(bf, tV, ks * 16, np);
#pragma unroll
                for (int rb = 0; rb < RB; rb++) {
                    mma(o[rb][2 * np], pa[rb][ks], bf[0], bf[1]);
                    mma(o[rb][2 * np + 1], pa[rb][ks], bf[2], bf[3]);
                }
            }
        __syncthreads(); /* every warp is done with this buffer before it is refilled */
    }
#pragma unroll
    for (int rb = 0; rb < RB; rb++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float lr = l[rb][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int64_t t = tr[rb][r];
            if (t >= T) continue;
            const bool valid = t < n;
            const float inv = valid ? 1.0f / lr : 0.0f;
            float *orow = ob + t * qd;
#pragma unroll
            for (int j = 0; j < HD / 8; j++) {
                float2 w = valid ? make_float2(o[rb][j][2 * r] * inv, o[rb][j][2 * r + 1] * inv)
                                 : make_float2(0.0f, 0.0f);
                *reinterpret_cast<float2 *>(orow + j * 8 + 2 * t4) = w;
            }
            if (t4 == 0) lb[t] = valid ? (m[rb][r] + log2f(lr)) * LN2 : 0.0f;
        }
}

/* ---- backward ---- */

/* D[b, h, t] = sum_d dout[t, h, d] out[t, h, d] (0 for padded rows): a warp a row and head */
__global__ void k_flash_rowdot(float *D, const float *dout, const float *out, const int32_t *len, int64_t B, int64_t T,
                               int nh, int hd)
{
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= B * T * nh) return;
    const int64_t row = w / nh, b = row / T, t = row % T;
    const int h = (int)(w % nh);
    float acc = 0.0f;
    if (t < len[b]) {
        const float *x = dout + w * hd, *y = out + w * hd;
        for (int d = lane; d < hd; d += 32) acc += x[d] * y[d];
        acc = qlk_warp_sum(acc);
    }
    if (lane == 0) D[(b * nh + h) * T + t] = acc;
}

/* KC keys a tile; MINB blocks an SM asked of the register allocator */
template <int HD, int KC, int MINB>
__global__ void __launch_bounds__(FA_THREADS, MINB) k_flash_bwd_dq(float *dq, const uint16_t *q, const uint16_t *k,
                                                             const uint16_t *v, const uint16_t *dout,
                                                             const float *lse, const float *D, const int32_t *len,
                                                             int64_t T, int nh, int nkv, int window, float scale)
{
    extern __shared__ uint4 smem[];
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int64_t n = len[b], q0 = (int64_t)qt * FA_ROWS, qd = (int64_t)nh * HD, kvd = (int64_t)nkv * HD;
    float *db = dq + b * T * qd + h * HD;
    if (q0 >= n) {
        for (int64_t i = threadIdx.x; i < (int64_t)FA_ROWS * HD; i += FA_THREADS) {
            const int64_t t = q0 + i / HD;
            if (t < T) db[t * qd + i % HD] = 0.0f;
        }
        return;
    }
    const uint32_t sQ = smem_addr(smem), sO = sQ + FA_ROWS * HD * 2, sK = sO + FA_ROWS * HD * 2,
                   sV = sK + 2 * KC * HD * 2;
    const uint16_t *qb = q + b * T * qd + h * HD, *ob = dout + b * T * qd + h * HD;
    const uint16_t *kb = k + b * T * kvd + kvh * HD, *vb = v + b * T * kvd + kvh * HD;
    const int64_t last = (q0 + FA_ROWS < n ? q0 + FA_ROWS : n) - 1;
    const int kt0 = (int)(band_start(q0, window) / KC), kt1 = (int)(last / KC);
    load_tile<HD, FA_ROWS>(sQ, qb, qd, q0, n);
    load_tile<HD, FA_ROWS>(sO, ob, qd, q0, n);
    load_tile<HD, KC>(sK, kb, kvd, (int64_t)kt0 * KC, n);
    load_tile<HD, KC>(sV, vb, kvd, (int64_t)kt0 * KC, n);
    cp_async_commit();

    const float sl = scale * LOG2E;
    const int64_t tr[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const float *lb = lse + ((int64_t)b * nh + h) * T, *Db = D + ((int64_t)b * nh + h) * T;
    float ll[2], dd[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        ll[r] = tr[r] < n ? lb[tr[r]] * LOG2E : 0.0f;
        dd[r] = tr[r] < n ? Db[tr[r]] : 0.0f;
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int kt = kt0; kt <= kt1; kt++) {
        const int buf = (kt - kt0) & 1;
        if (kt < kt1) {
            load_tile<HD, KC>(sK + (buf ^ 1) * KC * HD * 2, kb, kvd, (int64_t)(kt + 1) * KC, n);
            load_tile<HD, KC>(sV + (buf ^ 1) * KC * HD * 2, vb, kvd, (int64_t)(kt + 1) * KC, n);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t tK = sK + buf * KC * HD * 2, tV = sV + buf * KC * HD * 2;
        float s[KC / 8][4], dp[KC / 8][4];
#pragma unroll
        for (int j = 0; j < KC / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            uint32_t fa[4], fo[4];
            frag_a<HD>(fa, sQ, warp * 16, ks);
            frag_a<HD>(fo, sO, warp * 16, ks);
#pragma unroll
            for (int np = 0; np < KC / 16; np++) {
                uint32_t bf[4];
                frag_b<HD>(bf, tK, np * 16, ks);
                mma(s[2 * np], fa, bf[0], bf[1]);
                mma(s[2 * np + 1], fa, bf[2], bf[3]);
                frag_b<HD>(bf, tV, np * 16, ks);
                mma(dp[2 * np], fo, bf[0], bf[1]);
                mma(dp[2 * np + 1], fo, bf[2], bf[3]);
            }
        }
        const int64_t k0 = (int64_t)kt * KC;
        const bool edge = k0 + KC - 1 > q0 || (window > 0 && k0 < band_start(q0 + FA_ROWS - 1, window));
        uint32_t da[KC / 16][4];
#pragma unroll
        for (int j = 0; j < KC / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = ex2(fmaf(s[j][e], sl, -ll[e >> 1]));
                if (edge && !seen((int)tr[e >> 1], (int)k0 + j * 8 + 2 * t4 + (e & 1), (int)n, window)) p = 0.0f;
                s[j][e] = p * (dp[j][e] - dd[e >> 1]);
            }
#pragma unroll
        for (int ks = 0; ks < KC / 16; ks++) {
            da[ks][0] = pack2(s[2 * ks][0], s[2 * ks][1]);
            da[ks][1] = pack2(s[2 * ks][2], s[2 * ks][3]);
            da[ks][2] = pack2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            da[ks][3] = pack2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
        }
#pragma unroll
        for (int ks = 0; ks < KC / 16; ks++)
#pragma unroll
            for (int np = 0; np < HD / 16; np++) {
                uint32_t bf[4];
                frag_bt<HD>(bf, tK, ks * 16, np);
                mma(acc[2 * np], da[ks], bf[0], bf[1]);
                mma(acc[2 * np + 1], da[ks], bf[2], bf[3]);
            }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int64_t t = tr[r];
        if (t >= T) continue;
        const bool valid = t < n;
        float *row = db + t * qd;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *reinterpret_cast<float2 *>(row + j * 8 + 2 * t4) =
                valid ? make_float2(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale) : make_float2(0.0f, 0.0f);
    }
}

/* QS query rows a step */
template <int HD, int QS>
__global__ void __launch_bounds__(FA_THREADS) k_flash_bwd_dkdv(float *dk, float *dv, const uint16_t *q,
                                                               const uint16_t *k, const uint16_t *v,
                                                               const uint16_t *dout, const float *lse, const float *D,
                                                               const int32_t *len, int64_t T, int nh, int nkv,
                                                               int window, float scale)
{
    extern __shared__ uint4 smem[];
    const int kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, group = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int64_t n = len[b], k0 = (int64_t)kt * FA_KEYS, qd = (int64_t)nh * HD, kvd = (int64_t)nkv * HD;
    float *dkb = dk + b * T * kvd + kvh * HD, *dvb = dv + b * T * kvd + kvh * HD;
    if (k0 >= n) {
        for (int64_t i = threadIdx.x; i < (int64_t)FA_KEYS * HD; i += FA_THREADS) {
            const int64_t s = k0 + i / HD;
            if (s < T) dkb[s * kvd + i % HD] = dvb[s * kvd + i % HD] = 0.0f;
        }
        return;
    }
    const uint32_t sK = smem_addr(smem), sV = sK + FA_KEYS * HD * 2, sQ = sV + FA_KEYS * HD * 2,
                   sO = sQ + 2 * QS * HD * 2;
    const uint16_t *kb = k + b * T * kvd + kvh * HD, *vb = v + b * T * kvd + kvh * HD;
    /* the queries that see these keys: k0 .. qend-1 */
    int64_t qend = n;
    if (window > 0 && k0 + FA_KEYS - 1 + window < n) qend = k0 + FA_KEYS - 1 + window;
    const int nsub = (int)((qend - k0 + QS - 1) / QS), steps = nsub * group;
    load_tile<HD, FA_KEYS>(sK, kb, kvd, k0, n);
    load_tile<HD, FA_KEYS>(sV, vb, kvd, k0, n);
    /* step i: query head kvh * group + i / nsub, rows k0 + (i % nsub) * QS .. */
    /* each step's log-sum-exps (times log2 e) and rowsum(P dP), beside its tiles */
    float *sL = reinterpret_cast<float *>(reinterpret_cast<char *>(smem) + (2 * FA_KEYS + 4 * QS) * HD * 2);
    float *sD = sL + 2 * QS;
    auto load_step = [&](int i, int buf) {
        const int h = kvh * group + i / nsub;
        const int64_t t0 = k0 + (int64_t)(i % nsub) * QS;
        load_tile<HD, QS>(sQ + buf * QS * HD * 2, q + b * T * qd + h * HD, qd, t0, n);
        load_tile<HD, QS>(sO + buf * QS * HD * 2, dout + b * T * qd + h * HD, qd, t0, n);
        /* queued like the tiles (a plain load would stall its warp here for
         * the whole trip to memory); rows past n read as zeros */
        const int j = threadIdx.x & (QS - 1);
        const int64_t t = t0 + j, row = ((int64_t)b * nh + h) * T + (t < n ? t : 0);
        if (threadIdx.x < QS) cp_async4(smem_addr(sL + buf * QS + j), lse + row, t < n ? 4 : 0);
        else if (threadIdx.x < 2 * QS) cp_async4(smem_addr(sD + buf * QS + j), D + row, t < n ? 4 : 0);
    };
    load_step(0, 0);
    cp_async_commit();

    const float sl = scale * LOG2E;
    const int64_t sr[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8}; /* this thread's two keys */
    float ak[HD / 8][4], av[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) ak[j][e] = av[j][e] = 0.0f;
    for (int i = 0; i < steps; i++) {
        const int buf = i & 1;
        if (i + 1 < steps) {
            load_step(i + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int64_t t0 = k0 + (int64_t)(i % nsub) * QS;
        const uint32_t tQ = sQ + buf * QS * HD * 2, tO = sO + buf * QS * HD * 2;
        /* S^T [16 keys, 32 queries] and dP^T */
        float s[QS / 8][4], dp[QS / 8][4];
#pragma unroll
        for (int j = 0; j < QS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            uint32_t fk[4], fv[4];
            frag_a<HD>(fk, sK, warp * 16, ks);
            frag_a<HD>(fv, sV, warp * 16, ks);
#pragma unroll
            for (int np = 0; np < QS / 16; np++) {
                uint32_t bf[4];
                frag_b<HD>(bf, tQ, np * 16, ks);
                mma(s[2 * np], fk, bf[0], bf[1]);
                mma(s[2 * np + 1], fk, bf[2], bf[3]);
                frag_b<HD>(bf, tO, np * 16, ks);
                mma(dp[2 * np], fv, bf[0], bf[1]);
                mma(dp[2 * np + 1], fv, bf[2], bf[3]);
            }
        }
        /* the mask where the step reaches before the diagonal, past some
         * key's band or past n (rows past n read as zeros would add zeros,
         * but no exp of them is taken on trust) */
        const bool edge = t0 < k0 + FA_KEYS - 1 || t0 + QS > n ||
                          (window > 0 && t0 + QS - 1 - window + 1 > k0);
        const float *stL = sL + buf * QS, *stD = sD + buf * QS;
        uint32_t pa[QS / 16][4], da[QS / 16][4];
#pragma unroll
        for (int j = 0; j < QS / 8; j++) {
#pragma unroll
            for (int c = 0; c < 2; c++) { /* the query column 2 t4 + c of n-tile j */
                const int jj = j * 8 + 2 * t4 + c;
                const float lt = stL[jj] * LOG2E, dt = stD[jj];
#pragma unroll
                for (int r = 0; r < 2; r++) { /* key rows g, g + 8 */
                    const int e = 2 * r + c;
                    float p = ex2(fmaf(s[j][e], sl, -lt));
                    if (edge && !seen((int)t0 + jj, (int)sr[r], (int)n, window)) p = 0.0f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - dt);
                }
            }
        }
#pragma unroll
        for (int ks = 0; ks < QS / 16; ks++) {
            pa[ks][0] = pack2(s[2 * ks][0], s[2 * ks][1]);
            pa[ks][1] = pack2(s[2 * ks][2], s[2 * ks][3]);
            pa[ks][2] = pack2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            pa[ks][3] = pack2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
            da[ks][0] = pack2(dp[2 * ks][0], dp[2 * ks][1]);
            da[ks][1] = pack2(dp[2 * ks][2], dp[2 * ks][3]);
            da[ks][2] = pack2(dp[2 * ks + 1][0], dp[2 * ks + 1][1]);
            da[ks][3] = pack2(dp[2 * ks + 1][2], dp[2 * ks + 1][3]);
        }
#pragma unroll
        for (int ks = 0; ks < QS / 16; ks++)
#pragma unroll
            for (int np = 0; np < HD / 16; np++) {
                uint32_t bf[4];
                frag_bt<HD>(bf, tO, ks * 16, np);
                mma(av[2 * np], pa[ks], bf[0], bf[1]);
                mma(av[2 * np + 1], pa[ks], bf[2], bf[3]);
                frag_bt<HD>(bf, tQ, ks * 16, np);
                mma(ak[2 * np], da[ks], bf[0], bf[1]);
                mma(ak[2 * np + 1], da[ks], bf[2], bf[3]);
            }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int64_t s = sr[r];
        if (s >= T) continue;
        const bool valid = s < n;
        float *krow = dkb + s * kvd, *vrow = dvb + s * kvd;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            *reinterpret_cast<float2 *>(krow + j * 8 + 2 * t4) =
                valid ? make_float2(ak[j][2 * r] * scale, ak[j][2 * r + 1] * scale) : make_float2(0.0f, 0.0f);
            *reinterpret_cast<float2 *>(vrow + j * 8 + 2 * t4) =
                valid ? make_float2(av[j][2 * r], av[j][2 * r + 1]) : make_float2(0.0f, 0.0f);
        }
    }
}

int device_ok = -1; /* sm_80 or newer: 1; no: 0; not asked yet: -1 (a plain static: no guard needed) */

bool flash_device(void)
{
    if (device_ok < 0) {
        int dev = 0, major = 0;
        device_ok = cudaGetDevice(&dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    major >= 8;
    }
    return device_ok == 1;
}

/* dynamic shared memory of each kernel, and raising the 48 KB default once */
template <int HD, int RB, int KC> constexpr int fwd_smem() { return (4 * 16 * RB + 4 * KC) * HD * 2; }
template <int HD, int KC> constexpr int dq_smem() { return (2 * FA_ROWS + 4 * KC) * HD * 2; }
template <int HD, int QS> constexpr int dkdv_smem() { return (2 * FA_KEYS + 4 * QS) * HD * 2 + 4 * QS * 4; }

int raised[2] = {0, 0};

/* The forward's variant: 0 (16 rows a warp, 64 keys a tile), 1 (32 rows, 32
 * keys), 2 (32 rows, 64 keys; FlashAttention-2's shape), 3 (16 rows, 32 keys,
 * three blocks an SM).  The default, 0, was the fastest in the last
 * measurement (H200, 2026-12-03, bench/bench_attention: 0.205 ms against
 * 0.220 for 2 at 7b; 2 led by 5% in an earlier call on another machine,
 * 3 and 1 were never ahead).  QLK_FLASH_FWD=0|1|2|3 picks one for kernel
 * work; read once. */
int fwd_variant = -2; /* -2: not read yet, -1: not set */

int fwd_choice(int hd)
{
    if (fwd_variant == -2) {
        const char *e = getenv("QLK_FLASH_FWD");
        fwd_variant = e && *e >= '0' && *e <= '3' && !e[1] ? *e - '0' : -1;
    }
    (void)hd;
    return fwd_variant >= 0 ? fwd_variant : 0;
}

/* the dQ kernel's: 0 (64 keys a tile, the default), 1 (32 keys, three blocks
 * an SM: 3% slower); QLK_FLASH_DQ=0|1 */
int dq_variant = -2;

int dq_choice(void)
{
    if (dq_variant == -2) {
        const char *e = getenv("QLK_FLASH_DQ");
        dq_variant = e && *e >= '0' && *e <= '1' && !e[1] ? *e - '0' : -1;
    }
    return dq_variant >= 0 ? dq_variant : 0;
}

/* the dK/dV kernel's: 1 (64 query rows a step, the default: 0.606 against
 * 0.627 ms at 7b, 1.40 against 1.45 at 70b; through the gpu suite on the
 * H200 at stop 20) or 0 (32 rows); QLK_FLASH_DKDV=0|1 */
int dkdv_variant = -2;

int dkdv_choice(void)
{
    if (dkdv_variant == -2) {
        const char *e = getenv("QLK_FLASH_DKDV");
        dkdv_variant = e && *e >= '0' && *e <= '1' && !e[1] ? *e - '0' : -1;
    }
    return dkdv_variant >= 0 ? dkdv_variant : 1;
}

template <typename K> cudaError_t smem_attr(K kernel, int bytes)
{
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int HD> cudaError_t raise_smem(void)
{
    int &done = raised[HD == 128];
    if (done) return cudaSuccess;
    cudaError_t e = smem_attr(k_flash_fwd<HD, 1, 64, 1>, fwd_smem<HD, 1, 64>());
    if (e == cudaSuccess) e = smem_attr(k_flash_fwd<HD, 2, 32, 1>, fwd_smem<HD, 2, 32>());
    if (e == cudaSuccess) e = smem_attr(k_flash_fwd<HD, 2, 64, 1>, fwd_smem<HD, 2, 64>());
    if (e == cudaSuccess) e = smem_attr(k_flash_fwd<HD, 1, 32, 3>, fwd_smem<HD, 1, 32>());
    if (e == cudaSuccess) e = smem_attr(k_flash_bwd_dq<HD, 64, 1>, dq_smem<HD, 64>());
    if (e == cudaSuccess) e = smem_attr(k_flash_bwd_dq<HD, 32, 3>, dq_smem<HD, 32>());
    if (e == cudaSuccess) e = smem_attr(k_flash_bwd_dkdv<HD, 32>, dkdv_smem<HD, 32>());
    if (e == cudaSuccess) e = smem_attr(k_flash_bwd_dkdv<HD, 64>, dkdv_smem<HD, 64>());
    done = e == cudaSuccess;
    return e;
}

template <int HD>
int flash_fwd(cudaStream_t st, float *out, float *lse, const uint16_t *q, const uint16_t *k, const uint16_t *v,
              const int32_t *len, int64_t B, int64_t T, int nh, int nkv, int window)
{
    cudaError_t e = raise_smem<HD>();
    if (e != cudaSuccess) return (int)e;
    const float scale = 1.0f / sqrtf((float)HD);
    const unsigned tiles64 = (unsigned)((T + 63) / 64), tiles128 = (unsigned)((T + 127) / 128);
    const dim3 g64(tiles64, (unsigned)nh, (unsigned)B), g128(tiles128, (unsigned)nh, (unsigned)B);
    switch (fwd_choice(HD)) {
    case 1:
        k_flash_fwd<HD, 2, 32, 1><<<g128, FA_THREADS, fwd_smem<HD, 2, 32>(), st>>>(out, lse, q, k, v, len, T, nh, nkv,
                                                                                   window, scale);
        break;
    case 2:
        k_flash_fwd<HD, 2, 64, 1><<<g128, FA_THREADS, fwd_smem<HD, 2, 64>(), st>>>(out, lse, q, k, v, len, T, nh, nkv,
                                                                                   window, scale);
        break;
    case 3:
        k_flash_fwd<HD, 1, 32, 3><<<g64, FA_THREADS, fwd_smem<HD, 1, 32>(), st>>>(out, lse, q, k, v, len, T, nh, nkv,
                                                                                  window, scale);
        break;
    default:
        k_flash_fwd<HD, 1, 64, 1><<<g64, FA_THREADS, fwd_smem<HD, 1, 64>(), st>>>(out, lse, q, k, v, len, T, nh, nkv,
                                                                                  window, scale);
    }
    return qlk_status();
}

template <int HD>
int flash_bwd(cudaStream_t st, float *dq, float *dk, float *dv, float *D, const float *dout32, const float *out,
              const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *dout, const float *lse,
              const int32_t *len, int64_t B, int64_t T, int nh, int nkv, int window)
{
    cudaError_t e = raise_smem<HD>();
    if (e != cudaSuccess) return (int)e;
    const float scale = 1.0f / sqrtf((float)HD);
    const int64_t warps = B * T * nh;
    k_flash_rowdot<<<qlk_blocks(warps * 32, 256), 256, 0, st>>>(D, dout32, out, len, B, T, nh, HD);
    const unsigned tiles = (unsigned)((T + FA_ROWS - 1) / FA_ROWS);
    if (dq_choice() == 1)
        k_flash_bwd_dq<HD, 32, 3><<<dim3(tiles, (unsigned)nh, (unsigned)B), FA_THREADS, dq_smem<HD, 32>(), st>>>(
            dq, q, k, v, dout, lse, D, len, T, nh, nkv, window, scale);
    else
        k_flash_bwd_dq<HD, 64, 1><<<dim3(tiles, (unsigned)nh, (unsigned)B), FA_THREADS, dq_smem<HD, 64>(), st>>>(
            dq, q, k, v, dout, lse, D, len, T, nh, nkv, window, scale);
    const dim3 gk((unsigned)((T + FA_KEYS - 1) / FA_KEYS), (unsigned)nkv, (unsigned)B);
    if (dkdv_choice() == 1)
        k_flash_bwd_dkdv<HD, 64><<<gk, FA_THREADS, dkdv_smem<HD, 64>(), st>>>(dk, dv, q, k, v, dout, lse, D, len, T,
                                                                             nh, nkv, window, scale);
    else
        k_flash_bwd_dkdv<HD, 32><<<gk, FA_THREADS, dkdv_smem<HD, 32>(), st>>>(dk, dv, q, k, v, dout, lse, D, len, T,
                                                                             nh, nkv, window, scale);
    return qlk_status();
}

} // namespace

extern "C" int qlk_flash_supported(int hd) { return (hd == 64 || hd == 128) && flash_device(); }

extern "C" int qlk_flash_forward(void *stream, float *out, float *lse, const uint16_t *q16, const uint16_t *k16,
                                 const uint16_t *v16, const int32_t *len, int64_t B, int64_t T, int nh, int nkv,
                                 int hd, int window)
{
    if (nkv < 1 || nh % nkv || !qlk_flash_supported(hd)) return (int)cudaErrorInvalidValue;
    if (B * T <= 0) return qlk_status();
    return hd == 128 ? flash_fwd<128>(ST(stream), out, lse, q16, k16, v16, len, B, T, nh, nkv, window)
                     : flash_fwd<64>(ST(stream), out, lse, q16, k16, v16, len, B, T, nh, nkv, window);
}

extern "C" int qlk_flash_backward(void *stream, float *dq, float *dk, float *dv, float *D, const float *dout,
                                  const float *out, const uint16_t *q16, const uint16_t *k16, const uint16_t *v16,
                                  const uint16_t *dout16, const float *lse, const int32_t *len, int64_t B, int64_t T,
                                  int nh, int nkv, int hd, int window)
{
    if (nkv < 1 || nh % nkv || !qlk_flash_supported(hd)) return (int)cudaErrorInvalidValue;
    if (B * T <= 0) return qlk_status();
    return hd == 128 ? flash_bwd<128>(ST(stream), dq, dk, dv, D, dout, out, q16, k16, v16, dout16, lse, len, B, T, nh,
                                      nkv, window)
                     : flash_bwd<64>(ST(stream), dq, dk, dv, D, dout, out, q16, k16, v16, dout16, lse, len, B, T, nh,
                                     nkv, window);
}
