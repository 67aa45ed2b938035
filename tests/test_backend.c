/* The compute backend's context (sticky status, registry), micro-batch
 * steps against one-sequence steps, and the memory plan. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "lora_model.h"
#include "ops.h"
#include "ops_backward.h"
#include "plan.h"
#include "qlora/error.h"
#include "qlora/eval.h"
#include "qlora/tokenizer.h"
#include "qlora/llama.h"
#include "qlora/lora.h"
#include "testutil.h"

static char model_dir[4096];

static ql_llama *load_model(void)
{
    snprintf(model_dir, sizeof model_dir, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    ql_llama_load_opts lo = {.quantizer = "nf4"};
    ql_llama *m = NULL;
    ck_assert_msg(ql_llama_load(model_dir, &lo, &m) == QL_OK, "%s", ql_error_message());
    return m;
}

/* LoRA on every module with B != 0, so every gradient is non-trivial */
static ql_lora *make_lora(ql_llama *m, float dropout)
{
    ql_lora_config cfg = {.r = 4, .alpha = 8.0f, .dropout = dropout, .modules = QL_LORA_ALL_MODULES};
    ql_lora *l = NULL;
    ck_assert_int_eq(ql_lora_create(m, &cfg, 7, &l), QL_OK);
    for (int i = 0; i < l->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            ql_lora_pair *p = ql_lora_pair_at(l, i, k);
            if (p) tu_randn(p->B, (size_t)(p->out * l->cfg.r), 100 + (uint64_t)(i * QL_MOD_COUNT + k), 0.05f);
        }
    return l;
}

enum { NSEQ = 4, TMAX = 40 };
static const int32_t lens[NSEQ] = {17, 31, 1, 24}; /* one too short to predict anything */

/* sequence b: pseudo-random ids, labels -100 on the first few ("source") */
static void make_seqs(int vocab, int32_t ids[NSEQ][TMAX], int32_t labels[NSEQ][TMAX])
{
    uint64_t s = 12345;
    for (int b = 0; b < NSEQ; b++)
        for (int t = 0; t < TMAX; t++) {
            ids[b][t] = (int32_t)(ql_splitmix64_next(&s) % (uint64_t)vocab);
            labels[b][t] = t < 3 + b ? QL_IGNORE_INDEX : ids[b][t];
        }
}

static double rel_max_diff(const float *a, const float *b, size_t n)
{
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > worst) worst = d;
        if (fabs(a[i]) > scale) scale = fabs(a[i]);
    }
    return scale > 0 ? worst / scale : worst;
}

/* One-sequence steps (B = 1 each) against one micro-batch of all NSEQ,
 * padded to T (>= the longest): the same loss and LoRA gradients, to float
 * rounding: OpenBLAS sums a product over the micro-batch's B*T rows in its own
 * blocked order where B one-sequence steps add T rows at a time (observed:
 * gradients 1.5e-6 of their largest, the loss 1e-8 relative; a padded row
 * leaking into a sum or a mask off by one is 1e-3 or more). */
static void batched_vs_single(int checkpointing, float dropout, int pad_to, int64_t logit_rows)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, dropout);
    int32_t ids[NSEQ][TMAX], labels[NSEQ][TMAX];
    make_seqs(ql_llama_get_config(m)->vocab, ids, labels);
    uint64_t seeds[NSEQ] = {11, 22, 33, 44};
    const float scale = 1.0f / 50.0f;

    /* one sequence at a time */
    ql_lora_model_opts o1 = {.batch = 1, .max_len = TMAX, .checkpointing = checkpointing, .backward = 1, .allocate = 1};
    ql_lora_model *one = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &o1, &one), QL_OK);
    memset(l->grads, 0, l->n_params * 4);
    double sum1 = 0;
    int64_t n1 = 0;
    for (int b = 0; b < NSEQ; b++) {
        ql_lora_batch mb = {.B = 1, .T = lens[b], .ids = ids[b], .labels = labels[b], .len = &lens[b],
                            .dropout_seeds = &seeds[b]};
        ql_lora_step_opts so = {.loss_scale = scale, .backward = 1};
        ck_assert_msg(ql_lora_model_step(one, &mb, &so, &sum1, &n1) == QL_OK, "%s", ql_error_message());
    }
    float *g1 = malloc(l->n_params * 4);
    memcpy(g1, l->grads, l->n_params * 4);
    ql_lora_model_destroy(one);

    /* the whole micro-batch, right-padded to pad_to */
    ql_lora_model_opts ob = {.batch = NSEQ, .max_len = TMAX, .checkpointing = checkpointing, .backward = 1,
                             .allocate = 1, .logit_rows = logit_rows};
    ql_lora_model *lm = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &ob, &lm), QL_OK);
    int32_t pids[NSEQ * TMAX], plab[NSEQ * TMAX];
    for (int b = 0; b < NSEQ; b++)
        for (int t = 0; t < pad_to; t++) {
            /* padding holds junk ids (never read) and labels (masked) */
            pids[b * pad_to + t] = t < lens[b] ? ids[b][t] : 1000000 + t;
            plab[b * pad_to + t] = t < lens[b] ? labels[b][t] : 5;
        }
    memset(l->grads, 0, l->n_params * 4);
    double sumb = 0;
    int64_t nb = 0;
    ql_lora_batch mb = {.B = NSEQ, .T = pad_to, .ids = pids, .labels = plab, .len = lens, .dropout_seeds = seeds};
    ql_lora_step_opts so = {.loss_scale = scale, .backward = 1};
    ck_assert_msg(ql_lora_model_step(lm, &mb, &so, &sumb, &nb) == QL_OK, "%s", ql_error_message());

    ck_assert_int_eq(nb, n1);
    ck_assert_int_gt(n1, 40);
    ck_assert_msg(fabs(sumb - sum1) <= 1e-6 * fabs(sum1), "loss sum %.9g batched vs %.9g", sumb, sum1);
    double e = rel_max_diff(g1, l->grads, l->n_params);
    ck_assert_msg(e <= 1e-5, "LoRA gradients differ: max |diff| / max |grad| = %.3g", e);
    double gmax = 0;
    for (size_t i = 0; i < l->n_params; i++) gmax = fmax(gmax, fabs(g1[i]));
    ck_assert_msg(gmax > 1e-6, "gradients are all zero");

    /* loss only (evaluation) agrees too */
    double se = 0;
    int64_t ne = 0;
    ql_lora_step_opts eo = {.backward = 0};
    ck_assert_int_eq(ql_lora_model_step(lm, &mb, &eo, &se, &ne), QL_OK);
    ck_assert_int_eq(ne, n1);
    if (dropout == 0) ck_assert_msg(fabs(se - sum1) <= 1e-6 * fabs(sum1), "eval loss %.9g vs %.9g", se, sum1);
    free(g1);
    ql_lora_model_destroy(lm);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}

START_TEST(batched_equals_single)
{
    batched_vs_single(0, 0.0f, 31, 0);
}
END_TEST

START_TEST(batched_equals_single_dropout_checkpointing)
{
    batched_vs_single(1, 0.1f, 31, 0);
}
END_TEST

START_TEST(batched_equals_single_extra_padding_chunked_logits)
{
    batched_vs_single(0, 0.1f, TMAX, 7);
}
END_TEST

/* ---- sticky status ---- */

static int matmul_calls, swiglu_calls, fail_swiglu;
static const ql_backend *cpu;

static int counting_matmul(ql_be_ctx *ctx, float *y, const float *x, const float *w, int64_t rows, int64_t in,
                           int64_t out, int accumulate)
{
    matmul_calls++;
    return cpu->matmul_nt(ctx, y, x, w, rows, in, out, accumulate);
}

static int failing_swiglu(ql_be_ctx *ctx, float *out, const float *gate, const float *up, int64_t n)
{
    swiglu_calls++;
    if (fail_swiglu) return ql_error(QL_ECUDA, "injected failure in swiglu_forward");
    return cpu->swiglu_forward(ctx, out, gate, up, n);
}

START_TEST(sticky_error_stops_the_step)
{
    cpu = ql_backend_cpu();
    ql_backend faulty = *cpu;
    faulty.name = "faulty";
    faulty.matmul_nt = counting_matmul;
    faulty.swiglu_forward = failing_swiglu;
    ql_be_ctx *ctx = NULL;
    ck_assert_int_eq(ql_be_ctx_open(NULL, &faulty, &ctx), QL_OK);
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.0f);
    ql_lora_model_opts o = {.batch = 2, .max_len = TMAX, .backward = 1, .allocate = 1};
    ql_lora_model *lm = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, ctx, &o, &lm), QL_OK);
    int32_t ids[NSEQ][TMAX], labels[NSEQ][TMAX];
    make_seqs(ql_llama_get_config(m)->vocab, ids, labels);
    int32_t len[2] = {TMAX, TMAX};
    uint64_t seeds[2] = {1, 2};
    ql_lora_batch mb = {.B = 2, .T = TMAX, .ids = &ids[0][0], .labels = &labels[0][0], .len = len,
                        .dropout_seeds = seeds};
    ql_lora_step_opts so = {.loss_scale = 0.01f, .backward = 1};

    /* a good step: every op runs */
    double sum = 0;
    int64_t n = 0;
    memset(l->grads, 0, l->n_params * 4);
    ck_assert_int_eq(ql_lora_model_step(lm, &mb, &so, &sum, &n), QL_OK);
    ck_assert(isfinite(sum) && sum > 0);
    int good_matmuls = matmul_calls;
    ck_assert_int_gt(good_matmuls, 10);

    /* the first swiglu fails: later ops are no-ops, the step returns its error */
    fail_swiglu = 1;
    matmul_calls = swiglu_calls = 0;
    sum = 0;
    n = 0;
    memset(l->grads, 0, l->n_params * 4);
    ql_error_clear();
    int rc = ql_lora_model_step(lm, &mb, &so, &sum, &n);
    ck_assert_int_eq(rc, QL_ECUDA);
    ck_assert_contains(ql_error_message(), "injected failure in swiglu_forward");
    ck_assert_int_eq(swiglu_calls, 1);   /* never called again */
    ck_assert_int_eq(matmul_calls, 6);   /* layer 0's q, k, v, o, gate, up ran before it; nothing after */
    ck_assert_int_eq(n, 0);              /* no loss was taken */
    for (size_t i = 0; i < l->n_params; i++) ck_assert_float_eq(l->grads[i], 0.0f);
    ck_assert_int_eq(ctx->status, QL_OK); /* checked, so cleared */

    /* direct use: a failed op makes the next a no-op until checked */
    float a[4] = {1, 2, 3, 4}, y[4] = {0};
    fail_swiglu = 1;
    ck_assert_int_eq(ql_be(ctx, swiglu_forward, y, a, a, 4), QL_ECUDA);
    matmul_calls = 0;
    ck_assert_int_eq(ql_be(ctx, matmul_nt, y, a, a, 1, 4, 1, 0), QL_ECUDA);
    ck_assert_int_eq(matmul_calls, 0);
    ck_assert_float_eq(y[0], 0.0f);
    ql_error_clear();
    ck_assert_int_eq(ql_be_check(ctx), QL_ECUDA);
    ck_assert_contains(ql_error_message(), "injected failure");
    ck_assert_int_eq(ql_be(ctx, matmul_nt, y, a, a, 1, 4, 1, 0), QL_OK);
    ck_assert_float_eq(y[0], 30.0f);

    /* and the model steps again once the fault is gone */
    fail_swiglu = 0;
    double sum2 = 0;
    n = 0;
    ck_assert_int_eq(ql_lora_model_step(lm, &mb, &so, &sum2, &n), QL_OK);
    ck_assert_int_gt(n, 0);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(ctx);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

START_TEST(registry)
{
    const ql_backend *be = NULL;
    ck_assert_int_eq(ql_backend_find("cpu", &be), QL_OK);
    ck_assert_ptr_eq(be, ql_backend_cpu());
    ck_assert_int_eq(ql_backend_find("tpu", &be), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "unknown device 'tpu'");
    int prec = -1, optim = -1;
    ck_assert_int_eq(ql_be_precision("fp8", ql_backend_cpu(), &prec), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "unknown precision 'fp8': use fp32, bf16 or auto");
    ck_assert_int_eq(ql_be_precision("auto", ql_backend_cpu(), &prec), QL_OK);
    ck_assert_int_eq(prec, QL_PREC_FP32);
    ck_assert_int_eq(ql_optim_parse("sgd", ql_backend_cpu(), &optim), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "unknown optimizer 'sgd'");
    ck_assert_int_eq(ql_optim_parse("paged_adamw", ql_backend_cpu(), &optim), QL_OK);
    ck_assert_int_eq(optim, QL_OPTIM_HOST); /* the CPU steps on the host whatever the name */
    ql_be_ctx *ctx = NULL;
    if (!ql_backend_cuda()) { /* this machine (CI): no GPU, or no CUDA in the build */
        ck_assert_contains(ql_error_message(), "device cuda is not available: ");
        ck_assert_int_eq(ql_backend_find("cuda", &be), QL_ENOTSUP);
        ck_assert_ptr_null(be);
        ck_assert_contains(ql_error_message(), "device cuda is not available");
        ck_assert_int_eq(ql_be_ctx_open("cuda", NULL, &ctx), QL_ENOTSUP);
        ck_assert_ptr_null(ctx);
        /* auto falls back to the CPU, and asking leaves no error behind */
        ql_error_clear();
        ck_assert_str_eq(ql_backend_default(), "cpu");
        ck_assert_str_eq(ql_error_message(), "");
        ck_assert_int_eq(ql_backend_find("auto", &be), QL_OK);
        ck_assert_ptr_eq(be, ql_backend_cpu());
    } else {
        ck_assert_str_eq(ql_backend_default(), "cuda");
        ck_assert_int_eq(ql_backend_find("auto", &be), QL_OK);
        ck_assert_str_eq(be->name, "cuda");
    }
    /* the cross-entropy op refuses a bad target */
    ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &ctx), QL_OK);
    float lg[4] = {0}, loss[1];
    int32_t tg[1] = {9};
    ck_assert_int_eq(ql_be(ctx, cross_entropy, loss, NULL, lg, tg, 1, 4, QL_IGNORE_INDEX, 1.0f), QL_EINVAL);
    ck_assert_int_eq(ql_be_check(ctx), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "outside the vocabulary");
    ql_be_ctx_close(ctx);
}
END_TEST

/* ---- the memory plan ---- */

START_TEST(plan_sizes_add_up)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.05f);
    const ql_llama_config *c = ql_llama_get_config(m);
    const int64_t B = 3, T = 33, R = B * T, H = c->hidden, I = c->intermediate, nh = c->n_heads, nl = c->n_layers;
    const int64_t qd = nh * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim, r = l->cfg.r;
    uint64_t acts[2], bwd[2];
    for (int ck = 0; ck < 2; ck++) {
        ql_lora_model_opts o = {.batch = (int)B, .max_len = (int)T, .checkpointing = ck, .backward = 1, .allocate = 0};
        ql_lora_model *lm = NULL;
        ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &o, &lm), QL_OK);
        uint64_t total = 0;
        for (int role = 0; role < QL_ROLE_COUNT; role++) total += ql_lora_model_plan_bytes(lm, role);
        ck_assert_uint_eq(total, ql_lora_model_plan_bytes(lm, -1));
        ck_assert_uint_eq(ql_lora_model_plan_bytes(lm, QL_ROLE_LORA), l->n_params * 4);
        ck_assert_uint_eq(ql_lora_model_plan_bytes(lm, QL_ROLE_GRADS), l->n_params * 4);
        acts[ck] = ql_lora_model_plan_bytes(lm, QL_ROLE_ACTS);
        bwd[ck] = ql_lora_model_plan_bytes(lm, QL_ROLE_BWD);
        /* at least the exact floats, at most one alignment pad per buffer */
        /* (the dropped LoRA inputs are not kept: one module's is made again for
         * its backward, in the backward scratch) */
        int64_t per_layer = R * (3 * H + 2 + 2 * qd + 2 * kvd + 3 * I) + B * nh * T * T + QL_MOD_COUNT * R * r;
        int64_t floats = (nl + 1) * R * H + (ck ? 1 : nl) * per_layer + R * H + R;
        int64_t nbufs = (nl + 1) + (ck ? 1 : nl) * (13 + QL_MOD_COUNT) + 2;
        ck_assert_uint_ge(acts[ck], (uint64_t)floats * 4);
        ck_assert_uint_le(acts[ck], (uint64_t)floats * 4 + (uint64_t)nbufs * QL_PLAN_ALIGN);
        /* weights scratch: the largest quantized linear */
        ck_assert_uint_ge(ql_lora_model_plan_bytes(lm, QL_ROLE_WEIGHTS), (uint64_t)(I * H * 4));
        ck_assert_uint_ge(ql_lora_model_plan_bytes(lm, QL_ROLE_LOGITS), (uint64_t)(R * c->vocab * 4));
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);
        ql_lora_model_print_plan(lm, f);
        fclose(f);
        ck_assert_contains(text, "memory plan (batch 3 x 33 tokens");
        ck_assert_contains(text, "activations");
        ck_assert_contains(text, "base weights");
        ck_assert_contains(text, "total");
        free(text);
        ql_lora_model_destroy(lm);
    }
    ck_assert_uint_gt(acts[0], acts[1]); /* checkpointing keeps less */
    /* and its backward reuses hm, gate and up for dup, datt, dq, dk and dv */
    ck_assert(2 * qd <= I && 2 * kvd <= I);
    const uint64_t aliased = (uint64_t)(R * (I + 2 * qd + 2 * kvd)) * 4; /* five buffers, each padded to the alignment */
    ck_assert_uint_ge(bwd[0] - bwd[1], aliased);
    ck_assert_uint_le(bwd[0] - bwd[1], aliased + 5 * QL_PLAN_ALIGN);

    /* chunked logits: the plan holds only the chunk */
    ql_lora_model_opts o = {.batch = (int)B, .max_len = (int)T, .backward = 1, .logit_rows = 10};
    ql_lora_model *lm = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &o, &lm), QL_OK);
    ck_assert_uint_le(ql_lora_model_plan_bytes(lm, QL_ROLE_LOGITS), (uint64_t)(10 * c->vocab * 4 + QL_PLAN_ALIGN));
    ql_lora_model_destroy(lm);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

/* bf16 precision rounds the residual stream at each layer boundary, so
 * checkpointing may keep the layer inputs in bf16 and lose nothing: the
 * checkpointed step (bf16 inputs, widened for the recompute) gives the loss
 * and gradients of the step that keeps every activation, bit for bit, and
 * its plan holds (nl + 1) float32 inputs fewer, nl bf16 ones and two float32
 * ones more.  A forward-only plan (two alternating inputs) gives the same
 * loss as the training plan's forward. */
START_TEST(bf16_checkpointing_keeps_bf16_inputs_exactly)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.05f);
    const ql_llama_config *c = ql_llama_get_config(m);
    int32_t ids[NSEQ][TMAX], labels[NSEQ][TMAX], pids[NSEQ * TMAX], plab[NSEQ * TMAX];
    make_seqs(c->vocab, ids, labels);
    for (int b = 0; b < NSEQ; b++)
        for (int t = 0; t < TMAX; t++) {
            pids[b * TMAX + t] = ids[b][t];
            plab[b * TMAX + t] = labels[b][t];
        }
    uint64_t seeds[NSEQ] = {11, 22, 33, 44};
    ql_lora_batch mb = {.B = NSEQ, .T = TMAX, .ids = pids, .labels = plab, .len = lens, .dropout_seeds = seeds};
    const int64_t R = NSEQ * TMAX, H = c->hidden, nl = c->n_layers;
    float *g[3];
    double loss[3], eval_loss[3];
    uint64_t acts[3];
    for (int run = 0; run < 3; run++) { /* bf16 without and with checkpointing; fp32 with */
        const int ck = run > 0, prec = run < 2 ? QL_PREC_BF16 : QL_PREC_FP32;
        ql_lora_model_opts o = {.batch = NSEQ, .max_len = TMAX, .checkpointing = ck, .backward = 1, .allocate = 1,
                                .precision = prec};
        ql_lora_model *lm = NULL;
        ck_assert_msg(ql_lora_model_create(m, l, NULL, &o, &lm) == QL_OK, "%s", ql_error_message());
        acts[run] = ql_lora_model_plan_bytes(lm, QL_ROLE_ACTS);
        memset(l->grads, 0, l->n_params * 4);
        loss[run] = 0;
        int64_t n = 0;
        ql_lora_step_opts so = {.loss_scale = 1.0f / 50, .backward = 1};
        ck_assert_msg(ql_lora_model_step(lm, &mb, &so, &loss[run], &n) == QL_OK, "%s", ql_error_message());
        g[run] = malloc(l->n_params * 4);
        memcpy(g[run], l->grads, l->n_params * 4);
        eval_loss[run] = 0;
        ql_lora_step_opts eo = {.backward = 0};
        ck_assert_int_eq(ql_lora_model_step(lm, &mb, &eo, &eval_loss[run], &n), QL_OK);
        ql_lora_model_destroy(lm);
    }
    ck_assert_msg(loss[0] == loss[1], "bf16 loss %.17g kept, %.17g checkpointed", loss[0], loss[1]);
    ck_assert_msg(memcmp(g[0], g[1], l->n_params * 4) == 0, "bf16 gradients differ with checkpointing (%.3g)",
                  rel_max_diff(g[0], g[1], l->n_params));
    /* bf16 is not float32: close, not equal */
    ck_assert_msg(loss[1] != loss[2] && fabs(loss[1] - loss[2]) < 0.02 * fabs(loss[2]), "bf16 %.9g, fp32 %.9g",
                  loss[1], loss[2]);
    double e = rel_max_diff(g[2], g[1], l->n_params);
    ck_assert_msg(e > 0 && e < 0.1, "bf16 gradients against fp32: %.3g", e);
    /* inputs: fp32 keeps nl + 1 float32 [R, H]; bf16 two float32 and nl bf16 */
    const int64_t saved = ((nl + 1) * 4 - (2 * 4 + nl * 2)) * R * H;
    ck_assert_uint_le(acts[1] + (uint64_t)saved, acts[2] + (uint64_t)(nl + 1) * QL_PLAN_ALIGN);
    ck_assert_uint_ge(acts[1] + (uint64_t)saved + (uint64_t)(nl + 1) * QL_PLAN_ALIGN, acts[2]);
    /* forward only, two alternating inputs */
    ql_lora_model_opts fo = {.batch = NSEQ, .max_len = TMAX, .backward = 0, .allocate = 1, .precision = QL_PREC_BF16};
    ql_lora_model *lm = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &fo, &lm), QL_OK);
    double fl = 0;
    int64_t n = 0;
    ql_lora_step_opts eo = {.backward = 0};
    ck_assert_int_eq(ql_lora_model_step(lm, &mb, &eo, &fl, &n), QL_OK);
    ck_assert_msg(fl == eval_loss[0] && fl == eval_loss[1], "forward-only %.17g, training plans %.17g %.17g", fl,
                  eval_loss[0], eval_loss[1]);
    ql_lora_model_destroy(lm);
    for (int run = 0; run < 3; run++) free(g[run]);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

/* Prefetching the next quantized weights (a second buffer, the side queue)
 * changes no bit: training and forward-only steps, with and without
 * checkpointing, against a model without it; and it does prefetch (the
 * recorded order is used from the second step on: materializes on the side
 * queue, none more than without). */
static int mat_calls, mat_side;

static int counting_materialize(ql_be_ctx *ctx, void *w, int32_t dtype, const ql_linear *l,
                                const void *const *dev_bufs, void *workspace, uint64_t workspace_bytes,
                                float *host_scratch)
{
    mat_calls++;
    mat_side += ctx->queue == 1;
    return cpu->materialize(ctx, w, dtype, l, dev_bufs, workspace, workspace_bytes, host_scratch);
}

START_TEST(prefetch_gives_the_same_bits)
{
    cpu = ql_backend_cpu();
    ql_backend counting = *cpu;
    counting.name = "counting";
    counting.materialize = counting_materialize;
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.1f);
    const ql_llama_config *c = ql_llama_get_config(m);
    int32_t ids[NSEQ][TMAX], labels[NSEQ][TMAX];
    make_seqs(c->vocab, ids, labels);
    uint64_t seeds[NSEQ] = {5, 6, 7, 8};
    ql_lora_batch mb = {.B = NSEQ, .T = TMAX, .ids = &ids[0][0], .labels = &labels[0][0], .len = lens,
                        .dropout_seeds = seeds};
    const int ck = _i;
    enum { STEPS = 4 };
    double loss[2][STEPS];
    float *g[2][STEPS];
    int calls[2][STEPS], side[2][STEPS];
    uint64_t wbytes[2];
    for (int pf = 0; pf < 2; pf++) {
        ql_be_ctx *ctx = NULL;
        ck_assert_int_eq(ql_be_ctx_open(NULL, &counting, &ctx), QL_OK);
        ql_lora_model_opts o = {.batch = NSEQ, .max_len = TMAX, .checkpointing = ck, .backward = 1, .allocate = 1,
                                .precision = QL_PREC_BF16, .prefetch = pf ? 1 : -1};
        ql_lora_model *lm = NULL;
        ck_assert_msg(ql_lora_model_create(m, l, ctx, &o, &lm) == QL_OK, "%s", ql_error_message());
        wbytes[pf] = ql_lora_model_plan_bytes(lm, QL_ROLE_WEIGHTS);
        for (int st = 0; st < STEPS; st++) { /* train, forward only, train, train */
            ql_lora_step_opts so = {.loss_scale = 1.0f / 50, .backward = st != 1};
            memset(l->grads, 0, l->n_params * 4);
            mat_calls = mat_side = 0;
            int64_t n = 0;
            loss[pf][st] = 0;
            ck_assert_msg(ql_lora_model_step(lm, &mb, &so, &loss[pf][st], &n) == QL_OK, "%s", ql_error_message());
            calls[pf][st] = mat_calls, side[pf][st] = mat_side;
            g[pf][st] = malloc(l->n_params * 4);
            memcpy(g[pf][st], l->grads, l->n_params * 4);
        }
        ql_lora_model_destroy(lm);
        ql_be_ctx_close(ctx);
    }
    for (int st = 0; st < STEPS; st++) {
        ck_assert_msg(loss[0][st] == loss[1][st], "step %d: loss %.17g without prefetching, %.17g with", st,
                      loss[0][st], loss[1][st]);
        ck_assert_msg(memcmp(g[0][st], g[1][st], l->n_params * 4) == 0, "step %d: gradients differ with prefetching",
                      st);
        ck_assert_int_eq(side[0][st], 0);
        ck_assert_int_le(calls[1][st], calls[0][st]);
        free(g[0][st]), free(g[1][st]);
    }
    ck_assert_int_eq(side[1][0], 0); /* the first step of each kind records the order */
    ck_assert_int_eq(side[1][1], 0);
    ck_assert_int_gt(side[1][2], calls[1][2] / 2); /* then most weights come from the side queue */
    ck_assert_int_gt(side[1][3], calls[1][3] / 2);
    ck_assert_uint_gt(wbytes[1], wbytes[0]); /* the second buffer */
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

/* Offloading the checkpointed layer inputs (bf16) to pinned host memory
 * gives the same bits as keeping them in the plan's activations: losses
 * and gradients of training steps, with a forward-only step between them;
 * every layer but the last two goes out in the forward and comes back in
 * the backward, on the copy queue, and the activations arena shrinks by the
 * inputs less the two staging buffers. */
static int copies_out, copies_in;

static int counting_download_async(ql_be_ctx *ctx, void *host_dst, const void *src, size_t bytes)
{
    copies_out += ctx->queue == 2;
    return cpu->download_async(ctx, host_dst, src, bytes);
}

static int counting_upload(ql_be_ctx *ctx, void *dst, const void *host_src, size_t bytes)
{
    copies_in += ctx->queue == 2;
    return cpu->upload(ctx, dst, host_src, bytes);
}

START_TEST(offload_gives_the_same_bits)
{
    cpu = ql_backend_cpu();
    ql_backend counting = *cpu;
    counting.name = "counting";
    counting.download_async = counting_download_async;
    counting.upload = counting_upload;
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.1f);
    const ql_llama_config *c = ql_llama_get_config(m);
    int32_t ids[NSEQ][TMAX], labels[NSEQ][TMAX];
    make_seqs(c->vocab, ids, labels);
    uint64_t seeds[NSEQ] = {5, 6, 7, 8};
    ql_lora_batch mb = {.B = NSEQ, .T = TMAX, .ids = &ids[0][0], .labels = &labels[0][0], .len = lens,
                        .dropout_seeds = seeds};
    enum { STEPS = 3 };
    double loss[2][STEPS];
    float *g[2][STEPS];
    int outs[2][STEPS], ins[2][STEPS];
    uint64_t acts[2], pinned[2];
    for (int off = 0; off < 2; off++) {
        ql_be_ctx *ctx = NULL;
        ck_assert_int_eq(ql_be_ctx_open(NULL, &counting, &ctx), QL_OK);
        ql_lora_model_opts o = {.batch = NSEQ, .max_len = TMAX, .checkpointing = 1, .backward = 1, .allocate = 1,
                                .precision = QL_PREC_BF16, .offload = off ? 1 : -1};
        ql_lora_model *lm = NULL;
        ck_assert_msg(ql_lora_model_create(m, l, ctx, &o, &lm) == QL_OK, "%s", ql_error_message());
        acts[off] = ql_lora_model_plan_bytes(lm, QL_ROLE_ACTS);
        pinned[off] = ql_lora_model_plan_bytes(lm, QL_ROLE_PINNED);
        for (int st = 0; st < STEPS; st++) { /* train, forward only, train */
            ql_lora_step_opts so = {.loss_scale = 1.0f / 50, .backward = st != 1};
            memset(l->grads, 0, l->n_params * 4);
            copies_out = copies_in = 0;
            int64_t n = 0;
            loss[off][st] = 0;
            ck_assert_msg(ql_lora_model_step(lm, &mb, &so, &loss[off][st], &n) == QL_OK, "%s", ql_error_message());
            outs[off][st] = copies_out, ins[off][st] = copies_in;
            g[off][st] = malloc(l->n_params * 4);
            memcpy(g[off][st], l->grads, l->n_params * 4);
        }
        ql_lora_model_destroy(lm);
        ql_be_ctx_close(ctx);
    }
    const int nl = c->n_layers;
    for (int st = 0; st < STEPS; st++) {
        ck_assert_msg(loss[0][st] == loss[1][st], "step %d: loss %.17g kept, %.17g offloaded", st, loss[0][st],
                      loss[1][st]);
        ck_assert_msg(memcmp(g[0][st], g[1][st], l->n_params * 4) == 0, "step %d: gradients differ offloaded", st);
        ck_assert_int_eq(outs[0][st] + ins[0][st], 0);
        ck_assert_int_eq(outs[1][st], st == 1 ? 0 : nl - 2);
        ck_assert_int_eq(ins[1][st], st == 1 ? 0 : nl - 2);
        free(g[0][st]), free(g[1][st]);
    }
    const uint64_t input = (uint64_t)NSEQ * TMAX * (uint64_t)c->hidden * 2; /* a multiple of the plan's alignment */
    ck_assert_uint_eq(pinned[0], 0);
    ck_assert_uint_eq(pinned[1], (uint64_t)nl * input);
    ck_assert_uint_eq(acts[0] - acts[1], (uint64_t)(nl - 2) * input);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

/* The LoRA ops of the CPU reference against the operators they are made of:
 * with dropout (p 0.3, over a micro-batch with padded rows) the output of
 * dropout_forward through ql_lora_forward, and backward ql_lora_backward then
 * dropout_backward onto dx, bit for bit (float32); in bf16 precision the same
 * products of operands rounded to bf16 (backend.h), also bit for bit. */
static float *bf16_copy(const float *x, int64_t n)
{
    float *o = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) o[i] = ql_be_bf16_float(ql_be_bf16(x[i]));
    return o;
}

START_TEST(lora_ops_are_their_operators)
{
    const int64_t B = 2, T = 9, rows = B * T, in = 48, out = 40, r = 4;
    const int32_t len[2] = {9, 5};
    const uint64_t seeds[2] = {11, 12};
    const ql_be_batch mb = {.B = B, .T = T, .len = len};
    const int prec = _i / 2, dropped = _i % 2;
    const float p = dropped ? 0.3f : 0.0f, scale = 0.5f;
    float *x = malloc(rows * in * 4), *xs = malloc(rows * in * 4), *xd = malloc(rows * in * 4);
    float *dy = malloc(rows * out * 4), *a = malloc(r * in * 4), *b = malloc(out * r * 4);
    float *y1 = malloc(rows * out * 4), *y2 = malloc(rows * out * 4), *h1 = malloc(rows * r * 4), *h2 = malloc(rows * r * 4);
    float *dx1 = malloc(rows * in * 4), *dx2 = malloc(rows * in * 4), *dxd = malloc(rows * in * 4);
    float *da1 = malloc(r * in * 4), *da2 = malloc(r * in * 4), *db1 = malloc(out * r * 4), *db2 = malloc(out * r * 4);
    float *dh1 = malloc(rows * r * 4), *dh2 = malloc(rows * r * 4);
    tu_randn(x, rows * in, 1, 1.0f), tu_randn(dy, rows * out, 2, 1.0f), tu_randn(y1, rows * out, 3, 1.0f);
    tu_randn(a, r * in, 4, 0.1f), tu_randn(b, out * r, 5, 0.1f), tu_randn(da1, r * in, 6, 1.0f);
    tu_randn(db1, out * r, 7, 1.0f), tu_randn(dx1, rows * in, 8, 1.0f);
    memcpy(y2, y1, rows * out * 4), memcpy(da2, da1, r * in * 4), memcpy(db2, db1, out * r * 4);
    memcpy(dx2, dx1, rows * in * 4);
    ql_be_ctx *ctx = NULL;
    ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &ctx), QL_OK);
    void *scratch = NULL;
    if (prec) {
        ctx->precision = QL_PREC_BF16;
        ctx->scratch_bytes = ql_be_scratch_bytes(NULL, QL_PREC_BF16, rows, in, out, out * in, 1, 1, 1, 1, r);
        ctx->scratch = scratch = malloc(ctx->scratch_bytes);
    }
    const ql_be_dropout dr = {.p = p, .mb = &mb, .seeds = seeds, .scratch = xs}, *drp = dropped ? &dr : NULL;
    ck_assert_int_eq(ql_be(ctx, lora_forward, y1, h1, x, drp, a, b, rows, in, out, r, scale), QL_OK);
    ck_assert_int_eq(ql_be(ctx, lora_backward, dx1, da1, db1, dh1, dy, x, drp, h1, a, b, rows, in, out, r, scale, 1),
                     QL_OK);
    /* the same from the operators */
    memcpy(xd, x, rows * in * 4);
    if (dropped) {
        ql_be_ctx *c32 = NULL;
        ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &c32), QL_OK);
        /* bf16: x rounded before the dropout (backend.h) */
        float *xin = prec ? bf16_copy(x, rows * in) : NULL;
        ck_assert_int_eq(ql_be(c32, dropout_forward, xd, prec ? xin : x, &mb, in, p, seeds), QL_OK);
        free(xin);
        ql_be_ctx_close(c32);
        for (int64_t i = len[1] * in; i < T * in; i++) ck_assert(xd[T * in + i] == 0.0f); /* padded rows */
    }
    if (!prec) {
        ql_lora_forward(y2, h2, xd, a, b, rows, in, out, r, scale);
        ql_lora_backward(dxd, da2, db2, dh2, dy, xd, h2, a, b, rows, in, out, r, scale, 0);
    } else {
        float *xr = bf16_copy(xd, rows * in), *ar = bf16_copy(a, r * in), *br = bf16_copy(b, out * r);
        float *dyr = bf16_copy(dy, rows * out);
        ql_matmul_nt(h2, xr, ar, rows, in, r, 0);
        float *hr = bf16_copy(h2, rows * r);
        ql_lora_up(y2, hr, br, rows, out, r, scale);
        ql_gemm_nn(dh2, dyr, br, rows, r, out, scale, 0);
        ql_gemm_tn(db2, dyr, hr, rows, r, out, scale, 1);
        float *dhr = bf16_copy(dh2, rows * r);
        ql_gemm_tn(da2, dhr, xr, rows, in, r, 1.0f, 1);
        ql_gemm_nn(dxd, dhr, ar, rows, in, r, 1.0f, 0);
        free(xr), free(ar), free(br), free(dyr), free(hr), free(dhr);
    }
    if (dropped) {
        for (int bb = 0; bb < B; bb++)
            ql_dropout_backward(dx2 + bb * T * in, dxd + bb * T * in, NULL, len[bb] * in, p, seeds[bb], 1);
    } else {
        for (int64_t i = 0; i < rows * in; i++) dx2[i] += dxd[i];
    }
    ck_assert_msg(memcmp(h1, h2, rows * r * 4) == 0, "h differs from its operators'");
    ck_assert_msg(memcmp(y1, y2, rows * out * 4) == 0, "y differs from its operators'");
    ck_assert_msg(memcmp(dh1, dh2, rows * r * 4) == 0, "dh differs from its operators'");
    ck_assert_msg(memcmp(da1, da2, r * in * 4) == 0, "da differs from its operators'");
    ck_assert_msg(memcmp(db1, db2, out * r * 4) == 0, "db differs from its operators'");
    ck_assert_msg(memcmp(dx1, dx2, rows * in * 4) == 0, "dx differs from its operators'");
    ql_be_ctx_close(ctx);
    free(scratch);
    free(x), free(xs), free(xd), free(dy), free(a), free(b), free(y1), free(y2), free(h1), free(h2), free(dx1);
    free(dx2), free(dxd), free(da1), free(da2), free(db1), free(db2), free(dh1), free(dh2);
}
END_TEST

/* The bf16 ops of the CPU reference against values worked out by hand:
 * round to nearest, ties to even; NaN stays NaN, infinities and signed zero
 * stay. */
START_TEST(bf16_round_and_widen)
{
    ql_be_ctx *ctx = NULL;
    ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &ctx), QL_OK);
    /* 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even, 1.  1 + 3 * 2^-8 is
     * halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.  1 + 2^-8 + 2^-20 is
     * past halfway: up. */
    float x[7] = {1.00390625f, 1.01171875f, 1.0f + 0x1p-8f + 0x1p-20f, -2.5f, INFINITY, -0.0f, NAN};
    const float want[6] = {1.0f, 1.015625f, 1.0078125f, -2.5f, INFINITY, -0.0f};
    const uint16_t want_bits[6] = {0x3f80, 0x3f82, 0x3f81, 0xc020, 0x7f80, 0x8000};
    uint16_t bits[7];
    ck_assert_int_eq(ql_be(ctx, round_bf16, bits, x, 7), QL_OK);
    for (int i = 0; i < 6; i++) {
        ck_assert_msg(memcmp(&x[i], &want[i], 4) == 0, "x[%d] = %a, want %a", i, (double)x[i], (double)want[i]);
        ck_assert_uint_eq(bits[i], want_bits[i]);
    }
    ck_assert(isnan(x[6]));
    ck_assert_uint_eq(bits[6] & 0x7f80, 0x7f80);
    ck_assert_uint_ne(bits[6] & 0x7f, 0);
    float back[7];
    ck_assert_int_eq(ql_be(ctx, widen_bf16, back, bits, 7), QL_OK);
    ck_assert_int_eq(memcmp(back, x, 6 * 4), 0);
    /* in place without the bits */
    float y[2] = {1.01171875f, 3.0f};
    ck_assert_int_eq(ql_be(ctx, round_bf16, NULL, y, 2), QL_OK);
    ck_assert(y[0] == 1.015625f && y[1] == 3.0f);
    /* the bf16 embedding: table rows widened, padded rows zero */
    uint16_t table[3 * 2] = {0x3f80, 0x4000, 0xbf80, 0x3f82, 0x0000, 0x4040};
    int32_t tid[4] = {2, 0, 1, 77}, blen[2] = {2, 1};
    ql_be_batch b2 = {.B = 2, .T = 2, .len = blen};
    float out[8];
    memset(out, 0xff, sizeof out);
    ck_assert_int_eq(ql_be(ctx, embedding_w16, out, table, tid, &b2, 2), QL_OK);
    const float want_e[8] = {0.0f, 3.0f, 1.0f, 2.0f, -1.0f, 1.015625f, 0.0f, 0.0f};
    for (int i = 0; i < 8; i++) ck_assert_msg(out[i] == want_e[i], "out[%d] = %g, want %g", i, out[i], want_e[i]);
    ql_be_ctx_close(ctx);
    /* the bf16 attention's query tile: 256 rows, halved while [nh, tile, T]
     * scores pass 16M elements, never more than T */
    ck_assert_int_eq(ql_be_att_tile(2048, 8), 256);
    ck_assert_int_eq(ql_be_att_tile(2048, 32), 256); /* LLaMA-7B at 2048 tokens: 16M exactly */
    ck_assert_int_eq(ql_be_att_tile(2048, 40), 128); /* 13B */
    ck_assert_int_eq(ql_be_att_tile(2048, 64), 128); /* 65B, 70B */
    ck_assert_int_eq(ql_be_att_tile(100, 4), 100);
    ck_assert_int_eq(ql_be_att_tile(1 << 20, 128), 16);
    ql_be_att_budget_set(4 * 32 * 100);
    ck_assert_int_eq(ql_be_att_tile(100, 4), 32);
    ql_be_att_budget_set(0);
    ck_assert_int_eq(ql_be_att_tile(100, 4), 100);
}
END_TEST

START_TEST(plan_out_of_memory_says_what_to_reduce)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.0f);
    ql_lora_model_opts o = {.batch = 1 << 20, .max_len = 512, .backward = 1, .allocate = 1};
    ql_lora_model *lm = NULL;
    ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &o, &lm), QL_ENOMEM);
    ck_assert_ptr_null(lm);
    const char *msg = ql_error_message();
    ck_assert_contains(msg, "out of memory for the activations arena");
    ck_assert_contains(msg, "memory plan (batch 1048576 x 512 tokens");
    ck_assert_contains(msg, "backward scratch");
    ck_assert_contains(msg, "reduce --batch-size (1048576) or --max-len (512), or turn on --gradient-checkpointing");
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

static void write_data(const char *path)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("[", f);
    for (int i = 0; i < 6; i++)
        fprintf(f, "%s{\"instruction\": \"Tell a story number %d.\", \"input\": \"\", \"output\": \"Once upon a time "
                   "there was a cat %d.\"}",
                i ? "," : "", i, i);
    fputs("]", f);
    fclose(f);
}

START_TEST(cli_dry_run_and_oom)
{
    char data[4200], run[4200], cmd[16384];
    snprintf(data, sizeof data, "%s/d.json", tu_tmpdir());
    snprintf(run, sizeof run, "%s/run", tu_tmpdir());
    write_data(data);
    snprintf(model_dir, sizeof model_dir, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    char *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "%s train --model %s --data %s --format alpaca --output %s --batch-size 4 --lora-r 8 "
             "--dry-run --quiet", tu_env("QLORA_BIN"), model_dir, data, run);
    ck_assert_int_eq(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(out, "memory plan (batch 4 x ");
    ck_assert_contains(out, "activations");
    ck_assert_contains(out, "logits (chunked)");
    ck_assert_contains(out, "total");
    ck_assert_msg(access(run, F_OK) != 0, "a dry run created %s", run);
    free(out);
    free(err);
    /* no --output needed for a dry run */
    snprintf(cmd, sizeof cmd, "%s train --model %s --data %s --format alpaca --dry-run --gradient-checkpointing",
             tu_env("QLORA_BIN"), model_dir, data);
    ck_assert_int_eq(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(out, "gradient checkpointing on");
    free(out);
    free(err);
    /* a plan that cannot be allocated: the message shows it, nothing is written */
    snprintf(cmd, sizeof cmd, "%s train --model %s --data %s --format alpaca --output %s --batch-size 1048576 "
             "--max-len 512 --quiet", tu_env("QLORA_BIN"), model_dir, data, run);
    int rc = tu_run(cmd, &out, &err);
    ck_assert_int_ne(rc, 0);
    ck_assert_contains(err, "out of memory for the");
    ck_assert_contains(err, "memory plan (batch 1048576 x");
    ck_assert_contains(err, "reduce --batch-size (1048576)");
    ck_assert_msg(access(run, F_OK) != 0, "a failed plan left %s", run);
    free(out);
    free(err);
}
END_TEST

/* qlora eval's batched forward (ql_eval_nll, examples sorted by length in
 * micro-batches) against the generation path (ql_llama_forward over each
 * example alone, with an attached adapter): the same tokens, NLL within
 * float rounding (observed 1e-8 relative), for any batch size. */
START_TEST(eval_batched_matches_generation_path)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.0f);
    ql_lora_attach(m, l);
    ql_tokenizer *tok = NULL;
    ck_assert_msg(ql_tokenizer_load(model_dir, &tok) == QL_OK, "%s", ql_error_message());
    char data[4200];
    snprintf(data, sizeof data, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    ql_dataset_opts dopts = {.format = QL_FMT_TEXT, .source_max_len = 1024, .target_max_len = 256, .max_len = 200,
                             .max_examples = 40};
    ql_dataset *d = NULL;
    ck_assert_msg(ql_dataset_load(data, tok, &dopts, &d) == QL_OK, "%s", ql_error_message());
    const ql_llama_config *c = ql_llama_get_config(m);
    float *logits = malloc((size_t)200 * (size_t)c->vocab * sizeof *logits);
    ql_kv_cache *cache = NULL;
    ck_assert_int_eq(ql_kv_cache_create(m, 200, &cache), QL_OK);
    double want = 0;
    int64_t want_tokens = 0;
    for (size_t i = 0; i < d->n; i++) {
        const ql_example *e = &d->examples[i];
        if (e->len < 2) continue;
        ql_kv_cache_reset(cache);
        ck_assert_int_eq(ql_llama_forward(m, cache, e->ids, e->len - 1, logits, 0), QL_OK);
        for (int32_t t = 0; t + 1 < e->len; t++)
            if (e->labels[t + 1] != QL_IGNORE_INDEX) {
                want += ql_token_nll(logits + (size_t)t * c->vocab, c->vocab, e->ids[t + 1]);
                want_tokens++;
            }
    }
    const int batches[] = {1, 3, 8, 64};
    for (int k = 0; k < 4; k++) {
        ql_eval_opts eo = {.lora = l, .device = "cpu", .batch = batches[k], .progress = 0};
        ql_eval_result r;
        ck_assert_msg(ql_eval_nll(m, d, &eo, &r) == QL_OK, "%s", ql_error_message());
        ck_assert_int_eq(r.tokens, want_tokens);
        ck_assert_int_eq(r.examples, (int64_t)d->n);
        ck_assert_msg(fabs(r.nll_sum - want) <= 1e-6 * want, "batch %d: NLL sum %.10g, generation path %.10g",
                      batches[k], r.nll_sum, want);
    }
    /* a device that is not there is an error, not a silent fallback */
    ql_eval_opts bad = {.device = "tpu", .batch = 2};
    ql_eval_result r;
    ck_assert_int_eq(ql_eval_nll(m, d, &bad, &r), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "unknown device 'tpu'");
    ql_kv_cache_destroy(cache);
    free(logits);
    ql_dataset_destroy(d);
    ql_tokenizer_destroy(tok);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

/* Generation through the memory plan (ql_lora_model_decode, a KV cache in
 * backend memory) against ql_llama_forward, the per-call path generation
 * used before: over nf4 with a LoRA adapter, a 23-token prompt in pieces of
 * at most 7 (the plan's max_len) and then tokens one at a time, the same
 * ops in the same pieces on both, so the same logits bit for bit.  Then the
 * cache's bookkeeping: a truncated cache decodes the rest again to the same
 * logits, and what does not fit or is not a token is refused. */
START_TEST(decode_matches_the_generation_path)
{
    ql_llama *m = load_model();
    ql_lora *l = make_lora(m, 0.0f);
    ql_lora_attach(m, l);
    const ql_llama_config *c = ql_llama_get_config(m);
    const int V = c->vocab, P = 23, CAP = 40, PIECE = 7, NEW = 6;
    int32_t ids[40];
    uint64_t s = 99;
    for (int t = 0; t < CAP; t++) ids[t] = (int32_t)(ql_splitmix64_next(&s) % (uint64_t)V);
    float *want = malloc((size_t)V * sizeof *want), *got = malloc((size_t)V * sizeof *got);
    ql_kv_cache *cache = NULL;
    ck_assert_int_eq(ql_kv_cache_create(m, CAP, &cache), QL_OK);
    ql_be_ctx *ctx = NULL;
    ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &ctx), QL_OK);
    ql_lora_model_opts o = {.batch = 1, .max_len = PIECE, .allocate = 1, .kv_capacity = CAP};
    ql_lora_model *lm = NULL;
    ck_assert_msg(ql_lora_model_create(m, l, ctx, &o, &lm) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_lora_model_push_params(lm), QL_OK);
    for (int t0 = 0; t0 < P; t0 += PIECE) { /* the prompt, piece by piece on the old path */
        const int n = P - t0 < PIECE ? P - t0 : PIECE;
        ck_assert_int_eq(ql_llama_forward(m, cache, ids + t0, n, want, 1), QL_OK);
    }
    ck_assert_msg(ql_lora_model_decode(lm, ids, P, got) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_lora_model_kv_length(lm), P);
    ck_assert_msg(!memcmp(want, got, (size_t)V * sizeof *got), "prompt: logits differ from ql_llama_forward's");
    for (int k = 0; k < NEW; k++) { /* greedy steps */
        int32_t next = 0;
        for (int i = 1; i < V; i++)
            if (want[i] > want[next]) next = i;
        ck_assert_int_eq(ql_llama_forward(m, cache, &next, 1, want, 1), QL_OK);
        ck_assert_int_eq(ql_lora_model_decode(lm, &next, 1, got), QL_OK);
        ck_assert_msg(!memcmp(want, got, (size_t)V * sizeof *got), "token %d: logits differ", k);
        ids[P + k] = next;
    }
    ck_assert_int_eq(ql_lora_model_kv_length(lm), P + NEW);
    /* the cache cut back to 10 positions, then the rest of the same tokens
     * in one call (pieces of 7 from position 10): the last logits as before,
     * to rounding (other pieces, so other product shapes) */
    ql_lora_model_kv_truncate(lm, 10);
    ck_assert_int_eq(ql_lora_model_kv_length(lm), 10);
    float *again = malloc((size_t)V * sizeof *again);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids + 10, P + NEW - 10, again), QL_OK);
    ck_assert_msg(rel_max_diff(again, got, (size_t)V) < 1e-5, "after truncating: %.3g", rel_max_diff(again, got, (size_t)V));
    /* refused: past the capacity (the length stays), a bad token, no cache */
    ck_assert_int_eq(ql_lora_model_decode(lm, ids, CAP - (P + NEW) + 1, got), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "exceeds the cache of 40");
    ck_assert_int_eq(ql_lora_model_kv_length(lm), P + NEW);
    int32_t bad = V;
    ck_assert_int_eq(ql_lora_model_decode(lm, &bad, 1, got), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "outside the vocabulary");
    ql_lora_model_destroy(lm);
    ql_lora_model_opts nocache = {.batch = 1, .max_len = PIECE, .allocate = 1};
    ck_assert_int_eq(ql_lora_model_create(m, l, ctx, &nocache, &lm), QL_OK);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids, 1, got), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "key/value cache");
    ql_lora_model_destroy(lm);
    /* two cache rows after one shared prefix (what MMLU batching does):
     * each row's logits as one sequence decoded alone from that prefix */
    ql_lora_model_opts two = {.batch = 2, .max_len = PIECE, .allocate = 1, .kv_capacity = CAP};
    ck_assert_msg(ql_lora_model_create(m, l, ctx, &two, &lm) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_lora_model_push_params(lm), QL_OK);
    const int PRE = 12, L0 = 5, L1 = 3;
    float *alone = malloc(2 * (size_t)V * sizeof *alone), *rows = malloc(2 * (size_t)V * sizeof *rows);
    const int32_t *rest[2] = {ids + PRE, ids + PRE + 7};
    const int lens[2] = {L0, L1};
    for (int b = 0; b < 2; b++) {
        ql_lora_model_kv_truncate(lm, 0);
        ck_assert_int_eq(ql_lora_model_decode(lm, ids, PRE, NULL), QL_OK);
        ck_assert_int_eq(ql_lora_model_decode(lm, rest[b], lens[b], alone + (size_t)b * V), QL_OK);
    }
    ql_lora_model_kv_truncate(lm, 0);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids, PRE, NULL), QL_OK);
    ck_assert_msg(ql_lora_model_kv_fork(lm, 2) == QL_OK, "%s", ql_error_message());
    int32_t padded[2 * 7] = {0};
    for (int b = 0; b < 2; b++) memcpy(padded + b * PIECE, rest[b], (size_t)lens[b] * sizeof *padded);
    ck_assert_msg(ql_lora_model_decode_rows(lm, 2, padded, PIECE, lens, rows) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_lora_model_kv_length(lm), PRE);
    for (int b = 0; b < 2; b++)
        ck_assert_msg(rel_max_diff(rows + (size_t)b * V, alone + (size_t)b * V, (size_t)V) < 1e-5, "row %d: %.3g", b,
                      rel_max_diff(rows + (size_t)b * V, alone + (size_t)b * V, (size_t)V));
    /* row 1 adopted: the next token decodes as after row 1's sequence alone */
    ck_assert_msg(ql_lora_model_kv_adopt(lm, 1, PRE + L1) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_lora_model_kv_length(lm), PRE + L1);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids + 30, 1, rows), QL_OK);
    ql_lora_model_kv_truncate(lm, 0);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids, PRE, NULL), QL_OK);
    ck_assert_int_eq(ql_lora_model_decode(lm, rest[1], L1, NULL), QL_OK);
    ck_assert_int_eq(ql_lora_model_decode(lm, ids + 30, 1, alone), QL_OK);
    ck_assert_msg(rel_max_diff(rows, alone, (size_t)V) < 1e-5, "after adopting: %.3g", rel_max_diff(rows, alone, (size_t)V));
    /* refused: more rows than planned, a row past the plan, a bad length */
    ck_assert_int_eq(ql_lora_model_kv_fork(lm, 3), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "the plan has 2");
    ck_assert_int_eq(ql_lora_model_kv_adopt(lm, 2, PRE + L1 + 2), QL_EINVAL);
    const int badlen[2] = {L0, PIECE + 1};
    ck_assert_int_eq(ql_lora_model_decode_rows(lm, 2, padded, PIECE, badlen, rows), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "sequence 1 has 8 of 7 tokens");
    free(alone);
    free(rows);
    ql_lora_model_destroy(lm);
    /* ql_generate with the adapter attached but not passed: refused */
    ql_tokenizer *tok = NULL;
    ck_assert_int_eq(ql_tokenizer_load(model_dir, &tok), QL_OK);
    char *text = NULL;
    ql_generate_opts go = {.max_new_tokens = 3};
    ck_assert_int_eq(ql_generate(m, tok, "Once", &go, &text), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "pass it as ql_generate_opts.lora");
    go.lora = l;
    ck_assert_msg(ql_generate(m, tok, "Once", &go, &text) == QL_OK, "%s", ql_error_message());
    ck_assert(text && strlen(text) > 0);
    free(text);
    ql_tokenizer_destroy(tok);
    ql_be_ctx_close(ctx);
    ql_kv_cache_destroy(cache);
    free(want), free(got), free(again);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("backend");
    TCase *t = tcase_create("batch");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, batched_equals_single);
    tcase_add_test(t, batched_equals_single_dropout_checkpointing);
    tcase_add_test(t, batched_equals_single_extra_padding_chunked_logits);
    tcase_add_test(t, eval_batched_matches_generation_path);
    tcase_add_test(t, decode_matches_the_generation_path);
    suite_add_tcase(s, t);
    TCase *e = tcase_create("status");
    tcase_set_timeout(e, 60);
    tcase_add_test(e, sticky_error_stops_the_step);
    tcase_add_test(e, registry);
    suite_add_tcase(s, e);
    TCase *p = tcase_create("plan");
    tcase_set_timeout(p, 120);
    tcase_add_test(p, plan_sizes_add_up);
    tcase_add_test(p, bf16_checkpointing_keeps_bf16_inputs_exactly);
    tcase_add_test(p, bf16_round_and_widen);
    tcase_add_loop_test(p, lora_ops_are_their_operators, 0, 4);
    tcase_add_loop_test(p, prefetch_gives_the_same_bits, 0, 2);
    tcase_add_test(p, offload_gives_the_same_bits);
    tcase_add_test(p, plan_out_of_memory_says_what_to_reduce);
    tcase_add_test(p, cli_dry_run_and_oom);
    suite_add_tcase(s, p);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
