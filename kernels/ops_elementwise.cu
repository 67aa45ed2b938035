/* Row-wise and elementwise ops of the CUDA backend: embedding, additions,
 * SwiGLU, dropout and RoPE.  Each is its CPU operator's arithmetic, one
 * thread per element (kernels/cuda_ops.h). */
#include <math.h>

#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "ops.h"

#define ST(s) ((cudaStream_t)(s))

/* one block per row (b, t): the table row of its id, or zeros when padded */
__global__ void k_embedding(float *out, const float *table, const int32_t *ids, const int32_t *len, int64_t T,
                            int64_t C)
{
    const int64_t row = blockIdx.x, b = row / T, t = row % T;
    float *o = out + row * C;
    if (t < len[b]) {
        const float *src = table + (int64_t)ids[row] * C;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = src[c];
    } else {
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = 0.0f;
    }
}

extern "C" int qlk_embedding(void *stream, float *out, const float *table, const int32_t *ids, const int32_t *len,
                             int64_t B, int64_t T, int64_t C)
{
    if (B * T > 0) k_embedding<<<(unsigned)(B * T), 256, 0, ST(stream)>>>(out, table, ids, len, T, C);
    return qlk_status();
}

__global__ void k_embedding_w16(float *out, const uint16_t *table16, const int32_t *ids, const int32_t *len,
                                int64_t T, int64_t C)
{
    const int64_t row = blockIdx.x, b = row / T, t = row % T;
    float *o = out + row * C;
    if (t < len[b]) {
        const uint16_t *src = table16 + (int64_t)ids[row] * C;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = from_bf16(src[c]);
    } else {
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = 0.0f;
    }
}

extern "C" int qlk_embedding_w16(void *stream, float *out, const uint16_t *table16, const int32_t *ids,
                                 const int32_t *len, int64_t B, int64_t T, int64_t C)
{
    if (B * T > 0) k_embedding_w16<<<(unsigned)(B * T), 256, 0, ST(stream)>>>(out, table16, ids, len, T, C);
    return qlk_status();
}

/* Elementwise kernels take 4 elements a thread (16-byte accesses) where
 * every pointer is 16-byte aligned (8 for bf16), the rest one at a time:
 * n4 = n / 4 then, else 0.  Same operations per element either way. */
static int64_t vec4(int64_t n, const void *a, const void *b, const void *c)
{
    return ((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) % 16 ? 0 : n / 4;
}

#define EW_LOOP(i, from, to) \
    for (int64_t i = (from) + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (to); i += (int64_t)gridDim.x * blockDim.x)

__device__ inline float round_one(uint16_t *dst, int64_t i, float v)
{
    const uint16_t b = to_bf16(v);
    if (dst) dst[i] = b;
    return from_bf16(b);
}

__global__ void k_round_bf16(uint16_t *dst, float *x, int64_t n, int64_t n4)
{
    EW_LOOP(i, 0, n4)
    {
        float4 v = reinterpret_cast<float4 *>(x)[i];
        v.x = round_one(dst, 4 * i, v.x), v.y = round_one(dst, 4 * i + 1, v.y);
        v.z = round_one(dst, 4 * i + 2, v.z), v.w = round_one(dst, 4 * i + 3, v.w);
        reinterpret_cast<float4 *>(x)[i] = v;
    }
    EW_LOOP(i, 4 * n4, n) x[i] = round_one(dst, i, x[i]);
}

extern "C" int qlk_round_bf16(void *stream, uint16_t *dst, float *x, int64_t n)
{
    if (n > 0) k_round_bf16<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(dst, x, n, vec4(n, x, x, x));
    return qlk_status();
}

__global__ void k_add(float *x, const float *y, int64_t n, int64_t n4)
{
    EW_LOOP(i, 0, n4)
    {
        float4 a = reinterpret_cast<float4 *>(x)[i];
        const float4 b = reinterpret_cast<const float4 *>(y)[i];
        a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
        reinterpret_cast<float4 *>(x)[i] = a;
    }
    EW_LOOP(i, 4 * n4, n) x[i] += y[i];
}

extern "C" int qlk_add_inplace(void *stream, float *x, const float *y, int64_t n)
{
    if (n > 0) k_add<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(x, y, n, vec4(n, x, y, y));
    return qlk_status();
}

__global__ void k_add_bias(float *y, const float *bias, const int32_t *len, int64_t T, int64_t n)
{
    const int64_t row = blockIdx.x, b = row / T, t = row % T;
    if (t >= len[b]) return;
    float *o = y + row * n;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) o[c] += bias[c];
}

extern "C" int qlk_add_bias(void *stream, float *y, const float *bias, const int32_t *len, int64_t B, int64_t T,
                            int64_t n)
{
    if (B * T > 0) k_add_bias<<<(unsigned)(B * T), 256, 0, ST(stream)>>>(y, bias, len, T, n);
    return qlk_status();
}

__device__ inline float silu_mul(float g, float u) { return g / (1.0f + ql_expf(-g)) * u; }

__global__ void k_swiglu_fwd(float *out, const float *gate, const float *up, int64_t n, int64_t n4)
{
    EW_LOOP(i, 0, n4)
    {
        const float4 g = reinterpret_cast<const float4 *>(gate)[i], u = reinterpret_cast<const float4 *>(up)[i];
        reinterpret_cast<float4 *>(out)[i] =
            make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z), silu_mul(g.w, u.w));
    }
    EW_LOOP(i, 4 * n4, n) out[i] = silu_mul(gate[i], up[i]);
}

extern "C" int qlk_swiglu_forward(void *stream, float *out, const float *gate, const float *up, int64_t n)
{
    if (n > 0) k_swiglu_fwd<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(out, gate, up, n, vec4(n, out, gate, up));
    return qlk_status();
}

__device__ inline void swiglu_grad(float g, float u, float d, float *dg, float *du)
{
    const float e = ql_expf(-g);
    const float sig = 1.0f / (1.0f + e), silu = g / (1.0f + e);
    *dg = d * u * (sig * (1.0f + g * (1.0f - sig)));
    *du = d * silu;
}

__global__ void k_swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                             int64_t n, int64_t n4)
{
    EW_LOOP(i, 0, n4)
    {
        const float4 g = reinterpret_cast<const float4 *>(gate)[i], u = reinterpret_cast<const float4 *>(up)[i],
                     d = reinterpret_cast<const float4 *>(dout)[i];
        float4 a, b;
        swiglu_grad(g.x, u.x, d.x, &a.x, &b.x);
        swiglu_grad(g.y, u.y, d.y, &a.y, &b.y);
        swiglu_grad(g.z, u.z, d.z, &a.z, &b.z);
        swiglu_grad(g.w, u.w, d.w, &a.w, &b.w);
        reinterpret_cast<float4 *>(dgate)[i] = a;
        reinterpret_cast<float4 *>(dup)[i] = b;
    }
    EW_LOOP(i, 4 * n4, n)
    {
        float a, b;
        swiglu_grad(gate[i], up[i], dout[i], &a, &b);
        dgate[i] = a;
        dup[i] = b;
    }
}

extern "C" int qlk_swiglu_backward(void *stream, float *dgate, float *dup, const float *dout, const float *gate,
                                   const float *up, int64_t n)
{
    const int64_t n4 = vec4(n, dgate, dup, dout) && vec4(n, gate, up, up) ? n / 4 : 0;
    if (n > 0) k_swiglu_bwd<<<qlk_vec_blocks(n), 256, 0, ST(stream)>>>(dgate, dup, dout, gate, up, n, n4);
    return qlk_status();
}

/* ql_dropout_forward's mask: element i of a sequence keeps iff its 16 bits
 * of the (i/4)-th splitmix64 output of its seed (dropout_hash), as a
 * uniform, are >= p (dropout_bit) */
__device__ inline uint64_t dropout_hash(uint64_t seed, int64_t g)
{
    uint64_t z = seed + (uint64_t)(g + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ inline int dropout_bit(uint64_t z, int j, float p)
{
    return (float)((z >> (48 - 16 * j)) & 0xffffu) * 0x1p-16f >= p;
}

/* mode 0: p in (0, 1) (keep from the mask); 1: keep all (p <= 0 or NaN); 2:
 * drop all (p >= 1).  One element: x kept (scaled) or dropped, added to old
 * when accumulating. */
__device__ inline float dropout_one(float x, float old, int keep, float inv, int mode, int backward, int accumulate)
{
    keep = mode == 1 ? 1 : mode == 2 ? 0 : keep;
    float v;
    if (!backward) v = keep ? (mode == 1 ? x : x * inv) : 0.0f;
    else v = keep ? x * inv : 0.0f;
    return backward && accumulate ? old + v : v;
}

/* the keep bits of elements 4g .. 4g+3 (mode 0 only: else unused) */
__device__ inline void dropout_bits4(uint64_t seed, int64_t g, float p, int mode, int k[4])
{
    const uint64_t z = mode == 0 ? dropout_hash(seed, g) : 0;
    for (int j = 0; j < 4; j++) k[j] = dropout_bit(z, j, p);
}

__device__ inline int dropout_keep(uint64_t seed, int64_t i, float p, int mode)
{
    return mode == 0 ? dropout_bit(dropout_hash(seed, i / 4), (int)(i % 4), p) : 0;
}

/* mode 0: p in (0, 1); 1: keep all (p <= 0 or NaN); 2: drop all (p >= 1) */
__global__ void k_dropout(float *out, const float *in, const int32_t *len, const uint64_t *seeds, int64_t T,
                          int64_t C, float p, float inv, int mode, int backward, int accumulate)
{
    const int64_t row = blockIdx.x, b = row / T, t = row % T;
    float *o = out + row * C;
    const float *x = in + row * C;
    if (t >= len[b]) {
        if (!backward || !accumulate)
            for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    const uint64_t seed = seeds[b];
    if (C % 4 == 0 && ((uintptr_t)o | (uintptr_t)x) % 16 == 0) {
        for (int64_t c4 = threadIdx.x; c4 < C / 4; c4 += blockDim.x) {
            const float4 xv = reinterpret_cast<const float4 *>(x)[c4];
            float4 ov = backward && accumulate ? reinterpret_cast<float4 *>(o)[c4] : make_float4(0, 0, 0, 0);
            int k[4]; /* t * C + 4 * c4 is a multiple of 4: one hash */
            dropout_bits4(seed, (t * C) / 4 + c4, p, mode, k);
            ov.x = dropout_one(xv.x, ov.x, k[0], inv, mode, backward, accumulate);
            ov.y = dropout_one(xv.y, ov.y, k[1], inv, mode, backward, accumulate);
            ov.z = dropout_one(xv.z, ov.z, k[2], inv, mode, backward, accumulate);
            ov.w = dropout_one(xv.w, ov.w, k[3], inv, mode, backward, accumulate);
            reinterpret_cast<float4 *>(o)[c4] = ov;
        }
        return;
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        o[c] = dropout_one(x[c], backward && accumulate ? o[c] : 0.0f, dropout_keep(seed, t * C + c, p, mode), inv,
                           mode, backward, accumulate);
}

extern "C" int qlk_dropout(void *stream, float *out, const float *in, const int32_t *len, const uint64_t *seeds,
                           int64_t B, int64_t T, int64_t C, float p, float inv, int backward, int accumulate)
{
    /* the CPU operators' special cases: the forward passes x unscaled when
     * p <= 0 (or NaN) and zeros when p >= 1; the backward drops all for
     * p >= 1, keeps all (times 1) for p <= 0 */
    const int mode = p >= 1.0f ? 2 : !(p > 0.0f) ? 1 : 0;
    if (mode == 1) inv = 1.0f;
    if (B * T > 0)
        k_dropout<<<(unsigned)(B * T), 256, 0, ST(stream)>>>(out, in, len, seeds, T, C, p, inv, mode, backward,
                                                             accumulate);
    return qlk_status();
}

/* dropout_forward's values (mode as k_dropout) of x rounded to bf16 first,
 * rounded to bf16: out16 [B*T, C], padded rows 0; 4 elements a thread where
 * C and the pointers allow.  The input is float32 or already bf16 (IN16: the
 * frozen product's copy of x), and both give the same bits, since x goes
 * through bf16 either way: the forward drops from the copy it has, the
 * backward from the float32 x, and the two agree. */
__device__ inline float as_bf16_value(float x) { return from_bf16(to_bf16(x)); }
__device__ inline float as_bf16_value(uint16_t x) { return from_bf16(x); }

template <typename IN> struct vec4_of;
template <> struct vec4_of<float> {
    typedef float4 type;
    static constexpr int align = 16;
};
template <> struct vec4_of<uint16_t> {
    typedef ushort4 type;
    static constexpr int align = 8;
};

template <typename IN>
__global__ void k_dropout16(uint16_t *out, const IN *in, const int32_t *len, const uint64_t *seeds, int64_t T, int64_t C,
                            float p, float inv, int mode)
{
    const int64_t row = blockIdx.x, b = row / T, t = row % T;
    uint16_t *o = out + row * C;
    const IN *x = in + row * C;
    if (t >= len[b]) {
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = 0;
        return;
    }
    const uint64_t seed = seeds[b];
    if (C % 4 == 0 && (uintptr_t)x % vec4_of<IN>::align == 0 && (uintptr_t)o % 8 == 0) {
        for (int64_t c4 = threadIdx.x; c4 < C / 4; c4 += blockDim.x) {
            const typename vec4_of<IN>::type xv = reinterpret_cast<const typename vec4_of<IN>::type *>(x)[c4];
            int k[4];
            dropout_bits4(seed, (t * C) / 4 + c4, p, mode, k);
            ushort4 ov;
            ov.x = to_bf16(dropout_one(as_bf16_value(xv.x), 0.0f, k[0], inv, mode, 0, 0));
            ov.y = to_bf16(dropout_one(as_bf16_value(xv.y), 0.0f, k[1], inv, mode, 0, 0));
            ov.z = to_bf16(dropout_one(as_bf16_value(xv.z), 0.0f, k[2], inv, mode, 0, 0));
            ov.w = to_bf16(dropout_one(as_bf16_value(xv.w), 0.0f, k[3], inv, mode, 0, 0));
            reinterpret_cast<ushort4 *>(o)[c4] = ov;
        }
        return;
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        o[c] = to_bf16(dropout_one(as_bf16_value(x[c]), 0.0f, dropout_keep(seed, t * C + c, p, mode), inv, mode, 0, 0));
}

/* in16 non-NULL: drop from it (bf16) instead of in (float32) */
extern "C" int qlk_dropout16(void *stream, uint16_t *out16, const float *in, const uint16_t *in16, const int32_t *len,
                             const uint64_t *seeds, int64_t B, int64_t T, int64_t C, float p, float inv)
{
    const int mode = p >= 1.0f ? 2 : !(p > 0.0f) ? 1 : 0;
    if (mode == 1) inv = 1.0f;
    if (B * T > 0) {
        if (in16) k_dropout16<uint16_t><<<(unsigned)(B * T), 256, 0, ST(stream)>>>(out16, in16, len, seeds, T, C, p, inv, mode);
        else k_dropout16<float><<<(unsigned)(B * T), 256, 0, ST(stream)>>>(out16, in, len, seeds, T, C, p, inv, mode);
    }
    return qlk_status();
}

/* one thread per (row, i < hd/2), over the heads of the row */
__global__ void k_rope(float *x, const int32_t *len, int64_t B, int64_t T, int nheads, int hd, int pos0,
                       const float *inv_freq, float attn_scale, int inverse)
{
    const int half = hd / 2;
    const int64_t n = B * T * half;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = j / half, b = row / T, t = row % T;
        const int i = (int)(j % half);
        if (t >= len[b]) continue;
        const float f = (float)(pos0 + t) * inv_freq[b * half + i];
        const float c = cosf(f) * attn_scale, s = sinf(f) * attn_scale;
        float *v = x + row * nheads * hd;
        for (int h = 0; h < nheads; h++, v += hd) {
            const float a = v[i], bb = v[i + half];
            if (!inverse) {
                v[i] = a * c - bb * s;
                v[i + half] = bb * c + a * s;
            } else {
                v[i] = a * c + bb * s;
                v[i + half] = bb * c - a * s;
            }
        }
    }
}

extern "C" int qlk_rope(void *stream, float *x, const int32_t *len, int64_t B, int64_t T, int nheads, int hd,
                        int pos0, const float *inv_freq, float attn_scale, int inverse)
{
    const int64_t n = B * T * (hd / 2);
    if (n > 0) k_rope<<<qlk_blocks(n, 256), 256, 0, ST(stream)>>>(x, len, B, T, nheads, hd, pos0, inv_freq, attn_scale,
                                                                   inverse);
    return qlk_status();
}
