/* The optq quantizer plugin: OPTQ/GPTQ (Frantar et al., 2022) as its
 * reference implementation, IST-DASLab/gptq, runs it, with the checkpoint
 * layout that transformers, optimum and GPTQModel read ("gptq", v1).
 *
 * Per matrix W [rows = out_features, cols = in_features], from the inputs X
 * that ABI 1.3's calibration slots feed (docs/plugin-abi.md, "Calibration"):
 *
 *   H = 2/B sum_t x_t x_t^T        (B batches fed; accumulated in double)
 *   dead columns (H_ii = 0): H_ii = 1, W[:, i] = 0
 *   act_order=1: columns by descending H_ii (a stable sort), g_idx from it
 *   H += damp * mean(diag H) * I;  U = upper Cholesky factor of H^-1
 *   column by column, in lazy blocks of 128 columns:
 *       q = scale * (clamp(round(w / scale) + zero, 0, 2^bits - 1) - zero)
 *       err = (w - q) / U_ii;  later columns of the block -= err * U_i,
 *       and after the block, every later column -= Err * U[block, later]
 *   group-wise min-max grid per row (groupsize columns, or the whole row),
 *   found when the quantization reaches a group's first column, from the
 *   weights as the earlier blocks' updates left them:
 *       asymmetric: lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / maxq,
 *                   zero = round(-lo / scale)
 *       sym=1:      hi = max(|lo|, hi), lo = -hi when lo < 0, zero = (maxq + 1) / 2
 *       lo = hi = 0: lo = -1, hi = 1
 *   round() is ties-to-even, as torch.round.
 *
 * rtn=1 is round-to-nearest on the same grid (groups of consecutive
 * columns from the weights as they are), with no calibration.
 *
 * Saved tensors (the GPTQ v1 layout; names relative to the module prefix):
 *     qweight  I32 [ceil(cols / 32) * bits, rows]  codes along the input
 *              dimension as one little-endian bit stream per output column
 *              (3 bits spill across words: 32 codes in 3 words)
 *     qzeros   I32 [groups, ceil(rows / 32) * bits]  zero - 1 per field, the
 *              same bit stream along the output dimension
 *     scales   F16 [groups, rows]
 *     g_idx    I32 [cols]  the group of each input column
 * A shape that is not a multiple of 32 is padded with zero codes to the
 * next multiple (GPTQModel refuses such shapes; transformers' loaders
 * expect multiples of 32).  Materialized weights are
 * float(scale) * (code - zero), exact in float32. */
#include <qlora/quantizer.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef QLP_HAVE_CUDA
#include "optq_cuda.h"
#endif

#define OPTQ_BLOCK 128 /* the lazy batch of columns (the reference's blocksize) */
#define OPTQ_MAX_DIM ((int64_t)1 << 24)
/* Below about this many multiply-adds a parallel region costs more than it
 * saves (and on a loaded machine, OpenMP's spinning barriers cost far more). */
#define OPTQ_PARALLEL_WORK ((int64_t)1 << 16)

static const ql_host_api *host;

struct ql_quantizer {
    int bits;      /* 2, 3, 4 or 8 */
    int groupsize; /* -1 (one group a row) or 32..1024 */
    int act_order;
    int sym;
    int rtn;
    int v2; /* format=gptq_v2: qzeros hold the zero points themselves (v1: zero - 1) */
    double damp;
};

struct ql_qstate {
    int64_t rows, cols; /* out_features, in_features */
    int32_t src_dtype;
    int bits;
    int64_t groups;
    int64_t qw_rows; /* ceil(cols / 32) * bits */
    int64_t qz_cols; /* ceil(rows / 32) * bits */
    uint32_t *qweight; /* [qw_rows, rows] */
    uint32_t *qzeros;  /* [groups, qz_cols], zero - 1 per field */
    uint16_t *scales;  /* [groups, rows] float16 */
    int32_t *g_idx;    /* [cols] */
    float *scale_f;    /* [groups, rows], the float16 scales widened */
    int32_t *zero;     /* [groups, rows] */
};

struct ql_calib {
    int64_t cols;
    int64_t batches;
    double *s; /* [cols, cols] sum of x x^T; the lower triangle is kept */
};

/* ---- numbers ---- */

/* float16 bits of x, rounded to nearest even; *overflow when |x| rounds past 65504. */
static uint16_t f64_to_f16(double x, int *overflow)
{
    uint16_t sign = signbit(x) ? 0x8000u : 0;
    double a = fabs(x);
    *overflow = 0;
    if (a == 0) return sign;
    if (a < 0x1p-14) return (uint16_t)(sign | (uint16_t)nearbyint(a * 0x1p24)); /* subnormal; 1024 is the least normal */
    int e;
    double m = frexp(a, &e); /* a = m 2^e, m in [0.5, 1) */
    double r = nearbyint(m * 2048.0);  /* 1024..2048: the significand with its leading 1 */
    if (r == 2048.0) r = 1024.0, e++;
    int biased = e - 1 + 15;
    if (biased >= 31) {
        *overflow = 1;
        return (uint16_t)(sign | 0x7c00u);
    }
    return (uint16_t)(sign | (uint16_t)(biased << 10) | (uint16_t)((int)r - 1024));
}

static float f16_to_f32(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 1024), e - 25);
    return (h & 0x8000u) ? -v : v;
}

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* ---- the bit stream ---- */

/* Value k of a stream of `bits`-bit fields whose 32-bit words lie `stride`
 * words apart. */
static uint32_t get_field(const uint32_t *words, int64_t stride, int64_t k, int bits)
{
    const int64_t bit = k * bits, w = bit >> 5;
    const int sh = (int)(bit & 31);
    uint64_t v = words[w * stride] >> sh;
    if (sh + bits > 32) v |= (uint64_t)words[(w + 1) * stride] << (32 - sh);
    return (uint32_t)v & ((1u << bits) - 1);
}

static void put_field(uint32_t *words, int64_t stride, int64_t k, int bits, uint32_t v)
{
    const int64_t bit = k * bits, w = bit >> 5;
    const int sh = (int)(bit & 31);
    v &= (1u << bits) - 1;
    words[w * stride] |= v << sh;
    if (sh + bits > 32) words[(w + 1) * stride] |= v >> (32 - sh);
}

static int64_t padded_words(int64_t n, int bits) { return (n + 31) / 32 * bits; }

/* ---- options ---- */

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    if (!*s || *s == ' ' || *s == '+') return 0;
    long v = strtol(s, &end, 10);
    if (*end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

static int init(const ql_host_api *h)
{
#define OPTQ_HOST_NEEDED (offsetof(ql_host_api, num_threads) + sizeof(void (*)(void)))
    if (h->abi_major != QL_QUANTIZER_ABI_MAJOR || h->struct_size < OPTQ_HOST_NEEDED) return QL_EABI;
    host = h;
    return QL_OK;
}

static int create(const ql_option *opts, size_t n, ql_quantizer **out)
{
    *out = NULL;
    ql_quantizer c = {.bits = 4, .groupsize = 128, .act_order = 0, .sym = 0, .rtn = 0, .damp = 0.01};
    for (size_t i = 0; i < n; i++) {
        const char *k = opts[i].key, *v = opts[i].value;
        long x;
        if (!strcmp(k, "bits")) {
            if (!parse_int(v, 2, 8, &x) || (x != 2 && x != 3 && x != 4 && x != 8))
                return host->error(QL_EINVAL, "optq: bits=%s: must be 2, 3, 4 or 8", v);
            c.bits = (int)x;
        } else if (!strcmp(k, "groupsize")) {
            if (!parse_int(v, -1, 1024, &x) || (x != -1 && x < 32))
                return host->error(QL_EINVAL, "optq: groupsize=%s: must be -1 (one group a row) or 32..1024", v);
            c.groupsize = (int)x;
        } else if (!strcmp(k, "act_order") || !strcmp(k, "sym") || !strcmp(k, "rtn")) {
            if (!parse_int(v, 0, 1, &x)) return host->error(QL_EINVAL, "optq: %s=%s: must be 0 or 1", k, v);
            *(!strcmp(k, "act_order") ? &c.act_order : !strcmp(k, "sym") ? &c.sym : &c.rtn) = (int)x;
        } else if (!strcmp(k, "damp")) {
            char *end;
            double d = strtod(v, &end);
            if (!*v || *end || !(d > 0) || !(d <= 1))
                return host->error(QL_EINVAL, "optq: damp=%s: must be a number in (0, 1] (the share of H's mean diagonal)", v);
            c.damp = d;
        } else if (!strcmp(k, "format")) {
            if (strcmp(v, "gptq") && strcmp(v, "gptq_v2"))
                return host->error(QL_EINVAL,
                                   "optq: format=%s: must be gptq (v1: qzeros hold zero - 1) or gptq_v2 (the zero "
                                   "points themselves)",
                                   v);
            c.v2 = !strcmp(v, "gptq_v2");
        } else {
            return host->error(QL_EINVAL,
                               "optq: unknown option '%s' (bits, groupsize, act_order, sym, damp, rtn, format)", k);
        }
    }
    if (c.rtn && c.act_order)
        return host->error(QL_EINVAL, "optq: act_order=1 orders columns by the calibration Hessian; rtn=1 has none");
    ql_quantizer *q = malloc(sizeof *q);
    if (!q) return host->error(QL_ENOMEM, "out of memory");
    *q = c;
    *out = q;
    return QL_OK;
}

static void destroy(ql_quantizer *q) { free(q); }

static int describe(const ql_quantizer *q, char *buf, size_t cap)
{
    /* format only when it is not the default, so that the v1 description is
     * the one earlier runs recorded */
    int k = snprintf(buf, cap, "bits=%d,groupsize=%d,act_order=%d,sym=%d,damp=%.9g,rtn=%d%s", q->bits, q->groupsize,
                     q->act_order, q->sym, q->damp, q->rtn, q->v2 ? ",format=gptq_v2" : "");
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "optq: describe buffer too small");
}

static int64_t groups_for(int groupsize, int64_t cols) { return groupsize < 0 ? 1 : (cols + groupsize - 1) / groupsize; }

static uint64_t layout_bytes(int bits, int64_t groups, int64_t rows, int64_t cols)
{
    return 4u * (uint64_t)(padded_words(cols, bits) * rows) + 4u * (uint64_t)(groups * padded_words(rows, bits)) +
           2u * (uint64_t)(groups * rows) + 4u * (uint64_t)cols;
}

static double bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols)
{
    if (rows <= 0 || cols <= 0) return 0.0;
    return 8.0 * (double)layout_bytes(q->bits, groups_for(q->groupsize, cols), rows, cols) / ((double)rows * (double)cols);
}

/* ---- states ---- */

static void state_free(ql_qstate *s)
{
    if (!s) return;
    free(s->qweight);
    free(s->qzeros);
    free(s->scales);
    free(s->g_idx);
    free(s->scale_f);
    free(s->zero);
    free(s);
}

static void free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    state_free(s);
}

static ql_qstate *state_alloc(int64_t rows, int64_t cols, int bits, int64_t groups)
{
    ql_qstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->rows = rows;
    s->cols = cols;
    s->bits = bits;
    s->groups = groups;
    s->qw_rows = padded_words(cols, bits);
    s->qz_cols = padded_words(rows, bits);
    s->qweight = calloc((size_t)(s->qw_rows * rows), 4);
    s->qzeros = calloc((size_t)(groups * s->qz_cols), 4);
    s->scales = calloc((size_t)(groups * rows), 2);
    s->g_idx = calloc((size_t)cols, 4);
    s->scale_f = calloc((size_t)(groups * rows), 4);
    s->zero = calloc((size_t)(groups * rows), 4);
    if (!s->qweight || !s->qzeros || !s->scales || !s->g_idx || !s->scale_f || !s->zero) {
        state_free(s);
        return NULL;
    }
    return s;
}

static const char *label(const ql_matrix_desc *m) { return m && m->name ? m->name : "matrix"; }

static int check_matrix(const ql_matrix_desc *m, const float *w)
{
    if (m->rows <= 0 || m->cols <= 0 || m->rows > OPTQ_MAX_DIM || m->cols > OPTQ_MAX_DIM)
        return host->error(QL_EINVAL, "optq: %s: cannot quantize a %lld x %lld matrix", label(m), (long long)m->rows,
                           (long long)m->cols);
    for (int64_t i = 0; i < m->rows * m->cols; i++)
        if (!isfinite(w[i]))
            return host->error(QL_ENUMERIC, "optq: %s: %s at index %lld (row %lld, column %lld)", label(m),
                               isnan(w[i]) ? "NaN" : "Inf", (long long)i, (long long)(i / m->cols),
                               (long long)(i % m->cols));
    return QL_OK;
}

/* ---- the grid ---- */

typedef struct grid {
    double scale, zero;
} grid;

/* The min-max grid of x[0..n) as the reference's Quantizer.find_params
 * (perchannel, no mse search) finds it for one row. */
static grid find_grid(const double *x, int64_t n, int maxq, int sym)
{
    double lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    if (sym) {
        if (-lo > hi) hi = -lo;
        if (lo < 0) lo = -hi;
    }
    if (lo == 0 && hi == 0) lo = -1, hi = 1;
    grid g;
    g.scale = (hi - lo) / maxq;
    g.zero = sym ? (double)(maxq + 1) / 2 : nearbyint(-lo / g.scale);
    return g;
}

static int code_of(double w, grid g, int maxq)
{
    double c = nearbyint(w / g.scale) + g.zero;
    return c < 0 ? 0 : c > maxq ? maxq : (int)c;
}

/* ---- states from codes ---- */

/* Fill s from codes[rows, cols] (original column order), the grids
 * [groups, rows] and g_idx; QL_ENUMERIC when a scale overflows float16. */
static int pack_state(const ql_quantizer *q, ql_qstate *s, const ql_matrix_desc *m, const uint8_t *codes,
                      const grid *grids)
{
    const int32_t zero_off = q->v2 ? 0 : 1;
    const int64_t rows = s->rows, cols = s->cols;
    for (int64_t i = 0; i < s->groups * rows; i++) {
        int overflow;
        s->scales[i] = f64_to_f16(grids[i].scale, &overflow);
        if (overflow)
            return host->error(QL_ENUMERIC,
                               "optq: %s: a scale of %g (row %lld) is beyond float16's range, which the GPTQ layout "
                               "stores scales in",
                               label(m), grids[i].scale, (long long)(i % rows));
        s->scale_f[i] = f16_to_f32(s->scales[i]);
        s->zero[i] = (int32_t)grids[i].zero;
        put_field(s->qzeros + (i / rows) * s->qz_cols, 1, i % rows, s->bits, (uint32_t)(s->zero[i] - zero_off));
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < cols; k++) put_field(s->qweight + r, rows, k, s->bits, codes[r * cols + k]);
    return QL_OK;
}

/* ---- round to nearest ---- */

static int quantize_rtn(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    const int64_t rows = m->rows, cols = m->cols, gcols = q->groupsize < 0 ? cols : q->groupsize;
    const int64_t groups = groups_for(q->groupsize, cols);
    const int maxq = (1 << q->bits) - 1;
    ql_qstate *s = state_alloc(rows, cols, q->bits, groups);
    uint8_t *codes = malloc((size_t)(rows * cols));
    grid *grids = malloc((size_t)(groups * rows) * sizeof *grids);
    double *row = malloc((size_t)cols * sizeof *row);
    int rc = QL_OK;
    if (!s || !codes || !grids || !row) rc = host->error(QL_ENOMEM, "optq: %s: out of memory", label(m));
    for (int64_t r = 0; r < rows && rc == QL_OK; r++) {
        for (int64_t k = 0; k < cols; k++) row[k] = w[r * cols + k];
        for (int64_t g = 0; g < groups; g++) {
            const int64_t c0 = g * gcols, n = c0 + gcols <= cols ? gcols : cols - c0;
            grid gr = find_grid(row + c0, n, maxq, q->sym);
            grids[g * rows + r] = gr;
            for (int64_t k = c0; k < c0 + n; k++) codes[r * cols + k] = (uint8_t)code_of(row[k], gr, maxq);
        }
    }
    if (rc == QL_OK) {
        for (int64_t k = 0; k < cols; k++) s->g_idx[k] = (int32_t)(k / gcols);
        s->src_dtype = m->src_dtype;
        rc = pack_state(q, s, m, codes, grids);
    }
    free(codes);
    free(grids);
    free(row);
    if (rc) {
        state_free(s);
        return rc;
    }
    *out = s;
    return QL_OK;
}

/* ---- linear algebra in double ---- */

/* In place: the lower Cholesky factor of the symmetric positive definite
 * a[n, n] (lower triangle read); 0, or the column where it failed + 1. */
static int64_t cholesky_lower(double *a, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        double d = a[j * n + j];
        for (int64_t k = 0; k < j; k++) d -= a[j * n + k] * a[j * n + k];
        if (!(d > 0) || !isfinite(d)) return j + 1;
        const double ljj = sqrt(d);
        a[j * n + j] = ljj;
#pragma omp parallel for schedule(static) num_threads(host->num_threads()) if ((n - j) * j >= OPTQ_PARALLEL_WORK)
        for (int64_t i = j + 1; i < n; i++) {
            double v = a[i * n + j];
            for (int64_t k = 0; k < j; k++) v -= a[i * n + k] * a[j * n + k];
            a[i * n + j] = v / ljj;
        }
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i + 1; j < n; j++) a[i * n + j] = 0;
    return 0;
}

/* u[n, n] = the upper Cholesky factor of H^-1 (H^-1 = u^T u), from the lower
 * factor l of H (H = l l^T).  tmp has n * n doubles. */
static int64_t upper_cholesky_of_inverse(const double *l, double *u, double *tmp, int64_t n)
{
    /* tmp = (l^-1)^T, row c holding column c of l^-1 (zero above c) */
#pragma omp parallel for schedule(dynamic, 16) num_threads(host->num_threads()) if (n * n >= OPTQ_PARALLEL_WORK)
    for (int64_t c = 0; c < n; c++) {
        double *x = tmp + c * n;
        for (int64_t i = 0; i < c; i++) x[i] = 0;
        for (int64_t i = c; i < n; i++) {
            double v = i == c ? 1.0 : 0.0;
            for (int64_t k = c; k < i; k++) v -= l[i * n + k] * x[k];
            x[i] = v / l[i * n + i];
        }
    }
    /* H^-1 = l^-T l^-1: element (i, j) = sum over k >= max(i, j) of x_i[k] x_j[k] */
#pragma omp parallel for schedule(dynamic, 16) num_threads(host->num_threads()) if (n * n >= OPTQ_PARALLEL_WORK)
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j <= i; j++) {
            double v = 0;
            for (int64_t k = i; k < n; k++) v += tmp[i * n + k] * tmp[j * n + k];
            u[i * n + j] = v;
        }
    int64_t bad = cholesky_lower(u, n);
    if (bad) return bad;
    /* transpose the lower factor into the upper one */
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i + 1; j < n; j++) {
            u[i * n + j] = u[j * n + i];
            u[j * n + i] = 0;
        }
    return 0;
}

/* ---- calibration ---- */

static int calib_create(const ql_quantizer *q, const ql_matrix_desc *m, ql_calib **out)
{
    (void)q;
    *out = NULL;
    if (m->cols <= 0 || m->cols > 65536)
        return host->error(QL_EINVAL, "optq: %s: %lld input features is outside 1..65536", label(m), (long long)m->cols);
    ql_calib *c = calloc(1, sizeof *c);
    if (!c || !(c->s = calloc((size_t)(m->cols * m->cols), sizeof *c->s))) {
        free(c);
        return host->error(QL_ENOMEM, "optq: %s: out of memory for a %lld x %lld Hessian", label(m), (long long)m->cols,
                           (long long)m->cols);
    }
    c->cols = m->cols;
    *out = c;
    return QL_OK;
}

static void calib_free(const ql_quantizer *q, ql_calib *c)
{
    (void)q;
    if (!c) return;
    free(c->s);
    free(c);
}

static int calib_feed(const ql_quantizer *q, ql_calib *c, const float *x, int64_t n)
{
    (void)q;
    const int64_t cols = c->cols;
    if (n < 0) return host->error(QL_EINVAL, "optq: calib_feed with %lld rows", (long long)n);
    for (int64_t i = 0; i < n * cols; i++)
        if (!isfinite(x[i]))
            return host->error(QL_ENUMERIC, "optq: calibration input has %s at index %lld (row %lld, feature %lld)",
                               isnan(x[i]) ? "NaN" : "Inf", (long long)i, (long long)(i / cols), (long long)(i % cols));
    enum { CHUNK = 64 };
    double *xt = malloc((size_t)(cols * CHUNK) * sizeof *xt); /* [cols, chunk]: one feature's values contiguous */
    if (!xt) return host->error(QL_ENOMEM, "optq: out of memory");
    for (int64_t t0 = 0; t0 < n; t0 += CHUNK) {
        const int64_t m = t0 + CHUNK <= n ? CHUNK : n - t0;
        for (int64_t t = 0; t < m; t++)
            for (int64_t i = 0; i < cols; i++) xt[i * CHUNK + t] = x[(t0 + t) * cols + i];
#pragma omp parallel for schedule(dynamic, 8) num_threads(host->num_threads()) if (cols * cols * m >= 64 * OPTQ_PARALLEL_WORK)
        for (int64_t i = 0; i < cols; i++)
            for (int64_t j = 0; j <= i; j++) {
                double v = 0;
                for (int64_t t = 0; t < m; t++) v += xt[i * CHUNK + t] * xt[j * CHUNK + t];
                c->s[i * cols + j] += v;
            }
    }
    free(xt);
    c->batches++;
    return QL_OK;
}

/* perm = the columns by descending diagonal, ties in index order (a
 * stable merge sort). */
static void order_columns(const double *diag, int64_t n, int64_t *perm)
{
    int64_t *tmp = malloc((size_t)n * sizeof *tmp);
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    if (!tmp) { /* insertion sort: slow but correct */
        for (int64_t i = 1; i < n; i++) {
            int64_t v = perm[i], k = i;
            while (k > 0 && diag[perm[k - 1]] < diag[v]) perm[k] = perm[k - 1], k--;
            perm[k] = v;
        }
        return;
    }
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) tmp[k++] = diag[perm[b]] > diag[perm[a]] ? perm[b++] : perm[a++];
            while (a < mid) tmp[k++] = perm[a++];
            while (b < hi) tmp[k++] = perm[b++];
        }
        memcpy(perm, tmp, (size_t)n * sizeof *perm);
    }
    free(tmp);
}

static int quantize_calibrated(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, const ql_calib *c,
                               ql_qstate **out)
{
    *out = NULL;
    int rc = check_matrix(m, w);
    if (rc) return rc;
    if (m->cols != c->cols)
        return host->error(QL_EINVAL, "optq: %s has %lld input features but its calibration saw %lld", label(m),
                           (long long)m->cols, (long long)c->cols);
    if (c->batches == 0)
        return host->error(QL_EINVAL, "optq: %s: the calibration was fed no inputs", label(m));
    if (q->rtn) return quantize_rtn(q, m, w, out);
    const int64_t rows = m->rows, n = m->cols, gs = q->groupsize, groups = groups_for(q->groupsize, n);
    const int maxq = (1 << q->bits) - 1;
    double *h = malloc((size_t)(n * n) * sizeof *h), *u = malloc((size_t)(n * n) * sizeof *u);
    double *tmp = malloc((size_t)(n * n) * sizeof *tmp), *diag = malloc((size_t)n * sizeof *diag);
    int64_t *perm = malloc((size_t)n * sizeof *perm);
    uint8_t *dead = calloc((size_t)n, 1), *codes = malloc((size_t)(rows * n));
    grid *grids = malloc((size_t)(groups * rows) * sizeof *grids);
    ql_qstate *s = state_alloc(rows, n, q->bits, groups);
    if (!h || !u || !tmp || !diag || !perm || !dead || !codes || !grids || !s) {
        rc = host->error(QL_ENOMEM, "optq: %s: out of memory for the %lld x %lld Hessian", label(m), (long long)n,
                         (long long)n);
        goto done;
    }
    /* H = 2/B S; dead inputs get H_ii = 1 */
    const double f = 2.0 / (double)c->batches;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j <= i; j++) tmp[i * n + j] = tmp[j * n + i] = f * c->s[i * n + j];
        if (tmp[i * n + i] == 0) dead[i] = 1, tmp[i * n + i] = 1;
        diag[i] = tmp[i * n + i];
    }
    if (q->act_order) order_columns(diag, n, perm);
    else
        for (int64_t i = 0; i < n; i++) perm[i] = i;
    double mean = 0;
    for (int64_t i = 0; i < n; i++) mean += diag[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < n; j++) h[i * n + j] = tmp[perm[i] * n + perm[j]];
        h[i * n + i] += q->damp * mean;
    }
    int64_t bad = cholesky_lower(h, n);
    if (!bad) bad = upper_cholesky_of_inverse(h, u, tmp, n);
    if (bad) {
        rc = host->error(QL_ENUMERIC,
                         "optq: %s: the damped Hessian is not positive definite (column %lld); raise damp (now %g)",
                         label(m), (long long)(bad - 1), q->damp);
        goto done;
    }
    int failed = 0;
#pragma omp parallel num_threads(host->num_threads()) if (rows * n * n >= 64 * OPTQ_PARALLEL_WORK)
    {
        double *wrow = malloc((size_t)n * sizeof *wrow), *w1 = malloc(OPTQ_BLOCK * sizeof *w1);
        double *err = malloc(OPTQ_BLOCK * sizeof *err);
        uint8_t *pc = malloc((size_t)n);
        if (!wrow || !w1 || !err || !pc) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 4)
            for (int64_t r = 0; r < rows; r++) {
                const float *wr = w + r * n;
                grid g = {1, 0};
                if (gs < 0) { /* one grid for the row, from the weights as given */
                    for (int64_t k = 0; k < n; k++) wrow[k] = wr[k];
                    g = find_grid(wrow, n, maxq, q->sym);
                    grids[r] = g;
                }
                for (int64_t k = 0; k < n; k++) wrow[k] = dead[perm[k]] ? 0.0 : wr[perm[k]];
                for (int64_t i1 = 0; i1 < n; i1 += OPTQ_BLOCK) {
                    const int64_t i2 = i1 + OPTQ_BLOCK < n ? i1 + OPTQ_BLOCK : n, cnt = i2 - i1;
                    for (int64_t i = 0; i < cnt; i++) w1[i] = wrow[i1 + i];
                    for (int64_t i = 0; i < cnt; i++) {
                        const int64_t col = i1 + i;
                        if (gs > 0 && col % gs == 0) {
                            const int64_t len = col + gs <= n ? gs : n - col;
                            g = find_grid(wrow + col, len, maxq, q->sym);
                            grids[(col / gs) * rows + r] = g;
                        }
                        const double x = w1[i], d = u[col * n + col];
                        const int code = code_of(x, g, maxq);
                        pc[col] = (uint8_t)code;
                        const double e = (x - g.scale * ((double)code - g.zero)) / d;
                        for (int64_t j = i; j < cnt; j++) w1[j] -= e * u[col * n + i1 + j];
                        err[i] = e;
                    }
                    for (int64_t j = i2; j < n; j++) {
                        double v = 0;
                        for (int64_t i = 0; i < cnt; i++) v += err[i] * u[(i1 + i) * n + j];
                        wrow[j] -= v;
                    }
                }
                for (int64_t k = 0; k < n; k++) codes[r * n + perm[k]] = pc[k];
            }
        }
        free(wrow);
        free(w1);
        free(err);
        free(pc);
    }
    if (failed) {
        rc = host->error(QL_ENOMEM, "optq: %s: out of memory", label(m));
        goto done;
    }
    for (int64_t k = 0; k < n; k++) s->g_idx[perm[k]] = gs < 0 ? 0 : (int32_t)(k / gs);
    s->src_dtype = m->src_dtype;
    rc = pack_state(q, s, m, codes, grids);
done:
    free(h);
    free(u);
    free(tmp);
    free(diag);
    free(perm);
    free(dead);
    free(codes);
    free(grids);
    if (rc) state_free(s);
    else *out = s;
    return rc;
}

static int calibration_needed(const ql_quantizer *q) { return !q->rtn; }

static int quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out)
{
    *out = NULL;
    int rc = check_matrix(m, w);
    if (rc) return rc;
    if (!q->rtn)
        return host->error(QL_EINVAL,
                           "optq: %s: OPTQ needs calibration data (qlora quantize ... --calib-data FILE), or rtn=1 "
                           "for round-to-nearest",
                           label(m));
    return quantize_rtn(q, m, w, out);
}

/* ---- materialize, save, load ---- */

static int materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out)
{
    (void)q;
    if (out_dtype != QL_DTYPE_F32 && out_dtype != QL_DTYPE_BF16)
        return host->error(QL_ENOTSUP, "optq materializes float32 or bfloat16, not dtype %d", out_dtype);
    const int64_t rows = s->rows, cols = s->cols;
#pragma omp parallel for schedule(static) num_threads(host->num_threads()) if (rows * cols >= 4 * OPTQ_PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < cols; k++) {
            const int64_t gi = (int64_t)s->g_idx[k] * rows + r;
            const int code = (int)get_field(s->qweight + r, rows, k, s->bits);
            const float v = s->scale_f[gi] * (float)(code - s->zero[gi]);
            if (out_dtype == QL_DTYPE_F32) ((float *)out)[r * cols + k] = v;
            else ((uint16_t *)out)[r * cols + k] = f32_to_bf16(v);
        }
    return QL_OK;
}

static int put2(const ql_tensor_writer *w, const char *name, int32_t dtype, int64_t d0, int64_t d1, const void *data,
                uint64_t elem)
{
    ql_tensor t = {.name = name, .dtype = dtype, .ndim = d1 ? 2 : 1, .data = data};
    t.shape[0] = d0;
    t.shape[1] = d1;
    t.nbytes = (uint64_t)(d0 * (d1 ? d1 : 1)) * elem;
    return w->put(w->ctx, &t);
}

static int save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    int rc;
    if ((rc = put2(w, "qweight", QL_DTYPE_I32, s->qw_rows, s->rows, s->qweight, 4))) return rc;
    if ((rc = put2(w, "qzeros", QL_DTYPE_I32, s->groups, s->qz_cols, s->qzeros, 4))) return rc;
    if ((rc = put2(w, "scales", QL_DTYPE_F16, s->groups, s->rows, s->scales, 2))) return rc;
    return put2(w, "g_idx", QL_DTYPE_I32, s->cols, 0, s->g_idx, 4);
}

static int load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out)
{
    *out = NULL;
    const ql_tensor *qw = r->get(r->ctx, "qweight"), *qz = r->get(r->ctx, "qzeros"), *sc = r->get(r->ctx, "scales");
    const ql_tensor *gi = r->get(r->ctx, "g_idx");
    if (!qw || !qz || !sc || qw->dtype != QL_DTYPE_I32 || qz->dtype != QL_DTYPE_I32 || sc->dtype != QL_DTYPE_F16)
        return QL_ENOTFOUND;
    const char *name = label(m);
    if (qw->ndim != 2 || qz->ndim != 2 || sc->ndim != 2 || qw->shape[0] <= 0 || qw->shape[1] <= 0 || sc->shape[0] <= 0)
        return host->error(QL_EFORMAT, "%s: GPTQ qweight, qzeros and scales must be non-empty matrices", name);
    const int64_t rows = qw->shape[1], groups = sc->shape[0];
    int64_t cols = m && m->cols > 0 ? m->cols : 0;
    if (gi) {
        if (gi->dtype != QL_DTYPE_I32 || gi->ndim != 1 || gi->shape[0] <= 0)
            return host->error(QL_EFORMAT, "%s.g_idx: expected I32 [in_features]", name);
        if (cols && gi->shape[0] != cols)
            return host->error(QL_EFORMAT, "%s.g_idx has %lld entries but the layer has %lld input features", name,
                               (long long)gi->shape[0], (long long)cols);
        cols = gi->shape[0];
    }
    /* with act_order the groups follow the Hessian's column order, which only g_idx records */
    if (!gi && q->act_order)
        return host->error(QL_EFORMAT, "%s.g_idx is missing: an act_order (desc_act) checkpoint needs it", name);
    if (!cols) return host->error(QL_EFORMAT, "%s: a GPTQ layer without g_idx needs its shape from the model", name);
    if (rows > OPTQ_MAX_DIM || cols > OPTQ_MAX_DIM || groups > cols)
        return host->error(QL_EFORMAT, "%s: GPTQ layer of %lld x %lld in %lld groups is not supported", name,
                           (long long)rows, (long long)cols, (long long)groups);
    if (m && m->rows > 0 && m->rows != rows)
        return host->error(QL_EFORMAT, "%s.qweight has %lld output columns but the layer has %lld", name,
                           (long long)rows, (long long)m->rows);
    const int64_t words = (cols + 31) / 32;
    const int bits = qw->shape[0] % words ? 0 : (int)(qw->shape[0] / words);
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return host->error(QL_EFORMAT,
                           "%s.qweight has %lld rows for %lld input features: not 2, 3, 4 or 8 bits in 32-bit words", name,
                           (long long)qw->shape[0], (long long)cols);
    if (sc->shape[1] != rows || qz->shape[0] != groups || qz->shape[1] != padded_words(rows, bits))
        return host->error(QL_EFORMAT,
                           "%s: scales [%lld, %lld] and qzeros [%lld, %lld] do not fit %d-bit qweight [%lld, %lld] "
                           "(want scales [%lld, %lld], qzeros [%lld, %lld])",
                           name, (long long)sc->shape[0], (long long)sc->shape[1], (long long)qz->shape[0],
                           (long long)qz->shape[1], bits, (long long)qw->shape[0], (long long)rows, (long long)groups,
                           (long long)rows, (long long)groups, (long long)padded_words(rows, bits));
    const uint64_t want_qw = (uint64_t)(qw->shape[0] * rows) * 4, want_qz = (uint64_t)(groups * qz->shape[1]) * 4,
                   want_sc = (uint64_t)(groups * rows) * 2;
    if (qw->nbytes != want_qw || qz->nbytes != want_qz || sc->nbytes != want_sc || (gi && gi->nbytes != (uint64_t)cols * 4))
        return host->error(QL_EFORMAT, "%s: a GPTQ tensor's byte count does not match its shape", name);
    ql_qstate *s = state_alloc(rows, cols, bits, groups);
    if (!s) return host->error(QL_ENOMEM, "out of memory");
    s->src_dtype = QL_DTYPE_F16;
    memcpy(s->qweight, qw->data, want_qw);
    memcpy(s->qzeros, qz->data, want_qz);
    memcpy(s->scales, sc->data, want_sc);
    const int64_t gcols = q->groupsize > 0 ? q->groupsize : (cols + groups - 1) / groups;
    if (gi) memcpy(s->g_idx, gi->data, (size_t)cols * 4);
    else
        for (int64_t k = 0; k < cols; k++) s->g_idx[k] = (int32_t)(k / gcols);
    for (int64_t k = 0; k < cols; k++)
        if (s->g_idx[k] < 0 || s->g_idx[k] >= groups) {
            int64_t v = s->g_idx[k];
            state_free(s);
            return host->error(QL_EFORMAT, "%s.g_idx[%lld] is %lld, outside the %lld groups", name, (long long)k,
                               (long long)v, (long long)groups);
        }
    const uint32_t mask = (1u << bits) - 1, zero_off = q->v2 ? 0 : 1;
    for (int64_t i = 0; i < groups * rows; i++) {
        s->scale_f[i] = f16_to_f32(s->scales[i]);
        if (!isfinite(s->scale_f[i])) {
            state_free(s);
            return host->error(QL_EFORMAT, "%s.scales[%lld, %lld] is not finite", name, (long long)(i / rows),
                               (long long)(i % rows));
        }
        s->zero[i] = (int32_t)((get_field(s->qzeros + (i / rows) * s->qz_cols, 1, i % rows, bits) + zero_off) & mask);
    }
    *out = s;
    return QL_OK;
}

static int state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info)
{
    (void)q;
    info->rows = s->rows;
    info->cols = s->cols;
    info->src_dtype = s->src_dtype;
    info->bytes = layout_bytes(s->bits, s->groups, s->rows, s->cols);
    return QL_OK;
}

static int checkpoint_config(const ql_quantizer *q, char *buf, size_t cap)
{
    int k = snprintf(buf, cap,
                     "{\"quant_method\": \"gptq\", \"bits\": %d, \"group_size\": %d, \"desc_act\": %s, \"sym\": %s, "
                     "\"damp_percent\": %.9g, \"true_sequential\": true, \"static_groups\": false, "
                     "\"checkpoint_format\": \"%s\", \"pack_dtype\": \"int32\"}",
                     q->bits, q->groupsize, q->act_order ? "true" : "false", q->sym ? "true" : "false", q->damp,
                     q->v2 ? "gptq_v2" : "gptq");
    return k > 0 && (size_t)k < cap ? QL_OK : host->error(QL_EINVAL, "optq: checkpoint_config buffer too small");
}

/* ---- device (ABI 1.1; only in a plugin built with CUDA) ---- */
#ifdef QLP_HAVE_CUDA

/* qweight as saved, g_idx, and the scales and zeros as load()/quantize()
 * widened and unpacked them ([groups, rows] each), so the kernel reads no
 * float16 and no packed zero. */
static int device_buffers(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n)
{
    (void)q;
    bufs[0] = (ql_state_buffer){.name = "qweight", .data = s->qweight, .bytes = (uint64_t)(s->qw_rows * s->rows) * 4, .align = 16};
    bufs[1] = (ql_state_buffer){.name = "g_idx", .data = s->g_idx, .bytes = (uint64_t)s->cols * 4, .align = 16};
    bufs[2] = (ql_state_buffer){.name = "scales", .data = s->scale_f, .bytes = (uint64_t)(s->groups * s->rows) * 4, .align = 16};
    bufs[3] = (ql_state_buffer){.name = "zeros", .data = s->zero, .bytes = (uint64_t)(s->groups * s->rows) * 4, .align = 16};
    *n = 4;
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
        return host->error(QL_ENOTSUP, "optq materializes float32 or bfloat16, not dtype %d", out->dtype);
    if (out->row0 < 0 || out->nrows < 0 || out->row0 + out->nrows > s->rows || out->ld < s->cols)
        return host->error(QL_EINVAL, "optq: rows %lld..%lld with ld %lld do not fit a [%lld, %lld] matrix",
                           (long long)out->row0, (long long)(out->row0 + out->nrows), (long long)out->ld,
                           (long long)s->rows, (long long)s->cols);
    char err[256];
    if (qlp_optq_cuda_materialize(dev_bufs[0], dev_bufs[1], dev_bufs[2], dev_bufs[3], s->bits, s->rows, s->cols,
                                  out->dtype == QL_DTYPE_BF16, out->data, out->ld, out->row0, out->nrows, stream, err,
                                  sizeof err))
        return host->error(QL_ECUDA, "optq materialize on the GPU: %s", err);
    return QL_OK;
}
#endif

static const ql_quantizer_desc descriptor = {
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .name = "optq",
    .description = "OPTQ/GPTQ 2/3/4/8-bit with calibration (IST-DASLab/gptq); GPTQ checkpoint layout",
    .version = "1.0.0",
    .flags = QL_QUANTIZER_NEEDS_CALIBRATION,
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
    .calib_create = calib_create,
    .calib_feed = calib_feed,
    .quantize_calibrated = quantize_calibrated,
    .calib_free = calib_free,
    .calibration_needed = calibration_needed,
#ifdef QLP_HAVE_CUDA
    .device_buffers = device_buffers,
    .device_workspace = device_workspace,
    .materialize_rows_device = materialize_rows_device,
#endif
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }
