/* The CPU engine against PyTorch + transformers + peft (+ bitsandbytes):
 * logits of stories260K with and without a LoRA adapter, the loss and every
 * LoRA gradient, over a dense and an NF4 (double quant) base; and an adapter
 * written by `qlora train`, loaded by peft, gives the same logits here.
 * References: tests/reference/gen_reference.py (run by scripts/gpu-check on
 * an H100, float32, TF32 off, eager attention). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_model.h"
#include "qlora/qlora.h"
#include "qlora/llama.h"
#include "qlora/lora.h"
#include "testutil.h"

enum { NSEQ = 3 };
static const double LOGITS_TOL = 1e-4; /* observed: below 1e-6 */ /* relative L2 error, float32 */
static const double GRAD_TOL = 1e-4; /* observed: below 3e-6 */

static ql_st_file *ref;
static char model_dir[1024], ref_dir[1024];

static void setup(void)
{
    snprintf(model_dir, sizeof model_dir, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(ref_dir, sizeof ref_dir, "%s/tests/reference/stories260K", tu_env("QLORA_SOURCE_ROOT"));
    char path[1200];
    snprintf(path, sizeof path, "%s/reference.safetensors", ref_dir);
    ck_assert_msg(ql_st_open(path, &ref) == QL_OK, "%s", ql_error_message());
}

static void teardown(void) { ql_st_close(ref); }

static ql_llama *load(const char *quantizer)
{
    ql_llama *m;
    ql_llama_load_opts o = {.quantizer = quantizer};
    ck_assert_msg(ql_llama_load(model_dir, &o, &m) == QL_OK, "%s", ql_error_message());
    return m;
}

static void check_logits(ql_llama *m, const char *key_fmt, const char *base)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    for (int i = 0; i < NSEQ; i++) {
        const ql_tensor *ids = tu_need(ref, "ids.%d", i);
        int T = (int)ids->shape[0];
        char key[128];
        snprintf(key, sizeof key, key_fmt, base, i);
        const ql_tensor *want = tu_need(ref, "%s", key);
        ck_assert_int_eq(want->shape[0], T);
        float *logits = malloc((size_t)T * c->vocab * 4);
        ql_kv_cache *cache;
        ck_assert_int_eq(ql_kv_cache_create(m, T, &cache), QL_OK);
        ck_assert_int_eq(ql_llama_forward(m, cache, ids->data, T, logits, 0), QL_OK);
        size_t worst = 0;
        double e = tu_rel_error(logits, want->data, (size_t)T * c->vocab, &worst);
        ck_assert_msg(e < LOGITS_TOL, "%s: relative error %.3g (worst at %zu: %g vs %g)", key, e, worst, logits[worst],
                      ((const float *)want->data)[worst]);
        ql_kv_cache_destroy(cache);
        free(logits);
    }
}

static ql_lora *load_adapter(ql_llama *m, const char *name)
{
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/%s", ref_dir, name);
    ql_lora *l;
    ck_assert_msg(ql_lora_load_peft(m, dir, &l) == QL_OK, "%s", ql_error_message());
    return l;
}

static const char *const bases[] = {"dense", "nf4"};
static const char *const quantizers[] = {"none", "nf4"};

START_TEST(base_logits)
{
    ql_llama *m = load(quantizers[_i]);
    check_logits(m, "logits.%s.%d", bases[_i]);
    ql_llama_destroy(m);
}
END_TEST

START_TEST(adapter_logits)
{
    ql_llama *m = load(quantizers[_i]);
    ql_lora *l = load_adapter(m, "adapter");
    ck_assert_int_eq(l->cfg.r, 4);
    ql_lora_attach(m, l);
    check_logits(m, "logits.%s.lora.%d", bases[_i]);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

START_TEST(qlora_adapter_in_peft)
{
    ql_llama *m = load(quantizers[_i]);
    ql_lora *l = load_adapter(m, "qlora_adapter");
    ql_lora_attach(m, l);
    check_logits(m, "logits.qlora_adapter.%s.%d", bases[_i]);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

START_TEST(loss_and_lora_gradients)
{
    ql_llama *m = load(quantizers[_i]);
    ql_lora *l = load_adapter(m, "adapter");
    int64_t total = 0;
    for (int i = 0; i < NSEQ; i++) {
        const ql_tensor *lab = tu_need(ref, "labels.%d", i);
        const int32_t *y = lab->data;
        for (int64_t t = 1; t < lab->shape[0]; t++) total += y[t] != -100;
    }
    memset(l->grads, 0, l->n_params * 4);
    double sum = 0;
    int64_t n = 0;
    int longest = 1;
    for (int i = 0; i < NSEQ; i++)
        if (tu_need(ref, "ids.%d", i)->shape[0] > longest) longest = (int)tu_need(ref, "ids.%d", i)->shape[0];
    ql_lora_model *lm[2]; /* gradient checkpointing off, on */
    for (int ck = 0; ck < 2; ck++) {
        ql_lora_model_opts mo = {.batch = 1, .max_len = longest, .checkpointing = ck, .backward = 1, .allocate = 1};
        ck_assert_int_eq(ql_lora_model_create(m, l, NULL, &mo, &lm[ck]), QL_OK);
    }
    for (int i = 0; i < NSEQ; i++) {
        const ql_tensor *ids = tu_need(ref, "ids.%d", i), *lab = tu_need(ref, "labels.%d", i);
        const int32_t len = (int32_t)ids->shape[0];
        const uint64_t seed = 1;
        ql_lora_batch mb = {.B = 1, .T = len, .ids = ids->data, .labels = lab->data, .len = &len, .dropout_seeds = &seed};
        ql_lora_step_opts o = {.loss_scale = 1.0f / (float)total, .backward = 1};
        ck_assert_int_eq(ql_lora_model_step(lm[i == 1], &mb, &o, &sum, &n), QL_OK);
    }
    ql_lora_model_destroy(lm[0]);
    ql_lora_model_destroy(lm[1]);
    ck_assert_int_eq(n, total);
    float want_loss = *(const float *)tu_need(ref, "loss.%s", bases[_i])->data;
    ck_assert_msg(fabs(sum / (double)n - want_loss) < 1e-5 * fabs(want_loss), "loss %.7f vs %.7f", sum / (double)n,
                  want_loss);
    for (int layer = 0; layer < l->n_layers; layer++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            ql_lora_pair *p = ql_lora_pair_at(l, layer, k);
            const ql_tensor *ga = tu_need(ref, "grad.%s.%d.%s.A", bases[_i], layer, ql_lora_module_name(k));
            const ql_tensor *gb = tu_need(ref, "grad.%s.%d.%s.B", bases[_i], layer, ql_lora_module_name(k));
            size_t worst = 0;
            double ea = tu_rel_error(p->dA, ga->data, (size_t)(l->cfg.r * p->in), &worst);
            ck_assert_msg(ea < GRAD_TOL, "%s dA layer %d %s: relative error %.3g", bases[_i], layer,
                          ql_lora_module_name(k), ea);
            double eb = tu_rel_error(p->dB, gb->data, (size_t)(p->out * l->cfg.r), &worst);
            ck_assert_msg(eb < GRAD_TOL, "%s dB layer %d %s: relative error %.3g", bases[_i], layer,
                          ql_lora_module_name(k), eb);
        }
    ql_lora_destroy(l);
    ql_llama_destroy(m);
}
END_TEST

Suite *reference_suite(void)
{
    Suite *s = suite_create("reference");
    TCase *t = tcase_create("torch");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, base_logits, 0, 2);
    tcase_add_loop_test(t, adapter_logits, 0, 2);
    tcase_add_loop_test(t, qlora_adapter_in_peft, 0, 2);
    tcase_add_loop_test(t, loss_and_lora_gradients, 0, 2);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(reference_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
