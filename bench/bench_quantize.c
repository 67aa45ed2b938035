/* Quantize and materialize throughput of each quantizer on the linear shapes
 * of one LLaMA-7B decoder block (4096 hidden, 11008 intermediate), random
 * normal weights (std 0.02).  Prints a table, and JSON lines with --json.
 *   bench_quantize [--quantizers=nf4,fp4,int8] [--repeat N] [--json] [--device=cuda]
 * --device=cuda (a build with CUDA) adds the plugin's quantize_device: the
 * weights already on the GPU, the time until the host state is back. */
#ifdef BENCH_CUDA
#include <cuda_runtime.h>
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qlora/qlora.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void randn(float *x, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i += 2) {
        double u[2];
        for (int k = 0; k < 2; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            u[k] = ((double)(s >> 11) + 0.5) / 9007199254740992.0;
        }
        double r = sqrt(-2.0 * log(u[0])) * 0.02;
        x[i] = (float)(r * cos(6.283185307179586 * u[1]));
        if (i + 1 < n) x[i + 1] = (float)(r * sin(6.283185307179586 * u[1]));
    }
}

int main(int argc, char **argv)
{
    const char *list = "nf4,nf4:double_quant=0,fp4,int8";
    int repeat = 3, as_json = 0, on_device = 0;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--quantizers=", 13)) list = argv[i] + 13;
        else if (!strncmp(argv[i], "--repeat=", 9)) repeat = atoi(argv[i] + 9);
        else if (!strcmp(argv[i], "--json")) as_json = 1;
        else if (!strcmp(argv[i], "--device=cuda")) on_device = 1;
        else if (!strcmp(argv[i], "--device=cpu")) on_device = 0;
        else {
            fprintf(stderr, "usage: %s [--quantizers=LIST] [--repeat=N] [--json] [--device=cpu|cuda]\n", argv[0]);
            return 2;
        }
    }
#ifndef BENCH_CUDA
    if (on_device) {
        fprintf(stderr, "bench_quantize: --device=cuda needs a build with CUDA\n");
        return 2;
    }
#endif
    static const struct {
        const char *name;
        int64_t rows, cols;
    } shapes[] = {{"q/k/v/o_proj", 4096, 4096}, {"gate/up_proj", 11008, 4096}, {"down_proj", 4096, 11008}};
    int64_t maxn = 11008 * 4096;
    float *w = malloc((size_t)maxn * 4), *back = malloc((size_t)maxn * 4);
    if (!w || !back) return 1;
    randn(w, (size_t)maxn, 7);
    void *dev_w = NULL;
#ifdef BENCH_CUDA
    if (on_device) {
        cudaError_t e = cudaMalloc(&dev_w, (size_t)maxn * 4);
        if (e == cudaSuccess) e = cudaMemcpy(dev_w, w, (size_t)maxn * 4, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) {
            fprintf(stderr, "bench_quantize: uploading the weights: %s\n", cudaGetErrorString(e));
            return 1;
        }
    }
#endif
    char *copy = strdup(list), *save = NULL;
    if (!as_json)
        printf("%-28s %-14s %12s %12s %14s %14s%s\n", "quantizer", "shape", "quantize ms", "dequant ms", "quantize Mp/s",
               "dequant Mp/s", on_device ? "  device q ms  device Mp/s" : "");
    /* specs are comma separated; a piece with '=' and no ':' continues the previous one's options */
    char specs[16][256];
    int nspecs = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strchr(tok, '=') && !strchr(tok, ':') && nspecs) {
            strncat(specs[nspecs - 1], ",", sizeof specs[0] - strlen(specs[nspecs - 1]) - 1);
            strncat(specs[nspecs - 1], tok, sizeof specs[0] - strlen(specs[nspecs - 1]) - 1);
        } else if (nspecs < 16) {
            snprintf(specs[nspecs++], sizeof specs[0], "%s", tok);
        }
    }
    for (int s = 0; s < nspecs; s++) {
        ql_qz *q;
        if (ql_qz_open(specs[s], &q)) {
            fprintf(stderr, "bench_quantize: %s\n", ql_error_message());
            return 1;
        }
        for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
            ql_matrix_desc md = {.name = shapes[k].name, .rows = shapes[k].rows, .cols = shapes[k].cols,
                                 .src_dtype = QL_DTYPE_F32};
            double tq = 1e30, td = 1e30;
            for (int r = 0; r < repeat; r++) {
                ql_qstate *st;
                double t0 = now();
                if (q->desc->quantize(q->inst, &md, w, &st)) {
                    fprintf(stderr, "bench_quantize: %s\n", ql_error_message());
                    return 1;
                }
                double t1 = now();
                q->desc->materialize(q->inst, st, QL_DTYPE_F32, back);
                double t2 = now();
                q->desc->free_state(q->inst, st);
                if (t1 - t0 < tq) tq = t1 - t0;
                if (t2 - t1 < td) td = t2 - t1;
            }
            double tg = 1e30; /* quantize_device: weights on the GPU, until the host state is back */
            if (on_device) {
                if (!q->desc->quantize_device) {
                    fprintf(stderr, "bench_quantize: %s has no quantize_device\n", specs[s]);
                    return 1;
                }
                for (int r = 0; r < repeat + 1; r++) { /* the first call pays for CUDA's start */
                    ql_qstate *st;
                    double t0 = now();
                    if (q->desc->quantize_device(q->inst, &md, dev_w, QL_DTYPE_F32, NULL, &st)) {
                        fprintf(stderr, "bench_quantize: %s\n", ql_error_message());
                        return 1;
                    }
                    double t1 = now();
                    q->desc->free_state(q->inst, st);
                    if (r > 0 && t1 - t0 < tg) tg = t1 - t0;
                }
            }
            double mp = (double)(md.rows * md.cols) / 1e6;
            char shape[32];
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)md.rows, (long long)md.cols);
            if (as_json) {
                printf("{\"quantizer\": \"%s\", \"shape\": \"%s\", \"quantize_ms\": %.3f, \"materialize_ms\": %.3f",
                       specs[s], shape, tq * 1e3, td * 1e3);
                if (on_device) printf(", \"device_quantize_ms\": %.3f", tg * 1e3);
                printf("}\n");
            } else {
                printf("%-28s %-14s %12.1f %12.1f %14.1f %14.1f", specs[s], shape, tq * 1e3, td * 1e3, mp / tq, mp / td);
                if (on_device) printf("  %12.2f %12.1f", tg * 1e3, mp / tg);
                printf("\n");
            }
        }
        ql_qz_close(q);
    }
    free(copy);
    free(w);
    free(back);
#ifdef BENCH_CUDA
    if (dev_w) cudaFree(dev_w);
#endif
    return 0;
}
