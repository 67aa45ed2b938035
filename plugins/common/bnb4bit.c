/* NF4 and FP4 blockwise quantizers in bitsandbytes' storage format, with
 * optional double quantization of the absmax statistics.  Compiled into both
 * the nf4 and fp4 plugins; each defines qlp_4bit_plugin_type. */
#include <qlora/quantizer.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnb.h"
#include "fastmath.h"
#include "bnb4bit.h"
#ifdef QLP_HAVE_CUDA
#include "bnb4bit_cuda.h"
#endif
#include "torch_mean.h"

enum { NESTED_BLOCKSIZE = 256 };

static const ql_host_api *host;

struct ql_quantizer {
    qlp_4bit_type type;
    int blocksize;
    int double_quant;
};

struct ql_qstate {
    qlp_4bit_type type;
    int64_t rows, cols, n;
    int32_t src_dtype;
    int blocksize;
    int double_quant;
    int64_t nblocks;
    uint8_t *packed; /* (n+1)/2 */
    /* without double quant */
    float *absmax; /* nblocks */
    /* with double quant */
    uint8_t *absmax_codes; /* nblocks */
    float *nested_absmax;  /* nnested */
    int64_t nnested;
    float offset;
};

static const char *type_name(qlp_4bit_type t) { return t == QLP_NF4 ? "nf4" : "fp4"; }

int qlp_4bit_init(const ql_host_api *h)
{
    host = h;
    return QL_OK;
}

static int parse_int(const char *s, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end) return -1;
    *out = v;
    return 0;
}

int qlp_4bit_create(qlp_4bit_type type, const ql_option *opts, size_t n, ql_quantizer **out)
{
    ql_quantizer q = {.type = type, .blocksize = 64, .double_quant = 1};
    for (size_t i = 0; i < n; i++) {
        long v;
        if (strcmp(opts[i].key, "blocksize") == 0) {
            if (parse_int(opts[i].value, &v) || v < 32 || v > 4096 || (v & (v - 1)))
                return host->error(QL_EINVAL, "option blocksize=%s: must be a power of two from 32 to 4096",
                                   opts[i].value);
            q.blocksize = (int)v;
        } else if (strcmp(opts[i].key, "double_quant") == 0) {
            if (parse_int(opts[i].value, &v) || (v != 0 && v != 1))
                return host->error(QL_EINVAL, "option double_quant=%s: must be 0 or 1", opts[i].value);
            q.double_quant = (int)v;
        } else {
            return host->error(QL_EINVAL, "unknown option '%s' (%s takes blocksize, double_quant)", opts[i].key,
                               type_name(type));
        }
    }
    ql_quantizer *p = malloc(sizeof *p);
    if (!p) return host->error(QL_ENOMEM, "out of memory");
    *p = q;
    *out = p;
    return QL_OK;
}

void qlp_4bit_destroy(ql_quantizer *q) { free(q); }

int qlp_4bit_describe(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap, "blocksize=%d,double_quant=%d", q->blocksize, q->double_quant);
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "describe: buffer of %zu bytes is too small", cap);
}

static void state_free(ql_qstate *s)
{
    if (!s) return;
    free(s->packed);
    free(s->absmax);
    free(s->absmax_codes);
    free(s->nested_absmax);
    free(s);
}

void qlp_4bit_free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    state_free(s);
}

static ql_qstate *state_alloc(qlp_4bit_type type, int64_t rows, int64_t cols, int blocksize, int double_quant)
{
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->type = type;
    s->rows = rows;
    s->cols = cols;
    s->n = rows * cols;
    s->blocksize = blocksize;
    s->double_quant = double_quant;
    s->nblocks = (s->n + blocksize - 1) / blocksize;
    s->nnested = (s->nblocks + NESTED_BLOCKSIZE - 1) / NESTED_BLOCKSIZE;
    s->packed = malloc((size_t)((s->n + 1) / 2) + 1);
    if (double_quant) {
        s->absmax_codes = malloc((size_t)s->nblocks + 1);
        s->nested_absmax = malloc((size_t)s->nnested * sizeof(float) + 4);
        if (!s->absmax_codes || !s->nested_absmax) goto fail;
    } else {
        s->absmax = malloc((size_t)s->nblocks * sizeof(float) + 4);
        if (!s->absmax) goto fail;
    }
    if (!s->packed) goto fail;
    return s;
fail:
    state_free(s);
    return NULL;
}

static int refuse_empty(const ql_matrix_desc *m)
{
    return host->error(QL_EINVAL, "%s: cannot quantize an empty matrix [%lld, %lld]", m->name, (long long)m->rows,
                       (long long)m->cols);
}

static int refuse_nonfinite(const ql_matrix_desc *m, int64_t i, float v)
{
    return host->error(QL_ENUMERIC, "%s: %s at index %lld (row %lld, column %lld)", m->name, isnan(v) ? "NaN" : "Inf",
                       (long long)i, (long long)(i / m->cols), (long long)(i % m->cols));
}

int qlp_4bit_quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    if (m->rows <= 0 || m->cols <= 0) return refuse_empty(m);
    int64_t n = m->rows * m->cols;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(w[i])) return refuse_nonfinite(m, i, w[i]);
    ql_qstate *s = state_alloc(q->type, m->rows, m->cols, q->blocksize, q->double_quant);
    if (!s) return host->error(QL_ENOMEM, "%s: out of memory", m->name);
    s->src_dtype = m->src_dtype;
    float *absmax = s->double_quant ? malloc((size_t)s->nblocks * sizeof(float)) : s->absmax;
    if (!absmax) {
        state_free(s);
        return host->error(QL_ENOMEM, "%s: out of memory", m->name);
    }
    qlp_quantize_4bit_blocks(q->type, w, n, q->blocksize, s->packed, absmax);
    if (s->double_quant) {
        /* The absmax statistics are centred on their mean and quantized
         * again with the 8-bit dynamic map in blocks of 256. */
        s->offset = qlp_torch_cuda_mean_f32(absmax, s->nblocks);
        for (int64_t b = 0; b < s->nblocks; b++) absmax[b] = absmax[b] - s->offset;
        float map[256];
        qlp_dynamic_map_signed(map);
        qlp_quantize_8bit_blocks(map, absmax, s->nblocks, NESTED_BLOCKSIZE, s->absmax_codes, s->nested_absmax);
        free(absmax);
    }
    *out = s;
    return QL_OK;
}

/* The same steps on the GPU (bnb4bit_quantize.cu), straight into a host
 * state. */
int qlp_4bit_quantize_device(const ql_quantizer *q, const ql_matrix_desc *m, const void *dev_w, int32_t w_dtype,
                             void *stream, ql_qstate **out)
{
    *out = NULL;
    if (m->rows <= 0 || m->cols <= 0) return refuse_empty(m);
    if (w_dtype != QL_DTYPE_F32 && w_dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "%s: %s quantizes float32 or bfloat16 device weights, not dtype %d", m->name,
                           type_name(q->type), w_dtype);
#ifdef QLP_HAVE_CUDA
    ql_qstate *s = state_alloc(q->type, m->rows, m->cols, q->blocksize, q->double_quant);
    if (!s) return host->error(QL_ENOMEM, "%s: out of memory", m->name);
    s->src_dtype = m->src_dtype;
    qlp_4bit_cuda_quant_args a = {.type = q->type,
                                  .blocksize = q->blocksize,
                                  .double_quant = q->double_quant,
                                  .nested_blocksize = NESTED_BLOCKSIZE,
                                  .n = s->n,
                                  .w = dev_w,
                                  .bf16 = w_dtype == QL_DTYPE_BF16,
                                  .packed = s->packed,
                                  .absmax = s->absmax,
                                  .absmax_codes = s->absmax_codes,
                                  .nested = s->nested_absmax,
                                  .offset = &s->offset,
                                  .stream = stream};
    if (s->double_quant) qlp_dynamic_map_signed(a.map);
    int64_t bad = -1;
    float bad_value = 0.0f;
    char err[512];
    int rc = qlp_4bit_cuda_quantize(&a, &bad, &bad_value, err, sizeof err);
    if (rc) {
        state_free(s);
        return host->error(rc > 0 ? QL_ENOTSUP : QL_ECUDA, "%s: %s quantize on the GPU: %s", m->name,
                           type_name(q->type), err);
    }
    if (bad >= 0) {
        state_free(s);
        return refuse_nonfinite(m, bad, bad_value);
    }
    *out = s;
    return QL_OK;
#else
    (void)dev_w;
    (void)stream;
    return host->error(QL_ENOTSUP, "this %s plugin was built without CUDA", type_name(q->type));
#endif
}

/* absmax per block as the reference dequantizes it */
static void block_scales(const ql_qstate *s, float *scale)
{
    if (!s->double_quant) {
        memcpy(scale, s->absmax, (size_t)s->nblocks * sizeof(float));
        return;
    }
    float map[256];
    qlp_dynamic_map_signed(map);
    for (int64_t b = 0; b < s->nblocks; b++)
        scale[b] = map[s->absmax_codes[b]] * s->nested_absmax[b / NESTED_BLOCKSIZE] + s->offset;
}

int qlp_4bit_materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out)
{
    (void)q;
    if (out_dtype != QL_DTYPE_F32 && out_dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "%s materializes float32 or bfloat16, not dtype %d", type_name(s->type),
                           out_dtype);
    float *scale = malloc((size_t)s->nblocks * sizeof(float));
    if (!scale) return host->error(QL_ENOMEM, "out of memory");
    block_scales(s, scale);
    float table[16];
    qlp_4bit_table(s->type, table);
    if (s->type == QLP_FP4) table[8] = -0.0f; /* the reference kernel decodes code 8 as -0.0 */
    const int64_t n = s->n;
    const int bs = s->blocksize;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < s->nblocks; b++) {
        int64_t end = (b + 1) * bs < n ? (b + 1) * bs : n;
        for (int64_t i = b * bs; i < end; i++) {
            uint8_t byte = s->packed[i / 2];
            unsigned code = (i & 1) ? (byte & 0xfu) : (byte >> 4);
            float v = table[code] * scale[b];
            if (out_dtype == QL_DTYPE_F32) ((float *)out)[i] = v;
            else ((uint16_t *)out)[i] = qlp_f32_to_bf16(v);
        }
    }
    free(scale);
    return QL_OK;
}

static int put(const ql_tensor_writer *w, const char *name, int32_t dtype, int ndim, int64_t d0, int64_t d1,
               const void *data, uint64_t nbytes)
{
    ql_tensor t = {.name = name, .dtype = dtype, .ndim = ndim, .data = data, .nbytes = nbytes};
    t.shape[0] = d0;
    t.shape[1] = d1;
    return w->put(w->ctx, &t);
}

static const char *dtype_torch(int32_t d)
{
    switch (d) {
    case QL_DTYPE_F16: return "float16";
    case QL_DTYPE_BF16: return "bfloat16";
    default: return "float32";
    }
}

/* The quant_state JSON, byte for byte as Python's json.dumps writes bitsandbytes' dict. */
static int state_json(const ql_qstate *s, char *buf, size_t cap)
{
    int k;
    if (s->double_quant) {
        char off[64];
        qlp_format_pyfloat((double)s->offset, off, sizeof off);
        k = snprintf(buf, cap,
                     "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"%s\", \"shape\": [%lld, %lld], "
                     "\"nested_blocksize\": %d, \"nested_dtype\": \"float32\", \"nested_offset\": %s}",
                     type_name(s->type), s->blocksize, dtype_torch(s->src_dtype), (long long)s->rows,
                     (long long)s->cols, NESTED_BLOCKSIZE, off);
    } else {
        k = snprintf(buf, cap, "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"%s\", \"shape\": [%lld, %lld]}",
                     type_name(s->type), s->blocksize, dtype_torch(s->src_dtype), (long long)s->rows,
                     (long long)s->cols);
    }
    return k > 0 && (size_t)k < cap ? k : -1;
}

int qlp_4bit_save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    float table[16];
    qlp_4bit_table(s->type, table);
    int rc = put(w, "weight", QL_DTYPE_U8, 2, (s->n + 1) / 2, 1, s->packed, (uint64_t)((s->n + 1) / 2));
    if (!rc && !s->double_quant)
        rc = put(w, "weight.absmax", QL_DTYPE_F32, 1, s->nblocks, 0, s->absmax, (uint64_t)s->nblocks * 4);
    if (!rc && s->double_quant)
        rc = put(w, "weight.absmax", QL_DTYPE_U8, 1, s->nblocks, 0, s->absmax_codes, (uint64_t)s->nblocks);
    if (!rc) rc = put(w, "weight.quant_map", QL_DTYPE_F32, 1, 16, 0, table, sizeof table);
    if (!rc && s->double_quant) {
        float map[256];
        qlp_dynamic_map_signed(map);
        rc = put(w, "weight.nested_absmax", QL_DTYPE_F32, 1, s->nnested, 0, s->nested_absmax, (uint64_t)s->nnested * 4);
        if (!rc) rc = put(w, "weight.nested_quant_map", QL_DTYPE_F32, 1, 256, 0, map, sizeof map);
    }
    if (!rc) {
        char json[512], key[64];
        int len = state_json(s, json, sizeof json);
        if (len < 0) return host->error(QL_EINTERNAL, "quant_state JSON too long");
        snprintf(key, sizeof key, "weight.quant_state.bitsandbytes__%s", type_name(s->type));
        rc = put(w, key, QL_DTYPE_U8, 1, len, 0, json, (uint64_t)len);
    }
    return rc;
}

static const ql_tensor *need(const ql_tensor_reader *r, const char *prefix, const char *suffix, int32_t dtype,
                             int64_t numel, int *rc)
{
    if (*rc) return NULL;
    const ql_tensor *t = r->get(r->ctx, suffix);
    if (!t) {
        *rc = host->error(QL_EFORMAT, "%s.%s is missing", prefix, suffix);
        return NULL;
    }
    int64_t have = 1;
    for (int i = 0; i < t->ndim; i++) have *= t->shape[i];
    /* nbytes bounds what may be read, whatever the shape says */
    const uint64_t elem = dtype == QL_DTYPE_F32 ? 4 : 1;
    if (t->dtype != dtype || have != numel || t->nbytes != (uint64_t)numel * elem) {
        *rc = host->error(QL_EFORMAT, "%s.%s: expected %lld elements of dtype %d, found %lld of dtype %d", prefix,
                          suffix, (long long)numel, dtype, (long long)have, t->dtype);
        return NULL;
    }
    return t;
}

int qlp_4bit_load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    char key[64];
    snprintf(key, sizeof key, "weight.quant_state.bitsandbytes__%s", type_name(q->type));
    const ql_tensor *js = r->get(r->ctx, key);
    if (!js) return QL_ENOTFOUND;
    const char *json = js->data;
    size_t len = (size_t)js->nbytes;
    const char *name = m && m->name ? m->name : "layer";
    char qt[16], dt[16];
    double blocksize;
    int64_t shape[QL_MAX_DIMS];
    size_t ndim = 0;
    if (js->dtype != QL_DTYPE_U8 || host->json_string(json, len, "quant_type", qt, sizeof qt) ||
        host->json_number(json, len, "blocksize", &blocksize) || host->json_string(json, len, "dtype", dt, sizeof dt) ||
        host->json_int_array(json, len, "shape", shape, QL_MAX_DIMS, &ndim))
        return host->error(QL_EFORMAT, "%s.%s: quant_state JSON lacks quant_type, blocksize, dtype or shape", name, key);
    if (strcmp(qt, type_name(q->type)) != 0)
        return host->error(QL_EFORMAT, "%s: quant_type is '%s' under a %s key", name, qt, type_name(q->type));
    int bs = (int)blocksize;
    if ((double)bs != blocksize || bs < 32 || bs > 4096 || (bs & (bs - 1)))
        return host->error(QL_EFORMAT, "%s: bad blocksize %g", name, blocksize);
    if (ndim < 1 || ndim > 2) return host->error(QL_EFORMAT, "%s: quant_state shape must have 1 or 2 dimensions", name);
    int64_t rows = ndim == 2 ? shape[0] : 1, cols = ndim == 2 ? shape[1] : shape[0];
    if (rows <= 0 || cols <= 0 || rows > (INT64_C(1) << 40) / cols)
        return host->error(QL_EFORMAT, "%s: bad shape in quant_state", name);
    if (m && m->rows > 0 && (m->rows != rows || m->cols != cols))
        return host->error(QL_EFORMAT, "%s: quant_state shape [%lld, %lld] but expected [%lld, %lld]", name,
                           (long long)rows, (long long)cols, (long long)m->rows, (long long)m->cols);
    double offset = 0.0;
    int dq = host->json_number(json, len, "nested_offset", &offset) == QL_OK;
    ql_qstate *s = state_alloc(q->type, rows, cols, bs, dq);
    if (!s) return host->error(QL_ENOMEM, "out of memory");
    s->src_dtype = strcmp(dt, "float16") == 0 ? QL_DTYPE_F16 : strcmp(dt, "bfloat16") == 0 ? QL_DTYPE_BF16 : QL_DTYPE_F32;
    s->offset = (float)offset;
    int rc = QL_OK;
    const ql_tensor *tw = need(r, name, "weight", QL_DTYPE_U8, (s->n + 1) / 2, &rc);
    const ql_tensor *ta = need(r, name, "weight.absmax", dq ? QL_DTYPE_U8 : QL_DTYPE_F32, s->nblocks, &rc);
    const ql_tensor *tn = dq ? need(r, name, "weight.nested_absmax", QL_DTYPE_F32, s->nnested, &rc) : NULL;
    const ql_tensor *tm = need(r, name, "weight.quant_map", QL_DTYPE_F32, 16, &rc);
    const ql_tensor *tnm = dq ? need(r, name, "weight.nested_quant_map", QL_DTYPE_F32, 256, &rc) : NULL;
    if (rc == QL_OK) {
        float table[16];
        qlp_4bit_table(q->type, table);
        if (memcmp(tm->data, table, sizeof table) != 0)
            rc = host->error(QL_EFORMAT, "%s.weight.quant_map is not the %s table", name, type_name(q->type));
    }
    if (rc == QL_OK && dq) {
        float map[256];
        qlp_dynamic_map_signed(map);
        if (memcmp(tnm->data, map, sizeof map) != 0)
            rc = host->error(QL_EFORMAT, "%s.weight.nested_quant_map is not the signed dynamic map", name);
    }
    if (rc) {
        state_free(s);
        return rc;
    }
    memcpy(s->packed, tw->data, (size_t)tw->nbytes);
    if (dq) {
        memcpy(s->absmax_codes, ta->data, (size_t)ta->nbytes);
        memcpy(s->nested_absmax, tn->data, (size_t)tn->nbytes);
    } else {
        memcpy(s->absmax, ta->data, (size_t)ta->nbytes);
    }
    *out = s;
    return QL_OK;
}

/* Every byte save() writes for s: codes, absmax (or their codes and the
 * nested absmax), the code tables and the quant_state JSON. */
static uint64_t stored_bytes(const ql_qstate *s)
{
    char json[512];
    int len = state_json(s, json, sizeof json);
    uint64_t bytes = (uint64_t)((s->n + 1) / 2) + 16 * 4 + (uint64_t)(len > 0 ? len : 0);
    if (s->double_quant) bytes += (uint64_t)s->nblocks + (uint64_t)s->nnested * 4 + 256 * 4;
    else bytes += (uint64_t)s->nblocks * 4;
    return bytes;
}

int qlp_4bit_state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info)
{
    (void)q;
    info->rows = s->rows;
    info->cols = s->cols;
    info->src_dtype = s->src_dtype;
    info->bytes = stored_bytes(s);
    return QL_OK;
}

/* What state_info() will say for a float32 matrix of this shape, over its
 * parameters.  Only the quant_state JSON depends on the weights: it holds
 * the nested offset as Python writes a float, 18 to 22 characters; counted
 * here as 0.05 (19), so a real layer may differ by a few bytes. */
double qlp_4bit_bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols)
{
    if (rows <= 0 || cols <= 0) return 0.0;
    ql_qstate s = {.type = q->type, .rows = rows, .cols = cols, .n = rows * cols, .src_dtype = QL_DTYPE_F32,
                   .blocksize = q->blocksize, .double_quant = q->double_quant, .offset = 0.05f};
    s.nblocks = (s.n + q->blocksize - 1) / q->blocksize;
    s.nnested = q->double_quant ? (s.nblocks + NESTED_BLOCKSIZE - 1) / NESTED_BLOCKSIZE : 0;
    return 8.0 * (double)stored_bytes(&s) / (double)s.n;
}

int qlp_4bit_checkpoint_config(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap,
                     "{\"quant_method\": \"bitsandbytes\", \"_load_in_4bit\": true, \"_load_in_8bit\": false, "
                     "\"bnb_4bit_compute_dtype\": \"float32\", \"bnb_4bit_quant_storage\": \"uint8\", "
                     "\"bnb_4bit_quant_type\": \"%s\", \"bnb_4bit_use_double_quant\": %s, "
                     "\"llm_int8_enable_fp32_cpu_offload\": false, \"llm_int8_has_fp16_weight\": false, "
                     "\"llm_int8_skip_modules\": null, \"llm_int8_threshold\": 6.0, \"load_in_4bit\": true, "
                     "\"load_in_8bit\": false}",
                     type_name(q->type), q->double_quant ? "true" : "false");
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "buffer too small");
}

/* ---- device (ABI 1.1) ---- */

int qlp_4bit_device_buffers(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n)
{
    (void)q;
    bufs[0] = (ql_state_buffer){.name = "packed", .data = s->packed, .bytes = (uint64_t)(s->n + 1) / 2, .align = 16};
    if (!s->double_quant) {
        bufs[1] = (ql_state_buffer){.name = "absmax", .data = s->absmax, .bytes = (uint64_t)s->nblocks * 4, .align = 16};
        *n = 2;
    } else {
        bufs[1] = (ql_state_buffer){.name = "absmax_codes", .data = s->absmax_codes, .bytes = (uint64_t)s->nblocks,
                                    .align = 16};
        bufs[2] = (ql_state_buffer){.name = "nested_absmax", .data = s->nested_absmax,
                                    .bytes = (uint64_t)s->nnested * 4, .align = 16};
        *n = 3;
    }
    return QL_OK;
}

uint64_t qlp_4bit_device_workspace(const ql_quantizer *q, const ql_qstate *s, int64_t nrows)
{
    (void)q;
    (void)s;
    (void)nrows;
    return 0;
}

int qlp_4bit_materialize_rows_device(const ql_quantizer *q, const ql_qstate *s, const void *const *dev_bufs,
                                     const ql_device_out *out, void *workspace, uint64_t workspace_bytes, void *stream)
{
    (void)q;
    (void)workspace;
    (void)workspace_bytes;
    if (out->dtype != QL_DTYPE_F32 && out->dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "%s materializes float32 or bfloat16, not dtype %d", type_name(s->type),
                           out->dtype);
    if (out->row0 < 0 || out->nrows < 0 || out->row0 + out->nrows > s->rows || out->ld < s->cols)
        return host->error(QL_EINVAL, "%s: rows %lld..%lld with ld %lld do not fit a [%lld, %lld] matrix",
                           type_name(s->type), (long long)out->row0, (long long)(out->row0 + out->nrows),
                           (long long)out->ld, (long long)s->rows, (long long)s->cols);
#ifdef QLP_HAVE_CUDA
    qlp_4bit_cuda_args a = {.packed = dev_bufs[0],
                            .absmax = s->double_quant ? NULL : dev_bufs[1],
                            .absmax_codes = s->double_quant ? dev_bufs[1] : NULL,
                            .nested = s->double_quant ? dev_bufs[2] : NULL,
                            .offset = s->offset,
                            .blocksize = s->blocksize,
                            .double_quant = s->double_quant,
                            .bf16 = out->dtype == QL_DTYPE_BF16,
                            .cols = s->cols,
                            .out = out->data,
                            .ld = out->ld,
                            .row0 = out->row0,
                            .nrows = out->nrows,
                            .stream = stream};
    qlp_4bit_table(s->type, a.table);
    if (s->type == QLP_FP4) a.table[8] = -0.0f; /* as qlp_4bit_materialize */
    if (s->double_quant) qlp_dynamic_map_signed(a.map);
    char err[256];
    if (qlp_4bit_cuda_materialize(&a, err, sizeof err))
        return host->error(QL_ECUDA, "%s materialize on the GPU: %s", type_name(s->type), err);
    return QL_OK;
#else
    (void)dev_bufs;
    (void)stream;
    return host->error(QL_ENOTSUP, "this %s plugin was built without CUDA", type_name(s->type));
#endif
}
