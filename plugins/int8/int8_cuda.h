/* Launcher of the int8 device materialize (int8_cuda.cu; internal). */
#ifndef QLP_INT8_CUDA_H
#define QLP_INT8_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Rows row0 .. row0 + nrows - 1 of [rows, cols] codes (device) with their
 * row scales scb (device) into out (ld elements apart; bf16 or float32).
 * 0, or -1 with the CUDA error text in err. */
int qlp_int8_cuda_materialize(const int8_t *codes, const float *scb, int64_t cols, int bf16, void *out, int64_t ld,
                              int64_t row0, int64_t nrows, void *stream, char *err, size_t errcap);

#ifdef __cplusplus
}
#endif
#endif
