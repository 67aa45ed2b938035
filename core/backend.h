/* The compute backend (internal).  Every operator of the forward and backward
 * passes, and the buffers they work on, go through this table, so a GPU
 * implementation fills it in op by op and the model, LoRA and trainer code
 * stay as they are.
 *
 * Context.  Ops run on a ql_be_ctx: the backend's table, its private state
 * (`impl`: for CUDA the stream, cuBLASLt handle and workspace; NULL on the
 * CPU) and a sticky status.
 *
 * Status rule (one for every op).  Every table entry returns QL_OK or an
 * error code, and reports its message with ql_error.  Nobody calls the table
 * directly: callers go through ql_be(ctx, op, args...), which
 *   - when ctx already holds an error, skips the op and returns that code;
 *   - otherwise runs the op and, when it fails, records its code and message
 *     in ctx (the first failure only) and returns the code.
 * So a run of ops may go unchecked: after a failure the later ops are no-ops,
 * and ql_be_check(ctx) at the end (or before reading results on the host)
 * returns the first failure, with its message restored through ql_error,
 * and clears it.  An asynchronous backend may report a failure at a later op
 * or at ql_be_check; it never loses one.
 *
 * Memory.  Buffer pointers are the backend's memory (host memory for the CPU
 * backend, device memory for a CUDA one).  Arguments documented as "host"
 * (token ids, targets, lengths, seeds, per-row losses) are host arrays.
 * Nothing in a training step allocates: buffers come from a memory plan
 * (plan.h) made once.  Ops that need scratch take it as a parameter, except
 * the generation op attention_forward (per call, a few rows).
 *
 * Micro-batches.  Training ops work on whole micro-batches of B sequences
 * padded on the right to T positions: activations are [B*T, C] row-major,
 * row b*T + t being position t of sequence b, valid iff t < len[b]
 * (ql_be_batch.len, host, 0 <= len[b] <= T).  Padded rows of the residual
 * stream are zero: ops marked "masked" write zeros there (and ignore what
 * their inputs hold there); row-wise ops map zero rows to zero rows
 * (rmsnorm, matmul, LoRA, SwiGLU, add; the training step adds linear biases
 * to valid rows only), and anything a row-wise op produces in a padded row of
 * an intermediate is ignored by the next masked op.  So
 * padded rows carry no loss and no gradient, and sums over rows (LoRA
 * gradients) get exact zeros from them.
 *
 * Accumulation.  Ops with an `accumulate` flag write (0) or add to (1) their
 * first output; LoRA parameter gradients (da, db) always add.
 *
 * Precision (ctx->precision).  QL_PREC_FP32: every op in float32.
 * QL_PREC_BF16, the GPU's fast mode: the frozen linears' and the output
 * layer's products (matmul_nt, matmul_backward_input and their _w16 forms)
 * round both operands to bfloat16 (nearest even) and accumulate in float32,
 * as tensor cores do; on CUDA the training attention also multiplies
 * bf16-rounded q, k, v and probabilities (float32 softmax and sums), while the
 * CPU keeps attention in float32.  The LoRA products round their operands
 * too, on both backends: the (dropped) input (x rounded to bf16 before the
 * dropout, the dropped value rounded again), A, h and B forward; dy, B, h,
 * the dropped input, dh and A backward, with float32 sums and float32 h, dh
 * and gradients (the master weights stay float32).  The residual stream is rounded to bfloat16 at every layer
 * boundary (the embedding output and each decoder layer's output, as a bf16
 * model holds it), so a layer input kept for gradient checkpointing is
 * stored in bf16 and widened back without changing a bit; the embedding
 * table is then read in bf16 too (embedding_w16).  Norms, RoPE, SwiGLU, the
 * loss and every other activation stay float32.  Ops that round need
 * ql_be_scratch_bytes() of ctx->scratch (backend memory, from the plan). */
#ifndef QL_BACKEND_H
#define QL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "qlora/llama.h"
#include "qlora/lora.h"

typedef struct ql_be_ctx ql_be_ctx;

/* The shape of a micro-batch: B sequences right-padded to T rows each. */
typedef struct ql_be_batch {
    int64_t B, T;
    const int32_t *len; /* host [B], 0 <= len[b] <= T */
} ql_be_batch;

/* Dropout of a LoRA input inside the LoRA ops (lora_forward, lora_backward):
 * the mask of dropout_forward for mb and seeds, made in `scratch` (backend
 * memory of rows * in * 4 bytes, overwritten). */
typedef struct ql_be_dropout {
    float p;               /* in (0, 1): active; 0: none */
    const ql_be_batch *mb; /* rows = mb->B * mb->T */
    const uint64_t *seeds; /* host [mb->B] */
    void *scratch;
} ql_be_dropout;

/* 1 when dr asks for dropout (the LoRA ops' test) */
static inline int ql_be_dropping(const ql_be_dropout *dr) { return dr && dr->p > 0; }

typedef struct ql_backend {
    const char *name;
    /* 1 when the backend's memory is host memory (the CPU): the model's host
     * arrays serve as backend buffers as they are.  0 (CUDA): the model's
     * weights and the LoRA parameters get backend copies (lora_model.c). */
    int host_memory;
    /* 1 (CUDA): in bf16 precision the training attention keeps, in `probs`,
     * only each row's log-sum-exp [B, nh, T] and the backward recomputes the
     * probabilities a tile of ql_be_att_tile() query rows at a time in the
     * scratch; `dscores` is then unused (ql_be_attention_floats sizes both). */
    int attention_lse;
    /* 1 when that bf16 attention with head size hd runs fused (CUDA, flash
     * style: no tile of scores in memory; ql_be_att_fused); NULL: never */
    int (*fused_attention)(int hd);
    /* ---- context ---- */
    int (*open)(ql_be_ctx *ctx);   /* fill ctx->impl (stream, handles); may be NULL */
    void (*close)(ql_be_ctx *ctx); /* release ctx->impl; may be NULL */
    int (*sync)(ql_be_ctx *ctx);   /* wait for queued work (both queues); report its first failure */
    /* Four queues: ctx->queue 0 is the main one, 1 a side one for work that
     * may overlap it (the next weights' materialize), 2 one for copies
     * between pinned host memory and the device that overlap both (offloaded
     * activations and gradients), 3 the paged optimizer's (its moments in
     * and out, its updates) while the next step computes; the CPU runs every
     * op at once.  event(ctx, slot, 0) records event `slot` (0 ..
     * QL_BE_EVENTS-1) on the current queue; event(ctx, slot, 1) makes the
     * current queue wait for the last record of `slot` (none yet: no wait).
     * Only materialize and event may run on the side queue; only upload,
     * download_async, zero and event on the copy one; those and scale and
     * adamw on the optimizer's. */
    int (*event)(ql_be_ctx *ctx, int slot, int wait);

    /* ---- memory ---- */
    int (*alloc)(ql_be_ctx *ctx, void **out, size_t bytes); /* QL_ENOMEM (with the size) when it cannot */
    void (*free)(ql_be_ctx *ctx, void *p);                  /* NULL is fine; never fails */
    int (*zero)(ql_be_ctx *ctx, void *p, size_t bytes);
    int (*copy)(ql_be_ctx *ctx, void *dst, const void *src, size_t bytes);          /* backend to backend */
    int (*upload)(ql_be_ctx *ctx, void *dst, const void *host_src, size_t bytes);   /* host to backend */
    int (*download)(ql_be_ctx *ctx, void *host_dst, const void *src, size_t bytes); /* backend to host; syncs */
    /* backend to host, queued: host_dst holds the bytes after the next sync
     * (ql_be_check); fast when host_dst is pinned */
    int (*download_async)(ql_be_ctx *ctx, void *host_dst, const void *src, size_t bytes);
    /* page-lock host memory for fast, queued copies (cudaHostRegister), and
     * release it; the CPU does nothing */
    int (*pin)(ql_be_ctx *ctx, void *host, size_t bytes);
    void (*unpin)(ql_be_ctx *ctx, void *host);
    /* *dev = where ops read pinned host memory `host` in place (CUDA: its
     * mapped device address, reads cross the bus; the CPU: host itself) */
    int (*mapped)(ql_be_ctx *ctx, const void *host, const void **dev);

    /* Weights of a quantized linear layer as dense float32 w[out, in] in
     * backend memory (w is scratch from the plan, nothing is kept).  dev_bufs:
     * the backend copies of the plugin's state buffers (ABI 1.1
     * device_buffers, in its order) with `workspace` of the plugin's
     * device_workspace(out) bytes, or NULL where the plugin has no device
     * materialize: the weights are then materialized on the host into
     * host_scratch [out * in] and copied over (the slow path).  dtype:
     * QL_DTYPE_F32 (float w[out, in]) or QL_DTYPE_BF16 (uint16_t bits; then
     * host_scratch has out * in * 6 bytes: float32 weights and their bf16
     * bits, for plugins that materialize F32 only). */
    int (*materialize)(ql_be_ctx *ctx, void *w, int32_t dtype, const ql_linear *l, const void *const *dev_bufs,
                       void *workspace, uint64_t workspace_bytes, float *host_scratch);

    /* ---- forward ---- */
    /* masked: out[B*T, C] row (b, t) = table[ids[b*T + t]] for valid rows, 0
     * for padded ones (their ids are not read).  ids: host [B*T]. */
    int (*embedding)(ql_be_ctx *ctx, float *out, const float *table, const int32_t *ids, const ql_be_batch *mb,
                     int64_t C);
    /* embedding from a bf16 table16[vocab, C] (bf16 precision: the table is
     * kept in bfloat16), widened to float32; masked as embedding */
    int (*embedding_w16)(ql_be_ctx *ctx, float *out, const uint16_t *table16, const int32_t *ids,
                         const ql_be_batch *mb, int64_t C);
    /* bf16 precision's layer boundary: x[n] rounded to bfloat16 (nearest
     * even) in place, and its bits into dst[n] unless dst is NULL */
    int (*round_bf16)(ql_be_ctx *ctx, uint16_t *dst, float *x, int64_t n);
    /* dst[n] = the float32 values of bf16 bits src[n] */
    int (*widen_bf16)(ql_be_ctx *ctx, float *dst, const uint16_t *src, int64_t n);
    /* y[rows, out] (+)= x[rows, in] w[out, in]^T */
    int (*matmul_nt)(ql_be_ctx *ctx, float *y, const float *x, const float *w, int64_t rows, int64_t in, int64_t out,
                     int accumulate);
    /* the same two products with bfloat16 weights w16[out, in] (materialized
     * as QL_DTYPE_BF16, or a bf16 copy of dense weights) */
    int (*matmul_nt_w16)(ql_be_ctx *ctx, float *y, const float *x, const uint16_t *w16, int64_t rows, int64_t in,
                         int64_t out, int accumulate);
    int (*matmul_backward_input_w16)(ql_be_ctx *ctx, float *dx, const float *dy, const uint16_t *w16, int64_t rows,
                                     int64_t in, int64_t out, int accumulate);
    /* out[rows, C] = x / rms(x) * weight; rstd[rows] = 1 / rms (may be NULL) */
    int (*rmsnorm_forward)(ql_be_ctx *ctx, float *out, float *rstd, const float *x, const float *weight, int64_t rows,
                           int64_t C, float eps);
    /* masked (padded rows untouched): rotary embedding in place on x[B*T,
     * nheads, hd]; row (b, t) at position pos0 + t, halves rotated as
     * transformers' rotate_half: angle (float)pos * inv_freq[b, i], cos and
     * sin times attn_scale.  inv_freq: host [B, hd/2], sequence b's table
     * (ql_llama_rope for its own length: dynamic RoPE differs per sequence). */
    int (*rope_forward)(ql_be_ctx *ctx, float *x, const ql_be_batch *mb, int nheads, int hd, int pos0,
                        const float *inv_freq, float attn_scale);
    /* Generation (one sequence, KV cache): causal GQA for T new rows after
     * `past` cached ones: q[T, nh, hd]; k, v caches [past+T, nkv, hd]; out[T,
     * nh, hd].  window > 0 bands it: the query at position i sees keys j with
     * i - window < j <= i (transformers' sliding window); 0 is full causal. */
    int (*attention_forward)(ql_be_ctx *ctx, float *out, const float *q, const float *k, const float *v, int64_t T,
                             int64_t past, int nh, int nkv, int hd, int window);
    /* masked, training: causal (banded when window > 0, as attention_forward)
     * GQA of each sequence over its own valid rows: q[B*T, nh, hd]; k, v[B*T,
     * nkv, hd]; out[B*T, nh, hd] (padded rows 0); probs[B, nh, T, T] kept for
     * backward: sequence b's block holds, in its first nh*len[b]*len[b]
     * floats, the [nh, len, len] probabilities (row t holds keys s0..t, s0 =
     * max(0, t - window + 1) when window > 0, else 0; zeros elsewhere); the
     * rest is unspecified. */
    int (*attention_forward_train)(ql_be_ctx *ctx, float *out, float *probs, const float *q, const float *k,
                                   const float *v, const ql_be_batch *mb, int nh, int nkv, int hd, int window);
    /* out[n] = silu(gate[n]) * up[n]; out may alias gate or up */
    int (*swiglu_forward)(ql_be_ctx *ctx, float *out, const float *gate, const float *up, int64_t n);
    /* x[n] += y[n] */
    int (*add_inplace)(ql_be_ctx *ctx, float *x, const float *y, int64_t n);
    /* masked (padded rows untouched): y[B*T, n] row (b, t) += bias[n] for valid rows */
    int (*add_bias)(ql_be_ctx *ctx, float *y, const float *bias, const ql_be_batch *mb, int64_t n);
    /* LoRA on input x[rows, in]: xd = x, or with dropout (dr not NULL and
     * dr->p > 0) dropout_forward's output for dr's batch and seeds (rows =
     * B*T), made in dr->scratch (not kept); h[rows, r] = xd a[r, in]^T;
     * y[rows, out] += scale * h b[out, r]^T */
    int (*lora_forward)(ql_be_ctx *ctx, float *y, float *h, const float *x, const ql_be_dropout *dr, const float *a,
                        const float *b, int64_t rows, int64_t in, int64_t out, int64_t r, float scale);
    /* masked: inverted dropout of x[B*T, C] into out (may alias x).  Sequence
     * b's valid rows get exactly the mask ql_dropout_forward gives for its
     * len[b]*C elements and seed seeds[b] (host [B]); padded rows get 0. */
    int (*dropout_forward)(ql_be_ctx *ctx, float *out, const float *x, const ql_be_batch *mb, int64_t C, float p,
                           const uint64_t *seeds);

    /* ---- backward ---- */
    /* dx[rows, in] (+)= dy[rows, out] w[out, in] */
    int (*matmul_backward_input)(ql_be_ctx *ctx, float *dx, const float *dy, const float *w, int64_t rows, int64_t in,
                                 int64_t out, int accumulate);
    /* dx[rows, C] (+)= d/dx of rmsnorm_forward (with its rstd); dweight[C] += sum
     * over rows when not NULL */
    int (*rmsnorm_backward)(ql_be_ctx *ctx, float *dx, float *dweight, const float *dy, const float *x,
                            const float *weight, const float *rstd, int64_t rows, int64_t C, int accumulate);
    /* masked (padded rows untouched): the inverse rotation of rope_forward
     * (same inv_freq and attn_scale), in place */
    int (*rope_backward)(ql_be_ctx *ctx, float *dx, const ql_be_batch *mb, int nheads, int hd, int pos0,
                         const float *inv_freq, float attn_scale);
    /* masked: backward of attention_forward_train (same window).  dq[B*T, nh,
     * hd], dk, dv[B*T, nkv, hd] written (padded rows 0); dscores[B, nh, T, T]
     * is scratch laid out as probs.  q, k are the rotated values the forward
     * consumed; out is the forward's output (the fused attention takes
     * rowsum(P dP) as dout . out; the others do not read it). */
    int (*attention_backward)(ql_be_ctx *ctx, float *dq, float *dk, float *dv, float *dscores, const float *dout,
                              const float *out, const float *q, const float *k, const float *v, const float *probs,
                              const ql_be_batch *mb, int nh, int nkv, int hd, int window);
    /* dgate[n], dup[n] of out = silu(gate) * up; outputs may alias inputs */
    int (*swiglu_backward)(ql_be_ctx *ctx, float *dgate, float *dup, const float *dout, const float *gate,
                           const float *up, int64_t n);
    /* Backward of lora_forward (same x and dr; dr->scratch is used again):
     * dh[rows, r] = scale * dy b (scratch); db[out, r] += scale * dy^T h;
     * da[r, in] += dh^T xd; dx[rows, in] (+)= the gradient through xd: dh a,
     * times dropout_backward's mask and 1 / (1 - p) with dropout (dx may be
     * NULL).  The sums over rows run in row order, so a zero row adds exact
     * zeros. */
    int (*lora_backward)(ql_be_ctx *ctx, float *dx, float *da, float *db, float *dh, const float *dy, const float *x,
                         const ql_be_dropout *dr, const float *h, const float *a, const float *b, int64_t rows,
                         int64_t in, int64_t out, int64_t r, float scale, int accumulate);
    /* masked: dx[B*T, C] (+)= the dropout_forward mask (same seeds) times
     * dout / (1 - p); padded rows of dx are left (accumulate) or zeroed. */
    int (*dropout_backward)(ql_be_ctx *ctx, float *dx, const float *dout, const ql_be_batch *mb, int64_t C, float p,
                            const uint64_t *seeds, int accumulate);

    /* ---- optimizer (the LoRA parameters, flat arrays of n) ---- */
    /* *out (host) = sum of (double)x[i]^2: a synchronization point */
    int (*sum_squares)(ql_be_ctx *ctx, double *out, const float *x, int64_t n);
    /* *out (backend memory) = sum of (double)x[i]^2, queued; partials:
     * backend scratch of QL_BE_SUMSQ_PARTS doubles (unused on the CPU) */
    int (*sum_squares_into)(ql_be_ctx *ctx, double *out, double *partials, const float *x, int64_t n);
    /* x[n] *= c */
    int (*scale)(ql_be_ctx *ctx, float *x, float c, int64_t n);
    /* One AdamW step as ql_adamw_update computes it (lora.c), with its
     * per-step scalars h from ql_adamw_scalars: the same float operations, so
     * the same bits on every backend. */
    int (*adamw)(ql_be_ctx *ctx, float *params, float *m, float *v, const float *grads, int64_t n,
                 const ql_adamw_scalars *h);

    /* ---- merging an adapter into its base (qlora merge) ---- */
    /* w[out, in] += for each row o, for r = 0..rank-1 in order, (b[o, r] *
     * scale) * a[r, :], a product that is 0 skipped: float32 without
     * contraction, each element's sum in that order, so the same bits on
     * every backend */
    int (*lora_merge)(ql_be_ctx *ctx, float *w, const float *a, const float *b, int64_t out, int64_t in, int64_t rank,
                      float scale);

    /* ---- loss ---- */
    /* Token cross-entropy over logits[rows, V] with host targets[rows]: rows
     * whose target is ignore_index count nothing (loss 0, zero gradient row).
     * losses: host [rows], each row's loss (a synchronization point);
     * dlogits[rows, V] (may be NULL, may alias logits) = scale * (softmax -
     * onehot).  A target neither ignore_index nor in [0, V) is QL_EINVAL. */
    int (*cross_entropy)(ql_be_ctx *ctx, float *losses, float *dlogits, const float *logits, const int32_t *targets,
                         int64_t rows, int64_t V, int32_t ignore_index, float scale);
} ql_backend;

enum { QL_PREC_FP32 = 0, QL_PREC_BF16 = 1 };
enum { QL_BE_EVENTS = 144, QL_BE_SUMSQ_PARTS = 1024 };

struct ql_be_ctx {
    const ql_backend *be;
    void *impl;         /* the backend's state (stream, handles, workspace); NULL on the CPU */
    int precision;      /* QL_PREC_FP32 (the default) or QL_PREC_BF16 */
    void *scratch;      /* backend memory for the rounded operands (ql_be_scratch_bytes), set by its owner */
    /* a one-shot hint for the next bf16 product (matmul_nt_w16 and the
     * like, lora_forward's x, lora_backward's dy): its activation is the
     * previous product's, unchanged since, so a backend may reuse its rounded
     * copy (CUDA does when nothing else used the scratch in between).  Every
     * product clears it. */
    int reuse_x;
    int queue; /* 0: ops go to the main queue (the default), 1: to the side one, 2: the copy one, 3: the optimizer's */
    size_t scratch_bytes;
    int status;         /* QL_OK, or the code of the first failed op not yet checked */
    char message[1024]; /* that failure's message */
};

/* Query rows of one tile of the bf16 attention (attention_lse): at most
 * QL_BE_ATT_TILE, halved (down to 16) while a tile's scores [nh, tile, T]
 * would exceed ql_be_att_budget elements (QL_BE_ATT_BUDGET unless a test
 * sets another with ql_be_att_budget_set), and at most T. */
#define QL_BE_ATT_TILE 256
#define QL_BE_ATT_BUDGET ((int64_t)16 << 20)
int64_t ql_be_att_tile(int64_t T, int nh);
void ql_be_att_budget_set(int64_t elements); /* <= 0: QL_BE_ATT_BUDGET */
/* 1 when backend be runs the bf16 training attention of head size hd fused
 * (be->fused_attention), unless a test or benchmark turned fusion off with
 * ql_be_att_fused_set(0) (then the tiled path; 1 restores the default).
 * Set it before the plan sizes the scratch: the tiled path needs more. */
int ql_be_att_fused(const ql_backend *be, int hd);
void ql_be_att_fused_set(int on);

/* Floats of `probs` (which = 0) or `dscores` (which = 1) that the training
 * attention of backend be needs under `precision`. */
int64_t ql_be_attention_floats(const ql_backend *be, int precision, int which, int64_t B, int64_t T, int nh);

/* Scratch that ops of backend be (NULL: the CPU's, the larger) need under
 * `precision` for products of at most `rows`
 * rows by [out, in] weights (max_in, max_out the largest in and out, max_w
 * the largest out * in), and training attention of `B` sequences of `T`
 * positions with nh query and nkv key/value heads of hd, and LoRA products of
 * rank lora_r (0: none).  0 in float32. */
size_t ql_be_scratch_bytes(const ql_backend *be, int precision, int64_t rows, int64_t max_in, int64_t max_out,
                           int64_t max_w, int64_t T, int nh, int nkv, int hd, int64_t lora_r);

/* A quantized linear's weights on the host as bf16 bits w16[out, in]: the
 * plugin's own BF16 materialize, or, where it gives only F32 (QL_ENOTSUP),
 * its F32 weights in f32 [out * in] (scratch) rounded to nearest even. */
int ql_linear_weights_bf16(const ql_linear *l, uint16_t *w16, float *f32);

/* bfloat16 bits of x, rounded to nearest even (NaN stays a quiet NaN) */
static inline uint16_t ql_be_bf16(float x)
{
    union {
        float f;
        uint32_t u;
    } v;
    v.f = x;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float ql_be_bf16_float(uint16_t b)
{
    union {
        float f;
        uint32_t u;
    } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}

/* ---- registry ---- */

/* The backend called `name`: "cpu" (always built), "cuda" (when built and a
 * device is present).  Unknown or unavailable names are an error saying why. */
int ql_backend_find(const char *name, const ql_backend **out);
/* The plain C reference backend (OpenMP loops). */
const ql_backend *ql_backend_cpu(void);
/* The CUDA backend (backend_cuda.c) on the current device, or NULL with an
 * error saying why (built without CUDA, no device, driver too old). */
const ql_backend *ql_backend_cuda(void);
/* "cuda" when the CUDA backend is available, else "cpu": what --device auto means. */
const char *ql_backend_default(void);

/* Open a context on backend `name` (ql_backend_find), or on `be` when given. */
int ql_be_ctx_open(const char *name, const ql_backend *be, ql_be_ctx **out);
void ql_be_ctx_close(ql_be_ctx *ctx);

/* Record a failed op's code and message (ql_error_message()) in ctx unless it
 * already holds one; returns the ctx's status. */
int ql_be_record(ql_be_ctx *ctx, int rc);
/* The first unchecked failure (QL_OK if none): its message is restored with
 * ql_error and the ctx is cleared, so later ops run again. */
int ql_be_check(ql_be_ctx *ctx);

/* Run op `op` of ctx's backend under the status rule above. */
#define ql_be(ctx, op, ...) \
    ((ctx)->status ? (ctx)->status : ql_be_record((ctx), (ctx)->be->op((ctx), __VA_ARGS__)))

/* QL_EINVAL naming the first of targets[rows] that is neither ignore_index
 * nor in [0, V) (the cross_entropy ops' check, before they read any). */
int ql_be_check_targets(const int32_t *targets, int64_t rows, int64_t V, int32_t ignore_index);

/* The precision named by `name` ("fp32", "bf16", or "auto"/NULL: bf16 on
 * cuda, fp32 on the CPU) for backend be; an unknown name is QL_EINVAL. */
int ql_be_precision(const char *name, const ql_backend *be, int *out);
const char *ql_be_precision_name(int precision);

/* The context a model's forward pass runs on (its backend). */
ql_be_ctx *ql_llama_ctx(const ql_llama *m);

#endif
