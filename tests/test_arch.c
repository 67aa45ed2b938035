/* Architectures beyond LLaMA against transformers: Qwen2 (q/k/v biases),
 * Qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads, attention_bias),
 * Mistral and Qwen sliding-window attention past the window, and Llama with
 * attention_bias and mlp_bias.  Tiny random models and transformers' logits,
 * loss and peft LoRA gradients: tests/reference/gen_arch_ref.py (CPU,
 * float32, eager attention) into tests/reference/arch/NAME/. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_model.h"
#include "ops.h"
#include "ops_backward.h"
#include "qlora/fs.h"
#include "qlora/llama.h"
#include "qlora/lora.h"
#include "qlora/qlora.h"
#include "qlora/safetensors.h"
#include "testutil.h"

static const double LOGITS_TOL = 1e-5; /* relative L2 error, float32 */
static const double GRAD_TOL = 1e-4;

enum { NMODELS = 4 };
static const char *const names[NMODELS] = {"qwen2", "qwen3", "mistral", "llama"};
static const char *const archs[NMODELS] = {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                                           "LlamaForCausalLM"};
/* each layer's attention window, as the fixtures' configs say (see gen_arch_ref.py) */
static const int windows[NMODELS][2] = {{0, 6}, {5, 0}, {7, 7}, {0, 0}};

static ql_st_file *ref;
static char model_dir[1024];

static void open_ref(int i)
{
    snprintf(model_dir, sizeof model_dir, "%s/tests/reference/arch/%s", tu_env("QLORA_SOURCE_ROOT"), names[i]);
    char path[1200];
    snprintf(path, sizeof path, "%s/reference.safetensors", model_dir);
    ck_assert_msg(ql_st_open(path, &ref) == QL_OK, "%s", ql_error_message());
}

static void close_ref(void)
{
    ql_st_close(ref);
    ref = NULL;
}

static ql_llama *load(const char *dir, const char *quantizer)
{
    ql_llama *m;
    ql_llama_load_opts o = {.quantizer = quantizer};
    ck_assert_msg(ql_llama_load(dir, &o, &m) == QL_OK, "%s: %s", dir, ql_error_message());
    return m;
}

static void assert_close(const char *what, const float *got, const float *want, size_t n, double tol)
{
    size_t worst = 0;
    double e = tu_rel_error(got, want, n, &worst);
    ck_assert_msg(e < tol, "%s: relative error %.3g (worst at %zu: %.7g vs %.7g)", what, e, worst, got[worst], want[worst]);
}

/* the whole sequence in one forward pass */
static float *forward_all(ql_llama *m, const int32_t *ids, int T)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    float *logits = malloc((size_t)T * c->vocab * 4);
    ql_kv_cache *cache;
    ck_assert_int_eq(ql_kv_cache_create(m, T, &cache), QL_OK);
    ck_assert_msg(ql_llama_forward(m, cache, ids, T, logits, 0) == QL_OK, "%s", ql_error_message());
    ql_kv_cache_destroy(cache);
    return logits;
}

START_TEST(config_and_layers)
{
    open_ref(_i);
    ql_llama *m = load(model_dir, "none");
    const ql_llama_config *c = ql_llama_get_config(m);
    ck_assert_str_eq(c->architecture, archs[_i]);
    ql_llama_layer *L = ql_llama_layers(m);
    int sliding = 0;
    for (int l = 0; l < c->n_layers; l++) {
        ck_assert_msg(L[l].window == windows[_i][l], "%s layer %d window %d, want %d", names[_i], l, L[l].window,
                      windows[_i][l]);
        sliding += L[l].window > 0;
    }
    ck_assert_int_eq(c->n_sliding_layers, sliding);
    int qwen3 = _i == 1, llama = _i == 3;
    ck_assert_int_eq(c->qkv_bias, _i == 0 || qwen3 || llama);
    ck_assert_int_eq(c->o_bias, qwen3 || llama);
    ck_assert_int_eq(c->mlp_bias, llama);
    ck_assert_int_eq(c->qk_norm, qwen3);
    ck_assert_int_eq(c->head_dim, qwen3 ? 12 : 8);
    ck_assert(c->qkv_bias ? L[0].q.bias && L[1].v.bias : !L[0].q.bias);
    ck_assert(qwen3 ? L[1].q_norm && L[1].k_norm : !L[1].q_norm);
    ql_llama_destroy(m);
    close_ref();
}
END_TEST

START_TEST(logits_match_transformers)
{
    open_ref(_i);
    ql_llama *m = load(model_dir, "none");
    const ql_tensor *ids = tu_need(ref, "ids");
    int T = (int)ids->shape[0];
    const ql_llama_config *c = ql_llama_get_config(m);
    ck_assert_msg(c->sliding_window == 0 || T > c->sliding_window, "the test sequence must pass the window");
    float *logits = forward_all(m, ids->data, T);
    char what[64];
    snprintf(what, sizeof what, "%s logits", names[_i]);
    assert_close(what, logits, tu_need(ref, "logits")->data, (size_t)T * c->vocab, LOGITS_TOL);
    free(logits);
    ql_llama_destroy(m);
    close_ref();
}
END_TEST

/* KV-cache decoding past the window: a prefix, then one token at a time */
START_TEST(kv_cache_decoding)
{
    open_ref(_i);
    ql_llama *m = load(model_dir, "none");
    const ql_llama_config *c = ql_llama_get_config(m);
    const ql_tensor *ids = tu_need(ref, "ids");
    const int32_t *tok = ids->data;
    int T = (int)ids->shape[0];
    float *all = forward_all(m, tok, T);
    float *row = malloc((size_t)T * c->vocab * 4);
    ql_kv_cache *cache;
    ck_assert_int_eq(ql_kv_cache_create(m, T, &cache), QL_OK);
    for (int prefix = 1; prefix <= 3; prefix += 2) {
        ql_kv_cache_reset(cache);
        ck_assert_int_eq(ql_llama_forward(m, cache, tok, prefix, row, 0), QL_OK);
        for (int t = prefix; t < T; t++) {
            ck_assert_msg(ql_llama_forward(m, cache, tok + t, 1, row + (size_t)t * c->vocab, 0) == QL_OK, "%s",
                          ql_error_message());
            ck_assert_int_eq(ql_kv_cache_length(cache), t + 1);
        }
        char what[96];
        snprintf(what, sizeof what, "%s decoded token by token after %d", names[_i], prefix);
        assert_close(what, row, all, (size_t)T * c->vocab, 1e-6);
        assert_close(what, row, tu_need(ref, "logits")->data, (size_t)T * c->vocab, LOGITS_TOL);
    }
    ql_kv_cache_destroy(cache);
    free(row);
    free(all);
    ql_llama_destroy(m);
    close_ref();
}
END_TEST

static ql_lora *load_adapter(ql_llama *m)
{
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/adapter", model_dir);
    ql_lora *l;
    ck_assert_msg(ql_lora_load_peft(m, dir, &l) == QL_OK, "%s", ql_error_message());
    return l;
}

START_TEST(lora_logits_and_gradients)
{
    open_ref(_i);
    ql_llama *m = load(model_dir, "none");
    const ql_llama_config *c = ql_llama_get_config(m);
    ql_lora *l = load_adapter(m);
    const ql_tensor *ids = tu_need(ref, "ids"), *lab = tu_need(ref, "labels");
    int T = (int)ids->shape[0];
    ql_lora_attach(m, l);
    float *logits = forward_all(m, ids->data, T);
    char what[96];
    snprintf(what, sizeof what, "%s logits with the adapter", names[_i]);
    assert_close(what, logits, tu_need(ref, "logits.lora")->data, (size_t)T * c->vocab, LOGITS_TOL);
    free(logits);
    ql_lora_attach(m, NULL);
    float want_loss = *(const float *)tu_need(ref, "loss")->data;
    for (int ckpt = 0; ckpt < 2; ckpt++) {
        memset(l->grads, 0, l->n_params * 4);
        double sum = 0;
        int64_t n = 0, total = 0;
        for (int t = 1; t < T; t++) total += ((const int32_t *)lab->data)[t] != -100;
        ql_lora_model_opts mo = {.batch = 1, .max_len = T, .checkpointing = ckpt, .backward = 1, .allocate = 1};
        ql_lora_model *lm;
        ck_assert_msg(ql_lora_model_create(m, l, NULL, &mo, &lm) == QL_OK, "%s", ql_error_message());
        const int32_t len = T;
        const uint64_t seed = 1;
        ql_lora_batch mb = {.B = 1, .T = T, .ids = ids->data, .labels = lab->data, .len = &len, .dropout_seeds = &seed};
        ql_lora_step_opts o = {.loss_scale = 1.0f / (float)total, .backward = 1};
        ck_assert_msg(ql_lora_model_step(lm, &mb, &o, &sum, &n) == QL_OK, "%s", ql_error_message());
        ql_lora_model_destroy(lm);
        ck_assert_int_eq(n, total);
        ck_assert_msg(fabs(sum / (double)n - want_loss) < 1e-5 * fabs(want_loss), "%s loss %.7f vs %.7f", names[_i],
                      sum / (double)n, want_loss);
        for (int layer = 0; layer < l->n_layers; layer++)
            for (int k = 0; k < QL_MOD_COUNT; k++) {
                ql_lora_pair *p = ql_lora_pair_at(l, layer, k);
                snprintf(what, sizeof what, "%s dA layer %d %s", names[_i], layer, ql_lora_module_name(k));
                assert_close(what, p->dA, tu_need(ref, "grad.%d.%s.A", layer, ql_lora_module_name(k))->data,
                             (size_t)(l->cfg.r * p->in), GRAD_TOL);
                snprintf(what, sizeof what, "%s dB layer %d %s", names[_i], layer, ql_lora_module_name(k));
                assert_close(what, p->dB, tu_need(ref, "grad.%d.%s.B", layer, ql_lora_module_name(k))->data,
                             (size_t)(p->out * l->cfg.r), GRAD_TOL);
            }
    }
    ql_lora_destroy(l);
    ql_llama_destroy(m);
    close_ref();
}
END_TEST

/* ---- banded attention operators against a plain masked softmax ---- */

START_TEST(banded_attention_ops)
{
    enum { T = 11, NH = 4, NKV = 2, HD = 8 };
    static const int wins[] = {1, 3, 10, 11, 40};
    float q[T * NH * HD], k[T * NKV * HD], v[T * NKV * HD], out[T * NH * HD], out2[T * NH * HD], full[T * NH * HD];
    float probs[NH * T * T];
    tu_randn(q, T * NH * HD, 1, 1.0f);
    tu_randn(k, T * NKV * HD, 2, 1.0f);
    tu_randn(v, T * NKV * HD, 3, 1.0f);
    ql_attention_forward(full, q, k, v, T, 0, NH, NKV, HD, 0);
    for (size_t w = 0; w < sizeof wins / sizeof wins[0]; w++) {
        const int W = wins[w];
        ql_attention_forward(out, q, k, v, T, 0, NH, NKV, HD, W);
        ql_attention_forward_train(out2, probs, q, k, v, T, NH, NKV, HD, W);
        ck_assert_int_eq(memcmp(out, out2, sizeof out), 0);
        if (W >= T) ck_assert_int_eq(memcmp(out, full, sizeof out), 0);
        /* the last 4 queries after a cached prefix of T - 4: the same values within
         * rounding (OpenBLAS may round a product of fewer rows differently) */
        ql_attention_forward(out2, q + (T - 4) * NH * HD, k, v, 4, T - 4, NH, NKV, HD, W);
        for (int i = 0; i < 4 * NH * HD; i++)
            ck_assert_msg(fabsf(out[(T - 4) * NH * HD + i] - out2[i]) <= 1e-6f, "W %d cached-prefix out[%d] %g vs %g",
                          W, i, out2[i], out[(T - 4) * NH * HD + i]);
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++) {
                const int kh = h / (NH / NKV);
                double s[T], mx = -INFINITY, z = 0;
                for (int j = 0; j <= t; j++) {
                    s[j] = -INFINITY;
                    if (t - j >= W) continue; /* outside the window: transformers' kv > q - W */
                    double d = 0;
                    for (int e = 0; e < HD; e++) d += (double)q[(t * NH + h) * HD + e] * k[(j * NKV + kh) * HD + e];
                    s[j] = d / sqrt((double)HD);
                    if (s[j] > mx) mx = s[j];
                }
                for (int j = 0; j <= t; j++) z += s[j] == -INFINITY ? 0 : exp(s[j] - mx);
                for (int j = 0; j < T; j++) {
                    double p = j <= t && s[j] != -INFINITY ? exp(s[j] - mx) / z : 0;
                    ck_assert_msg(fabs(probs[(h * T + t) * T + j] - p) < 1e-6, "W %d probs[%d, %d, %d] %g vs %g", W, h,
                                  t, j, probs[(h * T + t) * T + j], p);
                }
                for (int e = 0; e < HD; e++) {
                    double o = 0;
                    for (int j = 0; j <= t; j++)
                        if (s[j] != -INFINITY) o += exp(s[j] - mx) / z * v[(j * NKV + kh) * HD + e];
                    ck_assert_msg(fabs(out[(t * NH + h) * HD + e] - o) < 1e-5, "W %d out[%d, %d, %d] %g vs %g", W, t, h,
                                  e, out[(t * NH + h) * HD + e], o);
                }
            }
    }
}
END_TEST

/* the backward of a banded attention against central finite differences of
 * L = sum(out * c) */
START_TEST(banded_attention_backward)
{
    enum { T = 9, NH = 2, NKV = 1, HD = 4, W = 3 };
    double qd[T * NH * HD], kd[T * NKV * HD], vd[T * NKV * HD];
    float q[T * NH * HD], k[T * NKV * HD], v[T * NKV * HD], cw[T * NH * HD], out[T * NH * HD];
    float probs[NH * T * T], ds[NH * T * T], dq[T * NH * HD], dk[T * NKV * HD], dv[T * NKV * HD];
    tu_randn(q, T * NH * HD, 11, 1.0f);
    tu_randn(k, T * NKV * HD, 12, 1.0f);
    tu_randn(v, T * NKV * HD, 13, 1.0f);
    tu_randn(cw, T * NH * HD, 14, 1.0f);
    ql_attention_forward_train(out, probs, q, k, v, T, NH, NKV, HD, W);
    ql_attention_backward(dq, dk, dv, ds, cw, q, k, v, probs, T, NH, NKV, HD, W);
    struct {
        float *x, *g;
        double *num;
        int n;
    } ins[] = {{q, dq, qd, T * NH * HD}, {k, dk, kd, T * NKV * HD}, {v, dv, vd, T * NKV * HD}};
    for (int a = 0; a < 3; a++)
        for (int i = 0; i < ins[a].n; i++) {
            const float x0 = ins[a].x[i], eps = 1e-2f;
            double lp = 0, lm = 0;
            ins[a].x[i] = x0 + eps;
            ql_attention_forward(out, q, k, v, T, 0, NH, NKV, HD, W);
            for (int j = 0; j < T * NH * HD; j++) lp += (double)out[j] * cw[j];
            ins[a].x[i] = x0 - eps;
            ql_attention_forward(out, q, k, v, T, 0, NH, NKV, HD, W);
            for (int j = 0; j < T * NH * HD; j++) lm += (double)out[j] * cw[j];
            ins[a].x[i] = x0;
            ins[a].num[i] = (lp - lm) / (2.0 * eps);
            ck_assert_msg(fabs(ins[a].g[i] - ins[a].num[i]) < 2e-3 * (1 + fabs(ins[a].num[i])),
                          "input %d element %d: analytic %g vs numeric %g", a, i, ins[a].g[i], ins[a].num[i]);
        }
    /* keys past every query's window get no gradient from queries that cannot see them */
    for (int t = 0; t < T; t++)
        for (int j = 0; j < T; j++)
            if (j > t || t - j >= W) ck_assert(ds[t * T + j] == 0.0f && probs[t * T + j] == 0.0f);
}
END_TEST

/* ---- config rules ---- */

static int parse(const char *text, ql_llama_config *c)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    ck_assert_msg(j != NULL, "%s", e.text);
    int rc = ql_llama_config_parse(j, c);
    json_decref(j);
    return rc;
}

#define BASE "\"hidden_size\": 32, \"intermediate_size\": 40, \"num_hidden_layers\": 3, \"num_attention_heads\": 4, " \
             "\"vocab_size\": 64"

START_TEST(config_rules)
{
    ql_llama_config c;
    /* Qwen2 without use_sliding_window: no window, whatever sliding_window says */
    ck_assert_int_eq(parse("{\"architectures\": [\"Qwen2ForCausalLM\"], " BASE ", \"sliding_window\": 4}", &c), QL_OK);
    ck_assert_int_eq(c.sliding_window, 0);
    ck_assert_int_eq(c.qkv_bias, 1);
    ck_assert_int_eq(c.o_bias, 0);
    ck_assert_int_eq(c.head_dim, 8);
    /* with it: layers from max_window_layers on slide; sliding_window absent is 4096 */
    ck_assert_int_eq(parse("{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": true, \"max_window_layers\": 1}",
                           &c), QL_OK);
    ck_assert_str_eq(c.architecture, "Qwen2ForCausalLM");
    ck_assert_int_eq(c.sliding_window, 4096);
    ck_assert_int_eq(c.n_sliding_layers, 2);
    /* default max_window_layers 28: none of 3 layers slides */
    ck_assert_int_eq(parse("{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": true, \"sliding_window\": 4}",
                           &c), QL_OK);
    ck_assert_int_eq(c.n_sliding_layers, 0);
    ck_assert_int_eq(c.sliding_window, 0);
    /* layer_types wins over max_window_layers */
    ck_assert_int_eq(parse("{\"model_type\": \"qwen3\", " BASE ", \"use_sliding_window\": true, \"sliding_window\": 4, "
                           "\"max_window_layers\": 0, \"layer_types\": [\"full_attention\", \"sliding_attention\", "
                           "\"full_attention\"]}",
                           &c), QL_OK);
    ck_assert_int_eq(c.n_sliding_layers, 1);
    ck_assert_int_eq(c.sliding_window, 4);
    ck_assert_int_eq(c.head_dim, 128); /* Qwen3Config's default, not hidden / heads */
    ck_assert_int_eq(c.qk_norm, 1);
    ck_assert_int_eq(c.qkv_bias + c.o_bias, 0);
    /* Mistral: every layer; absent is 4096, null is none; Llama does not read it */
    ck_assert_int_eq(parse("{\"model_type\": \"mistral\", " BASE "}", &c), QL_OK);
    ck_assert_int_eq(c.sliding_window, 4096);
    ck_assert_int_eq(c.n_sliding_layers, 3);
    ck_assert_int_eq(parse("{\"model_type\": \"mistral\", " BASE ", \"sliding_window\": null, \"attention_bias\": true}",
                           &c), QL_OK);
    ck_assert_int_eq(c.sliding_window + c.n_sliding_layers + c.qkv_bias, 0);
    ck_assert_int_eq(parse("{\"model_type\": \"llama\", " BASE ", \"sliding_window\": 4}", &c), QL_OK);
    ck_assert_int_eq(c.sliding_window, 0);
    /* refusals name the field */
    static const struct {
        const char *json, *msg;
    } bad[] = {
        {"{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": true, \"layer_types\": [\"full_attention\"]}",
         "\"layer_types\" must be a list of num_hidden_layers (3) names"},
        {"{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": true, \"layer_types\": [\"full_attention\", "
         "\"chunked_attention\", \"full_attention\"]}",
         "\"layer_types\"[1] is 'chunked_attention'"},
        {"{\"model_type\": \"qwen3\", " BASE ", \"layer_types\": [\"full_attention\", \"sliding_attention\", "
         "\"full_attention\"]}",
         "\"layer_types\"[1] is sliding_attention but no sliding window is set"},
        {"{\"model_type\": \"qwen3\", " BASE ", \"use_sliding_window\": true, \"sliding_window\": null, \"layer_types\": "
         "[\"sliding_attention\", \"full_attention\", \"full_attention\"]}",
         "\"layer_types\"[0] is sliding_attention but no sliding window is set"},
        {"{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": 1}", "\"use_sliding_window\" must be true or false"},
        {"{\"model_type\": \"qwen2\", " BASE ", \"use_sliding_window\": true, \"max_window_layers\": -1}",
         "\"max_window_layers\" must be a non-negative integer"},
        {"{\"model_type\": \"mistral\", " BASE ", \"sliding_window\": 0}", "\"sliding_window\" 0 leaves no key"},
        {"{\"architectures\": [\"GemmaForCausalLM\"], " BASE "}",
         "unsupported architecture GemmaForCausalLM: qlora supports LlamaForCausalLM, MistralForCausalLM, "
         "Qwen2ForCausalLM and Qwen3ForCausalLM"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(parse(bad[i].json, &c) != QL_OK, "accepted %s", bad[i].json);
        ck_assert_contains(ql_error_message(), bad[i].msg);
    }
}
END_TEST

/* ---- the command line on Qwen2: quantize, eval, train, merge, generate ---- */

static int qlora(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora(char **out, char **err, const char *fmt, ...)
{
    char args[7000], cmd[7200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=2 %s %s", tu_env("QLORA_BIN"), args);
    return tu_run(cmd, out, err);
}

static void copy_into(const char *from_dir, const char *name, const char *to_dir)
{
    char a[1300], b[1300];
    snprintf(a, sizeof a, "%s/%s", from_dir, name);
    snprintf(b, sizeof b, "%s/%s", to_dir, name);
    ck_assert_msg(ql_copy_file_atomic(a, b) == QL_OK, "%s", ql_error_message());
}

static double eval_nll(const char *args)
{
    char *out, *err;
    int st = qlora(&out, &err, "eval %s --format text --max-examples 4 --quiet", args);
    ck_assert_msg(st == 0, "eval %s: %s", args, err);
    json_t *res = json_loads(strrchr(out, '{'), 0, NULL);
    ck_assert_msg(res != NULL, "eval printed %s", out);
    double nll = json_number_value(json_object_get(res, "nll"));
    json_decref(res);
    free(out);
    free(err);
    return nll;
}

START_TEST(cli_qwen2_end_to_end)
{
    const char *tmp = tu_tmpdir();
    char src[1100], model[1200], quant[1200], run[1200], merged[1200], stories[1200], data[1200], tok[1200];
    snprintf(src, sizeof src, "%s/tests/reference/arch/%s", tu_env("QLORA_SOURCE_ROOT"), names[_i]);
    snprintf(model, sizeof model, "%s/%s", tmp, names[_i]);
    snprintf(quant, sizeof quant, "%s/%s_nf4", tmp, names[_i]);
    snprintf(run, sizeof run, "%s/%s_run", tmp, names[_i]);
    snprintf(merged, sizeof merged, "%s/%s_merged", tmp, names[_i]);
    snprintf(tok, sizeof tok, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(stories, sizeof stories, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    snprintf(data, sizeof data, "%s/data/alpaca/alpaca_en_demo.json", tu_env("QLORA_SHARED"));
    ck_assert_int_eq(ql_mkdir_p(model), QL_OK);
    copy_into(src, "config.json", model);
    copy_into(src, "model.safetensors", model);
    copy_into(tok, "tokenizer.json", model); /* the fixtures' vocabulary is stories260K's 512 */
    copy_into(tok, "tokenizer_config.json", model);
    char *out, *err, args[4000];
    ck_assert_msg(qlora(&out, &err, "quantize --quiet --quantizer=nf4 '%s' -o '%s'", model, quant) == 0, "%s", err);
    free(out);
    free(err);
    /* the biases (and Qwen3's q/k norms) are carried unquantized into the checkpoint */
    char path[1300];
    snprintf(path, sizeof path, "%s/model.safetensors", quant);
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    ck_assert(ql_st_find(f, "model.layers.1.self_attn.k_proj.bias") != NULL);
    ck_assert(_i != 1 || ql_st_find(f, "model.layers.1.self_attn.k_norm.weight") != NULL);
    ql_st_close(f);
    snprintf(args, sizeof args, "--model %s --quantizer=none --data %s", model, stories);
    double dense = eval_nll(args);
    snprintf(args, sizeof args, "--model %s --data %s", quant, stories);
    double nf4 = eval_nll(args);
    /* a random model with large logits: both well above ln 512, and NF4 close to dense */
    ck_assert_msg(isfinite(dense) && dense > 6.0 && fabs(nf4 - dense) < 0.1 * dense, "nll dense %g nf4 %g", dense, nf4);
    ck_assert_msg(qlora(NULL, &err,
                        "train --model %s --data %s --format alpaca --lora-r 4 --batch-size 2 --steps 3 --lr 1e-2 "
                        "--max-len 64 --source-max-len 32 --quiet --output %s",
                        quant, data, run) == 0,
                  "%s", err);
    free(err);
    ck_assert_msg(qlora(NULL, &err, "merge --model %s --adapter %s -o %s", quant, run, merged) == 0, "%s", err);
    free(err);
    /* the merged model scores as the quantized base with the adapter */
    snprintf(args, sizeof args, "--model %s --adapter %s --data %s", quant, run, stories);
    double with_adapter = eval_nll(args);
    snprintf(args, sizeof args, "--model %s --quantizer=none --data %s", merged, stories);
    double merged_nll = eval_nll(args);
    ck_assert_msg(fabs(merged_nll - with_adapter) < 1e-4 * with_adapter, "merged %g vs base + adapter %g", merged_nll,
                  with_adapter);
    ck_assert_msg(with_adapter != nf4, "training changed nothing (%g)", nf4);
    snprintf(path, sizeof path, "%s/model.safetensors", merged);
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    ck_assert(ql_st_find(f, "model.layers.0.self_attn.q_proj.bias") != NULL);
    ql_st_close(f);
    ck_assert_msg(qlora(&out, &err, "generate --model %s --quantizer=none --prompt 'Once upon a time' --max-new-tokens 40",
                        merged) == 0,
                  "%s", err);
    ck_assert_msg(strlen(out) > 0, "generated nothing");
    free(out);
    free(err);
}
END_TEST

Suite *arch_suite(void)
{
    Suite *s = suite_create("arch");
    TCase *t = tcase_create("transformers");
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, config_and_layers, 0, NMODELS);
    tcase_add_loop_test(t, logits_match_transformers, 0, NMODELS);
    tcase_add_loop_test(t, kv_cache_decoding, 0, NMODELS);
    tcase_add_loop_test(t, lora_logits_and_gradients, 0, NMODELS);
    suite_add_tcase(s, t);
    TCase *o = tcase_create("ops");
    tcase_add_test(o, banded_attention_ops);
    tcase_add_test(o, banded_attention_backward);
    tcase_add_test(o, config_rules);
    suite_add_tcase(s, o);
    TCase *cli = tcase_create("cli");
    tcase_set_timeout(cli, 300);
    tcase_add_loop_test(cli, cli_qwen2_end_to_end, 0, 2); /* qwen2, qwen3 */
    suite_add_tcase(s, cli);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(arch_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
