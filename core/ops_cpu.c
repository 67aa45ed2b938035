#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "ops_backward.h"
#include "ops_blas.h"

void ql_matmul_nt(float *y, const float *x, const float *w, int64_t T, int64_t in, int64_t out, int accumulate)
{
    if (!ql_blas_fits(T, in, out)) {
        ql_matmul_nt_ref(y, x, w, T, in, out, accumulate);
        return;
    }
    ql_sgemm(0, 1, T, out, in, 1.0f, x, in, w, in, y, out, accumulate);
}

void ql_matmul_nt_ref(float *y, const float *x, const float *w, int64_t T, int64_t in, int64_t out, int accumulate)
{
#pragma omp parallel for collapse(2) schedule(static) if (T * in * out >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < out; o++) {
            float v = ql_dot(x + t * in, w + o * in, in);
            y[t * out + o] = accumulate ? y[t * out + o] + v : v;
        }
}

void ql_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int64_t T, int64_t C, float eps)
{
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * C;
        double ss = 0;
        for (int64_t c = 0; c < C; c++) ss += (double)xt[c] * xt[c];
        float r = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (rstd) rstd[t] = r;
        for (int64_t c = 0; c < C; c++) out[t * C + c] = weight[c] * (xt[c] * r);
    }
}

void ql_rope_forward(float *x, int64_t T, int nheads, int hd, int pos0, const float *inv, float attn_scale)
{
    int half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        float pos = (float)(pos0 + t);
        for (int i = 0; i < half; i++) {
            float f = pos * inv[i];
            float c = cosf(f) * attn_scale, s = sinf(f) * attn_scale;
            for (int h = 0; h < nheads; h++) {
                float *v = x + (t * nheads + h) * hd;
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

void ql_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
                              int nh, int nkv, int hd, int window)
{
    const float scale = 1.0f / sqrtf((float)hd);
    const int group = nh / nkv;
    const int64_t stride = (int64_t)nkv * hd;
#pragma omp parallel for collapse(2) schedule(static) if ((T + past) * T * nh * hd >= QL_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            /* causal: keys s0..past+t, s0 > past+t - window when banded */
            const int64_t pos = past + t, s0 = window > 0 && pos >= window ? pos - window + 1 : 0, n = pos - s0 + 1;
            float *scores = malloc((size_t)n * sizeof *scores);
            if (!scores) continue;
            ql_attention_row(out + (t * nh + h) * hd, scores, q + (t * nh + h) * hd, k + s0 * stride + (h / group) * hd,
                             v + s0 * stride + (h / group) * hd, n, stride, hd, scale);
            free(scores);
        }
}

/* ---- attention through sgemm ----
 *
 * Per (query head, block of ATT_QB query rows), blocks aligned to multiples of
 * ATT_QB in absolute position (so that a row's arithmetic does not depend on
 * `past`), keys in chunks of ATT_KC aligned likewise:
 *   pass 1: S = scale Q K^T per chunk (sgemm), row maxima over the visible keys;
 *   pass 2: E = exp(S - max) (0 where masked), the row sums in a fixed order,
 *           O (+)= E V per chunk (sgemm, accumulating over the chunks in order);
 *   then O and (training) the probabilities are scaled by 1 / sum.
 * The training forward keeps S and E in its probs rows; the generation forward
 * works in a stack buffer of ATT_QB x ATT_KC floats and recomputes S in pass 2
 * only when the keys span more than one chunk, with the same sgemm calls: the
 * two give the same bits.  Each task is one thread's; OpenBLAS runs a call made
 * inside an active OpenMP region single-threaded (and a one-row call outside it
 * below its threading threshold), so the result does not depend on the thread
 * count either. */
enum { ATT_QB = 32, ATT_KC = 512 };

static int64_t att_band_start(int64_t i, int window) { return window > 0 && i >= window ? i - window + 1 : 0; }

static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* one thread's product: cblas_sgemm, never ql_sgemm (no gemv shortcut, no
 * openblas_set_num_threads from inside the team) */
static void att_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                     const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
                alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

/* sum of x[n] in eight lanes, combined in a fixed tree */
static float sum8(const float *x, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += x[i + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += x[i];
    return s;
}

/* max(m, x[0..n-1]) in eight lanes (vectorizes; the max is exact in any order) */
static float max8(const float *x, int64_t n, float m)
{
    float acc[8] = {m, m, m, m, m, m, m, m};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
    for (int k = 0; k < 8; k++) m = acc[k] > m ? acc[k] : m;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* query rows at absolute positions i0..i1-1 (i1 - i0 <= ATT_QB) of head h;
 * q, out hold rows from position `past`.  probs != NULL: the training forward
 * (past 0), probs [nh, T, T]; else buf [ATT_QB * ATT_KC]. */
static void attention_block(float *out, float *probs, float *buf, const float *q, const float *k, const float *v,
                            int64_t T, int64_t past, int64_t i0, int64_t i1, int h, int nh, int nkv, int hd,
                            int window, float scale)
{
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd, M = i1 - i0;
    const int kvh = h / (nh / nkv);
    const float *qb = q + (i0 - past) * qs + (int64_t)h * hd, *kb = k + (int64_t)kvh * hd, *vb = v + (int64_t)kvh * hd;
    float *ob = out + (i0 - past) * qs + (int64_t)h * hd;
    float *pb = probs ? probs + ((int64_t)h * T + i0) * T : NULL;
    const int64_t ld = probs ? T : ATT_KC;
    const int64_t c_lo = att_band_start(i0, window) / ATT_KC * ATT_KC;
    const int one_chunk = i1 - c_lo <= ATT_KC;
    float mx[ATT_QB], sum[ATT_QB];
    for (int64_t r = 0; r < M; r++) mx[r] = -INFINITY, sum[r] = 0;
    for (int64_t c = c_lo; c < i1; c += ATT_KC) {
        const int64_t w = i1 - c < ATT_KC ? i1 - c : ATT_KC;
        float *S = pb ? pb + c : buf;
        att_gemm(0, 1, M, w, hd, scale, qb, qs, kb + c * ks, ks, 0.0f, S, ld);
        for (int64_t r = 0; r < M; r++) {
            const int64_t i = i0 + r, lo = clamp64(att_band_start(i, window) - c, 0, w), hi = clamp64(i + 1 - c, lo, w);
            mx[r] = max8(S + r * ld + lo, hi - lo, mx[r]);
        }
    }
    for (int64_t c = c_lo; c < i1; c += ATT_KC) {
        const int64_t w = i1 - c < ATT_KC ? i1 - c : ATT_KC;
        float *S = pb ? pb + c : buf;
        if (!pb && !one_chunk) att_gemm(0, 1, M, w, hd, scale, qb, qs, kb + c * ks, ks, 0.0f, S, ld);
        for (int64_t r = 0; r < M; r++) {
            const int64_t i = i0 + r, lo = clamp64(att_band_start(i, window) - c, 0, w), hi = clamp64(i + 1 - c, lo, w);
            float *s = S + r * ld;
            const float m = mx[r];
            for (int64_t j = 0; j < lo; j++) s[j] = 0;
            for (int64_t j = lo; j < hi; j++) s[j] = ql_expf(s[j] - m);
            for (int64_t j = hi; j < w; j++) s[j] = 0;
            sum[r] += sum8(s, w);
        }
        att_gemm(0, 0, M, hd, w, 1.0f, S, ld, vb + c * ks, ks, c == c_lo ? 0.0f : 1.0f, ob, qs);
    }
    for (int64_t r = 0; r < M; r++) {
        const float inv = 1.0f / sum[r];
        float *o = ob + r * qs;
        for (int d = 0; d < hd; d++) o[d] *= inv;
        if (pb) {
            float *p = pb + r * T;
            memset(p, 0, (size_t)c_lo * sizeof *p);
            for (int64_t j = c_lo; j < i1; j++) p[j] *= inv;
            memset(p + i1, 0, (size_t)(T - i1) * sizeof *p);
        }
    }
}

static void attention_blocks(float *out, float *probs, const float *q, const float *k, const float *v, int64_t T,
                             int64_t past, int nh, int nkv, int hd, int window)
{
    if (T <= 0) return;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t b0 = past / ATT_QB, nb = (past + T - 1) / ATT_QB - b0 + 1, ntask = nb * nh;
    /* the last blocks see the most keys: hand them out first.  One decoded row
     * (T 1) runs on this thread: each product is then below OpenBLAS' own
     * threading threshold (M N K <= 512 hd), and waking the team would cost
     * more than the work */
#pragma omp parallel for schedule(dynamic) if (T > 1 || hd > 512)
    for (int64_t task = ntask - 1; task >= 0; task--) {
        const int h = (int)(task % nh);
        const int64_t b = b0 + task / nh;
        const int64_t i0 = b * ATT_QB > past ? b * ATT_QB : past;
        const int64_t i1 = (b + 1) * ATT_QB < past + T ? (b + 1) * ATT_QB : past + T;
        float buf[ATT_QB * ATT_KC]; /* 64 KiB; the training forward uses probs */
        attention_block(out, probs, probs ? NULL : buf, q, k, v, T, past, i0, i1, h, nh, nkv, hd, window, scale);
    }
}

/* whether every size and leading dimension fits OpenBLAS' int */
static int attention_fits(int64_t n, int nh, int hd) { return ql_blas_fits(n, (int64_t)nh * hd, 0); }

void ql_attention_forward(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
                          int nh, int nkv, int hd, int window)
{
    if (!attention_fits(past + T, nh, hd)) {
        ql_attention_forward_ref(out, q, k, v, T, past, nh, nkv, hd, window);
        return;
    }
    attention_blocks(out, NULL, q, k, v, T, past, nh, nkv, hd, window);
}

void ql_attention_forward_train(float *out, float *probs, const float *q, const float *k, const float *v, int64_t T,
                                int nh, int nkv, int hd, int window)
{
    if (!attention_fits(T, nh, hd)) {
        ql_attention_forward_train_ref(out, probs, q, k, v, T, nh, nkv, hd, window);
        return;
    }
    attention_blocks(out, probs, q, k, v, T, 0, nh, nkv, hd, window);
}

void ql_attention_row(float *o, float *p, const float *qt, const float *k, const float *v, int64_t n, int64_t stride,
                      int hd, float scale)
{
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        p[s] = ql_dot(qt, k + s * stride, hd) * scale;
        if (p[s] > mx) mx = p[s];
    }
    float sum = 0;
    for (int64_t s = 0; s < n; s++) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    memset(o, 0, (size_t)hd * sizeof *o);
    for (int64_t s = 0; s < n; s++) {
        p[s] = p[s] / sum;
        const float *vs = v + s * stride;
        for (int d = 0; d < hd; d++) o[d] += p[s] * vs[d];
    }
}

void ql_swiglu_forward(float *out, const float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + ql_expf(-g)) * up[i];
    }
}

void ql_add_inplace(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

double ql_log_sum_exp(float *e, double *sum_e, const float *x, int64_t V)
{
    float m8[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t i = 0;
    for (; i + 8 <= V; i += 8)
        for (int k = 0; k < 8; k++) m8[k] = x[i + k] > m8[k] ? x[i + k] : m8[k];
    float mx = m8[0];
    for (int k = 1; k < 8; k++) mx = m8[k] > mx ? m8[k] : mx;
    for (; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    if (!(mx > -INFINITY)) { /* all -inf (or empty): log 0; NaN stays NaN */
        if (e)
            for (int64_t j = 0; j < V; j++) e[j] = x[j] == x[j] ? 0.0f : x[j];
        if (sum_e) *sum_e = 0;
        return mx == mx ? -INFINITY : (double)mx;
    }
    enum { BLOCK = 256 };
    double sum = 0;
    for (int64_t b0 = 0; b0 < V; b0 += BLOCK) {
        const int64_t b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
        float acc[8] = {0};
        int64_t j = b0;
        if (e) {
            for (; j + 8 <= b1; j += 8)
                for (int k = 0; k < 8; k++) {
                    const float v = ql_expf(x[j + k] - mx);
                    e[j + k] = v;
                    acc[k] += v;
                }
            for (; j < b1; j++) acc[0] += e[j] = ql_expf(x[j] - mx);
        } else {
            for (; j + 8 <= b1; j += 8)
                for (int k = 0; k < 8; k++) acc[k] += ql_expf(x[j + k] - mx);
            for (; j < b1; j++) acc[0] += ql_expf(x[j] - mx);
        }
        sum += (double)(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    }
    if (sum_e) *sum_e = sum;
    return log(sum) + (double)mx;
}

double ql_token_nll(const float *logits, int64_t V, int32_t target)
{
    return ql_log_sum_exp(NULL, NULL, logits, V) - (double)logits[target];
}
