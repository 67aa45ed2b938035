/* Where the time of one CPU training step goes: every operator of the
 * forward and backward pass of one sequence, at a model's shapes, timed on
 * its own and multiplied by how often a step calls it (as core/lora_model.c
 * does without gradient checkpointing; LoRA on all seven linears, no
 * dropout).  Default shapes: SmolLM-135M (30 layers, hidden 576,
 * intermediate 1536, 9/3 heads of 64, vocab 49152), 256 tokens, r 16.
 *
 *   OMP_NUM_THREADS=2 build/bench/bench_cpu_ops [--tokens 256] [--repeat 3]
 *
 * The sum leaves out what lora_model.c does around the operators
 * (allocations, copies, materializing quantized weights); compare it with a
 * real step's time (bench/cpu-compare). */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"
#include "ops_backward.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *buf(int64_t n, uint64_t seed, float scale)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
    if (!x) {
        fprintf(stderr, "bench_cpu_ops: out of memory for %lld floats\n", (long long)n);
        exit(1);
    }
    uint64_t s = seed;
    for (int64_t i = 0; i < n; i++) {
        s += 0x9E3779B97F4A7C15ULL;
        uint64_t z = (s ^ (s >> 31)) * 0xBF58476D1CE4E5B9ULL;
        x[i] = scale * ((float)(z >> 40) * 0x1p-24f - 0.5f);
    }
    return x;
}

typedef struct row {
    const char *name;
    double ms;   /* one call, best of repeats */
    int count;   /* calls per step */
} row;

static row rows[64];
static int nrows;
static int repeat = 3;

#define TIME(label, calls, expr)                                                                                    \
    do {                                                                                                            \
        double best = INFINITY;                                                                                     \
        for (int rep = 0; rep < repeat; rep++) {                                                                    \
            double t0 = now();                                                                                      \
            expr;                                                                                                   \
            double t = now() - t0;                                                                                  \
            if (t < best) best = t;                                                                                 \
        }                                                                                                           \
        rows[nrows++] = (row){label, best * 1e3, calls};                                                            \
    } while (0)

int main(int argc, char **argv)
{
    int64_t T = 256, H = 576, I = 1536, V = 49152, r = 16;
    int L = 30, nh = 9, nkv = 3, hd = 64;
    float inv_freq[32]; /* default rope, theta 100000 as the 135M model */
    for (int i = 0; i < hd / 2; i++) inv_freq[i] = 1.0f / powf(100000.0f, (float)(2 * i) / (float)hd);
    static const struct option opts[] = {{"tokens", required_argument, NULL, 't'},
                                         {"repeat", required_argument, NULL, 'r'},
                                         {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 't') T = atoll(optarg);
        else if (c == 'r') repeat = atoi(optarg);
        else {
            fprintf(stderr, "usage: bench_cpu_ops [--tokens N] [--repeat N]\n");
            return 2;
        }
    }
    if (T < 2 || T > 8192 || repeat < 1) {
        fprintf(stderr, "bench_cpu_ops: --tokens must be 2..8192 and --repeat >= 1\n");
        return 2;
    }
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    float *x = buf(T * I, 1, 1), *y = buf(T * V, 2, 1), *dy = buf(T * I, 3, 1), *dx = buf(T * I, 4, 1);
    float *w = buf(I * H, 5, 0.05f), *wlm = buf(V * H, 6, 0.05f), *nw = buf(I, 7, 1), *rs = buf(T, 8, 1);
    float *a = buf(r * I, 9, 0.05f), *b = buf(I * r, 10, 0.05f), *h = buf(T * r, 11, 1), *dh = buf(T * r, 12, 1);
    float *da = buf(r * I, 13, 0), *db = buf(I * r, 14, 0);
    float *q = buf(T * qd, 15, 1), *k = buf(T * kvd, 16, 1), *v = buf(T * kvd, 17, 1), *att = buf(T * qd, 18, 1);
    float *probs = buf((int64_t)nh * T * T, 19, 0), *dsc = buf((int64_t)nh * T * T, 20, 0);
    float *dq = buf(T * qd, 21, 0), *dk = buf(T * kvd, 22, 0), *dv = buf(T * kvd, 23, 0);
    int32_t *tg = malloc((size_t)T * sizeof *tg);
    for (int64_t t = 0; t < T; t++) tg[t] = (int32_t)((t * 7919) % V);
    tg[T - 1] = QL_IGNORE_INDEX;
    struct {
        const char *name;
        int64_t in, out;
    } lin[3] = {{"q,o 576x576", H, qd}, {"k,v 576x192", H, kvd}, {"gate,up,down 576x1536", H, I}};
    const int lin_count[3] = {2, 2, 3}; /* per layer; down is 1536 -> 576, timed as its transpose shape */
    static char names[3][4][64];
    for (int i = 0; i < 3; i++) {
        snprintf(names[i][0], 64, "matmul_nt %s", lin[i].name);
        snprintf(names[i][1], 64, "matmul_backward_input %s", lin[i].name);
        snprintf(names[i][2], 64, "lora_forward %s", lin[i].name);
        snprintf(names[i][3], 64, "lora_backward %s", lin[i].name);
        const int64_t in = lin[i].in, out = lin[i].out;
        TIME(names[i][0], L * lin_count[i], ql_matmul_nt(y, x, w, T, in, out, 0));
        TIME(names[i][1], L * lin_count[i], ql_matmul_backward_input(dx, dy, w, T, in, out, 0));
        TIME(names[i][2], L * lin_count[i], ql_lora_forward(y, h, x, a, b, T, in, out, r, 2.0f));
        TIME(names[i][3], L * lin_count[i], ql_lora_backward(dx, da, db, dh, dy, x, h, a, b, T, in, out, r, 2.0f, 1));
    }
    TIME("lm_head matmul_nt 576x49152", 1, ql_matmul_nt(y, x, wlm, T, H, V, 0));
    TIME("lm_head matmul_backward_input", 1, ql_matmul_backward_input(dx, y, wlm, T, H, V, 0));
    TIME("cross_entropy fwd+bwd 49152", 1,
         ql_cross_entropy_forward_backward(NULL, y, y, tg, T, V, QL_IGNORE_INDEX, 1.0f / (float)(T - 1)));
    TIME("token_nll (eval) 49152", 0, for (int64_t t = 0; t + 1 < T; t++) ql_token_nll(y + t * V, V, tg[t]));
    TIME("attention_forward_train", L, ql_attention_forward_train(att, probs, q, k, v, T, nh, nkv, hd, 0));
    TIME("attention_backward", L, ql_attention_backward(dq, dk, dv, dsc, att, q, k, v, probs, T, nh, nkv, hd, 0));
    /* not in the step: the row-loop references, and one generated token after T - 1 cached */
    TIME("attention_forward_train (row-loop reference)", 0,
         ql_attention_forward_train_ref(att, probs, q, k, v, T, nh, nkv, hd, 0));
    TIME("attention_backward (row-loop reference)", 0,
         ql_attention_backward_ref(dq, dk, dv, dsc, att, q, k, v, probs, T, nh, nkv, hd, 0));
    TIME("attention_forward 1 token after T-1", 0,
         ql_attention_forward(att, q + (T - 1) * nh * hd, k, v, 1, T - 1, nh, nkv, hd, 0));
    TIME("attention_forward 1 token after T-1 (reference)", 0,
         ql_attention_forward_ref(att, q + (T - 1) * nh * hd, k, v, 1, T - 1, nh, nkv, hd, 0));
    TIME("rope_forward q+k", L, (ql_rope_forward(q, T, nh, hd, 0, inv_freq, 1.0f), ql_rope_forward(k, T, nkv, hd, 0, inv_freq, 1.0f)));
    TIME("rope_backward q+k", L, (ql_rope_backward(dq, T, nh, hd, 0, inv_freq, 1.0f), ql_rope_backward(dk, T, nkv, hd, 0, inv_freq, 1.0f)));
    TIME("rmsnorm_forward", 2 * L + 1, ql_rmsnorm_forward(dx, rs, x, nw, T, H, 1e-5f));
    TIME("rmsnorm_backward", 2 * L + 1, ql_rmsnorm_backward(dx, NULL, dy, x, nw, rs, T, H, 1));
    TIME("swiglu_forward", L, ql_swiglu_forward(dx, x, dy, T * I));
    TIME("swiglu_backward", L, ql_swiglu_backward(dx, y, dy, x, dy, T * I));
    TIME("add_inplace", 2 * L, ql_add_inplace(dx, x, T * H));

    double total = 0;
    printf("| operator | ms per call | calls per step | ms per step |\n|---|---:|---:|---:|\n");
    for (int i = 0; i < nrows; i++) total += rows[i].ms * rows[i].count;
    for (int i = 0; i < nrows; i++)
        printf("| %s | %.3f | %d | %.1f (%.1f%%) |\n", rows[i].name, rows[i].ms, rows[i].count,
               rows[i].ms * rows[i].count, 100.0 * rows[i].ms * rows[i].count / total);
    printf("| total | | | %.1f ms = %.1f tokens/s |\n", total, (double)T / (total / 1e3));
    return 0;
}
