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
    o->shapes = "7b";
    o->device = "auto";
    o->precision = "auto";
    o->quantizer = "nf4";
    o->optim = "auto";
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
    if (rc == QL_OK) rc = ql_lora_model_create(m, lora, ctx, &mo, &lm);
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
    }
    double t_timed = 0;
    for (int step = 0; rc == QL_OK && step < o->warmup + o->steps; step++) {
        double ts = ql_now();
        ql_lora_batch mb = {.B = o->batch, .T = o->seq, .ids = ids, .labels = ids, .len = len, .dropout_seeds = seeds};
        ql_lora_step_opts so = {.loss_scale = 1.0f / (float)(n - o->batch), .backward = 1};
        double sum = 0;
        int64_t count = 0;
        double norm = 0;
        if ((rc = ql_lora_model_zero_grads(lm)) || (rc = ql_lora_model_step(lm, &mb, &so, &sum, &count)) ||
            (rc = ql_lora_model_clip_grads(lm, 0.3, &norm)) || (rc = ql_lora_model_optimizer_step(lm, opt, 2e-4f)))
            break;
        const double dt = ql_now() - ts, loss = sum / (double)count;
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
    for (const char *p = o->shapes; *p;) {
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
                    "\"base_gib\": %.3f, \"acts_gib\": %.3f, \"loss_first\": %.5f, \"loss_last\": %.5f}\n",
                    list[i]->name, layers, o->seq, o->batch, o->lora_r, (double)o->lora_dropout, o->quantizer, ctx->be->name,
                    ql_be_precision_name(precision), ql_optim_name(optimizer), o->warmup,
                    o->steps, r.build_s, r.s_per_step, r.tokens_per_s,
                    r.plan_gib, r.base_gib, r.acts_gib, r.loss_first, r.loss_last);
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
