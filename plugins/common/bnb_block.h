/* One block of bitsandbytes' blockwise quantizers, element by element: the
 * code the CPU reference (bnb.c) runs per block and the plugins' device
 * quantize kernels (bnb4bit_quantize.cu) run per thread.  Compiles as C11 and
 * under nvcc (QLP_HD); the only difference between the two is the reciprocal,
 * the sm_90 instruction on the device and its exact emulation on the CPU
 * (qlp_rcp_ftz, fastmath.h) (internal). */
#ifndef QLP_BNB_BLOCK_H
#define QLP_BNB_BLOCK_H

#include <float.h>
#include <math.h>
#include <stdint.h>

#include "fastmath.h"
#include "qlp_hd.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qlp_4bit_type { QLP_NF4 = 0, QLP_FP4 = 1 } qlp_4bit_type;

/* Decision tree over the midpoints between neighbouring NF4 values. */
QLP_HD unsigned qlp_nf4_encode(float x)
{
    if (x > 0.03979014977812767f) {
        if (x > 0.3893125355243683f) {
            if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
            return x > 0.5016634166240692f ? 13 : 12;
        }
        if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
        return x > 0.1202552504837513f ? 9 : 8;
    }
    if (x > -0.33967943489551544f) {
        if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
        return x > -0.23460740596055984f ? 5 : 4;
    }
    if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
    return x > -0.8480964004993439f ? 1 : 0;
}

/* Sign bit 3; magnitude index by thresholds on |x| (the code order is not monotonic). */
QLP_HD unsigned qlp_fp4_encode(float x)
{
    unsigned sign = x < 0 ? 8u : 0u;
    x = fabsf(x);
    if (x > 0.29166667f) {
        if (x > 0.583333f) return (x > 0.8333333f ? 3u : 2u) + sign;
        return (x > 0.4166667f ? 5u : 4u) + sign;
    }
    if (x > 0.0859375f) return (x > 0.20833333f ? 7u : 6u) + sign;
    return (x > 0.00260417f ? 1u : 0u) + sign;
}

QLP_HD unsigned qlp_4bit_encode_one(qlp_4bit_type type, float x)
{
    return type == QLP_NF4 ? qlp_nf4_encode(x) : qlp_fp4_encode(x);
}

/* Binary search over the sorted 256-entry map, then the nearer of the two
 * neighbours by the midpoint, exactly as the reference kernel walks it. */
QLP_HD unsigned qlp_code8_nearest(const float *map, float x)
{
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = map[pivot];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
    }
    if (upper_pivot == 255) upper = map[upper_pivot];
    if (lower_pivot == 0) lower = map[lower_pivot];
    if (x > val) {
        float midpoint = qlp_mul_ftz(qlp_ftz(upper + val), 0.5f);
        return x > midpoint ? (unsigned)upper_pivot : (unsigned)pivot;
    }
    float midpoint = qlp_mul_ftz(qlp_ftz(lower + val), 0.5f);
    return x < midpoint ? (unsigned)lower_pivot : (unsigned)pivot;
}

/* max |x| of a block in the reference kernel's order, flushed: an all-zero
 * block keeps the sign of its last zero (see qlp_abs_ftz). */
QLP_HD float qlp_block_absmax(const float *x, int64_t count)
{
    float m = -FLT_MAX;
    for (int64_t i = 0; i < count; i++) m = qlp_max_ftz(m, qlp_abs_ftz(x[i]));
    return m;
}

/* One 4-bit block of `count` values (count even, or the odd tail of the
 * tensor, padded with 0.0, which the kernel encodes like any value): codes
 * into packed[0 .. (count+1)/2), element 2j in the high nibble; the block's
 * absmax into *absmax. */
QLP_HD void qlp_4bit_block(qlp_4bit_type type, const float *x, int64_t count, uint8_t *packed, float *absmax)
{
    float m = qlp_block_absmax(x, count);
    *absmax = m;
    float inv = qlp_rcp_ftz(m);
    for (int64_t i = 0; i < count; i += 2) {
        float hi = x[i];
        float lo = i + 1 < count ? x[i + 1] : 0.0f;
        unsigned ch = qlp_4bit_encode_one(type, qlp_mul_ftz(hi, inv));
        unsigned cl = qlp_4bit_encode_one(type, qlp_mul_ftz(lo, inv));
        packed[i / 2] = (uint8_t)((ch << 4) | cl);
    }
}

/* One 8-bit block against a sorted 256-entry map: codes[0 .. count), the
 * block's absmax into *absmax. */
QLP_HD void qlp_8bit_block(const float *map, const float *x, int64_t count, uint8_t *codes, float *absmax)
{
    float m = qlp_block_absmax(x, count);
    *absmax = m;
    float inv = qlp_rcp_ftz(m);
    for (int64_t i = 0; i < count; i++) codes[i] = (uint8_t)qlp_code8_nearest(map, qlp_mul_ftz(x[i], inv));
}

#ifdef __cplusplus
}
#endif
#endif
