/* CPU backward operators (see ops_backward.h).  The matrix products run
 * through OpenBLAS (ops_blas.h: the same bits for a given thread count); the
 * rest, and the *_ref loops the products are checked against, accumulate
 * every output element in one thread in a fixed order: no float reduction is
 * split across threads, so they do not depend on the OpenMP thread count. */
#include <math.h>
#include <string.h>

#include "ops.h"
#include "ops_backward.h"
#include "ops_blas.h"

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* y[n] += a * x[n]; restrict and the fixed 8-wide body let -O2 vectorize it
 * (each element is still one multiply-add, in the caller's order) */
static void axpy(float *restrict y, float a, const float *restrict x, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] += a * x[i + k];
    for (; i < n; i++) y[i] += a * x[i];
}

/* Tiles: a few rows share each streamed row of the other operand, and a column
 * strip keeps the rows being summed into in L1. */
enum { ROW_TILE = 4, COL_TILE = 256 };

/* dx[T, in] (+)= alpha * dy[T, out] * w[out, in], each element summed over o in order */
static void matmul_nn(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out, float alpha,
                      int accumulate)
{
    const int64_t nt = (T + ROW_TILE - 1) / ROW_TILE, ni = (in + COL_TILE - 1) / COL_TILE;
#pragma omp parallel for collapse(2) schedule(static) if (T * in * out >= QL_PARALLEL_MIN_WORK)
    for (int64_t tb = 0; tb < nt; tb++)
        for (int64_t ib = 0; ib < ni; ib++) {
            const int64_t t0 = tb * ROW_TILE, t1 = min64(T, t0 + ROW_TILE);
            const int64_t i0 = ib * COL_TILE, i1 = min64(in, i0 + COL_TILE);
            if (!accumulate)
                for (int64_t t = t0; t < t1; t++) memset(dx + t * in + i0, 0, (size_t)(i1 - i0) * sizeof *dx);
            for (int64_t o = 0; o < out; o++) {
                const float *wo = w + o * in;
                for (int64_t t = t0; t < t1; t++) {
                    axpy(dx + t * in + i0, alpha * dy[t * out + o], wo + i0, i1 - i0);
                }
            }
        }
}

/* dw[out, in] (+)= alpha * dy[T, out]^T * x[T, in], each element summed over t in order */
static void matmul_tn(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out, float alpha,
                      int accumulate)
{
    const int64_t no = (out + ROW_TILE - 1) / ROW_TILE, ni = (in + COL_TILE - 1) / COL_TILE;
#pragma omp parallel for collapse(2) schedule(static) if (T * in * out >= QL_PARALLEL_MIN_WORK)
    for (int64_t ob = 0; ob < no; ob++)
        for (int64_t ib = 0; ib < ni; ib++) {
            const int64_t o0 = ob * ROW_TILE, o1 = min64(out, o0 + ROW_TILE);
            const int64_t i0 = ib * COL_TILE, i1 = min64(in, i0 + COL_TILE);
            if (!accumulate)
                for (int64_t o = o0; o < o1; o++) memset(dw + o * in + i0, 0, (size_t)(i1 - i0) * sizeof *dw);
            for (int64_t t = 0; t < T; t++) {
                const float *xt = x + t * in;
                for (int64_t o = o0; o < o1; o++) {
                    axpy(dw + o * in + i0, alpha * dy[t * out + o], xt + i0, i1 - i0);
                }
            }
        }
}

void ql_matmul_backward_input_ref(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out,
                                  int accumulate)
{
    matmul_nn(dx, dy, w, T, in, out, 1.0f, accumulate);
}

void ql_matmul_backward_weight_ref(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out,
                                   int accumulate)
{
    matmul_tn(dw, dy, x, T, in, out, 1.0f, accumulate);
}

/* dx[T, in] (+)= alpha * dy[T, out] * w[out, in] */
void ql_gemm_nn(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out, float alpha,
                    int accumulate)
{
    if (ql_blas_fits(T, in, out)) ql_sgemm(0, 0, T, in, out, alpha, dy, out, w, in, dx, in, accumulate);
    else matmul_nn(dx, dy, w, T, in, out, alpha, accumulate);
}

/* dw[out, in] (+)= alpha * dy[T, out]^T * x[T, in] */
void ql_gemm_tn(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out, float alpha,
                    int accumulate)
{
    if (ql_blas_fits(T, in, out)) ql_sgemm(1, 0, out, in, T, alpha, dy, out, x, in, dw, in, accumulate);
    else matmul_tn(dw, dy, x, T, in, out, alpha, accumulate);
}

void ql_matmul_backward_input(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out,
                              int accumulate)
{
    ql_gemm_nn(dx, dy, w, T, in, out, 1.0f, accumulate);
}

void ql_matmul_backward_weight(float *dw, const float *dy, const float *x, int64_t T, int64_t in, int64_t out,
                               int accumulate)
{
    ql_gemm_tn(dw, dy, x, T, in, out, 1.0f, accumulate);
}

/* ---- LoRA ---- */

void ql_lora_forward_ref(float *y, float *h, const float *xd, const float *a, const float *b, int64_t T, int64_t in,
                         int64_t out, int64_t r, float scale)
{
    ql_matmul_nt_ref(h, xd, a, T, in, r, 0);
#pragma omp parallel for collapse(2) schedule(static) if (T * (in + out) * r >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < out; o++) y[t * out + o] += scale * ql_dot(h + t * r, b + o * r, r);
}

void ql_lora_forward(float *y, float *h, const float *xd, const float *a, const float *b, int64_t T, int64_t in,
                     int64_t out, int64_t r, float scale)
{
    if (!ql_blas_fits(T, in, out) || !ql_blas_fits(r, 0, 0)) {
        ql_lora_forward_ref(y, h, xd, a, b, T, in, out, r, scale);
        return;
    }
    ql_sgemm(0, 1, T, r, in, 1.0f, xd, in, a, in, h, r, 0);   /* h[T, r] = xd a^T */
    ql_sgemm(0, 1, T, out, r, scale, h, r, b, r, y, out, 1); /* y[T, out] += scale * h b^T */
}

void ql_lora_up(float *y, const float *h, const float *b, int64_t T, int64_t out, int64_t r, float scale)
{
    if (ql_blas_fits(T, r, out)) {
        ql_sgemm(0, 1, T, out, r, scale, h, r, b, r, y, out, 1);
        return;
    }
#pragma omp parallel for collapse(2) schedule(static) if (T * out * r >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < out; o++) y[t * out + o] += scale * ql_dot(h + t * r, b + o * r, r);
}

void ql_lora_backward_ref(float *dxd, float *da, float *db, float *dh, const float *dy, const float *xd, const float *h,
                          const float *a, const float *b, int64_t T, int64_t in, int64_t out, int64_t r, float scale,
                          int accumulate)
{
    matmul_nn(dh, dy, b, T, r, out, scale, 0); /* dh[T, r] = scale * dy[T, out] b[out, r] */
    matmul_tn(db, dy, h, T, r, out, scale, 1); /* db[out, r] += scale * dy^T h */
    matmul_tn(da, dh, xd, T, in, r, 1.0f, 1);  /* da[r, in] += dh^T xd */
    if (dxd) matmul_nn(dxd, dh, a, T, in, r, 1.0f, accumulate);
}

void ql_lora_backward(float *dxd, float *da, float *db, float *dh, const float *dy, const float *xd, const float *h,
                      const float *a, const float *b, int64_t T, int64_t in, int64_t out, int64_t r, float scale,
                      int accumulate)
{
    ql_gemm_nn(dh, dy, b, T, r, out, scale, 0); /* dh[T, r] = scale * dy[T, out] b[out, r] */
    ql_gemm_tn(db, dy, h, T, r, out, scale, 1); /* db[out, r] += scale * dy^T h */
    ql_gemm_tn(da, dh, xd, T, in, r, 1.0f, 1);  /* da[r, in] += dh^T xd */
    if (dxd) ql_gemm_nn(dxd, dh, a, T, in, r, 1.0f, accumulate);
}

/* ---- RMSNorm ---- */

void ql_rmsnorm_backward(float *dx, float *dweight, const float *dy, const float *x, const float *weight,
                         const float *rstd, int64_t T, int64_t C, int accumulate)
{
    /* out_c = w_c x_c r, r = (mean(x^2) + eps)^-1/2, dr/dx_c = -r^3 x_c / C:
     * dx_c = r g_c - x_c r^3 / C * sum_j g_j x_j with g = dy * w */
#pragma omp parallel for schedule(static) if (T * C * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * C, *dyt = dy + t * C;
        const float r = rstd[t];
        double gx = 0;
        for (int64_t c = 0; c < C; c++) gx += (double)(dyt[c] * weight[c]) * xt[c];
        const float coef = (float)(gx * r * r * r / (double)C);
        float *d = dx + t * C;
        for (int64_t c = 0; c < C; c++) {
            float v = r * (dyt[c] * weight[c]) - coef * xt[c];
            d[c] = accumulate ? d[c] + v : v;
        }
    }
    if (!dweight) return;
    enum { STRIP = 64 };
    const int64_t ns = (C + STRIP - 1) / STRIP;
#pragma omp parallel for schedule(static) if (T * C * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t sb = 0; sb < ns; sb++) {
        const int64_t c0 = sb * STRIP, c1 = min64(C, c0 + STRIP);
        float acc[STRIP] = {0};
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = c0; c < c1; c++) acc[c - c0] += dy[t * C + c] * (x[t * C + c] * rstd[t]);
        for (int64_t c = c0; c < c1; c++) dweight[c] += acc[c - c0];
    }
}

/* ---- RoPE ---- */

void ql_rope_backward(float *dx, int64_t T, int nheads, int hd, int pos0, const float *inv_freq, float attn_scale)
{
    const int half = hd / 2;
    /* forward: (a, b) -> (a c - b s, b c + a s) with c, s scaled by attn_scale;
     * backward applies the transpose */
#pragma omp parallel for schedule(static) if (T * nheads * hd * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++) {
        const float pos = (float)(pos0 + t);
        for (int i = 0; i < half; i++) {
            const float f = pos * inv_freq[i]; /* as ql_rope_forward */
            const float c = cosf(f) * attn_scale, s = sinf(f) * attn_scale;
            for (int h = 0; h < nheads; h++) {
                float *v = dx + (t * nheads + h) * hd;
                const float da = v[i], db = v[i + half];
                v[i] = da * c + db * s;
                v[i + half] = db * c - da * s;
            }
        }
    }
}

/* ---- attention ---- */

/* first key a query at position t sees: t - window + 1 when banded */
static int64_t band_start(int64_t t, int window) { return window > 0 && t >= window ? t - window + 1 : 0; }

void ql_attention_forward_train_ref(float *out, float *probs, const float *q, const float *k, const float *v,
                                    int64_t T, int nh, int nkv, int hd, int window)
{
    const float scale = 1.0f / sqrtf((float)hd);
    const int group = nh / nkv;
    const int64_t stride = (int64_t)nkv * hd;
#pragma omp parallel for collapse(2) schedule(static) if (T * T * nh * hd >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const int64_t s0 = band_start(t, window), n = t - s0 + 1; /* keys s0..t */
            float *p = probs + ((int64_t)h * T + t) * T;
            memset(p, 0, (size_t)s0 * sizeof *p);
            ql_attention_row(out + (t * nh + h) * hd, p + s0, q + (t * nh + h) * hd, k + s0 * stride + (h / group) * hd,
                             v + s0 * stride + (h / group) * hd, n, stride, hd, scale);
            memset(p + t + 1, 0, (size_t)(T - t - 1) * sizeof *p);
        }
}

void ql_attention_backward_ref(float *dq, float *dk, float *dv, float *dscores, const float *dout, const float *q,
                               const float *k, const float *v, const float *probs, int64_t T, int nh, int nkv, int hd,
                               int window)
{
    const float scale = 1.0f / sqrtf((float)hd);
    const int group = nh / nkv;
    /* rows (t, h): softmax backward ds_s = p_s (dp_s - sum_j p_j dp_j), dp_s = dout_t . v_s; then dq */
#pragma omp parallel for collapse(2) schedule(static) if (T * T * nh * hd >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const int kvh = h / group;
            const int64_t s0 = band_start(t, window);
            const float *p = probs + ((int64_t)h * T + t) * T;
            float *ds = dscores + ((int64_t)h * T + t) * T;
            const float *dot_ = dout + (t * nh + h) * hd;
            double pdp = 0;
            for (int64_t s = s0; s <= t; s++) {
                ds[s] = ql_dot(dot_, v + (s * nkv + kvh) * hd, hd);
                pdp += (double)p[s] * ds[s];
            }
            for (int64_t s = s0; s <= t; s++) ds[s] = p[s] * (float)((double)ds[s] - pdp);
            for (int64_t s = 0; s < s0; s++) ds[s] = 0;
            for (int64_t s = t + 1; s < T; s++) ds[s] = 0;
            float *dqt = dq + (t * nh + h) * hd;
            memset(dqt, 0, (size_t)hd * sizeof *dqt);
            for (int64_t s = s0; s <= t; s++) axpy(dqt, ds[s] * scale, k + (s * nkv + kvh) * hd, hd);
        }
    /* kv rows (s, kvh): sum over the group's query heads, then the queries t >= s that see key s */
#pragma omp parallel for collapse(2) schedule(static) if (T * T * nh * hd >= QL_PARALLEL_MIN_WORK)
    for (int64_t s = 0; s < T; s++)
        for (int kvh = 0; kvh < nkv; kvh++) {
            float *dks = dk + (s * nkv + kvh) * hd, *dvs = dv + (s * nkv + kvh) * hd;
            const int64_t t1 = window > 0 ? min64(T, s + window) : T; /* queries s..t1-1 */
            memset(dks, 0, (size_t)hd * sizeof *dks);
            memset(dvs, 0, (size_t)hd * sizeof *dvs);
            for (int h = kvh * group; h < (kvh + 1) * group; h++)
                for (int64_t t = s; t < t1; t++) {
                    const int64_t row = ((int64_t)h * T + t) * T;
                    const float a = dscores[row + s] * scale, p = probs[row + s];
                    axpy(dks, a, q + (t * nh + h) * hd, hd);
                    axpy(dvs, p, dout + (t * nh + h) * hd, hd);
                }
        }
}

/* The fast backward, per (query head, block of ATT_BQ query rows) then per
 * (kv head, block of ATT_BQ keys), each a task of one thread (OpenBLAS runs a
 * call inside an active OpenMP region single-threaded: any thread count gives
 * the same bits):
 *   dP = dO V^T (into dscores), dS = P (dP - rowsum(P dP)), dQ = scale dS K;
 *   dV = sum over the group's heads P^T dO, dK = scale sum dS^T Q,
 * each product over the causal (banded) range of its block only. */
enum { ATT_BQ = 64 };

static void att_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                     const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
                alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

/* sum of a[n] b[n] in eight lanes, combined in a fixed tree */
static float dot8(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void ql_attention_backward(float *dq, float *dk, float *dv, float *dscores, const float *dout, const float *q,
                           const float *k, const float *v, const float *probs, int64_t T, int nh, int nkv, int hd,
                           int window)
{
    if (T <= 0) return;
    if (!ql_blas_fits(T, (int64_t)nh * hd, 0)) {
        ql_attention_backward_ref(dq, dk, dv, dscores, dout, q, k, v, probs, T, nh, nkv, hd, window);
        return;
    }
    const float scale = 1.0f / sqrtf((float)hd);
    const int group = nh / nkv;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd, nb = (T + ATT_BQ - 1) / ATT_BQ;
    /* query rows i0..i1-1 of head h see keys c0..i1-1 */
#pragma omp parallel for schedule(dynamic)
    for (int64_t task = nb * nh - 1; task >= 0; task--) {
        const int h = (int)(task % nh), kvh = h / group;
        const int64_t i0 = task / nh * ATT_BQ, i1 = min64(T, i0 + ATT_BQ), M = i1 - i0;
        const int64_t c0 = band_start(i0, window), w = i1 - c0;
        const float *p = probs + ((int64_t)h * T + i0) * T;
        float *ds = dscores + ((int64_t)h * T + i0) * T;
        att_gemm(0, 1, M, w, hd, 1.0f, dout + i0 * qs + (int64_t)h * hd, qs, v + c0 * ks + (int64_t)kvh * hd, ks, 0.0f,
                 ds + c0, T);
        for (int64_t r = 0; r < M; r++) {
            const int64_t i = i0 + r, lo = band_start(i, window), hi = i + 1;
            float *d = ds + r * T;
            const float *pr = p + r * T;
            const float pdp = dot8(pr + lo, d + lo, hi - lo);
            memset(d, 0, (size_t)lo * sizeof *d);
            for (int64_t j = lo; j < hi; j++) d[j] = pr[j] * (d[j] - pdp);
            memset(d + hi, 0, (size_t)(T - hi) * sizeof *d);
        }
        att_gemm(0, 0, M, hd, w, scale, ds + c0, T, k + c0 * ks + (int64_t)kvh * hd, ks, 0.0f,
                 dq + i0 * qs + (int64_t)h * hd, qs);
    }
    /* keys j0..j1-1 of kv head kvh are seen by queries j0..t1-1 */
#pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < nb * nkv; task++) {
        const int kvh = (int)(task % nkv);
        const int64_t j0 = task / nkv * ATT_BQ, j1 = min64(T, j0 + ATT_BQ), n = j1 - j0;
        const int64_t t1 = window > 0 ? min64(T, j1 - 1 + window) : T, R = t1 - j0;
        float *dkb = dk + j0 * ks + (int64_t)kvh * hd, *dvb = dv + j0 * ks + (int64_t)kvh * hd;
        for (int h = kvh * group; h < (kvh + 1) * group; h++) {
            const int64_t at = ((int64_t)h * T + j0) * T + j0;
            const float beta = h == kvh * group ? 0.0f : 1.0f;
            att_gemm(1, 0, n, hd, R, 1.0f, probs + at, T, dout + j0 * qs + (int64_t)h * hd, qs, beta, dvb, ks);
            att_gemm(1, 0, n, hd, R, scale, dscores + at, T, q + j0 * qs + (int64_t)h * hd, qs, beta, dkb, ks);
        }
    }
}

/* ---- SwiGLU ---- */

void ql_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n)
{
#pragma omp parallel for schedule(static) if (n * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i], u = up[i], d = dout[i];
        const float e = ql_expf(-g);
        const float sig = 1.0f / (1.0f + e), silu = g / (1.0f + e); /* silu as the forward computes it */
        /* d silu / dg = sig (1 + g (1 - sig)) */
        dgate[i] = d * u * (sig * (1.0f + g * (1.0f - sig)));
        dup[i] = d * silu;
    }
}

/* ---- cross-entropy ---- */

static float cross_entropy_row(float *dl, const float *lg, int32_t target, int64_t V, int32_t ignore_index,
                               float scale)
{
    if (target == ignore_index) {
        if (dl) memset(dl, 0, (size_t)V * sizeof *dl);
        return 0.0f;
    }
    const double lt = (double)lg[target]; /* read before dl (which may alias lg) is written */
    double sum;
    const double lse = ql_log_sum_exp(dl, &sum, lg, V); /* dl = exp(lg - max), summing to sum */
    if (dl) {
        /* softmax = exp(lg - max) / sum: one multiply by the inverse */
        const float inv = (float)(1.0 / sum), si = scale * inv;
        const float pt = dl[target] * inv;
        for (int64_t i = 0; i < V; i++) dl[i] = si * dl[i];
        dl[target] = scale * (pt - 1.0f);
    }
    return (float)(lse - lt);
}

double ql_cross_entropy_forward_backward(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                                         int64_t T, int64_t V, int32_t ignore_index, float scale)
{
    for (int64_t t = 0; t < T; t++)
        if (targets[t] != ignore_index && (targets[t] < 0 || targets[t] >= V)) return NAN;
    /* rows in parallel, their float losses summed in row order: chunks keep that
     * without allocating when the caller wants no losses[] */
    enum { CHUNK = 256 };
    float chunk[CHUNK];
    double total = 0;
    for (int64_t t0 = 0; t0 < T; t0 += CHUNK) {
        const int64_t n = T - t0 < CHUNK ? T - t0 : CHUNK;
        float *ls = losses ? losses + t0 : chunk;
#pragma omp parallel for schedule(static) if (n * V * 8 >= QL_PARALLEL_MIN_WORK)
        for (int64_t j = 0; j < n; j++) {
            const int64_t t = t0 + j;
            ls[j] = cross_entropy_row(dlogits ? dlogits + t * V : NULL, logits + t * V, targets[t], V, ignore_index,
                                      scale);
        }
        for (int64_t j = 0; j < n; j++) total += ls[j];
    }
    return total;
}

int64_t ql_count_targets(const int32_t *targets, int64_t T, int32_t ignore_index)
{
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++) n += targets[t] != ignore_index;
    return n;
}

/* ---- dropout ---- */

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL

static uint64_t splitmix64_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

uint64_t ql_splitmix64_next(uint64_t *state)
{
    *state += SPLITMIX_GAMMA;
    return splitmix64_mix(*state);
}

uint64_t ql_uniform_below(uint64_t *state, uint64_t bound)
{
    const uint64_t threshold = (0 - bound) % bound;
    for (;;) {
        uint64_t r = ql_splitmix64_next(state);
        if (r >= threshold) return r % bound;
    }
}

/* element i's 16 bits of the (i/4)-th output of the splitmix64 stream seeded
 * with seed, as a uniform in [0, 1) */
static int dropout_keep(uint64_t seed, int64_t i, float p)
{
    const uint64_t z = splitmix64_mix(seed + (uint64_t)(i / 4 + 1) * SPLITMIX_GAMMA);
    return (float)((z >> (48 - 16 * (i % 4))) & 0xffffu) * 0x1p-16f >= p;
}

void ql_dropout_forward(float *out, uint8_t *mask, const float *x, int64_t n, float p, uint64_t seed)
{
    if (!(p > 0.0f) || p >= 1.0f) {
        const int keep = !(p >= 1.0f);
        for (int64_t i = 0; i < n; i++) out[i] = keep ? x[i] : 0.0f;
        if (mask) memset(mask, keep, (size_t)n);
        return;
    }
    const float inv = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const int keep = dropout_keep(seed, i, p);
        out[i] = keep ? x[i] * inv : 0.0f;
        if (mask) mask[i] = (uint8_t)keep;
    }
}

void ql_dropout_backward(float *dx, const float *dout, const uint8_t *mask, int64_t n, float p, uint64_t seed,
                         int accumulate)
{
    if (p >= 1.0f) {
        if (!accumulate) memset(dx, 0, (size_t)n * sizeof *dx);
        return;
    }
    const int all = !(p > 0.0f);
    const float inv = all ? 1.0f : 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n * 8 >= QL_PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const int keep = all || (mask ? mask[i] : dropout_keep(seed, i, p));
        const float v = keep ? dout[i] * inv : 0.0f;
        dx[i] = accumulate ? dx[i] + v : v;
    }
}
