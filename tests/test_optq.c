/* The calibration ABI (1.3), the optq plugin and the layer-sequential pass. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/error.h"
#include "qlora/llama.h"
#include "qlora/plugin.h"
#include "qlora/safetensors.h"
#include "testutil.h"

static char *test_plugin(const char *file)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", tu_env("QLORA_TEST_PLUGINS"), file);
    return path;
}

static const char *model_dir(void)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    return path;
}

static const char *calib_file(void)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    return path;
}

/* ---- the ABI ---- */

START_TEST(calibrating_plugin_loads_with_its_slots)
{
    ql_qz *q = NULL;
    char spec[4200];
    snprintf(spec, sizeof spec, "%s:need=1", test_plugin("qlora_calibtest.so"));
    ck_assert_msg(ql_qz_open(spec, &q) == QL_OK, "%s", ql_error_message());
    ck_assert(q->desc->calib_create && q->desc->calib_feed && q->desc->quantize_calibrated && q->desc->calib_free);
    ck_assert_int_eq(ql_qz_can_calibrate(q), 1);
    ck_assert_int_eq(ql_qz_needs_calibration(q), 1);
    ck_assert_int_eq(ql_qz_require_calibration(q, 0, "quantize a model"), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "needs calibration data to quantize a model: pass --calib-data FILE");
    ck_assert_contains(ql_error_message(), "calibtest:need=1");
    ck_assert_int_eq(ql_qz_require_calibration(q, 1, "quantize a model"), QL_OK);
    ql_qz_close(q);
    /* calibration_needed() lets an instance opt out */
    snprintf(spec, sizeof spec, "%s:need=0", test_plugin("qlora_calibtest.so"));
    ck_assert_msg(ql_qz_open(spec, &q) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(ql_qz_needs_calibration(q), 0);
    ck_assert_int_eq(ql_qz_require_calibration(q, 0, "quantize a model"), QL_OK);
    ql_qz_close(q);
}
END_TEST

static const struct {
    const char *file, *want[2];
} refused[] = {
    {"qlora_calib_partial.so", {"calibration slot 'quantize_calibrated' is NULL",
                                "calib_create, calib_feed, quantize_calibrated and calib_free come together"}},
    {"qlora_calib_flagonly.so", {"needs calibration (QL_QUANTIZER_NEEDS_CALIBRATION)", "'calib_create' is NULL"}},
};

START_TEST(incomplete_calibration_slots_are_refused)
{
    ql_plugin *p = NULL;
    ck_assert_int_eq(ql_plugin_open(test_plugin(refused[_i].file), &p), QL_EABI);
    ck_assert(p == NULL);
    ck_assert_contains(ql_error_message(), refused[_i].want[0]);
    ck_assert_contains(ql_error_message(), refused[_i].want[1]);
    ck_assert_contains(ql_error_message(), "host 1.3");
}
END_TEST

/* A 1.2 plugin loads; the 1.3 slots past its struct_size read as absent
 * whatever bytes lie there. */
START_TEST(abi_1_2_plugin_loads_without_calibration_slots)
{
    ql_qz *q = NULL;
    ck_assert_msg(ql_qz_open(test_plugin("qlora_calib_v12.so"), &q) == QL_OK, "%s", ql_error_message());
    ck_assert_int_eq(q->desc->abi_minor, 2);
    ck_assert(!q->desc->calib_create && !q->desc->calib_feed && !q->desc->quantize_calibrated && !q->desc->calib_free &&
              !q->desc->calibration_needed);
    ck_assert_int_eq(ql_qz_can_calibrate(q), 0);
    ck_assert_int_eq(ql_qz_needs_calibration(q), 0);
    ql_qz_close(q);
}
END_TEST

/* ---- in-memory tensors ---- */

typedef struct mem_tensors {
    ql_tensor t[8];
    void *data[8];
    char names[8][32];
    int n;
} mem_tensors;

static int mem_put(void *ctx, const ql_tensor *t)
{
    mem_tensors *m = ctx;
    ck_assert_int_lt(m->n, 8);
    int i = m->n++;
    m->t[i] = *t;
    snprintf(m->names[i], sizeof m->names[i], "%s", t->name);
    m->t[i].name = m->names[i];
    m->data[i] = malloc(t->nbytes ? t->nbytes : 1);
    memcpy(m->data[i], t->data, t->nbytes);
    m->t[i].data = m->data[i];
    return QL_OK;
}

static const ql_tensor *mem_get(void *ctx, const char *suffix)
{
    mem_tensors *m = ctx;
    for (int i = 0; i < m->n; i++)
        if (!strcmp(m->names[i], suffix)) return &m->t[i];
    return NULL;
}

static void mem_free(mem_tensors *m)
{
    for (int i = 0; i < m->n; i++) free(m->data[i]);
    m->n = 0;
}

/* ---- optq ---- */

static ql_qz *open_optq(const char *options)
{
    char spec[256];
    snprintf(spec, sizeof spec, "optq%s%s", options[0] ? ":" : "", options);
    ql_qz *q = NULL;
    ck_assert_msg(ql_qz_open(spec, &q) == QL_OK, "%s: %s", spec, ql_error_message());
    return q;
}

static const struct {
    const char *options, *want;
} bad_options[] = {
    {"bits=5", "bits=5: must be 2, 3, 4 or 8"},
    {"bits=3x", "bits=3x"},
    {"groupsize=16", "groupsize=16: must be -1"},
    {"groupsize=2048", "groupsize=2048"},
    {"damp=0", "damp=0: must be a number in (0, 1]"},
    {"sym=2", "sym=2: must be 0 or 1"},
    {"blocksize=64", "unknown option 'blocksize'"},
    {"rtn=1,act_order=1", "act_order=1 orders columns by the calibration Hessian"},
    {"format=gptq_v3", "format=gptq_v3: must be gptq (v1: qzeros hold zero - 1) or gptq_v2"},
};

START_TEST(bad_options_are_refused_by_name)
{
    char spec[128];
    snprintf(spec, sizeof spec, "optq:%s", bad_options[_i].options);
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open(spec, &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), bad_options[_i].want);
}
END_TEST

START_TEST(options_describe_round_trips)
{
    ql_qz *q = open_optq("");
    ck_assert_str_eq(q->options, "bits=4,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0");
    ck_assert_int_eq(ql_qz_needs_calibration(q), 1);
    ql_qz *again = open_optq(q->options);
    ck_assert_str_eq(again->options, q->options);
    ql_qz_close(again);
    ql_qz_close(q);
    q = open_optq("bits=3,groupsize=-1,act_order=1,sym=1,damp=0.05");
    ck_assert_str_eq(q->options, "bits=3,groupsize=-1,act_order=1,sym=1,damp=0.05,rtn=0");
    ql_qz_close(q);
    q = open_optq("rtn=1");
    ck_assert_int_eq(ql_qz_needs_calibration(q), 0);
    ql_qz_close(q);
    /* v1 is the default and is not named, so earlier runs' descriptions stay as they were */
    q = open_optq("format=gptq");
    ck_assert_str_eq(q->options, "bits=4,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0");
    ql_qz_close(q);
    q = open_optq("format=gptq_v2,bits=2");
    ck_assert_str_eq(q->options, "bits=2,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0,format=gptq_v2");
    again = open_optq(q->options);
    ck_assert_str_eq(again->options, q->options);
    ql_qz_close(again);
    ql_qz_close(q);
}
END_TEST

/* The min-max grid of the reference's Quantizer.find_params, written out
 * again here, independently of the plugin. */
static void ref_grid(const float *x, int n, int bits, int sym, double *scale, double *zero)
{
    double lo = 0, hi = 0, maxq = (1 << bits) - 1;
    for (int i = 0; i < n; i++) lo = fmin(lo, x[i]), hi = fmax(hi, x[i]);
    if (sym) {
        hi = fmax(-lo, hi);
        if (lo < 0) lo = -hi;
    }
    if (lo == 0 && hi == 0) lo = -1, hi = 1;
    *scale = (hi - lo) / maxq;
    *zero = sym ? (maxq + 1) / 2 : nearbyint(-lo / *scale);
}

/* Code k of output column r from qweight [words, rows] as quant.py's pack
 * lays 3-bit codes out: per 32 input rows three words, codes 0..9 at bits
 * 3j of word 0, code 10 in bits 30-31 of word 0 and bit 0 of word 1, codes
 * 11..20 at bits 3j+1 of word 1, code 21 in bit 31 of word 1 and bits 0-1 of
 * word 2, codes 22..31 at bits 3j+2 of word 2. */
static unsigned quant_py_code3(const uint32_t *qw, int64_t rows, int64_t r, int64_t k)
{
    const uint32_t *w = qw + (k / 32) * 3 * rows + r;
    int j = (int)(k % 32);
    uint32_t w0 = w[0], w1 = w[rows], w2 = w[2 * rows];
    if (j < 10) return (w0 >> (3 * j)) & 7;
    if (j == 10) return ((w0 >> 30) & 3) | ((w1 & 1) << 2);
    if (j < 21) return (w1 >> (3 * (j - 11) + 1)) & 7;
    if (j == 21) return ((w1 >> 31) & 1) | ((w2 & 3) << 1);
    return (w2 >> (3 * (j - 22) + 2)) & 7;
}

static float half_to_float(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

/* rtn=1 codes are the reference grid's, laid out as quant.py packs them,
 * at a shape that is not a multiple of 32 either way. */
START_TEST(rtn_codes_and_3bit_packing)
{
    const int64_t rows = 40, cols = 70;
    float *w = malloc((size_t)(rows * cols) * sizeof *w), *back = malloc((size_t)(rows * cols) * sizeof *back);
    tu_randn(w, (size_t)(rows * cols), 7, 0.05f);
    /* a group of weights all >= 0: zero point 0, stored as 7 */
    for (int k = 0; k < 32; k++) w[2 * cols + k] = fabsf(w[2 * cols + k]);
    ql_qz *q = open_optq("bits=3,groupsize=32,rtn=1");
    ql_matrix_desc md = {.name = "m", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
    ql_qstate *s = NULL;
    ck_assert_msg(q->desc->quantize(q->inst, &md, w, &s) == QL_OK, "%s", ql_error_message());
    mem_tensors mt = {.n = 0};
    ql_tensor_writer wr = {&mt, mem_put};
    ck_assert_int_eq(q->desc->save(q->inst, s, &wr), QL_OK);
    const ql_tensor *qw = mem_get(&mt, "qweight"), *qz = mem_get(&mt, "qzeros"), *sc = mem_get(&mt, "scales"),
                    *gi = mem_get(&mt, "g_idx");
    ck_assert(qw && qz && sc && gi);
    ck_assert_int_eq(qw->dtype, QL_DTYPE_I32);
    ck_assert_int_eq(qw->shape[0], 9); /* ceil(70 / 32) * 3 */
    ck_assert_int_eq(qw->shape[1], rows);
    ck_assert_int_eq(qz->shape[0], 3);
    ck_assert_int_eq(qz->shape[1], 6); /* ceil(40 / 32) * 3 */
    ck_assert_int_eq(sc->dtype, QL_DTYPE_F16);
    ck_assert_int_eq(gi->shape[0], cols);
    const uint32_t *qwd = qw->data, *qzd = qz->data;
    const uint16_t *scd = sc->data;
    const int32_t *gid = gi->data;
    ck_assert_int_eq(q->desc->materialize(q->inst, s, QL_DTYPE_F32, back), QL_OK);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < 3; g++) {
            const int64_t c0 = g * 32, n = c0 + 32 <= cols ? 32 : cols - c0;
            double scale, zero;
            ref_grid(w + r * cols + c0, (int)n, 3, 0, &scale, &zero);
            /* zero - 1 in qzeros, the same bit stream along the output dimension */
            unsigned zfield = quant_py_code3(qzd + g * 6, 1, 0, r);
            ck_assert_int_eq((int)((zfield + 1) & 7), (int)zero);
            const double stored = half_to_float(scd[g * rows + r]); /* float16, rounded to nearest */
            ck_assert_msg(fabs(stored - scale) <= scale * 0x1p-11, "scale %.9g stored as %.9g", scale, stored);
            for (int64_t k = c0; k < c0 + n; k++) {
                ck_assert_int_eq(gid[k], g);
                double c = nearbyint(w[r * cols + k] / scale) + zero;
                c = c < 0 ? 0 : c > 7 ? 7 : c;
                unsigned code = quant_py_code3(qwd, rows, r, k);
                ck_assert_msg(code == (unsigned)c, "row %lld col %lld: code %u, reference %g", (long long)r,
                              (long long)k, code, c);
                float want = half_to_float(scd[g * rows + r]) * (float)((int)code - (int)zero);
                ck_assert_msg(back[r * cols + k] == want, "materialized [%lld, %lld] = %g, want %g", (long long)r,
                              (long long)k, back[r * cols + k], want);
            }
        }
    ck_assert_int_eq(quant_py_code3(qzd, 1, 0, 2), 7); /* row 2's first group: zero 0 */
    /* the padding past column 70 and row 40 holds zero codes */
    for (int64_t k = cols; k < 96; k++) ck_assert_int_eq(quant_py_code3(qwd, rows, 0, k), 0);
    /* load gives the same weights back, with the shape from the tensors */
    ql_tensor_reader rd = {&mt, mem_get};
    ql_matrix_desc unknown = {.name = "m"};
    ql_qstate *s2 = NULL;
    ck_assert_msg(q->desc->load(q->inst, &unknown, &rd, &s2) == QL_OK, "%s", ql_error_message());
    float *back2 = malloc((size_t)(rows * cols) * sizeof *back2);
    ck_assert_int_eq(q->desc->materialize(q->inst, s2, QL_DTYPE_F32, back2), QL_OK);
    ck_assert_int_eq(memcmp(back, back2, (size_t)(rows * cols) * sizeof *back), 0);
    ql_state_info info;
    ck_assert_int_eq(q->desc->state_info(q->inst, s2, &info), QL_OK);
    ck_assert_uint_eq(info.bytes, qw->nbytes + qz->nbytes + sc->nbytes + gi->nbytes);
    ck_assert_double_eq_tol(q->desc->bits_per_param(q->inst, rows, cols), 8.0 * (double)info.bytes / (rows * cols),
                            1e-12);
    q->desc->free_state(q->inst, s2);
    q->desc->free_state(q->inst, s);
    mem_free(&mt);
    ql_qz_close(q);
    free(w);
    free(back);
    free(back2);
}
END_TEST

/* format=gptq_v2 writes the same qweight, scales and g_idx as v1 and the
 * zero points themselves in qzeros (v1: zero - 1); each reads its own
 * back exactly, and v2 tensors read as v1 give other weights. */
START_TEST(gptq_v2_stores_the_zero_points)
{
    const int64_t rows = 40, cols = 70;
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    tu_randn(w, (size_t)(rows * cols), 11, 0.05f);
    for (int k = 0; k < 32; k++) w[2 * cols + k] = fabsf(w[2 * cols + k]); /* zero point 0 */
    ql_qz *q1 = open_optq("bits=3,groupsize=32,rtn=1"), *q2 = open_optq("bits=3,groupsize=32,rtn=1,format=gptq_v2");
    ql_matrix_desc md = {.name = "m", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
    ql_qstate *s1 = NULL, *s2 = NULL;
    ck_assert_int_eq(q1->desc->quantize(q1->inst, &md, w, &s1), QL_OK);
    ck_assert_int_eq(q2->desc->quantize(q2->inst, &md, w, &s2), QL_OK);
    mem_tensors m1 = {.n = 0}, m2 = {.n = 0};
    ql_tensor_writer w1 = {&m1, mem_put}, w2 = {&m2, mem_put};
    ck_assert_int_eq(q1->desc->save(q1->inst, s1, &w1), QL_OK);
    ck_assert_int_eq(q2->desc->save(q2->inst, s2, &w2), QL_OK);
    static const char *const same[] = {"qweight", "scales", "g_idx"};
    for (int i = 0; i < 3; i++) {
        const ql_tensor *a = mem_get(&m1, same[i]), *b = mem_get(&m2, same[i]);
        ck_assert(a->nbytes == b->nbytes && !memcmp(a->data, b->data, a->nbytes));
    }
    const uint32_t *z1 = mem_get(&m1, "qzeros")->data, *z2 = mem_get(&m2, "qzeros")->data;
    for (int64_t g = 0; g < 3; g++)
        for (int64_t r = 0; r < rows; r++) {
            unsigned f1 = quant_py_code3(z1 + g * 6, 1, 0, r), f2 = quant_py_code3(z2 + g * 6, 1, 0, r);
            ck_assert_msg(f2 == ((f1 + 1) & 7), "group %lld row %lld: v2 field %u, v1 field %u", (long long)g,
                          (long long)r, f2, f1);
        }
    ck_assert_int_eq(quant_py_code3(z2, 1, 0, 2), 0); /* row 2's first group: zero 0, stored as 0 */
    float *b1 = malloc((size_t)(rows * cols) * sizeof *b1), *b2 = malloc((size_t)(rows * cols) * sizeof *b2);
    ck_assert_int_eq(q1->desc->materialize(q1->inst, s1, QL_DTYPE_F32, b1), QL_OK);
    ql_tensor_reader r2 = {&m2, mem_get};
    ql_qstate *back = NULL;
    ck_assert_int_eq(q2->desc->load(q2->inst, &md, &r2, &back), QL_OK);
    ck_assert_int_eq(q2->desc->materialize(q2->inst, back, QL_DTYPE_F32, b2), QL_OK);
    ck_assert_int_eq(memcmp(b1, b2, (size_t)(rows * cols) * sizeof *b1), 0);
    q2->desc->free_state(q2->inst, back);
    ck_assert_int_eq(q1->desc->load(q1->inst, &md, &r2, &back), QL_OK); /* v2 read as v1: every zero one off */
    ck_assert_int_eq(q1->desc->materialize(q1->inst, back, QL_DTYPE_F32, b2), QL_OK);
    ck_assert(memcmp(b1, b2, (size_t)(rows * cols) * sizeof *b1) != 0);
    char buf[512];
    const char *cfg = buf;
    ck_assert_int_eq(q2->desc->checkpoint_config(q2->inst, buf, sizeof buf), QL_OK);
    ck_assert_contains(cfg, "\"checkpoint_format\": \"gptq_v2\"");
    ck_assert_int_eq(q1->desc->checkpoint_config(q1->inst, buf, sizeof buf), QL_OK);
    ck_assert_contains(cfg, "\"checkpoint_format\": \"gptq\"");
    q1->desc->free_state(q1->inst, back);
    q1->desc->free_state(q1->inst, s1);
    q2->desc->free_state(q2->inst, s2);
    mem_free(&m1), mem_free(&m2);
    ql_qz_close(q1), ql_qz_close(q2);
    free(w), free(b1), free(b2);
}
END_TEST

/* Tampered GPTQ tensors are refused with a message, never read out of bounds. */
START_TEST(tampered_gptq_tensors_are_refused)
{
    const int64_t rows = 32, cols = 64;
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    tu_randn(w, (size_t)(rows * cols), 3, 0.05f);
    ql_qz *q = open_optq("bits=4,groupsize=32,rtn=1");
    ql_matrix_desc md = {.name = "m", .rows = rows, .cols = cols};
    ql_qstate *s = NULL, *s2 = NULL;
    ck_assert_int_eq(q->desc->quantize(q->inst, &md, w, &s), QL_OK);
    mem_tensors mt = {.n = 0};
    ql_tensor_writer wr = {&mt, mem_put};
    ck_assert_int_eq(q->desc->save(q->inst, s, &wr), QL_OK);
    ql_tensor_reader rd = {&mt, mem_get};
    ql_tensor *qw = (ql_tensor *)mem_get(&mt, "qweight"), *gi = (ql_tensor *)mem_get(&mt, "g_idx");
    ql_tensor *qz = (ql_tensor *)mem_get(&mt, "qzeros");
    /* the expected shape from the model */
    ql_matrix_desc wrong = {.name = "m", .rows = rows + 1, .cols = cols};
    ck_assert_int_eq(q->desc->load(q->inst, &wrong, &rd, &s2), QL_EFORMAT);
    ck_assert_contains(ql_error_message(), "m.qweight has 32 output columns but the layer has 33");
    /* a row count that is no bit width */
    qw->shape[0] = 5;
    ck_assert_int_eq(q->desc->load(q->inst, &md, &rd, &s2), QL_EFORMAT);
    ck_assert_contains(ql_error_message(), "not 2, 3, 4 or 8 bits");
    qw->shape[0] = 8;
    /* a group index past the groups */
    ((int32_t *)mt.data[3])[17] = 9;
    ck_assert_int_eq(q->desc->load(q->inst, &md, &rd, &s2), QL_EFORMAT);
    ck_assert_contains(ql_error_message(), "m.g_idx[17] is 9, outside the 2 groups");
    ((int32_t *)mt.data[3])[17] = 0;
    /* bytes that do not match the shape */
    qz->nbytes -= 4;
    ck_assert_int_eq(q->desc->load(q->inst, &md, &rd, &s2), QL_EFORMAT);
    qz->nbytes += 4;
    /* not GPTQ tensors at all: another format's, without a message */
    gi->dtype = QL_DTYPE_I64;
    ck_assert_int_eq(q->desc->load(q->inst, &md, &rd, &s2), QL_EFORMAT);
    gi->dtype = QL_DTYPE_I32;
    qw->dtype = QL_DTYPE_U8;
    ql_error_clear();
    ck_assert_int_eq(q->desc->load(q->inst, &md, &rd, &s2), QL_ENOTFOUND);
    ck_assert_str_eq(ql_error_message(), "");
    ck_assert(s2 == NULL);
    q->desc->free_state(q->inst, s);
    mem_free(&mt);
    ql_qz_close(q);
    free(w);
}
END_TEST

/* Inputs with correlated features, x = z A: what OPTQ's error feedback is for. */
static float *correlated_inputs(int64_t n, int64_t cols, uint64_t seed)
{
    float *z = malloc((size_t)(n * cols) * sizeof *z), *a = malloc((size_t)(cols * cols) * sizeof *a);
    float *x = calloc((size_t)(n * cols), sizeof *x);
    tu_randn(z, (size_t)(n * cols), seed, 1.0f);
    tu_randn(a, (size_t)(cols * cols), seed + 1, 0.3f);
    for (int64_t i = 0; i < cols; i++) a[i * cols + i] += 1.0f;
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = 0; j < cols; j++) {
            double v = 0;
            for (int64_t i = 0; i < cols; i++) v += (double)z[t * cols + i] * a[i * cols + j];
            x[t * cols + j] = (float)v;
        }
    free(z);
    free(a);
    return x;
}

/* ||(W - Q) X^T||^2 over the calibration inputs */
static double output_error(const float *w, const float *qw, const float *x, int64_t rows, int64_t cols, int64_t n)
{
    double e = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < n; t++) {
            double v = 0;
            for (int64_t k = 0; k < cols; k++) v += ((double)w[r * cols + k] - qw[r * cols + k]) * x[t * cols + k];
            e += v * v;
        }
    return e;
}

static double quantize_error(const char *options, const float *w, const float *x, int64_t rows, int64_t cols,
                             int64_t n, int batches, ql_qstate **keep, ql_qz **keep_q)
{
    ql_qz *q = open_optq(options);
    ql_matrix_desc md = {.name = "m", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
    ql_calib *c = NULL;
    ck_assert_int_eq(q->desc->calib_create(q->inst, &md, &c), QL_OK);
    for (int b = 0; b < batches; b++)
        ck_assert_int_eq(q->desc->calib_feed(q->inst, c, x + (n / batches) * b * cols, n / batches), QL_OK);
    ql_qstate *s = NULL;
    ck_assert_msg(q->desc->quantize_calibrated(q->inst, &md, w, c, &s) == QL_OK, "%s", ql_error_message());
    q->desc->calib_free(q->inst, c);
    float *back = malloc((size_t)(rows * cols) * sizeof *back);
    ck_assert_int_eq(q->desc->materialize(q->inst, s, QL_DTYPE_F32, back), QL_OK);
    double e = output_error(w, back, x, rows, cols, n);
    free(back);
    if (keep) {
        *keep = s;
        *keep_q = q;
    } else {
        q->desc->free_state(q->inst, s);
        ql_qz_close(q);
    }
    return e;
}

static const int optq_bits[] = {2, 3, 4, 8};

START_TEST(optq_beats_round_to_nearest_on_the_calibration_inputs)
{
    const int64_t rows = 48, cols = 96, n = 512;
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    tu_randn(w, (size_t)(rows * cols), 11, 0.05f);
    float *x = correlated_inputs(n, cols, 21);
    char o[128], r[128];
    const int bits = optq_bits[_i];
    snprintf(o, sizeof o, "bits=%d,groupsize=32", bits);
    snprintf(r, sizeof r, "bits=%d,groupsize=32,rtn=1", bits);
    double eo = quantize_error(o, w, x, rows, cols, n, 8, NULL, NULL);
    double er = quantize_error(r, w, x, rows, cols, n, 8, NULL, NULL);
    ck_assert_msg(eo < 0.7 * er, "%d bits: OPTQ output error %g, round-to-nearest %g", bits, eo, er);
    snprintf(o, sizeof o, "bits=%d,groupsize=32,act_order=1", bits);
    double ea = quantize_error(o, w, x, rows, cols, n, 8, NULL, NULL);
    ck_assert_msg(ea < 0.7 * er, "%d bits act_order: OPTQ output error %g, round-to-nearest %g", bits, ea, er);
    free(w);
    free(x);
}
END_TEST

/* act_order: groups of groupsize columns in descending order of H's
 * diagonal, g_idx saying which; a dead input column quantizes to 0. */
START_TEST(act_order_groups_and_dead_columns)
{
    const int64_t rows = 16, cols = 128, n = 256;
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    tu_randn(w, (size_t)(rows * cols), 5, 0.05f);
    float *x = correlated_inputs(n, cols, 9);
    for (int64_t t = 0; t < n; t++) {
        x[t * cols + 5] = 0.0f;           /* dead */
        x[t * cols + 77] *= 10.0f;        /* the largest diagonal */
    }
    ql_qstate *s = NULL;
    ql_qz *q = NULL;
    quantize_error("bits=4,groupsize=32,act_order=1", w, x, rows, cols, n, 4, &s, &q);
    mem_tensors mt = {.n = 0};
    ql_tensor_writer wr = {&mt, mem_put};
    ck_assert_int_eq(q->desc->save(q->inst, s, &wr), QL_OK);
    const int32_t *g = mem_get(&mt, "g_idx")->data;
    int count[4] = {0, 0, 0, 0};
    for (int64_t k = 0; k < cols; k++) {
        ck_assert(g[k] >= 0 && g[k] < 4);
        count[g[k]]++;
    }
    for (int i = 0; i < 4; i++) ck_assert_int_eq(count[i], 32);
    ck_assert_int_eq(g[77], 0);
    ck_assert_int_eq(g[5], 3); /* H_55 = 1 after the fix, below every live column */
    float *back = malloc((size_t)(rows * cols) * sizeof *back);
    ck_assert_int_eq(q->desc->materialize(q->inst, s, QL_DTYPE_F32, back), QL_OK);
    for (int64_t r = 0; r < rows; r++) ck_assert_float_eq(back[r * cols + 5], 0.0f);
    /* bf16 is the float32 result rounded */
    uint16_t *b16 = malloc((size_t)(rows * cols) * 2);
    ck_assert_int_eq(q->desc->materialize(q->inst, s, QL_DTYPE_BF16, b16), QL_OK);
    for (int64_t i = 0; i < rows * cols; i++) {
        uint32_t u;
        memcpy(&u, &back[i], 4);
        u += 0x7fffu + ((u >> 16) & 1);
        ck_assert_uint_eq(b16[i], u >> 16);
    }
    q->desc->free_state(q->inst, s);
    ql_qz_close(q);
    mem_free(&mt);
    free(b16);
    free(back);
    free(w);
    free(x);
}
END_TEST

START_TEST(calibration_input_is_checked)
{
    ql_qz *q = open_optq("bits=4");
    ql_matrix_desc md = {.name = "m", .rows = 4, .cols = 8};
    ql_calib *c = NULL;
    ck_assert_int_eq(q->desc->calib_create(q->inst, &md, &c), QL_OK);
    float x[16] = {0};
    x[11] = NAN;
    ck_assert_int_eq(q->desc->calib_feed(q->inst, c, x, 2), QL_ENUMERIC);
    ck_assert_contains(ql_error_message(), "NaN at index 11 (row 1, feature 3)");
    float w[64] = {0};
    ql_qstate *s = NULL;
    ck_assert_int_eq(q->desc->quantize_calibrated(q->inst, &md, w, c, &s), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "fed no inputs");
    ql_matrix_desc other = {.name = "n", .rows = 4, .cols = 9};
    x[11] = 1;
    ck_assert_int_eq(q->desc->calib_feed(q->inst, c, x, 2), QL_OK);
    ck_assert_int_eq(q->desc->quantize_calibrated(q->inst, &other, w, c, &s), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "n has 9 input features but its calibration saw 8");
    ck_assert_int_eq(q->desc->quantize(q->inst, &md, w, &s), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "needs calibration data");
    q->desc->calib_free(q->inst, c);
    ql_qz_close(q);
}
END_TEST

/* ---- the command line and the layer-sequential pass ---- */

/* The commands below run with OMP_WAIT_POLICY=passive: the calibration pass
 * opens thousands of small parallel regions, whose spinning barriers make
 * it many times slower on a loaded machine; the results do not depend on
 * it. */

START_TEST(quantize_without_calibration_is_refused)
{
    char *out = NULL, *err = NULL, cmd[20000], dir[4200];
    snprintf(dir, sizeof dir, "%s/optq-nocalib", tu_tmpdir());
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' quantize --quantizer=optq:bits=3 '%s' -o '%s' --quiet", tu_env("QLORA_BIN"),
             model_dir(), dir);
    ck_assert_int_ne(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(err, "quantizer optq:bits=3,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0 needs calibration "
                            "data to quantize a model: pass --calib-data FILE");
    FILE *f = fopen(dir, "r");
    ck_assert_msg(f == NULL, "%s was created", dir);
    free(out), free(err);
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' train --model '%s' --quantizer=optq:bits=3 --data '%s' --output '%s' --max-steps 1",
             tu_env("QLORA_BIN"), model_dir(), calib_file(), dir);
    ck_assert_int_ne(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(err, "needs calibration data to quantize the model on load: pass --calib-data FILE");
    free(out), free(err);
}
END_TEST

/* The host feeds each linear the inputs of its group, every window once:
 * the test plugin saves what it was fed, and layer 0's q, k and v saw the
 * RMS-normalized embeddings of the saved windows. */
START_TEST(calibration_pass_feeds_each_group_its_inputs)
{
    char *out = NULL, *err = NULL, cmd[32768], dir[4200], windows[4200];
    snprintf(dir, sizeof dir, "%s/calibtest", tu_tmpdir());
    snprintf(windows, sizeof windows, "%s/windows.json", tu_tmpdir());
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' quantize --quantizer='%s:need=1' '%s' -o '%s' --calib-data '%s' --calib-format text "
             "--calib-samples 3 --calib-len 20 --seed 5 --calib-save '%s' --quiet",
             tu_env("QLORA_BIN"), test_plugin("qlora_calibtest.so"), model_dir(), dir, calib_file(), windows);
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s\n%s", out, err);
    ck_assert_contains(out, "calibration: 3 windows of 20 tokens");
    free(out), free(err);
    char path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ql_st_file *f = NULL;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    static const char *const what[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
    double fed[5][7][3];
    for (int l = 0; l < 5; l++)
        for (int k = 0; k < 7; k++) {
            const ql_tensor *t = tu_need(f, "model.layers.%d.%s.calibtest.fed", l, what[k]);
            memcpy(fed[l][k], t->data, sizeof fed[l][k]);
            ck_assert_double_eq(fed[l][k][0], 3);
            ck_assert_double_eq(fed[l][k][1], 60);
        }
    for (int l = 0; l < 5; l++) {
        ck_assert_double_eq(fed[l][0][2], fed[l][1][2]); /* q, k, v share one input */
        ck_assert_double_eq(fed[l][0][2], fed[l][2][2]);
        ck_assert_double_eq(fed[l][4][2], fed[l][5][2]); /* gate, up */
        ck_assert(fed[l][0][2] != fed[l][4][2]);
        if (l) ck_assert(fed[l][0][2] != fed[0][0][2]);
    }
    ql_st_close(f);
    /* layer 0's attention input, computed here from the windows */
    json_t *j = json_load_file(windows, 0, NULL);
    ck_assert(j != NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "samples")), 3);
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = "none"};
    ck_assert_int_eq(ql_llama_load(model_dir(), &lo, &m), QL_OK);
    const ql_llama_config *c = ql_llama_get_config(m);
    const float *emb = ql_llama_embeddings(m), *norm = ql_llama_layers(m)[0].attn_norm;
    double sum = 0;
    for (size_t s = 0; s < 3; s++)
        for (size_t t = 0; t < 20; t++) {
            int id = (int)json_integer_value(json_array_get(json_array_get(json_object_get(j, "tokens"), s), t));
            const float *e = emb + (size_t)id * c->hidden;
            double ss = 0;
            for (int i = 0; i < c->hidden; i++) ss += (double)e[i] * e[i];
            double rstd = 1.0 / sqrt(ss / c->hidden + c->rms_eps);
            for (int i = 0; i < c->hidden; i++) sum += e[i] * rstd * norm[i];
        }
    ck_assert_msg(fabs(sum - fed[0][0][2]) <= 1e-4 * fmax(1.0, fabs(sum)), "layer 0 q input sums to %.9g, want %.9g",
                  fed[0][0][2], sum);
    json_decref(j);
    ql_llama_destroy(m);
}
END_TEST

/* qlora train --quantizer=optq --calib-data: quantized on load, then trained. */
/* compare with --calib-data quantizes a data-aware quantizer in the
 * layer-sequential pass, as quantize does: its per-layer error and bytes
 * are those of the checkpoint quantize writes with the same calibration;
 * a quantizer of the list that takes no data (nf4, optq:rtn=1) ignores it;
 * without the data optq is refused, saying what to pass. */
START_TEST(compare_calibrates_like_quantize)
{
    char *out = NULL, *err = NULL, cmd[20000], dir[4200], json[4200];
    snprintf(dir, sizeof dir, "%s/optq-cmp-q", tu_tmpdir());
    snprintf(json, sizeof json, "%s/optq-cmp.json", tu_tmpdir());
    const char *calib = "--calib-data '%s' --calib-format text --calib-samples 8 --calib-len 64 --calib-seed 3";
    char cflags[4400];
    snprintf(cflags, sizeof cflags, calib, calib_file());
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' compare --quiet --quantizers=optq:bits=3,groupsize=32,nf4,optq:bits=3,"
             "groupsize=32,rtn=1 '%s' %s --json '%s'",
             tu_env("QLORA_BIN"), model_dir(), cflags, json);
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s\n%s", out, err);
    ck_assert_contains(out, "calibrated (8 windows of 64 tokens from");
    free(out), free(err);
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' quantize --quiet --quantizer=optq:bits=3,groupsize=32 '%s' -o '%s' %s",
             tu_env("QLORA_BIN"), model_dir(), dir, cflags);
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s\n%s", out, err);
    free(out), free(err);
    json_t *j = json_load_file(json, 0, NULL);
    ck_assert(j != NULL);
    json_t *qs = json_object_get(j, "quantizers");
    ck_assert_int_eq(json_array_size(qs), 3);
    ck_assert(json_is_true(json_object_get(json_array_get(qs, 0), "calibrated")));
    ck_assert(json_is_false(json_object_get(json_array_get(qs, 1), "calibrated")));
    ck_assert(json_is_false(json_object_get(json_array_get(qs, 2), "calibrated")));
    /* the checkpoint's layers against the original weights */
    ql_llama *orig = NULL, *qm = NULL;
    ql_llama_load_opts none = {.quantizer = "none"}, pre = {.quantizer = NULL};
    ck_assert_msg(ql_llama_load(model_dir(), &none, &orig) == QL_OK, "%s", ql_error_message());
    ck_assert_msg(ql_llama_load(dir, &pre, &qm) == QL_OK, "%s", ql_error_message());
    json_t *layers = json_object_get(json_array_get(qs, 0), "layers"), *rtn = json_object_get(json_array_get(qs, 2), "layers");
    ck_assert_int_eq(json_array_size(layers), 35);
    int differ_from_rtn = 0;
    for (size_t i = 0; i < json_array_size(layers); i++) {
        json_t *row = json_array_get(layers, i);
        const char *name = json_string_value(json_object_get(row, "name"));
        const ql_linear *a = NULL, *b = NULL;
        for (int l = 0; l < ql_llama_get_config(qm)->n_layers && !a; l++) {
            ql_llama_layer *L = &ql_llama_layers(orig)[l], *Q = &ql_llama_layers(qm)[l];
            ql_linear *la[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            ql_linear *lq[] = {&Q->q, &Q->k, &Q->v, &Q->o, &Q->gate, &Q->up, &Q->down};
            for (int k = 0; k < 7; k++)
                if (!strcmp(la[k]->name, name)) a = la[k], b = lq[k];
        }
        ck_assert_msg(a && b, "no layer %s", name);
        size_t n = (size_t)(a->out * a->in);
        float *wa = malloc(n * sizeof *wa), *wb = malloc(n * sizeof *wb);
        ck_assert_int_eq(ql_linear_weights(a, wa), QL_OK);
        ck_assert_int_eq(ql_linear_weights(b, wb), QL_OK);
        double sq = 0, ref = 0;
        for (size_t e = 0; e < n; e++) sq += ((double)wb[e] - wa[e]) * ((double)wb[e] - wa[e]), ref += (double)wa[e] * wa[e];
        double rel = sqrt(sq / ref), got = json_number_value(json_object_get(row, "rel_error"));
        ck_assert_msg(fabs(got - rel) <= 1e-12 * rel, "%s: compare says %.17g, the quantized checkpoint %.17g", name, got,
                      rel);
        ql_state_info info;
        ck_assert_int_eq(b->qz->desc->state_info(b->qz->inst, b->state, &info), QL_OK);
        ck_assert_int_eq(json_integer_value(json_object_get(row, "stored_bytes")), (json_int_t)info.bytes);
        differ_from_rtn += got != json_number_value(json_object_get(json_array_get(rtn, i), "rel_error"));
        free(wa), free(wb);
    }
    ck_assert_int_eq(differ_from_rtn, 35);
    ql_llama_destroy(orig);
    ql_llama_destroy(qm);
    json_decref(j);
    snprintf(cmd, sizeof cmd, "'%s' compare --quiet --quantizers=nf4,optq:bits=3 '%s'", tu_env("QLORA_BIN"), model_dir());
    ck_assert_int_ne(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(err, "needs calibration data to be compared: pass --calib-data FILE (qlora quantize, compare and train");
    free(out), free(err);
}
END_TEST

START_TEST(train_quantizes_on_load_with_calibration)
{
    char *out = NULL, *err = NULL, cmd[20000], run[4200], path[4300];
    snprintf(run, sizeof run, "%s/optq-train", tu_tmpdir());
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' train --model '%s' --quantizer=optq:bits=3,groupsize=128 --calib-data '%s' --calib-format text "
             "--calib-samples 8 --calib-len 64 --data '%s' --format text --max-examples 16 --max-steps 2 "
             "--output '%s' --quiet",
             tu_env("QLORA_BIN"), model_dir(), calib_file(), calib_file(), run);
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s\n%s", out, err);
    ck_assert_contains(err, "adapter after 2 steps");
    free(out), free(err);
    snprintf(path, sizeof path, "%s/run_config.json", run);
    json_t *j = json_load_file(path, 0, NULL);
    ck_assert(j != NULL);
    ck_assert_str_eq(json_string_value(json_object_get(j, "quantizer")),
                     "optq:bits=3,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0");
    const json_t *c = json_object_get(j, "calibration");
    ck_assert_int_eq(json_integer_value(json_object_get(c, "samples")), 8);
    ck_assert_int_eq(json_integer_value(json_object_get(c, "len")), 64);
    ck_assert_str_eq(json_string_value(json_object_get(c, "format")), "text");
    json_decref(j);

    /* eval --adapter calibrates the base again as the run did: the scores of
     * the adapter over `qlora quantize` with the same calibration, exactly */
    char q[4300];
    snprintf(q, sizeof q, "%s/optq-base", tu_tmpdir());
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' quantize --quantizer=optq:bits=3,groupsize=128 '%s' -o '%s' --calib-data '%s' "
             "--calib-format text --calib-samples 8 --calib-len 64 --quiet",
             tu_env("QLORA_BIN"), model_dir(), q, calib_file());
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s\n%s", out, err);
    free(out), free(err);
    char *o1 = NULL, *o2 = NULL;
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' eval --model '%s' --adapter '%s' --data '%s' --format text --max-examples 20 --quiet",
             tu_env("QLORA_BIN"), model_dir(), run, calib_file());
    ck_assert_msg(tu_run(cmd, &o1, &err) == 0, "%s", err);
    ck_assert_contains(err, "calibrating optq:bits=3,groupsize=128,act_order=0,sym=0,damp=0.01,rtn=0 again as it did (8 windows of 64 tokens");
    free(err);
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' eval --model '%s' --adapter '%s' --data '%s' --format text --max-examples 20 --quiet",
             tu_env("QLORA_BIN"), q, run, calib_file());
    ck_assert_msg(tu_run(cmd, &o2, &err) == 0, "%s", err);
    free(err);
    ck_assert_str_eq(o1, o2);
    free(o1), free(o2);
    /* a calibration file that is gone is an error naming it; a bad field names the field */
    j = json_load_file(path, 0, NULL);
    json_object_set_new(json_object_get(j, "calibration"), "data", json_string("/nonexistent/calib.txt"));
    ck_assert_int_eq(json_dump_file(j, path, 0), 0);
    snprintf(cmd, sizeof cmd, "'%s' eval --model '%s' --adapter '%s' --data '%s' --format text --max-examples 2 --quiet",
             tu_env("QLORA_BIN"), model_dir(), run, calib_file());
    ck_assert_int_ne(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(err, "the run quantized its base with calibration data /nonexistent/calib.txt, which is not there now");
    free(out), free(err);
    json_object_set_new(json_object_get(j, "calibration"), "samples", json_integer(0));
    ck_assert_int_eq(json_dump_file(j, path, 0), 0);
    ck_assert_int_ne(tu_run(cmd, &out, &err), 0);
    ck_assert_contains(err, "calibration.samples must be an integer from 1 to");
    free(out), free(err);
    json_decref(j);
}
END_TEST

/* ---- against IST-DASLab/gptq (tests/reference/gptq_compare.py) ---- */

static json_t *compare_json(void)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/tests/reference/optq/compare.json", tu_env("QLORA_SOURCE_ROOT"));
    json_error_t e;
    json_t *j = json_load_file(path, 0, &e);
    ck_assert_msg(j != NULL, "%s: %s", path, e.text);
    return j;
}

static const char *const reference_configs[] = {"b4_g128", "b3_g128", "b3_gm1_act", "b2_g32_sym"};

/* Field k of a little-endian bit stream of `bits`-bit fields in 32-bit words `stride` apart. */
static unsigned stream_field(const uint32_t *w, int64_t stride, int64_t k, int bits)
{
    uint64_t bit = (uint64_t)(k * bits), v = w[(bit / 32) * stride] >> (bit % 32);
    if (bit % 32 + (uint64_t)bits > 32) v |= (uint64_t)w[(bit / 32 + 1) * stride] << (32 - bit % 32);
    return (unsigned)(v & ((1u << bits) - 1));
}

static double qlora_eval_nll(const char *dir)
{
    char cmd[12000], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=passive '%s' eval --model '%s' --data '%s' --format text --max-examples 200 --quiet",
             tu_env("QLORA_BIN"), dir, calib_file());
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s", err);
    const char *last = strrchr(out, '{');
    ck_assert(last != NULL);
    json_t *j = json_loads(last, 0, NULL);
    ck_assert(j != NULL);
    double nll = json_number_value(json_object_get(j, "nll"));
    json_decref(j);
    free(out), free(err);
    return nll;
}

/* A fresh build's codes are the reference's, on the inputs our pass fed
 * each layer (the script ran the reference's GPTQ class on them in
 * float64); every layer's output error within 1% of the reference's; the
 * whole model's NLL near the reference's own pass; and qlora eval of a
 * fresh checkpoint gives the NLL the comparison measured. */
START_TEST(codes_and_errors_match_the_reference)
{
    json_t *root = compare_json(), *cal = json_object_get(root, "calibration");
    json_t *cfg = json_object_get(json_object_get(root, "configs"), reference_configs[_i]);
    ck_assert(cfg != NULL);
    json_t *same = json_object_get(cfg, "same_inputs"), *own = json_object_get(cfg, "own_pass");
    const char *spec = json_string_value(json_object_get(cfg, "spec"));
    const int bits = spec[strlen("optq:bits=")] - '0';
    char dir[4200], cmd[16000], *out = NULL, *err = NULL;
    snprintf(dir, sizeof dir, "%s/ref-%s", tu_tmpdir(), reference_configs[_i]);
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' quantize --quantizer=%s '%s' -o '%s' --calib-data '%s' --calib-format text --calib-samples %lld "
             "--calib-len %lld --seed %lld --quiet",
             tu_env("QLORA_BIN"), spec, model_dir(), dir, calib_file(),
             (long long)json_integer_value(json_object_get(cal, "samples")),
             (long long)json_integer_value(json_object_get(cal, "len")),
             (long long)json_integer_value(json_object_get(cal, "seed")));
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s", err);
    free(out), free(err);
    char path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ql_st_file *f = NULL, *ref = NULL;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    snprintf(path, sizeof path, "%s/tests/reference/optq/ref_codes_%s.safetensors", tu_env("QLORA_SOURCE_ROOT"),
             reference_configs[_i]);
    ck_assert_int_eq(ql_st_open(path, &ref), QL_OK);
    int64_t equal = 0, total = 0;
    for (size_t i = 0; i < ql_st_count(ref); i++) {
        const ql_tensor *rc = ql_st_at(ref, i);
        const ql_tensor *qw = tu_need(f, "%s.qweight", rc->name);
        const int64_t rows = rc->shape[0], cols = rc->shape[1];
        ck_assert_int_eq(qw->shape[1], rows);
        uint32_t *words = malloc(qw->nbytes);
        memcpy(words, qw->data, qw->nbytes);
        const uint8_t *want = rc->data;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t k = 0; k < cols; k++) equal += stream_field(words + r, rows, k, bits) == want[r * cols + k];
        total += rows * cols;
        free(words);
    }
    ck_assert_int_eq(total, json_integer_value(json_object_get(same, "codes")));
    ck_assert_msg(equal >= total - total / 1000, "%s: %lld of %lld codes are the reference's", reference_configs[_i],
                  (long long)equal, (long long)total);
    ql_st_close(ref);
    ql_st_close(f);
    /* the figures the script measured */
    ck_assert_double_ge(json_number_value(json_object_get(same, "identical_code_share")), 0.999);
    ck_assert_double_le(json_number_value(json_object_get(same, "max_abs_ratio_minus_1")), 0.01);
    const char *key;
    json_t *layer;
    size_t nlayers = 0;
    json_object_foreach(json_object_get(same, "layers"), key, layer) {
        double ratio = json_number_value(json_object_get(layer, "ratio"));
        ck_assert_msg(fabs(ratio - 1) <= 0.01, "%s: ||WX - QX|| ours / reference = %g", key, ratio);
        nlayers++;
    }
    ck_assert_uint_eq(nlayers, 35);
    const double nll_ref = json_number_value(json_object_get(own, "nll_reference_fp64"));
    const double nll_ours = json_number_value(json_object_get(own, "nll_ours_fp64"));
    if (bits >= 3) ck_assert_msg(fabs(nll_ours - nll_ref) <= 0.01 * nll_ref, "NLL %g vs the reference's %g", nll_ours,
                                 nll_ref);
    const double nll = qlora_eval_nll(dir);
    ck_assert_msg(fabs(nll - json_number_value(json_object_get(own, "nll_qlora_eval"))) < 1e-4,
                  "qlora eval NLL %g, the comparison measured %g", nll,
                  json_number_value(json_object_get(own, "nll_qlora_eval")));
    ck_assert_double_le(fabs(nll - nll_ours), 1e-3); /* our forward (float32) on our checkpoint vs float64 */
    json_decref(root);
}
END_TEST

/* ---- against round-to-nearest (tests/reference/optq_rtn_table.py, docs/optq.md) ---- */

/* The text of `path` after its first n examples (blank-line separated), as
 * optq_rtn_table.py cuts it for the calibration. */
static void write_after_examples(const char *path, int n, const char *out)
{
    FILE *f = fopen(path, "rb"), *o = fopen(out, "wb");
    ck_assert(f && o);
    char line[65536];
    int seen = 0, in_example = 0, copying = 0;
    while (fgets(line, sizeof line, f)) {
        int blank = 1;
        for (const char *p = line; *p; p++) blank &= *p == ' ' || *p == '\t' || *p == '\n' || *p == '\r';
        if (!copying && !blank && !in_example) {
            if (seen == n) copying = 1;
            else seen++;
        }
        in_example = !blank;
        if (copying) fputs(line, o);
    }
    fclose(f);
    fclose(o);
}

/* OPTQ is clearly better than round-to-nearest at the same bits and group
 * size, and a fresh build reproduces the table's 3-bit figure. */
START_TEST(optq_beats_rtn_in_the_table)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/tests/reference/optq/rtn_table.json", tu_env("QLORA_SOURCE_ROOT"));
    json_t *j = json_load_file(path, 0, NULL);
    ck_assert(j != NULL);
    json_t *table = json_object_get(j, "table"), *e;
    size_t i;
    double b3g128 = 0;
    ck_assert_uint_eq(json_array_size(table), 6);
    json_array_foreach(table, i, e) {
        const int bits = (int)json_integer_value(json_object_get(e, "bits"));
        const int gs = (int)json_integer_value(json_object_get(e, "groupsize"));
        const double optq = json_number_value(json_object_get(e, "optq")), rtn = json_number_value(json_object_get(e, "rtn"));
        const double margin = bits == 4 ? 0.02 : bits == 3 ? 0.3 : 0.1;
        ck_assert_msg(optq < rtn - margin, "%d bits, groupsize %d: OPTQ %g, RTN %g", bits, gs, optq, rtn);
        if (bits == 3 && gs == 128) b3g128 = optq;
    }
    json_t *cal = json_object_get(j, "calibration");
    char calib[4300], dir[4300], cmd[20000], *out = NULL, *err = NULL;
    snprintf(calib, sizeof calib, "%s/calib-after-200.txt", tu_tmpdir());
    snprintf(dir, sizeof dir, "%s/optq-table-b3", tu_tmpdir());
    write_after_examples(calib_file(), (int)json_integer_value(json_object_get(json_object_get(j, "eval"), "examples")),
                         calib);
    snprintf(cmd, sizeof cmd,
             "OMP_WAIT_POLICY=passive '%s' quantize --quantizer=optq:bits=3,groupsize=128 '%s' -o '%s' --calib-data '%s' --calib-format text "
             "--calib-samples %lld --calib-len %lld --seed %lld --quiet",
             tu_env("QLORA_BIN"), model_dir(), dir, calib, (long long)json_integer_value(json_object_get(cal, "samples")),
             (long long)json_integer_value(json_object_get(cal, "len")),
             (long long)json_integer_value(json_object_get(cal, "seed")));
    ck_assert_msg(tu_run(cmd, &out, &err) == 0, "%s", err);
    free(out), free(err);
    const double nll = qlora_eval_nll(dir);
    ck_assert_msg(fabs(nll - b3g128) < 1e-4, "3 bits, g128: NLL %g, the table says %g", nll, b3g128);
    json_decref(j);
}
END_TEST

/* ---- against GPTQModel (tests/reference/gptqmodel_pack_check.py) ---- */

/* A GPTQ model folder packed by GPTQModel's own writer loads here, through
 * config.json's quantization_config, and every linear materializes exactly
 * what GPTQModel's reader dequantizes; and the script found GPTQModel's
 * writer and reader agree with qlora's layout at 2, 3, 4 and 8 bits. */
/* _i 0: GPTQ v1 (checkpoint_format "gptq"), _i 1: the same codes packed as
 * "gptq_v2" (qzeros hold the zero points); both folders packed by
 * GPTQModel, whose reader's weights for both are the one dequant file. */
START_TEST(gptqmodel_checkpoint_loads_exactly)
{
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/tests/reference/optq/gptqmodel_llama%s", tu_env("QLORA_SOURCE_ROOT"),
             _i ? "_v2" : "");
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = NULL};
    ck_assert_msg(ql_llama_load(dir, &lo, &m) == QL_OK, "%s", ql_error_message());
    ck_assert_str_eq(ql_llama_quantization(m), _i ? "optq:bits=3,groupsize=32,act_order=1,sym=0,damp=0.01,rtn=0,format=gptq_v2"
                                                  : "optq:bits=3,groupsize=32,act_order=1,sym=0,damp=0.01,rtn=0");
    snprintf(path, sizeof path, "%s/tests/reference/optq/gptqmodel_llama_dequant.safetensors",
             tu_env("QLORA_SOURCE_ROOT"));
    ql_st_file *f = NULL;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    const ql_llama_config *c = ql_llama_get_config(m);
    int checked = 0;
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        ql_linear *ls[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int k = 0; k < 7; k++) {
            ck_assert(ls[k]->state != NULL);
            const ql_tensor *want = tu_need(f, "%s.weight", ls[k]->name);
            ck_assert_int_eq(want->shape[0], ls[k]->out);
            float *w = malloc((size_t)(ls[k]->out * ls[k]->in) * sizeof *w), *ref = malloc(want->nbytes);
            memcpy(ref, want->data, want->nbytes);
            ck_assert_int_eq(ql_linear_weights(ls[k], w), QL_OK);
            for (int64_t e = 0; e < ls[k]->out * ls[k]->in; e++)
                ck_assert_msg(w[e] == ref[e], "%s[%lld]: %g, GPTQModel %g", ls[k]->name, (long long)e, w[e], ref[e]);
            free(w), free(ref);
            checked++;
        }
    }
    ck_assert_int_eq(checked, 14);
    ql_st_close(f);
    ql_llama_destroy(m);
    snprintf(path, sizeof path, "%s/tests/reference/optq/gptqmodel_check.json", tu_env("QLORA_SOURCE_ROOT"));
    json_t *j = json_load_file(path, 0, NULL);
    ck_assert(j != NULL);
    const char *bits;
    json_t *r;
    int n = 0;
    ck_assert(json_is_true(json_object_get(j, "v2_folder_reader_equals_v1_dequant")));
    ck_assert_int_eq(json_integer_value(json_object_get(j, "v2_folder_qzeros_differ_from_v1")), 14);
    json_object_foreach(json_object_get(j, _i ? "ours_v2" : "ours"), bits, r) {
        const json_int_t layers = json_integer_value(json_object_get(r, "layers"));
        ck_assert_int_eq(layers, 14);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "reader_exact")), layers);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "qweight_identical")), layers);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "qzeros_identical")), layers);
        n++;
    }
    ck_assert_int_eq(n, 4);
    json_decref(j);
}
END_TEST

Suite *optq_suite(void)
{
    Suite *s = suite_create("optq");
    TCase *t = tcase_create("calib-abi");
    tcase_add_test(t, calibrating_plugin_loads_with_its_slots);
    tcase_add_loop_test(t, incomplete_calibration_slots_are_refused, 0, sizeof refused / sizeof refused[0]);
    tcase_add_test(t, abi_1_2_plugin_loads_without_calibration_slots);
    suite_add_tcase(s, t);
    t = tcase_create("optq");
    tcase_add_loop_test(t, bad_options_are_refused_by_name, 0, sizeof bad_options / sizeof bad_options[0]);
    tcase_add_test(t, options_describe_round_trips);
    tcase_add_test(t, rtn_codes_and_3bit_packing);
    tcase_add_test(t, gptq_v2_stores_the_zero_points);
    tcase_add_test(t, tampered_gptq_tensors_are_refused);
    tcase_add_loop_test(t, optq_beats_round_to_nearest_on_the_calibration_inputs, 0,
                        sizeof optq_bits / sizeof optq_bits[0]);
    tcase_add_test(t, act_order_groups_and_dead_columns);
    tcase_add_test(t, calibration_input_is_checked);
    suite_add_tcase(s, t);
    t = tcase_create("pass");
    tcase_add_test(t, quantize_without_calibration_is_refused);
    tcase_add_test(t, calibration_pass_feeds_each_group_its_inputs);
    tcase_add_test(t, train_quantizes_on_load_with_calibration);
    tcase_add_test(t, compare_calibrates_like_quantize);
    tcase_set_timeout(t, 300);
    suite_add_tcase(s, t);
    t = tcase_create("reference");
    tcase_add_loop_test(t, codes_and_errors_match_the_reference, 0,
                        sizeof reference_configs / sizeof reference_configs[0]);
    tcase_add_loop_test(t, gptqmodel_checkpoint_loads_exactly, 0, 2);
    tcase_add_test(t, optq_beats_rtn_in_the_table);
    tcase_set_timeout(t, 500);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(optq_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
