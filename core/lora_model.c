#include "lora_model.h"

#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops_backward.h"
#include "qlora/error.h"
#include "rope.h"

/* Activations of one decoder layer for one sequence. */
typedef struct layer_acts {
    float *x;                 /* [T, H] layer input */
    float *xn1, *rstd1;       /* [T, H], [T] */
    float *q, *k, *v;         /* [T, qd], [T, kvd] x2, rotated q and k */
    float *qpre, *kpre;       /* [T, qd], [T, kvd] q, k before the per-head norm (qk_norm only) */
    float *rstdq, *rstdk;     /* [T, nh], [T, nkv] (qk_norm only) */
    float *probs;             /* [nh, T, T] */
    float *att;               /* [T, qd] */
    float *xmid;              /* [T, H] */
    float *xn2, *rstd2;       /* [T, H], [T] */
    float *gate, *up, *hm;    /* [T, I] x3 */
    float *xd[QL_MOD_COUNT];  /* dropped LoRA inputs (NULL when the module has no adapter or p == 0) */
    float *h[QL_MOD_COUNT];   /* [T, r] LoRA hidden */
} layer_acts;

typedef struct dims {
    int64_t T, H, I, qd, kvd, hd, V, r;
    int nh, nkv;
} dims;

static int64_t module_in(const dims *d, int k)
{
    return k == QL_MOD_O ? d->qd : k == QL_MOD_DOWN ? d->I : d->H;
}

static void acts_free(const ql_backend *be, layer_acts *a)
{
    float **all[] = {&a->x,    &a->xn1,  &a->rstd1, &a->q,    &a->k,     &a->v,    &a->qpre,
                     &a->kpre, &a->rstdq, &a->rstdk, &a->probs, &a->att, &a->xmid, &a->xn2,
                     &a->rstd2, &a->gate, &a->up,  &a->hm};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (*all[i]) be->free(*all[i]);
        *all[i] = NULL;
    }
    for (int k = 0; k < QL_MOD_COUNT; k++) {
        if (a->xd[k]) be->free(a->xd[k]);
        if (a->h[k]) be->free(a->h[k]);
        a->xd[k] = a->h[k] = NULL;
    }
}

static int acts_alloc(const ql_backend *be, layer_acts *a, const dims *d, const ql_lora *lora, int layer, int qk_norm)
{
    memset(a, 0, sizeof *a);
    size_t T = (size_t)d->T;
    a->x = be->alloc(T * d->H * 4);
    a->xn1 = be->alloc(T * d->H * 4);
    a->rstd1 = be->alloc(T * 4);
    a->q = be->alloc(T * d->qd * 4);
    a->k = be->alloc(T * d->kvd * 4);
    a->v = be->alloc(T * d->kvd * 4);
    a->probs = be->alloc((size_t)d->nh * T * T * 4);
    a->att = be->alloc(T * d->qd * 4);
    a->xmid = be->alloc(T * d->H * 4);
    a->xn2 = be->alloc(T * d->H * 4);
    a->rstd2 = be->alloc(T * 4);
    a->gate = be->alloc(T * d->I * 4);
    a->up = be->alloc(T * d->I * 4);
    a->hm = be->alloc(T * d->I * 4);
    int ok = a->x && a->xn1 && a->rstd1 && a->q && a->k && a->v && a->probs && a->att && a->xmid && a->xn2 &&
             a->rstd2 && a->gate && a->up && a->hm;
    if (ok && qk_norm) {
        a->qpre = be->alloc(T * d->qd * 4);
        a->kpre = be->alloc(T * d->kvd * 4);
        a->rstdq = be->alloc(T * (size_t)d->nh * 4);
        a->rstdk = be->alloc(T * (size_t)d->nkv * 4);
        ok = a->qpre && a->kpre && a->rstdq && a->rstdk;
    }
    if (lora)
        for (int k = 0; k < QL_MOD_COUNT && ok; k++) {
            if (!lora->pairs[layer * QL_MOD_COUNT + k].A) continue;
            a->h[k] = be->alloc(T * (size_t)d->r * 4);
            ok = a->h[k] != NULL;
            if (ok && lora->cfg.dropout > 0) {
                a->xd[k] = be->alloc(T * (size_t)module_in(d, k) * 4);
                ok = a->xd[k] != NULL;
            }
        }
    if (!ok) {
        acts_free(be, a);
        return ql_error(QL_ENOMEM, "out of memory for activations of a %lld-token sequence", (long long)d->T);
    }
    return QL_OK;
}

typedef struct ctx {
    const ql_backend *be;
    ql_llama *m;
    ql_lora *lora;
    const ql_llama_config *c;
    dims d;
    float *w;             /* scratch for one materialized weight matrix */
    uint64_t seed;
    int dropout;          /* dropout active */
    float *inv_freq;      /* host [hd/2]: rotary frequencies of this sequence */
    float rope_scale;     /* and the factor on cos and sin */
} ctx;

static uint64_t module_seed(const ctx *x, int layer, int module)
{
    uint64_t s = x->seed ^ ((uint64_t)(layer * QL_MOD_COUNT + module + 1) * 0xD1B54A32D192ED03ull);
    return ql_splitmix64_next(&s);
}

static const ql_linear *layer_linear(ql_llama_layer *L, int k)
{
    const ql_linear *ls[QL_MOD_COUNT] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    return ls[k];
}

static const float *weights(ctx *x, const ql_linear *l)
{
    if (l->dense) return l->dense;
    if (x->be->materialize(l, x->w)) return NULL;
    return x->w;
}

/* y = in W^T (+ LoRA) for module k of layer i */
static int linear_fwd(ctx *x, int i, int k, layer_acts *a, const float *in, float *y)
{
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    const ql_linear *l = layer_linear(L, k);
    const float *w = weights(x, l);
    if (!w) return ql_error_code();
    x->be->matmul_nt(y, in, w, x->d.T, l->in, l->out, 0);
    if (l->bias) /* frozen: no gradient, and dy passes through it unchanged */
        for (int64_t t = 0; t < x->d.T; t++) x->be->add_inplace(y + t * l->out, l->bias, l->out);
    ql_lora_pair *p = x->lora ? ql_lora_pair_at(x->lora, i, k) : NULL;
    if (p) {
        const float *xd = in;
        if (x->dropout) {
            x->be->dropout_forward(a->xd[k], NULL, in, x->d.T * l->in, x->lora->cfg.dropout, module_seed(x, i, k));
            xd = a->xd[k];
        }
        x->be->lora_forward(y, a->h[k], xd, p->A, p->B, x->d.T, l->in, l->out, x->lora->cfg.r, x->lora->scaling);
    }
    return QL_OK;
}

/* din (+)= dy W (+ LoRA paths), and LoRA grads */
static int linear_bwd(ctx *x, int i, int k, layer_acts *a, const float *in, const float *dy, float *din,
                      int accumulate, float *dh_scratch, float *dxd_scratch)
{
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    const ql_linear *l = layer_linear(L, k);
    const float *w = weights(x, l); /* materialized again: nothing was kept */
    if (!w) return ql_error_code();
    x->be->matmul_backward_input(din, dy, w, x->d.T, l->in, l->out, accumulate);
    ql_lora_pair *p = x->lora ? ql_lora_pair_at(x->lora, i, k) : NULL;
    if (p) {
        const float *xd = x->dropout ? a->xd[k] : in;
        float scale = x->lora->scaling;
        if (x->dropout) {
            x->be->lora_backward(dxd_scratch, p->dA, p->dB, dh_scratch, dy, xd, a->h[k], p->A, p->B, x->d.T, l->in, l->out,
                             x->lora->cfg.r, scale, 0);
            x->be->dropout_backward(din, dxd_scratch, NULL, x->d.T * l->in, x->lora->cfg.dropout, module_seed(x, i, k), 1);
        } else {
            x->be->lora_backward(din, p->dA, p->dB, dh_scratch, dy, xd, a->h[k], p->A, p->B, x->d.T, l->in, l->out,
                             x->lora->cfg.r, scale, 1);
        }
    }
    return QL_OK;
}

/* Forward of layer i from a->x (already filled) to out[T, H]. */
static int layer_fwd(ctx *x, int i, layer_acts *a, float *out)
{
    const dims *d = &x->d;
    const ql_llama_config *c = x->c;
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    int rc;
    x->be->rmsnorm_forward(a->xn1, a->rstd1, a->x, L->attn_norm, d->T, d->H, c->rms_eps);
    float *qp = L->q_norm ? a->qpre : a->q, *kp = L->q_norm ? a->kpre : a->k;
    if ((rc = linear_fwd(x, i, QL_MOD_Q, a, a->xn1, qp)) || (rc = linear_fwd(x, i, QL_MOD_K, a, a->xn1, kp)) ||
        (rc = linear_fwd(x, i, QL_MOD_V, a, a->xn1, a->v)))
        return rc;
    if (L->q_norm) {
        x->be->rmsnorm_forward(a->q, a->rstdq, a->qpre, L->q_norm, d->T * d->nh, d->hd, c->rms_eps);
        x->be->rmsnorm_forward(a->k, a->rstdk, a->kpre, L->k_norm, d->T * d->nkv, d->hd, c->rms_eps);
    }
    x->be->rope_forward(a->q, d->T, d->nh, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    x->be->rope_forward(a->k, d->T, d->nkv, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    x->be->attention_forward_train(a->att, a->probs, a->q, a->k, a->v, d->T, d->nh, d->nkv, (int)d->hd, L->window);
    if ((rc = linear_fwd(x, i, QL_MOD_O, a, a->att, a->xmid))) return rc;
    x->be->add_inplace(a->xmid, a->x, d->T * d->H);
    x->be->rmsnorm_forward(a->xn2, a->rstd2, a->xmid, L->mlp_norm, d->T, d->H, c->rms_eps);
    if ((rc = linear_fwd(x, i, QL_MOD_GATE, a, a->xn2, a->gate)) || (rc = linear_fwd(x, i, QL_MOD_UP, a, a->xn2, a->up)))
        return rc;
    x->be->swiglu_forward(a->hm, a->gate, a->up, d->T * d->I);
    if ((rc = linear_fwd(x, i, QL_MOD_DOWN, a, a->hm, out))) return rc;
    x->be->add_inplace(out, a->xmid, d->T * d->H);
    return QL_OK;
}

typedef struct bwd_scratch {
    float *dhm, *dgate, *dup, *dxn, *datt, *dq, *dk, *dv, *dscores, *dh, *dxd, *dmid;
    float *dqpre, *dkpre; /* [T, qd], [T, kvd] through the per-head q/k norm (qk_norm only) */
} bwd_scratch;

/* Given dout[T, H] = dL/d(layer output), write dx[T, H] = dL/d(layer input). */
static int layer_bwd(ctx *x, int i, layer_acts *a, const float *dout, float *dx, bwd_scratch *s)
{
    const dims *d = &x->d;
    ql_llama_layer *L = &ql_llama_layers(x->m)[i];
    int rc;
    /* MLP */
    if ((rc = linear_bwd(x, i, QL_MOD_DOWN, a, a->hm, dout, s->dhm, 0, s->dh, s->dxd))) return rc;
    x->be->swiglu_backward(s->dgate, s->dup, s->dhm, a->gate, a->up, d->T * d->I);
    if ((rc = linear_bwd(x, i, QL_MOD_GATE, a, a->xn2, s->dgate, s->dxn, 0, s->dh, s->dxd)) ||
        (rc = linear_bwd(x, i, QL_MOD_UP, a, a->xn2, s->dup, s->dxn, 1, s->dh, s->dxd)))
        return rc;
    x->be->copy(s->dmid, dout, (size_t)(d->T * d->H) * 4);
    x->be->rmsnorm_backward(s->dmid, NULL, s->dxn, a->xmid, L->mlp_norm, a->rstd2, d->T, d->H, 1);
    /* attention */
    if ((rc = linear_bwd(x, i, QL_MOD_O, a, a->att, s->dmid, s->datt, 0, s->dh, s->dxd))) return rc;
    x->be->attention_backward(s->dq, s->dk, s->dv, s->dscores, s->datt, a->q, a->k, a->v, a->probs, d->T, d->nh, d->nkv,
                              (int)d->hd, L->window);
    x->be->rope_backward(s->dq, d->T, d->nh, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    x->be->rope_backward(s->dk, d->T, d->nkv, (int)d->hd, 0, x->inv_freq, x->rope_scale);
    const float *dqp = s->dq, *dkp = s->dk;
    if (L->q_norm) { /* frozen norm weights: only the input gradient */
        x->be->rmsnorm_backward(s->dqpre, NULL, s->dq, a->qpre, L->q_norm, a->rstdq, d->T * d->nh, d->hd, 0);
        x->be->rmsnorm_backward(s->dkpre, NULL, s->dk, a->kpre, L->k_norm, a->rstdk, d->T * d->nkv, d->hd, 0);
        dqp = s->dqpre;
        dkp = s->dkpre;
    }
    if ((rc = linear_bwd(x, i, QL_MOD_Q, a, a->xn1, dqp, s->dxn, 0, s->dh, s->dxd)) ||
        (rc = linear_bwd(x, i, QL_MOD_K, a, a->xn1, dkp, s->dxn, 1, s->dh, s->dxd)) ||
        (rc = linear_bwd(x, i, QL_MOD_V, a, a->xn1, s->dv, s->dxn, 1, s->dh, s->dxd)))
        return rc;
    x->be->copy(dx, s->dmid, (size_t)(d->T * d->H) * 4);
    x->be->rmsnorm_backward(dx, NULL, s->dxn, a->x, L->attn_norm, a->rstd1, d->T, d->H, 1);
    return QL_OK;
}

int ql_lora_model_step(ql_llama *m, ql_lora *lora, const int32_t *ids, const int32_t *labels, int T,
                       const ql_lora_step_opts *opts, double *loss_sum, int64_t *n_targets)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    if (T < 2) return QL_OK;
    if (T > c->max_len)
        return ql_error(QL_EINVAL, "sequence of %d tokens exceeds the model's %d positions", T, c->max_len);
    for (int t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= c->vocab)
            return ql_error(QL_EINVAL, "token id %d at position %d is outside the vocabulary (%d)", ids[t], t, c->vocab);
    int backward = opts->backward && lora;
    const ql_backend *be = ql_llama_backend(m);
    ctx x = {.be = be, .m = m, .lora = lora, .c = c, .seed = opts->dropout_seed};
    x.dropout = backward && lora->cfg.dropout > 0;
    dims *d = &x.d;
    d->T = T;
    d->H = c->hidden;
    d->I = c->intermediate;
    d->hd = c->head_dim;
    d->nh = c->n_heads;
    d->nkv = c->n_kv_heads;
    d->qd = (int64_t)d->nh * d->hd;
    d->kvd = (int64_t)d->nkv * d->hd;
    d->V = c->vocab;
    d->r = lora ? lora->cfg.r : 0;
    int64_t maxw = 0;
    for (int i = 0; i < c->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_linear *l = layer_linear(&ql_llama_layers(m)[i], k);
            if (l->out * l->in > maxw) maxw = l->out * l->in;
        }
    int nl = c->n_layers;
    int keep_all = backward && !opts->checkpointing;
    int rc = QL_OK;
    layer_acts *acts = calloc((size_t)(keep_all ? nl : 1), sizeof *acts);
    float **inputs = calloc((size_t)nl + 1, sizeof *inputs); /* layer inputs, and the final hidden state */
    float *logits = be->alloc((size_t)T * d->V * 4);
    float *xnf = be->alloc((size_t)T * d->H * 4), *rstdf = be->alloc((size_t)T * 4);
    int32_t *targets = malloc((size_t)T * sizeof *targets); /* host */
    x.w = be->alloc((size_t)maxw * 4);
    x.inv_freq = malloc((size_t)(d->hd / 2) * sizeof *x.inv_freq);
    bwd_scratch s = {0};
    if (!acts || !inputs || !logits || !xnf || !rstdf || !targets || !x.w || !x.inv_freq) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i <= nl && rc == QL_OK; i++)
        if (!(inputs[i] = be->alloc((size_t)T * d->H * 4))) rc = ql_error(QL_ENOMEM, "out of memory");
    for (int i = 0; i < (keep_all ? nl : 1) && rc == QL_OK; i++) rc = acts_alloc(be, &acts[i], d, x.lora, i, c->qk_norm);
    if (rc) goto done;
    ql_llama_rope(x.inv_freq, &x.rope_scale, m, T);

    /* forward */
    be->embedding(inputs[0], ql_llama_embeddings(m), ids, T, d->H);
    for (int i = 0; i < nl && rc == QL_OK; i++) {
        layer_acts *a = &acts[keep_all ? i : 0];
        be->copy(a->x, inputs[i], (size_t)(T * d->H) * 4);
        rc = layer_fwd(&x, i, a, inputs[i + 1]);
    }
    if (rc) goto done;
    const ql_llama_layer *Ls = ql_llama_layers(m);
    (void)Ls;
    const float *final_norm = NULL, *lm_head = NULL;
    ql_llama_output_weights(m, &final_norm, &lm_head);
    be->rmsnorm_forward(xnf, rstdf, inputs[nl], final_norm, T, d->H, c->rms_eps);
    be->matmul_nt(logits, xnf, lm_head, T, d->H, d->V, 0);
    for (int t = 0; t + 1 < T; t++) targets[t] = labels[t + 1] == QL_IGNORE_INDEX ? QL_IGNORE_INDEX : ids[t + 1];
    targets[T - 1] = QL_IGNORE_INDEX;
    int64_t count = ql_count_targets(targets, T, QL_IGNORE_INDEX);
    double sum = be->cross_entropy(backward ? logits : NULL, logits, targets, T, d->V, QL_IGNORE_INDEX, opts->loss_scale);
    *loss_sum += sum;
    *n_targets += count;
    if (!backward || count == 0) goto done;

    /* backward: dlogits (in `logits`) -> final norm -> layers */
    s.dhm = be->alloc((size_t)(T * d->I) * 4);
    s.dgate = be->alloc((size_t)(T * d->I) * 4);
    s.dup = be->alloc((size_t)(T * d->I) * 4);
    s.dxn = be->alloc((size_t)(T * d->H) * 4);
    s.datt = be->alloc((size_t)(T * d->qd) * 4);
    s.dq = be->alloc((size_t)(T * d->qd) * 4);
    s.dk = be->alloc((size_t)(T * d->kvd) * 4);
    s.dv = be->alloc((size_t)(T * d->kvd) * 4);
    s.dscores = be->alloc((size_t)d->nh * T * T * 4);
    s.dh = be->alloc((size_t)(T * (d->r > 0 ? d->r : 1)) * 4);
    int64_t widest = d->I > d->qd ? d->I : d->qd;
    if (d->H > widest) widest = d->H;
    s.dxd = be->alloc((size_t)(T * widest) * 4);
    s.dmid = be->alloc((size_t)(T * d->H) * 4);
    if (c->qk_norm) {
        s.dqpre = be->alloc((size_t)(T * d->qd) * 4);
        s.dkpre = be->alloc((size_t)(T * d->kvd) * 4);
    }
    float *grad = be->alloc((size_t)(T * d->H) * 4), *grad2 = be->alloc((size_t)(T * d->H) * 4);
    if (!s.dhm || !s.dgate || !s.dup || !s.dxn || !s.datt || !s.dq || !s.dk || !s.dv || !s.dscores || !s.dh ||
        !s.dxd || !s.dmid || !grad || !grad2 || (c->qk_norm && (!s.dqpre || !s.dkpre))) {
        if (grad) be->free(grad);
        if (grad2) be->free(grad2);
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    be->matmul_backward_input(s.dxn, logits, lm_head, T, d->H, d->V, 0);
    be->rmsnorm_backward(grad, NULL, s.dxn, inputs[nl], final_norm, rstdf, T, d->H, 0);
    for (int i = nl - 1; i >= 0 && rc == QL_OK; i--) {
        layer_acts *a = &acts[keep_all ? i : 0];
        if (!keep_all) { /* recompute this layer's activations from its saved input */
            be->copy(a->x, inputs[i], (size_t)(T * d->H) * 4);
            rc = layer_fwd(&x, i, a, grad2);
            if (rc) break;
        }
        rc = layer_bwd(&x, i, a, grad, grad2, &s);
        float *tmp = grad;
        grad = grad2;
        grad2 = tmp;
    }
    be->free(grad);
    be->free(grad2);
done:
    if (acts)
        for (int i = 0; i < (keep_all ? nl : 1); i++) acts_free(be, &acts[i]);
    free(acts);
    if (inputs)
        for (int i = 0; i <= nl; i++)
            if (inputs[i]) be->free(inputs[i]);
    free(inputs);
    float *bufs[] = {logits, xnf, rstdf, x.w, s.dhm, s.dgate, s.dup, s.dxn, s.datt, s.dq, s.dk, s.dv, s.dscores,
                     s.dh, s.dxd, s.dmid, s.dqpre, s.dkpre};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(bufs[i]);
    free(targets);
    free(x.inv_freq);
    return rc;
}
