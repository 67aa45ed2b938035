#include "lora_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops_backward.h"
#include "plan.h"
#include "qlora/error.h"
#include "rope.h"

/* Activations of one decoder layer for a micro-batch of R = B*T rows. */
typedef struct layer_acts {
    float *x;                 /* [R, H] layer input (the plan's inputs[i], or its bf16 copy widened) */
    float *xn1, *rstd1;       /* [R, H], [R] */
    float *q, *k, *v;         /* [R, qd], [R, kvd] x2, rotated q and k */
    float *qpre, *kpre;       /* [R, qd], [R, kvd] q, k before the per-head norm (qk_norm only) */
    float *rstdq, *rstdk;     /* [R, nh], [R, nkv] (qk_norm only) */
    float *probs;             /* [B, nh, T, T] */
    float *att;               /* [R, qd] */
    float *xmid;              /* [R, H] */
    float *xn2, *rstd2;       /* [R, H], [R] */
    float *gate, *up, *hm;    /* [R, I] x3 */
    float *h[QL_MOD_COUNT];   /* [R, r] LoRA hidden */
} layer_acts;

typedef struct dims {
    int64_t T, H, I, qd, kvd, hd, V, r;
    int nh, nkv;
    int64_t R; /* rows of this micro-batch: B * T */
} dims;

typedef struct bwd_scratch {
    float *dhm, *dup, *dxn, *datt, *dq, *dk, *dv, *dscores, *dh, *dmid; /* dgate is dhm, in place */
    /* [R, widest in] one module's dropped LoRA input, made again for its
     * backward, then the gradient through it (dropout only) */
    float *xd;
    float *dqpre, *dkpre; /* [R, qd], [R, kvd] through the per-head q/k norm (qk_norm only) */
    float *grad, *grad2; /* [R, H] the gradient flowing down the residual stream */
} bwd_scratch;

/* A linear layer's frozen weights as the backend reads them: the host
 * arrays themselves on the CPU, copies in the base arena on a device. */
typedef struct be_linear {
    const float *dense, *bias;                  /* [out, in] (not quantized), [out]; or NULL */
    const uint16_t *dense16;                    /* bf16 precision: a bf16 copy of dense instead */
    const void *bufs[QL_MAX_STATE_BUFFERS];     /* device copies of the plugin's state buffers */
    int device_materialize;                     /* bufs are set: the plugin materializes on the device */
} be_linear;

typedef struct be_layer {
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;
    be_linear lin[QL_MOD_COUNT];
} be_layer;

/* a host array copied into a planned backend buffer once the plan is allocated */
typedef struct upload {
    void **dst;
    const void *src;
    size_t bytes;
    int owned; /* src is a converted copy, freed once uploaded */
    int host;  /* dst is in the pinned host arena: copied on the host */
} upload;

struct ql_lora_model {
    ql_llama *m;
    ql_lora *lora;
    const ql_llama_config *c;
    ql_be_ctx *ctx;
    ql_plan plan;
    int Bmax, Tmax, checkpointing, backward, keep_all;
    int alias; /* backward scratch in the places of spent activations (checkpointing) */
    int64_t logit_rows; /* rows of logits computed at a time */
    /* carved from the plan */
    layer_acts *acts;   /* [n_layers] when keeping all, else [1] */
    float **inputs;     /* [n_inputs] layer inputs, and the final hidden state: n_layers + 1, or two that
                           alternate (forward only, or with in16) */
    int n_inputs;
    uint16_t **in16;    /* [n_layers] bf16 copies of the layer inputs (bf16 checkpointing), or NULL */
    /* offloading (opts.offload): in16 in the pinned host arena, and two
     * device buffers through which layer i's copy goes out (forward) and
     * comes back (backward): stage16[i & 1] */
    int offload, offload_on; /* offload_on: opts.offload resolved (the inputs need bf16 checkpointing too) */
    uint16_t *stage16[2];
    float *xnf, *rstdf; /* final norm */
    float *logits;      /* [logit_rows, V] */
    float *w;           /* one materialized weight matrix */
    /* prefetching (opts.prefetch): w2 a second buffer and mat_ws2 the side
     * queue's workspace; held[j] the linear (layer * QL_MOD_COUNT + module)
     * whose weights buffer j holds or is being given, -1 none; seq[k] the
     * order in which a step with backward k asks for quantized weights,
     * recorded by the first such step */
    float *w2;
    void *mat_ws2;
    int held[2], last;
    int slow_path; /* some quantized layer has no device materialize */
    struct wseq {
        int *ids, n, cap, state; /* state: 0 to record, 1 recording, 2 recorded */
    } seq[2];
    bwd_scratch s;
    /* host staging */
    int32_t *h_ids, *h_labels, *h_len, *targets;
    uint64_t *h_seeds;
    float *losses;
    float *inv_freq; /* [Bmax, hd/2] each sequence's rotary frequencies */
    /* the weights in backend memory */
    const float *embed, *final_norm, *head;
    const uint16_t *embed16; /* bf16 precision: the embeddings in bf16 (the head's copy when tied) */
    const uint16_t *head16; /* bf16 precision: a bf16 copy of the output layer */
    int precision;
    void *scratch; /* the backend's rounding scratch (ql_be_scratch_bytes) */
    size_t scratch_bytes;
    be_layer *layers;      /* [n_layers] */
    ql_lora_pair *pairs;   /* [n_layers * QL_MOD_COUNT]: A, B, dA, dB in backend memory (lora->pairs on the CPU) */
    float *params, *grads; /* the backend copies of lora->params and lora->grads (theirs on the CPU) */
    void *mat_ws;          /* device workspace of the plugins' materialize */
    uint64_t mat_ws_bytes;
    float *host_w;         /* host scratch of the slow path (plugins without device kernels) */
    upload *ups;
    size_t n_ups, cap_ups;
    float *opt_m, *opt_v; /* the device optimizer's moments, or (paged) one chunk of each; NULL: on the host */
    const ql_adamw *opt;  /* whose moments they start from */
    int paged;            /* opt_m, opt_v are chunk buffers; opt's own (pinned) arrays hold the moments */
    int64_t chunk;        /* elements a chunk: the most LoRA parameters of one layer */
    void *pinned_m, *pinned_v;
    /* the paged optimizer's two slots of each moment (opt_m, opt_v are slot
     * 0; slot 1 follows each); layer i's parameters are [goff[i], goff[i+1]) */
    float *opt_m2, *opt_v2;
    int64_t *goff;
    /* paged gradients (offloading with the paged optimizer): the gradients
     * accumulate in lora->grads (page-locked); layer i's are on the device
     * in gbuf[i & 1] only during its backward, loaded before it (or zeroed
     * after ql_lora_model_zero_grads: grads_zero) and copied back after it,
     * with their sum of squares into ss[i] for the clipping; the clipping's
     * factor (gclip: any) is applied as the optimizer loads them */
    int page_grads, grads_zero, gclip;
    float gscale;
    float *gbuf[2];
    double *ss, *ss_parts;
    void *pinned_g;
    int ups_failed;
    /* generation (opts.kv_capacity): keys and values [n_layers, kv_cap, kvd],
     * the first kv_len positions filled */
    float *kv_k, *kv_v;
    int kv_cap, kv_len;
    int merge; /* opts.merge: w holds any linear, dense ones too */
};

/* What one step works on (the model, this micro-batch's dims and seeds). */
typedef struct ctx {
    ql_lora_model *lm;
    ql_be_ctx *be;
    ql_llama *m;
    ql_lora *lora;
    const ql_llama_config *c;
    dims d;
    ql_be_batch mb;
    uint64_t *seeds; /* [B] scratch: one module's per-sequence dropout seeds */
    const uint64_t *seq_seeds;
    int dropout;     /* dropout active */
    const float *inv_freq; /* host [B, hd/2]: sequence b's rotary frequencies */
    float rope_scale;      /* and the factor on cos and sin */
    /* prefetching: this step's place in lm->seq[seqk], off when it left it */
    int seqk, pos, off_seq;
    int wbuf; /* the buffer the last weights() gave, or -1 */
} ctx;

/* sequence b's seed for (layer, module), as a one-sequence step derives it */
static uint64_t module_seed(uint64_t seed, int layer, int module)
{
    uint64_t s = seed ^ ((uint64_t)(layer * QL_MOD_COUNT + module + 1) * 0xD1B54A32D192ED03ull);
    return ql_splitmix64_next(&s);
}

static const uint64_t *module_seeds(ctx *x, int layer, int module)
{
    for (int64_t b = 0; b < x->mb.B; b++) x->seeds[b] = module_seed(x->seq_seeds[b], layer, module);
    return x->seeds;
}

static const ql_linear *layer_linear(ql_llama_layer *L, int k)
{
    const ql_linear *ls[QL_MOD_COUNT] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    return ls[k];
}

/* A frozen linear's weights for the products: float32, or bf16 bits in bf16
 * precision (*w16 set, the float pointer NULL).  A quantized layer is
 * materialized into the plan's scratch: nothing is kept.  With prefetching
 * (lm->w2) its weights may already be in one of the two buffers (or on the
 * way, on the side queue), and the next linear of the recorded order is
 * materialized into the other while this one computes; weights_used() after
 * the product says when that buffer may be written again. */
enum { EV_MAT = 0, EV_USED = 2 }; /* + buffer: its materialize done; its last product done */
enum { EV_STAGED = 4, EV_MOVED = 6 }; /* + stage16 buffer: its bytes ready for the copy queue; its copy done */
/* + gbuf buffer: free for the next layer's gradients; they are in it; the layer's backward is done */
enum { EV_GFREE = 8, EV_GIN = 10, EV_GDONE = 12 };
/* the paged optimizer: its start on the main queue; layer i's update done (EV_OPT + i % EV_OPT_RING) */
enum { EV_OPT_START = 14, EV_OPT = 16, EV_OPT_RING = 128 };
_Static_assert(EV_OPT + EV_OPT_RING <= QL_BE_EVENTS, "events");

static int materialize_into(ctx *x, int j, int id)
{
    ql_lora_model *lm = x->lm;
    const int i = id / QL_MOD_COUNT, k = id % QL_MOD_COUNT;
    const ql_linear *l = layer_linear(&ql_llama_layers(x->m)[i], k);
    const be_linear *bl = &lm->layers[i].lin[k];
    return ql_be(x->be, materialize, j ? (void *)lm->w2 : (void *)lm->w,
                 lm->precision == QL_PREC_BF16 ? QL_DTYPE_BF16 : QL_DTYPE_F32, l,
                 bl->device_materialize ? bl->bufs : NULL, x->be->queue ? lm->mat_ws2 : lm->mat_ws, lm->mat_ws_bytes,
                 lm->host_w);
}

static const float *weights(ctx *x, int i, int k, const be_linear *bl, const uint16_t **w16)
{
    *w16 = NULL;
    x->wbuf = -1;
    if (bl->dense16) {
        *w16 = bl->dense16;
        return NULL;
    }
    if (bl->dense) return bl->dense;
    ql_lora_model *lm = x->lm;
    const int bf16 = lm->precision == QL_PREC_BF16, id = i * QL_MOD_COUNT + k;
    int j = 0;
    if (!lm->w2) {
        materialize_into(x, 0, id);
    } else {
        struct wseq *sq = &lm->seq[x->seqk];
        if (sq->state == 1) { /* recording this step's order */
            if (sq->n == sq->cap) {
                int cap = sq->cap ? 2 * sq->cap : 64, *ids = realloc(sq->ids, (size_t)cap * sizeof *ids);
                if (!ids) return ql_be_record(x->be, ql_error(QL_ENOMEM, "out of memory")), NULL;
                sq->ids = ids, sq->cap = cap;
            }
            sq->ids[sq->n++] = id;
        } else if (sq->state == 2 && !x->off_seq && (x->pos >= sq->n || sq->ids[x->pos] != id)) {
            x->off_seq = 1; /* not the recorded order: no more prefetching this step */
        }
        x->pos++;
        j = lm->held[0] == id ? 0 : lm->held[1] == id ? 1 : -1;
        if (j < 0) { /* not prefetched: here, into the buffer the last product did not use */
            j = 1 - lm->last;
            ql_be(x->be, event, EV_MAT + j, 1); /* a prefetch into it has finished */
            lm->held[j] = -1;
            if (materialize_into(x, j, id) == QL_OK) lm->held[j] = id;
        } else {
            ql_be(x->be, event, EV_MAT + j, 1);
        }
        lm->last = j;
        x->wbuf = j;
        if (sq->state == 2 && !x->off_seq && x->pos < sq->n) {
            const int next = sq->ids[x->pos], o = 1 - j;
            if (next != id && lm->held[o] != next) { /* the next weights into the other buffer, on the side */
                x->be->queue = 1;
                ql_be(x->be, event, EV_USED + o, 1); /* after the last product that reads it */
                lm->held[o] = -1;
                if (materialize_into(x, o, next) == QL_OK) lm->held[o] = next;
                ql_be(x->be, event, EV_MAT + o, 0);
                x->be->queue = 0;
            }
        }
    }
    float *w = j ? lm->w2 : lm->w;
    if (bf16) {
        *w16 = (const uint16_t *)w;
        return NULL;
    }
    return w;
}

/* after the product that read weights()'s buffer */
static void weights_used(ctx *x)
{
    if (x->wbuf >= 0) ql_be(x->be, event, EV_USED + x->wbuf, 0);
}

static ql_lora_pair *pair_at(ctx *x, int i, int k)
{
    if (!x->lora) return NULL;
    ql_lora_pair *p = &x->lm->pairs[i * QL_MOD_COUNT + k];
    return p->A ? p : NULL;
}

/* Module k of layer i's LoRA dropout for the ops (NULL when off): its
 * per-sequence seeds, over the plan's xd scratch. */
static const ql_be_dropout *lora_dropout(ctx *x, int i, int k, ql_be_dropout *dr)
{
    if (!x->dropout) return NULL;
    *dr = (ql_be_dropout){
        .p = x->lora->cfg.dropout, .mb = &x->mb, .seeds = module_seeds(x, i, k), .scratch = x->lm->s.xd};
    return dr;
}

/* y = in W^T (+ LoRA) for module k of layer i, over all R rows */
static int linear_fwd(ctx *x, int i, int k, layer_acts *a, const float *in, float *y)
{
    /* k and v read q's input, up reads gate's: unchanged in between (LoRA and
     * dropout write elsewhere), so the backend may keep its bf16 copy */
    const int same_in = k == QL_MOD_K || k == QL_MOD_V || k == QL_MOD_UP;
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    const ql_linear *l = layer_linear(L, k);
    const be_linear *bl = &x->lm->layers[i].lin[k];
    const uint16_t *w16;
    const float *w = weights(x, i, k, bl, &w16);
    x->be->reuse_x = same_in;
    if (w16) ql_be(x->be, matmul_nt_w16, y, in, w16, x->d.R, l->in, l->out, 0);
    else ql_be(x->be, matmul_nt, y, in, w, x->d.R, l->in, l->out, 0);
    x->be->reuse_x = 0;
    weights_used(x);
    if (bl->bias) /* frozen: no gradient, and dy passes through it unchanged; valid rows only, so padded rows stay 0 */
        ql_be(x->be, add_bias, y, bl->bias, &x->mb, l->out);
    ql_lora_pair *p = pair_at(x, i, k);
    if (p) { /* the dropped input is not kept: linear_bwd makes the same mask again from the seeds */
        ql_be_dropout dr;
        x->be->reuse_x = 1; /* in is the frozen product's operand, unchanged */
        ql_be(x->be, lora_forward, y, a->h[k], in, lora_dropout(x, i, k, &dr), p->A, p->B, x->d.R, l->in, l->out,
              x->lora->cfg.r, x->lora->scaling);
        x->be->reuse_x = 0;
    }
    return x->be->status;
}

/* din (+)= dy W (+ LoRA paths), and LoRA grads */
static int linear_bwd(ctx *x, int i, int k, layer_acts *a, const float *in, const float *dy, float *din,
                      int accumulate, float *dh_scratch)
{
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    const ql_linear *l = layer_linear(L, k);
    const uint16_t *w16;
    const float *w = weights(x, i, k, &x->lm->layers[i].lin[k], &w16); /* materialized again: nothing was kept */
    if (w16) ql_be(x->be, matmul_backward_input_w16, din, dy, w16, x->d.R, l->in, l->out, accumulate);
    else ql_be(x->be, matmul_backward_input, din, dy, w, x->d.R, l->in, l->out, accumulate);
    weights_used(x);
    ql_lora_pair *p = pair_at(x, i, k);
    if (p) {
        ql_be_dropout dr;
        x->be->reuse_x = 1; /* dy is the frozen product's operand, unchanged */
        ql_be(x->be, lora_backward, din, p->dA, p->dB, dh_scratch, dy, in, lora_dropout(x, i, k, &dr), a->h[k], p->A,
              p->B, x->d.R, l->in, l->out, x->lora->cfg.r, x->lora->scaling, 1);
        x->be->reuse_x = 0;
    }
    return x->be->status;
}

/* Forward of layer i from a->x to out[R, H]. */
static int layer_fwd(ctx *x, int i, layer_acts *a, float *out)
{
    const dims *d = &x->d;
    const ql_llama_config *c = x->c;
    const be_layer *L = &x->lm->layers[i];
    const int window = ql_llama_layers(x->m)[i].window;
    int rc;
    ql_be(x->be, rmsnorm_forward, a->xn1, a->rstd1, a->x, L->attn_norm, d->R, d->H, c->rms_eps);
    float *qp = L->q_norm ? a->qpre : a->q, *kp = L->q_norm ? a->kpre : a->k;
    if ((rc = linear_fwd(x, i, QL_MOD_Q, a, a->xn1, qp)) || (rc = linear_fwd(x, i, QL_MOD_K, a, a->xn1, kp)) ||
        (rc = linear_fwd(x, i, QL_MOD_V, a, a->xn1, a->v)))
        return rc;
    if (L->q_norm) { /* per head: rows of hd */
        ql_be(x->be, rmsnorm_forward, a->q, a->rstdq, a->qpre, L->q_norm, d->R * d->nh, d->hd, c->rms_eps);
        ql_be(x->be, rmsnorm_forward, a->k, a->rstdk, a->kpre, L->k_norm, d->R * d->nkv, d->hd, c->rms_eps);
    }
    ql_be(x->be, rope_forward, a->q, &x->mb, d->nh, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    ql_be(x->be, rope_forward, a->k, &x->mb, d->nkv, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    ql_be(x->be, attention_forward_train, a->att, a->probs, a->q, a->k, a->v, &x->mb, d->nh, d->nkv, (int)d->hd,
          window);
    if ((rc = linear_fwd(x, i, QL_MOD_O, a, a->att, a->xmid))) return rc;
    ql_be(x->be, add_inplace, a->xmid, a->x, d->R * d->H);
    ql_be(x->be, rmsnorm_forward, a->xn2, a->rstd2, a->xmid, L->mlp_norm, d->R, d->H, c->rms_eps);
    if ((rc = linear_fwd(x, i, QL_MOD_GATE, a, a->xn2, a->gate)) || (rc = linear_fwd(x, i, QL_MOD_UP, a, a->xn2, a->up)))
        return rc;
    ql_be(x->be, swiglu_forward, a->hm, a->gate, a->up, d->R * d->I);
    if ((rc = linear_fwd(x, i, QL_MOD_DOWN, a, a->hm, out))) return rc;
    ql_be(x->be, add_inplace, out, a->xmid, d->R * d->H);
    return x->be->status;
}

/* Given dout[R, H] = dL/d(layer output), write dx[R, H] = dL/d(layer input). */
static int layer_bwd(ctx *x, int i, layer_acts *a, const float *dout, float *dx, bwd_scratch *s)
{
    const dims *d = &x->d;
    const be_layer *L = &x->lm->layers[i];
    const int window = ql_llama_layers(x->m)[i].window;
    int rc;
    /* MLP */
    if ((rc = linear_bwd(x, i, QL_MOD_DOWN, a, a->hm, dout, s->dhm, 0, s->dh))) return rc;
    ql_be(x->be, swiglu_backward, s->dhm, s->dup, s->dhm, a->gate, a->up, d->R * d->I); /* dgate in place */
    if ((rc = linear_bwd(x, i, QL_MOD_GATE, a, a->xn2, s->dhm, s->dxn, 0, s->dh)) ||
        (rc = linear_bwd(x, i, QL_MOD_UP, a, a->xn2, s->dup, s->dxn, 1, s->dh)))
        return rc;
    ql_be(x->be, copy, s->dmid, dout, (size_t)(d->R * d->H) * 4);
    ql_be(x->be, rmsnorm_backward, s->dmid, NULL, s->dxn, a->xmid, L->mlp_norm, a->rstd2, d->R, d->H, 1);
    /* attention */
    if ((rc = linear_bwd(x, i, QL_MOD_O, a, a->att, s->dmid, s->datt, 0, s->dh))) return rc;
    ql_be(x->be, attention_backward, s->dq, s->dk, s->dv, s->dscores, s->datt, a->att, a->q, a->k, a->v, a->probs, &x->mb,
          d->nh, d->nkv, (int)d->hd, window);
    ql_be(x->be, rope_backward, s->dq, &x->mb, d->nh, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    ql_be(x->be, rope_backward, s->dk, &x->mb, d->nkv, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    const float *dqp = s->dq, *dkp = s->dk;
    if (L->q_norm) { /* frozen norm weights: only the input gradient */
        ql_be(x->be, rmsnorm_backward, s->dqpre, NULL, s->dq, a->qpre, L->q_norm, a->rstdq, d->R * d->nh, d->hd, 0);
        ql_be(x->be, rmsnorm_backward, s->dkpre, NULL, s->dk, a->kpre, L->k_norm, a->rstdk, d->R * d->nkv, d->hd, 0);
        dqp = s->dqpre;
        dkp = s->dkpre;
    }
    if ((rc = linear_bwd(x, i, QL_MOD_Q, a, a->xn1, dqp, s->dxn, 0, s->dh)) ||
        (rc = linear_bwd(x, i, QL_MOD_K, a, a->xn1, dkp, s->dxn, 1, s->dh)) ||
        (rc = linear_bwd(x, i, QL_MOD_V, a, a->xn1, s->dv, s->dxn, 1, s->dh)))
        return rc;
    ql_be(x->be, copy, dx, s->dmid, (size_t)(d->R * d->H) * 4);
    ql_be(x->be, rmsnorm_backward, dx, NULL, s->dxn, a->x, L->attn_norm, a->rstd1, d->R, d->H, 1);
    return x->be->status;
}

/* ---- the plan ---- */

enum { LOGIT_CHUNK_BYTES = 64 << 20 }; /* logits of at most this many bytes exist at once */

static uint64_t base_bytes(ql_llama *m)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    const float *fn, *head;
    ql_llama_output_weights(m, &fn, &head);
    uint64_t b = (uint64_t)c->vocab * c->hidden * 4 + (uint64_t)c->hidden * 4;
    if (head != ql_llama_embeddings(m)) b += (uint64_t)c->vocab * c->hidden * 4;
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        b += 2 * (uint64_t)c->hidden * 4;
        if (L->q_norm) b += 2 * (uint64_t)c->head_dim * 4;
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_linear *l = layer_linear(L, k);
            ql_state_info info = {0};
            if (l->bias) b += (uint64_t)l->out * 4;
            if (l->dense) b += (uint64_t)(l->out * l->in) * 4;
            else if (l->qz->desc->state_info && l->qz->desc->state_info(l->qz->inst, l->state, &info) == QL_OK)
                b += info.bytes;
        }
    }
    return b;
}

/* A host array the step reads as backend memory: itself on the CPU; on a
 * device a buffer of arena `role`, filled once the plan is allocated. */
static void plan_resident(ql_lora_model *lm, int role, const void **dst, const void *src, uint64_t bytes)
{
    if (!src || !bytes) {
        *dst = src;
        return;
    }
    if (lm->ctx->be->host_memory) {
        *dst = src;
        return;
    }
    ql_plan_add(&lm->plan, role, (void **)dst, (int64_t)bytes, 1);
    if (lm->n_ups == lm->cap_ups) {
        size_t cap = lm->cap_ups ? 2 * lm->cap_ups : 256;
        upload *u = realloc(lm->ups, cap * sizeof *u);
        if (!u) {
            lm->ups_failed = 1;
            return;
        }
        lm->ups = u;
        lm->cap_ups = cap;
    }
    lm->ups[lm->n_ups++] = (upload){.dst = (void **)dst, .src = src, .bytes = (size_t)bytes};
}

/* bf16 precision: a bf16 copy of float weights src[n] in arena `role` (the
 * weights', on every backend; or the pinned host arena) */
static void plan_bf16_copy(ql_lora_model *lm, int role, const uint16_t **dst, const float *src, int64_t n)
{
    *dst = NULL;
    uint16_t *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    if (!h || lm->n_ups == lm->cap_ups) {
        size_t cap = lm->cap_ups ? 2 * lm->cap_ups : 256;
        upload *u = h ? realloc(lm->ups, cap * sizeof *u) : NULL;
        if (!u) {
            free(h);
            lm->ups_failed = 1;
            return;
        }
        lm->ups = u;
        lm->cap_ups = cap;
    }
    for (int64_t i = 0; i < n; i++) h[i] = ql_be_bf16(src[i]);
    ql_plan_add(&lm->plan, role, (void **)dst, n, 2);
    lm->ups[lm->n_ups++] =
        (upload){.dst = (void **)dst, .src = h, .bytes = (size_t)n * 2, .owned = 1, .host = role == QL_ROLE_PINNED};
}

#define RESIDENT(lm, role, dst, src, count) \
    plan_resident((lm), (role), (const void **)(dst), (src), (uint64_t)(count) * sizeof(float))

/* The frozen weights and the LoRA parameters where the backend reads them. */
static int plan_weights(ql_lora_model *lm, int64_t *maxw)
{
    ql_llama *m = lm->m;
    const ql_llama_config *c = lm->c;
    ql_plan *p = &lm->plan;
    const int host = lm->ctx->be->host_memory, B = QL_ROLE_BASE;
    const int64_t H = c->hidden, V = c->vocab;
    lm->layers = calloc((size_t)c->n_layers, sizeof *lm->layers);
    if (!lm->layers) return ql_error(QL_ENOMEM, "out of memory");
    if (host) ql_plan_held(p, QL_ROLE_BASE, base_bytes(m));
    const float *fn, *head;
    ql_llama_output_weights(m, &fn, &head);
    if (lm->precision != QL_PREC_BF16) RESIDENT(lm, B, &lm->embed, ql_llama_embeddings(m), V * H);
    else if (head != ql_llama_embeddings(m)) /* offloading: read in place from host memory, only the rows a step needs */
        plan_bf16_copy(lm, lm->offload_on && !host ? QL_ROLE_PINNED : QL_ROLE_WEIGHTS, &lm->embed16,
                       ql_llama_embeddings(m), V * H);
    RESIDENT(lm, B, &lm->final_norm, fn, H);
    if (lm->precision == QL_PREC_BF16) plan_bf16_copy(lm, QL_ROLE_WEIGHTS, &lm->head16, head, V * H); /* tied: embed16 too */
    else if (head == ql_llama_embeddings(m)) lm->head = NULL; /* tied: set after the plan is allocated */
    else RESIDENT(lm, B, &lm->head, head, V * H);
    int64_t ws = 0, slow = 0;
    const char *warned = NULL;
    *maxw = 0;
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        be_layer *bl = &lm->layers[i];
        RESIDENT(lm, B, &bl->attn_norm, L->attn_norm, H);
        RESIDENT(lm, B, &bl->mlp_norm, L->mlp_norm, H);
        RESIDENT(lm, B, &bl->q_norm, L->q_norm, L->q_norm ? c->head_dim : 0);
        RESIDENT(lm, B, &bl->k_norm, L->k_norm, L->k_norm ? c->head_dim : 0);
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_linear *l = layer_linear(L, k);
            be_linear *b = &bl->lin[k];
            RESIDENT(lm, B, &b->bias, l->bias, l->bias ? l->out : 0);
            if (l->dense) {
                if (lm->precision == QL_PREC_BF16) plan_bf16_copy(lm, QL_ROLE_WEIGHTS, &b->dense16, l->dense, l->out * l->in);
                else RESIDENT(lm, B, &b->dense, l->dense, l->out * l->in);
                continue;
            }
            if (l->out * l->in > *maxw) *maxw = l->out * l->in;
            if (host) continue;
            const ql_quantizer_desc *d = l->qz->desc;
            ql_state_buffer sb[QL_MAX_STATE_BUFFERS];
            uint32_t n = 0;
            if (d->materialize_rows_device && d->device_buffers && d->device_workspace &&
                d->device_buffers(l->qz->inst, l->state, sb, &n) == QL_OK && n <= QL_MAX_STATE_BUFFERS) {
                b->device_materialize = 1;
                for (uint32_t j = 0; j < n; j++) {
                    if (sb[j].align > QL_PLAN_ALIGN || (sb[j].align & (sb[j].align - 1)))
                        return ql_error(QL_EABI, "plugin %s: state buffer %s asks for alignment %llu (at most %d)",
                                        d->name, sb[j].name ? sb[j].name : "?", (unsigned long long)sb[j].align,
                                        QL_PLAN_ALIGN);
                    plan_resident(lm, B, &b->bufs[j], sb[j].data, sb[j].bytes);
                }
                uint64_t w = d->device_workspace(l->qz->inst, l->state, l->out);
                if ((int64_t)w > ws) ws = (int64_t)w;
            } else {
                ql_error_clear();
                if (l->out * l->in > slow) slow = l->out * l->in;
                if (!warned || strcmp(warned, d->name)) {
                    fprintf(stderr,
                            "qlora: warning: plugin %s has no CUDA materialize (ABI 1.1 device slots): its weights "
                            "are dequantized on the CPU and copied to the GPU for every use, which is slow\n",
                            d->name);
                    warned = d->name;
                }
            }
        }
    }
    ql_plan_add(p, QL_ROLE_WEIGHTS, &lm->mat_ws, ws, 1);
    lm->mat_ws_bytes = (uint64_t)ws;
    /* the slow path's host scratch (float32, and bf16 after it in bf16
     * precision); on the CPU in bf16, where a plugin materializes F32 only */
    lm->slow_path = slow > 0;
    if (host && lm->precision == QL_PREC_BF16) slow = *maxw;
    ql_plan_add(p, QL_ROLE_HOST, (void **)&lm->host_w, lm->precision == QL_PREC_BF16 ? slow * 6 : slow * 4, 1);
    ql_lora *lora = lm->lora;
    if (lora) {
        if (host) {
            ql_plan_held(p, QL_ROLE_LORA, (uint64_t)lora->n_params * 4);
            ql_plan_held(p, QL_ROLE_GRADS, (uint64_t)lora->n_params * 4);
            lm->params = lora->params;
            lm->grads = lora->grads;
            lm->pairs = lora->pairs;
        } else {
            ql_plan_add(p, QL_ROLE_LORA, (void **)&lm->params, (int64_t)lora->n_params, 4);
            /* paged gradients are planned with the optimizer (ql_lora_model_create) */
            lm->pairs = calloc((size_t)lora->n_layers * QL_MOD_COUNT, sizeof *lm->pairs);
            if (!lm->pairs) return ql_error(QL_ENOMEM, "out of memory");
        }
    }
    return lm->ups_failed ? ql_error(QL_ENOMEM, "out of memory") : QL_OK;
}

/* After the plan is allocated: the uploads, and the LoRA pairs at the backend copies. */
static int fill_weights(ql_lora_model *lm)
{
    ql_be_ctx *be = lm->ctx;
    for (size_t i = 0; i < lm->n_ups; i++) {
        if (lm->ups[i].host) memcpy(*lm->ups[i].dst, lm->ups[i].src, lm->ups[i].bytes);
        else ql_be(be, upload, *lm->ups[i].dst, lm->ups[i].src, lm->ups[i].bytes);
        if (lm->ups[i].owned) { /* an upload has read its source when it returns (backend.h) */
            free((void *)lm->ups[i].src);
            lm->ups[i].src = NULL;
            lm->ups[i].owned = 0;
        }
    }
    if (!lm->head && !lm->head16) lm->head = lm->embed;
    if (lm->head16 && !lm->embed16) lm->embed16 = lm->head16; /* tied */
    else if (lm->embed16 && lm->plan.on_host[QL_ROLE_PINNED] && (const void *)lm->embed16 >= lm->plan.arena[QL_ROLE_PINNED] &&
             (const char *)lm->embed16 < (const char *)lm->plan.arena[QL_ROLE_PINNED] + lm->plan.bytes[QL_ROLE_PINNED])
        ql_be(be, mapped, lm->embed16, (const void **)&lm->embed16); /* in the pinned arena */
    be->precision = lm->precision;
    be->scratch = lm->scratch;
    be->scratch_bytes = lm->scratch_bytes;
    ql_lora *lora = lm->lora;
    if (lora && lm->pairs != lora->pairs) {
        for (int j = 0; j < lora->n_layers * QL_MOD_COUNT; j++) {
            const ql_lora_pair *h = &lora->pairs[j];
            ql_lora_pair *d = &lm->pairs[j];
            *d = *h;
            if (!h->A) continue;
            d->A = lm->params + (h->A - lora->params);
            d->B = lm->params + (h->B - lora->params);
            d->dA = lm->grads ? lm->grads + (h->dA - lora->grads) : NULL;
            d->dB = lm->grads ? lm->grads + (h->dB - lora->grads) : NULL;
            if (lm->page_grads) { /* layer i's in gbuf[i & 1] */
                const int i = j / QL_MOD_COUNT;
                float *g = lm->gbuf[i & 1] - lm->goff[i];
                d->dA = g + (h->dA - lora->grads);
                d->dB = g + (h->dB - lora->grads);
            }
        }
        ql_be(be, upload, lm->params, lora->params, lora->n_params * sizeof(float));
    }
    if (lm->opt_m && !lm->paged) {
        ql_be(be, upload, lm->opt_m, lm->opt->m, lm->opt->n * sizeof(float));
        ql_be(be, upload, lm->opt_v, lm->opt->v, lm->opt->n * sizeof(float));
    }
    if (lm->paged) { /* the moments stay in opt's arrays, page-locked for queued copies */
        if (ql_be(be, pin, lm->opt->m, lm->opt->n * sizeof(float)) == QL_OK) lm->pinned_m = lm->opt->m;
        if (ql_be(be, pin, lm->opt->v, lm->opt->n * sizeof(float)) == QL_OK) lm->pinned_v = lm->opt->v;
        lm->opt_m2 = lm->opt_m + lm->chunk;
        lm->opt_v2 = lm->opt_v + lm->chunk;
        lm->grads_zero = 1; /* the gradients start from zeros (ql_lora_model_zero_grads) */
    }
    if (lm->page_grads) { /* so are the gradients, in lora's array */
        if (ql_be(be, pin, lora->grads, lora->n_params * sizeof(float)) == QL_OK) lm->pinned_g = lora->grads;
        ql_be(be, zero, lm->ss, (size_t)lm->c->n_layers * sizeof(double));
    }
    return ql_be_check(be);
}

int ql_lora_model_push_params(ql_lora_model *lm)
{
    if (!lm->lora || lm->params == lm->lora->params || !lm->params) return QL_OK;
    int rc = ql_be_check(lm->ctx); /* a queued optimizer step is done */
    if (rc) return rc;
    ql_be(lm->ctx, upload, lm->params, lm->lora->params, lm->lora->n_params * sizeof(float));
    return ql_be_check(lm->ctx);
}

int ql_optim_parse(const char *name, const ql_backend *be, int *out)
{
    int o;
    if (!name || !strcmp(name, "auto") || !strcmp(name, "paged_adamw") || !strcmp(name, "paged_adamw_32bit"))
        o = QL_OPTIM_PAGED;
    else if (!strcmp(name, "adamw")) o = QL_OPTIM_DEVICE;
    else return ql_error(QL_EINVAL, "unknown optimizer '%s': use adamw, paged_adamw (paged_adamw_32bit) or auto", name);
    *out = be->host_memory ? QL_OPTIM_HOST : o;
    return QL_OK;
}

int ql_offload_parse(const char *name, int *out)
{
    if (!name || !strcmp(name, "auto")) *out = 0;
    else if (!strcmp(name, "on")) *out = 1;
    else if (!strcmp(name, "off")) *out = -1;
    else return ql_error(QL_EINVAL, "--offload %s: use on, off or auto", name);
    return QL_OK;
}

const char *ql_optim_name(int optimizer)
{
    return optimizer == QL_OPTIM_PAGED ? "paged_adamw" : optimizer == QL_OPTIM_DEVICE ? "adamw" : "adamw (host)";
}

int ql_lora_model_clip_grads(ql_lora_model *lm, double max_norm, double *norm)
{
    ql_lora *lora = lm->lora;
    if (!lora) return ql_error(QL_EINVAL, "clipping needs LoRA gradients");
    if (!lm->opt_m) {
        int rc = ql_lora_model_pull_grads(lm);
        if (rc == QL_OK) *norm = ql_clip_grad_norm(lora->grads, lora->n_params, max_norm);
        return rc;
    }
    /* ql_clip_grad_norm's arithmetic, the sum in another order: each
     * layer's sum of squares (paged gradients: made in their backward), then
     * their sum in layer order on the host */
    ql_be_ctx *be = lm->ctx;
    const int nl = lm->c->n_layers;
    if (lm->paged && lm->grads_zero) { /* no backward since they were zeroed */
        *norm = 0;
        lm->gclip = 0;
        return ql_be_check(be);
    }
    for (int i = 0; !lm->page_grads && i < nl; i++)
        ql_be(be, sum_squares_into, lm->ss + i, lm->ss_parts, lm->grads + lm->goff[i], lm->goff[i + 1] - lm->goff[i]);
    double *part = malloc((size_t)nl * sizeof *part), ss = 0;
    if (!part) return ql_error(QL_ENOMEM, "out of memory");
    int rc = ql_be(be, download, part, lm->ss, (size_t)nl * sizeof *part);
    for (int i = 0; rc == QL_OK && i < nl; i++) ss += part[i];
    free(part);
    if (rc) return ql_be_check(be);
    *norm = sqrt(ss);
    const int clip = max_norm > 0 && *norm > max_norm;
    const float coef = clip ? (float)(max_norm / (*norm + 1e-6)) : 1.0f;
    if (lm->page_grads) { /* scaled as the optimizer loads them */
        lm->gclip = clip;
        lm->gscale = coef;
        return QL_OK;
    }
    if (clip) ql_be(be, scale, lm->grads, coef, (int64_t)lora->n_params);
    return ql_be_check(be);
}

int ql_lora_model_optimizer_step(ql_lora_model *lm, ql_adamw *opt, float lr)
{
    ql_lora *lora = lm->lora;
    if (!lora || opt->n != lora->n_params)
        return ql_error(QL_EINVAL, "an optimizer of %zu values for %zu LoRA parameters", opt->n,
                        lora ? lora->n_params : 0);
    if (!lm->opt_m) {
        ql_adamw_update(opt, lora->params, lora->grads, lr);
        return ql_lora_model_push_params(lm);
    }
    ql_adamw_scalars h;
    ql_adamw_scalars_next(opt, lr, &h);
    if (!lm->paged) {
        ql_be(lm->ctx, adamw, lm->params, lm->opt_m, lm->opt_v, lm->grads, (int64_t)lora->n_params, &h);
        return ql_be_check(lm->ctx);
    }
    if (opt->m != lm->pinned_m || opt->v != lm->pinned_v || (lm->page_grads && lora->grads != lm->pinned_g))
        return ql_error(QL_EINVAL, "the paged optimizer was planned for another AdamW state");
    /* paged: a layer at a time on the optimizer's queue, its moments (and
     * paged gradients) in, the step, the moments out; layer i in slot i & 1,
     * refilled only after the copies out of layer i - 2 (one queue).  Not
     * waited for: the next step's forward waits for each layer's update
     * (EV_OPT), anything else that reads the parameters or moments
     * synchronizes first. */
    ql_be_ctx *be = lm->ctx;
    if (be->status) return ql_be_check(be);
    ql_be(be, event, EV_OPT_START, 0); /* after the backward and the clipping */
    be->queue = 3;
    ql_be(be, event, EV_OPT_START, 1);
    if (lm->grads && lm->grads_zero) ql_be(be, zero, lm->grads, lora->n_params * sizeof(float));
    for (int i = 0; i < lm->c->n_layers; i++) {
        const int64_t off = lm->goff[i], k = lm->goff[i + 1] - off;
        if (k == 0) continue;
        float *m = i & 1 ? lm->opt_m2 : lm->opt_m, *v = i & 1 ? lm->opt_v2 : lm->opt_v;
        const float *g = lm->grads ? lm->grads + off : NULL;
        ql_be(be, upload, m, opt->m + off, (size_t)k * sizeof(float));
        ql_be(be, upload, v, opt->v + off, (size_t)k * sizeof(float));
        if (lm->page_grads) {
            float *gb = lm->gbuf[i & 1];
            if (lm->grads_zero) ql_be(be, zero, gb, (size_t)k * sizeof(float));
            else ql_be(be, upload, gb, lora->grads + off, (size_t)k * sizeof(float));
            if (lm->gclip) ql_be(be, scale, gb, lm->gscale, k);
            g = gb;
        }
        ql_be(be, adamw, lm->params + off, m, v, g, k, &h);
        ql_be(be, event, EV_OPT + i % EV_OPT_RING, 0);
        ql_be(be, download_async, opt->m + off, m, (size_t)k * sizeof(float));
        ql_be(be, download_async, opt->v + off, v, (size_t)k * sizeof(float));
    }
    be->queue = 0;
    return be->status ? ql_be_check(be) : QL_OK;
}

int ql_lora_model_pull_state(ql_lora_model *lm, ql_adamw *opt)
{
    ql_lora *lora = lm->lora;
    if (!lora || lm->params == lora->params) return QL_OK;
    int rc = ql_be_check(lm->ctx); /* a queued optimizer step is done */
    if (rc) return rc;
    ql_be(lm->ctx, download, lora->params, lm->params, lora->n_params * sizeof(float));
    if (lm->opt_m && opt && !lm->paged) {
        ql_be(lm->ctx, download, opt->m, lm->opt_m, opt->n * sizeof(float));
        ql_be(lm->ctx, download, opt->v, lm->opt_v, opt->n * sizeof(float));
    }
    return ql_be_check(lm->ctx);
}

int ql_lora_model_push_state(ql_lora_model *lm, const ql_adamw *opt)
{
    int rc = ql_lora_model_push_params(lm);
    if (rc || !lm->opt_m || !opt || lm->paged) return rc; /* paged: the moments are read from opt every step */
    ql_be(lm->ctx, upload, lm->opt_m, opt->m, opt->n * sizeof(float));
    ql_be(lm->ctx, upload, lm->opt_v, opt->v, opt->n * sizeof(float));
    return ql_be_check(lm->ctx);
}

int ql_lora_model_zero_grads(ql_lora_model *lm)
{
    if (!lm->lora) return QL_OK;
    /* paged: the next backward starts each layer from zeros (the queued
     * optimizer step may still read the gradients on the device) */
    if (lm->paged) {
        lm->grads_zero = 1;
        lm->gclip = 0;
        if (lm->page_grads) ql_be(lm->ctx, zero, lm->ss, (size_t)lm->c->n_layers * sizeof(double));
        return lm->ctx->status ? ql_be_check(lm->ctx) : QL_OK; /* no synchronization: the optimizer step runs on */
    }
    if (lm->grads == lm->lora->grads || !lm->grads) {
        memset(lm->lora->grads, 0, lm->lora->n_params * sizeof(float));
        return QL_OK;
    }
    ql_be(lm->ctx, zero, lm->grads, lm->lora->n_params * sizeof(float));
    return ql_be_check(lm->ctx);
}

int ql_lora_model_pull_grads(ql_lora_model *lm)
{
    if (lm->page_grads) { /* in lora->grads once the queued copies are done */
        int rc = ql_be_check(lm->ctx);
        if (rc == QL_OK && lm->grads_zero) memset(lm->lora->grads, 0, lm->lora->n_params * sizeof(float));
        return rc;
    }
    if (!lm->lora || lm->grads == lm->lora->grads || !lm->grads) return QL_OK;
    if (lm->paged && lm->grads_zero) { /* no backward since they were zeroed */
        memset(lm->lora->grads, 0, lm->lora->n_params * sizeof(float));
        return ql_be_check(lm->ctx);
    }
    ql_be(lm->ctx, download, lm->lora->grads, lm->grads, lm->lora->n_params * sizeof(float));
    return ql_be_check(lm->ctx);
}

/* [n_layers + 1]: where each layer's LoRA parameters (and gradients) start
 * in lora->params (ql_lora_create lays them out a layer after another) */
static int64_t *layer_offsets(const ql_lora_model *lm)
{
    const ql_lora *lora = lm->lora;
    const int nl = lm->c->n_layers;
    int64_t *off = calloc((size_t)nl + 1, sizeof *off);
    if (!off) return NULL;
    for (int i = 0; i < nl; i++) {
        off[i + 1] = off[i];
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_lora_pair *pr = &lora->pairs[i * QL_MOD_COUNT + k];
            if (!pr->A) continue;
            off[i + 1] += (int64_t)lora->cfg.r * (pr->in + pr->out);
        }
    }
    return off;
}

static void plan_acts(ql_lora_model *lm, layer_acts *a, int layer, const dims *d, int64_t B)
{
    ql_plan *p = &lm->plan;
    const int64_t R = d->R;
    int A = QL_ROLE_ACTS;
    a->x = NULL; /* points at inputs[layer] during a step */
    ql_plan_add(p, A, (void **)&a->xn1, R * d->H, 4);
    ql_plan_add(p, A, (void **)&a->rstd1, R, 4);
    ql_plan_add(p, A, (void **)&a->q, R * d->qd, 4);
    ql_plan_add(p, A, (void **)&a->k, R * d->kvd, 4);
    ql_plan_add(p, A, (void **)&a->v, R * d->kvd, 4);
    a->qpre = a->kpre = a->rstdq = a->rstdk = NULL;
    if (lm->c->qk_norm) {
        ql_plan_add(p, A, (void **)&a->qpre, R * d->qd, 4);
        ql_plan_add(p, A, (void **)&a->kpre, R * d->kvd, 4);
        ql_plan_add(p, A, (void **)&a->rstdq, R * d->nh, 4);
        ql_plan_add(p, A, (void **)&a->rstdk, R * d->nkv, 4);
    }
    a->probs = NULL; /* generation (a KV cache) runs attention_forward, which keeps nothing */
    if (!lm->kv_cap)
        ql_plan_add(p, A, (void **)&a->probs, ql_be_attention_floats(lm->ctx->be, lm->precision, 0, B, d->T, d->nh),
                    4);
    ql_plan_add(p, A, (void **)&a->att, R * d->qd, 4);
    ql_plan_add(p, A, (void **)&a->xmid, R * d->H, 4);
    ql_plan_add(p, A, (void **)&a->xn2, R * d->H, 4);
    ql_plan_add(p, A, (void **)&a->rstd2, R, 4);
    ql_plan_add(p, A, (void **)&a->gate, R * d->I, 4);
    ql_plan_add(p, A, (void **)&a->up, R * d->I, 4);
    ql_plan_add(p, A, (void **)&a->hm, R * d->I, 4);
    for (int k = 0; k < QL_MOD_COUNT; k++) {
        a->h[k] = NULL;
        if (!lm->lora || !lm->lora->pairs[layer * QL_MOD_COUNT + k].A) continue;
        ql_plan_add(p, A, (void **)&a->h[k], R * d->r, 4);
    }
}

static void set_dims(dims *d, const ql_llama_config *c, const ql_lora *lora, int64_t B, int64_t T)
{
    d->T = T;
    d->R = B * T;
    d->H = c->hidden;
    d->I = c->intermediate;
    d->hd = c->head_dim;
    d->nh = c->n_heads;
    d->nkv = c->n_kv_heads;
    d->qd = (int64_t)d->nh * d->hd;
    d->kvd = (int64_t)d->nkv * d->hd;
    d->V = c->vocab;
    d->r = lora ? lora->cfg.r : 0;
}

int ql_lora_model_create(ql_llama *m, ql_lora *lora, ql_be_ctx *bctx, const ql_lora_model_opts *o,
                         ql_lora_model **out)
{
    *out = NULL;
    const ql_llama_config *c = ql_llama_get_config(m);
    if (o->batch < 1 || o->max_len < 1)
        return ql_error(QL_EINVAL, "a micro-batch needs at least one sequence of one token (batch %d, length %d)",
                        o->batch, o->max_len);
    ql_lora_model *lm = calloc(1, sizeof *lm);
    if (!lm) return ql_error(QL_ENOMEM, "out of memory");
    lm->m = m;
    lm->lora = lora;
    lm->c = c;
    lm->ctx = bctx ? bctx : ql_llama_ctx(m);
    lm->Bmax = o->batch;
    lm->Tmax = o->max_len;
    lm->backward = o->backward && lora;
    lm->precision = o->precision;
    lm->opt = o->opt;
    lm->checkpointing = o->checkpointing;
    lm->keep_all = lm->backward && !o->checkpointing;
    const int nl = c->n_layers;
    if (o->kv_capacity > 0 && lm->backward) {
        free(lm);
        return ql_error(QL_EINVAL, "a key/value cache is for generation: forward only");
    }
    lm->kv_cap = o->kv_capacity > 0 ? o->kv_capacity : 0;
    if (o->merge && (lm->backward || o->precision != QL_PREC_FP32 || o->prefetch > 0)) {
        free(lm);
        return ql_error(QL_EINVAL, "a plan for merging is float32, forward only, without prefetching");
    }
    lm->merge = o->merge;
    lm->acts = calloc((size_t)(lm->keep_all ? nl : 1), sizeof *lm->acts);
    lm->inputs = calloc((size_t)nl + 1, sizeof *lm->inputs);
    /* bf16 checkpointing keeps the layer inputs in bf16 (they are bf16 values) */
    const int store16 = lm->backward && o->checkpointing && o->precision == QL_PREC_BF16;
    if (store16) lm->in16 = calloc((size_t)nl, sizeof *lm->in16);
    if (!lm->acts || !lm->inputs || (store16 && !lm->in16)) {
        ql_lora_model_destroy(lm);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    dims d;
    const int64_t B = o->batch, T = o->max_len;
    set_dims(&d, c, lora, B, T);
    const int offload_on = o->offload > 0 || (o->offload == 0 && !lm->ctx->be->host_memory);
    lm->offload_on = offload_on;
    ql_plan *p = &lm->plan;
    ql_plan_init(p, lm->ctx);
    int n_mod = 0;
    for (int k = 0; k < QL_MOD_COUNT; k++) n_mod += lora && (lora->cfg.modules >> k & 1);
    if (lora)
        snprintf(p->shape, sizeof p->shape, "batch %d x %d tokens, gradient checkpointing %s, LoRA r %d on %d modules, "
                 "dropout %g%s", o->batch, o->max_len, o->checkpointing ? "on" : "off", lora->cfg.r, n_mod,
                 (double)lora->cfg.dropout, lm->backward ? "" : ", forward only");
    else snprintf(p->shape, sizeof p->shape, "batch %d x %d tokens, base model, forward only", o->batch, o->max_len);
    snprintf(p->advice, sizeof p->advice, "; reduce --batch-size (%d) or --max-len (%d)%s", o->batch, o->max_len,
             lm->keep_all ? ", or turn on --gradient-checkpointing" : "");
    int64_t maxw = 0;
    int rc = plan_weights(lm, &maxw);
    if (rc) {
        ql_lora_model_destroy(lm);
        return rc;
    }
    for (int i = 0; lm->merge && i < nl; i++) /* merging: the dense linears go through w too */
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_linear *l = layer_linear(&ql_llama_layers(m)[i], k);
            if (l->out * l->in > maxw) maxw = l->out * l->in;
        }
    /* the optimizer's moments: in the plan with the device optimizer, else
     * host memory (beside a device plan) */
    if (o->opt) {
        if (lm->ctx->be->host_memory) ql_plan_held(p, QL_ROLE_OPTIM, (uint64_t)o->opt->n * 8);
        else if (o->optimizer == QL_OPTIM_DEVICE && lm->backward) {
            ql_plan_add(p, QL_ROLE_OPTIM, (void **)&lm->opt_m, (int64_t)o->opt->n, 4);
            ql_plan_add(p, QL_ROLE_OPTIM, (void **)&lm->opt_v, (int64_t)o->opt->n, 4);
        } else if (o->optimizer == QL_OPTIM_PAGED && lm->backward) {
            /* a layer at a time, in two slots (layer i in slot i & 1) */
            lm->paged = 1;
            if (!(lm->goff = layer_offsets(lm))) {
                ql_lora_model_destroy(lm);
                return ql_error(QL_ENOMEM, "out of memory");
            }
            lm->chunk = 1;
            for (int i = 0; i < nl; i++)
                if (lm->goff[i + 1] - lm->goff[i] > lm->chunk) lm->chunk = lm->goff[i + 1] - lm->goff[i];
            lm->chunk = (lm->chunk + 63) / 64 * 64; /* slot 1 aligned as the plan aligns its buffers */
            ql_plan_add(p, QL_ROLE_OPTIM, (void **)&lm->opt_m, 2 * lm->chunk, 4);
            ql_plan_add(p, QL_ROLE_OPTIM, (void **)&lm->opt_v, 2 * lm->chunk, 4);
            lm->page_grads = offload_on;
        } else ql_plan_held_host(p, QL_ROLE_OPTIM, (uint64_t)o->opt->n * 8);
    }
    if (lora && lm->backward && !lm->ctx->be->host_memory) {
        if (!lm->goff && !(lm->goff = layer_offsets(lm))) {
            ql_lora_model_destroy(lm);
            return ql_error(QL_ENOMEM, "out of memory");
        }
        if (lm->page_grads) { /* two layers' gradients; the rest in lora->grads */
            ql_plan_add(p, QL_ROLE_GRADS, (void **)&lm->gbuf[0], lm->chunk, 4);
            ql_plan_add(p, QL_ROLE_GRADS, (void **)&lm->gbuf[1], lm->chunk, 4);
        } else ql_plan_add(p, QL_ROLE_GRADS, (void **)&lm->grads, (int64_t)lora->n_params, 4);
        /* each layer's sum of squares, for the clipping's norm (both ways the same bits) */
        ql_plan_add(p, QL_ROLE_GRADS, (void **)&lm->ss, nl, 8);
        ql_plan_add(p, QL_ROLE_GRADS, (void **)&lm->ss_parts, QL_BE_SUMSQ_PARTS, 8);
    }

    /* the layer inputs: all of them in float32 for the backward, or two that
     * alternate (forward only; bf16 checkpointing, which keeps bf16 copies) */
    lm->n_inputs = lm->backward && !store16 ? nl + 1 : 2;
    for (int i = 0; i < lm->n_inputs; i++) ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->inputs[i], d.R * d.H, 4);
    lm->offload = store16 && offload_on;
    for (int i = 0; store16 && i < nl; i++)
        ql_plan_add(p, lm->offload ? QL_ROLE_PINNED : QL_ROLE_ACTS, (void **)&lm->in16[i], d.R * d.H, 2);
    for (int i = 0; lm->offload && i < 2; i++) ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->stage16[i], d.R * d.H, 2);
    for (int i = 0; i < (lm->keep_all ? nl : 1); i++) plan_acts(lm, &lm->acts[i], i, &d, B);
    ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->xnf, d.R * d.H, 4);
    ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->rstdf, d.R, 4);
    if (lm->kv_cap) {
        /* [n_layers, batch, kv_cap, kvd]: a row of the cache per sequence */
        ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->kv_k, (int64_t)nl * B * lm->kv_cap * d.kvd, 4);
        ql_plan_add(p, QL_ROLE_ACTS, (void **)&lm->kv_v, (int64_t)nl * B * lm->kv_cap * d.kvd, 4);
        snprintf(p->shape + strlen(p->shape), sizeof p->shape - strlen(p->shape), ", a %d-position KV cache%s",
                 lm->kv_cap, B > 1 ? " a sequence" : "");
    }
    if (lm->backward) {
        bwd_scratch *s = &lm->s;
        int S = QL_ROLE_BWD;
        ql_plan_add(p, S, (void **)&s->dhm, d.R * d.I, 4);
        /* With checkpointing (one layer's activations) the backward reuses
         * activations it has read for the last time (set once the plan is
         * allocated, below): dup
         * takes hm's place (down's backward has read it); datt and dq take
         * gate's, dk and dv up's (SwiGLU's backward has read them). */
        lm->alias = !lm->keep_all && 2 * d.qd <= d.I && 2 * d.kvd <= d.I;
        if (!lm->alias) {
            ql_plan_add(p, S, (void **)&s->dup, d.R * d.I, 4);
            ql_plan_add(p, S, (void **)&s->datt, d.R * d.qd, 4);
            ql_plan_add(p, S, (void **)&s->dq, d.R * d.qd, 4);
            ql_plan_add(p, S, (void **)&s->dk, d.R * d.kvd, 4);
            ql_plan_add(p, S, (void **)&s->dv, d.R * d.kvd, 4);
        }
        ql_plan_add(p, S, (void **)&s->dxn, d.R * d.H, 4);
        if (c->qk_norm) {
            ql_plan_add(p, S, (void **)&s->dqpre, d.R * d.qd, 4);
            ql_plan_add(p, S, (void **)&s->dkpre, d.R * d.kvd, 4);
        }
        ql_plan_add(p, S, (void **)&s->dscores, ql_be_attention_floats(lm->ctx->be, lm->precision, 1, B, T, d.nh), 4);
        ql_plan_add(p, S, (void **)&s->dh, d.R * (d.r > 0 ? d.r : 1), 4);
        int64_t widest = d.I > d.qd ? d.I : d.qd;
        if (d.H > widest) widest = d.H;
        if (lora && lora->cfg.dropout > 0) ql_plan_add(p, S, (void **)&s->xd, d.R * widest, 4);
        ql_plan_add(p, S, (void **)&s->dmid, d.R * d.H, 4);
        ql_plan_add(p, S, (void **)&s->grad, d.R * d.H, 4);
        ql_plan_add(p, S, (void **)&s->grad2, d.R * d.H, 4);
    }
    /* one materialized matrix: bf16 in bf16 precision */
    ql_plan_add(p, QL_ROLE_WEIGHTS, (void **)&lm->w, maxw, lm->precision == QL_PREC_BF16 ? 2 : 4);
    lm->held[0] = lm->held[1] = -1;
    if (maxw > 0 && !lm->merge &&
        (o->prefetch > 0 || (o->prefetch == 0 && !lm->ctx->be->host_memory && !lm->slow_path))) {
        ql_plan_add(p, QL_ROLE_WEIGHTS, (void **)&lm->w2, maxw, lm->precision == QL_PREC_BF16 ? 2 : 4);
        ql_plan_add(p, QL_ROLE_WEIGHTS, &lm->mat_ws2, (int64_t)lm->mat_ws_bytes, 1);
    }
    if (lm->precision == QL_PREC_BF16) { /* the backend's rounded operands */
        int64_t io = d.H > d.I ? d.H : d.I;
        if (d.qd > io) io = d.qd;
        const int64_t lr = o->logit_rows > 0 ? o->logit_rows : LOGIT_CHUNK_BYTES / ((int64_t)d.V * 4);
        const int64_t widest = lm->ctx->be->host_memory ? (maxw > d.V * d.H ? maxw : d.V * d.H) : 0;
        size_t a = ql_be_scratch_bytes(lm->ctx->be, QL_PREC_BF16, d.R, io, io, widest, T, d.nh, d.nkv, (int)d.hd, d.r),
               b = ql_be_scratch_bytes(lm->ctx->be, QL_PREC_BF16, lr < d.R ? lr : d.R, d.H, d.V, widest, 1, 1, 1, 1, 0);
        lm->scratch_bytes = a > b ? a : b;
        ql_plan_add(p, QL_ROLE_WEIGHTS, &lm->scratch, (int64_t)lm->scratch_bytes, 1);
    }
    lm->logit_rows = o->logit_rows > 0 ? o->logit_rows : LOGIT_CHUNK_BYTES / ((int64_t)d.V * 4);
    if (lm->logit_rows < 1) lm->logit_rows = 1;
    if (lm->logit_rows > d.R) lm->logit_rows = d.R;
    ql_plan_add(p, QL_ROLE_LOGITS, (void **)&lm->logits, lm->logit_rows * d.V, 4);
    int H = QL_ROLE_HOST;
    ql_plan_add(p, H, (void **)&lm->h_ids, d.R, 4);
    ql_plan_add(p, H, (void **)&lm->h_labels, d.R, 4);
    ql_plan_add(p, H, (void **)&lm->targets, d.R, 4);
    ql_plan_add(p, H, (void **)&lm->losses, d.R, 4);
    ql_plan_add(p, H, (void **)&lm->h_len, B, 4);
    ql_plan_add(p, H, (void **)&lm->h_seeds, 2 * B, 8); /* sequence seeds, then one module's */
    ql_plan_add(p, H, (void **)&lm->inv_freq, B * (d.hd / 2), 4);
    rc = o->allocate ? ql_plan_alloc(p) : QL_OK;
    if (rc == QL_OK && o->allocate && lm->alias) { /* after the plan has placed the activations */
        layer_acts *a = &lm->acts[0];
        lm->s.dup = a->hm;
        lm->s.datt = a->gate;
        lm->s.dq = a->gate + d.R * d.qd;
        lm->s.dk = a->up;
        lm->s.dv = a->up + d.R * d.kvd;
    }
    if (rc == QL_OK && o->allocate) rc = fill_weights(lm);
    if (rc) {
        ql_lora_model_destroy(lm);
        return rc;
    }
    *out = lm;
    return QL_OK;
}

void ql_lora_model_destroy(ql_lora_model *lm)
{
    if (!lm) return;
    if (lm->ctx) {
        if (lm->ctx->be->sync) lm->ctx->be->sync(lm->ctx); /* no queued copy still reads what is freed */
        lm->ctx->be->unpin(lm->ctx, lm->pinned_m);
        lm->ctx->be->unpin(lm->ctx, lm->pinned_v);
        lm->ctx->be->unpin(lm->ctx, lm->pinned_g);
    }
    ql_plan_free(&lm->plan);
    for (size_t i = 0; i < lm->n_ups; i++)
        if (lm->ups[i].owned) free((void *)lm->ups[i].src);
    if (lm->ctx && lm->ctx->scratch == lm->scratch && lm->scratch) {
        lm->ctx->scratch = NULL;
        lm->ctx->scratch_bytes = 0;
    }
    if (lm->lora && lm->pairs != lm->lora->pairs) free(lm->pairs);
    free(lm->layers);
    free(lm->ups);
    free(lm->acts);
    free(lm->inputs);
    free(lm->in16);
    free(lm->goff);
    free(lm->seq[0].ids);
    free(lm->seq[1].ids);
    free(lm);
}

void ql_lora_model_print_plan(const ql_lora_model *lm, FILE *f) { ql_plan_print(&lm->plan, f); }

uint64_t ql_lora_model_plan_bytes(const ql_lora_model *lm, int role)
{
    if (role == -2) return ql_plan_backend_bytes(&lm->plan);
    return role < 0 ? ql_plan_total(&lm->plan) : role < QL_ROLE_COUNT ? lm->plan.bytes[role] : 0;
}

int ql_lora_model_gather(ql_lora_model *lm, const ql_example *const *ex, int n, const uint64_t *seeds,
                         ql_lora_batch *out)
{
    if (!lm->h_ids) return ql_error(QL_EINVAL, "the model's memory plan was not allocated (a dry run)");
    if (n < 1 || n > lm->Bmax)
        return ql_error(QL_EINVAL, "micro-batch of %d sequences: the plan is for 1 to %d", n, lm->Bmax);
    int T = 0;
    for (int b = 0; b < n; b++)
        if (ex[b]->len > T) T = ex[b]->len;
    if (T > lm->Tmax)
        return ql_error(QL_EINVAL, "sequence of %d tokens: the memory plan is for at most %d", T, lm->Tmax);
    uint64_t *sd = lm->h_seeds + lm->Bmax;
    for (int b = 0; b < n; b++) {
        int32_t len = ex[b]->len;
        lm->h_len[b] = len;
        sd[b] = seeds ? seeds[b] : 0;
        memcpy(lm->h_ids + (int64_t)b * T, ex[b]->ids, (size_t)len * 4);
        memcpy(lm->h_labels + (int64_t)b * T, ex[b]->labels, (size_t)len * 4);
        for (int t = len; t < T; t++) {
            lm->h_ids[(int64_t)b * T + t] = 0;
            lm->h_labels[(int64_t)b * T + t] = QL_IGNORE_INDEX;
        }
    }
    *out = (ql_lora_batch){.B = n, .T = T, .ids = lm->h_ids, .labels = lm->h_labels, .len = lm->h_len,
                           .dropout_seeds = sd};
    return QL_OK;
}

/* ---- the step ---- */

/* The copy queue, from here on, after what the main queue has queued so far
 * (event `slot` recorded there, waited for here); back with be->queue = 0. */
static void to_copy_queue(ql_be_ctx *be, int slot)
{
    ql_be(be, event, slot, 0);
    be->queue = 2;
    ql_be(be, event, slot, 1);
}

/* Offloading: layer i's input rounded to bf16 into stage16[i & 1] (once the
 * copy that last used that buffer is done), then copied to the host on the
 * copy queue, except for the last two layers, whose copies the backward
 * finds still in their buffers. */
static void save_input(ql_lora_model *lm, int i, float *x, int64_t n)
{
    ql_be_ctx *be = lm->ctx;
    const int b = i & 1;
    ql_be(be, event, EV_MOVED + b, 1);
    ql_be(be, round_bf16, lm->stage16[b], x, n);
    if (i >= lm->c->n_layers - 2) return;
    to_copy_queue(be, EV_STAGED + b);
    ql_be(be, download_async, lm->in16[i], lm->stage16[b], (size_t)n * 2);
    ql_be(be, event, EV_MOVED + b, 0);
    be->queue = 0;
}

/* Paged gradients: layer i's gradients so far into gbuf[i & 1] (zeros
 * after ql_lora_model_zero_grads) on the copy queue, once the main queue is
 * at the layer (the buffer's last reader, the optimizer or layer i + 2, is
 * done); the layer's LoRA backward waits for EV_GIN. */
static void grads_in(ql_lora_model *lm, int i)
{
    ql_be_ctx *be = lm->ctx;
    const int b = i & 1;
    const int64_t off = lm->goff[i], k = lm->goff[i + 1] - off;
    if (k == 0) return;
    to_copy_queue(be, EV_GFREE + b);
    if (lm->grads_zero) ql_be(be, zero, lm->gbuf[b], (size_t)k * sizeof(float));
    else ql_be(be, upload, lm->gbuf[b], lm->lora->grads + off, (size_t)k * sizeof(float));
    ql_be(be, event, EV_GIN + b, 0);
    be->queue = 0;
}

/* ... and after its backward, their sum of squares into ss[i] and the
 * gradients back to lora->grads on the copy queue */
static void grads_out(ql_lora_model *lm, int i)
{
    ql_be_ctx *be = lm->ctx;
    const int b = i & 1;
    const int64_t off = lm->goff[i], k = lm->goff[i + 1] - off;
    if (k == 0) return;
    ql_be(be, sum_squares_into, lm->ss + i, lm->ss_parts, lm->gbuf[b], k);
    to_copy_queue(be, EV_GDONE + b);
    ql_be(be, download_async, lm->lora->grads + off, lm->gbuf[b], (size_t)k * sizeof(float));
    be->queue = 0;
}

/* The backward's layer i: its input widened from stage16[i & 1] (once the
 * copy into it is done), then layer i - 2's copy into that buffer. */
static void restore_input(ql_lora_model *lm, int i, float *x, int64_t n)
{
    ql_be_ctx *be = lm->ctx;
    const int b = i & 1;
    ql_be(be, event, EV_MOVED + b, 1);
    ql_be(be, widen_bf16, x, lm->stage16[b], n);
    if (i < 2) return;
    to_copy_queue(be, EV_STAGED + b);
    ql_be(be, upload, lm->stage16[b], lm->in16[i - 2], (size_t)n * 2);
    ql_be(be, event, EV_MOVED + b, 0);
    be->queue = 0;
}

static int step(ql_lora_model *lm, const ql_lora_batch *mb, const ql_lora_step_opts *opts, double *loss_sum,
                int64_t *n_targets)
{
    const ql_llama_config *c = lm->c;
    ql_llama *m = lm->m;
    if (!lm->h_ids) return ql_error(QL_EINVAL, "the model's memory plan was not allocated (a dry run)");
    if (mb->B < 1 || mb->B > lm->Bmax || mb->T < 1 || mb->T > lm->Tmax)
        return ql_error(QL_EINVAL, "micro-batch of %d x %d tokens: the memory plan is for at most %d x %d", mb->B,
                        mb->T, lm->Bmax, lm->Tmax);
    int backward = opts->backward && lm->lora;
    if (backward && !lm->backward)
        return ql_error(QL_EINVAL, "backward step on a model planned for the forward pass only");
    for (int b = 0; b < mb->B; b++) {
        const int len = mb->len[b];
        const int32_t *ids = mb->ids + (int64_t)b * mb->T;
        if (len < 0 || len > mb->T)
            return ql_error(QL_EINVAL, "sequence %d of the micro-batch has length %d, outside 0..%d", b, len, mb->T);
        if (len > c->max_len)
            return ql_error(QL_EINVAL, "sequence of %d tokens exceeds the model's %d positions", len, c->max_len);
        for (int t = 0; t < len; t++)
            if (ids[t] < 0 || ids[t] >= c->vocab)
                return ql_error(QL_EINVAL, "token id %d at position %d is outside the vocabulary (%d)", ids[t], t,
                                c->vocab);
    }
    ctx x = {.lm = lm, .be = lm->ctx, .m = m, .lora = lm->lora, .c = c, .seq_seeds = mb->dropout_seeds,
             .seeds = lm->h_seeds};
    x.dropout = backward && lm->lora->cfg.dropout > 0;
    if (x.dropout && !mb->dropout_seeds) return ql_error(QL_EINVAL, "a dropout step needs per-sequence seeds");
    dims *d = &x.d;
    set_dims(d, c, lm->lora, mb->B, mb->T);
    x.mb = (ql_be_batch){.B = mb->B, .T = mb->T, .len = mb->len};
    /* each sequence's rotary table for its own length, in order, as one-sequence
     * steps take it (dynamic RoPE keeps the model's state; a sequence too short
     * for a loss leaves that state alone) */
    const int half = c->head_dim / 2;
    for (int b = 0; b < mb->B; b++) {
        float *tab = lm->inv_freq + (int64_t)b * half;
        if (mb->len[b] >= 2) ql_llama_rope(tab, &x.rope_scale, m, mb->len[b]);
        else ql_rope_inv_freq(tab, &x.rope_scale, &c->rope, c->head_dim, 1);
    }
    x.inv_freq = lm->inv_freq;
    const int64_t R = d->R, H = d->H, V = d->V;
    const int nl = c->n_layers;
    const int keep_all = backward && lm->keep_all;
    ql_be_ctx *be = lm->ctx;
    if (be->status) return ql_be_check(be); /* an earlier unchecked failure */

    /* targets (host): row (b, t) predicts ids[b, t+1] */
    int64_t count = 0;
    for (int b = 0; b < mb->B; b++)
        for (int64_t t = 0; t < mb->T; t++) {
            int64_t row = b * mb->T + t;
            int32_t y = QL_IGNORE_INDEX;
            if (t + 1 < mb->len[b] && mb->labels[row + 1] != QL_IGNORE_INDEX) y = mb->ids[row + 1];
            lm->targets[row] = y;
            count += y != QL_IGNORE_INDEX;
        }
    int do_backward = backward && count > 0;
    x.seqk = do_backward; /* the order of the weights: recorded by the first step of each kind */
    if (lm->seq[x.seqk].state == 0) lm->seq[x.seqk].state = 1;

    /* forward; in bf16 the residual stream is rounded to bf16 at each layer
     * boundary (backend.h), and kept as bf16 where in16 is planned */
    float *const *in = lm->inputs;
    const int alt = lm->n_inputs == 2; /* two alternating buffers: layer i's input is in[i & 1] */
    const int bf16 = lm->precision == QL_PREC_BF16;
    if (lm->embed16) ql_be(be, embedding_w16, in[0], lm->embed16, mb->ids, &x.mb, H);
    else ql_be(be, embedding, in[0], lm->embed, mb->ids, &x.mb, H);
    int rc = QL_OK;
    for (int i = 0; i < nl && rc == QL_OK; i++) {
        layer_acts *a = &lm->acts[keep_all ? i : 0];
        a->x = in[alt ? i & 1 : i];
        if (lm->paged) ql_be(be, event, EV_OPT + i % EV_OPT_RING, 1); /* the last optimizer step's update of the layer */
        if (lm->in16 && backward && lm->offload) save_input(lm, i, a->x, R * H);
        else if (lm->in16 && backward) ql_be(be, round_bf16, lm->in16[i], a->x, R * H);
        else if (bf16 && i > 0) ql_be(be, round_bf16, NULL, a->x, R * H); /* the embedding is bf16 already */
        rc = layer_fwd(&x, i, a, in[alt ? (i + 1) & 1 : i + 1]);
    }
    float *hidden = in[alt ? nl & 1 : nl]; /* the last layer's output */
    if (bf16 && nl > 0) ql_be(be, round_bf16, NULL, hidden, R * H);
    const float *final_norm = lm->final_norm, *lm_head = lm->head;
    ql_be(be, rmsnorm_forward, lm->xnf, lm->rstdf, hidden, final_norm, R, H, c->rms_eps);
    /* logits a chunk of rows at a time: loss, dlogits in place, and their
     * gradient into dxn, so [R, V] never exists whole */
    for (int64_t r0 = 0; r0 < R && !be->status; r0 += lm->logit_rows) {
        int64_t n = R - r0 < lm->logit_rows ? R - r0 : lm->logit_rows;
        if (lm->head16) ql_be(be, matmul_nt_w16, lm->logits, lm->xnf + r0 * H, lm->head16, n, H, V, 0);
        else ql_be(be, matmul_nt, lm->logits, lm->xnf + r0 * H, lm_head, n, H, V, 0);
        ql_be(be, cross_entropy, lm->losses + r0, do_backward ? lm->logits : NULL, lm->logits, lm->targets + r0, n,
              V, QL_IGNORE_INDEX, opts->loss_scale);
        if (do_backward && lm->head16)
            ql_be(be, matmul_backward_input_w16, lm->s.dxn + r0 * H, lm->logits, lm->head16, n, H, V, 0);
        else if (do_backward) ql_be(be, matmul_backward_input, lm->s.dxn + r0 * H, lm->logits, lm_head, n, H, V, 0);
    }
    if ((rc = ql_be_check(be))) return rc;
    for (int b = 0; b < mb->B; b++) {
        double sum = 0; /* as one sequence's step sums it */
        for (int64_t t = 0; t < mb->T; t++) sum += lm->losses[b * mb->T + t];
        *loss_sum += sum;
    }
    *n_targets += count;
    if (!do_backward) return QL_OK;

    /* backward: dxn -> final norm -> layers */
    bwd_scratch *s = &lm->s;
    float *grad = s->grad, *grad2 = s->grad2;
    ql_be(be, rmsnorm_backward, grad, NULL, s->dxn, hidden, final_norm, lm->rstdf, R, H, 0);
    for (int i = nl - 1; i >= 0 && rc == QL_OK; i--) {
        layer_acts *a = &lm->acts[keep_all ? i : 0];
        if (lm->page_grads) grads_in(lm, i);
        if (!keep_all) { /* recompute this layer's activations from its saved input */
            if (lm->in16) { /* widened into a free float buffer: the forward's input, bit for bit */
                a->x = in[0];
                if (lm->offload) restore_input(lm, i, a->x, R * H);
                else ql_be(be, widen_bf16, a->x, lm->in16[i], R * H);
            } else a->x = in[i];
            if ((rc = layer_fwd(&x, i, a, grad2))) break;
        }
        if (lm->page_grads) ql_be(be, event, EV_GIN + (i & 1), 1);
        else if (lm->paged && lm->grads_zero) /* zeroed here, where the last optimizer step is done with them */
            ql_be(be, zero, lm->grads + lm->goff[i], (size_t)(lm->goff[i + 1] - lm->goff[i]) * sizeof(float));
        rc = layer_bwd(&x, i, a, grad, grad2, s);
        if (lm->page_grads && rc == QL_OK) grads_out(lm, i);
        float *tmp = grad;
        grad = grad2;
        grad2 = tmp;
    }
    rc = ql_be_check(be);
    if (rc == QL_OK && lm->paged) lm->grads_zero = 0; /* every layer's gradients are made (paged: in lora->grads) */
    return rc;
}

int ql_lora_model_step(ql_lora_model *lm, const ql_lora_batch *mb, const ql_lora_step_opts *opts, double *loss_sum,
                       int64_t *n_targets)
{
    int rc = step(lm, mb, opts, loss_sum, n_targets);
    for (int k = 0; k < 2; k++) /* a recording ends with its step: kept when whole */
        if (lm->seq[k].state == 1) {
            lm->seq[k].state = rc ? 0 : 2;
            if (rc) lm->seq[k].n = 0;
        }
    if (rc) lm->held[0] = lm->held[1] = -1; /* a failed materialize may have left either buffer */
    return rc;
}

/* ---- generation ---- */

/* Cache row b of layer i: keys (or values, v = 1) [kv_cap, kvd] */
static float *kv_row(const ql_lora_model *lm, int i, int64_t b, int v, int64_t kvd)
{
    return (v ? lm->kv_v : lm->kv_k) + ((int64_t)i * lm->Bmax + b) * lm->kv_cap * kvd;
}

/* layer_fwd for the x->mb.B sequences' T new rows each at positions past..,
 * their keys and values written into each sequence's row of the cache,
 * attention over it (attention_forward).  One sequence writes its keys and
 * values into the cache directly; several go through a->k and a->v. */
static int layer_decode(ctx *x, int i, layer_acts *a, float *out, int past)
{
    const dims *d = &x->d;
    const ql_llama_config *c = x->c;
    const be_layer *L = &x->lm->layers[i];
    const ql_lora_model *lm = x->lm;
    const int window = ql_llama_layers(x->m)[i].window;
    const int64_t B = x->mb.B;
    float *kc = kv_row(lm, i, 0, 0, d->kvd), *vc = kv_row(lm, i, 0, 1, d->kvd);
    /* this call's rows: in the cache (one sequence), else staged */
    float *kn = B == 1 ? kc + (int64_t)past * d->kvd : a->k, *vn = B == 1 ? vc + (int64_t)past * d->kvd : a->v;
    int rc;
    ql_be(x->be, rmsnorm_forward, a->xn1, a->rstd1, a->x, L->attn_norm, d->R, d->H, c->rms_eps);
    float *qp = L->q_norm ? a->qpre : a->q, *kp = L->q_norm ? a->kpre : kn;
    if ((rc = linear_fwd(x, i, QL_MOD_Q, a, a->xn1, qp)) || (rc = linear_fwd(x, i, QL_MOD_K, a, a->xn1, kp)) ||
        (rc = linear_fwd(x, i, QL_MOD_V, a, a->xn1, vn)))
        return rc;
    if (L->q_norm) {
        ql_be(x->be, rmsnorm_forward, a->q, a->rstdq, a->qpre, L->q_norm, d->R * d->nh, d->hd, c->rms_eps);
        ql_be(x->be, rmsnorm_forward, kn, a->rstdk, a->kpre, L->k_norm, d->R * d->nkv, d->hd, c->rms_eps);
    }
    ql_be(x->be, rope_forward, a->q, &x->mb, d->nh, (int)d->hd, past, x->inv_freq, x->rope_scale);
    ql_be(x->be, rope_forward, kn, &x->mb, d->nkv, (int)d->hd, past, x->inv_freq, x->rope_scale);
    if (B == 1) {
        ql_be(x->be, attention_forward, a->att, a->q, kc, vc, d->T, past, d->nh, d->nkv, (int)d->hd, window);
    } else {
        /* each sequence's real rows only: the padding after them is attended
         * by nothing real (its rows of a->att are zeroed: they reach only
         * padding rows of the linears after) */
        for (int64_t b = 0; b < B; b++) {
            const int n = x->mb.len[b];
            const size_t rows = (size_t)((int64_t)n * d->kvd) * sizeof(float);
            float *kb = kv_row(lm, i, b, 0, d->kvd), *vb = kv_row(lm, i, b, 1, d->kvd);
            ql_be(x->be, copy, kb + (int64_t)past * d->kvd, kn + b * d->T * d->kvd, rows);
            ql_be(x->be, copy, vb + (int64_t)past * d->kvd, vn + b * d->T * d->kvd, rows);
            ql_be(x->be, attention_forward, a->att + b * d->T * d->qd, a->q + b * d->T * d->qd, kb, vb, n, past,
                  d->nh, d->nkv, (int)d->hd, window);
            if (n < d->T)
                ql_be(x->be, zero, a->att + (b * d->T + n) * d->qd, (size_t)((d->T - n) * d->qd) * sizeof(float));
        }
    }
    if ((rc = linear_fwd(x, i, QL_MOD_O, a, a->att, a->xmid))) return rc;
    ql_be(x->be, add_inplace, a->xmid, a->x, d->R * d->H);
    ql_be(x->be, rmsnorm_forward, a->xn2, a->rstd2, a->xmid, L->mlp_norm, d->R, d->H, c->rms_eps);
    if ((rc = linear_fwd(x, i, QL_MOD_GATE, a, a->xn2, a->gate)) || (rc = linear_fwd(x, i, QL_MOD_UP, a, a->xn2, a->up)))
        return rc;
    ql_be(x->be, swiglu_forward, a->hm, a->gate, a->up, d->R * d->I);
    if ((rc = linear_fwd(x, i, QL_MOD_DOWN, a, a->hm, out))) return rc;
    ql_be(x->be, add_inplace, out, a->xmid, d->R * d->H);
    return x->be->status;
}

/* B sequences (B <= Bmax) of T <= Tmax tokens each (tokens [B, T], right-
 * padded; len[b] of them real, or all T when len is NULL) at positions
 * lm->kv_len..; logits [B, V] of each sequence's last real token when
 * wanted.  One sequence appends to the cache (kv_len += T); several leave
 * kv_len as it was (what they wrote past it belongs to no one). */
static int decode_piece(ql_lora_model *lm, int B, const int32_t *tokens, int T, const int *len, float *logits)
{
    const ql_llama_config *c = lm->c;
    ql_llama *m = lm->m;
    const int past = lm->kv_len;
    ctx x = {.lm = lm, .be = lm->ctx, .m = m, .lora = lm->lora, .c = c, .seeds = lm->h_seeds};
    dims *d = &x.d;
    set_dims(d, c, lm->lora, B, T);
    for (int b = 0; b < B; b++) lm->h_len[b] = len ? len[b] : T;
    x.mb = (ql_be_batch){.B = B, .T = T, .len = lm->h_len};
    /* the rotary table as ql_llama_forward takes it: for every position so
     * far, the same for every sequence (they share the positions) */
    ql_llama_rope(lm->inv_freq, &x.rope_scale, m, past + T);
    const int half = (int)(d->hd / 2);
    for (int b = 1; b < B; b++) memcpy(lm->inv_freq + (int64_t)b * half, lm->inv_freq, (size_t)half * sizeof(float));
    x.inv_freq = lm->inv_freq;
    x.seqk = 0; /* the forward-only order of the weights */
    if (lm->seq[0].state == 0) lm->seq[0].state = 1;
    ql_be_ctx *be = lm->ctx;
    const int64_t R = d->R, H = d->H;
    const int nl = c->n_layers, bf16 = lm->precision == QL_PREC_BF16;
    float *const *in = lm->inputs;
    memcpy(lm->h_ids, tokens, (size_t)R * sizeof *tokens);
    if (lm->embed16) ql_be(be, embedding_w16, in[0], lm->embed16, lm->h_ids, &x.mb, H);
    else ql_be(be, embedding, in[0], lm->embed, lm->h_ids, &x.mb, H);
    int rc = QL_OK;
    for (int i = 0; i < nl && rc == QL_OK; i++) {
        layer_acts *a = &lm->acts[0];
        a->x = in[i & 1];
        if (bf16 && i > 0) ql_be(be, round_bf16, NULL, a->x, R * H); /* the embedding is bf16 already */
        rc = layer_decode(&x, i, a, in[(i + 1) & 1], past);
    }
    float *hidden = in[nl & 1];
    if (bf16 && nl > 0) ql_be(be, round_bf16, NULL, hidden, R * H);
    for (int b = 0; logits && rc == QL_OK && b < B; b++) {
        const int64_t row = (int64_t)b * T + lm->h_len[b] - 1;
        ql_be(be, rmsnorm_forward, lm->xnf, lm->rstdf, hidden + row * H, lm->final_norm, 1, H, c->rms_eps);
        if (lm->head16) ql_be(be, matmul_nt_w16, lm->logits, lm->xnf, lm->head16, 1, H, d->V, 0);
        else ql_be(be, matmul_nt, lm->logits, lm->xnf, lm->head, 1, H, d->V, 0);
        ql_be(be, download, logits + (int64_t)b * d->V, lm->logits, (size_t)d->V * sizeof *logits);
    }
    if (rc == QL_OK) rc = ql_be_check(be);
    else ql_be_check(be);
    if (lm->seq[0].state == 1) { /* a recording ends with its call: kept when whole */
        lm->seq[0].state = rc ? 0 : 2;
        if (rc) lm->seq[0].n = 0;
    }
    if (rc) lm->held[0] = lm->held[1] = -1;
    else if (B == 1) lm->kv_len += T;
    return rc;
}

int ql_lora_model_decode(ql_lora_model *lm, const int32_t *tokens, int T, float *logits)
{
    const ql_llama_config *c = lm->c;
    if (!lm->kv_cap) return ql_error(QL_EINVAL, "decode needs a model planned with a key/value cache");
    if (!lm->h_ids) return ql_error(QL_EINVAL, "the model's memory plan was not allocated (a dry run)");
    if (T < 1) return ql_error(QL_EINVAL, "decode of %d tokens", T);
    if ((int64_t)lm->kv_len + T > lm->kv_cap)
        return ql_error(QL_EINVAL, "sequence of %lld tokens exceeds the cache of %d", (long long)lm->kv_len + T,
                        lm->kv_cap);
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab)
            return ql_error(QL_EINVAL, "token id %d at position %d is outside the vocabulary (%d)", tokens[t], t,
                            c->vocab);
    if (lm->ctx->status) return ql_be_check(lm->ctx); /* an earlier unchecked failure */
    const int start = lm->kv_len;
    for (int t0 = 0; t0 < T;) {
        const int n = T - t0 < lm->Tmax ? T - t0 : lm->Tmax;
        int rc = decode_piece(lm, 1, tokens + t0, n, NULL, t0 + n == T ? logits : NULL);
        if (rc) {
            lm->kv_len = start;
            return rc;
        }
        t0 += n;
    }
    return QL_OK;
}

int ql_lora_model_kv_length(const ql_lora_model *lm) { return lm->kv_len; }

int ql_lora_model_kv_fork(ql_lora_model *lm, int n)
{
    if (!lm->kv_cap) return ql_error(QL_EINVAL, "a fork needs a model planned with a key/value cache");
    if (n < 1 || n > lm->Bmax) return ql_error(QL_EINVAL, "a fork into %d sequences (the plan has %d)", n, lm->Bmax);
    const int64_t kvd = (int64_t)lm->c->n_kv_heads * lm->c->head_dim;
    const size_t bytes = (size_t)((int64_t)lm->kv_len * kvd) * sizeof(float);
    for (int i = 0; bytes && i < lm->c->n_layers; i++)
        for (int b = 1; b < n; b++)
            for (int v = 0; v < 2; v++) ql_be(lm->ctx, copy, kv_row(lm, i, b, v, kvd), kv_row(lm, i, 0, v, kvd), bytes);
    return ql_be_check(lm->ctx);
}

int ql_lora_model_kv_adopt(ql_lora_model *lm, int row, int len)
{
    if (!lm->kv_cap || row < 0 || row >= lm->Bmax || len < lm->kv_len || len > lm->kv_cap)
        return ql_error(QL_EINVAL, "adopting %d positions of cache row %d (length %d, %d rows of %d)", len, row,
                        lm->kv_len, lm->Bmax, lm->kv_cap);
    const int64_t kvd = (int64_t)lm->c->n_kv_heads * lm->c->head_dim;
    const size_t bytes = (size_t)((int64_t)(len - lm->kv_len) * kvd) * sizeof(float);
    for (int i = 0; row > 0 && bytes && i < lm->c->n_layers; i++)
        for (int v = 0; v < 2; v++)
            ql_be(lm->ctx, copy, kv_row(lm, i, 0, v, kvd) + (int64_t)lm->kv_len * kvd,
                  kv_row(lm, i, row, v, kvd) + (int64_t)lm->kv_len * kvd, bytes);
    int rc = ql_be_check(lm->ctx);
    if (rc == QL_OK) lm->kv_len = len;
    return rc;
}

int ql_lora_model_decode_rows(ql_lora_model *lm, int n, const int32_t *tokens, int T, const int *len, float *logits)
{
    const ql_llama_config *c = lm->c;
    if (!lm->kv_cap) return ql_error(QL_EINVAL, "decode needs a model planned with a key/value cache");
    if (!lm->h_ids) return ql_error(QL_EINVAL, "the model's memory plan was not allocated (a dry run)");
    if (n < 1 || n > lm->Bmax || T < 1 || T > lm->Tmax)
        return ql_error(QL_EINVAL, "decode of %d sequences of %d tokens (the plan: %d of %d)", n, T, lm->Bmax, lm->Tmax);
    if ((int64_t)lm->kv_len + T > lm->kv_cap)
        return ql_error(QL_EINVAL, "sequence of %lld tokens exceeds the cache of %d", (long long)lm->kv_len + T,
                        lm->kv_cap);
    for (int b = 0; b < n; b++) {
        if (len[b] < 1 || len[b] > T) return ql_error(QL_EINVAL, "sequence %d has %d of %d tokens", b, len[b], T);
        for (int t = 0; t < len[b]; t++)
            if (tokens[(int64_t)b * T + t] < 0 || tokens[(int64_t)b * T + t] >= c->vocab)
                return ql_error(QL_EINVAL, "token id %d of sequence %d, position %d, is outside the vocabulary (%d)",
                                tokens[(int64_t)b * T + t], b, t, c->vocab);
    }
    if (lm->ctx->status) return ql_be_check(lm->ctx);
    /* the padding past a sequence's end is run (it is attended by nothing real) as token 0 */
    int32_t *ids = malloc((size_t)n * (size_t)T * sizeof *ids);
    if (!ids) return ql_error(QL_ENOMEM, "out of memory");
    for (int b = 0; b < n; b++)
        for (int t = 0; t < T; t++) ids[(int64_t)b * T + t] = t < len[b] ? tokens[(int64_t)b * T + t] : 0;
    int rc = decode_piece(lm, n, ids, T, len, logits);
    free(ids);
    return rc;
}

void ql_lora_model_kv_truncate(ql_lora_model *lm, int len)
{
    lm->kv_len = len < 0 ? 0 : len < lm->kv_len ? len : lm->kv_len;
}

/* ---- merging ---- */

int ql_lora_model_merged_weights(ql_lora_model *lm, int layer, int module, float *host)
{
    if (!lm->merge) return ql_error(QL_EINVAL, "merged weights need a model planned for merging");
    if (!lm->h_ids) return ql_error(QL_EINVAL, "the model's memory plan was not allocated (a dry run)");
    if (layer < 0 || layer >= lm->c->n_layers || module < 0 || module >= QL_MOD_COUNT)
        return ql_error(QL_EINVAL, "no linear (layer %d, module %d)", layer, module);
    ctx x = {.lm = lm, .be = lm->ctx, .m = lm->m, .lora = lm->lora, .c = lm->c};
    ql_be_ctx *be = lm->ctx;
    if (be->status) return ql_be_check(be);
    const ql_linear *l = layer_linear(&ql_llama_layers(lm->m)[layer], module);
    const be_linear *bl = &lm->layers[layer].lin[module];
    const size_t bytes = (size_t)(l->out * l->in) * sizeof(float);
    if (bl->dense) ql_be(be, copy, lm->w, bl->dense, bytes);
    else materialize_into(&x, 0, layer * QL_MOD_COUNT + module);
    ql_lora_pair *p = pair_at(&x, layer, module);
    if (p) ql_be(be, lora_merge, lm->w, p->A, p->B, l->out, l->in, lm->lora->cfg.r, lm->lora->scaling);
    ql_be(be, download, host, lm->w, bytes);
    return ql_be_check(be);
}
