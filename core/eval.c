#include "qlora/eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lora_model.h"
#include "ops.h"
#include "progress.h"
#include "qlora/error.h"

/* examples by decreasing length (ties in file order), so a micro-batch pads little */
typedef struct len_index {
    int32_t len;
    size_t i;
} len_index;

static int by_len_desc(const void *a, const void *b)
{
    const len_index *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

int ql_eval_nll(ql_llama *m, const ql_dataset *d, const ql_eval_opts *o, ql_eval_result *out)
{
    memset(out, 0, sizeof *out);
    const ql_llama_config *c = ql_llama_get_config(m);
    int32_t longest = 0;
    for (size_t i = 0; i < d->n; i++) {
        const ql_example *e = &d->examples[i];
        if (e->len > longest) longest = e->len;
        for (int32_t t = 0; t < e->len; t++)
            if (e->ids[t] < 0 || e->ids[t] >= c->vocab)
                return ql_error(QL_EINVAL, "example %zu has token id %d, outside the model's vocabulary (%d)", i,
                                e->ids[t], c->vocab);
    }
    if (longest > c->max_len)
        return ql_error(QL_EINVAL, "an example has %d tokens, more than the model's %d positions", longest,
                        c->max_len);
    if (longest < 1) longest = 1;
    int batch = o->batch > 0 ? o->batch : 8;
    if ((size_t)batch > d->n) batch = d->n ? (int)d->n : 1;
    ql_be_ctx *ctx = NULL;
    ql_lora_model *lm = NULL;
    len_index *order = malloc((d->n ? d->n : 1) * sizeof *order);
    const ql_example **ex = malloc((size_t)batch * sizeof *ex);
    int rc = order && ex ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK) rc = ql_be_ctx_open(o->device ? o->device : "cpu", NULL, &ctx);
    int precision = QL_PREC_FP32;
    if (rc == QL_OK) rc = ql_be_precision(o->precision, ctx->be, &precision);
    ql_lora_model_opts mo = {.batch = batch, .max_len = longest, .backward = 0, .allocate = 1, .precision = precision};
    if (rc == QL_OK) rc = ql_lora_model_create(m, (ql_lora *)o->lora, ctx, &mo, &lm);
    if (rc == QL_OK) rc = ql_lora_model_push_params(lm);
    if (rc == QL_OK) {
        for (size_t i = 0; i < d->n; i++) order[i] = (len_index){.len = d->examples[i].len, .i = i};
        qsort(order, d->n, sizeof *order, by_len_desc);
    }
    ql_progress prog;
    int64_t total_tokens = 0, seen = 0;
    for (size_t i = 0; i < d->n; i++) total_tokens += d->examples[i].len;
    if (rc == QL_OK) ql_progress_begin(&prog, "eval", total_tokens, "tokens", o->progress);
    ql_lora_step_opts so = {.loss_scale = 0, .backward = 0};
    for (size_t i = 0; i < d->n && rc == QL_OK; i += (size_t)batch) {
        int k = 0;
        for (; k < batch && i + (size_t)k < d->n; k++) {
            ex[k] = &d->examples[order[i + (size_t)k].i];
            seen += ex[k]->len;
            out->examples += ex[k]->len >= 2;
        }
        ql_lora_batch mb;
        rc = ql_lora_model_gather(lm, ex, k, NULL, &mb);
        if (rc == QL_OK) rc = ql_lora_model_step(lm, &mb, &so, &out->nll_sum, &out->tokens);
        if (rc == QL_OK) ql_progress_update(&prog, seen, "");
    }
    if (rc == QL_OK) ql_progress_end(&prog);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(ctx);
    free(order);
    free(ex);
    return rc;
}

/* xorshift64*: the sampler's generator, seeded by --seed */
static double next_uniform(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (double)((*s * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

typedef ql_sample_slot prob_index;

static int cmp_prob_desc(const void *a, const void *b)
{
    float x = ((const prob_index *)a)->p, y = ((const prob_index *)b)->p;
    if (x != y) return x > y ? -1 : 1;
    return ((const prob_index *)a)->id - ((const prob_index *)b)->id;
}

int32_t ql_sample_token(const float *logits, int V, const ql_generate_opts *o, uint64_t *rng, ql_sample_slot *work)
{
    if (o->temperature <= 0.0f) {
        int32_t best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    float mx = -INFINITY;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < V; i++) {
        work[i].p = expf((logits[i] - mx) / o->temperature);
        work[i].id = i;
        sum += work[i].p;
    }
    qsort(work, (size_t)V, sizeof *work, cmp_prob_desc);
    int keep = V;
    if (o->top_p > 0.0f && o->top_p < 1.0f) {
        double acc = 0;
        for (int i = 0; i < V; i++) {
            acc += work[i].p / sum;
            if (acc >= o->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    double kept = 0;
    for (int i = 0; i < keep; i++) kept += work[i].p;
    double r = next_uniform(rng) * kept;
    for (int i = 0; i < keep; i++) {
        r -= work[i].p;
        if (r <= 0) return work[i].id;
    }
    return work[keep - 1].id;
}

enum { DECODE_PIECE = 512 }; /* prompt tokens one pass of the decoder takes */

int ql_generate(ql_llama *m, const ql_tokenizer *tok, const char *prompt, const ql_generate_opts *o, char **text)
{
    *text = NULL;
    const ql_llama_config *c = ql_llama_get_config(m);
    if (o->max_new_tokens < 1) return ql_error(QL_EINVAL, "max_new_tokens must be >= 1 (got %d)", o->max_new_tokens);
    if (!o->lora && ql_lora_attached(m))
        return ql_error(QL_EINVAL, "the model has a LoRA adapter attached: pass it as ql_generate_opts.lora");
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = ql_tokenizer_encode(tok, prompt, strlen(prompt), 1, &ids, &n);
    if (rc) return rc;
    if (n > (size_t)c->max_len - 1) {
        free(ids);
        return ql_error(QL_EINVAL, "the prompt has %zu tokens; the model takes %d, so no room is left to generate", n,
                        c->max_len);
    }
    if (n == 0) { /* a tokenizer without a beginning-of-sequence token, and an empty prompt */
        free(ids);
        return ql_error(QL_EINVAL, "the prompt is empty and the tokenizer adds no beginning-of-sequence token: "
                                   "nothing to continue from");
    }
    int64_t cap64 = (int64_t)n + o->max_new_tokens;
    int cap = cap64 > c->max_len ? c->max_len : (int)cap64;
    ql_be_ctx *ctx = NULL;
    ql_lora_model *lm = NULL;
    float *logits = malloc((size_t)c->vocab * sizeof *logits);
    prob_index *work = malloc((size_t)c->vocab * sizeof *work);
    int32_t *out = malloc((size_t)(o->max_new_tokens > 0 ? o->max_new_tokens : 1) * sizeof *out);
    int produced = 0;
    uint64_t rng = o->seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    if (!logits || !work || !out) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK) rc = ql_be_ctx_open(o->device ? o->device : "cpu", NULL, &ctx);
    int precision = QL_PREC_FP32;
    if (rc == QL_OK) rc = ql_be_precision(o->precision, ctx->be, &precision);
    /* dynamic RoPE rotates a call's tokens by the frequencies of its last
     * position, as transformers' generate runs the prompt in one call: so
     * must we (pieces of the prompt would rotate by other frequencies) */
    int piece = cap < DECODE_PIECE ? cap : DECODE_PIECE;
    if (c->rope.type == QL_ROPE_DYNAMIC && (int)n > piece) piece = (int)n;
    ql_lora_model_opts mo = {.batch = 1, .max_len = piece, .backward = 0,
                             .allocate = 1, .precision = precision, .kv_capacity = cap};
    if (rc == QL_OK) rc = ql_lora_model_create(m, (ql_lora *)o->lora, ctx, &mo, &lm);
    if (rc == QL_OK) rc = ql_lora_model_push_params(lm);
    if (rc == QL_OK) rc = ql_lora_model_decode(lm, ids, (int)n, logits);
    while (rc == QL_OK && produced < o->max_new_tokens && ql_lora_model_kv_length(lm) < cap) {
        int32_t next = ql_sample_token(logits, c->vocab, o, &rng, work);
        if (next == ql_tokenizer_eos(tok)) break;
        out[produced++] = next;
        if (ql_lora_model_kv_length(lm) >= cap) break;
        rc = ql_lora_model_decode(lm, &next, 1, logits);
    }
    if (rc == QL_OK) rc = ql_tokenizer_decode(tok, out, (size_t)produced, 1, text);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(ctx);
    free(logits);
    free(work);
    free(out);
    free(ids);
    return rc;
}
