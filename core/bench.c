/* qlora bench --only step: one QLoRA training step at the shapes of LLaMA
 * models (the rows of the CUDA issue's targets), timed after warm-up steps,
 * with the device memory the plan takes. */
#include "qlora/bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "lora_model.h"
#include "ops_backward.h"
#include "plan.h"
#include "progress.h"
#include "qlora/error.h"
#include "qlora/llama.h"
#include "qlora/lora.h"

typedef struct shape {
    const char *name;
    int layers, hidden, inter, heads, kv_heads, vocab;
} shape;

/* LLaMA 1 7B/13B/33B/65B and LLaMA 2 70B */
static const shape shapes[] = {
    {"7b", 32, 4096, 11008, 32, 32, 32000},  {"13b", 40, 5120, 13824, 40, 40, 32000},
    {"33b", 60, 6656, 17920, 52, 52, 32000}, {"65b", 80, 8192, 22016, 64, 64, 32000},
    {"70b", 80, 8192, 28672, 64, 8, 32000},
};

void ql_bench_opts_default(ql_bench_opts *o)
{
    memset(o, 0, sizeof *o);
    o->shapes = NULL; /* each bench's own: 7b for step, BENCH_MATRICES for the kernels */
    o->tokens = 4096;
    o->device = "auto";
    o->precision = "auto";
    o->quantizer = "nf4";
    o->optim = "auto";
    o->offload = "auto";
    o->seq = 2048;
    o->batch = 1;
    o->lora_r = 64;
    o->lora_dropout = 0.1f;
    o->steps = 5;
    o->warmup = 2;
    o->progress = 1;
}

static const shape *find_shape(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (strlen(shapes[i].name) == len && !strncmp(shapes[i].name, name, len)) return &shapes[i];
    return NULL;
}

typedef struct result {
    double s_per_step, tokens_per_s, plan_gib, base_gib, acts_gib, build_s;
    double fwd_bwd_s, clip_s, optim_s, pinned_gib; /* per timed step: the model's step, clipping, the optimizer */
    double loss_first, loss_last;
} result;

static int bench_shape(const ql_bench_opts *o, const shape *sh, ql_be_ctx *ctx, int precision, int optimizer,
                       result *res)
{
    const int layers = o->layers > 0 ? o->layers : sh->layers;
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": %d, "
             "\"intermediate_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d, "
             "\"num_key_value_heads\": %d, \"vocab_size\": %d, \"max_position_embeddings\": %d, "
             "\"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"hidden_act\": \"silu\", \"tie_word_embeddings\": false}",
             sh->hidden, sh->inter, layers, sh->heads, sh->kv_heads, sh->vocab, o->seq > 4096 ? o->seq : 4096);
    double t0 = ql_now();
    ql_llama *m = NULL;
    ql_lora *lora = NULL;
    ql_adamw *opt = NULL;
    ql_lora_model *lm = NULL;
    int32_t *ids = NULL, *len = NULL;
    uint64_t *seeds = NULL;
    int rc = ql_llama_random(cfg, o->quantizer, 1234, 1, &m);
    ql_lora_config lc = {.r = o->lora_r, .alpha = 16.0f, .dropout = o->lora_dropout, .modules = QL_LORA_ALL_MODULES};
    if (rc == QL_OK) rc = ql_lora_create(m, &lc, 42, &lora);
    if (rc == QL_OK) rc = ql_adamw_create(lora->n_params, 0.9f, 0.999f, 1e-8f, 0.0f, &opt);
    ql_lora_model_opts mo = {.batch = o->batch, .max_len = o->seq, .checkpointing = 1, .backward = 1, .allocate = 1,
                             .opt = opt, .precision = precision, .optimizer = optimizer};
    if (rc == QL_OK) rc = ql_offload_parse(o->offload, &mo.offload);
    if (rc == QL_OK) rc = ql_lora_model_create(m, lora, ctx, &mo, &lm);
    if (rc == QL_OK && o->plan) ql_lora_model_print_plan(lm, stderr);
    if (rc == QL_OK) rc = ql_lora_model_push_params(lm);
    const int64_t n = (int64_t)o->batch * o->seq;
    ids = malloc((size_t)n * sizeof *ids);
    len = malloc((size_t)o->batch * sizeof *len);
    seeds = malloc((size_t)o->batch * sizeof *seeds);
    if (rc == QL_OK && (!ids || !len || !seeds)) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK) {
        uint64_t s = 99;
        for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(ql_splitmix64_next(&s) % (uint64_t)sh->vocab);
        for (int b = 0; b < o->batch; b++) len[b] = o->seq, seeds[b] = ql_splitmix64_next(&s);
        res->build_s = ql_now() - t0;
        res->plan_gib = (double)ql_lora_model_plan_bytes(lm, -2) / 1073741824.0;
        res->base_gib = (double)ql_lora_model_plan_bytes(lm, QL_ROLE_BASE) / 1073741824.0;
        res->acts_gib = (double)ql_lora_model_plan_bytes(lm, QL_ROLE_ACTS) / 1073741824.0;
        res->pinned_gib = (double)ql_lora_model_plan_bytes(lm, QL_ROLE_PINNED) / 1073741824.0;
    }
    double t_timed = 0;
    for (int step = 0; rc == QL_OK && step < o->warmup + o->steps; step++) {
        double ts = ql_now();
        ql_lora_batch mb = {.B = o->batch, .T = o->seq, .ids = ids, .labels = ids, .len = len, .dropout_seeds = seeds};
        ql_lora_step_opts so = {.loss_scale = 1.0f / (float)(n - o->batch), .backward = 1};
        double sum = 0;
        int64_t count = 0;
        double norm = 0;
        /* each call ends synchronized (ql_be_check), so the phases are timed as they run */
        if ((rc = ql_lora_model_zero_grads(lm)) || (rc = ql_lora_model_step(lm, &mb, &so, &sum, &count))) break;
        const double t1 = ql_now();
        if ((rc = ql_lora_model_clip_grads(lm, 0.3, &norm))) break;
        const double t2 = ql_now();
        if ((rc = ql_lora_model_optimizer_step(lm, opt, 2e-4f))) break;
        const double dt = ql_now() - ts, loss = sum / (double)count;
        if (step >= o->warmup) {
            res->fwd_bwd_s += (t1 - ts) / o->steps;
            res->clip_s += (t2 - t1) / o->steps;
            res->optim_s += (ts + dt - t2) / o->steps;
        }
        if (step == 0) res->loss_first = loss;
        res->loss_last = loss;
        if (step >= o->warmup) t_timed += dt;
        if (o->progress)
            fprintf(stderr, "{\"event\": \"bench\", \"shape\": \"%s\", \"step\": %d, \"of\": %d, \"s\": %.4f, \"loss\": %.5f%s}\n",
                    sh->name, step + 1, o->warmup + o->steps, dt, loss, step < o->warmup ? ", \"warmup\": true" : "");
    }
    if (rc == QL_OK) {
        res->s_per_step = t_timed / o->steps;
        res->tokens_per_s = (double)n / res->s_per_step;
        if (!isfinite(res->loss_last)) rc = ql_error(QL_ENUMERIC, "bench %s: the loss is not finite", sh->name);
    }
    free(ids), free(len), free(seeds);
    ql_lora_model_destroy(lm);
    ql_adamw_destroy(opt);
    ql_lora_destroy(lora);
    ql_llama_destroy(m);
    return rc;
}

int ql_bench_step(const ql_bench_opts *o, FILE *json, FILE *table)
{
    if (o->seq < 2 || o->batch < 1 || o->lora_r < 1 || o->steps < 1 || o->warmup < 0)
        return ql_error(QL_EINVAL, "bench: --seq >= 2, --batch >= 1, --lora-r >= 1, --steps >= 1 and --warmup >= 0");
    const shape *list[16];
    int n = 0;
    for (const char *p = o->shapes ? o->shapes : "7b"; *p;) {
        size_t l = strcspn(p, ",");
        const shape *sh = find_shape(p, l);
        if (!sh) return ql_error(QL_EINVAL, "bench: unknown shape '%.*s': use 7b, 13b, 33b, 65b or 70b", (int)l, p);
        if (n < 16) list[n++] = sh;
        p += l + (p[l] == ',');
    }
    ql_be_ctx *ctx = NULL;
    int rc = ql_be_ctx_open(o->device, NULL, &ctx), precision = QL_PREC_FP32, optimizer = QL_OPTIM_HOST;
    if (rc == QL_OK) rc = ql_be_precision(o->precision, ctx->be, &precision);
    if (rc == QL_OK) rc = ql_optim_parse(o->optim, ctx->be, &optimizer);
    if (rc) {
        ql_be_ctx_close(ctx);
        return rc;
    }
    result rs[16];
    int done = 0;
    for (int i = 0; i < n && rc == QL_OK; i++) {
        result r = {0};
        const int layers = o->layers > 0 ? o->layers : list[i]->layers;
        rc = bench_shape(o, list[i], ctx, precision, optimizer, &r);
        if (rc) {
            if (json)
                fprintf(json, "{\"bench\": \"step\", \"impl\": \"qlora\", \"shape\": \"%s\", \"error\": \"%s\"}\n",
                        list[i]->name, ql_error_message());
            break;
        }
        if (json) {
            fprintf(json,
                    "{\"bench\": \"step\", \"impl\": \"qlora\", \"shape\": \"%s\", \"layers\": %d, \"seq\": %d, "
                    "\"batch\": %d, \"lora_r\": %d, \"lora_dropout\": %g, \"quantizer\": \"%s\", \"device\": \"%s\", \"precision\": \"%s\", "
                    "\"checkpointing\": true, \"optim\": \"%s\", \"warmup\": %d, \"steps\": %d, "
                    "\"build_s\": %.2f, \"s_per_step\": %.4f, \"tokens_per_s\": %.1f, \"plan_gib\": %.3f, "
                    "\"base_gib\": %.3f, \"acts_gib\": %.3f, \"pinned_gib\": %.3f, \"fwd_bwd_s\": %.4f, \"clip_s\": %.4f, "
                    "\"optim_s\": %.4f, \"loss_first\": %.5f, \"loss_last\": %.5f}\n",
                    list[i]->name, layers, o->seq, o->batch, o->lora_r, (double)o->lora_dropout, o->quantizer, ctx->be->name,
                    ql_be_precision_name(precision), ql_optim_name(optimizer), o->warmup,
                    o->steps, r.build_s, r.s_per_step, r.tokens_per_s,
                    r.plan_gib, r.base_gib, r.acts_gib, r.pinned_gib, r.fwd_bwd_s, r.clip_s, r.optim_s, r.loss_first,
                    r.loss_last);
            fflush(json);
        }
        rs[done++] = r;
    }
    if (table && done) {
        fprintf(table, "\n%-6s %6s %6s %9s %11s %9s %9s %9s  %s\n", "shape", "layers", "tokens", "s/step", "tokens/s",
                "plan GiB", "base GiB", "acts GiB", "loss first -> last");
        for (int i = 0; i < done; i++)
            fprintf(table, "%-6s %6d %6d %9.3f %11.1f %9.2f %9.2f %9.2f  %.4f -> %.4f\n", list[i]->name,
                    o->layers > 0 ? o->layers : list[i]->layers, o->seq * o->batch, rs[i].s_per_step,
                    rs[i].tokens_per_s, rs[i].plan_gib, rs[i].base_gib, rs[i].acts_gib, rs[i].loss_first,
                    rs[i].loss_last);
    }
    if (table && done)
        fprintf(table, "(qlora on %s, %s; plan = the arenas of the memory plan in backend memory, optimizer state included when on the device)\n",
                ctx->be->name, ql_be_precision_name(precision));
    ql_be_ctx_close(ctx);
    return rc;
}

/* ---- qlora bench --only materialize | linear: one quantized matrix ---- */

typedef struct kmat {
    ql_linear l;             /* the quantized matrix (l.qz, l.state) */
    float *w;                /* its float32 weights (host) */
    void *dev[8][QL_MAX_STATE_BUFFERS]; /* the state's buffers in backend memory, per copy */
    int copies, nbuf;
    void *ws;                /* the device materialize's workspace */
    uint64_t ws_bytes, in_bytes;
    float *host_scratch;     /* the host materialize's float32 scratch */
} kmat;

static float bench_randn(uint64_t *s)
{
    float r = 0; /* a sum of uniforms: roughly normal, deterministic */
    for (int i = 0; i < 4; i++) r += (float)(ql_splitmix64_next(s) >> 40) * 0x1p-24f;
    return (r - 2.0f) * 1.7320508f;
}

static void kmat_free(ql_be_ctx *ctx, kmat *k)
{
    for (int c = 0; c < k->copies; c++)
        for (int i = 0; i < k->nbuf; i++) ctx->be->free(ctx, k->dev[c][i]);
    ctx->be->free(ctx, k->ws);
    if (k->l.qz && k->l.state) k->l.qz->desc->free_state(k->l.qz->inst, k->l.state);
    free(k->w);
    free(k->host_scratch);
    memset(k, 0, sizeof *k);
}

/* rows x cols weights of scale 0.02 quantized by q, with `copies` copies of
 * the state in backend memory (so that timed launches do not find it in L2) */
static int kmat_make(ql_be_ctx *ctx, const ql_qz *q, int64_t rows, int64_t cols, int copies, kmat *k)
{
    memset(k, 0, sizeof *k);
    k->l = (ql_linear){.name = "bench", .out = rows, .in = cols};
    const size_t n = (size_t)(rows * cols);
    k->w = malloc(n * sizeof *k->w);
    if (!k->w) return ql_error(QL_ENOMEM, "out of memory for a %lld x %lld matrix", (long long)rows, (long long)cols);
    uint64_t s = 7 + (uint64_t)rows * 31 + (uint64_t)cols;
    for (size_t i = 0; i < n; i++) k->w[i] = 0.02f * bench_randn(&s);
    ql_matrix_desc md = {.name = "bench", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
    int rc = q->desc->quantize(q->inst, &md, k->w, &k->l.state);
    if (rc) return rc;
    k->l.qz = q;
    const ql_quantizer_desc *d = q->desc;
    ql_state_buffer sb[QL_MAX_STATE_BUFFERS];
    uint32_t nb = 0;
    if (d->device_buffers && (rc = d->device_buffers(q->inst, k->l.state, sb, &nb))) return rc;
    for (uint32_t i = 0; i < nb; i++) k->in_bytes += sb[i].bytes; /* the bytes a materialize reads */
    if (ctx->be->host_memory) { /* the CPU materializes from the host state */
        k->host_scratch = malloc(n * sizeof *k->host_scratch);
        return k->host_scratch ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
    }
    if (!d->materialize_rows_device || !d->device_buffers || !d->device_workspace)
        return ql_error(QL_ENOTSUP, "bench: plugin %s has no device materialize (ABI 1.1 device slots)", d->name);
    k->nbuf = (int)nb;
    k->copies = copies < 1 ? 1 : copies > 8 ? 8 : copies;
    for (int c = 0; c < k->copies && !rc; c++)
        for (uint32_t i = 0; i < nb && !rc; i++) {
            rc = ctx->be->alloc(ctx, &k->dev[c][i], sb[i].bytes);
            if (!rc) rc = ql_be(ctx, upload, k->dev[c][i], sb[i].data, sb[i].bytes);
        }
    k->ws_bytes = d->device_workspace(q->inst, k->l.state, rows);
    if (!rc && k->ws_bytes) rc = ctx->be->alloc(ctx, &k->ws, k->ws_bytes);
    return rc ? rc : ql_be_check(ctx);
}

static int kmat_materialize(ql_be_ctx *ctx, kmat *k, int c, void *out)
{
    return ql_be(ctx, materialize, out, QL_DTYPE_BF16, &k->l, ctx->be->host_memory ? NULL : (const void *const *)k->dev[c],
                 k->ws, k->ws_bytes, k->host_scratch);
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* "RxC,RxC,...": at most 16 */
static int parse_matrices(const char *s, int64_t dims[16][2], int *n)
{
    *n = 0;
    for (const char *p = s; *p;) {
        size_t l = strcspn(p, ",");
        char buf[64];
        long long r = 0, c = 0;
        char x = 0, tail = 0;
        if (l >= sizeof buf) l = sizeof buf - 1;
        memcpy(buf, p, l);
        buf[l] = '\0';
        if (sscanf(buf, "%lld%c%lld%c", &r, &x, &c, &tail) != 3 || x != 'x' || r < 1 || c < 1 || r > (1 << 20) ||
            c > (1 << 20))
            return ql_error(QL_EINVAL, "bench: matrix shape '%s': want ROWSxCOLS, for example 11008x4096", buf);
        if (*n == 16) return ql_error(QL_EINVAL, "bench: at most 16 matrix shapes");
        dims[*n][0] = r, dims[(*n)++][1] = c;
        p += strcspn(p, ",");
        p += *p == ',';
    }
    return *n ? QL_OK : ql_error(QL_EINVAL, "bench: no matrix shape given");
}

#define BENCH_MATRICES "4096x4096,11008x4096,28672x8192"
enum { BENCH_L2_BYTES = 64 << 20 }; /* more than an H100's or H200's 50 MB of L2 */

/* Each sample: `batch` operations queued back to back, then a sync; the
 * sample's time over batch. */
#define TIMED(samples, i, batch, body)                      \
    do {                                                    \
        double t0_ = ql_now();                              \
        for (int b_ = 0; b_ < (batch); b_++) body;          \
        rc = rc ? rc : ql_be_check(ctx);                    \
        if ((i) >= 0) (samples)[i] = (ql_now() - t0_) / (batch); \
    } while (0)

int ql_bench_kernels(const ql_bench_opts *o, const char *what, FILE *json, FILE *table)
{
    const int linear = !strcmp(what, "linear");
    if (!linear && strcmp(what, "materialize"))
        return ql_error(QL_EINVAL, "bench: --only %s: use step, materialize or linear", what);
    if (o->steps < 1 || o->warmup < 0 || (linear && o->tokens < 1))
        return ql_error(QL_EINVAL, "bench: --steps >= 1, --warmup >= 0 and --tokens >= 1");
    int64_t dims[16][2];
    int nd = 0;
    int rc = parse_matrices(o->shapes ? o->shapes : BENCH_MATRICES, dims, &nd);
    if (rc) return rc;
    ql_qz *q = NULL;
    ql_be_ctx *ctx = NULL;
    if ((rc = ql_qz_open(o->quantizer, &q))) return rc;
    if ((rc = ql_be_ctx_open(o->device, NULL, &ctx))) {
        ql_qz_close(q);
        return rc;
    }
    const char *dev = ctx->be->name;
    char spec[600];
    snprintf(spec, sizeof spec, "%s%s%s", q->desc->name, *q->options ? ":" : "", q->options);
    char rows_txt[16][160];
    int done = 0;
    double *t = malloc((size_t)o->steps * 2 * sizeof *t);
    if (!t) rc = ql_error(QL_ENOMEM, "out of memory");
    for (int si = 0; si < nd && !rc; si++) {
        const int64_t R = dims[si][0], C = dims[si][1], n = R * C;
        const uint64_t out_bytes = (uint64_t)n * 2;
        kmat k;
        void *out[8] = {0}, *src[8] = {0}, *dst[8] = {0};
        float *x = NULL, *y = NULL;
        uint16_t *w16 = NULL;
        void *scratch = NULL;
        int copies = 1;
        if (!ctx->be->host_memory && !linear) { /* materialize: enough copies that the inputs leave L2 */
            const uint64_t est = (uint64_t)n / 2 + out_bytes;
            copies = (int)(4 * (uint64_t)BENCH_L2_BYTES / est + 1);
            if (copies > 8) copies = 8;
        }
        rc = kmat_make(ctx, q, R, C, copies, &k);
        copies = k.copies ? k.copies : 1;
        double *s1 = t, *s2 = t + o->steps, ms1 = 0, ms2 = 0;
        if (!linear) {
            const size_t half = (size_t)((k.in_bytes + out_bytes) / 2);
            for (int c = 0; c < copies && !rc; c++) {
                rc = ctx->be->alloc(ctx, &out[c], out_bytes);
                if (!rc && half) rc = ctx->be->alloc(ctx, &src[c], half);
                if (!rc && half) rc = ctx->be->alloc(ctx, &dst[c], half);
                if (!rc && half) rc = ql_be(ctx, zero, src[c], half);
            }
            for (int r = -o->warmup; r < o->steps && !rc; r++) {
                TIMED(s1, r, copies, rc = rc ? rc : kmat_materialize(ctx, &k, b_, out[b_]));
                if (half) TIMED(s2, r, copies, rc = rc ? rc : ql_be(ctx, copy, dst[b_], src[b_], half));
            }
            if (!rc) {
                ms1 = median(s1, o->steps) * 1e3;
                ms2 = half ? median(s2, o->steps) * 1e3 : 0;
                const double gbs = (double)(k.in_bytes + out_bytes) / (ms1 * 1e6),
                             cgbs = half ? (double)(2 * half) / (ms2 * 1e6) : 0;
                if (json)
                    fprintf(json,
                            "{\"bench\": \"materialize\", \"impl\": \"qlora\", \"quantizer\": \"%s\", \"rows\": %lld, "
                            "\"cols\": %lld, \"out\": \"bf16\", \"device\": \"%s\", \"ms\": %.5f, \"gb_per_s\": %.1f, "
                            "\"copy_ms\": %.5f, \"copy_gb_per_s\": %.1f, \"x_copy\": %.3f, \"bytes_in\": %llu, "
                            "\"bytes_out\": %llu, \"copies\": %d, \"samples\": %d}\n",
                            spec, (long long)R, (long long)C, dev, ms1, gbs, ms2, cgbs, half ? ms1 / ms2 : 0.0,
                            (unsigned long long)k.in_bytes, (unsigned long long)out_bytes, copies, o->steps);
                char shp[40];
                snprintf(shp, sizeof shp, "%lldx%lld", (long long)R, (long long)C);
                snprintf(rows_txt[done++], sizeof rows_txt[0], "%-10s %-12s %10.4f %10.0f %10.0f %8.2f",
                         q->desc->name, shp, ms1, gbs, cgbs, half ? ms1 / ms2 : 0.0);
            }
        } else {
            /* y[T, R] = x[T, C] W^T, x already bf16 in the scratch (reuse_x), as the
             * peer's x is: the 4-bit layer (materialize, then the product) against
             * the same product with the weights dense in bf16 */
            const int64_t T = o->tokens;
            const size_t sb = ql_be_scratch_bytes(ctx->be, QL_PREC_BF16, T, C, R, ctx->be->host_memory ? n : 0, 1, 1,
                                                  1, 1, 0); /* the CPU widens bf16 weights into it */
            uint16_t *h16 = malloc((size_t)n * 2);
            float *hx = malloc((size_t)(T * C) * sizeof *hx);
            if (!rc && (!h16 || !hx)) rc = ql_error(QL_ENOMEM, "out of memory");
            if (!rc) {
                for (int64_t i = 0; i < n; i++) h16[i] = ql_be_bf16(k.w[i]);
                uint64_t s = 11;
                for (int64_t i = 0; i < T * C; i++) hx[i] = bench_randn(&s);
            }
            if (!rc) rc = ctx->be->alloc(ctx, (void **)&w16, (size_t)n * 2);
            if (!rc) rc = ctx->be->alloc(ctx, &out[0], out_bytes);
            if (!rc) rc = ctx->be->alloc(ctx, (void **)&x, (size_t)(T * C) * 4);
            if (!rc) rc = ctx->be->alloc(ctx, (void **)&y, (size_t)(T * R) * 4);
            if (!rc) rc = ctx->be->alloc(ctx, &scratch, sb);
            if (!rc) rc = ql_be(ctx, upload, w16, h16, (size_t)n * 2);
            if (!rc) rc = ql_be(ctx, upload, x, hx, (size_t)(T * C) * 4);
            free(h16), free(hx);
            const int prec = ctx->precision;
            void *old_scratch = ctx->scratch;
            const size_t old_bytes = ctx->scratch_bytes;
            ctx->precision = QL_PREC_BF16, ctx->scratch = scratch, ctx->scratch_bytes = sb;
            if (!rc) rc = ql_be(ctx, matmul_nt_w16, y, x, w16, T, C, R, 0); /* x's bf16 copy into the scratch */
            const int batch = ctx->be->host_memory ? 1 : 4;
            for (int r = -o->warmup; r < o->steps && !rc; r++) {
                TIMED(s2, r, batch, (ctx->reuse_x = 1, rc = rc ? rc : ql_be(ctx, matmul_nt_w16, y, x, w16, T, C, R, 0)));
                TIMED(s1, r, batch,
                      (rc = rc ? rc : kmat_materialize(ctx, &k, 0, out[0]), ctx->reuse_x = 1,
                       rc = rc ? rc : ql_be(ctx, matmul_nt_w16, y, x, (const uint16_t *)out[0], T, C, R, 0)));
            }
            ctx->reuse_x = 0;
            ctx->precision = prec, ctx->scratch = old_scratch, ctx->scratch_bytes = old_bytes;
            if (!rc) {
                ms1 = median(s1, o->steps) * 1e3;
                ms2 = median(s2, o->steps) * 1e3;
                const double tf = 2.0 * (double)T * (double)n / (ms2 * 1e9);
                if (json)
                    fprintf(json,
                            "{\"bench\": \"linear\", \"impl\": \"qlora\", \"quantizer\": \"%s\", \"rows\": %lld, "
                            "\"cols\": %lld, \"tokens\": %lld, \"device\": \"%s\", \"ms_4bit\": %.5f, "
                            "\"ms_bf16\": %.5f, \"x_bf16\": %.3f, \"bf16_tflops\": %.1f, \"samples\": %d}\n",
                            spec, (long long)R, (long long)C, (long long)T, dev, ms1, ms2, ms1 / ms2, tf,
                            o->steps);
                char shp[40];
                snprintf(shp, sizeof shp, "%lldx%lld", (long long)R, (long long)C);
                snprintf(rows_txt[done++], sizeof rows_txt[0], "%-10s %-12s %7lld %10.4f %10.4f %8.2f %9.1f",
                         q->desc->name, shp, (long long)T, ms1, ms2, ms1 / ms2, tf);
            }
        }
        if (json) fflush(json);
        for (int c = 0; c < 8; c++) ctx->be->free(ctx, out[c]), ctx->be->free(ctx, src[c]), ctx->be->free(ctx, dst[c]);
        ctx->be->free(ctx, x), ctx->be->free(ctx, y), ctx->be->free(ctx, w16), ctx->be->free(ctx, scratch);
        kmat_free(ctx, &k);
    }
    if (table && done) {
        if (linear)
            fprintf(table, "\n%-10s %-12s %7s %10s %10s %8s %9s\n", "quantizer", "shape", "tokens", "4-bit ms",
                    "bf16 ms", "x bf16", "bf16 TF/s");
        else
            fprintf(table, "\n%-10s %-12s %10s %10s %10s %8s\n", "quantizer", "shape", "ms", "GB/s", "copy GB/s",
                    "x copy");
        for (int i = 0; i < done; i++) fprintf(table, "%s\n", rows_txt[i]);
        fprintf(table, "(qlora on %s; %s)\n", dev,
                linear ? "4-bit = materialize to bf16, then the bf16 product; x is bf16 already in both"
                       : "materialize to bf16 against a device copy of as many bytes (read + write); medians");
    }
    free(t);
    ql_be_ctx_close(ctx);
    ql_qz_close(q);
    return rc;
}
