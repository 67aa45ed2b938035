/* qlora_broken.so: a small valid quantizer (int8 codes with one float scale
 * a row, absmax * clip / 127) with one deliberate defect chosen by
 * $QLORA_BROKEN when init() runs, for tests/test_check_plugin.c: each defect
 * is one that `qlora check-plugin` must catch, with the right reason.
 * Unset (or "none"), the plugin passes every check.
 *
 *   nondeterministic  quantize() scales by a call counter
 *   lastrow           materialize() leaves the last row unwritten
 *   overrun           materialize() writes one element past the output
 *   truncated         load() trusts the shape, not nbytes: reads past a short tensor
 *   shape             load() ignores the shape the host expects
 *   notfound          load() of foreign tensors is QL_EFORMAT with a message
 *   describe          describe() does not round-trip through create()
 *   nan               quantize() takes NaN and Inf
 *   unknownkey        create() ignores unknown keys
 *   badmsg            create() refuses a bad value without naming the key
 *   bits              bits_per_param() is 4 whatever the layout stores
 *   bf16              materialize(BF16) truncates instead of rounding
 *   race              materialize() shares one scratch row between threads
 *   crash             materialize() raises SIGSEGV
 *   exit              materialize() calls exit(3)
 *   hang              materialize() never returns
 *   nullfree          free_state(q, NULL) dereferences NULL
 *   borrow            load() keeps a pointer into the reader's tensor instead of a copy
 *   borroww           quantize() keeps a pointer to the caller's matrix, materialize() reads it
 *   threadcount       quantize()'s scales depend on host->num_threads()
 *   leak              free_state() leaks the codes
 *   prints            materialize() prints to stdout
 *   rowrange          materialize_rows_device() ignores row0 (the CUDA build only)
 *
 * Built with CUDA (-DBROKEN_CUDA), it has the device slots: its device
 * buffers are the dense weights themselves (F32 and BF16, made by the same
 * code as materialize), and materialize_rows_device copies rows of them
 * with cudaMemcpy2DAsync, so it needs no kernel. */
#include <qlora/quantizer.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef BROKEN_CUDA
#include <cuda_runtime.h>
#endif

static const ql_host_api *host;
static char defect[32];

static int is(const char *d) { return !strcmp(defect, d); }

struct ql_quantizer {
    double clip;
};
struct ql_qstate {
    int64_t rows, cols;
    int32_t src_dtype;
    int8_t *codes;
    float *scale;
    int borrowed;     /* "borrow": codes point into a reader's tensor */
    const float *w;   /* "borroww": the caller's matrix */
    float *dense;     /* the device buffers (BROKEN_CUDA) */
    uint16_t *dense_bf16;
};

static int init(const ql_host_api *h)
{
    host = h;
    const char *e = getenv("QLORA_BROKEN");
    snprintf(defect, sizeof defect, "%s", e ? e : "");
    return QL_OK;
}

static int create(const ql_option *o, size_t n, ql_quantizer **out)
{
    *out = NULL;
    double clip = 1.0;
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(o[i].key, "clip")) {
            char *end;
            clip = strtod(o[i].value, &end);
            if (!o[i].value[0] || *end || !(clip > 0 && clip <= 1)) {
                if (is("badmsg")) return host->error(QL_EINVAL, "bad value '%s'", o[i].value);
                return host->error(QL_EINVAL, "broken: clip=%s: must be a number in (0, 1]", o[i].value);
            }
        } else if (!is("unknownkey"))
            return host->error(QL_EINVAL, "broken: unknown option '%s' (it takes clip)", o[i].key);
    }
    ql_quantizer *q = malloc(sizeof *q);
    if (!q) return host->error(QL_ENOMEM, "out of memory");
    q->clip = clip;
    *out = q;
    return QL_OK;
}

static void destroy(ql_quantizer *q) { free(q); }

static int describe(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap, "clip=%.9g", is("describe") ? q->clip / 2 : q->clip);
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "broken: describe buffer too small");
}

static uint64_t state_bytes(int64_t rows, int64_t cols) { return (uint64_t)(rows * cols) + 4u * (uint64_t)rows; }

static double bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols)
{
    (void)q;
    if (is("bits")) return 4.0;
    return 8.0 * (double)state_bytes(rows, cols) / ((double)rows * (double)cols);
}

static ql_qstate *state_new(int64_t rows, int64_t cols)
{
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->rows = rows;
    s->cols = cols;
    s->codes = malloc((size_t)(rows * cols));
    s->scale = malloc((size_t)rows * sizeof *s->scale);
    if (!s->codes || !s->scale) {
        free(s->codes);
        free(s->scale);
        free(s);
        return NULL;
    }
    return s;
}

static void free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    if (is("nullfree")) {
        volatile int64_t *p = s ? &s->rows : NULL;
        *p = 0;
    }
    if (!s) return;
    if (!s->borrowed && !is("leak")) free(s->codes);
    free(s->scale);
    free(s->dense);
    free(s->dense_bf16);
    free(s);
}

static int make_dense(ql_qstate *s);

static int quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    static int calls; /* only "nondeterministic" reads it */
    *out = NULL;
    if (m->rows < 1 || m->cols < 1) return host->error(QL_EINVAL, "broken: %s is empty", m->name);
    int64_t n = m->rows * m->cols;
    if (!is("nan"))
        for (int64_t i = 0; i < n; i++)
            if (!isfinite(w[i]))
                return host->error(QL_ENUMERIC, "broken: %s: %s at index %lld", m->name, isnan(w[i]) ? "NaN" : "Inf",
                                   (long long)i);
    ql_qstate *s = state_new(m->rows, m->cols);
    if (!s) return host->error(QL_ENOMEM, "out of memory");
    s->src_dtype = m->src_dtype;
    if (is("borroww")) s->w = w;
    float drift = is("nondeterministic") ? 1.0f + 1e-3f * (float)(++calls)
                  : is("threadcount")    ? 1.0f + 1e-3f * (float)host->num_threads()
                                         : 1.0f;
    for (int64_t r = 0; r < m->rows; r++) {
        float amax = 0;
        for (int64_t c = 0; c < m->cols; c++) amax = fmaxf(amax, fabsf(w[r * m->cols + c]));
        float scale = amax > 0 ? (float)(amax * q->clip / 127.0) * drift : 1.0f;
        s->scale[r] = scale;
        for (int64_t c = 0; c < m->cols; c++) {
            float v = nearbyintf(w[r * m->cols + c] / scale);
            s->codes[r * m->cols + c] = (int8_t)fminf(fmaxf(v, -127.0f), 127.0f);
        }
    }
    if (make_dense(s)) {
        free_state(q, s);
        return host->error(QL_ENOMEM, "out of memory");
    }
    *out = s;
    return QL_OK;
}

static uint16_t to_bf16(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    if (is("bf16")) return (uint16_t)(b >> 16);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* The dense weights the device slots copy from: the values materialize
 * writes.  QL_OK or QL_ENOMEM. */
static int make_dense(ql_qstate *s)
{
#ifdef BROKEN_CUDA
    size_t n = (size_t)(s->rows * s->cols);
    s->dense = malloc(n * sizeof *s->dense);
    s->dense_bf16 = malloc(n * sizeof *s->dense_bf16);
    if (!s->dense || !s->dense_bf16) return QL_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        s->dense[i] = (float)s->codes[i] * s->scale[i / (size_t)s->cols];
        s->dense_bf16[i] = to_bf16(s->dense[i]);
    }
#else
    (void)s;
#endif
    return QL_OK;
}

static float race_row[1 << 16]; /* only "race" uses it */

static int materialize(const ql_quantizer *q, const ql_qstate *s, int32_t dtype, void *out)
{
    (void)q;
    if (dtype != QL_DTYPE_F32 && dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "broken materializes F32 or BF16, not dtype %d", dtype);
    if (is("crash")) raise(SIGSEGV);
    if (is("exit")) exit(3);
    if (is("hang"))
        for (;;) pause();
    if (s->w) {
        volatile float first = s->w[0];
        (void)first;
    }
    if (is("prints")) printf("broken: materializing %lld x %lld\n", (long long)s->rows, (long long)s->cols);
    int64_t rows = is("lastrow") ? s->rows - 1 : s->rows;
    float *mine = malloc((size_t)s->cols * sizeof *mine);
    if (!mine) return host->error(QL_ENOMEM, "out of memory");
    float *row = is("race") && s->cols <= (int64_t)(sizeof race_row / sizeof race_row[0]) ? race_row : mine;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < s->cols; c++) row[c] = (float)s->codes[r * s->cols + c] * s->scale[r];
        if (row == race_row) usleep(20); /* let another thread overwrite it */
        for (int64_t c = 0; c < s->cols; c++) {
            if (dtype == QL_DTYPE_F32) ((float *)out)[r * s->cols + c] = row[c];
            else ((uint16_t *)out)[r * s->cols + c] = to_bf16(row[c]);
        }
    }
    if (is("overrun")) {
        if (dtype == QL_DTYPE_F32) ((float *)out)[s->rows * s->cols] = 0;
        else ((uint16_t *)out)[s->rows * s->cols] = 0;
    }
    free(mine);
    return QL_OK;
}

static int save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    ql_tensor codes = {.name = "weight", .dtype = QL_DTYPE_I8, .ndim = 2, .shape = {s->rows, s->cols}, .data = s->codes,
                       .nbytes = (uint64_t)(s->rows * s->cols)};
    ql_tensor scale = {.name = "broken.scale", .dtype = QL_DTYPE_F32, .ndim = 1, .shape = {s->rows}, .data = s->scale,
                       .nbytes = 4u * (uint64_t)s->rows};
    int rc = w->put(w->ctx, &scale);
    return rc ? rc : w->put(w->ctx, &codes);
}

static int load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    (void)q;
    *out = NULL;
    const ql_tensor *scale = r->get(r->ctx, "broken.scale"), *codes = r->get(r->ctx, "weight");
    if (!scale) return is("notfound") ? host->error(QL_EFORMAT, "broken: no broken.scale") : QL_ENOTFOUND;
    const char *name = m->name ? m->name : "layer";
    if (!codes || codes->dtype != QL_DTYPE_I8 || codes->ndim != 2 || codes->shape[0] < 1 || codes->shape[1] < 1 ||
        codes->shape[0] > (1 << 20) || codes->shape[1] > (1 << 20))
        return host->error(QL_EFORMAT, "%s.weight: expected an I8 matrix", name);
    int64_t rows = codes->shape[0], cols = codes->shape[1];
    if (!is("truncated") && codes->nbytes != (uint64_t)(rows * cols))
        return host->error(QL_EFORMAT, "%s.weight: %llu bytes for [%lld, %lld]", name, (unsigned long long)codes->nbytes,
                           (long long)rows, (long long)cols);
    if (scale->dtype != QL_DTYPE_F32 || scale->ndim != 1 || scale->shape[0] != rows || scale->nbytes != 4u * (uint64_t)rows)
        return host->error(QL_EFORMAT, "%s.broken.scale: expected F32 [%lld]", name, (long long)rows);
    if (!is("shape") && m->rows && (m->rows != rows || m->cols != cols))
        return host->error(QL_EFORMAT, "%s: [%lld, %lld] where [%lld, %lld] was expected", name, (long long)rows,
                           (long long)cols, (long long)m->rows, (long long)m->cols);
    ql_qstate *s = state_new(rows, cols);
    if (!s) return host->error(QL_ENOMEM, "out of memory");
    s->src_dtype = m->src_dtype;
    if (is("borrow")) {
        free(s->codes);
        s->codes = (int8_t *)codes->data;
        s->borrowed = 1;
    } else memcpy(s->codes, codes->data, (size_t)(rows * cols));
    memcpy(s->scale, scale->data, (size_t)rows * 4);
    for (int64_t i = 0; i < rows; i++)
        if (!isfinite(s->scale[i])) {
            free_state(NULL, s);
            return host->error(QL_EFORMAT, "%s.broken.scale[%lld] is not finite", name, (long long)i);
        }
    if (make_dense(s)) {
        free_state(NULL, s);
        return host->error(QL_ENOMEM, "out of memory");
    }
    *out = s;
    return QL_OK;
}

static int state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info)
{
    (void)q;
    *info = (ql_state_info){.rows = s->rows, .cols = s->cols, .src_dtype = s->src_dtype,
                            .bytes = state_bytes(s->rows, s->cols)};
    return QL_OK;
}

static int checkpoint_config(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap, "{\"quant_method\": \"qlora\", \"quantizer\": \"broken\", \"clip\": %.9g}", q->clip);
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "broken: checkpoint_config buffer too small");
}

#ifdef BROKEN_CUDA
static int device_buffers(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n)
{
    (void)q;
    uint64_t elems = (uint64_t)(s->rows * s->cols);
    bufs[0] = (ql_state_buffer){.name = "dense_f32", .data = s->dense, .bytes = 4 * elems, .align = 16};
    bufs[1] = (ql_state_buffer){.name = "dense_bf16", .data = s->dense_bf16, .bytes = 2 * elems, .align = 16};
    *n = 2;
    return QL_OK;
}

static uint64_t device_workspace(const ql_quantizer *q, const ql_qstate *s, int64_t nrows)
{
    (void)q, (void)s, (void)nrows;
    return 0;
}

static int materialize_rows_device(const ql_quantizer *q, const ql_qstate *s, const void *const *dev_bufs,
                                   const ql_device_out *out, void *workspace, uint64_t workspace_bytes, void *stream)
{
    (void)q, (void)workspace, (void)workspace_bytes;
    if (out->dtype != QL_DTYPE_F32 && out->dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "broken materializes F32 or BF16 on the device, not dtype %d", out->dtype);
    if (out->row0 < 0 || out->nrows < 0 || out->row0 + out->nrows > s->rows || out->ld < s->cols)
        return host->error(QL_EINVAL, "broken: rows %lld..%lld with ld %lld do not fit a [%lld, %lld] matrix",
                           (long long)out->row0, (long long)(out->row0 + out->nrows), (long long)out->ld,
                           (long long)s->rows, (long long)s->cols);
    if (!out->nrows) return QL_OK;
    size_t es = out->dtype == QL_DTYPE_F32 ? 4 : 2;
    int64_t from = is("rowrange") ? 0 : out->row0;
    const char *src = (const char *)dev_bufs[out->dtype == QL_DTYPE_F32 ? 0 : 1] + (size_t)(from * s->cols) * es;
    cudaError_t e = cudaMemcpy2DAsync(out->data, (size_t)out->ld * es, src, (size_t)s->cols * es, (size_t)s->cols * es,
                                      (size_t)out->nrows, cudaMemcpyDeviceToDevice, (cudaStream_t)stream);
    return e == cudaSuccess ? QL_OK : host->error(QL_ECUDA, "broken: cudaMemcpy2DAsync: %s", cudaGetErrorString(e));
}
#endif

static const ql_quantizer_desc descriptor = {
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .name = "broken",
    .description = "int8 a row with one defect chosen by $QLORA_BROKEN (check-plugin's test plugin)",
    .version = "0",
    .init = init,
    .create = create,
    .destroy = destroy,
    .describe = describe,
    .bits_per_param = bits_per_param,
    .quantize = quantize,
    .materialize = materialize,
    .save = save,
    .load = load,
    .free_state = free_state,
    .state_info = state_info,
    .checkpoint_config = checkpoint_config,
#ifdef BROKEN_CUDA
    .device_buffers = device_buffers,
    .device_workspace = device_workspace,
    .materialize_rows_device = materialize_rows_device,
#endif
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }
