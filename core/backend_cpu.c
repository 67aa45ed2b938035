/* The CPU reference backend: the table of backend.h over the plain C
 * operators of ops.h and ops_backward.h.  Micro-batch ops are adapters that
 * run the per-sequence reference operator on each sequence's valid rows, so
 * a batched step computes exactly what B one-sequence steps compute. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops.h"
#include "ops_backward.h"
#include "qlora/error.h"

static int cpu_alloc(ql_be_ctx *ctx, void **out, size_t bytes)
{
    (void)ctx;
    *out = malloc(bytes ? bytes : 1);
    if (!*out) return ql_error(QL_ENOMEM, "out of memory: cannot allocate %zu bytes (%.1f MiB)", bytes,
                               (double)bytes / (1024.0 * 1024.0));
    return QL_OK;
}

static void cpu_free(ql_be_ctx *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static int cpu_sync(ql_be_ctx *ctx)
{
    (void)ctx;
    return QL_OK;
}

static int cpu_zero(ql_be_ctx *ctx, void *p, size_t bytes)
{
    (void)ctx;
    memset(p, 0, bytes);
    return QL_OK;
}

static int cpu_copy(ql_be_ctx *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    memmove(dst, src, bytes);
    return QL_OK;
}

static int cpu_pin(ql_be_ctx *ctx, void *host, size_t bytes)
{
    (void)ctx, (void)host, (void)bytes;
    return QL_OK;
}

static void cpu_unpin(ql_be_ctx *ctx, void *host) { (void)ctx, (void)host; }

static int cpu_materialize(ql_be_ctx *ctx, void *w, int32_t dtype, const ql_linear *l, const void *const *dev_bufs,
                           void *workspace, uint64_t workspace_bytes, float *host_scratch)
{
    (void)ctx, (void)dev_bufs, (void)workspace, (void)workspace_bytes, (void)host_scratch;
    if (dtype == QL_DTYPE_F32) return ql_linear_weights(l, w);
    if (dtype != QL_DTYPE_BF16 || !l->qz || !l->state)
        return ql_error(QL_EINVAL, "%s: materialize as dtype %d of a layer that is not quantized", l->name, dtype);
    return ql_linear_weights_bf16(l, w, host_scratch);
}

int ql_linear_weights_bf16(const ql_linear *l, uint16_t *w16, float *f32)
{
    ql_error_clear();
    int rc = l->qz->desc->materialize(l->qz->inst, l->state, QL_DTYPE_BF16, w16);
    if (rc != QL_ENOTSUP) return rc ? ql_error_context("materializing %s", l->name) : QL_OK;
    if (!f32) return ql_error(QL_EINVAL, "%s: plugin %s materializes F32 only and no scratch was planned", l->name,
                              l->qz->desc->name);
    if ((rc = ql_linear_weights(l, f32))) return rc;
    for (int64_t i = 0; i < l->out * l->in; i++) w16[i] = ql_be_bf16(f32[i]);
    return QL_OK;
}

static size_t align256(size_t b) { return (b + 255) / 256 * 256; }

/* ---- bf16 precision: operands rounded in ctx->scratch ---- */

static int need_scratch(ql_be_ctx *ctx, size_t bytes, const char *op)
{
    if (bytes <= ctx->scratch_bytes && ctx->scratch) return QL_OK;
    return ql_error(QL_EINTERNAL, "%s: %zu bytes of scratch needed, the plan gave %zu", op, bytes, ctx->scratch_bytes);
}

static float *rounded(float *dst, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = ql_be_bf16_float(ql_be_bf16(x[i]));
    return dst;
}

static float *widened(float *dst, const uint16_t *w, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = ql_be_bf16_float(w[i]);
    return dst;
}

/* The operands of a product under ctx's precision: a [na] activation and b
 * [nb] weights (fp32, or bf16 bits when b16), as float arrays to multiply. */
static int operands(ql_be_ctx *ctx, const float **a, int64_t na, const float **b, const uint16_t *b16, int64_t nb,
                    const char *op)
{
    const int bf16 = ctx->precision == QL_PREC_BF16;
    if (!bf16 && !b16) return QL_OK;
    const size_t abytes = bf16 ? (size_t)na * 4 : 0, off = (abytes + 255) / 256 * 256;
    int rc = need_scratch(ctx, off + (size_t)nb * 4, op);
    if (rc) return rc;
    float *sa = ctx->scratch, *sb = (float *)((char *)ctx->scratch + off);
    if (bf16) *a = rounded(sa, *a, na);
    if (b16) *b = widened(sb, b16, nb);
    else if (bf16) *b = rounded(sb, *b, nb);
    return QL_OK;
}

static int cpu_embedding(ql_be_ctx *ctx, float *out, const float *table, const int32_t *ids, const ql_be_batch *mb,
                         int64_t C)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++)
        for (int64_t t = 0; t < mb->T; t++) {
            float *o = out + (b * mb->T + t) * C;
            if (t < mb->len[b]) memcpy(o, table + (int64_t)ids[b * mb->T + t] * C, (size_t)C * sizeof *o);
            else memset(o, 0, (size_t)C * sizeof *o);
        }
    return QL_OK;
}

static int cpu_embedding_w16(ql_be_ctx *ctx, float *out, const uint16_t *table16, const int32_t *ids,
                             const ql_be_batch *mb, int64_t C)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++)
        for (int64_t t = 0; t < mb->T; t++) {
            float *o = out + (b * mb->T + t) * C;
            if (t < mb->len[b]) widened(o, table16 + (int64_t)ids[b * mb->T + t] * C, C);
            else memset(o, 0, (size_t)C * sizeof *o);
        }
    return QL_OK;
}

static int cpu_round_bf16(ql_be_ctx *ctx, uint16_t *dst, float *x, int64_t n)
{
    (void)ctx;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const uint16_t b = ql_be_bf16(x[i]);
        if (dst) dst[i] = b;
        x[i] = ql_be_bf16_float(b);
    }
    return QL_OK;
}

static int cpu_widen_bf16(ql_be_ctx *ctx, float *dst, const uint16_t *src, int64_t n)
{
    (void)ctx;
    widened(dst, src, n);
    return QL_OK;
}

static int cpu_matmul_nt(ql_be_ctx *ctx, float *y, const float *x, const float *w, int64_t rows, int64_t in,
                         int64_t out, int accumulate)
{
    int rc = operands(ctx, &x, rows * in, &w, NULL, out * in, "matmul");
    if (rc) return rc;
    ql_matmul_nt(y, x, w, rows, in, out, accumulate);
    return QL_OK;
}

static int cpu_matmul_nt_w16(ql_be_ctx *ctx, float *y, const float *x, const uint16_t *w16, int64_t rows, int64_t in,
                             int64_t out, int accumulate)
{
    const float *w = NULL;
    int rc = operands(ctx, &x, rows * in, &w, w16, out * in, "matmul");
    if (rc) return rc;
    ql_matmul_nt(y, x, w, rows, in, out, accumulate);
    return QL_OK;
}

static int cpu_rmsnorm_forward(ql_be_ctx *ctx, float *out, float *rstd, const float *x, const float *weight,
                               int64_t rows, int64_t C, float eps)
{
    (void)ctx;
    ql_rmsnorm_forward(out, rstd, x, weight, rows, C, eps);
    return QL_OK;
}

static int cpu_rope_forward(ql_be_ctx *ctx, float *x, const ql_be_batch *mb, int nheads, int hd, int pos0,
                            const float *inv_freq, float attn_scale)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++)
        ql_rope_forward(x + b * mb->T * nheads * hd, mb->len[b], nheads, hd, pos0, inv_freq + b * (hd / 2),
                        attn_scale);
    return QL_OK;
}

static int cpu_attention_forward(ql_be_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                 int64_t T, int64_t past, int nh, int nkv, int hd, int window)
{
    (void)ctx;
    ql_attention_forward(out, q, k, v, T, past, nh, nkv, hd, window);
    return QL_OK;
}

/* zero rows len..T of the [T, width] block of one sequence */
static void zero_tail(float *x, int64_t len, int64_t T, int64_t width)
{
    if (len < T) memset(x + len * width, 0, (size_t)((T - len) * width) * sizeof *x);
}

static int cpu_attention_forward_train(ql_be_ctx *ctx, float *out, float *probs, const float *q, const float *k,
                                       const float *v, const ql_be_batch *mb, int nh, int nkv, int hd,
                                       int window)
{
    (void)ctx;
    const int64_t T = mb->T, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    for (int64_t b = 0; b < mb->B; b++) {
        const int64_t n = mb->len[b];
        if (n > 0)
            ql_attention_forward_train(out + b * T * qd, probs + b * nh * T * T, q + b * T * qd, k + b * T * kvd,
                                       v + b * T * kvd, n, nh, nkv, hd, window);
        zero_tail(out + b * T * qd, n, T, qd);
    }
    return QL_OK;
}

static int cpu_swiglu_forward(ql_be_ctx *ctx, float *out, const float *gate, const float *up, int64_t n)
{
    (void)ctx;
    ql_swiglu_forward(out, gate, up, n);
    return QL_OK;
}

static int cpu_add_inplace(ql_be_ctx *ctx, float *x, const float *y, int64_t n)
{
    (void)ctx;
    ql_add_inplace(x, y, n);
    return QL_OK;
}

static int cpu_add_bias(ql_be_ctx *ctx, float *y, const float *bias, const ql_be_batch *mb, int64_t n)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++)
        for (int64_t t = 0; t < mb->len[b]; t++) ql_add_inplace(y + (b * mb->T + t) * n, bias, n);
    return QL_OK;
}

static int cpu_dropout_forward(ql_be_ctx *ctx, float *out, const float *x, const ql_be_batch *mb, int64_t C, float p,
                               const uint64_t *seeds)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++) {
        const int64_t off = b * mb->T * C;
        ql_dropout_forward(out + off, NULL, x + off, mb->len[b] * C, p, seeds[b]);
        zero_tail(out + off, mb->len[b], mb->T, C);
    }
    return QL_OK;
}

static int cpu_matmul_backward_input(ql_be_ctx *ctx, float *dx, const float *dy, const float *w, int64_t rows,
                                     int64_t in, int64_t out, int accumulate)
{
    int rc = operands(ctx, &dy, rows * out, &w, NULL, out * in, "matmul backward");
    if (rc) return rc;
    ql_matmul_backward_input(dx, dy, w, rows, in, out, accumulate);
    return QL_OK;
}

static int cpu_matmul_backward_input_w16(ql_be_ctx *ctx, float *dx, const float *dy, const uint16_t *w16,
                                         int64_t rows, int64_t in, int64_t out, int accumulate)
{
    const float *w = NULL;
    int rc = operands(ctx, &dy, rows * out, &w, w16, out * in, "matmul backward");
    if (rc) return rc;
    ql_matmul_backward_input(dx, dy, w, rows, in, out, accumulate);
    return QL_OK;
}

static int cpu_rmsnorm_backward(ql_be_ctx *ctx, float *dx, float *dweight, const float *dy, const float *x,
                                const float *weight, const float *rstd, int64_t rows, int64_t C, int accumulate)
{
    (void)ctx;
    ql_rmsnorm_backward(dx, dweight, dy, x, weight, rstd, rows, C, accumulate);
    return QL_OK;
}

static int cpu_rope_backward(ql_be_ctx *ctx, float *dx, const ql_be_batch *mb, int nheads, int hd, int pos0,
                             const float *inv_freq, float attn_scale)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++)
        ql_rope_backward(dx + b * mb->T * nheads * hd, mb->len[b], nheads, hd, pos0, inv_freq + b * (hd / 2),
                         attn_scale);
    return QL_OK;
}

static int cpu_attention_backward(ql_be_ctx *ctx, float *dq, float *dk, float *dv, float *dscores, const float *dout,
                                  const float *out, const float *q, const float *k, const float *v, const float *probs,
                                  const ql_be_batch *mb, int nh, int nkv, int hd, int window)
{
    (void)ctx, (void)out;
    const int64_t T = mb->T, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    for (int64_t b = 0; b < mb->B; b++) {
        const int64_t n = mb->len[b], sq = b * T * qd, skv = b * T * kvd, sp = b * nh * T * T;
        if (n > 0)
            ql_attention_backward(dq + sq, dk + skv, dv + skv, dscores + sp, dout + sq, q + sq, k + skv, v + skv,
                                  probs + sp, n, nh, nkv, hd, window);
        zero_tail(dq + sq, n, T, qd);
        zero_tail(dk + skv, n, T, kvd);
        zero_tail(dv + skv, n, T, kvd);
    }
    return QL_OK;
}

static int cpu_swiglu_backward(ql_be_ctx *ctx, float *dgate, float *dup, const float *dout, const float *gate,
                               const float *up, int64_t n)
{
    (void)ctx;
    ql_swiglu_backward(dgate, dup, dout, gate, up, n);
    return QL_OK;
}

static int cpu_dropout_backward(ql_be_ctx *ctx, float *dx, const float *dout, const ql_be_batch *mb, int64_t C,
                                float p, const uint64_t *seeds, int accumulate)
{
    (void)ctx;
    for (int64_t b = 0; b < mb->B; b++) {
        const int64_t off = b * mb->T * C;
        ql_dropout_backward(dx + off, dout + off, NULL, mb->len[b] * C, p, seeds[b], accumulate);
        if (!accumulate) zero_tail(dx + off, mb->len[b], mb->T, C);
    }
    return QL_OK;
}

/* ---- LoRA (the dropout of its input inside) ---- */

/* bf16 precision's LoRA operands in ctx->scratch: xd (when not in
 * dr->scratch), dy, A, B, h and dh rounded, one region each */
typedef struct lora16 {
    float *x, *dy, *a, *b, *h, *dh;
} lora16;

static int lora16_carve(ql_be_ctx *ctx, lora16 *o, int64_t rows, int64_t in, int64_t out, int64_t r, int x,
                        int backward, const char *op)
{
    const size_t sz[6] = {x ? (size_t)(rows * in) : 0, backward ? (size_t)(rows * out) : 0, (size_t)(r * in),
                          (size_t)(out * r), (size_t)(rows * r), backward ? (size_t)(rows * r) : 0};
    float **dst[6] = {&o->x, &o->dy, &o->a, &o->b, &o->h, &o->dh};
    size_t off = 0;
    for (int i = 0; i < 6; i++) {
        *dst[i] = (float *)((char *)ctx->scratch + off);
        off += align256(sz[i] * 4);
    }
    return need_scratch(ctx, off, op);
}

/* xd for lora_forward/backward: x, or dr's dropout of it in dr->scratch;
 * in bf16 precision rounded (in place in dr->scratch, else into o->x) */
static const float *lora_input(ql_be_ctx *ctx, const float *x, const ql_be_dropout *dr, lora16 *o, int64_t rows,
                               int64_t in)
{
    const int bf16 = ctx->precision == QL_PREC_BF16;
    if (ql_be_dropping(dr)) {
        float *xd = dr->scratch;
        if (!bf16) {
            cpu_dropout_forward(ctx, xd, x, dr->mb, in, dr->p, dr->seeds);
            return xd;
        }
        /* bf16: x rounded, dropped, rounded again (the GPU drops from the
         * frozen product's bf16 copy of x) */
        cpu_dropout_forward(ctx, xd, rounded(xd, x, rows * in), dr->mb, in, dr->p, dr->seeds);
        return rounded(xd, xd, rows * in);
    }
    return bf16 ? rounded(o->x, x, rows * in) : x;
}

static int cpu_event(ql_be_ctx *ctx, int slot, int wait)
{
    (void)ctx, (void)wait;
    if (slot < 0 || slot >= QL_BE_EVENTS) return ql_error(QL_EINVAL, "event %d: 0 to %d", slot, QL_BE_EVENTS - 1);
    return QL_OK; /* every op has run when it returns */
}

static int cpu_lora_forward(ql_be_ctx *ctx, float *y, float *h, const float *x, const ql_be_dropout *dr,
                            const float *a, const float *b, int64_t rows, int64_t in, int64_t out, int64_t r,
                            float scale)
{
    lora16 o = {0};
    ctx->reuse_x = 0;
    if (ctx->precision != QL_PREC_BF16) {
        ql_lora_forward(y, h, lora_input(ctx, x, dr, &o, rows, in), a, b, rows, in, out, r, scale);
        return QL_OK;
    }
    int rc = lora16_carve(ctx, &o, rows, in, out, r, !ql_be_dropping(dr), 0, "LoRA forward");
    if (rc) return rc;
    const float *xd = lora_input(ctx, x, dr, &o, rows, in);
    ql_matmul_nt(h, xd, rounded(o.a, a, r * in), rows, in, r, 0);
    ql_lora_up(y, rounded(o.h, h, rows * r), rounded(o.b, b, out * r), rows, out, r, scale);
    return QL_OK;
}

static int cpu_lora_backward(ql_be_ctx *ctx, float *dx, float *da, float *db, float *dh, const float *dy,
                             const float *x, const ql_be_dropout *dr, const float *h, const float *a, const float *b,
                             int64_t rows, int64_t in, int64_t out, int64_t r, float scale, int accumulate)
{
    lora16 o = {0};
    const int drop = ql_be_dropping(dr);
    ctx->reuse_x = 0;
    /* with dropout the gradient through xd is made over xd in dr->scratch
     * (xd is read first), then taken through the mask into dx */
    float *dxd = dx && drop ? (float *)dr->scratch : dx;
    const int acc = drop ? 0 : accumulate;
    if (ctx->precision != QL_PREC_BF16) {
        ql_lora_backward(dxd, da, db, dh, dy, lora_input(ctx, x, dr, &o, rows, in), h, a, b, rows, in, out, r, scale,
                         acc);
    } else {
        int rc = lora16_carve(ctx, &o, rows, in, out, r, !drop, 1, "LoRA backward");
        if (rc) return rc;
        const float *xd = lora_input(ctx, x, dr, &o, rows, in), *ar = rounded(o.a, a, r * in);
        const float *dyr = rounded(o.dy, dy, rows * out), *br = rounded(o.b, b, out * r);
        ql_gemm_nn(dh, dyr, br, rows, r, out, scale, 0);                 /* dh = s dy B */
        ql_gemm_tn(db, dyr, rounded(o.h, h, rows * r), rows, r, out, scale, 1); /* dB += s dy^T h */
        const float *dhr = rounded(o.dh, dh, rows * r);
        ql_gemm_tn(da, dhr, xd, rows, in, r, 1.0f, 1); /* dA += dh^T xd */
        if (dxd) ql_gemm_nn(dxd, dhr, ar, rows, in, r, 1.0f, acc);
    }
    if (dx && drop) cpu_dropout_backward(ctx, dx, dxd, dr->mb, in, dr->p, dr->seeds, accumulate);
    return QL_OK;
}

static int cpu_cross_entropy(ql_be_ctx *ctx, float *losses, float *dlogits, const float *logits,
                             const int32_t *targets, int64_t rows, int64_t V, int32_t ignore_index, float scale)
{
    (void)ctx;
    int rc = ql_be_check_targets(targets, rows, V, ignore_index);
    if (rc) return rc;
    ql_cross_entropy_forward_backward(losses, dlogits, logits, targets, rows, V, ignore_index, scale);
    return QL_OK;
}

static int cpu_mapped(ql_be_ctx *ctx, const void *host, const void **dev)
{
    (void)ctx;
    *dev = host;
    return QL_OK;
}

static int cpu_sum_squares(ql_be_ctx *ctx, double *out, const float *x, int64_t n)
{
    (void)ctx;
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    *out = ss;
    return QL_OK;
}

static int cpu_sum_squares_into(ql_be_ctx *ctx, double *out, double *partials, const float *x, int64_t n)
{
    (void)partials;
    return cpu_sum_squares(ctx, out, x, n);
}

static int cpu_scale(ql_be_ctx *ctx, float *x, float c, int64_t n)
{
    (void)ctx;
    for (int64_t i = 0; i < n; i++) x[i] *= c;
    return QL_OK;
}

static int cpu_adamw(ql_be_ctx *ctx, float *params, float *m, float *v, const float *grads, int64_t n,
                     const ql_adamw_scalars *h)
{
    (void)ctx;
    ql_adamw_apply(h, params, m, v, grads, (size_t)n);
    return QL_OK;
}

static int cpu_lora_merge(ql_be_ctx *ctx, float *w, const float *a, const float *b, int64_t out, int64_t in,
                          int64_t rank, float scale)
{
    (void)ctx;
#pragma omp parallel for schedule(static) if (out * in * rank >= QL_PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < out; o++)
        for (int64_t r = 0; r < rank; r++) {
            const float c = b[o * rank + r] * scale;
            if (c == 0.0f) continue;
            const float *ar = a + r * in;
            float *row = w + o * in;
            for (int64_t j = 0; j < in; j++) row[j] += c * ar[j];
        }
    return QL_OK;
}

static const ql_backend cpu_backend = {
    .name = "cpu",
    .host_memory = 1,
    .open = NULL,
    .close = NULL,
    .sync = cpu_sync,
    .event = cpu_event,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .copy = cpu_copy,
    .upload = cpu_copy,
    .download = cpu_copy,
    .download_async = cpu_copy,
    .mapped = cpu_mapped,
    .pin = cpu_pin,
    .unpin = cpu_unpin,
    .materialize = cpu_materialize,
    .embedding = cpu_embedding,
    .embedding_w16 = cpu_embedding_w16,
    .round_bf16 = cpu_round_bf16,
    .widen_bf16 = cpu_widen_bf16,
    .matmul_nt = cpu_matmul_nt,
    .matmul_nt_w16 = cpu_matmul_nt_w16,
    .matmul_backward_input_w16 = cpu_matmul_backward_input_w16,
    .rmsnorm_forward = cpu_rmsnorm_forward,
    .rope_forward = cpu_rope_forward,
    .attention_forward = cpu_attention_forward,
    .attention_forward_train = cpu_attention_forward_train,
    .swiglu_forward = cpu_swiglu_forward,
    .add_inplace = cpu_add_inplace,
    .add_bias = cpu_add_bias,
    .lora_forward = cpu_lora_forward,
    .dropout_forward = cpu_dropout_forward,
    .matmul_backward_input = cpu_matmul_backward_input,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope_backward = cpu_rope_backward,
    .attention_backward = cpu_attention_backward,
    .lora_merge = cpu_lora_merge,
    .swiglu_backward = cpu_swiglu_backward,
    .lora_backward = cpu_lora_backward,
    .dropout_backward = cpu_dropout_backward,
    .cross_entropy = cpu_cross_entropy,
    .sum_squares = cpu_sum_squares,
    .sum_squares_into = cpu_sum_squares_into,
    .scale = cpu_scale,
    .adamw = cpu_adamw,
};

const ql_backend *ql_backend_cpu(void) { return &cpu_backend; }

/* ---- registry and context ---- */

int ql_backend_find(const char *name, const ql_backend **out)
{
    *out = NULL;
    if (!name || !strcmp(name, "cpu")) {
        *out = &cpu_backend;
        return QL_OK;
    }
    if (!strcmp(name, "auto")) name = ql_backend_default();
    if (!strcmp(name, "cpu")) {
        *out = &cpu_backend;
        return QL_OK;
    }
    if (!strcmp(name, "cuda")) {
        *out = ql_backend_cuda();
        return *out ? QL_OK : ql_error_code();
    }
    return ql_error(QL_EINVAL, "unknown device '%s': use cpu, cuda or auto", name);
}

const char *ql_backend_default(void)
{
    /* ql_backend_cuda() reports why it is absent; that is no error here */
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", ql_error_message());
    int code = ql_error_code();
    const char *name = ql_backend_cuda() ? "cuda" : "cpu";
    if (code) ql_error(code, "%s", saved);
    else ql_error_clear();
    return name;
}

int ql_be_ctx_open(const char *name, const ql_backend *be, ql_be_ctx **out)
{
    *out = NULL;
    int rc;
    if (!be && (rc = ql_backend_find(name, &be))) return rc;
    ql_be_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return ql_error(QL_ENOMEM, "out of memory");
    ctx->be = be;
    if (be->open && (rc = be->open(ctx))) {
        free(ctx);
        return rc;
    }
    *out = ctx;
    return QL_OK;
}

void ql_be_ctx_close(ql_be_ctx *ctx)
{
    if (!ctx) return;
    if (ctx->be->close) ctx->be->close(ctx);
    free(ctx);
}

int ql_be_check_targets(const int32_t *targets, int64_t rows, int64_t V, int32_t ignore_index)
{
    for (int64_t t = 0; t < rows; t++)
        if (targets[t] != ignore_index && (targets[t] < 0 || targets[t] >= V))
            return ql_error(QL_EINVAL, "cross-entropy: target %d of row %lld is outside the vocabulary (%lld)",
                            targets[t], (long long)t, (long long)V);
    return QL_OK;
}

int ql_be_precision(const char *name, const ql_backend *be, int *out)
{
    if (!name || !strcmp(name, "auto")) *out = be->host_memory ? QL_PREC_FP32 : QL_PREC_BF16;
    else if (!strcmp(name, "fp32")) *out = QL_PREC_FP32;
    else if (!strcmp(name, "bf16")) *out = QL_PREC_BF16;
    else return ql_error(QL_EINVAL, "unknown precision '%s': use fp32, bf16 or auto", name);
    return QL_OK;
}

const char *ql_be_precision_name(int precision) { return precision == QL_PREC_BF16 ? "bf16" : "fp32"; }


int64_t ql_be_attention_floats(const ql_backend *be, int precision, int which, int64_t B, int64_t T, int nh)
{
    if (be->attention_lse && precision == QL_PREC_BF16) return which ? 0 : B * nh * T;
    return B * nh * T * T;
}

static int64_t att_budget = QL_BE_ATT_BUDGET;
static int att_fused = 1;

void ql_be_att_fused_set(int on) { att_fused = on != 0; }

int ql_be_att_fused(const ql_backend *be, int hd)
{
    return att_fused && be && be->fused_attention && be->fused_attention(hd);
}

void ql_be_att_budget_set(int64_t elements) { att_budget = elements > 0 ? elements : QL_BE_ATT_BUDGET; }

int64_t ql_be_att_tile(int64_t T, int nh)
{
    int64_t tile = QL_BE_ATT_TILE;
    while (tile > 16 && (int64_t)nh * tile * T > att_budget) tile /= 2;
    return T < tile ? (T > 0 ? T : 1) : tile;
}

size_t ql_be_scratch_bytes(const ql_backend *be, int precision, int64_t rows, int64_t max_in, int64_t max_out,
                           int64_t max_w, int64_t T, int nh, int nkv, int hd, int64_t lora_r)
{
    if (precision != QL_PREC_BF16) return 0;
    /* rounded operands: 4 bytes an element on the CPU (floats), 2 on the GPU
     * (bf16 bits).  Products: the activation, then the weights; attention
     * (CUDA): bf16 q, k, v and dout, then one query tile's scores and their
     * gradient (float32) and both in bf16; LoRA: the input and dy, A and B,
     * h and dh */
    const size_t e = !be || be->host_memory ? 4 : 2;
    const int64_t io = max_in > max_out ? max_in : max_out;
    const size_t prod = align256((size_t)(rows * io) * e) + align256((size_t)max_w * e);
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, tile = ql_be_att_tile(T, nh);
    /* fused: rowsum(P dP) [rows, nh] beside the operands; tiled: a tile's
     * scores and their gradient in float32 and bf16 */
    const size_t sq = (size_t)((int64_t)nh * tile * T);
    const size_t tiles = ql_be_att_fused(be, hd) ? align256((size_t)(rows * nh) * 4)
                                                 : align256(sq * 4) * 2 + align256(sq * 2) * 2;
    const size_t att = align256((size_t)(rows * qd) * 2) * 2 + align256((size_t)(rows * kvd) * 2) * 2 + tiles;
    const int64_t r = lora_r > 0 ? lora_r : 0;
    const size_t lora = r ? align256((size_t)(rows * max_in) * e) + align256((size_t)(rows * max_out) * e) +
                                align256((size_t)(r * max_in) * e) + align256((size_t)(r * max_out) * e) +
                                align256((size_t)(rows * r) * e) * 2
                          : 0;
    const size_t big = prod > att ? prod : att;
    return big > lora ? big : lora;
}

int ql_be_record(ql_be_ctx *ctx, int rc)
{
    if (rc != QL_OK && ctx->status == QL_OK) {
        ctx->status = rc;
        snprintf(ctx->message, sizeof ctx->message, "%s", ql_error_message());
    }
    return ctx->status;
}

int ql_be_check(ql_be_ctx *ctx)
{
    if (ctx->status == QL_OK) ql_be_record(ctx, ctx->be->sync(ctx));
    int rc = ctx->status;
    if (rc) ql_error(rc, "%s", ctx->message);
    ctx->status = QL_OK;
    ctx->message[0] = '\0';
    return rc;
}
