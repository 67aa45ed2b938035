/* Test plugins for ABI 1.3's calibration slots, one per build (-DCALIB_<KIND>):
 *
 *   CALIB_OK       "calibtest": a valid data-aware plugin that stores the
 *                  matrix unchanged (F32 "weight") and, beside it, what the
 *                  host fed its calibration: the batches, the rows and the
 *                  sum of every input ("calibtest.fed", F64 [3]), so a test
 *                  can check that each matrix saw the inputs it should.
 *                  Its option need=0 makes calibration_needed() say no.
 *   CALIB_PARTIAL  three of the four calibration slots: refused.
 *   CALIB_FLAGONLY QL_QUANTIZER_NEEDS_CALIBRATION without the slots: refused.
 *   CALIB_V12      built against ABI 1.2: its struct_size ends before
 *                  calib_create, and the bytes past it are garbage the host
 *                  must never read as slots; its flags hold the 1.3 bit
 *                  QL_QUANTIZER_NEEDS_CALIBRATION, which 1.2 did not define. */
#include <qlora/quantizer.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const ql_host_api *host;

struct ql_quantizer {
    int need; /* calibration_needed() */
};
struct ql_qstate {
    int64_t rows, cols;
    float *w;
    double fed[3]; /* batches, rows, sum of inputs */
};
struct ql_calib {
    int64_t cols;
    double fed[3];
};

static int init(const ql_host_api *h)
{
    host = h;
    return QL_OK;
}
static int create(const ql_option *o, size_t n, ql_quantizer **out)
{
    ql_quantizer *q = calloc(1, sizeof *q);
    if (!q) return QL_ENOMEM;
    q->need = 1;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(o[i].key, "need") || (strcmp(o[i].value, "0") && strcmp(o[i].value, "1"))) {
            free(q);
            return host->error(QL_EINVAL, "calibtest: option '%s=%s' is not need=0|1", o[i].key, o[i].value);
        }
        q->need = o[i].value[0] == '1';
    }
    *out = q;
    return QL_OK;
}
static void destroy(ql_quantizer *q) { free(q); }
static int describe(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap, "need=%d", q->need);
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "buffer too small");
}
static double bits(const ql_quantizer *q, int64_t r, int64_t c)
{
    (void)q, (void)r, (void)c;
    return 32.0;
}
static int make_state(const ql_matrix_desc *m, const float *w, const double *fed, ql_qstate **out)
{
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s || !(s->w = malloc((size_t)(m->rows * m->cols) * sizeof(float)))) {
        free(s);
        return host->error(QL_ENOMEM, "out of memory");
    }
    s->rows = m->rows;
    s->cols = m->cols;
    memcpy(s->w, w, (size_t)(m->rows * m->cols) * sizeof(float));
    if (fed) memcpy(s->fed, fed, sizeof s->fed);
    *out = s;
    return QL_OK;
}
static int quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    *out = NULL;
    if (q->need) return host->error(QL_EINVAL, "calibtest: %s: quantize() without calibration", m->name);
    return make_state(m, w, NULL, out);
}
static int materialize(const ql_quantizer *q, const ql_qstate *s, int32_t dt, void *out)
{
    (void)q;
    if (dt != QL_DTYPE_F32) return host->error(QL_ENOTSUP, "calibtest materializes float32 only");
    memcpy(out, s->w, (size_t)(s->rows * s->cols) * sizeof(float));
    return QL_OK;
}
static int save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    ql_tensor t = {.name = "weight", .dtype = QL_DTYPE_F32, .ndim = 2, .data = s->w,
                   .nbytes = (uint64_t)(s->rows * s->cols) * 4};
    t.shape[0] = s->rows;
    t.shape[1] = s->cols;
    int rc = w->put(w->ctx, &t);
    if (rc) return rc;
    ql_tensor f = {.name = "calibtest.fed", .dtype = QL_DTYPE_F64, .ndim = 1, .data = s->fed, .nbytes = sizeof s->fed};
    f.shape[0] = 3;
    return w->put(w->ctx, &f);
}
static int load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    (void)q;
    const ql_tensor *t = r->get(r->ctx, "weight"), *f = r->get(r->ctx, "calibtest.fed");
    if (!t || !f || t->dtype != QL_DTYPE_F32 || t->ndim != 2 || f->dtype != QL_DTYPE_F64 || f->nbytes != 24 ||
        t->nbytes != (uint64_t)(t->shape[0] * t->shape[1]) * 4 || (m->rows && (t->shape[0] != m->rows || t->shape[1] != m->cols)))
        return QL_ENOTFOUND;
    double fed[3];
    memcpy(fed, f->data, sizeof fed);
    ql_matrix_desc md = {.name = m->name, .rows = t->shape[0], .cols = t->shape[1]};
    float *w = malloc(t->nbytes);
    if (!w) return host->error(QL_ENOMEM, "out of memory");
    memcpy(w, t->data, t->nbytes);
    int rc = make_state(&md, w, fed, out);
    free(w);
    return rc;
}
static void free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    if (s) free(s->w);
    free(s);
}
static int info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *i)
{
    (void)q;
    i->rows = s->rows;
    i->cols = s->cols;
    i->src_dtype = QL_DTYPE_F32;
    i->bytes = (uint64_t)(s->rows * s->cols) * 4 + 24;
    return QL_OK;
}
static int config(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap, "{\"quant_method\": \"qlora\", \"quantizer\": \"calibtest:need=%d\"}", q->need);
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "buffer too small");
}

static int calib_create(const ql_quantizer *q, const ql_matrix_desc *m, ql_calib **out)
{
    (void)q;
    ql_calib *c = calloc(1, sizeof *c);
    if (!c) return host->error(QL_ENOMEM, "out of memory");
    c->cols = m->cols;
    *out = c;
    return QL_OK;
}
static int calib_feed(const ql_quantizer *q, ql_calib *c, const float *x, int64_t n)
{
    (void)q;
    for (int64_t i = 0; i < n * c->cols; i++) {
        if (!isfinite(x[i])) return host->error(QL_ENUMERIC, "calibtest: non-finite input at index %lld", (long long)i);
        c->fed[2] += x[i];
    }
    c->fed[0] += 1;
    c->fed[1] += (double)n;
    return QL_OK;
}
static int quantize_calibrated(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, const ql_calib *c,
                               ql_qstate **out)
{
    (void)q;
    *out = NULL;
    if (m->cols != c->cols)
        return host->error(QL_EINVAL, "calibtest: %s has %lld columns, its calibration %lld", m->name,
                           (long long)m->cols, (long long)c->cols);
    return make_state(m, w, c->fed, out);
}
static void calib_free(const ql_quantizer *q, ql_calib *c)
{
    (void)q;
    free(c);
}
static int calibration_needed(const ql_quantizer *q) { return q->need; }

#define GARBAGE(type) ((type)3)

static const ql_quantizer_desc descriptor = {
#ifdef CALIB_V12
    .struct_size = offsetof(ql_quantizer_desc, calib_create),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = 2,
#else
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
#endif
#if defined(CALIB_OK)
    .name = "calibtest",
#else
    .name = "calibbad",
#endif
    .description = "calibration ABI test plugin",
    .version = "0",
    /* in CALIB_V12, a bit that meant nothing in 1.2: ignored */
    .flags = QL_QUANTIZER_NEEDS_CALIBRATION,
    .init = init,
    .create = create,
    .destroy = destroy,
    .describe = describe,
    .bits_per_param = bits,
    .quantize = quantize,
    .materialize = materialize,
    .save = save,
    .load = load,
    .free_state = free_state,
    .state_info = info,
    .checkpoint_config = config,
#if defined(CALIB_OK)
    .calib_create = calib_create,
    .calib_feed = calib_feed,
    .quantize_calibrated = quantize_calibrated,
    .calib_free = calib_free,
    .calibration_needed = calibration_needed,
#elif defined(CALIB_PARTIAL)
    .calib_create = calib_create,
    .calib_feed = calib_feed,
    .calib_free = calib_free,
#elif defined(CALIB_V12)
    .calib_create = GARBAGE(int (*)(const ql_quantizer *, const ql_matrix_desc *, ql_calib **)),
    .calib_feed = GARBAGE(int (*)(const ql_quantizer *, ql_calib *, const float *, int64_t)),
    .quantize_calibrated = GARBAGE(int (*)(const ql_quantizer *, const ql_matrix_desc *, const float *,
                                           const ql_calib *, ql_qstate **)),
    .calib_free = GARBAGE(void (*)(const ql_quantizer *, ql_calib *)),
    .calibration_needed = GARBAGE(int (*)(const ql_quantizer *)),
#endif
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }
