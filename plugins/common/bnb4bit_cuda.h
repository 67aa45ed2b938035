/* Launcher of the NF4 / FP4 device materialize (bnb4bit_cuda.cu), called by
 * bnb4bit.c's materialize_rows_device slot (internal). */
#ifndef QLP_BNB4BIT_CUDA_H
#define QLP_BNB4BIT_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qlp_4bit_cuda_args {
    float table[16]; /* dequantization table (FP4 code 8 as -0.0, as the reference decodes it) */
    float map[256];  /* dynamic map of the absmax codes, with double quant */
    const uint8_t *packed;       /* device */
    const float *absmax;         /* device, without double quant */
    const uint8_t *absmax_codes; /* device, with double quant */
    const float *nested;         /* device, with double quant */
    float offset;
    int blocksize, double_quant, bf16;
    int64_t cols;
    void *out; /* device: rows row0 .. row0 + nrows - 1, ld elements apart */
    int64_t ld, row0, nrows;
    void *stream; /* cudaStream_t */
} qlp_4bit_cuda_args;

/* 0, or -1 with the CUDA error text in err. */
int qlp_4bit_cuda_materialize(const qlp_4bit_cuda_args *a, char *err, size_t errcap);

#ifdef __cplusplus
}
#endif
#endif
