/* Device materialize of each quantizer plugin against a device-to-device
 * copy of the same bytes, at the LLaMA shapes of the CUDA issue's target
 * table.  One JSON line a (plugin, shape), then a table.
 *   bench_materialize [--reps N] [--plugins nf4,fp4,int8] [--shapes 4096x4096,11008x4096,...]
 * The copy moves (bytes read + bytes written) / 2 each way, so both move
 * the same total; "x copy" is the materialize time over the copy time (the
 * target is at most 1.15).  Times are medians of N event-timed launches,
 * each sample one launch on each of enough weight copies (back to back)
 * that the inputs do not sit in L2. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/qlora.h"

#define CU(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "bench_materialize: %s: %s\n", #call, cudaGetErrorString(e_));         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float randn(void)
{
    /* sum of uniforms: cheap, roughly normal, deterministic */
    float s = 0;
    for (int i = 0; i < 4; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        s += (float)(rng >> 40) / (float)(1 << 24);
    }
    return (s - 2.0f) * 1.7320508f;
}

int main(int argc, char **argv)
{
    int reps = 50;
    const char *plugins = "nf4,fp4,int8";
    const char *shapes = "4096x4096,11008x4096,28672x8192";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--plugins") && i + 1 < argc) plugins = argv[++i];
        else if (!strcmp(argv[i], "--shapes") && i + 1 < argc) shapes = argv[++i];
        else {
            fprintf(stderr, "usage: bench_materialize [--reps N] [--plugins a,b] [--shapes RxC,...]\n");
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    char table[8192];
    size_t tl = 0;
    tl += (size_t)snprintf(table + tl, sizeof table - tl, "\n%-6s %-12s %10s %10s %10s %8s   (%s)\n", "plugin", "shape", "ms",
                           "GB/s", "copy GB/s", "x copy", prop.name);
    char plist[256], slist[512];
    snprintf(plist, sizeof plist, "%s", plugins);
    for (char *pp, *p = strtok_r(plist, ",", &pp); p; p = strtok_r(NULL, ",", &pp)) {
        ql_qz *q;
        if (ql_qz_open(p, &q)) {
            fprintf(stderr, "bench_materialize: %s\n", ql_error_message());
            return 1;
        }
        if (!q->desc->materialize_rows_device) {
            fprintf(stderr, "bench_materialize: plugin %s has no device materialize\n", p);
            return 1;
        }
        snprintf(slist, sizeof slist, "%s", shapes);
        for (char *sp, *s = strtok_r(slist, ",", &sp); s; s = strtok_r(NULL, ",", &sp)) {
            long long rows, cols;
            if (sscanf(s, "%lldx%lld", &rows, &cols) != 2 || rows <= 0 || cols <= 0) {
                fprintf(stderr, "bench_materialize: bad shape %s (want ROWSxCOLS)\n", s);
                return 2;
            }
            size_t n = (size_t)rows * (size_t)cols;
            float *w = malloc(n * sizeof *w);
            for (size_t i = 0; i < n; i++) w[i] = 0.02f * randn();
            ql_matrix_desc md = {.name = "bench", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_BF16};
            ql_qstate *st;
            if (q->desc->quantize(q->inst, &md, w, &st)) {
                fprintf(stderr, "bench_materialize: %s\n", ql_error_message());
                return 1;
            }
            free(w);
            ql_state_buffer bufs[QL_MAX_STATE_BUFFERS];
            uint32_t nb = 0;
            q->desc->device_buffers(q->inst, st, bufs, &nb);
            uint64_t in_bytes = 0;
            for (uint32_t i = 0; i < nb; i++) in_bytes += bufs[i].bytes;
            uint64_t out_bytes = (uint64_t)n * 2;
            /* enough copies of the inputs to leave L2 cold between launches */
            int copies = (int)((4 * (uint64_t)prop.l2CacheSize) / (in_bytes + out_bytes) + 1);
            if (copies > 8) copies = 8;
            void *dev[8][QL_MAX_STATE_BUFFERS], *outs[8];
            for (int c = 0; c < copies; c++) {
                for (uint32_t i = 0; i < nb; i++) {
                    CU(cudaMalloc(&dev[c][i], bufs[i].bytes));
                    CU(cudaMemcpy(dev[c][i], bufs[i].data, bufs[i].bytes, cudaMemcpyHostToDevice));
                }
                CU(cudaMalloc(&outs[c], out_bytes));
            }
            uint64_t ws_bytes = q->desc->device_workspace(q->inst, st, rows);
            void *ws = NULL;
            if (ws_bytes) CU(cudaMalloc(&ws, ws_bytes));
            cudaStream_t stream;
            CU(cudaStreamCreate(&stream));
            cudaEvent_t e0, e1;
            CU(cudaEventCreate(&e0));
            CU(cudaEventCreate(&e1));
            float *ms = malloc((size_t)reps * sizeof *ms), *cms = malloc((size_t)reps * sizeof *cms);
            size_t half = (size_t)((in_bytes + out_bytes) / 2);
            void *csrc[8], *cdst[8];
            for (int c = 0; c < copies; c++) {
                CU(cudaMalloc(&csrc[c], half));
                CU(cudaMalloc(&cdst[c], half));
                CU(cudaMemset(csrc[c], 0x3c, half));
            }
            /* each sample: one launch per copy, back to back, between two events */
            for (int r = -3; r < reps; r++) {
                CU(cudaEventRecord(e0, stream));
                for (int c = 0; c < copies; c++) {
                    ql_device_out o = {.dtype = QL_DTYPE_BF16, .data = outs[c], .ld = cols, .row0 = 0, .nrows = rows};
                    if (q->desc->materialize_rows_device(q->inst, st, (const void *const *)dev[c], &o, ws, ws_bytes,
                                                         stream)) {
                        fprintf(stderr, "bench_materialize: %s\n", ql_error_message());
                        return 1;
                    }
                }
                CU(cudaEventRecord(e1, stream));
                CU(cudaEventSynchronize(e1));
                float t;
                CU(cudaEventElapsedTime(&t, e0, e1));
                if (r >= 0) ms[r] = t / (float)copies;
                CU(cudaEventRecord(e0, stream));
                for (int c = 0; c < copies; c++)
                    CU(cudaMemcpyAsync(cdst[c], csrc[c], half, cudaMemcpyDeviceToDevice, stream));
                CU(cudaEventRecord(e1, stream));
                CU(cudaEventSynchronize(e1));
                CU(cudaEventElapsedTime(&t, e0, e1));
                if (r >= 0) cms[r] = t / (float)copies;
            }
            qsort(ms, (size_t)reps, sizeof *ms, cmp_float);
            qsort(cms, (size_t)reps, sizeof *cms, cmp_float);
            double tm = ms[reps / 2], tc = cms[reps / 2];
            double gbs = (double)(in_bytes + out_bytes) / (tm * 1e6), cgbs = (double)(2 * half) / (tc * 1e6);
            printf("{\"bench\": \"materialize\", \"plugin\": \"%s\", \"options\": \"%s\", \"rows\": %lld, \"cols\": %lld, "
                   "\"out\": \"bf16\", \"ms\": %.5f, \"gb_per_s\": %.1f, \"copy_ms\": %.5f, \"copy_gb_per_s\": %.1f, "
                   "\"x_copy\": %.3f, \"bytes_in\": %llu, \"bytes_out\": %llu, \"gpu\": \"%s\"}\n",
                   q->desc->name, q->options, rows, cols, tm, gbs, tc, cgbs, tm / tc, (unsigned long long)in_bytes,
                   (unsigned long long)out_bytes, prop.name);
            char shape[64];
            snprintf(shape, sizeof shape, "%lldx%lld", rows, cols);
            tl += (size_t)snprintf(table + tl, sizeof table - tl, "%-6s %-12s %10.4f %10.0f %10.0f %8.2f\n", p, shape, tm,
                                   gbs, cgbs, tm / tc);
            for (int c = 0; c < copies; c++) {
                for (uint32_t i = 0; i < nb; i++) CU(cudaFree(dev[c][i]));
                CU(cudaFree(outs[c]));
                CU(cudaFree(csrc[c]));
                CU(cudaFree(cdst[c]));
            }
            if (ws) CU(cudaFree(ws));
            CU(cudaStreamDestroy(stream));
            free(ms);
            free(cms);
            q->desc->free_state(q->inst, st);
        }
        ql_qz_close(q);
    }
    fputs(table, stdout);
    return 0;
}
