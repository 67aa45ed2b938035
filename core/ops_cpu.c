#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
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

void ql_attention_forward(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
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
