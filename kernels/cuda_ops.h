/* Launchers of the engine's CUDA kernels (internal): the fp32 reference ops of
 * the CUDA backend (core/backend_cuda.c), each the device form of a CPU
 * operator of core/ops.h / ops_backward.h and tested against it
 * (tests/test_gpu.c).
 *
 * Every launcher queues its kernels on `stream` (a cudaStream_t) and returns
 * without waiting: 0, or the cudaError_t of a failed launch.  Pointers are
 * device memory.  Micro-batch ops take `len`, the device copy of the
 * micro-batch's lengths (ql_be_batch.len), and keep backend.h's masking rules.
 * The kernels are built with --fmad=false, so elementwise results are the CPU
 * operator's bits where both use the same float operations (ql_expf, dropout
 * masks, SwiGLU); reductions differ in order only. */
#ifndef QL_CUDA_OPS_H
#define QL_CUDA_OPS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int qlk_embedding(void *stream, float *out, const float *table, const int32_t *ids, const int32_t *len, int64_t B,
                  int64_t T, int64_t C);
/* the same from a bf16 table, widened */
int qlk_embedding_w16(void *stream, float *out, const uint16_t *table16, const int32_t *ids, const int32_t *len,
                      int64_t B, int64_t T, int64_t C);
/* x[n] rounded to bf16 in place; its bits into dst unless NULL */
int qlk_round_bf16(void *stream, uint16_t *dst, float *x, int64_t n);
int qlk_add_inplace(void *stream, float *x, const float *y, int64_t n);
int qlk_add_bias(void *stream, float *y, const float *bias, const int32_t *len, int64_t B, int64_t T, int64_t n);
int qlk_swiglu_forward(void *stream, float *out, const float *gate, const float *up, int64_t n);
int qlk_swiglu_backward(void *stream, float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, int64_t n);
/* forward (backward = 0): out = mask * x * inv (padded rows 0); backward:
 * dx (+)= mask * dout * inv (padded rows left or zeroed).  keep_all / drop_all
 * are the p <= 0 and p >= 1 cases of ql_dropout_forward/backward. */
int qlk_dropout(void *stream, float *out, const float *in, const int32_t *len, const uint64_t *seeds, int64_t B,
                int64_t T, int64_t C, float p, float inv, int backward, int accumulate);
/* the forward of qlk_dropout on x rounded to bf16, rounded to bf16 (nearest
 * even) into out16; x from in16 (bf16) when it is not NULL, else from in
 * (float32): the same bits either way */
int qlk_dropout16(void *stream, uint16_t *out16, const float *in, const uint16_t *in16, const int32_t *len,
                  const uint64_t *seeds, int64_t B, int64_t T, int64_t C, float p, float inv);
/* inverse = 0: rope_forward; 1: rope_backward.  inv_freq [B, hd/2]. */
int qlk_rope(void *stream, float *x, const int32_t *len, int64_t B, int64_t T, int nheads, int hd, int pos0,
             const float *inv_freq, float attn_scale, int inverse);
int qlk_rmsnorm_forward(void *stream, float *out, float *rstd, const float *x, const float *weight, int64_t rows,
                        int64_t C, float eps);
int qlk_rmsnorm_backward(void *stream, float *dx, float *dweight, const float *dy, const float *x,
                         const float *weight, const float *rstd, int64_t rows, int64_t C, int accumulate);
/* targets: device [rows]; losses: device [rows] */
int qlk_cross_entropy(void *stream, float *losses, float *dlogits, const float *logits, const int32_t *targets,
                      int64_t rows, int64_t V, int32_t ignore_index, float scale);
/* 1: generation calls of 8 rows or more on the tiled kernel; 0: one block a
 * row; -1: as QLK_ATT_GEN says (default off) */
void qlk_att_gen_tiled_set(int on);
int qlk_attention_forward(void *stream, float *out, const float *q, const float *k, const float *v, int64_t T,
                          int64_t past, int nh, int nkv, int hd, int window);
int qlk_attention_forward_train(void *stream, float *out, float *probs, const float *q, const float *k,
                                const float *v, const int32_t *len, int64_t B, int64_t T, int nh, int nkv, int hd,
                                int window);
int qlk_attention_backward(void *stream, float *dq, float *dk, float *dv, float *dscores, const float *dout,
                           const float *q, const float *k, const float *v, const float *probs, const int32_t *len,
                           int64_t B, int64_t T, int nh, int nkv, int hd, int window);

/* AdamW over n elements (ql_adamw_apply's arithmetic) */
int qlk_adamw(void *stream, float *params, float *m, float *v, const float *grads, int64_t n, float beta1, float beta2,
              float eps, float decay, float step_size, float bc2_sqrt);
int qlk_scale(void *stream, float *x, float c, int64_t n);
/* w[out, in] += sum over r in order of (b[o, r] scale) a[r, :], zero products
 * skipped: the CPU's lora_merge, element for element */
int qlk_lora_merge(void *stream, float *w, const float *a, const float *b, int64_t out, int64_t in, int64_t rank,
                   float scale);
/* *out (device) = sum of (double)x[i]^2; partials: device scratch of QLK_SUMSQ_PARTS doubles */
#define QLK_SUMSQ_PARTS 1024
int qlk_sum_squares(void *stream, double *out, double *partials, const float *x, int64_t n);

/* bf16 conversions: dst[n] = bf16(src) rounded to nearest even, and back */
int qlk_f32_to_bf16(void *stream, uint16_t *dst, const float *src, int64_t n);
int qlk_bf16_to_f32(void *stream, float *dst, const uint16_t *src, int64_t n);
/* One query tile of the bf16 attention: rows t0 .. t0+m-1 of a sequence,
 * keys k0 .. k0+kn-1 (query t sees band_start(t) .. t); s[nh, m, kn] the
 * scaled scores.  Forward: p16 = softmax (bf16), lse[h * ld_lse + t] = the
 * row's log-sum-exp.  Backward (dp[nh, m, kn] = dO V^T): P = exp(s - lse),
 * dS = P (dP - rowsum(P dP)); p16, ds16 their bf16 copies. */
int qlk_tile_softmax(void *stream, const float *s, uint16_t *p16, float *lse, int64_t ld_lse, int nh, int64_t t0,
                     int64_t m, int64_t k0, int64_t kn, int window);
int qlk_tile_softmax_backward(void *stream, const float *s, const float *dp, uint16_t *p16, uint16_t *ds16,
                              const float *lse, int64_t ld_lse, int nh, int64_t t0, int64_t m, int64_t k0, int64_t kn,
                              int window);
/* The fused bf16 training attention (ops_flash_attention.cu): 1 when head
 * size hd has a kernel and the device can run it (sm_80 or newer).  Operands
 * are bf16 [B*T, heads, hd]; lse [B, nh, T] as qlk_tile_softmax writes it.
 * Backward: D is scratch of B*nh*T floats, dout and out the float32 output
 * gradient and forward output (for rowsum(dO O)), dout16 its bf16 copy. */
int qlk_flash_supported(int hd);
int qlk_flash_forward(void *stream, float *out, float *lse, const uint16_t *q16, const uint16_t *k16,
                      const uint16_t *v16, const int32_t *len, int64_t B, int64_t T, int nh, int nkv, int hd,
                      int window);
int qlk_flash_backward(void *stream, float *dq, float *dk, float *dv, float *D, const float *dout, const float *out,
                       const uint16_t *q16, const uint16_t *k16, const uint16_t *v16, const uint16_t *dout16,
                       const float *lse, const int32_t *len, int64_t B, int64_t T, int nh, int nkv, int hd,
                       int window);

#ifdef __cplusplus
}
#endif

#endif
