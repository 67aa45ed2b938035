/* The CUDA backend: backend.h's table on one NVIDIA GPU, fp32.  Matrix
 * products run through cuBLAS (fp32, no TF32), the other ops through the
 * engine's kernels (kernels/cuda_ops.h), quantized weights through each
 * plugin's device materialize (ABI 1.1), or, for a plugin without one, on
 * the CPU and copied over.  Every op is queued on the context's stream; a
 * failure is reported by the op that sees it or by the next sync.
 *
 * Host arguments (token ids, lengths, targets, seeds, rotary tables) are
 * copied into a device staging buffer that the context owns, grown only when
 * an op needs more than any before it (in the first step).  Lengths and
 * rotary tables repeat from op to op within a step, so they are copied again
 * only when they change. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ql_config.h"
#include "qlora/error.h"

#if QL_HAVE_CUDA

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../kernels/cuda_ops.h"

_Static_assert(QLK_SUMSQ_PARTS == QL_BE_SUMSQ_PARTS, "the sum of squares scratch");

enum { N_CACHED = 2 }; /* staged arrays kept between ops: lengths, rotary table */
enum { RING_BYTES = 8 << 20 };

typedef struct cached_arg {
    void *host;    /* a copy of what was last staged (NULL: nothing) */
    size_t bytes;
    void *dev;     /* its device copy */
    size_t cap;
} cached_arg;

typedef struct cuda_impl {
    int device;
    cudaStream_t stream, side, copyq, optq; /* the queues of ctx->queue: main, side, copy, optimizer */
    cudaEvent_t events[QL_BE_EVENTS];
    cublasHandle_t blas;
    void *args;      /* device staging for per-op host arguments too large for the ring */
    size_t args_cap;
    /* the ring: pinned host and device staging of per-op arguments, in two
     * halves; a half is written again only after the ops that read it last
     * time have run (its event), so staging does not stall the stream */
    char *ring_h, *ring_d;
    size_t ring_head;
    cudaEvent_t half_done[2];
    int half_used[2];
    cached_arg cached[N_CACHED];
    /* the activation whose bf16 copy is at the start of ctx->scratch (product16),
     * for ctx->reuse_x; cleared whenever the scratch is carved otherwise */
    const float *x16_src;
    int64_t x16_n;
} cuda_impl;

static int cuda_fail(cudaError_t e, const char *what)
{
    return ql_error(e == cudaErrorMemoryAllocation ? QL_ENOMEM : QL_ECUDA, "CUDA: %s: %s", what,
                    cudaGetErrorString(e));
}

#define CUDA_TRY(call, what)                               \
    do {                                                   \
        cudaError_t e_ = (call);                           \
        if (e_ != cudaSuccess) return cuda_fail(e_, what); \
    } while (0)

static const char *blas_status(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

static cuda_impl *impl(ql_be_ctx *ctx) { return ctx->impl; }
static void *stream(ql_be_ctx *ctx)
{
    cuda_impl *c = impl(ctx);
    return (void *)(ctx->queue == 3 ? c->optq : ctx->queue == 2 ? c->copyq : ctx->queue ? c->side : c->stream);
}

/* a launcher's status */
static int launched(int e, const char *op)
{
    return e ? cuda_fail((cudaError_t)e, op) : QL_OK;
}

/* ---- context ---- */

static int cuda_open(ql_be_ctx *ctx)
{
    cuda_impl *c = calloc(1, sizeof *c);
    if (!c) return ql_error(QL_ENOMEM, "out of memory");
    int rc = QL_OK;
    cudaError_t e = cudaGetDevice(&c->device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->copyq, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->optq, cudaStreamNonBlocking);
    for (int i = 0; i < QL_BE_EVENTS && e == cudaSuccess; i++)
        e = cudaEventCreateWithFlags(&c->events[i], cudaEventDisableTiming);
    if (e != cudaSuccess) rc = cuda_fail(e, "cannot open the device");
    cublasStatus_t bs = rc ? CUBLAS_STATUS_SUCCESS : cublasCreate(&c->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) rc = ql_error(QL_ECUDA, "cuBLAS: cannot create a handle: %s", blas_status(bs));
    if (rc == QL_OK && (bs = cublasSetStream(c->blas, c->stream)) != CUBLAS_STATUS_SUCCESS)
        rc = ql_error(QL_ECUDA, "cuBLAS: cannot set the stream: %s", blas_status(bs));
    if (rc == QL_OK) {
        e = cudaHostAlloc((void **)&c->ring_h, RING_BYTES, cudaHostAllocDefault);
        if (e == cudaSuccess) e = cudaMalloc((void **)&c->ring_d, RING_BYTES);
        for (int i = 0; i < 2 && e == cudaSuccess; i++) e = cudaEventCreateWithFlags(&c->half_done[i], cudaEventDisableTiming);
        if (e != cudaSuccess) rc = cuda_fail(e, "cannot allocate the argument staging");
    }
    if (rc) {
        for (int i = 0; i < 2; i++)
            if (c->half_done[i]) cudaEventDestroy(c->half_done[i]);
        cudaFreeHost(c->ring_h);
        cudaFree(c->ring_d);
        if (c->blas) cublasDestroy(c->blas);
        if (c->stream) cudaStreamDestroy(c->stream);
        if (c->side) cudaStreamDestroy(c->side);
        if (c->copyq) cudaStreamDestroy(c->copyq);
        if (c->optq) cudaStreamDestroy(c->optq);
        for (int i = 0; i < QL_BE_EVENTS; i++)
            if (c->events[i]) cudaEventDestroy(c->events[i]);
        free(c);
        return rc;
    }
    ctx->impl = c;
    return QL_OK;
}

static void cuda_close(ql_be_ctx *ctx)
{
    cuda_impl *c = impl(ctx);
    if (!c) return;
    cudaStreamSynchronize(c->stream);
    cudaStreamSynchronize(c->side);
    cudaStreamSynchronize(c->copyq);
    cudaStreamSynchronize(c->optq);
    cublasDestroy(c->blas);
    cudaFree(c->args);
    for (int i = 0; i < 2; i++) cudaEventDestroy(c->half_done[i]);
    cudaFreeHost(c->ring_h);
    cudaFree(c->ring_d);
    for (int i = 0; i < N_CACHED; i++) {
        free(c->cached[i].host);
        cudaFree(c->cached[i].dev);
    }
    cudaStreamDestroy(c->stream);
    cudaStreamDestroy(c->side);
    cudaStreamDestroy(c->copyq);
    cudaStreamDestroy(c->optq);
    for (int i = 0; i < QL_BE_EVENTS; i++) cudaEventDestroy(c->events[i]);
    free(c);
    ctx->impl = NULL;
}

static int cuda_event(ql_be_ctx *ctx, int slot, int wait)
{
    if (slot < 0 || slot >= QL_BE_EVENTS) return ql_error(QL_EINVAL, "event %d: 0 to %d", slot, QL_BE_EVENTS - 1);
    cudaEvent_t e = impl(ctx)->events[slot];
    if (wait) CUDA_TRY(cudaStreamWaitEvent((cudaStream_t)stream(ctx), e, 0), "waiting for an event");
    else CUDA_TRY(cudaEventRecord(e, (cudaStream_t)stream(ctx)), "recording an event");
    return QL_OK;
}

static int cuda_sync(ql_be_ctx *ctx)
{
    CUDA_TRY(cudaStreamSynchronize(impl(ctx)->optq), "a queued optimizer step failed");
    CUDA_TRY(cudaStreamSynchronize(impl(ctx)->copyq), "a queued copy failed");
    CUDA_TRY(cudaStreamSynchronize(impl(ctx)->side), "a queued operation failed");
    CUDA_TRY(cudaStreamSynchronize(impl(ctx)->stream), "a queued operation failed");
    CUDA_TRY(cudaGetLastError(), "a queued operation failed");
    return QL_OK;
}

/* ---- memory ---- */

static int cuda_alloc(ql_be_ctx *ctx, void **out, size_t bytes)
{
    (void)ctx;
    *out = NULL;
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    if (e == cudaSuccess) return QL_OK;
    *out = NULL;
    cudaGetLastError(); /* not sticky: clear it */
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return ql_error(e == cudaErrorMemoryAllocation ? QL_ENOMEM : QL_ECUDA,
                    "out of device memory: cannot allocate %.1f MiB (%.1f MiB of %.1f MiB free on the GPU): %s",
                    (double)bytes / 1048576.0, (double)free_b / 1048576.0, (double)total_b / 1048576.0,
                    cudaGetErrorString(e));
}

static void cuda_free(ql_be_ctx *ctx, void *p)
{
    (void)ctx;
    if (p) cudaFree(p);
}

static int cuda_zero(ql_be_ctx *ctx, void *p, size_t bytes)
{
    CUDA_TRY(cudaMemsetAsync(p, 0, bytes, (cudaStream_t)stream(ctx)), "memset");
    return QL_OK;
}

static int cuda_copy(ql_be_ctx *ctx, void *dst, const void *src, size_t bytes)
{
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, impl(ctx)->stream), "device copy");
    return QL_OK;
}

static int cuda_upload(ql_be_ctx *ctx, void *dst, const void *host_src, size_t bytes)
{
    /* from pageable memory the copy has read host_src when it returns */
    CUDA_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream(ctx)),
             "copy to the device");
    return QL_OK;
}

static int cuda_download(ql_be_ctx *ctx, void *host_dst, const void *src, size_t bytes)
{
    CUDA_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, impl(ctx)->stream), "copy to the host");
    CUDA_TRY(cudaStreamSynchronize(impl(ctx)->stream), "copy to the host");
    return QL_OK;
}

static int cuda_download_async(ql_be_ctx *ctx, void *host_dst, const void *src, size_t bytes)
{
    CUDA_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream(ctx)),
             "copy to the host");
    return QL_OK;
}

static int cuda_pin(ql_be_ctx *ctx, void *host, size_t bytes)
{
    (void)ctx;
    CUDA_TRY(cudaHostRegister(host, bytes, cudaHostRegisterDefault), "page-locking host memory");
    return QL_OK;
}

static void cuda_unpin(ql_be_ctx *ctx, void *host)
{
    (void)ctx;
    if (host && cudaHostUnregister(host) != cudaSuccess) cudaGetLastError();
}

static int cuda_mapped(ql_be_ctx *ctx, const void *host, const void **dev)
{
    (void)ctx;
    void *d = NULL;
    CUDA_TRY(cudaHostGetDevicePointer(&d, (void *)host, 0), "mapping page-locked host memory");
    *dev = d;
    return QL_OK;
}

/* ---- host arguments ---- */

/* Room for `bytes` of per-op staging; growing waits for the queued ops that
 * may still read the old buffer. */
static int args_reserve(cuda_impl *c, size_t bytes)
{
    if (bytes <= c->args_cap) return QL_OK;
    size_t cap = c->args_cap ? c->args_cap : 4096;
    while (cap < bytes) cap *= 2;
    CUDA_TRY(cudaStreamSynchronize(c->stream), "staging arguments");
    cudaFree(c->args);
    c->args = NULL;
    c->args_cap = 0;
    CUDA_TRY(cudaMalloc(&c->args, cap), "staging arguments");
    c->args_cap = cap;
    return QL_OK;
}

/* Stage n host arrays (srcs[i], sizes[i] bytes) and set devs[i] to their
 * device copies; a NULL srcs[i] reserves sizes[i] bytes of device output. */
static int stage(ql_be_ctx *ctx, int n, const void *const *srcs, const size_t *sizes, void **devs)
{
    cuda_impl *c = impl(ctx);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (sizes[i] + 255) / 256 * 256;
    const size_t half = RING_BYTES / 2;
    if (total <= half) { /* the ring */
        int h = (int)(c->ring_head / half);
        if (c->ring_head + total > (size_t)(h + 1) * half) { /* on to the other half */
            CUDA_TRY(cudaEventRecord(c->half_done[h], c->stream), "staging arguments");
            c->half_used[h] = 1;
            h = 1 - h;
            if (c->half_used[h]) CUDA_TRY(cudaEventSynchronize(c->half_done[h]), "staging arguments");
            c->ring_head = (size_t)h * half;
        }
        char *hp = c->ring_h + c->ring_head, *dp = c->ring_d + c->ring_head;
        size_t off = 0, copy = 0;
        for (int i = 0; i < n; i++) {
            devs[i] = dp + off;
            if (srcs[i] && sizes[i]) {
                memcpy(hp + off, srcs[i], sizes[i]);
                copy = off + sizes[i];
            }
            off += (sizes[i] + 255) / 256 * 256;
        }
        if (copy) CUDA_TRY(cudaMemcpyAsync(dp, hp, copy, cudaMemcpyHostToDevice, c->stream), "staging arguments");
        c->ring_head += total;
        return QL_OK;
    }
    int rc = args_reserve(c, total);
    if (rc) return rc;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        devs[i] = (char *)c->args + off;
        if (srcs[i] && sizes[i]) CUDA_TRY(cudaMemcpyAsync(devs[i], srcs[i], sizes[i], cudaMemcpyHostToDevice, c->stream), "staging arguments");
        off += (sizes[i] + 255) / 256 * 256;
    }
    return QL_OK;
}

/* The device copy of a host array that tends to repeat between ops (slot
 * 0: lengths, 1: rotary tables), copied again only when its bytes changed. */
static int stage_cached(ql_be_ctx *ctx, int slot, const void *host, size_t bytes, void **dev)
{
    cuda_impl *c = impl(ctx);
    cached_arg *a = &c->cached[slot];
    if (a->host && a->bytes == bytes && !memcmp(a->host, host, bytes)) {
        *dev = a->dev;
        return QL_OK;
    }
    if (bytes > a->cap) {
        CUDA_TRY(cudaStreamSynchronize(c->stream), "staging arguments");
        cudaFree(a->dev);
        free(a->host);
        a->dev = a->host = NULL;
        a->cap = a->bytes = 0;
        void *h = malloc(bytes);
        if (!h) return ql_error(QL_ENOMEM, "out of memory");
        cudaError_t e = cudaMalloc(&a->dev, bytes);
        if (e != cudaSuccess) {
            free(h);
            a->dev = NULL;
            return cuda_fail(e, "staging arguments");
        }
        a->host = h;
        a->cap = bytes;
    }
    /* the device copy is overwritten in stream order, after the ops that read it */
    memcpy(a->host, host, bytes);
    a->bytes = bytes;
    CUDA_TRY(cudaMemcpyAsync(a->dev, a->host, bytes, cudaMemcpyHostToDevice, c->stream), "staging arguments");
    *dev = a->dev;
    return QL_OK;
}

static int stage_len(ql_be_ctx *ctx, const ql_be_batch *mb, const int32_t **dev)
{
    return stage_cached(ctx, 0, mb->len, (size_t)mb->B * sizeof *mb->len, (void **)dev);
}

/* ---- matrix products (row-major through column-major cuBLAS) ---- */

static int too_big(int64_t a, int64_t b, int64_t c, const char *op)
{
    if (a > 0x7fffffff || b > 0x7fffffff || c > 0x7fffffff)
        return ql_error(QL_ENOTSUP, "%s: dimensions %lld x %lld x %lld exceed cuBLAS' 32-bit sizes", op,
                        (long long)a, (long long)b, (long long)c);
    return QL_OK;
}

/* C[M, N] (row-major, ldc) = alpha op(A) op(B) + beta C with row-major A, B:
 * computed as C^T = op(B)^T op(A)^T in column-major. */
static int gemm(ql_be_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc, const char *op)
{
    int rc = too_big(M, N, K, op);
    if (rc) return rc;
    if (M == 0 || N == 0) return QL_OK;
    cublasStatus_t s = cublasSgemm(impl(ctx)->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   (int)N, (int)M, (int)K, &alpha, B, (int)ldb, A, (int)lda, &beta, C, (int)ldc);
    if (s != CUBLAS_STATUS_SUCCESS) return ql_error(QL_ECUDA, "cuBLAS: %s: %s", op, blas_status(s));
    return QL_OK;
}

/* The same with bf16 A and B (bits as uint16_t), float32 C and accumulation
 * (tensor cores), batched: `batch` products, operand i at A + i * sa, B + i *
 * sb, C + i * sc (elements; a stride of 0 shares the operand). */
static int gemm16(ql_be_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t *A,
                  int64_t lda, int64_t sa, const uint16_t *B, int64_t ldb, int64_t sb, float beta, float *C,
                  int64_t ldc, int64_t sc, int64_t batch, const char *op)
{
    int rc = too_big(M, N, K, op);
    if (rc) return rc;
    if (M == 0 || N == 0 || batch == 0) return QL_OK;
    cublasStatus_t s;
    if (batch == 1) /* the plain entry point: cuBLAS' heuristics pick better kernels for it than for a batch of one */
        s = cublasGemmEx(impl(ctx)->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M,
                         (int)K, &alpha, B, CUDA_R_16BF, (int)ldb, A, CUDA_R_16BF, (int)lda, &beta, C, CUDA_R_32F,
                         (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    else s = cublasGemmStridedBatchedEx(
        impl(ctx)->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K,
        &alpha, B, CUDA_R_16BF, (int)ldb, sb, A, CUDA_R_16BF, (int)lda, sa, &beta, C, CUDA_R_32F, (int)ldc, sc,
        (int)batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return ql_error(QL_ECUDA, "cuBLAS: %s (bf16): %s", op, blas_status(s));
    return QL_OK;
}

/* ctx->scratch carved at 256-byte boundaries: *p gets `bytes` from offset *off */
static int carve(ql_be_ctx *ctx, size_t *off, size_t bytes, void **p, const char *op)
{
    size_t end = *off + (bytes + 255) / 256 * 256;
    if (!ctx->scratch || end > ctx->scratch_bytes)
        return ql_error(QL_EINTERNAL, "%s: %zu bytes of scratch needed, the plan gave %zu", op, end,
                        ctx->scratch_bytes);
    *p = (char *)ctx->scratch + *off;
    *off = end;
    ((cuda_impl *)ctx->impl)->x16_src = NULL; /* whatever was there may be overwritten */
    return QL_OK;
}

static int to_bf16(ql_be_ctx *ctx, uint16_t *dst, const float *src, int64_t n)
{
    return launched(qlk_f32_to_bf16(stream(ctx), dst, src, n), "bf16 conversion");
}

/* y[M, N] (+)= a[M, K] . w[N, K]^T (nt) or a[M, K] . w[K, N] (nn) in bf16: a is
 * rounded into scratch; w is bf16 already (w16) or rounded too (w32). */
static int product16(ql_be_ctx *ctx, int nt, float *y, const float *a, const float *w32, const uint16_t *w16,
                     int64_t M, int64_t N, int64_t K, int accumulate, const char *op)
{
    size_t off = 0;
    uint16_t *a16 = NULL, *b16 = (uint16_t *)w16;
    cuda_impl *I = impl(ctx);
    const int again = ctx->reuse_x && I->x16_src == a && I->x16_n == M * K;
    ctx->reuse_x = 0;
    int rc = carve(ctx, &off, (size_t)(M * K) * 2, (void **)&a16, op);
    if (!rc && !again) rc = to_bf16(ctx, a16, a, M * K);
    if (!rc) {
        I->x16_src = a;
        I->x16_n = M * K;
    }
    if (!rc && !w16) {
        rc = carve(ctx, &off, (size_t)(N * K) * 2, (void **)&b16, op); /* after a16: leaves it */
        if (!rc) rc = to_bf16(ctx, b16, w32, N * K);
        I->x16_src = rc ? NULL : a;
    }
    if (rc) return rc;
    return nt ? gemm16(ctx, 0, 1, M, N, K, 1.0f, a16, K, 0, b16, K, 0, accumulate ? 1.0f : 0.0f, y, N, 0, 1, op)
              : gemm16(ctx, 0, 0, M, N, K, 1.0f, a16, K, 0, b16, N, 0, accumulate ? 1.0f : 0.0f, y, N, 0, 1, op);
}

/* bf16 weights in float32 precision: widened into scratch, then the fp32 product */
static int widen(ql_be_ctx *ctx, const uint16_t *w16, int64_t n, const float **w, const char *op)
{
    size_t off = 0;
    float *d = NULL;
    int rc = carve(ctx, &off, (size_t)n * 4, (void **)&d, op);
    if (!rc) rc = launched(qlk_bf16_to_f32(stream(ctx), d, w16, n), "bf16 conversion");
    *w = d;
    return rc;
}

static int cuda_matmul_nt(ql_be_ctx *ctx, float *y, const float *x, const float *w, int64_t rows, int64_t in,
                          int64_t out, int accumulate)
{
    if (ctx->precision == QL_PREC_BF16) return product16(ctx, 1, y, x, w, NULL, rows, out, in, accumulate, "matmul");
    return gemm(ctx, 0, 1, rows, out, in, 1.0f, x, in, w, in, accumulate ? 1.0f : 0.0f, y, out, "matmul");
}

static int cuda_matmul_backward_input(ql_be_ctx *ctx, float *dx, const float *dy, const float *w, int64_t rows,
                                      int64_t in, int64_t out, int accumulate)
{
    if (ctx->precision == QL_PREC_BF16)
        return product16(ctx, 0, dx, dy, w, NULL, rows, in, out, accumulate, "matmul backward");
    return gemm(ctx, 0, 0, rows, in, out, 1.0f, dy, out, w, in, accumulate ? 1.0f : 0.0f, dx, in,
                "matmul backward");
}

static int cuda_matmul_nt_w16(ql_be_ctx *ctx, float *y, const float *x, const uint16_t *w16, int64_t rows,
                              int64_t in, int64_t out, int accumulate)
{
    if (ctx->precision == QL_PREC_BF16) return product16(ctx, 1, y, x, NULL, w16, rows, out, in, accumulate, "matmul");
    const float *w = NULL;
    int rc = widen(ctx, w16, out * in, &w, "matmul");
    return rc ? rc : cuda_matmul_nt(ctx, y, x, w, rows, in, out, accumulate);
}

static int cuda_matmul_backward_input_w16(ql_be_ctx *ctx, float *dx, const float *dy, const uint16_t *w16,
                                          int64_t rows, int64_t in, int64_t out, int accumulate)
{
    if (ctx->precision == QL_PREC_BF16)
        return product16(ctx, 0, dx, dy, NULL, w16, rows, in, out, accumulate, "matmul backward");
    const float *w = NULL;
    int rc = widen(ctx, w16, out * in, &w, "matmul backward");
    return rc ? rc : cuda_matmul_backward_input(ctx, dx, dy, w, rows, in, out, accumulate);
}

/* LoRA: after the row-wise ops (it needs dropout), below */

/* ---- weights ---- */

static int cuda_materialize(ql_be_ctx *ctx, void *w, int32_t dtype, const ql_linear *l, const void *const *dev_bufs,
                            void *workspace, uint64_t workspace_bytes, float *host_scratch)
{
    const ql_quantizer_desc *d = l->qz ? l->qz->desc : NULL;
    if (!d || !l->state) return ql_error(QL_EINVAL, "%s: materialize of a layer that is not quantized", l->name);
    if (dtype != QL_DTYPE_F32 && dtype != QL_DTYPE_BF16)
        return ql_error(QL_EINVAL, "%s: materialize as dtype %d: F32 or BF16 only", l->name, dtype);
    if (dev_bufs && d->materialize_rows_device) {
        ql_device_out o = {.dtype = dtype, .data = w, .ld = l->in, .row0 = 0, .nrows = l->out};
        return d->materialize_rows_device(l->qz->inst, l->state, dev_bufs, &o, workspace, workspace_bytes,
                                          stream(ctx));
    }
    if (!host_scratch) return ql_error(QL_EINVAL, "%s: no host scratch for a plugin without device kernels", l->name);
    /* the slow path: the host buffer is reused by the next call, so wait for the copy */
    /* bf16: the bits after the layer's float32 scratch (host_scratch holds
     * out * in * 6 bytes in bf16 precision, backend.h) */
    uint16_t *h16 = (uint16_t *)(host_scratch + l->out * l->in);
    int rc = dtype == QL_DTYPE_F32 ? ql_linear_weights(l, host_scratch) : ql_linear_weights_bf16(l, h16, host_scratch);
    if (rc) return rc;
    size_t bytes = (size_t)(l->out * l->in) * (dtype == QL_DTYPE_F32 ? 4 : 2);
    CUDA_TRY(cudaMemcpyAsync(w, dtype == QL_DTYPE_F32 ? (const void *)host_scratch : (const void *)h16, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream(ctx)), "weights to the device");
    CUDA_TRY(cudaStreamSynchronize((cudaStream_t)stream(ctx)), "weights to the device");
    return QL_OK;
}

/* ---- row-wise ops ---- */

static int cuda_embedding(ql_be_ctx *ctx, float *out, const float *table, const int32_t *ids, const ql_be_batch *mb,
                          int64_t C)
{
    const int32_t *len = NULL, *d_ids = NULL;
    int rc = stage_len(ctx, mb, &len);
    const void *srcs[1] = {ids};
    size_t sizes[1] = {(size_t)(mb->B * mb->T) * sizeof *ids};
    if (!rc) rc = stage(ctx, 1, srcs, sizes, (void **)&d_ids);
    return rc ? rc : launched(qlk_embedding(stream(ctx), out, table, d_ids, len, mb->B, mb->T, C), "embedding");
}

static int cuda_embedding_w16(ql_be_ctx *ctx, float *out, const uint16_t *table16, const int32_t *ids,
                              const ql_be_batch *mb, int64_t C)
{
    const int32_t *len = NULL, *d_ids = NULL;
    int rc = stage_len(ctx, mb, &len);
    const void *srcs[1] = {ids};
    size_t sizes[1] = {(size_t)(mb->B * mb->T) * sizeof *ids};
    if (!rc) rc = stage(ctx, 1, srcs, sizes, (void **)&d_ids);
    return rc ? rc
              : launched(qlk_embedding_w16(stream(ctx), out, table16, d_ids, len, mb->B, mb->T, C), "embedding");
}

static int cuda_round_bf16(ql_be_ctx *ctx, uint16_t *dst, float *x, int64_t n)
{
    return launched(qlk_round_bf16(stream(ctx), dst, x, n), "bf16 rounding");
}

static int cuda_widen_bf16(ql_be_ctx *ctx, float *dst, const uint16_t *src, int64_t n)
{
    return launched(qlk_bf16_to_f32(stream(ctx), dst, src, n), "bf16 conversion");
}

static int cuda_rmsnorm_forward(ql_be_ctx *ctx, float *out, float *rstd, const float *x, const float *weight,
                                int64_t rows, int64_t C, float eps)
{
    return launched(qlk_rmsnorm_forward(stream(ctx), out, rstd, x, weight, rows, C, eps), "rmsnorm");
}

static int rope(ql_be_ctx *ctx, float *x, const ql_be_batch *mb, int nheads, int hd, int pos0, const float *inv_freq,
                float attn_scale, int inverse)
{
    const int32_t *len = NULL;
    const float *inv = NULL;
    int rc = stage_len(ctx, mb, &len);
    if (!rc) rc = stage_cached(ctx, 1, inv_freq, (size_t)(mb->B * (hd / 2)) * sizeof *inv_freq, (void **)&inv);
    return rc ? rc : launched(qlk_rope(stream(ctx), x, len, mb->B, mb->T, nheads, hd, pos0, inv, attn_scale, inverse),
                              "rope");
}

static int cuda_rope_forward(ql_be_ctx *ctx, float *x, const ql_be_batch *mb, int nheads, int hd, int pos0,
                             const float *inv_freq, float attn_scale)
{
    return rope(ctx, x, mb, nheads, hd, pos0, inv_freq, attn_scale, 0);
}

static int cuda_rope_backward(ql_be_ctx *ctx, float *dx, const ql_be_batch *mb, int nheads, int hd, int pos0,
                              const float *inv_freq, float attn_scale)
{
    return rope(ctx, dx, mb, nheads, hd, pos0, inv_freq, attn_scale, 1);
}

static int cuda_attention_forward(ql_be_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t T, int64_t past, int nh, int nkv, int hd, int window)
{
    return launched(qlk_attention_forward(stream(ctx), out, q, k, v, T, past, nh, nkv, hd, window), "attention");
}

/* ---- attention in bf16: the products through cuBLAS (tensor cores) ----
 *
 * Per sequence b of n = len[b] rows, per tile of ql_be_att_tile() query rows
 * t0 .. t1-1 (keys k0 .. t1-1, k0 = band_start(t0): the causal part only),
 * per kv head j a strided batch over its g = nh / nkv query heads (the key
 * operand shared, stride 0):
 *   forward:  S_h = scale Q_h K_j^T, P = softmax(S) (bf16) and the row's
 *             log-sum-exp into probs ([B, nh, T]), O_h = P_h V_j;
 *   backward: S again, dP_h = dO_h V_j^T, P = exp(S - lse),
 *             dS = P (dP - rowsum(P dP)), dQ_h = scale dS_h K_j,
 *             dK_j += scale dS_h^T Q_h, dV_j += P_h^T dO_h (one call per
 *             group member, adding over tiles and members).
 * No [T, T] matrix exists: a tile's scores take nh x 256 x T floats. */
typedef struct att16 {
    uint16_t *q, *k, *v, *dout; /* the batch's operands in bf16 */
    float *s, *dp;              /* one tile's scores and their gradient [nh, tile, <= T] */
    uint16_t *p, *ds;           /* the same in bf16 */
} att16;

static int att16_operands(ql_be_ctx *ctx, att16 *a, const float *q, const float *k, const float *v, const float *dout,
                          const ql_be_batch *mb, int nh, int nkv, int hd)
{
    const int64_t R = mb->B * mb->T, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, T = mb->T;
    const int64_t tile = ql_be_att_tile(T, nh), sq = (int64_t)nh * tile * T;
    size_t off = 0;
    memset(a, 0, sizeof *a);
    int rc = carve(ctx, &off, (size_t)(R * qd) * 2, (void **)&a->q, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * qd) * 2, (void **)&a->dout, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * kvd) * 2, (void **)&a->k, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * kvd) * 2, (void **)&a->v, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)sq * 4, (void **)&a->s, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)sq * 4, (void **)&a->dp, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)sq * 2, (void **)&a->p, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)sq * 2, (void **)&a->ds, "attention");
    if (!rc) rc = to_bf16(ctx, a->q, q, R * qd);
    if (!rc) rc = to_bf16(ctx, a->k, k, R * kvd);
    if (!rc) rc = to_bf16(ctx, a->v, v, R * kvd);
    if (!rc && dout) rc = to_bf16(ctx, a->dout, dout, R * qd);
    return rc;
}

/* first key of the tile starting at query t0 */
static int64_t tile_k0(int64_t t0, int window) { return window > 0 && t0 >= window ? t0 - window + 1 : 0; }

/* C_h = alpha A_h X_j^T for the tile's m query rows and kn keys, every
 * head h = j g + r of kv head j: S = scale Q K^T (a = q16, x = k16) or
 * dP = dO V^T (a = dout16, x = v16); c is [nh, m, kn].  One strided batch
 * over the kv heads per group member r (one call in all without GQA). */
static int tile_products(ql_be_ctx *ctx, const uint16_t *a16, const uint16_t *x16, float alpha, int64_t b, int64_t T,
                         int64_t t0, int64_t m, int64_t k0, int64_t kn, int nh, int nkv, int hd, float *c,
                         const char *op)
{
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, g = nh / nkv, mk = m * kn;
    int rc = QL_OK;
    for (int64_t r = 0; r < g && !rc; r++)
        rc = gemm16(ctx, 0, 1, m, kn, hd, alpha, a16 + (b * T + t0) * qd + r * hd, qd, g * hd,
                    x16 + (b * T + k0) * kvd, kvd, hd, 0.0f, c + r * mk, kn, g * mk, nkv, op);
    return rc;
}

/* out_h = alpha P_h X_j (P = p16 [nh, m, kn], X = v16 or k16 rows k0..):
 * O = P V, or dQ = scale dS K; out rows t0.. of [B*T, nh*hd], heads batched as above */
static int tile_apply(ql_be_ctx *ctx, const uint16_t *p16, const uint16_t *x16, float alpha, int64_t b, int64_t T,
                      int64_t t0, int64_t m, int64_t k0, int64_t kn, int nh, int nkv, int hd, float *out,
                      const char *op)
{
    const int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, g = nh / nkv, mk = m * kn;
    int rc = QL_OK;
    for (int64_t r = 0; r < g && !rc; r++)
        rc = gemm16(ctx, 0, 0, m, hd, kn, alpha, p16 + r * mk, kn, g * mk, x16 + (b * T + k0) * kvd, kvd, hd, 0.0f,
                    out + (b * T + t0) * qd + r * hd, qd, g * hd, nkv, op);
    return rc;
}

/* The fused attention (kernels/ops_flash_attention.cu): bf16 copies of q, k,
 * v (and dout) in the scratch, then one kernel forward, three backward. */
static int fused16(ql_be_ctx *ctx, att16 *a, float **D, const float *q, const float *k, const float *v,
                   const float *dout, const ql_be_batch *mb, int nh, int nkv, int hd)
{
    const int64_t R = mb->B * mb->T, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    size_t off = 0;
    memset(a, 0, sizeof *a);
    int rc = carve(ctx, &off, (size_t)(R * qd) * 2, (void **)&a->q, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * qd) * 2, (void **)&a->dout, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * kvd) * 2, (void **)&a->k, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * kvd) * 2, (void **)&a->v, "attention");
    if (!rc) rc = carve(ctx, &off, (size_t)(R * nh) * 4, (void **)D, "attention");
    if (!rc) rc = to_bf16(ctx, a->q, q, R * qd);
    if (!rc) rc = to_bf16(ctx, a->k, k, R * kvd);
    if (!rc) rc = to_bf16(ctx, a->v, v, R * kvd);
    if (!rc && dout) rc = to_bf16(ctx, a->dout, dout, R * qd);
    return rc;
}

static int cuda_fused_attention(int hd) { return qlk_flash_supported(hd); }

static int attention16_forward(ql_be_ctx *ctx, float *out, float *lse, const float *q, const float *k, const float *v,
                               const ql_be_batch *mb, int nh, int nkv, int hd, int window)
{
    if (ql_be_att_fused(ctx->be, hd)) {
        att16 a;
        float *D;
        const int32_t *len = NULL;
        int rc = stage_len(ctx, mb, &len);
        if (!rc) rc = fused16(ctx, &a, &D, q, k, v, NULL, mb, nh, nkv, hd);
        return rc ? rc
                  : launched(qlk_flash_forward(stream(ctx), out, lse, a.q, a.k, a.v, len, mb->B, mb->T, nh, nkv, hd,
                                               window),
                             "attention");
    }
    const int64_t T = mb->T, qd = (int64_t)nh * hd, tile = ql_be_att_tile(T, nh);
    att16 a;
    int rc = att16_operands(ctx, &a, q, k, v, NULL, mb, nh, nkv, hd);
    if (!rc) rc = cuda_zero(ctx, out, (size_t)(mb->B * T * qd) * 4);
    for (int64_t b = 0; b < mb->B && !rc; b++) {
        const int64_t n = mb->len[b];
        for (int64_t t0 = 0; t0 < n && !rc; t0 += tile) {
            const int64_t m = n - t0 < tile ? n - t0 : tile, k0 = tile_k0(t0, window),
                          kn = t0 + m - k0;
            rc = tile_products(ctx, a.q, a.k, 1.0f / sqrtf((float)hd), b, T, t0, m, k0, kn, nh, nkv, hd, a.s,
                               "attention scores");
            if (!rc)
                rc = launched(qlk_tile_softmax(stream(ctx), a.s, a.p, lse + b * nh * T, T, nh, t0, m, k0, kn, window),
                              "attention softmax");
            if (!rc) rc = tile_apply(ctx, a.p, a.v, 1.0f, b, T, t0, m, k0, kn, nh, nkv, hd, out, "attention values");
        }
    }
    return rc;
}

static int attention16_backward(ql_be_ctx *ctx, float *dq, float *dk, float *dv, const float *dout,
                                const float *fwd_out, const float *q, const float *k, const float *v, const float *lse,
                                const ql_be_batch *mb, int nh, int nkv, int hd, int window)
{
    if (ql_be_att_fused(ctx->be, hd)) {
        att16 a;
        float *D;
        const int32_t *len = NULL;
        int rc = stage_len(ctx, mb, &len);
        if (!rc) rc = fused16(ctx, &a, &D, q, k, v, dout, mb, nh, nkv, hd);
        return rc ? rc
                  : launched(qlk_flash_backward(stream(ctx), dq, dk, dv, D, dout, fwd_out, a.q, a.k, a.v, a.dout, lse,
                                                len, mb->B, mb->T, nh, nkv, hd, window),
                             "attention backward");
    }
    const int64_t T = mb->T, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, g = nh / nkv,
                  tile = ql_be_att_tile(T, nh);
    const float scale = 1.0f / sqrtf((float)hd);
    att16 a;
    int rc = att16_operands(ctx, &a, q, k, v, dout, mb, nh, nkv, hd);
    if (!rc) rc = cuda_zero(ctx, dq, (size_t)(mb->B * T * qd) * 4);
    if (!rc) rc = cuda_zero(ctx, dk, (size_t)(mb->B * T * kvd) * 4);
    if (!rc) rc = cuda_zero(ctx, dv, (size_t)(mb->B * T * kvd) * 4);
    for (int64_t b = 0; b < mb->B && !rc; b++) {
        const int64_t n = mb->len[b];
        for (int64_t t0 = 0; t0 < n && !rc; t0 += tile) {
            const int64_t m = n - t0 < tile ? n - t0 : tile, k0 = tile_k0(t0, window),
                          kn = t0 + m - k0, mk = m * kn;
            rc = tile_products(ctx, a.q, a.k, scale, b, T, t0, m, k0, kn, nh, nkv, hd, a.s, "attention backward");
            if (!rc)
                rc = tile_products(ctx, a.dout, a.v, 1.0f, b, T, t0, m, k0, kn, nh, nkv, hd, a.dp, "attention backward");
            if (!rc)
                rc = launched(qlk_tile_softmax_backward(stream(ctx), a.s, a.dp, a.p, a.ds, lse + b * nh * T, T, nh, t0,
                                                        m, k0, kn, window),
                              "attention backward");
            if (!rc) rc = tile_apply(ctx, a.ds, a.k, scale, b, T, t0, m, k0, kn, nh, nkv, hd, dq, "attention backward");
            for (int64_t r = 0; r < g && !rc; r++) { /* dK, dV: member r of every group, batched over the kv heads */
                const uint16_t *qr = a.q + (b * T + t0) * qd + r * hd, *orow = a.dout + (b * T + t0) * qd + r * hd;
                rc = gemm16(ctx, 1, 0, kn, hd, m, scale, a.ds + r * mk, kn, g * mk, qr, qd, g * hd, 1.0f,
                            dk + (b * T + k0) * kvd, kvd, hd, nkv, "attention backward");
                if (!rc)
                    rc = gemm16(ctx, 1, 0, kn, hd, m, 1.0f, a.p + r * mk, kn, g * mk, orow, qd, g * hd, 1.0f,
                                dv + (b * T + k0) * kvd, kvd, hd, nkv, "attention backward");
            }
        }
    }
    return rc;
}

static int cuda_attention_forward_train(ql_be_ctx *ctx, float *out, float *probs, const float *q, const float *k,
                                        const float *v, const ql_be_batch *mb, int nh, int nkv, int hd, int window)
{
    if (ctx->precision == QL_PREC_BF16) return attention16_forward(ctx, out, probs, q, k, v, mb, nh, nkv, hd, window);
    const int32_t *len = NULL;
    int rc = stage_len(ctx, mb, &len);
    return rc ? rc
              : launched(qlk_attention_forward_train(stream(ctx), out, probs, q, k, v, len, mb->B, mb->T, nh, nkv, hd,
                                                     window),
                         "attention");
}

static int cuda_attention_backward(ql_be_ctx *ctx, float *dq, float *dk, float *dv, float *dscores,
                                   const float *dout, const float *out, const float *q, const float *k,
                                   const float *v, const float *probs, const ql_be_batch *mb, int nh, int nkv, int hd,
                                   int window)
{
    if (ctx->precision == QL_PREC_BF16)
        return attention16_backward(ctx, dq, dk, dv, dout, out, q, k, v, probs, mb, nh, nkv, hd, window);
    const int32_t *len = NULL;
    int rc = stage_len(ctx, mb, &len);
    return rc ? rc
              : launched(qlk_attention_backward(stream(ctx), dq, dk, dv, dscores, dout, q, k, v, probs, len, mb->B,
                                                mb->T, nh, nkv, hd, window),
                         "attention backward");
}

static int cuda_swiglu_forward(ql_be_ctx *ctx, float *out, const float *gate, const float *up, int64_t n)
{
    return launched(qlk_swiglu_forward(stream(ctx), out, gate, up, n), "swiglu");
}

static int cuda_swiglu_backward(ql_be_ctx *ctx, float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, int64_t n)
{
    return launched(qlk_swiglu_backward(stream(ctx), dgate, dup, dout, gate, up, n), "swiglu backward");
}

static int cuda_add_inplace(ql_be_ctx *ctx, float *x, const float *y, int64_t n)
{
    return launched(qlk_add_inplace(stream(ctx), x, y, n), "add");
}

static int cuda_add_bias(ql_be_ctx *ctx, float *y, const float *bias, const ql_be_batch *mb, int64_t n)
{
    const int32_t *len = NULL;
    int rc = stage_len(ctx, mb, &len);
    return rc ? rc : launched(qlk_add_bias(stream(ctx), y, bias, len, mb->B, mb->T, n), "bias");
}

/* the device copies of a dropout's lengths and per-sequence seeds */
static int stage_dropout(ql_be_ctx *ctx, const ql_be_batch *mb, const uint64_t *seeds, const int32_t **len,
                         const uint64_t **d_seeds)
{
    int rc = stage_len(ctx, mb, len);
    const void *srcs[1] = {seeds};
    size_t sizes[1] = {(size_t)mb->B * sizeof *seeds};
    return rc ? rc : stage(ctx, 1, srcs, sizes, (void **)d_seeds);
}

static int dropout(ql_be_ctx *ctx, float *out, const float *in, const ql_be_batch *mb, int64_t C, float p,
                   const uint64_t *seeds, int backward, int accumulate)
{
    const int32_t *len = NULL;
    const uint64_t *d_seeds = NULL;
    int rc = stage_dropout(ctx, mb, seeds, &len, &d_seeds);
    const float inv = 1.0f / (1.0f - p); /* as the CPU operators compute it */
    return rc ? rc
              : launched(qlk_dropout(stream(ctx), out, in, len, d_seeds, mb->B, mb->T, C, p, inv, backward, accumulate),
                         "dropout");
}

static int cuda_dropout_forward(ql_be_ctx *ctx, float *out, const float *x, const ql_be_batch *mb, int64_t C,
                                float p, const uint64_t *seeds)
{
    return dropout(ctx, out, x, mb, C, p, seeds, 0, 0);
}

static int cuda_dropout_backward(ql_be_ctx *ctx, float *dx, const float *dout, const ql_be_batch *mb, int64_t C,
                                 float p, const uint64_t *seeds, int accumulate)
{
    return dropout(ctx, dx, dout, mb, C, p, seeds, 1, accumulate);
}

/* ---- LoRA (the dropout of its input inside) ---- */

static size_t al256(size_t b) { return (b + 255) / 256 * 256; }

/* dr's dropout of x[rows, in] (x rounded to bf16 first) rounded to bf16 into
 * dr->scratch; from x16, x's bf16 copy, when it is not NULL (half the bytes
 * to read, the same bits) */
static int dropout16(ql_be_ctx *ctx, const float *x, const uint16_t *x16, const ql_be_dropout *dr, int64_t in)
{
    const int32_t *len = NULL;
    const uint64_t *d_seeds = NULL;
    int rc = stage_dropout(ctx, dr->mb, dr->seeds, &len, &d_seeds);
    const float inv = 1.0f / (1.0f - dr->p);
    return rc ? rc
              : launched(qlk_dropout16(stream(ctx), dr->scratch, x, x16, len, d_seeds, dr->mb->B, dr->mb->T, in, dr->p, inv),
                         "dropout");
}

/* bf16 precision: an activation's bf16 copy for a LoRA product.  Region 0 of
 * the scratch may hold it already (the previous product's operand, with the
 * reuse_x hint): then *off starts past it and *kept says so. */
static int lora_operand16(ql_be_ctx *ctx, const float *src, int64_t n, int reuse, size_t *off, uint16_t **dst,
                          int *kept, const char *op)
{
    cuda_impl *I = impl(ctx);
    *kept = reuse && I->x16_src == src && I->x16_n == n;
    if (*kept) {
        *dst = ctx->scratch;
        *off = al256((size_t)n * 2);
        return QL_OK;
    }
    int rc = carve(ctx, off, (size_t)n * 2, (void **)dst, op);
    return rc ? rc : to_bf16(ctx, *dst, src, n);
}

/* bf16 copies of A[r, in], B[out, r] and h[rows, r] (or dh) in scratch from *off */
static int lora_weights16(ql_be_ctx *ctx, size_t *off, const float *a, const float *b, int64_t in, int64_t out,
                          int64_t r, int64_t rows, uint16_t **a16, uint16_t **b16, uint16_t **h16, uint16_t **dh16,
                          const char *op)
{
    int rc = carve(ctx, off, (size_t)(r * in) * 2, (void **)a16, op);
    if (!rc) rc = carve(ctx, off, (size_t)(out * r) * 2, (void **)b16, op);
    if (!rc) rc = carve(ctx, off, (size_t)(rows * r) * 2, (void **)h16, op);
    if (!rc && dh16) rc = carve(ctx, off, (size_t)(rows * r) * 2, (void **)dh16, op);
    if (!rc) rc = to_bf16(ctx, *a16, a, r * in);
    if (!rc) rc = to_bf16(ctx, *b16, b, out * r);
    return rc;
}

static int cuda_lora_forward(ql_be_ctx *ctx, float *y, float *h, const float *x, const ql_be_dropout *dr,
                             const float *a, const float *b, int64_t rows, int64_t in, int64_t out, int64_t r,
                             float scale)
{
    const int reuse = ctx->reuse_x;
    ctx->reuse_x = 0;
    int rc = QL_OK;
    if (ctx->precision != QL_PREC_BF16) {
        const float *xd = x;
        if (ql_be_dropping(dr)) {
            rc = dropout(ctx, dr->scratch, x, dr->mb, in, dr->p, dr->seeds, 0, 0);
            xd = dr->scratch;
        }
        if (!rc) rc = gemm(ctx, 0, 1, rows, r, in, 1.0f, xd, in, a, in, 0.0f, h, r, "LoRA forward");
        if (!rc) rc = gemm(ctx, 0, 1, rows, out, r, scale, h, r, b, r, 1.0f, y, out, "LoRA forward");
        return rc;
    }
    /* x's bf16 copy: the frozen product's (reuse_x), or dropped and rounded
     * in dr->scratch, or rounded here; then A, B and h in bf16 */
    cuda_impl *I = impl(ctx);
    size_t off = 0;
    uint16_t *x16 = NULL, *a16, *b16, *h16;
    int kept = 0, made = 0;
    if (ql_be_dropping(dr)) { /* region 0 is left as it is; its copy of x, when it holds one, is dropped */
        kept = reuse && I->x16_src == x && I->x16_n == rows * in;
        if (kept) off = al256((size_t)(rows * in) * 2);
        rc = dropout16(ctx, x, kept ? (const uint16_t *)ctx->scratch : NULL, dr, in);
        x16 = dr->scratch;
    } else {
        rc = lora_operand16(ctx, x, rows * in, reuse, &off, &x16, &kept, "LoRA forward");
        made = !kept;
    }
    if (!rc) rc = lora_weights16(ctx, &off, a, b, in, out, r, rows, &a16, &b16, &h16, NULL, "LoRA forward");
    if (!rc) rc = gemm16(ctx, 0, 1, rows, r, in, 1.0f, x16, in, 0, a16, in, 0, 0.0f, h, r, 0, 1, "LoRA forward");
    if (!rc) rc = to_bf16(ctx, h16, h, rows * r);
    if (!rc) rc = gemm16(ctx, 0, 1, rows, out, r, scale, h16, r, 0, b16, r, 0, 1.0f, y, out, 0, 1, "LoRA forward");
    if (!rc && (kept || made)) { /* region 0 holds x's copy: later products may reuse it */
        I->x16_src = x;
        I->x16_n = rows * in;
    }
    return rc;
}

static int cuda_lora_backward(ql_be_ctx *ctx, float *dx, float *da, float *db, float *dh, const float *dy,
                              const float *x, const ql_be_dropout *dr, const float *h, const float *a, const float *b,
                              int64_t rows, int64_t in, int64_t out, int64_t r, float scale, int accumulate)
{
    const int reuse = ctx->reuse_x, drop = ql_be_dropping(dr);
    ctx->reuse_x = 0;
    /* with dropout the gradient through xd is made in dr->scratch (xd is
     * read first), then taken through the mask into dx */
    float *dxd = dx && drop ? (float *)dr->scratch : dx;
    const float beta = drop ? 0.0f : accumulate ? 1.0f : 0.0f;
    int rc = QL_OK;
    if (ctx->precision != QL_PREC_BF16) {
        const float *xd = x;
        if (drop) {
            rc = dropout(ctx, dr->scratch, x, dr->mb, in, dr->p, dr->seeds, 0, 0);
            xd = dr->scratch;
        }
        if (!rc) rc = gemm(ctx, 0, 0, rows, r, out, scale, dy, out, b, r, 0.0f, dh, r, "LoRA backward"); /* s dy B */
        if (!rc) rc = gemm(ctx, 1, 0, out, r, rows, scale, dy, out, h, r, 1.0f, db, r, "LoRA backward"); /* dB */
        if (!rc) rc = gemm(ctx, 1, 0, r, in, rows, 1.0f, dh, r, xd, in, 1.0f, da, in, "LoRA backward");  /* dA */
        if (!rc && dxd) rc = gemm(ctx, 0, 0, rows, in, r, 1.0f, dh, r, a, in, beta, dxd, in, "LoRA backward");
    } else {
        size_t off = 0;
        uint16_t *dy16 = NULL, *x16 = NULL, *a16, *b16, *h16, *dh16;
        int kept = 0;
        rc = lora_operand16(ctx, dy, rows * out, reuse, &off, &dy16, &kept, "LoRA backward");
        if (!rc && drop) {
            rc = dropout16(ctx, x, NULL, dr, in);
            x16 = dr->scratch;
        } else if (!rc) {
            int k2;
            rc = lora_operand16(ctx, x, rows * in, 0, &off, &x16, &k2, "LoRA backward");
        }
        if (!rc) rc = lora_weights16(ctx, &off, a, b, in, out, r, rows, &a16, &b16, &h16, &dh16, "LoRA backward");
        if (!rc) rc = to_bf16(ctx, h16, h, rows * r);
        if (!rc) /* dh = s dy B */
            rc = gemm16(ctx, 0, 0, rows, r, out, scale, dy16, out, 0, b16, r, 0, 0.0f, dh, r, 0, 1, "LoRA backward");
        if (!rc) /* dB += s dy^T h */
            rc = gemm16(ctx, 1, 0, out, r, rows, scale, dy16, out, 0, h16, r, 0, 1.0f, db, r, 0, 1, "LoRA backward");
        if (!rc) rc = to_bf16(ctx, dh16, dh, rows * r);
        if (!rc) /* dA += dh^T xd */
            rc = gemm16(ctx, 1, 0, r, in, rows, 1.0f, dh16, r, 0, x16, in, 0, 1.0f, da, in, 0, 1, "LoRA backward");
        if (!rc && dxd) /* the gradient through xd: dh A */
            rc = gemm16(ctx, 0, 0, rows, in, r, 1.0f, dh16, r, 0, a16, in, 0, beta, dxd, in, 0, 1, "LoRA backward");
    }
    if (!rc && dx && drop) rc = dropout(ctx, dx, dxd, dr->mb, in, dr->p, dr->seeds, 1, accumulate);
    return rc;
}

static int cuda_rmsnorm_backward(ql_be_ctx *ctx, float *dx, float *dweight, const float *dy, const float *x,
                                 const float *weight, const float *rstd, int64_t rows, int64_t C, int accumulate)
{
    return launched(qlk_rmsnorm_backward(stream(ctx), dx, dweight, dy, x, weight, rstd, rows, C, accumulate),
                    "rmsnorm backward");
}

static int cuda_cross_entropy(ql_be_ctx *ctx, float *losses, float *dlogits, const float *logits,
                              const int32_t *targets, int64_t rows, int64_t V, int32_t ignore_index, float scale)
{
    int rc = ql_be_check_targets(targets, rows, V, ignore_index);
    if (rc) return rc;
    /* targets in, the losses out, both in the staging buffer */
    const void *srcs[2] = {targets, NULL};
    size_t sizes[2] = {(size_t)rows * sizeof *targets, (size_t)rows * sizeof *losses};
    void *devs[2];
    rc = stage(ctx, 2, srcs, sizes, devs);
    if (!rc)
        rc = launched(qlk_cross_entropy(stream(ctx), devs[1], dlogits, logits, devs[0], rows, V, ignore_index, scale),
                      "cross-entropy");
    return rc ? rc : cuda_download(ctx, losses, devs[1], sizes[1]);
}

static int cuda_sum_squares(ql_be_ctx *ctx, double *out, const float *x, int64_t n)
{
    const void *srcs[2] = {NULL, NULL};
    size_t sizes[2] = {sizeof(double), QLK_SUMSQ_PARTS * sizeof(double)};
    void *devs[2];
    int rc = stage(ctx, 2, srcs, sizes, devs);
    if (!rc) rc = launched(qlk_sum_squares(stream(ctx), devs[0], devs[1], x, n), "sum of squares");
    return rc ? rc : cuda_download(ctx, out, devs[0], sizeof *out);
}

static int cuda_sum_squares_into(ql_be_ctx *ctx, double *out, double *partials, const float *x, int64_t n)
{
    return launched(qlk_sum_squares(stream(ctx), out, partials, x, n), "sum of squares");
}

static int cuda_scale(ql_be_ctx *ctx, float *x, float c, int64_t n)
{
    return launched(qlk_scale(stream(ctx), x, c, n), "scale");
}

static int cuda_adamw(ql_be_ctx *ctx, float *params, float *m, float *v, const float *grads, int64_t n,
                      const ql_adamw_scalars *h)
{
    return launched(qlk_adamw(stream(ctx), params, m, v, grads, n, h->beta1, h->beta2, h->eps, h->decay, h->step_size,
                              h->bc2_sqrt),
                    "adamw");
}

static int cuda_lora_merge(ql_be_ctx *ctx, float *w, const float *a, const float *b, int64_t out, int64_t in,
                           int64_t rank, float scale)
{
    return launched(qlk_lora_merge(stream(ctx), w, a, b, out, in, rank, scale), "LoRA merge");
}

static const ql_backend cuda_backend = {
    .name = "cuda",
    .host_memory = 0,
    .attention_lse = 1,
    .fused_attention = cuda_fused_attention,
    .open = cuda_open,
    .close = cuda_close,
    .sync = cuda_sync,
    .event = cuda_event,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .zero = cuda_zero,
    .copy = cuda_copy,
    .upload = cuda_upload,
    .download = cuda_download,
    .download_async = cuda_download_async,
    .mapped = cuda_mapped,
    .pin = cuda_pin,
    .unpin = cuda_unpin,
    .materialize = cuda_materialize,
    .embedding = cuda_embedding,
    .embedding_w16 = cuda_embedding_w16,
    .round_bf16 = cuda_round_bf16,
    .widen_bf16 = cuda_widen_bf16,
    .matmul_nt = cuda_matmul_nt,
    .matmul_nt_w16 = cuda_matmul_nt_w16,
    .matmul_backward_input_w16 = cuda_matmul_backward_input_w16,
    .rmsnorm_forward = cuda_rmsnorm_forward,
    .rope_forward = cuda_rope_forward,
    .attention_forward = cuda_attention_forward,
    .attention_forward_train = cuda_attention_forward_train,
    .swiglu_forward = cuda_swiglu_forward,
    .add_inplace = cuda_add_inplace,
    .add_bias = cuda_add_bias,
    .lora_forward = cuda_lora_forward,
    .dropout_forward = cuda_dropout_forward,
    .matmul_backward_input = cuda_matmul_backward_input,
    .rmsnorm_backward = cuda_rmsnorm_backward,
    .rope_backward = cuda_rope_backward,
    .attention_backward = cuda_attention_backward,
    .lora_merge = cuda_lora_merge,
    .swiglu_backward = cuda_swiglu_backward,
    .lora_backward = cuda_lora_backward,
    .dropout_backward = cuda_dropout_backward,
    .cross_entropy = cuda_cross_entropy,
    .sum_squares = cuda_sum_squares,
    .sum_squares_into = cuda_sum_squares_into,
    .scale = cuda_scale,
    .adamw = cuda_adamw,
};

const ql_backend *ql_backend_cuda(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        cudaGetLastError();
        ql_error(QL_ENOTSUP, "device cuda is not available: %s",
                 e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device is present");
        return NULL;
    }
    return &cuda_backend;
}

#else

const ql_backend *ql_backend_cuda(void)
{
    ql_error(QL_ENOTSUP, "device cuda is not available: this qlora was built without CUDA");
    return NULL;
}

#endif
