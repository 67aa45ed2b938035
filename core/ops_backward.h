/* CPU reference backward operators for LoRA training through a frozen LLaMA
 * (internal).  Paired with ops.h: outputs first, gradients prefixed `d`,
 * shapes in comments.
 *
 * Conventions
 * - Input gradients (dx of matmul, rmsnorm, dropout, LoRA) take `accumulate`
 *   like ql_matmul_nt: 0 writes dx, 1 adds to it (residual streams, a tensor
 *   read by several linears).
 * - Parameter gradients (rmsnorm dweight, LoRA dA/dB, ql_matmul_backward_weight
 *   with accumulate = 1) add, so micro-batches accumulate; the caller zeroes them
 *   once per optimizer step.
 * - The matrix products (matmul backward, LoRA) run through OpenBLAS: bitwise
 *   identical for a given thread count (ops_blas.h), and checked against the
 *   plain C *_ref loops.  In everything else each output element is summed by
 *   one thread in a fixed order, so results are bitwise identical for any
 *   OpenMP thread count.
 * - Nothing here allocates; scratch buffers are parameters.
 *
 * Training forward for one layer (past == 0), keeping what backward reads:
 *   ql_rmsnorm_forward(xn, rstd, x, ...)          keep x, rstd, xn
 *   ql_matmul_nt(q, xn, Wq, ...); LoRA: ql_dropout_forward(xd, mask, xn, ...),
 *     ql_lora_forward(q, h, xd, A, B, ...)        keep xd, h, mask (or seed)
 *   ql_rope_forward(q), ql_rope_forward(k)        keep the rotated q, k
 *   ql_attention_forward_train(att, probs, q, k, v, ...)      keep probs
 *   the gate pre-activation must be kept: do not run swiglu in place on it.
 */
#ifndef QL_OPS_BACKWARD_H
#define QL_OPS_BACKWARD_H

#include <stdint.h>

#define QL_IGNORE_INDEX (-100) /* target id that contributes no loss (transformers' convention) */

/* ---- linear ---- */

/* Backward of y[T, out] = x[T, in] * w[out, in]^T (ql_matmul_nt), w frozen:
 * dx[T, in] (+)= dy[T, out] * w[out, in] */
void ql_matmul_backward_input(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out,
                              int accumulate);
/* dw[out, in] (+)= dy[T, out]^T * x[T, in]  (for trainable matrices such as LoRA A, B) */
void ql_matmul_backward_weight(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out,
                               int accumulate);

/* The same as plain C loops, each element summed by one thread (identical for
 * any thread count): the references of the two above. */
void ql_matmul_backward_input_ref(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out,
                                  int accumulate);
void ql_matmul_backward_weight_ref(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out,
                                   int accumulate);

/* ---- LoRA: y = x w^T + scale * (xd a^T) b^T, xd = dropout(x) ---- */

/* h[T, r] = xd[T, in] * a[r, in]^T;  y[T, out] += scale * h * b[out, r]^T
 * (y already holds the frozen path x w^T) */
void ql_lora_forward(float *y, float *h, const float *xd, const float *a, const float *b, int64_t T, int64_t in,
                     int64_t out, int64_t r, float scale);
/* dh[T, r] = scale * dy * b (scratch, left holding that);  db[out, r] += scale * dy^T h;
 * da[r, in] += dh^T xd;  dxd[T, in] (+)= dh * a  (dxd may be NULL).
 * dxd is the gradient for the dropped input: pass it through ql_dropout_backward
 * (with accumulate = 1 onto the frozen path's dx) when dropout is on. */
void ql_lora_backward(float *dxd, float *da, float *db, float *dh, const float *dy, const float *xd, const float *h,
                      const float *a, const float *b, int64_t T, int64_t in, int64_t out, int64_t r, float scale,
                      int accumulate);

/* Plain C references of the two above. */
void ql_lora_forward_ref(float *y, float *h, const float *xd, const float *a, const float *b, int64_t T, int64_t in,
                         int64_t out, int64_t r, float scale);
void ql_lora_backward_ref(float *dxd, float *da, float *db, float *dh, const float *dy, const float *xd, const float *h,
                          const float *a, const float *b, int64_t T, int64_t in, int64_t out, int64_t r, float scale,
                          int accumulate);

/* y[T, out] += scale * h[T, r] b[out, r]^T: the second product of ql_lora_forward */
void ql_lora_up(float *y, const float *h, const float *b, int64_t T, int64_t out, int64_t r, float scale);
/* The products ql_lora_backward is made of (OpenBLAS, or the fixed-order
 * loops where it does not fit): dx[T, in] (+)= alpha dy[T, out] w[out, in];
 * dw[out, in] (+)= alpha dy[T, out]^T x[T, in]. */
void ql_gemm_nn(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out, float alpha,
                int accumulate);
void ql_gemm_tn(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out, float alpha,
                int accumulate);

/* ---- normalization, position, attention, MLP ---- */

/* Backward of ql_rmsnorm_forward (out = weight * x * rstd) with its rstd[T]:
 * dx[T, C] (+)= d/dx; dweight[C] += sum_t dy * x * rstd when dweight != NULL. */
void ql_rmsnorm_backward(float *dx, float *dweight, const float *dy, const float *x, const float *weight,
                         const float *rstd, int64_t T, int64_t C, int accumulate);

/* Backward of ql_rope_forward, in place on dx[T, nheads, hd] (the inverse
 * rotation, same angles as the forward). */
void ql_rope_backward(float *dx, int64_t T, int nheads, int hd, int pos0, const float *inv_freq, float attn_scale);

/* ql_attention_forward for a training sequence (past == 0) that also keeps the
 * softmax probabilities: q[T, nh, hd]; k, v[T, nkv, hd]; out[T, nh, hd];
 * probs[nh, T, T] (row t holds keys s0..t, s0 = max(0, t - window + 1) when
 * window > 0, else 0; zeros elsewhere).  out is bitwise equal to
 * ql_attention_forward's with the same window. */
void ql_attention_forward_train(float *out, float *probs, const float *q, const float *k, const float *v, int64_t T,
                                int nh, int nkv, int hd, int window);
/* Causal (banded when window > 0) GQA backward: dq[T, nh, hd], dk, dv[T, nkv, hd]
 * written (dk/dv sum over the nh/nkv query heads sharing a kv head);
 * dscores[nh, T, T] is scratch and is left holding the gradient of the scaled
 * pre-softmax scores (zero outside the band).  q, k are the rotated values the
 * forward consumed; window as the forward's. */
void ql_attention_backward(float *dq, float *dk, float *dv, float *dscores, const float *dout, const float *q,
                           const float *k, const float *v, const float *probs, int64_t T, int nh, int nkv, int hd,
                           int window);
/* The plain-loop references of the two above (one query row, or one key row,
 * at a time): the fast paths (sgemm per head and row block, see ops_cpu.c and
 * ops_cpu_backward.c) are checked against them.  forward_train_ref's out is
 * bitwise ql_attention_forward_ref's. */
void ql_attention_forward_train_ref(float *out, float *probs, const float *q, const float *k, const float *v,
                                    int64_t T, int nh, int nkv, int hd, int window);
void ql_attention_backward_ref(float *dq, float *dk, float *dv, float *dscores, const float *dout, const float *q,
                               const float *k, const float *v, const float *probs, int64_t T, int nh, int nkv, int hd,
                               int window);

/* Backward of out = silu(gate) * up: dgate[n], dup[n] written.  Elementwise:
 * any output may alias any input. */
void ql_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n);

/* ---- loss ---- */

/* Token cross-entropy over logits[T, V] with targets[T]; rows whose target is
 * ignore_index count nothing (loss 0, zero gradient row).  Returns the sum of
 * the rows' losses (in double, summed in row order of the float losses), NAN
 * when a target is neither ignore_index nor in [0, V).  losses[T] (may be NULL)
 * gets each row's loss; dlogits[T, V] (may be NULL) = scale * (softmax - onehot),
 * e.g. scale = 1 / ql_count_targets(...) for the mean.  dlogits may alias logits. */
double ql_cross_entropy_forward_backward(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                                         int64_t T, int64_t V, int32_t ignore_index, float scale);
/* Number of targets[T] that are not ignore_index. */
int64_t ql_count_targets(const int32_t *targets, int64_t T, int32_t ignore_index);

/* ---- dropout (LoRA input dropout) ---- */

/* splitmix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, then the
 * output is the mixed state.  Use it to derive per-step / per-layer seeds. */
uint64_t ql_splitmix64_next(uint64_t *state);
/* Uniform in [0, bound) from the stream: draws below 2^64 mod bound rejected, then reduced. */
uint64_t ql_uniform_below(uint64_t *state, uint64_t bound);
/* Inverted dropout: element i is kept iff u_i >= p, where u_i is a 16-bit
 * uniform / 2^16: of z = the (i/4)-th (0-based) output of a splitmix64 stream
 * whose state starts at seed, i.e. mix(seed + (i/4 + 1) * 0x9E3779B97F4A7C15),
 * element i takes bits 48 - 16 (i % 4) and up (four elements a hash: the GPU
 * makes masks at memory speed).  p is thus used to 2^-16.  Counter-based, so the mask is
 * a function of (seed, i) only: independent of threads, and re-creatable in
 * backward from the seed.  out[n] = keep ? x / (1 - p) : 0; mask[n] (may be NULL)
 * = keep.  p <= 0 copies; p >= 1 zeroes.  out may alias x. */
void ql_dropout_forward(float *out, uint8_t *mask, const float *x, int64_t n, float p, uint64_t seed);
/* dx[n] (+)= keep ? dout / (1 - p) : 0, keep read from mask, or regenerated
 * from seed when mask is NULL.  dx may alias dout when accumulate == 0. */
void ql_dropout_backward(float *dx, const float *dout, const uint8_t *mask, int64_t n, float p, uint64_t seed,
                         int accumulate);

#endif
