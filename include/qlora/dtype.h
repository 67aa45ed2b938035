/* Element types: names as safetensors spells them, sizes, conversions. */
#ifndef QLORA_DTYPE_H
#define QLORA_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "quantizer.h"

#ifdef __cplusplus
extern "C" {
#endif

const char *ql_dtype_name(int dtype);          /* "F32", ...; "?" if unknown */
int ql_dtype_from_name(const char *name);      /* -1 if unknown */
size_t ql_dtype_size(int dtype);               /* 0 if unknown */
int ql_dtype_is_float(int dtype);              /* F32, F16, BF16, F64 */
const char *ql_dtype_torch_name(int dtype);    /* "float32", "bfloat16", ... */

float ql_f16_to_f32(uint16_t h);
uint16_t ql_f32_to_f16(float f);   /* round to nearest even */
float ql_bf16_to_f32(uint16_t b);
uint16_t ql_f32_to_bf16(float f);  /* round to nearest even; NaN stays NaN */

/* Convert n elements of a float dtype to float32.  Returns QL_ENOTSUP for
 * non-float dtypes. */
int ql_convert_to_f32(int dtype, const void *src, size_t n, float *dst);
/* First index of a NaN or Inf in a float tensor, or -1. */
int64_t ql_first_nonfinite(int dtype, const void *src, size_t n);
int64_t ql_shape_numel(const int64_t *shape, int ndim);

#ifdef __cplusplus
}
#endif
#endif
