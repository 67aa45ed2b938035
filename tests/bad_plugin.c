/* A plugin with one deliberate defect per build (-DBAD_<KIND>), for the
 * loader's refusal paths, plus BAD_FAILQUANT: valid, but its third quantize
 * call fails, to check that an interrupted run leaves nothing behind.
 * For tests/test_security.c: BAD_CRASHINIT raises SIGSEGV in init,
 * BAD_EXITINIT calls exit(3) there, BAD_HANGINIT never returns from it, and
 * BAD_MARKER is a valid plugin named "marker" whose constructor appends a
 * line to the file $QLORA_TEST_MARKER names, so a test sees whether the
 * file was ever loaded. */
#include <qlora/quantizer.h>

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef BAD_MARKER
__attribute__((constructor)) static void leave_marker(void)
{
    const char *path = getenv("QLORA_TEST_MARKER");
    if (!path || !*path) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    if (write(fd, "loaded\n", 7) != 7) {
    }
    close(fd);
}
#endif

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
#ifdef BAD_CRASHINIT
    raise(SIGSEGV);
#endif
#ifdef BAD_EXITINIT
    exit(3);
#endif
#ifdef BAD_HANGINIT
    for (;;) pause();
#endif
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
#ifdef BAD_FAILQUANT
    if (++q->calls == 3) return host->error(QL_EINTERNAL, "planned failure on call 3 (%s)", m->name);
#else
    q->calls++;
    (void)m;
#endif
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
#ifdef BAD_MARKER
    /* what save() wrote: the matrix as F32 "weight" */
    const ql_tensor *t = r->get(r->ctx, "weight");
    if (!t || t->dtype != QL_DTYPE_F32 || t->ndim != 2 || t->nbytes != (uint64_t)(t->shape[0] * t->shape[1]) * 4 ||
        (m->rows && (t->shape[0] != m->rows || t->shape[1] != m->cols)))
        return QL_ENOTFOUND;
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s || !(s->w = malloc(t->nbytes))) {
        free(s);
        return QL_ENOMEM;
    }
    s->rows = t->shape[0];
    s->cols = t->shape[1];
    memcpy(s->w, t->data, t->nbytes);
    *out = s;
    return QL_OK;
#else
    (void)m;
    (void)r;
    (void)out;
    return QL_ENOTFOUND;
#endif
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
#ifdef BAD_MARKER
    /* names itself by a path, which the host replaces with the plugin name */
    strncpy(buf, "{\"quant_method\": \"qlora\", \"quantizer\": \"./qlora_bad_marker.so\"}", cap);
#else
    strncpy(buf, "{\"quant_method\": \"test\"}", cap);
#endif
    return QL_OK;
}

#if defined(BAD_V10) || defined(BAD_V11)
/* BAD_V10: a plugin built against ABI 1.0, its struct_size ending before the
 * 1.1 device slots; BAD_V11: one built against 1.1, ending before 1.2's
 * quantize_device.  The slots past struct_size hold garbage the host must
 * never see; the 1.1 slots of BAD_V11 exist but are never called here. */
static int never_called(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *b, uint32_t *n)
{
    (void)q, (void)s, (void)b, (void)n;
    abort();
}
#define GARBAGE_QUANTIZE_DEVICE \
    (int (*)(const ql_quantizer *, const ql_matrix_desc *, const void *, int32_t, void *, ql_qstate **))1
#endif
#ifdef BAD_V11
static uint64_t never_workspace(const ql_quantizer *q, const ql_qstate *s, int64_t nrows)
{
    (void)q, (void)s, (void)nrows;
    abort();
}
static int never_materialize(const ql_quantizer *q, const ql_qstate *s, const void *const *b, const ql_device_out *o,
                             void *ws, uint64_t wsb, void *st)
{
    (void)q, (void)s, (void)b, (void)o, (void)ws, (void)wsb, (void)st;
    abort();
}
#endif

static const ql_quantizer_desc descriptor = {
#ifdef BAD_SIZE
    .struct_size = 40,
#elif defined(BAD_V10)
    .struct_size = offsetof(ql_quantizer_desc, device_buffers),
#elif defined(BAD_V11)
    .struct_size = offsetof(ql_quantizer_desc, quantize_device),
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
#elif defined(BAD_V10)
    .abi_minor = 0,
#elif defined(BAD_V11)
    .abi_minor = 1,
#else
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
#endif
#ifdef BAD_NAME
    .name = "Bad Name!",
#elif defined(BAD_MARKER)
    .name = "marker",
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
#ifdef BAD_V10
    .device_buffers = never_called,
    .device_workspace = (uint64_t (*)(const ql_quantizer *, const ql_qstate *, int64_t))1,
    .materialize_rows_device = (int (*)(const ql_quantizer *, const ql_qstate *, const void *const *,
                                        const ql_device_out *, void *, uint64_t, void *))1,
    .quantize_device = GARBAGE_QUANTIZE_DEVICE,
#elif defined(BAD_V11)
    .device_buffers = never_called,
    .device_workspace = never_workspace,
    .materialize_rows_device = never_materialize,
    .quantize_device = GARBAGE_QUANTIZE_DEVICE,
#endif
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
