/* Launchers of the int8 device materialize (int8_cuda.cu) and quantize
 * (int8_quantize.cu) (internal). */
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

/* The device quantize (int8_quantize.cu): [rows, cols] weights w (device,
 * bfloat16 when bf16, else float32) into the host state's codes and scb.
 * 0, with *bad_index = -1, or the first index whose weight is NaN, Inf or
 * outside float16's range and that weight in *bad_value (the outputs are
 * then meaningless); -1 with the CUDA error text in err; 1 with why in err
 * when this GPU is not one whose results the CPU reproduces (sm_90).  Waits
 * for the stream. */
int qlp_int8_cuda_quantize(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *codes, float *scb, void *stream,
                           int64_t *bad_index, float *bad_value, char *err, size_t errcap);

#ifdef __cplusplus
}
#endif
#endif
