/* The gpu suite: every device op against its CPU reference on fresh random
 * inputs.  Here: the quantizer plugins' device materialize (ABI 1.1
 * materialize_rows_device) is bit for bit their CPU materialize, for every
 * plugin and option set, at several shapes (vector and generic kernels),
 * whole matrices and row ranges into a strided output whose padding must
 * stay untouched.  Without a CUDA device the suite says so and is skipped
 * (exit 77).  The seed of each run is printed; QLORA_GPU_SEED repeats one. */
#include <check.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
};

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
    ck_assert_msg(q->desc->quantize(q->inst, &md, w, &s) == QL_OK, "%s", ql_error_message());
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
    SRunner *r = srunner_create(s);
    srunner_set_fork_status(r, CK_NOFORK); /* CUDA is not fork-safe */
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
