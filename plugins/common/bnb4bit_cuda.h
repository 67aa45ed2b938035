/* Launchers of the NF4 / FP4 device materialize (bnb4bit_cuda.cu) and
 * quantize (bnb4bit_quantize.cu), called by bnb4bit.c's
 * materialize_rows_device and quantize_device slots (internal). */
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

/* The device quantize (bnb4bit_quantize.cu): qlp_4bit_quantize's steps on
 * the GPU, the results copied into the host state's buffers. */
typedef struct qlp_4bit_cuda_quant_args {
    int type; /* qlp_4bit_type */
    int blocksize, double_quant, nested_blocksize;
    int64_t n;       /* rows * cols */
    const void *w;   /* device: n elements */
    int bf16;        /* w holds bfloat16 (else float32) */
    float map[256];  /* the signed dynamic map, with double quant */
    /* host, as the state holds them */
    uint8_t *packed;       /* (n+1)/2 */
    float *absmax;         /* nblocks, without double quant */
    uint8_t *absmax_codes; /* nblocks, with double quant */
    float *nested;         /* nnested, with double quant */
    float *offset;         /* 1, with double quant */
    void *stream;          /* cudaStream_t */
} qlp_4bit_cuda_quant_args;

/* 0, with *bad_index = -1, or the first index whose weight is NaN or Inf
 * and that weight in *bad_value (the outputs are then meaningless); -1 with
 * the CUDA error text in err; 1 with why in err when this GPU is not one
 * whose results the CPU reproduces (sm_90).  Waits for the stream. */
int qlp_4bit_cuda_quantize(const qlp_4bit_cuda_quant_args *a, int64_t *bad_index, float *bad_value, char *err,
                           size_t errcap);

#ifdef __cplusplus
}
#endif
#endif
