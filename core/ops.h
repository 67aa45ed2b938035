/* CPU operators (internal).  Outputs first, shapes in comments; every
 * operator has a plain C loop that the CUDA backend must match (the matrix
 * products run through OpenBLAS and keep theirs as *_ref). */
#ifndef QL_OPS_H
#define QL_OPS_H

#include <math.h>
#include <stdint.h>

/* Functions the CUDA kernels share with the CPU operators (kernels/) */
#ifdef __CUDACC__
#define QL_HOST_DEVICE __host__ __device__
#else
#define QL_HOST_DEVICE
#endif

/* Below this many multiply-adds a loop runs on one thread: forking a team
 * costs more than it saves, and much more when the cores are shared. */
#define QL_PARALLEL_MIN_WORK (INT64_C(1) << 22)

/* Dot product in a fixed 8-lane order (vectorizable, and the same result in
 * every operator that uses it). */
static inline float ql_dot(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* exp(x) in float without libm, as straight-line code that the compiler
 * vectorizes (the loss and SwiGLU loops): x = k ln2 + r, |r| <= ln2/2 (ln2
 * split in two, Cody-Waite), e^r by its degree-7 Taylor polynomial (truncation
 * below 1e-8 relative), times 2^k through the exponent bits.  0 below -87.33 (where e^x is no longer a normal float),
 * +inf above 88.72; NaN gives NaN.  Every step is one IEEE operation in a fixed
 * order (no FMA contraction: -ffp-contract=off), so the bits are the same on
 * every machine.  Error against exp in double: 1.2 ulp at most
 * (tests/test_ops.c: expf_within_1_5_ulp). */
static inline QL_HOST_DEVICE float ql_expf(float x)
{
    const float lo = -87.33654f, hi = 88.72283f;
    const float xc = x < lo ? lo : x > hi ? hi : x == x ? x : 0.0f; /* NaN: any finite value (the result is x) */
    const float kf = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln2): 1.5 * 2^23 shifts */
    const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t k = (int32_t)kf, k1 = k / 2; /* 2^k as 2^k1 2^(k - k1): both normal for k in [-126, 128] */
    union {
        int32_t i;
        float f;
    } s1, s2;
    s1.i = (k1 + 127) << 23;
    s2.i = (k - k1 + 127) << 23;
    float y = p * s1.f * s2.f;
    y = x < lo ? 0.0f : y;
    y = x > hi ? INFINITY : y;
    return x != x ? x : y;
}

/* One query row of causal attention over n keys: p[n] gets the softmax
 * probabilities, o[hd] the weighted values.  k, v rows are `stride` floats
 * apart (nkv * hd), starting at this kv head. */
void ql_attention_row(float *o, float *p, const float *qt, const float *k, const float *v, int64_t n, int64_t stride,
                      int hd, float scale);

/* y[T, out] = x[T, in] * w[out, in]^T (+ y if accumulate), through OpenBLAS
 * (ops_blas.h: bit-reproducible for a given thread count) */
void ql_matmul_nt(float *y, const float *x, const float *w, int64_t T, int64_t in, int64_t out, int accumulate);
/* The same product as plain C loops (ql_dot per element, each summed by one
 * thread: identical for any thread count), the reference the BLAS path is
 * checked against. */
void ql_matmul_nt_ref(float *y, const float *x, const float *w, int64_t T, int64_t in, int64_t out, int accumulate);
/* out[T, C] = x / rms(x) * weight; rstd[T] = 1 / rms (may be NULL); out may alias x */
void ql_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int64_t T, int64_t C,
                        float eps);
/* Rotary embedding in place on x[T, nheads, hd] for positions pos0..pos0+T-1,
 * rotating halves (x[:hd/2], x[hd/2:]) as transformers' rotate_half does:
 * angle (float)pos * inv_freq[i], cos and sin times attn_scale.  inv_freq[hd/2]
 * is a host array (ql_rope_inv_freq, core/rope.h). */
void ql_rope_forward(float *x, int64_t T, int nheads, int hd, int pos0, const float *inv_freq, float attn_scale);
/* Causal grouped-query attention for T new positions after `past` cached
 * ones: q[T, nh, hd]; k, v caches [past+T, nkv, hd]; out[T, nh, hd].
 * window > 0 bands it: the query at position i sees keys j with
 * i - window < j <= i (transformers' sliding window); 0 is full causal. */
/* Per (head, block of 32 query rows) as matrix products through OpenBLAS
 * (S = Q K^T, O = P V, keys in chunks of 512), softmax with ql_expf; no
 * allocation.  Bit-reproducible for any thread count on a given CPU. */
void ql_attention_forward(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
                          int nh, int nkv, int hd, int window);
/* The same as plain loops, one query row at a time (expf, sequential sums):
 * the reference the fast path is checked against. */
void ql_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
                              int nh, int nkv, int hd, int window);
/* out[n] = silu(gate[n]) * up[n] */
void ql_swiglu_forward(float *out, const float *gate, const float *up, int64_t n);
/* x[n] += y[n] */
void ql_add_inplace(float *x, const float *y, int64_t n);
/* log(sum_i exp(x_i)) of x[V] in double; e[V] (may be NULL, may alias x) gets
 * exp(x_i - max x) in float (ql_expf), *sum_e (may be NULL) their sum.  The exponentials are summed in eight
 * float lanes over blocks of 256, each block added into a double: a fixed
 * order, and within about 1e-6 relative of the exact sum. */
double ql_log_sum_exp(float *e, double *sum_e, const float *x, int64_t V);
/* log-sum-exp of logits[V] minus logits[target]: the token's negative log-likelihood */
double ql_token_nll(const float *logits, int64_t V, int32_t target);

#endif
