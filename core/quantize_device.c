#include "quantize_device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ql_config.h"
#include "qlora/dtype.h"
#include "qlora/error.h"

#if QL_HAVE_CUDA
#include <cuda_runtime.h>
#endif

int ql_qdev_pick(const char *device, const ql_qz *q, const char *what, int *on_gpu)
{
    *on_gpu = 0;
    if (!device || !strcmp(device, "cpu")) return QL_OK;
    int asked_for_cuda = !strcmp(device, "cuda");
    if (!asked_for_cuda && strcmp(device, "auto"))
        return ql_error(QL_EINVAL, "unknown device '%s': use cpu, cuda or auto", device);
    const ql_backend *be = NULL;
    if (ql_backend_find(device, &be)) return ql_error_context("%s", what);
    if (be->host_memory) return QL_OK; /* auto, and no GPU */
    if (!q->desc->quantize_device) {
        if (asked_for_cuda)
            fprintf(stderr,
                    "qlora: warning: quantizer %s has no device quantize (quantize_device, plugin ABI 1.2); "
                    "quantizing on the CPU\n",
                    q->desc->name);
        return QL_OK;
    }
    *on_gpu = 1;
    return QL_OK;
}

void ql_qdev_free(ql_qdev *u)
{
#if QL_HAVE_CUDA
    if (u->buf) cudaFree(u->buf);
#endif
    u->buf = NULL;
    u->cap = 0;
}

#if QL_HAVE_CUDA
static int upload(const ql_matrix_desc *md, const void *w, size_t bytes, ql_qdev *u)
{
    cudaError_t e;
    if (bytes > u->cap) {
        ql_qdev_free(u);
        if ((e = cudaMalloc(&u->buf, bytes ? bytes : 1)) != cudaSuccess) {
            u->buf = NULL;
            cudaGetLastError();
            return ql_error(QL_ECUDA, "CUDA: cannot allocate %zu bytes on the device for %s: %s", bytes, md->name,
                            cudaGetErrorString(e));
        }
        u->cap = bytes;
    }
    if ((e = cudaMemcpy(u->buf, w, bytes, cudaMemcpyHostToDevice)) != cudaSuccess)
        return ql_error(QL_ECUDA, "CUDA: uploading %s (%zu bytes): %s", md->name, bytes, cudaGetErrorString(e));
    return QL_OK;
}
#endif

int ql_qdev_quantize(const ql_qz *q, const ql_matrix_desc *md, const void *w, int32_t dtype, ql_qdev *u,
                     ql_qstate **s)
{
#if QL_HAVE_CUDA
    const size_t n = (size_t)(md->rows * md->cols);
    float *f32 = NULL;
    int rc;
    if (dtype == QL_DTYPE_BF16) {
        if ((rc = upload(md, w, n * 2, u))) return rc;
        ql_error_clear();
        rc = q->desc->quantize_device(q->inst, md, u->buf, QL_DTYPE_BF16, NULL, s);
        if (rc != QL_ENOTSUP) return rc;
    } else if (dtype == QL_DTYPE_F32) {
        if ((rc = upload(md, w, n * 4, u))) return rc;
        return q->desc->quantize_device(q->inst, md, u->buf, QL_DTYPE_F32, NULL, s);
    }
    /* float32 for a plugin without bf16 input, or a float16 checkpoint */
    if (!(f32 = malloc((n ? n : 1) * sizeof *f32))) return ql_error(QL_ENOMEM, "out of memory converting %s", md->name);
    if ((rc = ql_convert_to_f32(dtype, w, n, f32)) == QL_OK && (rc = upload(md, f32, n * 4, u)) == QL_OK) {
        ql_error_clear();
        rc = q->desc->quantize_device(q->inst, md, u->buf, QL_DTYPE_F32, NULL, s);
    }
    free(f32);
    return rc;
#else
    (void)q, (void)md, (void)w, (void)dtype, (void)u, (void)s;
    return ql_error(QL_ENOTSUP, "device cuda is not available: this qlora was built without CUDA");
#endif
}
