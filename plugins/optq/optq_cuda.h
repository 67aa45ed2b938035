/* Launcher of the optq device materialize (optq_cuda.cu) (internal). */
#ifndef QLP_OPTQ_CUDA_H
#define QLP_OPTQ_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Rows row0 .. row0 + nrows - 1 of the [rows, cols] GPTQ matrix whose
 * device copies are qweight [ceil(cols / 32) * bits, rows], g_idx [cols],
 * scale (float32) and zero [groups, rows], into out (ld elements apart;
 * bf16 or float32).  Launches on stream without waiting.  0, or -1 with the
 * CUDA error text in err. */
int qlp_optq_cuda_materialize(const uint32_t *qweight, const int32_t *g_idx, const float *scale, const int32_t *zero,
                              int bits, int64_t rows, int64_t cols, int bf16, void *out, int64_t ld, int64_t row0,
                              int64_t nrows, void *stream, char *err, size_t errcap);

#ifdef __cplusplus
}
#endif
#endif
