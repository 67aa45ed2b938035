/* A plugin with one deliberate defect per build (-DBAD_<KIND>), for the
 * loader's refusal paths, plus BAD_FAILQUANT: valid, but its third quantize
 * call fails, to check that an interrupted run leaves nothing behind. */
#include <qlora/quantizer.h>

#include <stdlib.h>
#include <string.h>

static const ql_host_api *host;
struct ql_quantizer {
    int calls;
};
struct ql_qstate {
    int64_t rows, cols;
    float *w;
};

static int init(const ql_host_api *h)
{
    host = h;
    return QL_OK;
}
static int create(const ql_option *o, size_t n, ql_quantizer **out)
{
    (void)o;
    (void)n;
    *out = calloc(1, sizeof **out);
    return *out ? QL_OK : QL_ENOMEM;
}
static void destroy(ql_quantizer *q) { free(q); }
static int describe(const ql_quantizer *q, char *buf, size_t cap)
{
    (void)q;
    if (cap) buf[0] = '\0';
    return QL_OK;
}
static double bits(const ql_quantizer *q, int64_t r, int64_t c)
{
    (void)q;
    (void)r;
    (void)c;
    return 32.0;
}
static int quantize(const ql_quantizer *cq, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    ql_quantizer *q = (ql_quantizer *)cq;
    if (++q->calls == 3) return host->error(QL_EINTERNAL, "planned failure on call 3 (%s)", m->name);
    ql_qstate *s = calloc(1, sizeof *s);
    s->rows = m->rows;
    s->cols = m->cols;
    s->w = malloc((size_t)(m->rows * m->cols) * sizeof(float));
    memcpy(s->w, w, (size_t)(m->rows * m->cols) * sizeof(float));
    *out = s;
    return QL_OK;
}
static int materialize(const ql_quantizer *q, const ql_qstate *s, int32_t dt, void *out)
{
    (void)q;
    if (dt != QL_DTYPE_F32) return QL_ENOTSUP;
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
    return w->put(w->ctx, &t);
}
static int load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    (void)q;
    (void)m;
    (void)r;
    (void)out;
    return QL_ENOTFOUND;
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
    i->bytes = (uint64_t)(s->rows * s->cols) * 4;
    return QL_OK;
}
static int config(const ql_quantizer *q, char *buf, size_t cap)
{
    (void)q;
    strncpy(buf, "{\"quant_method\": \"test\"}", cap);
    return QL_OK;
}

static const ql_quantizer_desc descriptor = {
#ifdef BAD_SIZE
    .struct_size = 40,
#else
    .struct_size = sizeof(ql_quantizer_desc),
#endif
#ifdef BAD_MAJOR
    .abi_major = 99,
#else
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
#endif
#ifdef BAD_MINOR
    .abi_minor = 99,
#else
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
#endif
#ifdef BAD_NAME
    .name = "Bad Name!",
#else
    .name = "bad",
#endif
    .description = "deliberately broken test plugin",
    .version = "0",
    .init = init,
    .create = create,
    .destroy = destroy,
    .describe = describe,
    .bits_per_param = bits,
#ifdef BAD_NULLSLOT
    .quantize = NULL,
#else
    .quantize = quantize,
#endif
    .materialize = materialize,
    .save = save,
    .load = load,
    .free_state = free_state,
    .state_info = info,
    .checkpoint_config = config,
};

#ifndef BAD_NOENTRY
QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void)
{
#ifdef BAD_NULLDESC
    return NULL;
#else
    return &descriptor;
#endif
}
#else
QL_PLUGIN_EXPORT const ql_quantizer_desc *some_other_symbol(void) { return &descriptor; }
#endif
