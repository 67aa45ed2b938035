/* The int8 quantizer plugin: row-wise absmax int8 in LLM.int8()'s storage
 * format (bitsandbytes Int8Params / Linear8bitLt), bit-exact with its CUDA
 * kernel, which quantizes the weight after casting it to float16. */
#include <qlora/quantizer.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"
#include "int8_ops.h"
#ifdef QLP_HAVE_CUDA
#include "int8_cuda.h"
#endif

static const ql_host_api *host;

struct ql_quantizer {
    int unused;
};

struct ql_qstate {
    int64_t rows, cols;
    int32_t src_dtype;
    int8_t *codes; /* [rows, cols] */
    float *scb;    /* [rows], the float16 row absmax widened to float32 */
};

static int init(const ql_host_api *h)
{
    host = h;
    return QL_OK;
}

static int create(const ql_option *opts, size_t n, ql_quantizer **out)
{
    if (n > 0) return host->error(QL_EINVAL, "unknown option '%s' (int8 takes no options)", opts[0].key);
    ql_quantizer *q = calloc(1, sizeof *q);
    if (!q) return host->error(QL_ENOMEM, "out of memory");
    *out = q;
    return QL_OK;
}

static void destroy(ql_quantizer *q) { free(q); }

static int describe(const ql_quantizer *q, char *buf, size_t cap)
{
    (void)q;
    if (cap) buf[0] = '\0';
    return QL_OK;
}

static double bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols)
{
    (void)q;
    if (rows <= 0 || cols <= 0) return 0.0;
    return (8.0 * (double)(rows * cols) + 32.0 * (double)rows + 8.0) / (double)(rows * cols);
}

static void state_free(ql_qstate *s)
{
    if (!s) return;
    free(s->codes);
    free(s->scb);
    free(s);
}

static void free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    state_free(s);
}

static ql_qstate *state_alloc(int64_t rows, int64_t cols)
{
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->rows = rows;
    s->cols = cols;
    s->codes = malloc((size_t)(rows * cols));
    s->scb = malloc((size_t)rows * sizeof(float));
    if (!s->codes || !s->scb) {
        state_free(s);
        return NULL;
    }
    return s;
}

/* Why weight i (value v) cannot be quantized, or QL_OK. */
static int check_weight(const ql_matrix_desc *m, int64_t i, float v)
{
    if (!isfinite(v))
        return host->error(QL_ENUMERIC, "%s: %s at index %lld (row %lld, column %lld)", m->name, isnan(v) ? "NaN" : "Inf",
                           (long long)i, (long long)(i / m->cols), (long long)(i % m->cols));
    if (isinf(qlp_round_to_half(v)))
        return host->error(QL_ENUMERIC,
                           "%s: %g at index %lld is outside float16's range; int8 (LLM.int8) quantizes "
                           "through float16",
                           m->name, (double)v, (long long)i);
    return QL_OK;
}

static int quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    (void)q;
    if (m->rows <= 0 || m->cols <= 0)
        return host->error(QL_EINVAL, "%s: cannot quantize an empty matrix", m->name);
    int64_t n = m->rows * m->cols;
    for (int64_t i = 0; i < n; i++) {
        int rc = check_weight(m, i, w[i]);
        if (rc) return rc;
    }
    ql_qstate *s = state_alloc(m->rows, m->cols);
    if (!s) return host->error(QL_ENOMEM, "%s: out of memory", m->name);
    s->src_dtype = m->src_dtype;
    const int64_t cols = m->cols;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m->rows; r++) {
        const float *row = w + r * cols;
        float absmax = 0.0f;
        for (int64_t c = 0; c < cols; c++) absmax = qlp_int8_absmax_step(absmax, row[c]);
        s->scb[r] = absmax;
        float scale = qlp_int8_scale(absmax);
        for (int64_t c = 0; c < cols; c++) s->codes[r * cols + c] = qlp_int8_code(row[c], scale);
    }
    *out = s;
    return QL_OK;
}

/* The same steps on the GPU (int8_quantize.cu), straight into a host state. */
#ifdef QLP_HAVE_CUDA
static int quantize_device(const ql_quantizer *q, const ql_matrix_desc *m, const void *dev_w, int32_t w_dtype,
                           void *stream, ql_qstate **out)
{
    (void)q;
    *out = NULL;
    if (m->rows <= 0 || m->cols <= 0)
        return host->error(QL_EINVAL, "%s: cannot quantize an empty matrix", m->name);
    if (w_dtype != QL_DTYPE_F32 && w_dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "%s: int8 quantizes float32 or bfloat16 device weights, not dtype %d", m->name,
                           w_dtype);
    ql_qstate *s = state_alloc(m->rows, m->cols);
    if (!s) return host->error(QL_ENOMEM, "%s: out of memory", m->name);
    s->src_dtype = m->src_dtype;
    int64_t bad = -1;
    float bad_value = 0.0f;
    char err[512];
    int rc = qlp_int8_cuda_quantize(dev_w, w_dtype == QL_DTYPE_BF16, m->rows, m->cols, s->codes, s->scb, stream, &bad,
                                    &bad_value, err, sizeof err);
    if (rc) {
        state_free(s);
        return host->error(rc > 0 ? QL_ENOTSUP : QL_ECUDA, "%s: int8 quantize on the GPU: %s", m->name, err);
    }
    if (bad >= 0) {
        state_free(s);
        rc = check_weight(m, bad, bad_value);
        return rc ? rc : host->error(QL_EINTERNAL, "%s: the GPU flagged weight %lld, which is fine", m->name, (long long)bad);
    }
    *out = s;
    return QL_OK;
}
#endif

static int materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out)
{
    (void)q;
    if (out_dtype != QL_DTYPE_F32 && out_dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "int8 materializes float32 or bfloat16, not dtype %d", out_dtype);
    const int64_t cols = s->cols;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < s->rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            /* CB * SCB * (1/127), in that order, as bitsandbytes dequantizes */
            float v = (float)s->codes[r * cols + c] * s->scb[r] * 7.874015718698502e-3f;
            if (out_dtype == QL_DTYPE_F32) ((float *)out)[r * cols + c] = v;
            else ((uint16_t *)out)[r * cols + c] = qlp_f32_to_bf16(v);
        }
    }
    return QL_OK;
}

static int save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    ql_tensor t = {.name = "weight", .dtype = QL_DTYPE_I8, .ndim = 2, .data = s->codes,
                   .nbytes = (uint64_t)(s->rows * s->cols)};
    t.shape[0] = s->rows;
    t.shape[1] = s->cols;
    int rc = w->put(w->ctx, &t);
    if (rc) return rc;
    ql_tensor scb = {.name = "SCB", .dtype = QL_DTYPE_F32, .ndim = 1, .data = s->scb, .nbytes = (uint64_t)s->rows * 4};
    scb.shape[0] = s->rows;
    if ((rc = w->put(w->ctx, &scb))) return rc;
    static const uint8_t row_major = 0;
    ql_tensor fmt = {.name = "weight_format", .dtype = QL_DTYPE_U8, .ndim = 0, .data = &row_major, .nbytes = 1};
    return w->put(w->ctx, &fmt);
}

static int load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    (void)q;
    const ql_tensor *scb = r->get(r->ctx, "SCB");
    const ql_tensor *wt = r->get(r->ctx, "weight");
    if (!scb || !wt || wt->dtype != QL_DTYPE_I8) return QL_ENOTFOUND;
    const char *name = m && m->name ? m->name : "layer";
    if (wt->ndim != 2 || wt->shape[0] <= 0 || wt->shape[1] <= 0)
        return host->error(QL_EFORMAT, "%s.weight: int8 weight must be a non-empty matrix", name);
    int64_t rows = wt->shape[0], cols = wt->shape[1];
    if (wt->nbytes != (uint64_t)(rows * cols))
        return host->error(QL_EFORMAT, "%s.weight: %llu bytes for an I8 [%lld, %lld] tensor", name,
                           (unsigned long long)wt->nbytes, (long long)rows, (long long)cols);
    if (scb->dtype != QL_DTYPE_F32 || scb->ndim != 1 || scb->shape[0] != rows || scb->nbytes != (uint64_t)rows * 4)
        return host->error(QL_EFORMAT, "%s.SCB: expected F32 [%lld]", name, (long long)rows);
    if (m && m->rows > 0 && (m->rows != rows || m->cols != cols))
        return host->error(QL_EFORMAT, "%s: int8 weight is [%lld, %lld] but expected [%lld, %lld]", name,
                           (long long)rows, (long long)cols, (long long)m->rows, (long long)m->cols);
    const ql_tensor *fmt = r->get(r->ctx, "weight_format");
    if (fmt && (fmt->dtype != QL_DTYPE_U8 || fmt->nbytes != 1 || *(const uint8_t *)fmt->data != 0))
        return host->error(QL_EFORMAT, "%s.weight_format: only row-major (0) is supported", name);
    ql_qstate *s = state_alloc(rows, cols);
    if (!s) return host->error(QL_ENOMEM, "out of memory");
    s->src_dtype = QL_DTYPE_F16;
    memcpy(s->codes, wt->data, (size_t)(rows * cols));
    memcpy(s->scb, scb->data, (size_t)rows * 4);
    *out = s;
    return QL_OK;
}

static int state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info)
{
    (void)q;
    info->rows = s->rows;
    info->cols = s->cols;
    info->src_dtype = s->src_dtype;
    info->bytes = (uint64_t)(s->rows * s->cols) + (uint64_t)s->rows * 4 + 1;
    return QL_OK;
}

static int checkpoint_config(const ql_quantizer *q, char *buf, size_t cap)
{
    (void)q;
    int k = snprintf(buf, cap,
                     "{\"quant_method\": \"bitsandbytes\", \"_load_in_4bit\": false, \"_load_in_8bit\": true, "
                     "\"bnb_4bit_compute_dtype\": \"float32\", \"bnb_4bit_quant_storage\": \"uint8\", "
                     "\"bnb_4bit_quant_type\": \"fp4\", \"bnb_4bit_use_double_quant\": false, "
                     "\"llm_int8_enable_fp32_cpu_offload\": false, \"llm_int8_has_fp16_weight\": false, "
                     "\"llm_int8_skip_modules\": null, \"llm_int8_threshold\": 6.0, \"load_in_4bit\": false, "
                     "\"load_in_8bit\": true}");
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "buffer too small");
}

/* ---- device (ABI 1.1; only in a plugin built with CUDA) ---- */
#ifdef QLP_HAVE_CUDA

static int device_buffers(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n)
{
    (void)q;
    bufs[0] = (ql_state_buffer){.name = "codes", .data = s->codes, .bytes = (uint64_t)(s->rows * s->cols), .align = 16};
    bufs[1] = (ql_state_buffer){.name = "SCB", .data = s->scb, .bytes = (uint64_t)s->rows * 4, .align = 16};
    *n = 2;
    return QL_OK;
}

static uint64_t device_workspace(const ql_quantizer *q, const ql_qstate *s, int64_t nrows)
{
    (void)q;
    (void)s;
    (void)nrows;
    return 0;
}

static int materialize_rows_device(const ql_quantizer *q, const ql_qstate *s, const void *const *dev_bufs,
                                   const ql_device_out *out, void *workspace, uint64_t workspace_bytes, void *stream)
{
    (void)q;
    (void)workspace;
    (void)workspace_bytes;
    if (out->dtype != QL_DTYPE_F32 && out->dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "int8 materializes float32 or bfloat16, not dtype %d", out->dtype);
    if (out->row0 < 0 || out->nrows < 0 || out->row0 + out->nrows > s->rows || out->ld < s->cols)
        return host->error(QL_EINVAL, "int8: rows %lld..%lld with ld %lld do not fit a [%lld, %lld] matrix",
                           (long long)out->row0, (long long)(out->row0 + out->nrows), (long long)out->ld,
                           (long long)s->rows, (long long)s->cols);
    char err[256];
    if (qlp_int8_cuda_materialize(dev_bufs[0], dev_bufs[1], s->cols, out->dtype == QL_DTYPE_BF16, out->data, out->ld,
                                  out->row0, out->nrows, stream, err, sizeof err))
        return host->error(QL_ECUDA, "int8 materialize on the GPU: %s", err);
    return QL_OK;
}
#endif

static const ql_quantizer_desc descriptor = {
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .name = "int8",
    .description = "Row-wise absmax int8 (LLM.int8 storage); bitsandbytes format",
    .version = "1.0.0",
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
#ifdef QLP_HAVE_CUDA
    .device_buffers = device_buffers,
    .device_workspace = device_workspace,
    .materialize_rows_device = materialize_rows_device,
    .quantize_device = quantize_device,
#endif
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }
