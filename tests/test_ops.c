/* Backward operators (core/ops_cpu_backward.c) against finite differences.
 *
 * Each check builds a scalar from the float forward ops, L = sum_i c_i y_i with
 * random c (or the mean token NLL), accumulated in double, and compares the
 * analytic gradient of every input element with a five-point central
 * difference (step 2^-7, truncation O(h^4)).  The error reported is
 * max_j |fd_j - analytic_j| / max_j |analytic_j|: float rounding in the forward
 * is the floor, about 1e-5 .. 1e-4 here. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"
#include "ops.h"
#include "ops_backward.h"
#include "rope.h"
#include "qlora/eval.h"

#define FD_STEP 0x1p-7
#define FD_TOL 5e-3

/* ---- helpers ---- */

static void *allocs[512];
static int n_allocs;

static void *talloc(size_t bytes)
{
    ck_assert_int_lt(n_allocs, (int)(sizeof allocs / sizeof allocs[0]));
    void *p = calloc(1, bytes ? bytes : 1);
    ck_assert_ptr_nonnull(p);
    allocs[n_allocs++] = p;
    return p;
}

static float *fnew(int64_t n) { return talloc((size_t)n * sizeof(float)); }

static void tfree_all(void)
{
    for (int i = 0; i < n_allocs; i++) free(allocs[i]);
    n_allocs = 0;
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { return ((double)(rng_next(s) >> 11) + 0.5) * 0x1p-53; }

static float *randn(int64_t n, uint64_t seed, float scale)
{
    float *x = fnew(n);
    uint64_t s = seed;
    for (int64_t i = 0; i < n; i++) {
        double u1 = rng_uniform(&s), u2 = rng_uniform(&s);
        x[i] = (float)(scale * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
    return x;
}

static double dotd(const float *c, const float *y, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)c[i] * y[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* Five-point central differences of f on every element of x[n] against the
 * analytic gradient an[n]; asserts and returns the normwise relative error.
 * An all-zero gradient must be expected (may_be_zero), and is then checked to
 * an absolute 1e-6. */
static double fd_check_ex(const char *what, loss_fn f, void *ctx, float *x, const float *an, int64_t n, int may_be_zero)
{
    double max_an = 0, max_err = 0, worst_fd = 0;
    int64_t worst = 0;
    for (int64_t j = 0; j < n; j++) {
        const float x0 = x[j];
        static const int off[4] = {-2, -1, 1, 2};
        double fk[4];
        for (int k = 0; k < 4; k++) {
            x[j] = (float)(x0 + off[k] * FD_STEP);
            fk[k] = f(ctx);
        }
        x[j] = x0;
        double fd = (fk[0] - 8 * fk[1] + 8 * fk[2] - fk[3]) / (12 * FD_STEP);
        double err = fabs(fd - an[j]);
        if (fabs(an[j]) > max_an) max_an = fabs(an[j]);
        if (err > max_err) {
            max_err = err;
            worst = j;
            worst_fd = fd;
        }
    }
    double rel = max_err / (max_an > 0 ? max_an : 1.0);
    printf("  %-36s n=%4lld max|grad|=%.3e %s err=%.2e\n", what, (long long)n, max_an, max_an > 0 ? "rel" : "abs", rel);
    ck_assert_msg(max_an > 0 || may_be_zero, "%s: analytic gradient is all zero", what);
    if (max_an == 0)
        ck_assert_msg(max_err < 1e-6, "%s: analytic gradient is zero, fd %.3e at %lld", what, worst_fd, (long long)worst);
    ck_assert_msg(rel < FD_TOL, "%s: relative error %.3e (tolerance %.1e) at index %lld: fd %.8e analytic %.8e", what,
                  rel, FD_TOL, (long long)worst, worst_fd, (double)an[worst]);
    return rel;
}

static double fd_check(const char *what, loss_fn f, void *ctx, float *x, const float *an, int64_t n)
{
    return fd_check_ex(what, f, ctx, x, an, n, 0);
}

static void assert_close(const char *what, const float *got, const float *want, int64_t n, double rtol)
{
    double max_w = 0, max_d = 0;
    int64_t worst = 0;
    for (int64_t i = 0; i < n; i++) {
        if (fabs(want[i]) > max_w) max_w = fabs(want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (d > max_d || isnan(d)) {
            max_d = d;
            worst = i;
        }
    }
    ck_assert_msg(max_d <= rtol * (max_w > 0 ? max_w : 1.0), "%s: index %lld got %.8e want %.8e (max diff %.3e)", what,
                  (long long)worst, (double)got[worst], (double)want[worst], max_d);
}

static void assert_bitwise(const char *what, const float *got, const float *want, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(float)) == 0, "%s: index %lld got %.9e want %.9e", what,
                      (long long)i, (double)got[i], (double)want[i]);
}

/* ---- linear ---- */

typedef struct {
    float *x, *w, *c, *y;
    int64_t T, in, out;
} linear_ctx;

static double linear_loss(void *p)
{
    linear_ctx *s = p;
    ql_matmul_nt(s->y, s->x, s->w, s->T, s->in, s->out, 0);
    return dotd(s->c, s->y, s->T * s->out);
}

START_TEST(linear_grads)
{
    linear_ctx s = {.T = 3, .in = 5, .out = 4};
    s.x = randn(s.T * s.in, 1, 1);
    s.w = randn(s.out * s.in, 2, 1);
    s.c = randn(s.T * s.out, 3, 1);
    s.y = fnew(s.T * s.out);
    float *dx = fnew(s.T * s.in), *dw = fnew(s.out * s.in);
    ql_matmul_backward_input(dx, s.c, s.w, s.T, s.in, s.out, 0);
    ql_matmul_backward_weight(dw, s.c, s.x, s.T, s.in, s.out, 0);
    fd_check("matmul dx", linear_loss, &s, s.x, dx, s.T * s.in);
    fd_check("matmul dW", linear_loss, &s, s.w, dw, s.out * s.in);
    /* accumulate = 1 adds onto what is there */
    float *acc = fnew(s.T * s.in), *want = fnew(s.T * s.in);
    for (int64_t i = 0; i < s.T * s.in; i++) acc[i] = 1.0f, want[i] = 1.0f + dx[i];
    ql_matmul_backward_input(acc, s.c, s.w, s.T, s.in, s.out, 1);
    assert_close("matmul dx accumulate", acc, want, s.T * s.in, 1e-6);
    tfree_all();
}
END_TEST

/* Shapes larger than the row/column tiles, against a double reference. */
START_TEST(linear_tiles_vs_reference)
{
    const int64_t T = 9, in = 517, out = 37;
    float *x = randn(T * in, 4, 1), *w = randn(out * in, 5, 1), *dy = randn(T * out, 6, 1);
    float *dx = fnew(T * in), *dw = fnew(out * in), *rx = fnew(T * in), *rw = fnew(out * in);
    ql_matmul_backward_input(dx, dy, w, T, in, out, 0);
    ql_matmul_backward_weight(dw, dy, x, T, in, out, 0);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < in; i++) {
            double s = 0;
            for (int64_t o = 0; o < out; o++) s += (double)dy[t * out + o] * w[o * in + i];
            rx[t * in + i] = (float)s;
        }
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double s = 0;
            for (int64_t t = 0; t < T; t++) s += (double)dy[t * out + o] * x[t * in + i];
            rw[o * in + i] = (float)s;
        }
    assert_close("matmul dx tiles", dx, rx, T * in, 1e-5);
    assert_close("matmul dW tiles", dw, rw, out * in, 1e-5);
    tfree_all();
}
END_TEST

/* ---- the BLAS products against their plain C references ---- */

static const struct {
    int64_t T, in, out, r;
} blas_cfg[] = {
    {1, 576, 1536, 16}, /* generation: one row, a gemv */
    {1, 33, 7, 1},      {37, 129, 71, 4}, {256, 64, 300, 16}, {5, 1, 3, 1}, {3, 0, 4, 2}, {64, 576, 1536, 16},
};

static float *fnan(int64_t n)
{
    float *x = fnew(n);
    for (int64_t i = 0; i < n; i++) x[i] = NAN;
    return x;
}

/* got vs want with both written from the same start (accumulate = 1) or from
 * NaN garbage (accumulate = 0: beta = 0 must not read the output) */
START_TEST(blas_matches_reference)
{
    const int64_t T = blas_cfg[_i].T, in = blas_cfg[_i].in, out = blas_cfg[_i].out, r = blas_cfg[_i].r;
    const float scale = 2.0f;
    float *x = randn(T * in, 301, 1), *w = randn(out * in, 302, 1), *dy = randn(T * out, 303, 1);
    float *a = randn(r * in, 304, 1), *b = randn(out * r, 305, 1);
    char what[96];
    for (int acc = 0; acc < 2; acc++) {
        float *y = acc ? randn(T * out, 306, 1) : fnan(T * out), *yr = fnew(T * out);
        memcpy(yr, y, (size_t)(T * out) * sizeof *y);
        ql_matmul_nt(y, x, w, T, in, out, acc);
        ql_matmul_nt_ref(yr, x, w, T, in, out, acc);
        snprintf(what, sizeof what, "matmul_nt T=%lld in=%lld out=%lld acc=%d", (long long)T, (long long)in,
                 (long long)out, acc);
        assert_close(what, y, yr, T * out, 1e-5);

        float *dx = acc ? randn(T * in, 307, 1) : fnan(T * in), *dxr = fnew(T * in);
        memcpy(dxr, dx, (size_t)(T * in) * sizeof *dx);
        ql_matmul_backward_input(dx, dy, w, T, in, out, acc);
        ql_matmul_backward_input_ref(dxr, dy, w, T, in, out, acc);
        snprintf(what, sizeof what, "matmul_backward_input T=%lld in=%lld out=%lld acc=%d", (long long)T,
                 (long long)in, (long long)out, acc);
        assert_close(what, dx, dxr, T * in, 1e-5);

        float *dw = acc ? randn(out * in, 308, 1) : fnan(out * in), *dwr = fnew(out * in);
        memcpy(dwr, dw, (size_t)(out * in) * sizeof *dw);
        ql_matmul_backward_weight(dw, dy, x, T, in, out, acc);
        ql_matmul_backward_weight_ref(dwr, dy, x, T, in, out, acc);
        snprintf(what, sizeof what, "matmul_backward_weight T=%lld in=%lld out=%lld acc=%d", (long long)T,
                 (long long)in, (long long)out, acc);
        assert_close(what, dw, dwr, out * in, 1e-5);

        /* LoRA: h is written (NaN before), y accumulates */
        float *h = fnan(T * r), *hr = fnan(T * r), *ly = randn(T * out, 309, 1), *lyr = fnew(T * out);
        memcpy(lyr, ly, (size_t)(T * out) * sizeof *ly);
        ql_lora_forward(ly, h, x, a, b, T, in, out, r, scale);
        ql_lora_forward_ref(lyr, hr, x, a, b, T, in, out, r, scale);
        snprintf(what, sizeof what, "lora_forward h T=%lld in=%lld out=%lld r=%lld", (long long)T, (long long)in,
                 (long long)out, (long long)r);
        assert_close(what, h, hr, T * r, 1e-5);
        snprintf(what, sizeof what, "lora_forward y T=%lld in=%lld out=%lld r=%lld", (long long)T, (long long)in,
                 (long long)out, (long long)r);
        assert_close(what, ly, lyr, T * out, 1e-5);

        float *dxd = acc ? randn(T * in, 310, 1) : fnan(T * in), *dxdr = fnew(T * in);
        memcpy(dxdr, dxd, (size_t)(T * in) * sizeof *dxd);
        float *da = randn(r * in, 311, 1), *dar = fnew(r * in), *db = randn(out * r, 312, 1), *dbr = fnew(out * r);
        memcpy(dar, da, (size_t)(r * in) * sizeof *da);
        memcpy(dbr, db, (size_t)(out * r) * sizeof *db);
        float *dh = fnan(T * r), *dhr = fnan(T * r);
        ql_lora_backward(dxd, da, db, dh, dy, x, h, a, b, T, in, out, r, scale, acc);
        ql_lora_backward_ref(dxdr, dar, dbr, dhr, dy, x, h, a, b, T, in, out, r, scale, acc);
        snprintf(what, sizeof what, "lora_backward T=%lld in=%lld out=%lld r=%lld acc=%d: ", (long long)T,
                 (long long)in, (long long)out, (long long)r, acc);
        const size_t wl = strlen(what);
        strcpy(what + wl, "dh"), assert_close(what, dh, dhr, T * r, 1e-5);
        strcpy(what + wl, "dB"), assert_close(what, db, dbr, out * r, 1e-5);
        strcpy(what + wl, "dA"), assert_close(what, da, dar, r * in, 1e-5);
        strcpy(what + wl, "dxd"), assert_close(what, dxd, dxdr, T * in, 1e-5);
    }
    tfree_all();
}
END_TEST

/* ---- ql_expf and the log-sum-exp of the loss ---- */

START_TEST(expf_within_1_5_ulp)
{
    double worst = 0;
    float at = 0;
    for (int64_t i = 0; i <= 2000000 + 2 * 140; i++) {
        /* 2M points across the range, then +-2^-k down to the smallest floats */
        const float x = i <= 2000000 ? (float)(-87.33 + 176.05 * (double)i / 2000000)
                                     : (i % 2 ? -1.0f : 1.0f) * ldexpf(1.0f, -(int)((i - 2000000) / 2));
        const double want = exp((double)x);
        const double ulp = (double)nextafterf((float)want, INFINITY) - (double)(float)want;
        const double e = fabs((double)ql_expf(x) - want) / ulp;
        if (e > worst) worst = e, at = x;
    }
    printf("  ql_expf: %.3f ulp at most (at %.9g)\n", worst, (double)at);
    ck_assert_msg(worst < 1.5, "ql_expf is %.3f ulp off at %.9g", worst, (double)at);
    ck_assert(ql_expf(0.0f) == 1.0f);
    ck_assert(ql_expf(-INFINITY) == 0.0f && ql_expf(-100.0f) == 0.0f);
    ck_assert(ql_expf(INFINITY) == INFINITY && ql_expf(100.0f) == INFINITY);
    ck_assert(isnan(ql_expf(NAN)));
}
END_TEST

START_TEST(log_sum_exp_vs_double)
{
    const int64_t V = 49152 + 5;
    float *x = randn(V, 501, 4), *e = fnew(V);
    double mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < V; i++) sum += exp((double)x[i] - mx);
    const double want = log(sum) + mx;
    double got_sum;
    const double got = ql_log_sum_exp(e, &got_sum, x, V);
    ck_assert_msg(fabs(got - want) < 1e-6, "log-sum-exp %.9f, in double %.9f", got, want);
    ck_assert_msg(fabs(got_sum - sum) < 1e-6 * sum, "sum %.9g, in double %.9g", got_sum, sum);
    ck_assert_double_eq(ql_log_sum_exp(NULL, NULL, x, V), got);
    for (int64_t i = 0; i < V; i++) ck_assert(e[i] == ql_expf((float)(x[i] - (float)mx)));
    ck_assert(fabs(ql_token_nll(x, V, 7) - (want - x[7])) < 1e-6);
    tfree_all();
}
END_TEST

/* ---- LoRA (with input dropout) ---- */

typedef struct {
    float *x, *w, *a, *b, *c, *y, *h, *xd;
    uint8_t *mask;
    int64_t T, in, out, r;
    float scale, p;
    uint64_t seed;
} lora_ctx;

static double lora_loss(void *p)
{
    lora_ctx *s = p;
    ql_matmul_nt(s->y, s->x, s->w, s->T, s->in, s->out, 0);
    ql_dropout_forward(s->xd, s->mask, s->x, s->T * s->in, s->p, s->seed);
    ql_lora_forward(s->y, s->h, s->xd, s->a, s->b, s->T, s->in, s->out, s->r, s->scale);
    return dotd(s->c, s->y, s->T * s->out);
}

START_TEST(lora_grads)
{
    static const float ps[2] = {0.0f, 0.4f};
    lora_ctx s = {.T = 3, .in = 6, .out = 5, .r = 2, .scale = 1.5f, .p = ps[_i], .seed = 42};
    s.x = randn(s.T * s.in, 11, 1);
    s.w = randn(s.out * s.in, 12, 1);
    s.a = randn(s.r * s.in, 13, 1);
    s.b = randn(s.out * s.r, 14, 1); /* nonzero B, so that dA is not trivially zero */
    s.c = randn(s.T * s.out, 15, 1);
    s.y = fnew(s.T * s.out);
    s.h = fnew(s.T * s.r);
    s.xd = fnew(s.T * s.in);
    s.mask = talloc((size_t)(s.T * s.in));
    lora_loss(&s);
    float *dx = fnew(s.T * s.in), *dxd = fnew(s.T * s.in), *da = fnew(s.r * s.in), *db = fnew(s.out * s.r),
          *dh = fnew(s.T * s.r);
    ql_matmul_backward_input(dx, s.c, s.w, s.T, s.in, s.out, 0);
    ql_lora_backward(dxd, da, db, dh, s.c, s.xd, s.h, s.a, s.b, s.T, s.in, s.out, s.r, s.scale, 0);
    ql_dropout_backward(dx, dxd, s.mask, s.T * s.in, s.p, s.seed, 1);
    char name[64];
    snprintf(name, sizeof name, "lora p=%.1f dx", (double)s.p);
    fd_check(name, lora_loss, &s, s.x, dx, s.T * s.in);
    snprintf(name, sizeof name, "lora p=%.1f dA", (double)s.p);
    fd_check(name, lora_loss, &s, s.a, da, s.r * s.in);
    snprintf(name, sizeof name, "lora p=%.1f dB", (double)s.p);
    fd_check(name, lora_loss, &s, s.b, db, s.out * s.r);
    /* dA, dB accumulate across calls (micro-batches) */
    float *da2 = fnew(s.r * s.in), *db2 = fnew(s.out * s.r), *want_a = fnew(s.r * s.in), *want_b = fnew(s.out * s.r);
    memcpy(da2, da, (size_t)(s.r * s.in) * sizeof *da);
    memcpy(db2, db, (size_t)(s.out * s.r) * sizeof *db);
    ql_lora_backward(NULL, da2, db2, dh, s.c, s.xd, s.h, s.a, s.b, s.T, s.in, s.out, s.r, s.scale, 0);
    for (int64_t i = 0; i < s.r * s.in; i++) want_a[i] = 2 * da[i];
    for (int64_t i = 0; i < s.out * s.r; i++) want_b[i] = 2 * db[i];
    assert_close("lora dA accumulates", da2, want_a, s.r * s.in, 1e-6);
    assert_close("lora dB accumulates", db2, want_b, s.out * s.r, 1e-6);
    tfree_all();
}
END_TEST

/* ---- RMSNorm ---- */

typedef struct {
    float *x, *w, *c, *y, *rstd;
    int64_t T, C;
} rms_ctx;

static double rms_loss(void *p)
{
    rms_ctx *s = p;
    ql_rmsnorm_forward(s->y, s->rstd, s->x, s->w, s->T, s->C, 1e-5f);
    return dotd(s->c, s->y, s->T * s->C);
}

START_TEST(rmsnorm_grads)
{
    rms_ctx s = {.T = 3, .C = 7};
    s.x = randn(s.T * s.C, 21, 1);
    s.w = randn(s.C, 22, 1);
    s.c = randn(s.T * s.C, 23, 1);
    s.y = fnew(s.T * s.C);
    s.rstd = fnew(s.T);
    rms_loss(&s);
    float *dx = fnew(s.T * s.C), *dw = fnew(s.C);
    ql_rmsnorm_backward(dx, dw, s.c, s.x, s.w, s.rstd, s.T, s.C, 0);
    fd_check("rmsnorm dx", rms_loss, &s, s.x, dx, s.T * s.C);
    fd_check("rmsnorm dweight", rms_loss, &s, s.w, dw, s.C);
    float *acc = fnew(s.T * s.C), *want = fnew(s.T * s.C);
    for (int64_t i = 0; i < s.T * s.C; i++) acc[i] = -2.0f, want[i] = -2.0f + dx[i];
    ql_rmsnorm_backward(acc, NULL, s.c, s.x, s.w, s.rstd, s.T, s.C, 1);
    assert_close("rmsnorm dx accumulate", acc, want, s.T * s.C, 1e-6);
    tfree_all();
}
END_TEST

/* ---- RoPE ---- */

typedef struct {
    float *x, *c, *y;
    int64_t T;
    int nheads, hd, pos0;
    float inv[8], scale; /* yarn frequencies and attention factor: cos and sin are scaled */
} rope_ctx;

static double rope_loss(void *p)
{
    rope_ctx *s = p;
    int64_t n = s->T * s->nheads * s->hd;
    memcpy(s->y, s->x, (size_t)n * sizeof *s->y);
    ql_rope_forward(s->y, s->T, s->nheads, s->hd, s->pos0, s->inv, s->scale);
    return dotd(s->c, s->y, n);
}

static const struct {
    int T, nheads, hd, pos0;
} rope_cfg[] = {{3, 2, 8, 0}, {5, 3, 6, 7}, {2, 1, 16, 1000}};

START_TEST(rope_grads)
{
    rope_ctx s = {.T = rope_cfg[_i].T, .nheads = rope_cfg[_i].nheads, .hd = rope_cfg[_i].hd, .pos0 = rope_cfg[_i].pos0};
    int64_t n = s.T * s.nheads * s.hd;
    s.x = randn(n, 31 + _i, 1);
    s.c = randn(n, 41 + _i, 1);
    s.y = fnew(n);
    const ql_rope_config yarn = {.type = QL_ROPE_YARN, .theta = 10000, .factor = 4, .original_max_positions = 64,
                                 .beta_fast = 32, .beta_slow = 1, .truncate = 1, .attention_factor = 1.25};
    ql_rope_inv_freq(s.inv, &s.scale, &yarn, s.hd, s.T + s.pos0);
    ck_assert_float_eq(s.scale, 1.25f);
    float *dx = fnew(n);
    memcpy(dx, s.c, (size_t)n * sizeof *dx);
    ql_rope_backward(dx, s.T, s.nheads, s.hd, s.pos0, s.inv, s.scale);
    char name[64];
    snprintf(name, sizeof name, "rope T=%d nheads=%d hd=%d pos0=%d dx", (int)s.T, s.nheads, s.hd, s.pos0);
    fd_check(name, rope_loss, &s, s.x, dx, n);
    tfree_all();
}
END_TEST

/* ---- attention ---- */

typedef struct {
    float *q, *k, *v, *c, *out, *probs;
    int64_t T;
    int nh, nkv, hd;
} attn_ctx;

static double attn_loss(void *p)
{
    attn_ctx *s = p;
    ql_attention_forward_train(s->out, s->probs, s->q, s->k, s->v, s->T, s->nh, s->nkv, s->hd, 0);
    return dotd(s->c, s->out, s->T * s->nh * s->hd);
}

static const struct {
    int T, nh, nkv, hd;
} attn_cfg[] = {{5, 4, 2, 4}, {1, 2, 2, 3}, {7, 3, 1, 8}, {6, 2, 1, 10}, {4, 2, 2, 5}};

START_TEST(attention_grads)
{
    attn_ctx s = {.T = attn_cfg[_i].T, .nh = attn_cfg[_i].nh, .nkv = attn_cfg[_i].nkv, .hd = attn_cfg[_i].hd};
    const int64_t nq = s.T * s.nh * s.hd, nkv = s.T * s.nkv * s.hd;
    s.q = randn(nq, 51 + _i, 1.5f);
    s.k = randn(nkv, 61 + _i, 1.5f);
    s.v = randn(nkv, 71 + _i, 1);
    s.c = randn(nq, 81 + _i, 1);
    s.out = fnew(nq);
    s.probs = fnew((int64_t)s.nh * s.T * s.T);
    attn_loss(&s);
    /* the training forward reproduces the inference forward bit for bit */
    float *ref = fnew(nq);
    ql_attention_forward(ref, s.q, s.k, s.v, s.T, 0, s.nh, s.nkv, s.hd, 0);
    assert_bitwise("attention_forward_train out", s.out, ref, nq);
    for (int h = 0; h < s.nh; h++)
        for (int64_t t = 0; t < s.T; t++) {
            const float *p = s.probs + (h * s.T + t) * s.T;
            double sum = 0;
            for (int64_t j = 0; j < s.T; j++) {
                if (j > t) ck_assert_msg(p[j] == 0.0f, "probs[%d, %lld, %lld] = %g above the diagonal", h, (long long)t,
                                         (long long)j, (double)p[j]);
                sum += p[j];
            }
            ck_assert_msg(fabs(sum - 1) < 1e-5, "probs row (%d, %lld) sums to %.8f", h, (long long)t, sum);
        }
    float *dq = fnew(nq), *dk = fnew(nkv), *dv = fnew(nkv), *ds = fnew((int64_t)s.nh * s.T * s.T);
    for (int64_t i = 0; i < (int64_t)s.nh * s.T * s.T; i++) ds[i] = NAN; /* scratch need not be clean */
    ql_attention_backward(dq, dk, dv, ds, s.c, s.q, s.k, s.v, s.probs, s.T, s.nh, s.nkv, s.hd, 0);
    char name[64];
    snprintf(name, sizeof name, "attn T=%d nh=%d nkv=%d hd=%d dq", (int)s.T, s.nh, s.nkv, s.hd);
    fd_check_ex(name, attn_loss, &s, s.q, dq, nq, s.T == 1); /* one key: the softmax is constant */
    name[strlen(name) - 1] = 'k';
    fd_check_ex(name, attn_loss, &s, s.k, dk, nkv, s.T == 1);
    name[strlen(name) - 2] = 'd', name[strlen(name) - 1] = 'v';
    fd_check(name, attn_loss, &s, s.v, dv, nkv);
    tfree_all();
}
END_TEST

/* The sgemm attention against the plain-loop references (ql_*_ref), from NaN
 * garbage in every output and scratch: T = 1, GQA, odd head dims, windows
 * narrower than a row block and spanning several, keys past one 512-key chunk,
 * generation after a cached prefix.  Bounds, relative to the largest |value|
 * of the reference: 5e-6 for out and probs, 1e-5 for dq, dk, dv, dscores
 * (float sums in another order: expf vs ql_expf, eight-lane vs sequential). */
static const struct {
    int T, past, nh, nkv, hd, window;
} attn_fast_cfg[] = {{1, 0, 2, 2, 3, 0},    {37, 0, 9, 3, 64, 0},  {70, 0, 4, 1, 7, 5},   {100, 0, 6, 2, 16, 40},
                     {600, 0, 2, 1, 8, 0},  {600, 0, 2, 2, 8, 300}, {77, 0, 3, 3, 5, 1},  {1, 700, 3, 1, 16, 0},
                     {5, 40, 4, 2, 8, 0},   {33, 31, 2, 1, 5, 20},  {64, 600, 2, 1, 8, 100}};

START_TEST(attention_fast_vs_reference)
{
    const int T = attn_fast_cfg[_i].T, past = attn_fast_cfg[_i].past, nh = attn_fast_cfg[_i].nh;
    const int nkv = attn_fast_cfg[_i].nkv, hd = attn_fast_cfg[_i].hd, W = attn_fast_cfg[_i].window;
    const int64_t N = past + T, nq = (int64_t)T * nh * hd, nk = N * nkv * hd;
    float *q = randn(nq, 901 + _i, 1.5f), *k = randn(nk, 911 + _i, 1.5f), *v = randn(nk, 921 + _i, 1);
    char what[128];
    snprintf(what, sizeof what, "T=%d past=%d nh=%d nkv=%d hd=%d window=%d", T, past, nh, nkv, hd, W);
    float *o = fnan(nq), *oref = fnan(nq), *o2 = fnan(nq);
    ql_attention_forward(o, q, k, v, T, past, nh, nkv, hd, W);
    ql_attention_forward_ref(oref, q, k, v, T, past, nh, nkv, hd, W);
    char m[192];
    snprintf(m, sizeof m, "attention_forward %s", what);
    assert_close(m, o, oref, nq, 5e-6);
    ql_attention_forward(o2, q, k, v, T, past, nh, nkv, hd, W);
    assert_bitwise(m, o2, o, nq);
    if (past > 0) {
        /* the rows of a full forward over all N positions, within rounding: OpenBLAS
         * may round a product of fewer rows (a one-row block) differently */
        float *qf = randn(N * nh * hd, 931 + _i, 1.5f), *of = fnan(N * nh * hd);
        memcpy(qf + (int64_t)past * nh * hd, q, (size_t)nq * sizeof *q);
        ql_attention_forward(of, qf, k, v, N, 0, nh, nkv, hd, W);
        snprintf(m, sizeof m, "attention_forward %s vs the full forward's last rows", what);
        assert_close(m, o, of + (int64_t)past * nh * hd, nq, 5e-6);
#ifdef _OPENMP
        const int saved = omp_get_max_threads();
        for (int nt = 1; nt <= 3; nt += 2) { /* the same bits on 1 and 3 threads */
            omp_set_num_threads(nt);
            ql_attention_forward(o2, q, k, v, T, past, nh, nkv, hd, W);
            snprintf(m, sizeof m, "attention_forward %s, %d threads", what, nt);
            assert_bitwise(m, o2, o, nq);
        }
        omp_set_num_threads(saved);
#endif
        tfree_all();
        return;
    }
    const int64_t np = (int64_t)nh * T * T;
    float *p = fnan(np), *pref = fnan(np), *ot = fnan(nq), *otref = fnan(nq);
    ql_attention_forward_train(ot, p, q, k, v, T, nh, nkv, hd, W);
    ql_attention_forward_train_ref(otref, pref, q, k, v, T, nh, nkv, hd, W);
    snprintf(m, sizeof m, "attention_forward_train out %s (vs the generation forward)", what);
    assert_bitwise(m, ot, o, nq);
    snprintf(m, sizeof m, "attention_forward_train probs %s", what);
    assert_close(m, p, pref, np, 5e-6);
    for (int64_t i = 0; i < np; i++)
        if (pref[i] == 0.0f)
            ck_assert_msg(p[i] == 0.0f, "%s: index %lld is %g outside the band", m, (long long)i, (double)p[i]);
    /* backward from the reference's probs, so that only the backward differs */
    float *dout = randn(nq, 941 + _i, 1);
    float *g[4], *gref[4];
    const int64_t len[4] = {nq, nk, nk, np};
    static const char *name[4] = {"dq", "dk", "dv", "dscores"};
    for (int j = 0; j < 4; j++) g[j] = fnan(len[j]), gref[j] = fnan(len[j]);
    ql_attention_backward(g[0], g[1], g[2], g[3], dout, q, k, v, pref, T, nh, nkv, hd, W);
    ql_attention_backward_ref(gref[0], gref[1], gref[2], gref[3], dout, q, k, v, pref, T, nh, nkv, hd, W);
    for (int j = 0; j < 4; j++) {
        snprintf(m, sizeof m, "attention_backward %s %s", name[j], what);
        assert_close(m, g[j], gref[j], len[j], 1e-5);
    }
    for (int64_t i = 0; i < np; i++)
        if (pref[i] == 0.0f)
            ck_assert_msg(g[3][i] == 0.0f, "dscores %s: index %lld outside the band", what, (long long)i);
    /* run to run, and 1 thread against 3: the same bits */
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    for (int run = 0; run < 3; run++) {
        omp_set_num_threads(run == 0 ? saved : run == 1 ? 1 : 3);
        float *h[4], *pt = fnan(np), *ot2 = fnan(nq);
        for (int j = 0; j < 4; j++) h[j] = fnan(len[j]);
        ql_attention_forward_train(ot2, pt, q, k, v, T, nh, nkv, hd, W);
        ql_attention_backward(h[0], h[1], h[2], h[3], dout, q, k, v, pref, T, nh, nkv, hd, W);
        snprintf(m, sizeof m, "attention %s, %d threads, out", what, omp_get_max_threads());
        assert_bitwise(m, ot2, ot, nq);
        assert_bitwise(m, pt, p, np);
        for (int j = 0; j < 4; j++) {
            snprintf(m, sizeof m, "attention %s, %d threads, %s", what, omp_get_max_threads(), name[j]);
            assert_bitwise(m, h[j], g[j], len[j]);
        }
    }
    omp_set_num_threads(saved);
#endif
    tfree_all();
}
END_TEST

/* ---- SwiGLU ---- */

typedef struct {
    float *g, *u, *c, *y;
    int64_t n;
} swiglu_ctx;

static double swiglu_loss(void *p)
{
    swiglu_ctx *s = p;
    ql_swiglu_forward(s->y, s->g, s->u, s->n);
    return dotd(s->c, s->y, s->n);
}

START_TEST(swiglu_grads)
{
    swiglu_ctx s = {.n = 40};
    s.g = randn(s.n, 91, 3);
    s.u = randn(s.n, 92, 1);
    s.c = randn(s.n, 93, 1);
    s.y = fnew(s.n);
    float *dg = fnew(s.n), *du = fnew(s.n);
    ql_swiglu_backward(dg, du, s.c, s.g, s.u, s.n);
    fd_check("swiglu dgate", swiglu_loss, &s, s.g, dg, s.n);
    fd_check("swiglu dup", swiglu_loss, &s, s.u, du, s.n);
    /* in place: dgate over dout, dup over up */
    float *d1 = fnew(s.n), *u1 = fnew(s.n);
    memcpy(d1, s.c, (size_t)s.n * sizeof *d1);
    memcpy(u1, s.u, (size_t)s.n * sizeof *u1);
    ql_swiglu_backward(d1, u1, d1, s.g, u1, s.n);
    assert_bitwise("swiglu in place dgate", d1, dg, s.n);
    assert_bitwise("swiglu in place dup", u1, du, s.n);
    /* saturated gates stay finite */
    const float g[3] = {-200.0f, 200.0f, 0.0f}, u[3] = {1, 1, 1}, d[3] = {1, 1, 1};
    float og[3], ou[3];
    ql_swiglu_backward(og, ou, d, g, u, 3);
    for (int i = 0; i < 3; i++) ck_assert_msg(isfinite(og[i]) && isfinite(ou[i]), "swiglu gate %g: %g %g", (double)g[i],
                                              (double)og[i], (double)ou[i]);
    ck_assert_float_eq_tol(og[1], 1.0f, 1e-6f);
    ck_assert_float_eq_tol(og[2], 0.5f, 1e-6f);
    tfree_all();
}
END_TEST

/* ---- cross-entropy ---- */

typedef struct {
    float *logits;
    const int32_t *targets;
    int64_t T, V;
    double scale;
} ce_ctx;

static double ce_loss(void *p)
{
    ce_ctx *s = p;
    double sum = 0;
    for (int64_t t = 0; t < s->T; t++)
        if (s->targets[t] != QL_IGNORE_INDEX) sum += ql_token_nll(s->logits + t * s->V, s->V, s->targets[t]);
    return s->scale * sum;
}

START_TEST(cross_entropy_grads)
{
    static const int32_t targets[6] = {3, QL_IGNORE_INDEX, 0, 10, QL_IGNORE_INDEX, 5};
    const int64_t T = 6, V = 11;
    const int64_t nv = ql_count_targets(targets, T, QL_IGNORE_INDEX);
    ck_assert_int_eq(nv, 4);
    ce_ctx s = {.targets = targets, .T = T, .V = V, .scale = 1.0 / (double)nv};
    s.logits = randn(T * V, 101, 2);
    float *losses = fnew(T), *dl = fnew(T * V);
    double total = ql_cross_entropy_forward_backward(losses, dl, s.logits, targets, T, V, QL_IGNORE_INDEX, 1.0f / nv);
    double ref = ce_loss(&s) / s.scale;
    ck_assert_msg(fabs(total - ref) < 1e-5 * ref, "summed loss %.9f, ql_token_nll gives %.9f", total, ref);
    for (int64_t t = 0; t < T; t++) {
        if (targets[t] != QL_IGNORE_INDEX) continue;
        ck_assert_msg(losses[t] == 0.0f, "ignored row %lld has loss %g", (long long)t, (double)losses[t]);
        for (int64_t i = 0; i < V; i++)
            ck_assert_msg(dl[t * V + i] == 0.0f, "ignored row %lld has dlogits[%lld] = %g", (long long)t, (long long)i,
                          (double)dl[t * V + i]);
    }
    fd_check("cross-entropy dlogits (2 ignored)", ce_loss, &s, s.logits, dl, T * V);
    /* same total without per-row losses; dlogits computed in place over the logits */
    float *inplace = fnew(T * V);
    memcpy(inplace, s.logits, (size_t)(T * V) * sizeof *inplace);
    double total2 = ql_cross_entropy_forward_backward(NULL, inplace, inplace, targets, T, V, QL_IGNORE_INDEX, 1.0f / nv);
    ck_assert_msg(total2 == total, "total %.17g without losses vs %.17g with", total2, total);
    assert_bitwise("cross-entropy dlogits in place", inplace, dl, T * V);
    /* forward only */
    ck_assert(ql_cross_entropy_forward_backward(NULL, NULL, s.logits, targets, T, V, QL_IGNORE_INDEX, 1.0f) == total);
    /* a target outside the vocabulary is refused */
    const int32_t bad[2] = {1, 11};
    ck_assert(isnan(ql_cross_entropy_forward_backward(NULL, NULL, s.logits, bad, 2, V, QL_IGNORE_INDEX, 1.0f)));
    tfree_all();
}
END_TEST

/* ---- dropout ---- */

typedef struct {
    float *x, *c, *y;
    int64_t n;
    float p;
    uint64_t seed;
} dropout_ctx;

static double dropout_loss(void *ctx)
{
    dropout_ctx *s = ctx;
    ql_dropout_forward(s->y, NULL, s->x, s->n, s->p, s->seed);
    return dotd(s->c, s->y, s->n);
}

START_TEST(dropout_mask_and_grads)
{
    const int64_t n = 100000;
    const float p = 0.25f;
    float *x = randn(n, 111, 1), *y = fnew(n), *y2 = fnew(n);
    uint8_t *mask = talloc((size_t)n), *mask2 = talloc((size_t)n);
    ql_dropout_forward(y, mask, x, n, p, 1234);
    /* the documented stream: elements 4g .. 4g+3 take 16 bits each of the
     * g-th splitmix64 output from state = seed, the highest first */
    uint64_t state = 1234, z = 0;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i % 4 == 0) z = ql_splitmix64_next(&state);
        int keep = (float)((z >> (48 - 16 * (i % 4))) & 0xffff) * 0x1p-16f >= p;
        ck_assert_msg(mask[i] == keep, "mask[%lld] = %d, the splitmix64 stream says %d", (long long)i, mask[i], keep);
        ck_assert_msg(y[i] == (keep ? x[i] * (1.0f / 0.75f) : 0.0f), "out[%lld] = %g for x %g keep %d", (long long)i,
                      (double)y[i], (double)x[i], keep);
        kept += keep;
    }
    ck_assert_msg(fabs((double)kept / n - 0.75) < 0.01, "kept fraction %.4f for p = 0.25", (double)kept / n);
    ql_dropout_forward(y2, mask2, x, n, p, 1234);
    ck_assert_msg(memcmp(mask, mask2, (size_t)n) == 0, "same seed, different mask");
    ql_dropout_forward(y2, mask2, x, n, p, 1235);
    ck_assert_msg(memcmp(mask, mask2, (size_t)n) != 0, "different seeds, same mask");
    /* backward: the stored mask and the seed give the same gradient */
    float *dy = randn(n, 112, 1), *dx1 = fnew(n), *dx2 = fnew(n);
    ql_dropout_backward(dx1, dy, mask, n, p, 1234, 0);
    ql_dropout_backward(dx2, dy, NULL, n, p, 1234, 0);
    assert_bitwise("dropout backward mask vs seed", dx1, dx2, n);
    /* p = 0 is the identity, p = 1 drops everything */
    ql_dropout_forward(y2, mask2, x, n, 0.0f, 7);
    assert_bitwise("dropout p=0", y2, x, n);
    ql_dropout_forward(y2, mask2, x, n, 1.0f, 7);
    for (int64_t i = 0; i < n; i++) ck_assert(y2[i] == 0.0f && mask2[i] == 0);
    ql_dropout_backward(dx2, dy, NULL, n, 0.0f, 7, 0);
    assert_bitwise("dropout backward p=0", dx2, dy, n);
    /* finite differences (a linear map; this checks the 1/(1-p) scale) */
    dropout_ctx s = {.n = 20, .p = 0.5f, .seed = 99};
    s.x = randn(s.n, 113, 1);
    s.c = randn(s.n, 114, 1);
    s.y = fnew(s.n);
    float *dx = fnew(s.n);
    ql_dropout_backward(dx, s.c, NULL, s.n, s.p, s.seed, 0);
    fd_check("dropout p=0.5 dx", dropout_loss, &s, s.x, dx, s.n);
    tfree_all();
}
END_TEST

/* ---- determinism ---- */

#ifdef _OPENMP
/* The BLAS products: the same bits from the same inputs at a given thread
 * count (OpenBLAS partitions the output by the thread count, so another count
 * may round differently: that is not asserted, only reported). */
START_TEST(blas_same_bits_for_a_thread_count)
{
    const int saved = omp_get_max_threads();
    const int64_t T = 256, in = 576, out = 1536, r = 16;
    float *x = randn(T * in, 401, 1), *w = randn(out * in, 402, 1), *dy = randn(T * out, 403, 1);
    float *a = randn(r * in, 404, 1), *b = randn(out * r, 405, 1);
    enum { NOUT = 7 };
    static const char *what[NOUT] = {"matmul_nt", "matmul_backward_input", "matmul_backward_weight",
                                     "lora_forward y", "lora_backward dA", "lora_backward dB", "lora_backward dxd"};
    const int64_t len[NOUT] = {T * out, T * in, out * in, T * out, r * in, out * r, T * in};
    static const int counts[3] = {1, 2, 4};
    float *first[NOUT] = {0};
    for (int c = 0; c < 3; c++) {
        omp_set_num_threads(counts[c]);
        float *res[2][NOUT];
        for (int run = 0; run < 2; run++) {
            float **o = res[run];
            for (int k = 0; k < NOUT; k++) o[k] = fnew(len[k]);
            float *h = fnew(T * r), *dh = fnew(T * r);
            ql_matmul_nt(o[0], x, w, T, in, out, 0);
            ql_matmul_backward_input(o[1], dy, w, T, in, out, 0);
            ql_matmul_backward_weight(o[2], dy, x, T, in, out, 0);
            memcpy(o[3], o[0], (size_t)len[0] * sizeof(float));
            ql_lora_forward(o[3], h, x, a, b, T, in, out, r, 0.5f);
            ql_lora_backward(o[6], o[4], o[5], dh, dy, x, h, a, b, T, in, out, r, 0.5f, 0);
        }
        for (int k = 0; k < NOUT; k++) {
            char name[96];
            snprintf(name, sizeof name, "%s, %d threads, run twice", what[k], counts[c]);
            assert_bitwise(name, res[1][k], res[0][k], len[k]);
        }
        if (c == 0)
            for (int k = 0; k < NOUT; k++) first[k] = res[0][k];
        else
            for (int k = 0; k < NOUT; k++)
                if (memcmp(first[k], res[0][k], (size_t)len[k] * sizeof(float)))
                    printf("  %s: %d threads round differently from 1 (allowed)\n", what[k], counts[c]);
    }
    omp_set_num_threads(saved);
    tfree_all();
}
END_TEST

/* The plain C operators: the same bits for any thread count. */
/* Every size is above QL_PARALLEL_MIN_WORK in the measure its loop uses (the
 * work asserted below), so the 4-thread run really forks a team: with every op
 * below the threshold both runs were single-threaded and a thread-dependent
 * result passed. */
START_TEST(same_bits_any_thread_count)
{
    const int saved = omp_get_max_threads();
    const int64_t T = 64, in = 320, out = 256, C = 8192, V = 40000, n = 600000, lt = 256, lr = 32;
    const int at = 160, nh = 8, nkv = 2, hd = 32, rt = 2048;
    const struct {
        const char *op;
        int64_t work;
    } works[] = {{"matmul", T * in * out},
                 {"rmsnorm", T * C * 8},
                 {"attention", (int64_t)at * at * nh * hd},
                 {"cross-entropy", 16 * V * 8},
                 {"swiglu, dropout", n * 8},
                 {"rope", (int64_t)rt * nh * hd * 8},
                 {"lora", lt * (in + out) * lr}};
    for (size_t i = 0; i < sizeof works / sizeof works[0]; i++)
        ck_assert_msg(works[i].work >= QL_PARALLEL_MIN_WORK, "%s: work %lld is below the parallel threshold %lld: "
                      "this test would run it on one thread", works[i].op, (long long)works[i].work,
                      (long long)QL_PARALLEL_MIN_WORK);
    float *x = randn(T * C, 121, 1), *w = randn(out * in, 122, 1), *dy = randn(T * out, 123, 1);
    float *rs = fnew(T), *xn = fnew(T * C), *nw = randn(C, 124, 1), *dyc = randn(T * C, 125, 1);
    float *q = randn(at * nh * hd, 126, 1), *k = randn(at * nkv * hd, 127, 1), *v = randn(at * nkv * hd, 128, 1);
    float *dout = randn(at * nh * hd, 129, 1), *ao = fnew(at * nh * hd), *probs = fnew(nh * at * at);
    float *logits = randn(16 * V, 130, 2), *g = randn(n, 131, 2), *u = randn(n, 132, 1), *dn = randn(n, 133, 1);
    float *ra = randn(lr * in, 134, 0.1f), *rb = randn(out * lr, 135, 0.1f), *lx = randn(lt * in, 136, 1);
    float *rope_in = randn(rt * nh * hd, 137, 1), inv[16];
    for (int i = 0; i < hd / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)hd);
    int32_t tg[16];
    for (int i = 0; i < 16; i++) tg[i] = i % 5 == 4 ? QL_IGNORE_INDEX : (int32_t)(i * 311 % V);
    ql_rmsnorm_forward(xn, rs, x, nw, T, C, 1e-5f);
    ql_attention_forward_train_ref(ao, probs, q, k, v, at, nh, nkv, hd, 0);
    enum { NR = 23 };
    float *res[2][NR];
    double loss[2];
    for (int run = 0; run < 2; run++) {
        omp_set_num_threads(run == 0 ? 1 : 4);
        float **r = res[run];
        r[0] = fnew(T * in), r[1] = fnew(out * in), r[2] = fnew(T * C), r[3] = fnew(C);
        r[4] = fnew(at * nh * hd), r[5] = fnew(at * nkv * hd), r[6] = fnew(at * nkv * hd), r[7] = fnew(nh * at * at);
        r[8] = fnew(16 * V), r[9] = fnew(n), r[10] = fnew(n), r[11] = fnew(n), r[12] = fnew(nh * at * at);
        r[13] = fnew(T * out), r[14] = fnew(at * nh * hd), r[15] = fnew(at * nh * hd), r[16] = fnew(nh * at * at);
        r[17] = fnew(at * nh * hd), r[18] = fnew(at * nkv * hd), r[19] = fnew(at * nkv * hd), r[20] = fnew(n);
        r[21] = fnew(rt * nh * hd), r[22] = fnew(lt * out);
        ql_matmul_backward_input_ref(r[0], dy, w, T, in, out, 0);
        ql_matmul_backward_weight_ref(r[1], dy, x, T, in, out, 0);
        ql_matmul_nt_ref(r[13], x, w, T, in, out, 0);
        ql_rmsnorm_backward(r[2], r[3], dyc, x, nw, rs, T, C, 0);
        /* the blocked (BLAS) attention and the plain loops, each threaded */
        ql_attention_forward_train(r[4], r[12], q, k, v, at, nh, nkv, hd, 0);
        ql_attention_backward(r[17], r[18], r[19], r[7], dout, q, k, v, r[12], at, nh, nkv, hd, 0);
        ql_attention_forward_train_ref(r[14], r[16], q, k, v, at, nh, nkv, hd, 0);
        ql_attention_forward_ref(r[15], q, k, v, at, 0, nh, nkv, hd, 0);
        ql_attention_backward_ref(r[4], r[5], r[6], r[16], dout, q, k, v, probs, at, nh, nkv, hd, 0);
        float *losses = fnew(16);
        loss[run] = ql_cross_entropy_forward_backward(losses, r[8], logits, tg, 16, V, QL_IGNORE_INDEX, 0.1f);
        ql_swiglu_backward(r[9], r[10], dn, g, u, n);
        uint8_t *mask = talloc((size_t)n);
        ql_dropout_forward(r[11], mask, g, n, 0.1f, 5);
        ql_dropout_backward(r[20], dn, mask, n, 0.1f, 5, 0);
        memcpy(r[21], rope_in, (size_t)(rt * nh * hd) * sizeof(float));
        ql_rope_backward(r[21], rt, nh, hd, 3, inv, 1.0f);
        float *h = fnew(lt * lr);
        ql_lora_forward_ref(r[22], h, lx, ra, rb, lt, in, out, lr, 0.5f);
    }
    omp_set_num_threads(saved);
    static const char *what[NR] = {"matmul dx (ref)", "matmul dW (ref)", "rmsnorm dx", "rmsnorm dweight",
                                   "attention dq (ref)", "attention dk (ref)", "attention dv (ref)",
                                   "attention dscores", "cross-entropy dlogits", "swiglu dgate", "swiglu dup",
                                   "dropout out", "attention probs", "matmul y (ref)", "attention out (train ref)",
                                   "attention out (ref)", "attention probs (train ref)", "attention dq", "attention dk",
                                   "attention dv", "dropout dx", "rope dx", "lora y (ref)"};
    const int64_t len[NR] = {T * in, out * in, T * C, C, at * nh * hd, at * nkv * hd, at * nkv * hd, nh * at * at,
                             16 * V, n, n, n, nh * at * at, T * out, at * nh * hd, at * nh * hd, nh * at * at,
                             at * nh * hd, at * nkv * hd, at * nkv * hd, n, rt * nh * hd, lt * out};
    for (int i = 0; i < NR; i++) assert_bitwise(what[i], res[1][i], res[0][i], len[i]);
    ck_assert(loss[0] == loss[1]);
    tfree_all();
}
END_TEST
#endif

/* ---- sampling (generate's --temperature, --top-p) ----
 * Frequencies of 200,000 draws with a fixed seed against distributions worked
 * out by hand from p = (0.5, 0.25, 0.15, 0.1): temperature T gives p^(1/T)
 * renormalised; top-p keeps the most probable tokens until their sum reaches
 * top_p.  The ids are shuffled so the sort is exercised.  4 sigma is 0.0045 at
 * most; each wrong rule below moves some frequency by 0.05 or more. */
START_TEST(sampling_temperature_top_p)
{
    static const int id_of_rank[4] = {2, 0, 3, 1}; /* rank 0 (p 0.5) is token 2 */
    static const double p[4] = {0.5, 0.25, 0.15, 0.1};
    static const struct {
        float temperature, top_p;
        double want[4]; /* by rank */
    } cases[] = {
        {1.0f, 1.0f, {0.5, 0.25, 0.15, 0.1}},
        {2.0f, 1.0f, {0.370090, 0.261693, 0.202707, 0.165509}},      /* sqrt(p) / 1.910565 */
        {0.5f, 1.0f, {0.724638, 0.181159, 0.065217, 0.028986}},      /* p^2 / 0.345 */
        {1.0f, 0.8f, {0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0}},       /* 0.5, 0.75 < 0.8 <= 0.9 */
        {2.0f, 0.6f, {0.585786, 0.414214, 0.0, 0.0}},                /* 0.370 < 0.6 <= 0.632 */
        {1.0f, 0.3f, {1.0, 0.0, 0.0, 0.0}},                          /* the first token reaches it */
        {1.0f, 0.0f, {0.5, 0.25, 0.15, 0.1}},                        /* top_p 0: no cut */
    };
    float logits[4];
    for (int r = 0; r < 4; r++) logits[id_of_rank[r]] = (float)log(p[r]) + 3.0f;
    ql_sample_slot work[4];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ql_generate_opts o = {.max_new_tokens = 1, .temperature = cases[c].temperature, .top_p = cases[c].top_p};
        uint64_t rng = 0x9E3779B97F4A7C15ull + c;
        const int n = 200000;
        int count[4] = {0};
        for (int i = 0; i < n; i++) {
            int32_t t = ql_sample_token(logits, 4, &o, &rng, work);
            ck_assert_msg(t >= 0 && t < 4, "token %d", t);
            count[t]++;
        }
        for (int r = 0; r < 4; r++) {
            double got = (double)count[id_of_rank[r]] / n, want = cases[c].want[r];
            double tol = want == 0.0 || want == 1.0 ? 0.0 : 4.0 * sqrt(want * (1 - want) / n);
            ck_assert_msg(fabs(got - want) <= tol, "temperature %g top_p %g: token %d (p %g) drawn %.5f of the time, "
                          "expected %.5f +- %.5f", cases[c].temperature, cases[c].top_p, id_of_rank[r], p[r], got, want,
                          tol);
        }
    }
    /* temperature 0 is greedy and draws nothing */
    ql_generate_opts greedy = {.max_new_tokens = 1, .temperature = 0.0f, .top_p = 0.5f};
    uint64_t rng = 7, before = rng;
    ck_assert_int_eq(ql_sample_token(logits, 4, &greedy, &rng, work), 2);
    ck_assert(rng == before);
    /* the same seed draws the same tokens */
    ql_generate_opts o = {.max_new_tokens = 1, .temperature = 1.0f, .top_p = 1.0f};
    uint64_t r1 = 42, r2 = 42;
    for (int i = 0; i < 100; i++)
        ck_assert_int_eq(ql_sample_token(logits, 4, &o, &r1, work), ql_sample_token(logits, 4, &o, &r2, work));
}
END_TEST

/* ---- end to end: one LLaMA block, final norm, LM head, mean token NLL ----
 * LoRA (with dropout) on q_proj and down_proj; all other weights frozen. */

typedef struct block {
    int64_t T, C, nh, nkv, hd, I, V, r;
    float eps, lscale, p;
    float inv[2]; /* rotary frequencies of hd 4, theta 10000 */
    uint64_t seed_q, seed_d;
    const int32_t *targets;
    float *x0;                                       /* [T, C] input (embeddings) */
    float *w_an, *w_mn, *w_fn;                       /* [C] norms */
    float *wq, *wk, *wv, *wo, *wg, *wu, *wd, *wlm;   /* [qd, C] [kvd, C] [kvd, C] [C, qd] [I, C] [I, C] [C, I] [V, C] */
    float *aq, *bq, *ad, *bd;                        /* LoRA: [r, C] [qd, r] [r, I] [C, r] */
    float *xn1, *rstd1, *xdq, *hq, *q, *k, *v;       /* activations kept for backward */
    uint8_t *mq, *md;                                /* dropout masks */
    float *att, *probs, *x1, *xn2, *rstd2, *g, *u, *m, *xdd, *hdd, *x2, *xn3, *rstd3, *logits, *tmp;
} block;

static double block_forward(void *ctx)
{
    block *b = ctx;
    const int64_t T = b->T, C = b->C, I = b->I, qd = b->nh * b->hd, kvd = b->nkv * b->hd;
    ql_rmsnorm_forward(b->xn1, b->rstd1, b->x0, b->w_an, T, C, b->eps);
    ql_matmul_nt(b->q, b->xn1, b->wq, T, C, qd, 0);
    ql_dropout_forward(b->xdq, b->mq, b->xn1, T * C, b->p, b->seed_q);
    ql_lora_forward(b->q, b->hq, b->xdq, b->aq, b->bq, T, C, qd, b->r, b->lscale);
    ql_matmul_nt(b->k, b->xn1, b->wk, T, C, kvd, 0);
    ql_matmul_nt(b->v, b->xn1, b->wv, T, C, kvd, 0);
    ql_rope_forward(b->q, T, (int)b->nh, (int)b->hd, 0, b->inv, 1.0f);
    ql_rope_forward(b->k, T, (int)b->nkv, (int)b->hd, 0, b->inv, 1.0f);
    ql_attention_forward_train(b->att, b->probs, b->q, b->k, b->v, T, (int)b->nh, (int)b->nkv, (int)b->hd, 0);
    ql_matmul_nt(b->tmp, b->att, b->wo, T, qd, C, 0);
    memcpy(b->x1, b->x0, (size_t)(T * C) * sizeof(float));
    ql_add_inplace(b->x1, b->tmp, T * C);
    ql_rmsnorm_forward(b->xn2, b->rstd2, b->x1, b->w_mn, T, C, b->eps);
    ql_matmul_nt(b->g, b->xn2, b->wg, T, C, I, 0);
    ql_matmul_nt(b->u, b->xn2, b->wu, T, C, I, 0);
    ql_swiglu_forward(b->m, b->g, b->u, T * I); /* not in place: backward needs the gate */
    ql_matmul_nt(b->tmp, b->m, b->wd, T, I, C, 0);
    ql_dropout_forward(b->xdd, b->md, b->m, T * I, b->p, b->seed_d);
    ql_lora_forward(b->tmp, b->hdd, b->xdd, b->ad, b->bd, T, I, C, b->r, b->lscale);
    memcpy(b->x2, b->x1, (size_t)(T * C) * sizeof(float));
    ql_add_inplace(b->x2, b->tmp, T * C);
    ql_rmsnorm_forward(b->xn3, b->rstd3, b->x2, b->w_fn, T, C, b->eps);
    ql_matmul_nt(b->logits, b->xn3, b->wlm, T, C, b->V, 0);
    double sum = 0; /* in double from the logits, for a clean finite difference */
    for (int64_t t = 0; t < T; t++)
        if (b->targets[t] != QL_IGNORE_INDEX) sum += ql_token_nll(b->logits + t * b->V, b->V, b->targets[t]);
    return sum / (double)ql_count_targets(b->targets, T, QL_IGNORE_INDEX);
}

/* Gradients of the mean token NLL for x0 and the LoRA matrices (da*, db* accumulate). */
static void block_backward(block *b, float *dx0, float *daq, float *dbq, float *dad, float *dbd)
{
    const int64_t T = b->T, C = b->C, I = b->I, V = b->V, r = b->r, qd = b->nh * b->hd, kvd = b->nkv * b->hd;
    const int nh = (int)b->nh, nkv = (int)b->nkv, hd = (int)b->hd;
    float *dlogits = fnew(T * V), *dxn = fnew(T * C), *dres = fnew(T * C), *dm = fnew(T * I), *dxdd = fnew(T * I);
    float *dh = fnew(T * r), *dg = fnew(T * I), *du = fnew(T * I), *datt = fnew(T * qd), *dq = fnew(T * qd);
    float *dk = fnew(T * kvd), *dv = fnew(T * kvd), *dscores = fnew(nh * T * T), *dxdq = fnew(T * C);
    const int64_t nv = ql_count_targets(b->targets, T, QL_IGNORE_INDEX);
    ql_cross_entropy_forward_backward(NULL, dlogits, b->logits, b->targets, T, V, QL_IGNORE_INDEX, 1.0f / (float)nv);
    ql_matmul_backward_input(dxn, dlogits, b->wlm, T, C, V, 0);
    ql_rmsnorm_backward(dres, NULL, dxn, b->x2, b->w_fn, b->rstd3, T, C, 0); /* dres = dL/dx2 */
    /* x2 = x1 + down(m) + LoRA(dropout(m)) */
    ql_matmul_backward_input(dm, dres, b->wd, T, I, C, 0);
    ql_lora_backward(dxdd, dad, dbd, dh, dres, b->xdd, b->hdd, b->ad, b->bd, T, I, C, r, b->lscale, 0);
    ql_dropout_backward(dm, dxdd, b->md, T * I, b->p, b->seed_d, 1);
    ql_swiglu_backward(dg, du, dm, b->g, b->u, T * I);
    ql_matmul_backward_input(dxn, dg, b->wg, T, C, I, 0);
    ql_matmul_backward_input(dxn, du, b->wu, T, C, I, 1);
    ql_rmsnorm_backward(dres, NULL, dxn, b->x1, b->w_mn, b->rstd2, T, C, 1); /* dres = dL/dx1 */
    /* x1 = x0 + o_proj(attention(rope(q), rope(k), v)) */
    ql_matmul_backward_input(datt, dres, b->wo, T, qd, C, 0);
    ql_attention_backward(dq, dk, dv, dscores, datt, b->q, b->k, b->v, b->probs, T, nh, nkv, hd, 0);
    ql_rope_backward(dq, T, nh, hd, 0, b->inv, 1.0f);
    ql_rope_backward(dk, T, nkv, hd, 0, b->inv, 1.0f);
    ql_matmul_backward_input(dxn, dq, b->wq, T, C, qd, 0);
    ql_lora_backward(dxdq, daq, dbq, dh, dq, b->xdq, b->hq, b->aq, b->bq, T, C, qd, r, b->lscale, 0);
    ql_dropout_backward(dxn, dxdq, NULL, T * C, b->p, b->seed_q, 1); /* mask re-created from the seed */
    ql_matmul_backward_input(dxn, dk, b->wk, T, C, kvd, 1);
    ql_matmul_backward_input(dxn, dv, b->wv, T, C, kvd, 1);
    memcpy(dx0, dres, (size_t)(T * C) * sizeof *dx0);
    ql_rmsnorm_backward(dx0, NULL, dxn, b->x0, b->w_an, b->rstd1, T, C, 1);
}

START_TEST(block_end_to_end)
{
    static const int32_t targets[5] = {2, 7, QL_IGNORE_INDEX, 0, 9};
    block b = {.T = 5, .C = 8, .nh = 4, .nkv = 2, .hd = 4, .I = 12, .V = 10, .r = 2,
               .eps = 1e-5f, .inv = {1.0f, 0.01f}, .lscale = 2.0f, .p = 0.25f, .seed_q = 17, .seed_d = 18,
               .targets = targets};
    const int64_t T = b.T, C = b.C, I = b.I, V = b.V, r = b.r, qd = b.nh * b.hd, kvd = b.nkv * b.hd;
    uint64_t seed = 200;
    b.x0 = randn(T * C, seed++, 1);
    b.w_an = randn(C, seed++, 0.2f), b.w_mn = randn(C, seed++, 0.2f), b.w_fn = randn(C, seed++, 0.2f);
    for (int64_t c = 0; c < C; c++) b.w_an[c] += 1, b.w_mn[c] += 1, b.w_fn[c] += 1;
    b.wq = randn(qd * C, seed++, 0.5f), b.wk = randn(kvd * C, seed++, 0.5f), b.wv = randn(kvd * C, seed++, 0.5f);
    b.wo = randn(C * qd, seed++, 0.3f), b.wg = randn(I * C, seed++, 0.5f), b.wu = randn(I * C, seed++, 0.5f);
    b.wd = randn(C * I, seed++, 0.3f), b.wlm = randn(V * C, seed++, 0.5f);
    b.aq = randn(r * C, seed++, 0.4f), b.bq = randn(qd * r, seed++, 0.4f);
    b.ad = randn(r * I, seed++, 0.4f), b.bd = randn(C * r, seed++, 0.4f);
    b.xn1 = fnew(T * C), b.rstd1 = fnew(T), b.xdq = fnew(T * C), b.hq = fnew(T * r), b.q = fnew(T * qd);
    b.k = fnew(T * kvd), b.v = fnew(T * kvd), b.mq = talloc((size_t)(T * C)), b.md = talloc((size_t)(T * I));
    b.att = fnew(T * qd), b.probs = fnew(b.nh * T * T), b.x1 = fnew(T * C), b.xn2 = fnew(T * C), b.rstd2 = fnew(T);
    b.g = fnew(T * I), b.u = fnew(T * I), b.m = fnew(T * I), b.xdd = fnew(T * I), b.hdd = fnew(T * r);
    b.x2 = fnew(T * C), b.xn3 = fnew(T * C), b.rstd3 = fnew(T), b.logits = fnew(T * V), b.tmp = fnew(T * C);
    double loss = block_forward(&b);
    ck_assert_msg(isfinite(loss) && loss > 0, "block loss %g", loss);
    float *dx0 = fnew(T * C), *daq = fnew(r * C), *dbq = fnew(qd * r), *dad = fnew(r * I), *dbd = fnew(C * r);
    block_backward(&b, dx0, daq, dbq, dad, dbd);
    printf("  block loss %.6f\n", loss);
    fd_check("block dx (input)", block_forward, &b, b.x0, dx0, T * C);
    fd_check("block dA (q_proj LoRA)", block_forward, &b, b.aq, daq, r * C);
    fd_check("block dB (q_proj LoRA)", block_forward, &b, b.bq, dbq, qd * r);
    fd_check("block dA (down_proj LoRA)", block_forward, &b, b.ad, dad, r * I);
    fd_check("block dB (down_proj LoRA)", block_forward, &b, b.bd, dbd, C * r);
    tfree_all();
}
END_TEST

/* The model and trainer call operators only through the backend table: the
 * CPU one must fill every op slot (open and close are optional), and its
 * slots run the reference operators. */
START_TEST(cpu_backend_is_complete)
{
    const ql_backend *be = ql_backend_cpu();
    ck_assert_str_eq(be->name, "cpu");
    const char *base = (const char *)&be->sync;
    size_t slots = (size_t)((const char *)(&be->cross_entropy + 1) - base) / sizeof(void (*)(void));
    ck_assert_uint_ge(slots, 26);
    for (size_t i = 0; i < slots; i++) {
        void (*fn)(void);
        memcpy(&fn, base + i * sizeof fn, sizeof fn);
        ck_assert_msg(fn != NULL, "cpu backend slot %zu is NULL", i);
    }
    ql_be_ctx *ctx;
    ck_assert_int_eq(ql_be_ctx_open("cpu", NULL, &ctx), QL_OK);
    float *p = NULL;
    ck_assert_int_eq(ql_be(ctx, alloc, (void **)&p, 64), QL_OK);
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(ql_be(ctx, zero, p, 64), QL_OK);
    ck_assert_float_eq(p[15], 0.0f);
    float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {0.5f, -1, 2, 3, 0.25f, -2}, want[4];
    ql_matmul_nt(want, x, w, 2, 3, 2, 0);
    ck_assert_int_eq(ql_be(ctx, matmul_nt, p, x, w, 2, 3, 2, 0), QL_OK);
    ck_assert_mem_eq(p, want, sizeof want);
    ctx->be->free(ctx, p);
    ck_assert_int_eq(ql_be_check(ctx), QL_OK);
    ql_be_ctx_close(ctx);
}
END_TEST

Suite *ops_suite(void)
{
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("linear");
    tcase_add_test(tc, linear_grads);
    tcase_add_test(tc, cpu_backend_is_complete);
    tcase_add_test(tc, linear_tiles_vs_reference);
    tcase_add_loop_test(tc, lora_grads, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("blas");
    tcase_add_loop_test(tc, blas_matches_reference, 0, (int)(sizeof blas_cfg / sizeof blas_cfg[0]));
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    tc = tcase_create("layers");
    tcase_add_test(tc, rmsnorm_grads);
    tcase_add_loop_test(tc, rope_grads, 0, (int)(sizeof rope_cfg / sizeof rope_cfg[0]));
    tcase_add_loop_test(tc, attention_grads, 0, (int)(sizeof attn_cfg / sizeof attn_cfg[0]));
    tcase_add_test(tc, swiglu_grads);
    suite_add_tcase(s, tc);
    tc = tcase_create("attention");
    tcase_add_loop_test(tc, attention_fast_vs_reference, 0, (int)(sizeof attn_fast_cfg / sizeof attn_fast_cfg[0]));
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    tc = tcase_create("loss_dropout");
    tcase_add_test(tc, cross_entropy_grads);
    tcase_add_test(tc, dropout_mask_and_grads);
    tcase_add_test(tc, expf_within_1_5_ulp);
    tcase_add_test(tc, log_sum_exp_vs_double);
    tcase_add_test(tc, sampling_temperature_top_p);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
#ifdef _OPENMP
    tc = tcase_create("determinism");
    tcase_add_test(tc, same_bits_any_thread_count);
    tcase_add_test(tc, blas_same_bits_for_a_thread_count);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
#endif
    tc = tcase_create("block");
    tcase_add_test(tc, block_end_to_end);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(ops_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
