/* The bf16 training attention of the CUDA backend, fused (flash style,
 * kernels/ops_flash_attention.cu) against the tiled cuBLAS path it replaced
 * and that stays for other head sizes: forward and backward times of one
 * layer's attention at the LLaMA shapes, and how far the two paths' outputs
 * are apart (relative L2, both in bf16 against each other).  One JSON line a
 * (shape, variant), then a table.  The peer is bench/peers/sdpa_attention.py
 * (PyTorch's scaled_dot_product_attention, FlashAttention-2 inside).
 *   bench_attention [--reps N] [--shapes 7b,13b,70b,1b] [--seq T]
 * FLOPs counted as FlashAttention's papers do: forward 4 T^2 hd nh / 2
 * (causal), backward 2.5 times that.  Times: medians of N samples, each the
 * wall time of 10 launches and a sync, over 10. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "qlora/qlora.h"

#define CU(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "bench_attention: %s: %s\n", #call, cudaGetErrorString(e_));           \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static void ok(int rc, const char *what)
{
    if (rc) {
        fprintf(stderr, "bench_attention: %s: %s\n", what, ql_error_message());
        exit(1);
    }
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float randn(void)
{
    float s = 0;
    for (int i = 0; i < 4; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        s += (float)(rng >> 40) / (float)(1 << 24);
    }
    return (s - 2.0f) * 1.7320508f;
}

static float *dev_random(size_t n, float scale)
{
    float *h = malloc(n * sizeof *h), *d;
    for (size_t i = 0; i < n; i++) h[i] = randn() * scale;
    CU(cudaMalloc((void **)&d, n * sizeof *d));
    CU(cudaMemcpy(d, h, n * sizeof *d, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

static float *download(const float *d, size_t n)
{
    float *h = malloc(n * sizeof *h);
    CU(cudaMemcpy(h, d, n * sizeof *h, cudaMemcpyDeviceToHost));
    return h;
}

static double rel_l2(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)a[i] - b[i];
        num += d * d, den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

typedef struct shape {
    const char *name;
    int nh, nkv, hd;
} shape;

static const shape shapes_known[] = {
    {"7b", 32, 32, 128}, {"13b", 40, 40, 128}, {"70b", 64, 8, 128}, {"1b", 32, 8, 64}, /* Llama-3.2-1B */
};

int main(int argc, char **argv)
{
    int reps = 20, T = 2048;
    const char *list = "7b,13b,70b,1b";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--shapes") && i + 1 < argc) list = argv[++i];
        else if (!strcmp(argv[i], "--seq") && i + 1 < argc) T = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_attention [--reps N] [--shapes 7b,13b,70b,1b] [--seq T]\n");
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    if (T < 1) T = 1;
    ql_be_ctx *ctx = NULL;
    ok(ql_be_ctx_open("cuda", NULL, &ctx), "cuda");
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    char table[4096] = "";
    size_t tl = 0;
    char *names = strdup(list);
    for (char *save = NULL, *nm = strtok_r(names, ",", &save); nm; nm = strtok_r(NULL, ",", &save)) {
        const shape *sh = NULL;
        for (size_t j = 0; j < sizeof shapes_known / sizeof *shapes_known; j++)
            if (!strcmp(shapes_known[j].name, nm)) sh = &shapes_known[j];
        if (!sh) {
            fprintf(stderr, "bench_attention: unknown shape '%s' (7b, 13b, 70b, 1b)\n", nm);
            return 2;
        }
        const int64_t B = 1, R = B * T, qd = (int64_t)sh->nh * sh->hd, kvd = (int64_t)sh->nkv * sh->hd;
        const int32_t len[1] = {T};
        ql_be_batch mb = {.B = B, .T = T, .len = len};
        float *q = dev_random((size_t)(R * qd), 1.0f), *k = dev_random((size_t)(R * kvd), 1.0f);
        float *v = dev_random((size_t)(R * kvd), 1.0f), *dout = dev_random((size_t)(R * qd), 1.0f);
        float *out, *lse, *dq, *dk, *dv;
        CU(cudaMalloc((void **)&out, (size_t)(R * qd) * 4));
        CU(cudaMalloc((void **)&lse, (size_t)(B * sh->nh * T) * 4));
        CU(cudaMalloc((void **)&dq, (size_t)(R * qd) * 4));
        CU(cudaMalloc((void **)&dk, (size_t)(R * kvd) * 4));
        CU(cudaMalloc((void **)&dv, (size_t)(R * kvd) * 4));
        ql_be_att_fused_set(0); /* the tiled path needs the larger scratch */
        const size_t sb = ql_be_scratch_bytes(ctx->be, QL_PREC_BF16, R, 1, 1, 0, T, sh->nh, sh->nkv, sh->hd, 0);
        void *scratch;
        CU(cudaMalloc(&scratch, sb));
        ctx->scratch = scratch, ctx->scratch_bytes = sb, ctx->precision = QL_PREC_BF16;
        const double flop = 4.0 * (double)B * sh->nh * (double)T * T * sh->hd / 2;
        float *res[2][4] = {{0}};
        double fwd_ms[2] = {0}, bwd_ms[2] = {0};
        for (int fused = 1; fused >= 0; fused--) {
            ql_be_att_fused_set(fused);
            if (fused && !ql_be_att_fused(ctx->be, sh->hd)) continue;
            /* wall time of INNER launches then a sync (the ops run on the
             * backend's own stream, which events on stream 0 would not see) */
            enum { INNER = 10 };
            float *tf = malloc((size_t)reps * sizeof *tf), *tb = malloc((size_t)reps * sizeof *tb);
            for (int r = -2; r < reps; r++) { /* two warm-up runs */
                double t0 = now();
                for (int i = 0; i < INNER; i++)
                    ql_be(ctx, attention_forward_train, out, lse, q, k, v, &mb, sh->nh, sh->nkv, sh->hd, 0);
                ok(ql_be_check(ctx), "forward");
                double t1 = now();
                for (int i = 0; i < INNER; i++)
                    ql_be(ctx, attention_backward, dq, dk, dv, NULL, dout, out, q, k, v, lse, &mb, sh->nh, sh->nkv,
                          sh->hd, 0);
                ok(ql_be_check(ctx), "backward");
                double t2 = now();
                if (r >= 0) tf[r] = (float)((t1 - t0) * 1e3 / INNER), tb[r] = (float)((t2 - t1) * 1e3 / INNER);
            }
            qsort(tf, (size_t)reps, sizeof *tf, cmp_float);
            qsort(tb, (size_t)reps, sizeof *tb, cmp_float);
            fwd_ms[fused] = tf[reps / 2], bwd_ms[fused] = tb[reps / 2];
            res[fused][0] = download(out, (size_t)(R * qd));
            res[fused][1] = download(dq, (size_t)(R * qd));
            res[fused][2] = download(dk, (size_t)(R * kvd));
            res[fused][3] = download(dv, (size_t)(R * kvd));
            free(tf), free(tb);
        }
        double err[4] = {0};
        if (res[1][0])
            for (int j = 0; j < 4; j++)
                err[j] = rel_l2(res[1][j], res[0][j], (size_t)(R * (j < 2 ? qd : kvd)));
        for (int fused = 1; fused >= 0; fused--) {
            if (!res[fused][0]) continue;
            printf("{\"bench\":\"attention\",\"impl\":\"qlora\",\"variant\":\"%s\",\"shape\":\"%s\",\"gpu\":\"%s\","
                   "\"seq\":%d,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,"
                   "\"fwd_tflops\":%.1f,\"bwd_tflops\":%.1f",
                   fused ? "fused" : "tiled", sh->name, prop.name, T, sh->nh, sh->nkv, sh->hd, fwd_ms[fused],
                   bwd_ms[fused], flop / fwd_ms[fused] / 1e9, 2.5 * flop / bwd_ms[fused] / 1e9);
            if (fused)
                printf(",\"rel_l2_vs_tiled\":{\"out\":%.3g,\"dq\":%.3g,\"dk\":%.3g,\"dv\":%.3g}", err[0], err[1],
                       err[2], err[3]);
            printf("}\n");
            tl += (size_t)snprintf(table + tl, sizeof table - tl, "%-5s %-6s %9.3f %9.3f %8.1f %8.1f\n", sh->name,
                                   fused ? "fused" : "tiled", fwd_ms[fused], bwd_ms[fused],
                                   flop / fwd_ms[fused] / 1e9, 2.5 * flop / bwd_ms[fused] / 1e9);
            for (int j = 0; j < 4; j++) free(res[fused][j]);
        }
        ctx->scratch = NULL, ctx->scratch_bytes = 0;
        cudaFree(scratch), cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(dout), cudaFree(out), cudaFree(lse);
        cudaFree(dq), cudaFree(dk), cudaFree(dv);
    }
    free(names);
    ql_be_att_fused_set(1);
    printf("\n%-5s %-6s %9s %9s %8s %8s   (T %d, %s)\n%s", "shape", "path", "fwd ms", "bwd ms", "fwd TF/s", "bwd TF/s",
           T, prop.name, table);
    ql_be_ctx_close(ctx);
    return 0;
}
