/* qlora check-plugin: a quantizer plugin through every check a host relies
 * on.  Each check runs in a child process of its own (fork), which loads
 * the plugin afresh, so a plugin that crashes, exits or hangs in one check
 * fails that check, by name, with the signal and the call it was in, and the
 * other checks still run.  The child announces every plugin call on a pipe
 * before making it ("stage ..."), then sends one JSON result line. */
#include "qlora/check_plugin.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <time.h>
#include <unistd.h>

#include "ql_config.h"
#include "progress.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/plugin.h"

#if QL_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- the child's side: stages, results ---- */

/* The write end of the pipe to the parent, in a check's child; -1 elsewhere. */
static int stage_fd = -1;

static void write_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

/* Announce the plugin call about to be made, so that a crash or a hang in
 * it is reported with it.  One write of less than PIPE_BUF: lines from
 * several threads do not interleave. */
static void stage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void stage(const char *fmt, ...)
{
    if (stage_fd < 0) return;
    char line[400] = "stage ";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + 6, sizeof line - 7, fmt, ap);
    va_end(ap);
    size_t n = strlen(line);
    for (size_t i = 6; i < n; i++)
        if (line[i] == '\n') line[i] = ' ';
    line[n++] = '\n';
    write_all(stage_fd, line, n);
}

/* One check's state in its child. */
typedef struct ck {
    ql_qz *q;
    const ql_quantizer_desc *d;
    ql_quantizer *inst;
    const ql_check_opts *o;
    int calibrated; /* the plugin needs calibration: every quantize goes through calib_* */
    int status;
    char reason[1536];
    json_t *extra; /* more fields for the result line */
} ck;

static void set_reason(ck *c, int status, const char *fmt, va_list ap)
{
    c->status = status;
    vsnprintf(c->reason, sizeof c->reason, fmt, ap);
}

/* The first failure is the one reported; returns -1 for `return fail(...)`. */
static int fail(ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(ck *c, const char *fmt, ...)
{
    if (c->status == QL_CHECK_FAIL) return -1;
    va_list ap;
    va_start(ap, fmt);
    set_reason(c, QL_CHECK_FAIL, fmt, ap);
    va_end(ap);
    return -1;
}

static void skip(ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void skip(ck *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_reason(c, QL_CHECK_SKIP, fmt, ap);
    va_end(ap);
}

/* What a passing check measured. */
static void note(ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(ck *c, const char *fmt, ...)
{
    if (c->status != QL_CHECK_PASS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof c->reason, fmt, ap);
    va_end(ap);
}

/* The plugin's message for the call that just failed. */
static const char *pmsg(void)
{
    return ql_error_message()[0] ? ql_error_message() : "(no message: the plugin set none with host->error)";
}

/* ---- deterministic inputs ---- */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t rng_u64(rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unit(rng *r) { return (double)(rng_u64(r) >> 11) * 0x1.0p-53; }

static double rng_normal(rng *r)
{
    double u = rng_unit(r), v = rng_unit(r);
    return sqrt(-2.0 * log1p(-u)) * cos(6.283185307179586 * v);
}

static uint64_t below(rng *r, uint64_t n) { return n ? rng_u64(r) % n : 0; }

enum { K_GAUSS, K_HEAVY, K_ZERO, K_CONST, K_TINY, K_HUGE, NKINDS };
static const char *const kind_names[NKINDS] = {"gaussian", "heavy-tailed", "all-zero", "constant", "tiny", "huge"};

/* The awkward shapes: one element, one row, fewer columns than any block,
 * stories260K's 172-wide rows, sizes that no power of two divides. */
static const int64_t shapes[][2] = {{1, 1}, {1, 63}, {3, 5}, {5, 100}, {7, 172}, {33, 257}, {64, 128}};
enum { NSHAPES = sizeof shapes / sizeof shapes[0] };

static void fill(float *w, int64_t n, int kind, uint64_t seed)
{
    rng r = {seed * 0x2545f4914f6cdd1dULL + (uint64_t)kind};
    for (int64_t i = 0; i < n; i++) {
        double g = rng_normal(&r);
        switch (kind) {
        case K_GAUSS: w[i] = (float)(0.02 * g); break;
        /* a ratio of normals is Cauchy: rare huge outliers among small weights */
        case K_HEAVY: w[i] = (float)(0.02 * g / fmax(fabs(rng_normal(&r)), 1e-3)); break;
        case K_ZERO: w[i] = 0.0f; break;
        case K_CONST: w[i] = 0.37f; break;
        case K_TINY: w[i] = (float)(1e-30 * g); break;
        default: w[i] = (float)(1e30 * g); break;
        }
    }
}

static float *matrix(int kind, int64_t rows, int64_t cols, uint64_t seed)
{
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    if (w) fill(w, rows * cols, kind, seed + (uint64_t)(rows * 131 + cols));
    return w;
}

/* ---- guarded buffers ---- */

/* Memory whose end touches an inaccessible page, so that a plugin reading
 * or writing past a buffer faults at once (and the check reports the call)
 * instead of reading a neighbour's bytes.  The bytes around `data` in the
 * accessible pages are 0xa5 and checked afterwards (gb_intact). */
typedef struct gbuf {
    char *base;
    size_t span; /* accessible bytes from base; one PROT_NONE page follows */
    char *data;
    size_t n;
} gbuf;

/* aligned: data 64-byte aligned, as a host's malloc'd output buffer is (the
 * slack after it is checked by gb_intact); else data ends at the guard page. */
static int gb_new(gbuf *g, size_t n, int aligned, const void *init)
{
    memset(g, 0, sizeof *g);
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    size_t span = (n + 64 + ps - 1) / ps * ps;
    void *p = mmap(NULL, span + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return ql_error(QL_ENOMEM, "cannot map %zu bytes: %s", span + ps, strerror(errno));
    g->base = p;
    g->span = span;
    mprotect(g->base + span, ps, PROT_NONE);
    memset(g->base, 0xa5, span);
    g->data = g->base + span - n;
    if (aligned) g->data = (char *)((uintptr_t)g->data & ~(uintptr_t)63);
    g->n = n;
    if (init && n) memcpy(g->data, init, n);
    return QL_OK;
}

static void gb_free(gbuf *g)
{
    if (g->base) munmap(g->base, g->span + (size_t)sysconf(_SC_PAGESIZE));
    memset(g, 0, sizeof *g);
}

static int gb_intact(const gbuf *g)
{
    for (const char *p = g->base; p < g->data; p++)
        if ((unsigned char)*p != 0xa5) return 0;
    for (const char *p = g->data + g->n; p < g->base + g->span; p++)
        if ((unsigned char)*p != 0xa5) return 0;
    return 1;
}

/* ---- saved tensors ---- */

enum { MAX_TENSORS = 48 };

typedef struct saved_tensor {
    char name[128];
    int32_t dtype, ndim;
    int64_t shape[QL_MAX_DIMS];
    unsigned char *data;
    uint64_t nbytes;
} saved_tensor;

typedef struct tset {
    saved_tensor t[MAX_TENSORS];
    int n;
    char why[512]; /* what put() refused, for the check's reason */
} tset;

static void tset_clear(tset *ts)
{
    for (int i = 0; i < ts->n; i++) free(ts->t[i].data);
    ts->n = 0;
}

/* The host's writer: it refuses what ql_st_writer_add refuses (a file could
 * not hold it) and copies the rest. */
static int tset_put(void *ctx, const ql_tensor *t)
{
    tset *ts = ctx;
    const char *why = NULL;
    char buf[256];
    if (!t || !t->name || !t->name[0] || strlen(t->name) >= sizeof ts->t[0].name) why = "no name, or a name of 128 or more bytes";
    else if (ql_dtype_size(t->dtype) == 0) why = "an unknown dtype";
    else if (t->ndim < 0 || t->ndim > QL_MAX_DIMS) why = "a rank outside 0..8";
    else if (ts->n == MAX_TENSORS) why = "more tensors than the 48 this check takes";
    else {
        for (int d = 0; d < t->ndim && !why; d++)
            if (t->shape[d] < 0) why = "a negative dimension";
        for (int i = 0; i < ts->n && !why; i++)
            if (!strcmp(ts->t[i].name, t->name)) why = "a name put twice";
        if (!why && (uint64_t)ql_shape_numel(t->shape, t->ndim) * ql_dtype_size(t->dtype) != t->nbytes) {
            snprintf(buf, sizeof buf, "%llu bytes where its dtype and shape make %llu", (unsigned long long)t->nbytes,
                     (unsigned long long)((uint64_t)ql_shape_numel(t->shape, t->ndim) * ql_dtype_size(t->dtype)));
            why = buf;
        }
        if (!why && t->nbytes && !t->data) why = "no data";
    }
    if (why) {
        snprintf(ts->why, sizeof ts->why, "save() put tensor '%s' with %s", t && t->name ? t->name : "(null)", why);
        return ql_error(QL_EINVAL, "%s", ts->why);
    }
    saved_tensor *s = &ts->t[ts->n];
    snprintf(s->name, sizeof s->name, "%s", t->name);
    s->dtype = t->dtype;
    s->ndim = t->ndim;
    memset(s->shape, 0, sizeof s->shape);
    memcpy(s->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]);
    s->nbytes = t->nbytes;
    s->data = malloc(t->nbytes ? t->nbytes : 1);
    if (!s->data) return ql_error(QL_ENOMEM, "out of memory");
    if (t->nbytes) memcpy(s->data, t->data, t->nbytes);
    ts->n++;
    return QL_OK;
}

static uint64_t tset_bytes(const tset *ts)
{
    uint64_t b = 0;
    for (int i = 0; i < ts->n; i++) b += ts->t[i].nbytes;
    return b;
}

static void shape_text(const int64_t *shape, int ndim, char *buf, size_t cap)
{
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && d < QL_MAX_DIMS && k < cap; d++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* 1 when equal; else why (the first difference) */
static int tset_equal(const tset *a, const tset *b, char *why, size_t cap)
{
    if (a->n != b->n) return snprintf(why, cap, "%d tensors, then %d", a->n, b->n), 0;
    for (int i = 0; i < a->n; i++) {
        const saved_tensor *x = &a->t[i], *y = &b->t[i];
        if (strcmp(x->name, y->name)) return snprintf(why, cap, "tensor %d is '%s', then '%s'", i, x->name, y->name), 0;
        if (x->dtype != y->dtype || x->ndim != y->ndim || memcmp(x->shape, y->shape, sizeof x->shape) ||
            x->nbytes != y->nbytes) {
            char sx[96], sy[96];
            shape_text(x->shape, x->ndim, sx, sizeof sx);
            shape_text(y->shape, y->ndim, sy, sizeof sy);
            return snprintf(why, cap, "'%s' is %s %s, then %s %s", x->name, ql_dtype_name(x->dtype), sx,
                            ql_dtype_name(y->dtype), sy),
                   0;
        }
        for (uint64_t k = 0; k < x->nbytes; k++)
            if (x->data[k] != y->data[k])
                return snprintf(why, cap, "'%s' differs at byte %llu of %llu (0x%02x, then 0x%02x)", x->name,
                                (unsigned long long)k, (unsigned long long)x->nbytes, x->data[k], y->data[k]),
                       0;
    }
    return 1;
}

/* ---- calling the plugin ---- */

static size_t esize(int dtype) { return dtype == QL_DTYPE_BF16 ? 2 : 4; }

/* One calibration batch for `cols` input features: normal inputs whose
 * features differ in scale, as activations do. */
static float *calib_batch(int64_t n, int64_t cols, uint64_t seed)
{
    float *x = malloc((size_t)(n * cols) * sizeof *x);
    if (!x) return NULL;
    rng r = {seed ^ 0x63616c6962ULL};
    for (int64_t j = 0; j < cols; j++) x[j] = (float)exp(0.5 * rng_normal(&r));
    for (int64_t i = n - 1; i >= 0; i--)
        for (int64_t j = 0; j < cols; j++) x[i * cols + j] = (float)rng_normal(&r) * x[j];
    return x;
}

enum { CALIB_ROWS = 64, CALIB_BATCHES = 2 };

/* A calibration fed CALIB_BATCHES batches for m's inputs. */
static int calibrate(const ck *c, const ql_matrix_desc *m, ql_calib **out)
{
    *out = NULL;
    ql_error_clear();
    stage("calib_create() for %s", m->name);
    int rc = c->d->calib_create(c->inst, m, out);
    if (rc) return rc;
    if (!*out) return ql_error(QL_EINTERNAL, "calib_create() returned QL_OK and no calibration");
    for (int b = 0; b < CALIB_BATCHES && rc == QL_OK; b++) {
        float *x = calib_batch(CALIB_ROWS, m->cols, c->o->seed * 1000003u + (uint64_t)m->cols * 7u + (uint64_t)b);
        if (!x) return ql_error(QL_ENOMEM, "out of memory");
        ql_error_clear();
        stage("calib_feed() of batch %d for %s", b, m->name);
        rc = c->d->calib_feed(c->inst, *out, x, CALIB_ROWS);
        free(x);
    }
    if (rc) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", pmsg());
        stage("calib_free() for %s", m->name);
        c->d->calib_free(c->inst, *out);
        *out = NULL;
        return ql_error(rc, "%s", msg);
    }
    return QL_OK;
}

/* quantize() as the host would call it: through the calibration slots
 * when the plugin needs calibration. */
static int quantize_any(const ck *c, const ql_matrix_desc *m, const float *w, ql_qstate **s)
{
    *s = NULL;
    ql_error_clear();
    if (!c->calibrated) {
        stage("quantize() of %s", m->name);
        return c->d->quantize(c->inst, m, w, s);
    }
    ql_calib *cal;
    int rc = calibrate(c, m, &cal);
    if (rc) return rc;
    ql_error_clear();
    stage("quantize_calibrated() of %s", m->name);
    rc = c->d->quantize_calibrated(c->inst, m, w, cal, s);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", rc ? pmsg() : "");
    stage("calib_free() for %s", m->name);
    c->d->calib_free(c->inst, cal);
    return rc ? ql_error(rc, "%s", msg) : QL_OK;
}

static void free_state(const ck *c, ql_qstate *s, const char *what)
{
    if (!s) return;
    stage("free_state() of %s", what);
    c->d->free_state(c->inst, s);
}

/* materialize() into a guarded buffer of rows x cols, poisoned with NaN
 * first so that an element never written reads as non-finite. */
static int materialize_into(const ck *c, const ql_qstate *s, int dtype, int64_t rows, int64_t cols, gbuf *out,
                            const char *what)
{
    size_t n = (size_t)(rows * cols) * esize(dtype);
    int rc = gb_new(out, n, 1, NULL);
    if (rc) return rc;
    memset(out->data, 0xff, n);
    ql_error_clear();
    stage("materialize(%s) of %s", ql_dtype_name(dtype), what);
    return c->d->materialize(c->inst, s, dtype, out->data);
}

static int save_into(const ck *c, const ql_qstate *s, tset *ts, const char *what)
{
    ts->n = 0;
    ts->why[0] = '\0';
    ql_tensor_writer w = {ts, tset_put};
    ql_error_clear();
    stage("save() of %s", what);
    return c->d->save(c->inst, s, &w);
}

/* A reader over copies of saved tensors, each in a guarded buffer that ends
 * where its nbytes do. */
typedef struct rview {
    ql_tensor t[MAX_TENSORS];
    gbuf g[MAX_TENSORS];
    int n;
} rview;

static const ql_tensor *rview_get(void *ctx, const char *suffix)
{
    rview *v = ctx;
    if (!suffix) return NULL;
    for (int i = 0; i < v->n; i++)
        if (v->t[i].name && !strcmp(v->t[i].name, suffix)) return &v->t[i];
    return NULL;
}

static void rview_free(rview *v)
{
    for (int i = 0; i < v->n; i++) gb_free(&v->g[i]);
    v->n = 0;
}

/* Tensor k's data replaced by n bytes: `data` (NULL: k's own bytes, cut
 * or zero-extended to n). */
static int rview_set_data(rview *v, const tset *ts, int k, const void *data, size_t n)
{
    gbuf g;
    int rc = gb_new(&g, n, 0, NULL);
    if (rc) return rc;
    if (data) memcpy(g.data, data, n);
    else {
        memset(g.data, 0, n);
        memcpy(g.data, ts->t[k].data, n < ts->t[k].nbytes ? n : ts->t[k].nbytes);
    }
    gb_free(&v->g[k]);
    v->g[k] = g;
    v->t[k].data = g.data;
    v->t[k].nbytes = n;
    return QL_OK;
}

/* Every byte of v inaccessible, still mapped (so that no later mapping
 * takes its addresses); rview_free unmaps it. */
static void rview_revoke(rview *v)
{
    for (int i = 0; i < v->n; i++)
        if (v->g[i].base) mprotect(v->g[i].base, v->g[i].span, PROT_NONE);
}

static int rview_build(rview *v, const tset *ts)
{
    memset(v, 0, sizeof *v);
    for (int i = 0; i < ts->n; i++) {
        int rc = gb_new(&v->g[i], ts->t[i].nbytes, 0, ts->t[i].data);
        if (rc) {
            rview_free(v);
            return rc;
        }
        v->n = i + 1;
        v->t[i] = (ql_tensor){.name = ts->t[i].name, .dtype = ts->t[i].dtype, .ndim = ts->t[i].ndim,
                              .data = v->g[i].data, .nbytes = ts->t[i].nbytes};
        memcpy(v->t[i].shape, ts->t[i].shape, sizeof v->t[i].shape);
    }
    return QL_OK;
}

static int load_view(const ck *c, rview *v, int64_t rows, int64_t cols, ql_qstate **s, const char *what)
{
    ql_matrix_desc m = {.name = "check.loaded", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
    ql_tensor_reader r = {v, rview_get};
    *s = NULL;
    ql_error_clear();
    stage("load() of %s", what);
    return c->d->load(c->inst, &m, &r, s);
}

/* A state of `kind` at rows x cols, its matrix in *w (caller frees both).
 * may_refuse: a refusal with a message is 1, not a failure (a format that
 * cannot hold a 1e30 weight may say so). */
static int make_state_or_refuse(ck *c, int kind, int64_t rows, int64_t cols, ql_matrix_desc *md, char *name,
                                size_t cap, float **w, ql_qstate **s, int may_refuse)
{
    snprintf(name, cap, "check.%s.%lldx%lld", kind_names[kind], (long long)rows, (long long)cols);
    *md = (ql_matrix_desc){.name = name, .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
    *s = NULL;
    if (!(*w = matrix(kind, rows, cols, c->o->seed))) return fail(c, "out of memory");
    /* from a copy that is unmapped when quantize returns: a state that
     * kept a pointer into the caller's matrix crashes at its first use */
    gbuf copy;
    int rc = gb_new(&copy, (size_t)(rows * cols) * sizeof **w, 0, *w);
    if (rc) return fail(c, "out of memory");
    rc = quantize_any(c, md, (const float *)copy.data, s);
    /* inaccessible and left mapped, so that no later buffer takes its
     * addresses (the child that runs the check exits soon) */
    mprotect(copy.base, copy.span, PROT_NONE);
    if (rc && may_refuse && !*s && ql_error_message()[0]) return 1;
    if (rc) return fail(c, "%s of a %s %lld x %lld matrix failed (%s): %s", c->calibrated ? "calibrated quantize" : "quantize()",
                        kind_names[kind], (long long)rows, (long long)cols, ql_status_name(rc), pmsg());
    if (!*s) return fail(c, "quantize() of %s returned QL_OK and no state", name);
    return 0;
}

static int make_state(ck *c, int kind, int64_t rows, int64_t cols, ql_matrix_desc *md, char *name, size_t cap,
                      float **w, ql_qstate **s)
{
    return make_state_or_refuse(c, kind, rows, cols, md, name, cap, w, s, 0);
}

/* ---- the checks ---- */

static void check_load(ck *c)
{
    const ql_quantizer_desc *d = c->d;
    json_object_set_new(c->extra, "name", json_string(d->name));
    json_object_set_new(c->extra, "version", json_string(d->version ? d->version : ""));
    json_object_set_new(c->extra, "file", json_string(ql_plugin_path(c->q->plugin)));
    json_object_set_new(c->extra, "options", json_string(c->q->options));
    json_object_set_new(c->extra, "abi_major", json_integer(d->abi_major));
    json_object_set_new(c->extra, "abi_minor", json_integer(d->abi_minor));
    note(c, "loaded, validated (ABI %u.%u, %u-byte descriptor) and initialized; create() took '%s'%s", d->abi_major,
         d->abi_minor, d->struct_size, c->q->options,
         c->calibrated ? "; needs calibration: every check quantizes through calib_create, calib_feed, quantize_calibrated" : "");
}

/* The descriptor's size for each minor version: where the next version's
 * first slot begins. */
static size_t desc_size_of_minor(unsigned minor)
{
    switch (minor) {
    case 0: return offsetof(ql_quantizer_desc, device_buffers);
    case 1: return offsetof(ql_quantizer_desc, quantize_device);
    case 2: return offsetof(ql_quantizer_desc, calib_create);
    default: return sizeof(ql_quantizer_desc);
    }
}

static void check_slots(ck *c)
{
    const ql_quantizer_desc *d = c->d;
    const uint32_t known = QL_QUANTIZER_HAS_CUDA | QL_QUANTIZER_NEEDS_CALIBRATION;
    if (d->flags & ~known)
        fail(c, "flags 0x%x hold bits no ABI %d.%d defines (0x%x): a newer host may read them as promises", d->flags,
             QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR, d->flags & ~known);
    if (d->abi_minor <= QL_QUANTIZER_ABI_MINOR && d->struct_size != desc_size_of_minor(d->abi_minor))
        fail(c, "struct_size is %u, but ABI %u.%u's descriptor is %zu bytes: set it to sizeof(ql_quantizer_desc) of "
                "the header the plugin compiles against",
             d->struct_size, d->abi_major, d->abi_minor, desc_size_of_minor(d->abi_minor));
    if (!d->description[0] || strpbrk(d->description, "\n\r\t"))
        fail(c, "description is empty or not one line: qlora quantizers prints it on one");
    int dev11 = !!d->device_buffers + !!d->device_workspace + !!d->materialize_rows_device;
    if (dev11 != 0 && dev11 != 3)
        fail(c, "device slots: %s%s%s%s NULL: device_buffers, device_workspace and materialize_rows_device come "
                "together (the host uses none unless all three are there)",
             d->device_buffers ? "" : "device_buffers ", d->device_workspace ? "" : "device_workspace ",
             d->materialize_rows_device ? "" : "materialize_rows_device ", "is");
    int dev10 = !!d->to_device + !!d->materialize_device + !!d->free_device_state;
    if (dev10 != 0 && dev10 != 3)
        fail(c, "the 1.0 device slots to_device, materialize_device and free_device_state come together; %d of 3 are set",
             dev10);
    if ((d->flags & QL_QUANTIZER_HAS_CUDA) && dev11 != 3 && dev10 != 3)
        fail(c, "flags say QL_QUANTIZER_HAS_CUDA, but the device slots (device_buffers, device_workspace, "
                "materialize_rows_device) are not all there");
    if (d->calibration_needed && !d->calib_create)
        fail(c, "calibration_needed is set without the calibration slots (calib_create, calib_feed, "
                "quantize_calibrated, calib_free)");
    /* a checkpoint records the descriptor's name and is loaded through qlora_<name>.so */
    const char *path = ql_plugin_path(c->q->plugin);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t lb = strlen(base);
    if (lb > 9 && !strncmp(base, "qlora_", 6) && !strcmp(base + lb - 3, ".so") &&
        (lb - 9 != strlen(d->name) || strncmp(base + 6, d->name, lb - 9)))
        fail(c, "the file is %s but the plugin calls itself '%s': a checkpoint it writes records '%s' and is loaded "
                "through qlora_%s.so",
             base, d->name, d->name, d->name);
    /* the NULL no-ops of the ABI */
    stage("free_state(q, NULL)");
    d->free_state(c->inst, NULL);
    stage("destroy(NULL)");
    d->destroy(NULL);
    if (d->calib_free) {
        stage("calib_free(q, NULL)");
        d->calib_free(c->inst, NULL);
    }
    char opt[256] = "";
    size_t k = 0;
    const struct {
        const char *name;
        int on;
    } optional[] = {{"matmul", d->matmul != NULL},
                    {"device slots (1.1)", dev11 == 3},
                    {"quantize_device (1.2)", d->quantize_device != NULL},
                    {"calibration (1.3)", d->calib_create != NULL},
                    {"calibration_needed", d->calibration_needed != NULL}};
    for (size_t i = 0; i < sizeof optional / sizeof optional[0]; i++)
        if (optional[i].on) k += (size_t)snprintf(opt + k, sizeof opt - k, "%s%s", k ? ", " : "", optional[i].name);
    note(c, "flags 0x%x; optional slots: %s; free_state(NULL), destroy(NULL)%s are no-ops", d->flags, k ? opt : "none",
         d->calib_free ? ", calib_free(NULL)" : "");
}

/* 1 when msg holds `n` as a number of its own */
static int names_number(const char *msg, long long n)
{
    char want[32];
    snprintf(want, sizeof want, "%lld", n);
    size_t lw = strlen(want);
    for (const char *p = msg; (p = strstr(p, want)); p++)
        if ((p == msg || p[-1] < '0' || p[-1] > '9') && (p[lw] < '0' || p[lw] > '9')) return 1;
    return 0;
}

static void check_unknown_option(ck *c)
{
    static const char key[] = "ql_check_no_such_option";
    ql_option o = {key, "1"};
    ql_quantizer *x = NULL;
    ql_error_clear();
    stage("create() with the unknown option %s=1", key);
    int rc = c->d->create(&o, 1, &x);
    if (rc == QL_OK) {
        stage("destroy()");
        c->d->destroy(x);
        fail(c, "create() accepted the unknown option '%s=1': a misspelt option would be ignored silently", key);
        return;
    }
    if (x) fail(c, "create() failed but left *out set");
    else if (!strstr(ql_error_message(), key))
        fail(c, "create() refused '%s=1', but its message does not name the key: %s", key, pmsg());
    else if (rc != QL_EINVAL)
        fail(c, "create() refused '%s=1' with status %s, not QL_EINVAL: %s", key, ql_status_name(rc), pmsg());
    else note(c, "refused with QL_EINVAL: %s", pmsg());
}

/* "k=v,k=v" into options pointing into buf (modified) */
static int parse_options(char *buf, ql_option *o, size_t cap, size_t *n)
{
    *n = 0;
    if (!buf[0]) return 1;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok || *n == cap) return 0;
        *eq = '\0';
        o[(*n)++] = (ql_option){tok, eq + 1};
    }
    return 1;
}

static int describe_of(const ck *c, const ql_quantizer *x, char *buf, size_t cap)
{
    ql_error_clear();
    stage("describe()");
    int rc = c->d->describe(x, buf, cap);
    if (rc == QL_OK && !memchr(buf, '\0', cap)) return ql_error(QL_EINVAL, "describe() wrote no terminating NUL");
    return rc;
}

static void check_bad_value(ck *c)
{
    char text[1024], keys[1024];
    int rc = describe_of(c, c->inst, text, sizeof text);
    if (rc) {
        fail(c, "describe() failed: %s", pmsg());
        return;
    }
    snprintf(keys, sizeof keys, "%s", text);
    ql_option o[QL_QZ_MAX_OPTIONS];
    size_t n;
    if (!parse_options(keys, o, QL_QZ_MAX_OPTIONS, &n)) {
        fail(c, "describe() wrote '%s', not key=value,...", text);
        return;
    }
    if (n == 0) {
        skip(c, "describe() lists no options");
        return;
    }
    static const char *const bad[] = {"", "#bad#", "99999999999999999999"};
    char accepted[512] = "";
    size_t ka = 0;
    for (size_t i = 0; i < n; i++) {
        int refused = 0;
        for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
            ql_option one = {o[i].key, bad[b]};
            ql_quantizer *x = NULL;
            ql_error_clear();
            stage("create() with %s=%s", o[i].key, bad[b]);
            rc = c->d->create(&one, 1, &x);
            if (rc == QL_OK) {
                stage("destroy()");
                c->d->destroy(x);
                if (ka < sizeof accepted - 64)
                    ka += (size_t)snprintf(accepted + ka, sizeof accepted - ka, "%s%s='%s'", ka ? ", " : "", o[i].key,
                                           bad[b]);
                continue;
            }
            if (x) {
                fail(c, "create() refused %s='%s' but left *out set", o[i].key, bad[b]);
                return;
            }
            if (!strstr(ql_error_message(), o[i].key)) {
                fail(c, "create() refused %s='%s', but its message does not name the key: %s", o[i].key, bad[b], pmsg());
                return;
            }
            refused++;
        }
        if (!refused) {
            fail(c, "create() accepted every bad value of '%s' tried: '', '#bad#' and 99999999999999999999", o[i].key);
            return;
        }
    }
    note(c, "%zu option%s (%s): each refused a bad value with a message naming the key%s%s", n, n == 1 ? "" : "s", text,
         ka ? "; accepted " : "", accepted);
}

/* describe/checkpoint_config into a buffer of exactly `cap` bytes that
 * ends at a guard page: too small must be an error, never a write past cap */
static int text_too_small(ck *c, const ql_quantizer *x, int config, size_t cap, size_t len)
{
    gbuf g;
    if (gb_new(&g, cap, 0, NULL)) return fail(c, "out of memory");
    ql_error_clear();
    stage("%s() into a buffer of %zu bytes for %zu", config ? "checkpoint_config" : "describe", cap, len + 1);
    int rc = config ? c->d->checkpoint_config(x, g.data, cap) : c->d->describe(x, g.data, cap);
    int intact = gb_intact(&g);
    gb_free(&g);
    const char *slot = config ? "checkpoint_config" : "describe";
    if (!intact) return fail(c, "%s() wrote outside a buffer of %zu bytes", slot, cap);
    if (rc == QL_OK)
        return fail(c, "%s() returned QL_OK for a buffer of %zu bytes, too small for its %zu: text cut short", slot, cap,
                    len + 1);
    return 0;
}

static void check_describe(ck *c)
{
    char text[2][1024], parsed[1024], config[2][8192];
    int rc;
    /* the configured instance, and one with the defaults */
    ql_quantizer *dflt = NULL;
    ql_error_clear();
    stage("create() with no options");
    if ((rc = c->d->create(NULL, 0, &dflt))) {
        fail(c, "create() with no options failed: %s", pmsg());
        return;
    }
    const ql_quantizer *inst[2] = {c->inst, dflt};
    for (int i = 0; i < 2 && c->status == QL_CHECK_PASS; i++) {
        if ((rc = describe_of(c, inst[i], text[0], sizeof text[0]))) {
            fail(c, "describe() failed: %s", pmsg());
            break;
        }
        snprintf(parsed, sizeof parsed, "%s", text[0]);
        ql_option o[QL_QZ_MAX_OPTIONS];
        size_t n;
        if (!parse_options(parsed, o, QL_QZ_MAX_OPTIONS, &n)) {
            fail(c, "describe() wrote '%s', not key=value,...", text[0]);
            break;
        }
        ql_quantizer *again = NULL;
        ql_error_clear();
        stage("create() with describe()'s '%s'", text[0]);
        if ((rc = c->d->create(o, n, &again))) {
            fail(c, "create() refused describe()'s own '%s': %s", text[0], pmsg());
            break;
        }
        if ((rc = describe_of(c, again, text[1], sizeof text[1]))) fail(c, "describe() failed: %s", pmsg());
        else if (strcmp(text[0], text[1]))
            fail(c, "describe() wrote '%s'; create() of that describes itself as '%s'", text[0], text[1]);
        for (int k = 0; k < 2 && c->status == QL_CHECK_PASS; k++) {
            ql_error_clear();
            stage("checkpoint_config()");
            rc = c->d->checkpoint_config(k ? again : inst[i], config[k], sizeof config[k]);
            if (rc) fail(c, "checkpoint_config() failed: %s", pmsg());
            else if (!memchr(config[k], '\0', sizeof config[k])) fail(c, "checkpoint_config() wrote no terminating NUL");
        }
        if (c->status == QL_CHECK_PASS) {
            json_error_t e;
            json_t *j = json_loads(config[0], 0, &e);
            if (!json_is_object(j))
                fail(c, "checkpoint_config() wrote '%.200s', not a JSON object (config.json's quantization_config): %s",
                     config[0], j ? "not an object" : e.text);
            else if (strcmp(config[0], config[1]))
                fail(c, "checkpoint_config() of describe()'s options differs: '%.200s', then '%.200s'", config[0],
                     config[1]);
            json_decref(j);
        }
        /* buffers too small: refused, never cut, never overrun */
        if (c->status == QL_CHECK_PASS) {
            size_t lt = strlen(text[0]), lc = strlen(config[0]);
            if (lt) text_too_small(c, inst[i], 0, lt, lt);
            if (lt > 1) text_too_small(c, inst[i], 0, 1, lt);
            if (lc) text_too_small(c, inst[i], 1, lc, lc);
            if (lc > 1) text_too_small(c, inst[i], 1, 1, lc);
        }
        stage("destroy()");
        c->d->destroy(again);
    }
    /* every option given appears in the canonical text */
    char given[QL_QZ_SPEC_MAX + 1];
    const char *colon = strrchr(c->q->spec, ':');
    if (c->status == QL_CHECK_PASS && colon && strchr(colon, '=')) {
        snprintf(given, sizeof given, "%s", colon + 1);
        ql_option o[QL_QZ_MAX_OPTIONS];
        size_t n;
        if (parse_options(given, o, QL_QZ_MAX_OPTIONS, &n))
            for (size_t i = 0; i < n; i++) {
                char kv[200];
                snprintf(kv, sizeof kv, "%s=", o[i].key);
                size_t lk = strlen(kv);
                int found = !strncmp(c->q->options, kv, lk);
                for (const char *p = c->q->options; !found && (p = strchr(p, ',')); p++) found = !strncmp(p + 1, kv, lk);
                if (!found) fail(c, "describe() wrote '%s', which omits the option '%s' given", c->q->options, o[i].key);
            }
    }
    stage("destroy()");
    c->d->destroy(dflt);
    note(c, "'%s' round-trips through create(); checkpoint_config() is a JSON object; buffers too small are refused",
         c->q->options);
}

/* relative Frobenius error in double (scale-free: tiny and huge matrices too) */
static double rel_error(const float *got, const float *want, int64_t n)
{
    double num = 0, den = 0, scale = 0;
    for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)want[i]));
    if (scale == 0) scale = 1;
    for (int64_t i = 0; i < n; i++) {
        double e = ((double)got[i] - want[i]) / scale, r = want[i] / scale;
        num += e * e;
        den += r * r;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* rows x cols f32 output: finite, every element written; else fail */
static int check_finite_out(ck *c, const gbuf *g, int64_t n, const char *what)
{
    if (!gb_intact(g)) return fail(c, "materialize(F32) of %s wrote outside its %lld-element output", what, (long long)n);
    const float *x = (const float *)g->data;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return fail(c, "materialize(F32) of %s: element %lld is %s%s", what, (long long)i, isnan(x[i]) ? "NaN" : "Inf",
                        isnan(x[i]) ? " (non-finite, or never written: the output was NaN before the call)" : "");
    return 0;
}

static void check_quantize(ck *c)
{
    double worst[NKINDS] = {0};
    int done = 0, refused[NKINDS] = {0};
    char refusal[NKINDS][160];
    json_t *details = json_array();
    for (int kind = 0; kind < NKINDS && c->status == QL_CHECK_PASS; kind++)
        for (int k = 0; k < NSHAPES && c->status == QL_CHECK_PASS; k++) {
            int64_t rows = shapes[k][0], cols = shapes[k][1], n = rows * cols;
            ql_matrix_desc md;
            char name[96];
            float *w;
            ql_qstate *s;
            /* a tiny or huge matrix may be refused with a message: a format
             * whose scales are float16 cannot hold them */
            int got = make_state_or_refuse(c, kind, rows, cols, &md, name, sizeof name, &w, &s,
                                           kind == K_TINY || kind == K_HUGE);
            if (got == 1 && !refused[kind]++) snprintf(refusal[kind], sizeof refusal[kind], "%s", ql_error_message());
            if (got) {
                free(w);
                if (got < 0) break;
                continue;
            }
            gbuf out;
            int rc = materialize_into(c, s, QL_DTYPE_F32, rows, cols, &out, name);
            if (rc) fail(c, "materialize(F32) of %s failed: %s", name, pmsg());
            else if (!check_finite_out(c, &out, n, name)) {
                const float *x = (const float *)out.data;
                double e = rel_error(x, w, n);
                if (kind == K_ZERO) {
                    for (int64_t i = 0; i < n; i++)
                        if (x[i] != 0.0f) {
                            fail(c, "an all-zero %lld x %lld matrix materializes %g at element %lld", (long long)rows,
                                 (long long)cols, (double)x[i], (long long)i);
                            break;
                        }
                } else if (!(e < 1.0) && kind != K_TINY)
                    /* (tiny weights may flush to zero: float16 scales end at 6e-8) */
                    fail(c, "%s: relative error %.3g, no better than all zeros", name, e);
                worst[kind] = fmax(worst[kind], e);
                json_array_append_new(details, json_pack("{s:s, s:I, s:I, s:f}", "matrix", kind_names[kind], "rows",
                                                         (json_int_t)rows, "cols", (json_int_t)cols, "rel_error", e));
                done++;
            }
            gb_free(&out);
            free_state(c, s, name);
            free(w);
        }
    json_object_set_new(c->extra, "details", details);
    char summary[512];
    size_t k = 0;
    for (int kind = 0; kind < NKINDS; kind++) {
        if (refused[kind] == NSHAPES) k += (size_t)snprintf(summary + k, sizeof summary - k, "%s%s refused", kind ? ", " : "", kind_names[kind]);
        else k += (size_t)snprintf(summary + k, sizeof summary - k, "%s%s %.3g", kind ? ", " : "", kind_names[kind], worst[kind]);
        if (refused[kind] && refused[kind] < NSHAPES) k += (size_t)snprintf(summary + k, sizeof summary - k, " (%d of %d refused)", refused[kind], NSHAPES);
    }
    char why[240] = "";
    for (int kind = 0; kind < NKINDS; kind++)
        if (refused[kind] && !why[0]) snprintf(why, sizeof why, "; %s refused with: %.160s", kind_names[kind], refusal[kind]);
    note(c, "%d matrices (1x1 to 64x128) materialized, all finite; worst relative error: %s%s", done, summary, why);
}

static void check_non_finite(ck *c)
{
    const int64_t rows = 5, cols = 20;
    static const struct {
        int64_t at;
        float v;
        const char *name;
    } bad[] = {{47, NAN, "NaN"}, {93, INFINITY, "+Inf"}, {61, -INFINITY, "-Inf"}};
    char name[64];
    snprintf(name, sizeof name, "check.nonfinite.%lldx%lld", (long long)rows, (long long)cols);
    ql_matrix_desc md = {.name = name, .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0] && c->status == QL_CHECK_PASS; i++) {
        float *w = matrix(K_GAUSS, rows, cols, c->o->seed);
        if (!w) {
            fail(c, "out of memory");
            return;
        }
        w[bad[i].at] = bad[i].v;
        ql_qstate *s = NULL;
        int rc = quantize_any(c, &md, w, &s);
        free(w);
        const char *slot = c->calibrated ? "quantize_calibrated()" : "quantize()";
        if (rc == QL_OK) {
            free_state(c, s, name);
            fail(c, "%s accepted a %s at index %lld: it would quantize garbage silently", slot, bad[i].name,
                 (long long)bad[i].at);
        } else if (s) fail(c, "%s failed but left *out set", slot);
        else if (rc != QL_ENUMERIC)
            fail(c, "%s refused a %s at index %lld with %s, not QL_ENUMERIC: %s", slot, bad[i].name, (long long)bad[i].at,
                 ql_status_name(rc), pmsg());
        else if (!names_number(ql_error_message(), bad[i].at))
            fail(c, "%s refused a %s at index %lld, but its message does not name the index: %s", slot, bad[i].name,
                 (long long)bad[i].at, pmsg());
    }
    /* a data-aware plugin checks its calibration inputs too */
    if (c->status == QL_CHECK_PASS && c->d->calib_create) {
        ql_calib *cal = NULL;
        ql_error_clear();
        stage("calib_create() for %s", name);
        int rc = c->d->calib_create(c->inst, &md, &cal);
        if (rc) {
            fail(c, "calib_create() failed: %s", pmsg());
            return;
        }
        float *x = calib_batch(4, cols, c->o->seed);
        if (!x) {
            fail(c, "out of memory");
            return;
        }
        x[13] = NAN;
        ql_error_clear();
        stage("calib_feed() of a NaN at index 13");
        rc = c->d->calib_feed(c->inst, cal, x, 4);
        free(x);
        if (rc == QL_OK) fail(c, "calib_feed() accepted a NaN at index 13");
        else if (rc != QL_ENUMERIC) fail(c, "calib_feed() refused a NaN with %s, not QL_ENUMERIC: %s", ql_status_name(rc), pmsg());
        else if (!names_number(ql_error_message(), 13))
            fail(c, "calib_feed() refused a NaN at index 13, but its message does not name the index: %s", pmsg());
        stage("calib_free()");
        c->d->calib_free(c->inst, cal);
    }
    note(c, "NaN, +Inf and -Inf refused with QL_ENUMERIC naming the index (%s%s)", c->calibrated ? "quantize_calibrated" : "quantize",
         c->d->calib_create ? ", calib_feed" : "");
}

/* The threads the plugin is offered (host->num_threads), for a run. */
static int threads_offered(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void offer_threads(int n)
{
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static void check_determinism(ck *c)
{
    static const int cases[][3] = {{K_GAUSS, 64, 172}, {K_HEAVY, 33, 257}};
    /* the third run offers one thread (host->num_threads() and OpenMP's
     * count) where the first two offer all: the bytes may not depend on it */
    const int all = threads_offered(), runs = all > 1 ? 3 : 2;
    for (size_t i = 0; i < 2 && c->status == QL_CHECK_PASS; i++) {
        tset ts[3];
        gbuf out[3];
        memset(ts, 0, sizeof ts);
        memset(out, 0, sizeof out);
        ql_qstate *s[3] = {NULL, NULL, NULL};
        float *w[3] = {NULL, NULL, NULL};
        ql_matrix_desc md;
        char name[96], why[512];
        for (int r = 0; r < runs && c->status == QL_CHECK_PASS; r++) {
            offer_threads(r == 2 ? 1 : all);
            if (make_state(c, cases[i][0], cases[i][1], cases[i][2], &md, name, sizeof name, &w[r], &s[r])) break;
            if (save_into(c, s[r], &ts[r], name)) fail(c, "save() of %s failed: %s", name, pmsg());
            else if (materialize_into(c, s[r], QL_DTYPE_F32, md.rows, md.cols, &out[r], name))
                fail(c, "materialize(F32) of %s failed: %s", name, pmsg());
        }
        offer_threads(all);
        for (int r = 1; r < runs && c->status == QL_CHECK_PASS; r++) {
            const char *how = r == 2 ? "a quantize offered one thread and one offered %d" : "two quantizes";
            char said[96];
            snprintf(said, sizeof said, how, all);
            if (!tset_equal(&ts[0], &ts[r], why, sizeof why))
                fail(c, "%s of the same %s saved different tensors: %s", said, name, why);
            else if (memcmp(out[0].data, out[r].data, out[0].n))
                fail(c, "%s of the same %s materialize different weights", said, name);
        }
        for (int r = 0; r < runs; r++) {
            tset_clear(&ts[r]);
            gb_free(&out[r]);
            free_state(c, s[r], name);
            free(w[r]);
        }
    }
    char threads[64] = "";
    if (runs == 3) snprintf(threads, sizeof threads, ", and the same with 1 thread offered as with %d", all);
    note(c, "two %s of the same matrix (64x172 gaussian, 33x257 heavy-tailed) save the same bytes and materialize "
            "the same weights%s",
         c->calibrated ? "calibrated quantizes, with the same calibration inputs," : "quantizes", threads);
}

/* first differing element of two materialized buffers, or -1 */
static int64_t first_diff(const gbuf *a, const gbuf *b, size_t es)
{
    for (size_t i = 0; i < a->n; i += es)
        if (memcmp(a->data + i, b->data + i, es)) return (int64_t)(i / es);
    return -1;
}

static const ql_tensor *get_nothing(void *ctx, const char *suffix)
{
    (void)ctx, (void)suffix;
    return NULL;
}

static void check_save_load(ck *c)
{
    static const int cases[][3] = {{K_GAUSS, 3, 5}, {K_HEAVY, 64, 172}, {K_GAUSS, 7, 172}, {K_CONST, 1, 63}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && c->status == QL_CHECK_PASS; i++) {
        ql_matrix_desc md;
        char name[96], why[512];
        float *w;
        ql_qstate *s, *s2 = NULL, *s3 = NULL, *s4 = NULL;
        tset ts = {0}, ts2 = {0};
        rview v = {0}, revoked = {0};
        gbuf a[2] = {{0}}, b[2] = {{0}};
        if (make_state(c, cases[i][0], cases[i][1], cases[i][2], &md, name, sizeof name, &w, &s)) {
            free(w);
            break;
        }
        int rc;
        if ((rc = save_into(c, s, &ts, name))) fail(c, "save() of %s failed: %s", name, ts.why[0] ? ts.why : pmsg());
        else if (rview_build(&v, &ts)) fail(c, "out of memory");
        else if ((rc = load_view(c, &v, md.rows, md.cols, &s2, name)))
            fail(c, "load() refused what save() wrote for %s (%s): %s", name, ql_status_name(rc), pmsg());
        else if (!s2) fail(c, "load() of %s returned QL_OK and no state", name);
        /* the tensors are the reader's until load() returns: made
         * inaccessible now, a state that kept a pointer into them crashes
         * at its first use (the later loads read a fresh copy) */
        revoked = v;
        rview_revoke(&revoked);
        if (rview_build(&v, &ts)) {
            memset(&v, 0, sizeof v);
            fail(c, "out of memory");
        }
        for (int d = 0; d < 2 && c->status == QL_CHECK_PASS; d++) {
            int dt = d ? QL_DTYPE_BF16 : QL_DTYPE_F32;
            if (materialize_into(c, s, dt, md.rows, md.cols, &a[d], name) ||
                materialize_into(c, s2, dt, md.rows, md.cols, &b[d],
                                 "the loaded state (the tensors it was loaded from are unmapped)"))
                fail(c, "materialize(%s) failed: %s", ql_dtype_name(dt), pmsg());
            else {
                int64_t at = first_diff(&a[d], &b[d], esize(dt));
                if (at >= 0)
                    fail(c, "%s saved and loaded materializes differently (%s) at element %lld", name, ql_dtype_name(dt),
                         (long long)at);
            }
        }
        if (c->status == QL_CHECK_PASS) {
            if (save_into(c, s2, &ts2, "the loaded state")) fail(c, "save() of the loaded %s failed: %s", name, pmsg());
            else if (!tset_equal(&ts, &ts2, why, sizeof why))
                fail(c, "save() of the loaded %s differs from the first save(): %s", name, why);
        }
        /* qlora inspect loads without knowing the shape */
        if (c->status == QL_CHECK_PASS) {
            ql_state_info info = {0};
            if ((rc = load_view(c, &v, 0, 0, &s3, "a state of unknown shape (rows = cols = 0)")))
                fail(c, "load() with the shape unknown (rows = cols = 0, as qlora inspect loads) refused %s: %s", name,
                     pmsg());
            else if (!s3) fail(c, "load() returned QL_OK and no state");
            else if ((stage("state_info()"), c->d->state_info(c->inst, s3, &info)))
                fail(c, "state_info() failed: %s", pmsg());
            else if (info.rows != md.rows || info.cols != md.cols)
                fail(c, "load() with the shape unknown gave a %lld x %lld state for %s", (long long)info.rows,
                     (long long)info.cols, name);
        }
        /* the shape the host expects is checked */
        if (c->status == QL_CHECK_PASS) {
            rc = load_view(c, &v, md.rows + 1, md.cols, &s4, "tensors of the wrong shape");
            if (rc == QL_OK)
                fail(c, "load() took the tensors of %s for a %lld x %lld matrix", name, (long long)md.rows + 1,
                     (long long)md.cols);
            else if (s4) fail(c, "load() failed but left *out set");
        }
        /* tensors of another format: QL_ENOTFOUND and no message */
        if (c->status == QL_CHECK_PASS && i == 0) {
            ql_tensor_reader none = {NULL, get_nothing};
            ql_qstate *s5 = NULL;
            ql_matrix_desc m0 = md;
            ql_error_clear();
            stage("load() from a reader with no tensors");
            rc = c->d->load(c->inst, &m0, &none, &s5);
            if (rc == QL_OK) {
                free_state(c, s5, "a state from no tensors");
                fail(c, "load() from no tensors at all returned QL_OK");
            } else if (rc != QL_ENOTFOUND)
                fail(c, "load() from no tensors returned %s, not QL_ENOTFOUND (\"not my format\"): %s", ql_status_name(rc),
                     pmsg());
            else if (ql_error_message()[0])
                fail(c, "load() from no tensors returned QL_ENOTFOUND but left a message (it must set none): %s",
                     ql_error_message());
        }
        for (int d = 0; d < 2; d++) gb_free(&a[d]), gb_free(&b[d]);
        free_state(c, s4, "a state");
        free_state(c, s3, "a state");
        free_state(c, s2, "the loaded state");
        free_state(c, s, name);
        rview_free(&v);
        rview_free(&revoked);
        tset_clear(&ts);
        tset_clear(&ts2);
        free(w);
    }
    note(c, "save -> load -> materialize is identical (F32, BF16) and saves the same bytes; load() takes the shape "
            "unknown, refuses a wrong one, and says QL_ENOTFOUND with no message to tensors that are not its own");
}

static void check_bits(ck *c)
{
    static const int cases[][3] = {{K_GAUSS, 3, 5}, {K_GAUSS, 64, 172}, {K_HEAVY, 100, 512}};
    char summary[512] = "";
    size_t k = 0;
    for (size_t i = 0; i < 3 && c->status == QL_CHECK_PASS; i++) {
        ql_matrix_desc md;
        char name[96];
        float *w;
        ql_qstate *s;
        tset ts = {0};
        if (!make_state(c, cases[i][0], cases[i][1], cases[i][2], &md, name, sizeof name, &w, &s)) {
            ql_state_info info = {0};
            int64_t n = md.rows * md.cols;
            stage("bits_per_param(%lld, %lld)", (long long)md.rows, (long long)md.cols);
            double bpp = c->d->bits_per_param(c->inst, md.rows, md.cols);
            if (save_into(c, s, &ts, name)) fail(c, "save() of %s failed: %s", name, ts.why[0] ? ts.why : pmsg());
            else if ((stage("state_info() of %s", name), c->d->state_info(c->inst, s, &info)))
                fail(c, "state_info() of %s failed: %s", name, pmsg());
            else if (info.rows != md.rows || info.cols != md.cols)
                fail(c, "state_info() of %s says %lld x %lld", name, (long long)info.rows, (long long)info.cols);
            else if (info.src_dtype != md.src_dtype)
                fail(c, "state_info() of %s says src_dtype %s; quantize() was told %s", name,
                     ql_dtype_name(info.src_dtype), ql_dtype_name(md.src_dtype));
            else if (info.bytes != tset_bytes(&ts))
                fail(c, "state_info() of %s says %llu bytes, but save() wrote %llu", name,
                     (unsigned long long)info.bytes, (unsigned long long)tset_bytes(&ts));
            else {
                double predicted = bpp * (double)n / 8.0, stored = (double)info.bytes;
                double tol = fmax(64.0, 0.001 * stored);
                if (!isfinite(bpp) || bpp <= 0 || fabs(predicted - stored) > tol)
                    fail(c, "bits_per_param(%lld, %lld) is %.4f, %.0f bytes, but save() wrote %.0f (%.4f bits/param); "
                            "allowed: %.0f bytes apart",
                         (long long)md.rows, (long long)md.cols, bpp, predicted, stored, 8.0 * stored / (double)n, tol);
                else
                    k += (size_t)snprintf(summary + k, sizeof summary - k, "%s%lldx%lld %.3f", k ? ", " : "",
                                          (long long)md.rows, (long long)md.cols, bpp);
            }
        }
        tset_clear(&ts);
        free_state(c, s, name);
        free(w);
    }
    note(c, "state_info bytes = the bytes save() wrote; bits_per_param agrees: %s", summary);
}

static void check_bf16(ck *c)
{
    static const int cases[][3] = {{K_GAUSS, 3, 5}, {K_HEAVY, 64, 172}, {K_GAUSS, 7, 172}, {K_CONST, 5, 100}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && c->status == QL_CHECK_PASS; i++) {
        ql_matrix_desc md;
        char name[96];
        float *w;
        ql_qstate *s;
        gbuf f = {0}, b = {0}, x = {0};
        if (!make_state(c, cases[i][0], cases[i][1], cases[i][2], &md, name, sizeof name, &w, &s)) {
            int64_t n = md.rows * md.cols;
            if (materialize_into(c, s, QL_DTYPE_F32, md.rows, md.cols, &f, name) ||
                materialize_into(c, s, QL_DTYPE_BF16, md.rows, md.cols, &b, name))
                fail(c, "materialize of %s failed: %s", name, pmsg());
            else if (!gb_intact(&b)) fail(c, "materialize(BF16) of %s wrote outside its output", name);
            else
                for (int64_t e = 0; e < n; e++) {
                    uint16_t got, want = ql_f32_to_bf16(((const float *)f.data)[e]);
                    memcpy(&got, b.data + 2 * e, 2);
                    if (got != want) {
                        fail(c, "materialize(BF16) of %s: element %lld is 0x%04x; the F32 value %a rounds (to nearest "
                                "even) to 0x%04x",
                             name, (long long)e, got, (double)((const float *)f.data)[e], want);
                        break;
                    }
                }
            /* dtypes it does not write are refused, not guessed */
            static const int other[] = {QL_DTYPE_I8, QL_DTYPE_U64, 999};
            for (size_t o = 0; o < 3 && c->status == QL_CHECK_PASS && i == 0; o++) {
                if (gb_new(&x, (size_t)n * 8, 1, NULL)) break;
                ql_error_clear();
                stage("materialize() to dtype %d", other[o]);
                int rc = c->d->materialize(c->inst, s, other[o], x.data);
                if (rc == QL_OK) fail(c, "materialize() to dtype %d (%s) returned QL_OK", other[o], ql_dtype_name(other[o]));
                else if (rc != QL_ENOTSUP)
                    fail(c, "materialize() to dtype %d returned %s, not QL_ENOTSUP: %s", other[o], ql_status_name(rc), pmsg());
                gb_free(&x);
            }
        }
        gb_free(&f);
        gb_free(&b);
        free_state(c, s, name);
        free(w);
    }
    note(c, "materialize(BF16) is the F32 result rounded to nearest even, bit for bit (4 matrices); I8, U64 and an "
            "unknown dtype are QL_ENOTSUP");
}

/* ---- tampering ---- */

/* a dtype of the same element size, or -1 */
static int same_size_dtype(int dt)
{
    switch (dt) {
    case QL_DTYPE_F32: return QL_DTYPE_I32;
    case QL_DTYPE_I32: return QL_DTYPE_F32;
    case QL_DTYPE_U32: return QL_DTYPE_F32;
    case QL_DTYPE_U8: return QL_DTYPE_I8;
    case QL_DTYPE_I8: return QL_DTYPE_U8;
    case QL_DTYPE_BOOL: return QL_DTYPE_I8;
    case QL_DTYPE_F16: return QL_DTYPE_BF16;
    case QL_DTYPE_BF16: return QL_DTYPE_F16;
    case QL_DTYPE_I16: return QL_DTYPE_F16;
    case QL_DTYPE_U16: return QL_DTYPE_BF16;
    case QL_DTYPE_I64: return QL_DTYPE_F64;
    case QL_DTYPE_F64: return QL_DTYPE_I64;
    case QL_DTYPE_U64: return QL_DTYPE_F64;
    default: return -1;
    }
}

static int other_size_dtype(int dt) { return ql_dtype_size(dt) == 4 ? QL_DTYPE_F16 : QL_DTYPE_F32; }

enum {
    T_MISSING,
    T_DTYPE_SAME,
    T_DTYPE_OTHER,
    T_SHAPE_GROW,      /* first dimension + 1, bytes to match */
    T_SHAPE_ONLY,      /* first dimension + 1, bytes as they were */
    T_SHAPE_RANK,      /* one more dimension of 2, bytes to match */
    T_TRUNC_BYTE,      /* one byte short of its shape */
    T_TRUNC_EMPTY,     /* no bytes */
    T_TRUNC_HALF,      /* first dimension halved, bytes to match */
    T_RANDOM,          /* random bytes, may be taken */
    T_RANDOM2,
    NTAMPER
};
static const char *const tamper_names[NTAMPER] = {
    "missing",
    "with a dtype of the same size",
    "with a dtype of another size",
    "one row longer",
    "with a shape one row longer than its bytes",
    "with one more dimension",
    "one byte short",
    "empty (0 bytes)",
    "cut to half its rows",
    "of random bytes",
    "of other random bytes",
};

/* Apply tampering `t` to tensor k of a view built from ts; 0 when it does not
 * apply to this tensor. */
static int tamper(rview *v, const tset *ts, int k, int t, rng *r, int *ok)
{
    ql_tensor *x = &v->t[k];
    const saved_tensor *s = &ts->t[k];
    size_t es = ql_dtype_size(s->dtype);
    int64_t rowbytes = s->ndim ? (int64_t)s->nbytes / (s->shape[0] ? s->shape[0] : 1) : (int64_t)s->nbytes;
    *ok = 1;
    switch (t) {
    case T_MISSING: x->name = NULL; return 1;
    case T_DTYPE_SAME:
        if (same_size_dtype(s->dtype) < 0) return 0;
        x->dtype = same_size_dtype(s->dtype);
        return 1;
    case T_DTYPE_OTHER:
        x->dtype = other_size_dtype(s->dtype);
        return *ok = !rview_set_data(v, ts, k, NULL, (size_t)ql_shape_numel(s->shape, s->ndim) * ql_dtype_size(x->dtype)), 1;
    case T_SHAPE_GROW:
        if (!s->ndim) {
            x->ndim = 1;
            x->shape[0] = 2;
            return *ok = !rview_set_data(v, ts, k, NULL, 2 * es), 1;
        }
        x->shape[0]++;
        return *ok = !rview_set_data(v, ts, k, NULL, s->nbytes + (uint64_t)rowbytes), 1;
    case T_SHAPE_ONLY:
        if (!s->ndim) return 0;
        x->shape[0]++;
        return 1;
    case T_SHAPE_RANK:
        if (s->ndim >= QL_MAX_DIMS || !s->nbytes) return 0;
        x->shape[x->ndim++] = 2;
        return *ok = !rview_set_data(v, ts, k, NULL, 2 * s->nbytes), 1;
    case T_TRUNC_BYTE:
        if (!s->nbytes) return 0;
        return *ok = !rview_set_data(v, ts, k, NULL, s->nbytes - 1), 1;
    case T_TRUNC_EMPTY:
        if (!s->nbytes) return 0;
        return *ok = !rview_set_data(v, ts, k, NULL, 0), 1;
    case T_TRUNC_HALF:
        if (!s->ndim || s->shape[0] < 2) return 0;
        x->shape[0] /= 2;
        return *ok = !rview_set_data(v, ts, k, NULL, (size_t)(x->shape[0] * rowbytes)), 1;
    default: {
        if (!s->nbytes) return 0;
        unsigned char *b = malloc(s->nbytes);
        if (!b) return *ok = 0, 1;
        for (uint64_t i = 0; i < s->nbytes; i++) b[i] = (unsigned char)rng_u64(r);
        *ok = !rview_set_data(v, ts, k, b, s->nbytes);
        free(b);
        return 1;
    }
    }
}

/* What a tampered load did: refused (1), took it with the same weights (2),
 * took it (3; *nonfinite when its weights are not all finite), took it and
 * then failed to materialize (4), or failed the check (0). */
static int judge_load(ck *c, rview *v, int64_t rows, int64_t cols, const gbuf *ref, const char *what, int *nonfinite)
{
    ql_qstate *s = NULL;
    int rc = load_view(c, v, rows, cols, &s, what);
    *nonfinite = 0;
    if (rc != QL_OK) {
        if (s) return fail(c, "load() of %s failed but left *out set", what), 0;
        if (rc != QL_ENOTFOUND && !ql_error_message()[0])
            return fail(c, "load() refused %s with %s but no message", what, ql_status_name(rc)), 0;
        return 1;
    }
    if (!s) return fail(c, "load() of %s returned QL_OK and no state", what), 0;
    gbuf out;
    int res = 3;
    rc = materialize_into(c, s, QL_DTYPE_F32, rows, cols, &out, what);
    if (!gb_intact(&out)) res = fail(c, "after load() took %s, materialize() wrote outside its output", what);
    else if (rc != QL_OK) res = 4;
    else {
        if (!memcmp(out.data, ref->data, ref->n)) res = 2;
        for (int64_t i = 0; i < rows * cols; i++) *nonfinite |= !isfinite(((const float *)out.data)[i]);
        ql_state_info info;
        stage("state_info() of %s", what);
        c->d->state_info(c->inst, s, &info);
    }
    gb_free(&out);
    free_state(c, s, what);
    return res;
}

static int tampered_base(ck *c, ql_matrix_desc *md, char *name, size_t cap, tset *ts, gbuf *ref)
{
    float *w;
    ql_qstate *s;
    memset(ts, 0, sizeof *ts);
    memset(ref, 0, sizeof *ref);
    if (make_state(c, K_HEAVY, 9, 172, md, name, cap, &w, &s)) return free(w), -1;
    free(w);
    int rc = save_into(c, s, ts, name);
    if (rc) fail(c, "save() of %s failed: %s", name, ts->why[0] ? ts->why : pmsg());
    else if (materialize_into(c, s, QL_DTYPE_F32, md->rows, md->cols, ref, name))
        fail(c, "materialize() of %s failed: %s", name, pmsg());
    free_state(c, s, name);
    return c->status == QL_CHECK_FAIL ? -1 : 0;
}

static void check_tamper(ck *c)
{
    ql_matrix_desc md;
    char name[96];
    tset ts;
    gbuf ref;
    if (tampered_base(c, &md, name, sizeof name, &ts, &ref)) {
        tset_clear(&ts);
        gb_free(&ref);
        return;
    }
    rng r = {c->o->seed ^ 0x74616d706572ULL};
    int tried = 0, refused = 0, ignored = 0, random_taken = 0, random_tried = 0, random_nonfinite = 0;
    char ignored_list[512] = "";
    size_t ki = 0;
    for (int k = 0; k < ts.n && c->status == QL_CHECK_PASS; k++)
        for (int t = 0; t < NTAMPER && c->status == QL_CHECK_PASS; t++) {
            rview v;
            if (rview_build(&v, &ts)) {
                fail(c, "out of memory");
                break;
            }
            int ok;
            if (!tamper(&v, &ts, k, t, &r, &ok)) {
                rview_free(&v);
                continue;
            }
            if (!ok) {
                rview_free(&v);
                fail(c, "out of memory");
                break;
            }
            char what[300], shp[96];
            shape_text(v.t[k].shape, v.t[k].ndim, shp, sizeof shp);
            snprintf(what, sizeof what, "tensor '%s' %s (%s %s, %llu bytes)", ts.t[k].name, tamper_names[t],
                     ql_dtype_name(v.t[k].dtype), shp, (unsigned long long)v.t[k].nbytes);
            int nonfinite, res = judge_load(c, &v, md.rows, md.cols, &ref, what, &nonfinite);
            rview_free(&v);
            if (!res) break;
            if (t >= T_RANDOM) {
                random_tried++;
                random_taken += res >= 2;
                random_nonfinite += nonfinite;
                continue;
            }
            tried++;
            if (res == 1) refused++;
            else if (res == 2) {
                ignored++;
                if (ki < sizeof ignored_list - 80)
                    ki += (size_t)snprintf(ignored_list + ki, sizeof ignored_list - ki, "%s%s %s", ki ? "; " : "",
                                           ts.t[k].name, tamper_names[t]);
            } else if (res == 4)
                fail(c, "load() took %s, and then materialize() failed: a damaged file must be refused when it is "
                        "loaded",
                     what);
            else
                fail(c, "load() took %s and it materializes different weights: a damaged file would load as garbage",
                     what);
        }
    int ntensors = ts.n;
    tset_clear(&ts);
    gb_free(&ref);
    note(c, "%d tensors, %d tamperings: %d refused, %d taken with the same weights%s%s%s; random bytes: %d of %d taken "
            "(%d with non-finite weights)",
         ntensors, tried, refused, ignored, ignored ? " (" : "", ignored_list, ignored ? ")" : "", random_taken, random_tried,
         random_nonfinite);
}

static const char *const mutation_names[] = {"a bit flipped",       "a byte set at random", "its dtype changed",
                                             "a dimension changed", "its bytes cut short",  "its rank changed",
                                             "removed",             "its bytes all random"};

static void check_mutations(ck *c)
{
    ql_matrix_desc md;
    char name[96];
    tset ts;
    gbuf ref;
    if (tampered_base(c, &md, name, sizeof name, &ts, &ref)) {
        tset_clear(&ts);
        gb_free(&ref);
        return;
    }
    rng r = {c->o->seed ^ 0x6d7574617465ULL};
    int refused = 0, taken = 0, nonfinite_n = 0;
    for (int it = 0; it < c->o->mutations && c->status == QL_CHECK_PASS && ts.n > 0; it++) {
        rview v;
        if (rview_build(&v, &ts)) {
            fail(c, "out of memory");
            break;
        }
        char what[400];
        size_t kw = (size_t)snprintf(what, sizeof what, "mutation %d (seed %llu):", it, (unsigned long long)c->o->seed);
        int nm = 1 + (int)below(&r, 3);
        for (int m = 0; m < nm; m++) {
            int k = (int)below(&r, (uint64_t)ts.n), kind = (int)below(&r, 8);
            ql_tensor *x = &v.t[k];
            if (!x->name) continue;
            if (kw < sizeof what - 80)
                kw += (size_t)snprintf(what + kw, sizeof what - kw, " %s %s;", ts.t[k].name, mutation_names[kind]);
            switch (kind) {
            case 0:
                if (x->nbytes) v.g[k].data[below(&r, x->nbytes)] ^= (char)(1u << below(&r, 8));
                break;
            case 1:
                if (x->nbytes) v.g[k].data[below(&r, x->nbytes)] = (char)rng_u64(&r);
                break;
            case 2: x->dtype = (int32_t)below(&r, QL_DTYPE_COUNT + 2); break;
            case 3:
                if (x->ndim) {
                    int d = (int)below(&r, (uint64_t)x->ndim);
                    x->shape[d] = (int64_t)below(&r, (uint64_t)(2 * x->shape[d] + 3));
                }
                break;
            case 4:
                rview_set_data(&v, &ts, k, v.g[k].data, (size_t)below(&r, x->nbytes + 1));
                break;
            case 5: {
                int nd = (int)below(&r, QL_MAX_DIMS + 1);
                for (int d = x->ndim; d < nd; d++) x->shape[d] = 1;
                x->ndim = nd;
                break;
            }
            case 6: x->name = NULL; break;
            default:
                for (uint64_t i = 0; i < x->nbytes; i++) v.g[k].data[i] = (char)rng_u64(&r);
                break;
            }
        }
        int nonfinite, res = judge_load(c, &v, md.rows, md.cols, &ref, what, &nonfinite);
        rview_free(&v);
        if (!res) break;
        refused += res == 1;
        taken += res >= 2;
        nonfinite_n += nonfinite;
    }
    tset_clear(&ts);
    gb_free(&ref);
    note(c, "%d seeded mutations (seed %llu) of the saved tensors: %d refused with a message, %d taken (%d with "
            "non-finite weights); no crash, no read or write out of bounds",
         c->o->mutations, (unsigned long long)c->o->seed, refused, taken, nonfinite_n);
}

/* ---- threads ---- */

typedef struct tjob {
    const ck *c;
    const ql_qstate *s;
    const ql_matrix_desc *md;
    const float *w;
    const gbuf *ref[2];
    const tset *ref_saved;
    int id;
    char why[600];
} tjob;

static void *thread_main(void *arg)
{
    tjob *j = arg;
    const ck *c = j->c;
    int64_t n = j->md->rows * j->md->cols;
    for (int it = 0; it < 6 && !j->why[0]; it++) {
        int dt = (it + j->id) % 2 ? QL_DTYPE_BF16 : QL_DTYPE_F32;
        void *out = malloc((size_t)n * esize(dt));
        if (!out) break;
        memset(out, 0xff, (size_t)n * esize(dt));
        ql_error_clear();
        stage("materialize(%s) from thread %d", ql_dtype_name(dt), j->id);
        int rc = c->d->materialize(c->inst, j->s, dt, out);
        if (rc) snprintf(j->why, sizeof j->why, "thread %d: materialize(%s) failed: %s", j->id, ql_dtype_name(dt), pmsg());
        else
            for (int64_t i = 0; i < n; i++)
                if (memcmp((char *)out + (size_t)i * esize(dt), j->ref[dt == QL_DTYPE_BF16]->data + (size_t)i * esize(dt),
                           esize(dt))) {
                    snprintf(j->why, sizeof j->why,
                             "thread %d: materialize(%s) of a state other threads materialize at the same time differs "
                             "from the one-thread result at element %lld",
                             j->id, ql_dtype_name(dt), (long long)i);
                    break;
                }
        free(out);
    }
    /* a quantize of its own, beside the others' */
    if (!j->why[0]) {
        ql_qstate *s = NULL;
        int rc = quantize_any(c, j->md, j->w, &s);
        tset ts = {0};
        char why[512];
        if (rc) snprintf(j->why, sizeof j->why, "thread %d: quantize failed: %s", j->id, pmsg());
        else if (save_into(c, s, &ts, "a state quantized beside other threads"))
            snprintf(j->why, sizeof j->why, "thread %d: save() failed: %s", j->id, pmsg());
        else if (!tset_equal(j->ref_saved, &ts, why, sizeof why))
            snprintf(j->why, sizeof j->why, "thread %d: quantizing beside other threads saved other tensors: %s", j->id, why);
        tset_clear(&ts);
        free_state(c, s, "a state quantized beside other threads");
    }
    return NULL;
}

static void check_threads(ck *c)
{
    ql_matrix_desc md;
    char name[96];
    float *w;
    ql_qstate *s;
    if (make_state(c, K_GAUSS, 96, 300, &md, name, sizeof name, &w, &s)) {
        free(w);
        return;
    }
    gbuf ref[2] = {{0}};
    tset saved = {0};
    if (materialize_into(c, s, QL_DTYPE_F32, md.rows, md.cols, &ref[0], name) ||
        materialize_into(c, s, QL_DTYPE_BF16, md.rows, md.cols, &ref[1], name))
        fail(c, "materialize() of %s failed: %s", name, pmsg());
    else if (save_into(c, s, &saved, name)) fail(c, "save() of %s failed: %s", name, pmsg());
    int nt = c->o->threads > 0 ? c->o->threads : 1;
    tjob *jobs = calloc((size_t)nt, sizeof *jobs);
    pthread_t *tid = calloc((size_t)nt, sizeof *tid);
    if (c->status == QL_CHECK_PASS && (!jobs || !tid)) fail(c, "out of memory");
    int started = 0;
    for (int i = 0; i < nt && c->status == QL_CHECK_PASS; i++) {
        jobs[i] = (tjob){.c = c, .s = s, .md = &md, .w = w, .ref = {&ref[0], &ref[1]}, .ref_saved = &saved, .id = i};
        if (pthread_create(&tid[i], NULL, thread_main, &jobs[i])) {
            fail(c, "cannot start thread %d", i);
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
    for (int i = 0; i < started; i++)
        if (jobs[i].why[0]) {
            fail(c, "%s", jobs[i].why);
            break;
        }
    free(jobs);
    free(tid);
    tset_clear(&saved);
    gb_free(&ref[0]);
    gb_free(&ref[1]);
    free_state(c, s, name);
    free(w);
    note(c, "%d threads materialized one %s state at once (F32 and BF16, 6 times each) and each quantized it again: "
            "the same bytes as one thread",
         nt, "96x300");
}

/* Bytes the main malloc arena holds (glibc); 0 where malloc is another's
 * (a sanitizer's), which says nothing. */
static size_t heap_in_use(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#else
    return 0;
#endif
}

/* One round of what a host does with every matrix: create and destroy an
 * instance, quantize (calibrated if need be), save, load, materialize,
 * a load refused for a missing tensor, a quantize refused for a NaN, free. */
static int leak_round(ck *c, const float *w, float *bad, const ql_matrix_desc *md, gbuf *out, const char *name)
{
    ql_quantizer *x = NULL;
    ql_error_clear();
    stage("create() with no options");
    if (c->d->create(NULL, 0, &x)) return fail(c, "create() with no options failed: %s", pmsg());
    stage("destroy()");
    c->d->destroy(x);
    ql_qstate *s = NULL, *s2 = NULL, *s3 = NULL;
    tset ts = {0};
    rview v = {0};
    int rc = quantize_any(c, md, w, &s);
    if (rc) fail(c, "quantize of %s failed: %s", name, pmsg());
    else if (save_into(c, s, &ts, name)) fail(c, "save() of %s failed: %s", name, pmsg());
    else if (rview_build(&v, &ts)) fail(c, "out of memory");
    else if (load_view(c, &v, md->rows, md->cols, &s2, name)) fail(c, "load() of %s failed: %s", name, pmsg());
    else {
        stage("materialize(F32) of %s", name);
        if (c->d->materialize(c->inst, s2, QL_DTYPE_F32, out->data)) fail(c, "materialize() failed: %s", pmsg());
        v.t[0].name = NULL; /* the first tensor missing: refused, and nothing may stay allocated */
        if (load_view(c, &v, md->rows, md->cols, &s3, "tensors with one missing") == QL_OK)
            free_state(c, s3, "a state loaded without a tensor");
        ql_qstate *sn = NULL;
        if (quantize_any(c, md, bad, &sn) == QL_OK) free_state(c, sn, "a state quantized from a NaN");
    }
    rview_free(&v);
    tset_clear(&ts);
    free_state(c, s2, "the loaded state");
    free_state(c, s, name);
    return c->status == QL_CHECK_FAIL ? -1 : 0;
}

/* LeakSanitizer's, in a sanitizer build (weak: NULL elsewhere). */
extern int __lsan_do_recoverable_leak_check(void) __attribute__((weak));

static void check_leaks(ck *c)
{
    enum { WARMUP = 3, ROUNDS = 30 };
    /* glibc's counts, or else LeakSanitizer's report */
    int lsan = heap_in_use() == 0 && __lsan_do_recoverable_leak_check;
    if (heap_in_use() == 0 && !lsan) {
        skip(c, "malloc here is neither glibc's nor LeakSanitizer's: no way to count what stays allocated");
        return;
    }
    ql_matrix_desc md;
    char name[96];
    float *w;
    ql_qstate *s;
    if (make_state(c, K_HEAVY, 33, 257, &md, name, sizeof name, &w, &s)) {
        free(w);
        return;
    }
    free_state(c, s, name);
    float *bad = malloc((size_t)(md.rows * md.cols) * sizeof *bad);
    gbuf out = {0};
    if (!bad || gb_new(&out, (size_t)(md.rows * md.cols) * 4, 1, NULL)) {
        fail(c, "out of memory");
        free(bad);
        free(w);
        return;
    }
    memcpy(bad, w, (size_t)(md.rows * md.cols) * sizeof *bad);
    bad[md.cols + 3] = NAN;
    size_t before = 0;
    for (int r = 0; r < WARMUP + ROUNDS && c->status == QL_CHECK_PASS; r++) {
        if (r == WARMUP) before = heap_in_use();
        leak_round(c, w, bad, &md, &out, name);
    }
    size_t after = heap_in_use();
    if (lsan) {
        stage("LeakSanitizer's leak check");
        if (c->status == QL_CHECK_PASS && __lsan_do_recoverable_leak_check())
            fail(c, "LeakSanitizer found a leak after %d rounds of create/destroy, quantize, save, load, materialize, "
                    "refused load and quantize, free_state (its report is on stderr)",
                 WARMUP + ROUNDS);
        note(c, "%d rounds of create/destroy, quantize, save, load, materialize, a refused load and a refused "
                "quantize, free_state: LeakSanitizer finds nothing unreachable",
             WARMUP + ROUNDS);
    }
    /* caches a plugin fills once belong to the warm-up rounds; what is
     * left after them grows with the rounds only if something leaks */
    else if (c->status == QL_CHECK_PASS && after > before + 4096)
        fail(c, "%d rounds of create/destroy, quantize, save, load, materialize, refused load and quantize, free_state "
                "left %zu bytes more allocated (about %zu a round): a leak, repeated for every layer of every model",
             ROUNDS, after - before, (after - before) / ROUNDS);
    if (!lsan)
        note(c, "%d rounds of create/destroy, quantize, save, load, materialize, a refused load and a refused "
                "quantize, free_state: %lld bytes of heap more after them than before (after %d warm-up rounds)",
             ROUNDS, (long long)after - (long long)before, WARMUP);
    gb_free(&out);
    free(bad);
    free(w);
}

static void check_matmul(ck *c)
{
    if (!c->d->matmul) {
        skip(c, "no matmul slot (optional)");
        return;
    }
    ql_matrix_desc md;
    char name[96];
    float *w;
    ql_qstate *s;
    if (make_state(c, K_GAUSS, 33, 257, &md, name, sizeof name, &w, &s)) {
        free(w);
        return;
    }
    const int64_t n = 5;
    gbuf dense = {0}, y = {0};
    float *x = calib_batch(n, md.cols, c->o->seed + 5);
    if (!x || gb_new(&y, (size_t)(n * md.rows) * 4, 1, NULL)) fail(c, "out of memory");
    else if (materialize_into(c, s, QL_DTYPE_F32, md.rows, md.cols, &dense, name))
        fail(c, "materialize() of %s failed: %s", name, pmsg());
    else {
        memset(y.data, 0xff, y.n);
        ql_error_clear();
        stage("matmul() of %s, %lld inputs", name, (long long)n);
        int rc = c->d->matmul(c->inst, s, x, n, (float *)y.data);
        if (rc) fail(c, "matmul() failed: %s", pmsg());
        else if (!gb_intact(&y)) fail(c, "matmul() wrote outside its [%lld, %lld] output", (long long)n, (long long)md.rows);
        else {
            const float *W = (const float *)dense.data, *Y = (const float *)y.data;
            double worst = 0;
            for (int64_t i = 0; i < n && c->status == QL_CHECK_PASS; i++)
                for (int64_t r = 0; r < md.rows; r++) {
                    double want = 0, mag = 0;
                    for (int64_t k = 0; k < md.cols; k++) {
                        want += (double)x[i * md.cols + k] * W[r * md.cols + k];
                        mag += fabs((double)x[i * md.cols + k] * W[r * md.cols + k]);
                    }
                    double err = fabs(Y[i * md.rows + r] - want) / (mag > 0 ? mag : 1);
                    worst = fmax(worst, err);
                    if (!(err <= 1e-4)) {
                        fail(c, "matmul() y[%lld, %lld] = %g, but x . materialize(W)^T = %g", (long long)i, (long long)r,
                             (double)Y[i * md.rows + r], want);
                        break;
                    }
                }
            note(c, "matmul() = x . materialize(W)^T within %.2g of the sum of |terms|", worst);
        }
    }
    free(x);
    gb_free(&dense);
    gb_free(&y);
    free_state(c, s, name);
    free(w);
}

static void check_calibration(ck *c)
{
    if (!c->d->calib_create) {
        skip(c, "not a data-aware plugin (no calibration slots)");
        return;
    }
    /* a calibration for other columns is refused */
    ql_matrix_desc m1 = {.name = "check.calib.4x20", .rows = 4, .cols = 20, .src_dtype = QL_DTYPE_BF16};
    ql_matrix_desc m2 = {.name = "check.calib.4x21", .rows = 4, .cols = 21, .src_dtype = QL_DTYPE_BF16};
    ql_calib *cal;
    int rc = calibrate(c, &m1, &cal);
    if (rc) {
        fail(c, "calibration of %s failed: %s", m1.name, pmsg());
        return;
    }
    float *w = matrix(K_GAUSS, 4, 21, c->o->seed);
    ql_qstate *s = NULL;
    ql_error_clear();
    stage("quantize_calibrated() of a 4x21 matrix with a calibration for 20 columns");
    rc = w ? c->d->quantize_calibrated(c->inst, &m2, w, cal, &s) : QL_ENOMEM;
    if (rc == QL_OK) {
        free_state(c, s, m2.name);
        fail(c, "quantize_calibrated() took a calibration of 20 input features for a matrix of 21");
    } else if (s) fail(c, "quantize_calibrated() failed but left *out set");
    else if (rc != QL_EINVAL) fail(c, "quantize_calibrated() with the wrong width returned %s, not QL_EINVAL: %s", ql_status_name(rc), pmsg());
    free(w);
    /* one calibration serves several matrices of its width (q, k and v) */
    for (int64_t rows = 3; rows <= 9 && c->status == QL_CHECK_PASS; rows += 6) {
        ql_matrix_desc m = {.name = rows == 3 ? "check.calib.3x20" : "check.calib.9x20", .rows = rows, .cols = 20,
                            .src_dtype = QL_DTYPE_BF16};
        float *wm = matrix(K_GAUSS, rows, 20, c->o->seed);
        ql_error_clear();
        stage("quantize_calibrated() of %s", m.name);
        rc = wm ? c->d->quantize_calibrated(c->inst, &m, wm, cal, &s) : QL_ENOMEM;
        if (rc) fail(c, "quantize_calibrated() of %s, the second matrix one calibration serves, failed: %s", m.name, pmsg());
        else {
            gbuf out;
            if (materialize_into(c, s, QL_DTYPE_F32, rows, 20, &out, m.name))
                fail(c, "materialize of %s failed: %s", m.name, pmsg());
            else check_finite_out(c, &out, rows * 20, m.name);
            gb_free(&out);
            free_state(c, s, m.name);
        }
        free(wm);
    }
    stage("calib_free()");
    c->d->calib_free(c->inst, cal);
    /* an instance that needs calibration refuses quantize() without it: a
     * program other than qlora may call it */
    if (c->calibrated && c->status == QL_CHECK_PASS) {
        float *wq = matrix(K_GAUSS, 4, 20, c->o->seed);
        ql_qstate *sq = NULL;
        ql_error_clear();
        stage("quantize() without calibration");
        rc = wq ? c->d->quantize(c->inst, &m1, wq, &sq) : QL_ENOMEM;
        if (rc == QL_OK) {
            free_state(c, sq, m1.name);
            fail(c, "quantize() without calibration returned QL_OK, though the plugin says it needs calibration");
        } else if (sq) fail(c, "quantize() without calibration failed but left *out set");
        else if (!ql_error_message()[0]) fail(c, "quantize() without calibration failed with no message to say why");
        free(wq);
    }
    if (c->d->calibration_needed) {
        stage("calibration_needed()");
        int need = c->d->calibration_needed(c->inst);
        if (need != 0 && need != 1) fail(c, "calibration_needed() returned %d, not 0 or 1", need);
    }
    note(c, "%s; quantize_calibrated refuses a calibration of another width (QL_EINVAL); one calibration serves two "
            "matrices",
         c->calibrated ? "every check quantized through calib_create, calib_feed x2, quantize_calibrated, calib_free; "
                         "quantize() alone is refused with a message"
                       : "calibration is optional here (the other checks quantize())");
}

#if QL_HAVE_CUDA
/* Rows [row0, row0 + nrows) on the device into an output of ld = cols +
 * pad, poisoned first; bit for bit the host's, padding untouched. */
static int device_rows(ck *c, const ql_qstate *s, void *const *dev, int dtype, const gbuf *want, int64_t cols,
                       int64_t row0, int64_t nrows, int64_t pad, const char *name)
{
    size_t es = esize(dtype);
    int64_t ld = cols + pad;
    size_t bytes = (size_t)(nrows * ld) * es;
    void *dout = NULL, *ws = NULL;
    unsigned char *got = malloc(bytes ? bytes : 1);
    stage("device_workspace() of %s", name);
    uint64_t wsb = c->d->device_workspace(c->inst, s, nrows);
    cudaError_t e = cudaMalloc(&dout, bytes ? bytes : 1);
    if (e == cudaSuccess && wsb) e = cudaMalloc(&ws, wsb);
    if (e == cudaSuccess) e = cudaMemset(dout, 0xff, bytes);
    if (e != cudaSuccess || !got) {
        fail(c, "CUDA: %s", got ? cudaGetErrorString(e) : "out of memory");
    } else {
        ql_device_out out = {.dtype = dtype, .data = dout, .ld = ld, .row0 = row0, .nrows = nrows};
        ql_error_clear();
        stage("materialize_rows_device(%s) of %s rows %lld..%lld, ld %lld", ql_dtype_name(dtype), name, (long long)row0,
              (long long)(row0 + nrows - 1), (long long)ld);
        int rc = c->d->materialize_rows_device(c->inst, s, (const void *const *)dev, &out, ws, wsb, NULL);
        if (rc) fail(c, "materialize_rows_device(%s) of %s failed: %s", ql_dtype_name(dtype), name, pmsg());
        else if ((e = cudaDeviceSynchronize()) != cudaSuccess || (e = cudaMemcpy(got, dout, bytes, cudaMemcpyDeviceToHost)))
            fail(c, "materialize_rows_device(%s) of %s: CUDA: %s", ql_dtype_name(dtype), name, cudaGetErrorString(e));
        else
            for (int64_t r = 0; r < nrows && c->status == QL_CHECK_PASS; r++) {
                const unsigned char *g = got + (size_t)(r * ld) * es;
                const char *w = want->data + (size_t)((row0 + r) * cols) * es;
                for (int64_t k = 0; k < cols; k++)
                    if (memcmp(g + k * es, w + k * es, es)) {
                        fail(c, "materialize_rows_device(%s) of %s rows %lld.. (ld %lld): row %lld column %lld differs "
                                "from materialize()",
                             ql_dtype_name(dtype), name, (long long)row0, (long long)ld, (long long)(row0 + r), (long long)k);
                        break;
                    }
                for (int64_t k = cols * (int64_t)es; k < ld * (int64_t)es && c->status == QL_CHECK_PASS; k++)
                    if (g[k] != 0xff)
                        fail(c, "materialize_rows_device(%s) of %s wrote the padding past column %lld of row %lld",
                             ql_dtype_name(dtype), name, (long long)cols, (long long)(row0 + r));
            }
    }
    free(got);
    if (dout) cudaFree(dout);
    if (ws) cudaFree(ws);
    return c->status == QL_CHECK_FAIL ? -1 : 0;
}
#endif

#if QL_HAVE_CUDA
/* quantize_device of the matrix w (uploaded as float32) is the state
 * quantize() made: the same saved bytes. */
static int device_quantize_same(ck *c, const ql_matrix_desc *md, const float *w, const ql_qstate *s, const char *name)
{
    size_t bytes = (size_t)(md->rows * md->cols) * sizeof *w;
    void *dw = NULL;
    cudaError_t e = cudaMalloc(&dw, bytes);
    if (e == cudaSuccess) e = cudaMemcpy(dw, w, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        if (dw) cudaFree(dw);
        return fail(c, "CUDA: uploading %s: %s", name, cudaGetErrorString(e));
    }
    ql_qstate *sd = NULL;
    tset a = {0}, b = {0};
    char why[512];
    ql_error_clear();
    stage("quantize_device(F32) of %s", name);
    int rc = c->d->quantize_device(c->inst, md, dw, QL_DTYPE_F32, NULL, &sd);
    cudaFree(dw);
    if (rc) fail(c, "quantize_device(F32) of %s failed: %s", name, pmsg());
    else if (!sd) fail(c, "quantize_device() of %s returned QL_OK and no state", name);
    else if (save_into(c, s, &a, name) || save_into(c, sd, &b, "the state quantize_device made"))
        fail(c, "save() failed: %s", pmsg());
    else if (!tset_equal(&a, &b, why, sizeof why))
        fail(c, "quantize_device(F32) of %s saves other tensors than quantize(): %s", name, why);
    tset_clear(&a);
    tset_clear(&b);
    free_state(c, sd, "the state quantize_device made");
    return c->status == QL_CHECK_FAIL ? -1 : 0;
}
#endif

static void check_cuda(ck *c)
{
    const ql_quantizer_desc *d = c->d;
    const int rows_dev = d->materialize_rows_device && d->device_buffers && d->device_workspace;
    /* a data-aware plugin quantizes in the calibration pass, on the CPU */
    const int quant_dev = d->quantize_device && !c->calibrated;
    if (!rows_dev && !quant_dev) {
        skip(c, "no device slots (device_buffers, device_workspace, materialize_rows_device; quantize_device)");
        return;
    }
#if !QL_HAVE_CUDA
    skip(c, "this qlora was built without CUDA, so the device slots cannot be run");
#else
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev < 1) {
        skip(c, "no CUDA device: %s", e != cudaSuccess ? cudaGetErrorString(e) : "none present");
        return;
    }
    static const int cases[][3] = {{K_GAUSS, 33, 257}, {K_HEAVY, 64, 172}, {K_GAUSS, 1, 63}};
    for (size_t i = 0; i < 3 && c->status == QL_CHECK_PASS; i++) {
        ql_matrix_desc md;
        char name[96];
        float *w;
        ql_qstate *s;
        if (make_state(c, cases[i][0], cases[i][1], cases[i][2], &md, name, sizeof name, &w, &s)) {
            free(w);
            break;
        }
        if (quant_dev) device_quantize_same(c, &md, w, s, name);
        if (!rows_dev) {
            free_state(c, s, name);
            free(w);
            continue;
        }
        ql_state_buffer bufs[QL_MAX_STATE_BUFFERS];
        void *dev[QL_MAX_STATE_BUFFERS] = {NULL};
        uint32_t nb = 0;
        int rc = QL_OK;
        if (c->status == QL_CHECK_PASS) {
            ql_error_clear();
            stage("device_buffers() of %s", name);
            rc = d->device_buffers(c->inst, s, bufs, &nb);
        }
        if (rc) fail(c, "device_buffers() of %s failed: %s", name, pmsg());
        else if (nb > QL_MAX_STATE_BUFFERS) fail(c, "device_buffers() gave %u buffers, more than %d", nb, QL_MAX_STATE_BUFFERS);
        for (uint32_t b = 0; b < nb && c->status == QL_CHECK_PASS; b++) {
            if (!bufs[b].align || (bufs[b].align & (bufs[b].align - 1)) || bufs[b].align > 256)
                fail(c, "device buffer %u ('%s') has alignment %llu, not a power of two from 1 to 256", b,
                     bufs[b].name ? bufs[b].name : "", (unsigned long long)bufs[b].align);
            else if ((e = cudaMalloc(&dev[b], bufs[b].bytes ? bufs[b].bytes : 1)) != cudaSuccess ||
                     (e = cudaMemcpy(dev[b], bufs[b].data, bufs[b].bytes, cudaMemcpyHostToDevice)) != cudaSuccess)
                fail(c, "CUDA: uploading device buffer %u: %s", b, cudaGetErrorString(e));
        }
        for (int dt = 0; dt < 2 && c->status == QL_CHECK_PASS; dt++) {
            int dtype = dt ? QL_DTYPE_F32 : QL_DTYPE_BF16;
            gbuf want;
            if (materialize_into(c, s, dtype, md.rows, md.cols, &want, name))
                fail(c, "materialize() of %s failed: %s", name, pmsg());
            else if (!device_rows(c, s, dev, dtype, &want, md.cols, 0, md.rows, 0, name)) {
                int64_t r0 = md.rows / 3, nr = md.rows - r0 > 1 ? (md.rows - r0) / 2 + 1 : md.rows - r0;
                device_rows(c, s, dev, dtype, &want, md.cols, r0, nr, 3, name);
            }
            gb_free(&want);
        }
        /* a row range past the end is refused, not written */
        if (c->status == QL_CHECK_PASS && i == 0) {
            void *dout = NULL;
            if ((e = cudaMalloc(&dout, (size_t)(2 * md.cols) * 4)) != cudaSuccess)
                fail(c, "CUDA: %s", cudaGetErrorString(e));
            else {
                ql_device_out bad = {.dtype = QL_DTYPE_F32, .data = dout, .ld = md.cols, .row0 = md.rows - 1, .nrows = 2};
                ql_error_clear();
                stage("materialize_rows_device() of rows %lld..%lld of a %lld-row matrix", (long long)(md.rows - 1),
                      (long long)md.rows, (long long)md.rows);
                rc = d->materialize_rows_device(c->inst, s, (const void *const *)dev, &bad, NULL, 0, NULL);
                cudaDeviceSynchronize();
                if (rc == QL_OK)
                    fail(c, "materialize_rows_device() took rows %lld..%lld of a %lld-row matrix", (long long)(md.rows - 1),
                         (long long)md.rows, (long long)md.rows);
                cudaFree(dout);
            }
        }
        for (uint32_t b = 0; b < nb && b < QL_MAX_STATE_BUFFERS; b++)
            if (dev[b]) cudaFree(dev[b]);
        free_state(c, s, name);
        free(w);
    }
    if (rows_dev)
        note(c, "materialize_rows_device = materialize() bit for bit (BF16, F32; whole matrices and a row range into a "
                "padded output) on 3 matrices; a row range past the end is refused%s",
             quant_dev ? "; quantize_device saves the bytes quantize() does" : "");
    else note(c, "quantize_device saves the bytes quantize() does, on 3 matrices (no device materialize slots)");
#endif
}

typedef void (*check_fn)(ck *c);

static const struct check {
    const char *id, *what;
    check_fn fn;
} checks[] = {
    {"load", "the loader's validation (descriptor, ABI, required slots), init() and create() of the options",
     check_load},
    {"slots", "optional slots the flags promise, slots that come together, NULL no-ops", check_slots},
    {"unknown-option", "an unknown option is refused naming the key", check_unknown_option},
    {"bad-value", "a bad value of each option is refused naming the key", check_bad_value},
    {"describe", "describe() fed back to create() describes the same; text buffers; checkpoint_config()",
     check_describe},
    {"quantize", "quantize -> materialize on 6 kinds of matrix at 7 awkward shapes: finite, error reported",
     check_quantize},
    {"non-finite", "NaN and Inf refused with QL_ENUMERIC naming the index", check_non_finite},
    {"determinism", "two quantizes of one matrix save the same bytes", check_determinism},
    {"save-load", "save -> load -> materialize is identical", check_save_load},
    {"bits-per-param", "state_info bytes = saved bytes; bits_per_param agrees", check_bits},
    {"bf16", "materialize(BF16) = materialize(F32) rounded to nearest even", check_bf16},
    {"tamper", "each saved tensor missing, retyped, reshaped, truncated, random: refused, never a crash", check_tamper},
    {"mutations", "a seeded loop of mutated saved tensors: errors, never a crash or an out-of-bounds access",
     check_mutations},
    {"threads", "materialize and quantize from several threads at once give the same bytes", check_threads},
    {"leaks", "rounds of everything a host does with a matrix, error paths too, leave no memory behind", check_leaks},
    {"matmul", "matmul() = x . materialize(W)^T (when the slot is there)", check_matmul},
    {"calibration", "the calibration slots of a data-aware plugin (ABI 1.3)", check_calibration},
    {"cuda", "device materialize and quantize bit-identical to the host's (device slots and a GPU)", check_cuda},
};
enum { NCHECKS = sizeof checks / sizeof checks[0] };

const char *ql_check_id(size_t i) { return i < NCHECKS ? checks[i].id : NULL; }
const char *ql_check_what(size_t i) { return i < NCHECKS ? checks[i].what : NULL; }

/* The child: load the plugin as the host would, run check k, send the
 * result line, close the plugin. */
static void child_main(const char *spec, size_t k, const ql_check_opts *o, int fd)
{
#ifdef __linux__
    /* a child left hanging dies with the checker, however that ends */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    /* A plugin never prints (docs/plugin-abi.md): what it writes to stdout
     * goes to a file of its own, never into the report, and fails the
     * check.  (Its stderr is the host's, which host->log writes to.) */
    FILE *captured = tmpfile();
    if (captured) dup2(fileno(captured), STDOUT_FILENO);
    else dup2(STDERR_FILENO, STDOUT_FILENO);
    stage_fd = fd;
    ck c = {.o = o, .status = QL_CHECK_PASS, .extra = json_object()};
    stage("dlopen(), init() and create() (loading the plugin)");
    int rc = ql_qz_open(spec, &c.q);
    if (rc) fail(&c, "%s", pmsg());
    else {
        c.d = c.q->desc;
        c.inst = c.q->inst;
        c.calibrated = ql_qz_needs_calibration(c.q) && ql_qz_can_calibrate(c.q);
        checks[k].fn(&c);
    }
    fflush(stdout);
    struct stat st;
    if (captured && fstat(fileno(captured), &st) == 0 && st.st_size > 0) {
        char head[81] = "";
        ssize_t got = pread(fileno(captured), head, sizeof head - 1, 0);
        head[got > 0 ? got : 0] = '\0';
        for (char *p = head; *p; p++)
            if (*p < 0x20 || *p > 0x7e) *p = ' ';
        fail(&c, "the plugin wrote %lld bytes to stdout during the check, beginning '%s': a plugin never prints "
                 "(host->log is for diagnostics)",
             (long long)st.st_size, head);
    }
    json_object_set_new(c.extra, "status", json_integer(c.status));
    json_object_set_new(c.extra, "reason", json_string(c.reason));
    char *text = json_dumps(c.extra, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(c.extra);
    if (text) {
        write_all(fd, "result ", 7);
        write_all(fd, text, strlen(text));
        write_all(fd, "\n", 1);
    }
    free(text);
    if (c.q) {
        stage("destroy() and dlclose() (closing the plugin, after the check)");
        ql_qz_close(c.q);
    }
    write_all(fd, "closed\n", 7);
    close(fd);
    _exit(0);
}

/* ---- the parent's side ---- */

static const char *signal_name(int sig)
{
    static const struct {
        int sig;
        const char *name;
    } names[] = {{SIGSEGV, "SIGSEGV"}, {SIGBUS, "SIGBUS"},   {SIGABRT, "SIGABRT"}, {SIGFPE, "SIGFPE"},
                 {SIGILL, "SIGILL"},   {SIGKILL, "SIGKILL"}, {SIGTERM, "SIGTERM"}, {SIGPIPE, "SIGPIPE"},
                 {SIGTRAP, "SIGTRAP"}, {SIGSYS, "SIGSYS"},   {SIGALRM, "SIGALRM"}, {SIGINT, "SIGINT"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].sig == sig) return names[i].name;
    return "a signal";
}

static char *xstrdup(const char *s) { return strdup(s ? s : ""); }

/* Run check k in a child; fill res, and *info with the result object. */
static int run_check(const char *spec, size_t k, const ql_check_opts *o, ql_check_result *res, json_t **info)
{
    *info = NULL;
    double t0 = ql_now();
    int fds[2];
    if (pipe(fds)) return ql_error(QL_EIO, "pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return ql_error(QL_EIO, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        close(fds[0]);
        child_main(spec, k, o, fds[1]);
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    /* Only the last stage line, the result line and "closed" matter; the
     * rest is read and dropped, so a long check never fills the pipe. */
    enum { line_max = 1 << 20 };
    char *line = malloc(line_max + 1), last_stage[400] = "", chunk[65536];
    if (!line) {
        close(fds[0]);
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        return ql_error(QL_ENOMEM, "out of memory");
    }
    size_t len = 0;
    int timed_out = 0, closed = 0, flooded = 0;
    json_t *result = NULL;
    double deadline = t0 + o->timeout_s;
    for (;;) {
        double left = deadline - ql_now();
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int pr = poll(&pfd, 1, left < 1e6 ? (int)(left * 1000) + 1 : 1000000000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) continue;
        ssize_t r = read(fds[0], chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        for (ssize_t i = 0; i < r; i++) {
            if (chunk[i] != '\n') {
                if (len < line_max) line[len++] = chunk[i];
                else flooded = 1;
                continue;
            }
            line[len] = '\0';
            if (!strncmp(line, "stage ", 6)) snprintf(last_stage, sizeof last_stage, "%s", line + 6);
            else if (!strncmp(line, "result ", 7) && !result) result = json_loads(line + 7, 0, NULL);
            else if (!strcmp(line, "closed")) closed = 1;
            len = 0;
        }
        if (flooded) break;
    }
    close(fds[0]);
    if (timed_out || flooded) kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    free(line);
    res->id = checks[k].id;
    res->what = checks[k].what;
    res->seconds = ql_now() - t0;
    char reason[2048];
    const char *where = last_stage[0] ? last_stage : "before the first plugin call";
    int st = QL_CHECK_FAIL;
    if (timed_out)
        snprintf(reason, sizeof reason, "no answer after %g s, in %s; stopped it (a hang)", o->timeout_s, where);
    else if (flooded) snprintf(reason, sizeof reason, "the child wrote a line longer than 1 MiB; stopped it");
    else if (WIFSIGNALED(status))
        snprintf(reason, sizeof reason, "crashed in %s: killed by signal %s (%s)", where, signal_name(WTERMSIG(status)),
                 strsignal(WTERMSIG(status)));
    else if (!result)
        snprintf(reason, sizeof reason, "the process exited with status %d in %s (a plugin must never exit)",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1, where);
    else if (!closed)
        snprintf(reason, sizeof reason, "the check ran, then the process exited with status %d in %s",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1, where);
    else {
        st = (int)json_integer_value(json_object_get(result, "status"));
        const char *r = json_string_value(json_object_get(result, "reason"));
        snprintf(reason, sizeof reason, "%s", r ? r : "");
        json_t *details = json_object_get(result, "details");
        if (details) res->details = json_dumps(details, JSON_COMPACT);
        *info = result;
        result = NULL;
    }
    json_decref(result);
    /* one line, whatever the plugin's messages hold */
    for (char *p = reason; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = ' ';
    res->status = st;
    res->reason = xstrdup(reason);
    return res->reason ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
}

static int in_list(const char *list, const char *id)
{
    size_t n = strlen(id);
    for (const char *p = list; *p;) {
        size_t l = strcspn(p, ",");
        if (l == n && !strncmp(p, id, n)) return 1;
        p += l + (p[l] == ',');
    }
    return 0;
}

int ql_check_plugin(const char *spec, const ql_check_opts *opts, ql_check_report *out)
{
    memset(out, 0, sizeof *out);
    if (opts->only) {
        for (const char *p = opts->only; *p;) {
            size_t l = strcspn(p, ",");
            size_t i = 0;
            while (i < NCHECKS && (strlen(checks[i].id) != l || strncmp(checks[i].id, p, l))) i++;
            if (i == NCHECKS) {
                char all[512];
                size_t k = 0;
                for (size_t j = 0; j < NCHECKS; j++) k += (size_t)snprintf(all + k, sizeof all - k, "%s%s", j ? ", " : "", checks[j].id);
                return ql_error(QL_EINVAL, "unknown check '%.*s' (the checks: %s)", (int)l, p, all);
            }
            p += l + (p[l] == ',');
        }
    }
    out->opts = *opts;
    out->opts.only = NULL;
    if (!(out->spec = strdup(spec)) || (opts->only && !(out->only = strdup(opts->only))) ||
        !(out->results = calloc(NCHECKS, sizeof *out->results)))
        return ql_error(QL_ENOMEM, "out of memory");
    ql_progress prog;
    ql_progress_begin(&prog, "check-plugin", NCHECKS, "checks", opts->progress);
    int loaded = 0;
    for (size_t k = 0; k < NCHECKS; k++) {
        ql_check_result *r = &out->results[out->n];
        json_t *info = NULL;
        /* the load check always runs: the others need to know it loads */
        int wanted = k == 0 || !opts->only || in_list(opts->only, checks[k].id);
        if (k > 0 && !loaded) {
            *r = (ql_check_result){.id = checks[k].id, .what = checks[k].what, .status = QL_CHECK_SKIP,
                                   .reason = xstrdup("the plugin does not load (see the load check)")};
        } else if (!wanted) {
            *r = (ql_check_result){.id = checks[k].id, .what = checks[k].what, .status = QL_CHECK_SKIP,
                                   .reason = xstrdup("not in --only")};
        } else {
            int rc = run_check(spec, k, opts, r, &info);
            if (rc) {
                ql_progress_end(&prog);
                return rc;
            }
        }
        if (!r->reason) return ql_error(QL_ENOMEM, "out of memory");
        out->n++;
        if (k == 0 && r->status == QL_CHECK_PASS && info) {
            loaded = 1;
            out->name = xstrdup(json_string_value(json_object_get(info, "name")));
            out->version = xstrdup(json_string_value(json_object_get(info, "version")));
            out->file = xstrdup(json_string_value(json_object_get(info, "file")));
            out->options = xstrdup(json_string_value(json_object_get(info, "options")));
            out->abi_major = (unsigned)json_integer_value(json_object_get(info, "abi_major"));
            out->abi_minor = (unsigned)json_integer_value(json_object_get(info, "abi_minor"));
        }
        json_decref(info);
        out->passed += r->status == QL_CHECK_PASS;
        out->failed += r->status == QL_CHECK_FAIL;
        out->skipped += r->status == QL_CHECK_SKIP;
        ql_progress_update(&prog, (int64_t)k + 1, checks[k].id);
    }
    ql_progress_end(&prog);
    return QL_OK;
}

static const char *status_word(int st) { return st == QL_CHECK_PASS ? "PASS" : st == QL_CHECK_SKIP ? "SKIP" : "FAIL"; }

char *ql_check_report_json(const ql_check_report *r)
{
    json_t *checks_j = json_array();
    for (size_t i = 0; i < r->n; i++) {
        json_t *c = json_pack("{s:s, s:s, s:s, s:s, s:f}", "id", r->results[i].id, "status",
                              status_word(r->results[i].status), "reason", r->results[i].reason, "what",
                              r->results[i].what, "seconds", r->results[i].seconds);
        if (c && r->results[i].details) json_object_set_new(c, "details", json_loads(r->results[i].details, 0, NULL));
        json_array_append_new(checks_j, c);
    }
    char abi[32];
    snprintf(abi, sizeof abi, "%u.%u", r->abi_major, r->abi_minor);
    /* what the run was, so that it can be repeated */
    json_t *run = json_pack("{s:I, s:i, s:i, s:f, s:s?}", "seed", (json_int_t)r->opts.seed, "mutations",
                            r->opts.mutations, "threads", r->opts.threads, "timeout_s", r->opts.timeout_s, "only",
                            r->only);
    json_t *j = json_pack("{s:s, s:s?, s:s?, s:s?, s:s?, s:s?, s:b, s:i, s:i, s:i, s:o, s:o}", "plugin", r->spec,
                          "name", r->name, "version", r->version, "file", r->file, "options", r->options, "abi",
                          r->name ? abi : NULL, "ok", r->failed == 0, "passed", r->passed, "failed", r->failed,
                          "skipped", r->skipped, "run", run, "checks", checks_j);
    char *text = j ? json_dumps(j, JSON_PRESERVE_ORDER | JSON_INDENT(2)) : NULL;
    json_decref(j);
    char *line = text ? malloc(strlen(text) + 2) : NULL;
    if (line) sprintf(line, "%s\n", text);
    free(text);
    return line;
}

void ql_check_report_free(ql_check_report *r)
{
    if (!r) return;
    for (size_t i = 0; i < r->n; i++) {
        free(r->results[i].reason);
        free(r->results[i].details);
    }
    free(r->results);
    free(r->spec);
    free(r->only);
    free(r->name);
    free(r->version);
    free(r->file);
    free(r->options);
    memset(r, 0, sizeof *r);
}
