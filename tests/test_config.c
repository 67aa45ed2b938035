/* config.json reading: both forms transformers writes for the rotary
 * embedding, each rope_type's frequencies against transformers, dtype, and
 * the refusals of what qlora does not understand. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_out.h"
#include "prequantized.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/llama.h"
#include "rope.h"
#include "testutil.h"

/* rope_ref_cases: inv_freq and attention_scaling that transformers' LlamaRotaryEmbedding
 * computes for each config, after each forward call (tests/reference/gen_rope_ref.py) */
#include "reference/rope_ref.h"

#define BASE                                                                                                       \
    "{\"model_type\": \"llama\", \"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 256, "              \
    "\"num_attention_heads\": 4, \"num_hidden_layers\": 1, \"intermediate_size\": 64, \"vocab_size\": 100, "      \
    "\"max_position_embeddings\": 2048"

/* Parse config.json text read as qlora reads files (ql_json_loadb: big integers become reals). */
static int parse_text(const char *text, ql_llama_config *c)
{
    json_error_t err;
    json_t *j = ql_json_loadb(text, strlen(text), 0, &err);
    ck_assert_msg(j != NULL, "test config does not parse: %s\n%s", err.text, text);
    ql_error_clear();
    int rc = ql_llama_config_parse(j, c);
    json_decref(j);
    return rc;
}

/* BASE plus `extra` (JSON members without braces, may be empty) */
static int parse_extra(const char *extra, ql_llama_config *c)
{
    char text[4096];
    snprintf(text, sizeof text, BASE "%s%s}", extra[0] ? ", " : "", extra);
    return parse_text(text, c);
}

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* ---- each rope_type against transformers ---- */

START_TEST(rope_matches_transformers)
{
    const struct rope_ref_case *rc = &rope_ref_cases[_i];
    ql_llama_config c;
    int r = parse_text(rc->config, &c);
    ck_assert_msg(r == QL_OK, "%s: %s", rc->name, ql_error_message());
    ck_assert_int_eq(c.head_dim, rc->hd);
    const int half = rc->hd / 2;
    float inv[128], scale;
    int64_t cached = 0;
    int exact = 0;
    for (int k = 0; k < rc->ncalls; k++) {
        int64_t n = rc->seq_len[k];
        if (c.rope.type == QL_ROPE_DYNAMIC) n = ql_rope_dynamic_len(&cached, &c.rope, n);
        ql_rope_inv_freq(inv, &scale, &c.rope, c.head_dim, n);
        ck_assert_msg(scale == rc->attn_scale[k], "%s call %d: attention scale %.9g, transformers %.9g", rc->name, k,
                      scale, rc->attn_scale[k]);
        for (int i = 0; i < half; i++) {
            float want = rc->inv_freq[k * half + i];
            /* torch's vectorized powf differs from libm's by an ulp now and then; nothing else may differ */
            long d = labs((long)bits(inv[i]) - (long)bits(want));
            exact += d == 0;
            ck_assert_msg(d <= 1, "%s call %d (seq_len %lld): inv_freq[%d] = %.9g, transformers %.9g (%ld ulp)",
                          rc->name, k, (long long)rc->seq_len[k], i, inv[i], want, d);
        }
    }
    fprintf(stderr, "rope %-16s %3d of %3d inv_freq values bit-equal to transformers, attention scale %.9g\n",
            rc->name, exact, rc->ncalls * half, rc->attn_scale[rc->ncalls - 1]);
}
END_TEST

/* ---- the two forms ---- */

static void assert_same_rope(const ql_rope_config *a, const ql_rope_config *b, const char *what)
{
    ck_assert_msg(a->type == b->type && a->theta == b->theta && a->factor == b->factor &&
                      a->original_max_positions == b->original_max_positions &&
                      a->low_freq_factor == b->low_freq_factor && a->high_freq_factor == b->high_freq_factor &&
                      a->beta_fast == b->beta_fast && a->beta_slow == b->beta_slow && a->truncate == b->truncate &&
                      a->attention_factor == b->attention_factor,
                  "%s: the two forms parse differently (type %d/%d theta %g/%g factor %g/%g)", what, a->type, b->type,
                  a->theta, b->theta, a->factor, b->factor);
}

static const struct {
    const char *v4, *v5;
    ql_rope_type type;
    double theta, factor;
} forms[] = {
    {"\"rope_theta\": 100000.0", "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 100000.0}",
     QL_ROPE_DEFAULT, 1e5, 1},
    {"", "\"rope_parameters\": {\"rope_theta\": 10000.0}", QL_ROPE_DEFAULT, 1e4, 1},
    {"\"rope_theta\": 10000.0, \"rope_scaling\": null", "\"rope_parameters\": {\"rope_type\": \"default\"}",
     QL_ROPE_DEFAULT, 1e4, 1},
    {"\"rope_theta\": 20000.0, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}",
     "\"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": 2.0, \"rope_theta\": 20000.0}", QL_ROPE_LINEAR, 2e4,
     2},
    {"\"rope_theta\": 10000.0, \"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 3.0}",
     "\"rope_parameters\": {\"rope_type\": \"dynamic\", \"factor\": 3.0, \"rope_theta\": 10000.0}", QL_ROPE_DYNAMIC, 1e4,
     3},
    {"\"rope_theta\": 10000.0, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, "
     "\"original_max_position_embeddings\": 512}",
     "\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 512, "
     "\"rope_theta\": 10000.0, \"truncate\": true}",
     QL_ROPE_YARN, 1e4, 4},
    {"\"rope_theta\": 500000.0, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
     "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 1024}",
     "\"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
     "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 1024, \"rope_theta\": 500000.0}",
     QL_ROPE_LLAMA3, 5e5, 8},
};

START_TEST(forms_parse_alike)
{
    ql_llama_config a, b, both;
    ck_assert_msg(parse_extra(forms[_i].v4, &a) == QL_OK, "4.x form: %s", ql_error_message());
    ck_assert_msg(parse_extra(forms[_i].v5, &b) == QL_OK, "5.x form: %s", ql_error_message());
    assert_same_rope(&a.rope, &b.rope, forms[_i].v5);
    ck_assert_int_eq(b.rope.type, forms[_i].type);
    ck_assert(b.rope.theta == forms[_i].theta);
    ck_assert(b.rope.factor == forms[_i].factor);
    /* both forms in one file, agreeing */
    char extra[2048];
    snprintf(extra, sizeof extra, "%s%s%s", forms[_i].v4, forms[_i].v4[0] ? ", " : "", forms[_i].v5);
    ck_assert_msg(parse_extra(extra, &both) == QL_OK, "both forms: %s", ql_error_message());
    assert_same_rope(&both.rope, &b.rope, extra);
}
END_TEST

START_TEST(parsed_values)
{
    ql_llama_config c;
    /* top-level rope_theta fills a rope_parameters without one, as transformers does */
    ck_assert(parse_extra("\"rope_theta\": 500.0, \"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": 2}", &c) ==
              QL_OK);
    ck_assert(c.rope.theta == 500.0 && c.rope.factor == 2.0 && c.rope.type == QL_ROPE_LINEAR);
    /* yarn defaults: beta 32/1, truncate, attention factor 0.1 ln(4) + 1, original = max_position_embeddings */
    ck_assert(parse_extra("\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4, \"beta_fast\": null}", &c) ==
              QL_OK);
    ck_assert(c.rope.beta_fast == 32 && c.rope.beta_slow == 1 && c.rope.truncate == 1);
    ck_assert_int_eq(c.rope.original_max_positions, 2048);
    ck_assert_double_eq_tol(c.rope.attention_factor, 0.1 * log(4.0) + 1, 1e-15);
    /* keys transformers knows but this rope_type ignores are accepted */
    ck_assert(parse_extra("\"rope_parameters\": {\"rope_type\": \"default\", \"factor\": 8.0, \"beta_fast\": 4}", &c) ==
              QL_OK);
    ck_assert(c.rope.type == QL_ROPE_DEFAULT && c.rope.factor == 1);
    ck_assert(parse_extra("\"rope_parameters\": {\"rope_type\": \"default\", \"partial_rotary_factor\": 1.0}", &c) ==
              QL_OK);
    /* dtype: both spellings, recorded */
    ck_assert(parse_extra("", &c) == QL_OK);
    ck_assert_int_eq(c.dtype, QL_DTYPE_F32);
    ck_assert(parse_extra("\"dtype\": \"bfloat16\"", &c) == QL_OK);
    ck_assert_int_eq(c.dtype, QL_DTYPE_BF16);
    ck_assert(parse_extra("\"torch_dtype\": \"float16\"", &c) == QL_OK);
    ck_assert_int_eq(c.dtype, QL_DTYPE_F16);
    ck_assert(parse_extra("\"torch_dtype\": \"float32\", \"dtype\": \"float32\"", &c) == QL_OK);
    ck_assert_int_eq(c.dtype, QL_DTYPE_F32);
    /* explicit head_dim */
    ck_assert(parse_extra("\"head_dim\": 32", &c) == QL_OK);
    ck_assert_int_eq(c.head_dim, 32);
}
END_TEST

/* ---- refusals: each message names the field ---- */

static const struct {
    const char *extra, *names[2];
} refusals[] = {
    {"\"rope_parameters\": {\"rope_type\": \"longrope\", \"short_factor\": [1], \"long_factor\": [1]}",
     {"rope_parameters.short_factor", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"longrope\"}", {"rope_parameters.rope_type", "longrope"}},
    {"\"rope_scaling\": {\"type\": \"su\", \"factor\": 2.0}", {"rope_scaling.rope_type", "'su'"}},
    {"\"rope_parameters\": {\"rope_type\": \"default\", \"rope_thta\": 10000.0}", {"rope_parameters.rope_thta", NULL}},
    {"\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0, \"scale_mode\": 1}", {"rope_scaling.scale_mode", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"default\", \"partial_rotary_factor\": 0.5}",
     {"rope_parameters.partial_rotary_factor", "0.5"}},
    {"\"partial_rotary_factor\": 0.25", {"partial_rotary_factor", NULL}},
    {"\"rope_theta\": 10000.0, \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 500000.0}",
     {"rope_parameters", "disagree"}},
    {"\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, "
     "\"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": 4.0}",
     {"rope_scaling", "disagree"}},
    {"\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, \"rope_parameters\": {\"rope_type\": \"default\"}",
     {"rope_scaling", "disagree"}},
    {"\"rope_scaling\": {\"type\": \"linear\", \"rope_type\": \"dynamic\", \"factor\": 2.0}",
     {"rope_scaling.rope_type", "rope_scaling.type"}},
    {"\"rope_parameters\": {\"rope_type\": \"linear\"}", {"rope_parameters.factor", "missing"}},
    {"\"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8, \"high_freq_factor\": 4}",
     {"rope_parameters.low_freq_factor", "missing"}},
    {"\"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 4, \"high_freq_factor\": 4}",
     {"rope_parameters.high_freq_factor", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": \"10000\"}", {"rope_parameters.rope_theta", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": -2}", {"rope_parameters.factor", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4, \"truncate\": \"yes\"}",
     {"rope_parameters.truncate", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 512.5}",
     {"rope_parameters.original_max_position_embeddings", NULL}},
    {"\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4, "
     "\"original_max_position_embeddings\": 1000000000000000000000000000000}",
     {"rope_parameters.original_max_position_embeddings", NULL}},
    {"\"rope_parameters\": 3", {"rope_parameters", "object"}},
    {"\"rope_theta\": -1", {"rope_theta", NULL}},
    {"\"rope_theta\": 1e300", {"rope_theta", NULL}},
    {"\"dtype\": \"float64\"", {"\"dtype\"", "float64"}},
    {"\"torch_dtype\": \"int8\"", {"\"torch_dtype\"", "int8"}},
    {"\"dtype\": \"bfloat16\", \"torch_dtype\": \"float16\"", {"disagree", "torch_dtype"}},
    {"\"dtype\": 16", {"\"dtype\"", NULL}},
};

START_TEST(refused)
{
    ql_llama_config c;
    int rc = parse_extra(refusals[_i].extra, &c);
    ck_assert_msg(rc != QL_OK, "accepted: %s", refusals[_i].extra);
    for (int k = 0; k < 2; k++)
        if (refusals[_i].names[k]) ck_assert_contains(ql_error_message(), refusals[_i].names[k]);
}
END_TEST

START_TEST(big_integer_refused)
{
    /* a 31-digit integer literal: read as a real, refused as not an integer */
    ql_llama_config c;
    char text[512];
    snprintf(text, sizeof text,
             "{\"model_type\": \"llama\", \"hidden_size\": 256, \"num_attention_heads\": 4, \"num_hidden_layers\": 1, "
             "\"intermediate_size\": 64, \"vocab_size\": 100, \"max_position_embeddings\": %s}",
             "1000000000000000000000000000000");
    ck_assert_int_ne(parse_text(text, &c), QL_OK);
    ck_assert_contains(ql_error_message(), "max_position_embeddings");
}
END_TEST

/* ---- dynamic: when transformers recomputes ---- */

START_TEST(dynamic_state)
{
    ql_rope_config r = {.type = QL_ROPE_DYNAMIC, .theta = 10000, .factor = 2, .original_max_positions = 100};
    int64_t cached = 0;
    /* generation with a cache: each call ends one further, and is recomputed */
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 90), 100);
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 101), 101);
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 102), 102);
    /* shorter but still past the original length: kept */
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 100), 102);
    /* below it: back to the original */
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 99), 100);
    ck_assert_int_eq(ql_rope_dynamic_len(&cached, &r, 150), 150);
    /* below the original length the frequencies are the default ones */
    float a[8], b[8], s;
    ql_rope_config d = {.type = QL_ROPE_DEFAULT, .theta = 10000};
    ql_rope_inv_freq(a, &s, &r, 16, 100);
    ql_rope_inv_freq(b, &s, &d, 16, 100);
    for (int i = 0; i < 8; i++) ck_assert_msg(bits(a[i]) == bits(b[i]), "inv_freq[%d] %.9g vs %.9g", i, a[i], b[i]);
    ql_rope_inv_freq(a, &s, &r, 16, 200);
    ck_assert_msg(a[7] < b[7], "longer sequence: lower frequencies (%.9g vs %.9g)", a[7], b[7]);
    ck_assert(bits(a[0]) == bits(b[0])); /* inv_freq[0] is 1 for any base */
}
END_TEST

/* A bitsandbytes 4-bit quantization_config: the spec follows its quant type
 * and bnb_4bit_use_double_quant (absent: the plugin's default); any other
 * type of that field is refused naming it. */
START_TEST(bnb_spec_follows_double_quant)
{
    static const struct {
        const char *qc, *spec;
    } cases[] = {
        {"\"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_use_double_quant\": true", "nf4"},
        {"\"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_use_double_quant\": false", "nf4:double_quant=0"},
        {"\"bnb_4bit_quant_type\": \"fp4\", \"bnb_4bit_use_double_quant\": false", "fp4:double_quant=0"},
        {"\"bnb_4bit_quant_type\": \"fp4\"", "fp4"},
        {"\"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_use_double_quant\": null", "nf4"},
        {"\"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_use_double_quant\": \"yes\"", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[512];
        snprintf(text, sizeof text,
                 "{\"quantization_config\": {\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true, %s}}",
                 cases[i].qc);
        json_error_t err;
        json_t *cfg = json_loads(text, 0, &err);
        ck_assert_msg(cfg, "%s", err.text);
        const char *spec = NULL, *field = NULL;
        int rc = ql_prequantized_spec(cfg, "config.json", &spec, &field);
        if (cases[i].spec) {
            ck_assert_msg(rc == QL_OK, "%s: %s", cases[i].qc, ql_error_message());
            ck_assert_str_eq(spec, cases[i].spec);
        } else {
            ck_assert_int_eq(rc, QL_EFORMAT);
            ck_assert_str_eq(ql_error_message(),
                             "config.json: quantization_config.bnb_4bit_use_double_quant must be true or false");
        }
        json_decref(cfg);
    }
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("rope");
    tcase_add_loop_test(tc, rope_matches_transformers, 0, (int)(sizeof rope_ref_cases / sizeof rope_ref_cases[0]));
    tcase_add_loop_test(tc, forms_parse_alike, 0, (int)(sizeof forms / sizeof forms[0]));
    tcase_add_test(tc, parsed_values);
    tcase_add_loop_test(tc, refused, 0, (int)(sizeof refusals / sizeof refusals[0]));
    tcase_add_test(tc, big_integer_refused);
    tcase_add_test(tc, dynamic_state);
    tcase_add_test(tc, bnb_spec_follows_double_quant);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
