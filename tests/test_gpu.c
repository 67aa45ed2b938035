/* The gpu suite: every device op against its CPU reference on fresh random
 * inputs.  Here: the quantizer plugins' device materialize (ABI 1.1
 * materialize_rows_device) is bit for bit their CPU materialize, for every
 * plugin and option set, at several shapes (vector and generic kernels),
 * whole matrices and row ranges into a strided output whose padding must
 * stay untouched; their device quantize (ABI 1.2 quantize_device) gives
 * the state quantize() gives, byte for byte, on weights with the cases that
 * break bit-exactness (zero blocks of either sign, subnormals, outliers,
 * extremes), and refuses bad weights with the CPU's message; and `qlora
 * quantize --device cuda` writes the files --device cpu writes.  Without a
 * CUDA device the suite says so and is skipped (exit 77).  The seed of each
 * run is printed; QLORA_GPU_SEED repeats one. */
#include <check.h>
#include <cuda_runtime.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qlora/llama.h"
#include "qlora/qlora.h"
#include "testutil.h"

static uint64_t seed;

#define CU(call)                                                                                         \
    do {                                                                                                 \
        cudaError_t e_ = (call);                                                                         \
        ck_assert_msg(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                      \
    } while (0)

static const struct {
    const char *spec;
    int64_t rows, cols;
} cases[] = {
    {"nf4", 1, 16},          {"nf4", 3, 100},          {"nf4", 128, 4096},     {"nf4", 777, 4160},
    {"nf4:double_quant=0", 96, 1024}, {"nf4:blocksize=128", 100, 4096}, {"nf4:blocksize=32", 17, 96},
    {"fp4", 5, 80},          {"fp4", 512, 2048},       {"fp4:double_quant=0", 64, 512},
    {"int8", 3, 100},        {"int8", 333, 4096},      {"nf4", 2048, 5504},
    /* optq: every width, rows and columns off the 32-code word, act_order's
     * permuted g_idx (calibrated on random inputs), one group a row */
    {"optq:rtn=1,bits=4,groupsize=128", 256, 1024}, {"optq:rtn=1,bits=3,groupsize=32", 77, 200},
    {"optq:rtn=1,bits=2,groupsize=64", 40, 96},     {"optq:rtn=1,bits=8,groupsize=-1", 33, 65},
    {"optq:rtn=1,bits=3,groupsize=128", 1, 31},     {"optq:bits=3,groupsize=32,act_order=1", 96, 160},
    {"optq:bits=4,groupsize=128,act_order=1,sym=1", 128, 512},
};

/* quantize(), or for a plugin instance that needs calibration a
 * calibration on random inputs then quantize_calibrated(). */
static int quantize_any(const ql_qz *q, const ql_matrix_desc *md, const float *w, uint64_t s0, ql_qstate **out)
{
    const ql_quantizer_desc *d = q->desc;
    int need = (d->flags & QL_QUANTIZER_NEEDS_CALIBRATION) && (!d->calibration_needed || d->calibration_needed(q->inst));
    if (!need) return d->quantize(q->inst, md, w, out);
    ql_calib *c = NULL;
    int rc = d->calib_create(q->inst, md, &c);
    if (rc) return rc;
    int64_t n = 64;
    float *x = malloc((size_t)(n * md->cols) * sizeof *x);
    tu_randn(x, (size_t)(n * md->cols), s0 ^ 0x5eedu, 1.0f);
    for (int64_t i = 0; i < n * md->cols; i++) x[i] *= 1.0f + (float)(i % md->cols % 7); /* unequal H diagonal: a real permutation */
    rc = d->calib_feed(q->inst, c, x, n);
    if (!rc) rc = d->quantize_calibrated(q->inst, md, w, c, out);
    d->calib_free(q->inst, c);
    free(x);
    return rc;
}

static size_t esize(int dtype) { return dtype == QL_DTYPE_BF16 ? 2 : 4; }

/* Materialize rows [row0, row0 + nrows) on the device into a buffer with ld
 * = cols + pad, poisoned first; compare with the CPU rows bit for bit and
 * check the padding was not written. */
static void check_rows(const ql_qz *q, const ql_qstate *s, void *const *dev_bufs, int dtype, const void *want,
                       int64_t rows, int64_t cols, int64_t row0, int64_t nrows, int64_t pad, const char *what)
{
    (void)rows;
    int64_t ld = cols + pad;
    size_t bytes = (size_t)(nrows * ld) * esize(dtype);
    void *dout;
    CU(cudaMalloc(&dout, bytes ? bytes : 1));
    CU(cudaMemset(dout, 0xff, bytes)); /* NaN in both dtypes: an unwritten element cannot pass */
    uint64_t ws_bytes = q->desc->device_workspace(q->inst, s, nrows);
    void *ws = NULL;
    if (ws_bytes) CU(cudaMalloc(&ws, ws_bytes));
    ql_device_out out = {.dtype = dtype, .data = dout, .ld = ld, .row0 = row0, .nrows = nrows};
    ck_assert_msg(q->desc->materialize_rows_device(q->inst, s, (const void *const *)dev_bufs, &out, ws, ws_bytes, NULL) ==
                      QL_OK,
                  "%s: %s", what, ql_error_message());
    CU(cudaDeviceSynchronize());
    unsigned char *got = malloc(bytes ? bytes : 1);
    CU(cudaMemcpy(got, dout, bytes, cudaMemcpyDeviceToHost));
    size_t es = esize(dtype);
    for (int64_t r = 0; r < nrows; r++) {
        const unsigned char *g = got + (size_t)(r * ld) * es, *w = (const unsigned char *)want + (size_t)((row0 + r) * cols) * es;
        for (int64_t c = 0; c < cols; c++)
            if (memcmp(g + c * es, w + c * es, es)) {
                uint32_t gv = 0, wv = 0;
                memcpy(&gv, g + c * es, es);
                memcpy(&wv, w + c * es, es);
                ck_abort_msg("%s (seed %llu): row %lld col %lld: device 0x%x, CPU 0x%x", what, (unsigned long long)seed,
                             (long long)(row0 + r), (long long)c, gv, wv);
            }
        for (int64_t c = cols; c < ld; c++)
            for (size_t b = 0; b < es; b++)
                ck_assert_msg(g[c * es + b] == 0xff, "%s: padding at row %lld col %lld was written", what,
                              (long long)(row0 + r), (long long)c);
    }
    free(got);
    CU(cudaFree(dout));
    if (ws) CU(cudaFree(ws));
}

START_TEST(materialize_matches_cpu)
{
    const char *spec = cases[_i].spec;
    int64_t rows = cases[_i].rows, cols = cases[_i].cols;
    ql_qz *q = NULL;
    ck_assert_msg(ql_qz_open(spec, &q) == QL_OK, "%s", ql_error_message());
    ck_assert_msg(q->desc->materialize_rows_device && q->desc->device_buffers && q->desc->device_workspace,
                  "plugin %s was built without its device slots", spec);
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    tu_randn(w, (size_t)(rows * cols), seed + (uint64_t)_i, 0.02f);
    w[(rows * cols) / 2] = 0.0f; /* a zero and an outlier in every matrix */
    w[(rows * cols) / 3] *= 40.0f;
    ql_matrix_desc md = {.name = "test", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
    ql_qstate *s = NULL;
    ck_assert_msg(quantize_any(q, &md, w, seed + (uint64_t)_i, &s) == QL_OK, "%s", ql_error_message());
    ql_state_buffer bufs[QL_MAX_STATE_BUFFERS];
    uint32_t nb = 0;
    ck_assert_int_eq(q->desc->device_buffers(q->inst, s, bufs, &nb), QL_OK);
    ck_assert(nb >= 1 && nb <= QL_MAX_STATE_BUFFERS);
    void *dev[QL_MAX_STATE_BUFFERS];
    for (uint32_t i = 0; i < nb; i++) {
        CU(cudaMalloc(&dev[i], bufs[i].bytes ? bufs[i].bytes : 1));
        ck_assert_msg((uintptr_t)dev[i] % bufs[i].align == 0, "cudaMalloc alignment below %llu",
                      (unsigned long long)bufs[i].align);
        CU(cudaMemcpy(dev[i], bufs[i].data, bufs[i].bytes, cudaMemcpyHostToDevice));
    }
    for (int d = 0; d < 2; d++) {
        int dtype = d ? QL_DTYPE_F32 : QL_DTYPE_BF16;
        void *want = malloc((size_t)(rows * cols) * esize(dtype));
        ck_assert_int_eq(q->desc->materialize(q->inst, s, dtype, want), QL_OK);
        char what[160];
        snprintf(what, sizeof what, "%s [%lld, %lld] %s", spec, (long long)rows, (long long)cols, d ? "f32" : "bf16");
        check_rows(q, s, dev, dtype, want, rows, cols, 0, rows, 0, what);
        check_rows(q, s, dev, dtype, want, rows, cols, 0, rows, 8, what); /* ld = cols + 8: still 16-byte rows when cols allows */
        int64_t r0 = rows / 3, nr = rows - r0 > 1 ? (rows - r0) / 2 + 1 : rows - r0;
        check_rows(q, s, dev, dtype, want, rows, cols, r0, nr, 3, what); /* odd ld: the generic kernel */
        free(want);
    }
    /* a row range past the end is refused with a message */
    ql_device_out bad = {.dtype = QL_DTYPE_BF16, .data = dev[0], .ld = cols, .row0 = rows - 1, .nrows = 2};
    ck_assert_int_eq(q->desc->materialize_rows_device(q->inst, s, (const void *const *)dev, &bad, NULL, 0, NULL), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "do not fit");
    for (uint32_t i = 0; i < nb; i++) CU(cudaFree(dev[i]));
    q->desc->free_state(q->inst, s);
    free(w);
    ql_qz_close(q);
}
END_TEST

/* ---- device quantize (ABI 1.2 quantize_device) ---- */

static const struct {
    const char *spec;
    int64_t rows, cols;
    int64_t unit; /* the 4-bit blocksize, 0 for int8 (a row) */
} qcases[] = {
    {"nf4", 1, 16, 64},
    {"nf4", 3, 101, 64},                    /* 303 weights: an odd tail, a short last block */
    {"nf4", 257, 999, 64},                  /* 4012 blocks: the mean's vector path, one thread block */
    {"nf4", 2048, 4160, 64},                /* 133120 blocks: the mean split over 17 blocks */
    {"nf4:double_quant=0", 96, 1000, 64},
    {"nf4:double_quant=0", 5, 77, 64},
    {"nf4:blocksize=128", 100, 4095, 128},
    {"nf4:blocksize=32", 17, 95, 32},
    {"nf4:blocksize=32,double_quant=0", 9, 31, 32},
    {"nf4:blocksize=4096", 3, 5001, 4096},
    {"fp4", 5, 81, 64},
    {"fp4", 512, 2048, 64},
    {"fp4:double_quant=0", 64, 513, 64},
    {"fp4:blocksize=256", 33, 1111, 256},
    {"int8", 1, 1, 0},
    {"int8", 3, 100, 0},
    {"int8", 64, 1, 0},
    {"int8", 333, 4097, 0},
};

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1); /* nearest even; the weights here are finite */
    return (uint16_t)(u >> 16);
}

/* Random weights with what bit-exactness trips on: outliers, zeros of both
 * signs, whole blocks of zeros (the sign of a block's last zero is its
 * absmax's), of subnormals (flushed: absmax +0) and of tiny values, and
 * values near the extremes each format accepts.  unit: the elements of one
 * block (4-bit) or one row (int8).  bf16: extremes that survive bfloat16. */
static void fill_weights(float *w, int64_t n, int64_t unit, int int8, int bf16, uint64_t s)
{
    tu_randn(w, (size_t)n, s, 0.02f);
    w[n / 3] *= 40.0f;
    w[(2 * n) / 3] *= -100.0f;
    w[n / 2] = 0.0f;
    w[n - 1] = -0.0f;
    if (n > 1) w[1] = 1e-40f;
    if (n > 7) w[7] = -3e-39f;
    for (int64_t i = unit; i < 2 * unit && 2 * unit <= n; i++) w[i] = (i & 1) ? -0.0f : 0.0f; /* ends on -0 */
    for (int64_t i = 2 * unit; i < 3 * unit && 3 * unit <= n; i++) w[i] = (i & 1) ? 0.0f : -0.0f; /* ends on +0 */
    for (int64_t i = 3 * unit; i < 4 * unit && 4 * unit <= n; i++) w[i] = (i & 1) ? -1e-39f : 2e-39f;
    float tiny = int8 ? 2e-5f : 1e-28f; /* int8: float16 subnormals after the row scale */
    for (int64_t i = 4 * unit; i < 5 * unit && 5 * unit <= n; i++) w[i] *= tiny;
    if (n >= 12) {
        if (int8) {
            /* below 65520, where float16 overflows (in bf16, 65504 rounds up to 65536) */
            w[n / 5] = bf16 ? 65280.0f : 65519.0f;
            w[n / 7] = bf16 ? -65024.0f : -65504.0f;
            w[n / 9] = 5.9604645e-8f; /* the smallest float16 subnormal */
            w[n / 11] = 2.9802322e-8f; /* half of it: a tie, rounds to 0 */
        } else {
            w[n / 5] = 3e38f; /* its reciprocal is flushed to 0 */
            w[n / 7] = -1e37f;
            w[n / 9] = 1.1754944e-38f; /* the smallest normal */
        }
    }
    if (bf16)
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)to_bf16(w[i]) << 16;
            memcpy(&w[i], &u, 4);
        }
}

/* The tensors a save() writes, copied. */
typedef struct saved {
    int n;
    struct {
        char name[160];
        int32_t dtype, ndim;
        int64_t shape[QL_MAX_DIMS];
        uint64_t nbytes;
        unsigned char *data;
    } t[16];
} saved;

static int collect(void *ctx, const ql_tensor *t)
{
    saved *s = ctx;
    ck_assert_int_lt(s->n, 16);
    snprintf(s->t[s->n].name, sizeof s->t[s->n].name, "%s", t->name);
    s->t[s->n].dtype = t->dtype;
    s->t[s->n].ndim = t->ndim;
    memcpy(s->t[s->n].shape, t->shape, sizeof t->shape);
    s->t[s->n].nbytes = t->nbytes;
    s->t[s->n].data = malloc(t->nbytes ? t->nbytes : 1);
    memcpy(s->t[s->n].data, t->data, t->nbytes);
    s->n++;
    return QL_OK;
}

static void saved_free(saved *s)
{
    for (int i = 0; i < s->n; i++) free(s->t[i].data);
    s->n = 0;
}

static void same_bytes(const char *what, const char *piece, const void *dev, const void *cpu, uint64_t n)
{
    const unsigned char *d = dev, *c = cpu;
    for (uint64_t i = 0; i < n; i++)
        if (d[i] != c[i])
            ck_abort_msg("%s (seed %llu): %s differs at byte %llu of %llu: device 0x%02x, CPU 0x%02x", what,
                         (unsigned long long)seed, piece, (unsigned long long)i, (unsigned long long)n, d[i], c[i]);
}

/* Everything of the device state against the CPU state: the device
 * buffers, every saved tensor (the 4-bit offset lives only in the saved
 * quant_state JSON), state_info and the materialized weights. */
static void same_state(const ql_qz *q, const ql_qstate *dev, const ql_qstate *cpu, int64_t rows, int64_t cols,
                       const char *what)
{
    ql_state_buffer bd[QL_MAX_STATE_BUFFERS], bc[QL_MAX_STATE_BUFFERS];
    uint32_t nd = 0, nc = 0;
    ck_assert_int_eq(q->desc->device_buffers(q->inst, dev, bd, &nd), QL_OK);
    ck_assert_int_eq(q->desc->device_buffers(q->inst, cpu, bc, &nc), QL_OK);
    ck_assert_msg(nd == nc && nc >= 1, "%s: %u device buffers, CPU %u", what, nd, nc);
    for (uint32_t i = 0; i < nc; i++) {
        ck_assert_str_eq(bd[i].name, bc[i].name);
        ck_assert_msg(bd[i].bytes == bc[i].bytes, "%s: buffer %s has %llu bytes, CPU %llu", what, bc[i].name,
                      (unsigned long long)bd[i].bytes, (unsigned long long)bc[i].bytes);
        same_bytes(what, bc[i].name, bd[i].data, bc[i].data, bc[i].bytes);
    }
    saved sd = {0}, sc = {0};
    ql_tensor_writer wd = {&sd, collect}, wc = {&sc, collect};
    ck_assert_int_eq(q->desc->save(q->inst, dev, &wd), QL_OK);
    ck_assert_int_eq(q->desc->save(q->inst, cpu, &wc), QL_OK);
    ck_assert_msg(sd.n == sc.n, "%s: save wrote %d tensors, CPU %d", what, sd.n, sc.n);
    for (int i = 0; i < sc.n; i++) {
        ck_assert_str_eq(sd.t[i].name, sc.t[i].name);
        ck_assert_int_eq(sd.t[i].dtype, sc.t[i].dtype);
        ck_assert_int_eq(sd.t[i].ndim, sc.t[i].ndim);
        ck_assert(memcmp(sd.t[i].shape, sc.t[i].shape, sizeof sc.t[i].shape) == 0);
        ck_assert_msg(sd.t[i].nbytes == sc.t[i].nbytes, "%s: saved %s has %llu bytes, CPU %llu", what, sc.t[i].name,
                      (unsigned long long)sd.t[i].nbytes, (unsigned long long)sc.t[i].nbytes);
        same_bytes(what, sc.t[i].name, sd.t[i].data, sc.t[i].data, sc.t[i].nbytes);
    }
    saved_free(&sd);
    saved_free(&sc);
    ql_state_info id = {0}, ic = {0};
    ck_assert_int_eq(q->desc->state_info(q->inst, dev, &id), QL_OK);
    ck_assert_int_eq(q->desc->state_info(q->inst, cpu, &ic), QL_OK);
    ck_assert(id.rows == ic.rows && id.cols == ic.cols && id.src_dtype == ic.src_dtype && id.bytes == ic.bytes);
    size_t bytes = (size_t)(rows * cols) * 4;
    float *md = malloc(bytes), *mc = malloc(bytes);
    ck_assert_int_eq(q->desc->materialize(q->inst, dev, QL_DTYPE_F32, md), QL_OK);
    ck_assert_int_eq(q->desc->materialize(q->inst, cpu, QL_DTYPE_F32, mc), QL_OK);
    same_bytes(what, "materialized weights", md, mc, bytes);
    free(md);
    free(mc);
}

START_TEST(quantize_matches_cpu)
{
    const char *spec = qcases[_i].spec;
    int64_t rows = qcases[_i].rows, cols = qcases[_i].cols, n = rows * cols;
    int int8 = qcases[_i].unit == 0;
    int64_t unit = int8 ? cols : qcases[_i].unit;
    ql_qz *q = NULL;
    ck_assert_msg(ql_qz_open(spec, &q) == QL_OK, "%s", ql_error_message());
    ck_assert_msg(q->desc->quantize_device != NULL, "plugin %s was built without quantize_device", spec);
    float *w = malloc((size_t)n * sizeof *w);
    uint16_t *w16 = malloc((size_t)n * sizeof *w16);
    void *dw;
    CU(cudaMalloc(&dw, (size_t)n * 4));
    for (int bf16 = 0; bf16 < 2; bf16++) {
        fill_weights(w, n, unit, int8, bf16, seed + 1000 * (uint64_t)_i + (uint64_t)bf16);
        if (bf16) {
            for (int64_t i = 0; i < n; i++) w16[i] = to_bf16(w[i]); /* exact: w is already bf16 */
            CU(cudaMemcpy(dw, w16, (size_t)n * 2, cudaMemcpyHostToDevice));
        } else {
            CU(cudaMemcpy(dw, w, (size_t)n * 4, cudaMemcpyHostToDevice));
        }
        char what[160];
        snprintf(what, sizeof what, "%s [%lld, %lld] from %s", spec, (long long)rows, (long long)cols,
                 bf16 ? "bf16" : "f32");
        ql_matrix_desc md = {.name = "test", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
        ql_qstate *cpu = NULL, *dev = NULL;
        ck_assert_msg(q->desc->quantize(q->inst, &md, w, &cpu) == QL_OK, "%s: %s", what, ql_error_message());
        ck_assert_msg(q->desc->quantize_device(q->inst, &md, dw, bf16 ? QL_DTYPE_BF16 : QL_DTYPE_F32, NULL, &dev) == QL_OK,
                      "%s: %s", what, ql_error_message());
        same_state(q, dev, cpu, rows, cols, what);
        q->desc->free_state(q->inst, dev);
        q->desc->free_state(q->inst, cpu);
    }
    CU(cudaFree(dw));
    free(w16);
    free(w);
    ql_qz_close(q);
}
END_TEST

/* Weights quantize() refuses are refused on the device with the same
 * status and message: the first NaN or Inf (int8: or a value float16
 * cannot hold), whatever comes after it; an unknown dtype is QL_ENOTSUP. */
START_TEST(quantize_refuses_like_cpu)
{
    const char *specs[] = {"nf4", "fp4:double_quant=0", "int8"};
    const int64_t rows = 7, cols = 50, n = rows * cols;
    for (size_t k = 0; k < 3; k++) {
        ql_qz *q = NULL;
        ck_assert_msg(ql_qz_open(specs[k], &q) == QL_OK, "%s", ql_error_message());
        ck_assert_msg(q->desc->quantize_device != NULL, "plugin %s was built without quantize_device", specs[k]);
        float *w = malloc((size_t)n * sizeof *w);
        void *dw;
        CU(cudaMalloc(&dw, (size_t)n * 4));
        for (int variant = 0; variant < 3; variant++) {
            tu_randn(w, (size_t)n, seed + k, 0.02f);
            w[300] = NAN;
            w[123] = variant == 0 ? NAN : variant == 1 ? -INFINITY : 70000.0f; /* 70000: int8 only */
            CU(cudaMemcpy(dw, w, (size_t)n * 4, cudaMemcpyHostToDevice));
            ql_matrix_desc md = {.name = "bad", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
            ql_qstate *cpu = NULL, *dev = NULL;
            int rc_cpu = q->desc->quantize(q->inst, &md, w, &cpu);
            char msg_cpu[1024];
            snprintf(msg_cpu, sizeof msg_cpu, "%s", ql_error_message());
            int rc_dev = q->desc->quantize_device(q->inst, &md, dw, QL_DTYPE_F32, NULL, &dev);
            ck_assert_msg(rc_cpu == QL_ENUMERIC, "%s variant %d: CPU status %d", specs[k], variant, rc_cpu);
            ck_assert_msg(rc_dev == rc_cpu, "%s variant %d: device status %d, CPU %d (%s)", specs[k], variant, rc_dev,
                          rc_cpu, ql_error_message());
            ck_assert_ptr_null(dev);
            ck_assert_str_eq(ql_error_message(), msg_cpu);
            /* 70000 is fine for the 4-bit formats: their first bad weight is then w[300] */
            const char *first = variant == 2 && k < 2 ? "index 300" : "index 123";
            ck_assert_msg(strstr(msg_cpu, first) != NULL, "expected \"%s\" in: %s", first, msg_cpu);
        }
        ql_matrix_desc md = {.name = "f16", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
        ql_qstate *dev = NULL;
        ck_assert_int_eq(q->desc->quantize_device(q->inst, &md, dw, QL_DTYPE_F16, NULL, &dev), QL_ENOTSUP);
        ck_assert_ptr_null(dev);
        CU(cudaFree(dw));
        free(w);
        ql_qz_close(q);
    }
}
END_TEST

/* Every file of --device cpu's output folder is in --device cuda's, byte
 * for byte, and nothing else is. */
static void same_folder(const char *cuda_dir, const char *cpu_dir, const char *what)
{
    DIR *d = opendir(cpu_dir);
    ck_assert_msg(d != NULL, "%s: cannot open %s", what, cpu_dir);
    int files = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *a = ql_path_join(cuda_dir, e->d_name), *b = ql_path_join(cpu_dir, e->d_name);
        char *da = NULL, *db = NULL;
        size_t la = 0, lb = 0;
        ck_assert_msg(ql_read_file(b, &db, &lb) == QL_OK, "%s: %s", what, ql_error_message());
        ck_assert_msg(ql_read_file(a, &da, &la) == QL_OK, "%s: %s is missing from the cuda output (%s)", what,
                      e->d_name, ql_error_message());
        size_t at = 0;
        while (at < la && at < lb && da[at] == db[at]) at++;
        ck_assert_msg(la == lb && at == la, "%s: %s differs (cuda %zu bytes, cpu %zu) from byte %zu", what, e->d_name,
                      la, lb, at);
        free(da);
        free(db);
        free(a);
        free(b);
        files++;
    }
    closedir(d);
    int cuda_files = 0;
    d = opendir(cuda_dir);
    ck_assert_msg(d != NULL, "%s: cannot open %s", what, cuda_dir);
    while ((e = readdir(d))) cuda_files += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    ck_assert_msg(files >= 2 && cuda_files == files, "%s: %d files from cpu, %d from cuda", what, files, cuda_files);
}

/* Quantize on load with --device cuda (ql_llama_load_opts.device): a bf16
 * checkpoint's bytes go to the GPU as they are, and every state is the one
 * the CPU load makes, byte for byte. */
START_TEST(quantize_on_load_matches_cpu)
{
    enum { H = 256, I = 704, V = 128 };
    const char *specs[] = {"nf4", "nf4:double_quant=0", "fp4", "int8"};
    char dir[512];
    snprintf(dir, sizeof dir, "%s/bf16-model", tu_tmpdir());
    const int B = QL_DTYPE_BF16;
    const tu_tensor t[] = {
        {"model.embed_tokens.weight", B, 2, {V, H}, NULL},
        {"model.norm.weight", B, 1, {H}, NULL},
        {"model.layers.0.input_layernorm.weight", B, 1, {H}, NULL},
        {"model.layers.0.post_attention_layernorm.weight", B, 1, {H}, NULL},
        {"model.layers.0.self_attn.q_proj.weight", B, 2, {H, H}, NULL},
        {"model.layers.0.self_attn.k_proj.weight", B, 2, {H / 2, H}, NULL},
        {"model.layers.0.self_attn.v_proj.weight", B, 2, {H / 2, H}, NULL},
        {"model.layers.0.self_attn.o_proj.weight", B, 2, {H, H}, NULL},
        {"model.layers.0.mlp.gate_proj.weight", B, 2, {I, H}, NULL},
        {"model.layers.0.mlp.up_proj.weight", B, 2, {I, H}, NULL},
        {"model.layers.0.mlp.down_proj.weight", B, 2, {H, I}, NULL},
    };
    char cfg[512];
    snprintf(cfg, sizeof cfg,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": %d, "
             "\"intermediate_size\": %d, \"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
             "\"vocab_size\": %d, \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-5, \"torch_dtype\": \"bfloat16\"}",
             H, I, V);
    tu_write_model(dir, t, sizeof t / sizeof t[0], cfg);
    for (size_t k = 0; k < sizeof specs / sizeof specs[0]; k++) {
        ql_llama *mc = NULL, *mg = NULL;
        ql_llama_load_opts lc = {.quantizer = specs[k], .device = "cpu"}, lg = {.quantizer = specs[k], .device = "cuda"};
        ck_assert_msg(ql_llama_load(dir, &lc, &mc) == QL_OK, "%s", ql_error_message());
        ck_assert_msg(ql_llama_load(dir, &lg, &mg) == QL_OK, "%s", ql_error_message());
        ql_llama_layer *a = ql_llama_layers(mg), *b = ql_llama_layers(mc);
        ql_linear *la[] = {&a->q, &a->k, &a->v, &a->o, &a->gate, &a->up, &a->down};
        ql_linear *lb[] = {&b->q, &b->k, &b->v, &b->o, &b->gate, &b->up, &b->down};
        for (size_t j = 0; j < 7; j++) {
            char what[160];
            snprintf(what, sizeof what, "%s: %s on load", specs[k], lb[j]->name);
            ck_assert_msg(la[j]->state && lb[j]->state, "%s: no state", what);
            same_state(lb[j]->qz, la[j]->state, lb[j]->state, lb[j]->out, lb[j]->in, what);
        }
        ql_llama_destroy(mg);
        ql_llama_destroy(mc);
    }
}
END_TEST

START_TEST(quantize_cli_device_matches_cpu)
{
    const char *specs[] = {"nf4", "nf4:double_quant=0", "fp4", "int8"};
    char model[1024], dir[256];
    snprintf(model, sizeof model, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(dir, sizeof dir, "%s", tu_tmpdir());
    for (size_t k = 0; k < sizeof specs / sizeof specs[0]; k++) {
        char cmd[4096], cuda_dir[512], cpu_dir[512];
        snprintf(cuda_dir, sizeof cuda_dir, "%s/cuda%zu", dir, k);
        snprintf(cpu_dir, sizeof cpu_dir, "%s/cpu%zu", dir, k);
        char *out = NULL, *err = NULL;
        snprintf(cmd, sizeof cmd, "'%s' quantize --quiet '--quantizer=%s' --device cuda '%s' -o '%s'", tu_env("QLORA_BIN"),
                 specs[k], model, cuda_dir);
        int st = tu_run(cmd, &out, &err);
        ck_assert_msg(st == 0, "%s: exit %d: %s", cmd, st, err);
        ck_assert_msg(strstr(out, " on cuda") != NULL, "%s did not quantize on the GPU:\n%s%s", cmd, out, err);
        free(out);
        free(err);
        snprintf(cmd, sizeof cmd, "'%s' quantize --quiet '--quantizer=%s' --device cpu '%s' -o '%s'", tu_env("QLORA_BIN"),
                 specs[k], model, cpu_dir);
        st = tu_run(cmd, &out, &err);
        ck_assert_msg(st == 0, "%s: exit %d: %s", cmd, st, err);
        free(out);
        free(err);
        same_folder(cuda_dir, cpu_dir, specs[k]);
    }
    /* a plugin without quantize_device quantizes on the CPU, with a warning */
    const char *example = getenv("QLORA_EXAMPLE_PLUGIN");
    if (!example || !*example) {
        printf("gpu suite: QLORA_EXAMPLE_PLUGIN is not set; the fallback of a plugin without quantize_device is not checked\n");
        return;
    }
    char cmd[4096];
    char *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "'%s' quantize --quiet '--quantizer=%s' --device cuda '%s' -o '%s/example'",
             tu_env("QLORA_BIN"), example, model, dir);
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "%s: exit %d: %s", cmd, st, err);
    ck_assert_msg(strstr(err, "has no device quantize") != NULL && strstr(out, " on cuda") == NULL,
                  "%s: no fallback warning:\n%s%s", cmd, out, err);
    free(out);
    free(err);
}
END_TEST

/* `qlora study --device cuda`: the dense baseline and quantized runs, each in
 * its own process, train on the GPU.  Quantized runs used to fail ("nf4
 * materialize on the GPU: invalid argument", or a hang): the study opens every
 * plugin before CUDA starts and the run's compare closes and opens it again
 * (core/plugin.c, RTLD_NODELETE). */
START_TEST(study_on_the_gpu)
{
    char cmd[8192], dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/study", tu_tmpdir());
    snprintf(cmd, sizeof cmd,
             "timeout -k 5 400 '%s' study --model '%s/models/stories260K' --data '%s/data/alpaca/alpaca_en_demo.json' "
             "--format alpaca --quantizers none,nf4,int8 --seeds 0 --steps 6 --grad-accum 1 --batch-size 2 --max-len 128 "
             "--lora-r 8 --lr 1e-3 --eval-dataset-size 20 --device cuda --output '%s'",
             tu_env("QLORA_BIN"), tu_env("QLORA_SHARED"), tu_env("QLORA_SHARED"), dir);
    char *out = NULL, *err = NULL;
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "%s: exit %d:\n%s%s", cmd, st, out, err);
    free(out);
    free(err);
    snprintf(path, sizeof path, "%s/study.json", dir);
    json_error_t je;
    json_t *doc = json_load_file(path, 0, &je);
    ck_assert_msg(doc != NULL, "%s: %s", path, je.text);
    json_t *runs = json_object_get(doc, "runs"), *run;
    ck_assert_int_eq(json_array_size(runs), 3);
    size_t k;
    double none_before = NAN;
    json_array_foreach(runs, k, run) {
        const char *id = json_string_value(json_object_get(run, "id"));
        ck_assert_msg(!strcmp(json_string_value(json_object_get(run, "status")), "done"), "run %s: %s (%s)", id,
                      json_string_value(json_object_get(run, "status")),
                      json_string_value(json_object_get(run, "error")));
        ck_assert_str_eq(json_string_value(json_object_get(run, "device")), "cuda");
        ck_assert_str_eq(json_string_value(json_object_get(run, "precision")), "bf16");
        double before = json_number_value(json_object_get(json_object_get(run, "before"), "nll"));
        double after = json_number_value(json_object_get(json_object_get(run, "after"), "nll"));
        ck_assert_msg(isfinite(before) && before > 1 && before < 10, "run %s: eval NLL before %g", id, before);
        ck_assert_msg(after < before - 0.05, "run %s: eval NLL %g after finetuning, %g before", id, after, before);
        if (k == 0) none_before = before;
        else /* the 4- and 8-bit bases are near the dense one, and not it */
            ck_assert_msg(fabs(before - none_before) < 0.5 && before != none_before, "run %s: NLL before %g, none's %g",
                          id, before, none_before);
        json_int_t plan = json_integer_value(json_object_get(run, "device_plan_bytes"));
        ck_assert_msg(plan > 100000 && plan < ((json_int_t)1 << 30), "run %s: device plan of %lld bytes", id, (long long)plan);
        ck_assert_double_gt(json_number_value(json_object_get(run, "tokens_per_s")), 100);
    }
    json_decref(doc);
}
END_TEST

int main(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("gpu suite: no CUDA device (%s); skipped\n", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return 77;
    }
    const char *fixed = getenv("QLORA_GPU_SEED");
    seed = fixed ? strtoull(fixed, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    printf("gpu suite: seed %llu (QLORA_GPU_SEED=%llu repeats it)\n", (unsigned long long)seed, (unsigned long long)seed);
    Suite *s = suite_create("gpu");
    TCase *t = tcase_create("materialize");
    tcase_set_timeout(t, 600);
    tcase_add_loop_test(t, materialize_matches_cpu, 0, (int)(sizeof cases / sizeof cases[0]));
    suite_add_tcase(s, t);
    /* scripts/gpu-check reruns the suite once per materialize kernel
     * variant; the quantize kernels have none, so they run with the default
     * variant only */
    const char *variant = getenv("QLP_MATERIALIZE_VARIANT");
    if (!variant || !strcmp(variant, "5")) {
        TCase *tq = tcase_create("quantize");
        tcase_set_timeout(tq, 600);
        tcase_add_loop_test(tq, quantize_matches_cpu, 0, (int)(sizeof qcases / sizeof qcases[0]));
        tcase_add_test(tq, quantize_refuses_like_cpu);
        tcase_add_test(tq, quantize_cli_device_matches_cpu);
        tcase_add_test(tq, quantize_on_load_matches_cpu);
        suite_add_tcase(s, tq);
        TCase *ts = tcase_create("study");
        tcase_set_timeout(ts, 600);
        tcase_add_test(ts, study_on_the_gpu);
        suite_add_tcase(s, ts);
    } else {
        printf("gpu suite: QLP_MATERIALIZE_VARIANT=%s: the quantize cases run with the default variant only\n", variant);
    }
    SRunner *r = srunner_create(s);
    srunner_set_fork_status(r, CK_NOFORK); /* CUDA is not fork-safe */
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
